package migrate

import (
	"context"
	"database/sql"
	"errors"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"

	_ "modernc.org/sqlite"
)

func TestLoad(t *testing.T) {
	for _, tc := range []struct {
		name    string
		files   fstest.MapFS
		want    []int
		wantErr bool
	}{
		{"in order", fstest.MapFS{
			"m/0002_b.sql":   {Data: []byte("b")},
			"m/0001_a.sql":   {Data: []byte("a")},
			"m/0010_c.txt":   {Data: []byte("ignored")},
			"m/0003_cc.sql":  {Data: []byte("c")},
			"other/0004.sql": {Data: []byte("not in the folder")},
		}, []int{1, 2, 3}, false},
		{"empty", fstest.MapFS{}, nil, false},
		{"gap", fstest.MapFS{
			"m/0001_a.sql": {Data: []byte("a")},
			"m/0003_c.sql": {Data: []byte("c")},
		}, nil, true},
		{"not from 1", fstest.MapFS{
			"m/0002_b.sql": {Data: []byte("b")},
		}, nil, true},
		{"duplicate version", fstest.MapFS{
			"m/0001_a.sql": {Data: []byte("a")},
			"m/0001_b.sql": {Data: []byte("b")},
		}, nil, true},
		{"bad name", fstest.MapFS{
			"m/init.sql": {Data: []byte("a")},
		}, nil, true},
		{"no underscore", fstest.MapFS{
			"m/0001.sql": {Data: []byte("a")},
		}, nil, true},
		{"zero version", fstest.MapFS{
			"m/0000_a.sql": {Data: []byte("a")},
		}, nil, true},
		{"negative version", fstest.MapFS{
			"m/-1_a.sql": {Data: []byte("a")},
		}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := Load(tc.files, "m")
			if (err != nil) != tc.wantErr {
				t.Fatalf("error = %v, want error %v", err, tc.wantErr)
			}
			var got []int
			for _, m := range ms {
				got = append(got, m.Version)
			}
			if !tc.wantErr && !slices.Equal(got, tc.want) {
				t.Errorf("versions %v, want %v", got, tc.want)
			}
		})
	}
	ms, err := Load(fstest.MapFS{"m/0001_init.sql": {Data: []byte("CREATE TABLE t (x)")}}, "m")
	if err != nil || len(ms) != 1 || ms[0] != (Migration{Version: 1, Name: "0001_init", SQL: "CREATE TABLE t (x)"}) {
		t.Errorf("Load = %+v, %v", ms, err)
	}
}

// sqlDialect migrates a real SQLite database through database/sql, in either of the two
// transaction modes, counting the migrations it runs.
type sqlDialect struct {
	db  *sql.DB
	one bool
	ran *int
}

func (d sqlDialect) OneTransaction() bool { return d.one }

func (d sqlDialect) Begin(ctx context.Context) (Tx, error) {
	tx, err := d.db.BeginTx(ctx, nil)
	return sqlTx{tx, d.ran}, err
}

type sqlTx struct {
	tx  *sql.Tx
	ran *int
}

func (t sqlTx) Lock(context.Context) error { return nil }
func (t sqlTx) CreateTable(ctx context.Context) error {
	_, err := t.tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL)`)
	return err
}
func (t sqlTx) Latest(ctx context.Context) (int, error) {
	var v int
	err := t.tx.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}
func (t sqlTx) Exec(ctx context.Context, sql string) error {
	*t.ran++
	_, err := t.tx.ExecContext(ctx, sql)
	return err
}
func (t sqlTx) Record(ctx context.Context, m Migration) error {
	_, err := t.tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name) VALUES (?, ?)`, m.Version, m.Name)
	return err
}
func (t sqlTx) Commit(context.Context) error   { return t.tx.Commit() }
func (t sqlTx) Rollback(context.Context) error { return t.tx.Rollback() }

func openDB(t *testing.T) *sql.DB {
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "m.db"))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	return db
}

// recorded is the versions schema_migrations holds.
func recorded(t *testing.T, db *sql.DB) []int {
	t.Helper()
	rows, err := db.Query(`SELECT version FROM schema_migrations ORDER BY version`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var vs []int
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
	}
	return vs
}

func tableExists(t *testing.T, db *sql.DB, name string) bool {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?`, name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

var good = []Migration{
	{1, "0001_a", `CREATE TABLE a (x INTEGER); INSERT INTO a VALUES (1)`},
	{2, "0002_b", `CREATE TABLE b (x INTEGER); INSERT INTO a VALUES (2)`},
}

func TestApply(t *testing.T) {
	for _, one := range []bool{false, true} {
		name := map[bool]string{false: "each in its own transaction", true: "all in one transaction"}[one]
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			db := openDB(t)
			var ran int
			d := sqlDialect{db, one, &ran}

			if err := Apply(ctx, d, good[:1]); err != nil {
				t.Fatal(err)
			}
			if err := Apply(ctx, d, good); err != nil {
				t.Fatal(err)
			}
			if ran != 2 || !slices.Equal(recorded(t, db), []int{1, 2}) {
				t.Fatalf("ran %d migrations, recorded %v; want 2, [1 2]", ran, recorded(t, db))
			}

			// Again: nothing to apply.
			if err := Apply(ctx, d, good); err != nil {
				t.Fatal(err)
			}
			var rowsA int
			if err := db.QueryRow(`SELECT count(*) FROM a`).Scan(&rowsA); err != nil {
				t.Fatal(err)
			}
			if ran != 2 || rowsA != 2 {
				t.Errorf("re-running ran %d migrations (want 2 in all), table a has %d rows (want 2)", ran, rowsA)
			}

			// A database newer than the migrations is refused, and nothing is run.
			if err := Apply(ctx, d, good[:1]); !errors.Is(err, ErrNewerSchema) {
				t.Errorf("older migrations on a newer database: %v, want ErrNewerSchema", err)
			}
			if ran != 2 {
				t.Errorf("a refused database ran %d migrations", ran-2)
			}
		})
	}
}

// TestApplyFailure: a failing migration applies nothing of itself, and is not recorded;
// those before it stay applied when each has its own transaction, and go with it when all
// share one.
func TestApplyFailure(t *testing.T) {
	broken := append(slices.Clone(good), Migration{3, "0003_broken", `CREATE TABLE half (x INTEGER); INSERT INTO no_such_table VALUES (1)`})
	for _, one := range []bool{false, true} {
		t.Run(map[bool]string{false: "each in its own transaction", true: "all in one transaction"}[one], func(t *testing.T) {
			ctx := context.Background()
			db := openDB(t)
			var ran int
			d := sqlDialect{db, one, &ran}
			if err := Apply(ctx, d, good[:1]); err != nil {
				t.Fatal(err)
			}
			err := Apply(ctx, d, broken)
			if err == nil {
				t.Fatal("a broken migration applied")
			}
			if tableExists(t, db, "half") {
				t.Error("the failed migration left its table behind")
			}
			want := []int{1, 2}
			if one {
				want = []int{1}
			}
			if got := recorded(t, db); !slices.Equal(got, want) {
				t.Errorf("recorded %v, want %v", got, want)
			}
			if got := tableExists(t, db, "b"); got != !one {
				t.Errorf("table b exists: %v, want %v", got, !one)
			}
			// Fixed, it applies.
			fixed := append(slices.Clone(good), Migration{3, "0003_fixed", `CREATE TABLE half (x INTEGER)`})
			if err := Apply(ctx, d, fixed); err != nil {
				t.Fatal(err)
			}
			if got := recorded(t, db); !slices.Equal(got, []int{1, 2, 3}) || !tableExists(t, db, "half") {
				t.Errorf("after the fix: recorded %v, table half %v", got, tableExists(t, db, "half"))
			}
		})
	}
}

// FuzzLoad: whatever the file names, Load either refuses them or returns migrations numbered
// 1..n, each named after its file.
func FuzzLoad(f *testing.F) {
	f.Add("0001_a.sql", "0002_b.sql")
	f.Add("0001_a.sql", "0003_c.sql")
	f.Add("1_a.sql", "01_b.sql")
	f.Add("init.sql", "0001_a.sql")
	f.Add("0000_a.sql", "-1_b.sql")
	f.Add("+1_a.sql", "0002_.sql")
	f.Fuzz(func(t *testing.T, a, b string) {
		files := fstest.MapFS{}
		for _, n := range []string{a, b} {
			if n == "" || !fs.ValidPath("m/"+n) || strings.Contains(n, "/") {
				return
			}
			files["m/"+n] = &fstest.MapFile{Data: []byte(n)}
		}
		ms, err := Load(files, "m")
		if err != nil {
			return
		}
		for i, m := range ms {
			if m.Version != i+1 || m.SQL != m.Name+".sql" || !strings.HasSuffix(m.SQL, ".sql") {
				t.Fatalf("Load(%q, %q) = %+v", a, b, ms)
			}
		}
	})
}
