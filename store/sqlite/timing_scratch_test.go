package sqlite

import (
	"context"
	"testing"
	"time"
	"sync"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

func TestScratchTiming(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestStore(t, nil)
	account := credits.UserAccount("u")
	credit(t, s, account, 1000*c)
	var dr, dc, db time.Duration
	for range 50 {
		t0 := time.Now()
		r := reserve(t, s, account, 5*c, time.Minute)
		t1 := time.Now()
		var wg sync.WaitGroup
		wg.Go(func() { s.Settle(ctx, r.ID, 3*c, credits.Usage{}) })
		wg.Go(func() { s.Release(ctx, r.ID) })
		wg.Wait()
		t2 := time.Now()
		checkBooks(t, s, account)
		t3 := time.Now()
		dr += t1.Sub(t0); dc += t2.Sub(t1); db += t3.Sub(t2)
	}
	t.Logf("reserve %v close %v books %v", dr/50, dc/50, db/50)
}
