package sqlite

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/storetest"
)

// TestLedgerConformance runs the behaviour every ledger must have against the embedded store.
func TestLedgerConformance(t *testing.T) {
	storetest.TestLedger(t, func(t *testing.T) credits.Ledger {
		s, _ := openTestStore(t, nil)
		return s
	})
}

// openIdentityStore opens a store in a fresh folder: one process owns the embedded store, so
// every one of the instances asked for is the same Store.
func openIdentityStore(t *testing.T, clock func() time.Time, instances int) []storetest.IdentityStore {
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "gateway.db"), Options{Clock: clock})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	stores := make([]storetest.IdentityStore, instances)
	for i := range stores {
		stores[i] = s
	}
	return stores
}

func TestUsersConformance(t *testing.T)  { storetest.TestUsers(t, openIdentityStore) }
func TestKeysConformance(t *testing.T)   { storetest.TestKeys(t, openIdentityStore) }
func TestSigninConformance(t *testing.T) { storetest.TestSignin(t, openIdentityStore) }
