-- Admission: every limit of one caller and its concurrency slot, all or none (ratelimit.Limiter.Admit).
--
-- KEYS: the TAT of each limit, then the caller's slots (a sorted set of ticket ids scored by
-- the millisecond their slot expires).
-- ARGV: [1] clock (clock.lua), [2] concurrency bound (0: none), [3] slot TTL in ms,
-- [4] ticket id, then for each limit: cost in units, burst, interval T (ns), tolerance
-- Burst·T (ns), expiry pad (ms).
-- Reply: {code, limit index (1-based), wait (ns), TAT of each limit relative to now after the
-- decision}; code 1 admitted, 0 refused by a limit, 2 too large for a limit, 3 no slot free.
local nlim = #KEYS - 1
local rels = {}
for i = 1, nlim do
  rels[i] = rel(redis.call('GET', KEYS[i]))
end
local function reply(code, idx, wait)
  local out = {code, idx, wait}
  for i = 1, nlim do
    out[3 + i] = rels[i]
  end
  return out
end

local wait, refused = 0, 0
local nexts = {}
for i = 1, nlim do
  local b = 4 + (i - 1) * 5
  local n, burst = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local interval, tolerance = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
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
local slots = KEYS[nlim + 1]
if bound > 0 then
  -- The slots of crashed holders expire.
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
  if redis.call('ZCARD', slots) >= bound then
    return reply(3, 0, 0)
  end
end
for i = 1, nlim do
  rels[i] = nexts[i]
  store(KEYS[i], nexts[i], tonumber(ARGV[4 + (i - 1) * 5 + 5]))
end
if bound > 0 then
  local ttl = tonumber(ARGV[3])
  redis.call('ZADD', slots, now_ms + ttl, ARGV[4])
  redis.call('PEXPIRE', slots, ttl + 1000)
end
return reply(1, 0, 0)
