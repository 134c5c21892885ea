package redislimit

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// Hub sends the scripts of the limiters that share one Redis client so that what may wait
// rides with what may not, in one round trip: a ticket's end is queued and sent in the
// pipeline of the next admission through the hub (before it, so a slot freed here is free
// for it), or on its own after FinishDelay when no admission comes first; the admissions
// of one request under several limiters (AdmitEach: a key's tier and its user's) go in one
// pipeline; and admissions are group-sent: while one pipeline of admissions is on the wire,
// those that arrive wait for it and then go together in the next one, in the order they
// came. A lone request waits for nothing; under load a round trip carries many requests.
// Without a hub each of these is a round trip of its own.
//
// What a queued end gives back is not yet given back for up to FinishDelay (or, when a
// pipeline of admissions is on the wire then, until the next one is sent): meanwhile an
// admission on another instance (or of a request admitted here before the end was queued)
// still sees its slot held and its tokens taken. An end queued when the hub is closed, or
// lost with its pipeline, is reported to OnError: its slot comes back after the slot TTL.
type Hub struct {
	rdb     redis.Cmdable
	delay   time.Duration
	timeout time.Duration
	onError func(error)

	mu     sync.Mutex
	queued []queuedFinish
	timer  *time.Timer
	closed bool
	wg     sync.WaitGroup // flushes running on their own
	busy   bool           // a pipeline of admissions is on the wire
	next   *admitBatch    // the admissions waiting for it, sent together next
}

// admitBatch is admissions of several callers sent in one pipeline. Its first caller leads:
// it waits for ready (the pipeline before it is back), sends the batch, and closes done.
type admitBatch struct {
	cmds    []admitCmd
	replies [][]int64
	errs    []error
	ready   chan struct{}
	done    chan struct{}
}

// queuedFinish is one ticket's end waiting for a pipeline: finish.lua's keys and arguments,
// and what the admission script needs to apply it first (the slot's ticket id, each
// limit's change).
type queuedFinish struct {
	l     *Limiter
	keys  []string
	args  []any
	id    string
	backs []int64
}

// HubOptions are a Hub's settings.
type HubOptions struct {
	// FinishDelay is how long a ticket's end waits for an admission to ride with before it
	// is sent on its own; ends whose delay runs out while a pipeline of admissions is on the
	// wire ride with the next one instead (or are sent after another delay if none comes).
	// 0: 2 ms.
	FinishDelay time.Duration
	// Timeout bounds each round trip of the hub: a pipeline of admissions (which carries the
	// admissions of several callers, so no one caller's context cancels it or sets its
	// deadline) and ends sent on their own. An admission waiting for the pipeline ahead of it
	// waits at most twice this. 0: 2 seconds.
	Timeout time.Duration
	// OnError is told of ends that failed (nil: ignored).
	OnError func(error)
}

// maxQueuedFinishes is the number of queued ends at which they are sent without waiting.
const maxQueuedFinishes = 256

// NewHub makes a hub for the limiters on rdb.
func NewHub(rdb redis.Cmdable, o HubOptions) *Hub {
	if o.FinishDelay <= 0 {
		o.FinishDelay = 2 * time.Millisecond
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	return &Hub{rdb: rdb, delay: o.FinishDelay, timeout: o.Timeout, onError: o.OnError}
}

// Close sends the ends still queued, and waits for those being sent (by a flush of its own
// or by the delay's timer); later ends are sent at once, each on its own.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	h.stopTimerLocked()
	h.mu.Unlock()
	h.flush()
	h.wg.Wait()
}

// finish queues a ticket's end.
func (h *Hub) finish(f queuedFinish) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		h.sendOne(f)
		return
	}
	h.queued = append(h.queued, f)
	switch {
	case len(h.queued) >= maxQueuedFinishes:
		h.stopTimerLocked()
		h.wg.Add(1)
		h.mu.Unlock()
		go func() { defer h.wg.Done(); h.flush() }()
		return
	case h.timer == nil:
		h.armLocked()
	}
	h.mu.Unlock()
}

// armLocked starts the timer that sends the queued ends on their own after the delay, or,
// when a pipeline of admissions is then on the wire, leaves them to the next one (the timer
// started again when the hub goes idle with ends queued). h.mu is held.
func (h *Hub) armLocked() {
	var t *time.Timer
	h.wg.Add(1) // done when it has run, or by stopTimerLocked: Close waits for it
	t = time.AfterFunc(h.delay, func() {
		defer h.wg.Done()
		h.mu.Lock()
		if h.timer == t {
			h.timer = nil
		}
		busy := h.busy
		h.mu.Unlock()
		if !busy {
			h.flush()
		}
	})
	h.timer = t
}

// stopTimerLocked stops the timer, if one is set. h.mu is held.
func (h *Hub) stopTimerLocked() {
	if h.timer != nil {
		if h.timer.Stop() {
			h.wg.Done() // it will not run
		}
		h.timer = nil
	}
}

// take empties the queue.
func (h *Hub) take() []queuedFinish {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.takeLocked()
}

// takeLocked is take with h.mu held.
func (h *Hub) takeLocked() []queuedFinish {
	q := h.queued
	h.queued = nil
	h.stopTimerLocked()
	return q
}

// flush sends the queued ends in one pipeline.
func (h *Hub) flush() {
	q := h.take()
	if len(q) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	defer cancel()
	h.run(ctx, q, nil)
}

// sendOne sends one end on its own.
func (h *Hub) sendOne(f queuedFinish) {
	ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	defer cancel()
	if err := f.l.scripts.finish.Run(ctx, h.rdb, f.keys, f.args...).Err(); err != nil {
		h.report(err)
	}
}

func (h *Hub) report(err error) {
	if h.onError != nil {
		h.onError(fmt.Errorf("redislimit: finish: %w", err))
	}
}

// admitCmd is one admission's script call.
type admitCmd struct {
	l    *Limiter
	keys []string
	args []any
}

// admit sends cmds in the hub's next pipeline of admissions (see Hub), with the ends
// queued, and returns each one's reply or error.
func (h *Hub) admit(ctx context.Context, cmds []admitCmd) ([][]int64, []error) {
	h.mu.Lock()
	if !h.busy {
		h.busy = true
		ends := h.takeLocked()
		h.mu.Unlock()
		b := &admitBatch{cmds: cmds}
		h.send(ctx, ends, b)
		h.handOff()
		return b.replies, b.errs
	}
	b := h.next
	lead := b == nil
	if lead {
		b = &admitBatch{ready: make(chan struct{}), done: make(chan struct{})}
		h.next = b
	}
	off := len(b.cmds)
	b.cmds = append(b.cmds, cmds...)
	h.mu.Unlock()
	if lead {
		<-b.ready // handOff detached b from h.next and left busy set for it
		h.mu.Lock()
		ends := h.takeLocked()
		h.mu.Unlock()
		h.send(ctx, ends, b)
		close(b.done)
		h.handOff()
	} else {
		<-b.done
	}
	return b.replies[off : off+len(cmds)], b.errs[off : off+len(cmds)]
}

// handOff ends a pipeline of admissions: the batch waiting, if any, is sent next (by its
// leader), else the hub is idle.
func (h *Hub) handOff() {
	h.mu.Lock()
	b := h.next
	h.next = nil
	h.busy = b != nil
	if b == nil && len(h.queued) > 0 && h.timer == nil && !h.closed {
		h.armLocked()
	}
	h.mu.Unlock()
	if b != nil {
		close(b.ready)
	}
}

// send runs b's admissions, after ends, in one pipeline bounded by the hub's timeout (not by
// ctx's cancellation: the other callers' admissions ride in it too), and fills b's replies.
func (h *Hub) send(ctx context.Context, ends []queuedFinish, b *admitBatch) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.timeout)
	defer cancel()
	b.replies, b.errs = h.run(ctx, ends, b.cmds)
}

// run sends the ends, then the admissions, in one pipeline, and returns each admission's
// reply or error. An end whose caller is admitted in the same pipeline is folded into the
// first such admission's script call (applied first, as if sent before it: the admissions
// ahead of it are other callers', whose state it does not touch), so that a busy caller's
// end and next admission are one script, not two. A script Redis does not hold (NOSCRIPT:
// it restarted or was flushed) is loaded and that call alone run again, in order, so no end
// is applied twice. Failed ends are reported.
func (h *Hub) run(ctx context.Context, ends []queuedFinish, admits []admitCmd) ([][]int64, []error) {
	alone, args := fold(ends, admits)
	pipe := h.rdb.Pipeline()
	endCmds := make([]*redis.Cmd, len(alone))
	for i, f := range alone {
		endCmds[i] = f.l.scripts.finish.EvalSha(ctx, pipe, f.keys, f.args...)
	}
	admitCmds := make([]*redis.Cmd, len(admits))
	for i, a := range admits {
		admitCmds[i] = a.l.scripts.admit.EvalSha(ctx, pipe, a.keys, args[i]...)
	}
	_, _ = pipe.Exec(ctx) // each command's error is read below
	for i, c := range endCmds {
		err := c.Err()
		if noScript(err) {
			err = alone[i].l.scripts.finish.Run(ctx, h.rdb, alone[i].keys, alone[i].args...).Err()
		}
		if err != nil {
			h.report(err)
		}
	}
	out := make([][]int64, len(admits))
	errs := make([]error, len(admits))
	for i, c := range admitCmds {
		if noScript(c.Err()) {
			c = admits[i].l.scripts.admit.Run(ctx, h.rdb, admits[i].keys, args[i]...)
		}
		out[i], errs[i] = c.Int64Slice()
		if errs[i] != nil && len(args[i]) > len(admits[i].args) {
			h.report(errs[i]) // the ends folded into it are lost with it
		}
	}
	return out, errs
}

// fold sorts ends into those sent on their own and those folded into the first admission of
// their caller, and returns the ones alone and each admission's arguments (admit.lua's: the
// ends folded in appended, their number in ARGV[3]).
func fold(ends []queuedFinish, admits []admitCmd) ([]queuedFinish, [][]any) {
	args := make([][]any, len(admits))
	for i, a := range admits {
		args[i] = a.args
	}
	if len(ends) == 0 || len(admits) == 0 {
		return ends, args
	}
	first := make(map[string]int, len(admits))
	for i := len(admits) - 1; i >= 0; i-- {
		first[admits[i].keys[0]] = i
	}
	var alone []queuedFinish
	for _, f := range ends {
		i, ok := first[f.keys[0]]
		if !ok || admits[i].l != f.l {
			alone = append(alone, f)
			continue
		}
		if len(args[i]) == len(admits[i].args) { // the first end folded here: a copy to extend
			args[i] = append(make([]any, 0, len(args[i])+2*(1+len(f.backs))), args[i]...)
		}
		args[i][2] = args[i][2].(int) + 1
		args[i] = append(args[i], f.id)
		for _, b := range f.backs {
			args[i] = append(args[i], b)
		}
	}
	return alone, args
}

func noScript(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT")
}

// Call is one admission of AdmitEach: key under limiter L for a request of Tokens.
type Call struct {
	L      *Limiter
	Key    string
	Tokens int64
}

// AdmitEach admits each call as its limiter's AdmitContext would, all in one round trip when
// their limiters share a hub (with the ends the hub holds queued); each decision is its own,
// as if the calls were made one after the other: a caller that needs all of them cancels
// the tickets of those admitted when one is refused. On an error nothing was taken.
func AdmitEach(ctx context.Context, calls ...Call) ([]ratelimit.Ticket, []ratelimit.Decision, error) {
	tickets := make([]ratelimit.Ticket, len(calls))
	decisions := make([]ratelimit.Decision, len(calls))
	var hub *Hub
	var cmds []admitCmd
	var pending []*pendingAdmit
	var at []int // the calls pending, in cmds' order
	for i, c := range calls {
		tk, d, pa := c.L.begin(ctx, c.Key, c.Tokens)
		if pa == nil {
			tickets[i], decisions[i] = tk, d
			continue
		}
		if hub == nil {
			hub = c.L.hub
		}
		if c.L.hub != hub || hub == nil {
			for _, p := range append(pending, pa) {
				_, _, _ = p.cmd.l.end(p, nil, errNotSent)
			}
			for _, t := range tickets {
				t.Cancel()
			}
			return nil, nil, errors.New("redislimit: AdmitEach: the limiters do not share a hub")
		}
		cmds = append(cmds, pa.cmd)
		pending = append(pending, pa)
		at = append(at, i)
	}
	if len(cmds) == 0 {
		return tickets, decisions, nil
	}
	replies, errs := hub.admit(ctx, cmds)
	var failed error
	for j, pa := range pending {
		tk, d, err := pa.cmd.l.end(pa, replies[j], errs[j])
		tickets[at[j]], decisions[at[j]] = tk, d
		if err != nil && failed == nil {
			failed = err
		}
	}
	if failed != nil {
		// Those admitted are given back: nothing was taken.
		for _, t := range tickets {
			t.Cancel() // the zero ticket of a refused one is a no-op
		}
		return nil, nil, failed
	}
	return tickets, decisions, nil
}

// errNotSent ends an admission whose script was never sent.
var errNotSent = errors.New("not sent")
