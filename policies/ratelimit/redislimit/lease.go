package redislimit

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// Leases: an instance takes a caller's budget from Redis in chunks and spends it here.
//
// Without leases every admission is a script on Redis. With them (Options.Lease), the
// admission that finds nothing left here takes, in its one script, its own cost and a lease
// beside it: a share of every limit (a fraction of each limit's burst, at most LeaseOptions.Max
// requests; for a token limit as many tokens as that many requests of this one's cost) and of
// the concurrency bound (slots, as many as are free up to that share), all of the limits'
// share or none of it. The requests that follow are admitted from the lease here, with no
// round trip, until one finds a share used up or the lease older than its life; that one
// takes the next lease in its script and gives back what the last one left, in the same
// script. What a lease leaves when no request comes is given back by the sweep, which runs
// every life: at most two lives after the lease was taken.
// A ticket admitted from a lease ends here: its slot and what its end gives back (a token
// limit's unused tokens, a cancelled request's units) return to the lease.
//
// Every unit spent here was taken on Redis first, so the instances together never admit more
// than the limits allow over time: what changes is when. Within any window a caller may be
// admitted at most one lease per instance more than the window allows (units leased before it
// and spent in it), and a caller may be refused on one instance while another holds units of
// its lease unspent, for at most the lease's life plus the sweep's period. A limit too small
// to split (a share below 2 requests, or below 1 slot or token) is admitted on Redis request
// by request, exactly, as without leases; so is every request near a limit (a lease that does
// not fit is not taken: the request alone is). A request that finds its caller's lease being
// taken waits for that script and takes from the lease it brings, or, when it cannot, is
// admitted on Redis on its own. A lease's slots are named (prefix.1 to prefix.n) and scored by
// their expiry like a ticket's; those in use are given a new one while this instance lives
// (renewDue), so only a crashed instance's slots come back after the slot TTL.

// LeaseOptions are how a Limiter leases budget (Options.Lease).
type LeaseOptions struct {
	// Divisor: a lease holds at most 1/Divisor of each limit's burst, and of the concurrency
	// bound. 0: no leases, every admission is a script on Redis.
	Divisor int64
	// Max is the most requests (and slots) in one lease. 0: 64.
	Max int64
	// Life is how long a lease is spent from: then its next request takes a new one, and a
	// sweep gives back what it left when none comes. 0: 1 second.
	Life time.Duration
	// OnAdmit, when set, is told of each admission whether it was from a lease (no round trip).
	OnAdmit func(fromLease bool)
}

// leasing is a limiter's lease sizes, fixed by its policy, and its leases (nil on a limiter
// that does not lease).
type leasing struct {
	requests int64 // requests per lease (the request's own included)
	tokens   int64 // the most tokens in a lease beside the request's own
	slots    int64 // the most slots a lease holds free
	life     time.Duration
	onAdmit  func(bool)
	leases   sync.Map // caller key -> *lease
	mu       sync.Mutex
	sweeping bool // a sweep is armed or running
	closed   bool
}

// newLeasing sizes l's leases, or returns nil when its policy cannot be split.
func newLeasing(l *Limiter, o LeaseOptions) *leasing {
	if o.Divisor <= 0 {
		return nil
	}
	if o.Max <= 0 {
		o.Max = 64
	}
	if o.Life <= 0 {
		o.Life = time.Second
	}
	s := &leasing{requests: o.Max, tokens: -1, slots: -1, life: o.Life, onAdmit: o.OnAdmit}
	for _, c := range l.limits {
		share := c.Burst / o.Divisor
		if c.Unit == ratelimit.Tokens {
			if s.tokens < 0 || share < s.tokens {
				s.tokens = share
			}
			continue
		}
		s.requests = min(s.requests, share)
	}
	if l.concurrent > 0 {
		s.slots = min(l.concurrent/o.Divisor, o.Max)
	}
	if s.requests < 2 || s.tokens == 0 || s.slots == 0 {
		return nil
	}
	return s
}

// lease is what this instance holds of one caller's budget.
type lease struct {
	mu sync.Mutex
	// left is each limit's units leased and not spent (the give-backs of the tickets it
	// admitted added back; a token limit's may be below 0 after a debt).
	left [ratelimit.MaxLimits]int64
	// until is when the lease stops being spent from (Unix ns, this machine's clock).
	until int64
	// slotID begins the names of the lease's slots on Redis: slotID.1 to slotID.slots.
	slotID string
	slots  int64
	// renewed is when the lease's slots were last given their expiry (Unix ns): they are given
	// a new one by the lease's next script once half the slot TTL has passed, and by the sweep
	// while any is in use, so a slot in use never expires while this instance lives.
	renewed int64
	// inFlight is the tickets admitted from the lease and not ended, each on one slot.
	inFlight int64
	// tats are the caller's TATs (Unix ns) as the lease's script left them, its own units
	// included (for the rate limit headers of the requests admitted here).
	tats  [ratelimit.MaxLimits]int64
	busy  bool          // a script of the lease is on the wire
	ready chan struct{} // closed when it is back
	dead  bool          // removed from the map: look it up again
}

// setBusy marks ls (locked) busy with a script.
func (ls *lease) setBusy() {
	ls.busy = true
	ls.ready = make(chan struct{})
}

// clearBusy marks ls (locked) idle again, and wakes those waiting for it.
func (ls *lease) clearBusy() {
	ls.busy = false
	close(ls.ready)
	ls.ready = nil
}

// leasePlan is a lease's script call: what the request needs, and what the last lease left.
type leasePlan struct {
	ls       *lease
	returned [ratelimit.MaxLimits]int64
	extra    [ratelimit.MaxLimits]int64
	need     int64 // 1: the request needs a new slot; 0: it took one the lease held free
	want     int64 // slots asked for beside it, as far as free
	first    int64 // the index of the lease's first new slot (0: no concurrency bound)
	renew    bool  // the slots held are given a new expiry
	tokens   int64
}

// fromLease admits the request from key's lease here; or, when the lease cannot, returns the
// plan of the script that takes the next one (the lease marked busy: the caller runs the
// script and calls leased); or neither: the request is to be admitted on its own. A request
// that finds the lease busy with a script waits for it (or for ctx) once, and is admitted
// from the lease it brought if it can, else on its own: near a limit the requests of one
// caller are not lined up behind each other's scripts.
func (l *Limiter) fromLease(ctx context.Context, key string, tokens int64) (ratelimit.Ticket, ratelimit.Decision, *leasePlan, bool) {
	s := l.leasing
	if s.isClosed() {
		return ratelimit.Ticket{}, ratelimit.Decision{}, nil, false
	}
	tokens = max(tokens, 0)
	waited := false
	for {
		v, ok := s.leases.Load(key)
		if !ok {
			v, _ = s.leases.LoadOrStore(key, &lease{slotID: l.ticketPrefix + "l" + strconv.FormatUint(l.tickets.Add(1), 36)})
			s.armSweep(l)
		}
		ls := v.(*lease)
		ls.mu.Lock()
		if ls.dead {
			ls.mu.Unlock()
			continue
		}
		now := time.Now().UnixNano()
		if now < ls.until && (l.concurrent == 0 || ls.inFlight < ls.slots) {
			fits := true
			for i := range l.limits {
				if ls.left[i] < l.limits[i].Cost(tokens) {
					fits = false
					break
				}
			}
			if fits {
				for i := range l.limits {
					ls.left[i] -= l.limits[i].Cost(tokens)
				}
				ls.inFlight++
				d := ratelimit.Decision{Allowed: true, Tightest: l.leaseStatus(ls, now)}
				ls.mu.Unlock()
				if s.onAdmit != nil {
					s.onAdmit(true)
				}
				return ratelimit.NewTicket(&leasedTicket{l: l, ls: ls, tokens: tokens}, tokens), d, nil, true
			}
		}
		if waited {
			ls.mu.Unlock()
			return ratelimit.Ticket{}, ratelimit.Decision{}, nil, false
		}
		if ls.busy {
			ready := ls.ready
			ls.mu.Unlock()
			select {
			case <-ready:
			case <-ctx.Done():
				return ratelimit.Ticket{}, ratelimit.Decision{}, nil, false
			}
			waited = true
			continue
		}
		ls.setBusy()
		p := &leasePlan{ls: ls, returned: ls.left, tokens: tokens}
		ls.left = [ratelimit.MaxLimits]int64{}
		for i := range l.limits {
			if l.limits[i].Unit == ratelimit.Tokens {
				p.extra[i] = min(s.tokens, (s.requests-1)*max(tokens, 1))
			} else {
				p.extra[i] = s.requests - 1
			}
		}
		if l.concurrent > 0 && ls.inFlight >= ls.slots {
			p.need = 1
		} else {
			ls.inFlight++ // a slot the lease holds, taken now: no other request gets it meanwhile
		}
		if l.concurrent > 0 {
			p.want = max(s.slots-(ls.slots-ls.inFlight)-p.need, 0)
			p.first = ls.slots + 1
			p.renew = ls.slots > 0 && l.renewDue(ls, now)
		}
		ls.mu.Unlock()
		return ratelimit.Ticket{}, ratelimit.Decision{}, p, false
	}
}

// leaseStatus is the tightest request limit for the headers of a request admitted from ls
// (locked): the TATs its script left, less what the lease has not spent.
func (l *Limiter) leaseStatus(ls *lease, now int64) ratelimit.Status {
	var tats [ratelimit.MaxLimits]int64
	for i := range l.limits {
		tats[i] = ls.tats[i]
		if l.limits[i].Unit == ratelimit.Requests {
			tats[i] -= ls.left[i] * l.limits[i].Interval
		}
	}
	return ratelimit.Tightest(l.limits, tats[:len(l.limits)], now)
}

// renewDue reports whether the slots of ls (locked) are due a new expiry: half the slot TTL
// has passed since they were last given one.
func (l *Limiter) renewDue(ls *lease, now int64) bool {
	return now-ls.renewed > int64(l.slotTTL)/2
}

// leaseArgs are the admission script's arguments for plan p (admit.lua).
func (l *Limiter) leaseArgs(p *leasePlan) []any {
	renew := 0
	if p.renew {
		renew = 1
	}
	id := ""
	if l.concurrent > 0 {
		id = p.ls.slotID
	}
	ends := 0
	for i := range l.limits {
		if p.returned[i] != 0 {
			ends = 1
		}
	}
	args := make([]any, 0, 8+2*len(l.limits)+ends*(1+len(l.limits)))
	args = append(args, l.clock(), id, ends, 1, p.need, p.want, p.first, renew)
	for i := range l.limits {
		args = append(args, l.limits[i].Cost(p.tokens))
	}
	for i := range l.limits {
		args = append(args, p.extra[i])
	}
	if ends > 0 {
		args = append(args, "")
		for i := range l.limits {
			args = append(args, p.returned[i]*l.limits[i].Interval)
		}
	}
	return args
}

// leased reads the reply of p's script (or its error: the lease is left empty, what the last
// one left lost with the reply, as a conservative end) into key's decision.
func (l *Limiter) leased(p *leasePlan, res []int64, err error) (ratelimit.Ticket, ratelimit.Decision, error) {
	ls := p.ls
	var d ratelimit.Decision
	if err == nil {
		d, err = l.decision(res)
	}
	now := time.Now().UnixNano()
	ls.mu.Lock()
	ls.clearBusy()
	if err != nil || !d.Allowed {
		if p.need == 0 {
			ls.inFlight--
		}
		ls.mu.Unlock()
		return ratelimit.Ticket{}, d, err
	}
	if res[3] == 1 {
		for i := range l.limits {
			ls.left[i] += p.extra[i]
		}
		ls.until = now + int64(l.leasing.life)
	}
	if p.renew || ls.slots == 0 {
		ls.renewed = now
	}
	ls.slots += res[4]
	if p.need == 1 {
		ls.inFlight++
	}
	for i := range l.limits {
		ls.tats[i] = now + res[5+i]
	}
	d.Tightest = l.leaseStatus(ls, now)
	ls.mu.Unlock()
	return ratelimit.NewTicket(&leasedTicket{l: l, ls: p.ls, tokens: p.tokens}, p.tokens), d, nil
}

// leasedTicket is a request admitted from a lease (or with its script): its end returns to
// the lease.
type leasedTicket struct {
	l      *Limiter
	ls     *lease
	tokens int64
}

// Finish frees the ticket's slot in its lease, and adds to the lease what the end gives back.
func (t *leasedTicket) Finish(used int64, cancel bool) {
	l, ls := t.l, t.ls
	ls.mu.Lock()
	ls.inFlight--
	for i := range l.limits {
		ls.left[i] += l.limits[i].GiveBack(t.tokens, used, cancel)
	}
	ls.mu.Unlock()
}

func (s *leasing) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// armSweep makes sure a sweep will run after the lease life.
func (s *leasing) armSweep(l *Limiter) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sweeping {
		return
	}
	s.sweeping = true
	time.AfterFunc(s.life, func() { l.sweepLeases(false) })
}

// leaseReturn is one lease's return: finish.lua's arguments.
type leaseReturn struct {
	ls   *lease
	keys []string
	args []any
}

// sweepLeases gives back what the leases past their life left (all of them when closing),
// frees their slots beyond those in use, forgets the leases left with nothing, and sweeps
// again after the life while any lease is left.
func (l *Limiter) sweepLeases(closing bool) {
	s := l.leasing
	closing = closing || s.isClosed()
	now := time.Now().UnixNano()
	var returns []leaseReturn
	s.leases.Range(func(k, v any) bool {
		ls := v.(*lease)
		ls.mu.Lock()
		defer ls.mu.Unlock()
		if ls.busy {
			return true
		}
		renew := ls.inFlight > 0 && l.renewDue(ls, now)
		if now < ls.until && !closing && !renew {
			return true
		}
		left := false
		for i := range l.limits {
			left = left || ls.left[i] != 0
		}
		trim := ls.slots > ls.inFlight
		if now < ls.until && !closing { // only the slots in use renewed
			left, trim = false, false
		}
		if !left && !trim && !renew {
			if ls.inFlight == 0 {
				ls.dead = true
				s.leases.Delete(k)
			}
			return true
		}
		args := make([]any, 0, 5+len(l.limits))
		id := ""
		if ls.slots > 0 {
			id = ls.slotID
		}
		keep := ls.slots
		if trim {
			keep = ls.inFlight
		}
		renewArg := 0
		if renew {
			renewArg = 1
			ls.renewed = now
		}
		args = append(args, l.clock(), id, ls.slots, keep, renewArg)
		for i := range l.limits {
			back := int64(0)
			if left {
				back = ls.left[i] * l.limits[i].Interval
				ls.left[i] = 0
			}
			args = append(args, back)
		}
		ls.slots = keep
		ls.setBusy()
		returns = append(returns, leaseReturn{ls: ls, keys: l.keys(k.(string)), args: args})
		return true
	})
	if len(returns) > 0 {
		l.sendReturns(returns)
	}
	s.mu.Lock()
	s.sweeping = false
	s.mu.Unlock()
	empty := true
	s.leases.Range(func(any, any) bool { empty = false; return false })
	if !empty {
		s.armSweep(l) // after Close too: the tickets still out free their slots as they end
	}
}

// sendReturns sends lease returns in one pipeline. A return that fails is reported: what it
// would have given back stays taken, and its slots come back after the slot TTL.
func (l *Limiter) sendReturns(returns []leaseReturn) {
	ctx, cancel := context.WithTimeout(context.Background(), l.finishTimeout)
	defer cancel()
	pipeliner, ok := l.rdb.(interface{ Pipeline() redis.Pipeliner })
	cmds := make([]*redis.Cmd, len(returns))
	if ok {
		pipe := pipeliner.Pipeline()
		for i, r := range returns {
			cmds[i] = l.scripts.finish.EvalSha(ctx, pipe, r.keys, r.args...)
		}
		_, _ = pipe.Exec(ctx)
	}
	for i, r := range returns {
		var err error
		if !ok || noScript(cmds[i].Err()) {
			err = l.scripts.finish.Run(ctx, l.rdb, r.keys, r.args...).Err()
		} else {
			err = cmds[i].Err()
		}
		if err != nil && l.onFinishError != nil {
			l.onFinishError(fmt.Errorf("redislimit: returning a lease: %w", err))
		}
		r.ls.mu.Lock()
		r.ls.clearBusy()
		r.ls.mu.Unlock()
	}
}

// Close gives back what every lease of the limiter holds unspent, and frees their slots not in
// use; later admissions are each a script on Redis. The tickets admitted from a lease and not
// ended yet free their slots as they end, by the sweep after the life. A limiter without leases
// has nothing to close.
func (l *Limiter) Close() {
	s := l.leasing
	if s == nil {
		return
	}
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	l.sweepLeases(true)
}
