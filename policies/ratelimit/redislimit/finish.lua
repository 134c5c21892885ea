-- A ticket's end (ratelimit.Ticket's Settle, Cancel, Release): its slot freed, and each
-- limit's TAT moved back by what is given back (forward by a debt).
--
-- KEYS: [1] the caller's TATs, [2] its slots.
-- ARGV: [1] clock (clock.lua), [2] ticket id ("": no slot), then for each limit: name, the
-- change in ns (positive: given back), expiry pad (ms).
-- A TAT gone (expired, evicted) is in the past: a give-back changes nothing there, and a debt
-- starts from now.
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
end
local nlim = (#ARGV - 2) / 3
local changed = false
for i = 1, nlim do
  if tonumber(ARGV[2 + (i - 1) * 3 + 2]) ~= 0 then
    changed = true
  end
end
if not changed then
  return 1
end
local tats = load(KEYS[1])
local names, rels, pads = {}, {}, {}
for i = 1, nlim do
  local b = 2 + (i - 1) * 3
  local name, back = ARGV[b + 1], tonumber(ARGV[b + 2])
  local r = tats[name]
  if back ~= 0 then
    if r then
      r = r - back
    elseif back < 0 then
      r = -back
    end
  end
  names[i], rels[i], pads[i] = name, r, tonumber(ARGV[b + 3])
end
save(KEYS[1], nlim, names, rels, pads)
return 1
