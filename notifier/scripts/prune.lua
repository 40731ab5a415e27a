-- Forget requests that finished before the cutoff, and raise the horizon to the latest
-- of their finish times: a forgotten request that is listed again is then first seen
-- with a created_at at or before the horizon, and is recorded silently, never notified.
-- KEYS: 1 epoch, 2 lease, 3.. state buckets
-- ARGV: 1 lease token, 2 epoch id, 3 cutoff unix s
local epoch, refused = guard(KEYS[2], ARGV[1], KEYS[1], ARGV[2], 'phase', 'horizon')
if refused then return refused end
if epoch[2] ~= 'live' then return 0 end
local cutoff, latest, pruned = tonumber(ARGV[3]), 0, 0
for k = 3, #KEYS do
  local entries = redis.call('HGETALL', KEYS[k])
  for j = 1, #entries, 2 do
    local finished = tonumber(string.match(entries[j + 1], '^%a*|(%d+)|'))
    if finished and finished < cutoff then
      redis.call('HDEL', KEYS[k], entries[j])
      pruned = pruned + 1
      if finished > latest then latest = finished end
    end
  end
end
if latest * 1000 > tonumber(epoch[3]) then
  redis.call('HSET', KEYS[1], 'horizon', latest * 1000)
end
return pruned
