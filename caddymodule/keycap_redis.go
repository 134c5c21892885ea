package caddymodule

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// sharedCaps are the credit caps of API keys counted on Redis, so that every instance sees
// every instance's spending and reservations. Each cap period of a chain has two keys (one
// Redis Cluster slot: the chain id is the hash tag):
//
//	Prefix "cap:{" chain "}:" period-start ":s"   what the chain spent in the period (micro-credits)
//	Prefix "cap:{" chain "}:" period-start ":r"   its open reservations: a sorted set of
//	                                              "amount:token" scored by their expiry (ms)
//
// A reservation is admitted by one script that drops the expired reservations (their instance
// crashed: the ledger's sweeper releases them after the same TTL), checks spent + reserved +
// amount <= cap, and adds it, on Redis's clock. Settling removes the reservation and adds its
// cost to the current period's spent; releasing removes it. The ledger (ChainSpent) is the
// record the spent counter is built from when it is missing: the first use of a period, after
// the keys expired from disuse, or after Redis lost them. So the cap is exact while Redis
// keeps its keys; when it loses them, it is exceeded by at most what the chain had reserved
// then and what settled between the rebuild's ledger read and its write. Amounts are exact up
// to 2^53 micro-credits (Lua's numbers).
type sharedCaps struct {
	r *sharedRedis
	// resTTL is how long a reservation is counted: the ledger's reservation TTL.
	resTTL time.Duration
	// keyTTL is how long a period's keys live after their last use: past every reservation.
	keyTTL time.Duration
}

func newSharedCaps(r *sharedRedis, reservationTTL time.Duration) *sharedCaps {
	return &sharedCaps{r: r, resTTL: reservationTTL, keyTTL: max(24*time.Hour, reservationTTL+time.Hour)}
}

// capHoldScript: KEYS spent, reservations; ARGV cap, amount, member, reservation TTL ms, key
// TTL ms, spent to start from when the counter is missing ("": none, reply -1).
// Reply {code, spent, reserved}: 1 held, 0 over the cap, -1 counter missing.
var capHoldScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('GET', KEYS[1])
if not s then
  if ARGV[6] == '' then
    return {-1, 0, 0}
  end
  s = ARGV[6]
  redis.call('SET', KEYS[1], s, 'PX', ARGV[5])
end
s = tonumber(s)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local r = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  r = r + tonumber(string.match(m, '^(%d+):'))
end
local cap, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if s + r + amount > cap then
  return {0, s, r}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, s, r}
`)

// capSettleScript: KEYS the reservations of the period held in, the spent counter of the
// current period; ARGV member, cost, key TTL ms. A missing counter is left missing (it is
// rebuilt from the ledger, which has the settlement).
var capSettleScript = redis.NewScript(`
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
`)

// sharedHold is one reservation counted under a shared cap.
type sharedHold struct {
	chain, member, resKey string
	every                 string
}

// capKeys are the keys of chain's period starting at start.
func (c *sharedCaps) capKeys(chain string, start time.Time) (spent, reserved string) {
	base := c.r.prefix + "cap:{" + redisKeyPart(chain) + "}:" + strconv.FormatInt(start.Unix(), 10)
	return base + ":s", base + ":r"
}

// hold takes amount under k's cap (k.cap > 0), or returns *keyCapReached, or an error
// wrapping errLimitsUnavailable (Redis) or the ledger's (ChainSpent).
func (c *sharedCaps) hold(ctx context.Context, l *keyLedger, k keyUse, amount credits.Amount) (*sharedHold, error) {
	start := identity.CapPeriodStart(k.period, l.now())
	sk, rk := c.capKeys(k.chainID(), start)
	h := &sharedHold{chain: k.chainID(), member: strconv.FormatInt(int64(amount), 10) + ":" + rand.Text(), resKey: rk, every: k.period}
	run := func(init string) ([]int64, error) {
		rctx, cancel := c.r.context(ctx)
		defer cancel()
		res, err := capHoldScript.Run(rctx, c.r.rdb, []string{sk, rk}, int64(k.cap), int64(amount), h.member,
			c.resTTL.Milliseconds(), c.keyTTL.Milliseconds(), init).Int64Slice()
		if err == nil && len(res) != 3 {
			err = fmt.Errorf("cap hold: %d values in the reply", len(res))
		}
		return res, c.r.observe("cap_hold", err)
	}
	res, err := run("")
	if err != nil {
		return nil, err
	}
	if res[0] == -1 {
		// No counter for this period: the ledger knows what the chain spent.
		spent, err := l.spent(ctx, k.chainID(), start)
		if err != nil {
			return nil, err
		}
		if res, err = run(strconv.FormatInt(int64(spent), 10)); err != nil {
			return nil, err
		}
	}
	if res[0] != 1 {
		return nil, &keyCapReached{cap: k.cap, spent: credits.Amount(res[1]), reserved: credits.Amount(res[2]),
			required: amount, period: k.period}
	}
	return h, nil
}

// settle ends h with its cost counted in the current period.
func (c *sharedCaps) settle(ctx context.Context, l *keyLedger, h *sharedHold, cost credits.Amount) {
	sk, _ := c.capKeys(h.chain, identity.CapPeriodStart(h.every, l.now()))
	rctx, cancel := c.r.context(ctx)
	defer cancel()
	err := capSettleScript.Run(rctx, c.r.rdb, []string{h.resKey, sk}, h.member, int64(cost), c.keyTTL.Milliseconds()).Err()
	_ = c.r.observe("cap_settle", err)
}

// release ends h, counting nothing.
func (c *sharedCaps) release(ctx context.Context, h *sharedHold) {
	rctx, cancel := c.r.context(ctx)
	defer cancel()
	err := c.r.rdb.ZRem(rctx, h.resKey, h.member).Err()
	if errors.Is(err, redis.Nil) {
		err = nil
	}
	_ = c.r.observe("cap_release", err)
}
