-- Make a route's retries claimed by a consumer whose heartbeat is gone due now, so a
-- live worker sends them at once instead of after their visibility timeout.
--
-- KEYS: 1 retries, 2 retry claims, 3 heartbeat of the dead consumer
-- ARGV: 1 dead consumer, 2 now unix ms
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local claims = redis.call('HGETALL', KEYS[2])
local released = 0
for i = 1, #claims, 2 do
  if claims[i + 1] == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], claims[i])
    redis.call('HDEL', KEYS[2], claims[i])
    released = released + 1
  end
end
return released
