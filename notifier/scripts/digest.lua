-- Settle batches: for each digest route, queue one digest of the results the route has
-- not had yet, once every known member of the batch is finished, nothing in it changed
-- for the route's digest_wait and its last digest of the batch is digest_interval old.
-- The results are frozen into the outbox entry, so every retry, restart, replica and
-- replay sends the same id and body. A batch owing no route anything is closed: its
-- results are dropped and it leaves the open set until a member changes again.
--
-- A batch hash keeps, per route, the sequence number of the last result it digested
-- ('sent:<route>') and when ('at:<route>'); route names hold no ':', so these fields
-- never meet the batch's own fields.
--
-- Returns the digests queued and the batches that owe a route a digest its digest_wait or
-- digest_interval holds back.
--
-- KEYS: 1 epoch, 2 lease, 3 outbox, 4 open batches, 5.. batch / batch-results pairs
-- ARGV: 1 lease token, 2 epoch id, 3 now unix ms, 4 route count n, then n times route
--       name / digest_wait ms / digest_interval ms, then per batch (in the order of its
--       keys) its reference_id and a mask of n '0' or '1': which routes digest it.
local _, refused = guard(KEYS[2], ARGV[1], KEYS[1], ARGV[2])
if refused then return refused end
local now, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local routes, groups = {}, group_names(KEYS[3])
for i = 0, n - 1 do
  local name = ARGV[5 + 3 * i]
  if not groups[name] then
    return redis.error_reply('NOGROUP route ' .. name .. ' has no consumer group on the outbox')
  end
  routes[#routes + 1] = {name, tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i])}
end

-- The outbox entry of one digest: each member is "<bytes of previous status code>
-- <bytes of snapshot> " followed by both, in the order of the request ids.
local function digest(route, ref, members, created)
  table.sort(members, function(a, b) return a[1] < b[1] end)
  local parts = {}
  for _, member in ipairs(members) do
    local _, stop, previous_bytes = string.find(member[2], '^%d+ (%d+) ')
    local previous = string.sub(member[2], stop + 1, stop + tonumber(previous_bytes))
    local snapshot = string.sub(member[2], stop + tonumber(previous_bytes) + 1)
    parts[#parts + 1] = #previous .. ' ' .. #snapshot .. ' ' .. previous .. snapshot
  end
  redis.call('XADD', KEYS[3], '*', 'd', route, 'b', ref, 'm', table.concat(parts),
    'c', created, 't', now)
end

local queued, owing, k = 0, 0, 5
for a = 5 + 3 * n, #ARGV, 2 do
  local ref, mask, batch, results = ARGV[a], ARGV[a + 1], KEYS[k], KEYS[k + 1]
  k = k + 2
  local state = redis.call('HMGET', batch, 'unfinished', 'changed', 'created')
  local quiet = now - (tonumber(state[2]) or now)
  if (tonumber(state[1]) or 0) <= 0 then
    local entries = redis.call('HGETALL', results)
    local owed = false
    for i, route in ipairs(routes) do
      if string.sub(mask, i, i) == '1' then
        local name, wait, interval = route[1], route[2], route[3]
        local sent = redis.call('HMGET', batch, 'sent:' .. name, 'at:' .. name)
        local done, last = tonumber(sent[1]) or 0, tonumber(sent[2])
        local members, top = {}, done
        for j = 1, #entries, 2 do
          local seq = tonumber(string.match(entries[j + 1], '^(%d+) '))
          if seq > done then
            members[#members + 1] = {entries[j], entries[j + 1]}
            if seq > top then top = seq end
          end
        end
        if #members > 0 then
          if quiet >= wait and (last == nil or now - last >= interval) then
            digest(name, ref, members, state[3] or '')
            redis.call('HSET', batch, 'sent:' .. name, top, 'at:' .. name, now)
            queued = queued + 1
          else
            owed = true
          end
        end
      end
    end
    if owed then
      owing = owing + 1
    else
      redis.call('DEL', results)
      redis.call('ZREM', KEYS[4], ref)
    end
  end
end
return {queued, owing}
