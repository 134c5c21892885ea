package sqlite

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// liveKeys are the ids of the user's keys neither revoked nor expired at now.
func liveKeys(t *testing.T, s *Store, now time.Time) []string {
	t.Helper()
	keys, err := s.KeysByUser(context.Background(), "u1")
	if err != nil {
		t.Fatal(err)
	}
	var live []string
	for _, k := range keys {
		if k.RevokedAt == nil && (k.ExpiresAt == nil || now.Before(*k.ExpiresAt)) {
			live = append(live, k.ID)
		}
	}
	slices.Sort(live)
	return live
}

func TestRotateKey(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	now := clock.Now()
	k1 := testKey("k1", "one", now)
	k1.ExpiresAt = nil
	if err := s.CreateKey(ctx, k1); err != nil {
		t.Fatal(err)
	}
	grace := now.Add(time.Hour)
	k2 := testKey("k2", "two", now)
	changed, err := s.RotateKey(ctx, "k1", k2, now, grace)
	if err != nil || !slices.Equal(changed, []string{"k1"}) {
		t.Fatalf("rotate: %v, %v", changed, err)
	}
	old, err := s.KeyByID(ctx, "k1")
	if err != nil {
		t.Fatal(err)
	}
	if old.RotatedTo != "k2" || old.DeprecatedAt == nil || !old.DeprecatedAt.Equal(now) || old.ExpiresAt == nil || !old.ExpiresAt.Equal(grace) {
		t.Errorf("old key after rotation: %+v", old)
	}
	if got, err := s.KeyByID(ctx, "k2"); err != nil || got.Name != k2.Name || got.CreditCap != k2.CreditCap {
		t.Errorf("new key: %+v, %v", got, err)
	}
	if live := liveKeys(t, s, now); !slices.Equal(live, []string{"k1", "k2"}) {
		t.Errorf("live during grace: %v", live)
	}
	if live := liveKeys(t, s, grace); !slices.Equal(live, []string{"k2"}) {
		t.Errorf("live after grace: %v", live)
	}

	// Rotating k1 again, a revoked key or an unknown one stores nothing.
	if _, err := s.RotateKey(ctx, "k1", testKey("k9", "nine", now), now, grace); !errors.Is(err, identity.ErrNotRotatable) || !errors.Is(err, identity.ErrConflict) {
		t.Errorf("second rotation: %v", err)
	}
	if _, err := s.KeyByID(ctx, "k9"); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("the refused rotation stored its key: %v", err)
	}
	if _, err := s.RotateKey(ctx, "nope", testKey("k9", "nine", now), now, grace); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("unknown key: %v", err)
	}

	// Rotating k2 during k1's grace: k1 stops now, so only k2 (in its grace) and k3 live.
	later := now.Add(time.Minute)
	k3 := testKey("k3", "three", later)
	changed, err = s.RotateKey(ctx, "k2", k3, later, later.Add(time.Hour))
	if err != nil || !slices.Equal(changed, []string{"k2", "k1"}) {
		t.Fatalf("second link: %v, %v", changed, err)
	}
	if live := liveKeys(t, s, later); !slices.Equal(live, []string{"k2", "k3"}) {
		t.Errorf("live after the second rotation: %v", live)
	}
	// The grace never extends an earlier expiry.
	k3exp := *k3.ExpiresAt
	if _, err := s.RotateKey(ctx, "k3", testKey("k4", "four", later), later, k3exp.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.KeyByID(ctx, "k3"); !got.ExpiresAt.Equal(k3exp) {
		t.Errorf("grace moved the expiry from %s to %s", k3exp, got.ExpiresAt)
	}
	// Revoked or expired keys are not rotated.
	if err := s.RevokeKey(ctx, "k4", later); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RotateKey(ctx, "k4", testKey("k5", "five", later), later, later); !errors.Is(err, identity.ErrNotRotatable) {
		t.Errorf("rotating a revoked key: %v", err)
	}
}

// TestKeyChains: a created key starts its own chain (whatever ChainID it was given); each
// rotation puts the new key in the old key's chain.
func TestKeyChains(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	now := clock.Now()
	k1 := testKey("k1", "one", now)
	k1.ChainID = "elsewhere"
	if err := s.CreateKey(ctx, k1); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKey(ctx, testKey("other", "other", now)); err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{"k2", "k3", "k4"} {
		next := testKey(id, id, now)
		next.ChainID = "elsewhere"
		if _, err := s.RotateKey(ctx, fmt.Sprintf("k%d", i+1), next, now, now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	for id, want := range map[string]string{"k1": "k1", "k2": "k1", "k3": "k1", "k4": "k1", "other": "other"} {
		if k, err := s.KeyByID(ctx, id); err != nil || k.ChainID != want {
			t.Errorf("key %s: chain %q, %v; want %q", id, k.ChainID, err, want)
		}
	}
}

// TestChainsOfExistingKeys: migration 0005 gives the keys stored before it their chains, from
// the rotations recorded.
func TestChainsOfExistingKeys(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{})
	if err := s.CreateUser(ctx, identity.User{ID: "u1", Email: "u1@example.com"}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, id := range []string{"a1", "b1"} {
		if err := s.CreateKey(ctx, testKey(id, id, now)); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range [][2]string{{"a1", "a2"}, {"a2", "a3"}, {"b1", "b2"}} {
		if _, err := s.RotateKey(ctx, r[0], testKey(r[1], r[1], now), now, now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db := openRawForTest(t, path)
	for _, stmt := range []string{
		`DELETE FROM schema_migrations WHERE version >= 5`,
		`DROP INDEX ledger_by_response`, // migration 0006
		`ALTER TABLE ledger DROP COLUMN cached_input_tokens`,
		`ALTER TABLE ledger DROP COLUMN cache_write_tokens`,
		`ALTER TABLE ledger DROP COLUMN reasoning_tokens`,
		`ALTER TABLE ledger DROP COLUMN response_id`,
		`DROP INDEX api_keys_by_chain`,
		`ALTER TABLE api_keys DROP COLUMN chain_id`,
	} {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
	}
	db.Close()

	s = openAt(t, path, Options{})
	defer s.Close()
	for id, want := range map[string]string{"a1": "a1", "a2": "a1", "a3": "a1", "b1": "b1", "b2": "b1"} {
		if k, err := s.KeyByID(ctx, id); err != nil || k.ChainID != want {
			t.Errorf("key %s: chain %q, %v; want %q", id, k.ChainID, err, want)
		}
	}
}

// TestConcurrentRotations: 20 rotations of one key at once: one wins, the others get
// ErrNotRotatable, and two keys are live.
func TestConcurrentRotations(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	now := clock.Now()
	if err := s.CreateKey(ctx, testKey("k0", "zero", now)); err != nil {
		t.Fatal(err)
	}
	const n = 20
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, errs[i] = s.RotateKey(ctx, "k0", testKey(fmt.Sprintf("n%02d", i), fmt.Sprint("secret", i), now), now, now.Add(time.Hour))
		})
	}
	wg.Wait()
	won := 0
	for i, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, identity.ErrNotRotatable):
			t.Errorf("rotation %d: %v", i, err)
		}
	}
	if won != 1 {
		t.Errorf("%d rotations won, want 1", won)
	}
	if live := liveKeys(t, s, now); len(live) != 2 {
		t.Errorf("live keys %v, want 2", live)
	}
}

func TestChainSpentAndUsageByDay(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	account := credits.UserAccount("u1")
	credit(t, s, account, 100*c)
	day1 := clock.Now()
	settle := func(key, model string, cost credits.Amount) {
		t.Helper()
		r := reserve(t, s, account, cost, time.Minute)
		if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: model, InputTokens: 1, OutputTokens: 2, KeyID: key}); err != nil {
			t.Fatal(err)
		}
	}
	// ka and its successor ka2 are one chain; kb another.
	for _, id := range []string{"ka", "kb"} {
		if err := s.CreateKey(ctx, testKey(id, id, day1)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.RotateKey(ctx, "ka", testKey("ka2", "ka2", day1), day1, day1.Add(48*time.Hour)); err != nil {
		t.Fatal(err)
	}
	settle("ka", "m1", 1*c)
	settle("ka", "m2", 2*c)
	settle("kb", "m1", 4*c)
	clock.Advance(24 * time.Hour)
	day2 := clock.Now()
	settle("ka2", "m1", 8*c)
	settle("", "m1", 16*c)

	for _, tc := range []struct {
		key   string
		since time.Time
		want  credits.Amount
	}{
		{"ka", time.Time{}, 11 * c},
		{"ka", day2, 8 * c},
		{"ka2", time.Time{}, 0}, // a chain is named by its first key
		{"kb", time.Time{}, 4 * c},
		{"kb", day2, 0},
		{"nobody", time.Time{}, 0},
	} {
		if got, err := s.ChainSpent(ctx, tc.key, tc.since); err != nil || got != tc.want {
			t.Errorf("ChainSpent(%s, %s) = %s, %v; want %s", tc.key, tc.since, got, err, tc.want)
		}
	}
	entries, err := s.Entries(ctx, account, 1)
	if err != nil || len(entries) != 1 || entries[0].Usage == nil || entries[0].Usage.KeyID != "" {
		t.Errorf("newest entry %+v, %v", entries, err)
	}
	if entries, _ := s.Entries(ctx, account, 2); entries[1].Usage.KeyID != "ka2" {
		t.Errorf("settle entry key %q, want ka2", entries[1].Usage.KeyID)
	}

	usage, err := s.UsageByDay(ctx, account, day1.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	d1, d2 := day1.UTC().Format(time.DateOnly), day2.UTC().Format(time.DateOnly)
	want := []credits.UsageDay{
		{Day: d2, Model: "m1", Requests: 2, InputTokens: 2, OutputTokens: 4, Credits: 24 * c},
		{Day: d1, Model: "m1", Requests: 2, InputTokens: 2, OutputTokens: 4, Credits: 5 * c},
		{Day: d1, Model: "m2", Requests: 1, InputTokens: 1, OutputTokens: 2, Credits: 2 * c},
	}
	if !slices.Equal(usage, want) {
		t.Errorf("usage %+v, want %+v", usage, want)
	}
	if usage, _ := s.UsageByDay(ctx, account, day2); len(usage) != 1 {
		t.Errorf("usage since day 2: %+v", usage)
	}
}
