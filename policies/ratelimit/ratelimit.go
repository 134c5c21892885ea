// Package ratelimit decides whether a request may pass a set of rate limits: exact GCRA
// (generic cell rate algorithm) limits on requests and on tokens over any window, and a limit
// on concurrent requests, all admitted together or not at all.
//
// A Limit of Quota per Window with a Burst admits, from a full state, Burst at once and then
// one unit every Window/Quota (the emission interval T): a greedy client that asks all the
// time is admitted exactly Burst + ⌊t/T⌋ units in its first t, and in any interval of length t
// at most Burst + ⌊t/T⌋ (no window edge doubles a quota, as fixed windows do). The state of
// one limit is one number, its theoretical arrival time (TAT): a cost of n units is admitted
// at time now when max(TAT, now) + n·T - now <= Burst·T, and then moves TAT there.
//
// Every limit of one key lives in one state under one lock: Admit checks all of them and the
// concurrency slot first and changes nothing unless all pass, so a request refused by one
// limit takes nothing from the others. A Ticket then gives back what was taken when the
// request is cancelled (Cancel: refused by a later step, e.g. credits), corrects the tokens by
// the real usage (Settle) and frees the concurrency slot (Release).
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"
	"time"
)

// Unit is what a limit counts.
type Unit uint8

const (
	// Requests: every request costs one.
	Requests Unit = iota
	// Tokens: a request costs its token bound, corrected by its real usage.
	Tokens
)

// MaxLimits is the most limits one policy may hold.
const MaxLimits = 8

// Limit is one GCRA limit.
type Limit struct {
	// Name names the limit in refusals and metrics, e.g. "requests_per_minute".
	Name string
	// Unit is what the limit counts.
	Unit Unit
	// Quota is how many units are admitted per Window, sustained. Must be positive.
	Quota int64
	// Window is the period of the quota. Must be positive.
	Window time.Duration
	// Burst is the most units admitted at once from a full state (GCRA's burst tolerance,
	// in units). 0: Quota.
	Burst int64
}

// Policy is the set of limits applied to each key.
type Policy struct {
	// Limits are checked together; at most MaxLimits.
	Limits []Limit
	// Concurrent bounds the requests of one key in flight at once. 0: no bound.
	Concurrent int64
}

// ConcurrentLimit is the name of the concurrency limit in refusals.
const ConcurrentLimit = "concurrent"

// Params is one limit as the limiter applies it: its Limit (Burst defaulted to Quota) and its
// GCRA parameters. Implementations that keep the state elsewhere (redislimit) use the same.
type Params struct {
	Limit
	// Interval is T, nanoseconds per unit (rounded up: never faster than the quota).
	Interval int64
	// Tolerance is Burst·T, in nanoseconds.
	Tolerance int64
}

// Compile checks p as New does and returns the parameters of its limits, in order.
func Compile(p Policy) ([]Params, error) {
	if len(p.Limits) > MaxLimits {
		return nil, fmt.Errorf("ratelimit: %d limits, at most %d", len(p.Limits), MaxLimits)
	}
	if p.Concurrent < 0 {
		return nil, errors.New("ratelimit: concurrent must not be negative")
	}
	var limits []Params
	for _, lim := range p.Limits {
		if lim.Quota <= 0 || lim.Window <= 0 {
			return nil, fmt.Errorf("ratelimit: limit %s: quota and window must be positive", lim.Name)
		}
		if lim.Burst < 0 {
			return nil, fmt.Errorf("ratelimit: limit %s: burst must not be negative", lim.Name)
		}
		if lim.Burst == 0 {
			lim.Burst = lim.Quota
		}
		t := (int64(lim.Window) + lim.Quota - 1) / lim.Quota
		if t > (1<<62)/lim.Burst {
			return nil, fmt.Errorf("ratelimit: limit %s: burst too large for its window", lim.Name)
		}
		limits = append(limits, Params{Limit: lim, Interval: t, Tolerance: t * lim.Burst})
	}
	return limits, nil
}

// Cost is how many units a request of the given token cost takes from the limit.
func (c *Params) Cost(tokens int64) int64 {
	if c.Unit == Tokens {
		return max(tokens, 0)
	}
	return 1
}

// GiveBack is how many units the end of a ticket that took tokens returns to the limit
// (negative: takes more): everything on a cancel, else for a token limit the difference
// between tokens and used, at most a day of debt (so a huge usage cannot overflow a TAT).
func (c *Params) GiveBack(tokens, used int64, cancel bool) int64 {
	var back int64
	switch {
	case cancel && c.Unit == Requests:
		back = 1
	case cancel:
		back = tokens
	case c.Unit == Tokens:
		back = tokens - used
	}
	return max(back, -(int64(24*time.Hour)/c.Interval + 1))
}

// Tightest is the status of the request limit with the fewest requests left (the later one
// in the policy on a tie) at now, given each limit's TAT: what Decision.Tightest and Peek report.
func Tightest(limits []Params, tat []int64, now int64) Status {
	var s Status
	for i := range limits {
		c := &limits[i]
		if c.Unit != Requests {
			continue
		}
		t := max(tat[i], now)
		rem := max((now+c.Tolerance-t)/c.Interval, 0)
		if !s.ok || rem <= s.Remaining {
			s = Status{Limit: c.Limit, Remaining: rem, Reset: time.Duration(t - now), ok: true}
		}
	}
	return s
}

// Limiter applies one Policy to any number of keys (a key, a user, an address).
type Limiter struct {
	limits     []Params
	concurrent int64
	now        func() time.Time
	seed       maphash.Seed
	shards     [shardCount]shard
}

const shardCount = 64

type shard struct {
	mu        sync.Mutex
	m         map[string]*state
	lastSweep int64
}

// state is one key's limits: the TAT of each, and its requests in flight.
type state struct {
	tat      [MaxLimits]int64
	inflight int64
}

// New makes a limiter for policy p; now is its clock (nil: time.Now).
func New(p Policy, now func() time.Time) (*Limiter, error) {
	limits, err := Compile(p)
	if err != nil {
		return nil, err
	}
	if now == nil {
		now = time.Now
	}
	l := &Limiter{limits: limits, concurrent: p.Concurrent, now: now, seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = map[string]*state{}
	}
	return l, nil
}

// Decision is the outcome of Admit.
type Decision struct {
	// Allowed: everything was taken; the Ticket must be released.
	Allowed bool
	// Refused names the limit that refused ("" when allowed): the one that makes the caller
	// wait longest, or ConcurrentLimit.
	Refused string
	// RetryAfter is how long until the same request would pass every rate limit, if nothing
	// else is admitted meanwhile (for ConcurrentLimit: a guess, one second).
	RetryAfter time.Duration
	// TooLarge: the request's cost exceeds the refusing limit's burst: it can never pass.
	TooLarge bool
	// Tightest is the request limit with the fewest requests left after this decision (the
	// longer window on a tie), for the response headers; ok is false when the policy has no
	// request limit.
	Tightest Status
}

// Status is where one limit stands for one key.
type Status struct {
	Limit Limit
	// Remaining is how many units would be admitted now.
	Remaining int64
	// Reset is how long until the limit is whole again (Burst units available).
	Reset time.Duration
	ok    bool
}

// OK reports whether the status names a limit.
func (s Status) OK() bool { return s.ok }

// Ticket is what one admitted request took.
type Ticket struct {
	l      *Limiter
	key    string
	st     *state
	remote Finisher // the ticket of another Admitter (NewTicket), when l is nil
	tokens int64
	done   bool
}

// Finisher ends a ticket whose counters are kept outside this process (redislimit).
type Finisher interface {
	// Finish is called once, by the first of Settle, Cancel and Release: used is the tokens
	// really used (for Release, the admitted tokens), cancel is true for Cancel.
	Finish(used int64, cancel bool)
}

// NewTicket is an admitted ticket ended by f, for Admitters outside this package; tokens is
// the token cost admitted.
func NewTicket(f Finisher, tokens int64) Ticket {
	return Ticket{remote: f, tokens: max(tokens, 0)}
}

// Admitter is admission against counters kept anywhere: in this process (Limiter) or shared
// by several instances (redislimit), with the same decisions.
type Admitter interface {
	// AdmitContext is Limiter.Admit. An error means the counters could not be reached:
	// nothing was decided and nothing taken.
	AdmitContext(ctx context.Context, key string, tokens int64) (Ticket, Decision, error)
	// PeekContext is Limiter.Peek.
	PeekContext(ctx context.Context, key string) (Status, error)
}

var _ Admitter = (*Limiter)(nil)

// AdmitContext is Admit, never failing: the in-process Limiter is an Admitter.
func (l *Limiter) AdmitContext(_ context.Context, key string, tokens int64) (Ticket, Decision, error) {
	t, d := l.Admit(key, tokens)
	return t, d, nil
}

// PeekContext is Peek, never failing.
func (l *Limiter) PeekContext(_ context.Context, key string) (Status, error) {
	return l.Peek(key), nil
}

func (l *Limiter) shard(key string) *shard {
	return &l.shards[maphash.String(l.seed, key)%shardCount]
}

// Admit takes one request of the given token cost for key from every limit and a
// concurrency slot, or nothing at all.
func (l *Limiter) Admit(key string, tokens int64) (Ticket, Decision) {
	now := l.now().UnixNano()
	sh := l.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.m[key]
	if st == nil {
		l.sweep(sh, now)
		st = &state{}
		sh.m[key] = st
	}
	var d Decision
	var next [MaxLimits]int64
	var wait int64 = -1
	for i := range l.limits {
		c := &l.limits[i]
		n := c.Cost(tokens)
		if n > c.Burst {
			d.Refused, d.TooLarge, d.RetryAfter = c.Name, true, 0
			d.Tightest = l.tightest(st, now)
			return Ticket{}, d
		}
		next[i] = max(st.tat[i], now) + n*c.Interval
		if w := next[i] - c.Tolerance - now; w > 0 && w > wait {
			wait, d.Refused = w, c.Name
		}
	}
	if wait > 0 {
		d.RetryAfter = time.Duration(wait)
		d.Tightest = l.tightest(st, now)
		return Ticket{}, d
	}
	if l.concurrent > 0 && st.inflight >= l.concurrent {
		d.Refused, d.RetryAfter = ConcurrentLimit, time.Second
		d.Tightest = l.tightest(st, now)
		return Ticket{}, d
	}
	copy(st.tat[:len(l.limits)], next[:len(l.limits)])
	st.inflight++
	d.Allowed = true
	d.Tightest = l.tightest(st, now)
	return Ticket{l: l, key: key, st: st, tokens: max(tokens, 0)}, d
}

// tightest is the status of the request limit with the fewest requests left; sh is locked.
func (l *Limiter) tightest(st *state, now int64) Status {
	return Tightest(l.limits, st.tat[:len(l.limits)], now)
}

// Peek is where the tightest request limit stands for key, taking nothing.
func (l *Limiter) Peek(key string) Status {
	now := l.now().UnixNano()
	sh := l.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := sh.m[key]
	if st == nil {
		st = &state{}
	}
	return l.tightest(st, now)
}

// InFlight is how many admitted requests of key are not released yet.
func (l *Limiter) InFlight(key string) int64 {
	sh := l.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if st := sh.m[key]; st != nil {
		return st.inflight
	}
	return 0
}

// sweep forgets, at most once a minute per shard, the keys whose every limit is whole and
// that have nothing in flight: they are the same as keys never seen. sh is locked.
func (l *Limiter) sweep(sh *shard, now int64) {
	if now-sh.lastSweep < int64(time.Minute) {
		return
	}
	sh.lastSweep = now
	for k, st := range sh.m {
		if st.inflight > 0 {
			continue
		}
		idle := true
		for i := range l.limits {
			if st.tat[i] > now {
				idle = false
				break
			}
		}
		if idle {
			delete(sh.m, k)
		}
	}
}

// Admitted reports whether the ticket holds anything.
func (t *Ticket) Admitted() bool { return (t.l != nil || t.remote != nil) && !t.done }

// Settle corrects the token limits by the tokens really used (the difference with the
// admitted cost is given back, or taken when more was used), and frees the concurrency slot.
// Only the first of Settle, Cancel and Release does anything.
func (t *Ticket) Settle(usedTokens int64) { t.finish(max(usedTokens, 0), false) }

// Cancel gives back everything the ticket took, as if the request had never been admitted,
// and frees the concurrency slot.
func (t *Ticket) Cancel() { t.finish(0, true) }

// Release frees the concurrency slot and keeps what was taken from the limits.
func (t *Ticket) Release() { t.finish(t.tokens, false) }

func (t *Ticket) finish(used int64, cancel bool) {
	if t.done || (t.l == nil && t.remote == nil) {
		return
	}
	t.done = true
	if t.remote != nil {
		t.remote.Finish(used, cancel)
		return
	}
	l := t.l
	sh := l.shard(t.key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := t.st
	st.inflight--
	for i := range l.limits {
		c := &l.limits[i]
		st.tat[i] -= c.GiveBack(t.tokens, used, cancel) * c.Interval
	}
}
