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
// for it), or on its own after FinishDelay when no admission comes first; and the admissions
// of one request under several limiters (AdmitEach: a key's tier and its user's) go in one
// pipeline. Without a hub each of these is a round trip of its own.
//
// What a queued end gives back is not yet given back for up to FinishDelay: meanwhile an
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
}

// queuedFinish is one ticket's end waiting for a pipeline.
type queuedFinish struct {
	keys []string
	args []any
}

// HubOptions are a Hub's settings.
type HubOptions struct {
	// FinishDelay is the longest a ticket's end waits for an admission to ride with before it
	// is sent on its own. 0: 2 ms.
	FinishDelay time.Duration
	// Timeout bounds the round trip of ends sent on their own. 0: 2 seconds.
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

// Close sends the ends still queued, and waits for those being sent; later ends are sent
// at once, each on its own.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	if h.timer != nil {
		h.timer.Stop()
		h.timer = nil
	}
	h.mu.Unlock()
	h.flush()
	h.wg.Wait()
}

// finish queues a ticket's end.
func (h *Hub) finish(keys []string, args []any) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		h.sendOne(keys, args)
		return
	}
	h.queued = append(h.queued, queuedFinish{keys: keys, args: args})
	switch {
	case len(h.queued) >= maxQueuedFinishes:
		if h.timer != nil {
			h.timer.Stop()
			h.timer = nil
		}
		h.wg.Add(1)
		h.mu.Unlock()
		go func() { defer h.wg.Done(); h.flush() }()
		return
	case h.timer == nil:
		h.timer = time.AfterFunc(h.delay, func() {
			h.mu.Lock()
			h.timer = nil
			h.mu.Unlock()
			h.flush()
		})
	}
	h.mu.Unlock()
}

// take empties the queue.
func (h *Hub) take() []queuedFinish {
	h.mu.Lock()
	defer h.mu.Unlock()
	q := h.queued
	h.queued = nil
	if h.timer != nil {
		h.timer.Stop()
		h.timer = nil
	}
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
	_, _ = h.run(ctx, q, nil)
}

// sendOne sends one end on its own.
func (h *Hub) sendOne(keys []string, args []any) {
	ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	defer cancel()
	if err := finishScript.Run(ctx, h.rdb, keys, args...).Err(); err != nil {
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
	keys []string
	args []any
}

// run sends the ends, then the admissions, in one pipeline, and returns each admission's
// reply. A script Redis does not hold (NOSCRIPT: it restarted or was flushed) is loaded and
// that call alone run again, in order, so no end is applied twice. Failed ends are reported.
func (h *Hub) run(ctx context.Context, ends []queuedFinish, admits []admitCmd) ([][]int64, error) {
	pipe := h.rdb.Pipeline()
	endCmds := make([]*redis.Cmd, len(ends))
	for i, f := range ends {
		endCmds[i] = finishScript.EvalSha(ctx, pipe, f.keys, f.args...)
	}
	admitCmds := make([]*redis.Cmd, len(admits))
	for i, a := range admits {
		admitCmds[i] = admitScript.EvalSha(ctx, pipe, a.keys, a.args...)
	}
	_, _ = pipe.Exec(ctx) // each command's error is read below
	for i, c := range endCmds {
		err := c.Err()
		if noScript(err) {
			err = finishScript.Run(ctx, h.rdb, ends[i].keys, ends[i].args...).Err()
		}
		if err != nil {
			h.report(err)
		}
	}
	out := make([][]int64, len(admits))
	var errs []error
	for i, c := range admitCmds {
		if noScript(c.Err()) {
			c = admitScript.Run(ctx, h.rdb, admits[i].keys, admits[i].args...)
		}
		res, err := c.Int64Slice()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out[i] = res
	}
	return out, errors.Join(errs...)
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
	pending := make([]int, 0, len(calls)) // the calls with a script, in cmds' order
	prepared := make([]prepared, len(calls))
	for i, c := range calls {
		p, skip := c.L.prepare(c.Key, c.Tokens)
		if skip {
			tickets[i], decisions[i] = ratelimit.NewTicket(&ticket{l: c.L, key: c.Key}, max(c.Tokens, 0)), ratelimit.Decision{Allowed: true}
			continue
		}
		if hub == nil {
			hub = c.L.hub
		} else if c.L.hub != hub {
			return nil, nil, errors.New("redislimit: AdmitEach: the limiters do not share a hub")
		}
		prepared[i] = p
		cmds = append(cmds, admitCmd{keys: c.L.keys(c.Key), args: p.args})
		pending = append(pending, i)
	}
	if len(cmds) == 0 {
		return tickets, decisions, nil
	}
	replies, err := hub.run(ctx, hub.take(), cmds)
	if err != nil {
		// Those admitted are given back: nothing was taken.
		for j, i := range pending {
			if replies[j] != nil {
				if tk, d, derr := calls[i].L.decide(calls[i].Key, prepared[i], replies[j]); derr == nil && d.Allowed {
					tk.Cancel()
				}
			}
		}
		return nil, nil, fmt.Errorf("redislimit: admit: %w", err)
	}
	var errs []error
	for j, i := range pending {
		tk, d, err := calls[i].L.decide(calls[i].Key, prepared[i], replies[j])
		errs = append(errs, err)
		tickets[i], decisions[i] = tk, d
	}
	if err := errors.Join(errs...); err != nil {
		for _, t := range tickets {
			t.Cancel() // those admitted; the zero ticket of a refused one is a no-op
		}
		return nil, nil, err
	}
	return tickets, decisions, nil
}
