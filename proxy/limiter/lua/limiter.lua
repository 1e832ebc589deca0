-- The limiter for one key, atomically: the same steps as proxy/limiter/slots.py.
-- KEYS[1]: the key's reserved slot times, a list of integer microseconds, ascending
-- KEYS[2]: the key's request count for the current limit day
-- ARGV[1]  op: "acquire" (decide), "observe" (only apply the upstream's counts) or
--          "pause" (an upstream 429: take the whole window from now)
-- ARGV[2..6] burst, window_us, pad_us, daily, day_ends_in_us
-- ARGV[7..8] max_wait_us, shadow ("1" or "0")                        (acquire)
-- ARGV[9..11] upstream burst remaining, daily remaining (-1: none), and how many us ago
--            the upstream said so; applied before deciding
-- ARGV[12] when not empty replaces Redis TIME: tests use it to replay arrival times
-- Returns for acquire {admitted, wait_us, retry_after_us, limited_by, burst_remaining,
-- burst_reset_us, daily_remaining}; times are relative to Redis TIME, so replicas with
-- skewed clocks agree.
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
local hold = window + pad
local pause = op == "pause"
local day_ttl_ms = math.ceil(day_ends_in / 1000) + 3600000

local function by_number(a, b) return tonumber(a) < tonumber(b) end

-- Rewrite the list with `slots` (sorted), keeping the last `burst`.
local function store(slots)
  table.sort(slots, by_number)
  redis.call("DEL", KEYS[1])
  local from = math.max(1, #slots - burst + 1)
  for i = from, #slots do redis.call("RPUSH", KEYS[1], slots[i]) end
  local last = tonumber(slots[#slots])
  redis.call("PEXPIRE", KEYS[1], math.ceil((last - now + hold) / 1000) + 1000)
end

-- Believe the upstream when it said, at time `at`, that fewer remain than we know of.
local function observe(at)
  if seen_burst >= 0 or pause then
    local slots = redis.call("LRANGE", KEYS[1], 0, -1)
    local sent = 0
    for i = 1, #slots do
      local slot = tonumber(slots[i])
      if slot > at - window and slot <= at then sent = sent + 1 end
    end
    local unknown = math.min(burst, (burst - seen_burst) - sent)
    if pause then unknown = burst end
    if unknown > 0 then
      for _ = 1, unknown do table.insert(slots, at) end
      store(slots)
    end
  end
  if seen_daily >= 0 then
    local known = daily - seen_daily
    if known > tonumber(redis.call("GET", KEYS[2]) or "0") then
      redis.call("SET", KEYS[2], known, "PX", day_ttl_ms)
    end
  end
end

local function burst_view(slots)
  local blocking, first = 0, nil
  for i = math.max(1, #slots - burst + 1), #slots do
    local slot = tonumber(slots[i])
    if slot + hold > now then
      blocking = blocking + 1
      if first == nil then first = slot end
    end
  end
  local reset = 0
  if first ~= nil then reset = math.max(0, first + hold - now) end
  return math.max(0, burst - blocking), reset
end

observe(now - seen_age)
if op ~= "acquire" then return 1 end

local count = tonumber(redis.call("GET", KEYS[2]) or "0")
local slots = redis.call("LRANGE", KEYS[1], -burst, -1)

local function answer(admitted, wait, retry_after, limited_by)
  local remaining, reset = burst_view(slots)
  return {admitted, wait, retry_after, limited_by, remaining, reset, math.max(0, daily - count)}
end

if count >= daily and not shadow then
  return answer(0, 0, day_ends_in, "daily")
end
local slot = now
if #slots >= burst then
  slot = math.max(now, tonumber(slots[#slots - burst + 1]) + hold)
end
local wait = slot - now
if wait > max_wait and not shadow then
  return answer(0, 0, wait, "burst")
end

-- Shadow mode sends at once, so the slot really used is now.
local used = slot
if shadow then used = now end
if #slots == 0 or tonumber(slots[#slots]) <= used then
  redis.call("RPUSH", KEYS[1], used)
  redis.call("LTRIM", KEYS[1], -burst, -1)
  redis.call("PEXPIRE", KEYS[1], math.ceil((used - now + hold) / 1000) + 1000)
else
  table.insert(slots, used)
  store(slots)
end
count = redis.call("INCR", KEYS[2])
redis.call("PEXPIRE", KEYS[2], day_ttl_ms)
slots = redis.call("LRANGE", KEYS[1], -burst, -1)

local limited_by = ""
if shadow and count > daily then
  limited_by = "daily"
elseif shadow and wait > max_wait then
  limited_by = "burst"
end
return answer(1, wait, 0, limited_by)
