-- The clock and the TATs of the rate limiter's scripts (prepended to each of them, after the
-- limiter's constants: NLIM limits named NAMES[i], with BURST, INTERVAL, TOLERANCE and PAD of
-- each, and the concurrency BOUND and SLOT_TTL; see script.go).
--
-- Times are nanoseconds. Lua's numbers are doubles, exact only below 2^53 (104 days), so a
-- time is held as its seconds and nanoseconds and every computation is relative to now: a
-- TAT within 104 days of now is exact (a TAT is at most the tolerance plus the debts ahead).
--
-- ARGV[1] is "" for Redis's own clock (TIME: the same for every instance), or a time in
-- nanoseconds since the Unix epoch that replaces it (tests only).
local now_sec, now_nsec
if ARGV[1] ~= '' then
  local s = ARGV[1]
  local n = #s
  if n <= 9 then
    now_sec, now_nsec = 0, tonumber(s)
  else
    now_sec, now_nsec = tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
  end
else
  local t = redis.call('TIME')
  now_sec, now_nsec = tonumber(t[1]), tonumber(t[2]) * 1000
end
local now_ms = now_sec * 1000 + math.floor(now_nsec / 1000000)

-- load is the TATs of a caller relative to now, by limit index (nil: none stored). They are
-- stored in one key as a MessagePack map: [1] a base time in seconds, and each limit's name
-- to its TAT in nanoseconds after the base (a limit not of this policy is ignored, and
-- dropped by the next save).
local function load(key)
  local rels = {}
  local v = redis.call('GET', key)
  if v then
    local m = cmsgpack.unpack(v)
    local d = (m[1] - now_sec) * 1000000000 - now_nsec
    for i = 1, NLIM do
      local x = m[NAMES[i]]
      if x then
        rels[i] = x + d
      end
    end
  end
  return rels
end

-- save stores in key the TAT now + rels[i] of each limit (nil: none), now as the base, kept
-- until the last of them is past plus its PAD[i] milliseconds: once past, a TAT is the same
-- as a missing one. One write for every limit of the caller; none when there is no TAT.
local function save(key, rels)
  local m, px = {now_sec}, 0
  for i = 1, NLIM do
    local r = rels[i]
    if r then
      m[NAMES[i]] = now_nsec + r
      local ms = math.ceil(r / 1000000)
      if ms < 0 then
        ms = 0
      end
      if ms + PAD[i] > px then
        px = ms + PAD[i]
      end
    end
  end
  if px > 0 then
    redis.call('SET', key, cmsgpack.pack(m), 'PX', px)
  end
end
