-- Take over outbox entries pending on a consumer whose heartbeat is gone (its process
-- died), unless the heartbeat came back meanwhile.
--
-- KEYS: 1 outbox, 2 heartbeat of the dead consumer
-- ARGV: 1 group (route), 2 dead consumer, 3 this consumer, 4 most to claim
-- Returns the claimed entries as XCLAIM does.
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])
if #pending == 0 then return {} end
local ids = {}
for i, item in ipairs(pending) do ids[i] = item[1] end
return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
