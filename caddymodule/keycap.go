package caddymodule

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// keyLedger is the store's ledger with what API keys add to it: every reservation made with a
// key (named in the context by withKey) is remembered until it is closed, so that its settle
// entry names the key (credits.Usage.KeyID), and a key with a credit cap is admitted only
// while what its rotation chain spent in the cap's period plus what the chain holds reserved
// plus the new amount fits under the cap. The cap belongs to the chain (identity.Key.ChainID),
// not to one key of it: a rotation does not start the spending again, and the old key and the
// new one share the cap during the grace period.
//
// The cap is exact under concurrency, and all-or-none with the balance: each chain of a capped
// key has an in-memory account of spent (in the current period) and reserved credits. Reserve
// takes the amount into the chain's reserved under the chain's lock, checking the cap in the
// same critical section, and only then asks the ledger for the balance; if the ledger refuses,
// the amount is given back. Settle moves the reservation from reserved to spent by the real
// cost; Release gives it back. So at every moment spent + reserved <= cap, whatever the
// interleaving. A chain's spent is loaded from the ledger's settle entries naming one of its
// keys (ChainSpent) the first time one of its keys reserves in this process, and restarts from
// zero when a new period begins. The embedded store belongs to one process, so this process
// sees every reservation of the chain; a refusal by the cap can only be pessimistic, never
// optimistic, while another reservation of the chain is being refused by the balance. With
// Redis (keyUse.shared), the account of a chain is kept on Redis instead, for every instance
// (sharedCaps), with the same order: the cap first, then the balance.
type keyLedger struct {
	credits.Ledger
	// spent is what the keys of a chain spent since a time, from the store's settle entries.
	spent func(ctx context.Context, chainID string, since time.Time) (credits.Amount, error)

	mu   sync.Mutex
	caps map[string]*keySpending // by chain id, chains of capped keys only
	held map[string]heldByKey    // by reservation id, open reservations made with a key
	now  func() time.Time        // the clock of cap periods
}

// keySpending is the in-memory account of the chain of one capped key.
type keySpending struct {
	mu       sync.Mutex
	loaded   bool
	every    string    // the cap's period ("" for the key's whole life)
	period   time.Time // start of the period spent counts
	spent    credits.Amount
	reserved credits.Amount
}

// heldByKey is an open reservation made with a key.
type heldByKey struct {
	keyID  string
	amount credits.Amount
	capped *keySpending // nil for a key without a cap
	// shared is the reservation's place under a cap kept on Redis (capped is nil then).
	shared *sharedHold
	caps   *sharedCaps
}

// keyUse is the key a reservation is made with, its chain and its cap.
type keyUse struct {
	id     string
	chain  string         // the key's ChainID ("": the key is alone in its chain)
	cap    credits.Amount // 0: no cap
	period string
	// shared, when set, keeps the cap on Redis for every instance.
	shared *sharedCaps
}

// chainID names the spending k's cap counts: its chain's.
func (k keyUse) chainID() string {
	if k.chain == "" {
		return k.id
	}
	return k.chain
}

type keyUseCtx struct{}

// withKey names the key the reservations made with ctx are made with.
func withKey(ctx context.Context, k keyUse) context.Context {
	return context.WithValue(ctx, keyUseCtx{}, k)
}

// keyCapReached is a reservation refused by its key's credit cap (402 insufficient_credits).
type keyCapReached struct {
	cap, spent, reserved credits.Amount
	required             credits.Amount
	period               string
}

func (e *keyCapReached) Error() string {
	per := ""
	if e.period != "" {
		per = " per " + e.period
	}
	return fmt.Sprintf("this api key may spend at most %s credits%s: it spent %s and holds %s for requests in flight",
		e.cap, per, e.spent, e.reserved)
}

// room is what the key may still reserve.
func (e *keyCapReached) room() credits.Amount { return max(e.cap-e.spent-e.reserved, 0) }

func newKeyLedger(l credits.Ledger, spent func(context.Context, string, time.Time) (credits.Amount, error)) *keyLedger {
	return &keyLedger{Ledger: l, spent: spent, caps: map[string]*keySpending{}, held: map[string]heldByKey{}, now: time.Now}
}

// Reserve reserves as the ledger does; with a key in ctx it remembers the reservation, and
// with a capped key it first holds the amount under the cap (*keyCapReached when it does not
// fit).
func (l *keyLedger) Reserve(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill) (credits.Reservation, credits.Amount, error) {
	k, ok := ctx.Value(keyUseCtx{}).(keyUse)
	if !ok {
		return l.Ledger.Reserve(ctx, account, amount, ttl, refill)
	}
	var ks *keySpending
	var sh *sharedHold
	switch {
	case k.cap > 0 && k.shared != nil:
		var err error
		if sh, err = k.shared.hold(ctx, l, k, amount); err != nil {
			return credits.Reservation{}, 0, err
		}
	case k.cap > 0:
		ks = l.spending(k.chainID())
		if err := l.hold(ctx, ks, k, amount); err != nil {
			return credits.Reservation{}, 0, err
		}
	}
	res, balance, err := l.Ledger.Reserve(ctx, account, amount, ttl, refill)
	if err != nil {
		if ks != nil {
			ks.mu.Lock()
			ks.reserved -= amount
			ks.mu.Unlock()
		}
		if sh != nil {
			k.shared.release(ctx, sh)
		}
		return res, balance, err
	}
	l.mu.Lock()
	l.held[res.ID] = heldByKey{keyID: k.id, amount: amount, capped: ks, shared: sh, caps: k.shared}
	l.mu.Unlock()
	return res, balance, nil
}

// spending is the account of the chain of a capped key, made on first use.
func (l *keyLedger) spending(id string) *keySpending {
	l.mu.Lock()
	defer l.mu.Unlock()
	ks := l.caps[id]
	if ks == nil {
		ks = &keySpending{}
		l.caps[id] = ks
	}
	return ks
}

// hold takes amount into the key's reserved credits if it fits under the cap.
func (l *keyLedger) hold(ctx context.Context, ks *keySpending, k keyUse, amount credits.Amount) error {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	start := identity.CapPeriodStart(k.period, l.now())
	if !ks.loaded {
		// No reservation of this chain was made in this process yet: the ledger knows all it spent.
		spent, err := l.spent(ctx, k.chainID(), start)
		if err != nil {
			return err
		}
		ks.loaded, ks.every, ks.period, ks.spent = true, k.period, start, spent
	}
	l.roll(ks, start)
	if ks.spent+ks.reserved+amount > k.cap {
		return &keyCapReached{cap: k.cap, spent: ks.spent, reserved: ks.reserved, required: amount, period: k.period}
	}
	ks.reserved += amount
	return nil
}

// roll starts a new period of spending when start is past the key's; ks is locked.
func (l *keyLedger) roll(ks *keySpending, start time.Time) {
	if start.After(ks.period) {
		ks.period, ks.spent = start, 0
	}
}

// take forgets the open reservation id made with a key, and reports it.
func (l *keyLedger) take(id string) (heldByKey, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	h, ok := l.held[id]
	delete(l.held, id)
	return h, ok
}

// Settle settles as the ledger does, with the key in the usage, and moves the reservation of
// a capped key from its reserved to its spent credits by the cost.
func (l *keyLedger) Settle(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	h, ok := l.take(reservationID)
	if ok {
		usage.KeyID = h.keyID
	}
	balance, err := l.Ledger.Settle(ctx, reservationID, cost, usage)
	if ok && h.shared != nil {
		if err == nil {
			h.caps.settle(ctx, l, h.shared, cost)
		} else {
			h.caps.release(ctx, h.shared)
		}
	}
	if ok && h.capped != nil {
		ks := h.capped
		ks.mu.Lock()
		ks.reserved -= h.amount
		if err == nil {
			l.roll(ks, identity.CapPeriodStart(ks.every, l.now()))
			ks.spent += cost
		}
		ks.mu.Unlock()
	}
	return balance, err
}

// Release releases as the ledger does, and gives a capped key its reservation back.
func (l *keyLedger) Release(ctx context.Context, reservationID string) (credits.Amount, error) {
	h, ok := l.take(reservationID)
	balance, err := l.Ledger.Release(ctx, reservationID)
	if ok && h.shared != nil {
		h.caps.release(ctx, h.shared)
	}
	if ok && h.capped != nil {
		h.capped.mu.Lock()
		h.capped.reserved -= h.amount
		h.capped.mu.Unlock()
	}
	return balance, err
}
