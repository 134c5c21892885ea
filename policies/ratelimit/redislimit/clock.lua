-- The clock and the TATs of the rate limiter's scripts (prepended to each of them).
--
-- Times are nanoseconds since the Unix epoch, stored as decimal strings. Lua's numbers are
-- doubles, exact only below 2^53 ns (104 days), so a time is held as its seconds and
-- nanoseconds and every computation is relative to now: rel(v) is v - now, exact for any TAT
-- within 104 days of now (a TAT is at most the tolerance plus the debts ahead).
--
-- ARGV[1] is "" for Redis's own clock (TIME: the same for every instance), or a time in
-- nanoseconds that replaces it (tests only).
local function parse(s)
  local n = #s
  if n <= 9 then
    return 0, tonumber(s)
  end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end

local now_sec, now_nsec
if ARGV[1] ~= '' then
  now_sec, now_nsec = parse(ARGV[1])
else
  local t = redis.call('TIME')
  now_sec, now_nsec = tonumber(t[1]), tonumber(t[2]) * 1000
end
local now_ms = now_sec * 1000 + math.floor(now_nsec / 1000000)

-- rel is the stored time v relative to now in nanoseconds; a missing one (false) is now.
local function rel(v)
  if not v then
    return 0
  end
  local sec, nsec = parse(v)
  return (sec - now_sec) * 1000000000 + (nsec - now_nsec)
end

-- store sets key to the time now + r, kept until then plus pad milliseconds: once expired, a
-- TAT in the past is the same as a missing one.
local function store(key, r, pad)
  local total = now_nsec + r
  local q = math.floor(total / 1000000000)
  local ns = total - q * 1000000000
  if ns < 0 then
    q, ns = q - 1, ns + 1000000000
  elseif ns >= 1000000000 then
    q, ns = q + 1, ns - 1000000000
  end
  local ms = math.ceil(r / 1000000)
  if ms < 0 then
    ms = 0
  end
  redis.call('SET', key, string.format('%d%09d', now_sec + q, ns), 'PX', ms + pad)
end
