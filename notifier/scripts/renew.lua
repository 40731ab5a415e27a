-- Extend the lease if this token still holds it; 0 means it was lost.
-- KEYS: 1 lease   ARGV: 1 token, 2 ttl ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
