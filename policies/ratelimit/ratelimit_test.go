package ratelimit

import (
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"
)

// clock is a simulated clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Unix(1_800_000_000, 0)} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestGreedyClientAdmittedExactly: a client that asks all the time is admitted exactly
// burst + ⌊t/T⌋ units by every checkpoint, over a simulated hour or day, for every limit kind.
func TestGreedyClientAdmittedExactly(t *testing.T) {
	tests := []struct {
		name  string
		limit Limit
		cost  int64         // tokens per request (token limits)
		span  time.Duration // simulated time
		step  time.Duration // between checkpoints, at most the burst's refill time
	}{
		{"burst_per_second", Limit{Name: "burst_per_second", Quota: 10, Window: time.Second, Burst: 10}, 0, time.Hour, 500 * time.Millisecond},
		{"requests_per_minute", Limit{Name: "requests_per_minute", Quota: 60, Window: time.Minute, Burst: 10}, 0, 24 * time.Hour, 3 * time.Second},
		{"requests_per_minute_no_burst", Limit{Name: "requests_per_minute", Quota: 300, Window: time.Minute, Burst: 1}, 0, time.Hour, 200 * time.Millisecond},
		{"requests_per_hour", Limit{Name: "requests_per_hour", Quota: 1000, Window: time.Hour, Burst: 60}, 0, 24 * time.Hour, 10 * time.Second},
		{"requests_per_day", Limit{Name: "requests_per_day", Quota: 10000, Window: 24 * time.Hour, Burst: 1000}, 0, 7 * 24 * time.Hour, time.Minute},
		{"tokens_per_minute", Limit{Name: "tokens_per_minute", Unit: Tokens, Quota: 100000, Window: time.Minute}, 1000, time.Hour, time.Second},
		{"tokens_per_minute_unit_cost", Limit{Name: "tokens_per_minute", Unit: Tokens, Quota: 6000, Window: time.Minute, Burst: 500}, 1, time.Hour, 2 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			l, err := New(Policy{Limits: []Limit{tt.limit}}, c.now)
			if err != nil {
				t.Fatal(err)
			}
			burst := tt.limit.Burst
			if burst == 0 {
				burst = tt.limit.Quota
			}
			interval := int64(tt.limit.Window) / tt.limit.Quota
			n := max(tt.cost, 1)
			var admitted int64
			for elapsed := time.Duration(0); elapsed <= tt.span; elapsed += tt.step {
				for {
					tk, d := l.Admit("k", tt.cost)
					if !d.Allowed {
						if d.RetryAfter <= 0 || d.Refused != tt.limit.Name {
							t.Fatalf("at %v: refused by %q with retry after %v", elapsed, d.Refused, d.RetryAfter)
						}
						break
					}
					tk.Release()
					admitted++
				}
				want := (burst + int64(elapsed)/interval) / n
				if admitted != want {
					t.Fatalf("at %v: admitted %d, want burst + rate × time = %d", elapsed, admitted, want)
				}
				c.advance(tt.step)
			}
		})
	}
}

// TestNoWindowEdgeDoubles: in any window of the limit's length, a greedy client gets at
// most burst + quota, never twice the quota as across a fixed window's edge.
func TestNoWindowEdgeDoubles(t *testing.T) {
	c := newClock()
	l, _ := New(Policy{Limits: []Limit{{Name: "requests_per_minute", Quota: 60, Window: time.Minute, Burst: 10}}}, c.now)
	var times []time.Time
	for range 3 * 60 * 10 { // three minutes in steps of 100 ms
		for {
			tk, d := l.Admit("k", 0)
			if !d.Allowed {
				break
			}
			tk.Release()
			times = append(times, c.now())
		}
		c.advance(100 * time.Millisecond)
	}
	for i := range times {
		n := 0
		for j := i; j < len(times) && times[j].Sub(times[i]) < time.Minute; j++ {
			n++
		}
		if n > 10+60 {
			t.Fatalf("%d admitted in the minute from %v", n, times[i])
		}
	}
}

// TestRetryAfterAccurate: a refused request passes exactly when RetryAfter says, not before.
func TestRetryAfterAccurate(t *testing.T) {
	c := newClock()
	l, _ := New(Policy{Limits: []Limit{
		{Name: "requests_per_minute", Quota: 6, Window: time.Minute, Burst: 2},
		{Name: "requests_per_hour", Quota: 20, Window: time.Hour, Burst: 6},
	}}, c.now)
	for i := range 100 {
		tk, d := l.Admit("k", 0)
		if d.Allowed {
			tk.Release()
			continue
		}
		if d.RetryAfter <= 0 {
			t.Fatalf("request %d: refused by %s without a wait", i, d.Refused)
		}
		c.advance(d.RetryAfter - time.Nanosecond)
		if _, d2 := l.Admit("k", 0); d2.Allowed {
			t.Fatalf("request %d: admitted before RetryAfter %v", i, d.RetryAfter)
		}
		c.advance(time.Nanosecond)
		tk, d2 := l.Admit("k", 0)
		if !d2.Allowed {
			t.Fatalf("request %d: refused by %s at RetryAfter %v", i, d2.Refused, d.RetryAfter)
		}
		tk.Release()
	}
}

func tierPolicy() Policy {
	return Policy{Limits: []Limit{
		{Name: "burst_per_second", Quota: 10, Window: time.Second, Burst: 10},
		{Name: "requests_per_minute", Quota: 60, Window: time.Minute, Burst: 10},
		{Name: "requests_per_hour", Quota: 1000, Window: time.Hour, Burst: 60},
		{Name: "requests_per_day", Quota: 10000, Window: 24 * time.Hour, Burst: 1000},
		{Name: "tokens_per_minute", Unit: Tokens, Quota: 100000, Window: time.Minute},
	}, Concurrent: 5}
}

// TestRefusalTakesNothing: a request refused by one limit leaves every other limit as it was.
func TestRefusalTakesNothing(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(l *Limiter) // brings one limit to refusal
		tokens  int64
		refused string
	}{
		{"per_minute", func(l *Limiter) {
			for range 10 {
				tk, _ := l.Admit("k", 0)
				tk.Release()
			}
		}, 0, "requests_per_minute"},
		{"tokens", func(l *Limiter) {
			tk, _ := l.Admit("k", 99000)
			tk.Release()
		}, 5000, "tokens_per_minute"},
		{"too_large", func(l *Limiter) {
			tk, _ := l.Admit("k", 10)
			tk.Release()
		}, 200000, "tokens_per_minute"},
		{"concurrent", func(l *Limiter) {
			for range 5 {
				l.Admit("k", 0) // held
			}
		}, 0, ConcurrentLimit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			l, _ := New(tierPolicy(), c.now)
			tt.prepare(l)
			before := *l.shard("k").m["k"]
			_, d := l.Admit("k", tt.tokens)
			if d.Allowed || d.Refused != tt.refused {
				t.Fatalf("decision %+v, want refused by %s", d, tt.refused)
			}
			if after := *l.shard("k").m["k"]; after != before {
				t.Fatalf("a refusal changed the state:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
}

// TestCancelGivesEverythingBack: a request admitted then cancelled (refused by credits) is as
// if it had never been.
func TestCancelGivesEverythingBack(t *testing.T) {
	c := newClock()
	l, _ := New(tierPolicy(), c.now)
	tk, _ := l.Admit("k", 10)
	tk.Release()
	before := *l.shard("k").m["k"]
	tk, d := l.Admit("k", 5000)
	if !d.Allowed {
		t.Fatal(d)
	}
	tk.Cancel()
	tk.Cancel()
	tk.Release()
	if after := *l.shard("k").m["k"]; after != before {
		t.Fatalf("cancel left\n%+v, want\n%+v", after, before)
	}
}

// TestSettleCorrectsTokens: the tokens reserved from the bound are corrected by the usage.
func TestSettleCorrectsTokens(t *testing.T) {
	c := newClock()
	l, _ := New(Policy{Limits: []Limit{{Name: "tokens_per_minute", Unit: Tokens, Quota: 1000, Window: time.Minute}}}, c.now)
	tk, _ := l.Admit("k", 900)
	tk.Settle(100) // 800 given back: 900 left
	tk, d := l.Admit("k", 900)
	if !d.Allowed {
		t.Fatalf("refused after settle: %+v", d)
	}
	tk.Settle(950) // 50 more than reserved: 1000 - 100 - 950 < 0
	if _, d := l.Admit("k", 1); d.Allowed {
		t.Fatal("admitted beyond the usage")
	}
}

// TestConcurrency: C admitted, the C+1th refused, a slot freed by any ending lets one more in.
func TestConcurrency(t *testing.T) {
	l, _ := New(Policy{Concurrent: 3}, nil)
	var held []Ticket
	for range 3 {
		tk, d := l.Admit("k", 0)
		if !d.Allowed {
			t.Fatal(d)
		}
		held = append(held, tk)
	}
	if _, d := l.Admit("k", 0); d.Allowed || d.Refused != ConcurrentLimit || d.RetryAfter != time.Second {
		t.Fatalf("4th: %+v", d)
	}
	if _, d := l.Admit("other", 0); !d.Allowed {
		t.Fatal("another key refused")
	}
	held[0].Release()
	held[1].Settle(0)
	held[2].Cancel()
	if n := l.InFlight("k"); n != 0 {
		t.Fatalf("in flight %d", n)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	admitted := 0
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, d := l.Admit("k", 0); d.Allowed {
				mu.Lock()
				admitted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if admitted != 3 {
		t.Fatalf("20 at once: %d admitted, want 3", admitted)
	}
}

func TestTightestAndPeek(t *testing.T) {
	c := newClock()
	l, _ := New(Policy{Limits: []Limit{
		{Name: "requests_per_minute", Quota: 60, Window: time.Minute, Burst: 10},
		{Name: "requests_per_hour", Quota: 100, Window: time.Hour, Burst: 60},
	}}, c.now)
	if s := l.Peek("k"); !s.OK() || s.Limit.Name != "requests_per_minute" || s.Remaining != 10 || s.Reset != 0 {
		t.Fatalf("fresh: %+v", s)
	}
	tk, d := l.Admit("k", 0)
	tk.Release()
	s := d.Tightest
	if s.Limit.Name != "requests_per_minute" || s.Remaining != 9 || s.Reset != time.Second {
		t.Fatalf("after one: %+v", s)
	}
}

func TestSweepForgetsIdleKeys(t *testing.T) {
	c := newClock()
	l, _ := New(Policy{Limits: []Limit{{Name: "requests_per_minute", Quota: 60, Window: time.Minute}}}, c.now)
	for i := range 1000 {
		tk, _ := l.Admit(strconv.Itoa(i), 0)
		tk.Release()
	}
	held, _ := l.Admit("held", 0)
	c.advance(2 * time.Minute)
	for i := range 1000 {
		tk, _ := l.Admit("new"+strconv.Itoa(i), 0)
		tk.Release()
	}
	total := 0
	for i := range l.shards {
		total += len(l.shards[i].m)
	}
	if total > 1000+1 {
		t.Fatalf("%d keys kept", total)
	}
	if l.InFlight("held") != 1 {
		t.Fatal("a key in flight was forgotten")
	}
	held.Release()
}

func TestNewRejects(t *testing.T) {
	bad := []Policy{
		{Limits: []Limit{{Name: "x", Quota: 0, Window: time.Second}}},
		{Limits: []Limit{{Name: "x", Quota: 1, Window: 0}}},
		{Limits: []Limit{{Name: "x", Quota: 1, Window: time.Second, Burst: -1}}},
		{Limits: make([]Limit, MaxLimits+1)},
		{Concurrent: -1},
	}
	for i, p := range bad {
		if _, err := New(p, nil); err == nil {
			t.Errorf("policy %d accepted", i)
		}
	}
}

// BenchmarkAdmission is the admission step alone: Admit and Release with a tier's five
// limits and a concurrency bound, on one key and on many keys in parallel.
func BenchmarkAdmission(b *testing.B) {
	b.Run("one_key", func(b *testing.B) {
		l, _ := New(tierPolicy(), nil)
		l.concurrent = 0
		// Quotas large enough never to refuse.
		for i := range l.limits {
			l.limits[i].Tolerance = 1 << 60
		}
		b.ReportAllocs()
		for b.Loop() {
			tk, _ := l.Admit("k_0123456789", 500)
			tk.Settle(300)
		}
	})
	b.Run("many_keys_parallel", func(b *testing.B) {
		l, _ := New(tierPolicy(), nil)
		for i := range l.limits {
			l.limits[i].Tolerance = 1 << 60
		}
		keys := make([]string, 10000)
		for i := range keys {
			keys[i] = fmt.Sprintf("k_%010d", i)
		}
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				tk, _ := l.Admit(keys[i%len(keys)], 500)
				tk.Settle(300)
				i++
			}
		})
	})
}

type finishCall struct {
	used   int64
	cancel bool
}

type recordingFinisher struct{ calls []finishCall }

func (f *recordingFinisher) Finish(used int64, cancel bool) {
	f.calls = append(f.calls, finishCall{used, cancel})
}

// TestRemoteTicket: a ticket of another Admitter is admitted until its first ending, which
// alone reaches the Finisher, with what Settle, Cancel or Release mean.
func TestRemoteTicket(t *testing.T) {
	tests := []struct {
		name string
		end  func(tk *Ticket)
		want finishCall
	}{
		{"settle", func(tk *Ticket) { tk.Settle(30) }, finishCall{30, false}},
		{"settle_negative", func(tk *Ticket) { tk.Settle(-5) }, finishCall{0, false}},
		{"release", func(tk *Ticket) { tk.Release() }, finishCall{100, false}},
		{"cancel", func(tk *Ticket) { tk.Cancel() }, finishCall{0, true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &recordingFinisher{}
			tk := NewTicket(f, 100)
			if !tk.Admitted() {
				t.Fatal("a new ticket is not admitted")
			}
			tt.end(&tk)
			tk.Settle(1)
			tk.Cancel()
			tk.Release()
			if len(f.calls) != 1 || f.calls[0] != tt.want {
				t.Fatalf("finish calls %+v, want one %+v", f.calls, tt.want)
			}
			if tk.Admitted() {
				t.Fatal("an ended ticket is still admitted")
			}
		})
	}
	var zero Ticket
	zero.Settle(1) // a ticket never admitted ends without effect
	if zero.Admitted() {
		t.Fatal("the zero ticket is admitted")
	}
}
