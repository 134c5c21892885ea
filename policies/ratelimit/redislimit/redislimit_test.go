package redislimit

import (
	"context"
	crand "crypto/rand"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// redisAddr is the Redis the tests use (.ci/run starts it when it is not running).
const redisAddr = "127.0.0.1:6379"

// connect is a client of the test Redis, closed at the end of the test. Without Redis the
// test is skipped, except in CI (CI=1 or true), where it fails.
func connect(t testing.TB) *redis.Client {
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
func testPrefix(t testing.TB, rdb *redis.Client) string {
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
	l.scripts = newScripts(l) // with these pads
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
		{"equal_waits_name_the_first", ratelimit.Policy{Limits: []ratelimit.Limit{
			{Name: "first", Quota: 1, Window: time.Minute},
			{Name: "second", Quota: 1, Window: time.Minute},
		}}, []op{adm(0), adm(0), wait(time.Second), adm(0)}},
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

// instances are n clients of the test Redis, each with its own limiter of policy p under one
// prefix, as n gateway instances would be.
func instances(t *testing.T, n int, p ratelimit.Policy, o Options) []*Limiter {
	t.Helper()
	rdb := connect(t)
	o.Prefix = testPrefix(t, rdb)
	var ls []*Limiter
	for range n {
		c := redis.NewClient(&redis.Options{Addr: redisAddr})
		t.Cleanup(func() { _ = c.Close() })
		l, err := New(c, p, o)
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	return ls
}

// TestLimitSharedAcrossInstances: a limit of N per hour over three instances asking at once
// admits N in total, not 3N, on Redis's clock.
func TestLimitSharedAcrossInstances(t *testing.T) {
	const n = 20
	ls := instances(t, 3, ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "requests_per_hour", Quota: n, Window: time.Hour}}}, Options{})
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for _, l := range ls {
		for range 4 {
			wg.Go(func() {
				for range 10 {
					tk, d, err := l.AdmitContext(context.Background(), "k", 0)
					if err != nil {
						t.Error(err)
						return
					}
					if d.Allowed {
						admitted.Add(1)
						tk.Release()
					} else if d.Refused != "requests_per_hour" || d.RetryAfter <= 0 || d.RetryAfter > time.Hour/n {
						t.Errorf("refusal %+v", d)
					}
				}
			})
		}
	}
	wg.Wait()
	if got := admitted.Load(); got != n {
		t.Fatalf("three instances admitted %d, want %d in total", got, n)
	}
}

// holdConcurrently has workers goroutines on each limiter ask times each for a slot of "k" at
// once, and returns every ticket admitted (none ended); each refusal must be the concurrency
// bound's.
func holdConcurrently(t *testing.T, ls []*Limiter, workers, times int) []ratelimit.Ticket {
	t.Helper()
	var mu sync.Mutex
	var held []ratelimit.Ticket
	var wg sync.WaitGroup
	for _, l := range ls {
		for range workers {
			wg.Go(func() {
				for range times {
					tk, d, err := l.AdmitContext(context.Background(), "k", 0)
					if err != nil {
						t.Error(err)
						return
					}
					if d.Allowed {
						mu.Lock()
						held = append(held, tk)
						mu.Unlock()
					} else if d.Refused != ratelimit.ConcurrentLimit || d.RetryAfter != time.Second {
						t.Errorf("refusal %+v", d)
					}
				}
			})
		}
	}
	wg.Wait()
	return held
}

// TestConcurrencySharedAcrossInstances: a concurrency bound of C holds over three instances;
// a slot freed on one lets one more in on another.
func TestConcurrencySharedAcrossInstances(t *testing.T) {
	const c = 3
	ls := instances(t, 3, ratelimit.Policy{Concurrent: c}, Options{})
	ctx := context.Background()
	held := holdConcurrently(t, ls, 10, 1)
	if len(held) != c {
		t.Fatalf("30 at once over three instances: %d admitted, want %d", len(held), c)
	}
	if n, err := ls[2].InFlight(ctx, "k"); err != nil || n != c {
		t.Fatalf("in flight %d (%v), want %d", n, err, c)
	}
	held[0].Release()
	for i, l := range ls {
		tk, d, err := l.AdmitContext(ctx, "k", 0)
		if err != nil {
			t.Fatal(err)
		}
		if d.Allowed != (i == 0) {
			t.Fatalf("after one release, instance %d: %+v", i, d)
		}
		if d.Allowed {
			held[0] = tk
		}
	}
	for i := range held {
		held[i].Settle(0)
	}
	if n, err := ls[0].InFlight(ctx, "k"); err != nil || n != 0 {
		t.Fatalf("in flight %d (%v) after every end", n, err)
	}
}

// TestCrashedSlotsComeBack: the slots of an instance that never ends its tickets (it
// crashed) are free again after the slot TTL, and not before.
func TestCrashedSlotsComeBack(t *testing.T) {
	const ttl = 400 * time.Millisecond
	ls := instances(t, 2, ratelimit.Policy{Concurrent: 2}, Options{SlotTTL: ttl})
	ctx := context.Background()
	start := time.Now()
	for range 2 {
		if _, d, err := ls[0].AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
			t.Fatalf("%+v %v", d, err)
		}
	}
	// Instance 0 crashes, its tickets never ended.
	_, d, err := ls[1].AdmitContext(ctx, "k", 0)
	if err != nil {
		t.Fatal(err)
	}
	if early := time.Since(start) < ttl; early && (d.Allowed || d.Refused != ratelimit.ConcurrentLimit) {
		t.Fatalf("a slot came back before its TTL: %+v", d)
	}
	time.Sleep(ttl + 50*time.Millisecond)
	for range 2 {
		tk, d, err := ls[1].AdmitContext(ctx, "k", 0)
		if err != nil || !d.Allowed {
			t.Fatalf("after the slot TTL: %+v %v", d, err)
		}
		defer tk.Release()
	}
	if _, d, _ := ls[1].AdmitContext(ctx, "k", 0); d.Allowed {
		t.Fatal("the bound does not hold after the crashed slots came back")
	}
}

// dump is every key of the limiter's caller key with its value (TATs, and the slots with
// their expiry), to compare states.
func dump(t *testing.T, rdb *redis.Client, l *Limiter, key string) map[string]string {
	t.Helper()
	ctx := context.Background()
	out := map[string]string{}
	ks := l.keys(key)
	for _, k := range ks[:len(ks)-1] {
		v, err := rdb.Get(ctx, k).Result()
		if err == redis.Nil {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		out[k] = v
	}
	slots, err := rdb.ZRangeWithScores(ctx, ks[len(ks)-1], 0, -1).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, z := range slots {
		out[fmt.Sprint(z.Member)] = fmt.Sprint(z.Score)
	}
	return out
}

// TestRefusalTakesNothing: a request refused by one limit (or too large for it, or without a
// free slot) leaves every key of the caller in Redis as it was.
func TestRefusalTakesNothing(t *testing.T) {
	rdb := connect(t)
	tests := []struct {
		name    string
		prepare func(l *Limiter) // brings one limit to refusal
		tokens  int64
		refused string
	}{
		{"per_minute", func(l *Limiter) {
			for range 10 {
				tk, _, _ := l.AdmitContext(context.Background(), "k", 0)
				tk.Release()
			}
		}, 0, "requests_per_minute"},
		{"tokens", func(l *Limiter) {
			tk, _, _ := l.AdmitContext(context.Background(), "k", 99000)
			tk.Release()
		}, 5000, "tokens_per_minute"},
		{"too_large", func(l *Limiter) {
			tk, _, _ := l.AdmitContext(context.Background(), "k", 10)
			tk.Release()
		}, 200000, "tokens_per_minute"},
		{"concurrent", func(l *Limiter) {
			for range 5 {
				l.AdmitContext(context.Background(), "k", 100) // held
			}
		}, 0, ratelimit.ConcurrentLimit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := simulated(t, rdb, tierPolicy(), newSimClock())
			tt.prepare(l)
			before := dump(t, rdb, l, "k")
			if len(before) == 0 {
				t.Fatal("nothing stored")
			}
			_, d, err := l.AdmitContext(context.Background(), "k", tt.tokens)
			if err != nil || d.Allowed || d.Refused != tt.refused {
				t.Fatalf("decision %+v (%v), want refused by %s", d, err, tt.refused)
			}
			after := dump(t, rdb, l, "k")
			if fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("a refusal changed the state:\nbefore %v\nafter  %v", before, after)
			}
		})
	}
}

// TestRetryAfterOnRedisClock: on Redis's clock, a refused request passes once its
// RetryAfter has gone by.
func TestRetryAfterOnRedisClock(t *testing.T) {
	ls := instances(t, 2, ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "burst_per_second", Quota: 5, Window: time.Second, Burst: 1}}}, Options{})
	ctx := context.Background()
	if _, d, err := ls[0].AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
		t.Fatalf("%+v %v", d, err)
	}
	_, d, err := ls[1].AdmitContext(ctx, "k", 0)
	if err != nil || d.Allowed || d.RetryAfter <= 0 || d.RetryAfter > 200*time.Millisecond {
		t.Fatalf("second at once: %+v %v", d, err)
	}
	if d.Tightest.Remaining != 0 || d.Tightest.Reset <= 0 || d.Tightest.Reset > 200*time.Millisecond {
		t.Fatalf("tightest %+v", d.Tightest)
	}
	time.Sleep(d.RetryAfter + 5*time.Millisecond)
	if _, d, err := ls[1].AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
		t.Fatalf("after RetryAfter: %+v %v", d, err)
	}
}

// commandCounter counts round trips (a command, or a pipeline), or with each the commands
// sent one by one, a pipeline's each counted.
type commandCounter struct {
	n    atomic.Int64
	each bool
}

func (c *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		c.n.Add(1)
		return next(ctx, cmd)
	}
}
func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if c.each {
			c.n.Add(int64(len(cmds)))
		} else {
			c.n.Add(1)
		}
		return next(ctx, cmds)
	}
}

// TestRoundTrips: an admission over every limit of a tier and its slot is one command, a
// settlement one, an end that changes nothing none; a script Redis lost is sent again.
func TestRoundTrips(t *testing.T) {
	rdb := connect(t)
	var cc commandCounter
	rdb.AddHook(&cc)
	ctx := context.Background()
	noBound := tierPolicy()
	noBound.Concurrent = 0
	lb, err := New(rdb, noBound, Options{Prefix: testPrefix(t, rdb)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := New(rdb, tierPolicy(), Options{Prefix: testPrefix(t, rdb)})
	if err != nil {
		t.Fatal(err)
	}
	// Each policy has scripts of its own (script.go): these load them if Redis has not got them.
	tk, d, err := l.AdmitContext(ctx, "warm", 0)
	tk.Settle(1)
	tk, _, _ = l.AdmitContext(ctx, "warm", 0)
	tk.Cancel()
	tk, _, _ = lb.AdmitContext(ctx, "warm", 0)
	tk.Settle(1)
	if _, err := l.PeekContext(ctx, "warm"); err != nil {
		t.Fatal(err)
	}
	cc.n.Store(0)
	count := func(what string, want int64, f func()) {
		t.Helper()
		before := cc.n.Load()
		f()
		if got := cc.n.Load() - before; got != want {
			t.Fatalf("%s: %d commands, want %d", what, got, want)
		}
	}
	count("admit", 1, func() {
		tk, d, err = l.AdmitContext(ctx, "k", 500)
		if err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
	})
	count("settle", 1, func() { tk.Settle(300) })
	count("admit and release without a bound", 1, func() {
		tk, _, _ := lb.AdmitContext(ctx, "k", 500)
		tk.Release() // nothing to give back, no slot: no round trip
	})
	count("refusal", 1, func() {
		if _, d, _ := l.AdmitContext(ctx, "k", 1<<20); !d.TooLarge {
			t.Fatal(d)
		}
	})
	count("peek", 1, func() {
		if s, err := l.PeekContext(ctx, "k"); err != nil || s.Remaining != 9 {
			t.Fatal(s, err)
		}
	})
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	tk, d, err = l.AdmitContext(ctx, "k", 0)
	if err != nil || !d.Allowed {
		t.Fatalf("after SCRIPT FLUSH: %+v %v", d, err)
	}
	tk.Release()
	if s, err := l.PeekContext(ctx, "k"); err != nil || s.Remaining != 8 {
		t.Fatal(s, err)
	}
	// Scripts sent ahead: the first admission after SCRIPT FLUSH is one round trip again.
	// (A first pipeline may open a connection of its own: its handshake is not counted.)
	if err := LoadScripts(ctx, rdb, l); err != nil {
		t.Fatal(err)
	}
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	count("loading the scripts of two limiters", 1, func() {
		if err := LoadScripts(ctx, rdb, l, lb); err != nil {
			t.Fatal(err)
		}
	})
	count("admit after LoadScripts", 1, func() {
		tk, d, err = l.AdmitContext(ctx, "k", 0)
		if err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
	})
	count("release after LoadScripts", 1, func() { tk.Release() })
	count("peek after LoadScripts", 1, func() {
		if _, err := lb.PeekContext(ctx, "k"); err != nil {
			t.Fatal(err)
		}
	})
}

// TestUnreachable: without Redis, admission is an error and takes nothing; a ticket's end
// reports its failure.
func TestUnreachable(t *testing.T) {
	rdb := connect(t)
	var failed []error
	var mu sync.Mutex
	l, err := New(rdb, tierPolicy(), Options{Prefix: testPrefix(t, rdb), OnFinishError: func(err error) {
		mu.Lock()
		failed = append(failed, err)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tk, d, err := l.AdmitContext(ctx, "k", 10)
	if err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	// The same limiter on a closed port.
	down := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	defer down.Close()
	l.rdb = down
	tk2, d, err := l.AdmitContext(ctx, "k", 10)
	if err == nil || d.Allowed || tk2.Admitted() {
		t.Fatalf("without redis: %+v, %v", d, err)
	}
	tk.Settle(5)
	mu.Lock()
	n := len(failed)
	mu.Unlock()
	if n != 1 {
		t.Fatalf("%d finish errors reported, want 1", n)
	}
}

func TestNewRejects(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr}) // never used: New does not connect
	defer rdb.Close()
	lim := func(name string) ratelimit.Limit {
		return ratelimit.Limit{Name: name, Quota: 1, Window: time.Second}
	}
	bad := []struct {
		p ratelimit.Policy
		o Options
	}{
		{ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "x", Quota: 0, Window: time.Second}}}, Options{}},
		{ratelimit.Policy{Limits: []ratelimit.Limit{lim("x"), lim("x")}}, Options{}},
		{ratelimit.Policy{Limits: []ratelimit.Limit{lim("")}}, Options{}},
		{ratelimit.Policy{Limits: []ratelimit.Limit{lim("a}b")}}, Options{}},
		{ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "x", Quota: 1, Window: 30 * 24 * time.Hour}}}, Options{}},
		{ratelimit.Policy{}, Options{Prefix: "a{b"}},
		{ratelimit.Policy{}, Options{SlotTTL: -1}},
	}
	for i, b := range bad {
		if _, err := New(rdb, b.p, b.o); err == nil {
			t.Errorf("policy %d accepted", i)
		}
	}
}

// TestDebtAfterExpiry: a token limit's TAT is kept while a ticket may settle (the slot TTL
// and the tolerance past it), and a debt settled against one gone (evicted) counts from now.
func TestDebtAfterExpiry(t *testing.T) {
	rdb := connect(t)
	ctx := context.Background()
	p := ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 1000, Window: time.Minute}}}
	l, err := New(rdb, p, Options{Prefix: testPrefix(t, rdb), SlotTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	c := newSimClock()
	l.now = c.now
	tk, d, err := l.AdmitContext(ctx, "k", 100)
	if err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	key := l.keys("k")[0]
	if ttl := rdb.PTTL(ctx, key).Val(); ttl < time.Hour+time.Minute {
		t.Fatalf("the token limit's TAT expires in %v, before a ticket's settlement may come", ttl)
	}
	rdb.Del(ctx, key)
	tk.Settle(1100) // 1000 tokens more than admitted: a minute of debt from now
	_, d, err = l.AdmitContext(ctx, "k", 1)
	if err != nil || d.Allowed || d.RetryAfter != 60*time.Millisecond {
		t.Fatalf("after a minute of debt: %+v %v", d, err)
	}
}

// TestOddLimitNames: the limits' names are written into the scripts (script.go) whatever
// bytes they hold, and a limit's state is found by its name: a limiter with one limit of a
// policy, on the same prefix, reads what the policy's limiter took.
func TestOddLimitNames(t *testing.T) {
	rdb := connect(t)
	ctx := context.Background()
	names := []string{`quo"te`, "it's", `back\slash`, "new\nline", "\x01" + "2", "ü", "--[[", "]] x"}
	var p ratelimit.Policy
	for i, n := range names {
		p.Limits = append(p.Limits, ratelimit.Limit{Name: n, Quota: int64(10 + i), Window: time.Minute})
	}
	prefix := testPrefix(t, rdb)
	l, err := New(rdb, p, Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, d, err := l.AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
			t.Fatalf("%+v %v", d, err)
		}
	}
	if st, err := l.PeekContext(ctx, "k"); err != nil || st.Limit.Name != names[0] || st.Remaining != 7 {
		t.Fatalf("tightest %+v %v, want %q with 7 left", st, err, names[0])
	}
	// The names as stored, read by Redis's own MessagePack decoder.
	stored, err := rdb.Eval(ctx, `local out = {}
for k in pairs(cmsgpack.unpack(redis.call('GET', KEYS[1]))) do
  if type(k) == 'string' then out[#out + 1] = k end
end
return out`, l.keys("k")[:1]).StringSlice()
	slices.Sort(stored)
	want := slices.Sorted(slices.Values(names))
	if err != nil || !slices.Equal(stored, want) {
		t.Fatalf("names stored %q (%v), want %q", stored, err, want)
	}
	for i, lim := range p.Limits {
		one, err := New(rdb, ratelimit.Policy{Limits: []ratelimit.Limit{lim}}, Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		st, err := one.PeekContext(ctx, "k")
		if err != nil || st.Limit.Name != lim.Name || st.Remaining != int64(10+i)-3 {
			t.Errorf("limit %q alone: %+v %v, want %d left", lim.Name, st, err, 10+i-3)
		}
	}
}

// scriptMicros is the CPU time Redis has spent in scripts (EVALSHA and EVAL), in
// microseconds, from INFO commandstats: what its interpreter costs, whatever the machine's
// load (but any other client's scripts count too).
func scriptMicros(tb testing.TB, rdb *redis.Client) int64 {
	tb.Helper()
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		tb.Fatal(err)
	}
	var total int64
	for line := range strings.Lines(info) {
		name, stats, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || (name != "cmdstat_evalsha" && name != "cmdstat_eval") {
			continue
		}
		for field := range strings.SplitSeq(stats, ",") {
			if v, ok := strings.CutPrefix(field, "usec="); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					tb.Fatalf("%s: %v", line, err)
				}
				total += n
			}
		}
	}
	return total
}

// BenchmarkAdmission is one admission over a tier's five limits and its slot, and its
// settlement: two round trips to the test Redis, on one key and on many keys in parallel.
// redis-µs/op is Redis's CPU time in the scripts of one admission and its end.
func BenchmarkAdmission(b *testing.B) {
	rdb := connect(b)
	p := tierPolicy()
	for i := range p.Limits {
		p.Limits[i].Quota *= 1 << 30 // never refusing
		p.Limits[i].Burst = p.Limits[i].Quota
	}
	p.Concurrent = 1 << 30
	l, err := New(rdb, p, Options{Prefix: testPrefix(b, rdb)})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.Run("one_key", func(b *testing.B) {
		before := scriptMicros(b, rdb)
		for b.Loop() {
			tk, d, err := l.AdmitContext(ctx, "k_0123456789", 500)
			if err != nil || !d.Allowed {
				b.Fatal(d, err)
			}
			tk.Settle(300)
		}
		b.ReportMetric(float64(scriptMicros(b, rdb)-before)/float64(b.N), "redis-µs/op")
	})
	b.Run("many_keys_parallel", func(b *testing.B) {
		var next atomic.Int64
		before := scriptMicros(b, rdb)
		defer func() { b.ReportMetric(float64(scriptMicros(b, rdb)-before)/float64(b.N), "redis-µs/op") }()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				tk, d, err := l.AdmitContext(ctx, fmt.Sprintf("k_%010d", next.Add(1)%1000), 500)
				if err != nil || !d.Allowed {
					b.Error(d, err)
					return
				}
				tk.Settle(300)
			}
		})
	})
}
