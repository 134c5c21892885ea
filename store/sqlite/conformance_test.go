package sqlite

import (
	"testing"

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
