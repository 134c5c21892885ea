package caddymodule

import (
	"context"
	crand "crypto/rand"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
)

// testRedisAddr is the Redis of the tests (.ci/run starts it when it is not running).
const testRedisAddr = "127.0.0.1:6379"

// testRedisClient is a client of the test Redis and a key prefix of the test's own, whose keys
// are deleted at the end. Without Redis the test is skipped outside CI, and fails in CI.
func testRedisClient(t *testing.T) (*redis.Client, string) {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: testRedisAddr})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		_ = rdb.Close()
		if !pgtest.InCI() {
			t.Skipf("no redis at %s (%v): start one to run the Redis tests (in CI they fail)", testRedisAddr, err)
		}
		t.Fatalf("redis at %s (CI is set): %v", testRedisAddr, err)
	}
	prefix := "llmgw-test-" + strings.ToLower(crand.Text()) + ":"
	t.Cleanup(func() {
		ctx := context.Background()
		iter := rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
		_ = rdb.Close()
	})
	return rdb, prefix
}

// testRedis is a sharedRedis on the test Redis with a prefix of the test's own.
func testRedis(t *testing.T) *sharedRedis {
	rdb, prefix := testRedisClient(t)
	return &sharedRedis{rdb: rdb, prefix: prefix, timeout: 2 * time.Second, logger: zap.NewNop()}
}

// TestSharedCapTwoInstances: two instances (two keyLedgers, each its own memory) over one
// ledger, the cap kept on Redis: 40 concurrent reservations of a key whose cap covers 5, spread
// over both, admit 5 in all (in-process accounts would admit 5 on each); settling for less
// lets more in on either, never past the cap; what was spent before (the ledger's) counts.
func TestSharedCapTwoInstances(t *testing.T) {
	const per = 10 * credits.Credit
	r := testRedis(t)
	caps := newSharedCaps(r, time.Minute)
	f := &fakeLedger{balance: 1000 * credits.Credit, open: map[string]credits.Amount{}}
	spentBefore := func(context.Context, string, time.Time) (credits.Amount, error) { return per, nil }
	a, b := newKeyLedger(f, spentBefore), newKeyLedger(f, spentBefore)
	ctx := withKey(context.Background(), keyUse{id: "k", chain: "c", cap: 6 * per, shared: caps})
	const n = 40
	res := make([]credits.Reservation, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		l := a
		if i%2 == 1 {
			l = b
		}
		wg.Go(func() { res[i], _, errs[i] = l.Reserve(ctx, "user:u", per, time.Minute, nil) })
	}
	wg.Wait()
	var held []int
	for i, err := range errs {
		var kc *keyCapReached
		switch {
		case err == nil:
			held = append(held, i)
		case errors.As(err, &kc):
			if kc.spent != per || kc.spent+kc.reserved+per <= kc.cap {
				t.Fatalf("refusal %+v does not show the cap reached", kc)
			}
		default:
			t.Fatalf("reservation %d: %v", i, err)
		}
	}
	if len(held) != 5 {
		t.Fatalf("%d reservations admitted across two instances, want 5 (cap 6, 1 spent before)", len(held))
	}
	// Settled for half on the instance that did not reserve them (the held map is per
	// instance: settle each where it was made), then one more fits on the other.
	for _, i := range held[:2] {
		l := a
		if i%2 == 1 {
			l = b
		}
		if _, err := l.Settle(ctx, res[i].ID, per/2, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := b.Reserve(ctx, "user:u", per, time.Minute, nil); err != nil {
		t.Fatalf("after settling two for half, one more should fit: %v", err)
	}
	var kc *keyCapReached
	if _, _, err := a.Reserve(ctx, "user:u", per, time.Minute, nil); !errors.As(err, &kc) {
		t.Fatalf("past the cap on the other instance: %v", err)
	}
	// Released ones give the cap back, and so does a refusal by the balance.
	for _, i := range held[2:] {
		l := a
		if i%2 == 1 {
			l = b
		}
		if _, err := l.Release(ctx, res[i].ID); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.Lock()
	f.balance = 0
	f.mu.Unlock()
	if _, _, err := a.Reserve(ctx, "user:u", per, time.Minute, nil); !errors.Is(err, credits.ErrInsufficientCredits) {
		t.Fatalf("with no balance: %v", err)
	}
	f.mu.Lock()
	f.balance = 1000 * credits.Credit
	f.mu.Unlock()
	// spent 1 + 2×0.5 = 2, reserved 1 (the one on b): 3 more fit, not 4.
	for i := range 3 {
		if _, _, err := a.Reserve(ctx, "user:u", per, time.Minute, nil); err != nil {
			t.Fatalf("reservation %d after the releases: %v", i, err)
		}
	}
	if _, _, err := b.Reserve(ctx, "user:u", per, time.Minute, nil); !errors.As(err, &kc) {
		t.Fatalf("past the cap: %v", err)
	}
}

// TestSharedCapCrashedAndLost: a reservation whose instance crashed (never settled) stops
// counting after the reservation TTL; a counter Redis lost is rebuilt from the ledger's
// record (ChainSpent) on the next reservation.
func TestSharedCapCrashedAndLost(t *testing.T) {
	const per = 10 * credits.Credit
	r := testRedis(t)
	caps := newSharedCaps(r, 300*time.Millisecond)
	f := &fakeLedger{balance: 1000 * credits.Credit, open: map[string]credits.Amount{}}
	var mu sync.Mutex
	ledgerSpent := credits.Amount(0)
	spent := func(context.Context, string, time.Time) (credits.Amount, error) {
		mu.Lock()
		defer mu.Unlock()
		return ledgerSpent, nil
	}
	crashed, live := newKeyLedger(f, spent), newKeyLedger(f, spent)
	ctx := withKey(context.Background(), keyUse{id: "k", cap: 2 * per, period: "day", shared: caps})
	for range 2 {
		if _, _, err := crashed.Reserve(ctx, "user:u", per, time.Minute, nil); err != nil {
			t.Fatal(err)
		}
	}
	var kc *keyCapReached
	if _, _, err := live.Reserve(ctx, "user:u", per, time.Minute, nil); !errors.As(err, &kc) {
		t.Fatalf("the crashed instance's reservations should count until they expire: %v", err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		_, _, err := live.Reserve(ctx, "user:u", per, time.Minute, nil)
		if err == nil {
			break
		}
		if !errors.As(err, &kc) || time.Now().After(deadline) {
			t.Fatalf("the crashed instance's reservations never expired: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Redis loses the chain's keys; the ledger has two settled by now: they count again.
	iter := r.rdb.Scan(context.Background(), 0, r.prefix+"cap:*", 100).Iterator()
	for iter.Next(context.Background()) {
		r.rdb.Del(context.Background(), iter.Val())
	}
	mu.Lock()
	ledgerSpent = 2 * per
	mu.Unlock()
	if _, _, err := live.Reserve(ctx, "user:u", per, time.Minute, nil); !errors.As(err, &kc) || kc.spent != 2*per {
		t.Fatalf("after the counter was lost, the ledger's spending should refuse: %v (%+v)", err, kc)
	}
}
