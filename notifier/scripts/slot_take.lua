-- Take the pacing slot of one Slack webhook URL: a message may go now if the slot is
-- free, and then it is held for one interval. The times come from the caller's clock
-- (so tests can inject one); the key's expiry only cleans up, with a wide margin.
--
-- KEYS: 1 slot key
-- ARGV: 1 now (unix ms), 2 interval (ms)
-- Returns 0 if taken, else the milliseconds until the slot is free.
local now, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local free_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if free_at > now then
  return free_at - now
end
redis.call('SET', KEYS[1], now + interval, 'PX', interval + 60000)
return 0
