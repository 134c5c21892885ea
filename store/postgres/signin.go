package postgres

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// The sign-in state (see migrations/0004_signin.sql). Sessions, codes, refresh tokens and
// client secrets are stored by their SHA-256 only, never in the clear; the signing keys and the
// server secret are the server's own keys, kept as they are.
//
// The single-use operations hold across instances: RedeemCode is one conditional UPDATE, and
// RotateRefresh a transaction that locks the presented token's row (SELECT ... FOR UPDATE)
// before it decides, so that of any number of calls with one code or token, on any number of
// instances, exactly one redeems or rotates it.

// hash32 reads a stored SHA-256.
func hash32(b []byte, column string) ([32]byte, error) {
	var h [32]byte
	if len(b) != len(h) {
		return h, fmt.Errorf("%s: stored hash has %d bytes", column, len(b))
	}
	copy(h[:], b)
	return h, nil
}

// unmarshalList reads a JSONB list column.
func unmarshalList(b []byte, column string) ([]string, error) {
	var list []string
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("%s: %w", column, err)
	}
	return list, nil
}

// ---- Signing keys and the server secret

// SigningKeys lists the signing keys, newest (last added) first; none when there are none yet.
func (s *Store) SigningKeys(ctx context.Context) ([]signin.SigningKey, error) {
	rows, err := s.pool.Query(ctx, `SELECT kid, private, created_at FROM signing_keys ORDER BY seq DESC`)
	if err != nil {
		return nil, fail("signing keys", err)
	}
	keys, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (signin.SigningKey, error) {
		var k signin.SigningKey
		err := row.Scan(&k.KID, &k.Private, &k.CreatedAt)
		k.CreatedAt = utc(k.CreatedAt)
		return k, err
	})
	if err != nil {
		return nil, fail("signing keys", err)
	}
	if keys == nil {
		keys = []signin.SigningKey{}
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
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO signing_keys (kid, private, created_at) VALUES ($1, $2, $3)`,
			k.KID, k.Private, s.orNow(k.CreatedAt)); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `DELETE FROM signing_keys
			WHERE seq NOT IN (SELECT seq FROM signing_keys ORDER BY seq DESC LIMIT $1)`, keep)
		return err
	})
	if err != nil {
		return failIdentity("add signing key "+k.KID, err)
	}
	return nil
}

// ServerSecret returns the 32-byte HMAC secret, created at random and stored on the first
// call. Concurrent first calls, on any number of instances, all return the one that was
// stored (INSERT ... ON CONFLICT DO NOTHING, then the row as it is).
func (s *Store) ServerSecret(ctx context.Context) ([]byte, error) {
	var secret []byte
	err := s.pool.QueryRow(ctx, `SELECT secret FROM server_secret WHERE id = 1`).Scan(&secret)
	if err == nil {
		return secret, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return nil, fail("server secret", err)
	}
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		return nil, fail("server secret", err)
	}
	if _, err := s.pool.Exec(ctx, `INSERT INTO server_secret (id, secret, created_at) VALUES (1, $1, $2)
		ON CONFLICT (id) DO NOTHING`, fresh, s.now()); err != nil {
		return nil, fail("server secret", err)
	}
	// Another call may have stored one first: it is kept, and returned.
	if err := s.pool.QueryRow(ctx, `SELECT secret FROM server_secret WHERE id = 1`).Scan(&secret); err != nil {
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
	uris, err := jsonText(a.RedirectURIs)
	if err != nil {
		return fmt.Errorf("create app %s: %w", a.ClientID, err)
	}
	scopes, err := jsonText(a.Scopes)
	if err != nil {
		return fmt.Errorf("create app %s: %w", a.ClientID, err)
	}
	var secretHash []byte // NULL when empty
	if len(a.SecretHash) != 0 {
		secretHash = a.SecretHash
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO apps (`+appColumns+`) VALUES ($1, $2, $3::jsonb, $4, $5::jsonb, $6, $7)`,
		a.ClientID, a.Name, uris, a.FirstParty, scopes, secretHash, s.orNow(a.CreatedAt))
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
	a, err := scanApp(s.pool.QueryRow(ctx, `SELECT `+appColumns+` FROM apps WHERE client_id = $1`, clientID))
	if errors.Is(err, pgx.ErrNoRows) {
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
	rows, err := s.pool.Query(ctx, `SELECT `+appColumns+` FROM apps ORDER BY created_at, seq`)
	if err != nil {
		return nil, fail("apps", err)
	}
	apps, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (signin.App, error) { return scanApp(row) })
	if err != nil {
		return nil, fail("apps", err)
	}
	if apps == nil {
		apps = []signin.App{}
	}
	return apps, nil
}

// scanApp reads an apps row selected with appColumns.
func scanApp(row pgx.Row) (signin.App, error) {
	var (
		a            signin.App
		uris, scopes []byte
		secretHash   []byte
	)
	if err := row.Scan(&a.ClientID, &a.Name, &uris, &a.FirstParty, &scopes, &secretHash, &a.CreatedAt); err != nil {
		return signin.App{}, err
	}
	var err error
	if a.RedirectURIs, err = unmarshalList(uris, "app "+a.ClientID+": redirect_uris"); err != nil {
		return signin.App{}, err
	}
	if a.Scopes, err = unmarshalList(scopes, "app "+a.ClientID+": scopes"); err != nil {
		return signin.App{}, err
	}
	if len(secretHash) != 0 {
		a.SecretHash = secretHash
	}
	a.CreatedAt = utc(a.CreatedAt)
	return a, nil
}

// ---- Sessions

// CreateSession stores a session: only the hash of its token. In the same transaction, which
// holds the user's row lock, it deletes the user's other sessions that are expired, and the
// oldest beyond signin.MaxSessionsPerUser. identity.ErrConflict when the hash is taken,
// identity.ErrNotFound when the user does not exist. A zero CreatedAt is set to now.
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
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if err := lockUser(ctx, tx, se.UserID); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO sessions (hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)`,
			se.Hash[:], se.UserID, se.CreatedAt, se.ExpiresAt); err != nil {
			return err
		}
		// The user's expired sessions, and the oldest beyond the bound, go.
		_, err := tx.Exec(ctx, `DELETE FROM sessions WHERE user_id = $1 AND hash <> $2 AND (expires_at <= $3 OR hash IN (
			SELECT hash FROM sessions WHERE user_id = $1 ORDER BY created_at DESC, hash DESC OFFSET $4))`,
			se.UserID, se.Hash[:], s.now(), signin.MaxSessionsPerUser)
		return err
	})
	if err != nil {
		return failIdentity("create session", err)
	}
	return nil
}

// SessionByHash returns the session, expired ones too, or identity.ErrNotFound.
func (s *Store) SessionByHash(ctx context.Context, hash [32]byte) (signin.Session, error) {
	se := signin.Session{Hash: hash}
	err := s.pool.QueryRow(ctx, `SELECT user_id, created_at, expires_at FROM sessions WHERE hash = $1`, hash[:]).
		Scan(&se.UserID, &se.CreatedAt, &se.ExpiresAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return signin.Session{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Session{}, fail("session", err)
	}
	se.CreatedAt, se.ExpiresAt = utc(se.CreatedAt), utc(se.ExpiresAt)
	return se, nil
}

// DeleteSession deletes the session; deleting a missing one is not an error.
func (s *Store) DeleteSession(ctx context.Context, hash [32]byte) error {
	if _, err := s.pool.Exec(ctx, `DELETE FROM sessions WHERE hash = $1`, hash[:]); err != nil {
		return fail("delete session", err)
	}
	return nil
}

// ---- Consents

// consentColumns are the columns scanConsent reads.
const consentColumns = `user_id, client, scopes, created_at, revoked_at`

// ConsentFor returns the user's consent for client, revoked ones too, or identity.ErrNotFound.
func (s *Store) ConsentFor(ctx context.Context, userID, client string) (signin.Consent, error) {
	c, err := scanConsent(s.pool.QueryRow(ctx, `SELECT `+consentColumns+` FROM consents
		WHERE user_id = $1 AND client = $2`, userID, client))
	if errors.Is(err, pgx.ErrNoRows) {
		return signin.Consent{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Consent{}, fail("consent of user "+userID, err)
	}
	return c, nil
}

// SaveConsent stores c, replacing any consent of the same user and client, a revoked one
// included, in one statement. The stored consent is live: c.RevokedAt is ignored
// (RevokeConsent revokes). A zero CreatedAt is set to now. identity.ErrNotFound when the user
// does not exist.
func (s *Store) SaveConsent(ctx context.Context, c signin.Consent) error {
	if c.UserID == "" || c.Client == "" {
		return errors.New("save consent: user id and client are required")
	}
	scopes, err := jsonText(c.Scopes)
	if err != nil {
		return fmt.Errorf("save consent of user %s: %w", c.UserID, err)
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO consents (user_id, client, scopes, created_at, revoked_at)
		VALUES ($1, $2, $3::jsonb, $4, NULL)
		ON CONFLICT (user_id, client) DO UPDATE
		SET scopes = excluded.scopes, created_at = excluded.created_at, revoked_at = NULL`,
		c.UserID, c.Client, scopes, s.orNow(c.CreatedAt))
	switch {
	case isForeignKeyViolation(err):
		return fmt.Errorf("save consent: user %s: %w", c.UserID, identity.ErrNotFound)
	case err != nil:
		return fail("save consent of user "+c.UserID, err)
	}
	return nil
}

// RevokeConsent marks the user's live consent for client revoked at at (a conditional UPDATE)
// and revokes every refresh token of that user and client (already revoked ones keep their
// time), in one transaction. identity.ErrNotFound when there is no live consent; then nothing
// changes.
func (s *Store) RevokeConsent(ctx context.Context, userID, client string, at time.Time) error {
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE consents SET revoked_at = $1
			WHERE user_id = $2 AND client = $3 AND revoked_at IS NULL`, at, userID, client)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return identity.ErrNotFound
		}
		return revokeRefresh(ctx, tx, `user_id = $2 AND client_id = $3`, at, userID, client)
	})
	if err != nil {
		return failIdentity("revoke consent of user "+userID, err)
	}
	return nil
}

// ConsentsByUser lists the user's live (not revoked) consents, newest first.
func (s *Store) ConsentsByUser(ctx context.Context, userID string) ([]signin.Consent, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+consentColumns+` FROM consents
		WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at DESC, client COLLATE "C"`, userID)
	if err != nil {
		return nil, fail("consents of user "+userID, err)
	}
	consents, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (signin.Consent, error) { return scanConsent(row) })
	if err != nil {
		return nil, fail("consents of user "+userID, err)
	}
	if consents == nil {
		consents = []signin.Consent{}
	}
	return consents, nil
}

// scanConsent reads a consents row selected with consentColumns.
func scanConsent(row pgx.Row) (signin.Consent, error) {
	var (
		c      signin.Consent
		scopes []byte
	)
	if err := row.Scan(&c.UserID, &c.Client, &scopes, &c.CreatedAt, &c.RevokedAt); err != nil {
		return signin.Consent{}, err
	}
	var err error
	if c.Scopes, err = unmarshalList(scopes, "consent of user "+c.UserID+": scopes"); err != nil {
		return signin.Consent{}, err
	}
	c.CreatedAt = utc(c.CreatedAt)
	c.RevokedAt = utcPtr(c.RevokedAt)
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
	scopes, err := jsonText(c.Scopes)
	if err != nil {
		return fmt.Errorf("create code: %w", err)
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO auth_codes (`+codeColumns+`) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)`,
		c.Hash[:], c.ClientID, c.UserID, c.RedirectURI, scopes, c.Challenge,
		s.orNow(c.CreatedAt), c.ExpiresAt, c.UsedAt)
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

// RedeemCode marks the code used at at and returns it, in one conditional statement (UPDATE
// ... WHERE used_at IS NULL RETURNING): of concurrent calls with one code, on any number of
// instances, exactly one marks it. A code used before: the code (with the time it was first
// used, read after the UPDATE found it used, so after the winner committed) and
// signin.ErrCodeUsed. An unknown code: identity.ErrNotFound. An expired code is marked used
// too: expiry, client and redirect URI are the caller's to check.
func (s *Store) RedeemCode(ctx context.Context, hash [32]byte, at time.Time) (signin.Code, error) {
	c, err := scanCode(s.pool.QueryRow(ctx, `UPDATE auth_codes SET used_at = $1
		WHERE hash = $2 AND used_at IS NULL RETURNING `+codeColumns, at, hash[:]))
	if err == nil {
		return c, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return signin.Code{}, fail("redeem code", err)
	}
	// Not marked: unknown, or used before.
	c, err = scanCode(s.pool.QueryRow(ctx, `SELECT `+codeColumns+` FROM auth_codes WHERE hash = $1`, hash[:]))
	if errors.Is(err, pgx.ErrNoRows) {
		return signin.Code{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Code{}, fail("redeem code", err)
	}
	return c, signin.ErrCodeUsed
}

// scanCode reads an auth_codes row selected with codeColumns.
func scanCode(row pgx.Row) (signin.Code, error) {
	var (
		c            signin.Code
		hash, scopes []byte
	)
	if err := row.Scan(&hash, &c.ClientID, &c.UserID, &c.RedirectURI, &scopes, &c.Challenge,
		&c.CreatedAt, &c.ExpiresAt, &c.UsedAt); err != nil {
		return signin.Code{}, err
	}
	h, err := hash32(hash, "auth_codes.hash")
	if err != nil {
		return signin.Code{}, err
	}
	c.Hash = h
	if c.Scopes, err = unmarshalList(scopes, "code: scopes"); err != nil {
		return signin.Code{}, err
	}
	c.CreatedAt, c.ExpiresAt = utc(c.CreatedAt), utc(c.ExpiresAt)
	c.UsedAt = utcPtr(c.UsedAt)
	return c, nil
}

// ---- Refresh tokens

// refreshColumns are the columns scanRefresh reads.
const refreshColumns = `hash, family, user_id, client_id, scopes, origin, created_at, expires_at,
	rotated_at, successor, revoked_at`

// familyLock is the advisory lock key of a refresh token family: CreateRefresh holds it to
// tell a new family from an existing one.
const familyLock = `hashtextextended('llmgw refresh family ' || $1, 0)`

// CreateRefresh stores a new refresh token, the first of a new family: only its hash.
// identity.ErrConflict when the hash is taken or the family has tokens already (a family only
// grows by RotateRefresh), identity.ErrNotFound when the user does not exist. A zero CreatedAt
// is set to now. The token is stored live: RotatedAt, Successor and RevokedAt are ignored. In
// the same transaction, which holds the user's row lock, the user's live families (newest
// token not revoked and not expired at CreatedAt) beyond signin.MaxFamiliesPerUser - 1 are
// revoked at CreatedAt, least recently used (newest token made longest ago) first.
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
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if err := lockUser(ctx, tx, t.UserID); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(`+familyLock+`)`, t.Family); err != nil {
			return err
		}
		var exists bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM refresh_tokens WHERE family = $1)`, t.Family).Scan(&exists); err != nil {
			return err
		}
		if exists {
			return fmt.Errorf("create refresh token: family %s exists: %w", t.Family, identity.ErrConflict)
		}
		// The user's live families beyond the bound, the new one counted, are revoked: those
		// whose newest token was made longest ago (the least recently used) first.
		if err := revokeRefresh(ctx, tx, `family IN (
				SELECT family FROM refresh_tokens
				WHERE user_id = $2 AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > $1
				ORDER BY created_at DESC, hash DESC OFFSET $3)`,
			t.CreatedAt, t.UserID, signin.MaxFamiliesPerUser-1); err != nil {
			return err
		}
		return insertRefresh(ctx, tx, t)
	})
	if err != nil {
		return failIdentity("create refresh token", err)
	}
	return nil
}

// insertRefresh inserts t as a live token.
func insertRefresh(ctx context.Context, tx pgx.Tx, t signin.Refresh) error {
	scopes, err := jsonText(t.Scopes)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `INSERT INTO refresh_tokens
		(hash, family, user_id, client_id, scopes, origin, created_at, expires_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)`,
		t.Hash[:], t.Family, t.UserID, t.ClientID, scopes, nullable(t.Origin), t.CreatedAt, t.ExpiresAt)
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("refresh token: user %s: %w", t.UserID, identity.ErrNotFound)
	}
	return err
}

// revokeRefresh revokes at $1, with tx, the refresh tokens matching where (whose other
// parameters are args, from $2) that are not revoked yet. A revocation takes whole families,
// and a rotation committed while the UPDATE ran adds a successor its snapshot did not see: so
// the UPDATE is repeated until it revokes nothing more. Every token it revoked stays locked
// until tx ends, so that a rotation can only extend a family by a token the next round sees.
func revokeRefresh(ctx context.Context, tx pgx.Tx, where string, at time.Time, args ...any) error {
	for {
		tag, err := tx.Exec(ctx, `UPDATE refresh_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND `+where,
			append([]any{at}, args...)...)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return nil
		}
	}
}

// RotateRefresh rotates the live token oldHash to next in one transaction that first locks the
// old token's row (SELECT ... FOR UPDATE): of any number of calls with one token, on any
// number of instances, one decides at a time, seeing what the previous ones committed.
// next.Family, UserID, ClientID, Scopes and Origin are taken from the old token; next.CreatedAt
// (at when zero) and ExpiresAt (required) from next. It returns the old token as it was before
// the call (the zero Refresh when unknown) and the outcome, decided in this order:
//   - revoked: signin.ErrRefreshDead.
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
	now := at.UTC().Truncate(time.Microsecond) // as stored
	var (
		old     signin.Refresh
		outcome signin.RotateOutcome
		verdict error
	)
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		outcome, verdict = 0, nil
		var err error
		old, err = scanRefresh(tx.QueryRow(ctx, `SELECT `+refreshColumns+` FROM refresh_tokens WHERE hash = $1 FOR UPDATE`, oldHash[:]))
		if errors.Is(err, pgx.ErrNoRows) {
			return identity.ErrNotFound
		}
		if err != nil {
			return err
		}
		switch {
		case old.RevokedAt != nil:
			verdict = signin.ErrRefreshDead
			return nil
		case old.RotatedAt != nil:
			if !old.RotatedAt.Before(now.Add(-grace).Truncate(time.Microsecond)) {
				var live bool
				err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM refresh_tokens
					WHERE hash = $1 AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > $2)`,
					old.Successor[:], now).Scan(&live)
				if err != nil {
					return err
				}
				if live {
					outcome = signin.Replayed
					return nil
				}
			}
			// Reuse: whoever holds the family's live token may not be its owner. The revocation
			// is committed with the verdict.
			if err := revokeRefresh(ctx, tx, `family = $2`, now, old.Family); err != nil {
				return err
			}
			verdict = signin.ErrRefreshReused
			return nil
		case !old.ExpiresAt.After(now):
			verdict = signin.ErrRefreshDead
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE refresh_tokens SET rotated_at = $1, successor = $2 WHERE hash = $3`,
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
		return signin.Refresh{}, 0, failIdentity("rotate refresh token", err)
	case verdict != nil:
		return old, 0, verdict
	}
	return old, outcome, nil
}

// RefreshByHash returns the token or identity.ErrNotFound.
func (s *Store) RefreshByHash(ctx context.Context, hash [32]byte) (signin.Refresh, error) {
	t, err := scanRefresh(s.pool.QueryRow(ctx, `SELECT `+refreshColumns+` FROM refresh_tokens WHERE hash = $1`, hash[:]))
	if errors.Is(err, pgx.ErrNoRows) {
		return signin.Refresh{}, identity.ErrNotFound
	}
	if err != nil {
		return signin.Refresh{}, fail("refresh token", err)
	}
	return t, nil
}

// RevokeRefreshFamily revokes every token of the family at at, successors committed by
// concurrent rotations included (see revokeRefresh); already revoked ones keep their time. An
// unknown family is not an error.
func (s *Store) RevokeRefreshFamily(ctx context.Context, family string, at time.Time) error {
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		return revokeRefresh(ctx, tx, `family = $2`, at, family)
	})
	if err != nil {
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
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		return revokeRefresh(ctx, tx, `origin = $2`, at, origin)
	})
	if err != nil {
		return fail("revoke refresh tokens by origin", err)
	}
	return nil
}

// scanRefresh reads a refresh_tokens row selected with refreshColumns.
func scanRefresh(row pgx.Row) (signin.Refresh, error) {
	var (
		t                       signin.Refresh
		hash, successor, scopes []byte
		origin                  *string
	)
	if err := row.Scan(&hash, &t.Family, &t.UserID, &t.ClientID, &scopes, &origin, &t.CreatedAt, &t.ExpiresAt,
		&t.RotatedAt, &successor, &t.RevokedAt); err != nil {
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
	if t.Scopes, err = unmarshalList(scopes, "refresh token: scopes"); err != nil {
		return signin.Refresh{}, err
	}
	t.Origin = deref(origin)
	t.CreatedAt, t.ExpiresAt = utc(t.CreatedAt), utc(t.ExpiresAt)
	t.RotatedAt, t.RevokedAt = utcPtr(t.RotatedAt), utcPtr(t.RevokedAt)
	return t, nil
}

// ---- Sweeping

// sweepChunk bounds the rows (sessions, codes) or refresh token families one statement of
// Sweep deletes, so that no statement holds many locks long.
const sweepChunk = 1000

// Sweep deletes, as of now: the expired sessions; the authorization codes expired at least
// signin.SweepRetention ago; and every token of the refresh families whose newest token
// expired, or that were revoked, at least signin.SweepRetention ago. A family whose newest
// token is live keeps all its tokens (a rotated one presented again still revokes it). Rows go
// in chunks of sweepChunk, each in its own statement; instances sweeping at once delete each
// row once between them (and each counts what it deleted).
func (s *Store) Sweep(ctx context.Context, now time.Time) (signin.Swept, error) {
	var out signin.Swept
	cutoff := now.Add(-signin.SweepRetention)
	chunks := func(n *int64, query string, args ...any) error {
		for {
			tag, err := s.pool.Exec(ctx, query, args...)
			if err != nil {
				return err
			}
			*n += tag.RowsAffected()
			if tag.RowsAffected() == 0 {
				return nil
			}
		}
	}
	if err := chunks(&out.Sessions, `DELETE FROM sessions WHERE hash IN (
		SELECT hash FROM sessions WHERE expires_at <= $1 LIMIT $2)`, now, sweepChunk); err != nil {
		return out, fail("sweep sessions", err)
	}
	if err := chunks(&out.Codes, `DELETE FROM auth_codes WHERE hash IN (
		SELECT hash FROM auth_codes WHERE expires_at <= $1 LIMIT $2)`, cutoff, sweepChunk); err != nil {
		return out, fail("sweep authorization codes", err)
	}
	// A family died when its newest (unrotated) token expired or it was revoked (revocations
	// take whole families); rotated tokens that are not revoked count for nothing. A dead
	// family never comes back.
	if err := chunks(&out.RefreshTokens, `DELETE FROM refresh_tokens WHERE family IN (
		SELECT family FROM refresh_tokens GROUP BY family
		HAVING max(CASE WHEN revoked_at IS NOT NULL THEN revoked_at WHEN rotated_at IS NULL THEN expires_at
			ELSE '-infinity'::timestamptz END) <= $1
		LIMIT $2)`, cutoff, sweepChunk); err != nil {
		return out, fail("sweep refresh tokens", err)
	}
	return out, nil
}

// ---- External subjects

// UserForSubject returns the user id linked to the issuer's subject, or identity.ErrNotFound.
func (s *Store) UserForSubject(ctx context.Context, issuer, subject string) (string, error) {
	var userID string
	err := s.pool.QueryRow(ctx, `SELECT user_id FROM external_subjects WHERE issuer = $1 AND subject = $2`,
		issuer, subject).Scan(&userID)
	if errors.Is(err, pgx.ErrNoRows) {
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
	_, err := s.pool.Exec(ctx, `INSERT INTO external_subjects (issuer, subject, user_id, created_at)
		VALUES ($1, $2, $3, $4)`, issuer, subject, userID, s.now())
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
