-- Claim a route's retries that are due: raise each one's score to the end of its
-- visibility timeout (so no other worker takes it meanwhile, and it comes back by itself
-- if this worker dies unnoticed) and note which consumer sends it. Nothing is removed
-- until the attempt is settled.
--
-- KEYS: 1 retries, 2 retry events, 3 retry claims
-- ARGV: 1 now unix ms, 2 visible again at unix ms, 3 most to claim, 4 consumer
-- Returns entry id, event JSON, entry id, event JSON, ...
local claimed = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, entry in ipairs(due) do
  local event = redis.call('HGET', KEYS[2], entry)
  if event then
    redis.call('ZADD', KEYS[1], ARGV[2], entry)
    redis.call('HSET', KEYS[3], entry, ARGV[4])
    claimed[#claimed + 1] = entry
    claimed[#claimed + 1] = event
  else
    redis.call('ZREM', KEYS[1], entry)  -- without its event there is nothing to send
  end
end
return claimed
