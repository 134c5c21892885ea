// Package redislimit is ratelimit's admission with its state in Redis, shared by every
// instance of the gateway: the same limits (GCRA per any window, tokens with give-back at
// settlement, concurrency slots) and the same decisions as the in-process ratelimit.Limiter,
// all or none, in one round trip.
//
// Admission is one Lua script (EVALSHA; the script is sent once, again only if Redis lost it)
// reading and writing every limit of the caller at once, on Redis's clock (TIME), so the
// instances' clocks do not matter. Each limit's state is its TAT; a caller's TATs are one
// key (one read and one write per admission, whatever the number of limits), expiring once
// the last TAT is past (a token limit's later: a debt settled after the slot TTL is counted
// from now). The concurrency slots of a caller are a sorted set of ticket ids scored by their
// expiry: a slot whose holder never ends it (its instance crashed) is free again after
// SlotTTL. A ticket's end is one more round trip, none when it changes nothing; with a Hub
// (hub.go), the limiters on one client send the ends in the pipeline of the next admission
// (in the caller's next admission script when it is in that pipeline), group-send the
// admissions of concurrent requests, and send a request's admissions under several limiters
// (AdmitEach) in one pipeline.
//
// It sits beside policies/ratelimit, not in store/, as the same algorithm run elsewhere: the
// parameters, costs, give-backs and statuses are ratelimit's (Compile, Params, Tightest), and
// only the state and its atomicity are Redis's.
//
// Keys are Prefix + "{" + caller key + "}:tats" (a MessagePack map of the policy's limits by
// name to their TATs, after a base time: a limit added to a policy starts from nothing, one
// removed is dropped at the next write) and Prefix + "{" + caller key + "}:slots": one
// caller's keys share a Redis Cluster hash slot. (Before this layout the TATs were the text
// "name=TAT,..." under "}:tat": the new key starts every caller's limits afresh once, and
// until every instance runs the new layout the old and the new count apart.)
//
// The policy is written into the scripts (script.go): a call carries the clock, the ticket
// id and the costs, not the limits.
//
// With leases (Options.Lease, lease.go), an admission's script also takes a share of each
// limit and of the slots for this instance, and the caller's next requests are admitted here
// from it, with no round trip; the share is given back when it is not spent.
package redislimit

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// maxTolerance is the largest burst tolerance (Burst·T) a limit may have: the script's
// arithmetic on nanoseconds is exact below 2^53 (104 days), with room for debts.
const maxTolerance = 1 << 50 // about 13 days

// Options are a Limiter's settings.
type Options struct {
	// Prefix begins every key of the limiter: one prefix per policy (e.g. per tier), since
	// limits of the same name in two policies would otherwise share their state. Must not
	// contain '{' or '}'.
	Prefix string
	// SlotTTL is the longest a concurrency slot is held: a slot not freed by then (its
	// instance crashed, or lost Redis) is free again. Longer than the longest request, or
	// longer requests let others in beside them. 0: 10 minutes.
	SlotTTL time.Duration
	// FinishTimeout bounds the round trip of a ticket's end. 0: 2 seconds.
	FinishTimeout time.Duration
	// OnFinishError is told of a ticket's end that failed (nil: ignored); its slot comes
	// back after SlotTTL, and the tokens it would have given back stay taken.
	OnFinishError func(error)
	// Lease, when its Divisor is set, lets the limiter take a caller's budget in leases and
	// admit from them here, without a round trip (lease.go).
	Lease LeaseOptions
	// Hub, when set, carries this limiter's scripts with those of the other limiters on it:
	// ends queued to ride with the next admission, AdmitEach in one round trip (see Hub).
	// Its client must be rdb. Nil: each admission and each end is a round trip of its own.
	Hub *Hub
}

// Limiter applies one ratelimit.Policy to any number of keys, its state in Redis.
type Limiter struct {
	rdb           redis.Scripter
	hub           *Hub
	prefix        string
	limits        []ratelimit.Params
	pads          []int64 // each limit's expiry pad, ms
	concurrent    int64
	slotTTL       time.Duration
	finishTimeout time.Duration
	onFinishError func(error)
	scripts       scripts
	leasing       *leasing // nil: no leases
	// ticketPrefix and tickets make the ticket ids: a random prefix of this limiter's (130
	// bits: no two limiters, on any instance, draw the same) and a count, unique without
	// asking the system for randomness on every admission.
	ticketPrefix string
	tickets      atomic.Uint64
	// now replaces Redis's clock (tests only; nil: TIME).
	now func() time.Time
}

var _ ratelimit.Admitter = (*Limiter)(nil)

// New makes a limiter for policy p on rdb (a *redis.Client, *redis.ClusterClient, ...).
func New(rdb redis.Scripter, p ratelimit.Policy, o Options) (*Limiter, error) {
	limits, err := ratelimit.Compile(p)
	if err != nil {
		return nil, err
	}
	if strings.ContainsAny(o.Prefix, "{}") {
		return nil, errors.New("redislimit: the prefix must not contain '{' or '}'")
	}
	if o.SlotTTL < 0 || o.FinishTimeout < 0 {
		return nil, errors.New("redislimit: slot TTL and finish timeout must not be negative")
	}
	if o.SlotTTL == 0 {
		o.SlotTTL = 10 * time.Minute
	}
	if o.FinishTimeout == 0 {
		o.FinishTimeout = 2 * time.Second
	}
	l := &Limiter{rdb: rdb, hub: o.Hub, prefix: o.Prefix, limits: limits, concurrent: p.Concurrent,
		slotTTL: o.SlotTTL, finishTimeout: o.FinishTimeout, onFinishError: o.OnFinishError,
		ticketPrefix: rand.Text() + "."}
	seen := map[string]bool{}
	for _, c := range limits {
		if c.Name == "" || strings.ContainsAny(c.Name, "}=,") || seen[c.Name] {
			return nil, fmt.Errorf("redislimit: limit %q: names must be distinct, non-empty, without '}', '=' or ','", c.Name)
		}
		seen[c.Name] = true
		if c.Tolerance > maxTolerance {
			return nil, fmt.Errorf("redislimit: limit %s: burst tolerance above %v", c.Name, time.Duration(maxTolerance))
		}
		// A request limit's TAT may go once past: a give-back there changes nothing. A token
		// limit's is kept while a ticket may still settle a debt against it.
		pad := int64(time.Second / time.Millisecond)
		if c.Unit == ratelimit.Tokens {
			pad += (c.Tolerance + int64(o.SlotTTL) + int64(time.Millisecond) - 1) / int64(time.Millisecond)
		}
		l.pads = append(l.pads, pad)
	}
	l.scripts = newScripts(l)
	l.leasing = newLeasing(l, o.Lease)
	return l, nil
}

// keys are the Redis keys of key: its TATs, then its slots.
func (l *Limiter) keys(key string) []string {
	base := l.prefix + "{" + key + "}:"
	return []string{base + "tats", base + "slots"}
}

// clock is the script's clock argument.
func (l *Limiter) clock() string {
	if l.now == nil {
		return ""
	}
	return strconv.FormatInt(l.now().UnixNano(), 10)
}

// AdmitContext takes one request of the given token cost for key from every limit and a
// concurrency slot, or nothing at all, as ratelimit.Limiter.Admit: from the caller's lease
// here with no round trip (with leases, lease.go), else in one round trip (with the ends its
// hub holds queued).
func (l *Limiter) AdmitContext(ctx context.Context, key string, tokens int64) (ratelimit.Ticket, ratelimit.Decision, error) {
	tk, d, pa := l.begin(ctx, key, tokens)
	if pa == nil {
		return tk, d, nil
	}
	var res []int64
	var err error
	if l.hub != nil {
		replies, errs := l.hub.admit(ctx, []admitCmd{pa.cmd})
		res, err = replies[0], errs[0]
	} else {
		res, err = l.scripts.admit.Run(ctx, l.rdb, pa.cmd.keys, pa.cmd.args...).Int64Slice()
	}
	return l.end(pa, res, err)
}

// pendingAdmit is an admission that needs its script on Redis: the call, and what its
// reply is read with.
type pendingAdmit struct {
	cmd   admitCmd
	key   string
	p     prepared   // a request's own script
	lease *leasePlan // or a lease's
}

// begin starts an admission: decided here (no limits, or admitted from a lease), or the
// script it needs (pa), to be run and read by end.
func (l *Limiter) begin(ctx context.Context, key string, tokens int64) (ratelimit.Ticket, ratelimit.Decision, *pendingAdmit) {
	if l.leasing != nil {
		tk, d, plan, ok := l.fromLease(ctx, key, tokens)
		if ok {
			return tk, d, nil
		}
		if plan != nil {
			return tk, d, &pendingAdmit{key: key, lease: plan,
				cmd: admitCmd{l: l, keys: l.keys(key), args: l.leaseArgs(plan)}}
		}
	}
	p, skip := l.prepare(key, tokens)
	if skip {
		return ratelimit.NewTicket(&ticket{l: l, key: key}, max(tokens, 0)), ratelimit.Decision{Allowed: true}, nil
	}
	return ratelimit.Ticket{}, ratelimit.Decision{}, &pendingAdmit{key: key, p: p,
		cmd: admitCmd{l: l, keys: l.keys(key), args: p.args}}
}

// end reads the reply of pa's script, or its error (wrapped; nothing was taken).
func (l *Limiter) end(pa *pendingAdmit, res []int64, err error) (ratelimit.Ticket, ratelimit.Decision, error) {
	var tk ratelimit.Ticket
	var d ratelimit.Decision
	if pa.lease != nil {
		tk, d, err = l.leased(pa.lease, res, err)
	} else if err == nil {
		tk, d, err = l.decide(pa.key, pa.p, res)
	}
	if err != nil {
		return ratelimit.Ticket{}, ratelimit.Decision{}, fmt.Errorf("redislimit: admit: %w", err)
	}
	if d.Allowed && l.leasing != nil && l.leasing.onAdmit != nil {
		l.leasing.onAdmit(false)
	}
	return tk, d, nil
}

// prepared is an admission's script arguments and its ticket's slot id.
type prepared struct {
	args   []any
	id     string
	tokens int64
}

// prepare builds the admission's arguments; skip: there is nothing to admit (no limits).
func (l *Limiter) prepare(key string, tokens int64) (prepared, bool) {
	tokens = max(tokens, 0)
	if len(l.limits) == 0 && l.concurrent == 0 {
		return prepared{}, true
	}
	id := ""
	if l.concurrent > 0 {
		id = l.ticketPrefix + strconv.FormatUint(l.tickets.Add(1), 36)
	}
	need := 0
	if l.concurrent > 0 {
		need = 1
	}
	args := make([]any, 0, 8+2*len(l.limits))
	args = append(args, l.clock(), id, 0, 0, need, 0, 0, 0)
	for i := range l.limits {
		args = append(args, l.limits[i].Cost(tokens))
	}
	for range l.limits {
		args = append(args, 0)
	}
	return prepared{args: args, id: id, tokens: tokens}, false
}

// decide reads the admission script's reply.
func (l *Limiter) decide(key string, p prepared, res []int64) (ratelimit.Ticket, ratelimit.Decision, error) {
	d, err := l.decision(res)
	if err != nil || !d.Allowed {
		return ratelimit.Ticket{}, d, err
	}
	return ratelimit.NewTicket(&ticket{l: l, key: key, id: p.id, tokens: p.tokens}, p.tokens), d, nil
}

// decision reads the admission script's reply (for any admission: a request's, a lease's).
func (l *Limiter) decision(res []int64) (ratelimit.Decision, error) {
	if len(res) != 5+len(l.limits) {
		return ratelimit.Decision{}, fmt.Errorf("redislimit: admit: %d values in the reply", len(res))
	}
	var d ratelimit.Decision
	code, idx, wait := res[0], res[1], res[2]
	d.Tightest = ratelimit.Tightest(l.limits, res[5:], 0)
	switch {
	case code == 1:
		d.Allowed = true
	case code == 3:
		d.Refused, d.RetryAfter = ratelimit.ConcurrentLimit, time.Second
	case (code == 0 || code == 2) && idx >= 1 && idx <= int64(len(l.limits)):
		d.Refused = l.limits[idx-1].Name
		if code == 2 {
			d.TooLarge = true
		} else {
			d.RetryAfter = time.Duration(wait)
		}
	default:
		return ratelimit.Decision{}, fmt.Errorf("redislimit: admit: reply code %d, limit %d", code, idx)
	}
	return d, nil
}

// peek is the slots held by key and each limit's TAT relative to now.
func (l *Limiter) peek(ctx context.Context, key string) (int64, []int64, error) {
	res, err := l.scripts.peek.Run(ctx, l.rdb, l.keys(key), l.clock()).Int64Slice()
	if err != nil {
		return 0, nil, fmt.Errorf("redislimit: peek: %w", err)
	}
	if len(res) != 1+len(l.limits) {
		return 0, nil, fmt.Errorf("redislimit: peek: %d values in the reply", len(res))
	}
	return res[0], res[1:], nil
}

// PeekContext is where the tightest request limit stands for key, taking nothing.
func (l *Limiter) PeekContext(ctx context.Context, key string) (ratelimit.Status, error) {
	_, tats, err := l.peek(ctx, key)
	if err != nil {
		return ratelimit.Status{}, err
	}
	return ratelimit.Tightest(l.limits, tats, 0), nil
}

// InFlight is how many concurrency slots of key are held on Redis and not expired (0 without
// a concurrency bound: slots are kept only under one); with leases, the slots an instance's
// lease holds free are counted too.
func (l *Limiter) InFlight(ctx context.Context, key string) (int64, error) {
	n, _, err := l.peek(ctx, key)
	return n, err
}

// ticket is what one admission took, ended by its ratelimit.Ticket.
type ticket struct {
	l      *Limiter
	key    string
	id     string // the slot's ticket id; "" without a concurrency bound
	tokens int64
}

// Finish gives back what the ratelimit.Ticket's end returns, and frees the slot, in one
// round trip (none when nothing changes), or queued on the limiter's hub.
func (t *ticket) Finish(used int64, cancel bool) {
	l := t.l
	args := make([]any, 0, 5+len(l.limits))
	args = append(args, l.clock(), t.id, 0, 0, 0)
	backs := make([]int64, len(l.limits))
	change := t.id != ""
	for i := range l.limits {
		c := &l.limits[i]
		backs[i] = c.GiveBack(t.tokens, used, cancel) * c.Interval
		change = change || backs[i] != 0
		args = append(args, backs[i])
	}
	if !change {
		return
	}
	if l.hub != nil {
		l.hub.finish(queuedFinish{l: l, keys: l.keys(t.key), args: args, id: t.id, backs: backs})
		return
	}
	ctx, cancelCtx := context.WithTimeout(context.Background(), l.finishTimeout)
	defer cancelCtx()
	if err := l.scripts.finish.Run(ctx, l.rdb, l.keys(t.key), args...).Err(); err != nil && l.onFinishError != nil {
		l.onFinishError(fmt.Errorf("redislimit: finish: %w", err))
	}
}
