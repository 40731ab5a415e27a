-- Close a complete poll cycle: a baseline becomes live, and requests first seen later
-- are notified unless created before the baseline's newest created_at minus the grace.
-- The sweep state the cycle learned replaces the stored one (none: it is deleted).
-- KEYS: 1 epoch, 2 lease, 3 last-cycle, 4 sweep state
-- ARGV: 1 lease token, 2 epoch id, 3 now unix ms, 4 grace ms, 5.. sweep field/value pairs
local epoch, refused = guard(KEYS[2], ARGV[1], KEYS[1], ARGV[2], 'phase', 'newest', 'horizon')
if refused then return refused end
local was_baseline = epoch[2] == 'baseline'
if was_baseline then
  local horizon = math.max(tonumber(epoch[4]), tonumber(epoch[3]) - tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'phase', 'live', 'horizon', horizon)
end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
if #ARGV > 4 then
  redis.call('HSET', KEYS[4], unpack(ARGV, 5))
end
return was_baseline and 1 or 0
