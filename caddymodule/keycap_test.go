package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// fakeLedger is a ledger of one balance, with open reservations, for keyLedger's tests.
type fakeLedger struct {
	credits.Ledger
	mu      sync.Mutex
	balance credits.Amount
	open    map[string]credits.Amount
	settled []credits.Usage
	next    int
}

func (f *fakeLedger) Reserve(_ context.Context, _ credits.AccountID, amount credits.Amount, _ time.Duration, _ *credits.Refill) (credits.Reservation, credits.Amount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.balance < amount {
		return credits.Reservation{}, f.balance, credits.ErrInsufficientCredits
	}
	f.balance -= amount
	f.next++
	id := fmt.Sprint("r", f.next)
	f.open[id] = amount
	return credits.Reservation{ID: id, Amount: amount}, f.balance, nil
}

func (f *fakeLedger) Settle(_ context.Context, id string, cost credits.Amount, u credits.Usage) (credits.Amount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.open[id]
	if !ok {
		return 0, credits.ErrReservationClosed
	}
	delete(f.open, id)
	f.balance += a - cost
	f.settled = append(f.settled, u)
	return f.balance, nil
}

func (f *fakeLedger) Release(_ context.Context, id string) (credits.Amount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.open[id]
	if !ok {
		return 0, credits.ErrReservationClosed
	}
	delete(f.open, id)
	f.balance += a
	return f.balance, nil
}

func newFakeKeyLedger(balance, spentBefore credits.Amount) (*keyLedger, *fakeLedger) {
	f := &fakeLedger{balance: balance, open: map[string]credits.Amount{}}
	return newKeyLedger(f, func(context.Context, string, time.Time) (credits.Amount, error) { return spentBefore, nil }), f
}

// TestKeyLedgerCapConcurrent: 20 concurrent reservations on a key whose cap covers 5: 5
// admitted, 15 refused by the cap, none by the balance; settling for less lets more in, never
// past the cap.
func TestKeyLedgerCapConcurrent(t *testing.T) {
	const per = 10 * credits.Credit
	l, f := newFakeKeyLedger(1000*credits.Credit, 0)
	ctx := withKey(context.Background(), keyUse{id: "k", cap: 5 * per})
	const n = 20
	res := make([]credits.Reservation, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { res[i], _, errs[i] = l.Reserve(ctx, "user:u", per, time.Minute, nil) })
	}
	wg.Wait()
	admitted := 0
	for _, err := range errs {
		var kc *keyCapReached
		switch {
		case err == nil:
			admitted++
		case !errors.As(err, &kc) || kc.cap != 5*per:
			t.Errorf("refusal %v, want the key's cap", err)
		}
	}
	if admitted != 5 {
		t.Fatalf("%d admitted, want 5", admitted)
	}
	// Settle them all for half: 2.5 reservations of room, so 2 more fit.
	for i, r := range res {
		if errs[i] == nil {
			if _, err := l.Settle(ctx, r.ID, per/2, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range 3 {
		_, _, err := l.Reserve(ctx, "user:u", per, time.Minute, nil)
		if (err == nil) != (i < 2) {
			t.Errorf("reservation %d after settling: %v", i, err)
		}
	}
	for _, u := range f.settled {
		if u.KeyID != "k" {
			t.Errorf("settled usage %+v does not name the key", u)
		}
	}
}

// TestKeyLedgerAllOrNone: when the balance refuses, the key's cap gets its room back; a
// release gives the room back too; what was spent before this process counts.
func TestKeyLedgerAllOrNone(t *testing.T) {
	const per = credits.Credit
	l, f := newFakeKeyLedger(per, 2*per)
	ctx := withKey(context.Background(), keyUse{id: "k", cap: 4 * per})
	r1, _, err := l.Reserve(ctx, "user:u", per, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The balance is empty now: refused by the balance, not by the cap (2 + 1 + 1 <= 4).
	if _, _, err := l.Reserve(ctx, "user:u", per, time.Minute, nil); !errors.Is(err, credits.ErrInsufficientCredits) {
		t.Fatalf("second reservation: %v, want the balance's refusal", err)
	}
	if _, err := l.Release(ctx, r1.ID); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.balance = 100 * per
	f.mu.Unlock()
	// Room: 4 - 2 spent = 2.
	if _, _, err := l.Reserve(ctx, "user:u", 2*per, time.Minute, nil); err != nil {
		t.Fatalf("reserving the room left: %v", err)
	}
	var kc *keyCapReached
	if _, _, err := l.Reserve(ctx, "user:u", 1, time.Minute, nil); !errors.As(err, &kc) || kc.spent != 2*per || kc.reserved != 2*per {
		t.Fatalf("over the cap: %v", err)
	}
	// Without a key, or with a key without a cap, nothing is limited.
	if _, _, err := l.Reserve(context.Background(), "user:u", 50*per, time.Minute, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := l.Reserve(withKey(context.Background(), keyUse{id: "free"}), "user:u", 10*per, time.Minute, nil); err != nil {
		t.Fatal(err)
	}
}

// TestKeyLedgerPeriod: spending restarts at each period.
func TestKeyLedgerPeriod(t *testing.T) {
	const per = credits.Credit
	l, _ := newFakeKeyLedger(100*per, 0)
	now := time.Date(2026, 5, 1, 23, 0, 0, 0, time.UTC)
	l.now = func() time.Time { return now }
	ctx := withKey(context.Background(), keyUse{id: "k", cap: 2 * per, period: "day"})
	for range 2 {
		r, _, err := l.Reserve(ctx, "user:u", per, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.Settle(ctx, r.ID, per, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := l.Reserve(ctx, "user:u", per, time.Minute, nil); err == nil {
		t.Fatal("over the day's cap")
	}
	now = now.Add(2 * time.Hour) // the next day
	if _, _, err := l.Reserve(ctx, "user:u", 2*per, time.Minute, nil); err != nil {
		t.Fatalf("a new day: %v", err)
	}
}

// TestKeyLedgerChain: the keys of one rotation chain share its cap (what the chain spent
// before this process counts once, asked by the chain's id), each settle entry names the key
// that spent, and another chain has its own cap.
func TestKeyLedgerChain(t *testing.T) {
	const per = credits.Credit
	f := &fakeLedger{balance: 100 * per, open: map[string]credits.Amount{}}
	var asked []string
	l := newKeyLedger(f, func(_ context.Context, chain string, _ time.Time) (credits.Amount, error) {
		asked = append(asked, chain)
		return per, nil
	})
	old := withKey(context.Background(), keyUse{id: "k1", chain: "k1", cap: 3 * per})
	next := withKey(context.Background(), keyUse{id: "k2", chain: "k1", cap: 3 * per})
	for _, ctx := range []context.Context{old, next} {
		r, _, err := l.Reserve(ctx, "user:u", per, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.Settle(ctx, r.ID, per, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
	// 1 before + 2 now = the cap of 3, whichever key asks.
	for _, ctx := range []context.Context{old, next} {
		var kc *keyCapReached
		if _, _, err := l.Reserve(ctx, "user:u", 1, time.Minute, nil); !errors.As(err, &kc) || kc.spent != 3*per {
			t.Errorf("over the chain's cap: %v", err)
		}
	}
	if len(asked) != 1 || asked[0] != "k1" {
		t.Errorf("spending read for %v, want once for chain k1", asked)
	}
	if len(f.settled) != 2 || f.settled[0].KeyID != "k1" || f.settled[1].KeyID != "k2" {
		t.Errorf("settled %+v, want one entry per key", f.settled)
	}
	if _, _, err := l.Reserve(withKey(context.Background(), keyUse{id: "k9", chain: "k9", cap: 3 * per}), "user:u", 2*per, time.Minute, nil); err != nil {
		t.Errorf("another chain: %v", err)
	}
}
