package sqlite

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// cached reports whether the account is in memory.
func cached(s *Store, account credits.AccountID) bool {
	sh := s.accounts.shard(account)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	_, ok := sh.accounts[account]
	return ok
}

// TestIdleAccountsAreEvicted: accounts idle for accountIdleTTL with nothing open and nothing
// waiting to be committed leave memory; the others stay; an evicted account comes back from the
// database as it was, refill period included.
func TestIdleAccountsAreEvicted(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s := openAt(t, filepath.Join(t.TempDir(), "gateway.db"), Options{Clock: clock.Now, FlushInterval: time.Hour})
	defer s.Close()
	refill := &credits.Refill{Cap: 10 * c, Period: 1}

	var idle []credits.AccountID
	for i := range 50 {
		account := credits.AnonymousAccount(fmt.Sprintf("192.0.2.%d", i))
		r, _, err := s.Reserve(ctx, account, 2*c, time.Hour, refill)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Settle(ctx, r.ID, c, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
		idle = append(idle, account)
	}
	withOpen := credits.AnonymousAccount("198.51.100.1")
	open, _, err := s.Reserve(ctx, withOpen, c, time.Hour, refill)
	if err != nil {
		t.Fatal(err)
	}
	unknown := credits.UserAccount("nobody")
	if _, err := s.Balance(ctx, unknown); err != credits.ErrUnknownAccount {
		t.Fatal(err)
	}

	// Nothing is committed yet (FlushInterval is an hour): nothing can go.
	clock.Advance(accountIdleTTL + time.Second)
	if n := s.evictIdle(clock.Now().Add(-accountIdleTTL).UnixNano()); n != 1 { // the unknown account
		t.Fatalf("%d evicted with everything waiting to be committed, want 1", n)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// Used a minute ago: stays.
	recent := idle[0]
	clock.Advance(-time.Minute)
	if _, err := s.Balance(ctx, recent); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	n := s.evictIdle(clock.Now().Add(-accountIdleTTL).UnixNano())
	if n != len(idle)-1 {
		t.Errorf("%d evicted, want %d", n, len(idle)-1)
	}
	if !cached(s, withOpen) || !cached(s, recent) || cached(s, idle[1]) || cached(s, unknown) {
		t.Errorf("cached: with open %v, recent %v, idle %v, unknown %v", cached(s, withOpen), cached(s, recent), cached(s, idle[1]), cached(s, unknown))
	}
	if got := s.accounts.size.Load(); got != 2 {
		t.Errorf("%d accounts cached, want 2", got)
	}

	// Back from the database: same balance, and no second refill in the same period.
	for _, account := range idle[1:] {
		if b, err := s.Balance(ctx, account); err != nil || b != 9*c {
			t.Fatalf("%s: balance %s, %v", account, b, err)
		}
		if _, balance, err := s.Reserve(ctx, account, 9*c, time.Hour, refill); err != nil || balance != 0 {
			t.Fatalf("%s: reserve the rest: %s, %v", account, balance, err)
		}
		books := checkBooks(t, s, account)
		if books != (credits.Audit{Credited: 10 * c, Settled: c, Open: 9 * c}) {
			t.Fatalf("%s: books %+v", account, books)
		}
	}
	// The reservation kept its account; once closed, the account can go too.
	if _, err := s.Release(ctx, open.ID); err != nil {
		t.Fatal(err)
	}
	clock.Advance(accountIdleTTL + time.Second)
	s.evictIdle(clock.Now().Add(-accountIdleTTL).UnixNano())
	if cached(s, withOpen) {
		t.Error("idle account with its reservation closed still cached")
	}
	if b, err := s.Balance(ctx, withOpen); err != nil || b != 10*c {
		t.Errorf("balance after coming back: %s, %v", b, err)
	}
}

// TestCacheSoftLimit floods the cache with new accounts: beyond the soft limit, the flusher
// drops every account with nothing open and nothing waiting, however recent.
func TestCacheSoftLimit(t *testing.T) {
	ctx := context.Background()
	saved := cachedAccountsSoftLimit
	t.Cleanup(func() { cachedAccountsSoftLimit = saved }) // once the store is closed
	cachedAccountsSoftLimit = 100
	s, _ := openTestStore(t, nil)

	refill := &credits.Refill{Cap: c, Period: 1}
	var kept []credits.Reservation
	for i := range 20 {
		r, _, err := s.Reserve(ctx, credits.AnonymousAccount(fmt.Sprintf("kept-%d", i)), c, time.Hour, refill)
		if err != nil {
			t.Fatal(err)
		}
		kept = append(kept, r)
	}
	for i := range 300 {
		if _, err := s.Balance(ctx, credits.UserAccount(fmt.Sprint(i))); err != credits.ErrUnknownAccount {
			t.Fatal(err)
		}
	}
	if err := s.Flush(ctx); err != nil { // the grants of the kept accounts
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.accounts.size.Load() > cachedAccountsSoftLimit {
		if time.Now().After(deadline) {
			t.Fatalf("%d accounts cached, soft limit %d", s.accounts.size.Load(), cachedAccountsSoftLimit)
		}
		s.queue.wakeEvictor()
		time.Sleep(time.Millisecond)
	}
	for _, r := range kept {
		if !cached(s, r.Account) {
			t.Errorf("%s, with a reservation open, left the cache", r.Account)
		}
		if _, err := s.Settle(ctx, r.ID, c, credits.Usage{}); err != nil {
			t.Error(err)
		}
	}
}

// TestConcurrentMixKeepsBooksExactly runs reservations, settlements, releases, credits (some
// replayed), refills and audits from many goroutines at once on a few accounts, then checks the
// books of every account exactly against what the calls reported, in memory and, after a
// crash, in the database.
func TestConcurrentMixKeepsBooksExactly(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s := openAt(t, path, Options{})
	accounts := []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b"),
		credits.AnonymousAccount("c"), credits.AnonymousAccount("d")}
	isAnon := func(a credits.AccountID) bool { return a[:5] == "anon:" }
	for _, account := range accounts[:2] {
		credit(t, s, account, 50*c)
	}

	const workers, steps = 8, 300
	type tally struct {
		credited, settled credits.Amount
		open              map[string]credits.Amount
	}
	var (
		mu      sync.Mutex
		tallies = make(map[credits.AccountID]*tally)
		wg      sync.WaitGroup
		errs    = make(chan error, workers)
	)
	for _, account := range accounts {
		tallies[account] = &tally{open: make(map[string]credits.Amount)}
	}
	tallies[accounts[0]].credited, tallies[accounts[1]].credited = 50*c, 50*c
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			var mine []credits.Reservation // open reservations this worker made
			fail := func(err error) { errs <- fmt.Errorf("worker %d: %w", w, err) }
			for i := range steps {
				account := accounts[rng.IntN(len(accounts))]
				switch k := rng.IntN(100); {
				case k < 40:
					var refill *credits.Refill
					if isAnon(account) {
						refill = &credits.Refill{Cap: 20 * c, Period: int64(i / 100)}
					}
					r, _, err := s.Reserve(ctx, account, credits.Amount(rng.IntN(3*int(c))), time.Hour, refill)
					switch {
					case errors.Is(err, credits.ErrInsufficientCredits):
					case err != nil:
						fail(err)
						return
					default:
						mine = append(mine, r)
						mu.Lock()
						tallies[account].open[r.ID] = r.Amount
						mu.Unlock()
					}
				case k < 80 && len(mine) > 0:
					j := rng.IntN(len(mine))
					r := mine[j]
					mine = append(mine[:j], mine[j+1:]...)
					if rng.IntN(4) == 0 {
						if _, err := s.Release(ctx, r.ID); err != nil {
							fail(err)
							return
						}
						mu.Lock()
						delete(tallies[r.Account].open, r.ID)
						mu.Unlock()
						continue
					}
					cost := credits.Amount(rng.Int64N(int64(2*r.Amount) + 1))
					if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: "m"}); err != nil {
						fail(err)
						return
					}
					mu.Lock()
					delete(tallies[r.Account].open, r.ID)
					tallies[r.Account].settled += cost
					mu.Unlock()
				case k < 92:
					amount := credits.Amount(rng.IntN(5*int(c))) - c
					key := ""
					if rng.IntN(3) == 0 {
						key = fmt.Sprintf("w%d-%d", w, rng.IntN(5)) // replayed now and then
						amount = credits.Amount(len(key)) * c
					}
					_, replayed, err := s.Credit(ctx, account, amount, "top-up", key)
					if err != nil {
						fail(err)
						return
					}
					if !replayed {
						mu.Lock()
						tallies[account].credited += amount
						mu.Unlock()
					}
				case k < 96:
					if _, _, err := s.ReleaseExpired(ctx, time.Now()); err != nil { // none expired
						fail(err)
						return
					}
				default:
					books, err := s.Audit(ctx, account)
					if err != nil && err != credits.ErrUnknownAccount {
						fail(err)
						return
					}
					if err == nil && books.Credited != books.Balance+books.Settled+books.Open {
						fail(fmt.Errorf("%s: books %+v do not balance", account, books))
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		s.Close()
		return
	}

	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	checkMemoryAgainstDatabase(t, s, "after the mix")
	check := func(when string, opened bool) {
		t.Helper()
		for _, account := range accounts {
			tl := tallies[account]
			var open credits.Amount
			if opened {
				for _, amount := range tl.open {
					open += amount
				}
			}
			books, err := s.Audit(ctx, account)
			if err == credits.ErrUnknownAccount && tl.credited == 0 && tl.settled == 0 {
				continue
			}
			if err != nil {
				t.Fatalf("%s: audit of %s: %v", when, account, err)
			}
			grants := books.Credited - tl.credited // what refills added
			if grants < 0 || !isAnon(account) && grants != 0 {
				t.Errorf("%s: %s credited %s, credits add up to %s", when, account, books.Credited, tl.credited)
			}
			want := credits.Audit{Credited: books.Credited, Settled: tl.settled, Open: open,
				Balance: books.Credited - tl.settled - open}
			if books != want {
				t.Errorf("%s: %s: books %+v, want %+v", when, account, books, want)
			}
			if b, err := s.Balance(ctx, account); err != nil || b != books.Balance {
				t.Errorf("%s: %s: balance %s, %v; books %s", when, account, b, err, books.Balance)
			}
		}
	}
	check("after the mix", true)

	// A crash with everything committed releases the open reservations and loses nothing else.
	crash(t, s)
	s = openAt(t, path, Options{})
	defer s.Close()
	check("after a crash", false)
}

// TestAccountReloadedAfterUnknownCreditOutcome: when a Credit fails in a way that leaves its
// outcome unknown, the account is read again before its next use, open reservations kept. The
// credit committed behind the store's back stands for such an outcome.
func TestAccountReloadedAfterUnknownCreditOutcome(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 10*c)
	r := reserve(t, s, account, 3*c, time.Hour)
	if _, err := s.write.ExecContext(ctx, `UPDATE accounts SET balance = balance + ? WHERE id = ?`, 5*c, account); err != nil {
		t.Fatal(err)
	}
	if _, err := s.write.ExecContext(ctx, `INSERT INTO ledger (account_id, kind, amount, created_at) VALUES (?, 'credit', ?, 0)`, account, 5*c); err != nil {
		t.Fatal(err)
	}
	a, err := s.acquire(ctx, account)
	if err != nil {
		t.Fatal(err)
	}
	a.loaded = false // what Credit does when its commit fails
	a.mu.Unlock()

	balance, err := s.Settle(ctx, r.ID, c, credits.Usage{})
	if err != nil || balance != 14*c {
		t.Fatalf("settle: balance %s, %v; want 14", balance, err)
	}
	if books := checkBooks(t, s, account); books != (credits.Audit{Credited: 15 * c, Settled: c, Balance: 14 * c}) {
		t.Errorf("books %+v", books)
	}
	checkMemoryAgainstDatabase(t, s, "after reloading")
}
