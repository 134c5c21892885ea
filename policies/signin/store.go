package signin

import (
	"context"
	"errors"
	"time"
)

// Errors the sign-in store reports (beside identity.ErrNotFound and identity.ErrConflict,
// which it uses for missing and duplicate rows).
var (
	// ErrCodeUsed: the authorization code was redeemed before. RedeemCode returns the code
	// with it, so that the tokens issued from it can be revoked (RFC 6749 §4.1.2).
	ErrCodeUsed = errors.New("authorization code already used")
	// ErrRefreshReused: a refresh token that was rotated is presented again after the grace
	// period, or while its successor is no longer the live token of its family. The store has
	// revoked the whole family when it reports this.
	ErrRefreshReused = errors.New("refresh token reused")
	// ErrRefreshDead: the refresh token is revoked or expired.
	ErrRefreshDead = errors.New("refresh token revoked or expired")
)

// Bounds of the sign-in state a store keeps (issue 11: nothing a caller repeats may grow it
// without end).
const (
	// MaxSessionsPerUser bounds a user's sessions: CreateSession deletes the user's oldest
	// beyond it (and the user's expired ones).
	MaxSessionsPerUser = 20
	// MaxFamiliesPerUser bounds a user's live refresh token families (a family is live while
	// its newest token is neither revoked nor expired): CreateRefresh revokes the least
	// recently used live families of the user beyond it.
	MaxFamiliesPerUser = 50
	// SweepRetention is how long Sweep keeps what is over before deleting it: authorization
	// codes past their expiry (a replay within it still revokes what the code issued) and
	// refresh token families since they were revoked or expired (longer than any refresh
	// grace). Expired sessions are deleted at once.
	SweepRetention = time.Hour
)

// Swept counts the rows one Sweep deleted.
type Swept struct {
	Sessions, Codes, RefreshTokens int64
}

// SigningKey is one of the gateway's own JWT signing keys (Ed25519).
type SigningKey struct {
	// KID names the key in JWT headers and the JWKS.
	KID string
	// Private is the Ed25519 private key (64 bytes, crypto/ed25519 form). A secret.
	Private   []byte
	CreatedAt time.Time
}

// App is a registered OAuth client (API.md §9: POST /llm_gateway/apps).
type App struct {
	ClientID string
	Name     string
	// RedirectURIs are compared byte for byte with the redirect_uri of a request.
	RedirectURIs []string
	// FirstParty apps may use the password grant and skip nothing else.
	FirstParty bool
	// Scopes are the most the app may ask for.
	Scopes []string
	// SecretHash is the SHA-256 of the client secret of a confidential client; nil for a
	// public client (PKCE alone).
	SecretHash []byte
	CreatedAt  time.Time
}

// Session is a signed-in browser. The cookie holds a random token; only its SHA-256 is stored.
type Session struct {
	Hash      [32]byte
	UserID    string
	CreatedAt time.Time
	ExpiresAt time.Time
}

// Consent is what a user allowed a client: an OAuth app (Client is its client_id) or, in the
// fragment flow, a browser app origin (Client is "origin:" + the origin).
type Consent struct {
	UserID    string
	Client    string
	Scopes    []string
	CreatedAt time.Time
	// RevokedAt is set when the user revoked it; a revoked consent asks again.
	RevokedAt *time.Time
}

// Code is an authorization code (RFC 6749 §4.1). Only its SHA-256 is stored.
type Code struct {
	Hash        [32]byte
	ClientID    string
	UserID      string
	RedirectURI string
	Scopes      []string
	// Challenge is the PKCE S256 code challenge (base64url); Method is always "S256".
	Challenge string
	CreatedAt time.Time
	ExpiresAt time.Time
	// UsedAt is when it was redeemed (nil: never).
	UsedAt *time.Time
}

// Refresh is a refresh token (opaque). Only its SHA-256 is stored. Tokens rotated from one
// another share a Family, which is revoked whole when a rotated token is reused.
type Refresh struct {
	Hash     [32]byte
	Family   string
	UserID   string
	ClientID string
	Scopes   []string
	// Origin is the SHA-256 (hex) of the authorization code the family was issued from, or ""
	// (password grant): a replayed code revokes the families issued from it.
	Origin    string
	CreatedAt time.Time
	ExpiresAt time.Time
	// RotatedAt is when it was rotated, Successor the hash of the token that replaced it.
	RotatedAt *time.Time
	Successor *[32]byte
	RevokedAt *time.Time
}

// RotateOutcome says what RotateRefresh did.
type RotateOutcome int

const (
	// Rotated: the presented token was live; it is now rotated to the new one, stored.
	Rotated RotateOutcome = iota + 1
	// Replayed: the presented token was rotated less than the grace period ago and its
	// successor is still live (not rotated, revoked or expired): the caller is answered with
	// that same successor again (a lost response, or two tabs); nothing was written.
	Replayed
)

// Store keeps the sign-in state. Every method is safe for concurrent use; the single-use
// operations (RedeemCode, RotateRefresh) are atomic: of any number of concurrent calls with
// the same code or token, exactly one redeems or rotates it.
type Store interface {
	// SigningKeys lists the signing keys, newest first (empty when there are none yet).
	SigningKeys(ctx context.Context) ([]SigningKey, error)
	// AddSigningKey stores k as the newest signing key and deletes all but the keep newest
	// keys (k included).
	AddSigningKey(ctx context.Context, k SigningKey, keep int) error
	// ServerSecret returns the gateway's 32-byte HMAC secret (CSRF tokens, refresh token
	// successors), created at random and stored on the first call.
	ServerSecret(ctx context.Context) ([]byte, error)

	// CreateApp stores a new app; identity.ErrConflict when the client id is taken.
	CreateApp(ctx context.Context, a App) error
	// AppByID returns the app or identity.ErrNotFound.
	AppByID(ctx context.Context, clientID string) (App, error)
	// Apps lists every app, oldest first.
	Apps(ctx context.Context) ([]App, error)

	// CreateSession stores a session, and deletes the user's expired sessions and the oldest
	// beyond MaxSessionsPerUser.
	CreateSession(ctx context.Context, s Session) error
	// SessionByHash returns the session (expired ones too: the caller checks ExpiresAt) or
	// identity.ErrNotFound.
	SessionByHash(ctx context.Context, hash [32]byte) (Session, error)
	// DeleteSession deletes the session; deleting a missing one is not an error.
	DeleteSession(ctx context.Context, hash [32]byte) error

	// ConsentFor returns the user's consent for client (revoked ones too) or
	// identity.ErrNotFound.
	ConsentFor(ctx context.Context, userID, client string) (Consent, error)
	// SaveConsent stores c, replacing any consent of the same user and client (a revoked one
	// included: RevokedAt is cleared).
	SaveConsent(ctx context.Context, c Consent) error
	// RevokeConsent marks the user's consent for client revoked at at and revokes every
	// refresh token of that user and client, in one transaction. identity.ErrNotFound when
	// there is no live consent.
	RevokeConsent(ctx context.Context, userID, client string, at time.Time) error
	// ConsentsByUser lists the user's live (not revoked) consents, newest first.
	ConsentsByUser(ctx context.Context, userID string) ([]Consent, error)

	// CreateCode stores a new authorization code.
	CreateCode(ctx context.Context, c Code) error
	// RedeemCode marks the code used at at and returns it, in one atomic step. A code used
	// before: the code and ErrCodeUsed. An unknown code: identity.ErrNotFound. Expiry, client
	// and redirect URI are the caller's to check on the returned code (an expired code is
	// still marked used).
	RedeemCode(ctx context.Context, hash [32]byte, at time.Time) (Code, error)

	// CreateRefresh stores a new refresh token (the first of a family), and revokes the
	// user's least recently used live families beyond MaxFamiliesPerUser (the new one
	// counted), in one transaction.
	CreateRefresh(ctx context.Context, t Refresh) error
	// RotateRefresh rotates the live token oldHash to next (next.Family, UserID, ClientID,
	// Scopes and Origin are set by the store from the old token) in one atomic step, and
	// returns the old token as it was and the outcome:
	//   - live (not rotated, revoked or expired at at): it is marked rotated at at with
	//     successor next.Hash, next is stored: Rotated.
	//   - rotated at most grace before at, and its successor is live: Replayed (nothing
	//     written; the caller re-derives the successor).
	//   - rotated otherwise: the whole family is revoked at at; ErrRefreshReused.
	//   - revoked or expired: ErrRefreshDead. Unknown: identity.ErrNotFound.
	RotateRefresh(ctx context.Context, oldHash [32]byte, next Refresh, at time.Time, grace time.Duration) (Refresh, RotateOutcome, error)
	// RefreshByHash returns the token or identity.ErrNotFound.
	RefreshByHash(ctx context.Context, hash [32]byte) (Refresh, error)
	// RevokeRefreshFamily revokes every token of the family at at (already revoked ones keep
	// their time).
	RevokeRefreshFamily(ctx context.Context, family string, at time.Time) error
	// RevokeRefreshByOrigin revokes every token of the families issued from the code whose
	// SHA-256 (hex) is origin.
	RevokeRefreshByOrigin(ctx context.Context, origin string, at time.Time) error

	// Sweep deletes, as of now, the expired sessions, the authorization codes expired more
	// than SweepRetention ago and the tokens of the refresh families revoked or expired more
	// than SweepRetention ago (a family whose newest token is live keeps all its tokens, for
	// reuse detection).
	Sweep(ctx context.Context, now time.Time) (Swept, error)

	// UserForSubject returns the user id linked to an external issuer's subject, or
	// identity.ErrNotFound.
	UserForSubject(ctx context.Context, issuer, subject string) (string, error)
	// LinkSubject links an external issuer's subject to a user; identity.ErrConflict when the
	// subject is linked already.
	LinkSubject(ctx context.Context, issuer, subject, userID string) error
}
