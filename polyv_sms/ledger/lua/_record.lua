--[[
_record.lua — helpers shared by reserve.lua and settle.lua; the ledger prepends this file to
each of them when it registers the scripts.

A number's record in the message hash (field "n:<number>") is one string:
  state|day|attempts|status|serial|updated_ms|error
(error last: it is the only field that may contain "|"). ARGV[1] of both scripts is the call's
"now" in ms, written as updated_ms.
]]

local function parse(v)
  return string.match(v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
end

local function pack(state, d, attempts, status, serial, err)
  return state .. '|' .. d .. '|' .. attempts .. '|' .. status .. '|' .. serial .. '|' .. ARGV[1]
    .. '|' .. err
end

-- unpack() has a limit on how many values it spreads: batches of at most this many.
local BATCH = 1000

local function hmget(key, fields)
  local values = {}
  for first = 1, #fields, BATCH do
    local last = math.min(first + BATCH - 1, #fields)
    local part = redis.call('HMGET', key, unpack(fields, first, last))
    for j = 1, #part do values[first + j - 1] = part[j] end
  end
  return values
end

local function hset(key, pairs)
  for first = 1, #pairs, BATCH do
    redis.call('HSET', key, unpack(pairs, first, math.min(first + BATCH - 1, #pairs)))
  end
end

