--[[
requeue.lua — forget the "failed" outcome of a message's numbers so that the message can be
sent again (``polyv-sms dead --requeue``). Accepted numbers stay accepted: they are never sent
twice. The message leaves the dead set.

KEYS[1]  polyv_sms:{appId}:msg:<message_id>
KEYS[2]  polyv_sms:{appId}:dead
ARGV[1]  message id

Returns the numbers whose failed outcome was forgotten.
]]

local reset = {}
local record = redis.call('HGETALL', KEYS[1])
for i = 1, #record, 2 do
  local field, value = record[i], record[i + 1]
  if string.sub(field, 1, 2) == 'n:' and string.sub(value, 1, 7) == 'failed|' then
    -- (and its refund note: a new attempt takes a new unit)
    redis.call('HDEL', KEYS[1], field, 'r:' .. string.sub(field, 3))
    reset[#reset + 1] = string.sub(field, 3)
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
return reset
