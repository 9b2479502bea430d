--[[
settle.lua — record Polyv's answer for the numbers of one request. One round trip, atomic.

A number already in a final state is left as it is (settling twice changes nothing), with one
exception: Polyv's status 12 is a fact whichever run read it, so a 12 turns a "failed" number
"accepted" (a run whose lease was lost read it after another run gave the number up), and a
12 with another serialNo for an accepted number adds its receipt (it was sent twice: every
receipt read is kept).
Safe to replay (the ledger retries a call whose reply was lost, and replays settles kept in
the local journal, see ledger/journal.py): an item that names the attempt it answers applies
its non-final actions only while the number is still at that attempt.
Refunds go to the quota hash of the day the unit was taken from and never take a counter
below zero; an expired day is not recreated.

KEYS[1]  polyv_sms:{appId}:msg:<message_id>        hash, the message record (see reserve.lua)
KEYS[2]  polyv_sms:{appId}:pending                 zset, message ids with numbers still reserved
                                                   (see reserve.lua: or put off by the guard)
KEYS[3]  polyv_sms:{appId}:dead                    zset, message ids with numbers that ended failed
KEYS[4]  polyv_sms:{appId}:receipts:<YYYYMMDD>     hash, the day's receipts:
         serialNo -> "number|message id|accepted at (ms)|attempt|day of the quota unit"
KEYS[5]  polyv_sms:{appId}:phones:<YYYYMMDD>       hash, the day's receipts by number:
         number -> JSON array of serialNos, in the order accepted
KEYS[6..] quota hashes (polyv_sms:{appId}:quota:<day>), referred to by index from ARGV

ARGV[1]  now (ms)
ARGV[2]  lease token of this run (released if it still holds it)
ARGV[3]  TTL of the message record (seconds)
ARGV[4]  max attempts per number
ARGV[5]  per-number daily limit
ARGV[6]  score for KEYS[2] when numbers stay reserved (ms; when the reconciler may step in)
ARGV[7]  message id
ARGV[8]  EXPIREAT of KEYS[4] and KEYS[5] (the end of the receipt retention of their day)
ARGV[9]  k: how many numbers follow, 3 fields each:
         number, serial (or ""), "action|status|quota key index|attempt|error"
         (the index into KEYS, 0 = none; "i:j" for a -1 read on another day than the unit's:
         j is today's quota hash; attempt: the attempt this answer is for, or "" for
         a settle of numbers this run did not send; the error is last and may contain "|")

Actions:
  accepted    status 12: final "accepted", receipt written, unit kept
  invalid     status -2: final "invalid", unit refunded
  quota       status -1: final "quota_exceeded", unit refunded, the number's counter raised to
              the limit (Polyv knows better than we do)
  retry       status 11 or a transport failure: stays "reserved"; with no attempts left final
              "failed", unit refunded, message added to the dead set
  retry_keep  like retry, but the unit is kept when it ends failed (Polyv may have sent it)
  fail        final "failed", unit refunded, dead set (a Polyv error envelope)
  fail_keep   final "failed", unit kept, dead set (an answer we cannot interpret)
  rate_limited Polyv's rate limiting: stays "reserved" and the attempt is given back (Polyv
              blocks the IP for minutes; that must not use up the number's attempts); given
              back once: a replay finds the number no longer at the attempt it names

While another run holds a live lease on the message, only Polyv's final answers (accepted,
invalid, quota) change its reserved numbers: that run is sending them, and a failure this run
saw (a Polyv error envelope for other numbers, a give-up) must not end them under it.

Returns {pending, then per number, in order: its n:<number> field as it now is}
("state|day|attempts|status|serial|updated|error").

Cost: the records are read with one HMGET and written with one HSET at the end; the receipts
of all accepted numbers go in one HSET of the day's receipt hash, and the phone index in one
HMGET and one HSET of the day's phone hash: about a dozen Redis commands whatever the number
of numbers (refunds on failure paths take two more per number).
]]

local msg, pending_set, dead = KEYS[1], KEYS[2], KEYS[3]
local receipts_key, phones_key = KEYS[4], KEYS[5]
local now = ARGV[1]
local ttl = ARGV[3]
local max_attempts = tonumber(ARGV[4])
local phone_limit = tonumber(ARGV[5])
local message_id = ARGV[7]
local k = tonumber(ARGV[9])
local FIRST = 10
local LAST = FIRST - 1 + 3 * k

local function decrement(key, field)
  local count = tonumber(redis.call('HGET', key, field) or '0')
  if count > 0 then
    redis.call('HINCRBY', key, field, -1)
  end
end

local function refund(quota, number)
  if quota then
    decrement(quota, number)
    decrement(quota, '_total')
  end
end

-- Numbers whose unit was refunded when they ended failed: "r:<number>" -> 1, so that a late
-- status 12 (the number was sent after all) takes the unit again.
local function note_refund(number)
  redis.call('HSET', KEYS[1], 'r:' .. number, '1')
end

local out = {''}
local head = redis.call('HMGET', msg, 'pending', 'lease', 'lease_until')
local pending = tonumber(head[1] or '0')
local foreign = head[2] and head[2] ~= ARGV[2] and tonumber(head[3] or '0') > tonumber(now)
local FACTS = {accepted = true, invalid = true, quota = true}
local failed = false

-- The records of all the numbers, read once; every record write goes in one HSET at the end.
-- The local copies keep the per-number logic sequential.
local records, writes = {}, {}
do
  local fields = {}
  for i = FIRST, LAST, 3 do
    fields[#fields + 1] = 'n:' .. ARGV[i]
  end
  local stored = hmget(msg, fields)
  for j = 1, #fields do records[fields[j]] = stored[j] end
end

local receipts, accepted_numbers, accepted_serials = {}, {}, {}
local function add_receipt(number, serial, attempts, d)
  receipts[#receipts + 1] = serial
  receipts[#receipts + 1] = number .. '|' .. message_id .. '|' .. now .. '|' .. attempts
    .. '|' .. d
  accepted_numbers[#accepted_numbers + 1] = number
  accepted_serials[#accepted_serials + 1] = serial
end
local revived = false  -- a late 12 turned a failed number accepted

for i = FIRST, LAST, 3 do
  local number, serial = ARGV[i], ARGV[i + 1]
  local action, status, quota_i, attempt, err =
    string.match(ARGV[i + 2], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  local today_i
  quota_i, today_i = string.match(quota_i, '^(%d+):?(%d*)$')
  quota_i = tonumber(quota_i)
  local quota = quota_i > 0 and KEYS[quota_i] or nil
  local today_quota = today_i ~= '' and KEYS[tonumber(today_i)] or nil
  local field = 'n:' .. number
  local current = records[field]
  local state, d, attempts, old_status, old_serial, _, old_err = 'absent', '', '0', '', '', '', ''
  if current then
    state, d, attempts, old_status, old_serial, _, old_err = parse(current)
  end
  attempts = tonumber(attempts)
  local held = state == 'reserved'
  local new_state = state
  -- An answer to an attempt the number is no longer at (a replay, or a run whose lease was
  -- lost) records only Polyv's final answers.
  local stale = attempt ~= '' and tonumber(attempt) ~= attempts and not FACTS[action]

  if action == 'accepted' and serial ~= '' and state == 'accepted' and serial ~= old_serial then
    -- Sent twice (a run whose lease was lost, at-least-once): keep this receipt too.
    add_receipt(number, serial, attempts, d)
  elseif action == 'accepted' and state == 'failed' then
    -- Given up by another run, yet Polyv accepted it: it was sent. Take its unit again if
    -- the failure refunded it.
    if redis.call('HDEL', msg, 'r:' .. number) == 1 and quota
        and redis.call('EXISTS', quota) == 1 then
      redis.call('HINCRBY', quota, number, 1)
      redis.call('HINCRBY', quota, '_total', 1)
    end
    if serial ~= '' then add_receipt(number, serial, attempts, d) end
    if status == '' then status = old_status end
    current = pack('accepted', d, attempts, status, serial, err)
    records[field] = current
    writes[#writes + 1] = field
    writes[#writes + 1] = current
    revived = true
  elseif ((state == 'reserved' and not (foreign and not FACTS[action])) or state == 'absent')
      and not stale then
    if action == 'accepted' then
      new_state = 'accepted'
      if serial ~= '' then add_receipt(number, serial, attempts, d) end
    elseif action == 'invalid' then
      new_state = 'invalid'
      if held then refund(quota, number) end
    elseif action == 'quota' and today_quota then
      -- Read after midnight: the unit goes back to its day; today's counter is raised.
      new_state = 'quota_exceeded'
      if held then
        refund(quota, number)
        local created = redis.call('EXISTS', today_quota) == 0
        local count = tonumber(redis.call('HGET', today_quota, number) or '0')
        if count < phone_limit then
          redis.call('HSET', today_quota, number, phone_limit)
        end
        if created then redis.call('EXPIRE', today_quota, 2 * 86400) end
      end
    elseif action == 'quota' then
      new_state = 'quota_exceeded'
      if held and quota and redis.call('EXISTS', quota) == 1 then
        decrement(quota, '_total')
        local count = tonumber(redis.call('HGET', quota, number) or '0')
        if count < phone_limit then
          redis.call('HSET', quota, number, phone_limit)
        end
      end
    elseif action == 'retry' or action == 'retry_keep' then
      if held and attempts < max_attempts then
        new_state = 'reserved'
      else
        new_state = 'failed'
        if held and action == 'retry' then
          refund(quota, number)
          note_refund(number)
        end
        err = err .. ' (gave up after ' .. attempts .. ' attempts)'
      end
    elseif action == 'rate_limited' then
      if held then
        new_state = 'reserved'
        attempts = math.max(attempts - 1, 0)
      else
        new_state = 'failed'
      end
    elseif action == 'fail' or action == 'fail_keep' then
      new_state = 'failed'
      if held and action == 'fail' then
        refund(quota, number)
        note_refund(number)
      end
    else
      return redis.error_reply('settle.lua: unknown action ' .. action)
    end
    if held and new_state ~= 'reserved' then
      pending = pending - 1
    end
    if new_state == 'failed' then
      failed = true
    end
    if status == '' then status = old_status end
    if serial == '' then serial = old_serial end
    current = pack(new_state, d, attempts, status, serial, err)
    records[field] = current
    writes[#writes + 1] = field
    writes[#writes + 1] = current
  end
  out[#out + 1] = current
end

if #receipts > 0 then
  hset(receipts_key, receipts)
  redis.call('EXPIREAT', receipts_key, ARGV[8])
  -- The phone index: each number's serialNos of the day, one JSON array per number.
  local lists = hmget(phones_key, accepted_numbers)
  local index = {}
  for j = 1, #accepted_numbers do
    local number = accepted_numbers[j]
    local list = index[number]
    if not list then
      list = lists[j] and cjson.decode(lists[j]) or {}
      index[number] = list
    end
    local serial, known = accepted_serials[j], false
    for _, listed in ipairs(list) do
      if listed == serial then known = true end
    end
    if not known then  -- a replayed settle of a number whose record had gone adds nothing
      list[#list + 1] = serial
    end
  end
  local index_writes = {}
  for number, list in pairs(index) do
    index_writes[#index_writes + 1] = number
    index_writes[#index_writes + 1] = cjson.encode(list)
  end
  hset(phones_key, index_writes)
  redis.call('EXPIREAT', phones_key, ARGV[8])
end

if pending < 0 then pending = 0 end
writes[#writes + 1] = 'pending'
writes[#writes + 1] = pending
hset(msg, writes)
if head[2] == ARGV[2] then
  redis.call('HDEL', msg, 'lease', 'lease_until')
end
if pending > 0 then
  redis.call('ZADD', pending_set, ARGV[6], message_id)
else
  redis.call('ZREM', pending_set, message_id)
end
if failed then
  redis.call('ZADD', dead, now, message_id)
  -- Trimmed here: entries older than the records' TTL name messages whose records are gone.
  redis.call('ZREMRANGEBYSCORE', dead, '-inf', '(' .. (tonumber(now) - 1000 * tonumber(ttl)))
elseif revived then
  -- The message leaves the dead set once no number of it is failed any more.
  local still_failed = false
  local record = redis.call('HGETALL', msg)
  for j = 2, #record, 2 do
    if string.sub(record[j], 1, 7) == 'failed|' then still_failed = true end
  end
  if not still_failed then redis.call('ZREM', dead, message_id) end
end
redis.call('EXPIRE', msg, ttl)
out[1] = tostring(pending)
return out
