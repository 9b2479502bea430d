--[[
reserve.lua — take daily quota units for the numbers of one message, before one Polyv request.

One round trip, atomic. Per number, all-or-nothing; everything is checked before it is written.

KEYS[1]  polyv_sms:{appId}:msg:<message_id>   hash, the message record
KEYS[2]  polyv_sms:{appId}:quota:<YYYYMMDD>   hash, per-number counts + field "_total"
KEYS[3]  polyv_sms:{appId}:pending            zset, message ids with numbers still reserved

ARGV[1]  now (ms since the epoch)
ARGV[2]  day (YYYYMMDD in SMS_TIMEZONE) of KEYS[2]
ARGV[3]  EXPIREAT for KEYS[2] (end of that day + 1 day, unix seconds)
ARGV[4]  TTL of the message record (seconds)
ARGV[5]  per-number daily limit
ARGV[6]  per-account daily limit
ARGV[7]  max attempts per number
ARGV[8]  lease token of this run
ARGV[9]  lease length (ms)
ARGV[10] score for KEYS[3] if anything is reserved (ms; when the reconciler may step in)
ARGV[11] message id (member of KEYS[3])
ARGV[12] meta (JSON) stored once with HSETNX, or ""
ARGV[13] n: how many valid numbers follow
ARGV[14] m: how many invalid (number, reason) pairs follow them
ARGV[15 .. 14+n]           the valid numbers (normalised, 11 digits)
ARGV[15+n .. 14+n+2m]      invalid number text, reason

Message record fields:
  meta          JSON of the request (task id, names, values, numbers) for requeue/reconcile
  lease         token of the run that holds the pending numbers; lease_until (ms)
  pending       how many numbers are "reserved"
  n:<number>    "state|day|attempts|status|serial|updated_ms|error"
                state: reserved accepted invalid quota_exceeded account_quota_exceeded failed

Returns {"busy", ms_left} when another run holds the lease, else
{"ok", pending, then 7 fields per number: number, verdict, day, attempts, status, serial, error}
where verdict is "send" (a unit is held and this attempt is granted), "exhausted" (reserved but
no attempts left) or the final state.
]]

local msg, quota, pending_set = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local day = ARGV[2]
local phone_limit = tonumber(ARGV[5])
local account_limit = tonumber(ARGV[6])
local max_attempts = tonumber(ARGV[7])
local token = ARGV[8]
local n = tonumber(ARGV[13])
local m = tonumber(ARGV[14])

local holder = redis.call('HGET', msg, 'lease')
if holder and holder ~= token then
  local lease_until = tonumber(redis.call('HGET', msg, 'lease_until') or '0')
  if lease_until > now then
    return {'busy', tostring(lease_until - now)}
  end
end

if ARGV[12] ~= '' then
  redis.call('HSETNX', msg, 'meta', ARGV[12])
end

local function parse(v)
  return string.match(v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
end

local function pack(state, d, attempts, status, serial, err)
  return table.concat({state, d, attempts, status, serial, ARGV[1], err}, '|')
end

local out = {'ok', ''}
local function emit(number, verdict, d, attempts, status, serial, err)
  local i = #out
  out[i + 1] = number; out[i + 2] = verdict; out[i + 3] = d; out[i + 4] = attempts
  out[i + 5] = status; out[i + 6] = serial; out[i + 7] = err
end

local used = tonumber(redis.call('HGET', quota, '_total') or '0')
local taken, sends = 0, 0
local pending = tonumber(redis.call('HGET', msg, 'pending') or '0')

for i = 15, 14 + n do
  local number = ARGV[i]
  local field = 'n:' .. number
  local current = redis.call('HGET', msg, field)
  if current then
    local state, d, attempts, status, serial, _, err = parse(current)
    attempts = tonumber(attempts)
    if state ~= 'reserved' then
      emit(number, state, d, attempts, status, serial, err)
    elseif attempts >= max_attempts then
      emit(number, 'exhausted', d, attempts, status, serial, err)
    else
      attempts = attempts + 1
      redis.call('HSET', msg, field, pack('reserved', d, attempts, status, serial, err))
      emit(number, 'send', d, attempts, status, serial, err)
      sends = sends + 1
    end
  else
    local count = tonumber(redis.call('HGET', quota, number) or '0')
    local state, err
    if count >= phone_limit then
      state = 'quota_exceeded'
      err = 'daily limit of ' .. phone_limit .. ' SMS for this number reached'
    elseif used >= account_limit then
      state = 'account_quota_exceeded'
      err = 'daily limit of ' .. account_limit .. ' SMS for the account reached'
    end
    if state then
      redis.call('HSET', msg, field, pack(state, day, 0, '', '', err))
      emit(number, state, day, 0, '', '', err)
    else
      redis.call('HINCRBY', quota, number, 1)
      used = used + 1
      taken = taken + 1
      pending = pending + 1
      redis.call('HSET', msg, field, pack('reserved', day, 1, '', '', ''))
      emit(number, 'send', day, 1, '', '', '')
      sends = sends + 1
    end
  end
end

for i = 15 + n, 14 + n + 2 * m, 2 do
  local number, reason = ARGV[i], ARGV[i + 1]
  local field = 'n:' .. number
  local current = redis.call('HGET', msg, field)
  if current then
    local state, d, attempts, status, serial, _, err = parse(current)
    emit(number, state, d, attempts, status, serial, err)
  else
    redis.call('HSET', msg, field, pack('invalid', day, 0, '', '', reason))
    emit(number, 'invalid', day, 0, '', '', reason)
  end
end

if taken > 0 then
  redis.call('HINCRBY', quota, '_total', taken)
  redis.call('EXPIREAT', quota, ARGV[3])
  redis.call('HSET', msg, 'pending', pending)
end
if sends > 0 then
  redis.call('HSET', msg, 'lease', token, 'lease_until', now + tonumber(ARGV[9]))
  redis.call('ZADD', pending_set, ARGV[10], ARGV[11])
end
redis.call('EXPIRE', msg, ARGV[4])
out[2] = tostring(pending)
return out
