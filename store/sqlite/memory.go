package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

const (
	// shardCount is how many independently locked parts the account cache and the index of
	// open reservations are split into, so that requests of different accounts rarely meet
	// on a lock.
	shardCount = 64
	// accountIdleTTL is how long an account with nothing open and nothing waiting to be
	// committed stays in memory after its last use.
	accountIdleTTL = 10 * time.Minute
	// evictEvery is how often the flusher looks for idle accounts to drop.
	evictEvery = time.Minute
)

// cachedAccountsSoftLimit is the number of cached accounts above which every account with
// nothing open and nothing waiting is dropped, however recently it was used: anonymous accounts
// are per client address, and a flood of new addresses must not grow the cache without bound.
// A dropped account is read again from the database when it comes back. (A variable for tests.)
var cachedAccountsSoftLimit int64 = 100_000

// account is the in-memory state of one account. Every field but pending is guarded by mu.
type account struct {
	mu sync.Mutex
	id credits.AccountID

	loaded  bool // read from the database (or found absent there)
	exists  bool // the account exists, in the database or in a queued op
	evicted bool // dropped from the cache: whoever holds this pointer must look the id up again

	// durable is the balance the database holds once every queued op of the account is
	// committed: credited - settled, open reservations included (they never reach the
	// database). The spendable balance is durable - open.
	durable credits.Amount
	// open is the sum of the account's open reservations, and openCount their number.
	open      credits.Amount
	openCount int
	// refilled and refillPeriod are the last period the account was filled up in.
	refilled     bool
	refillPeriod int64
	// lastUsed is when the account was last used, in unix nanoseconds of the store's clock.
	lastUsed int64

	// pending counts the account's queued ops not yet committed; the flusher decrements it,
	// without mu, once they are. An account is only evicted when it is zero.
	pending atomic.Int64
}

// spendable is the balance reservations can take from.
func (a *account) spendable() credits.Amount { return a.durable - a.open }

// accountShard is one part of the account cache.
type accountShard struct {
	mu       sync.Mutex
	accounts map[credits.AccountID]*account
	_        [40]byte // keep shards on separate cache lines
}

// accountCache holds the accounts touched recently.
type accountCache struct {
	seed   maphash.Seed
	shards [shardCount]accountShard
	size   atomic.Int64
}

func (c *accountCache) init() {
	c.seed = maphash.MakeSeed()
	for i := range c.shards {
		c.shards[i].accounts = make(map[credits.AccountID]*account)
	}
}

func (c *accountCache) shard(id credits.AccountID) *accountShard {
	return &c.shards[maphash.String(c.seed, string(id))%shardCount]
}

// acquire returns the account locked, read from the database first if it was not in memory.
// The caller unlocks it.
func (s *Store) acquire(ctx context.Context, id credits.AccountID) (*account, error) {
	sh := s.accounts.shard(id)
	for {
		sh.mu.Lock()
		a := sh.accounts[id]
		if a == nil {
			a = &account{id: id}
			sh.accounts[id] = a
			if s.accounts.size.Add(1) > cachedAccountsSoftLimit {
				s.queue.wakeEvictor()
			}
		}
		sh.mu.Unlock()
		a.mu.Lock()
		if a.evicted {
			a.mu.Unlock()
			continue
		}
		if !a.loaded {
			if err := s.load(ctx, a); err != nil {
				a.mu.Unlock()
				return nil, err
			}
		}
		return a, nil
	}
}

// load reads the account's committed state, keeping its open reservations. No op of the
// account can be waiting: it was not in memory (an account is only dropped once everything it
// queued is committed), or Credit marked it for reloading while nothing of it was queued.
func (s *Store) load(ctx context.Context, a *account) error {
	var period sql.NullInt64
	err := s.stmts.accountState.QueryRowContext(ctx, a.id).Scan(&a.durable, &period)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		a.exists, a.durable = false, 0
	case err != nil:
		return err
	default:
		a.exists = true
	}
	a.refilled, a.refillPeriod = period.Valid, period.Int64
	a.loaded = true
	return nil
}

// evictIdle drops from memory the accounts with nothing open and nothing waiting to be
// committed that were last used before idleBefore (unix nanoseconds), and reports how many.
func (s *Store) evictIdle(idleBefore int64) int {
	evicted := 0
	for i := range s.accounts.shards {
		sh := &s.accounts.shards[i]
		sh.mu.Lock()
		for id, a := range sh.accounts {
			if !a.mu.TryLock() {
				continue // in use right now
			}
			if a.openCount == 0 && a.pending.Load() == 0 && a.lastUsed < idleBefore {
				a.evicted = true
				delete(sh.accounts, id)
				evicted++
			}
			a.mu.Unlock()
		}
		sh.mu.Unlock()
	}
	s.accounts.size.Add(int64(-evicted))
	return evicted
}

// evict drops the accounts idle for accountIdleTTL, and every droppable one while the cache
// is above its soft limit.
func (s *Store) evict() {
	now := s.now().UnixNano()
	s.evictIdle(now - int64(accountIdleTTL))
	if s.accounts.size.Load() > cachedAccountsSoftLimit {
		s.evictIdle(now + 1)
	}
}

// openReservation is a reservation in memory. Its account stays cached while it is open.
type openReservation struct {
	account   *account
	amount    credits.Amount
	expiresAt int64 // unix microseconds
}

// reservationShard is one part of the index of open reservations.
type reservationShard struct {
	mu   sync.Mutex
	open map[string]openReservation
	_    [48]byte
}

// reservationIndex holds every open reservation by id.
type reservationIndex struct {
	seed   maphash.Seed
	shards [shardCount]reservationShard
}

func (x *reservationIndex) init() {
	x.seed = maphash.MakeSeed()
	for i := range x.shards {
		x.shards[i].open = make(map[string]openReservation)
	}
}

func (x *reservationIndex) shard(id string) *reservationShard {
	return &x.shards[maphash.String(x.seed, id)%shardCount]
}

// OpenReservations reports how many reservations are open now and the credits they hold.
func (s *Store) OpenReservations() (count int, total credits.Amount) {
	for i := range s.reservations.shards {
		sh := &s.reservations.shards[i]
		sh.mu.Lock()
		for _, r := range sh.open {
			count++
			total += r.amount
		}
		sh.mu.Unlock()
	}
	return count, total
}
