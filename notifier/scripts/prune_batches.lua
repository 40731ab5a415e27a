-- Forget batches in which nothing changed since the cutoff: their hash, their results
-- and their place in both sorted sets. A batch that changed since the caller read it
-- is kept.
-- KEYS: 1 epoch, 2 lease, 3 batches, 4 open batches, 5.. batch / batch-results pairs
-- ARGV: 1 lease token, 2 epoch id, 3 cutoff unix ms, 4.. the batches' reference_ids
local _, refused = guard(KEYS[2], ARGV[1], KEYS[1], ARGV[2])
if refused then return refused end
local cutoff, pruned = tonumber(ARGV[3]), 0
for i = 4, #ARGV do
  local changed = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[i]))
  if changed and changed <= cutoff then
    local k = 5 + 2 * (i - 4)
    redis.call('DEL', KEYS[k], KEYS[k + 1])
    redis.call('ZREM', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[4], ARGV[i])
    pruned = pruned + 1
  end
end
return pruned
