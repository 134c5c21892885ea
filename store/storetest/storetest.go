// Package storetest is the behaviour every credits.Ledger must have, as a test suite each store
// runs against itself (like the conformance suites of database/sql drivers):
//
//	func TestLedgerConformance(t *testing.T) {
//		storetest.TestLedger(t, func(t *testing.T) credits.Ledger { return openTestStore(t) })
//	}
//
// Each sub-test opens a new, empty ledger (the opener closes it at the test's cleanup) and
// checks the books' identity, Credited == Balance + Settled + Open, after every step.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// c is one credit.
const c = credits.Credit

// Opener returns a new, empty ledger, closed when t ends.
type Opener func(t *testing.T) credits.Ledger

// TestLedger runs the conformance suite against the ledgers open returns.
func TestLedger(t *testing.T, open Opener) {
	for _, tc := range []struct {
		name string
		test func(t *testing.T, open Opener)
	}{
		{"Reserve", testReserve},
		{"ReserveUnknownAccount", testReserveUnknownAccount},
		{"ReserveRefused", testReserveRefused},
		{"Refill", testRefill},
		{"RefillCarriesDebt", testRefillCarriesDebt},
		{"RefillWithinCapAfterRelease", testRefillWithinCapAfterRelease},
		{"Settle", testSettle},
		{"Release", testRelease},
		{"ReleaseExpired", testReleaseExpired},
		{"Credit", testCredit},
		{"BalanceAndAuditOfUnknownAccount", testUnknownAccount},
		{"Entries", testEntries},
		{"ResponseOwner", testResponseOwner},
		{"BalanceOverflow", testBalanceOverflow},
		{"ConcurrentReserve", testConcurrentReserve},
		{"ConcurrentSettle", testConcurrentSettle},
		{"ConcurrentClosers", testConcurrentClosers},
		{"ConcurrentIdempotentCredit", testConcurrentIdempotentCredit},
		{"ConcurrentRefill", testConcurrentRefill},
		{"ConcurrentMixed", testConcurrentMixed},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, open) })
	}
}

// CheckBooks fails the test unless the account's books balance exactly and its Balance is the
// audit's; it returns the audit.
func CheckBooks(tb testing.TB, l credits.Ledger, account credits.AccountID) credits.Audit {
	tb.Helper()
	ctx := context.Background()
	a, err := l.Audit(ctx, account)
	if err != nil {
		tb.Fatalf("audit %s: %v", account, err)
	}
	if a.Credited != a.Balance+a.Settled+a.Open {
		tb.Errorf("books of %s do not balance: %+v", account, a)
	}
	if a.Open < 0 {
		tb.Errorf("books of %s: negative open reservations: %+v", account, a)
	}
	if b, err := l.Balance(ctx, account); err != nil || b != a.Balance {
		tb.Errorf("balance of %s = %s, %v; the audit says %s", account, b, err, a.Balance)
	}
	return a
}

func credit(tb testing.TB, l credits.Ledger, account credits.AccountID, amount credits.Amount) {
	tb.Helper()
	if _, _, err := l.Credit(context.Background(), account, amount, "test", ""); err != nil {
		tb.Fatalf("credit %s %s: %v", account, amount, err)
	}
}

func reserve(tb testing.TB, l credits.Ledger, account credits.AccountID, amount credits.Amount, ttl time.Duration) credits.Reservation {
	tb.Helper()
	r, _, err := l.Reserve(context.Background(), account, amount, ttl, nil)
	if err != nil {
		tb.Fatalf("reserve %s from %s: %v", amount, account, err)
	}
	return r
}

// checkErr fails the test unless err is want (nil: no error; errAny: any error that is not
// the store's failure).
func checkErr(tb testing.TB, err, want error) {
	tb.Helper()
	switch {
	case want == nil && err != nil:
		tb.Fatalf("unexpected error: %v", err)
	case want == errAny && (err == nil || errors.Is(err, credits.ErrStoreUnavailable)):
		tb.Fatalf("error = %v, want a refusal", err)
	case want != nil && want != errAny && !errors.Is(err, want):
		tb.Fatalf("error = %v, want %v", err, want)
	case want != nil && !errors.Is(want, credits.ErrStoreUnavailable) && errors.Is(err, credits.ErrStoreUnavailable):
		tb.Fatalf("error = %v: a refusal reported as the store's failure", err)
	}
}

// errAny stands for any refusal in checkErr.
var errAny = errors.New("any refusal")

func testReserve(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("u")
	credit(t, l, account, 10*c)

	before := time.Now()
	r, balance, err := l.Reserve(ctx, account, 3*c, time.Minute, nil)
	after := time.Now()
	if err != nil || balance != 7*c {
		t.Fatalf("reserve: balance %s, %v; want 7", balance, err)
	}
	if r.ID == "" || r.Account != account || r.Amount != 3*c {
		t.Errorf("reservation %+v", r)
	}
	if r.CreatedAt.Before(before.Add(-time.Second)) || r.CreatedAt.After(after.Add(time.Second)) {
		t.Errorf("created at %v, not between %v and %v", r.CreatedAt, before, after)
	}
	if got := r.ExpiresAt.Sub(r.CreatedAt); got < time.Minute-time.Millisecond || got > time.Minute+time.Millisecond {
		t.Errorf("expires %s after it was created, want 1m", got)
	}
	if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 10 * c, Open: 3 * c, Balance: 7 * c}) {
		t.Errorf("books %+v", books)
	}

	if _, balance, err := l.Reserve(ctx, account, 8*c, time.Minute, nil); !errors.Is(err, credits.ErrInsufficientCredits) || balance != 7*c {
		t.Errorf("reserve beyond the balance: %s, %v; want ErrInsufficientCredits with 7", balance, err)
	}
	if _, balance, err := l.Reserve(ctx, account, 7*c, time.Minute, nil); err != nil || balance != 0 {
		t.Errorf("reserve the rest: %s, %v", balance, err)
	}
	if _, balance, err := l.Reserve(ctx, account, 0, time.Minute, nil); err != nil || balance != 0 {
		t.Errorf("reserve nothing from nothing: %s, %v", balance, err)
	}
	if _, balance, err := l.Reserve(ctx, account, 1, time.Minute, nil); !errors.Is(err, credits.ErrInsufficientCredits) || balance != 0 {
		t.Errorf("reserve from an empty balance: %s, %v", balance, err)
	}
	if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 10 * c, Open: 10 * c}) {
		t.Errorf("books %+v", books)
	}

	ids := map[string]bool{r.ID: true}
	for range 50 {
		r := reserve(t, l, account, 0, time.Minute)
		if ids[r.ID] {
			t.Fatalf("reservation id %s given twice", r.ID)
		}
		ids[r.ID] = true
	}
}

func testReserveUnknownAccount(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("nobody")
	if _, balance, err := l.Reserve(ctx, account, 1, time.Minute, nil); !errors.Is(err, credits.ErrInsufficientCredits) || balance != 0 {
		t.Errorf("reserve from no account: %s, %v; want ErrInsufficientCredits with 0", balance, err)
	}
	if _, err := l.Balance(ctx, account); !errors.Is(err, credits.ErrUnknownAccount) {
		t.Errorf("a refused reservation created the account: balance error %v", err)
	}
	r, balance, err := l.Reserve(ctx, account, 0, time.Minute, nil)
	if err != nil || balance != 0 {
		t.Fatalf("reserve nothing from no account: %s, %v", balance, err)
	}
	CheckBooks(t, l, account)
	if _, err := l.Release(ctx, r.ID); err != nil {
		t.Errorf("release: %v", err)
	}
}

func testReserveRefused(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("u")
	credit(t, l, account, 10*c)
	for _, tc := range []struct {
		name   string
		amount credits.Amount
		ttl    time.Duration
		refill *credits.Refill
		want   error
	}{
		{"negative amount", -1, time.Minute, nil, credits.ErrInvalidAmount},
		{"amount beyond MaxAmount", credits.MaxAmount + 1, time.Minute, nil, credits.ErrInvalidAmount},
		{"zero ttl", 1, 0, nil, errAny},
		{"negative ttl", 1, -time.Second, nil, errAny},
		{"negative refill cap", 1, time.Minute, &credits.Refill{Cap: -1, Period: 1}, credits.ErrInvalidAmount},
		{"refill cap beyond MaxAmount", 1, time.Minute, &credits.Refill{Cap: credits.MaxAmount + 1, Period: 1}, credits.ErrInvalidAmount},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := l.Reserve(ctx, account, tc.amount, tc.ttl, tc.refill)
			checkErr(t, err, tc.want)
			if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 10 * c, Balance: 10 * c}) {
				t.Errorf("a refused reservation changed the books: %+v", books)
			}
		})
	}
}

func testRefill(t *testing.T, open Opener) {
	account := credits.AnonymousAccount("203.0.113.7")
	type step struct {
		credit      credits.Amount // credited before the reserve, if not zero
		amount      credits.Amount
		refill      *credits.Refill
		settle      bool // settle the reservation at its amount, once the balance is checked
		wantBalance credits.Amount
		wantErr     error
		wantGrant   credits.Amount // the grant entry this step adds, if any
	}
	refill := func(cap credits.Amount, period int64) *credits.Refill {
		return &credits.Refill{Cap: cap, Period: period}
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"new account starts full", []step{
			{amount: 2 * c, refill: refill(5*c, 1), wantBalance: 3 * c, wantGrant: 5 * c},
		}},
		{"once per period", []step{
			{amount: 2 * c, refill: refill(5*c, 1), wantBalance: 3 * c, wantGrant: 5 * c},
			{amount: 2 * c, refill: refill(5*c, 1), wantBalance: 1 * c},
			{amount: 2 * c, refill: refill(5*c, 1), wantBalance: 1 * c, wantErr: credits.ErrInsufficientCredits},
		}},
		{"next period fills up to cap", []step{
			{amount: 4 * c, refill: refill(5*c, 1), settle: true, wantBalance: 1 * c, wantGrant: 5 * c},
			{amount: 2 * c, refill: refill(5*c, 2), wantBalance: 3 * c, wantGrant: 4 * c},
		}},
		{"open reservations count toward the cap", []step{
			{amount: 4 * c, refill: refill(5*c, 1), wantBalance: 1 * c, wantGrant: 5 * c},
			{amount: 1 * c, refill: refill(5*c, 2), wantBalance: 0},
		}},
		{"skipped periods fill once", []step{
			{amount: 4 * c, refill: refill(5*c, 1), settle: true, wantBalance: 1 * c, wantGrant: 5 * c},
			{amount: 0, refill: refill(5*c, 9), wantBalance: 5 * c, wantGrant: 4 * c},
			{amount: 5 * c, refill: refill(5*c, 9), wantBalance: 0},
		}},
		{"an older period does nothing", []step{
			{amount: 4 * c, refill: refill(5*c, 7), wantBalance: 1 * c, wantGrant: 5 * c},
			{amount: 1 * c, refill: refill(5*c, 6), wantBalance: 0},
		}},
		{"never above cap", []step{
			{credit: 8 * c, amount: 1 * c, refill: refill(5*c, 1), wantBalance: 7 * c},
			{amount: 1 * c, refill: refill(5*c, 2), wantBalance: 6 * c},
		}},
		{"a debt is paid from the allowance, not forgiven", []step{
			{credit: -3 * c, amount: 1 * c, refill: refill(5*c, 1), wantBalance: 1 * c, wantGrant: 5 * c},
		}},
		{"insufficient after refill reports the refilled balance", []step{
			{amount: 6 * c, refill: refill(5*c, 1), wantBalance: 5 * c, wantErr: credits.ErrInsufficientCredits, wantGrant: 5 * c},
		}},
		{"zero cap", []step{
			{amount: 0, refill: refill(0, 1), wantBalance: 0},
			{amount: 1, refill: refill(0, 2), wantBalance: 0, wantErr: credits.ErrInsufficientCredits},
		}},
		{"credited account refilled when it was never refilled", []step{
			{credit: 1 * c, amount: 1 * c, refill: refill(5*c, 1), wantBalance: 4 * c, wantGrant: 4 * c},
		}},
		{"without refill no grant", []step{
			{amount: 1, refill: refill(5*c, 1), wantBalance: 5*c - 1, wantGrant: 5 * c},
			{amount: 1, wantBalance: 5*c - 2},
		}},
		{"invalid cap", []step{
			{amount: 1, refill: refill(-1, 1), wantErr: credits.ErrInvalidAmount},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			l := open(t)
			var wantGrants []credits.Amount
			for i, st := range tc.steps {
				if st.credit != 0 {
					credit(t, l, account, st.credit)
				}
				r, balance, err := l.Reserve(ctx, account, st.amount, time.Minute, st.refill)
				if st.wantErr != nil {
					if !errors.Is(err, st.wantErr) {
						t.Fatalf("step %d: error = %v, want %v", i, err, st.wantErr)
					}
				} else if err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if errors.Is(st.wantErr, credits.ErrInvalidAmount) {
					continue
				}
				if balance != st.wantBalance {
					t.Errorf("step %d: balance = %s, want %s", i, balance, st.wantBalance)
				}
				if st.wantGrant != 0 {
					wantGrants = append(wantGrants, st.wantGrant)
				}
				if st.settle {
					if _, err := l.Settle(ctx, r.ID, st.amount, credits.Usage{}); err != nil {
						t.Fatalf("step %d: settle: %v", i, err)
					}
				}
				CheckBooks(t, l, account)
			}
			entries, err := l.Entries(ctx, account, 100)
			if err != nil {
				t.Fatal(err)
			}
			var grants []credits.Amount
			for i := len(entries) - 1; i >= 0; i-- {
				if e := entries[i]; e.Kind == credits.EntryGrant {
					grants = append(grants, e.Amount)
					if e.Account != account || e.Usage != nil || e.ReservationID != "" || e.IdempotencyKey != "" {
						t.Errorf("grant entry %+v", e)
					}
				}
			}
			if !reflect.DeepEqual(grants, wantGrants) {
				t.Errorf("grants = %v, want %v", grants, wantGrants)
			}
		})
	}
}

// testRefillCarriesDebt: a debt (a settlement above its reservation) outlives the period and is
// paid from the next allowances, one period at a time.
func testRefillCarriesDebt(t *testing.T, open Opener) {
	ctx := context.Background()
	const allowance = c / 10
	refill := func(period int64) *credits.Refill { return &credits.Refill{Cap: allowance, Period: period} }
	l := open(t)
	account := credits.AnonymousAccount("192.0.2.10")
	r, _, err := l.Reserve(ctx, account, allowance, time.Minute, refill(1))
	if err != nil {
		t.Fatal(err)
	}
	if balance, err := l.Settle(ctx, r.ID, c, credits.Usage{}); err != nil || balance != allowance-c {
		t.Fatalf("settle: %s, %v", balance, err)
	}
	// each period pays 0.1 of the debt of 0.9: it is paid in period 10, and period 11 is the
	// first with an allowance to spend
	for period := int64(2); period <= 12; period++ {
		want := min(allowance, allowance-c+credits.Amount(period-1)*allowance)
		_, balance, err := l.Reserve(ctx, account, 0, time.Minute, refill(period))
		if balance != want || (err != nil) != (want < 0) {
			t.Fatalf("period %d: balance %s, %v; want %s", period, balance, err, want)
		}
		CheckBooks(t, l, account)
	}
}

// testRefillWithinCapAfterRelease: a refill counts open reservations, so that releasing them
// after the period turned never leaves more than the cap.
func testRefillWithinCapAfterRelease(t *testing.T, open Opener) {
	ctx := context.Background()
	const allowance = c / 10
	refill := func(period int64) *credits.Refill { return &credits.Refill{Cap: allowance, Period: period} }
	l := open(t)
	account := credits.AnonymousAccount("192.0.2.11")
	r, _, err := l.Reserve(ctx, account, allowance, time.Minute, refill(1))
	if err != nil {
		t.Fatal(err)
	}
	if _, balance, err := l.Reserve(ctx, account, 0, time.Minute, refill(2)); err != nil || balance != 0 {
		t.Fatalf("reserve in period 2: %s, %v", balance, err)
	}
	if balance, err := l.Release(ctx, r.ID); err != nil || balance != allowance {
		t.Errorf("release: balance %s, %v; want the cap %s", balance, err, allowance)
	}
	if books := CheckBooks(t, l, account); books.Credited != allowance || books.Balance != allowance {
		t.Errorf("books %+v: want one allowance granted", books)
	}
	r, _, err = l.Reserve(ctx, account, allowance, time.Minute, refill(2))
	if err != nil {
		t.Fatal(err)
	}
	if _, balance, err := l.Reserve(ctx, account, 0, time.Minute, refill(3)); err != nil || balance != 0 {
		t.Fatalf("reserve in period 3: %s, %v", balance, err)
	}
	if balance, err := l.Settle(ctx, r.ID, allowance/4, credits.Usage{}); err != nil || balance != allowance-allowance/4 {
		t.Errorf("settle: balance %s, %v", balance, err)
	}
	if _, balance, err := l.Reserve(ctx, account, 0, time.Minute, refill(4)); err != nil || balance != allowance {
		t.Errorf("period 4: balance %s, %v; want the cap", balance, err)
	}
	CheckBooks(t, l, account)
}

func testSettle(t *testing.T, open Opener) {
	account := credits.UserAccount("u")
	usage := credits.Usage{Model: "gpt-x", Backend: "openai", InputTokens: 120, OutputTokens: 30, KeyID: "key1",
		CachedInputTokens: 100, CacheWriteTokens: 15, ReasoningTokens: 20, ResponseID: "resp_1"}
	type before func(t *testing.T, l credits.Ledger, r credits.Reservation)
	for _, tc := range []struct {
		name        string
		before      before // closes it first, for instance
		id          string // the reservation made when empty
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
		{name: "negative cached tokens", cost: 1, usage: credits.Usage{InputTokens: 1, CachedInputTokens: -1}, wantErr: errAny},
		{name: "cached and written above the input", cost: 1, usage: credits.Usage{InputTokens: 10, CachedInputTokens: 6, CacheWriteTokens: 5}, wantErr: errAny},
		{name: "reasoning above the output", cost: 1, usage: credits.Usage{OutputTokens: 1, ReasoningTokens: 2}, wantErr: errAny},
		{name: "unknown reservation", id: "nope", cost: 1, wantErr: credits.ErrReservationClosed},
		{name: "settled twice", cost: 1, wantErr: credits.ErrReservationClosed, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			if _, err := l.Settle(context.Background(), r.ID, 2*c, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after release", cost: 1, wantErr: credits.ErrReservationClosed, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			if _, err := l.Release(context.Background(), r.ID); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after expiry sweep", cost: 1, wantErr: credits.ErrReservationClosed, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			if n, _, err := l.ReleaseExpired(context.Background(), r.ExpiresAt.Add(time.Microsecond)); err != nil || n != 1 {
				t.Fatalf("release expired: %d, %v", n, err)
			}
		}},
		{name: "expired but not swept", cost: 1 * c, wantBalance: 9 * c, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			if n, _, err := l.ReleaseExpired(context.Background(), r.ExpiresAt); err != nil || n != 0 {
				t.Fatalf("release expired at the expiry: %d, %v", n, err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			l := open(t)
			credit(t, l, account, 10*c)
			r := reserve(t, l, account, 4*c, time.Minute)
			if tc.before != nil {
				tc.before(t, l, r)
			}
			before, err := l.Entries(ctx, account, 100)
			if err != nil {
				t.Fatal(err)
			}
			booksBefore := CheckBooks(t, l, account)
			id := tc.id
			if id == "" {
				id = r.ID
			}
			start := time.Now()
			balance, err := l.Settle(ctx, id, tc.cost, tc.usage)
			checkErr(t, err, tc.wantErr)
			books := CheckBooks(t, l, account)
			entries, err := l.Entries(ctx, account, 100)
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
			e := entries[0]
			if e.CreatedAt.Before(start.Add(-time.Second)) || e.CreatedAt.After(time.Now().Add(time.Second)) {
				t.Errorf("entry created at %v, the settle was at %v", e.CreatedAt, start)
			}
			u := tc.usage
			want := credits.Entry{Seq: e.Seq, Account: account, Kind: credits.EntrySettle, Amount: tc.cost,
				ReservationID: r.ID, Usage: &u, CreatedAt: e.CreatedAt}
			if !reflect.DeepEqual(e, want) {
				t.Errorf("entry = %+v\nwant    %+v", e, want)
			}
			if e.Seq <= before[0].Seq {
				t.Errorf("settle entry seq %d is not after %d", e.Seq, before[0].Seq)
			}
			// Once settled, closed for every closer.
			if _, err := l.Settle(ctx, r.ID, tc.cost, tc.usage); !errors.Is(err, credits.ErrReservationClosed) {
				t.Errorf("settle again: %v", err)
			}
			if _, err := l.Release(ctx, r.ID); !errors.Is(err, credits.ErrReservationClosed) {
				t.Errorf("release after settle: %v", err)
			}
			if books2 := CheckBooks(t, l, account); books2 != books {
				t.Errorf("closing again changed the books: %+v -> %+v", books, books2)
			}
		})
	}
}

func testRelease(t *testing.T, open Opener) {
	account := credits.UserAccount("u")
	type before func(t *testing.T, l credits.Ledger, r credits.Reservation)
	for _, tc := range []struct {
		name        string
		before      before
		id          string
		wantBalance credits.Amount
		wantErr     error
	}{
		{name: "returns all", wantBalance: 10 * c},
		{name: "unknown reservation", id: "nope", wantErr: credits.ErrReservationClosed},
		{name: "released twice", wantErr: credits.ErrReservationClosed, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			if _, err := l.Release(context.Background(), r.ID); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after settle", wantErr: credits.ErrReservationClosed, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			if _, err := l.Settle(context.Background(), r.ID, 1, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "after spending the rest", wantBalance: 4 * c, before: func(t *testing.T, l credits.Ledger, r credits.Reservation) {
			r2 := reserve(t, l, r.Account, 6*c, time.Minute)
			if _, err := l.Settle(context.Background(), r2.ID, 6*c, credits.Usage{}); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			l := open(t)
			credit(t, l, account, 10*c)
			r := reserve(t, l, account, 4*c, time.Minute)
			if tc.before != nil {
				tc.before(t, l, r)
			}
			entriesBefore, err := l.Entries(ctx, account, 100)
			if err != nil {
				t.Fatal(err)
			}
			booksBefore := CheckBooks(t, l, account)
			id := tc.id
			if id == "" {
				id = r.ID
			}
			balance, err := l.Release(ctx, id)
			checkErr(t, err, tc.wantErr)
			books := CheckBooks(t, l, account)
			entries, err := l.Entries(ctx, account, 100)
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != len(entriesBefore) {
				t.Errorf("a release wrote an entry: %+v", entries[0])
			}
			if tc.wantErr != nil {
				if books != booksBefore {
					t.Errorf("refused release changed the books: %+v -> %+v", booksBefore, books)
				}
				return
			}
			if balance != tc.wantBalance || books.Balance != tc.wantBalance || books.Open != 0 {
				t.Errorf("balance = %s, books %+v; want %s", balance, books, tc.wantBalance)
			}
			if books.Credited != booksBefore.Credited || books.Settled != booksBefore.Settled {
				t.Errorf("a release moved credits in or out: %+v -> %+v", booksBefore, books)
			}
		})
	}
}

func testReleaseExpired(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	a, b := credits.UserAccount("a"), credits.UserAccount("b")
	credit(t, l, a, 10*c)
	credit(t, l, b, 10*c)
	short1 := reserve(t, l, a, 1*c, time.Minute)
	short2 := reserve(t, l, b, 2*c, time.Minute)
	short3 := reserve(t, l, a, 3*c, time.Minute)
	long := reserve(t, l, a, 4*c, time.Hour)
	settled := reserve(t, l, b, 5*c, time.Minute)
	if _, err := l.Settle(ctx, settled.ID, 5*c, credits.Usage{}); err != nil {
		t.Fatal(err)
	}

	if n, total, err := l.ReleaseExpired(ctx, short1.CreatedAt); err != nil || n != 0 || total != 0 {
		t.Errorf("release expired before any expiry: %d, %s, %v", n, total, err)
	}
	sweep := short3.ExpiresAt.Add(time.Second)
	if n, total, err := l.ReleaseExpired(ctx, sweep); err != nil || n != 3 || total != 6*c {
		t.Errorf("release expired: %d, %s, %v; want 3 of 6 credits", n, total, err)
	}
	if n, total, err := l.ReleaseExpired(ctx, sweep); err != nil || n != 0 || total != 0 {
		t.Errorf("release expired again: %d, %s, %v; want none", n, total, err)
	}
	for _, r := range []credits.Reservation{short1, short2, short3} {
		if _, err := l.Settle(ctx, r.ID, 0, credits.Usage{}); !errors.Is(err, credits.ErrReservationClosed) {
			t.Errorf("settle of an expired reservation: %v", err)
		}
	}
	if books := CheckBooks(t, l, a); books != (credits.Audit{Credited: 10 * c, Open: 4 * c, Balance: 6 * c}) {
		t.Errorf("books of a %+v", books)
	}
	if books := CheckBooks(t, l, b); books != (credits.Audit{Credited: 10 * c, Settled: 5 * c, Balance: 5 * c}) {
		t.Errorf("books of b %+v", books)
	}
	if balance, err := l.Settle(ctx, long.ID, 4*c, credits.Usage{}); err != nil || balance != 6*c {
		t.Errorf("settle of the unexpired one: %s, %v", balance, err)
	}
	CheckBooks(t, l, a)
}

func testCredit(t *testing.T, open Opener) {
	account := credits.UserAccount("u")
	other := credits.UserAccount("v")
	type call struct {
		account      credits.AccountID
		amount       credits.Amount
		reason, key  string
		wantErr      error
		wantReplayed bool
		wantFirst    bool // the entry returned is the first call's
	}
	for _, tc := range []struct {
		name         string
		calls        []call
		wantBalances map[credits.AccountID]credits.Amount
	}{
		{"creates the account", []call{
			{account: account, amount: 5 * c, reason: "welcome"},
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
			{account: account, amount: 5 * c, reason: "pay", key: "k"},
			{account: account, amount: 5 * c, reason: "pay", key: "k", wantReplayed: true, wantFirst: true},
			{account: account, amount: 5 * c, reason: "pay", key: "k", wantReplayed: true, wantFirst: true},
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
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			l := open(t)
			var first credits.Entry
			for i, cl := range tc.calls {
				start := time.Now()
				e, replayed, err := l.Credit(ctx, cl.account, cl.amount, cl.reason, cl.key)
				checkErr(t, err, cl.wantErr)
				if cl.wantErr != nil {
					continue
				}
				if i == 0 {
					first = e
				}
				if replayed != cl.wantReplayed {
					t.Errorf("call %d: replayed = %v, want %v", i, replayed, cl.wantReplayed)
				}
				if cl.wantFirst && !reflect.DeepEqual(e, first) {
					t.Errorf("call %d: replay returned %+v, the first entry is %+v", i, e, first)
				}
				if e.Account != cl.account || e.Kind != credits.EntryCredit || e.Amount != cl.amount ||
					e.Reason != cl.reason || e.IdempotencyKey != cl.key || e.Usage != nil || e.ReservationID != "" {
					t.Errorf("call %d: entry %+v", i, e)
				}
				if !replayed && (e.CreatedAt.Before(start.Add(-time.Second)) || e.CreatedAt.After(time.Now().Add(time.Second))) {
					t.Errorf("call %d: created at %v, the call was at %v", i, e.CreatedAt, start)
				}
				// The entry returned is the one stored.
				stored, err := l.Entries(ctx, cl.account, 1000)
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
				if books := CheckBooks(t, l, account); books.Balance != want {
					t.Errorf("%s balance = %s, want %s", account, books.Balance, want)
				}
			}
		})
	}
}

func testUnknownAccount(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("nobody")
	if _, err := l.Balance(ctx, account); !errors.Is(err, credits.ErrUnknownAccount) || errors.Is(err, credits.ErrStoreUnavailable) {
		t.Errorf("balance: %v, want ErrUnknownAccount", err)
	}
	if _, err := l.Audit(ctx, account); !errors.Is(err, credits.ErrUnknownAccount) || errors.Is(err, credits.ErrStoreUnavailable) {
		t.Errorf("audit: %v, want ErrUnknownAccount", err)
	}
	if entries, err := l.Entries(ctx, account, 10); err != nil || len(entries) != 0 {
		t.Errorf("entries: %v, %v; want none", entries, err)
	}
}

func testEntries(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account, other := credits.UserAccount("u"), credits.UserAccount("v")
	credit(t, l, account, 10*c)
	credit(t, l, other, 1*c)
	r1 := reserve(t, l, account, 2*c, time.Minute)
	r2 := reserve(t, l, account, 2*c, time.Minute)
	if _, err := l.Release(ctx, r2.ID); err != nil {
		t.Fatal(err)
	}
	usage := credits.Usage{Model: "m", Backend: "b", InputTokens: 1, OutputTokens: 2}
	if _, err := l.Settle(ctx, r1.ID, 1*c, usage); err != nil {
		t.Fatal(err)
	}
	if _, _, err := l.Credit(ctx, account, -3*c, "correction", ""); err != nil {
		t.Fatal(err)
	}

	entries, err := l.Entries(ctx, account, 100)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, fmt.Sprintf("%s %s", e.Kind, e.Amount))
		if e.Account != account {
			t.Errorf("entry of another account: %+v", e)
		}
	}
	want := []string{"credit -3", "settle 1", "credit 10"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("entries = %v, want %v (newest first; reservations and releases are not entries)", got, want)
	}
	if entries[0].Seq <= entries[1].Seq || entries[1].Seq <= entries[2].Seq {
		t.Errorf("seqs not decreasing: %d, %d, %d", entries[0].Seq, entries[1].Seq, entries[2].Seq)
	}
	if entries[0].Reason != "correction" || entries[0].Usage != nil {
		t.Errorf("credit entry %+v", entries[0])
	}
	if u := entries[1].Usage; u == nil || *u != usage || entries[1].ReservationID != r1.ID {
		t.Errorf("settle entry %+v, usage %+v", entries[1], u)
	}
	if limited, err := l.Entries(ctx, account, 2); err != nil || len(limited) != 2 || limited[0].Seq != entries[0].Seq {
		t.Errorf("entries limited to 2: %+v, %v", limited, err)
	}
	if none, err := l.Entries(ctx, account, 0); err != nil || len(none) != 0 {
		t.Errorf("entries limited to 0: %+v, %v", none, err)
	}
	if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 7 * c, Settled: 1 * c, Balance: 6 * c}) {
		t.Errorf("books %+v", books)
	}
}

// testBalanceOverflow: a credit that would take the balance beyond int64 is ErrOverflow (not
// the store's failure) and changes nothing.
func testBalanceOverflow(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("rich")
	for range 9 {
		credit(t, l, account, credits.MaxAmount)
	}
	_, _, err := l.Credit(ctx, account, credits.MaxAmount, "", "")
	checkErr(t, err, credits.ErrOverflow)
	if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 9 * credits.MaxAmount, Balance: 9 * credits.MaxAmount}) {
		t.Errorf("books %+v", books)
	}
	if entries, err := l.Entries(ctx, account, 100); err != nil || len(entries) != 9 {
		t.Errorf("%d entries, %v; want 9", len(entries), err)
	}
}

// parallel runs f(0) ... f(n-1) at once and waits for them.
func parallel(n int, f func(i int)) {
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
	)
	for i := range n {
		wg.Go(func() {
			<-start
			f(i)
		})
	}
	close(start)
	wg.Wait()
}

// testConcurrentReserve: 50 reservations at once on a balance that covers 20.
func testConcurrentReserve(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("u")
	credit(t, l, account, 20*c)
	errs := make([]error, 50)
	parallel(50, func(i int) {
		_, _, errs[i] = l.Reserve(ctx, account, 1*c, time.Minute, nil)
	})
	won := 0
	for i, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, credits.ErrInsufficientCredits):
			t.Errorf("reservation %d: %v", i, err)
		}
	}
	if won != 20 {
		t.Errorf("%d reservations succeeded, want exactly 20", won)
	}
	if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 20 * c, Open: 20 * c}) {
		t.Errorf("books %+v", books)
	}
}

// testConcurrentSettle: 20 settlements of one reservation at once: exactly one wins.
func testConcurrentSettle(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("u")
	credit(t, l, account, 10*c)
	for round := range 5 {
		r := reserve(t, l, account, 1*c, time.Minute)
		errs := make([]error, 20)
		parallel(20, func(i int) {
			_, errs[i] = l.Settle(ctx, r.ID, 1*c/2, credits.Usage{OutputTokens: int64(i)})
		})
		won := 0
		for i, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, credits.ErrReservationClosed):
				t.Errorf("round %d: settle %d: %v", round, i, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d settlements won, want exactly 1", round, won)
		}
		settled := credits.Amount(round+1) * c / 2
		if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 10 * c, Settled: settled, Balance: 10*c - settled}) {
			t.Errorf("round %d: books %+v", round, books)
		}
	}
	entries, err := l.Entries(ctx, account, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 6 {
		t.Errorf("%d entries, want 1 credit and 5 settlements", len(entries))
	}
}

// testConcurrentClosers: a settle, a release and an expiry sweep race for each reservation:
// exactly one closes it.
func testConcurrentClosers(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("u")
	credit(t, l, account, 100*c)
	var settled credits.Amount
	for round := range 20 {
		r := reserve(t, l, account, 2*c, time.Millisecond)
		var (
			settleErr, releaseErr error
			swept                 int
			sweepErr              error
		)
		parallel(3, func(i int) {
			switch i {
			case 0:
				_, settleErr = l.Settle(ctx, r.ID, 1*c, credits.Usage{})
			case 1:
				_, releaseErr = l.Release(ctx, r.ID)
			case 2:
				swept, _, sweepErr = l.ReleaseExpired(ctx, r.ExpiresAt.Add(time.Second))
			}
		})
		if sweepErr != nil {
			t.Fatalf("round %d: sweep: %v", round, sweepErr)
		}
		wins := swept
		for _, err := range []error{settleErr, releaseErr} {
			switch {
			case err == nil:
				wins++
			case !errors.Is(err, credits.ErrReservationClosed):
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if wins != 1 {
			t.Fatalf("round %d: settle %v, release %v, swept %d: want exactly one closer", round, settleErr, releaseErr, swept)
		}
		if settleErr == nil {
			settled += 1 * c
		}
		if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 100 * c, Settled: settled, Balance: 100*c - settled}) {
			t.Fatalf("round %d: books %+v", round, books)
		}
	}
}

// testConcurrentIdempotentCredit: 20 credits under one key at once credit once.
func testConcurrentIdempotentCredit(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.UserAccount("u")
	var (
		mu       sync.Mutex
		replays  int
		firstSeq = map[int64]bool{}
	)
	parallel(20, func(i int) {
		e, replayed, err := l.Credit(ctx, account, 5*c, "payment", "pay-1")
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			t.Errorf("credit %d: %v", i, err)
			return
		}
		if replayed {
			replays++
		}
		firstSeq[e.Seq] = true
	})
	if replays != 19 || len(firstSeq) != 1 {
		t.Errorf("%d replays, entries %v: want 19 replays of one entry", replays, firstSeq)
	}
	if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 5 * c, Balance: 5 * c}) {
		t.Errorf("books %+v", books)
	}
}

// testConcurrentRefill: 20 reservations of a new period at once refill once.
func testConcurrentRefill(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	account := credits.AnonymousAccount("198.51.100.1")
	for period := int64(1); period <= 3; period++ {
		refill := &credits.Refill{Cap: 10 * c, Period: period}
		parallel(20, func(i int) {
			r, _, err := l.Reserve(ctx, account, c/10, time.Minute, refill)
			if err != nil {
				t.Errorf("period %d: reserve %d: %v", period, i, err)
				return
			}
			if _, err := l.Settle(ctx, r.ID, c/10, credits.Usage{}); err != nil {
				t.Errorf("period %d: settle %d: %v", period, i, err)
			}
		})
		// Each period spends 2 credits and the next one tops them up.
		if books := CheckBooks(t, l, account); books != (credits.Audit{Credited: 10*c + credits.Amount(period-1)*2*c, Settled: credits.Amount(period) * 2 * c, Balance: 8 * c}) {
			t.Errorf("period %d: books %+v", period, books)
		}
	}
	entries, err := l.Entries(ctx, account, 1000)
	if err != nil {
		t.Fatal(err)
	}
	grants := 0
	for _, e := range entries {
		if e.Kind == credits.EntryGrant {
			grants++
		}
	}
	if grants != 3 {
		t.Errorf("%d grants, want one per period", grants)
	}
}

// testConcurrentMixed: reservations, settlements, releases and credits on two accounts at once
// from several goroutines keep the books.
func testConcurrentMixed(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	accounts := []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b")}
	for _, a := range accounts {
		credit(t, l, a, 50*c)
	}
	parallel(8, func(w int) {
		account := accounts[w%len(accounts)]
		for i := range 25 {
			r, _, err := l.Reserve(ctx, account, 1*c, time.Minute, nil)
			if errors.Is(err, credits.ErrInsufficientCredits) {
				continue
			}
			if err != nil {
				t.Errorf("worker %d: reserve: %v", w, err)
				return
			}
			switch i % 3 {
			case 0:
				_, err = l.Settle(ctx, r.ID, 2*c, credits.Usage{})
			case 1:
				_, err = l.Release(ctx, r.ID)
			case 2:
				_, _, err = l.Credit(ctx, account, 1*c, "top-up", "")
				if err == nil {
					_, err = l.Settle(ctx, r.ID, c/2, credits.Usage{})
				}
			}
			if err != nil {
				t.Errorf("worker %d: %v", w, err)
				return
			}
		}
	})
	for _, a := range accounts {
		if books := CheckBooks(t, l, a); books.Open != 0 {
			t.Errorf("%s: reservations left open: %+v", a, books)
		}
	}
}

// ResponseOwners is the lookup of stored responses' owners every store provides beside its
// ledger.
type ResponseOwners interface {
	ResponseOwner(ctx context.Context, responseID string) (credits.ResponseOwner, error)
}

func testResponseOwner(t *testing.T, open Opener) {
	ctx := context.Background()
	l := open(t)
	owners, ok := l.(ResponseOwners)
	if !ok {
		t.Fatalf("%T has no ResponseOwner", l)
	}
	alice, bob := credits.UserAccount("alice"), credits.UserAccount("bob")
	credit(t, l, alice, 10*c)
	credit(t, l, bob, 10*c)
	settle := func(account credits.AccountID, u credits.Usage) {
		t.Helper()
		r := reserve(t, l, account, c, time.Minute)
		if _, err := l.Settle(ctx, r.ID, c/2, u); err != nil {
			t.Fatal(err)
		}
	}
	settle(alice, credits.Usage{Model: "m", Backend: "b1", KeyID: "k1", InputTokens: 3, OutputTokens: 2, ResponseID: "resp_a"})
	settle(bob, credits.Usage{Model: "m2", Backend: "b2", ResponseID: "resp_b"})
	// A later entry naming the same id (a backend reusing ids) does not take it over.
	settle(bob, credits.Usage{Model: "m2", Backend: "b2", ResponseID: "resp_a"})
	settle(alice, credits.Usage{Model: "m"}) // no response id
	for id, want := range map[string]credits.ResponseOwner{
		"resp_a": {Account: alice, Backend: "b1", KeyID: "k1", Model: "m", ContextTokens: 5},
		"resp_b": {Account: bob, Backend: "b2", Model: "m2"},
	} {
		got, err := owners.ResponseOwner(ctx, id)
		if err != nil || got != want {
			t.Errorf("ResponseOwner(%q) = %+v, %v; want %+v", id, got, err, want)
		}
	}
	for _, id := range []string{"resp_c", "", "RESP_A"} {
		if got, err := owners.ResponseOwner(ctx, id); !errors.Is(err, credits.ErrUnknownResponse) {
			t.Errorf("ResponseOwner(%q) = %+v, %v; want ErrUnknownResponse", id, got, err)
		}
	}
	entries, err := l.Entries(ctx, alice, 10)
	if err != nil {
		t.Fatal(err)
	}
	if u := entries[len(entries)-2].Usage; u == nil || u.ResponseID != "resp_a" || u.InputTokens != 3 {
		t.Errorf("the settle entry reads back as %+v", u)
	}
	CheckBooks(t, l, alice)
	CheckBooks(t, l, bob)
}
