-- Admission: every limit of one caller and its concurrency slot, all or none (ratelimit.Limiter.Admit),
-- after the ends of the caller's tickets folded into it (finish.lua's, applied first: one
-- script for a busy caller's end and its next admission); and, for a lease (lease.go), more
-- of every limit beside the request's own cost, all or none, and more slots, as many as are
-- free up to what is asked.
--
-- KEYS: [1] the caller's TATs (clock.lua's load), [2] its slots (a sorted set of ticket ids
-- scored by the millisecond their slot expires).
-- ARGV: [1] clock (clock.lua), [2] ticket id, or a lease's slot prefix, [3] number of ends
-- folded in, [4] 1 for a lease (0: a request alone), [5] slots the request needs (0 or 1),
-- [6] slots wanted beside it (taken as far as free), [7] a lease's first new slot (its slots
-- are prefix.1 to prefix.n; 0: the one slot is the ticket id), [8] 1 to give the slots the
-- lease holds (prefix.1 to the one before the first new) a new expiry, then the cost of each
-- limit in its units, then each limit's lease beside the cost; then for each end: its ticket
-- id ("": no slot), and each limit's change in ns (as finish.lua's).
-- Reply: {code, limit index (1-based), wait (ns), 1 when the lease was taken, slots taken,
-- TAT of each limit relative to now after the decision}; code 1 admitted, 0 refused by a
-- limit, 2 too large for a limit, 3 no slot free.
local rels = load(KEYS[1])

local ended = false
local e = 8 + 2 * NLIM
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

local function reply(code, idx, wait, leased, slots)
  if ended then -- the ends' changes kept, nothing taken
    save(KEYS[1], rels)
  end
  local out = {code, idx, wait, leased, slots}
  for i = 1, NLIM do
    out[5 + i] = rels[i] or 0
  end
  return out
end

local wait, refused = 0, 0
local nexts = {}
for i = 1, NLIM do
  local n = tonumber(ARGV[8 + i])
  if n > BURST[i] then
    return reply(2, i, 0, 0, 0)
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
  return reply(0, refused, wait, 0, 0)
end

-- A lease takes its units of every limit or of none: the request alone then.
local leased = 0
if ARGV[4] == '1' then
  leased = 1
  local more = {}
  for i = 1, NLIM do
    more[i] = nexts[i] + tonumber(ARGV[8 + NLIM + i]) * INTERVAL[i]
    if more[i] > TOLERANCE[i] then
      leased = 0
      break
    end
  end
  if leased == 1 then
    nexts = more
  end
end

local slots = KEYS[2]
local need, grant, first = tonumber(ARGV[5]), 0, tonumber(ARGV[7])
if BOUND > 0 then
  local want = tonumber(ARGV[6])
  if need > 0 or want > 0 then
    local held = redis.call('ZCARD', slots)
    -- The slots of crashed holders expire: swept when they would refuse, and in one
    -- millisecond of 16 (so that they do not pile up below the bound).
    if held + need > BOUND or now_ms % 16 == 0 then
      redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
      held = redis.call('ZCARD', slots)
    end
    if held + need > BOUND then
      return reply(3, 0, 0, 0, 0)
    end
    grant = need + math.max(math.min(want, BOUND - held - need), 0)
  end
end
ended = false -- saved below with the admission
rels = nexts
save(KEYS[1], rels)
local renew = ARGV[8] == '1' and first > 1
if BOUND > 0 and (grant > 0 or renew) then
  local score = now_ms + SLOT_TTL
  if first == 0 then
    redis.call('ZADD', slots, score, ARGV[2])
  else
    -- A lease's new slots, and (renew) those it holds, with the new expiry.
    local add, from = {}, first
    if renew then
      from = 1
    end
    for j = from, first + grant - 1 do
      add[#add + 1] = score
      add[#add + 1] = ARGV[2] .. '.' .. j
    end
    redis.call('ZADD', slots, unpack(add))
  end
  redis.call('PEXPIRE', slots, SLOT_TTL + 1000)
end
return reply(1, 0, 0, leased, grant)
