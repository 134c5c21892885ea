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

type compiled struct {
	Limit
	interval  int64 // T, nanoseconds per unit (rounded up: never faster than the quota)
	tolerance int64 // Burst·T
}

// Limiter applies one Policy to any number of keys (a key, a user, an address).
type Limiter struct {
	limits     []compiled
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
	if len(p.Limits) > MaxLimits {
		return nil, fmt.Errorf("ratelimit: %d limits, at most %d", len(p.Limits), MaxLimits)
	}
	if p.Concurrent < 0 {
		return nil, errors.New("ratelimit: concurrent must not be negative")
	}
	if now == nil {
		now = time.Now
	}
	l := &Limiter{concurrent: p.Concurrent, now: now, seed: maphash.MakeSeed()}
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
		l.limits = append(l.limits, compiled{Limit: lim, interval: t, tolerance: t * lim.Burst})
	}
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
	tokens int64
	done   bool
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
		n := int64(1)
		if c.Unit == Tokens {
			n = max(tokens, 0)
		}
		if n > c.Burst {
			d.Refused, d.TooLarge, d.RetryAfter = c.Name, true, 0
			d.Tightest = l.tightest(st, now)
			return Ticket{}, d
		}
		next[i] = max(st.tat[i], now) + n*c.interval
		if w := next[i] - c.tolerance - now; w > 0 && w > wait {
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
	var s Status
	for i := range l.limits {
		c := &l.limits[i]
		if c.Unit != Requests {
			continue
		}
		tat := max(st.tat[i], now)
		rem := max((now+c.tolerance-tat)/c.interval, 0)
		if !s.ok || rem <= s.Remaining {
			s = Status{Limit: c.Limit, Remaining: rem, Reset: time.Duration(tat - now), ok: true}
		}
	}
	return s
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
func (t *Ticket) Admitted() bool { return t.l != nil && !t.done }

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
	if t.l == nil || t.done {
		return
	}
	t.done = true
	l := t.l
	sh := l.shard(t.key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	st := t.st
	st.inflight--
	for i := range l.limits {
		c := &l.limits[i]
		var back int64 // units given back (negative: taken)
		switch {
		case cancel && c.Unit == Requests:
			back = 1
		case cancel:
			back = t.tokens
		case c.Unit == Tokens:
			back = t.tokens - used
		}
		if back == 0 {
			continue
		}
		// Bounded so a huge usage cannot overflow the TAT: at most a day of debt more.
		back = max(back, -(int64(24*time.Hour)/c.interval + 1))
		st.tat[i] -= back * c.interval
	}
}
