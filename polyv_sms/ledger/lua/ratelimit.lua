--[[
ratelimit.lua — the shared rate guard on its own: one slot of SMS_POLYV_RATE requests per
second, across every worker and thread that shares the ledger Redis (the GCRA is in
_gcra.lua, prepended). The dispatcher does not call it: reserve.lua takes the slot in the same
round trip as the reservation. RateGuard.try_acquire (tests, tools) does.

One round trip, atomic.

KEYS[1]  polyv_sms:{appId}:rate     string, the TAT (ms, float) of the account's next request
KEYS[2]  polyv_sms:{appId}:paused   string, set while Polyv blocks us (rate exceeded); its
                                    value says why, its TTL how long

ARGV[1]  emission interval (ms): 1000 / SMS_POLYV_RATE
ARGV[2]  burst tolerance (ms): how far ahead of the steady pace a request may go
ARGV[3]  longest wait (ms) a caller accepts; a slot further away is not booked

Returns one of
  {"ok", wait_ms}      a slot is booked wait_ms from now (0: at once); the caller sleeps it
  {"later", wait_ms}   the next slot is further than ARGV[3]: nothing booked, try again then
  {"paused", ms_left}  Polyv blocked us: nobody sends until the pause key expires
]]

local paused = gcra_paused(KEYS[2])
if paused then
  return {'paused', tostring(paused)}
end
local wait, book = gcra_next(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > tonumber(ARGV[3]) then
  return {'later', tostring(wait)}
end
book()
return {'ok', tostring(wait)}
