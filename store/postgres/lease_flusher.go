package postgres

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// defaultInstanceID is the host name and the process id.
func defaultInstanceID() string {
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	return host + ":" + strconv.Itoa(os.Getpid())
}

// settleOp is a settlement of a carved reservation, closed in memory, waiting to be committed.
type settleOp struct {
	account       *leasedAccount
	lease         *lease
	reservationID string
	cost          credits.Amount
	part          credits.Amount // the part of cost the lease pays (the rest: the balance)
	usage         credits.Usage
	at            time.Time // the entry's created_at
}

// settleQueue is the settlements waiting for the flusher, and its progress.
type settleQueue struct {
	mu        sync.Mutex
	ops       []settleOp // in the order they were queued; a batch is taken from the head
	queued    uint64     // ops ever queued
	committed uint64     // ops ever committed
	failing   error      // set while commits fail: new leased reservations are refused
	closed    bool       // refuses new ops
	stopped   bool       // no flusher will commit what is queued
	// progress is closed, and replaced, whenever a batch is committed or fails, and when the
	// queue stops: flush waits on it.
	progress chan struct{}
	wake     chan struct{} // the first op was queued
	urgent   chan struct{} // commit now: the batch is full, or a flush waits
}

var (
	errLeaseClosed  = fmt.Errorf("store is closed: %w", credits.ErrStoreUnavailable)
	errLeaseBacklog = fmt.Errorf("too many settlements waiting for the database: %w", credits.ErrStoreUnavailable)
)

func (q *settleQueue) init() {
	q.progress = make(chan struct{})
	q.wake = make(chan struct{}, 1)
	q.urgent = make(chan struct{}, 1)
}

// signal posts a token on a channel of capacity 1 unless one is there already.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// health is why leased reservations are refused now, or nil.
func (q *settleQueue) health() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return errLeaseClosed
	}
	return q.failing
}

// enqueue queues op, or refuses it (closed, or too many waiting). The op's account's mu is
// held.
func (q *settleQueue) enqueue(op settleOp) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return errLeaseClosed
	}
	if len(q.ops) >= maxQueuedSettlements {
		return errLeaseBacklog
	}
	q.ops = append(q.ops, op)
	q.queued++
	if len(q.ops) == 1 {
		signal(q.wake)
	}
	if len(q.ops) == settleBatch {
		signal(q.urgent)
	}
	return nil
}

// waitForRoom waits while queueHighWater settlements or more wait for the flusher
// (backpressure: what a crash can leave uncharged stays within a few batches). No account's
// mu is held.
func (q *settleQueue) waitForRoom(ctx context.Context) error {
	q.mu.Lock()
	for len(q.ops) >= queueHighWater && !q.closed {
		ch := q.progress
		signal(q.urgent)
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the database: %w: %w", credits.ErrStoreUnavailable, ctx.Err())
		}
		q.mu.Lock()
	}
	q.mu.Unlock()
	return nil
}

// advance records the outcome of an attempt to commit the n ops at the head (n = 0: failed
// with err).
func (q *settleQueue) advance(n int, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if n > 0 {
		q.ops = slices.Delete(q.ops, 0, n)
		q.committed += uint64(n)
	}
	q.failing = err
	close(q.progress)
	q.progress = make(chan struct{})
}

// flush waits until every settlement queued before the call is committed.
func (l *leaser) flush(ctx context.Context) error {
	q := &l.queue
	q.mu.Lock()
	target := q.queued
	signal(q.urgent)
	for q.committed < target {
		if q.stopped {
			q.mu.Unlock()
			return errLeaseClosed
		}
		ch, failing := q.progress, q.failing
		q.mu.Unlock()
		if failing != nil {
			return failing
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for settlements to be committed: %w: %w", credits.ErrStoreUnavailable, ctx.Err())
		}
		q.mu.Lock()
	}
	q.mu.Unlock()
	return nil
}

// flusher commits the queued settlements, a batch every FlushInterval (or at once when a
// batch is full or a flush waits), until the leaser stops.
func (l *leaser) flusher() {
	defer l.stopped.Done()
	q := &l.queue
	for {
		q.mu.Lock()
		waiting := len(q.ops)
		q.mu.Unlock()
		if waiting == 0 {
			select {
			case <-l.stop:
				return
			case <-q.wake:
			case <-q.urgent:
			}
			continue
		}
		if waiting < settleBatch {
			t := time.NewTimer(l.flushInterval)
			select {
			case <-l.stop:
				t.Stop()
				return
			case <-t.C:
			case <-q.urgent:
				t.Stop()
			}
		}
		l.commitHead(context.Background(), l.stop)
	}
}

// commitRetryDelays are the pauses before the new attempts to commit a batch that failed;
// once they are used up, leased reservations are refused (the queue is failing) and the batch
// is retried every second until it is committed. A queued settlement is dropped only when the
// database refuses it for good (permanentCommitError): see dropRefused.
// commitTimeout bounds one attempt to commit a batch: an attempt on a connection that went
// silent fails (pgx then drops the connection) and is retried on another. A commit whose
// outcome was lost this way is recognised when replayed (insertSettleEntries).
const commitTimeout = 5 * time.Second

var commitRetryDelays = []time.Duration{time.Millisecond, 5 * time.Millisecond, 25 * time.Millisecond, 100 * time.Millisecond}

// commitHead commits the batch at the head of the queue, retrying until it is committed, or
// until stop is closed or ctx done (false).
func (l *leaser) commitHead(ctx context.Context, stop <-chan struct{}) bool {
	q := &l.queue
	q.mu.Lock()
	n := min(len(q.ops), settleBatch)
	ops := slices.Clone(q.ops[:n])
	q.mu.Unlock()
	if n == 0 {
		return true
	}
	for attempt := 0; ; attempt++ {
		err := l.commit(ctx, ops)
		if l.onCommit != nil {
			l.onCommit(len(ops), err)
		}
		if err == nil {
			q.advance(n, nil)
			return true
		}
		if permanentCommitError(err) {
			if done := l.dropRefused(ctx, ops); done > 0 {
				q.advance(done, nil)
				return true
			}
		}
		delay := time.Second
		if attempt < len(commitRetryDelays) {
			delay = commitRetryDelays[attempt]
			q.advance(0, nil)
		} else {
			q.advance(0, fail("committing settlements", err))
		}
		t := time.NewTimer(delay)
		select {
		case <-stop:
			t.Stop()
			return false
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
	}
}

// permanentCommitError reports whether the database refused a commit for what the batch holds,
// not for the connection or the load: a data exception (SQLSTATE class 22) or an integrity
// constraint violation (class 23). Retrying the same batch cannot succeed.
func permanentCommitError(err error) bool {
	code := pgCode(err)
	return len(code) == 5 && (code[:2] == "22" || code[:2] == "23")
}

// dropRefused commits the ops of a batch the database refused for good one at a time, in
// order, and drops those it refuses again for good (dropSettlement), so that one bad
// settlement neither blocks the queue forever nor takes the others with it. It stops at the
// first other failure, and returns how many ops at the head are done (committed or dropped).
func (l *leaser) dropRefused(ctx context.Context, ops []settleOp) int {
	for i := range ops {
		err := l.commit(ctx, ops[i:i+1])
		if l.onCommit != nil {
			l.onCommit(1, err)
		}
		switch {
		case err == nil:
		case permanentCommitError(err):
			l.dropSettlement(ops[i], err)
		default:
			return i
		}
	}
	return len(ops)
}

// dropSettlement forgets a queued settlement the database refused for good: its lease part
// goes back to the lease (free again: in the database the lease still holds it), the part it
// would have taken from the balance is no longer pending. Nothing is charged for it.
func (l *leaser) dropSettlement(op settleOp, err error) {
	l.books.RLock()
	defer l.books.RUnlock()
	a := op.account
	a.mu.Lock()
	op.lease.pending -= op.part
	if !op.lease.lost {
		op.lease.free += op.part
	}
	a.pendingExcess -= op.cost - op.part
	a.mu.Unlock()
	if l.onDrop != nil {
		l.onDrop(op.reservationID, op.cost, err)
	}
}

// insertSettleEntries appends the settle entries of a batch, one row per settlement. A
// reservation has at most one (the UNIQUE reservation_id): if the batch is committed again
// after a commit whose outcome was not known (the connection broke), the insert fails with a
// unique violation of reservation_id, which says the batch was committed the first time (it
// commits all or nothing, and only this process settles its carved reservations).
const insertSettleEntries = `INSERT INTO ledger (account_id, kind, amount, reservation_id, model, backend,
	input_tokens, output_tokens, key_id, created_at, cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id)
SELECT account_id, 'settle', amount, reservation_id, model, backend, input_tokens, output_tokens, key_id, created_at,
	cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::timestamptz[],
	$10::bigint[], $11::bigint[], $12::bigint[], $13::text[])
	AS e(account_id, amount, reservation_id, model, backend, input_tokens, output_tokens, key_id, created_at,
	cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id)`

// chargeAccountStatement charges an account the costs $4 of a batch's settlements: the parts
// $3 off its leases $2 (and off reserved) for the leases that are still there (locked in the
// order of their ids), the whole off the balance. It reports the spendable balance after and
// the leases that paid.
const chargeAccountStatement = `WITH locked AS (
	SELECT id FROM leases WHERE id = ANY($2::text[]) ORDER BY id FOR UPDATE
), paid AS (
	UPDATE leases AS l SET amount = l.amount - p.part
	FROM unnest($2::text[], $3::bigint[]) AS p(id, part)
	WHERE l.id = p.id AND l.id IN (SELECT id FROM locked)
	RETURNING l.id, p.part
)
UPDATE accounts SET balance = balance - $4::bigint,
	reserved = reserved - (SELECT coalesce(sum(part), 0) FROM paid)::bigint
WHERE id = $1
RETURNING balance - reserved, ARRAY(SELECT id FROM paid)`

// commit commits ops in one batch (one round trip, one implicit transaction): one insert of
// their entries, and one statement per account, in the order of the accounts (so that the
// commits of several instances never wait on each other's account rows in a cycle). It then
// applies the outcome to the leases in memory, under books.
func (l *leaser) commit(ctx context.Context, ops []settleOp) error {
	// a connection that hangs (packets dropped) fails the attempt instead of the flusher
	ctx, cancel := context.WithTimeout(ctx, commitTimeout)
	defer cancel()
	l.books.RLock()
	defer l.books.RUnlock()
	var (
		accountIDs, reservationIDs, models, backends, keyIDs []*string
		costs, inputs, outputs                               []int64
		ats                                                  []time.Time
		cached, written, reasoning                           []*int64
		responseIDs                                          []*string
	)
	type charge struct {
		id     credits.AccountID
		cost   credits.Amount
		parts  map[string]credits.Amount
		leases []string
	}
	charges := map[credits.AccountID]*charge{}
	for _, op := range ops {
		u := op.usage
		id := string(op.account.id)
		accountIDs = append(accountIDs, &id)
		reservationIDs = append(reservationIDs, &op.reservationID)
		models, backends, keyIDs = append(models, nullable(u.Model)), append(backends, nullable(u.Backend)), append(keyIDs, nullable(u.KeyID))
		costs, inputs, outputs = append(costs, int64(op.cost)), append(inputs, u.InputTokens), append(outputs, u.OutputTokens)
		ats = append(ats, op.at)
		cached, written = append(cached, nullCount(u.CachedInputTokens)), append(written, nullCount(u.CacheWriteTokens))
		reasoning, responseIDs = append(reasoning, nullCount(u.ReasoningTokens)), append(responseIDs, nullable(u.ResponseID))
		ch := charges[op.account.id]
		if ch == nil {
			ch = &charge{id: op.account.id, parts: map[string]credits.Amount{}}
			charges[op.account.id] = ch
		}
		ch.cost += op.cost
		if op.part > 0 {
			if _, ok := ch.parts[op.lease.id]; !ok {
				ch.leases = append(ch.leases, op.lease.id)
			}
			ch.parts[op.lease.id] += op.part
		}
	}
	order := make([]*charge, 0, len(charges))
	for _, ch := range charges {
		order = append(order, ch)
	}
	slices.SortFunc(order, func(a, b *charge) int { return cmp.Compare(a.id, b.id) })
	batch := &pgx.Batch{}
	batch.Queue(insertSettleEntries, accountIDs, costs, reservationIDs, models, backends, inputs, outputs, keyIDs, ats,
		cached, written, reasoning, responseIDs)
	for _, ch := range order {
		parts := make([]int64, len(ch.leases))
		for i, id := range ch.leases {
			parts[i] = int64(ch.parts[id])
		}
		batch.Queue(chargeAccountStatement, ch.id, ch.leases, parts, ch.cost)
	}
	type result struct {
		spendable credits.Amount
		paid      []string
	}
	results := map[credits.AccountID]result{}
	replayed := false
	br := l.s.pool.SendBatch(ctx, batch)
	_, err := br.Exec()
	switch {
	case pgCode(err) == codeUniqueViolation && constraintOf(err) == "ledger_reservation_id_key":
		replayed = true // committed the first time: the rest of the batch was skipped
	case err != nil:
		_ = br.Close()
		return err
	default:
		for _, ch := range order {
			var r result
			if err := br.QueryRow().Scan(&r.spendable, &r.paid); err != nil {
				_ = br.Close()
				return err
			}
			results[ch.id] = r
		}
	}
	if err := br.Close(); err != nil && !replayed {
		return err
	}
	for _, op := range ops {
		a := op.account
		a.mu.Lock()
		op.lease.pending -= op.part
		a.pendingExcess -= op.cost - op.part
		if r, ok := results[a.id]; ok {
			if op.part > 0 && !slices.Contains(r.paid, op.lease.id) {
				op.lease.lost, op.lease.free = true, 0
			}
			a.known, a.knownSet = r.spendable, true
		}
		a.mu.Unlock()
	}
	return nil
}

// constraintOf is the constraint a PostgreSQL error names, "" for other errors.
func constraintOf(err error) string {
	var e *pgconn.PgError
	if errors.As(err, &e) {
		return e.ConstraintName
	}
	return ""
}

// renewer renews this instance's leases every LeaseTTL/3 and returns the unused leases of the
// accounts idle for a LeaseTTL, until the leaser stops.
func (l *leaser) renewer() {
	defer l.stopped.Done()
	t := time.NewTicker(l.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), l.ttl/3)
		_ = l.renew(ctx) // failed: the next tick tries again, within the TTL
		_ = l.returnIdle(ctx, time.Now().Add(-l.ttl))
		cancel()
	}
}

// snapshotAccounts is the accounts this instance knows.
func (l *leaser) snapshotAccounts() []*leasedAccount {
	l.accountsMu.Lock()
	defer l.accountsMu.Unlock()
	accounts := make([]*leasedAccount, 0, len(l.accounts))
	for _, a := range l.accounts {
		accounts = append(accounts, a)
	}
	return accounts
}

// renew extends the expiry of this instance's leases, in one statement, and marks lost those
// the database no longer has.
func (l *leaser) renew(ctx context.Context) error {
	l.books.RLock()
	defer l.books.RUnlock()
	held := map[string]*lease{}
	owner := map[string]*leasedAccount{}
	for _, a := range l.snapshotAccounts() {
		a.mu.Lock()
		for _, ls := range a.leases {
			if !ls.lost {
				held[ls.id], owner[ls.id] = ls, a
			}
		}
		a.mu.Unlock()
	}
	if len(held) == 0 {
		return nil
	}
	expires := time.Now().UTC().Add(l.ttl).Truncate(time.Microsecond)
	rows, err := l.s.pool.Query(ctx, `UPDATE leases SET expires_at = $2 WHERE holder = $1 RETURNING id`, l.holder, expires)
	if err != nil {
		return fail("renewing leases", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fail("renewing leases", err)
	}
	renewed := map[string]bool{}
	for _, id := range ids {
		renewed[id] = true
	}
	for id, ls := range held {
		a := owner[id]
		a.mu.Lock()
		if renewed[id] {
			ls.expires = expires
		} else {
			ls.lost, ls.free = true, 0 // released by another instance, or returned meanwhile
		}
		a.mu.Unlock()
	}
	return nil
}

// returnIdle gives back the unused leases of the accounts not used since idleSince (one round
// trip per account), and forgets the accounts that have nothing left here.
func (l *leaser) returnIdle(ctx context.Context, idleSince time.Time) error {
	l.books.RLock()
	defer l.books.RUnlock()
	for _, a := range l.snapshotAccounts() {
		a.mu.Lock()
		if a.lastUse.After(idleSince) {
			a.mu.Unlock()
			continue
		}
		ret := planReturn(a)
		if ret.args != nil {
			if _, err := l.s.pool.Exec(ctx, returnStatement, ret.args...); err != nil {
				a.mu.Unlock()
				return fail("returning leases", err)
			}
		}
		ret.done()
		if len(a.leases) == 0 && a.pendingExcess == 0 && a.acquiring == nil {
			a.evicted = true
			l.accountsMu.Lock()
			delete(l.accounts, a.id)
			l.accountsMu.Unlock()
		}
		a.mu.Unlock()
	}
	return nil
}

// close stops the leaser: no more settlements are queued, the queued ones are committed
// (within 10 seconds), and this instance's leases are given back whole.
func (l *leaser) close() error {
	q := &l.queue
	q.mu.Lock()
	already := q.closed
	q.closed = true
	q.mu.Unlock()
	if already {
		return nil
	}
	close(l.stop)
	l.stopped.Wait()
	l.background.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	for {
		q.mu.Lock()
		left := len(q.ops)
		q.mu.Unlock()
		if left == 0 {
			break
		}
		if !l.commitHead(ctx, nil) {
			err = fmt.Errorf("postgres store: closing: %d settlements not committed: %w", left, credits.ErrStoreUnavailable)
			break
		}
	}
	q.mu.Lock()
	q.stopped = true
	close(q.progress)
	q.progress = make(chan struct{})
	q.mu.Unlock()
	if err != nil {
		return err // the leases stay, to be released at their expiry: what they paid is not lost
	}
	return l.returnAll(ctx)
}

// returnAll deletes this instance's leases, giving what they hold back to the balances.
func (l *leaser) returnAll(ctx context.Context) error {
	err := pgx.BeginFunc(ctx, l.s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `DELETE FROM leases WHERE holder = $1 RETURNING account_id, amount`, l.holder)
		if err != nil {
			return err
		}
		byAccount := map[string]credits.Amount{}
		var (
			account string
			amount  credits.Amount
		)
		if _, err := pgx.ForEachRow(rows, []any{&account, &amount}, func() error {
			byAccount[account] += amount
			return nil
		}); err != nil {
			return err
		}
		return tx.SendBatch(ctx, reservedDecrements(byAccount)).Close()
	})
	if err != nil {
		return fail("postgres store: closing: returning leases", err)
	}
	return nil
}
