package postgres

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/migrate"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/storetest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// newTestDatabase creates an empty database of its own for the test (pgtest.NewDatabase).
func newTestDatabase(tb testing.TB) string { return pgtest.NewDatabase(tb) }

// serverURL is the URL of the test server's database name.
func serverURL(database string) string { return pgtest.URL(database) }

// openTestStore opens a store on a new database, closed when the test ends (before the
// database is dropped).
func openTestStore(tb testing.TB) *Store {
	tb.Helper()
	dsn := newTestDatabase(tb)
	s, err := Open(context.Background(), dsn)
	if err != nil {
		tb.Fatalf("open: %v", err)
	}
	tb.Cleanup(func() { _ = s.Close() })
	return s
}

func TestLedgerConformance(t *testing.T) {
	storetest.TestLedger(t, func(t *testing.T) credits.Ledger { return openTestStore(t) })
}

// TestTwoStoresShareTheBooks: two stores on one database (two instances) see and close each
// other's reservations, and 50 reservations through both at once on a balance that covers 20
// succeed exactly 20 times.
func TestTwoStoresShareTheBooks(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	var stores [2]*Store
	for i := range stores {
		s, err := Open(ctx, dsn)
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		t.Cleanup(func() { _ = s.Close() })
		stores[i] = s
	}
	account := credits.UserAccount("u")
	if _, _, err := stores[0].Credit(ctx, account, 20*credits.Credit, "", ""); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 50)
	ids := make(chan string, 50)
	for i := range 50 {
		go func() {
			r, _, err := stores[i%2].Reserve(ctx, account, credits.Credit, time.Minute, nil)
			if err == nil {
				ids <- r.ID
			}
			errs <- err
		}()
	}
	won := 0
	for range 50 {
		if err := <-errs; err == nil {
			won++
		} else if !errors.Is(err, credits.ErrInsufficientCredits) {
			t.Errorf("reserve: %v", err)
		}
	}
	if won != 20 {
		t.Errorf("%d reservations succeeded across two stores, want exactly 20", won)
	}
	close(ids)
	i := 0
	for id := range ids {
		// each is closed by the other store than the one that may have opened it
		if _, err := stores[i%2].Settle(ctx, id, credits.Credit/2, credits.Usage{}); err != nil {
			t.Errorf("settle %s: %v", id, err)
		}
		if _, err := stores[(i+1)%2].Release(ctx, id); !errors.Is(err, credits.ErrReservationClosed) {
			t.Errorf("release after settle on the other store: %v", err)
		}
		i++
	}
	for _, s := range stores {
		if books := storetest.CheckBooks(t, s, account); books != (credits.Audit{Credited: 20 * credits.Credit, Settled: 10 * credits.Credit, Balance: 10 * credits.Credit}) {
			t.Errorf("books %+v", books)
		}
	}
}

// TestReleaseExpiredAcrossStores: sweeps of several instances at once release each expired
// reservation once, over more reservations than one batch.
func TestReleaseExpiredAcrossStores(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	var stores [3]*Store
	for i := range stores {
		s, err := Open(ctx, dsn)
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		t.Cleanup(func() { _ = s.Close() })
		stores[i] = s
	}
	accounts := []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b"), credits.UserAccount("c")}
	const each = 900 // 2,700 reservations: three batches
	for _, a := range accounts {
		if _, _, err := stores[0].Credit(ctx, a, each, "", ""); err != nil {
			t.Fatal(err)
		}
	}
	// The reservations are made in bulk, as Reserve would make them.
	var latest time.Time
	for _, a := range accounts {
		for range each {
			r, _, err := stores[0].Reserve(ctx, a, 1, time.Millisecond, nil)
			if err != nil {
				t.Fatal(err)
			}
			latest = r.ExpiresAt
		}
	}
	type result struct {
		n     int
		total credits.Amount
		err   error
	}
	results := make(chan result, len(stores))
	for _, s := range stores {
		go func() {
			n, total, err := s.ReleaseExpired(ctx, latest.Add(time.Second))
			results <- result{n, total, err}
		}()
	}
	var n int
	var total credits.Amount
	for range stores {
		r := <-results
		if r.err != nil {
			t.Fatalf("sweep: %v", r.err)
		}
		n += r.n
		total += r.total
	}
	if n != 3*each || total != 3*each {
		t.Errorf("sweeps released %d reservations of %s in all, want %d", n, total, 3*each)
	}
	for _, a := range accounts {
		if books := storetest.CheckBooks(t, stores[1], a); books != (credits.Audit{Credited: each, Balance: each}) {
			t.Errorf("%s: books %+v", a, books)
		}
	}
}

// TestStoreFailureIsUnavailable: a store that cannot reach its database reports
// ErrStoreUnavailable, at Open and on every call.
func TestStoreFailureIsUnavailable(t *testing.T) {
	ctx := context.Background()
	t.Run("open", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		// a port nothing listens on: the listener is closed at once
		_, err := Open(ctx, "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=2")
		if !errors.Is(err, credits.ErrStoreUnavailable) {
			t.Errorf("open of an unreachable server: %v", err)
		}
	})
	t.Run("calls", func(t *testing.T) {
		s := openTestStore(t)
		account := credits.UserAccount("u")
		if _, _, err := s.Credit(ctx, account, 5, "", ""); err != nil {
			t.Fatal(err)
		}
		r, _, err := s.Reserve(ctx, account, 1, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Close()
		for name, call := range map[string]func() error{
			"reserve":           func() error { _, _, err := s.Reserve(ctx, account, 1, time.Minute, nil); return err },
			"settle":            func() error { _, err := s.Settle(ctx, r.ID, 1, credits.Usage{}); return err },
			"release":           func() error { _, err := s.Release(ctx, r.ID); return err },
			"sweep":             func() error { _, _, err := s.ReleaseExpired(ctx, time.Now()); return err },
			"credit":            func() error { _, _, err := s.Credit(ctx, account, 1, "", ""); return err },
			"balance":           func() error { _, err := s.Balance(ctx, account); return err },
			"entries":           func() error { _, err := s.Entries(ctx, account, 1); return err },
			"audit":             func() error { _, err := s.Audit(ctx, account); return err },
			"open reservations": func() error { _, _, err := s.OpenReservations(); return err },
		} {
			if err := call(); !errors.Is(err, credits.ErrStoreUnavailable) {
				t.Errorf("%s on a closed store: %v", name, err)
			}
		}
	})
}

// TestMigrations: the schema is created once, by one of several openers at once, recorded in
// schema_migrations, and a database newer than the build is refused.
func TestMigrations(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			s, err := Open(ctx, dsn)
			if err == nil {
				_ = s.Close()
			}
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent open: %v", err)
		}
	}
	s, err := Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ms, err := migrate.Load(migrationFiles, "migrations")
	if err != nil {
		t.Fatal(err)
	}
	var count, latest int
	if err := s.pool.QueryRow(ctx, `SELECT count(*), max(version) FROM schema_migrations`).Scan(&count, &latest); err != nil {
		t.Fatal(err)
	}
	if count != len(ms) || latest != len(ms) {
		t.Errorf("schema_migrations has %d rows up to %d, want %d", count, latest, len(ms))
	}
	// A migration of a later build recorded: this build refuses the database.
	if _, err := s.pool.Exec(ctx, `INSERT INTO schema_migrations (version, name) VALUES ($1, 'future')`, len(ms)+1); err != nil {
		t.Fatal(err)
	}
	if s2, err := Open(ctx, dsn); err == nil || !strings.Contains(err.Error(), "newer") {
		if err == nil {
			s2.Close()
		}
		t.Errorf("open of a newer schema: %v", err)
	}
	// A failed migration leaves nothing behind.
	broken := append(ms[:len(ms):len(ms)], migrate.Migration{Version: len(ms) + 1, Name: "broken",
		SQL: `CREATE TABLE half_done (x int); SELECT no_such_function()`})
	if _, err := s.pool.Exec(ctx, `DELETE FROM schema_migrations WHERE name = 'future'`); err != nil {
		t.Fatal(err)
	}
	if err := migrateWith(ctx, s.pool, broken); err == nil {
		t.Fatal("broken migration applied")
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT to_regclass('half_done') IS NOT NULL`).Scan(&exists); err != nil || exists {
		t.Errorf("a failed migration left its table behind: %v, %v", exists, err)
	}
}

// TestLedgerIsAppendOnly: the database refuses to change or delete a ledger entry.
func TestLedgerIsAppendOnly(t *testing.T) {
	ctx := context.Background()
	s := openTestStore(t)
	if _, _, err := s.Credit(ctx, credits.UserAccount("u"), 5, "", ""); err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{`UPDATE ledger SET amount = 6`, `DELETE FROM ledger`} {
		if _, err := s.pool.Exec(ctx, stmt); err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s: %v", stmt, err)
		}
	}
}

// TestMoneyColumnsAreIntegers: every amount column is BIGINT.
func TestMoneyColumnsAreIntegers(t *testing.T) {
	ctx := context.Background()
	s := openTestStore(t)
	rows, err := s.pool.Query(ctx, `SELECT table_name || '.' || column_name, data_type FROM information_schema.columns
		WHERE table_schema = 'public' AND column_name IN ('balance', 'reserved', 'amount', 'last_grant', 'credit_cap')`)
	if err != nil {
		t.Fatal(err)
	}
	types, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (string, error) {
		var column, typ string
		err := row.Scan(&column, &typ)
		return fmt.Sprintf("%s %s", column, typ), err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(types) != 7 {
		t.Errorf("money columns %v, want 7", types)
	}
	for _, ct := range types {
		if !strings.HasSuffix(ct, " bigint") {
			t.Errorf("money column %s", ct)
		}
	}
}

// TestOpenErrorsHideThePassword: the DSN's password is in no error Open returns.
func TestOpenErrorsHideThePassword(t *testing.T) {
	const secret = "s3cret-pw-4242"
	for _, dsn := range []string{
		"postgres://postgres:" + secret + "@127.0.0.1:1/none?sslmode=disable&connect_timeout=2",
		"postgres://postgres:" + secret + "@127.0.0.1:notaport/none",
		"host=127.0.0.1 port=1 user=postgres password=" + secret + " dbname=none sslmode=disable connect_timeout=2",
		"host=127.0.0.1 port=x user=postgres password=" + secret,
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := Open(ctx, dsn)
		cancel()
		if err == nil {
			s.Close()
			t.Errorf("open of %q succeeded", strings.ReplaceAll(dsn, secret, "***"))
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("the password is in the error: %s", strings.ReplaceAll(err.Error(), secret, "***"))
		}
	}
}

// TestBalanceOverflowIsRefused: a settlement or a credit that would take a balance below int64
// is ErrOverflow (not the store's failure) and changes nothing. (Through the API alone a
// balance this low cannot be reached, so it is set in the database directly.)
func TestBalanceOverflowIsRefused(t *testing.T) {
	ctx := context.Background()
	s := openTestStore(t)
	account := credits.UserAccount("poor")
	if _, _, err := s.Credit(ctx, account, 10, "", ""); err != nil {
		t.Fatal(err)
	}
	r, _, err := s.Reserve(ctx, account, 0, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	const floor = credits.Amount(math.MinInt64 + 10)
	if _, err := s.pool.Exec(ctx, `UPDATE accounts SET balance = $2 WHERE id = $1`, account, floor); err != nil {
		t.Fatal(err)
	}
	for name, call := range map[string]func() error{
		"settle": func() error { _, err := s.Settle(ctx, r.ID, 11, credits.Usage{}); return err },
		"credit": func() error { _, _, err := s.Credit(ctx, account, -11, "", ""); return err },
	} {
		if err := call(); !errors.Is(err, credits.ErrOverflow) || errors.Is(err, credits.ErrStoreUnavailable) {
			t.Errorf("%s: error = %v, want ErrOverflow", name, err)
		}
		if b, err := s.Balance(ctx, account); err != nil || b != floor {
			t.Errorf("%s: balance now %d, %v", name, b, err)
		}
	}
	if _, err := s.Settle(ctx, r.ID, 10, credits.Usage{}); err != nil {
		t.Errorf("settle down to the floor: %v", err)
	}
}

// openIdentityStores opens instances stores on one new database: separate Stores, each with
// its own connections, as separate gateway instances have.
func openIdentityStores(t *testing.T, clock func() time.Time, instances int) []storetest.IdentityStore {
	dsn := newTestDatabase(t)
	stores := make([]storetest.IdentityStore, instances)
	for i := range stores {
		s, err := Open(context.Background(), dsn)
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		s.clock = clock
		t.Cleanup(func() { _ = s.Close() })
		stores[i] = s
	}
	return stores
}

func TestUsersConformance(t *testing.T)  { storetest.TestUsers(t, openIdentityStores) }
func TestKeysConformance(t *testing.T)   { storetest.TestKeys(t, openIdentityStores) }
func TestSigninConformance(t *testing.T) { storetest.TestSignin(t, openIdentityStores) }

// TestRevokeFamilyDuringRotations: a family revoked through one instance while another keeps
// rotating it ends with no live token (the revocation takes the successors that rotations
// committed while it ran); repeated.
func TestRevokeFamilyDuringRotations(t *testing.T) {
	ctx := context.Background()
	stores := openIdentityStores(t, nil, 2)
	if err := stores[0].CreateUser(ctx, identity.User{ID: "u1", Email: "u1@example.com"}); err != nil {
		t.Fatal(err)
	}
	hash := func(s string) [32]byte { return sha256.Sum256([]byte(s)) }
	t0 := time.Now()
	for it := range storetest.RaceIterations(t, 10) {
		family := fmt.Sprint("fam-", it)
		first := signin.Refresh{Hash: hash(family + "-0"), Family: family, UserID: "u1", ClientID: "c", ExpiresAt: t0.Add(time.Hour)}
		if err := stores[0].CreateRefresh(ctx, first); err != nil {
			t.Fatal(err)
		}
		rotated := make(chan error, 1)
		revoked := make(chan struct{})
		go func() {
			current := first.Hash
			for i := 1; ; i++ {
				select {
				case <-revoked: // a live token left now is the revocation's miss
					rotated <- nil
					return
				default:
				}
				next := signin.Refresh{Hash: hash(fmt.Sprintf("%s-%d", family, i)), ExpiresAt: t0.Add(time.Hour)}
				_, _, err := stores[0].RotateRefresh(ctx, current, next, t0, 0)
				if err != nil {
					if errors.Is(err, signin.ErrRefreshDead) {
						err = nil
					}
					rotated <- err
					return
				}
				current = next.Hash
			}
		}()
		err := stores[1].RevokeRefreshFamily(ctx, family, t0)
		close(revoked)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-rotated; err != nil {
			t.Fatalf("iteration %d: rotation: %v", it, err)
		}
		for h := first.Hash; ; {
			r, err := stores[1].RefreshByHash(ctx, h)
			if err != nil {
				t.Fatal(err)
			}
			if r.RevokedAt == nil {
				t.Fatalf("iteration %d: a token of the revoked family is live: %+v", it, r)
			}
			if r.Successor == nil {
				break
			}
			h = *r.Successor
		}
	}
}
