-- Move one dead letter back to its route's retry set, due now with attempts reset, in
-- one atomic step; 0 if it is not (or no longer) in the dead-letter stream.
--
-- KEYS: 1 dead letters, 2 retries, 3 retry events
-- ARGV: 1 dead letter id, 2 outbox entry id, 3 due unix ms, 4 event JSON (attempts 0)
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
return 1
