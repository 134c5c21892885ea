-- Where a caller stands, taking nothing (ratelimit.Limiter.Peek and InFlight).
--
-- KEYS: [1] the caller's TATs, [2] its slots. ARGV: [1] clock (clock.lua).
-- Reply: {slots held, TAT of each limit relative to now}.
local out = {redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf')}
local rels = load(KEYS[1])
for i = 1, NLIM do
  out[1 + i] = rels[i] or 0
end
return out
