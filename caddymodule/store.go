package caddymodule

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite"
)

// stores shares one open store between the configurations that name it, so a config reload
// keeps the same database handle (and its in-flight reservations).
var stores = caddy.NewUsagePool()

// sweepInterval is how often expired reservations are looked for.
const sweepInterval = 10 * time.Second

// signinSweepInterval is how often the sign-in state that is over (expired sessions, old codes,
// dead refresh token families) is deleted from the store (signin.Store.Sweep).
const signinSweepInterval = 10 * time.Minute

// touchInterval is how often the last use times of API keys are written to the store.
var touchInterval = 2 * time.Second

// storeHandle is an open store and its background sweeper of expired reservations and writer
// of key use times.
type storeHandle struct {
	// ledger is the store's, wrapped to enforce API keys' credit caps.
	ledger credits.Ledger
	users  identity.Users
	keys   identity.Keys
	signin signin.Store
	// responses finds who made a stored response, and on which backend.
	responses func(ctx context.Context, responseID string) (credits.ResponseOwner, error)
	// usage sums an account's settle entries by day and model.
	usage func(ctx context.Context, account credits.AccountID, since time.Time) ([]credits.UsageDay, error)
	// openReservations counts the open reservations and the credits they hold (for metrics),
	// or fails when the store cannot say (PostgreSQL unreachable).
	openReservations func() (int, credits.Amount, error)
	// roundTrips counts the round trips to the store's database server since it was opened
	// (for metrics); nil for the embedded store, which makes none.
	roundTrips func() uint64
	close      func() error
	sweepCtx   context.Context
	stop       context.CancelFunc
	done       chan struct{}
	settling   sync.WaitGroup // the settlements retried in the background

	touchMu sync.Mutex
	touched map[string]time.Time // key id -> last use, not yet written
}

// touch records that the key was used at t; the store learns it within touchInterval.
func (h *storeHandle) touch(keyID string, t time.Time) {
	h.touchMu.Lock()
	if h.touched == nil {
		h.touched = map[string]time.Time{}
	}
	if t.After(h.touched[keyID]) {
		h.touched[keyID] = t
	}
	h.touchMu.Unlock()
}

// writeTouches writes the collected use times in one batch; on failure they are kept for the
// next try (unless newer ones came meanwhile).
func (h *storeHandle) writeTouches(ctx context.Context, logger *zap.Logger) {
	h.touchMu.Lock()
	batch := h.touched
	h.touched = nil
	h.touchMu.Unlock()
	if len(batch) == 0 {
		return
	}
	if err := h.keys.TouchKeys(ctx, batch); err != nil {
		logger.Error("writing the last use times of api keys", zap.Int("keys", len(batch)), zap.Error(err))
		for id, t := range batch {
			h.touch(id, t)
		}
	}
}

// The store drivers.
const (
	storeSQLite   = "sqlite"
	storePostgres = "postgres"
)

// openStore opens the configured store, or shares the one already open for it.
func openStore(ctx caddy.Context, cfg StoreConfig, logger *zap.Logger) (*storeHandle, string, error) {
	switch cfg.Driver {
	case storePostgres:
		return openPostgres(cfg, logger)
	default:
		return openSQLite(cfg, logger)
	}
}

func openSQLite(cfg StoreConfig, logger *zap.Logger) (*storeHandle, string, error) {
	path, err := filepath.Abs(cfg.Path)
	if err != nil {
		return nil, "", fmt.Errorf("store path: %w", err)
	}
	key := cfg.Driver + ":" + path
	val, _, err := stores.LoadOrNew(key, func() (caddy.Destructor, error) {
		s, err := sqlite.Open(context.Background(), path, sqlite.Options{OnCommit: observeCommit})
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
			// Counted apart from the sweeper's releases: this process never reserved them,
			// so the ledger identity of the credit counters holds within a process.
			metricCreditsReleasedAtStart.Add(amount.Credits())
		}
		open := func() (int, credits.Amount, error) { n, amount := s.OpenReservations(); return n, amount, nil }
		h := newStoreHandle(s, s, s, s, s.ChainSpent, s.UsageByDay, s.ResponseOwner, open, s.Close, logger)
		go h.sweep(logger)
		return h, nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(*storeHandle), key, nil
}

// openPostgres connects to the PostgreSQL store. Its reservations belong to every instance
// sharing the database: none is released at start; each expired one is released by the
// first instance's sweeper to find it.
func openPostgres(cfg StoreConfig, logger *zap.Logger) (*storeHandle, string, error) {
	dsn := caddy.NewReplacer().ReplaceKnown(cfg.DSN, "")
	// The pool is shared by the configurations naming the same database; the key holds a
	// digest of the DSN, never the DSN (it may hold a password).
	sum := sha256.Sum256([]byte(dsn))
	key := cfg.Driver + ":" + hex.EncodeToString(sum[:8])
	val, _, err := stores.LoadOrNew(key, func() (caddy.Destructor, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s, err := postgres.OpenWith(ctx, dsn, postgres.Options{LeaseSize: cfg.LeaseSize, LeaseTTL: time.Duration(cfg.LeaseTTL),
			OnCommit: func(settlements int, err error) {
				if err != nil { // retried at once, then every second at most: a bounded rate
					logger.Warn("committing leased settlements failed; retrying", zap.Int("settlements", settlements), zap.Error(err))
				}
			},
			OnDrop: func(reservationID string, cost credits.Amount, err error) {
				// refused for good: retrying cannot help; the cost is not charged (an
				// undercharge, never an overspend), the reservation's credits go back
				metricSettlementsDropped.Inc()
				logger.Error("settlement refused by the database and dropped, not charged",
					zap.String("reservation", reservationID), zap.Stringer("credits", cost), zap.Error(err))
			}})
		if err != nil {
			return nil, fmt.Errorf("opening the postgres store: %w", err)
		}
		h := newStoreHandle(s, s, s, s, s.ChainSpent, s.UsageByDay, s.ResponseOwner, s.OpenReservations, s.Close, logger)
		h.roundTrips = s.RoundTrips
		go h.sweep(logger)
		return h, nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(*storeHandle), key, nil
}

// newStoreHandle is the handle of an open store, its ledger wrapped to enforce API keys'
// credit caps; its sweeper is not started.
func newStoreHandle(l credits.Ledger, users identity.Users, keys identity.Keys, signin signin.Store,
	chainSpent func(context.Context, string, time.Time) (credits.Amount, error),
	usage func(context.Context, credits.AccountID, time.Time) ([]credits.UsageDay, error),
	responses func(context.Context, string) (credits.ResponseOwner, error),
	open func() (int, credits.Amount, error), closeStore func() error, logger *zap.Logger) *storeHandle {
	ctx, stop := context.WithCancel(context.Background())
	h := &storeHandle{users: users, keys: keys, signin: signin,
		usage: usage, responses: responses, openReservations: open, close: closeStore,
		sweepCtx: ctx, stop: stop, done: make(chan struct{})}
	h.ledger = newKeyLedger(retriedLedger{Ledger: timedLedger{l}, ctx: ctx, pending: &h.settling, logger: logger}, chainSpent)
	return h
}

// settleRetryInterval is the pause before each new attempt of a settlement the store could
// not take.
const settleRetryInterval = 250 * time.Millisecond

// retriedLedger tries again, in the background, every settlement the store could not take
// (ErrStoreUnavailable: PostgreSQL unreachable or black-holed, a leased store's backlog), every
// settleRetryInterval until the store answers, so that a request forwarded before an outage is
// charged once the store is back instead of its reservation expiring uncharged. The caller
// still gets the first error. Settlement closes a reservation once, by its id, on any
// instance: a retry after an attempt whose answer was lost, or after a sweeper released the
// reservation at its expiry, finds it closed (ErrUnknownReservation) and stops; the retries
// also stop when the store is closed. At most the requests in flight when the store went away
// are retried (no new request is forwarded without a reservation). A capped key's counter on
// Redis is given its reservation back at the first failure, so a retried cost is not counted
// there (the ledger, which rebuilds the counter, has it).
type retriedLedger struct {
	credits.Ledger
	ctx     context.Context // done when the store closes
	pending *sync.WaitGroup // the retries running
	logger  *zap.Logger
}

func (l retriedLedger) Settle(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	balance, err := l.Ledger.Settle(ctx, reservationID, cost, usage)
	if errors.Is(err, credits.ErrStoreUnavailable) && l.ctx.Err() == nil {
		l.pending.Go(func() { l.retry(reservationID, cost, usage) })
	}
	return balance, err
}

// retry settles the reservation until the store answers, or closes.
func (l retriedLedger) retry(reservationID string, cost credits.Amount, usage credits.Usage) {
	t := time.NewTicker(settleRetryInterval)
	defer t.Stop()
	for attempt := 1; ; attempt++ {
		select {
		case <-l.ctx.Done():
			l.logger.Error("a settlement the store could not take is not retried further: the store is closing",
				zap.String("reservation", reservationID), zap.Stringer("credits", cost))
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(l.ctx, storeTimeout)
		_, err := l.Ledger.Settle(ctx, reservationID, cost, usage)
		cancel()
		switch {
		case err == nil:
			l.logger.Info("settled once the store answered again", zap.String("reservation", reservationID),
				zap.Stringer("credits", cost), zap.Int("attempts", attempt))
			return
		case errors.Is(err, credits.ErrStoreUnavailable):
		default:
			l.logger.Warn("a retried settlement found its reservation closed",
				zap.String("reservation", reservationID), zap.Int("attempts", attempt), zap.Error(err))
			return
		}
	}
}

// sweep releases expired reservations, writes key use times and deletes the sign-in state
// that is over until the store is closed, writing the last use times one more time then.
func (h *storeHandle) sweep(logger *zap.Logger) {
	defer close(h.done)
	ctx := h.sweepCtx
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	touches := time.NewTicker(touchInterval)
	defer touches.Stop()
	signinSweep := time.NewTicker(signinSweepInterval)
	defer signinSweep.Stop()
	for {
		select {
		case <-ctx.Done():
			wctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
			h.writeTouches(wctx, logger)
			cancel()
			return
		case <-touches.C:
			h.writeTouches(ctx, logger)
		case now := <-signinSweep.C:
			n, err := h.signin.Sweep(ctx, now)
			if err != nil {
				logger.Error("deleting expired sign-in state", zap.Error(err))
				continue
			}
			logger.Debug("deleted expired sign-in state", zap.Int64("sessions", n.Sessions),
				zap.Int64("codes", n.Codes), zap.Int64("refresh_tokens", n.RefreshTokens))
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
	h.settling.Wait()
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

// all lists the provisioned gateways.
func (r *gatewayRegistry) all() []*Gateway {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*Gateway(nil), r.list...)
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
