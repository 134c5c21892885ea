package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite" // also registers the "sqlite" database/sql driver
)

const (
	benchModel  = "mock-small"
	keyPrefix   = "sk_live" // the gateway's default key_prefix
	benchUserID = "usr_llmbench"
	// benchCredits is far more than any run can spend (the model costs 1 and 2 credits per
	// million tokens).
	benchCredits = 1_000_000 * credits.Credit
)

// benchScopes are the scopes of every key the benchmark creates.
var benchScopes = []string{identity.ScopeChatWrite, identity.ScopeModelsRead}

// seedBase creates the gateway's SQLite file at path through the store package: the schema, one
// user with plenty of credits and one API key, whose full value it returns.
func seedBase(ctx context.Context, path string) (string, error) {
	s, err := sqlite.Open(ctx, path, sqlite.Options{})
	if err != nil {
		return "", err
	}
	defer s.Close()
	key, err := seedStore(ctx, s)
	if err != nil {
		return "", err
	}
	return key, s.Close()
}

// seedable is what seeding needs of a store (the SQLite and the PostgreSQL one).
type seedable interface {
	CreateUser(ctx context.Context, u identity.User) error
	Credit(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, error)
	CreateKey(ctx context.Context, k identity.Key) error
}

// seedStore creates in s the bench user with plenty of credits and one API key, whose full
// value it returns.
func seedStore(ctx context.Context, s seedable) (string, error) {
	now := time.Now().UTC()
	u := identity.User{ID: benchUserID, Email: "llmbench@example.com", CreatedAt: now}
	if err := s.CreateUser(ctx, u); err != nil {
		return "", fmt.Errorf("create user: %w", err)
	}
	if _, _, err := s.Credit(ctx, credits.UserAccount(u.ID), benchCredits, "llmbench credits", ""); err != nil {
		return "", fmt.Errorf("credit: %w", err)
	}
	nk, err := identity.NewKey(keyPrefix)
	if err != nil {
		return "", err
	}
	k := identity.Key{ID: nk.ID, UserID: u.ID, Prefix: nk.Prefix, Hash: nk.Hash, Name: "llmbench",
		Scopes: benchScopes, CreatedAt: now}
	if err := s.CreateKey(ctx, k); err != nil {
		return "", fmt.Errorf("create key: %w", err)
	}
	return nk.Full, nil
}

// addKeys adds n API keys of the benchmark user to the store file at path, made like the store
// makes them (identity.NewKey, the store's api_keys columns and JSON encodings) but inserted in
// one transaction: one store.CreateKey per key is a transaction each (about 0.75 ms here, over a
// minute for 100k). It returns the full values of the first keep keys. The file must not be in
// use by a gateway.
func addKeys(ctx context.Context, path string, n, keep int) ([]string, error) {
	db, err := sql.Open("sqlite", path)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, `PRAGMA busy_timeout = 5000`); err != nil {
		return nil, err
	}
	if _, err := db.ExecContext(ctx, `PRAGMA foreign_keys = on`); err != nil {
		return nil, err
	}
	scopes, _ := json.Marshal(benchScopes)
	null, _ := json.Marshal([]string(nil)) // what the store writes for absent lists and maps
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO api_keys
		(id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap, models,
		 created_at, expires_at, revoked_at, last_used_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', 0, ?, ?, NULL, NULL, NULL)`)
	if err != nil {
		return nil, err
	}
	defer stmt.Close()
	var full []string
	created := time.Now().UTC().UnixMicro()
	for i := 0; i < n; i++ {
		if i%1000 == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		nk, err := identity.NewKey(keyPrefix)
		if err != nil {
			return nil, err
		}
		if _, err := stmt.ExecContext(ctx, nk.ID, benchUserID, nk.Prefix, nk.Hash[:], fmt.Sprintf("filler %d", i),
			string(scopes), string(null), string(null), string(null), created+int64(i)); err != nil {
			return nil, fmt.Errorf("insert key %d: %w", i, err)
		}
		if i < keep {
			full = append(full, nk.Full)
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	var count int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM api_keys`).Scan(&count); err != nil {
		return nil, err
	}
	if _, err := db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return nil, err
	}
	logln(fmt.Sprintf("store %s: %d keys", path, count))
	return full, nil
}

// copyDB copies a closed SQLite file, and its -wal file if one was left, to a new path.
func copyDB(src, dst string) error {
	if err := copyFile(src, dst); err != nil {
		return err
	}
	if _, err := os.Stat(src + "-wal"); err == nil {
		return copyFile(src+"-wal", dst+"-wal")
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
