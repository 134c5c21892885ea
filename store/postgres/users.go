package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

var (
	_ identity.Users = (*Store)(nil)
	_ identity.Keys  = (*Store)(nil)
	_ signin.Store   = (*Store)(nil)
)

// identityVerdicts are the errors of the users, keys and sign-in state that tell the caller
// something about its request; failIdentity returns them as they are.
var identityVerdicts = []error{
	identity.ErrNotFound, identity.ErrConflict, identity.ErrKeyLimit,
	signin.ErrCodeUsed, signin.ErrRefreshReused, signin.ErrRefreshDead,
}

// failIdentity is fail for the users, keys and sign-in state: their verdicts are returned as
// they are, a unique violation is identity.ErrConflict, anything else the store's failure.
func failIdentity(op string, err error) error {
	for _, v := range identityVerdicts {
		if errors.Is(err, v) {
			return err
		}
	}
	if pgCode(err) == codeUniqueViolation {
		return identity.ErrConflict
	}
	return fail(op, err)
}

// isUniqueViolation reports whether err is a broken UNIQUE or PRIMARY KEY constraint.
func isUniqueViolation(err error) bool { return pgCode(err) == codeUniqueViolation }

// isForeignKeyViolation reports whether err is a broken FOREIGN KEY constraint.
func isForeignKeyViolation(err error) bool { return pgCode(err) == codeForeignKey }

// emailKey is the form in which emails are compared and kept unique: lower case, folded by Go
// (Unicode-aware, and the same whatever the database's collation), as the embedded store does.
func emailKey(email string) string { return strings.ToLower(email) }

// jsonText encodes a list or map column: nil is stored as null, so that it reads back as nil.
func jsonText(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}

// utc is t in UTC (pgx reads timestamptz in the local zone).
func utc(t time.Time) time.Time { return t.UTC() }

// utcPtr is *t in UTC, or nil.
func utcPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC()
	return &u
}

// CreateUser stores a new user; identity.ErrConflict when its id or its email (compared
// case-insensitively) is taken. A zero CreatedAt is set to now.
func (s *Store) CreateUser(ctx context.Context, u identity.User) error {
	if u.ID == "" || u.Email == "" {
		return errors.New("create user: id and email are required")
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO users (id, email, email_key, tier, password_hash, created_at)
		VALUES ($1, $2, $3, $4, $5, $6)`, u.ID, u.Email, emailKey(u.Email), u.Tier, u.PasswordHash, s.orNow(u.CreatedAt))
	if isUniqueViolation(err) {
		return identity.ErrConflict
	}
	if err != nil {
		return fail(fmt.Sprintf("create user %s", u.ID), err)
	}
	return nil
}

// UserByID returns the user or identity.ErrNotFound.
func (s *Store) UserByID(ctx context.Context, id string) (identity.User, error) {
	return s.user(ctx, "user "+id, `id = $1`, id)
}

// UserByEmail returns the user with this email, compared case-insensitively, or
// identity.ErrNotFound.
func (s *Store) UserByEmail(ctx context.Context, email string) (identity.User, error) {
	return s.user(ctx, "user by email", `email_key = $1`, emailKey(email))
}

// user reads the user matching where.
func (s *Store) user(ctx context.Context, op, where string, arg any) (identity.User, error) {
	var u identity.User
	err := s.pool.QueryRow(ctx, `SELECT id, email, tier, password_hash, created_at FROM users WHERE `+where, arg).
		Scan(&u.ID, &u.Email, &u.Tier, &u.PasswordHash, &u.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return identity.User{}, identity.ErrNotFound
	}
	if err != nil {
		return identity.User{}, fail(op, err)
	}
	u.CreatedAt = utc(u.CreatedAt)
	return u, nil
}

// lockUser locks the user's row in tx until it ends, for the operations that bound what a user
// may have (live keys, sessions, refresh token families): of those of one user, on any number
// of instances, one runs at a time, so that their counts are exact. The lock (FOR NO KEY
// UPDATE) does not stop rows that merely reference the user from being written. It is
// identity.ErrNotFound when there is no such user.
func lockUser(ctx context.Context, tx pgx.Tx, userID string) error {
	var one int
	err := tx.QueryRow(ctx, `SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE`, userID).Scan(&one)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("user %s: %w", userID, identity.ErrNotFound)
	}
	return err
}

// codeDeadlock is the SQLSTATE of a transaction PostgreSQL chose to abort to break a cycle of
// lock waits.
const codeDeadlock = "40P01"

// txAttempts bounds how many times inTx runs a transaction aborted by a deadlock.
const txAttempts = 3

// inTx runs fn in a transaction, committed when fn returns nil. A transaction aborted to break
// a deadlock (two revocations and a rotation taking one family's rows in different orders, on
// different instances) did nothing, and is run again, up to txAttempts times in all.
func (s *Store) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	var err error
	for range txAttempts {
		if err = pgx.BeginFunc(ctx, s.pool, fn); pgCode(err) != codeDeadlock {
			return err
		}
	}
	return err
}
