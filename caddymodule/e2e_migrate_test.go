package caddymodule_test

import (
	"context"
	"encoding/json"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/transfer"
)

// TestMigrateStoreCommand: `caddy llm-gateway migrate-store` copies a stopped embedded store
// into PostgreSQL (the DSN read from the environment, its password never printed), prints the
// summary and exits 0; it exits non-zero, saying why, for a target that holds data and for a
// source an instance holds.
func TestMigrateStoreCommand(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "gateway.db")
	src, err := sqlite.Open(ctx, path, sqlite.Options{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := src.CreateUser(ctx, identity.User{ID: "u1", Email: "a@example.com", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	account := credits.UserAccount("u1")
	if _, _, err := src.Credit(ctx, account, 5*credits.Credit, "seed", "seed-1"); err != nil {
		t.Fatal(err)
	}
	r, _, err := src.Reserve(ctx, account, credits.Credit, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Settle(ctx, r.ID, 250_000, credits.Usage{Model: "m", InputTokens: 3, OutputTokens: 4}); err != nil {
		t.Fatal(err)
	}

	const password = "pw-never-printed"
	u, err := url.Parse(pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), password) // trust authentication ignores it
	dsn := u.String()
	t.Setenv("LLMGW_TEST_MIGRATE_DSN", dsn)
	args := []string{"llm-gateway", "migrate-store", "--from", path, "--to", "{env.LLMGW_TEST_MIGRATE_DSN}"}
	noSecret := func(what, out string) {
		t.Helper()
		if strings.Contains(out, password) {
			t.Errorf("%s prints the DSN's password:\n%s", what, out)
		}
	}

	// The source is in use: refused.
	stdout, stderr, err := runCLI(t, dir, args...)
	if err == nil || !strings.Contains(stderr, "in use") {
		t.Errorf("migrate-store of a store in use: %v\nstdout %s\nstderr %s", err, stdout, stderr)
	}
	noSecret("a refusal", stdout+stderr)
	t.Logf("source in use: %s", stderr)
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}

	stdout, stderr, err = runCLI(t, dir, args...)
	if err != nil {
		t.Fatalf("migrate-store: %v\nstdout %s\nstderr %s", err, stdout, stderr)
	}
	noSecret("migrate-store", stdout+stderr)
	var sum transfer.Summary
	if err := json.Unmarshal([]byte(stdout), &sum); err != nil {
		t.Fatalf("summary is not JSON: %v\n%s", err, stdout)
	}
	if !sum.Committed || sum.Accounts != 1 || sum.Tables["users"] != 1 || sum.Tables["ledger"] != 2 ||
		sum.Credited != 5*credits.Credit || sum.Settled != 250_000 || sum.Balance != 5*credits.Credit-250_000 || len(sum.Mismatches) > 0 {
		t.Errorf("summary %+v", sum)
	}
	pg, err := postgres.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	if a, err := pg.Audit(ctx, account); err != nil || a != (credits.Audit{Credited: 5 * credits.Credit, Settled: 250_000, Balance: 5*credits.Credit - 250_000}) {
		t.Errorf("migrated audit %+v, %v", a, err)
	}

	// Again, into the database that now holds the data: refused, nothing merged.
	stdout, stderr, err = runCLI(t, dir, args...)
	if err == nil || !strings.Contains(stderr, "not empty") {
		t.Errorf("migrate-store into a non-empty database: %v\nstdout %s\nstderr %s", err, stdout, stderr)
	}
	noSecret("a refusal", stdout+stderr)
	t.Logf("target not empty: %s", stderr)
	if a, err := pg.Audit(ctx, account); err != nil || a.Credited != 5*credits.Credit {
		t.Errorf("a refused migration changed the target: %+v, %v", a, err)
	}
}
