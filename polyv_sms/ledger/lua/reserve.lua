--[[
reserve.lua — take daily quota units for the numbers of one message, and a slot of the shared
rate guard, before one Polyv request.

One round trip, atomic. Per number, all-or-nothing; everything is checked before it is written.
Safe to replay: the ledger retries a call whose reply was lost in a Redis restart, and a replay
(same lease token, same ARGV[1]) takes no second unit and counts no second attempt. The guard
never refuses a replay (the first call was not refused: it granted the attempts the replay
finds): it books a second slot if one is within ARGV[22] (conservative: the first call's slot
goes unused), else books nothing and answers ARGV[22] as the wait, by which time the first
call's slot (booked at most ARGV[22] after that call) has come.

The rate guard (with KEYS[4] and KEYS[5]; _gcra.lua is prepended) is consulted once the
verdicts are known and before anything of them is written, only when a number would be sent:
paused, or no slot within ARGV[22], and the call returns with nothing reserved (no unit taken,
no attempt counted, no lease, no number's record). It writes only what lets the reconciler
bring the message back should the put-off run's retry be lost (a broker message a worker drops
when its broker connection drops or it dies): the task's request and the message's pending
entry, due after the wait, a lease and the reconciler's grace (and a takeover's lease_stale
note, as for "busy"); a run polling for its slot usually finds both there and writes nothing.
A reserve that sends nothing books no slot and is never put off. The content check and the
lease (busy) come first, as without the guard.

KEYS[1]  polyv_sms:{appId}:msg:<message_id>   hash, the message record
KEYS[2]  polyv_sms:{appId}:quota:<YYYYMMDD>   hash, per-number counts + field "_total"
KEYS[3]  polyv_sms:{appId}:pending            zset, message ids with numbers still reserved
                                              (or put off by the rate guard before any was)
KEYS[4]  polyv_sms:{appId}:rate               string, the rate guard's TAT (see _gcra.lua)
KEYS[5]  polyv_sms:{appId}:paused             string, set while Polyv blocks us
         (KEYS[4] and KEYS[5] are given together, or both left out: no guard)

ARGV[1]  now (ms since the epoch)
ARGV[2]  day (YYYYMMDD in SMS_TIMEZONE) of KEYS[2]
ARGV[3]  EXPIREAT for KEYS[2] (end of that day + 1 day, unix seconds)
ARGV[4]  TTL of the message record (seconds)
ARGV[5]  per-number daily limit
ARGV[6]  per-account daily limit for this message's lane: SMS_ACCOUNT_DAILY_LIMIT, less
         SMS_BULK_HEADROOM for bulk messages (compared with the account's count of the day,
         whatever lane took the units)
ARGV[7]  max attempts per number
ARGV[8]  lease token of this run
ARGV[9]  lease length (ms)
ARGV[10] score for KEYS[3] if anything is reserved (ms; when the reconciler may step in)
ARGV[11] message id (member of KEYS[3])
ARGV[12] field of this task's request, "req:<task id>", or "" (nothing to store)
ARGV[13] the request (JSON), stored once per task with HSETNX
ARGV[14] n: how many valid numbers follow
ARGV[15] m: how many invalid (number, reason) pairs follow them
ARGV[16] the content's fingerprint (sha256 of the numbers, names and values as given), or ""
ARGV[17] takeover grace (ms): how long an expired lease is left to its holder, counted from
         the first reserve that saw it expired, before another run takes the numbers over
ARGV[18] "1" at most once (SMS_RETRY_AMBIGUOUS=false): a number whose last attempt was never
         settled (its run's lease ran out) is not sent again: verdict "unsettled"
ARGV[19] now (ms) at this attempt of the call: the lease's clock. ARGV[1] is the call's first
         attempt's (the record's times, and what tells a replay); a call that rode out a Redis
         outage before it got through must still get a whole lease, counted from now
ARGV[20] the guard's emission interval (ms): 1000 / SMS_POLYV_RATE ("" without the guard)
ARGV[21] the guard's burst tolerance (ms) ("" without the guard)
ARGV[22] the longest wait (ms) for a slot; a slot further away is not booked ("" without)
ARGV[23 .. 22+n]           the valid numbers (normalised, 11 digits)
ARGV[23+n .. 22+n+2m]      invalid number text, reason

Message record fields:
  req:<task id> JSON of each task's request (task id, names, values, numbers, created at),
                for the reconciler and requeue: a message id may be enqueued again by another
                task with other numbers
  content       fingerprint of the message's content: one message id is one content
  lease         token of the run that holds the pending numbers; lease_until (ms)
  lease_stale   (ms) when a reserve first saw the current lease expired (takeover grace)
  lease_at      (ms) when the lease was taken: the numbers it granted an attempt to carry it
                as their updated_ms until they are settled
  pending       how many numbers are "reserved"
  n:<number>    "state|day|attempts|status|serial|updated_ms|error"
                state: reserved accepted invalid quota_exceeded account_quota_exceeded failed

Returns {"conflict"} when the message id was used with another content (nothing is written),
{"busy", ms_left} when another run holds the lease (the request is recorded first),
{"paused", ms_left} when Polyv blocks us, {"rate", wait_ms} when the next slot is further than
ARGV[22] (both: nothing reserved; the request kept for the reconciler, see above), else
{"ok", pending, slot, then one string per number, in the order asked:
"verdict|day|attempts|status|serial|updated|error"} (the number's n:<number> field as it now
is, with the verdict in place of the state) where slot is the wait (ms) before sending, until
the slot booked for this request ("" when the guard was not asked: no guard, or nothing to
send; a replay may wait for the first call's slot, see the top) and verdict is "send" (a unit is held and this attempt is granted), "exhausted" (reserved but no
attempts left), "unsettled" (at most once: the run that sent its last attempt was lost before
it settled; Polyv may have sent it) or the final state.

Cost: the records and today's counts of all numbers are read with one HMGET each and every
write to the record goes in one HSET at the end, so a call runs about 10 Redis commands whatever
the number of numbers (not 4 per number), 4 more with the guard (PTTL, TIME, GET, SET); local
copies keep the per-number logic sequential.
]]

local msg, quota, pending_set = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local day = ARGV[2]
local phone_limit = tonumber(ARGV[5])
local account_limit = tonumber(ARGV[6])
local max_attempts = tonumber(ARGV[7])
local token = ARGV[8]
local n = tonumber(ARGV[14])
local m = tonumber(ARGV[15])
local FIRST = 23  -- ARGV index of the first number
local lease_now = tonumber(ARGV[19])
local guarded = KEYS[5] ~= nil

local head = redis.call('HMGET', msg, 'lease', 'lease_until', 'pending', 'content', 'lease_stale',
  'lease_at')
local holder = head[1]
-- Set when this call takes over a lease whose run never settled: the numbers it was sending.
local orphaned_at = nil

-- ---- one message id, one content; the request recorded before anything can return busy --
if ARGV[16] ~= '' and head[4] and head[4] ~= ARGV[16] then
  return {'conflict'}
end
-- (Written just before a "busy" or "ok" reply: a run the rate guard puts off leaves nothing.)
local stored = false
local function store_request()
  if stored then return end
  stored = true
  if ARGV[16] ~= '' and not head[4] then
    redis.call('HSET', msg, 'content', ARGV[16])
  end
  if ARGV[12] ~= '' then
    redis.call('HSETNX', msg, ARGV[12], ARGV[13])
  end
end

-- ---- the lease: a live one is respected; an expired one is left to its holder for a grace --
-- (it may hold Polyv's answer in its journal, waiting for the ledger to come back: the grace
-- counts from the first reserve that saw the lease expired, so the ledger has been up for it)
if holder and holder ~= token then
  local lease_until = tonumber(head[2] or '0')
  if lease_until > lease_now then
    store_request()
    redis.call('EXPIRE', msg, ARGV[4])
    return {'busy', tostring(lease_until - lease_now)}
  end
  local grace = tonumber(ARGV[17])
  local stale = tonumber(head[5] or '0')
  if stale < lease_until then
    store_request()
    redis.call('HSET', msg, 'lease_stale', lease_now)
    redis.call('EXPIRE', msg, ARGV[4])
    if grace > 0 then return {'busy', tostring(grace)} end
  elseif stale + grace > lease_now then
    store_request()
    return {'busy', tostring(stale + grace - lease_now)}
  end
  if ARGV[18] == '1' then orphaned_at = head[6] end
end

-- The records of every number asked about, and today's counts of the valid ones (plus the
-- account's "_total"), read once; updated here as the script writes them.
local records, counts = {}, {}
do
  local fields, numbers = {}, {'_total'}
  for i = FIRST, FIRST - 1 + n do
    fields[#fields + 1] = 'n:' .. ARGV[i]
    numbers[#numbers + 1] = ARGV[i]
  end
  for i = FIRST + n, FIRST - 1 + n + 2 * m, 2 do
    fields[#fields + 1] = 'n:' .. ARGV[i]
  end
  local stored = hmget(msg, fields)
  for j = 1, #fields do records[fields[j]] = stored[j] end
  local today = hmget(quota, numbers)
  for j = 1, #numbers do counts[numbers[j]] = today[j] end
end

local writes, quota_writes = {}, {}
local function write(field, record)
  records[field] = record
  writes[#writes + 1] = field
  writes[#writes + 1] = record
end

local out = {'ok', '', ''}
local function emit(verdict, record)
  local bar = string.find(record, '|', 1, true)
  if string.sub(record, 1, bar - 1) ~= verdict then
    record = verdict .. string.sub(record, bar)
  end
  out[#out + 1] = record
end

local used = tonumber(counts['_total'] or '0')
local taken, sends = 0, 0
local replayed = false
local pending = tonumber(head[3] or '0')

for i = FIRST, FIRST - 1 + n do
  local number = ARGV[i]
  local field = 'n:' .. number
  local current = records[field]
  if current then
    local state, d, attempts, status, serial, updated, err = parse(current)
    attempts = tonumber(attempts)
    if state ~= 'reserved' then
      emit(state, current)
    elseif holder == token and updated == ARGV[1] then
      -- This very call granted the attempt already: it is being replayed because its reply
      -- was lost (a Redis restart). Grant the same attempt again; count it once.
      emit('send', current)
      sends = sends + 1
      replayed = true
    elseif orphaned_at and updated == orphaned_at then
      emit('unsettled', current)
    elseif attempts >= max_attempts then
      emit('exhausted', current)
    else
      attempts = attempts + 1
      local record = pack('reserved', d, attempts, status, serial, err)
      write(field, record)
      emit('send', record)
      sends = sends + 1
    end
  else
    local count = tonumber(counts[number] or '0')
    local state, err
    if count >= phone_limit then
      state = 'quota_exceeded'
      err = 'daily limit of ' .. phone_limit .. ' SMS for this number reached'
    elseif used >= account_limit then
      state = 'account_quota_exceeded'
      err = 'daily limit of ' .. account_limit .. ' SMS for the account reached'
    end
    if state then
      local record = pack(state, day, 0, '', '', err)
      write(field, record)
      emit(state, record)
    else
      counts[number] = count + 1
      quota_writes[#quota_writes + 1] = number
      quota_writes[#quota_writes + 1] = count + 1
      used = used + 1
      taken = taken + 1
      pending = pending + 1
      local record = pack('reserved', day, 1, '', '', '')
      write(field, record)
      emit('send', record)
      sends = sends + 1
    end
  end
end

for i = FIRST + n, FIRST - 1 + n + 2 * m, 2 do
  local number, reason = ARGV[i], ARGV[i + 1]
  local field = 'n:' .. number
  local current = records[field]
  if current then
    local state = parse(current)
    emit(state, current)
  else
    local record = pack('invalid', day, 0, '', '', reason)
    write(field, record)
    emit('invalid', record)
  end
end

-- ---- the rate guard: only for a request that will be sent; no verdict is written before it --
-- A run it puts off reserves nothing, and its retry is only a broker message (which a worker
-- that loses its broker connection, or dies, drops). So that the reconciler can enqueue the
-- message again if that retry never runs, the task's request is stored and the message is in
-- the pending set, due after the retry (at most `wait` ms away), a lease and the reconciler's
-- grace (ARGV[10] - ARGV[19] = lease + grace). Written on the first put-off and again only when
-- the entry would come due before the retry plus the grace: a run polling for its slot
-- usually writes nothing.
local function keep_put_off(wait)
  local wrote = false
  if ARGV[16] ~= '' and not head[4] then
    redis.call('HSET', msg, 'content', ARGV[16])
    wrote = true
  end
  if ARGV[12] ~= '' and redis.call('HSETNX', msg, ARGV[12], ARGV[13]) == 1 then
    wrote = true
  end
  local due = tonumber(ARGV[10]) + wait
  local score = tonumber(redis.call('ZSCORE', pending_set, ARGV[11]) or '0')
  if score < due - tonumber(ARGV[9]) then
    redis.call('ZADD', pending_set, due, ARGV[11])
    wrote = true
  end
  if wrote then redis.call('EXPIRE', msg, ARGV[4]) end
end

if guarded and sends > 0 then
  if not replayed then
    local paused = gcra_paused(KEYS[5])
    if paused then
      keep_put_off(paused)
      return {'paused', tostring(paused)}
    end
  end
  local wait, book = gcra_next(KEYS[4], tonumber(ARGV[20]), tonumber(ARGV[21]))
  local max_wait = tonumber(ARGV[22])
  if wait <= max_wait then
    book()
  elseif replayed then
    wait = max_wait  -- the first call's slot (see the top)
  else
    keep_put_off(wait)
    return {'rate', tostring(wait)}
  end
  out[3] = tostring(wait)
end

store_request()
if taken > 0 then
  quota_writes[#quota_writes + 1] = '_total'
  quota_writes[#quota_writes + 1] = used
  hset(quota, quota_writes)
  redis.call('EXPIREAT', quota, ARGV[3])
  writes[#writes + 1] = 'pending'
  writes[#writes + 1] = pending
end
if sends > 0 then
  writes[#writes + 1] = 'lease'
  writes[#writes + 1] = token
  writes[#writes + 1] = 'lease_until'
  writes[#writes + 1] = lease_now + tonumber(ARGV[9])
  writes[#writes + 1] = 'lease_at'
  writes[#writes + 1] = ARGV[1]
  redis.call('ZADD', pending_set, ARGV[10], ARGV[11])
end
hset(msg, writes)
redis.call('EXPIRE', msg, ARGV[4])
out[2] = tostring(pending)
return out
