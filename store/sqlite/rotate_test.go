package sqlite

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

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

// TestUsageByDayAcrossDays, on the injected clock: the usage report groups by UTC day, newest
// first (the conformance suite checks the rest of ChainSpent and UsageByDay on the real clock).
func TestUsageByDayAcrossDays(t *testing.T) {
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
