-- Keep the pacing slot of one Slack webhook URL busy for at least `delay` from now, as
-- when Slack answered 429 with Retry-After; an existing later hold stays.
--
-- KEYS: 1 slot key
-- ARGV: 1 now (unix ms), 2 delay (ms)
local now, delay = tonumber(ARGV[1]), tonumber(ARGV[2])
local free_at = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now + delay)
redis.call('SET', KEYS[1], free_at, 'PX', free_at - now + 60000)
return free_at - now
