-- Remove a consumer from a route's group if its heartbeat is gone and it holds nothing:
-- deleting a consumer drops its pending entries, so both are checked in the same step.
--
-- KEYS: 1 outbox, 2 heartbeat of the consumer
-- ARGV: 1 group (route), 2 consumer
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
