// Package sqlite keeps the gateway's users, API keys, credit ledger and sign-in state in one
// embedded SQLite file: the default store of a gateway that runs as a single instance.
//
// # Ownership
//
// The file belongs to one process. Open takes an exclusive advisory lock on <path>.lock (flock
// on Unix, LockFileEx on Windows) without waiting: a second opener, in another process or in
// the same one, gets ErrInUse until Close releases the lock or the owner dies.
//
// # Ledger
//
// The ledger's hot path runs in memory. An account is read from the database the first time
// it is touched and stays cached until it has been idle for ten minutes with nothing open and
// nothing waiting to be committed (or sooner, while more than 100,000 accounts are cached).
// Reserve and Release only touch memory: open reservations live in memory only (their sum per
// account, and each one by id) and never reach the database, whose balance is always
// credited - settled. Reserve decides a refill in memory, in the same critical section as the
// reservation, and queues its grant. Settle updates memory at once and queues its ledger entry
// and the change of balance. One flusher goroutine commits the queue, one transaction per
// batch: FlushInterval (10 ms by default) after the first op of a batch was queued, or at once
// when 512 are waiting; when 1,024 wait, Reserve and Settle wait for it (backpressure). A batch
// only adds deltas to balances ("balance = balance + delta"), and each of its writes is
// idempotent (a settle entry is unique by reservation id, a grant by refill period), so that a
// batch written again after a commit whose outcome was lost charges and grants nothing twice.
// Credit is synchronous, and first commits the queue, so that the ledger keeps the order of
// the calls. Balance reads memory; Entries and Audit first wait until the queue is committed,
// then read the database.
//
// # Durability
//
//   - A top-up (Credit) is committed, and synced to disk, before it returns: an acknowledged
//     credit is never lost. Its idempotency key is checked in the same transaction.
//   - A settlement (and a refill grant) is durable within FlushInterval of its return. A crash
//     loses at most the settlements of the last FlushInterval, which then count as released:
//     the caller is undercharged, never overcharged. (When settlements come faster than the
//     database commits them, backpressure bounds the loss to the batch being committed and
//     the 1,024 ops waiting behind it: a few milliseconds of work.) A batch commits whole or
//     not at all, so no settlement is ever half there, and they survive in the order they
//     were made.
//   - Reservations are never durable: a restart releases every open reservation by
//     construction. After it, for every account, Open == 0 and Credited == Balance + Settled,
//     exactly.
//   - If a batch cannot be committed after a few quick retries, the store fails: every Ledger
//     method (and Flush) returns an error matching credits.ErrStoreUnavailable, so that the
//     gateway fails closed, until the store is closed and opened again. Nothing queued is
//     dropped without the store failing.
//
// Batches are committed with synchronous=NORMAL: they survive a crash of the process, while a
// power loss may also roll back, whole, the batches committed since the log was last synced
// (by a checkpoint or a Credit), with the same outcome as a crash.
//
// # Storage
//
// The file is opened in WAL mode through two pools. Every write goes through a single
// connection, in BEGIN IMMEDIATE transactions, so writers queue in Go instead of failing with
// SQLITE_BUSY; reads go through several read-only connections and never wait for the writer.
// Money is held only as INTEGER micro-credits and times as unix microseconds. Users and API
// keys are read from and written to the database directly, without a cache, and so is the
// sign-in state (signin.go: signing keys, the server secret, apps, sessions, consents,
// authorization codes, refresh tokens, external subjects), of which only hashes of the
// secrets are stored, but for the signing keys and the server secret themselves. Redeeming a
// code and rotating a refresh token are each one write transaction, so of any number of
// concurrent attempts exactly one succeeds.
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
	"sync/atomic"
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

// ErrInUse is what Open reports while another opener, in this process or another, holds the
// store's file.
var ErrInUse = errors.New("store is in use by another process")

// busyTimeout is how long a connection waits for a lock held by another connection (such as a
// tool reading the file) before it reports the store unavailable.
const busyTimeout = 5 * time.Second

// Options tunes a Store.
type Options struct {
	// Clock tells the time recorded on new reservations, ledger entries, accounts, users and
	// keys, and measures how long accounts stay idle in memory; nil means time.Now. Tests
	// inject a fake clock here.
	Clock func() time.Time
	// FlushInterval is how long settlements and grants wait in memory, at most, before the
	// flusher commits them: a crash loses those of the last FlushInterval. Zero or less means
	// 10 ms (defaultFlushInterval: measured in BenchmarkSettlePaced, 10 ms batches cost a
	// request about 10 µs of CPU less than 2 ms ones at 6,000 requests a second).
	FlushInterval time.Duration
	// OnCommit, when set, is called by the flusher after each committed batch of queued
	// settlements and grants, with how long the commit took (retries included) and how many
	// operations it held. It must be quick: the flusher waits for it. For metrics.
	OnCommit func(d time.Duration, ops int)
}

// Store is a SQLite database holding users, API keys, accounts and the ledger, with the
// ledger's working state in memory (see the package documentation). It implements
// credits.Ledger, identity.Users and identity.Keys, and is safe for concurrent use.
type Store struct {
	write *sql.DB // one connection: SQLite has one writer
	read  *sql.DB // several query_only connections
	now   func() time.Time
	stmts statements
	// onCommit is Options.OnCommit.
	onCommit func(d time.Duration, ops int)
	lock     *fileLock

	accounts     accountCache
	reservations reservationIndex
	queue        commitQueue
	batchDeltas  map[*account]credits.Amount // the flusher's, reused by every batch
	batchSettles []*pendingOp                // the flusher's, reused by every batch
	settleArgs   []any                       // the flusher's, reused by every batch

	// failure, once set, is what every ledger call reports: a batch could not be committed,
	// or the store is closed.
	failure atomic.Pointer[error]
	hooks   atomic.Pointer[flushHooks]

	closeOnce sync.Once
	closeErr  error
}

// statements are the prepared statements of the hot paths.
type statements struct {
	// on the writer, used by the flusher; see batchSQL and settleChunkSQL
	batch        [len(batchSQL)]*sql.Stmt
	settleChunks [maxSettleChunk]*sql.Stmt
	// on the readers
	accountState *sql.Stmt
	keyByID      *sql.Stmt
}

// Open opens (creating it and its folder if needed) the SQLite database at path, brings its
// schema up to date and returns the Store. It fails with ErrInUse while another Store holds
// the file. Close it when done.
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
	lock, err := lockFile(abs + ".lock")
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	s, err := open(ctx, abs, lock, opts)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("open sqlite store %s: %w", abs, err), lock.release())
	}
	return s, nil
}

// open opens the database at abs, whose lock is held, and starts the flusher.
func open(ctx context.Context, abs string, lock *fileLock, opts Options) (*Store, error) {
	// Create the file ourselves so that it is private: SQLite gives its -wal and -shm files the
	// permissions of the database file.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}

	s := &Store{now: opts.Clock, onCommit: opts.OnCommit, lock: lock, batchDeltas: make(map[*account]credits.Amount)}
	if s.now == nil {
		s.now = time.Now
	}
	interval := opts.FlushInterval
	if interval <= 0 {
		interval = defaultFlushInterval
	}
	closeDBs := func() {
		s.closeStatements()
		if s.read != nil {
			s.read.Close()
		}
		s.write.Close()
	}

	s.write, err = sql.Open("sqlite", dataSourceName(abs, url.Values{
		"_busy_timeout": {fmt.Sprint(busyTimeout.Milliseconds())},
		"_journal_mode": {"WAL"},
		"_synchronous":  {"NORMAL"},
		"_foreign_keys": {"on"},
		"_txlock":       {"immediate"},
		// A multi-row INSERT of the flusher keeps a statement journal: in memory, not in a
		// temporary file.
		"_pragma": {"temp_store(memory)"},
	}))
	if err != nil {
		return nil, err
	}
	s.write.SetMaxOpenConns(1)
	s.write.SetMaxIdleConns(1)
	s.write.SetConnMaxLifetime(0)
	s.write.SetConnMaxIdleTime(0)
	if err := s.write.PingContext(ctx); err != nil {
		closeDBs()
		return nil, fmt.Errorf("%w: %w", credits.ErrStoreUnavailable, err)
	}
	if err := migrateSchema(ctx, s.write, s.now()); err != nil {
		closeDBs()
		return nil, err
	}

	// The readers open the file once it is in WAL mode and migrated.
	s.read, err = sql.Open("sqlite", dataSourceName(abs, url.Values{
		"_busy_timeout": {fmt.Sprint(busyTimeout.Milliseconds())},
		"_foreign_keys": {"on"},
		"_query_only":   {"on"},
	}))
	if err != nil {
		closeDBs()
		return nil, err
	}
	readers := max(4, runtime.GOMAXPROCS(0))
	s.read.SetMaxOpenConns(readers)
	s.read.SetMaxIdleConns(readers)
	if err := s.read.PingContext(ctx); err != nil {
		closeDBs()
		return nil, fmt.Errorf("%w: %w", credits.ErrStoreUnavailable, err)
	}

	if err := s.prepare(ctx); err != nil {
		closeDBs()
		return nil, err
	}
	s.accounts.init()
	s.reservations.init()
	s.queue.init()
	go s.runFlusher(interval)
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
	type prepared struct {
		db   *sql.DB
		stmt **sql.Stmt
		sql  string
	}
	list := []prepared{
		{s.read, &s.stmts.accountState, `SELECT balance, refill_period FROM accounts WHERE id = ?`},
		{s.read, &s.stmts.keyByID, `SELECT ` + keyColumns + ` FROM api_keys WHERE id = ?`},
	}
	for i := range batchSQL {
		list = append(list, prepared{s.write, &s.stmts.batch[i], batchSQL[i]})
	}
	for i := range s.stmts.settleChunks {
		list = append(list, prepared{s.write, &s.stmts.settleChunks[i], settleChunkSQL(i + 1)})
	}
	for _, p := range list {
		stmt, err := p.db.PrepareContext(ctx, p.sql)
		if err != nil {
			return fmt.Errorf("preparing %q: %w: %w", p.sql, credits.ErrStoreUnavailable, err)
		}
		*p.stmt = stmt
	}
	return nil
}

// closeStatements closes the prepared statements.
func (s *Store) closeStatements() error {
	var errs []error
	stmts := append(s.stmts.batch[:], s.stmts.settleChunks[:]...)
	for _, stmt := range append(stmts, s.stmts.accountState, s.stmts.keyByID) {
		if stmt != nil {
			errs = append(errs, stmt.Close())
		}
	}
	return errors.Join(errs...)
}

// Close commits what is queued, then closes the database and releases the file. Calls after
// the first return the first one's result; any other method called after Close fails with
// credits.ErrStoreUnavailable. When the queue cannot be committed, or the store had failed
// already, Close still closes everything, and reports why.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		if err := s.shutdown(true); err != nil {
			s.closeErr = fmt.Errorf("close sqlite store: %w", err)
		}
	})
	return s.closeErr
}

// shutdown refuses new calls, stops the flusher (once it has committed the queue, when flush
// is true), closes the database and releases the lock. Close calls it with flush; tests
// simulate a crash without.
func (s *Store) shutdown(flush bool) error {
	var errs []error
	if err := s.unavailable(); err != nil {
		errs = append(errs, err) // the store had failed: what was queued is lost
	}
	closed := errClosed
	s.failure.CompareAndSwap(nil, &closed)

	q := &s.queue
	q.mu.Lock()
	if q.refusal == nil {
		q.refusal = errClosed
	}
	q.flushOnStop = flush
	q.mu.Unlock()
	close(q.stop)
	<-q.exited
	if len(errs) == 0 {
		q.mu.Lock()
		if q.failed != nil {
			errs = append(errs, q.failed) // the last commit failed
		}
		q.mu.Unlock()
	}

	errs = append(errs, s.closeStatements())
	// The readers first: the last connection to close checkpoints the WAL into the file.
	errs = append(errs, s.read.Close(), s.write.Close(), s.lock.release())
	return errors.Join(errs...)
}

// unavailable is why ledger calls fail: the store failed or is closed; nil while it works.
func (s *Store) unavailable() error {
	if p := s.failure.Load(); p != nil {
		return *p
	}
	return nil
}

// usable is unavailable, and also reports a context that ended, wrapped in
// credits.ErrStoreUnavailable as a database call would.
func (s *Store) usable(ctx context.Context) error {
	if err := s.unavailable(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", credits.ErrStoreUnavailable, err)
	}
	return nil
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

// nullString stores an optional text: NULL when empty.
func nullString(s string) sql.NullString { return sql.NullString{String: s, Valid: s != ""} }

// nullCount stores a token count that is mostly zero: zero as NULL.
func nullCount(n int64) sql.NullInt64 { return sql.NullInt64{Int64: n, Valid: n != 0} }

// fromNullMicros reads an optional time.
func fromNullMicros(v sql.NullInt64) *time.Time {
	if !v.Valid {
		return nil
	}
	t := fromMicros(v.Int64)
	return &t
}
