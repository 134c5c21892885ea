-- Admission: every limit of one caller and its concurrency slot, all or none (ratelimit.Limiter.Admit),
-- after the ends of the caller's tickets folded into it (finish.lua's, applied first: one
-- script for a busy caller's end and its next admission).
--
-- KEYS: [1] the caller's TATs (clock.lua's load), [2] its slots (a sorted set of ticket ids
-- scored by the millisecond their slot expires).
-- ARGV: [1] clock (clock.lua), [2] ticket id, [3] number of ends folded in, then the cost of
-- each limit in its units; then for each end: its ticket id ("": no slot), and each limit's
-- change in ns (as finish.lua's).
-- Reply: {code, limit index (1-based), wait (ns), TAT of each limit relative to now after the
-- decision}; code 1 admitted, 0 refused by a limit, 2 too large for a limit, 3 no slot free.
local rels = load(KEYS[1])

local ended = false
local e = 3 + NLIM
for _ = 1, tonumber(ARGV[3]) do
  if ARGV[e + 1] ~= '' then
    redis.call('ZREM', KEYS[2], ARGV[e + 1])
  end
  for i = 1, NLIM do
    local back = tonumber(ARGV[e + 1 + i])
    if back ~= 0 then
      local r = rels[i]
      if r then
        rels[i] = r - back
      elseif back < 0 then
        rels[i] = -back
      end
      ended = true
    end
  end
  e = e + 1 + NLIM
end

local function reply(code, idx, wait)
  if ended then -- the ends' changes kept, nothing taken
    save(KEYS[1], rels)
  end
  local out = {code, idx, wait}
  for i = 1, NLIM do
    out[3 + i] = rels[i] or 0
  end
  return out
end

local wait, refused = 0, 0
local nexts = {}
for i = 1, NLIM do
  local n = tonumber(ARGV[3 + i])
  if n > BURST[i] then
    return reply(2, i, 0)
  end
  local r = rels[i] or 0
  if r < 0 then
    r = 0
  end
  nexts[i] = r + n * INTERVAL[i]
  local w = nexts[i] - TOLERANCE[i]
  if w > 0 and w > wait then
    wait, refused = w, i
  end
end
if wait > 0 then
  return reply(0, refused, wait)
end

local slots = KEYS[2]
if BOUND > 0 then
  local held = redis.call('ZCARD', slots)
  -- The slots of crashed holders expire: swept when they would refuse, and in one
  -- millisecond of 16 (so that they do not pile up below the bound).
  if held >= BOUND or now_ms % 16 == 0 then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
    held = redis.call('ZCARD', slots)
  end
  if held >= BOUND then
    return reply(3, 0, 0)
  end
end
ended = false -- saved below with the admission
rels = nexts
save(KEYS[1], rels)
if BOUND > 0 then
  redis.call('ZADD', slots, now_ms + SLOT_TTL, ARGV[2])
  redis.call('PEXPIRE', slots, SLOT_TTL + 1000)
end
return reply(1, 0, 0)
