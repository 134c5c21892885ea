package sqlite

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/migrate"
)

// kill9Env names the database the child of TestKill9 (unix only) works on.
const kill9Env = "SQLITE_STORE_KILL9_DB"

func TestMain(m *testing.M) {
	if path := os.Getenv(kill9Env); path != "" {
		runKill9Child(path) // the child process of TestKill9; it is killed, never returns
		return
	}
	goleak.VerifyTestMain(m)
}

// testClock is a clock tests move by hand.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func newTestClock() *testClock {
	return &testClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Advance(d time.Duration) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	return c.t
}

// openTestStore opens a store in a fresh folder, closed when the test ends.
func openTestStore(tb testing.TB, clock *testClock) (*Store, string) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "gateway.db")
	opts := Options{}
	if clock != nil {
		opts.Clock = clock.Now
	}
	s, err := Open(context.Background(), path, opts)
	if err != nil {
		tb.Fatalf("open: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return s, path
}

// checkBooks fails the test unless the account's books balance exactly.
func checkBooks(tb testing.TB, s *Store, account credits.AccountID) credits.Audit {
	tb.Helper()
	a, err := s.Audit(context.Background(), account)
	if err != nil {
		tb.Fatalf("audit %s: %v", account, err)
	}
	if a.Credited != a.Balance+a.Settled+a.Open {
		tb.Fatalf("audit %s: credited %d != balance %d + settled %d + open %d",
			account, a.Credited, a.Balance, a.Settled, a.Open)
	}
	return a
}

func TestOpen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "nested", "folder", "gateway.db")

	s, err := Open(ctx, path, Options{})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	for pragma, want := range map[string]string{
		"journal_mode": "wal",
		"synchronous":  "1", // NORMAL
		"foreign_keys": "1",
		"busy_timeout": "5000",
	} {
		var got string
		if err := s.write.QueryRowContext(ctx, "PRAGMA "+pragma).Scan(&got); err != nil {
			t.Fatalf("pragma %s: %v", pragma, err)
		}
		if strings.ToLower(got) != want {
			t.Errorf("writer pragma %s = %s, want %s", pragma, got, want)
		}
	}
	var queryOnly string
	if err := s.read.QueryRowContext(ctx, "PRAGMA query_only").Scan(&queryOnly); err != nil {
		t.Fatalf("pragma query_only: %v", err)
	}
	if queryOnly != "1" {
		t.Errorf("reader query_only = %s, want 1", queryOnly)
	}
	if _, err := s.read.ExecContext(ctx, `DELETE FROM accounts`); err == nil {
		t.Error("a reader could write")
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		t.Errorf("database file mode %v is readable by others", perm)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	notADB := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(notADB, []byte(strings.Repeat("not a database ", 100)), 0o600); err != nil {
		t.Fatal(err)
	}
	blocker := filepath.Join(dir, "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		path string
	}{
		{"empty path", ""},
		{"not a database", notADB},
		{"folder is a file", filepath.Join(blocker, "gateway.db")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(context.Background(), tc.path, Options{})
			if err == nil {
				s.Close()
				t.Fatal("open succeeded")
			}
		})
	}
}

// TestReopenKeepsDataAndMigrationsAreIdempotent reopens a store: users, credits and settled
// entries stay, migrations are not applied again, and a reservation left open is released (open
// reservations live in memory only).
func TestReopenKeepsDataAndMigrationsAreIdempotent(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	account := credits.UserAccount("u1")

	s, err := Open(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateUser(ctx, identity.User{ID: "u1", Email: "a@example.com"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Credit(ctx, account, 10*credits.Credit, "seed", "k1"); err != nil {
		t.Fatal(err)
	}
	settled, _, err := s.Reserve(ctx, account, 2*credits.Credit, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Settle(ctx, settled.ID, credits.Credit, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	r, _, err := s.Reserve(ctx, account, 3*credits.Credit, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // commits the settlement; r stays open until then
		t.Fatal(err)
	}

	for i := range 3 {
		s, err = Open(ctx, path, Options{})
		if err != nil {
			t.Fatalf("reopen %d: %v", i, err)
		}
		var n, version int
		if err := s.read.QueryRowContext(ctx, `SELECT count(*), max(version) FROM schema_migrations`).Scan(&n, &version); err != nil {
			t.Fatal(err)
		}
		ms, err := migrate.Load(migrationFiles, "migrations")
		if err != nil {
			t.Fatal(err)
		}
		if n != len(ms) || version != len(ms) {
			t.Errorf("reopen %d: %d migrations recorded up to version %d, want %d", i, n, version, len(ms))
		}
		if _, err := s.UserByEmail(ctx, "A@example.com"); err != nil {
			t.Errorf("reopen %d: user: %v", i, err)
		}
		a := checkBooks(t, s, account)
		if a != (credits.Audit{Credited: 10 * credits.Credit, Settled: credits.Credit, Balance: 9 * credits.Credit}) {
			t.Errorf("reopen %d: audit %+v", i, a)
		}
		if _, replayed, err := s.Credit(ctx, account, 10*credits.Credit, "seed", "k1"); err != nil || !replayed {
			t.Errorf("reopen %d: replayed credit: %v, %v", i, replayed, err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}

	s, err = Open(ctx, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Settle(ctx, r.ID, credits.Credit, credits.Usage{}); err != credits.ErrReservationClosed {
		t.Errorf("settle a reservation made before reopening: %v, want ErrReservationClosed", err)
	}
}

// TestEmbeddedMigrationsLoad: the embedded migrations are well named and count from 1 (the
// loader itself is tested in store/migrate).
func TestEmbeddedMigrationsLoad(t *testing.T) {
	if _, err := migrate.Load(migrationFiles, "migrations"); err != nil {
		t.Fatalf("embedded migrations: %v", err)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	s, path := openTestStore(t, nil)
	if _, err := s.write.ExecContext(ctx, `INSERT INTO schema_migrations VALUES (999, '0999_future', 0)`); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(ctx, path, Options{})
	if err == nil {
		s2.Close()
		t.Fatal("opened a database migrated by a newer build")
	}
}

func TestDataSourceName(t *testing.T) {
	got := dataSourceName("/tmp/we?ird#dir %/g.db", nil)
	if want := "file:///tmp/we%3Fird%23dir%20%25/g.db"; got != want {
		t.Errorf("dsn = %q, want %q", got, want)
	}
	// A path with URI metacharacters opens the file it names.
	path := filepath.Join(t.TempDir(), "we?ird#dir %", "g.db")
	s, err := Open(context.Background(), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("database not at its path: %v", err)
	}
}

// TestClosedStoreIsUnavailable checks that every method of a closed store fails with
// ErrStoreUnavailable, so that the gateway fails closed.
func TestClosedStoreIsUnavailable(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	account := credits.UserAccount("u")
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"Reserve", func() error { _, _, err := s.Reserve(ctx, account, 1, time.Minute, nil); return err }},
		{"Reserve with refill", func() error {
			_, _, err := s.Reserve(ctx, account, 1, time.Minute, &credits.Refill{Cap: 5, Period: 1})
			return err
		}},
		{"Settle", func() error { _, err := s.Settle(ctx, "r", 1, credits.Usage{}); return err }},
		{"Release", func() error { _, err := s.Release(ctx, "r"); return err }},
		{"ReleaseExpired", func() error { _, _, err := s.ReleaseExpired(ctx, time.Now()); return err }},
		{"Credit", func() error { _, _, err := s.Credit(ctx, account, 1, "", ""); return err }},
		{"Balance", func() error { _, err := s.Balance(ctx, account); return err }},
		{"Entries", func() error { _, err := s.Entries(ctx, account, 10); return err }},
		{"Audit", func() error { _, err := s.Audit(ctx, account); return err }},
		{"CreateUser", func() error { return s.CreateUser(ctx, identity.User{ID: "u", Email: "e"}) }},
		{"UserByID", func() error { _, err := s.UserByID(ctx, "u"); return err }},
		{"UserByEmail", func() error { _, err := s.UserByEmail(ctx, "e"); return err }},
		{"CreateKey", func() error {
			return s.CreateKey(ctx, identity.Key{ID: "k", UserID: "u", Hash: [32]byte{1}})
		}},
		{"KeyByID", func() error { _, err := s.KeyByID(ctx, "k"); return err }},
		{"KeysByUser", func() error { _, err := s.KeysByUser(ctx, "u"); return err }},
		{"RevokeKey", func() error { return s.RevokeKey(ctx, "k", time.Now()) }},
		{"TouchKeys", func() error { return s.TouchKeys(ctx, map[string]time.Time{"k": time.Now()}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !errors.Is(err, credits.ErrStoreUnavailable) {
				t.Errorf("error = %v, want ErrStoreUnavailable", err)
			}
		})
	}
}

func TestCanceledContextIsUnavailable(t *testing.T) {
	s, _ := openTestStore(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, err := s.Reserve(ctx, credits.UserAccount("u"), 1, time.Minute, nil)
	if !errors.Is(err, credits.ErrStoreUnavailable) || !errors.Is(err, context.Canceled) {
		t.Errorf("error = %v, want ErrStoreUnavailable and context.Canceled", err)
	}
}
