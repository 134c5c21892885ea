// Package migrate applies a store's schema migrations, the same way for every SQL dialect the
// gateway stores in (store/sqlite, store/postgres): it loads <version>_<what>.sql files from
// an fs.FS, checks that their versions count from 1 without gaps, and applies, in order, those
// a database has not recorded in its schema_migrations table, each together with its record.
// What differs between dialects (how to lock out other openers, how a transaction runs a
// statement, how a migration is recorded) is a Dialect.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
)

// Migration is one schema change. A released file never changes: a new change is a new file.
type Migration struct {
	// Version counts from 1, without gaps.
	Version int
	// Name is the file's name without ".sql", such as "0001_init".
	Name string
	// SQL is the file's content: one or more statements.
	SQL string
}

// Load reads the migrations dir/*.sql of files in version order. A file whose name is not
// <version>_<what>.sql, two files of one version, or a gap in the versions is an error; files
// of other extensions are ignored.
func Load(files fs.FS, dir string) ([]Migration, error) {
	names, err := fs.Glob(files, path.Join(dir, "*.sql"))
	if err != nil {
		return nil, err
	}
	var ms []Migration
	for _, name := range names {
		base := path.Base(name)
		num, _, ok := strings.Cut(base, "_")
		version, err := strconv.Atoi(num)
		if !ok || err != nil || version <= 0 {
			return nil, fmt.Errorf("migration %s: name is not <version>_<what>.sql", base)
		}
		body, err := fs.ReadFile(files, name)
		if err != nil {
			return nil, fmt.Errorf("migration %s: %w", base, err)
		}
		ms = append(ms, Migration{Version: version, Name: strings.TrimSuffix(base, ".sql"), SQL: string(body)})
	}
	slices.SortFunc(ms, func(a, b Migration) int { return a.Version - b.Version })
	for i, m := range ms {
		if m.Version != i+1 {
			return nil, fmt.Errorf("migration %s: expected version %d", m.Name, i+1)
		}
	}
	return ms, nil
}

// ErrNewerSchema is what Apply reports for a database that records a version beyond the
// migrations it was given: a later build migrated it, and this one cannot serve it.
var ErrNewerSchema = errors.New("the database schema is newer than this build's")

// Dialect is what Apply needs of a database.
type Dialect interface {
	// Begin starts a transaction.
	Begin(ctx context.Context) (Tx, error)
	// OneTransaction reports whether the pending migrations are applied all in one
	// transaction (PostgreSQL: a failure leaves none of them, and one lock covers them all)
	// rather than each in its own (SQLite: a failure leaves those before it applied).
	OneTransaction() bool
}

// Tx is a transaction of a Dialect. Apply calls Commit or Rollback once.
type Tx interface {
	// Lock keeps every other opener from migrating until the transaction ends, so that
	// openers migrating at once apply each migration once (PostgreSQL: an advisory
	// transaction lock). It may do nothing where a transaction that writes already excludes
	// the others (SQLite's BEGIN IMMEDIATE).
	Lock(ctx context.Context) error
	// CreateTable creates schema_migrations if it does not exist.
	CreateTable(ctx context.Context) error
	// Latest is the highest version schema_migrations records, 0 when it is empty.
	Latest(ctx context.Context) (int, error)
	// Exec runs a migration's statements.
	Exec(ctx context.Context, sql string) error
	// Record records m in schema_migrations as applied.
	Record(ctx context.Context, m Migration) error
	Commit(ctx context.Context) error
	Rollback(ctx context.Context) error
}

// Apply applies, in order, each of ms the database has not recorded, with its record (see
// Dialect.OneTransaction for how transactions group them). It reports ErrNewerSchema when the
// database records a version beyond ms. Each transaction first takes the lock and reads the
// latest version again, so that of several openers at once the first applies a migration
// and the others find it recorded.
func Apply(ctx context.Context, db Dialect, ms []Migration) error {
	if db.OneTransaction() {
		return inTx(ctx, db, func(tx Tx) error {
			latest, err := prepare(ctx, tx, ms)
			if err != nil {
				return err
			}
			for _, m := range ms[latest:] {
				if err := apply(ctx, tx, m); err != nil {
					return err
				}
			}
			return nil
		})
	}
	var latest int
	if err := inTx(ctx, db, func(tx Tx) (err error) {
		latest, err = prepare(ctx, tx, ms)
		return err
	}); err != nil {
		return err
	}
	for _, m := range ms[latest:] {
		if err := inTx(ctx, db, func(tx Tx) error {
			if err := tx.Lock(ctx); err != nil {
				return fmt.Errorf("taking the migration lock: %w", err)
			}
			now, err := tx.Latest(ctx)
			if err != nil {
				return fmt.Errorf("reading schema_migrations: %w", err)
			}
			if now >= m.Version {
				return nil // another opener applied it first
			}
			return apply(ctx, tx, m)
		}); err != nil {
			return err
		}
	}
	return nil
}

// prepare takes the lock, creates schema_migrations and returns the latest version recorded.
func prepare(ctx context.Context, tx Tx, ms []Migration) (int, error) {
	if err := tx.Lock(ctx); err != nil {
		return 0, fmt.Errorf("taking the migration lock: %w", err)
	}
	if err := tx.CreateTable(ctx); err != nil {
		return 0, fmt.Errorf("creating schema_migrations: %w", err)
	}
	latest, err := tx.Latest(ctx)
	if err != nil {
		return 0, fmt.Errorf("reading schema_migrations: %w", err)
	}
	if latest > len(ms) {
		return 0, fmt.Errorf("%w: database schema version %d, this build's %d", ErrNewerSchema, latest, len(ms))
	}
	return latest, nil
}

// apply runs m and records it in tx.
func apply(ctx context.Context, tx Tx, m Migration) error {
	if err := tx.Exec(ctx, m.SQL); err != nil {
		return fmt.Errorf("migration %s: %w", m.Name, err)
	}
	if err := tx.Record(ctx, m); err != nil {
		return fmt.Errorf("migration %s: recording: %w", m.Name, err)
	}
	return nil
}

// inTx runs fn in a transaction of db, committed when fn succeeds and rolled back otherwise.
func inTx(ctx context.Context, db Dialect, fn func(Tx) error) error {
	tx, err := db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("beginning: %w", err)
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback(ctx) // the failure that matters is fn's
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("committing: %w", err)
	}
	return nil
}
