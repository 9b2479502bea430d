--[[
_gcra.lua — the shared rate guard's helpers, for ratelimit.lua (RateGuard.try_acquire) and
reserve.lua (the guard folded into the reservation: one round trip); the ledger prepends this
file to both when it registers them.

A GCRA (generic cell rate algorithm) on one key per account holding the "theoretical arrival
time" (TAT, ms, float) of the account's next request, and a pause key set while Polyv blocks
us. The time is Redis's own (TIME), so the workers' clocks need not agree; a script that calls
TIME and then writes needs Redis 5 or later (it replicates the script's effects).

  gcra_paused(pause_key)                    ms left of the pause, or nil when not paused
  gcra_next(rate_key, interval, tolerance)  wait_ms (an integer, rounded up) until the next
                                            slot, and a function that books that slot
interval: the emission interval (ms), 1000 / SMS_POLYV_RATE; tolerance: how far ahead of the
steady pace a request may go (ms).
]]

local function gcra_paused(pause_key)
  local ms = redis.call('PTTL', pause_key)
  if ms > 0 then return ms end
  return nil
end

local function gcra_next(rate_key, interval, tolerance)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
  local tat = tonumber(redis.call('GET', rate_key) or '0')
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait < 0 then wait = 0 end
  local function book()
    local next_tat = tat + interval
    redis.call('SET', rate_key, string.format('%.3f', next_tat),
      'PX', math.ceil(next_tat - now + tolerance) + 1000)
  end
  return math.ceil(wait), book
end
