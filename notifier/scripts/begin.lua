-- Open a poll cycle: return the epoch, creating it (a new baseline) when it is missing,
-- and make sure every configured route has its consumer group on the outbox.
-- A new epoch's groups start at the beginning of the outbox; a route added to an
-- existing epoch starts at its end, so it does not receive what was queued before it.
-- KEYS: 1 epoch, 2 lease, 3 outbox
-- ARGV: 1 lease token, 2 id of a new epoch, 3 "1" to notify existing requests, 4.. routes
local epoch, refused = guard(KEYS[2], ARGV[1], KEYS[1], nil, 'phase')
if refused then return refused end
local created, start = 0, '$'
if not epoch[1] then
  redis.call('HSET', KEYS[1], 'id', ARGV[2], 'phase', 'baseline', 'newest', 0, 'horizon', 0,
    'existing', ARGV[3])
  epoch, created, start = {ARGV[2], 'baseline'}, 1, '0'
end
local groups = group_names(KEYS[3])
for i = 4, #ARGV do
  if not groups[ARGV[i]] then
    redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[i], start, 'MKSTREAM')
  end
end
return {epoch[1], epoch[2], created}
