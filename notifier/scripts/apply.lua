-- Apply one page of the listing in one atomic step: compare each request's stored status
-- with the listed one, store the new one, and append an event to the outbox for each
-- entry into a notify_on status not yet accounted for. Nothing is written unless the
-- caller still holds the lease, the epoch is the one its cycle began with, and every
-- configured route has its consumer group (an event appended without one would be lost).
--
-- A stored state is "<accounted codes>|<finished unix s>|<status code>": the codes of the
-- notify_on statuses already notified or recorded silently, when the request finished
-- (empty unless it did), and its status last, as an unknown status may hold any character.
--
-- Returns changed, events, silenced and first-seen counts, then status code / count pairs
-- of the requests that entered each status.
--
-- KEYS: 1 epoch, 2 lease, 3 outbox, 4.. state buckets
-- ARGV: 1 lease token, 2 epoch id, 3 notify_on codes, 4 detection unix ms, 5 route count n,
--       6..5+n route names, then 6 per request: index of its bucket in KEYS, id,
--       status code, created_at unix ms, finished unix s or "", snapshot (for notify_on)
local epoch, refused = guard(KEYS[2], ARGV[1], KEYS[1], ARGV[2],
  'phase', 'newest', 'horizon', 'existing')
if refused then return refused end
local routes = tonumber(ARGV[5])
if routes > 0 then
  local groups = group_names(KEYS[3])
  for i = 6, 5 + routes do
    if not groups[ARGV[i]] then
      return redis.error_reply('NOGROUP route ' .. ARGV[i] .. ' has no consumer group on the outbox')
    end
  end
end

local notify_on, detected = ARGV[3], ARGV[4]
local baseline, existing = epoch[2] == 'baseline', epoch[5] == '1'
local newest, horizon = tonumber(epoch[3]), tonumber(epoch[4])
local changed, events, silenced, first = 0, 0, 0, 0
local entered = {}  -- status code -> requests that entered it (first sightings of a baseline aside)
for i = 6 + routes, #ARGV, 6 do
  local bucket, id, code = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  local created, finished = tonumber(ARGV[i + 3]), ARGV[i + 4]
  local stored = redis.call('HGET', bucket, id)
  local accounted, previous = '', ''
  if stored then
    local a, _, p = string.match(stored, '^(%a*)|(%d*)|(.*)$')
    accounted, previous = a or '', p or ''
  end
  if created > newest then newest = created end
  if previous ~= code then
    local fires = #code == 1 and string.find(notify_on, code, 1, true) ~= nil
      and string.find(accounted, code, 1, true) == nil
    local emit = fires
    if fires and not stored then
      if baseline then
        emit = existing
      elseif created <= horizon then
        emit, silenced = false, silenced + 1
      end
    end
    if fires then accounted = accounted .. code end
    if emit then
      redis.call('XADD', KEYS[3], '*', 'r', ARGV[i + 5], 'p', previous, 't', detected)
      events = events + 1
    end
    redis.call('HSET', bucket, id, accounted .. '|' .. finished .. '|' .. code)
    changed = changed + 1
    if not stored then first = first + 1 end
    if stored or not baseline then entered[code] = (entered[code] or 0) + 1 end
  end
end
if baseline and newest > tonumber(epoch[3]) then
  redis.call('HSET', KEYS[1], 'newest', newest)
end
local result = {changed, events, silenced, first}
for code, count in pairs(entered) do
  result[#result + 1] = code
  result[#result + 1] = count
end
return result
