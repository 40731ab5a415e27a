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
-- of the requests that entered each status; or, writing nothing, 'SNAPSHOTS' and the
-- positions in the page of the requests whose event needs the snapshot left empty.
--
-- Every request listed unfinished is kept in the unfinished index with its created_at and
-- where the listing held it, so each cycle can look at it whatever its age; it leaves the
-- index when it is listed finished.
--
-- With digest routes, a request with a reference_id is also a member of its batch: the
-- batch counts its unfinished members, when a member last changed, its first created_at,
-- and keeps each notified entry into a finished status as a result for the digests
-- (see digest.lua).
--
-- KEYS: 1 epoch, 2 lease, 3 outbox, 4 batches, 5 open batches, 6 unfinished index, 7.. state
--       buckets and batch / batch-results pairs
-- ARGV: 1 lease token, 2 epoch id, 3 notify_on codes, 4 detection unix ms, 5 route count n,
--       6..5+n route names, 6+n the page's requests packed in one string (one argument
--       per field cost the caller more than the rest of the call), 7+n the batch members
--       among them (empty without digest routes), then position / snapshot pairs. Each
--       request is "<bucket index in KEYS> <created_at unix ms> <finished unix s or
--       nothing> <offset in the listing or nothing> <bytes of id> <bytes of status code> "
--       followed by the id and the code;
--       each member "<position in the page> <batch index in KEYS> <bytes of reference_id> "
--       followed by the reference_id.
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

-- The page's requests, and the snapshots the caller sent (by position in the page).
local packed, requests, snapshots = ARGV[6 + routes], {}, {}
local at = 1
while at <= #packed do
  local _, stop, index, created, finished, offset, id_bytes, code_bytes =
    string.find(packed, '^(%d+) (%d+) (%d*) (%d*) (%d+) (%d+) ', at)
  local id_end = stop + tonumber(id_bytes)
  at = id_end + tonumber(code_bytes) + 1
  requests[#requests + 1] = {KEYS[tonumber(index)], string.sub(packed, stop + 1, id_end),
    string.sub(packed, id_end + 1, at - 1), tonumber(created), finished, 0, nil, offset}
end
local members = ARGV[7 + routes]
at = 1
while at <= #members do
  local _, stop, position, batch, ref_bytes = string.find(members, '^(%d+) (%d+) (%d+) ', at)
  at = stop + tonumber(ref_bytes) + 1
  local r = requests[tonumber(position) + 1]
  r[6], r[7] = tonumber(batch), string.sub(members, stop + 1, at - 1)
end

-- Record a changed request in its batch; `result` is its snapshot when it entered a
-- finished status that is notified.
local FINISHED = {c = true, f = true}
local function track(r, previous, stored, result)
  local batch, results, ref = KEYS[r[6]], KEYS[r[6] + 1], r[7]
  local was_unfinished = (stored and not FINISHED[previous]) and 1 or 0
  local is_unfinished = FINISHED[r[3]] and 0 or 1
  if is_unfinished ~= was_unfinished then
    -- Below 0 only when the batch was forgotten while this member was unfinished.
    if redis.call('HINCRBY', batch, 'unfinished', is_unfinished - was_unfinished) < 0 then
      redis.call('HSET', batch, 'unfinished', 0)
    end
  end
  local first = tonumber(redis.call('HGET', batch, 'created'))
  if first == nil or r[4] < first then redis.call('HSET', batch, 'created', r[4]) end
  redis.call('HSET', batch, 'changed', detected)
  if result then
    local seq = redis.call('HINCRBY', batch, 'seq', 1)
    redis.call('HSET', results, r[2], seq .. ' ' .. #previous .. ' ' .. previous .. result)
  end
  redis.call('ZADD', KEYS[4], detected, ref)
  redis.call('ZADD', KEYS[5], detected, ref)
end
for i = 8 + routes, #ARGV, 2 do snapshots[tonumber(ARGV[i])] = ARGV[i + 1] end

-- First decide every request, writing nothing: an event needs the request's snapshot,
-- which the caller sends only when asked (most listed requests queue no event).
local decided, missing = {}, {}
local pending = {}  -- id -> the state this call will store, so a repeat in the page sees it
for position, r in ipairs(requests) do
  local bucket, id, code, created = r[1], r[2], r[3], r[4]
  local stored = pending[id]
  if stored == nil then stored = redis.call('HGET', bucket, id) end
  local accounted, previous = '', ''
  if stored then
    local a, _, p = string.match(stored, '^(%a*)|(%d*)|(.*)$')
    accounted, previous = a or '', p or ''
  end
  if created > newest then newest = created end
  if previous ~= code then
    local fires = #code == 1 and string.find(notify_on, code, 1, true) ~= nil
      and string.find(accounted, code, 1, true) == nil
    local emit, silenced = fires, false
    if fires and not stored then
      if baseline then
        emit = existing
      elseif created <= horizon then
        emit, silenced = false, true
      end
    end
    if fires then accounted = accounted .. code end
    if emit and not snapshots[position - 1] then missing[#missing + 1] = position - 1 end
    decided[#decided + 1] = {r, accounted, previous, emit, silenced, stored, position - 1}
    pending[id] = accounted .. '|' .. r[5] .. '|' .. code
  end
end
if #missing > 0 then
  table.insert(missing, 1, 'SNAPSHOTS')
  return missing
end

local changed, events, silenced, first = 0, 0, 0, 0
local entered = {}  -- status code -> requests that entered it (first sightings of a baseline aside)
for _, d in ipairs(decided) do
  local r, accounted, previous, emit, quiet, stored = d[1], d[2], d[3], d[4], d[5], d[6]
  local code = r[3]
  if emit then
    redis.call('XADD', KEYS[3], '*', 'r', snapshots[d[7]], 'p', previous, 't', detected)
    events = events + 1
  end
  if r[6] > 0 then track(r, previous, stored, emit and FINISHED[code] and snapshots[d[7]]) end
  if quiet then silenced = silenced + 1 end
  if FINISHED[code] and stored and not FINISHED[previous] then
    redis.call('HDEL', KEYS[6], r[2])
  end
  redis.call('HSET', r[1], r[2], accounted .. '|' .. r[5] .. '|' .. code)
  changed = changed + 1
  if not stored then first = first + 1 end
  if stored or not baseline then entered[code] = (entered[code] or 0) + 1 end
end
-- Where each unfinished request stands now, changed or not: the next cycle looks there.
for _, r in ipairs(requests) do
  if not FINISHED[r[3]] then
    redis.call('HSET', KEYS[6], r[2], string.format('%d', r[4]) .. ' ' .. r[8])
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
