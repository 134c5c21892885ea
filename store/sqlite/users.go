package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// emailKey is the form in which emails are compared and kept unique: lower case (Unicode-aware,
// unlike SQLite's NOCASE, which folds ASCII only).
func emailKey(email string) string { return strings.ToLower(email) }

// CreateUser stores a new user; identity.ErrConflict when its id or its email (compared
// case-insensitively) is taken. A zero CreatedAt is set to now.
func (s *Store) CreateUser(ctx context.Context, u identity.User) error {
	if u.ID == "" || u.Email == "" {
		return errors.New("create user: id and email are required")
	}
	if u.CreatedAt.IsZero() {
		u.CreatedAt = s.now()
	}
	_, err := s.write.ExecContext(ctx, `INSERT INTO users (id, email, email_key, tier, password_hash, created_at)
		VALUES (?, ?, ?, ?, ?, ?)`, u.ID, u.Email, emailKey(u.Email), u.Tier, u.PasswordHash, micros(u.CreatedAt))
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
	return s.user(ctx, "user "+id, `id = ?`, id)
}

// UserByEmail returns the user with this email, compared case-insensitively, or
// identity.ErrNotFound.
func (s *Store) UserByEmail(ctx context.Context, email string) (identity.User, error) {
	return s.user(ctx, "user by email", `email_key = ?`, emailKey(email))
}

// user reads the user matching where.
func (s *Store) user(ctx context.Context, op, where string, arg any) (identity.User, error) {
	var (
		u         identity.User
		createdAt int64
	)
	err := s.read.QueryRowContext(ctx, `SELECT id, email, tier, password_hash, created_at FROM users WHERE `+where, arg).
		Scan(&u.ID, &u.Email, &u.Tier, &u.PasswordHash, &createdAt)
	if errors.Is(err, sql.ErrNoRows) {
		return identity.User{}, identity.ErrNotFound
	}
	if err != nil {
		return identity.User{}, fail(op, err)
	}
	u.CreatedAt = fromMicros(createdAt)
	return u, nil
}
