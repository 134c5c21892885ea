package postgres

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/storetest"
)

const c = credits.Credit

// openLeasedStore opens a leasing store on dsn, closed when the test ends.
func openLeasedStore(tb testing.TB, dsn string, opts Options) *Store {
	tb.Helper()
	s, err := OpenWith(context.Background(), dsn, opts)
	if err != nil {
		tb.Fatalf("open: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return s
}

// abandon stops the store as a crash would: its goroutines stop, nothing queued is committed,
// its leases stay in the database.
func (s *Store) abandon() {
	l := s.lease
	l.queue.mu.Lock()
	l.queue.closed, l.queue.stopped = true, true
	l.queue.mu.Unlock()
	close(l.stop)
	l.stopped.Wait()
	l.background.Wait()
	s.pool.Close()
}

// TestLedgerConformanceLeased: the conformance suite on leasing stores, with leases the test
// balances can hold: of 2 credits, so that the suite's reservations of 1 and 2 credits are
// carved, the larger ones made in the database, and balances of 10 credits lease.
func TestLedgerConformanceLeased(t *testing.T) {
	storetest.TestLedger(t, func(t *testing.T) credits.Ledger {
		return openLeasedStore(t, newTestDatabase(t), Options{LeaseSize: 2 * c})
	})
}

// TestLeasedInstancesNeverOverspend: three leasing stores (three instances) on one database
// spend the same accounts at once: no more is reserved than the balances hold, each
// instance's books balance exactly while they run, and after they close nothing is left
// open and the books are exact.
func TestLeasedInstancesNeverOverspend(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	var stores [3]*Store
	for i := range stores {
		s, err := OpenWith(ctx, dsn, Options{LeaseSize: c, InstanceID: "test-" + string(rune('a'+i))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		stores[i] = s
	}
	accounts := []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b")}
	const funded = 30 * c
	for _, a := range accounts {
		if _, _, err := stores[0].Credit(ctx, a, funded, "", ""); err != nil {
			t.Fatal(err)
		}
	}
	var (
		// held counts, by account, what is reserved and not closed plus what was charged:
		// raised after a reservation succeeded and lowered before a release or a settlement
		// is asked, so that it is never above what the store holds and charged, which must
		// never exceed what was funded.
		held, peak [2]atomic.Int64
		charged    [2]atomic.Int64
		wg         sync.WaitGroup
		done       = make(chan struct{})
	)
	raise := func(k int, amount credits.Amount) {
		v := held[k].Add(int64(amount))
		for p := peak[k].Load(); v > p && !peak[k].CompareAndSwap(p, v); p = peak[k].Load() {
		}
	}
	for w := range 12 {
		s := stores[w%3]
		wg.Go(func() {
			refusals := 0
			for i := 0; refusals < 20; i++ {
				k := (w + i) % 2
				amount := c / 4 * credits.Amount(1+i%4) // 0.25 to 1 credit
				r, _, err := s.Reserve(ctx, accounts[k], amount, time.Minute, nil)
				if errors.Is(err, credits.ErrInsufficientCredits) {
					refusals++
					continue
				}
				if err != nil {
					t.Errorf("reserve: %v", err)
					return
				}
				raise(k, amount)
				if i%5 == 0 {
					held[k].Add(-int64(amount))
					if _, err := s.Release(ctx, r.ID); err != nil {
						t.Errorf("release: %v", err)
					}
					continue
				}
				cost := amount - credits.Amount(i%3)*c/10 // at most the reservation
				held[k].Add(-int64(amount - cost))
				charged[k].Add(int64(cost))
				if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: "m", InputTokens: int64(i)}); err != nil {
					t.Errorf("settle: %v", err)
				}
			}
		})
	}
	// Every instance's books balance exactly while the others spend.
	checker := make(chan struct{})
	go func() {
		defer close(checker)
		for {
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
			for _, s := range stores {
				for _, a := range accounts {
					books, err := s.Audit(ctx, a)
					if err != nil {
						t.Errorf("audit: %v", err)
						return
					}
					if books.Credited != books.Balance+books.Settled+books.Open || books.Open < 0 || books.Balance < 0 {
						t.Errorf("books of %s while spending: %+v", a, books)
					}
				}
			}
		}
	}()
	wg.Wait()
	close(done)
	<-checker
	for k := range accounts {
		if p := credits.Amount(peak[k].Load()); p > funded {
			t.Errorf("%s: %s held and charged at once, the balance was %s", accounts[k], p, funded)
		}
	}
	for _, s := range stores {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}
	direct, err := Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	for k, a := range accounts {
		books := storetest.CheckBooks(t, direct, a)
		if got := credits.Amount(charged[k].Load()); got < funded/2 {
			t.Errorf("%s: only %s of %s charged: the instances did not spend it", a, got, funded)
		}
		want := credits.Audit{Credited: funded, Settled: credits.Amount(charged[k].Load()), Balance: funded - credits.Amount(charged[k].Load())}
		if books != want {
			t.Errorf("%s: books %+v after close, want %+v", a, books, want)
		}
		entries, err := direct.Entries(ctx, a, 100000)
		if err != nil {
			t.Fatal(err)
		}
		var settled credits.Amount
		for _, e := range entries {
			if e.Kind == credits.EntrySettle {
				settled += e.Amount
				if e.ReservationID == "" || e.Usage == nil || e.Usage.Model != "m" {
					t.Errorf("settle entry %+v", e)
				}
			}
		}
		if settled != want.Settled {
			t.Errorf("%s: settle entries sum to %s, want %s", a, settled, want.Settled)
		}
	}
	var leases int
	if err := direct.pool.QueryRow(ctx, `SELECT count(*) FROM leases`).Scan(&leases); err != nil || leases != 0 {
		t.Errorf("%d leases left after close, %v", leases, err)
	}
}

// TestCrashedInstanceRecovered: an instance that crashed (abandoned without Close) leaves its
// leases; another instance's ReleaseExpired releases them once they expired, and the books are
// exact: what the crashed instance had committed is charged, what it had settled in memory and
// not committed is not (the undercharge of a crash), nothing stays open.
func TestCrashedInstanceRecovered(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	const ttl = time.Minute
	// The crashing instance commits only when asked to: its last settlements stay in memory.
	crashing, err := OpenWith(ctx, dsn, Options{LeaseSize: 2 * c, LeaseTTL: ttl, FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	other := openLeasedStore(t, dsn, Options{LeaseSize: 2 * c, LeaseTTL: ttl})
	account := credits.UserAccount("u")
	if _, _, err := other.Credit(ctx, account, 20*c, "", ""); err != nil {
		t.Fatal(err)
	}
	settle := func(n int) {
		for range n {
			r, _, err := crashing.Reserve(ctx, account, c/2, time.Minute, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := crashing.Settle(ctx, r.ID, c/2, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	settle(6)
	if err := crashing.lease.flush(ctx); err != nil { // 3 credits committed
		t.Fatal(err)
	}
	settle(2) // 1 credit settled in memory only
	if _, _, err := crashing.Reserve(ctx, account, c/2, time.Minute, nil); err != nil {
		t.Fatal(err) // and a request in flight
	}
	crashing.abandon()

	// Its leases hold credits until they expire; the other instance's view counts them open.
	books := storetest.CheckBooks(t, other, account)
	if books.Settled != 3*c || books.Open == 0 {
		t.Errorf("books before the expiry %+v: want 3 settled and the crashed instance's leases open", books)
	}
	if _, _, err := other.ReleaseExpired(ctx, time.Now()); err != nil {
		t.Fatal(err)
	}
	if b := storetest.CheckBooks(t, other, account); b != books {
		t.Errorf("leases released before their expiry: %+v -> %+v", books, b)
	}
	if _, _, err := other.ReleaseExpired(ctx, time.Now().Add(ttl+time.Second)); err != nil {
		t.Fatal(err)
	}
	want := credits.Audit{Credited: 20 * c, Settled: 3 * c, Balance: 17 * c}
	if books := storetest.CheckBooks(t, other, account); books != want {
		t.Errorf("books after the sweep %+v, want %+v", books, want)
	}
	// All of it can be spent again.
	var spent credits.Amount
	for {
		r, _, err := other.Reserve(ctx, account, c, time.Minute, nil)
		if errors.Is(err, credits.ErrInsufficientCredits) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := other.Settle(ctx, r.ID, c, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
		spent += c
	}
	if spent != 17*c {
		t.Errorf("spent %s after the recovery, want 17", spent)
	}
	if books := storetest.CheckBooks(t, other, account); books != (credits.Audit{Credited: 20 * c, Settled: 20 * c}) {
		t.Errorf("books %+v", books)
	}
}

// TestLostLeaseChargesTheBalance: a lease released under its holder (it did not renew it in
// time) is no longer carved from, and the settlement of a reservation carved from it is
// charged to the balance: the books stay exact on both instances.
func TestLostLeaseChargesTheBalance(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	holder := openLeasedStore(t, dsn, Options{LeaseSize: 2 * c})
	sweeper := openLeasedStore(t, dsn, Options{LeaseSize: 2 * c})
	account := credits.UserAccount("u")
	if _, _, err := holder.Credit(ctx, account, 10*c, "", ""); err != nil {
		t.Fatal(err)
	}
	r, balance, err := holder.Reserve(ctx, account, c, time.Hour, nil)
	if err != nil || balance != 9*c {
		t.Fatalf("reserve: %s, %v", balance, err)
	}
	var leases int
	if err := holder.pool.QueryRow(ctx, `SELECT count(*) FROM leases`).Scan(&leases); err != nil || leases != 1 {
		t.Fatalf("%d leases, %v; want the reservation carved from one", leases, err)
	}
	// The sweeper's clock is past the lease's expiry.
	if _, _, err := sweeper.ReleaseExpired(ctx, time.Now().Add(DefaultLeaseTTL+time.Second)); err != nil {
		t.Fatal(err)
	}
	storetest.CheckBooks(t, sweeper, account)
	if err := holder.lease.renew(ctx); err != nil {
		t.Fatal(err)
	}
	storetest.CheckBooks(t, holder, account)
	if _, err := holder.Settle(ctx, r.ID, c+c/2, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	storetest.CheckBooks(t, holder, account)
	if err := holder.lease.flush(ctx); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Store{holder, sweeper} {
		if books := storetest.CheckBooks(t, s, account); books != (credits.Audit{Credited: 10 * c, Settled: c + c/2, Balance: 10*c - c - c/2}) {
			t.Errorf("books %+v", books)
		}
	}
	// A new lease is taken for the next reservation.
	if _, _, err := holder.Reserve(ctx, account, c, time.Hour, nil); err != nil {
		t.Fatal(err)
	}
	storetest.CheckBooks(t, holder, account)
	storetest.CheckBooks(t, sweeper, account)
}

// TestLeasedRoundTrips: on a busy account a leased Reserve and Settle make far fewer than one
// round trip per request (a lease every LeaseSize, a commit per batch), the direct ones two
// or more; an account too small to lease is reserved from directly with no extra round trip.
func TestLeasedRoundTrips(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	const n = 500
	perRequest := func(s *Store, account credits.AccountID, funded credits.Amount) float64 {
		if _, _, err := s.Credit(ctx, account, funded, "", ""); err != nil {
			t.Fatal(err)
		}
		before := s.RoundTrips()
		for range n {
			r, _, err := s.Reserve(ctx, account, c/10, time.Minute, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Settle(ctx, r.ID, c/20, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}
		if s.lease != nil {
			if err := s.lease.flush(ctx); err != nil {
				t.Fatal(err)
			}
		}
		return float64(s.RoundTrips()-before) / n
	}
	direct := openTestStore(t)
	leased := openLeasedStore(t, dsn, Options{LeaseSize: 10 * c, FlushInterval: 50 * time.Millisecond})
	if rt := perRequest(direct, credits.UserAccount("d"), 1000*c); rt < 2 {
		t.Errorf("direct: %.2f round trips per request, want at least 2 (a reserve and a settle)", rt)
	}
	if rt := perRequest(leased, credits.UserAccount("l"), 1000*c); rt > 0.25 {
		t.Errorf("leased: %.2f round trips per request on a busy account, want well below one", rt)
	}
	// 30 credits: below four leases of 10, reserved directly: a reserve and a settle, and no
	// lease attempt per request.
	if rt := perRequest(leased, credits.UserAccount("small"), 30*c); rt > 4.1 {
		t.Errorf("leased, small account: %.2f round trips per request, want those of the direct path", rt)
	}
	if books := storetest.CheckBooks(t, leased, credits.UserAccount("l")); books.Settled != n*c/20 {
		t.Errorf("books %+v", books)
	}
}

// BenchmarkReserveSettle: a Reserve and a Settle, directly and leased, from parallel
// goroutines, on one busy account and spread over 64; it reports the store round trips per op.
func BenchmarkReserveSettle(b *testing.B) {
	for _, tc := range []struct {
		name     string
		opts     Options
		accounts int
	}{
		{"direct/1account", Options{}, 1},
		{"leased/1account", Options{LeaseSize: DefaultLeaseSize}, 1},
		{"direct/64accounts", Options{}, 64},
		{"leased/64accounts", Options{LeaseSize: DefaultLeaseSize}, 64},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			s := openLeasedStore(b, newTestDatabase(b), tc.opts)
			accounts := make([]credits.AccountID, tc.accounts)
			for i := range accounts {
				accounts[i] = credits.UserAccount("bench" + strconv.Itoa(i))
				if _, _, err := s.Credit(ctx, accounts[i], credits.MaxAmount, "", ""); err != nil {
					b.Fatal(err)
				}
			}
			var next atomic.Uint64
			before := s.RoundTrips()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					account := accounts[next.Add(1)%uint64(len(accounts))]
					r, _, err := s.Reserve(ctx, account, c/10, time.Minute, nil)
					if err != nil {
						b.Error(err)
						return
					}
					if _, err := s.Settle(ctx, r.ID, c/20, credits.Usage{Model: "m"}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			if s.lease != nil {
				if err := s.lease.flush(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(s.RoundTrips()-before)/float64(b.N), "roundtrips/op")
		})
	}
}

// TestCommitReplayIsIdempotent: a batch committed again after a commit whose outcome was not
// known (the connection broke after COMMIT) charges nothing twice: the settle entries are
// unique by reservation id, and the replay is recognised as committed.
func TestCommitReplayIsIdempotent(t *testing.T) {
	ctx := context.Background()
	s := openLeasedStore(t, newTestDatabase(t), Options{LeaseSize: 2 * c, FlushInterval: time.Hour})
	account := credits.UserAccount("u")
	if _, _, err := s.Credit(ctx, account, 10*c, "", ""); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		r, _, err := s.Reserve(ctx, account, c/2, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Settle(ctx, r.ID, c/4, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
	l := s.lease
	l.queue.mu.Lock()
	ops := slices.Clone(l.queue.ops)
	l.queue.mu.Unlock()
	if len(ops) != 3 {
		t.Fatalf("%d settlements queued, want 3", len(ops))
	}
	if err := l.commit(ctx, ops); err != nil {
		t.Fatal(err)
	}
	// As if the first outcome had not been seen: the memory still waits for the commit.
	for _, op := range ops {
		op.lease.pending += op.part
		op.account.pendingExcess += op.cost - op.part
	}
	if err := l.commit(ctx, ops); err != nil {
		t.Fatalf("replayed commit: %v", err)
	}
	l.queue.advance(len(ops), nil)
	if books := storetest.CheckBooks(t, s, account); books != (credits.Audit{Credited: 10 * c, Settled: 3 * c / 4, Balance: 10*c - 3*c/4}) {
		t.Errorf("books after a replayed commit %+v", books)
	}
	entries, err := s.Entries(ctx, account, 100)
	if err != nil || len(entries) != 4 {
		t.Errorf("%d entries, %v; want a credit and 3 settlements", len(entries), err)
	}
}

// TestRefusedSettlementIsDropped: a settlement the database refuses for good (here a CHECK
// constraint the test adds, violated by its model name) does not block the flusher forever:
// the settlements beside it in its batch are committed one by one, it is dropped (reported
// to OnDrop, its cost never charged and its reservation back in the lease), leased
// reservations go on, and the books stay exact, in the database too after Close.
func TestRefusedSettlementIsDropped(t *testing.T) {
	ctx := context.Background()
	dsn := newTestDatabase(t)
	var (
		mu      sync.Mutex
		dropped []string
		failed  int
	)
	s, err := OpenWith(ctx, dsn, Options{LeaseSize: 2 * c, FlushInterval: 50 * time.Millisecond,
		OnDrop: func(id string, cost credits.Amount, err error) {
			mu.Lock()
			defer mu.Unlock()
			if cost != c/4 || !permanentCommitError(err) {
				t.Errorf("dropped %s of %s: %v", id, cost, err)
			}
			dropped = append(dropped, id)
		},
		OnCommit: func(_ int, err error) {
			if err != nil {
				mu.Lock()
				failed++
				mu.Unlock()
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	if _, err := s.pool.Exec(ctx, `ALTER TABLE ledger ADD CONSTRAINT test_no_poison CHECK (model IS DISTINCT FROM 'poison')`); err != nil {
		t.Fatal(err)
	}
	account := credits.UserAccount("u")
	if _, _, err := s.Credit(ctx, account, 10*c, "", ""); err != nil {
		t.Fatal(err)
	}
	var poisoned string
	for i := range 5 {
		r, _, err := s.Reserve(ctx, account, c/2, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		model := "fine"
		if i == 2 {
			model, poisoned = "poison", r.ID
		}
		if _, err := s.Settle(ctx, r.ID, c/4, credits.Usage{Model: model}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.lease.flush(ctx); err != nil {
		t.Fatalf("flush with a refused settlement: %v", err)
	}
	mu.Lock()
	if len(dropped) != 1 || dropped[0] != poisoned || failed < 2 {
		t.Errorf("dropped %v (want only %s), %d failed commits (want the batch's and the poisoned one's)", dropped, poisoned, failed)
	}
	mu.Unlock()
	want := credits.Audit{Credited: 10 * c, Settled: 4 * c / 4, Balance: 10*c - 4*c/4}
	if books := storetest.CheckBooks(t, s, account); books != want {
		t.Errorf("books after the drop %+v, want %+v", books, want)
	}
	// The flusher goes on: a later settlement is committed.
	r, _, err := s.Reserve(ctx, account, c/2, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Settle(ctx, r.ID, c/4, credits.Usage{Model: "fine"}); err != nil {
		t.Fatal(err)
	}
	if err := s.lease.flush(ctx); err != nil {
		t.Fatal(err)
	}
	entries, err := s.Entries(ctx, account, 100)
	if err != nil || len(entries) != 6 {
		t.Errorf("%d entries, %v; want a credit and 5 settlements", len(entries), err)
	}
	for _, en := range entries {
		if en.ReservationID == poisoned {
			t.Errorf("the refused settlement has an entry: %+v", en)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Closed, the leases are back: the database's books alone.
	other, err := Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	want = credits.Audit{Credited: 10 * c, Settled: 5 * c / 4, Balance: 10*c - 5*c/4}
	if books := storetest.CheckBooks(t, other, account); books != want {
		t.Errorf("books in the database after Close %+v, want %+v", books, want)
	}
}
