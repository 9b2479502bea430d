--[[
ratelimit.lua — the shared rate guard: one slot of SMS_POLYV_RATE requests per second for one
Polyv request, across every worker and thread that shares the ledger Redis. A GCRA (generic
cell rate algorithm): one key holding the "theoretical arrival time" of the next request.

One round trip, atomic. Called just before each Polyv request (after nothing else: a request
that gets no slot has reserved nothing and burns no attempt). The time is Redis's own (TIME),
so the workers' clocks need not agree.

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

local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return {'paused', tostring(paused)}
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])

local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if wait > tonumber(ARGV[3]) then
  return {'later', tostring(math.ceil(wait))}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', next_tat),
  'PX', math.ceil(next_tat - now + tolerance) + 1000)
return {'ok', tostring(math.ceil(wait))}
