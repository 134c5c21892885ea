package identity

import (
	"context"
	"errors"
	"time"
)

// Errors the stores report.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("already exists")
)

// User is a person with an account of credits.
type User struct {
	ID    string `json:"id"`
	Email string `json:"email"`
	// Tier names the user's rate-limit tier; empty means the configured default.
	Tier string `json:"tier"`
	// PasswordHash is the encoded password hash (with its parameters), empty when the user has no
	// password. Never serialised.
	PasswordHash string    `json:"-"`
	CreatedAt    time.Time `json:"created_at"`
}

// Key is a stored API key. The secret itself is never stored: only Hash, the SHA-256 of the
// whole key as presented.
type Key struct {
	ID     string   `json:"id"`
	UserID string   `json:"user_id"`
	Prefix string   `json:"prefix"`
	Hash   [32]byte `json:"-"`
	Name   string   `json:"name"`
	// Scopes the key grants (API.md §7); "*" grants all.
	Scopes []string `json:"scopes"`
	// AllowedIPs are CIDR prefixes the key may be used from; empty allows any address.
	AllowedIPs []string          `json:"allowed_ips,omitempty"`
	Metadata   map[string]string `json:"metadata,omitempty"`
	// Tier names the key's rate-limit tier; empty means its user's.
	Tier string `json:"rate_limit_tier,omitempty"`
	// CreditCap, when above zero, is the most the key may spend of its owner's credits.
	CreditCap int64 `json:"-"`
	// Models, when not empty, are the only models the key may use.
	Models     []string   `json:"models,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	ExpiresAt  *time.Time `json:"expires_at"`
	RevokedAt  *time.Time `json:"revoked_at,omitempty"`
	LastUsedAt *time.Time `json:"last_used_at"`
}

// Users stores people.
type Users interface {
	// CreateUser stores a new user; ErrConflict when the email is taken.
	CreateUser(ctx context.Context, u User) error
	// UserByID returns the user or ErrNotFound.
	UserByID(ctx context.Context, id string) (User, error)
	// UserByEmail returns the user with this email (compared case-insensitively) or ErrNotFound.
	UserByEmail(ctx context.Context, email string) (User, error)
}

// Keys stores API keys.
type Keys interface {
	// CreateKey stores a new key; ErrConflict when the id is taken.
	CreateKey(ctx context.Context, k Key) error
	// KeyByID returns the key (revoked and expired ones too) or ErrNotFound.
	KeyByID(ctx context.Context, id string) (Key, error)
	// KeysByUser lists a user's keys, newest first.
	KeysByUser(ctx context.Context, userID string) ([]Key, error)
	// RevokeKey marks the key revoked at the given time; ErrNotFound when there is no such key.
	// Revoking a revoked key keeps the first time.
	RevokeKey(ctx context.Context, id string, at time.Time) error
	// TouchKeys records last use times for several keys at once (written in batches, not per request).
	TouchKeys(ctx context.Context, used map[string]time.Time) error
}
