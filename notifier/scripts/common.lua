-- Prepended to every script that writes request state.

-- A caller that lost the lease, or whose cycle began with an epoch that is gone or
-- replaced, must not write: returns nil and the error reply to return, or else the
-- epoch's id and the other fields asked for.
local function guard(lease_key, token, epoch_key, epoch_id, ...)
  if redis.call('GET', lease_key) ~= token then
    return nil, redis.error_reply('LEASE_LOST this poller no longer holds the lease')
  end
  local epoch = redis.call('HMGET', epoch_key, 'id', ...)
  if epoch_id ~= nil and epoch[1] ~= epoch_id then
    return nil, redis.error_reply('EPOCH_CHANGED the epoch this cycle began with is gone or replaced')
  end
  return epoch
end

-- The names of the outbox's consumer groups, as a set.
local function group_names(outbox)
  local names = {}
  if redis.call('EXISTS', outbox) == 1 then
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', outbox)) do
      names[group[2]] = true
    end
  end
  return names
end
