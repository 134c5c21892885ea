package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// keyColumns are the columns scanKey reads.
const keyColumns = `id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap,
	models, created_at, expires_at, revoked_at, last_used_at, credit_cap_period, rotated_to, deprecated_at, chain_id`

// CreateKey stores a new key: only its hash, never the key itself. It reports
// identity.ErrConflict when the id or the hash is taken, and identity.ErrNotFound when its user
// does not exist. A zero CreatedAt is set to now. The key starts a chain of its own: its
// ChainID is its id.
func (s *Store) CreateKey(ctx context.Context, k identity.Key) error {
	return s.CreateKeyWithin(ctx, k, 0)
}

// CreateKeyWithin stores a new key as CreateKey does, unless its user already has maxLive
// keys (maxLive > 0) neither revoked, nor expired at the new key's CreatedAt, nor replaced by
// a rotation (one per rotation chain): then identity.ErrKeyLimit, and nothing is stored. The
// count and the insert are one write transaction, so creations at once never pass the bound.
func (s *Store) CreateKeyWithin(ctx context.Context, k identity.Key, maxLive int) error {
	if err := checkNewKey(k); err != nil {
		return err
	}
	k.ChainID = k.ID
	if k.CreatedAt.IsZero() {
		k.CreatedAt = s.now()
	}
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		if maxLive > 0 {
			var n int
			err := tx.QueryRowContext(ctx, `SELECT count(*) FROM api_keys
				WHERE user_id = ? AND revoked_at IS NULL AND rotated_to IS NULL AND (expires_at IS NULL OR expires_at > ?)`,
				k.UserID, micros(k.CreatedAt)).Scan(&n)
			if err != nil {
				return err
			}
			if n >= maxLive {
				return identity.ErrKeyLimit
			}
		}
		return s.insertKey(ctx, tx, k)
	})
	switch {
	case errors.Is(err, identity.ErrKeyLimit):
		return fmt.Errorf("create key %s: user %s has %d live keys: %w", k.ID, k.UserID, maxLive, err)
	case err != nil:
		return fail("create key "+k.ID, err)
	}
	return nil
}

// checkNewKey refuses a key without id, user or hash.
func checkNewKey(k identity.Key) error {
	if k.ID == "" || k.UserID == "" {
		return errors.New("create key: id and user id are required")
	}
	if k.Hash == ([32]byte{}) {
		return fmt.Errorf("create key %s: missing hash", k.ID)
	}
	return nil
}

// insertKey inserts k, checked by checkNewKey and with its ChainID set, with tx; see CreateKey.
func (s *Store) insertKey(ctx context.Context, tx *sql.Tx, k identity.Key) error {
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
	_, err := tx.ExecContext(ctx, `INSERT INTO api_keys
		(id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap, models,
		 created_at, expires_at, revoked_at, last_used_at, credit_cap_period, chain_id)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		k.ID, k.UserID, k.Prefix, k.Hash[:], k.Name, string(lists[0]), string(lists[1]), string(lists[2]),
		k.Tier, k.CreditCap, string(lists[3]),
		micros(k.CreatedAt), nullMicros(k.ExpiresAt), nullMicros(k.RevokedAt), nullMicros(k.LastUsedAt),
		k.CreditCapPeriod, k.ChainID)
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

// RotateKey replaces the key oldID by next in one write transaction: the old key is marked
// rotated to next.ID at at, only if it is not rotated already, revoked or expired at at
// (identity.ErrNotRotatable; identity.ErrNotFound when there is no such key), and its expiry is
// brought forward to graceEnd; the key it replaced, if still in its grace period, expires at
// at; next is inserted in the old key's chain (its ChainID is ignored). It reports the ids of the keys whose expiry changed. Two rotations of
// one key at once: one wins, the other gets identity.ErrNotRotatable and stores nothing.
func (s *Store) RotateKey(ctx context.Context, oldID string, next identity.Key, at, graceEnd time.Time) ([]string, error) {
	if err := checkNewKey(next); err != nil {
		return nil, err
	}
	var changed []string
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		changed = changed[:0]
		now := micros(at)
		res, err := tx.ExecContext(ctx, `UPDATE api_keys
			SET rotated_to = ?1, deprecated_at = ?2,
			    expires_at = CASE WHEN expires_at IS NULL OR expires_at > ?3 THEN ?3 ELSE expires_at END
			WHERE id = ?4 AND rotated_to IS NULL AND revoked_at IS NULL
			  AND (expires_at IS NULL OR expires_at > ?2)`,
			next.ID, now, micros(graceEnd), oldID)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			var one int
			err := tx.QueryRowContext(ctx, `SELECT 1 FROM api_keys WHERE id = ?`, oldID).Scan(&one)
			if errors.Is(err, sql.ErrNoRows) {
				return identity.ErrNotFound
			}
			if err != nil {
				return err
			}
			return identity.ErrNotRotatable
		}
		changed = append(changed, oldID)
		// The key oldID replaced leaves its grace period now: at most two live keys per chain.
		rows, err := tx.QueryContext(ctx, `UPDATE api_keys SET expires_at = ?1
			WHERE rotated_to = ?2 AND (expires_at IS NULL OR expires_at > ?1) RETURNING id`, now, oldID)
		if err != nil {
			return err
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return err
			}
			changed = append(changed, id)
		}
		if err := rows.Close(); err != nil {
			return err
		}
		if err := tx.QueryRowContext(ctx, `SELECT chain_id FROM api_keys WHERE id = ?`, oldID).Scan(&next.ChainID); err != nil {
			return err
		}
		return s.insertKey(ctx, tx, next)
	})
	switch {
	case errors.Is(err, identity.ErrNotFound), errors.Is(err, identity.ErrConflict):
		return nil, err
	case err != nil:
		return nil, fail("rotate key "+oldID, err)
	}
	return changed, nil
}

// ChainSpent is what the keys of a rotation chain (identity.Key.ChainID) spent since the
// given time: the sum of the settle entries that name one of them, once everything queued
// before the call is committed.
func (s *Store) ChainSpent(ctx context.Context, chainID string, since time.Time) (credits.Amount, error) {
	if err := s.usable(ctx); err != nil {
		return 0, fmt.Errorf("spending of key chain %s: %w", chainID, err)
	}
	if err := s.flush(ctx); err != nil {
		return 0, fmt.Errorf("spending of key chain %s: %w", chainID, err)
	}
	var spent credits.Amount
	err := s.read.QueryRowContext(ctx, `SELECT coalesce(sum(amount), 0) FROM ledger
		WHERE key_id IN (SELECT id FROM api_keys WHERE chain_id = ?) AND created_at >= ? AND kind = 'settle'`,
		chainID, micros(since)).Scan(&spent)
	if err != nil {
		return 0, fail("spending of key chain "+chainID, err)
	}
	return spent, nil
}

// UsageByDay sums the account's settle entries since the given time by UTC day and model,
// newest day first, once everything queued before the call is committed.
func (s *Store) UsageByDay(ctx context.Context, account credits.AccountID, since time.Time) ([]credits.UsageDay, error) {
	if err := s.usable(ctx); err != nil {
		return nil, fmt.Errorf("usage of %s: %w", account, err)
	}
	if err := s.flush(ctx); err != nil {
		return nil, fmt.Errorf("usage of %s: %w", account, err)
	}
	rows, err := s.read.QueryContext(ctx, `SELECT
		strftime('%Y-%m-%d', created_at / 1000000, 'unixepoch') AS day, coalesce(model, ''),
		count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), coalesce(sum(amount), 0)
		FROM ledger WHERE account_id = ? AND kind = 'settle' AND created_at >= ?
		GROUP BY day, coalesce(model, '') ORDER BY day DESC, 2`, account, micros(since))
	if err != nil {
		return nil, fail("usage of "+string(account), err)
	}
	defer rows.Close()
	out := []credits.UsageDay{}
	for rows.Next() {
		var u credits.UsageDay
		if err := rows.Scan(&u.Day, &u.Model, &u.Requests, &u.InputTokens, &u.OutputTokens, &u.Credits); err != nil {
			return nil, fail("usage of "+string(account), err)
		}
		out = append(out, u)
	}
	if err := rows.Err(); err != nil {
		return nil, fail("usage of "+string(account), err)
	}
	return out, nil
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
		deprecatedAt                     sql.NullInt64
		rotatedTo                        sql.NullString
	)
	err := row.Scan(&k.ID, &k.UserID, &k.Prefix, &hash, &k.Name, &scopes, &allowedIPs, &meta, &k.Tier,
		&k.CreditCap, &models, &createdAt, &expiresAt, &revokedAt, &lastUsedAt, &k.CreditCapPeriod, &rotatedTo,
		&deprecatedAt, &k.ChainID)
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
	k.RotatedTo = rotatedTo.String
	k.DeprecatedAt = fromNullMicros(deprecatedAt)
	return k, nil
}
