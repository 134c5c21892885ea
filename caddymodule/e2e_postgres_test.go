package caddymodule_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
)

// postgresAccounts reads every account's books from the PostgreSQL store at dsn, independently
// of the gateway: the spendable balance (the column less what is reserved), the sums of the
// entries, and what is open: reservations in the database, and leases (an instance's chunks,
// from which it reserves in memory; not counted as reservations).
func postgresAccounts(t testing.TB, dsn string) []dbAccount {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connecting to the store: %v", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `SELECT a.id, a.balance - a.reserved,
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind IN ('credit', 'grant')),
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		(SELECT coalesce(sum(amount), 0) FROM reservations WHERE account_id = a.id) +
			(SELECT coalesce(sum(amount), 0) FROM leases WHERE account_id = a.id),
		(SELECT count(*) FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		(SELECT count(*) FROM reservations WHERE account_id = a.id)
		FROM accounts AS a ORDER BY a.id`)
	if err != nil {
		t.Fatalf("reading the accounts: %v", err)
	}
	defer rows.Close()
	var out []dbAccount
	for rows.Next() {
		var a dbAccount
		var balance, credited, settled, opened int64
		if err := rows.Scan(&a.id, &balance, &credited, &settled, &opened, &a.settleEntries, &a.reservations); err != nil {
			t.Fatal(err)
		}
		a.balance, a.credited, a.settled, a.opened = credits.Amount(balance), credits.Amount(credited), credits.Amount(settled), credits.Amount(opened)
		out = append(out, a)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestPostgresStore: the gateway on `store postgres <dsn>`, with and without leases, serves
// what it serves on the embedded store: a user and a key made through the admin API, chat and embeddings charged,
// a key revoked, the books exact in the database.
func TestPostgresStore(t *testing.T) {
	for _, leased := range []bool{false, true} {
		name := "direct"
		if leased {
			name = "leased"
		}
		t.Run(name, func(t *testing.T) { testPostgresStore(t, leased) })
	}
}

func testPostgresStore(t *testing.T, leased bool) {
	s := walkSetup
	s.dsn = pgtest.NewDatabase(t)
	if leased {
		s.storeBlock = "lease_size 0.5"
	}
	e := startGateway(t, s)
	u, k := e.userWithKey("pg@example.com", "10")
	var spent credits.Amount
	for _, body := range []string{
		`{"model":"oai-chat","messages":[{"role":"user","content":"one two three"}],"max_tokens":4}`,
		`{"model":"oai-chat","messages":[{"role":"user","content":"one two"}],"max_tokens":4,"stream":true}`,
		`{"model":"ol-chat","messages":[{"role":"user","content":"one"}],"max_tokens":4}`,
	} {
		r := e.post("/v1/chat/completions", body, bearer(k.Key))
		if r.status != http.StatusOK {
			t.Fatalf("%s: %s", body, r)
		}
	}
	r := e.post("/v1/embeddings", `{"model":"oai-emb","input":"one two"}`, bearer(k.Key))
	if r.status != http.StatusOK {
		t.Fatalf("embeddings: %s", r)
	}
	st := e.settlements(u.ID)
	if len(st) != 4 {
		t.Fatalf("%d settle entries, want 4", len(st))
	}
	for _, s := range st {
		spent += s.Amount
	}
	if got, want := e.balance(u.ID), credits.Amount(10*credits.Credit)-spent; got != want {
		t.Errorf("balance %s, want %s", got, want)
	}
	e.adminCall(http.MethodDelete, "/llm_gateway/keys/"+k.ID, nil, http.StatusOK, nil, nil)
	if r := e.post("/v1/chat/completions", `{"model":"oai-chat","messages":[{"role":"user","content":"x"}]}`, bearer(k.Key)); r.status != http.StatusUnauthorized {
		t.Errorf("a revoked key: %s", r)
	}
	e.checkAllAccounts(0)
}
