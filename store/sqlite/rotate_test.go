package sqlite

import (
	"context"
	"errors"
	"fmt"
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

func TestKeySpentAndUsageByDay(t *testing.T) {
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
	settle("ka", "m1", 1*c)
	settle("ka", "m2", 2*c)
	settle("kb", "m1", 4*c)
	clock.Advance(24 * time.Hour)
	day2 := clock.Now()
	settle("ka", "m1", 8*c)
	settle("", "m1", 16*c)

	for _, tc := range []struct {
		key   string
		since time.Time
		want  credits.Amount
	}{
		{"ka", time.Time{}, 11 * c},
		{"ka", day2, 8 * c},
		{"kb", time.Time{}, 4 * c},
		{"kb", day2, 0},
		{"nobody", time.Time{}, 0},
	} {
		if got, err := s.KeySpent(ctx, tc.key, tc.since); err != nil || got != tc.want {
			t.Errorf("KeySpent(%s, %s) = %s, %v; want %s", tc.key, tc.since, got, err, tc.want)
		}
	}
	entries, err := s.Entries(ctx, account, 1)
	if err != nil || len(entries) != 1 || entries[0].Usage == nil || entries[0].Usage.KeyID != "" {
		t.Errorf("newest entry %+v, %v", entries, err)
	}
	if entries, _ := s.Entries(ctx, account, 2); entries[1].Usage.KeyID != "ka" {
		t.Errorf("settle entry key %q, want ka", entries[1].Usage.KeyID)
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
