// Package pgtest gives a test a PostgreSQL database of its own, on the server the tests use:
// 127.0.0.1:5432 as user postgres (trust authentication, as on the CI machine), or the URL in
// LLM_GATEWAY_TEST_POSTGRES. Without a reachable server the test is skipped outside CI, and
// fails in CI.
package pgtest

import (
	"context"
	"crypto/rand"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// ServerEnv names the PostgreSQL server the tests use, as a URL without a database name.
const ServerEnv = "LLM_GATEWAY_TEST_POSTGRES"

// URL is the URL of the database name on the test server.
func URL(database string) string {
	base := os.Getenv(ServerEnv)
	if base == "" {
		base = "postgres://postgres@127.0.0.1:5432"
	}
	return strings.TrimSuffix(base, "/") + "/" + database + "?sslmode=disable"
}

// InCI reports whether the tests run in CI, where an unreachable service is a failure.
func InCI() bool {
	v := strings.ToLower(os.Getenv("CI"))
	return v == "1" || v == "true"
}

// NewDatabase creates an empty database of its own for the test, dropped (connections
// forced out) when the test ends, and returns its DSN.
func NewDatabase(tb testing.TB) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, URL("postgres"))
	if err != nil {
		if InCI() {
			tb.Fatalf("PostgreSQL is unreachable (CI is set): %v", err)
		}
		tb.Skipf("PostgreSQL is unreachable (set %s, or run it on 127.0.0.1:5432): %v", ServerEnv, err)
	}
	defer admin.Close(context.Background())
	name := "llmgw_test_" + strings.ToLower(rand.Text()[:16])
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		tb.Fatalf("creating database %s: %v", name, err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		admin, err := pgx.Connect(ctx, URL("postgres"))
		if err != nil {
			tb.Errorf("dropping database %s: %v", name, err)
			return
		}
		defer admin.Close(context.Background())
		if _, err := admin.Exec(ctx, "DROP DATABASE "+name+" WITH (FORCE)"); err != nil {
			tb.Errorf("dropping database %s: %v", name, err)
		}
	})
	return URL(name)
}
