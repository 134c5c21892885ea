package sqlite

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

func TestCreateUser(t *testing.T) {
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
			s, _ := openTestStore(t, nil)
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
		s, _ := openTestStore(t, nil)
		if err := s.CreateUser(ctx, identity.User{ID: "u1", Email: "élodie@example.com"}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateUser(ctx, identity.User{ID: "u2", Email: "ÉLODIE@EXAMPLE.COM"}); err != identity.ErrConflict {
			t.Errorf("error = %v, want ErrConflict", err)
		}
	})
}

func TestUserLookups(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openTestStore(t, clock)
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
				got.PasswordHash != tc.want.PasswordHash || !got.CreatedAt.Equal(tc.want.CreatedAt) {
				t.Errorf("user = %+v, want %+v", got, tc.want)
			}
		})
	}
}
