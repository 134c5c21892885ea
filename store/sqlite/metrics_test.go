package sqlite

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestOnCommitAndOpenReservations: OpenReservations counts what is held open now; OnCommit
// reports each group commit with the number of ops it wrote.
func TestOnCommitAndOpenReservations(t *testing.T) {
	var (
		mu      sync.Mutex
		ops     int
		commits int
	)
	s := openAt(t, filepath.Join(t.TempDir(), "gateway.db"), Options{OnCommit: func(d time.Duration, n int) {
		mu.Lock()
		defer mu.Unlock()
		if d < 0 || n <= 0 {
			t.Errorf("OnCommit(%v, %d)", d, n)
		}
		commits++
		ops += n
	}})
	defer s.Close()
	ctx := context.Background()
	acct := credits.UserAccount("u1")
	if _, _, err := s.Credit(ctx, acct, 10*credits.Credit, "test", ""); err != nil {
		t.Fatal(err)
	}
	r1, _, err := s.Reserve(ctx, acct, 2*credits.Credit, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	r2, _, err := s.Reserve(ctx, acct, 3*credits.Credit, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n, held := s.OpenReservations(); n != 2 || held != 5*credits.Credit {
		t.Errorf("open: %d holding %s, want 2 holding 5", n, held)
	}
	if _, err := s.Settle(ctx, r1.ID, credits.Credit, credits.Usage{Model: "m", Backend: "b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Release(ctx, r2.ID); err != nil {
		t.Fatal(err)
	}
	if n, held := s.OpenReservations(); n != 0 || held != 0 {
		t.Errorf("open after settling and releasing: %d holding %s", n, held)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if commits == 0 || ops == 0 {
		t.Errorf("OnCommit saw %d commits of %d ops after a settlement was flushed", commits, ops)
	}
}
