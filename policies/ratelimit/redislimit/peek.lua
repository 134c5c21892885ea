-- Where a caller stands, taking nothing (ratelimit.Limiter.Peek and InFlight).
--
-- KEYS: [1] the caller's TATs, [2] its slots. ARGV: [1] clock (clock.lua), then the name of
-- each limit.
-- Reply: {slots held, TAT of each limit relative to now}.
local out = {redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf')}
local tats = load(KEYS[1])
for i = 2, #ARGV do
  out[i] = tats[ARGV[i]] or 0
end
return out
