package redislimit

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// hubbed is a limiter for p on the hub, on the simulated clock c (as simulated).
func hubbed(t *testing.T, h *Hub, p ratelimit.Policy, c *simClock) *Limiter {
	t.Helper()
	l := simulated(t, connect(t), p, c)
	l.rdb, l.hub = h.rdb, h
	return l
}

// TestHubRoundTrips: through a hub, a key's and its user's admissions are one round trip;
// their ends are none at once, and ride with the next admission, before it (the slot they
// free is free for it); ends with nothing to ride with go on their own after the delay, and
// Close sends what is queued.
func TestHubRoundTrips(t *testing.T) {
	rdb := connect(t)
	var cc commandCounter
	rdb.AddHook(&cc)
	ctx := context.Background()
	h := NewHub(rdb, HubOptions{FinishDelay: time.Hour}) // never on its own here
	one := tierPolicy()
	one.Concurrent = 1
	prefix := testPrefix(t, rdb)
	keyL, err := New(rdb, one, Options{Prefix: prefix + "key:", Hub: h})
	if err != nil {
		t.Fatal(err)
	}
	userL, err := New(rdb, tierPolicy(), Options{Prefix: prefix + "user:", Hub: h})
	if err != nil {
		t.Fatal(err)
	}
	// Warm: the scripts loaded.
	tks, _, err := AdmitEach(ctx, Call{keyL, "k", 10}, Call{userL, "u", 10})
	if err != nil {
		t.Fatal(err)
	}
	tks[0].Settle(5)
	tks[1].Settle(5)
	h.flush()

	count := func(what string, want int64, f func()) {
		t.Helper()
		before := cc.n.Load()
		f()
		if got := cc.n.Load() - before; got != want {
			t.Fatalf("%s: %d round trips, want %d", what, got, want)
		}
	}
	count("a key's and its user's admissions", 1, func() {
		tks, ds, err := AdmitEach(ctx, Call{keyL, "k", 500}, Call{userL, "u", 500})
		if err != nil || !ds[0].Allowed || !ds[1].Allowed {
			t.Fatal(ds, err)
		}
		count("their ends", 0, func() {
			tks[0].Settle(300)
			tks[1].Settle(300)
		})
	})
	count("the next admissions, with the ends", 1, func() {
		// The key's one slot was freed by the end riding before this admission.
		tks, ds, err := AdmitEach(ctx, Call{keyL, "k", 500}, Call{userL, "u", 500})
		if err != nil || !ds[0].Allowed || !ds[1].Allowed {
			t.Fatalf("after the ends: %+v %v", ds, err)
		}
		tks[0].Release()
		tks[1].Release()
	})
	count("one admission, with the ends", 1, func() {
		tk, d, err := keyL.AdmitContext(ctx, "k", 0)
		if err != nil || !d.Allowed {
			t.Fatalf("%+v %v", d, err)
		}
		tk.Cancel()
	})
	count("Close sends what is queued", 1, h.Close)
	if n, err := keyL.InFlight(ctx, "k"); err != nil || n != 0 {
		t.Fatalf("after Close %d slots held (%v), want 0", n, err)
	}
	count("an end after Close goes at once", 1, func() {
		tk, _, _ := keyL.AdmitContext(ctx, "k", 0)
		before := cc.n.Load()
		tk.Cancel()
		if cc.n.Load() == before {
			t.Fatal("the end after Close was not sent")
		}
		cc.n.Add(-1) // count only the admission
	})
}

// TestHubDelaysEnds: an end queued on a hub is not seen by another instance until it is
// sent, and is sent on its own after the hub's delay when no admission takes it.
func TestHubDelaysEnds(t *testing.T) {
	rdb := connect(t)
	ctx := context.Background()
	h := NewHub(rdb, HubOptions{FinishDelay: 300 * time.Millisecond})
	t.Cleanup(h.Close)
	one := tierPolicy()
	one.Concurrent = 1
	prefix := testPrefix(t, rdb)
	here, err := New(rdb, one, Options{Prefix: prefix, Hub: h})
	if err != nil {
		t.Fatal(err)
	}
	other, err := New(connect(t), one, Options{Prefix: prefix}) // another instance, no hub
	if err != nil {
		t.Fatal(err)
	}
	tk, d, err := here.AdmitContext(ctx, "k", 0)
	if err != nil || !d.Allowed {
		t.Fatal(d, err)
	}
	start := time.Now()
	tk.Release()
	if _, d, err := other.AdmitContext(ctx, "k", 0); err != nil || d.Allowed {
		if time.Since(start) < 300*time.Millisecond { // else the end may have gone: no finding
			t.Fatalf("the other instance was admitted before the end was sent: %+v %v", d, err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		tk, d, err := other.AdmitContext(ctx, "k", 0)
		if err == nil && d.Allowed {
			tk.Release()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the queued end was not sent on its own within 5 s: %+v %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHubSameState: a sequence of admissions and ends through a hub leaves the same state in
// Redis as the same sequence without one (same simulated clock), with the scripts flushed
// from Redis in the middle: an end queued when Redis lost its script is applied once.
func TestHubSameState(t *testing.T) {
	rdb := connect(t)
	ctx := context.Background()
	c := newSimClock()
	h := NewHub(rdb, HubOptions{FinishDelay: time.Hour})
	t.Cleanup(h.Close)
	with := hubbed(t, h, tightPolicy(), c)
	without := simulated(t, rdb, tightPolicy(), c)
	step := func(i int) {
		var tw, to ratelimit.Ticket
		var dw, do ratelimit.Decision
		var err error
		if i%2 == 0 {
			var tks []ratelimit.Ticket
			var ds []ratelimit.Decision
			tks, ds, err = AdmitEach(ctx, Call{with, "k", int64(40 * i)})
			if err == nil {
				tw, dw = tks[0], ds[0]
			}
		} else {
			tw, dw, err = with.AdmitContext(ctx, "k", int64(40*i))
		}
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		to, do, err = without.AdmitContext(ctx, "k", int64(40*i))
		if err != nil {
			t.Fatal(err)
		}
		if dw.Allowed != do.Allowed || dw.Refused != do.Refused {
			t.Fatalf("step %d: with a hub %+v, without %+v", i, dw, do)
		}
		if i%3 != 2 { // some tickets held across steps
			tw.Settle(int64(10 * i))
			to.Settle(int64(10 * i))
		}
		c.advance(time.Duration(i%4) * 150 * time.Millisecond)
	}
	for i := range 30 {
		if i == 16 { // step 15 queued an end: it meets the lost script
			if err := rdb.ScriptFlush(ctx).Err(); err != nil {
				t.Fatal(err)
			}
		}
		step(i)
	}
	h.flush()
	a, b := dump(t, rdb, with, "k"), dump(t, rdb, without, "k")
	strip := func(m map[string]string, l *Limiter) map[string]string {
		out := map[string]string{}
		for k, v := range m {
			out[strings.TrimPrefix(k, l.prefix)] = v
		}
		return out
	}
	sa, sb := strip(a, with), strip(b, without)
	// Slot members are random ticket ids: compare their number, and every TAT.
	slots := func(m map[string]string) (n int) {
		for k := range m {
			if !strings.Contains(k, "{k}") {
				n++
			}
		}
		return n
	}
	if slots(sa) != slots(sb) {
		t.Fatalf("slots held: with a hub %d, without %d", slots(sa), slots(sb))
	}
	for k, v := range sb {
		if strings.Contains(k, "{k}") && sa[k] != v {
			t.Errorf("%s: with a hub %s, without %s", k, sa[k], v)
		}
	}
}

// TestAdmitEachMixedHubs: limiters on different hubs cannot be admitted together.
func TestAdmitEachMixedHubs(t *testing.T) {
	rdb := connect(t)
	a, _ := New(rdb, tierPolicy(), Options{Prefix: testPrefix(t, rdb), Hub: NewHub(rdb, HubOptions{})})
	b, _ := New(rdb, tierPolicy(), Options{Prefix: testPrefix(t, rdb), Hub: NewHub(rdb, HubOptions{})})
	if _, _, err := AdmitEach(context.Background(), Call{a, "k", 1}, Call{b, "k", 1}); err == nil {
		t.Fatal("admitted under two hubs together")
	}
}

// TestHubEndMeetsLostScript: an end queued on a hub when Redis has lost the scripts (a
// restart, SCRIPT FLUSH) is applied once, as the same end without a hub: same state after.
func TestHubEndMeetsLostScript(t *testing.T) {
	rdb := connect(t)
	ctx := context.Background()
	c := newSimClock()
	h := NewHub(rdb, HubOptions{FinishDelay: time.Hour})
	t.Cleanup(h.Close)
	with := hubbed(t, h, tierPolicy(), c)
	without := simulated(t, rdb, tierPolicy(), c)
	for _, l := range []*Limiter{with, without} {
		tk, d, err := l.AdmitContext(ctx, "k", 5000)
		if err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
		tk.Settle(1000) // 4,000 tokens given back: queued on the hub
	}
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	for _, l := range []*Limiter{with, without} {
		tk, d, err := l.AdmitContext(ctx, "k", 0) // with the hub's end, which meets NOSCRIPT
		if err != nil || !d.Allowed {
			t.Fatal(d, err)
		}
		tk.Cancel()
	}
	h.flush()
	a, b := dump(t, rdb, with, "k"), dump(t, rdb, without, "k")
	for k, v := range b {
		if !strings.HasPrefix(k, without.prefix) {
			continue // a slot (none should be left)
		}
		if got := a[with.prefix+strings.TrimPrefix(k, without.prefix)]; got != v {
			t.Errorf("%s: with a hub %s, without %s", strings.TrimPrefix(k, without.prefix), got, v)
		}
	}
	if len(a) != len(b) {
		t.Errorf("with a hub %v, without %v", a, b)
	}
}

// TestHubGroupsAdmissions: admissions arriving while a pipeline is on the wire go together
// in the next one (fewer round trips than requests), and decide as one after the other: of
// 200 concurrent requests under a limit of 10 a minute and a bound of 5 slots, exactly 5 are
// admitted, then none while they are held; a caller whose context is cancelled takes the
// others' admissions down with it no more than it would alone.
func TestHubGroupsAdmissions(t *testing.T) {
	rdb := connect(t)
	var cc commandCounter
	rdb.AddHook(&cc)
	h := NewHub(rdb, HubOptions{FinishDelay: time.Hour})
	t.Cleanup(h.Close)
	p := ratelimit.Policy{Limits: []ratelimit.Limit{
		{Name: "requests_per_minute", Quota: 10, Window: time.Minute, Burst: 10},
	}, Concurrent: 5}
	prefix := testPrefix(t, rdb)
	keyL, err := New(rdb, p, Options{Prefix: prefix + "key:", Hub: h})
	if err != nil {
		t.Fatal(err)
	}
	userL, err := New(rdb, tierPolicy(), Options{Prefix: prefix + "user:", Hub: h})
	if err != nil {
		t.Fatal(err)
	}
	// Warm: the scripts loaded.
	tks, _, err := AdmitEach(context.Background(), Call{keyL, "warm", 1}, Call{userL, "warm", 1})
	if err != nil {
		t.Fatal(err)
	}
	tks[0].Release()
	tks[1].Release()
	h.flush()

	const n = 200
	start := make(chan struct{})
	type result struct {
		tks []ratelimit.Ticket
		ds  []ratelimit.Decision
		err error
	}
	results := make(chan result, n)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	before := cc.n.Load()
	for i := range n {
		go func() {
			<-start
			ctx := context.Background()
			if i%10 == 3 {
				ctx = cancelled // a caller gone before its admission is sent
			}
			tks, ds, err := AdmitEach(ctx, Call{keyL, "k", 1}, Call{userL, "u", 1})
			results <- result{tks, ds, err}
		}()
	}
	close(start)
	admitted, refused, failed := 0, 0, 0
	var held []ratelimit.Ticket
	for range n {
		r := <-results
		switch {
		case r.err != nil:
			failed++
		case r.ds[0].Allowed && r.ds[1].Allowed:
			admitted++
			held = append(held, r.tks...)
		default:
			refused++
			for _, tk := range r.tks {
				tk.Cancel()
			}
		}
	}
	trips := cc.n.Load() - before
	t.Logf("%d requests: %d admitted, %d refused, %d failed, in %d round trips", n, admitted, refused, failed, trips)
	if admitted != 5 || failed != 0 {
		t.Fatalf("%d admitted (want the 5 slots), %d failed (want 0: a cancelled caller's admission is sent all the same)", admitted, failed)
	}
	if trips >= n {
		t.Fatalf("%d round trips for %d concurrent requests: not grouped", trips, n)
	}
	if got, err := keyL.InFlight(context.Background(), "k"); err != nil || got != 5 {
		t.Fatalf("%d slots held (%v), want 5", got, err)
	}
	for _, tk := range held {
		tk.Release()
	}
	h.flush()
	if got, err := keyL.InFlight(context.Background(), "k"); err != nil || got != 0 {
		t.Fatalf("%d slots held after the ends (%v), want 0", got, err)
	}
	// The minute's other 5 requests, then the limit.
	ok := 0
	for range 8 {
		tk, d, err := keyL.AdmitContext(context.Background(), "k", 0)
		if err != nil {
			t.Fatal(err)
		}
		if d.Allowed {
			ok++
			tk.Release()
		}
	}
	if ok != 5 {
		t.Fatalf("after the grouped requests, %d of 8 admitted, want the 5 left of 10 a minute", ok)
	}
}

// TestHubFoldsEnds: a caller's end queued on the hub and its next admission are one script
// call, and leave the state the same end and admission leave as two calls without a hub
// (the slot it frees free for the admission, its tokens given back first); an end of
// another caller rides as a script of its own; a refused admission keeps the ends folded
// into it.
func TestHubFoldsEnds(t *testing.T) {
	rdb := connect(t)
	sc := commandCounter{each: true}
	rdb.AddHook(&sc)
	ctx := context.Background()
	c := newSimClock()
	h := NewHub(rdb, HubOptions{FinishDelay: time.Hour})
	t.Cleanup(h.Close)
	one := tightPolicy()
	one.Concurrent = 1
	with := hubbed(t, h, one, c)
	without := simulated(t, rdb, one, c)
	admit := func(l *Limiter, key string, tokens int64) (ratelimit.Ticket, ratelimit.Decision) {
		t.Helper()
		tk, d, err := l.AdmitContext(ctx, key, tokens)
		if err != nil {
			t.Fatal(err)
		}
		return tk, d
	}
	// Warm: the scripts loaded.
	tk, _ := admit(with, "warm", 0)
	tk.Release()
	h.flush()
	tkW, dW := admit(with, "k", 200)
	tkO, dO := admit(without, "k", 200)
	if !dW.Allowed || !dO.Allowed {
		t.Fatal(dW, dO)
	}
	other, _ := admit(with, "other", 10)
	tkW.Settle(50)
	tkO.Settle(50)
	other.Settle(5)
	before := sc.n.Load()
	tkW, dW = admit(with, "k", 200) // the one slot: free only if the end came first
	if got := sc.n.Load() - before; got != 2 {
		t.Fatalf("%d scripts for two ends (one folded) and an admission, want 2", got)
	}
	tkO, dO = admit(without, "k", 200)
	if !dW.Allowed || !dO.Allowed {
		t.Fatalf("after the end: with a hub %+v, without %+v", dW, dO)
	}
	// A refused admission (too many tokens for the minute) keeps the end folded into it.
	tkW.Cancel()
	tkO.Cancel()
	if _, d := admit(with, "k", 900); d.Allowed {
		t.Fatal("admitted 900 tokens beside 200 of 1000 a minute")
	}
	if _, d := admit(without, "k", 900); d.Allowed {
		t.Fatal("admitted 900 tokens beside 200 of 1000 a minute, without a hub")
	}
	a, b := dump(t, rdb, with, "k"), dump(t, rdb, without, "k")
	if len(a) != 1 || len(b) != 1 {
		t.Fatalf("keys and slots left: with a hub %v, without %v", a, b)
	}
	for k, v := range b {
		if got := a[with.prefix+strings.TrimPrefix(k, without.prefix)]; got != v {
			t.Fatalf("with a hub %v, without %v", a, b)
		}
	}
}

// slowPipelines delays every pipeline by d before it is sent.
type slowPipelines struct{ d time.Duration }

func (s slowPipelines) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (s slowPipelines) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (s slowPipelines) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		time.Sleep(s.d)
		return next(ctx, cmds)
	}
}

// TestHubCloseWaitsForTimer: Close returns only once an end that its delay's timer is
// sending has been applied.
func TestHubCloseWaitsForTimer(t *testing.T) {
	rdb := connect(t)
	rdb.AddHook(slowPipelines{d: 50 * time.Millisecond})
	one := ratelimit.Policy{Limits: []ratelimit.Limit{
		{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 1000000, Window: time.Minute},
	}, Concurrent: 1}
	prefix := testPrefix(t, rdb)
	h := NewHub(rdb, HubOptions{FinishDelay: time.Millisecond})
	l, err := New(rdb, one, Options{Prefix: prefix, Hub: h})
	if err != nil {
		t.Fatal(err)
	}
	tk, d, err := l.AdmitContext(context.Background(), "k", 0)
	if err != nil || !d.Allowed {
		t.Fatalf("%+v %v", d, err)
	}
	tk.Release()
	time.Sleep(10 * time.Millisecond) // the timer has fired: its pipeline is being sent
	h.Close()
	if n, err := l.InFlight(context.Background(), "k"); err != nil || n != 0 {
		t.Fatalf("%d slots held after Close (%v), want 0", n, err)
	}
}
