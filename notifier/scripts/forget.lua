-- Stop looking for requests that the listing no longer holds: they leave the unfinished
-- index (their state stays, and a request that comes back is diffed as usual).
-- KEYS: 1 epoch, 2 lease, 3 unfinished index
-- ARGV: 1 lease token, 2 epoch id, 3.. request ids
local _, refused = guard(KEYS[2], ARGV[1], KEYS[1], ARGV[2])
if refused then return refused end
return redis.call('HDEL', KEYS[3], unpack(ARGV, 3))
