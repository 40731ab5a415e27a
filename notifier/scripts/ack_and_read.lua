-- Acknowledge a route's delivered entries and read its next new ones in one round trip
-- (the hot path of delivery: one call per batch instead of one per command).
--
-- KEYS: 1 outbox
-- ARGV: 1 group (route), 2 consumer, 3 most entries to read (0: none), 4.. entry ids to ack
-- Returns {acknowledged (1 or 0 per id), what XREADGROUP returned (nil: nothing new)}.
local acked = {}
for i = 4, #ARGV do
  acked[#acked + 1] = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
end
local read = false
if tonumber(ARGV[3]) > 0 then
  read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
    'STREAMS', KEYS[1], '>')
end
return {acked, read}
