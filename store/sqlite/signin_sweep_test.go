package sqlite

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// countRows counts the rows of a sign-in table.
func countRows(t *testing.T, s *Store, table string) int {
	t.Helper()
	var n int
	if err := s.read.QueryRowContext(context.Background(), `SELECT count(*) FROM `+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSweepChunks: more rows than one statement takes are all deleted, in one call.
func TestSweepChunks(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	t0 := clock.Now()
	n := sweepChunk + sweepChunk/2
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		h := tokenHash(fmt.Sprint("s", i))
		if _, err := tx.ExecContext(ctx, `INSERT INTO sessions (hash, user_id, created_at, expires_at) VALUES (?, 'u1', ?, ?)`,
			h[:], micros(t0), micros(t0.Add(time.Minute))); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	got, err := s.Sweep(ctx, t0.Add(time.Minute))
	if err != nil || got.Sessions != int64(n) || countRows(t, s, "sessions") != 0 {
		t.Fatalf("Sweep = %+v, %v; %d sessions left", got, err, countRows(t, s, "sessions"))
	}
}
