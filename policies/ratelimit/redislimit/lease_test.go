package redislimit

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// leasingLimiter is a limiter for p that leases 1/64 of each limit (at most 64 requests), on
// the simulated clock c (as simulated) when c is set, else on Redis's; fromLease counts the
// admissions from a lease, direct those that ran a script.
type leasingLimiter struct {
	*Limiter
	fromLease, direct atomic.Int64
}

func leasingFor(t *testing.T, rdb *redis.Client, prefix string, p ratelimit.Policy, c *simClock, o LeaseOptions) *leasingLimiter {
	t.Helper()
	ll := &leasingLimiter{}
	o.Divisor = 64
	o.OnAdmit = func(local bool) {
		if local {
			ll.fromLease.Add(1)
		} else {
			ll.direct.Add(1)
		}
	}
	l, err := New(rdb, p, Options{Prefix: prefix, SlotTTL: time.Hour, Lease: o})
	if err != nil {
		t.Fatal(err)
	}
	if c != nil {
		l.now = c.now
		for i := range l.pads {
			l.pads[i] += time.Hour.Milliseconds()
		}
		l.scripts = newScripts(l)
	}
	t.Cleanup(l.Close)
	ll.Limiter = l
	return ll
}

func perHour(n int64) ratelimit.Policy {
	return ratelimit.Policy{Limits: []ratelimit.Limit{{Name: "requests_per_hour", Quota: n, Window: time.Hour}}}
}

// TestLeaseSizes: a lease is 1/64 of the smallest burst (at most 64 requests), and a limit
// too small to split (under 2 requests a lease, or a slot or a token) leases nothing.
func TestLeaseSizes(t *testing.T) {
	rdb := connect(t)
	for _, tc := range []struct {
		p              ratelimit.Policy
		requests, slot int64 // 0: no leases
	}{
		{perHour(6400), 64, -1},
		{perHour(100000), 64, -1},
		{perHour(1000), 15, -1},
		{perHour(127), 0, 0},
		{ratelimit.Policy{Limits: perHour(6400).Limits, Concurrent: 640}, 64, 10},
		{ratelimit.Policy{Limits: perHour(6400).Limits, Concurrent: 63}, 0, 0},
		{ratelimit.Policy{Concurrent: 6400}, 64, 64},
		{tierPolicy(), 0, 0},
	} {
		l, err := New(rdb, tc.p, Options{Prefix: "x", Lease: LeaseOptions{Divisor: 64}})
		if err != nil {
			t.Fatal(err)
		}
		if tc.requests == 0 {
			if l.leasing != nil {
				t.Errorf("%+v: leases of %d requests, want none", tc.p, l.leasing.requests)
			}
			continue
		}
		if l.leasing == nil || l.leasing.requests != tc.requests || l.leasing.slots != tc.slot {
			t.Errorf("%+v: leasing %+v, want %d requests, %d slots", tc.p, l.leasing, tc.requests, tc.slot)
		}
	}
}

// TestLeaseAdmitsHere: 640 requests of one caller are 10 scripts on Redis, the other 630
// admitted from leases here; once closed, the caller's limit stands exactly where 640
// requests leave it, with nothing leased left taken, and the headers' count was right.
func TestLeaseAdmitsHere(t *testing.T) {
	rdb := connect(t)
	var cc commandCounter
	rdb.AddHook(&cc)
	c := newSimClock()
	l := leasingFor(t, rdb, testPrefix(t, rdb), perHour(6400), c, LeaseOptions{Life: time.Hour})
	ctx := context.Background()
	before := cc.n.Load()
	for i := range 640 {
		tk, d, err := l.AdmitContext(ctx, "k", 0)
		if err != nil || !d.Allowed {
			t.Fatalf("request %d: %+v %v", i, d, err)
		}
		if d.Tightest.Remaining != 6400-int64(i)-1 {
			t.Fatalf("request %d: remaining %d, want %d", i, d.Tightest.Remaining, 6400-i-1)
		}
		tk.Release()
	}
	if got := cc.n.Load() - before; got > 11 { // 10, and a script load at most
		t.Errorf("640 requests: %d round trips", got)
	}
	if l.fromLease.Load() != 630 || l.direct.Load() != 10 {
		t.Errorf("from leases %d, by scripts %d; want 630 and 10", l.fromLease.Load(), l.direct.Load())
	}
	l.Close()
	_, tats, err := l.peek(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	if want := 640 * l.limits[0].Interval; tats[0] != want {
		t.Fatalf("after close the TAT is %v ahead, want %v (640 requests)", time.Duration(tats[0]), time.Duration(want))
	}
}

// TestLeaseSharedAcrossInstances: three instances leasing a limit of N asking at once admit
// at most N, never less than N less one lease per instance; once they close (giving back
// their leases), exactly N in total.
func TestLeaseSharedAcrossInstances(t *testing.T) {
	const n = 1000 // leases of 15
	rdb := connect(t)
	prefix := testPrefix(t, rdb)
	c := newSimClock()
	var ls []*leasingLimiter
	for range 3 {
		cl := redis.NewClient(&redis.Options{Addr: redisAddr})
		t.Cleanup(func() { _ = cl.Close() })
		ls = append(ls, leasingFor(t, cl, prefix, perHour(n), c, LeaseOptions{Life: time.Hour}))
	}
	var admitted atomic.Int64
	ask := func(l *leasingLimiter, times int) {
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for range times {
					tk, d, err := l.AdmitContext(context.Background(), "k", 0)
					if err != nil {
						t.Error(err)
						return
					}
					if d.Allowed {
						admitted.Add(1)
						tk.Release()
					} else if d.Refused != "requests_per_hour" {
						t.Errorf("refusal %+v", d)
					}
				}
			})
		}
		wg.Wait()
	}
	var wg sync.WaitGroup
	for _, l := range ls {
		wg.Go(func() { ask(l, 150) })
	}
	wg.Wait()
	if got := admitted.Load(); got > n || got < n-3*15 {
		t.Fatalf("three leasing instances admitted %d of a limit of %d", got, n)
	}
	for _, l := range ls {
		l.Close()
	}
	for _, l := range ls {
		ask(l, 20)
	}
	if got := admitted.Load(); got != n {
		t.Fatalf("after the leases came back: %d admitted in total, want %d", got, n)
	}
}

// TestLeaseNearTheLimit: a lease that does not fit is not taken: the request alone is, so a
// limit of 128 (leases of 2) admits 128, and then refuses.
func TestLeaseNearTheLimit(t *testing.T) {
	rdb := connect(t)
	l := leasingFor(t, rdb, testPrefix(t, rdb), perHour(128), newSimClock(), LeaseOptions{Life: time.Hour})
	for i := range 129 {
		tk, d, err := l.AdmitContext(context.Background(), "k", 0)
		if err != nil || d.Allowed != (i < 128) {
			t.Fatalf("request %d: %+v %v", i, d, err)
		}
		tk.Release()
	}
}

// TestLeaseSlots: a concurrency bound of 640 (leases of 10 slots) holds over three instances
// holding every request they are admitted; what is freed is freed on Redis once the
// instances close.
func TestLeaseSlots(t *testing.T) {
	const bound = 640
	rdb := connect(t)
	prefix := testPrefix(t, rdb)
	c := newSimClock()
	p := ratelimit.Policy{Limits: perHour(1 << 20).Limits, Concurrent: bound}
	var ls []*Limiter
	for range 3 {
		cl := redis.NewClient(&redis.Options{Addr: redisAddr})
		t.Cleanup(func() { _ = cl.Close() })
		ls = append(ls, leasingFor(t, cl, prefix, p, c, LeaseOptions{Life: time.Hour}).Limiter)
	}
	ctx := context.Background()
	held := holdConcurrently(t, ls, 4, 75)
	if len(held) > bound || len(held) < bound-3*10 {
		t.Fatalf("900 held at once over three instances: %d admitted, bound %d", len(held), bound)
	}
	if n, err := ls[0].InFlight(ctx, "k"); err != nil || n > bound {
		t.Fatalf("slots held on Redis %d (%v), bound %d", n, err, bound)
	}
	for i := range held {
		held[i].Release()
	}
	for _, l := range ls {
		l.Close()
	}
	if n, err := ls[0].InFlight(ctx, "k"); err != nil || n != 0 {
		t.Fatalf("slots held on Redis after every end and close: %d (%v)", n, err)
	}
}

// TestLeaseCrashedSlotsComeBack: the slots of an instance that never ends its requests (it
// crashed) are free again after the slot TTL.
func TestLeaseCrashedSlotsComeBack(t *testing.T) {
	rdb := connect(t)
	prefix := testPrefix(t, rdb)
	c := newSimClock()
	p := ratelimit.Policy{Concurrent: 128} // leases of 2 slots
	crashed := leasingFor(t, rdb, prefix, p, c, LeaseOptions{Life: time.Hour})
	for range 128 {
		if _, d, err := crashed.AdmitContext(context.Background(), "k", 0); err != nil || !d.Allowed {
			t.Fatalf("%+v %v", d, err)
		}
	}
	crashed.leasing.closed = true // what it holds is never given back
	other := leasingFor(t, rdb, prefix, p, c, LeaseOptions{Life: time.Hour})
	if _, d, _ := other.AdmitContext(context.Background(), "k", 0); d.Allowed {
		t.Fatal("admitted beside 128 slots held")
	}
	c.advance(time.Hour + time.Second)
	for i := range 128 {
		if _, d, err := other.AdmitContext(context.Background(), "k", 0); err != nil || !d.Allowed {
			t.Fatalf("after the slot TTL, request %d: %+v %v", i, d, err)
		}
	}
}

// TestLeaseTokens: a token limit is leased as tokens for as many requests of the request's
// cost; what settled requests did not use returns to the lease and, once it is given back,
// to Redis: the caller's token limit stands where the tokens used leave it.
func TestLeaseTokens(t *testing.T) {
	rdb := connect(t)
	c := newSimClock()
	p := ratelimit.Policy{Limits: []ratelimit.Limit{
		{Name: "requests_per_minute", Quota: 64000, Window: time.Minute},
		{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 64_000_000, Window: time.Minute},
	}}
	l := leasingFor(t, rdb, testPrefix(t, rdb), p, c, LeaseOptions{Life: time.Hour})
	ctx := context.Background()
	var used int64
	for i := range 500 {
		tk, d, err := l.AdmitContext(ctx, "k", 1000)
		if err != nil || !d.Allowed {
			t.Fatalf("request %d: %+v %v", i, d, err)
		}
		switch i % 3 {
		case 0:
			tk.Settle(100)
			used += 100
		case 1:
			tk.Settle(1500) // a debt
			used += 1500
		default:
			tk.Cancel()
		}
	}
	if l.direct.Load() > 20 {
		t.Errorf("500 requests: %d scripts", l.direct.Load())
	}
	l.Close()
	_, tats, err := l.peek(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	requests := int64(500 - 500/3) // the cancelled ones gave their request back
	if want := requests * l.limits[0].Interval; tats[0] != want {
		t.Errorf("requests' TAT %v ahead, want %v", time.Duration(tats[0]), time.Duration(want))
	}
	if want := used * l.limits[1].Interval; tats[1] != want {
		t.Errorf("tokens' TAT %v ahead, want %v (%d tokens used)", time.Duration(tats[1]), time.Duration(want), used)
	}
}

// TestLeaseSweep: what a lease leaves is given back when no request comes, within two lives
// of its taking (its life, then the sweep that runs every life; five allowed here for a loaded
// machine), and the lease is then forgotten.
func TestLeaseSweep(t *testing.T) {
	const life = 200 * time.Millisecond
	rdb := connect(t)
	l := leasingFor(t, rdb, testPrefix(t, rdb), ratelimit.Policy{Limits: perHour(6400).Limits, Concurrent: 6400},
		newSimClock(), LeaseOptions{Life: life})
	ctx := context.Background()
	tk, _, err := l.AdmitContext(ctx, "k", 0)
	if err != nil {
		t.Fatal(err)
	}
	tk.Release()
	taken := time.Now()
	for {
		slots, tats, err := l.peek(ctx, "k")
		if err != nil {
			t.Fatal(err)
		}
		if slots == 0 && tats[0] == l.limits[0].Interval {
			break
		}
		if time.Since(taken) > 5*life {
			t.Fatalf("%s after one request: %d slots held, TAT %v ahead", time.Since(taken), slots, time.Duration(tats[0]))
		}
		time.Sleep(10 * time.Millisecond)
	}
	for { // forgotten by the sweep after
		empty := true
		l.leasing.leases.Range(func(any, any) bool { empty = false; return false })
		if empty {
			break
		}
		if time.Since(taken) > 10*life {
			t.Fatalf("%s after one request, its lease given back, not yet forgotten", time.Since(taken))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestLeaseHub: a key's and its user's admissions through a hub, both leased, are a round
// trip only when one of them needs a new lease.
func TestLeaseHub(t *testing.T) {
	rdb := connect(t)
	var cc commandCounter
	rdb.AddHook(&cc)
	h := NewHub(rdb, HubOptions{})
	defer h.Close()
	c := newSimClock()
	mk := func() *leasingLimiter {
		l := leasingFor(t, rdb, testPrefix(t, rdb), ratelimit.Policy{Limits: perHour(6400).Limits, Concurrent: 6400}, c, LeaseOptions{Life: time.Hour})
		l.hub = h
		return l
	}
	keyL, userL := mk(), mk()
	before := cc.n.Load()
	for i := range 640 {
		tks, ds, err := AdmitEach(context.Background(), Call{keyL.Limiter, "k", 0}, Call{userL.Limiter, "u", 0})
		if err != nil || !ds[0].Allowed || !ds[1].Allowed {
			t.Fatalf("request %d: %+v %v", i, ds, err)
		}
		tks[0].Settle(0)
		tks[1].Settle(0)
	}
	if got := cc.n.Load() - before; got > 12 {
		t.Errorf("640 requests of one key and user: %d round trips", got)
	}
}

// TestLeaseSlotsInUseRenewed: a leased slot in use does not expire while its instance lives
// (the sweep gives it a new expiry), however long its request: three slot TTLs later the
// bound still counts it.
func TestLeaseSlotsInUseRenewed(t *testing.T) {
	rdb := connect(t)
	prefix := testPrefix(t, rdb)
	p := ratelimit.Policy{Concurrent: 128} // leases of 2 slots
	mk := func() *leasingLimiter {
		l := leasingFor(t, rdb, prefix, p, nil, LeaseOptions{Life: 20 * time.Millisecond})
		l.slotTTL = 300 * time.Millisecond
		l.scripts = newScripts(l.Limiter)
		return l
	}
	a, b := mk(), mk()
	ctx := context.Background()
	var held []ratelimit.Ticket
	for range 128 {
		tk, d, err := a.AdmitContext(ctx, "k", 0)
		if err != nil || !d.Allowed {
			t.Fatalf("%+v %v", d, err)
		}
		held = append(held, tk)
	}
	time.Sleep(time.Second)
	if _, d, err := b.AdmitContext(ctx, "k", 0); err != nil || d.Allowed {
		t.Fatalf("three slot TTLs on, beside 128 slots in use: %+v %v", d, err)
	}
	for i := range held {
		held[i].Release()
	}
	a.Close()
	if tk, d, err := b.AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
		t.Fatalf("after the releases: %+v %v", d, err)
	} else {
		tk.Release()
	}
}

// TestLeaseWithoutRedis: with Redis gone, a caller's lease is spent here for at most its life;
// then its requests need Redis, and fail (nothing taken).
func TestLeaseWithoutRedis(t *testing.T) {
	const life = 300 * time.Millisecond
	rdb := connect(t)
	cl := redis.NewClient(&redis.Options{Addr: redisAddr})
	l := leasingFor(t, cl, testPrefix(t, rdb), perHour(6400), nil, LeaseOptions{Life: life})
	ctx := context.Background()
	if _, d, err := l.AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
		t.Fatalf("%+v %v", d, err)
	}
	taken := time.Now()
	_ = cl.Close() // Redis unreachable from now on
	if _, d, err := l.AdmitContext(ctx, "k", 0); err != nil || !d.Allowed {
		t.Fatalf("within the lease's life, without Redis: %+v %v", d, err)
	}
	time.Sleep(time.Until(taken.Add(life)))
	if _, d, err := l.AdmitContext(ctx, "k", 0); err == nil {
		t.Fatalf("after the lease's life, without Redis: %+v admitted", d)
	}
}
