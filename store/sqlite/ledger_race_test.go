package sqlite

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestSettleReleaseRace closes each reservation from two goroutines at once: exactly one wins
// and the books stay exact.
func TestSettleReleaseRace(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 1000*c)

	var settledTotal credits.Amount
	for i := range 100 {
		r := reserve(t, s, account, 5*c, time.Minute)
		var (
			wg                    sync.WaitGroup
			start                 = make(chan struct{})
			settleErr, releaseErr error
		)
		wg.Add(2)
		go func() {
			defer wg.Done()
			<-start
			_, settleErr = s.Settle(ctx, r.ID, 3*c, credits.Usage{OutputTokens: 1})
		}()
		go func() {
			defer wg.Done()
			<-start
			_, releaseErr = s.Release(ctx, r.ID)
		}()
		close(start)
		wg.Wait()

		switch {
		case settleErr == nil && errors.Is(releaseErr, credits.ErrReservationClosed):
			settledTotal += 3 * c
		case releaseErr == nil && errors.Is(settleErr, credits.ErrReservationClosed):
		default:
			t.Fatalf("iteration %d: settle %v, release %v: want exactly one to win", i, settleErr, releaseErr)
		}
		books := checkBooks(t, s, account)
		if books.Open != 0 || books.Settled != settledTotal || books.Balance != 1000*c-settledTotal {
			t.Fatalf("iteration %d: books %+v, settled %s", i, books, settledTotal)
		}
	}
}

// TestConcurrentReserveNeverOverspends sends 200 reservations at once against a balance that
// covers exactly 50 of them.
func TestConcurrentReserveNeverOverspends(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	const (
		callers = 200
		covered = 50
		amount  = 7*c + 3
	)
	credit(t, s, account, covered*amount)

	var (
		wg         sync.WaitGroup
		start      = make(chan struct{})
		ok, short  atomic.Int64
		unexpected = make(chan error, callers)
	)
	for range callers {
		wg.Go(func() {
			<-start
			_, balance, err := s.Reserve(ctx, account, amount, time.Minute, nil)
			switch {
			case err == nil:
				ok.Add(1)
				if balance < 0 {
					unexpected <- fmt.Errorf("balance after reserve %s", balance)
				}
			case errors.Is(err, credits.ErrInsufficientCredits):
				short.Add(1)
				if balance >= amount {
					unexpected <- fmt.Errorf("refused with balance %s", balance)
				}
			default:
				unexpected <- err
			}
		})
	}
	close(start)
	wg.Wait()
	close(unexpected)
	for err := range unexpected {
		t.Error(err)
	}
	if ok.Load() != covered || short.Load() != callers-covered {
		t.Errorf("%d reserved and %d refused, want %d and %d", ok.Load(), short.Load(), covered, callers-covered)
	}
	books := checkBooks(t, s, account)
	if books.Balance != 0 || books.Open != covered*amount {
		t.Errorf("books %+v", books)
	}
}

// TestConcurrentClosingKeepsBooks closes many reservations of several accounts at once, by
// settling, releasing and sweeping expired ones, while reserving and crediting go on; the books
// of every account must then balance exactly and match what was done.
func TestConcurrentClosingKeepsBooks(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openTestStore(t, clock)
	accounts := []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b"), credits.AnonymousAccount("c")}
	const perAccount = 60
	for _, account := range accounts {
		credit(t, s, account, 1000*c)
	}

	// Reservations: a third already expired, the others open for an hour.
	var rs []credits.Reservation
	for i := range perAccount {
		for _, account := range accounts {
			ttl := time.Hour
			if i%3 == 0 {
				ttl = time.Second
			}
			rs = append(rs, reserve(t, s, account, credits.Amount(i+1)*c/10, ttl))
		}
	}
	sweepAt := clock.Now().Add(time.Minute)

	var (
		wg      sync.WaitGroup
		start   = make(chan struct{})
		mu      sync.Mutex
		settled = make(map[credits.AccountID]credits.Amount)
		closed  atomic.Int64
		errs    = make(chan error, len(rs)*2+10)
	)
	for i, r := range rs {
		wg.Go(func() {
			<-start
			var err error
			if i%2 == 0 {
				cost := r.Amount/2 + credits.Amount(i%5)*c // sometimes above the reservation
				if _, err = s.Settle(ctx, r.ID, cost, credits.Usage{Model: "m"}); err == nil {
					mu.Lock()
					settled[r.Account] += cost
					mu.Unlock()
				}
			} else {
				_, err = s.Release(ctx, r.ID)
			}
			switch {
			case err == nil:
				closed.Add(1)
			case !errors.Is(err, credits.ErrReservationClosed):
				errs <- err
			}
		})
	}
	var swept atomic.Int64
	for range 3 {
		wg.Go(func() {
			<-start
			n, _, err := s.ReleaseExpired(ctx, sweepAt)
			if err != nil {
				errs <- err
			}
			swept.Add(int64(n))
		})
	}
	// Unrelated traffic on the same accounts at the same time.
	for i, account := range accounts {
		wg.Go(func() {
			<-start
			for j := range 10 {
				if _, _, err := s.Credit(ctx, account, c, "top-up", fmt.Sprintf("k%d-%d", i, j)); err != nil {
					errs <- err
				}
				if _, err := s.Audit(ctx, account); err != nil {
					errs <- err
				}
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if got := closed.Load() + swept.Load(); got != int64(len(rs)) {
		t.Errorf("%d closed + %d swept, want %d reservations closed once each", closed.Load(), swept.Load(), len(rs))
	}
	for _, account := range accounts {
		books := checkBooks(t, s, account)
		want := credits.Audit{Credited: 1010 * c, Settled: settled[account], Open: 0, Balance: 1010*c - settled[account]}
		if books != want {
			t.Errorf("%s: books %+v, want %+v", account, books, want)
		}
	}
	var open int
	if err := s.read.QueryRowContext(ctx, `SELECT count(*) FROM reservations`).Scan(&open); err != nil || open != 0 {
		t.Errorf("%d reservations left open (%v)", open, err)
	}
}

// TestConcurrentIdempotentCredit sends the same idempotent credit 10 times at once: it credits
// once and every call returns the same entry.
func TestConcurrentIdempotentCredit(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	const callers = 10

	var (
		wg       sync.WaitGroup
		start    = make(chan struct{})
		entries  [callers]credits.Entry
		replayed [callers]bool
		errs     [callers]error
	)
	for i := range callers {
		wg.Go(func() {
			<-start
			entries[i], replayed[i], errs[i] = s.Credit(ctx, account, 25*c, "payment 42", "pay-42")
		})
	}
	close(start)
	wg.Wait()

	fresh := 0
	for i := range callers {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		if !replayed[i] {
			fresh++
		}
		if entries[i] != entries[0] {
			t.Errorf("call %d: entry %+v, call 0: %+v", i, entries[i], entries[0])
		}
	}
	if fresh != 1 {
		t.Errorf("%d calls credited, want 1", fresh)
	}
	if books := checkBooks(t, s, account); books.Credited != 25*c || books.Balance != 25*c {
		t.Errorf("books %+v", books)
	}
	if es, _ := s.Entries(ctx, account, 100); len(es) != 1 {
		t.Errorf("%d entries, want 1", len(es))
	}
}

// TestConcurrentRefillOncePerPeriod has many anonymous requests reserve at once at the start of
// each period: the account is filled once per period and never above its cap.
func TestConcurrentRefillOncePerPeriod(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.AnonymousAccount("198.51.100.0/24")
	const (
		callers = 40
		capAmt  = 10 * c
		amount  = c / 2
	)
	for period := int64(100); period < 104; period++ {
		refill := &credits.Refill{Cap: capAmt, Period: period}
		var (
			wg    sync.WaitGroup
			start = make(chan struct{})
			ok    atomic.Int64
			errs  = make(chan error, callers)
		)
		for range callers {
			wg.Go(func() {
				<-start
				_, balance, err := s.Reserve(ctx, account, amount, time.Minute, refill)
				switch {
				case err == nil:
					ok.Add(1)
				case !errors.Is(err, credits.ErrInsufficientCredits):
					errs <- err
				}
				if balance > capAmt {
					errs <- fmt.Errorf("period %d: balance %s above cap", period, balance)
				}
			})
		}
		close(start)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if ok.Load() != int64(capAmt/amount) {
			t.Errorf("period %d: %d reserved, want %d", period, ok.Load(), capAmt/amount)
		}
		books := checkBooks(t, s, account)
		if books.Balance != 0 {
			t.Errorf("period %d: balance %s, want 0", period, books.Balance)
		}
		entries, err := s.Entries(ctx, account, 1000)
		if err != nil {
			t.Fatal(err)
		}
		grants := 0
		for _, e := range entries {
			if e.Kind == credits.EntryGrant {
				grants++
			}
		}
		if grants != int(period-100+1) {
			t.Errorf("period %d: %d grants, want one per period", period, grants)
		}
		// Each period after the first tops up the 3 credits spent at the end of the previous one.
		if books.Credited != capAmt+3*c*credits.Amount(period-100) {
			t.Errorf("period %d: credited %s", period, books.Credited)
		}
		if n, _, err := s.ReleaseExpired(ctx, time.Now().Add(time.Hour)); err != nil || n != callers/2 {
			t.Fatalf("period %d: released %d: %v", period, n, err)
		}
		if b, _ := s.Balance(ctx, account); b != capAmt {
			t.Errorf("period %d: balance after releasing all: %s", period, b)
		}
		// Spend some so the next refill has something to top up.
		r, _, err := s.Reserve(ctx, account, 3*c, time.Minute, refill)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Settle(ctx, r.ID, 3*c, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
	}
}
