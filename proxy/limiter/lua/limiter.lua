-- The limiter for one key, atomically: the same steps, on the same representation, as
-- proxy/limiter/slots.py, whose docstring explains the algorithm, the groups and why
-- merging them is safe. Every step costs O(G log N) at most, whatever N: no call reads or
-- rewrites a structure of N entries (the list before did: at N = 10,000, 5 ms a queued
-- decision and 2 s an upstream 429's fill; `python -m bench.lua_cost`).
-- KEYS[1]: the key's singles: the arrival bounds (send time + pad, integer microseconds)
--          of its own requests still inside their hold (bound + W), a ZSET scored by the
--          bound. A member is the bound's digits, or "digits:now.k" when another single
--          has that bound (a member is unique, the bound need not be); a release or anchor
--          names the bound by its digits and takes any member of that score
-- KEYS[2]: the key's request count for the current limit day
-- KEYS[3]: after an outage, "until_us:others": until then, decisions leave `others` slots
--          of every window to the replicas that may still send local decisions
-- KEYS[4]: while a cold key's probe is out, until when the others wait (us)
-- KEYS[5]: the key's limits learned from the upstream, "burst:window_us:daily"; when set,
--          they replace ARGV[2], ARGV[3] and ARGV[5] (proxy/learned_limits.py)
-- KEYS[6]: the key's groups (entries nobody names: traffic the upstream's counts reveal,
--          an upstream 429's fill), at most GROUPS, read with the key's other small values:
--          a STRING, cmsgpack of the flat list bound, count, since, ... ascending by bound
--          (count entries at bound; since: the earliest bound merged into it; msgpack
--          unpacks in C, where parsing 24 numbers from text in Lua cost about 18 us a
--          call); it lives until the last group's hold is over
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
-- Groups kept at most: slots.GROUPS. Finding the d-th latest counts singles once per group.
local GROUPS = 8

-- Bounds travel and are stored as integer digits, never "1.8e+15".
local function digits(x)
  return string.format("%d", x)
end

-- A single's bound, from its member (no score formatting: members are the bound's digits).
local function bound_of(member)
  return tonumber(member) or tonumber(string.match(member, "^%d+"))
end

-- Take one single of score `bound` out (any: members of one score are the same bound).
local function remove_single(bound)
  local found = redis.call("ZRANGEBYSCORE", KEYS[1], digits(bound), digits(bound), "LIMIT", 0, 1)
  if #found == 0 then return 0 end
  return redis.call("ZREM", KEYS[1], found[1])
end

if op == "release" then
  return remove_single(tonumber(ARGV[7]))
end
local LEARNED_TTL_MS = 86400000
-- The key's small values in one read: learned limits, today's count, the after-outage
-- marker, the probe and the groups ("learn" writes the limits it is given).
local stored
if op == "learn" then
  stored = {false, false, false, false, redis.call("GET", KEYS[6])}
else
  stored = redis.call("MGET", KEYS[5], KEYS[2], KEYS[3], KEYS[4], KEYS[6])
end
local stored_limits, day_count, marker, probe_until = stored[1], stored[2], stored[3], stored[4]
-- Limits another replica learned from the upstream decide; kept while the key is in use.
local learned_burst, learned_window, learned_daily = 0, 0, 0
if stored_limits then
  local b, w, d = string.match(stored_limits, "^(%d+):(%d+):(%d+)$")
  if b then
    burst, window, daily = tonumber(b), tonumber(w), tonumber(d)
    learned_burst, learned_window, learned_daily = burst, window, daily
    redis.call("PEXPIRE", KEYS[5], LEARNED_TTL_MS)
  end
end

-- The groups, ascending by bound, in three arrays (not a table per group: every table is
-- an allocation a call): gc[i] entries at bound gb[i], merged from as early as gs[i].
-- Written back once, at the end of a call that changed them (save_groups).
local gb, gc, gs = {}, {}, {}
local groups_changed = false
if stored[5] then
  local flat = {cmsgpack.unpack(stored[5])}
  for i = 1, #flat - 2, 3 do
    local n = #gb + 1
    gb[n], gc[n], gs[n] = flat[i], flat[i + 1], flat[i + 2]
  end
end

local function save_groups()
  if not groups_changed then return end
  if #gb == 0 then
    redis.call("DEL", KEYS[6])
    return
  end
  local flat = {}
  for i = 1, #gb do
    flat[3 * i - 2], flat[3 * i - 1], flat[3 * i] = gb[i], gc[i], gs[i]
  end
  local ttl = math.ceil((gb[#gb] - now + window) / 1000) + 1000
  redis.call("SET", KEYS[6], cmsgpack.pack(unpack(flat)), "PX", ttl)
end

-- The k-th latest single (k >= 1), nil when fewer are kept.
local function nth_single(k)
  local found = redis.call("ZREVRANGE", KEYS[1], k - 1, k - 1)
  if #found == 0 then return nil end
  return bound_of(found[1])
end

-- The singles live until the last one's hold is over (and a second more).
local function keep_singles(last)
  if last then
    redis.call("PEXPIRE", KEYS[1], math.ceil((last - now + window) / 1000) + 1000)
  end
end

-- Drop the entries whose hold is over at `at`: they can no longer share a window with a
-- new one.
local function trim_groups(at)
  while #gb > 0 and gb[1] <= at - window do
    table.remove(gb, 1)
    table.remove(gc, 1)
    table.remove(gs, 1)
    groups_changed = true
  end
end

local function trim(at)
  redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", digits(at - window))
  trim_groups(at)
end

if op == "learn" then
  if ARGV[7] == "0" then
    -- Back to the configured window (ARGV[3]), which may be longer than the learned one
    -- the entries' TTLs were set for: they must live through it.
    redis.call("DEL", KEYS[5])
  else
    redis.call("SET", KEYS[5], string.format("%d:%d:%d", burst, window, daily), "PX", LEARNED_TTL_MS)
  end
  -- The entries already kept must live as long as the new window needs them (and the
  -- groups written again with that TTL, those whose hold is over under it dropped).
  keep_singles(nth_single(1))
  groups_changed = #gb > 0
  trim_groups(now)
  save_groups()
  return 1
end

-- After the last trim, a decision reads the singles through `view`, which add_single keeps
-- up to date: how many (count), the latest (last), the singles read by rank (ranked; two
-- at a time: after a later one is added, the one before the N-th latest is the N-th
-- latest), how many are later than each group's bound (later, counted when first needed)
-- and the last d-th latest found (nth_d, nth); so answering after deciding reads little or
-- nothing again. in_groups: the entries in groups.
local view = nil
local function view_single(k)
  if view.ranked[k] == nil then
    local first = math.max(0, k - 2)
    for i, member in ipairs(redis.call("ZREVRANGE", KEYS[1], first, k - 1)) do
      view.ranked[first + i] = bound_of(member)
    end
  end
  return view.ranked[k]
end

local function decision_view()
  if view == nil then
    local in_groups = 0
    for i = 1, #gc do in_groups = in_groups + gc[i] end
    view = {count = redis.call("ZCARD", KEYS[1]), ranked = {}, in_groups = in_groups}
    if view.count > 0 then view.last = view_single(1) end
  end
  return view
end

local function held()
  local v = decision_view()
  return v.count + v.in_groups
end

-- How many singles are later than group i's bound (counted once per call).
local function later(i)
  if view.later == nil then view.later = {} end
  if view.later[i] == nil then
    view.later[i] = redis.call("ZCOUNT", KEYS[1], "(" .. digits(gb[i]), "+inf")
  end
  return view.later[i]
end

-- The d-th latest entry over singles and groups (slots.latest), nil when fewer than d.
-- When the single that would be it were every group later (the (d - entries in groups)-th
-- latest) is earlier than every group, it is: one read. Else the walk of slots.latest
-- stops at the latest group with at least d entries at or after its bound (singles later
-- than it, its own count and the groups after it); that count only grows towards earlier
-- groups, so a binary search finds the group in at most three counts of singles.
local function latest(d)
  local v = decision_view()
  if v.nth_d == d then return v.nth end
  local found, passed = nil, v.in_groups
  if v.count + passed < d then
    found = nil  -- fewer than d kept
  elseif d > passed and (#gb == 0 or view_single(d - passed) < gb[1]) then
    -- Earlier than every group (a full window of recent reveals): no group to search.
    found = view_single(d - passed)
  else
    -- The latest group with d entries at or after it; the earliest has them (else the
    -- d-th latest would be a single before it, above). after[i]: entries in the groups
    -- later than group i.
    local after, sum = {}, 0
    for i = #gb, 1, -1 do
      after[i] = sum
      sum = sum + gc[i]
    end
    local lo, hi, stop = 2, #gb, 1
    while lo <= hi do
      local mid = math.floor((lo + hi) / 2)
      if later(mid) + after[mid] + gc[mid] >= d then
        stop, lo = mid, mid + 1
      else
        hi = mid - 1
      end
    end
    passed = after[stop]
    if later(stop) + passed < d then
      found = gb[stop]
    else
      found = view_single(d - passed)
    end
  end
  v.nth_d, v.nth = d, found
  return found
end

local function last_bound()
  local last = decision_view().last
  if #gb > 0 and (last == nil or gb[#gb] > last) then last = gb[#gb] end
  return last
end

-- Keep one single at `bound`: under its digits, or, when another single has that bound,
-- under "digits:now.k" (unique unless `now` repeats, as a test's clock does: then the
-- next k).
local names_tried = 0
local function add_single(bound)
  local score = digits(bound)
  local member = score
  while redis.call("ZADD", KEYS[1], "NX", score, member) == 0 do
    -- One counter for the whole call: a resume adding c equal bounds tries c names, not
    -- c * c / 2.
    names_tried = names_tried + 1
    member = score .. ":" .. digits(now) .. "." .. names_tried
  end
  if view then
    view.count = view.count + 1
    local ranked = {}
    for rank, known in pairs(view.ranked) do
      if known < bound then ranked[rank + 1] = known else ranked[rank] = known end
    end
    if view.last == nil or bound > view.last then
      view.last, ranked[1] = bound, bound
    end
    view.ranked = ranked
    if view.later then
      for i = 1, #gb do
        if view.later[i] ~= nil and gb[i] < bound then view.later[i] = view.later[i] + 1 end
      end
    end
    view.nth_d = nil
  end
end

-- Merge the neighbours whose merged group spans least (the earlier pair on a tie) into one
-- at the later bound: entries only move later, none is lost (slots._merge_narrowest).
local function merge_narrowest()
  local best, best_span = 1, nil
  for i = 1, #gb - 1 do
    local span = gb[i + 1] - math.min(gs[i], gs[i + 1])
    if best_span == nil or span < best_span then best, best_span = i, span end
  end
  gc[best + 1] = math.min(burst, gc[best] + gc[best + 1])
  gs[best + 1] = math.min(gs[best], gs[best + 1])
  table.remove(gb, best)
  table.remove(gc, best)
  table.remove(gs, best)
end

-- Put `count` entries at `bound` as a group (slots.add_group).
local function add_group(bound, count)
  if count <= 0 then return end
  groups_changed = true
  local at = #gb + 1
  for i = 1, #gb do
    if gb[i] >= bound then
      at = i
      break
    end
  end
  if gb[at] == bound then
    gc[at] = math.min(burst, gc[at] + count)
  else
    table.insert(gb, at, bound)
    table.insert(gc, at, math.min(burst, count))
    table.insert(gs, at, bound)
    if #gb > GROUPS then merge_narrowest() end
  end
end

-- Believe the upstream when it said, at time `at`, that fewer remain than we know of.
-- Ours that may be in its window then: sent by `at` (bound at most at + pad) and not
-- surely arrived before at - W (bound after it). The groups are first trimmed as of `at`,
-- as the memory backend's were when the counts came, so that the same ones merge (the
-- singles need not be: the counts leave out the expired ones anyway).
local function observe(at)
  local bound = at + pad
  if op == "pause" then
    trim_groups(math.min(at, now))
    local ahead = redis.call("ZCOUNT", KEYS[1], digits(bound), "+inf")
    for i = 1, #gb do
      if gb[i] >= bound then ahead = ahead + gc[i] end
    end
    add_group(bound, burst - ahead)
  elseif seen_burst >= 0 then
    trim_groups(math.min(at, now))
    local low = at - window
    local sent = redis.call("ZCOUNT", KEYS[1], "(" .. digits(low), digits(bound))
    for i = 1, #gb do
      if gb[i] > low and gb[i] <= bound then sent = sent + gc[i] end
    end
    add_group(bound, math.min(burst, burst - seen_burst - sent))
  end
  if seen_daily >= 0 then
    local known = daily - seen_daily
    if known > tonumber(day_count or "0") then
      redis.call("SET", KEYS[2], known, "PX", day_ttl_ms)
      day_count = known
    end
  end
end

local function transition_until()
  if not marker then return 0, 0 end
  local until_us, others = string.match(marker, "^(%-?%d+):(%d+)$")
  return tonumber(until_us or "0"), tonumber(others or "0")
end

if op == "anchor" then
  -- A bound whose hold is already over is added again if the answer's is not.
  local bound = tonumber(ARGV[7])
  local answered_at = bound + tonumber(ARGV[8])
  if remove_single(bound) == 1 or answered_at + window > now then
    add_single(answered_at)
    keep_singles(nth_single(1))
  end
  return 1
end
if op == "resume" then
  for i = 17, #ARGV do add_single(now + tonumber(ARGV[i])) end
  if #ARGV >= 17 then keep_singles(nth_single(1)) end
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
trim(now)
if ARGV[14] == "1" then
  redis.call("DEL", KEYS[4])
  probe_until = false
end
if op ~= "acquire" then
  save_groups()
  return 1
end

local count = tonumber(day_count or "0")
-- Right after an outage, replicas still deciding locally keep their share of each window.
local until_us, others = transition_until()
if until_us > now then burst = math.max(1, burst - others) end
-- Batch requests decide as if the limit were `headroom` fewer; what remains is on N.
local decide_burst = burst
if headroom > 0 then decide_burst = math.max(1, burst - headroom) end

-- After trim every entry blocks: the first to free among the N latest is the N-th latest,
-- or the earliest when fewer are kept (slots.burst_view).
local function answer(admitted, wait, retry_after, limited_by, slot, probe)
  save_groups()
  local total = held()
  local reset = 0
  if total > 0 then
    reset = math.max(0, latest(math.min(total, burst)) + window - now)
  end
  local last = last_bound()
  local queue_end = 0
  if last then queue_end = last - pad - now end
  return {admitted, wait, retry_after, limited_by, math.max(0, burst - total), reset,
          math.max(0, daily - count), slot, queue_end, probe or "", learned_burst,
          learned_window, learned_daily}
end

if count >= daily - reserve and not shadow then
  return answer(0, 0, day_ends_in, "daily", -1)
end
-- A cold key (nothing in its hold): one request goes first, the others wait for its answer.
local probe = ""
if probe_for > 0 and not shadow then
  local out_until = tonumber(probe_until or "0")
  if out_until > now then return answer(0, 0, out_until - now, "burst", -1, "other") end
  if held() == 0 then probe = "this" end
end
local slot = now
local nth = latest(decide_burst)
if nth then slot = math.max(now, nth + window) end
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
add_single(used)
keep_singles(view.last)
-- Nothing is given back in shadow mode: the last N singles are all that matter (slots.py).
if shadow then
  redis.call("ZREMRANGEBYRANK", KEYS[1], 0, -burst - 1)
  view = nil  -- read again if the answer needs it
end
count = redis.call("INCR", KEYS[2])
-- A new day's counter gets its TTL once: INCR keeps it (and so does observe's SET PX).
if count == 1 then redis.call("PEXPIRE", KEYS[2], day_ttl_ms) end

local limited_by = ""
if shadow and count > daily then
  limited_by = "daily"
elseif shadow and wait > max_wait then
  limited_by = "burst"
end
if shadow then used = -1 end
return answer(1, wait, 0, limited_by, used, probe)
