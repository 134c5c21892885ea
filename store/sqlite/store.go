// Package sqlite keeps the gateway's users, API keys and credit ledger in one embedded SQLite
// file: the default store of a gateway that runs as a single instance.
//
// The file is opened in WAL mode through two pools. Every write goes through a single
// connection, in BEGIN IMMEDIATE transactions, so writers queue in Go instead of failing with
// SQLITE_BUSY; reads go through several read-only connections and never wait for the writer.
// Money is held only as INTEGER micro-credits and times as unix microseconds.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	driver "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// Interface guards.
var (
	_ credits.Ledger = (*Store)(nil)
	_ identity.Users = (*Store)(nil)
	_ identity.Keys  = (*Store)(nil)
)

// busyTimeout is how long a connection waits for a lock held by another process (a second
// gateway or a CLI on the same file) before it reports the store unavailable.
const busyTimeout = 5 * time.Second

// Options tunes a Store.
type Options struct {
	// Clock tells the time recorded on new reservations, ledger entries, accounts, users and
	// keys; nil means time.Now. Tests inject a fake clock here.
	Clock func() time.Time
}

// Store is a SQLite database holding users, API keys, accounts, open reservations and the
// ledger. It implements credits.Ledger, identity.Users and identity.Keys, and is safe for
// concurrent use.
type Store struct {
	write *sql.DB // one connection: SQLite has one writer
	read  *sql.DB // several query_only connections
	now   func() time.Time
	stmts statements

	closeOnce sync.Once
	closeErr  error
}

// statements are the prepared statements of the hot paths.
type statements struct {
	// on the writer
	accountState      *sql.Stmt
	takeBalance       *sql.Stmt
	insertReservation *sql.Stmt
	closeReservation  *sql.Stmt
	addBalance        *sql.Stmt
	insertSettlement  *sql.Stmt
	// on the readers
	keyByID *sql.Stmt
}

// Open opens (creating it and its folder if needed) the SQLite database at path, brings its
// schema up to date and returns the Store. Close it when done.
func Open(ctx context.Context, path string, opts Options) (*Store, error) {
	if path == "" {
		return nil, errors.New("open sqlite store: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
		return nil, fmt.Errorf("open sqlite store %s: creating folder: %w", abs, err)
	}
	// Create the file ourselves so that it is private: SQLite gives its -wal and -shm files the
	// permissions of the database file.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}

	s := &Store{now: opts.Clock}
	if s.now == nil {
		s.now = time.Now
	}

	s.write, err = sql.Open("sqlite", dataSourceName(abs, url.Values{
		"_busy_timeout": {fmt.Sprint(busyTimeout.Milliseconds())},
		"_journal_mode": {"WAL"},
		"_synchronous":  {"NORMAL"},
		"_foreign_keys": {"on"},
		"_txlock":       {"immediate"},
	}))
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	s.write.SetMaxOpenConns(1)
	s.write.SetMaxIdleConns(1)
	s.write.SetConnMaxLifetime(0)
	s.write.SetConnMaxIdleTime(0)
	if err := s.write.PingContext(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w: %w", abs, credits.ErrStoreUnavailable, err)
	}
	if err := migrate(ctx, s.write, s.now()); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}

	// The readers open the file once it is in WAL mode and migrated.
	s.read, err = sql.Open("sqlite", dataSourceName(abs, url.Values{
		"_busy_timeout": {fmt.Sprint(busyTimeout.Milliseconds())},
		"_foreign_keys": {"on"},
		"_query_only":   {"on"},
	}))
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	readers := max(4, runtime.GOMAXPROCS(0))
	s.read.SetMaxOpenConns(readers)
	s.read.SetMaxIdleConns(readers)
	if err := s.read.PingContext(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w: %w", abs, credits.ErrStoreUnavailable, err)
	}

	if err := s.prepare(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	return s, nil
}

// dataSourceName is the modernc.org/sqlite DSN of the file at abs with the given connection
// parameters. The path is a file: URI so that '?' or '#' in it cannot be taken for parameters.
func dataSourceName(abs string, params url.Values) string {
	p := filepath.ToSlash(abs)
	if p[0] != '/' {
		p = "/" + p // a Windows drive letter
	}
	u := url.URL{Scheme: "file", Path: p, RawQuery: params.Encode()}
	return u.String()
}

func (s *Store) prepare(ctx context.Context) error {
	for _, p := range []struct {
		db   *sql.DB
		stmt **sql.Stmt
		sql  string
	}{
		{s.write, &s.stmts.accountState, `SELECT balance, refill_period FROM accounts WHERE id = ?`},
		{s.write, &s.stmts.takeBalance, `UPDATE accounts SET balance = balance - ?1
			WHERE id = ?2 AND balance >= ?1 RETURNING balance`},
		{s.write, &s.stmts.insertReservation, `INSERT INTO reservations
			(id, account_id, amount, created_at, expires_at) VALUES (?, ?, ?, ?, ?)`},
		{s.write, &s.stmts.closeReservation, `DELETE FROM reservations WHERE id = ?
			RETURNING account_id, amount`},
		{s.write, &s.stmts.addBalance, `UPDATE accounts SET balance = balance + ?1
			WHERE id = ?2 RETURNING balance`},
		{s.write, &s.stmts.insertSettlement, `INSERT INTO ledger
			(account_id, kind, amount, reservation_id, model, backend, input_tokens, output_tokens, created_at)
			VALUES (?, 'settle', ?, ?, ?, ?, ?, ?, ?)`},
		{s.read, &s.stmts.keyByID, `SELECT ` + keyColumns + ` FROM api_keys WHERE id = ?`},
	} {
		stmt, err := p.db.PrepareContext(ctx, p.sql)
		if err != nil {
			return fmt.Errorf("preparing %q: %w: %w", p.sql, credits.ErrStoreUnavailable, err)
		}
		*p.stmt = stmt
	}
	return nil
}

// Close closes the database. Calls after the first return the first one's result; any other
// method called after Close fails with credits.ErrStoreUnavailable.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		for _, stmt := range []*sql.Stmt{
			s.stmts.accountState, s.stmts.takeBalance, s.stmts.insertReservation,
			s.stmts.closeReservation, s.stmts.addBalance, s.stmts.insertSettlement,
			s.stmts.keyByID,
		} {
			if stmt != nil {
				errs = append(errs, stmt.Close())
			}
		}
		// The readers first: the last connection to close checkpoints the WAL into the file.
		if s.read != nil {
			errs = append(errs, s.read.Close())
		}
		if s.write != nil {
			errs = append(errs, s.write.Close())
		}
		if err := errors.Join(errs...); err != nil {
			s.closeErr = fmt.Errorf("close sqlite store: %w", err)
		}
	})
	return s.closeErr
}

// inWriteTx runs fn in one write transaction (BEGIN IMMEDIATE, so it holds the write lock from
// its start) and commits when fn returns nil; it rolls back otherwise.
func (s *Store) inWriteTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// verdicts are the errors that tell the caller something about its request rather than about
// the store; they are returned as they are.
var verdicts = []error{
	credits.ErrInsufficientCredits,
	credits.ErrReservationClosed,
	credits.ErrUnknownAccount,
	credits.ErrIdempotencyConflict,
	credits.ErrInvalidAmount,
	credits.ErrOverflow,
	credits.ErrStoreUnavailable, // already wrapped
	identity.ErrNotFound,
	identity.ErrConflict,
}

// fail returns err as it is when it is a verdict, and otherwise, as a failure of the store,
// wrapped in credits.ErrStoreUnavailable with op as its context.
func fail(op string, err error) error {
	for _, v := range verdicts {
		if errors.Is(err, v) {
			return err
		}
	}
	return fmt.Errorf("%s: %w: %w", op, credits.ErrStoreUnavailable, err)
}

// sqliteCode is the extended result code of a SQLite error, 0 for other errors.
func sqliteCode(err error) int {
	var e *driver.Error
	if errors.As(err, &e) {
		return e.Code()
	}
	return 0
}

// isUniqueViolation reports whether err is a broken UNIQUE or PRIMARY KEY constraint.
func isUniqueViolation(err error) bool {
	code := sqliteCode(err)
	return code == sqlite3.SQLITE_CONSTRAINT_UNIQUE || code == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}

// isForeignKeyViolation reports whether err is a broken FOREIGN KEY constraint.
func isForeignKeyViolation(err error) bool {
	return sqliteCode(err) == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY
}

// isOverflow reports whether err is SQLite refusing to store a REAL in an INTEGER column of a
// STRICT table, which is what integer arithmetic beyond int64 produces.
func isOverflow(err error) bool {
	return sqliteCode(err) == sqlite3.SQLITE_CONSTRAINT_DATATYPE
}

// micros is how times are stored: unix microseconds.
func micros(t time.Time) int64 { return t.UnixMicro() }

// fromMicros reads a stored time.
func fromMicros(us int64) time.Time { return time.UnixMicro(us).UTC() }

// nullMicros stores an optional time.
func nullMicros(t *time.Time) sql.NullInt64 {
	if t == nil {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: micros(*t), Valid: true}
}

// fromNullMicros reads an optional time.
func fromNullMicros(v sql.NullInt64) *time.Time {
	if !v.Valid {
		return nil
	}
	t := fromMicros(v.Int64)
	return &t
}
