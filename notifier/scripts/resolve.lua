-- Resolve one delivery in one atomic step: take it off where it waits (the route's
-- pending list on the outbox, or the route's retry set), then, by the outcome, forget
-- it (delivered or not for this route), schedule it again, or dead-letter it. If it is
-- no longer there, another worker resolved it already and nothing is written.
--
-- KEYS: 1 outbox, 2 retries, 3 retry events, 4 retry claims, 5 dead letters
-- ARGV: 1 group (route), 2 outbox entry id, 3 source: "outbox" or "retry",
--       4 action: "done", "retry" or "dead", 5 due unix ms (retry), 6 event and attempts
--       as JSON (retry), 7 most dead letters kept, 8.. dead letter field/value pairs (dead)
local group, entry = ARGV[1], ARGV[2]
local taken
if ARGV[3] == 'outbox' then
  taken = redis.call('XACK', KEYS[1], group, entry)
else
  taken = redis.call('ZREM', KEYS[2], entry)
  redis.call('HDEL', KEYS[3], entry)
  redis.call('HDEL', KEYS[4], entry)
end
if taken == 0 then return 0 end
local action = ARGV[4]
if action == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[5], entry)
  redis.call('HSET', KEYS[3], entry, ARGV[6])
elseif action == 'dead' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', unpack(ARGV, 8))
end
return 1
