package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// openAt opens the store at path with opts, failing the test on error. The caller closes it.
func openAt(tb testing.TB, path string, opts Options) *Store {
	tb.Helper()
	s, err := Open(context.Background(), path, opts)
	if err != nil {
		tb.Fatalf("open: %v", err)
	}
	return s
}

// crash stops the store as a crash would: what is queued is not committed, and the files are
// let go as the kernel lets go of a dead process's.
func crash(tb testing.TB, s *Store) {
	tb.Helper()
	s.closeOnce.Do(func() {
		if err := s.shutdown(false); err != nil {
			tb.Fatalf("crash: %v", err)
		}
	})
}

// settleEntries reads the account's settle entries: cost by reservation id. It fails the test
// if a reservation has two.
func settleEntries(tb testing.TB, s *Store, account credits.AccountID) map[string]credits.Amount {
	tb.Helper()
	entries, err := s.Entries(context.Background(), account, 1<<30)
	if err != nil {
		tb.Fatal(err)
	}
	out := make(map[string]credits.Amount)
	for _, e := range entries {
		if e.Kind != credits.EntrySettle {
			continue
		}
		if _, dup := out[e.ReservationID]; dup {
			tb.Fatalf("reservation %s settled twice", e.ReservationID)
		}
		out[e.ReservationID] = e.Amount
	}
	return out
}

func TestSecondOpenIsRefused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "gateway.db")
	first := openAt(t, path, Options{})

	// The same file by another name too.
	names := []string{path}
	alias := filepath.Join(t.TempDir(), "alias")
	if err := os.Symlink(dir, alias); err == nil {
		names = append(names, filepath.Join(alias, "gateway.db"))
	}
	for _, p := range names {
		s, err := Open(ctx, p, Options{})
		if err == nil {
			s.Close()
			first.Close()
			t.Fatalf("second open of %s succeeded", p)
		}
		if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "store is in use by another process") {
			t.Errorf("second open: %v, want ErrInUse", err)
		}
	}
	// Another file is another store.
	other := openAt(t, filepath.Join(dir, "other.db"), Options{})
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	// The first one works on.
	credit(t, first, credits.UserAccount("u"), 5)

	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	again := openAt(t, path, Options{})
	defer again.Close()
	if b, err := again.Balance(ctx, credits.UserAccount("u")); err != nil || b != 5 {
		t.Errorf("balance after reopening: %s, %v", b, err)
	}
}

// TestCrashLosesOnlyTheLastSettlements crashes a store with settlements queued: after it, the
// settlements committed before are all there, the others are all absent (a prefix of the
// settlements, in the order they were made, survives, each whole), every credit is there, no
// reservation is open and the books balance exactly.
func TestCrashLosesOnlyTheLastSettlements(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	// Batches are only committed when batchOps wait: the crash loses the last ones.
	s := openAt(t, path, Options{FlushInterval: time.Hour})
	accounts := []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b"), credits.AnonymousAccount("c")}
	refill := &credits.Refill{Cap: 50 * c, Period: 7}
	credited := make(map[credits.AccountID]credits.Amount)
	for _, account := range accounts {
		credit(t, s, account, 1000*c)
		credited[account] += 1000 * c
	}

	type settlement struct {
		account credits.AccountID
		id      string
		cost    credits.Amount
	}
	var made []settlement
	const n = 3*batchOps + 100
	for i := range n {
		account := accounts[i%len(accounts)]
		var rf *credits.Refill
		if account == accounts[2] {
			rf = refill
		}
		r, _, err := s.Reserve(ctx, account, 2*c, time.Hour, rf)
		if err != nil {
			t.Fatal(err)
		}
		cost := credits.Amount(i%7) * c / 3 // up to 2 credits, at or below the reservation
		if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: "m", OutputTokens: int64(i)}); err != nil {
			t.Fatal(err)
		}
		made = append(made, settlement{account, r.ID, cost})
		if i%50 == 0 {
			reserve(t, s, account, c, time.Hour) // left open
		}
		if i == n-101 {
			// The batches made so far are committed; the last 100 settlements wait for the
			// next one, which the crash prevents.
			if err := s.Flush(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	crash(t, s)

	s = openAt(t, path, Options{})
	defer s.Close()
	present := make(map[string]credits.Amount)
	for _, account := range accounts {
		for id, cost := range settleEntries(t, s, account) {
			present[id] = cost
		}
	}
	kept := 0
	for kept < len(made) {
		if _, ok := present[made[kept].id]; !ok {
			break
		}
		kept++
	}
	if len(present) != kept {
		t.Fatalf("%d settlements present, but only the first %d in order", len(present), kept)
	}
	if kept != n-100 {
		t.Fatalf("%d of %d settlements survived the crash, want the %d committed", kept, n, n-100)
	}
	settled := make(map[credits.AccountID]credits.Amount)
	for _, st := range made[:kept] {
		if present[st.id] != st.cost {
			t.Errorf("settlement %s: cost %s, made %s", st.id, present[st.id], st.cost)
		}
		settled[st.account] += st.cost
	}
	for _, account := range accounts {
		books := checkBooks(t, s, account)
		if books.Open != 0 || books.Settled != settled[account] {
			t.Errorf("%s: books %+v, settled %s", account, books, settled[account])
		}
		if account != accounts[2] && books.Credited != credited[account] {
			t.Errorf("%s: credited %s, want %s", account, books.Credited, credited[account])
		}
		if b, err := s.Balance(ctx, account); err != nil || b != books.Balance {
			t.Errorf("%s: balance %s, %v; books %s", account, b, err, books.Balance)
		}
	}
}

// TestCrashDuringCommit crashes while a batch is being committed: none of it is there after.
func TestCrashDuringCommit(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{})
	account := credits.UserAccount("u")
	credit(t, s, account, 100*c)
	committed := reserve(t, s, account, 10*c, time.Hour)
	if _, err := s.Settle(ctx, committed.ID, 4*c, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	inCommit, dying := make(chan struct{}), make(chan struct{})
	var once atomic.Bool
	s.hooks.Store(&flushHooks{beforeCommit: func(int) error {
		if once.CompareAndSwap(false, true) {
			close(inCommit)
			<-dying
		}
		return errors.New("the process died")
	}})
	for range 10 {
		r := reserve(t, s, account, c, time.Hour)
		if _, err := s.Settle(ctx, r.ID, c, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
	<-inCommit
	close(dying)
	s.closeOnce.Do(func() { s.shutdown(false) }) // reports the failed commit: a crash has no say

	s = openAt(t, path, Options{})
	defer s.Close()
	books := checkBooks(t, s, account)
	if books != (credits.Audit{Credited: 100 * c, Settled: 4 * c, Balance: 96 * c}) {
		t.Errorf("books %+v", books)
	}
	if got := settleEntries(t, s, account); len(got) != 1 || got[committed.ID] != 4*c {
		t.Errorf("settle entries %v", got)
	}
}

// TestFailedCommitFailsTheStore makes every commit fail: after the retries the store fails, and
// every ledger call reports ErrStoreUnavailable until the store is opened again, which finds
// the books exact without the lost batch.
func TestFailedCommitFailsTheStore(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{})
	account := credits.UserAccount("u")
	credit(t, s, account, 100*c)
	open := reserve(t, s, account, 5*c, time.Hour)
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	var attempts atomic.Int32
	injected := errors.New("disk full")
	s.hooks.Store(&flushHooks{beforeCommit: func(int) error { attempts.Add(1); return injected }})
	r := reserve(t, s, account, 3*c, time.Hour)
	if _, err := s.Settle(ctx, r.ID, 2*c, credits.Usage{}); err != nil {
		t.Fatalf("settle before the commit fails: %v", err)
	}
	err := s.Flush(ctx)
	if !errors.Is(err, credits.ErrStoreUnavailable) || !errors.Is(err, injected) {
		t.Fatalf("flush: %v, want ErrStoreUnavailable and the commit's error", err)
	}
	if got, want := int(attempts.Load()), 1+len(commitRetryDelays); got != want {
		t.Errorf("%d commit attempts, want %d", got, want)
	}

	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"Reserve", func() error { _, _, err := s.Reserve(ctx, account, 1, time.Minute, nil); return err }},
		{"Settle", func() error { _, err := s.Settle(ctx, open.ID, 1, credits.Usage{}); return err }},
		{"Release", func() error { _, err := s.Release(ctx, open.ID); return err }},
		{"ReleaseExpired", func() error { _, _, err := s.ReleaseExpired(ctx, time.Now().Add(24*time.Hour)); return err }},
		{"Credit", func() error { _, _, err := s.Credit(ctx, account, 1, "", ""); return err }},
		{"Balance", func() error { _, err := s.Balance(ctx, account); return err }},
		{"Entries", func() error { _, err := s.Entries(ctx, account, 10); return err }},
		{"Audit", func() error { _, err := s.Audit(ctx, account); return err }},
		{"Flush", func() error { return s.Flush(ctx) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !errors.Is(err, credits.ErrStoreUnavailable) {
				t.Errorf("error = %v, want ErrStoreUnavailable", err)
			}
		})
	}
	// Users and keys do not depend on the ledger's queue.
	if _, err := s.KeysByUser(ctx, "u"); err != nil {
		t.Errorf("keys of a failed store: %v", err)
	}
	if err := s.Close(); !errors.Is(err, credits.ErrStoreUnavailable) {
		t.Errorf("close of a failed store: %v, want the failure", err)
	}

	s = openAt(t, path, Options{})
	defer s.Close()
	if books := checkBooks(t, s, account); books != (credits.Audit{Credited: 100 * c, Balance: 100 * c}) {
		t.Errorf("books after reopening: %+v", books)
	}
}

// TestTransientCommitErrorsAreRetried fails the first commits of a batch: the retry commits it
// once, and the store keeps working.
func TestTransientCommitErrorsAreRetried(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 100*c)
	s.hooks.Store(&flushHooks{beforeCommit: func(attempt int) error {
		if attempt < len(commitRetryDelays) {
			return errors.New("busy")
		}
		return nil
	}})
	r := reserve(t, s, account, 3*c, time.Hour)
	if _, err := s.Settle(ctx, r.ID, 2*c, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	if books := checkBooks(t, s, account); books != (credits.Audit{Credited: 100 * c, Settled: 2 * c, Balance: 98 * c}) {
		t.Errorf("books %+v", books)
	}
	if _, _, err := s.Reserve(ctx, account, c, time.Hour, nil); err != nil {
		t.Errorf("reserve after the retries: %v", err)
	}
}

// TestRetryAfterLostCommitIsIdempotent commits a batch but reports its commit as failed, as a
// commit whose outcome was lost: writing the batch again charges, grants and creates nothing a
// second time.
func TestRetryAfterLostCommitIsIdempotent(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{FlushInterval: time.Hour})
	user, anon := credits.UserAccount("u"), credits.AnonymousAccount("a")
	credit(t, s, user, 100*c)

	var lost atomic.Int32
	s.hooks.Store(&flushHooks{afterCommit: func(attempt int) error {
		if attempt == 0 {
			lost.Add(1)
			return errors.New("connection reset after commit")
		}
		return nil
	}})
	var settled credits.Amount
	for i := range 40 { // settle entries in chunks and one by one
		r := reserve(t, s, user, c, time.Hour)
		cost := credits.Amount(i) * c / 40
		if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: "m"}); err != nil {
			t.Fatal(err)
		}
		settled += cost
	}
	// A new anonymous account, its grant, and a settlement.
	r, _, err := s.Reserve(ctx, anon, c, time.Hour, &credits.Refill{Cap: 5 * c, Period: 3})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Settle(ctx, r.ID, c/2, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	// And a refill of an existing account, in a later period.
	if _, _, err := s.Reserve(ctx, user, 0, time.Hour, &credits.Refill{Cap: 500 * c, Period: 9}); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	if lost.Load() != 1 {
		t.Fatalf("%d lost commits, want 1", lost.Load())
	}
	grant := 500*c - (100*c - settled)
	if books := checkBooks(t, s, user); books != (credits.Audit{Credited: 100*c + grant, Settled: settled, Balance: 500 * c}) {
		t.Errorf("user books %+v", books)
	}
	if got := settleEntries(t, s, user); len(got) != 40 {
		t.Errorf("%d settle entries, want 40", len(got))
	}
	if books := checkBooks(t, s, anon); books != (credits.Audit{Credited: 5 * c, Settled: c / 2, Balance: 5*c - c/2}) {
		t.Errorf("anonymous books %+v", books)
	}
	for _, account := range []credits.AccountID{user, anon} {
		entries, err := s.Entries(ctx, account, 100)
		if err != nil {
			t.Fatal(err)
		}
		grants := 0
		for _, e := range entries {
			if e.Kind == credits.EntryGrant {
				grants++
			}
		}
		if grants != 1 {
			t.Errorf("%s: %d grants, want 1", account, grants)
		}
	}
	checkMemoryAgainstDatabase(t, s, "after the retry")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestSettlementsCommitWithoutFlush checks the flusher commits on its own, within about
// FlushInterval.
func TestSettlementsCommitWithoutFlush(t *testing.T) {
	ctx := context.Background()
	s := openAt(t, filepath.Join(t.TempDir(), "gateway.db"), Options{FlushInterval: 5 * time.Millisecond})
	defer s.Close()
	account := credits.UserAccount("u")
	credit(t, s, account, 10*c)
	r := reserve(t, s, account, c, time.Hour)
	start := time.Now()
	if _, err := s.Settle(ctx, r.ID, c, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	for {
		var n int
		if err := s.read.QueryRowContext(ctx, `SELECT count(*) FROM ledger WHERE reservation_id = ?`, r.ID).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			t.Logf("committed after %v", time.Since(start))
			return
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("settlement not committed after 10 s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestCloseCommitsTheQueue closes a store with settlements queued: they are all there after.
func TestCloseCommitsTheQueue(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{FlushInterval: time.Hour})
	account := credits.UserAccount("u")
	credit(t, s, account, 100*c)
	for i := range 10 {
		r := reserve(t, s, account, c, time.Hour)
		if _, err := s.Settle(ctx, r.ID, credits.Amount(i), credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openAt(t, path, Options{})
	defer s.Close()
	if books := checkBooks(t, s, account); books != (credits.Audit{Credited: 100 * c, Settled: 45, Balance: 100*c - 45}) {
		t.Errorf("books %+v", books)
	}
}

// TestFlushHonoursContext: a Flush that cannot finish in time reports the context's error.
func TestFlushHonoursContext(t *testing.T) {
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 10*c)
	release := make(chan struct{})
	s.hooks.Store(&flushHooks{beforeCommit: func(int) error { <-release; return nil }})
	r := reserve(t, s, account, c, time.Hour)
	if _, err := s.Settle(context.Background(), r.ID, c, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := s.Flush(ctx)
	close(release)
	if !errors.Is(err, credits.ErrStoreUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("flush: %v, want ErrStoreUnavailable and DeadlineExceeded", err)
	}
	if err := s.Flush(context.Background()); err != nil {
		t.Errorf("flush once the commit goes on: %v", err)
	}
	if books := checkBooks(t, s, account); books.Settled != c {
		t.Errorf("books %+v", books)
	}
}

// TestLegacyReservationsAreReleased opens a database written by a build that stored open
// reservations: migration 0002 returns them to their accounts, and the table takes no more.
func TestLegacyReservationsAreReleased(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{})
	account := credits.UserAccount("u")
	credit(t, s, account, 10*c)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Back to schema 1, with 3 credits of the balance held by an open reservation.
	db := openRawForTest(t, path)
	for _, stmt := range []string{
		`DROP TRIGGER reservations_in_memory`,
		`DELETE FROM schema_migrations WHERE version > 1`,
		`DROP INDEX ledger_by_response`, // migration 0006
		`ALTER TABLE ledger DROP COLUMN cached_input_tokens`,
		`ALTER TABLE ledger DROP COLUMN cache_write_tokens`,
		`ALTER TABLE ledger DROP COLUMN reasoning_tokens`,
		`ALTER TABLE ledger DROP COLUMN response_id`,
		`DROP INDEX api_keys_by_chain`, // migration 0005
		`ALTER TABLE api_keys DROP COLUMN chain_id`,
		`DROP INDEX api_keys_by_rotated_to`,
		`DROP INDEX ledger_by_key`,
		`ALTER TABLE api_keys DROP COLUMN rotated_to`,
		`ALTER TABLE api_keys DROP COLUMN deprecated_at`,
		`ALTER TABLE api_keys DROP COLUMN credit_cap_period`,
		`ALTER TABLE ledger DROP COLUMN key_id`,
		// migration 0004
		`DROP TABLE signing_keys`, `DROP TABLE server_secret`, `DROP TABLE apps`, `DROP TABLE sessions`,
		`DROP TABLE consents`, `DROP TABLE auth_codes`, `DROP TABLE refresh_tokens`, `DROP TABLE external_subjects`,
		`UPDATE accounts SET balance = balance - 3000000 WHERE id = 'user:u'`,
		`INSERT INTO reservations VALUES ('old', 'user:u', 3000000, 0, 0)`,
	} {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
	}
	db.Close()

	s = openAt(t, path, Options{})
	defer s.Close()
	if books := checkBooks(t, s, account); books != (credits.Audit{Credited: 10 * c, Balance: 10 * c}) {
		t.Errorf("books %+v", books)
	}
	var n int
	if err := s.read.QueryRowContext(ctx, `SELECT count(*) FROM reservations`).Scan(&n); err != nil || n != 0 {
		t.Errorf("%d reservations left (%v)", n, err)
	}
	if _, err := s.Settle(ctx, "old", 1, credits.Usage{}); err != credits.ErrReservationClosed {
		t.Errorf("settle the legacy reservation: %v", err)
	}
}

// TestReservationIDs: the store's reservations have ids that sort by time
// (credits.NewReservationID).
func TestReservationIDs(t *testing.T) {
	clock := newTestClock()
	s, _ := openTestStore(t, clock)
	account := credits.UserAccount("u")
	credit(t, s, account, 10*c)
	var prev string
	for i := range 100 {
		clock.Advance(time.Microsecond)
		r := reserve(t, s, account, 0, time.Hour)
		if len(r.ID) != 37 || r.ID[:11] <= prev {
			t.Fatalf("reservation %d: id %q does not sort after %q", i, r.ID, prev)
		}
		prev = r.ID[:11]
	}
}

// openRawForTest opens the database file directly, as a tool would, on one connection.
func openRawForTest(tb testing.TB, path string) *sql.DB {
	tb.Helper()
	db, err := sql.Open("sqlite", dataSourceName(path, url.Values{"_foreign_keys": {"on"}}))
	if err != nil {
		tb.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	return db
}
