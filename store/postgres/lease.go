package postgres

// Credit leases: how one instance spends a busy account's credits without a round trip per
// request, exactly.
//
// A lease is a chunk (Options.LeaseSize) of an account's spendable balance that this instance
// took from the database in one conditional statement (acquireStatement: the balance covers
// leaseMinChunks chunks, or nothing is taken), recorded as a row of leases and counted in
// accounts.reserved like an open reservation. Reservations of requests are carved from the
// lease in memory: the instance never spends more than its leases hold, so that however many
// instances spend an account at once, none spends credits another holds, and the account is
// never overspent (no more than a settlement's cost above its reservation, as without leases).
//
// A settlement of a carved reservation is closed in memory at once, and committed with the
// others of the last FlushInterval in one batch (one round trip, one implicit transaction):
// each writes its own settle entry (usage, key id, reservation id: idempotent by reservation
// id, as a replayed batch inserts nothing twice) and moves its cost from the lease to settled
// (settleLeasedStatement). A cost above the reservation takes the rest from the balance, as
// without leases. A release only gives the reservation back to the lease.
//
// The holder renews its leases every LeaseTTL/3 (one statement for all of them) and returns
// the unused part of an account's leases when the account was idle for LeaseTTL, when a
// reservation on it must be made in the database, and on Close. A lease whose holder stopped
// renewing it (the process crashed) is deleted by whichever instance's ReleaseExpired finds it
// past its expiry: its whole amount goes back to the balance. What the crashed process had
// settled in memory but not yet committed is then never charged: an undercharge bounded by
// what its requests settled in the last FlushInterval plus the time of one commit (the queue
// is bounded too, see maxQueuedSettlements). A crash never overcharges (nothing is charged
// that was not settled) and never overspends (the lease bounded the spending).
//
// Reservations are made in the database as without leases (the fallback) when the request's
// reservation exceeds the lease size, when the account's spendable balance is below
// leaseMinChunks chunks (small, near-zero or negative balances, which a lease would lock away
// from other instances), and for reservations with a refill (anonymous allowances: small by
// nature, and the refill must be checked in the database each period).
//
// Balance and Audit report this instance's view: the database's books, with this instance's
// leases counted as what they are in its memory (unused lease as balance, carved reservations
// as open, queued settlements as settled), so that the identity credited = balance + settled
// + open holds exactly at every moment, and Balance is what this instance can spend plus what
// the database has spendable. Other instances' leases count as open.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

const (
	// leaseMinChunks is the spendable balance, in chunks, an account must have for a lease to
	// be taken from it: an account with less is reserved from directly.
	leaseMinChunks = 4
	// DefaultLeaseTTL is how long a lease lives without renewal, unless Options.LeaseTTL says
	// otherwise: the delay before a crashed instance's leases are released.
	DefaultLeaseTTL = 30 * time.Second
	// DefaultLeaseSize is a lease size for callers that want leasing without choosing one:
	// 10 credits, a few dozen reservations of a typical request.
	DefaultLeaseSize = 10 * credits.Credit
	// defaultLeaseFlushInterval is how long the flusher gathers settlements before it commits
	// them, unless Options.FlushInterval says otherwise.
	defaultLeaseFlushInterval = 10 * time.Millisecond
	// settleBatch is the number of queued settlements at which the flusher commits without
	// waiting for the rest of FlushInterval, and the most one batch commits.
	settleBatch = 512
	// maxQueuedSettlements bounds the queue: settlements beyond it are refused with
	// ErrStoreUnavailable (the reservation stays open and can be closed again), so that what
	// a crash can leave uncharged stays bounded when the database is slow or away.
	maxQueuedSettlements = 8 * settleBatch
	// queueHighWater is the number of queued settlements at which Settle waits for the
	// flusher before it queues more.
	queueHighWater = 2 * settleBatch
)

// Options configure a Store. The zero value is a store without leasing.
type Options struct {
	// LeaseSize is the chunk of an account's balance this instance leases at a time; 0
	// disables leasing (every reservation is a round trip to the database). A reservation
	// above it is made in the database. DefaultLeaseSize is a reasonable value.
	LeaseSize credits.Amount
	// LeaseTTL is how long a lease lives unless renewed (every LeaseTTL/3): the delay after
	// which a crashed instance's leases go back to the balances. Default DefaultLeaseTTL.
	LeaseTTL time.Duration
	// InstanceID names this instance on its leases (for the operator: the leases table says
	// who holds what). Default: the host name and process id.
	InstanceID string
	// FlushInterval is how long settlements are gathered before they are committed in one
	// batch: the bound of what a crash leaves uncharged. Default 10ms.
	FlushInterval time.Duration
	// OnCommit, if set, is called after each attempt to commit a batch of settlements with
	// the number of settlements and the attempt's error (nil: committed).
	OnCommit func(settlements int, err error)
	// OnDrop, if set, is called for each queued settlement the database refused for good: a
	// data exception or an integrity constraint violation (SQLSTATE classes 22 and 23), which
	// no retry can fix. Such a settlement is dropped from the queue, and its reservation counts
	// as released: its cost goes back to its lease, never charged (an undercharge, never an
	// overspend), and the settlements beside it in its batch are committed one by one. It is
	// given the reservation id, the cost not charged and the database's error.
	OnDrop func(reservationID string, cost credits.Amount, err error)
}

// withDefaults checks the options and fills in the defaults.
func (o Options) withDefaults() (Options, error) {
	if o.LeaseSize < 0 || o.LeaseSize > credits.MaxAmount/leaseMinChunks {
		return o, fmt.Errorf("lease size %s: %w", o.LeaseSize, credits.ErrInvalidAmount)
	}
	if o.LeaseTTL < 0 || o.FlushInterval < 0 {
		return o, errors.New("lease ttl and flush interval must not be negative")
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = DefaultLeaseTTL
	}
	if o.FlushInterval == 0 {
		o.FlushInterval = defaultLeaseFlushInterval
	}
	if o.InstanceID == "" {
		o.InstanceID = defaultInstanceID()
	}
	return o, nil
}

// leaser is the lease layer of a Store opened with a LeaseSize.
type leaser struct {
	s             *Store
	size          credits.Amount
	minSpendable  credits.Amount // leaseMinChunks * size
	ttl           time.Duration
	flushInterval time.Duration
	holder        string // random: this Store
	instance      string
	onCommit      func(int, error)
	onDrop        func(string, credits.Amount, error)

	// books is read-locked by whatever changes this instance's leases in the database and in
	// memory together (commits, acquisitions, returns, renewals), and locked by Balance and
	// Audit, which read both. Lock order: books, then an account's mu, then accountsMu or
	// reservationsMu. Nothing holding an account's mu takes books.
	books sync.RWMutex

	accountsMu sync.Mutex
	accounts   map[credits.AccountID]*leasedAccount

	reservationsMu sync.Mutex
	reservations   map[string]*localReservation

	queue settleQueue

	stop       chan struct{} // closed to stop the renewer and the flusher
	stopped    sync.WaitGroup
	background sync.WaitGroup // lease prefetches
}

// leasedAccount is what this instance knows of an account it leased from or reserved on.
type leasedAccount struct {
	id credits.AccountID
	mu sync.Mutex
	// leases are this instance's leases on the account, in the order they were taken.
	leases []*lease
	// known is the account's spendable balance in the database as of this instance's last
	// statement on it: the reported balances of calls served from memory start from it.
	known    credits.Amount
	knownSet bool
	// pendingExcess is the part of queued settlements above their reservations: taken from
	// the balance when they are committed.
	pendingExcess credits.Amount
	lastUse       time.Time
	evicted       bool // removed from accounts: look it up again
	// growth is how many times LeaseSize its next lease is (see chunk).
	growth credits.Amount
	// acquiring is set while a lease is being taken, and closed when it is done.
	acquiring chan struct{}
	// notLeasable: the last attempt to lease found too small a balance; leases are tried
	// again once a statement reports a spendable balance of leaseMinChunks leases.
	notLeasable bool
}

// lease is one lease of this instance. In the database its amount is free + open + pending
// (while it is not lost).
type lease struct {
	id string
	// expires is the lease's expiry as last renewed: nothing is carved from a lease within
	// a third of its TTL of it, as another instance may soon release it.
	expires time.Time
	free    credits.Amount // not carved
	open    credits.Amount // carved into open reservations
	pending credits.Amount // settled in memory, not committed: the part of costs the lease pays
	// lost: the database no longer has the lease (it expired and another instance released
	// it): its reservations are charged to the balance when settled.
	lost bool
}

// localReservation is a reservation carved from a lease.
type localReservation struct {
	credits.Reservation
	account *leasedAccount
	lease   *lease
}

func newLeaser(s *Store, opts Options) *leaser {
	l := &leaser{
		s:             s,
		size:          opts.LeaseSize,
		minSpendable:  leaseMinChunks * opts.LeaseSize,
		ttl:           opts.LeaseTTL,
		flushInterval: opts.FlushInterval,
		holder:        newReservationID(),
		instance:      opts.InstanceID,
		onCommit:      opts.OnCommit,
		onDrop:        opts.OnDrop,
		accounts:      map[credits.AccountID]*leasedAccount{},
		reservations:  map[string]*localReservation{},
		stop:          make(chan struct{}),
	}
	l.queue.init()
	l.stopped.Add(2)
	go l.renewer()
	go l.flusher()
	return l
}

// lockAccount returns the account's state, locked, creating it if needed.
func (l *leaser) lockAccount(id credits.AccountID) *leasedAccount {
	for {
		l.accountsMu.Lock()
		a := l.accounts[id]
		if a == nil {
			a = &leasedAccount{id: id, growth: 1}
			l.accounts[id] = a
		}
		l.accountsMu.Unlock()
		a.mu.Lock()
		if !a.evicted {
			return a
		}
		a.mu.Unlock()
	}
}

// lookupAccount returns the account's state if there is one, unlocked.
func (l *leaser) lookupAccount(id credits.AccountID) *leasedAccount {
	l.accountsMu.Lock()
	defer l.accountsMu.Unlock()
	return l.accounts[id]
}

// free is what the account's leases hold uncarved. a.mu is held.
func (a *leasedAccount) free() credits.Amount {
	var free credits.Amount
	for _, ls := range a.leases {
		free += ls.free
	}
	return free
}

// report is the balance a call reports, from the database's spendable balance: what this
// instance can still carve, less what its queued settlements will take from the balance.
// a.mu is held.
func (a *leasedAccount) report(spendable credits.Amount) credits.Amount {
	return spendable + a.free() - a.pendingExcess
}

// carve makes a reservation from one of the account's leases that holds amount, if one does.
// a.mu is held.
func (l *leaser) carve(a *leasedAccount, amount credits.Amount, ttl time.Duration) (credits.Reservation, credits.Amount, bool) {
	var from *lease
	usable := time.Now().Add(l.ttl / 3)
	for _, ls := range a.leases {
		// the emptiest lease that covers it, so that the others stay whole; the small
		// remainders are returned when the account is idle
		if !ls.lost && ls.free >= amount && ls.expires.After(usable) && (from == nil || ls.free < from.free) {
			from = ls
		}
	}
	if from == nil {
		return credits.Reservation{}, 0, false
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	r := credits.Reservation{
		ID:        newReservationID(),
		Account:   a.id,
		Amount:    amount,
		CreatedAt: now,
		ExpiresAt: now.Add(ttl).Truncate(time.Microsecond),
	}
	from.free -= amount
	from.open += amount
	a.lastUse = now
	l.reservationsMu.Lock()
	l.reservations[r.ID] = &localReservation{Reservation: r, account: a, lease: from}
	l.reservationsMu.Unlock()
	return r, a.report(a.known), true
}

// errNotLeasable: the account's balance is too small to lease from.
var errNotLeasable = errors.New("balance too small to lease from")

// acquireStatement takes a lease of $2 from the account $1 if its spendable balance is at
// least $3: one conditional UPDATE, and the lease's row only when it matched.
const acquireStatement = `WITH took AS (
	UPDATE accounts SET reserved = reserved + $2
	WHERE id = $1 AND balance - reserved >= $3
	RETURNING id, balance - reserved AS spendable
), leased AS (
	INSERT INTO leases (id, account_id, holder, instance_id, amount, created_at, expires_at)
	SELECT $4, id, $5, $6, $2, $7, $8 FROM took
)
SELECT spendable FROM took`

// acquire takes a new lease on the account, or errNotLeasable. The caller set a.acquiring
// (to ch) and does not hold a.mu: the account's requests carve from its other leases meanwhile,
// or wait for this one (see reserve). books is read-locked across the round trip and the
// change in memory.
func (l *leaser) acquire(ctx context.Context, a *leasedAccount, ch chan struct{}) error {
	l.books.RLock()
	defer l.books.RUnlock()
	now := time.Now().UTC().Truncate(time.Microsecond)
	a.mu.Lock()
	chunk := l.chunk(a)
	a.mu.Unlock()
	ls := &lease{id: newReservationID(), free: chunk, expires: now.Add(l.ttl)}
	var spendable credits.Amount
	err := l.s.pool.QueryRow(ctx, acquireStatement, a.id, chunk, leaseMinChunks*chunk, ls.id, l.holder,
		l.instance, now, now.Add(l.ttl)).Scan(&spendable)
	if errors.Is(err, pgx.ErrNoRows) && chunk > l.size {
		ls.free = l.size // the balance shrank: a lease of the base size, if it still holds that
		err = l.s.pool.QueryRow(ctx, acquireStatement, a.id, l.size, l.minSpendable, ls.id, l.holder,
			l.instance, now, now.Add(l.ttl)).Scan(&spendable)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.acquiring = nil
	close(ch)
	if errors.Is(err, pgx.ErrNoRows) {
		a.notLeasable = true // until a statement reports enough (the direct reservation that follows says)
		return errNotLeasable
	}
	if err != nil {
		return fail("lease from "+string(a.id), err)
	}
	a.leases = append(a.leases, ls)
	a.known, a.knownSet, a.notLeasable = spendable, true, false
	return nil
}

// maxLeaseGrowth bounds the growth of an account's leases: at most this many times LeaseSize.
const maxLeaseGrowth = 64

// chunk is the size of the account's next lease: LeaseSize, doubled each time a request had
// to wait for a lease on the account (it spends leases faster than they are taken), up to
// maxLeaseGrowth times LeaseSize and never above 1/leaseMinChunks of the spendable balance
// last seen. a.mu is held.
func (l *leaser) chunk(a *leasedAccount) credits.Amount {
	return max(l.size, min(a.growth*l.size, a.known/leaseMinChunks))
}

// prefetch takes the account's next lease in the background when what its leases hold runs
// below half a lease, so that its requests do not wait for it. a.mu is held.
func (l *leaser) prefetch(a *leasedAccount) {
	if a.acquiring != nil || a.free() >= l.chunk(a)/2 || a.known < l.minSpendable {
		return
	}
	q := &l.queue
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	ch := make(chan struct{})
	a.acquiring = ch
	l.background.Add(1)
	go func() {
		defer l.background.Done()
		ctx, cancel := context.WithTimeout(context.Background(), l.ttl/3)
		defer cancel()
		_ = l.acquire(ctx, a, ch) // failed: the next request that finds no lease tries again
	}()
}

// reserve is Reserve with leasing (the arguments are checked).
func (l *leaser) reserve(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill) (credits.Reservation, credits.Amount, error) {
	if refill != nil || amount > l.size {
		return l.reserveDirect(ctx, account, amount, ttl, refill)
	}
	if err := l.queue.health(); err != nil {
		return credits.Reservation{}, 0, err
	}
	for attempt := 0; attempt < 3; attempt++ {
		a := l.lockAccount(account)
		if r, balance, ok := l.carve(a, amount, ttl); ok {
			l.prefetch(a)
			a.mu.Unlock()
			return r, balance, nil
		}
		if ch := a.acquiring; ch != nil {
			a.growth = min(2*a.growth, maxLeaseGrowth) // the leases were too small to prefetch in time
			a.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return credits.Reservation{}, 0, fmt.Errorf("reserve from %s: %w: %w", account, credits.ErrStoreUnavailable, ctx.Err())
			}
			continue
		}
		if a.notLeasable && a.known < l.minSpendable {
			a.mu.Unlock()
			break
		}
		ch := make(chan struct{})
		a.acquiring = ch
		a.mu.Unlock()
		if err := l.acquire(ctx, a, ch); errors.Is(err, errNotLeasable) {
			break
		} else if err != nil {
			return credits.Reservation{}, 0, err
		}
	}
	return l.reserveDirect(ctx, account, amount, ttl, refill)
}

// returnStatement gives back, for the account $5, the amounts $3 of the leases $2 and the
// whole of the leases $4 (deleted), locking the leases in the order of their ids first (the
// order a commit locks them in). Leases that are gone are skipped.
const returnStatement = `WITH locked AS (
	SELECT id FROM leases WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE
), gave AS (
	UPDATE leases AS l SET amount = l.amount - r.amount
	FROM unnest($2::text[], $3::bigint[]) AS r(id, amount)
	WHERE l.id = r.id AND l.id IN (SELECT id FROM locked)
	RETURNING r.amount
), gone AS (
	DELETE FROM leases WHERE id = ANY($4::text[]) AND id IN (SELECT id FROM locked)
	RETURNING amount
)
UPDATE accounts SET reserved = reserved
	- (SELECT coalesce(sum(amount), 0) FROM gave)::bigint
	- (SELECT coalesce(sum(amount), 0) FROM gone)::bigint
WHERE id = $5`

// leaseReturn is the statement that gives an account's unused leases back, and what to do in
// memory once it is committed.
type leaseReturn struct {
	args []any // of returnStatement; nil: nothing to return
	done func()
}

// planReturn plans giving back the account's unused leases: the whole of those that hold
// nothing else (deleted), the uncarved part of the others. a.mu is held.
func planReturn(a *leasedAccount) leaseReturn {
	var all, partial, deleted []string
	var amounts []credits.Amount
	for _, ls := range a.leases {
		switch {
		case ls.lost:
		case ls.open == 0 && ls.pending == 0:
			deleted = append(deleted, ls.id)
		case ls.free > 0:
			partial = append(partial, ls.id)
			amounts = append(amounts, ls.free)
		default:
			continue
		}
		all = append(all, ls.id)
	}
	ret := leaseReturn{done: func() {
		for _, ls := range a.leases {
			switch {
			case ls.lost:
			case ls.open == 0 && ls.pending == 0:
				ls.free, ls.lost = 0, true
			default:
				ls.free = 0
			}
		}
		a.leases = slices.DeleteFunc(a.leases, func(ls *lease) bool { return ls.lost && ls.open == 0 && ls.pending == 0 })
	}}
	if len(all) > 0 {
		ret.args = []any{all, partial, amounts, deleted, a.id}
	}
	return ret
}

// reserveDirect reserves in the database. When this instance holds unused leases on the
// account, they are given back in the same transaction first (the account needs its credits
// where this instance cannot carve them), under books and the account's lock; otherwise the
// reservation takes no lock, and is retried under them if it was refused while a lease was
// taken meanwhile.
func (l *leaser) reserveDirect(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill) (credits.Reservation, credits.Amount, error) {
	a := l.lockAccount(account)
	hasFree := a.free() > 0
	a.mu.Unlock()
	if !hasFree {
		r, spendable, err := l.s.reserveDirect(ctx, account, amount, ttl, refill, nil)
		if err != nil && !errors.Is(err, credits.ErrInsufficientCredits) {
			return r, spendable, err
		}
		a = l.lockAccount(account)
		hasFree = a.free() > 0
		if !hasFree || err == nil {
			a.known, a.knownSet = spendable, true
			balance := a.report(spendable)
			a.mu.Unlock()
			return r, balance, err
		}
		a.mu.Unlock() // refused while a lease of ours holds credits: give it back and retry
	}
	l.books.RLock()
	defer l.books.RUnlock()
	a = l.lockAccount(account)
	defer a.mu.Unlock()
	ret := planReturn(a)
	r, spendable, err := l.s.reserveDirect(ctx, account, amount, ttl, refill, func(tx pgx.Tx) error {
		if ret.args == nil {
			return nil
		}
		_, err := tx.Exec(ctx, returnStatement, ret.args...)
		return err
	})
	if err != nil && !errors.Is(err, credits.ErrInsufficientCredits) {
		return r, spendable, err
	}
	ret.done()
	a.known, a.knownSet = spendable, true
	return r, a.report(spendable), err
}

// take removes the local reservation id, if there is one: its one closer.
func (l *leaser) take(id string) *localReservation {
	l.reservationsMu.Lock()
	defer l.reservationsMu.Unlock()
	lr := l.reservations[id]
	delete(l.reservations, id)
	return lr
}

// settle is Settle with leasing (the arguments are checked).
func (l *leaser) settle(ctx context.Context, id string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	if err := l.queue.waitForRoom(ctx); err != nil {
		return 0, fmt.Errorf("settle %s: %w", id, err)
	}
	lr := l.take(id)
	if lr == nil {
		account, spendable, err := l.s.settleDirect(ctx, id, cost, usage)
		if err != nil {
			return 0, err
		}
		return l.reportDirect(account, spendable), nil
	}
	a, ls := lr.account, lr.lease
	a.mu.Lock()
	defer a.mu.Unlock()
	part := min(cost, lr.Amount) // what the lease pays; the rest is the balance's
	if ls.lost {
		part = 0
	}
	op := settleOp{
		account:       a,
		lease:         ls,
		reservationID: id,
		cost:          cost,
		part:          part,
		usage:         usage,
		at:            time.Now().UTC(),
	}
	if err := l.queue.enqueue(op); err != nil {
		l.reservationsMu.Lock()
		l.reservations[id] = lr // still open: it can be settled or released again
		l.reservationsMu.Unlock()
		return 0, fmt.Errorf("settle %s: %w", id, err)
	}
	ls.open -= lr.Amount
	if !ls.lost {
		ls.free += lr.Amount - part
	}
	ls.pending += part
	a.pendingExcess += cost - part
	a.lastUse = op.at
	return a.report(a.known), nil
}

// reportDirect is the balance to report for an account after a statement that returned its
// spendable balance in the database.
func (l *leaser) reportDirect(account credits.AccountID, spendable credits.Amount) credits.Amount {
	a := l.lookupAccount(account)
	if a == nil {
		return spendable
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.evicted {
		return spendable
	}
	a.known, a.knownSet = spendable, true
	return a.report(spendable)
}

// release is Release with leasing.
func (l *leaser) release(ctx context.Context, id string) (credits.Amount, error) {
	lr := l.take(id)
	if lr == nil {
		account, spendable, err := l.s.releaseDirect(ctx, id)
		if err != nil {
			return 0, err
		}
		return l.reportDirect(account, spendable), nil
	}
	a := lr.account
	a.mu.Lock()
	defer a.mu.Unlock()
	l.giveBack(lr)
	return a.report(a.known), nil
}

// giveBack returns a closed local reservation's amount to its lease. Its account's mu is held.
func (l *leaser) giveBack(lr *localReservation) {
	lr.lease.open -= lr.Amount
	if !lr.lease.lost {
		lr.lease.free += lr.Amount
	}
}

// sweepLeasesStatement deletes leases of other holders that expired before $1, skipping
// those a commit has locked (a holder alive again), at most $3.
const sweepLeasesStatement = `DELETE FROM leases WHERE id IN (
	SELECT id FROM leases WHERE expires_at < $1 AND holder <> $2
	ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING account_id, amount`

// releaseExpired is ReleaseExpired with leasing: this instance's carved reservations that
// expired before now, those of the database, and (not counted in what it reports, which are
// reservations) other instances' leases that expired before now, whose holders are gone.
func (l *leaser) releaseExpired(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	var expired []*localReservation
	l.reservationsMu.Lock()
	for id, lr := range l.reservations {
		if lr.ExpiresAt.Before(now) {
			expired = append(expired, lr)
			delete(l.reservations, id)
		}
	}
	l.reservationsMu.Unlock()
	var (
		count int
		total credits.Amount
	)
	for _, lr := range expired {
		lr.account.mu.Lock()
		l.giveBack(lr)
		lr.account.mu.Unlock()
		count++
		total += lr.Amount
	}
	n, sum, err := l.s.releaseExpiredDirect(ctx, now)
	count += n
	total += sum
	if err != nil {
		return count, total, err
	}
	if _, err := l.sweepLeases(ctx, now); err != nil {
		return count, total, fail("release expired leases", err)
	}
	return count, total, nil
}

// sweepLeases deletes the expired leases of other instances (see sweepLeasesStatement) and
// returns their amounts to the balances, in batches; it reports how many it deleted.
func (l *leaser) sweepLeases(ctx context.Context, now time.Time) (int, error) {
	count := 0
	for {
		n := 0
		err := pgx.BeginFunc(ctx, l.s.pool, func(tx pgx.Tx) error {
			n = 0
			rows, err := tx.Query(ctx, sweepLeasesStatement, now, l.holder, expiredBatch)
			if err != nil {
				return err
			}
			byAccount := map[string]credits.Amount{}
			var (
				account string
				amount  credits.Amount
			)
			if _, err := pgx.ForEachRow(rows, []any{&account, &amount}, func() error {
				n++
				byAccount[account] += amount
				return nil
			}); err != nil {
				return err
			}
			return tx.SendBatch(ctx, reservedDecrements(byAccount)).Close()
		})
		if err != nil {
			return count, err
		}
		count += n
		if n < expiredBatch {
			return count, nil
		}
	}
}

// reservedDecrements is the batch that takes amounts off the accounts' reserved, in the order
// of their ids (so that transactions doing so never wait on each other in a cycle).
func reservedDecrements(byAccount map[string]credits.Amount) *pgx.Batch {
	ids := make([]string, 0, len(byAccount))
	for id := range byAccount {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	batch := &pgx.Batch{}
	for _, id := range ids {
		batch.Queue(`UPDATE accounts SET reserved = reserved - $2 WHERE id = $1`, id, byAccount[id])
	}
	return batch
}

// credit is Credit with leasing: the queued settlements first, then the credit, in the
// database; it goes to the balance.
func (l *leaser) credit(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, error) {
	if err := l.flush(ctx); err != nil {
		return credits.Entry{}, false, fmt.Errorf("credit %s: %w", account, err)
	}
	entry, replayed, spendable, err := l.s.creditDirect(ctx, account, amount, reason, idempotencyKey)
	if err == nil && !replayed {
		l.reportDirect(account, spendable)
	}
	return entry, replayed, err
}

// localBooks are what this instance holds of an account in memory.
type localBooks struct {
	ids           []string       // its leases on the account that the database should have
	open, pending credits.Amount // carved into open reservations; settled, not committed (lease part)
	excess        credits.Amount // settled, not committed, above the reservations
}

// local reads the account's local books. books is locked.
func (l *leaser) local(account credits.AccountID) localBooks {
	var lb localBooks
	a := l.lookupAccount(account)
	if a == nil {
		return lb
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, ls := range a.leases {
		if !ls.lost {
			lb.ids = append(lb.ids, ls.id)
		}
		lb.open += ls.open
		lb.pending += ls.pending
	}
	lb.excess = a.pendingExcess
	return lb
}

// audit is Audit with leasing: the database's books (one snapshot) and this instance's
// memory, read together (books locked: no commit, acquisition or return of this instance
// runs between them). Of this instance's leases' rows, the part carved into open reservations
// is open, the part settled in memory is settled, and the rest is balance; other instances'
// leases are open. (A lease of this instance that was lost is no longer in the database: its
// carved reservations are open here, at the balance's expense, as their settlements will be
// charged to the balance.)
func (l *leaser) audit(ctx context.Context, account credits.AccountID) (credits.Audit, error) {
	l.books.Lock()
	defer l.books.Unlock()
	lb := l.local(account)
	db, err := l.s.auditDB(ctx, account, lb.ids)
	if err != nil {
		return credits.Audit{}, err
	}
	return credits.Audit{
		Credited: db.credited,
		Settled:  db.settled + lb.pending + lb.excess,
		Open:     db.reservations + db.leases - db.mine + lb.open,
		Balance:  db.spendable + db.mine - lb.open - lb.pending - lb.excess,
	}, nil
}

// balance is Balance with leasing: the spendable balance in the database, plus this
// instance's unused leases on the account, less what its queued settlements will take. It is
// the audit's balance; other instances' unused leases are not in it (they are open here).
func (l *leaser) balance(ctx context.Context, account credits.AccountID) (credits.Amount, error) {
	books, err := l.audit(ctx, account)
	if err != nil {
		return 0, err
	}
	return books.Balance, nil
}
