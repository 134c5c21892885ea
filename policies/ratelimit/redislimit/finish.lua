-- A ticket's end (ratelimit.Ticket's Settle, Cancel, Release): its slot freed, and each
-- limit's TAT moved back by what is given back (forward by a debt).
--
-- KEYS: [1] the caller's TATs, [2] its slots.
-- ARGV: [1] clock (clock.lua), [2] ticket id ("": no slot), then each limit's change in ns
-- (positive: given back).
-- A TAT gone (expired, evicted) is in the past: a give-back changes nothing there, and a debt
-- starts from now.
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
end
local changed = false
for i = 1, NLIM do
  if tonumber(ARGV[2 + i]) ~= 0 then
    changed = true
  end
end
if not changed then
  return 1
end
local rels = load(KEYS[1])
for i = 1, NLIM do
  local back = tonumber(ARGV[2 + i])
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
