-- The limiter for one key, atomically: the same steps as proxy/limiter/slots.py.
-- KEYS[1]: the key's arrival bounds (send time + pad), integer microseconds, ascending:
--          every request still inside its hold (bound + W), so always the last N that matter
-- KEYS[2]: the key's request count for the current limit day
-- KEYS[3]: after an outage, "until_us:others": until then, decisions leave `others` slots
--          of every window to the replicas that may still send local decisions
-- KEYS[4]: while a cold key's probe is out, until when the others wait (us)
-- KEYS[5]: the key's limits learned from the upstream, "burst:window_us:daily"; when set,
--          they replace ARGV[2], ARGV[3] and ARGV[5] (proxy/learned_limits.py)
-- ARGV[1]  op: "acquire" (decide), "observe" (only apply the upstream's counts), "pause"
--          (an upstream 429: take the whole window from now), "release" (give back the
--          bound in ARGV[7], reserved for a request that will never be sent), "anchor"
--          (move the bound ARGV[7] ARGV[8] us later: its answer came back that late) or
--          "resume" (after an outage: add the bounds this replica took meanwhile,
--          ARGV[17..], each in us from now, and keep ARGV[8] slots of each window free
--          for ARGV[7] us) or "learn" (keep ARGV[2], ARGV[3], ARGV[5] as the key's
--          limits for a day; ARGV[7] "0": forget them)
-- ARGV[2..6] burst, window_us, pad_us, daily, day_ends_in_us
-- ARGV[7..8] max_wait_us, shadow ("1" or "0")            (acquire; others: see ARGV[1])
-- ARGV[9..11] upstream burst remaining, daily remaining (-1: none), and how many us ago
--            the upstream said so; applied before deciding. For "pause", ARGV[11] < 0
--            fills the window at that many us from now (the fallback's recovery floor)
-- ARGV[12] when not empty replaces Redis TIME: tests use it to replay arrival times
-- ARGV[13] probe_us: > 0 probes a cold key for at most that long (slots.decide)
-- ARGV[14] "1": these counts answer the key's probe; the others may go
-- ARGV[15] headroom: decide as if the limit were this many fewer (batch requests leave
--          that many slots of every window to interactive ones)
-- ARGV[16] reserve: refuse once only this many requests of the day remain
-- Returns for acquire {admitted, wait_us, retry_after_us, limited_by, burst_remaining,
-- burst_reset_us, daily_remaining, slot_us, queue_end_us, probe, learned burst, window_us,
-- daily (0 when the key has none)}; times are relative to
-- Redis TIME, so replicas with skewed clocks agree (slot_us is the stored bound, for a
-- later release or anchor; queue_end_us how far from now the key's latest send lies).
local op = ARGV[1]
local burst = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local pad = tonumber(ARGV[4])
local daily = tonumber(ARGV[5])
local day_ends_in = tonumber(ARGV[6])
local max_wait = tonumber(ARGV[7])
local shadow = ARGV[8] == "1"
local seen_burst = tonumber(ARGV[9])
local seen_daily = tonumber(ARGV[10])
local seen_age = tonumber(ARGV[11])

local now = tonumber(ARGV[12] or "")
if now == nil then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local probe_for = tonumber(ARGV[13] or "0")
local headroom = tonumber(ARGV[15] or "0")
local reserve = tonumber(ARGV[16] or "0")
local day_ttl_ms = math.ceil(day_ends_in / 1000) + 3600000

if op == "release" then
  return redis.call("LREM", KEYS[1], 1, ARGV[7])
end
local LEARNED_TTL_MS = 86400000
-- Limits another replica learned from the upstream decide; kept while the key is in use.
-- ("learn" writes the limits it is given.)
local learned = {0, 0, 0}
local stored_limits = false
if op ~= "learn" then stored_limits = redis.call("GET", KEYS[5]) end
if stored_limits then
  local b, w, d = string.match(stored_limits, "^(%d+):(%d+):(%d+)$")
  if b then
    burst, window, daily = tonumber(b), tonumber(w), tonumber(d)
    learned = {burst, window, daily}
    redis.call("PEXPIRE", KEYS[5], LEARNED_TTL_MS)
  end
end

-- Drop the bounds whose hold is over: they can no longer share a window with a new one.
local function trim()
  while true do
    local first = redis.call("LINDEX", KEYS[1], 0)
    if not first or tonumber(first) + window > now then return end
    redis.call("LPOP", KEYS[1])
  end
end

-- The list lives until its last bound's hold is over (and a second more).
local function keep_until_last_hold()
  local last = redis.call("LINDEX", KEYS[1], -1)
  if last then
    redis.call("PEXPIRE", KEYS[1], math.ceil((tonumber(last) - now + window) / 1000) + 1000)
  end
end

if op == "learn" then
  if ARGV[7] == "0" then return redis.call("DEL", KEYS[5]) end
  redis.call("SET", KEYS[5], string.format("%d:%d:%d", burst, window, daily), "PX", LEARNED_TTL_MS)
  -- The slots already taken must live as long as the new window needs them.
  keep_until_last_hold()
  return 1
end

-- Put `count` slots at `at`, keeping the list in order. Stored as "%d" text, so a release
-- names a slot by the same digits the acquire answered.
local function add_at(at, count)
  if count <= 0 then return end
  local value = string.format("%d", at)
  local pivot = nil
  local last = redis.call("LINDEX", KEYS[1], -1)
  if last and tonumber(last) > at then
    -- The first slot later than `at`: rare (after a release or an upstream count).
    local slots = redis.call("LRANGE", KEYS[1], 0, -1)
    for i = #slots, 1, -1 do
      if tonumber(slots[i]) > at then pivot = slots[i] else break end
    end
  end
  for _ = 1, count do
    if pivot == nil then
      redis.call("RPUSH", KEYS[1], value)
    else
      -- LINSERT finds the first element equal to the pivot: the first one after `at`.
      redis.call("LINSERT", KEYS[1], "BEFORE", pivot, value)
    end
  end
  keep_until_last_hold()
end

-- Believe the upstream when it said, at time `at`, that fewer remain than we know of.
-- Ours that may be in its window then: sent by `at` (bound at most at + pad) and not
-- surely arrived before at - W (bound after it).
local function observe(at)
  local bound = at + pad
  if op == "pause" then
    local slots = redis.call("LRANGE", KEYS[1], 0, -1)
    local ahead = 0
    for i = #slots, 1, -1 do
      if tonumber(slots[i]) >= bound then ahead = ahead + 1 else break end
    end
    add_at(bound, burst - ahead)
  elseif seen_burst >= 0 then
    local slots = redis.call("LRANGE", KEYS[1], 0, -1)
    local sent = 0
    for i = 1, #slots do
      local slot = tonumber(slots[i])
      if slot > at - window and slot <= bound then sent = sent + 1 end
    end
    add_at(bound, math.min(burst, burst - seen_burst - sent))
  end
  if seen_daily >= 0 then
    local known = daily - seen_daily
    if known > tonumber(redis.call("GET", KEYS[2]) or "0") then
      redis.call("SET", KEYS[2], known, "PX", day_ttl_ms)
    end
  end
end

local function burst_view(slots, burst)
  local blocking, first = 0, nil
  for i = math.max(1, #slots - burst + 1), #slots do
    local slot = tonumber(slots[i])
    if slot + window > now then
      blocking = blocking + 1
      if first == nil then first = slot end
    end
  end
  local reset = 0
  if first ~= nil then reset = math.max(0, first + window - now) end
  return math.max(0, burst - blocking), reset
end

local function transition_until()
  local marker = redis.call("GET", KEYS[3])
  if not marker then return 0, 0 end
  local until_us, others = string.match(marker, "^(%-?%d+):(%d+)$")
  return tonumber(until_us or "0"), tonumber(others or "0")
end

if op == "anchor" then
  -- A bound whose hold is already over is added again if the answer's is not.
  local answered_at = tonumber(ARGV[7]) + tonumber(ARGV[8])
  if redis.call("LREM", KEYS[1], 1, ARGV[7]) == 1 or answered_at + window > now then
    add_at(answered_at, 1)
  end
  return 1
end
if op == "resume" then
  for i = 17, #ARGV do add_at(now + tonumber(ARGV[i]), 1) end
  local others = tonumber(ARGV[8])
  if others > 0 and max_wait > 0 and now + max_wait > transition_until() then
    redis.call("SET", KEYS[3], string.format("%d:%d", now + max_wait, others),
               "PX", math.ceil(max_wait / 1000) + 1000)
  end
  return 1
end
-- Counts said a while ago (they rode along with this decision) are compared with the
-- requests that may have been in the upstream's window then, before those are trimmed.
observe(now - seen_age)
trim()
if ARGV[14] == "1" then redis.call("DEL", KEYS[4]) end
if op ~= "acquire" then return 1 end

local count = tonumber(redis.call("GET", KEYS[2]) or "0")
-- Right after an outage, replicas still deciding locally keep their share of each window.
local until_us, others = transition_until()
if until_us > now then burst = math.max(1, burst - others) end
-- Batch requests decide as if the limit were `headroom` fewer; what remains is on N.
local decide_burst = burst
if headroom > 0 then decide_burst = math.max(1, burst - headroom) end

local function answer(admitted, wait, retry_after, limited_by, slot, probe)
  local remaining, reset = burst_view(redis.call("LRANGE", KEYS[1], -burst, -1), burst)
  local last = redis.call("LINDEX", KEYS[1], -1)
  local queue_end = 0
  if last then queue_end = tonumber(last) - pad - now end
  return {admitted, wait, retry_after, limited_by, remaining, reset, math.max(0, daily - count),
          slot, queue_end, probe or "", learned[1], learned[2], learned[3]}
end

if count >= daily - reserve and not shadow then
  return answer(0, 0, day_ends_in, "daily", -1)
end
-- A cold key (nothing in its hold): one request goes first, the others wait for its answer.
local probe = ""
if probe_for > 0 and not shadow then
  local out_until = tonumber(redis.call("GET", KEYS[4]) or "0")
  if out_until > now then return answer(0, 0, out_until - now, "burst", -1, "other") end
  if redis.call("LLEN", KEYS[1]) == 0 then probe = "this" end
end
local slot = now
if redis.call("LLEN", KEYS[1]) >= decide_burst then
  slot = math.max(now, tonumber(redis.call("LINDEX", KEYS[1], -decide_burst)) + window)
end
local wait = slot - now
if wait > max_wait and not shadow then
  return answer(0, 0, wait, "burst", -1)
end
if probe == "this" then
  redis.call("SET", KEYS[4], string.format("%d", now + probe_for), "PX",
             math.ceil(probe_for / 1000) + 1000)
end

-- Shadow mode sends at once, so the slot really used is now; kept as its arrival bound.
local used = slot
if shadow then used = now end
used = used + pad
add_at(used, 1)
-- Nothing is given back in shadow mode: the last N are all that matter (slots.py).
if shadow then redis.call("LTRIM", KEYS[1], -burst, -1) end
count = redis.call("INCR", KEYS[2])
redis.call("PEXPIRE", KEYS[2], day_ttl_ms)

local limited_by = ""
if shadow and count > daily then
  limited_by = "daily"
elseif shadow and wait > max_wait then
  limited_by = "burst"
end
if shadow then used = -1 end
return answer(1, wait, 0, limited_by, used, probe)
