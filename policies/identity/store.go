package identity

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// Errors the stores report.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("already exists")
	// ErrNotRotatable: the key was already rotated, or is revoked or expired. It matches
	// ErrConflict.
	ErrNotRotatable = fmt.Errorf("%w: the key was already rotated, or is revoked or expired", ErrConflict)
	// ErrKeyLimit: the user has as many live keys as a creation allows.
	ErrKeyLimit = errors.New("the user has the most live api keys allowed")
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
	// CreditCap, when above zero, is the most the key may spend of its owner's credits: in all
	// its life, or in each CreditCapPeriod when that is set.
	CreditCap credits.Amount `json:"credit_cap,omitempty"`
	// CreditCapPeriod is "" (the cap is for the key's whole life), "day" or "month" (calendar
	// periods in UTC), or a Go duration such as "1h" (periods aligned on the Unix epoch). See
	// CapPeriodStart.
	CreditCapPeriod string `json:"credit_cap_period,omitempty"`
	// Models, when not empty, are the only models the key may use.
	Models     []string   `json:"models,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	ExpiresAt  *time.Time `json:"expires_at"`
	RevokedAt  *time.Time `json:"revoked_at,omitempty"`
	LastUsedAt *time.Time `json:"last_used_at"`
	// RotatedTo is the id of the key that replaced this one, and DeprecatedAt when; the key
	// keeps working until ExpiresAt, the end of the grace period.
	RotatedTo    string     `json:"rotated_to,omitempty"`
	DeprecatedAt *time.Time `json:"deprecated_at,omitempty"`
	// ChainID names the key's rotation chain: the id of the first key, which this one replaced
	// through rotations (its own id when it replaced none). The keys of a chain share one
	// credit cap: what one spent counts for all.
	ChainID string `json:"chain_id,omitempty"`
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
	// CreateKey stores a new key, the first of its chain (ChainID is set to its ID);
	// ErrConflict when the id is taken.
	CreateKey(ctx context.Context, k Key) error
	// CreateKeyWithin stores a new key as CreateKey does, unless its user already has maxLive
	// live keys (maxLive > 0), counting the keys neither revoked, nor expired at the new key's
	// CreatedAt, nor replaced by a rotation (so one per chain): then ErrKeyLimit, and nothing
	// is stored. Creations at once never pass the bound.
	CreateKeyWithin(ctx context.Context, k Key, maxLive int) error
	// KeyByID returns the key (revoked and expired ones too) or ErrNotFound.
	KeyByID(ctx context.Context, id string) (Key, error)
	// KeysByUser lists a user's keys, newest first.
	KeysByUser(ctx context.Context, userID string) ([]Key, error)
	// RevokeKey marks the key revoked at the given time; ErrNotFound when there is no such key.
	// Revoking a revoked key keeps the first time.
	RevokeKey(ctx context.Context, id string, at time.Time) error
	// TouchKeys records last use times for several keys at once (written in batches, not per request).
	TouchKeys(ctx context.Context, used map[string]time.Time) error
	// RotateKey replaces the key oldID by next in one transaction: next is stored, and the old
	// key is marked rotated to next.ID at time at, with its expiry brought forward to graceEnd
	// (never moved later). The key the old one replaced, if it is still in its own grace period,
	// expires at at: a chain of rotations never has more than two live keys. next joins the old
	// key's chain (its ChainID is the old key's). It reports the ids of the keys whose expiry
	// changed. ErrNotFound when there is no such key; ErrNotRotatable when it was already
	// rotated, or is revoked or expired at at.
	RotateKey(ctx context.Context, oldID string, next Key, at, graceEnd time.Time) ([]string, error)
}
