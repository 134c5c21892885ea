package redislimit

import (
	"context"
	crand "crypto/rand"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// redisAddr is the Redis the tests use (.ci/run starts it when it is not running).
const redisAddr = "127.0.0.1:6379"

// connect is a client of the test Redis, closed at the end of the test. Without Redis the
// test is skipped, except in CI (CI=1 or true), where it fails.
func connect(t *testing.T) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		_ = rdb.Close()
		if ci := os.Getenv("CI"); ci == "1" || ci == "true" {
			t.Fatalf("redis at %s: %v", redisAddr, err)
		}
		t.Skipf("no redis at %s (%v): start one to run the Redis limiter's tests", redisAddr, err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// testPrefix is a key prefix of the test's own; its keys are deleted at the end.
func testPrefix(t *testing.T, rdb *redis.Client) string {
	t.Helper()
	prefix := "llmgw-test:" + crand.Text() + ":"
	t.Cleanup(func() {
		ctx := context.Background()
		iter := rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
	})
	return prefix
}

// simClock is a simulated clock.
type simClock struct {
	mu sync.Mutex
	t  time.Time
}

func newSimClock() *simClock { return &simClock{t: time.Unix(1_800_000_000, 0)} }

func (c *simClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *simClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// simulated is a limiter on the simulated clock c instead of Redis's, its keys kept for
// an hour of real time past their expiry (the test's simulated time runs far faster).
func simulated(t *testing.T, rdb *redis.Client, p ratelimit.Policy, c *simClock) *Limiter {
	t.Helper()
	l, err := New(rdb, p, Options{Prefix: testPrefix(t, rdb), SlotTTL: 10000 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	l.now = c.now
	for i := range l.pads {
		l.pads[i] += time.Hour.Milliseconds()
	}
	return l
}

func tierPolicy() ratelimit.Policy {
	return ratelimit.Policy{Limits: []ratelimit.Limit{
		{Name: "burst_per_second", Quota: 10, Window: time.Second, Burst: 10},
		{Name: "requests_per_minute", Quota: 60, Window: time.Minute, Burst: 10},
		{Name: "requests_per_hour", Quota: 1000, Window: time.Hour, Burst: 60},
		{Name: "requests_per_day", Quota: 10000, Window: 24 * time.Hour, Burst: 1000},
		{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 100000, Window: time.Minute},
	}, Concurrent: 5}
}

// tightPolicy refuses often, by every limit in turn.
func tightPolicy() ratelimit.Policy {
	return ratelimit.Policy{Limits: []ratelimit.Limit{
		{Name: "burst_per_second", Quota: 3, Window: time.Second, Burst: 2},
		{Name: "requests_per_minute", Quota: 20, Window: time.Minute, Burst: 5},
		{Name: "requests_per_hour", Quota: 7, Window: time.Hour, Burst: 7},
		{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 1000, Window: time.Minute, Burst: 300},
	}, Concurrent: 2}
}

// pair is the in-process limiter and the Redis one on the same clock, driven together.
type pair struct {
	t     *testing.T
	c     *simClock
	local *ratelimit.Limiter
	redis *Limiter
	held  [][2]ratelimit.Ticket // in-process, Redis
}

func newPair(t *testing.T, rdb *redis.Client, p ratelimit.Policy) *pair {
	c := newSimClock()
	local, err := ratelimit.New(p, c.now)
	if err != nil {
		t.Fatal(err)
	}
	return &pair{t: t, c: c, local: local, redis: simulated(t, rdb, p, c)}
}

// admit admits on both and fails unless they decide the same; it returns the decision.
func (p *pair) admit(step, key string, tokens int64) ratelimit.Decision {
	p.t.Helper()
	lt, ld := p.local.Admit(key, tokens)
	rt, rd, err := p.redis.AdmitContext(context.Background(), key, tokens)
	if err != nil {
		p.t.Fatalf("%s: %v", step, err)
	}
	if ld != rd {
		p.t.Fatalf("%s: admit(%s, %d):\nin-process %+v\nredis      %+v", step, key, tokens, ld, rd)
	}
	if lt.Admitted() != rt.Admitted() {
		p.t.Fatalf("%s: admitted %v in-process, %v on redis", step, lt.Admitted(), rt.Admitted())
	}
	if lt.Admitted() {
		p.held = append(p.held, [2]ratelimit.Ticket{lt, rt})
	}
	return ld
}

// end ends held ticket i on both: settled with used tokens, cancelled (used -1) or released
// (used -2).
func (p *pair) end(i int, used int64) {
	tk := &p.held[i]
	for j := range tk {
		switch used {
		case -1:
			tk[j].Cancel()
		case -2:
			tk[j].Release()
		default:
			tk[j].Settle(used)
		}
	}
	p.held = append(p.held[:i], p.held[i+1:]...)
}

// peek fails unless both limiters stand at the same place for key.
func (p *pair) peek(step, key string) {
	p.t.Helper()
	ctx := context.Background()
	rs, err := p.redis.PeekContext(ctx, key)
	if err != nil {
		p.t.Fatal(err)
	}
	if ls := p.local.Peek(key); ls != rs {
		p.t.Fatalf("%s: peek(%s):\nin-process %+v\nredis      %+v", step, key, ls, rs)
	}
	if p.redis.concurrent == 0 {
		return // slots are kept only under a bound
	}
	n, err := p.redis.InFlight(ctx, key)
	if err != nil {
		p.t.Fatal(err)
	}
	if ln := p.local.InFlight(key); ln != n {
		p.t.Fatalf("%s: in flight %d in-process, %d on redis", step, ln, n)
	}
}

// TestSameDecisionsAsInProcess: sequences of admissions, ends and waits, on the simulated
// clock, get exactly the in-process limiter's decisions (allowed or the refusing limit,
// retry-after and the tightest limit's remaining and reset to the nanosecond) and leave both
// at the same place.
func TestSameDecisionsAsInProcess(t *testing.T) {
	rdb := connect(t)
	type op struct {
		admit   int64         // tokens of an admission, when end and wait are 0
		end     int64         // ends the oldest held ticket: settled with end-1 tokens, -1 cancel, -2 release
		advance time.Duration // the clock moves on
	}
	adm := func(tokens int64) op { return op{admit: tokens} }
	settle := func(used int64) op { return op{end: used + 1} }
	cancel, release := op{end: -1}, op{end: -2}
	wait := func(d time.Duration) op { return op{advance: d} }
	repeat := func(n int, o op) []op {
		ops := make([]op, n)
		for i := range ops {
			ops[i] = o
		}
		return ops
	}
	cat := func(parts ...[]op) []op {
		var ops []op
		for _, p := range parts {
			ops = append(ops, p...)
		}
		return ops
	}
	tests := []struct {
		name   string
		policy ratelimit.Policy
		ops    []op
	}{
		{"burst_then_rate", ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "burst_per_second", Quota: 10, Window: time.Second, Burst: 10}}},
			cat(repeat(12, adm(0)), []op{wait(50 * time.Millisecond)}, repeat(2, adm(0)), []op{wait(51 * time.Millisecond)}, repeat(2, adm(0)), []op{wait(time.Second)}, repeat(11, adm(0)))},
		{"quota_not_dividing_window", ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "requests_per_second", Quota: 7, Window: time.Second, Burst: 1}}},
			cat(repeat(2, adm(0)), []op{wait(142857142)}, repeat(1, adm(0)), []op{wait(1)}, repeat(2, adm(0)))},
		{"tokens_give_back_and_debt", ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 1000, Window: time.Minute}}},
			[]op{adm(900), settle(100), adm(900), settle(950), adm(1), wait(3 * time.Second), adm(1), adm(2000), adm(-5), release}},
		{"huge_debt_bounded", ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 1000, Window: time.Minute}}},
			[]op{adm(10), settle(1 << 40), adm(1), wait(24 * time.Hour), adm(1), wait(time.Minute), adm(1)}},
		{"cancel_gives_everything_back", tierPolicy(),
			cat([]op{adm(10), release, adm(5000), cancel}, repeat(10, adm(100)), []op{adm(0), release, cancel, settle(0)})},
		{"concurrency", ratelimit.Policy{Concurrent: 3},
			cat(repeat(4, adm(0)), []op{release, adm(0), adm(0), settle(0), cancel, adm(0), adm(0), adm(0)})},
		{"tier_all_limits", tierPolicy(),
			cat(repeat(12, adm(500)), repeat(5, release), repeat(6, adm(20000)), repeat(5, settle(100)), []op{wait(time.Second)}, repeat(7, adm(0)),
				[]op{wait(time.Minute)}, repeat(3, adm(200000)), repeat(20, adm(1)))},
		{"too_large_before_a_refusal", ratelimit.Policy{Limits: []ratelimit.Limit{
			{Name: "requests_per_minute", Quota: 1, Window: time.Minute},
			{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 100, Window: time.Minute},
		}}, []op{adm(10), adm(101), adm(100), release}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newPair(t, rdb, tt.policy)
			for i, o := range tt.ops {
				step := fmt.Sprintf("op %d", i)
				switch {
				case o.advance != 0:
					p.c.advance(o.advance)
				case o.end != 0:
					if len(p.held) == 0 {
						continue
					}
					used := o.end
					if used > 0 {
						used--
					}
					p.end(0, used)
				default:
					p.admit(step, "k", o.admit)
				}
				p.peek(step, "k")
			}
		})
	}
}

// TestSameDecisionsRandom: random admissions, ends and waits over two keys get the
// in-process limiter's decisions, for a tier's policy and one that refuses often.
func TestSameDecisionsRandom(t *testing.T) {
	rdb := connect(t)
	steps := []time.Duration{0, time.Nanosecond, time.Millisecond, 37 * time.Millisecond, 300 * time.Millisecond, 5 * time.Second, 40 * time.Second, 7 * time.Minute}
	for _, tt := range []struct {
		name   string
		policy ratelimit.Policy
		tokens int64
	}{{"tier", tierPolicy(), 30000}, {"tight", tightPolicy(), 400}} {
		for seed := uint64(1); seed <= 3; seed++ {
			t.Run(fmt.Sprintf("%s_seed_%d", tt.name, seed), func(t *testing.T) {
				p := newPair(t, rdb, tt.policy)
				rng := rand.New(rand.NewPCG(seed, 0))
				allowed, refused := 0, map[string]int{}
				for i := range 600 {
					step := fmt.Sprintf("op %d", i)
					key := []string{"a", "b"}[rng.IntN(2)]
					switch r := rng.IntN(10); {
					case r < 5:
						d := p.admit(step, key, rng.Int64N(tt.tokens))
						if d.Allowed {
							allowed++
						} else {
							refused[d.Refused]++
						}
					case r < 8 && len(p.held) > 0:
						p.end(rng.IntN(len(p.held)), rng.Int64N(tt.tokens*3/2)-2)
					default:
						p.c.advance(steps[rng.IntN(len(steps))])
					}
					p.peek(step, key)
				}
				t.Logf("%d admitted, refused %v", allowed, refused)
				if allowed == 0 || len(refused) == 0 {
					t.Fatalf("the sequence tests too little: %d admitted, refused %v", allowed, refused)
				}
			})
		}
	}
}
