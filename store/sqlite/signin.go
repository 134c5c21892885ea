package sqlite

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// The sign-in state (see migrations/0004_signin.sql). Sessions, codes, refresh tokens and
// client secrets are stored by their SHA-256 only, never in the clear. The signing keys and the
// server secret are the exception: they are the server's own keys, which it must use, and are
// kept as they are, protected like the rest of the file.
//
// Like users and API keys, it is read from and written to the database directly. Writes go
// through the single write connection, in BEGIN IMMEDIATE transactions, which is what makes
// RedeemCode and RotateRefresh atomic: of concurrent calls on one code or token, each runs
// whole, one after the other.

var _ signin.Store = (*Store)(nil)

// signinVerdicts are the errors of the sign-in store that tell the caller something about its
// request (beside those of fail); they are returned as they are.
var signinVerdicts = []error{signin.ErrCodeUsed, signin.ErrRefreshReused, signin.ErrRefreshDead}

// failSignin is fail, which also returns the sign-in verdicts as they are.
func failSignin(op string, err error) error {
	for _, v := range signinVerdicts {
		if errors.Is(err, v) {
			return err
		}
	}
	return fail(op, err)
}

// jsonList encodes a list column: nil is stored as null, so that it reads back as nil.
func jsonList(list []string) (string, error) {
	b, err := json.Marshal(list)
	return string(b), err
}

// nullBytes stores optional bytes: NULL when empty.
func nullBytes(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// hash32 reads a stored SHA-256.
func hash32(b []byte, column string) ([32]byte, error) {
	var h [32]byte
	if len(b) != len(h) {
		return h, fmt.Errorf("%s: stored hash has %d bytes", column, len(b))
	}
	copy(h[:], b)
	return h, nil
}

// orNow is t, or now when t is zero.
func (s *Store) orNow(t time.Time) time.Time {
	if t.IsZero() {
		return s.now()
	}
	return t
}

// ---- Signing keys and the server secret

// SigningKeys lists the signing keys, newest (last added) first; none when there are none yet.
func (s *Store) SigningKeys(ctx context.Context) ([]signin.SigningKey, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT kid, private, created_at FROM signing_keys ORDER BY seq DESC`)
	if err != nil {
		return nil, fail("signing keys", err)
	}
	defer rows.Close()
	keys := []signin.SigningKey{}
	for rows.Next() {
		var (
			k         signin.SigningKey
			createdAt int64
		)
		if err := rows.Scan(&k.KID, &k.Private, &createdAt); err != nil {
			return nil, fail("signing keys", err)
		}
		k.CreatedAt = fromMicros(createdAt)
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fail("signing keys", err)
	}
	return keys, nil
}

// AddSigningKey stores k as the newest signing key and, in the same transaction, deletes all
// but the keep newest keys (k included); keep must be at least 1. identity.ErrConflict when
// the kid is taken. A zero CreatedAt is set to now.
func (s *Store) AddSigningKey(ctx context.Context, k signin.SigningKey, keep int) error {
	switch {
	case k.KID == "":
		return errors.New("add signing key: kid is required")
	case len(k.Private) != ed25519.PrivateKeySize:
		return fmt.Errorf("add signing key %s: private key has %d bytes, want %d", k.KID, len(k.Private), ed25519.PrivateKeySize)
	case keep < 1:
		return fmt.Errorf("add signing key %s: keep %d: the new key is kept, so keep must be at least 1", k.KID, keep)
	}
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO signing_keys (kid, private, created_at) VALUES (?, ?, ?)`,
			k.KID, k.Private, micros(s.orNow(k.CreatedAt)))
		if isUniqueViolation(err) {
			return identity.ErrConflict
		}
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM signing_keys
			WHERE seq NOT IN (SELECT seq FROM signing_keys ORDER BY seq DESC LIMIT ?)`, keep)
		return err
	})
	if err != nil {
		return fail("add signing key "+k.KID, err)
	}
	return nil
}

// ServerSecret returns the 32-byte HMAC secret, created at random and stored on the first
// call. Concurrent first calls all return the one that was stored.
func (s *Store) ServerSecret(ctx context.Context) ([]byte, error) {
	var secret []byte
	err := s.read.QueryRowContext(ctx, `SELECT secret FROM server_secret WHERE id = 1`).Scan(&secret)
	if err == nil {
		return secret, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return nil, fail("server secret", err)
	}
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		return nil, fail("server secret", err)
	}
	err = s.inWriteTx(ctx, func(tx *sql.Tx) error {
		// Another call may have stored one since the read: it is kept, and returned.
		if _, err := tx.ExecContext(ctx, `INSERT OR IGNORE INTO server_secret (id, secret, created_at) VALUES (1, ?, ?)`,
			fresh, micros(s.now())); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, `SELECT secret FROM server_secret WHERE id = 1`).Scan(&secret)
	})
	if err != nil {
		return nil, fail("server secret", err)
	}
	return secret, nil
}

// ---- Apps

// appColumns are the columns scanApp reads.
const appColumns = `client_id, name, redirect_uris, first_party, scopes, secret_hash, created_at`

// CreateApp stores a new app; identity.ErrConflict when the client id is taken. A zero
// CreatedAt is set to now; an empty SecretHash is stored as none (a public client).
func (s *Store) CreateApp(ctx context.Context, a signin.App) error {
	if a.ClientID == "" {
		return errors.New("create app: client id is required")
	}
	if len(a.SecretHash) != 0 && len(a.SecretHash) != 32 {
		return fmt.Errorf("create app %s: secret hash has %d bytes, want 32", a.ClientID, len(a.SecretHash))
	}
	uris, err := jsonList(a.RedirectURIs)
	if err != nil {
		return fmt.Errorf("create app %s: %w", a.ClientID, err)
	}
	scopes, err := jsonList(a.Scopes)
	if err != nil {
		return fmt.Errorf("create app %s: %w", a.ClientID, err)
	}
	_, err = s.write.ExecContext(ctx, `INSERT INTO apps (`+appColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		a.ClientID, a.Name, uris, a.FirstParty, scopes, nullBytes(a.SecretHash), micros(s.orNow(a.CreatedAt)))
	if isUniqueViolation(err) {
		return identity.ErrConflict
	}
	if err != nil {
		return fail("create app "+a.ClientID, err)
	}
	return nil
}

// AppByID returns the app or identity.ErrNotFound.
func (s *Store) AppByID(ctx context.Context, clientID string) (signin.App, error) {
	a, err := scanApp(s.read.QueryRowContext(ctx, `SELECT `+appColumns+` FROM apps WHERE client_id = ?`, clientID))
	if errors.Is(err, sql.ErrNoRows) {
		return signin.App{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.App{}, fail("app "+clientID, err)
	}
	return a, nil
}

// Apps lists every app, oldest first (in the order they were created when created at the same
// time).
func (s *Store) Apps(ctx context.Context) ([]signin.App, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT `+appColumns+` FROM apps ORDER BY created_at, rowid`)
	if err != nil {
		return nil, fail("apps", err)
	}
	defer rows.Close()
	apps := []signin.App{}
	for rows.Next() {
		a, err := scanApp(rows)
		if err != nil {
			return nil, fail("apps", err)
		}
		apps = append(apps, a)
	}
	if err := rows.Err(); err != nil {
		return nil, fail("apps", err)
	}
	return apps, nil
}

// scanApp reads an apps row selected with appColumns.
func scanApp(row rowScanner) (signin.App, error) {
	var (
		a             signin.App
		uris, scopes  string
		secretHash    []byte
		createdAt     int64
		firstPartyInt int64
	)
	if err := row.Scan(&a.ClientID, &a.Name, &uris, &firstPartyInt, &scopes, &secretHash, &createdAt); err != nil {
		return signin.App{}, err
	}
	if err := json.Unmarshal([]byte(uris), &a.RedirectURIs); err != nil {
		return signin.App{}, fmt.Errorf("app %s: redirect_uris: %w", a.ClientID, err)
	}
	if err := json.Unmarshal([]byte(scopes), &a.Scopes); err != nil {
		return signin.App{}, fmt.Errorf("app %s: scopes: %w", a.ClientID, err)
	}
	a.FirstParty = firstPartyInt != 0
	if len(secretHash) != 0 {
		a.SecretHash = secretHash
	}
	a.CreatedAt = fromMicros(createdAt)
	return a, nil
}

// ---- Sessions

// CreateSession stores a session: only the hash of its token. In the same transaction it
// deletes the user's other sessions that are expired, and the oldest beyond
// signin.MaxSessionsPerUser. identity.ErrConflict when the hash is taken, identity.ErrNotFound
// when the user does not exist. A zero CreatedAt is set to now.
func (s *Store) CreateSession(ctx context.Context, se signin.Session) error {
	switch {
	case se.Hash == [32]byte{}:
		return errors.New("create session: missing hash")
	case se.UserID == "":
		return errors.New("create session: user id is required")
	case se.ExpiresAt.IsZero():
		return errors.New("create session: expiry is required")
	}
	se.CreatedAt = s.orNow(se.CreatedAt)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO sessions (hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)`,
			se.Hash[:], se.UserID, micros(se.CreatedAt), micros(se.ExpiresAt)); err != nil {
			return err
		}
		// The user's expired sessions, and the oldest beyond the bound, go.
		_, err := tx.ExecContext(ctx, `DELETE FROM sessions WHERE user_id = ? AND hash != ? AND (expires_at <= ? OR hash IN (
			SELECT hash FROM sessions WHERE user_id = ? ORDER BY created_at DESC, hash DESC LIMIT -1 OFFSET ?))`,
			se.UserID, se.Hash[:], micros(s.now()), se.UserID, signin.MaxSessionsPerUser)
		return err
	})
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("create session: user %s: %w", se.UserID, identity.ErrNotFound)
	case err != nil:
		return fail("create session", err)
	}
	return nil
}

// SessionByHash returns the session, expired ones too, or identity.ErrNotFound.
func (s *Store) SessionByHash(ctx context.Context, hash [32]byte) (signin.Session, error) {
	var (
		se                   signin.Session
		createdAt, expiresAt int64
	)
	err := s.read.QueryRowContext(ctx, `SELECT user_id, created_at, expires_at FROM sessions WHERE hash = ?`, hash[:]).
		Scan(&se.UserID, &createdAt, &expiresAt)
	if errors.Is(err, sql.ErrNoRows) {
		return signin.Session{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Session{}, fail("session", err)
	}
	se.Hash = hash
	se.CreatedAt = fromMicros(createdAt)
	se.ExpiresAt = fromMicros(expiresAt)
	return se, nil
}

// DeleteSession deletes the session; deleting a missing one is not an error.
func (s *Store) DeleteSession(ctx context.Context, hash [32]byte) error {
	if _, err := s.write.ExecContext(ctx, `DELETE FROM sessions WHERE hash = ?`, hash[:]); err != nil {
		return fail("delete session", err)
	}
	return nil
}

// ---- Consents

// consentColumns are the columns scanConsent reads.
const consentColumns = `user_id, client, scopes, created_at, revoked_at`

// ConsentFor returns the user's consent for client, revoked ones too, or identity.ErrNotFound.
func (s *Store) ConsentFor(ctx context.Context, userID, client string) (signin.Consent, error) {
	c, err := scanConsent(s.read.QueryRowContext(ctx, `SELECT `+consentColumns+` FROM consents
		WHERE user_id = ? AND client = ?`, userID, client))
	if errors.Is(err, sql.ErrNoRows) {
		return signin.Consent{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Consent{}, fail("consent of user "+userID, err)
	}
	return c, nil
}

// SaveConsent stores c, replacing any consent of the same user and client, a revoked one
// included. The stored consent is live: c.RevokedAt is ignored (RevokeConsent revokes). A zero
// CreatedAt is set to now. identity.ErrNotFound when the user does not exist.
func (s *Store) SaveConsent(ctx context.Context, c signin.Consent) error {
	if c.UserID == "" || c.Client == "" {
		return errors.New("save consent: user id and client are required")
	}
	scopes, err := jsonList(c.Scopes)
	if err != nil {
		return fmt.Errorf("save consent of user %s: %w", c.UserID, err)
	}
	_, err = s.write.ExecContext(ctx, `INSERT INTO consents (user_id, client, scopes, created_at, revoked_at)
		VALUES (?, ?, ?, ?, NULL)
		ON CONFLICT (user_id, client) DO UPDATE
		SET scopes = excluded.scopes, created_at = excluded.created_at, revoked_at = NULL`,
		c.UserID, c.Client, scopes, micros(s.orNow(c.CreatedAt)))
	switch {
	case isForeignKeyViolation(err):
		return fmt.Errorf("save consent: user %s: %w", c.UserID, identity.ErrNotFound)
	case err != nil:
		return fail("save consent of user "+c.UserID, err)
	}
	return nil
}

// RevokeConsent marks the user's live consent for client revoked at at and revokes every
// refresh token of that user and client (already revoked ones keep their time), in one
// transaction. identity.ErrNotFound when there is no live consent; then nothing changes.
func (s *Store) RevokeConsent(ctx context.Context, userID, client string, at time.Time) error {
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE consents SET revoked_at = ?
			WHERE user_id = ? AND client = ? AND revoked_at IS NULL`, micros(at), userID, client)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return identity.ErrNotFound
		}
		_, err = tx.ExecContext(ctx, `UPDATE refresh_tokens SET revoked_at = ?
			WHERE user_id = ? AND client_id = ? AND revoked_at IS NULL`, micros(at), userID, client)
		return err
	})
	if err != nil {
		return fail("revoke consent of user "+userID, err)
	}
	return nil
}

// ConsentsByUser lists the user's live (not revoked) consents, newest first.
func (s *Store) ConsentsByUser(ctx context.Context, userID string) ([]signin.Consent, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT `+consentColumns+` FROM consents
		WHERE user_id = ? AND revoked_at IS NULL ORDER BY created_at DESC, client`, userID)
	if err != nil {
		return nil, fail("consents of user "+userID, err)
	}
	defer rows.Close()
	consents := []signin.Consent{}
	for rows.Next() {
		c, err := scanConsent(rows)
		if err != nil {
			return nil, fail("consents of user "+userID, err)
		}
		consents = append(consents, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fail("consents of user "+userID, err)
	}
	return consents, nil
}

// scanConsent reads a consents row selected with consentColumns.
func scanConsent(row rowScanner) (signin.Consent, error) {
	var (
		c         signin.Consent
		scopes    string
		createdAt int64
		revokedAt sql.NullInt64
	)
	if err := row.Scan(&c.UserID, &c.Client, &scopes, &createdAt, &revokedAt); err != nil {
		return signin.Consent{}, err
	}
	if err := json.Unmarshal([]byte(scopes), &c.Scopes); err != nil {
		return signin.Consent{}, fmt.Errorf("consent of user %s: scopes: %w", c.UserID, err)
	}
	c.CreatedAt = fromMicros(createdAt)
	c.RevokedAt = fromNullMicros(revokedAt)
	return c, nil
}

// ---- Authorization codes

// codeColumns are the columns scanCode reads.
const codeColumns = `hash, client_id, user_id, redirect_uri, scopes, challenge, created_at, expires_at, used_at`

// CreateCode stores a new authorization code: only its hash. identity.ErrConflict when the
// hash is taken, identity.ErrNotFound when the user does not exist. A zero CreatedAt is set to
// now.
func (s *Store) CreateCode(ctx context.Context, c signin.Code) error {
	switch {
	case c.Hash == [32]byte{}:
		return errors.New("create code: missing hash")
	case c.ClientID == "" || c.UserID == "":
		return errors.New("create code: client id and user id are required")
	case c.ExpiresAt.IsZero():
		return errors.New("create code: expiry is required")
	}
	scopes, err := jsonList(c.Scopes)
	if err != nil {
		return fmt.Errorf("create code: %w", err)
	}
	_, err = s.write.ExecContext(ctx, `INSERT INTO auth_codes (`+codeColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		c.Hash[:], c.ClientID, c.UserID, c.RedirectURI, scopes, c.Challenge,
		micros(s.orNow(c.CreatedAt)), micros(c.ExpiresAt), nullMicros(c.UsedAt))
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("create code: user %s: %w", c.UserID, identity.ErrNotFound)
	case err != nil:
		return fail("create code", err)
	}
	return nil
}

// RedeemCode marks the code used at at and returns it, in one statement: of concurrent calls
// with one code, exactly one marks it. A code used before: the code (with the time it was
// first used) and signin.ErrCodeUsed. An unknown code: identity.ErrNotFound. An expired code is
// marked used too: expiry, client and redirect URI are the caller's to check.
func (s *Store) RedeemCode(ctx context.Context, hash [32]byte, at time.Time) (signin.Code, error) {
	var code signin.Code
	used := false
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		used = false
		c, err := scanCode(tx.QueryRowContext(ctx, `UPDATE auth_codes SET used_at = ?
			WHERE hash = ? AND used_at IS NULL RETURNING `+codeColumns, micros(at), hash[:]))
		if err == nil {
			code = c
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		// Not marked: unknown, or used before.
		c, err = scanCode(tx.QueryRowContext(ctx, `SELECT `+codeColumns+` FROM auth_codes WHERE hash = ?`, hash[:]))
		if errors.Is(err, sql.ErrNoRows) {
			return identity.ErrNotFound
		}
		if err != nil {
			return err
		}
		code, used = c, true
		return nil
	})
	if err != nil {
		return signin.Code{}, fail("redeem code", err)
	}
	if used {
		return code, signin.ErrCodeUsed
	}
	return code, nil
}

// scanCode reads an auth_codes row selected with codeColumns.
func scanCode(row rowScanner) (signin.Code, error) {
	var (
		c                    signin.Code
		hash                 []byte
		scopes               string
		createdAt, expiresAt int64
		usedAt               sql.NullInt64
	)
	if err := row.Scan(&hash, &c.ClientID, &c.UserID, &c.RedirectURI, &scopes, &c.Challenge,
		&createdAt, &expiresAt, &usedAt); err != nil {
		return signin.Code{}, err
	}
	h, err := hash32(hash, "auth_codes.hash")
	if err != nil {
		return signin.Code{}, err
	}
	c.Hash = h
	if err := json.Unmarshal([]byte(scopes), &c.Scopes); err != nil {
		return signin.Code{}, fmt.Errorf("code: scopes: %w", err)
	}
	c.CreatedAt = fromMicros(createdAt)
	c.ExpiresAt = fromMicros(expiresAt)
	c.UsedAt = fromNullMicros(usedAt)
	return c, nil
}

// ---- Refresh tokens

// refreshColumns are the columns scanRefresh reads.
const refreshColumns = `hash, family, user_id, client_id, scopes, origin, created_at, expires_at,
	rotated_at, successor, revoked_at`

// CreateRefresh stores a new refresh token, the first of a new family: only its hash.
// identity.ErrConflict when the hash is taken or the family has tokens already (a family only
// grows by RotateRefresh), identity.ErrNotFound when the user does not exist. A zero CreatedAt
// is set to now. The token is stored live: RotatedAt, Successor and RevokedAt are ignored. In
// the same transaction, the user's live families (newest token not revoked and not expired at
// CreatedAt) beyond signin.MaxFamiliesPerUser - 1 are revoked at CreatedAt, least recently
// used (newest token made longest ago) first.
func (s *Store) CreateRefresh(ctx context.Context, t signin.Refresh) error {
	switch {
	case t.Hash == [32]byte{}:
		return errors.New("create refresh token: missing hash")
	case t.Family == "" || t.UserID == "" || t.ClientID == "":
		return errors.New("create refresh token: family, user id and client id are required")
	case t.ExpiresAt.IsZero():
		return errors.New("create refresh token: expiry is required")
	}
	t.CreatedAt = s.orNow(t.CreatedAt)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM refresh_tokens WHERE family = ? LIMIT 1`, t.Family).Scan(&one)
		if err == nil {
			return fmt.Errorf("create refresh token: family %s exists: %w", t.Family, identity.ErrConflict)
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		// The user's live families beyond the bound, the new one counted, are revoked: those
		// whose newest token was made longest ago (the least recently used) first.
		if _, err := tx.ExecContext(ctx, `UPDATE refresh_tokens SET revoked_at = ?
			WHERE revoked_at IS NULL AND family IN (
				SELECT family FROM refresh_tokens
				WHERE user_id = ? AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > ?
				ORDER BY created_at DESC, hash DESC LIMIT -1 OFFSET ?)`,
			micros(t.CreatedAt), t.UserID, micros(t.CreatedAt), signin.MaxFamiliesPerUser-1); err != nil {
			return err
		}
		return insertRefresh(ctx, tx, t)
	})
	if err != nil {
		return fail("create refresh token", err)
	}
	return nil
}

// insertRefresh inserts t as a live token.
func insertRefresh(ctx context.Context, tx *sql.Tx, t signin.Refresh) error {
	scopes, err := jsonList(t.Scopes)
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO refresh_tokens
		(hash, family, user_id, client_id, scopes, origin, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
		t.Hash[:], t.Family, t.UserID, t.ClientID, scopes, nullString(t.Origin), micros(t.CreatedAt), micros(t.ExpiresAt))
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("refresh token: user %s: %w", t.UserID, identity.ErrNotFound)
	}
	return err
}

// RotateRefresh rotates the live token oldHash to next in one write transaction. next.Family,
// UserID, ClientID, Scopes and Origin are taken from the old token; next.CreatedAt (now when
// zero) and ExpiresAt (required) from next. It returns the old token as it was before the call
// (the zero Refresh when unknown) and the outcome, decided in this order:
//   - revoked: signin.ErrRefreshDead. Revocations always take whole families (RevokeConsent,
//     RevokeRefreshFamily, RevokeRefreshByOrigin), so no live token remains to protect.
//   - rotated at most grace before at and its successor live (not rotated, revoked or
//     expired at at): Replayed, nothing written.
//   - rotated otherwise (expired since or not): the family is revoked at at, committed, and
//     signin.ErrRefreshReused.
//   - expired at at (expires_at <= at): signin.ErrRefreshDead.
//   - live: it is marked rotated at at with successor next.Hash and next is stored: Rotated.
//
// Unknown: identity.ErrNotFound. A next.Hash that is taken: identity.ErrConflict, and nothing
// changes.
func (s *Store) RotateRefresh(ctx context.Context, oldHash [32]byte, next signin.Refresh, at time.Time, grace time.Duration) (signin.Refresh, signin.RotateOutcome, error) {
	if next.Hash == [32]byte{} {
		return signin.Refresh{}, 0, errors.New("rotate refresh token: missing hash of the next token")
	}
	if next.ExpiresAt.IsZero() {
		return signin.Refresh{}, 0, errors.New("rotate refresh token: expiry of the next token is required")
	}
	if next.CreatedAt.IsZero() {
		next.CreatedAt = at
	}
	var (
		old     signin.Refresh
		outcome signin.RotateOutcome
		verdict error
	)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		outcome, verdict = 0, nil
		var err error
		old, err = scanRefresh(tx.QueryRowContext(ctx, `SELECT `+refreshColumns+` FROM refresh_tokens WHERE hash = ?`, oldHash[:]))
		if errors.Is(err, sql.ErrNoRows) {
			return identity.ErrNotFound
		}
		if err != nil {
			return err
		}
		now := micros(at)
		switch {
		case old.RevokedAt != nil:
			verdict = signin.ErrRefreshDead
			return nil
		case old.RotatedAt != nil:
			if micros(*old.RotatedAt) >= micros(at.Add(-grace)) {
				var live int
				err := tx.QueryRowContext(ctx, `SELECT count(*) FROM refresh_tokens
					WHERE hash = ? AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > ?`,
					old.Successor[:], now).Scan(&live)
				if err != nil {
					return err
				}
				if live == 1 {
					outcome = signin.Replayed
					return nil
				}
			}
			// Reuse: whoever holds the family's live token may not be its owner. The revocation
			// is committed with the verdict.
			if _, err := tx.ExecContext(ctx, `UPDATE refresh_tokens SET revoked_at = ?
				WHERE family = ? AND revoked_at IS NULL`, now, old.Family); err != nil {
				return err
			}
			verdict = signin.ErrRefreshReused
			return nil
		case micros(old.ExpiresAt) <= now:
			verdict = signin.ErrRefreshDead
			return nil
		}
		if _, err := tx.ExecContext(ctx, `UPDATE refresh_tokens SET rotated_at = ?, successor = ? WHERE hash = ?`,
			now, next.Hash[:], oldHash[:]); err != nil {
			return err
		}
		next.Family, next.UserID, next.ClientID, next.Scopes, next.Origin = old.Family, old.UserID, old.ClientID, old.Scopes, old.Origin
		if err := insertRefresh(ctx, tx, next); err != nil {
			return err
		}
		outcome = signin.Rotated
		return nil
	})
	switch {
	case err != nil:
		return signin.Refresh{}, 0, failSignin("rotate refresh token", err)
	case verdict != nil:
		return old, 0, verdict
	}
	return old, outcome, nil
}

// RefreshByHash returns the token or identity.ErrNotFound.
func (s *Store) RefreshByHash(ctx context.Context, hash [32]byte) (signin.Refresh, error) {
	t, err := scanRefresh(s.read.QueryRowContext(ctx, `SELECT `+refreshColumns+` FROM refresh_tokens WHERE hash = ?`, hash[:]))
	if errors.Is(err, sql.ErrNoRows) {
		return signin.Refresh{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Refresh{}, fail("refresh token", err)
	}
	return t, nil
}

// RevokeRefreshFamily revokes every token of the family at at; already revoked ones keep their
// time. An unknown family is not an error.
func (s *Store) RevokeRefreshFamily(ctx context.Context, family string, at time.Time) error {
	if _, err := s.write.ExecContext(ctx, `UPDATE refresh_tokens SET revoked_at = ?
		WHERE family = ? AND revoked_at IS NULL`, micros(at), family); err != nil {
		return fail("revoke refresh family "+family, err)
	}
	return nil
}

// RevokeRefreshByOrigin revokes, at at, every token of the families issued from the code whose
// SHA-256 (hex) is origin (a family shares its origin); already revoked ones keep their time.
// The empty origin (the password grant) names no code, and revokes nothing.
func (s *Store) RevokeRefreshByOrigin(ctx context.Context, origin string, at time.Time) error {
	if origin == "" {
		return nil
	}
	if _, err := s.write.ExecContext(ctx, `UPDATE refresh_tokens SET revoked_at = ?
		WHERE origin = ? AND revoked_at IS NULL`, micros(at), origin); err != nil {
		return fail("revoke refresh tokens by origin", err)
	}
	return nil
}

// scanRefresh reads a refresh_tokens row selected with refreshColumns.
func scanRefresh(row rowScanner) (signin.Refresh, error) {
	var (
		t                    signin.Refresh
		hash, successor      []byte
		scopes               string
		origin               sql.NullString
		createdAt, expiresAt int64
		rotatedAt, revokedAt sql.NullInt64
	)
	if err := row.Scan(&hash, &t.Family, &t.UserID, &t.ClientID, &scopes, &origin, &createdAt, &expiresAt,
		&rotatedAt, &successor, &revokedAt); err != nil {
		return signin.Refresh{}, err
	}
	h, err := hash32(hash, "refresh_tokens.hash")
	if err != nil {
		return signin.Refresh{}, err
	}
	t.Hash = h
	if successor != nil {
		h, err := hash32(successor, "refresh_tokens.successor")
		if err != nil {
			return signin.Refresh{}, err
		}
		t.Successor = &h
	}
	if err := json.Unmarshal([]byte(scopes), &t.Scopes); err != nil {
		return signin.Refresh{}, fmt.Errorf("refresh token: scopes: %w", err)
	}
	t.Origin = origin.String
	t.CreatedAt = fromMicros(createdAt)
	t.ExpiresAt = fromMicros(expiresAt)
	t.RotatedAt = fromNullMicros(rotatedAt)
	t.RevokedAt = fromNullMicros(revokedAt)
	return t, nil
}

// ---- Sweeping

// sweepChunk bounds the rows one statement of Sweep deletes, so that the write lock is never
// held long (the flusher's commits wait for it).
const sweepChunk = 1000

// Sweep deletes, as of now: the expired sessions; the authorization codes expired at least
// signin.SweepRetention ago; and every token of the refresh families whose newest token
// expired, or that were revoked, at least signin.SweepRetention ago. A family whose newest
// token is live keeps all its tokens (a rotated one presented again still revokes it). Rows go
// in chunks of sweepChunk, each in its own statement.
func (s *Store) Sweep(ctx context.Context, now time.Time) (signin.Swept, error) {
	var out signin.Swept
	cutoff := micros(now.Add(-signin.SweepRetention))
	chunks := func(n *int64, query string, args ...any) error {
		for {
			res, err := s.write.ExecContext(ctx, query, args...)
			if err != nil {
				return err
			}
			k, err := res.RowsAffected()
			if err != nil {
				return err
			}
			*n += k
			if k < sweepChunk {
				return nil
			}
		}
	}
	if err := chunks(&out.Sessions, `DELETE FROM sessions WHERE hash IN (
		SELECT hash FROM sessions WHERE expires_at <= ? LIMIT ?)`, micros(now), sweepChunk); err != nil {
		return out, fail("sweep sessions", err)
	}
	if err := chunks(&out.Codes, `DELETE FROM auth_codes WHERE hash IN (
		SELECT hash FROM auth_codes WHERE expires_at <= ? LIMIT ?)`, cutoff, sweepChunk); err != nil {
		return out, fail("sweep authorization codes", err)
	}
	// A family died when its newest (unrotated) token expired or it was revoked (revocations
	// take whole families); rotated tokens that are not revoked count for nothing. A dead
	// family never comes back, so the list is read without the write lock.
	rows, err := s.read.QueryContext(ctx, `SELECT family FROM refresh_tokens GROUP BY family
		HAVING max(CASE WHEN revoked_at IS NOT NULL THEN revoked_at WHEN rotated_at IS NULL THEN expires_at ELSE 0 END) <= ?`,
		cutoff)
	if err != nil {
		return out, fail("sweep refresh tokens", err)
	}
	var dead []any
	for rows.Next() {
		var f string
		if err := rows.Scan(&f); err != nil {
			rows.Close()
			return out, fail("sweep refresh tokens", err)
		}
		dead = append(dead, f)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return out, fail("sweep refresh tokens", err)
	}
	const familiesPerStatement = 100
	for len(dead) > 0 {
		batch := dead[:min(familiesPerStatement, len(dead))]
		dead = dead[len(batch):]
		res, err := s.write.ExecContext(ctx, `DELETE FROM refresh_tokens WHERE family IN (?`+
			strings.Repeat(", ?", len(batch)-1)+`)`, batch...)
		if err != nil {
			return out, fail("sweep refresh tokens", err)
		}
		k, _ := res.RowsAffected()
		out.RefreshTokens += k
	}
	return out, nil
}

// ---- External subjects

// UserForSubject returns the user id linked to the issuer's subject, or identity.ErrNotFound.
func (s *Store) UserForSubject(ctx context.Context, issuer, subject string) (string, error) {
	var userID string
	err := s.read.QueryRowContext(ctx, `SELECT user_id FROM external_subjects WHERE issuer = ? AND subject = ?`,
		issuer, subject).Scan(&userID)
	if errors.Is(err, sql.ErrNoRows) {
		return "", identity.ErrNotFound
	}
	if err != nil {
		return "", fail("user for subject", err)
	}
	return userID, nil
}

// LinkSubject links the issuer's subject to the user; identity.ErrConflict when the subject is
// linked already (to this user or another), identity.ErrNotFound when the user does not exist.
func (s *Store) LinkSubject(ctx context.Context, issuer, subject, userID string) error {
	if issuer == "" || subject == "" || userID == "" {
		return errors.New("link subject: issuer, subject and user id are required")
	}
	_, err := s.write.ExecContext(ctx, `INSERT INTO external_subjects (issuer, subject, user_id, created_at)
		VALUES (?, ?, ?, ?)`, issuer, subject, userID, micros(s.now()))
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("link subject: user %s: %w", userID, identity.ErrNotFound)
	case err != nil:
		return fail("link subject", err)
	}
	return nil
}
