-- Where a caller stands, taking nothing (ratelimit.Limiter.Peek and InFlight).
--
-- KEYS: the TAT of each limit, then the caller's slots. ARGV: [1] clock (clock.lua).
-- Reply: {slots held, TAT of each limit relative to now}.
local nlim = #KEYS - 1
local out = {redis.call('ZCOUNT', KEYS[nlim + 1], '(' .. now_ms, '+inf')}
for i = 1, nlim do
  out[1 + i] = rel(redis.call('GET', KEYS[i]))
end
return out
