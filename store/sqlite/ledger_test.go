package sqlite

import (
	"context"
	"errors"
	"math"
	"reflect"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

const c = credits.Credit

// credit gives the account amount, failing the test on error.
func credit(tb testing.TB, s *Store, account credits.AccountID, amount credits.Amount) {
	tb.Helper()
	if _, _, err := s.Credit(context.Background(), account, amount, "test", ""); err != nil {
		tb.Fatalf("credit %s %s: %v", account, amount, err)
	}
}

// reserve reserves amount from the account, failing the test on error.
func reserve(tb testing.TB, s *Store, account credits.AccountID, amount credits.Amount, ttl time.Duration) credits.Reservation {
	tb.Helper()
	r, _, err := s.Reserve(context.Background(), account, amount, ttl, nil)
	if err != nil {
		tb.Fatalf("reserve %s from %s: %v", amount, account, err)
	}
	return r
}

func TestReserve(t *testing.T) {
	account := credits.UserAccount("u")
	for _, tc := range []struct {
		name        string
		credited    credits.Amount // credited before, if not zero
		amount      credits.Amount
		ttl         time.Duration
		wantBalance credits.Amount
		wantErr     error // nil, a sentinel, or errAny
		wantAccount bool  // whether the account exists afterwards
	}{
		{name: "covered", credited: 10 * c, amount: 4 * c, ttl: time.Minute, wantBalance: 6 * c, wantAccount: true},
		{name: "whole balance", credited: 10 * c, amount: 10 * c, ttl: time.Minute, wantBalance: 0, wantAccount: true},
		{name: "one micro-credit short", credited: 10 * c, amount: 10*c + 1, ttl: time.Minute, wantBalance: 10 * c, wantErr: credits.ErrInsufficientCredits, wantAccount: true},
		{name: "negative balance", credited: -2 * c, amount: 1, ttl: time.Minute, wantBalance: -2 * c, wantErr: credits.ErrInsufficientCredits, wantAccount: true},
		{name: "zero from negative balance", credited: -2 * c, amount: 0, ttl: time.Minute, wantBalance: -2 * c, wantErr: credits.ErrInsufficientCredits, wantAccount: true},
		{name: "unknown account", amount: 1, ttl: time.Minute, wantBalance: 0, wantErr: credits.ErrInsufficientCredits},
		{name: "zero from unknown account", amount: 0, ttl: time.Minute, wantBalance: 0, wantAccount: true},
		{name: "zero", credited: 3 * c, amount: 0, ttl: time.Minute, wantBalance: 3 * c, wantAccount: true},
		{name: "negative amount", credited: 3 * c, amount: -1, ttl: time.Minute, wantErr: credits.ErrInvalidAmount, wantAccount: true},
		{name: "amount beyond MaxAmount", credited: 3 * c, amount: credits.MaxAmount + 1, ttl: time.Minute, wantErr: credits.ErrInvalidAmount, wantAccount: true},
		{name: "zero ttl", credited: 3 * c, amount: 1, ttl: 0, wantErr: errAny, wantAccount: true},
		{name: "negative ttl", credited: 3 * c, amount: 1, ttl: -time.Second, wantErr: errAny, wantAccount: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			clock := newTestClock()
			s, _ := openTestStore(t, clock)
			if tc.credited != 0 {
				credit(t, s, account, tc.credited)
			}
			r, balance, err := s.Reserve(ctx, account, tc.amount, tc.ttl, nil)
			checkErr(t, err, tc.wantErr)
			if balance != tc.wantBalance {
				t.Errorf("balance = %s, want %s", balance, tc.wantBalance)
			}
			if _, err := s.Balance(ctx, account); (err == nil) != tc.wantAccount {
				t.Errorf("account exists: %v, want %v", err == nil, tc.wantAccount)
			}
			if tc.wantErr != nil {
				if r != (credits.Reservation{}) {
					t.Errorf("failed reserve returned reservation %+v", r)
				}
				if tc.wantAccount {
					if a := checkBooks(t, s, account); a.Open != 0 {
						t.Errorf("failed reserve left %s open", a.Open)
					}
				}
				return
			}
			want := credits.Reservation{ID: r.ID, Account: account, Amount: tc.amount,
				CreatedAt: clock.Now(), ExpiresAt: clock.Now().Add(tc.ttl)}
			if !reflect.DeepEqual(r, want) {
				t.Errorf("reservation = %+v, want %+v", r, want)
			}
			if len(r.ID) < 26 {
				t.Errorf("reservation id %q is shorter than 128 random bits", r.ID)
			}
			a := checkBooks(t, s, account)
			if a.Open != tc.amount || a.Balance != tc.wantBalance {
				t.Errorf("audit = %+v", a)
			}
		})
	}
}

// errAny stands for any error that is not ErrStoreUnavailable.
var errAny = errors.New("any error")

func checkErr(tb testing.TB, err, want error) {
	tb.Helper()
	switch {
	case want == nil && err != nil:
		tb.Fatalf("error = %v, want none", err)
	case want == errAny:
		if err == nil || errors.Is(err, credits.ErrStoreUnavailable) {
			tb.Fatalf("error = %v, want a refusal", err)
		}
	case want != nil && !errors.Is(err, want):
		tb.Fatalf("error = %v, want %v", err, want)
	}
}

func TestReserveIDsAreUnique(t *testing.T) {
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 300)
	seen := make(map[string]bool)
	for range 300 {
		r := reserve(t, s, account, 1, time.Minute)
		if seen[r.ID] {
			t.Fatalf("reservation id %s twice", r.ID)
		}
		seen[r.ID] = true
	}
}

// The refill rules (once per period, up to the cap, debts carried) are the conformance suite's
// (store/storetest, run on this store by TestLedgerConformance).

// TestRefillOnDurableBalance: a refill grants on the durable balance (open reservations
// included), so that an anonymous debt outlives the period and a release after a refill never
// leaves more than the cap.
func TestRefillOnDurableBalance(t *testing.T) {
	ctx := context.Background()
	const allowance = c / 10
	refill := func(period int64) *credits.Refill { return &credits.Refill{Cap: allowance, Period: period} }

	t.Run("a debt is carried into the next periods", func(t *testing.T) {
		s, _ := openTestStore(t, nil)
		account := credits.AnonymousAccount("192.0.2.10")
		r, _, err := s.Reserve(ctx, account, allowance, time.Minute, refill(1))
		if err != nil {
			t.Fatal(err)
		}
		// the backend answered far more than reserved: 5 credits
		if balance, err := s.Settle(ctx, r.ID, 5*c, credits.Usage{}); err != nil || balance != allowance-5*c {
			t.Fatalf("settle: %s, %v", balance, err)
		}
		// each period pays 0.1 of the debt of 4.9: it is paid in period 50, and period 51 is
		// the first with an allowance to spend
		for period := int64(2); period <= 52; period++ {
			want := min(allowance, allowance-5*c+credits.Amount(period-1)*allowance)
			_, balance, err := s.Reserve(ctx, account, 0, time.Minute, refill(period))
			if balance != want || (err != nil) != (want < 0) {
				t.Fatalf("period %d: balance %s, %v; want %s", period, balance, err, want)
			}
			if period%10 == 0 {
				checkBooks(t, s, account)
			}
		}
	})

	t.Run("a release after the refill stays within the cap", func(t *testing.T) {
		s, _ := openTestStore(t, nil)
		account := credits.AnonymousAccount("192.0.2.11")
		r, _, err := s.Reserve(ctx, account, allowance, time.Minute, refill(1))
		if err != nil {
			t.Fatal(err)
		}
		// the period turns while the whole allowance is reserved
		if _, balance, err := s.Reserve(ctx, account, 0, time.Minute, refill(2)); err != nil || balance != 0 {
			t.Fatalf("reserve in period 2: %s, %v", balance, err)
		}
		if balance, err := s.Release(ctx, r.ID); err != nil || balance != allowance {
			t.Errorf("release: balance %s, %v; want the cap %s", balance, err, allowance)
		}
		if books := checkBooks(t, s, account); books.Credited != allowance || books.Balance != allowance {
			t.Errorf("books %+v: want one allowance granted", books)
		}
		// and a reservation settled below its amount across the boundary: the rest comes back
		// within the cap, and the next period tops up what was spent
		r, _, err = s.Reserve(ctx, account, allowance, time.Minute, refill(2))
		if err != nil {
			t.Fatal(err)
		}
		if _, balance, err := s.Reserve(ctx, account, 0, time.Minute, refill(3)); err != nil || balance != 0 {
			t.Fatalf("reserve in period 3: %s, %v", balance, err)
		}
		if balance, err := s.Settle(ctx, r.ID, allowance/4, credits.Usage{}); err != nil || balance != allowance-allowance/4 {
			t.Errorf("settle: balance %s, %v", balance, err)
		}
		if _, balance, err := s.Reserve(ctx, account, 0, time.Minute, refill(4)); err != nil || balance != allowance {
			t.Errorf("period 4: balance %s, %v; want the cap", balance, err)
		}
		checkBooks(t, s, account)
	})
}

func TestSettle(t *testing.T) {
	account := credits.UserAccount("u")
	usage := credits.Usage{Model: "gpt-x", Backend: "openai", InputTokens: 120, OutputTokens: 30}
	for _, tc := range []struct {
		name        string
		before      func(t *testing.T, s *Store, r credits.Reservation) // closes it first, for instance
		id          string                                              // the reservation made when empty
		cost        credits.Amount
		usage       credits.Usage
		wantBalance credits.Amount
		wantErr     error
	}{
		{name: "under reservation refunds the rest", cost: 1 * c, usage: usage, wantBalance: 9 * c},
		{name: "exactly the reservation", cost: 4 * c, usage: usage, wantBalance: 6 * c},
		{name: "zero usage", cost: 0, usage: credits.Usage{Model: "m"}, wantBalance: 10 * c},
		{name: "over reservation takes the rest from the balance", cost: 7 * c, usage: usage, wantBalance: 3 * c},
		{name: "over the whole balance goes negative", cost: 12 * c, usage: usage, wantBalance: -2 * c},
		{name: "negative cost", cost: -1, wantErr: credits.ErrInvalidAmount},
		{name: "cost beyond MaxAmount", cost: credits.MaxAmount + 1, wantErr: credits.ErrInvalidAmount},
		{name: "negative tokens", cost: 1, usage: credits.Usage{InputTokens: -1}, wantErr: errAny},
		{name: "unknown reservation", id: "nope", cost: 1, wantErr: credits.ErrReservationClosed},
		{name: "settled twice", cost: 1, wantErr: credits.ErrReservationClosed, before: func(t *testing.T, s *Store, r credits.Reservation) {
			if _, err := s.Settle(context.Background(), r.ID, 2*c, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after release", cost: 1, wantErr: credits.ErrReservationClosed, before: func(t *testing.T, s *Store, r credits.Reservation) {
			if _, err := s.Release(context.Background(), r.ID); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after expiry sweep", cost: 1, wantErr: credits.ErrReservationClosed, before: func(t *testing.T, s *Store, r credits.Reservation) {
			if n, _, err := s.ReleaseExpired(context.Background(), r.ExpiresAt.Add(time.Microsecond)); err != nil || n != 1 {
				t.Fatal(err)
			}
		}},
		{name: "expired but not swept", cost: 1 * c, wantBalance: 9 * c, before: func(t *testing.T, s *Store, r credits.Reservation) {
			if n, _, err := s.ReleaseExpired(context.Background(), r.ExpiresAt); err != nil || n != 0 {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			clock := newTestClock()
			s, _ := openTestStore(t, clock)
			credit(t, s, account, 10*c)
			r := reserve(t, s, account, 4*c, time.Minute)
			if tc.before != nil {
				tc.before(t, s, r)
			}
			before, err := s.Entries(ctx, account, 100)
			if err != nil {
				t.Fatal(err)
			}
			booksBefore := checkBooks(t, s, account)
			id := tc.id
			if id == "" {
				id = r.ID
			}
			clock.Advance(time.Second)

			balance, err := s.Settle(ctx, id, tc.cost, tc.usage)
			checkErr(t, err, tc.wantErr)
			books := checkBooks(t, s, account)
			entries, err := s.Entries(ctx, account, 100)
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != nil {
				if books != booksBefore || len(entries) != len(before) {
					t.Errorf("refused settle changed the books: %+v -> %+v", booksBefore, books)
				}
				return
			}
			if balance != tc.wantBalance || books.Balance != tc.wantBalance {
				t.Errorf("balance = %s (books %s), want %s", balance, books.Balance, tc.wantBalance)
			}
			if books.Open != 0 || books.Settled != tc.cost {
				t.Errorf("books = %+v", books)
			}
			if len(entries) != len(before)+1 {
				t.Fatalf("%d entries, want %d", len(entries), len(before)+1)
			}
			u := tc.usage
			want := credits.Entry{Seq: entries[0].Seq, Account: account, Kind: credits.EntrySettle, Amount: tc.cost,
				ReservationID: r.ID, Usage: &u, CreatedAt: clock.Now()}
			if !reflect.DeepEqual(entries[0], want) {
				t.Errorf("entry = %+v\nwant    %+v", entries[0], want)
			}
		})
	}
}

func TestRelease(t *testing.T) {
	account := credits.UserAccount("u")
	for _, tc := range []struct {
		name        string
		before      func(t *testing.T, s *Store, r credits.Reservation)
		id          string
		wantBalance credits.Amount
		wantErr     error
	}{
		{name: "returns all", wantBalance: 10 * c},
		{name: "unknown reservation", id: "nope", wantErr: credits.ErrReservationClosed},
		{name: "released twice", wantErr: credits.ErrReservationClosed, before: func(t *testing.T, s *Store, r credits.Reservation) {
			if _, err := s.Release(context.Background(), r.ID); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after settle", wantErr: credits.ErrReservationClosed, before: func(t *testing.T, s *Store, r credits.Reservation) {
			if _, err := s.Settle(context.Background(), r.ID, 1, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after spending the rest", wantBalance: 4 * c, before: func(t *testing.T, s *Store, r credits.Reservation) {
			r2 := reserve(t, s, r.Account, 6*c, time.Minute)
			if _, err := s.Settle(context.Background(), r2.ID, 6*c, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s, _ := openTestStore(t, nil)
			credit(t, s, account, 10*c)
			r := reserve(t, s, account, 4*c, time.Minute)
			if tc.before != nil {
				tc.before(t, s, r)
			}
			booksBefore := checkBooks(t, s, account)
			entriesBefore, _ := s.Entries(ctx, account, 100)
			id := tc.id
			if id == "" {
				id = r.ID
			}
			balance, err := s.Release(ctx, id)
			checkErr(t, err, tc.wantErr)
			books := checkBooks(t, s, account)
			entries, _ := s.Entries(ctx, account, 100)
			if len(entries) != len(entriesBefore) {
				t.Errorf("release wrote %d entries", len(entries)-len(entriesBefore))
			}
			if tc.wantErr != nil {
				if books != booksBefore {
					t.Errorf("refused release changed the books: %+v -> %+v", booksBefore, books)
				}
				return
			}
			if balance != tc.wantBalance || books.Balance != tc.wantBalance || books.Open != 0 {
				t.Errorf("balance = %s, books %+v, want balance %s", balance, books, tc.wantBalance)
			}
		})
	}
}

func TestReleaseExpired(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openTestStore(t, clock)
	a, b := credits.UserAccount("a"), credits.AnonymousAccount("b")
	credit(t, s, a, 100)
	credit(t, s, b, 100)

	start := clock.Now()
	reserve(t, s, a, 1, 10*time.Second) // expires start+10s
	reserve(t, s, a, 2, 20*time.Second) // start+20s
	reserve(t, s, b, 4, 10*time.Second) // start+10s
	reserve(t, s, b, 8, 30*time.Second) // start+30s
	settled := reserve(t, s, a, 16, 5*time.Second)
	if _, err := s.Settle(ctx, settled.ID, 16, credits.Usage{}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name         string
		now          time.Time
		wantCount    int
		wantTotal    credits.Amount
		wantBalances [2]credits.Amount
	}{
		{"before any expiry", start.Add(9 * time.Second), 0, 0, [2]credits.Amount{81, 88}},
		{"at expiry is not before it", start.Add(10 * time.Second), 0, 0, [2]credits.Amount{81, 88}},
		{"just after", start.Add(10*time.Second + time.Microsecond), 2, 5, [2]credits.Amount{82, 92}},
		{"nothing twice", start.Add(15 * time.Second), 0, 0, [2]credits.Amount{82, 92}},
		{"the rest", start.Add(time.Hour), 2, 10, [2]credits.Amount{84, 100}},
		{"none left", start.Add(2 * time.Hour), 0, 0, [2]credits.Amount{84, 100}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, total, err := s.ReleaseExpired(ctx, tc.now)
			if err != nil {
				t.Fatal(err)
			}
			if n != tc.wantCount || total != tc.wantTotal {
				t.Errorf("released %d totalling %d, want %d totalling %d", n, total, tc.wantCount, tc.wantTotal)
			}
			for i, account := range []credits.AccountID{a, b} {
				if books := checkBooks(t, s, account); books.Balance != tc.wantBalances[i] {
					t.Errorf("%s balance %d, want %d", account, books.Balance, tc.wantBalances[i])
				}
			}
		})
	}
}

func TestCredit(t *testing.T) {
	account := credits.UserAccount("u")
	other := credits.UserAccount("v")
	type call struct {
		account      credits.AccountID
		amount       credits.Amount
		reason, key  string
		wantErr      error
		wantReplayed bool
		wantSeq      int64 // the entry's seq, when not zero
	}
	for _, tc := range []struct {
		name         string
		calls        []call
		wantBalances map[credits.AccountID]credits.Amount
	}{
		{"creates the account", []call{
			{account: account, amount: 5 * c, reason: "welcome", wantSeq: 1},
		}, map[credits.AccountID]credits.Amount{account: 5 * c}},
		{"adds up", []call{
			{account: account, amount: 5 * c},
			{account: account, amount: 2 * c},
		}, map[credits.AccountID]credits.Amount{account: 7 * c}},
		{"takes away", []call{
			{account: account, amount: 5 * c},
			{account: account, amount: -7 * c},
		}, map[credits.AccountID]credits.Amount{account: -2 * c}},
		{"negative on a new account", []call{
			{account: account, amount: -1},
		}, map[credits.AccountID]credits.Amount{account: -1}},
		{"without key credits every time", []call{
			{account: account, amount: 1, reason: "r"},
			{account: account, amount: 1, reason: "r"},
		}, map[credits.AccountID]credits.Amount{account: 2}},
		{"replay", []call{
			{account: account, amount: 5 * c, reason: "pay", key: "k", wantSeq: 1},
			{account: account, amount: 5 * c, reason: "pay", key: "k", wantReplayed: true, wantSeq: 1},
			{account: account, amount: 5 * c, reason: "pay", key: "k", wantReplayed: true, wantSeq: 1},
		}, map[credits.AccountID]credits.Amount{account: 5 * c}},
		{"same key other amount", []call{
			{account: account, amount: 5 * c, reason: "pay", key: "k"},
			{account: account, amount: 6 * c, reason: "pay", key: "k", wantErr: credits.ErrIdempotencyConflict},
		}, map[credits.AccountID]credits.Amount{account: 5 * c}},
		{"same key other reason", []call{
			{account: account, amount: 5 * c, reason: "pay", key: "k"},
			{account: account, amount: 5 * c, reason: "refund", key: "k", wantErr: credits.ErrIdempotencyConflict},
		}, map[credits.AccountID]credits.Amount{account: 5 * c}},
		{"same key other account", []call{
			{account: account, amount: 5 * c, key: "k"},
			{account: other, amount: 5 * c, key: "k"},
		}, map[credits.AccountID]credits.Amount{account: 5 * c, other: 5 * c}},
		{"other key", []call{
			{account: account, amount: 5 * c, key: "k1"},
			{account: account, amount: 5 * c, key: "k2"},
		}, map[credits.AccountID]credits.Amount{account: 10 * c}},
		{"beyond MaxAmount", []call{
			{account: account, amount: credits.MaxAmount + 1, wantErr: credits.ErrInvalidAmount},
			{account: account, amount: -credits.MaxAmount - 1, wantErr: credits.ErrInvalidAmount},
		}, map[credits.AccountID]credits.Amount{}},
		{"balance overflow", []call{
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount},
			{account: account, amount: credits.MaxAmount, wantErr: credits.ErrOverflow},
		}, map[credits.AccountID]credits.Amount{account: 9 * credits.MaxAmount}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			clock := newTestClock()
			s, _ := openTestStore(t, clock)
			for i, cl := range tc.calls {
				clock.Advance(time.Second)
				e, replayed, err := s.Credit(ctx, cl.account, cl.amount, cl.reason, cl.key)
				checkErr(t, err, cl.wantErr)
				if cl.wantErr != nil {
					continue
				}
				if replayed != cl.wantReplayed {
					t.Errorf("call %d: replayed = %v, want %v", i, replayed, cl.wantReplayed)
				}
				if cl.wantSeq != 0 && e.Seq != cl.wantSeq {
					t.Errorf("call %d: seq = %d, want %d", i, e.Seq, cl.wantSeq)
				}
				if e.Account != cl.account || e.Kind != credits.EntryCredit || e.Amount != cl.amount ||
					e.Reason != cl.reason || e.IdempotencyKey != cl.key || e.Usage != nil || e.ReservationID != "" {
					t.Errorf("call %d: entry %+v", i, e)
				}
				if !replayed && !e.CreatedAt.Equal(clock.Now()) {
					t.Errorf("call %d: created at %v, want %v", i, e.CreatedAt, clock.Now())
				}
				// The entry returned is the one stored.
				stored, err := s.Entries(ctx, cl.account, math.MaxInt32)
				if err != nil {
					t.Fatal(err)
				}
				found := false
				for _, se := range stored {
					if se.Seq == e.Seq {
						found = true
						if !reflect.DeepEqual(se, e) {
							t.Errorf("call %d: returned %+v, stored %+v", i, e, se)
						}
					}
				}
				if !found {
					t.Errorf("call %d: entry %d not stored", i, e.Seq)
				}
			}
			for account, want := range tc.wantBalances {
				if books := checkBooks(t, s, account); books.Balance != want {
					t.Errorf("%s balance = %s, want %s", account, books.Balance, want)
				}
			}
		})
	}
}

func TestBalanceAndAudit(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")

	if _, err := s.Balance(ctx, account); err != credits.ErrUnknownAccount {
		t.Errorf("balance of unknown account: %v", err)
	}
	if _, err := s.Audit(ctx, account); err != credits.ErrUnknownAccount {
		t.Errorf("audit of unknown account: %v", err)
	}

	credit(t, s, account, 10*c)
	if _, _, err := s.Reserve(ctx, account, 3*c, time.Minute, &credits.Refill{Cap: 15 * c, Period: 1}); err != nil {
		t.Fatal(err)
	}
	r := reserve(t, s, account, 4*c, time.Minute)
	if _, err := s.Settle(ctx, r.ID, 5*c, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	reserve(t, s, account, 2*c, time.Minute)

	balance, err := s.Balance(ctx, account)
	if err != nil {
		t.Fatal(err)
	}
	if balance != 5*c {
		t.Errorf("balance = %s, want 5", balance)
	}
	want := credits.Audit{Credited: 15 * c, Settled: 5 * c, Open: 5 * c, Balance: 5 * c}
	if got := checkBooks(t, s, account); got != want {
		t.Errorf("audit = %+v, want %+v", got, want)
	}
}

func TestEntries(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 10*c)
	credit(t, s, credits.UserAccount("other"), 10*c)
	for i := range 5 {
		r := reserve(t, s, account, c, time.Minute)
		if _, err := s.Settle(ctx, r.ID, credits.Amount(i), credits.Usage{Model: "m"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name    string
		account credits.AccountID
		limit   int
		want    []credits.Amount // amounts, newest first
	}{
		{"all", account, 100, []credits.Amount{4, 3, 2, 1, 0, 10 * c}},
		{"limited", account, 2, []credits.Amount{4, 3}},
		{"zero limit", account, 0, nil},
		{"negative limit", account, -1, nil},
		{"unknown account", credits.UserAccount("nobody"), 10, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			entries, err := s.Entries(ctx, tc.account, tc.limit)
			if err != nil {
				t.Fatal(err)
			}
			var got []credits.Amount
			for i, e := range entries {
				got = append(got, e.Amount)
				if e.Account != tc.account {
					t.Errorf("entry of %s", e.Account)
				}
				if i > 0 && e.Seq >= entries[i-1].Seq {
					t.Errorf("entries not newest first")
				}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("amounts = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLedgerIsAppendOnly(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	credit(t, s, credits.UserAccount("u"), 10)
	for _, stmt := range []string{
		`UPDATE ledger SET amount = 1000`,
		`DELETE FROM ledger`,
	} {
		if _, err := s.write.ExecContext(ctx, stmt); err == nil {
			t.Errorf("%s succeeded", stmt)
		}
	}
	// Open reservations are not stored: the table that held them refuses rows.
	if _, err := s.write.ExecContext(ctx, `INSERT INTO reservations VALUES ('r', 'user:u', 1, 0, 0)`); err == nil {
		t.Error("a reservation row was stored")
	}
	// A reservation has at most one settle entry, whatever writes it.
	r := reserve(t, s, credits.UserAccount("u"), 1, time.Minute)
	if _, err := s.Settle(ctx, r.ID, 1, credits.Usage{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.write.ExecContext(ctx, `INSERT INTO ledger (account_id, kind, amount, reservation_id, created_at)
		VALUES ('user:u', 'settle', 1, ?, 0)`, r.ID); !isUniqueViolation(err) {
		t.Errorf("second settle entry for one reservation: %v", err)
	}
}

// TestBalanceOverflowIsRefused pushes a balance past int64 through Settle and Credit: the store
// reports ErrOverflow and changes nothing, in memory or in the database. (Through the API alone
// a balance this low cannot be reached without the audit's sums overflowing first, so the
// balance in memory is set directly.) Release cannot overflow: it only moves credits back from
// the open reservations, within the balance the database holds.
func TestBalanceOverflowIsRefused(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("poor")
	credit(t, s, account, credits.MaxAmount)
	r := reserve(t, s, account, credits.MaxAmount, time.Minute)
	other := reserve(t, s, account, 0, time.Minute)
	const spendable = credits.Amount(math.MinInt64 + 10)
	a, err := s.acquire(ctx, account)
	if err != nil {
		t.Fatal(err)
	}
	a.durable = spendable + a.open
	a.mu.Unlock()

	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"settle", func() error { _, err := s.Settle(ctx, other.ID, 11, credits.Usage{}); return err }},
		{"credit", func() error { _, _, err := s.Credit(ctx, account, -11, "", ""); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !errors.Is(err, credits.ErrOverflow) || errors.Is(err, credits.ErrStoreUnavailable) {
				t.Fatalf("error = %v, want ErrOverflow", err)
			}
			if b, err := s.Balance(ctx, account); err != nil || b != spendable {
				t.Errorf("balance now %d, %v", b, err)
			}
			if a, err := s.Audit(ctx, account); err != nil || a.Open != credits.MaxAmount || a.Settled != 0 || a.Credited != credits.MaxAmount {
				t.Errorf("books changed: %+v, %v", a, err)
			}
		})
	}
	if b, err := s.Release(ctx, r.ID); err != nil || b != spendable+credits.MaxAmount {
		t.Errorf("release: balance %d, %v", b, err)
	}
	if _, err := s.Settle(ctx, other.ID, 10, credits.Usage{}); err != nil {
		t.Errorf("settle down to the floor: %v", err)
	}
}
