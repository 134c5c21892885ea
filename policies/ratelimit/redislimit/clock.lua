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

-- abs is the stored form of the time now + r.
local function abs(r)
  local total = now_nsec + r
  local q = math.floor(total / 1000000000)
  local ns = total - q * 1000000000
  if ns < 0 then
    q, ns = q - 1, ns + 1000000000
  elseif ns >= 1000000000 then
    q, ns = q + 1, ns - 1000000000
  end
  return string.format('%d%09d', now_sec + q, ns)
end

-- load is the TATs of a caller, stored in one key as "name=time,name=time", as a table of
-- limit name to time relative to now (a limit not there is missing).
local function load(key)
  local tats = {}
  local v = redis.call('GET', key)
  if v then
    for name, t in string.gmatch(v, '([^=,]+)=(%d+)') do
      tats[name] = rel(t)
    end
  end
  return tats
end

-- save stores in key the TAT now + rels[i] of each limit names[i] (nil: none), kept until
-- the last of them is past plus its pads[i] milliseconds: once past, a TAT is the same as a
-- missing one. One write for every limit of the caller.
local function save(key, n, names, rels, pads)
  local parts, px = {}, 0
  for i = 1, n do
    local r = rels[i]
    if r then
      parts[#parts + 1] = names[i] .. '=' .. abs(r)
      local ms = math.ceil(r / 1000000)
      if ms < 0 then
        ms = 0
      end
      if ms + pads[i] > px then
        px = ms + pads[i]
      end
    end
  end
  if #parts > 0 then
    redis.call('SET', key, table.concat(parts, ','), 'PX', px)
  end
end
