package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/migrate"
)

// migrationFiles are the schema changes, named <version>_<what>.sql with versions counting
// from 1 without gaps. A released file never changes: a new change is a new file.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrateSchema applies, in order, each migration the database has not recorded in
// schema_migrations, each in its own transaction together with its record, so that a failed
// migration leaves nothing of itself behind and concurrent openers apply it once.
func migrateSchema(ctx context.Context, db *sql.DB, now time.Time) error {
	ms, err := migrate.Load(migrationFiles, "migrations")
	if err != nil {
		return err
	}
	if err := migrate.Apply(ctx, dialect{db: db, now: now}, ms); err != nil {
		return fmt.Errorf("migrating: %w", err)
	}
	return nil
}

// dialect is SQLite's way of migrating: each migration in its own transaction, which the
// writer begins IMMEDIATE (taking the file's write lock at once, so no lock of its own).
type dialect struct {
	db  *sql.DB
	now time.Time
}

func (d dialect) OneTransaction() bool { return false }

func (d dialect) Begin(ctx context.Context) (migrate.Tx, error) {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fail("beginning", err)
	}
	return migrationTx{tx: tx, now: d.now}, nil
}

// migrationTx is one transaction of a migration.
type migrationTx struct {
	tx  *sql.Tx
	now time.Time
}

func (t migrationTx) Lock(context.Context) error { return nil }

func (t migrationTx) CreateTable(ctx context.Context) error {
	_, err := t.tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER NOT NULL PRIMARY KEY,
		name       TEXT    NOT NULL,
		applied_at INTEGER NOT NULL
	) STRICT`)
	if err != nil {
		return fail("creating", err)
	}
	return nil
}

func (t migrationTx) Latest(ctx context.Context) (int, error) {
	var latest int
	err := t.tx.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&latest)
	if err != nil {
		return 0, fail("reading", err)
	}
	return latest, nil
}

func (t migrationTx) Exec(ctx context.Context, sql string) error {
	_, err := t.tx.ExecContext(ctx, sql)
	return err
}

func (t migrationTx) Record(ctx context.Context, m migrate.Migration) error {
	_, err := t.tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
		m.Version, m.Name, micros(t.now))
	return err
}

func (t migrationTx) Commit(context.Context) error   { return t.tx.Commit() }
func (t migrationTx) Rollback(context.Context) error { return t.tx.Rollback() }
