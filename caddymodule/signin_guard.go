package caddymodule

import (
	"context"
	"errors"
	"net/http"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// What keeps the sign-in safe to expose: argon2id takes 64 MiB per password check, so the
// checks running at once are bounded process-wide (passwordHashing); the sign-in and sign-up
// throttles key a client by its anonymous identity (an IPv4 address, an IPv6 /64), so that one
// host cannot rotate through its /64 past them (signinAddress).

// passwordHashSlots is how many password hashes (argon2id, 64 MiB each) may run at once in the
// process: max(2, GOMAXPROCS). More would not finish sooner, only take more memory.
var passwordHashSlots = max(2, runtime.GOMAXPROCS(0))

// passwordHashWait is the longest a sign-in or sign-up waits for a hashing slot before it is
// answered 503 with Retry-After.
var passwordHashWait = 2 * time.Second

// passwordHashing bounds the password hashes of every gateway of the process.
var passwordHashing = newHashSlots(passwordHashSlots)

// errHashBusy: every password hashing slot stayed taken for passwordHashWait (503).
var errHashBusy = errors.New("too many sign-ins at once")

// hashBusyRetry is the Retry-After of a 503 for errHashBusy, in seconds.
const hashBusyRetry = "2"

// hashSlots is a semaphore for password hashes, counting the most held at once (for tests and
// for nothing else).
type hashSlots struct {
	slots chan struct{}
	held  atomic.Int64
	peak  atomic.Int64
}

func newHashSlots(n int) *hashSlots { return &hashSlots{slots: make(chan struct{}, n)} }

// do runs fn holding a slot, waiting passwordHashWait at most for one: errHashBusy when none
// came free, the context's error when it ended first.
func (h *hashSlots) do(ctx context.Context, fn func()) error {
	wait := time.NewTimer(passwordHashWait)
	defer wait.Stop()
	select {
	case h.slots <- struct{}{}:
	case <-wait.C:
		return errHashBusy
	case <-ctx.Done():
		return ctx.Err()
	}
	n := h.held.Add(1)
	for p := h.peak.Load(); n > p && !h.peak.CompareAndSwap(p, n); p = h.peak.Load() {
	}
	defer func() {
		h.held.Add(-1)
		<-h.slots
	}()
	fn()
	return nil
}

// signinAddress is the key of the request's client in the sign-in and sign-up throttles: its
// anonymous identity (identity.AnonymousKey), an IPv6 /64 for IPv6 clients.
func signinAddress(r *http.Request) string {
	return identity.AnonymousKey(clientAddr(r))
}
