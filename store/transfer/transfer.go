// Package transfer moves what an embedded store (store/sqlite) holds into an empty PostgreSQL
// database (store/postgres): every table of the embedded schema, row for row, in one
// PostgreSQL transaction, checked account by account before it commits. It is what
// `caddy llm-gateway migrate-store` runs, offline: the embedded store must not be in use.
package transfer

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite"
)

// Errors Copy reports; each is wrapped with what it is about.
var (
	// ErrSourceInUse: a gateway (or another tool) holds the embedded store's lock.
	ErrSourceInUse = errors.New("the embedded store is in use: stop the gateway that holds it first")
	// ErrTargetNotEmpty: the PostgreSQL database already holds data; Copy never merges.
	ErrTargetNotEmpty = errors.New("the PostgreSQL database is not empty: migrate into an empty database")
	// ErrMismatch: the copy does not have the source's books; nothing was committed.
	ErrMismatch = errors.New("the copy does not match the embedded store")
)

// Summary is what Copy copied and checked, printed as JSON by the command.
type Summary struct {
	// Source is the embedded store's file.
	Source string `json:"source"`
	// Tables is the number of rows copied per table.
	Tables map[string]int `json:"tables"`
	// Accounts is the number of accounts checked; Credited, Settled and Balance are their
	// totals in micro-credits, the same in both stores when Mismatches is empty.
	Accounts int            `json:"accounts"`
	Credited credits.Amount `json:"credited"`
	Settled  credits.Amount `json:"settled"`
	Balance  credits.Amount `json:"balance"`
	// Mismatches says what differs (a table's row count, an account's books); the copy is
	// rolled back when there is any.
	Mismatches []string `json:"mismatches,omitempty"`
	// Committed is whether the copy was committed.
	Committed bool `json:"committed"`
}

// column kinds: how a column of the embedded schema maps to its PostgreSQL counterpart.
type kind int

const (
	text      kind = iota // TEXT NOT NULL
	nullText              // TEXT (NULL allowed)
	integer               // INTEGER NOT NULL -> BIGINT
	nullInt               // INTEGER -> BIGINT (NULL allowed)
	blob                  // BLOB -> BYTEA (NULL allowed where the schema allows it)
	micros                // INTEGER unix microseconds NOT NULL -> timestamptz
	nullMicro             // INTEGER unix microseconds -> timestamptz (NULL allowed)
	jsonText              // TEXT holding JSON -> JSONB
	boolean               // INTEGER 0 or 1 -> BOOLEAN
)

type column struct {
	name string
	kind kind
}

// table is one table of the embedded schema (store/sqlite/migrations) and the order its rows
// are copied in.
type table struct {
	name    string
	columns []column
	orderBy string
}

// tables are every table of the embedded schema that holds state, in an order that respects
// their foreign keys, with every column. (reservations is always empty at rest, see Copy;
// schema_migrations is each database's own.) The PostgreSQL columns the embedded schema has
// no counterpart for take their defaults: accounts.reserved and accounts.last_grant 0 (no
// reservation is open), apps.seq in the order of the embedded store's (created_at, rowid).
var tables = []table{
	{"users", []column{{"id", text}, {"email", text}, {"email_key", text}, {"tier", text}, {"password_hash", text}, {"created_at", micros}}, "id"},
	{"accounts", []column{{"id", text}, {"balance", integer}, {"refill_period", nullInt}, {"created_at", micros}}, "id"},
	{"ledger", []column{{"seq", integer}, {"account_id", text}, {"kind", text}, {"amount", integer}, {"reason", text},
		{"reservation_id", nullText}, {"idempotency_key", nullText}, {"request_hash", blob}, {"model", nullText}, {"backend", nullText},
		{"input_tokens", nullInt}, {"output_tokens", nullInt}, {"key_id", nullText}, {"created_at", micros},
		{"cached_input_tokens", nullInt}, {"cache_write_tokens", nullInt}, {"reasoning_tokens", nullInt}, {"response_id", nullText}}, "seq"},
	{"api_keys", []column{{"id", text}, {"user_id", text}, {"prefix", text}, {"hash", blob}, {"name", text},
		{"scopes", jsonText}, {"allowed_ips", jsonText}, {"metadata", jsonText}, {"tier", text}, {"credit_cap", integer},
		{"credit_cap_period", text}, {"models", jsonText}, {"created_at", micros}, {"expires_at", nullMicro},
		{"revoked_at", nullMicro}, {"last_used_at", nullMicro}, {"rotated_to", nullText}, {"deprecated_at", nullMicro},
		{"chain_id", text}}, "created_at, id"},
	{"signing_keys", []column{{"seq", integer}, {"kid", text}, {"private", blob}, {"created_at", micros}}, "seq"},
	{"server_secret", []column{{"id", integer}, {"secret", blob}, {"created_at", micros}}, "id"},
	{"apps", []column{{"client_id", text}, {"name", text}, {"redirect_uris", jsonText}, {"first_party", boolean},
		{"scopes", jsonText}, {"secret_hash", blob}, {"created_at", micros}}, "created_at, rowid"},
	{"sessions", []column{{"hash", blob}, {"user_id", text}, {"created_at", micros}, {"expires_at", micros}}, "hash"},
	{"consents", []column{{"user_id", text}, {"client", text}, {"scopes", jsonText}, {"created_at", micros}, {"revoked_at", nullMicro}}, "user_id, client"},
	{"auth_codes", []column{{"hash", blob}, {"client_id", text}, {"user_id", text}, {"redirect_uri", text}, {"scopes", jsonText},
		{"challenge", text}, {"created_at", micros}, {"expires_at", micros}, {"used_at", nullMicro}}, "hash"},
	{"refresh_tokens", []column{{"hash", blob}, {"family", text}, {"user_id", text}, {"client_id", text}, {"scopes", jsonText},
		{"origin", nullText}, {"created_at", micros}, {"expires_at", micros}, {"rotated_at", nullMicro}, {"successor", blob},
		{"revoked_at", nullMicro}}, "hash"},
	{"external_subjects", []column{{"issuer", text}, {"subject", text}, {"user_id", text}, {"created_at", micros}}, "issuer, subject"},
}

// targetTables are every PostgreSQL table that holds state: all must be empty before a copy.
var targetTables = []string{"users", "accounts", "reservations", "leases", "ledger", "api_keys", "signing_keys",
	"server_secret", "apps", "sessions", "consents", "auth_codes", "refresh_tokens", "external_subjects"}

// Copy copies the embedded store at sqlitePath into the PostgreSQL database dsn (migrating its
// schema first), in one transaction: it refuses a source in use (ErrSourceInUse) and a target
// holding any data (ErrTargetNotEmpty), and commits only when every table's row count and
// every account's balance, credited and settled equal the source's, and the ledger identity
// (balance = credited - settled, nothing reserved) holds for each (otherwise ErrMismatch, with
// the Summary saying what differs). Open reservations are not copied: the embedded store keeps
// them in memory only (its migration 0002), so a store no process holds has none.
//
// Errors never hold the DSN.
func Copy(ctx context.Context, sqlitePath, dsn string) (Summary, error) {
	sum := Summary{Source: sqlitePath, Tables: map[string]int{}}
	if _, err := os.Stat(sqlitePath); err != nil {
		return sum, fmt.Errorf("embedded store: %w", err)
	}
	src, err := sqlite.Open(ctx, sqlitePath, sqlite.Options{})
	if errors.Is(err, sqlite.ErrInUse) {
		return sum, fmt.Errorf("%w (%s)", ErrSourceInUse, sqlitePath)
	}
	if err != nil {
		return sum, err
	}
	defer src.Close()
	if n, _ := src.OpenReservations(); n > 0 {
		return sum, fmt.Errorf("embedded store: %d open reservations", n) // none can be: nothing else holds it
	}

	// Open migrates the schema (under its advisory lock); the copy is on a connection of its own.
	target, err := postgres.Open(ctx, dsn)
	if err != nil {
		return sum, err
	}
	if err := target.Close(); err != nil {
		return sum, err
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return sum, fmt.Errorf("connecting to PostgreSQL: %w", err) // pgx names host and user, never the password
	}
	defer conn.Close(context.WithoutCancel(ctx))

	err = src.Snapshot(ctx, func(stx *sql.Tx) error {
		return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if err := lockEmpty(ctx, tx); err != nil {
				return err
			}
			for _, t := range tables {
				n, err := copyTable(ctx, stx, tx, t)
				if err != nil {
					return fmt.Errorf("copying %s: %w", t.name, err)
				}
				sum.Tables[t.name] = n
			}
			// The sequences continue after the copied rows.
			for _, t := range []string{"ledger", "signing_keys"} {
				if _, err := tx.Exec(ctx, `SELECT setval(pg_get_serial_sequence($1, 'seq'), coalesce(max(seq), 0) + 1, false) FROM `+t, t); err != nil {
					return fmt.Errorf("sequence of %s: %w", t, err)
				}
			}
			if err := check(ctx, stx, tx, &sum); err != nil {
				return err
			}
			if len(sum.Mismatches) > 0 {
				return ErrMismatch
			}
			return nil
		})
	})
	if err != nil {
		return sum, err
	}
	sum.Committed = true
	return sum, nil
}

// lockEmpty locks every table of the target against writes until the copy ends, and refuses
// a target that holds any row.
func lockEmpty(ctx context.Context, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, `LOCK TABLE `+strings.Join(targetTables, ", ")+` IN SHARE ROW EXCLUSIVE MODE`); err != nil {
		return fmt.Errorf("locking the target's tables: %w", err)
	}
	var full []string
	for _, t := range targetTables {
		var any bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+t+`)`).Scan(&any); err != nil {
			return fmt.Errorf("reading %s: %w", t, err)
		}
		if any {
			full = append(full, t)
		}
	}
	if len(full) > 0 {
		return fmt.Errorf("%w (rows in %s)", ErrTargetNotEmpty, strings.Join(full, ", "))
	}
	return nil
}

// copyTable streams the rows of t from the source to the target (COPY), converting each
// column to its PostgreSQL type, and returns how many it copied.
func copyTable(ctx context.Context, src *sql.Tx, dst pgx.Tx, t table) (int, error) {
	names := make([]string, len(t.columns))
	for i, c := range t.columns {
		names[i] = c.name
	}
	rows, err := src.QueryContext(ctx, `SELECT `+strings.Join(names, ", ")+` FROM `+t.name+` ORDER BY `+t.orderBy)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	scan := make([]any, len(t.columns))
	for i, c := range t.columns {
		switch c.kind {
		case text, jsonText:
			scan[i] = new(string)
		case nullText:
			scan[i] = new(sql.NullString)
		case integer, micros, boolean:
			scan[i] = new(int64)
		case nullInt, nullMicro:
			scan[i] = new(sql.NullInt64)
		case blob:
			scan[i] = new([]byte)
		}
	}
	var scanErr error
	next := func() ([]any, error) {
		if err := rows.Scan(scan...); err != nil {
			scanErr = err
			return nil, err
		}
		values := make([]any, len(t.columns))
		for i, c := range t.columns {
			values[i] = convert(c.kind, scan[i])
		}
		return values, nil
	}
	n, err := dst.CopyFrom(ctx, pgx.Identifier{t.name}, names, pgx.CopyFromFunc(func() ([]any, error) {
		if !rows.Next() {
			return nil, rows.Err()
		}
		return next()
	}))
	if err := errors.Join(scanErr, rows.Err()); err != nil {
		return 0, err
	}
	return int(n), err
}

// convert is the PostgreSQL value of a scanned column.
func convert(k kind, v any) any {
	switch k {
	case text, jsonText:
		return *v.(*string) // pgx sends a string as the JSON text it is
	case nullText:
		if s := *v.(*sql.NullString); s.Valid {
			return s.String
		}
		return nil
	case integer:
		return *v.(*int64)
	case nullInt:
		if n := *v.(*sql.NullInt64); n.Valid {
			return n.Int64
		}
		return nil
	case micros:
		return time.UnixMicro(*v.(*int64)).UTC()
	case nullMicro:
		if n := *v.(*sql.NullInt64); n.Valid {
			return time.UnixMicro(n.Int64).UTC()
		}
		return nil
	case boolean:
		return *v.(*int64) != 0
	case blob:
		if b := *v.(*[]byte); b != nil {
			return slices.Clone(b) // database/sql reuses the buffer
		}
		return nil
	}
	panic(fmt.Sprintf("transfer: unknown column kind %d", k))
}

// books are an account's balance and its ledger's sums.
type books struct {
	balance, credited, settled, reserved credits.Amount
}

// booksSQL is every account's books, in both dialects.
const booksSQL = `SELECT a.id, a.balance,
	coalesce((SELECT sum(amount) FROM ledger WHERE account_id = a.id AND kind IN ('credit', 'grant')), 0),
	coalesce((SELECT sum(amount) FROM ledger WHERE account_id = a.id AND kind = 'settle'), 0)`

// check compares the target, inside the copy's transaction, with the source: each table's row
// count, and each account's books and ledger identity. What differs goes to sum.Mismatches.
func check(ctx context.Context, src *sql.Tx, dst pgx.Tx, sum *Summary) error {
	for _, t := range tables {
		var want, got int
		if err := src.QueryRowContext(ctx, `SELECT count(*) FROM `+t.name).Scan(&want); err != nil {
			return err
		}
		if err := dst.QueryRow(ctx, `SELECT count(*) FROM `+t.name).Scan(&got); err != nil {
			return err
		}
		if got != want || sum.Tables[t.name] != want {
			sum.Mismatches = append(sum.Mismatches, fmt.Sprintf("%s: %d rows in the embedded store, %d copied, %d in PostgreSQL", t.name, want, sum.Tables[t.name], got))
		}
	}
	want := map[string]books{}
	rows, err := src.QueryContext(ctx, booksSQL+`, 0 FROM accounts AS a`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var id string
		var b books
		if err := rows.Scan(&id, &b.balance, &b.credited, &b.settled, &b.reserved); err != nil {
			rows.Close()
			return err
		}
		want[id] = b
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return err
	}
	prows, err := dst.Query(ctx, booksSQL+`, a.reserved FROM accounts AS a`)
	if err != nil {
		return err
	}
	got := map[string]books{}
	for prows.Next() {
		var id string
		var b books
		if err := prows.Scan(&id, &b.balance, &b.credited, &b.settled, &b.reserved); err != nil {
			prows.Close()
			return err
		}
		got[id] = b
	}
	prows.Close()
	if err := prows.Err(); err != nil {
		return err
	}
	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	for id := range got {
		if _, ok := want[id]; !ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		w, inSource := want[id]
		g, inTarget := got[id]
		switch {
		case !inTarget:
			sum.Mismatches = append(sum.Mismatches, fmt.Sprintf("account %s: missing in PostgreSQL", id))
		case !inSource:
			sum.Mismatches = append(sum.Mismatches, fmt.Sprintf("account %s: not in the embedded store", id))
		case g != w:
			sum.Mismatches = append(sum.Mismatches, fmt.Sprintf("account %s: embedded balance %d credited %d settled %d, PostgreSQL balance %d credited %d settled %d reserved %d",
				id, w.balance, w.credited, w.settled, g.balance, g.credited, g.settled, g.reserved))
		case g.balance != g.credited-g.settled:
			sum.Mismatches = append(sum.Mismatches, fmt.Sprintf("account %s: balance %d is not credited %d - settled %d", id, g.balance, g.credited, g.settled))
		}
		if inSource && inTarget {
			sum.Accounts++
			sum.Credited += g.credited
			sum.Settled += g.settled
			sum.Balance += g.balance
		}
	}
	return nil
}
