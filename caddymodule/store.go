package caddymodule

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite"
)

// stores shares one open store between the configurations that name it, so a config reload
// keeps the same database handle (and its in-flight reservations).
var stores = caddy.NewUsagePool()

// sweepInterval is how often expired reservations are looked for.
const sweepInterval = 10 * time.Second

// storeHandle is an open store and its background sweeper of expired reservations.
type storeHandle struct {
	ledger credits.Ledger
	users  identity.Users
	keys   identity.Keys
	close  func() error
	stop   context.CancelFunc
	done   chan struct{}
}

func openStore(ctx caddy.Context, cfg StoreConfig, logger *zap.Logger) (*storeHandle, string, error) {
	path, err := filepath.Abs(cfg.Path)
	if err != nil {
		return nil, "", fmt.Errorf("store path: %w", err)
	}
	key := cfg.Driver + ":" + path
	val, _, err := stores.LoadOrNew(key, func() (caddy.Destructor, error) {
		s, err := sqlite.Open(context.Background(), path, sqlite.Options{})
		if err != nil {
			return nil, fmt.Errorf("opening store: %w", err)
		}
		// The embedded store belongs to this process alone: every reservation found open
		// when it is opened was left by a crash, and is returned now.
		n, amount, err := s.ReleaseExpired(context.Background(), time.Now().Add(100*365*24*time.Hour))
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("releasing reservations left by a crash: %w", err)
		}
		if n > 0 {
			logger.Warn("released reservations left open by an earlier run",
				zap.Int("count", n), zap.Stringer("credits", amount))
			metricCreditsReleasedExpired.Add(float64(amount) / float64(credits.Credit))
		}
		sweepCtx, stop := context.WithCancel(context.Background())
		h := &storeHandle{ledger: s, users: s, keys: s, close: s.Close, stop: stop, done: make(chan struct{})}
		go h.sweep(sweepCtx, logger)
		return h, nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(*storeHandle), key, nil
}

// sweep releases expired reservations until the store is closed.
func (h *storeHandle) sweep(ctx context.Context, logger *zap.Logger) {
	defer close(h.done)
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			n, amount, err := h.ledger.ReleaseExpired(ctx, now)
			if err != nil {
				logger.Error("releasing expired reservations", zap.Error(err))
				continue
			}
			if n > 0 {
				logger.Warn("released expired reservations", zap.Int("count", n), zap.Stringer("credits", amount))
				metricCreditsReleasedExpired.Add(float64(amount) / float64(credits.Credit))
			}
		}
	}
}

// Destruct stops the sweeper and closes the store.
func (h *storeHandle) Destruct() error {
	h.stop()
	<-h.done
	return h.close()
}

// activeGateways lists the provisioned gateways, so the admin API (a separate module) can
// reach the store of the running configuration.
var activeGateways gatewayRegistry

type gatewayRegistry struct {
	mu   sync.Mutex
	list []*Gateway
}

func (r *gatewayRegistry) add(g *Gateway) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, g)
}

func (r *gatewayRegistry) remove(g *Gateway) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, x := range r.list {
		if x == g {
			r.list = append(r.list[:i], r.list[i+1:]...)
			return
		}
	}
}

// current is the most recently provisioned gateway, or nil.
func (r *gatewayRegistry) current() *Gateway {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.list) == 0 {
		return nil
	}
	return r.list[len(r.list)-1]
}
