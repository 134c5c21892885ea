-- A ticket's end (ratelimit.Ticket's Settle, Cancel, Release): its slot freed, and each
-- limit's TAT moved back by what is given back (forward by a debt).
--
-- KEYS: the TAT of each limit, then the caller's slots.
-- ARGV: [1] clock (clock.lua), [2] ticket id ("": no slot), then for each limit: the change
-- in ns (positive: given back), expiry pad (ms).
-- A TAT already expired is in the past: a give-back changes nothing there, and a debt starts
-- from now.
local nlim = #KEYS - 1
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[nlim + 1], ARGV[2])
end
for i = 1, nlim do
  local back, pad = tonumber(ARGV[2 + (i - 1) * 2 + 1]), tonumber(ARGV[2 + (i - 1) * 2 + 2])
  if back ~= 0 then
    local v = redis.call('GET', KEYS[i])
    if v then
      store(KEYS[i], rel(v) - back, pad)
    elseif back < 0 then
      store(KEYS[i], -back, pad)
    end
  end
end
return 1
