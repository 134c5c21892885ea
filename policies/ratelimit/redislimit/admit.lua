-- Admission: every limit of one caller and its concurrency slot, all or none (ratelimit.Limiter.Admit),
-- after the ends of the caller's tickets folded into it (finish.lua's, applied first: one
-- script for a busy caller's end and its next admission).
--
-- KEYS: [1] the caller's TATs (clock.lua's load), [2] its slots (a sorted set of ticket ids
-- scored by the millisecond their slot expires).
-- ARGV: [1] clock (clock.lua), [2] concurrency bound (0: none), [3] slot TTL in ms,
-- [4] ticket id, [5] number of limits, [6] number of ends folded in, then for each limit:
-- name, cost in units, burst, interval T (ns), tolerance Burst·T (ns), expiry pad (ms); then
-- for each end: its ticket id ("": no slot), and each limit's change in ns (as finish.lua's).
-- Reply: {code, limit index (1-based), wait (ns), TAT of each limit relative to now after the
-- decision}; code 1 admitted, 0 refused by a limit, 2 too large for a limit, 3 no slot free.
local nlim, nends = tonumber(ARGV[5]), tonumber(ARGV[6])
local tats = load(KEYS[1])
local names, pads = {}, {}
for i = 1, nlim do
  local b = 6 + (i - 1) * 6
  names[i], pads[i] = ARGV[b + 1], tonumber(ARGV[b + 6])
end

local ended = false
local e = 6 + nlim * 6
for _ = 1, nends do
  if ARGV[e + 1] ~= '' then
    redis.call('ZREM', KEYS[2], ARGV[e + 1])
  end
  for i = 1, nlim do
    local back = tonumber(ARGV[e + 1 + i])
    if back ~= 0 then
      local r = tats[names[i]]
      if r then
        tats[names[i]] = r - back
      elseif back < 0 then
        tats[names[i]] = -back
      end
      ended = true
    end
  end
  e = e + 1 + nlim
end

local rels = {}
for i = 1, nlim do
  rels[i] = tats[names[i]] or 0
end
local function reply(code, idx, wait)
  if ended then -- the ends' changes kept, nothing taken
    local kept = {}
    for i = 1, nlim do
      kept[i] = tats[names[i]]
    end
    save(KEYS[1], nlim, names, kept, pads)
  end
  local out = {code, idx, wait}
  for i = 1, nlim do
    out[3 + i] = rels[i]
  end
  return out
end

local wait, refused = 0, 0
local nexts = {}
for i = 1, nlim do
  local b = 6 + (i - 1) * 6
  local n, burst = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local interval, tolerance = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  if n > burst then
    return reply(2, i, 0)
  end
  local r = rels[i]
  if r < 0 then
    r = 0
  end
  nexts[i] = r + n * interval
  local w = nexts[i] - tolerance
  if w > 0 and w > wait then
    wait, refused = w, i
  end
end
if wait > 0 then
  return reply(0, refused, wait)
end

local bound = tonumber(ARGV[2])
local slots = KEYS[2]
if bound > 0 then
  local held = redis.call('ZCARD', slots)
  -- The slots of crashed holders expire: swept when they would refuse, and in one
  -- millisecond of 16 (so that they do not pile up below the bound).
  if held >= bound or now_ms % 16 == 0 then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
    held = redis.call('ZCARD', slots)
  end
  if held >= bound then
    return reply(3, 0, 0)
  end
end
ended = false -- saved below with the admission
for i = 1, nlim do
  rels[i] = nexts[i]
end
save(KEYS[1], nlim, names, rels, pads)
if bound > 0 then
  local ttl = tonumber(ARGV[3])
  redis.call('ZADD', slots, now_ms + ttl, ARGV[4])
  redis.call('PEXPIRE', slots, ttl + 1000)
end
return reply(1, 0, 0)
