-- A ticket's end (ratelimit.Ticket's Settle, Cancel, Release): its slot freed, and each
-- limit's TAT moved back by what is given back (forward by a debt); or a lease's return
-- (lease.go): what it did not spend given back, and its slots beyond those in use freed.
--
-- KEYS: [1] the caller's TATs, [2] its slots.
-- ARGV: [1] clock (clock.lua), [2] ticket id ("": no slot), or a lease's slot prefix, [3] for
-- a lease the slots it held (prefix.1 to prefix.n; 0: a ticket's end), [4] the slots it keeps
-- (prefix.1 to prefix.k), [5] 1 to give those a new expiry, then each limit's change in ns
-- (positive: given back).
-- A TAT gone (expired, evicted) is in the past: a give-back changes nothing there, and a debt
-- starts from now.
local held, keep = tonumber(ARGV[3]), tonumber(ARGV[4])
if held > 0 then
  if held > keep then
    local gone = {}
    for j = keep + 1, held do
      gone[#gone + 1] = ARGV[2] .. '.' .. j
    end
    redis.call('ZREM', KEYS[2], unpack(gone))
  end
  if keep > 0 and ARGV[5] == '1' then
    local add = {}
    for j = 1, keep do
      add[2 * j - 1] = now_ms + SLOT_TTL
      add[2 * j] = ARGV[2] .. '.' .. j
    end
    redis.call('ZADD', KEYS[2], unpack(add))
    redis.call('PEXPIRE', KEYS[2], SLOT_TTL + 1000)
  end
elseif ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
end
local changed = false
for i = 1, NLIM do
  if tonumber(ARGV[5 + i]) ~= 0 then
    changed = true
  end
end
if not changed then
  return 1
end
local rels = load(KEYS[1])
for i = 1, NLIM do
  local back = tonumber(ARGV[5 + i])
  if back ~= 0 then
    local r = rels[i]
    if r then
      rels[i] = r - back
    elseif back < 0 then
      rels[i] = -back
    end
  end
end
save(KEYS[1], rels)
return 1
