package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

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
// count and the insert are one transaction holding the user's row lock, so that creations at
// once, on any number of instances, never pass the bound.
func (s *Store) CreateKeyWithin(ctx context.Context, k identity.Key, maxLive int) error {
	if err := checkNewKey(k); err != nil {
		return err
	}
	k.ChainID = k.ID
	k.CreatedAt = s.orNow(k.CreatedAt)
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if maxLive > 0 {
			if err := lockUser(ctx, tx, k.UserID); err != nil {
				return err
			}
			var n int
			err := tx.QueryRow(ctx, `SELECT count(*) FROM api_keys
				WHERE user_id = $1 AND revoked_at IS NULL AND rotated_to IS NULL AND (expires_at IS NULL OR expires_at > $2)`,
				k.UserID, k.CreatedAt).Scan(&n)
			if err != nil {
				return err
			}
			if n >= maxLive {
				return identity.ErrKeyLimit
			}
		}
		return insertKey(ctx, tx, k)
	})
	switch {
	case errors.Is(err, identity.ErrKeyLimit):
		return fmt.Errorf("create key %s: user %s has %d live keys: %w", k.ID, k.UserID, maxLive, err)
	case err != nil:
		return failIdentity("create key "+k.ID, err)
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

// insertKey inserts k, checked by checkNewKey and with its ChainID and CreatedAt set, with tx.
func insertKey(ctx context.Context, tx pgx.Tx, k identity.Key) error {
	var lists [4]string
	for i, v := range []any{k.Scopes, k.AllowedIPs, k.Metadata, k.Models} {
		b, err := jsonText(v)
		if err != nil {
			return fmt.Errorf("create key %s: %w", k.ID, err)
		}
		lists[i] = b
	}
	_, err := tx.Exec(ctx, `INSERT INTO api_keys
		(id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap, models,
		 created_at, expires_at, revoked_at, last_used_at, credit_cap_period, chain_id)
		VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb, $9, $10, $11::jsonb, $12, $13, $14, $15, $16, $17)`,
		k.ID, k.UserID, k.Prefix, k.Hash[:], k.Name, lists[0], lists[1], lists[2],
		k.Tier, k.CreditCap, lists[3],
		k.CreatedAt, k.ExpiresAt, k.RevokedAt, k.LastUsedAt, k.CreditCapPeriod, k.ChainID)
	switch {
	case isUniqueViolation(err):
		return identity.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("create key %s: user %s: %w", k.ID, k.UserID, identity.ErrNotFound)
	}
	return err
}

// KeyByID returns the key, revoked and expired ones too, or identity.ErrNotFound.
func (s *Store) KeyByID(ctx context.Context, id string) (identity.Key, error) {
	k, err := scanKey(s.pool.QueryRow(ctx, `SELECT `+keyColumns+` FROM api_keys WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return identity.Key{}, identity.ErrNotFound
	}
	if err != nil {
		return identity.Key{}, fail("key "+id, err)
	}
	return k, nil
}

// KeysByUser lists the user's keys, newest first; none for an unknown user.
func (s *Store) KeysByUser(ctx context.Context, userID string) ([]identity.Key, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM api_keys
		WHERE user_id = $1 ORDER BY created_at DESC, id COLLATE "C" DESC`, userID)
	if err != nil {
		return nil, fail("keys of user "+userID, err)
	}
	keys, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (identity.Key, error) { return scanKey(row) })
	if err != nil {
		return nil, fail("keys of user "+userID, err)
	}
	return keys, nil
}

// RevokeKey marks the key revoked at the given time, keeping the first time when it already
// is, in one statement; identity.ErrNotFound when there is no such key.
func (s *Store) RevokeKey(ctx context.Context, id string, at time.Time) error {
	tag, err := s.pool.Exec(ctx, `UPDATE api_keys SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2`, at, id)
	if err != nil {
		return fail("revoke key "+id, err)
	}
	if tag.RowsAffected() == 0 {
		return identity.ErrNotFound
	}
	return nil
}

// RotateKey replaces the key oldID by next in one transaction: the old key is marked rotated
// to next.ID at at by a conditional UPDATE, only if it is not rotated already, revoked or
// expired at at (identity.ErrNotRotatable; identity.ErrNotFound when there is no such key),
// and its expiry is brought forward to graceEnd; the key it replaced, if still in its grace
// period, expires at at; next is inserted in the old key's chain (its ChainID is ignored). It
// reports the ids of the keys whose expiry changed. Rotations of one key at once, on any
// number of instances: the UPDATE that gets the row's lock first wins, the others find the
// key rotated (identity.ErrNotRotatable) and store nothing.
func (s *Store) RotateKey(ctx context.Context, oldID string, next identity.Key, at, graceEnd time.Time) ([]string, error) {
	if err := checkNewKey(next); err != nil {
		return nil, err
	}
	next.CreatedAt = s.orNow(next.CreatedAt)
	var changed []string
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		changed = changed[:0]
		err := tx.QueryRow(ctx, `UPDATE api_keys
			SET rotated_to = $1, deprecated_at = $2,
			    expires_at = CASE WHEN expires_at IS NULL OR expires_at > $3 THEN $3 ELSE expires_at END
			WHERE id = $4 AND rotated_to IS NULL AND revoked_at IS NULL
			  AND (expires_at IS NULL OR expires_at > $2)
			RETURNING chain_id`, next.ID, at, graceEnd, oldID).Scan(&next.ChainID)
		if errors.Is(err, pgx.ErrNoRows) {
			var one int
			err := tx.QueryRow(ctx, `SELECT 1 FROM api_keys WHERE id = $1`, oldID).Scan(&one)
			if errors.Is(err, pgx.ErrNoRows) {
				return identity.ErrNotFound
			}
			if err != nil {
				return err
			}
			return identity.ErrNotRotatable
		}
		if err != nil {
			return err
		}
		changed = append(changed, oldID)
		// The key oldID replaced leaves its grace period now: at most two live keys per chain.
		rows, err := tx.Query(ctx, `UPDATE api_keys SET expires_at = $1
			WHERE rotated_to = $2 AND (expires_at IS NULL OR expires_at > $1) RETURNING id`, at, oldID)
		if err != nil {
			return err
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		changed = append(changed, ids...)
		return insertKey(ctx, tx, next)
	})
	if err != nil {
		return nil, failIdentity("rotate key "+oldID, err)
	}
	return changed, nil
}

// TouchKeys records the last use times of several keys in one transaction, in the order of
// their ids (so that instances touching the same keys at once never wait on each other in a
// cycle). A time earlier than the one recorded is ignored, so that batches written out of
// order, by any instance, never move last_used_at back; unknown keys are ignored.
func (s *Store) TouchKeys(ctx context.Context, used map[string]time.Time) error {
	if len(used) == 0 {
		return nil
	}
	ids := make([]string, 0, len(used))
	for id := range used {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		batch := &pgx.Batch{}
		for _, id := range ids {
			batch.Queue(`UPDATE api_keys SET last_used_at = $1
				WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)`, used[id], id)
		}
		return tx.SendBatch(ctx, batch).Close()
	})
	if err != nil {
		return fail(fmt.Sprintf("touch %d keys", len(used)), err)
	}
	return nil
}

// ChainSpent is what the keys of a rotation chain (identity.Key.ChainID) spent since the
// given time: the sum of the settle entries that name one of them.
func (s *Store) ChainSpent(ctx context.Context, chainID string, since time.Time) (credits.Amount, error) {
	var spent credits.Amount
	err := s.pool.QueryRow(ctx, `SELECT coalesce(sum(amount), 0)::bigint FROM ledger
		WHERE key_id IN (SELECT id FROM api_keys WHERE chain_id = $1) AND created_at >= $2 AND kind = 'settle'`,
		chainID, since).Scan(&spent)
	if err != nil {
		return 0, fail("spending of key chain "+chainID, err)
	}
	return spent, nil
}

// scanKey reads an api_keys row selected with keyColumns.
func scanKey(row pgx.Row) (identity.Key, error) {
	var (
		k                                identity.Key
		hash                             []byte
		scopes, allowedIPs, meta, models []byte
		rotatedTo                        *string
	)
	err := row.Scan(&k.ID, &k.UserID, &k.Prefix, &hash, &k.Name, &scopes, &allowedIPs, &meta, &k.Tier,
		&k.CreditCap, &models, &k.CreatedAt, &k.ExpiresAt, &k.RevokedAt, &k.LastUsedAt, &k.CreditCapPeriod, &rotatedTo,
		&k.DeprecatedAt, &k.ChainID)
	if err != nil {
		return identity.Key{}, err
	}
	if len(hash) != len(k.Hash) {
		return identity.Key{}, fmt.Errorf("key %s: stored hash has %d bytes", k.ID, len(hash))
	}
	copy(k.Hash[:], hash)
	for _, f := range []struct {
		column string
		text   []byte
		dest   any
	}{
		{"scopes", scopes, &k.Scopes},
		{"allowed_ips", allowedIPs, &k.AllowedIPs},
		{"metadata", meta, &k.Metadata},
		{"models", models, &k.Models},
	} {
		if err := json.Unmarshal(f.text, f.dest); err != nil {
			return identity.Key{}, fmt.Errorf("key %s: %s: %w", k.ID, f.column, err)
		}
	}
	k.CreatedAt = utc(k.CreatedAt)
	k.ExpiresAt = utcPtr(k.ExpiresAt)
	k.RevokedAt = utcPtr(k.RevokedAt)
	k.LastUsedAt = utcPtr(k.LastUsedAt)
	k.DeprecatedAt = utcPtr(k.DeprecatedAt)
	k.RotatedTo = deref(rotatedTo)
	return k, nil
}
