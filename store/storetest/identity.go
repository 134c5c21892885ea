package storetest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// IdentityStore is what the users, keys and sign-in suites test: a store's users, API keys and
// sign-in state, with its ledger beside them (keys spend through it) and the spending reports
// the gateway reads from it.
type IdentityStore interface {
	credits.Ledger
	identity.Users
	identity.Keys
	signin.Store
	// ChainSpent is what the keys of a rotation chain spent since the given time.
	ChainSpent(ctx context.Context, chainID string, since time.Time) (credits.Amount, error)
	// UsageByDay sums the account's settle entries since the given time by UTC day and model.
	UsageByDay(ctx context.Context, account credits.AccountID, since time.Time) ([]credits.UsageDay, error)
	Close() error
}

// IdentityOpener returns instances handles on one new, empty store, closed when t ends. Each
// handle is an instance of its own (its own connections: a separate Store) where several
// instances can share the store, as on PostgreSQL; where one process owns the store (the
// embedded one), every handle is the same Store. clock, when not nil, is the time the store
// gives what is written without one (a zero CreatedAt, the sessions a new one finds expired);
// the real time when nil.
type IdentityOpener func(t *testing.T, clock func() time.Time, instances int) []IdentityStore

// Clock is a clock tests move by hand.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock is a clock at 2030-01-02 03:04:05 UTC.
func NewClock() *Clock { return &Clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)} }

// Now is the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock on by d and returns the new time.
func (c *Clock) Advance(d time.Duration) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	return c.t
}

// RaceIterationsEnv sets how many times the concurrency cases repeat themselves.
const RaceIterationsEnv = "LLM_GATEWAY_RACE_ITERATIONS"

// RaceIterations is the number in RaceIterationsEnv, or def (a tenth of it with -short).
func RaceIterations(tb testing.TB, def int) int {
	tb.Helper()
	v := os.Getenv(RaceIterationsEnv)
	if v == "" {
		if testing.Short() {
			return max(1, def/10)
		}
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		tb.Fatalf("%s=%q: want a positive number", RaceIterationsEnv, v)
	}
	return n
}

// identityCase is one case of the users, keys or sign-in suite.
type identityCase struct {
	name string
	test func(t *testing.T, open IdentityOpener)
}

func runIdentity(t *testing.T, open IdentityOpener, cases []identityCase) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, open) })
	}
}

// openOne opens one instance on the clock c (the real time when nil).
func openOne(t *testing.T, open IdentityOpener, c *Clock) IdentityStore {
	t.Helper()
	var clock func() time.Time
	if c != nil {
		clock = c.Now
	}
	return open(t, clock, 1)[0]
}

// openWithUser opens one instance holding user u1.
func openWithUser(t *testing.T, open IdentityOpener, c *Clock) IdentityStore {
	t.Helper()
	s := openOne(t, open, c)
	addUser(t, s, "u1")
	return s
}

// addUser creates one more user.
func addUser(t *testing.T, s IdentityStore, id string) {
	t.Helper()
	if err := s.CreateUser(context.Background(), identity.User{ID: id, Email: id + "@example.com"}); err != nil {
		t.Fatal(err)
	}
}

// tokenHash is the SHA-256 of a token, as the stores keep it.
func tokenHash(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// hexHash is the SHA-256 (hex) of a token: a refresh token's origin.
func hexHash(token string) string {
	h := tokenHash(token)
	return hex.EncodeToString(h[:])
}

// ---- Users

// TestUsers runs the conformance suite of identity.Users against the stores open returns.
func TestUsers(t *testing.T, open IdentityOpener) {
	runIdentity(t, open, []identityCase{
		{"CreateUser", testCreateUser},
		{"UserLookups", testUserLookups},
	})
}

func testCreateUser(t *testing.T, open IdentityOpener) {
	existing := identity.User{ID: "u1", Email: "Alice@Example.com", Tier: "pro", PasswordHash: "$argon2id$v=19$..."}
	for _, tc := range []struct {
		name    string
		user    identity.User
		wantErr error // nil, a sentinel, or errAny
	}{
		{"new", identity.User{ID: "u2", Email: "bob@example.com"}, nil},
		{"same id", identity.User{ID: "u1", Email: "carol@example.com"}, identity.ErrConflict},
		{"same email", identity.User{ID: "u2", Email: "Alice@Example.com"}, identity.ErrConflict},
		{"same email other case", identity.User{ID: "u2", Email: "aLICE@example.COM"}, identity.ErrConflict},
		{"missing id", identity.User{Email: "dan@example.com"}, errAny},
		{"missing email", identity.User{ID: "u3"}, errAny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s := openOne(t, open, nil)
			if err := s.CreateUser(ctx, existing); err != nil {
				t.Fatal(err)
			}
			err := s.CreateUser(ctx, tc.user)
			checkErr(t, err, tc.wantErr)
			if err != nil {
				if tc.wantErr != errAny && err != tc.wantErr {
					t.Errorf("error %v is not the bare sentinel", err)
				}
				// The existing user is untouched.
				got, err := s.UserByID(ctx, existing.ID)
				if err != nil || got.Email != existing.Email {
					t.Errorf("existing user now %+v, %v", got, err)
				}
				return
			}
			got, err := s.UserByID(ctx, tc.user.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.ID != tc.user.ID || got.Email != tc.user.Email || got.CreatedAt.IsZero() {
				t.Errorf("stored %+v", got)
			}
		})
	}
	t.Run("unicode case", func(t *testing.T) {
		ctx := context.Background()
		s := openOne(t, open, nil)
		if err := s.CreateUser(ctx, identity.User{ID: "u1", Email: "élodie@example.com"}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateUser(ctx, identity.User{ID: "u2", Email: "ÉLODIE@EXAMPLE.COM"}); err != identity.ErrConflict {
			t.Errorf("error = %v, want ErrConflict", err)
		}
	})
}

func testUserLookups(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openOne(t, open, clock)
	created := time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.UTC)
	alice := identity.User{ID: "u1", Email: "Alice@Example.com", Tier: "pro", PasswordHash: "$argon2id$v=19$m=65536", CreatedAt: created}
	bob := identity.User{ID: "u2", Email: "bob@example.com"}
	for _, u := range []identity.User{alice, bob} {
		if err := s.CreateUser(ctx, u); err != nil {
			t.Fatal(err)
		}
	}
	wantAlice := alice
	wantAlice.CreatedAt = created.Truncate(time.Microsecond)
	wantBob := bob
	wantBob.CreatedAt = clock.Now() // a zero CreatedAt is set to now

	for _, tc := range []struct {
		name    string
		lookup  func() (identity.User, error)
		want    identity.User
		wantErr error
	}{
		{"by id", func() (identity.User, error) { return s.UserByID(ctx, "u1") }, wantAlice, nil},
		{"by id, creation time defaulted", func() (identity.User, error) { return s.UserByID(ctx, "u2") }, wantBob, nil},
		{"by email", func() (identity.User, error) { return s.UserByEmail(ctx, "Alice@Example.com") }, wantAlice, nil},
		{"by email other case", func() (identity.User, error) { return s.UserByEmail(ctx, "ALICE@example.com") }, wantAlice, nil},
		{"unknown id", func() (identity.User, error) { return s.UserByID(ctx, "u3") }, identity.User{}, identity.ErrNotFound},
		{"id differs by case", func() (identity.User, error) { return s.UserByID(ctx, "U1") }, identity.User{}, identity.ErrNotFound},
		{"unknown email", func() (identity.User, error) { return s.UserByEmail(ctx, "carol@example.com") }, identity.User{}, identity.ErrNotFound},
		{"empty email", func() (identity.User, error) { return s.UserByEmail(ctx, "") }, identity.User{}, identity.ErrNotFound},
		{"email with a LIKE pattern", func() (identity.User, error) { return s.UserByEmail(ctx, "%") }, identity.User{}, identity.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.lookup()
			if !errors.Is(err, tc.wantErr) || (err != nil && err != tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if got.ID != tc.want.ID || got.Email != tc.want.Email || got.Tier != tc.want.Tier ||
				got.PasswordHash != tc.want.PasswordHash || !got.CreatedAt.Equal(tc.want.CreatedAt) ||
				(err == nil && got.CreatedAt.Location() != time.UTC) {
				t.Errorf("user = %+v, want %+v", got, tc.want)
			}
		})
	}
}
