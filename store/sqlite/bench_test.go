package sqlite

import (
	"context"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// BenchmarkReserveSettle measures the ledger's hot path: one reservation and its settlement,
// including the flusher's work to commit the settlement: the queue is flushed before the
// measurement ends.
func BenchmarkReserveSettle(b *testing.B) {
	for _, tc := range []struct {
		name   string
		refill *credits.Refill
	}{
		{"user", nil},
		{"anonymous with refill", &credits.Refill{Cap: credits.MaxAmount, Period: 1}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s, _ := openTestStore(b, nil)
			account := credits.UserAccount("bench")
			credit(b, s, account, credits.MaxAmount)
			usage := credits.Usage{Model: "gpt-x", Backend: "openai", InputTokens: 1000, OutputTokens: 200}
			b.ReportAllocs()
			b.ResetTimer()
			stop := reportCPU(b)
			for b.Loop() {
				reserveSettle(b, s, account, tc.refill, usage)
			}
			flushTimed(b, s)
			stop()
		})
	}
}

// reserveSettle reserves 1,000 micro-credits of account and settles 700 of them with usage.
func reserveSettle(b *testing.B, s *Store, account credits.AccountID, refill *credits.Refill, usage credits.Usage) {
	ctx := context.Background()
	r, _, err := s.Reserve(ctx, account, 1000, time.Minute, refill)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := s.Settle(ctx, r.ID, 700, usage); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkReserveSettleParallel is the hot path from many goroutines, the final flush
// included.
func BenchmarkReserveSettleParallel(b *testing.B) {
	ctx := context.Background()
	s, _ := openTestStore(b, nil)
	account := credits.UserAccount("bench")
	credit(b, s, account, credits.MaxAmount)
	b.ReportAllocs()
	b.ResetTimer()
	stop := reportCPU(b)
	defer stop()
	defer flushTimed(b, s)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r, _, err := s.Reserve(ctx, account, 1000, time.Minute, nil)
			if err != nil {
				b.Error(err)
				return
			}
			if _, err := s.Settle(ctx, r.ID, 700, credits.Usage{}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkSettlePaced is the hot path at the pace of a busy gateway, 6,000 requests a second
// (each Reserve and Settle with a key's usage), so that batches are as large as that pace makes
// them, for several flush intervals: what the flusher's CPU costs a request at each.
func BenchmarkSettlePaced(b *testing.B) {
	const pace = 6000
	for _, interval := range []time.Duration{2 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond} {
		b.Run(interval.String(), func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(ctx, filepath.Join(b.TempDir(), "gateway.db"), Options{FlushInterval: interval})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			account := credits.UserAccount("bench")
			credit(b, s, account, credits.MaxAmount)
			usage := credits.Usage{Model: "mock-small", Backend: "mock", InputTokens: 20, OutputTokens: 12, KeyID: "key00000001"}
			b.ReportAllocs()
			b.ResetTimer()
			stop := reportCPU(b)
			// Timers are too coarse for one op each 167 µs: every millisecond, its 6 ops.
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			for i := 0; b.Loop(); i++ {
				if i%(pace/1000) == 0 {
					<-tick.C
				}
				reserveSettle(b, s, account, nil, usage)
			}
			flushTimed(b, s)
			stop()
		})
	}
}

// BenchmarkKeyByID measures looking a key up, in a store of 1 and of 100,000 keys.
func BenchmarkKeyByID(b *testing.B) {
	for _, n := range []int{1, 100_000} {
		b.Run(fmt.Sprintf("keys=%d", n), func(b *testing.B) {
			ctx := context.Background()
			s, _ := openTestStore(b, nil)
			insertBenchKeys(b, s, n)
			b.ReportAllocs()
			b.ResetTimer()
			defer reportCPU(b)()
			i := 0
			for b.Loop() {
				if _, err := s.KeyByID(ctx, benchKeyID(i%n)); err != nil {
					b.Fatal(err)
				}
				i += 7919 // a prime: visit the keys out of order
			}
		})
	}
}

// BenchmarkKeyByIDParallel is KeyByID from many goroutines, on the read pool.
func BenchmarkKeyByIDParallel(b *testing.B) {
	const n = 100_000
	ctx := context.Background()
	s, _ := openTestStore(b, nil)
	insertBenchKeys(b, s, n)
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := s.KeyByID(ctx, benchKeyID(i%n)); err != nil {
				b.Error(err)
				return
			}
			i += 7919
		}
	})
}

// flushTimed commits what the benchmark queued, counting it in the benchmark's time and
// allocations.
func flushTimed(b *testing.B, s *Store) {
	b.StartTimer()
	if err := s.Flush(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
}

// BenchmarkUserByEmail measures looking a user up, in a store of 10,000 users (the identity
// side of the store reads the database directly, as before the ledger moved to memory).
func BenchmarkUserByEmail(b *testing.B) {
	ctx := context.Background()
	s, _ := openTestStore(b, nil)
	const n = 10_000
	for i := range n {
		if err := s.CreateUser(ctx, identity.User{ID: fmt.Sprint("u", i), Email: fmt.Sprintf("user%d@example.com", i)}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	i := 0
	for b.Loop() {
		if _, err := s.UserByEmail(ctx, fmt.Sprintf("USER%d@example.com", i%n)); err != nil {
			b.Fatal(err)
		}
		i += 7919
	}
}

// reportCPU, deferred, reports the CPU time (user and system, all threads) the process spent
// per operation: on a shared machine it tells the cost of an operation better than wall time.
func reportCPU(b *testing.B) func() {
	start := cpuTime()
	return func() {
		b.ReportMetric(float64((cpuTime()-start).Nanoseconds())/float64(b.N), "cpu-ns/op")
	}
}

func benchKeyID(i int) string { return fmt.Sprintf("key%08d", i) }

// insertBenchKeys stores n keys of one user in a single transaction (CreateKey would commit
// each).
func insertBenchKeys(tb testing.TB, s *Store, n int) {
	tb.Helper()
	ctx := context.Background()
	if err := s.CreateUser(ctx, identity.User{ID: "u", Email: "u@example.com"}); err != nil {
		tb.Fatal(err)
	}
	expires := time.Now().Add(24 * time.Hour)
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		tb.Fatal(err)
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO api_keys
		(id, user_id, prefix, hash, name, scopes, allowed_ips, metadata, tier, credit_cap, models, created_at, expires_at)
		VALUES (?, 'u', 'sk_live', ?, 'bench', '["chat","embeddings"]', '["10.0.0.0/8"]', '{"team":"a"}', 'pro', 0,
		        '["gpt-x"]', ?, ?)`)
	if err != nil {
		tb.Fatal(err)
	}
	defer stmt.Close()
	for i := range n {
		id := benchKeyID(i)
		hash := sha256.Sum256([]byte("sk_live_" + id + "_secret"))
		if _, err := stmt.ExecContext(ctx, id, hash[:], micros(time.Now()), micros(expires)); err != nil {
			tb.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		tb.Fatal(err)
	}
}
