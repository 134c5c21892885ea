package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// keyColumns are the columns scanKey reads.
const keyColumns = `id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap,
	models, created_at, expires_at, revoked_at, last_used_at`

// CreateKey stores a new key: only its hash, never the key itself. It reports
// identity.ErrConflict when the id or the hash is taken, and identity.ErrNotFound when its user
// does not exist. A zero CreatedAt is set to now.
func (s *Store) CreateKey(ctx context.Context, k identity.Key) error {
	if k.ID == "" || k.UserID == "" {
		return errors.New("create key: id and user id are required")
	}
	if k.Hash == ([32]byte{}) {
		return fmt.Errorf("create key %s: missing hash", k.ID)
	}
	if k.CreatedAt.IsZero() {
		k.CreatedAt = s.now()
	}
	var lists [4][]byte
	for i, v := range []any{k.Scopes, k.AllowedIPs, k.Metadata, k.Models} {
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("create key %s: %w", k.ID, err)
		}
		lists[i] = b
	}
	_, err := s.write.ExecContext(ctx, `INSERT INTO api_keys
		(id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap, models,
		 created_at, expires_at, revoked_at, last_used_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		k.ID, k.UserID, k.Prefix, k.Hash[:], k.Name, string(lists[0]), string(lists[1]), string(lists[2]),
		k.Tier, k.CreditCap, string(lists[3]),
		micros(k.CreatedAt), nullMicros(k.ExpiresAt), nullMicros(k.RevokedAt), nullMicros(k.LastUsedAt))
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("create key %s: user %s: %w", k.ID, k.UserID, identity.ErrNotFound)
	case err != nil:
		return fail("create key "+k.ID, err)
	}
	return nil
}

// KeyByID returns the key, revoked and expired ones too, or identity.ErrNotFound.
func (s *Store) KeyByID(ctx context.Context, id string) (identity.Key, error) {
	k, err := scanKey(s.stmts.keyByID.QueryRowContext(ctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		return identity.Key{}, identity.ErrNotFound
	}
	if err != nil {
		return identity.Key{}, fail("key "+id, err)
	}
	return k, nil
}

// KeysByUser lists the user's keys, newest first; none for an unknown user.
func (s *Store) KeysByUser(ctx context.Context, userID string) ([]identity.Key, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT `+keyColumns+` FROM api_keys
		WHERE user_id = ? ORDER BY created_at DESC, id DESC`, userID)
	if err != nil {
		return nil, fail("keys of user "+userID, err)
	}
	defer rows.Close()
	var keys []identity.Key
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			return nil, fail("keys of user "+userID, err)
		}
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fail("keys of user "+userID, err)
	}
	return keys, nil
}

// RevokeKey marks the key revoked at the given time, keeping the first time when it already
// is; identity.ErrNotFound when there is no such key.
func (s *Store) RevokeKey(ctx context.Context, id string, at time.Time) error {
	res, err := s.write.ExecContext(ctx, `UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?`,
		micros(at), id)
	if err != nil {
		return fail("revoke key "+id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fail("revoke key "+id, err)
	}
	if n == 0 {
		return identity.ErrNotFound
	}
	return nil
}

// TouchKeys records the last use times of several keys in one write transaction. A time
// earlier than the one recorded is ignored, so that batches written out of order never move
// last_used_at back; unknown keys are ignored.
func (s *Store) TouchKeys(ctx context.Context, used map[string]time.Time) error {
	if len(used) == 0 {
		return nil
	}
	ids := make([]string, 0, len(used))
	for id := range used {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.PrepareContext(ctx, `UPDATE api_keys SET last_used_at = ?1
			WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at < ?1)`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for _, id := range ids {
			if _, err := stmt.ExecContext(ctx, micros(used[id]), id); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fail(fmt.Sprintf("touch %d keys", len(used)), err)
	}
	return nil
}

// scanKey reads an api_keys row selected with keyColumns.
func scanKey(row rowScanner) (identity.Key, error) {
	var (
		k                                identity.Key
		hash                             []byte
		scopes, allowedIPs, meta, models string
		createdAt                        int64
		expiresAt, revokedAt, lastUsedAt sql.NullInt64
	)
	err := row.Scan(&k.ID, &k.UserID, &k.Prefix, &hash, &k.Name, &scopes, &allowedIPs, &meta, &k.Tier,
		&k.CreditCap, &models, &createdAt, &expiresAt, &revokedAt, &lastUsedAt)
	if err != nil {
		return identity.Key{}, err
	}
	if len(hash) != len(k.Hash) {
		return identity.Key{}, fmt.Errorf("key %s: stored hash has %d bytes", k.ID, len(hash))
	}
	copy(k.Hash[:], hash)
	for _, f := range []struct {
		column string
		text   string
		dest   any
	}{
		{"scopes", scopes, &k.Scopes},
		{"allowed_ips", allowedIPs, &k.AllowedIPs},
		{"metadata", meta, &k.Metadata},
		{"models", models, &k.Models},
	} {
		if err := json.Unmarshal([]byte(f.text), f.dest); err != nil {
			return identity.Key{}, fmt.Errorf("key %s: %s: %w", k.ID, f.column, err)
		}
	}
	k.CreatedAt = fromMicros(createdAt)
	k.ExpiresAt = fromNullMicros(expiresAt)
	k.RevokedAt = fromNullMicros(revokedAt)
	k.LastUsedAt = fromNullMicros(lastUsedAt)
	return k, nil
}
