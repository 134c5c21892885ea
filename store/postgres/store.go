// Package postgres is the gateway's store on PostgreSQL (a credits.Ledger, identity.Users,
// identity.Keys and signin.Store), for several gateway instances sharing one record of money
// and of who may spend it. Every money operation is one statement, or one transaction of
// statements that lock what they change (conditional UPDATEs, DELETE ... RETURNING, INSERT ...
// ON CONFLICT): nothing is read and then written on the strength of the read, so that any
// number of instances can work on the same accounts and reservations at once.
//
// It is the foundation of issue 12: no configuration directive opens it yet.
package postgres

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/migrate"
)

// Store is the ledger, users, keys and sign-in state on one PostgreSQL database. It is safe
// for concurrent use, and any number of Stores (in as many processes) can share a database.
type Store struct {
	pool       *pgxpool.Pool
	roundTrips *roundTripCounter
	lease      *leaser // nil: every reservation is made in the database
	// clock gives the time of what is written without one (a zero CreatedAt, the expiry of the
	// sessions a new one replaces); time.Now when nil. Tests set it.
	clock func() time.Time
}

var _ credits.Ledger = (*Store)(nil)

// Open connects to the database named by dsn (a PostgreSQL URL or key=value string, as pgx
// reads it) and brings its schema up to date. A failure to reach the database is
// credits.ErrStoreUnavailable.
func Open(ctx context.Context, dsn string) (*Store, error) {
	return OpenWith(ctx, dsn, Options{})
}

// OpenWith is Open with options: with a LeaseSize, the store leases credits (see lease.go).
func OpenWith(ctx context.Context, dsn string, opts Options) (*Store, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("postgres store: %w", err)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// The DSN may hold a password: pgx's parse errors redact it; say no more than that.
		return nil, fmt.Errorf("postgres store: parsing the dsn: %w", err)
	}
	counter := &roundTripCounter{}
	cfg.ConnConfig.Tracer = counter
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fail("postgres store: connecting", err)
	}
	if err := migrateSchema(ctx, pool); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres store: %w", err)
	}
	s := &Store{pool: pool, roundTrips: counter}
	if opts.LeaseSize > 0 {
		s.lease = newLeaser(s, opts)
	}
	return s, nil
}

// now is the store's time, in UTC to the microsecond (what timestamptz keeps).
func (s *Store) now() time.Time {
	t := time.Now()
	if s.clock != nil {
		t = s.clock()
	}
	return t.UTC().Truncate(time.Microsecond)
}

// orNow is t, or now when t is zero.
func (s *Store) orNow(t time.Time) time.Time {
	if t.IsZero() {
		return s.now()
	}
	return t
}

// Close closes the store's connections, waiting for those in use to be returned. With
// leasing, it first commits the queued settlements and returns this instance's leases
// (reservations still open in them are released).
func (s *Store) Close() error {
	var err error
	if s.lease != nil {
		err = s.lease.close()
	}
	s.pool.Close()
	return err
}

// RoundTrips is the number of round trips to the database the store has made since it was
// opened: statements, batches (one round trip each, however many statements) and the
// BEGIN and COMMIT of transactions. Statements pgx prepares the first time a connection
// sees them, new connections and pool pings are not counted.
func (s *Store) RoundTrips() uint64 { return s.roundTrips.n.Load() }

// roundTripCounter counts the statements and batches pgx sends.
type roundTripCounter struct{ n atomic.Uint64 }

func (c *roundTripCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}

func (c *roundTripCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (c *roundTripCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	c.n.Add(1)
	return ctx
}

func (c *roundTripCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}

func (c *roundTripCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// migrationFiles are the schema changes, named <version>_<what>.sql with versions counting
// from 1 without gaps. A released file never changes: a new change is a new file.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrationLock is the key of the advisory lock migrations hold: any number of instances
// opening the same database at once apply each migration once.
const migrationLock = 0x6c6c6d67772d6d31 // "llmgw-m1"

// migrateSchema applies every embedded migration the database has not recorded in
// schema_migrations, in order, in one transaction under the migration lock: a failed
// migration leaves nothing behind.
func migrateSchema(ctx context.Context, pool *pgxpool.Pool) error {
	ms, err := migrate.Load(migrationFiles, "migrations")
	if err != nil {
		return err
	}
	return migrateWith(ctx, pool, ms)
}

// migrateWith applies the migrations ms (see migrateSchema).
func migrateWith(ctx context.Context, pool *pgxpool.Pool, ms []migrate.Migration) error {
	err := migrate.Apply(ctx, dialect{pool}, ms)
	if errors.Is(err, migrate.ErrNewerSchema) {
		return fmt.Errorf("migrating: %w", err)
	}
	if err != nil {
		return fail("migrating", err) // the database cannot be used as it is
	}
	return nil
}

// dialect is PostgreSQL's way of migrating: every pending migration in one transaction (its
// DDL is transactional), which holds the advisory migration lock.
type dialect struct{ pool *pgxpool.Pool }

func (d dialect) OneTransaction() bool { return true }

func (d dialect) Begin(ctx context.Context) (migrate.Tx, error) {
	tx, err := d.pool.Begin(ctx)
	if err != nil {
		return nil, err
	}
	return migrationTx{tx}, nil
}

// migrationTx is the transaction of a migration.
type migrationTx struct{ tx pgx.Tx }

func (t migrationTx) Lock(ctx context.Context) error {
	_, err := t.tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLock))
	return err
}

func (t migrationTx) CreateTable(ctx context.Context) error {
	_, err := t.tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER     NOT NULL PRIMARY KEY,
		name       TEXT        NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now()
	)`)
	return err
}

func (t migrationTx) Latest(ctx context.Context) (int, error) {
	var latest int
	err := t.tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&latest)
	return latest, err
}

func (t migrationTx) Exec(ctx context.Context, sql string) error {
	_, err := t.tx.Exec(ctx, sql)
	return err
}

func (t migrationTx) Record(ctx context.Context, m migrate.Migration) error {
	_, err := t.tx.Exec(ctx, `INSERT INTO schema_migrations (version, name) VALUES ($1, $2)`, m.Version, m.Name)
	return err
}

func (t migrationTx) Commit(ctx context.Context) error   { return t.tx.Commit(ctx) }
func (t migrationTx) Rollback(ctx context.Context) error { return t.tx.Rollback(ctx) }

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
}

// fail wraps a failure of op: a verdict as it is, an arithmetic overflow in the database as
// credits.ErrOverflow, anything else as credits.ErrStoreUnavailable.
func fail(op string, err error) error {
	for _, v := range verdicts {
		if errors.Is(err, v) {
			return fmt.Errorf("%s: %w", op, err)
		}
	}
	if pgCode(err) == codeNumericOutOfRange {
		return fmt.Errorf("%s: %w", op, credits.ErrOverflow)
	}
	return fmt.Errorf("%s: %w: %w", op, credits.ErrStoreUnavailable, err)
}

// SQLSTATE codes the store tells apart.
const (
	codeNumericOutOfRange = "22003"
	codeUniqueViolation   = "23505"
	codeForeignKey        = "23503"
)

// pgCode is the SQLSTATE of a PostgreSQL error, "" for other errors.
func pgCode(err error) string {
	var e *pgconn.PgError
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}
