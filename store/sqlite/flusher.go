package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

const (
	// defaultFlushInterval is how long the flusher gathers ops before it commits them, unless
	// Options.FlushInterval says otherwise.
	defaultFlushInterval = 10 * time.Millisecond
	// batchOps is the number of queued ops at which the flusher commits without waiting for
	// the rest of FlushInterval.
	batchOps = 512
	// queueHighWater is the number of waiting ops at which Reserve and Settle wait for the
	// flusher before they queue more (backpressure), so that what a crash can lose stays
	// within about FlushInterval plus the time to commit this many ops, a few milliseconds,
	// even when requests come faster than the database can take them.
	queueHighWater = 2 * batchOps
	// maxQueuedOps bounds the queue whatever the number of callers past the high water mark:
	// calls that would queue more fail with credits.ErrStoreUnavailable.
	maxQueuedOps = 1 << 16
)

// commitRetryDelays are the pauses before each new attempt to commit a batch that failed;
// after the last one the store fails.
var commitRetryDelays = []time.Duration{time.Millisecond, 5 * time.Millisecond, 25 * time.Millisecond}

var (
	// errClosed is what every call to a closed store reports.
	errClosed = fmt.Errorf("store is closed: %w", credits.ErrStoreUnavailable)
	// errBacklog is what a call reports when the queue is full.
	errBacklog = fmt.Errorf("too many settlements waiting for the database: %w", credits.ErrStoreUnavailable)
)

// opKind is what a queued op writes.
type opKind uint8

const (
	// opCreateAccount inserts the account row, empty, unless it exists.
	opCreateAccount opKind = iota + 1
	// opGrant records a refill: it adds amount to the balance and sets refill_period to period
	// unless the account was already refilled in that period or a later one, and then appends
	// the grant entry (when amount > 0).
	opGrant
	// opSettle appends the settle entry of the reservation unless it exists, and then takes
	// amount (the cost) from the balance.
	opSettle
)

// pendingOp is a change made in memory that waits to be committed.
type pendingOp struct {
	kind          opKind
	account       *account
	amount        credits.Amount
	period        int64 // opGrant
	reservationID string
	usage         credits.Usage
	at            int64 // unix microseconds: the entry's created_at
}

// commitQueue is the ops waiting for the flusher, and its progress.
type commitQueue struct {
	mu        sync.Mutex
	ops       []pendingOp
	spare     []pendingOp  // the previous batch's array, reused
	queued    uint64       // ops ever queued
	taken     uint64       // ops ever taken into a batch
	length    atomic.Int64 // len(ops), for waitForRoom to read without mu
	committed uint64       // ops ever committed; batches commit in queue order
	refusal   error        // why enqueue refuses ops: the store failed or is closing
	failed    error        // the batch that could not be committed, once it happened
	stopped   bool         // the flusher is gone
	// progress is closed, and replaced, whenever a batch is committed or fails and when the
	// flusher stops: Flush waits on it.
	progress chan struct{}

	// wake and urgent are only posted to with mu held, and emptied when a batch is taken, so
	// that a token always stands for ops still queued.
	wake        chan struct{} // the first op was queued
	urgent      chan struct{} // commit now: the batch is full, or Flush waits
	evictNow    chan struct{} // the account cache is above its soft limit
	stop        chan struct{} // closed by shutdown
	flushOnStop bool          // commit what is queued before stopping
	exited      chan struct{} // closed when the flusher has stopped
}

func (q *commitQueue) init() {
	q.progress = make(chan struct{})
	q.wake = make(chan struct{}, 1)
	q.urgent = make(chan struct{}, 1)
	q.evictNow = make(chan struct{}, 1)
	q.stop = make(chan struct{})
	q.exited = make(chan struct{})
}

// signal posts a token on a channel of capacity 1 unless one is there already.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (q *commitQueue) wakeEvictor() { signal(q.evictNow) }

// enqueue queues ops, all or none: it fails when the store failed, is closing or has too many
// ops waiting. The caller holds the lock of every account the ops name, and changes the
// accounts in memory only once enqueue succeeded.
func (q *commitQueue) enqueue(ops ...pendingOp) error {
	q.mu.Lock()
	if q.refusal != nil {
		err := q.refusal
		q.mu.Unlock()
		return err
	}
	before := len(q.ops)
	if before+len(ops) > maxQueuedOps {
		q.mu.Unlock()
		return errBacklog
	}
	q.ops = append(q.ops, ops...)
	q.length.Store(int64(len(q.ops)))
	q.queued += uint64(len(ops))
	for i := range ops {
		ops[i].account.pending.Add(1)
	}
	if before == 0 {
		signal(q.wake)
	}
	if before < batchOps && len(q.ops) >= batchOps {
		signal(q.urgent)
	}
	q.mu.Unlock()
	return nil
}

// waitForRoom returns at once unless queueHighWater ops wait; then it asks the flusher to
// commit and waits until fewer do. It fails when the store fails or closes, or ctx ends.
func (q *commitQueue) waitForRoom(ctx context.Context) error {
	for q.length.Load() >= queueHighWater {
		q.mu.Lock()
		if q.refusal != nil {
			err := q.refusal
			q.mu.Unlock()
			return err
		}
		if len(q.ops) < queueHighWater {
			q.mu.Unlock()
			return nil
		}
		signal(q.urgent)
		progress := q.progress
		q.mu.Unlock()
		select {
		case <-progress:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the database: %w: %w", credits.ErrStoreUnavailable, ctx.Err())
		}
	}
	return nil
}

// Flush waits until every op queued before it was called is committed. It fails, matching
// credits.ErrStoreUnavailable, when the store failed or is closed, or when ctx ends first.
func (s *Store) Flush(ctx context.Context) error {
	if err := s.unavailable(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	return s.flush(ctx)
}

// flush is Flush without the check for a closed store, for calls that already made it.
func (s *Store) flush(ctx context.Context) error {
	q := &s.queue
	q.mu.Lock()
	target := q.queued
	for q.committed < target {
		switch {
		case q.failed != nil:
			err := q.failed
			q.mu.Unlock()
			return fmt.Errorf("flush: %w", err)
		case q.stopped:
			q.mu.Unlock()
			return fmt.Errorf("flush: %w", errClosed)
		}
		if target > q.taken { // not in the batch being committed: ask for the next one now
			signal(q.urgent)
		}
		progress := q.progress
		q.mu.Unlock()
		select {
		case <-progress:
		case <-ctx.Done():
			return fmt.Errorf("flush: %w: %w", credits.ErrStoreUnavailable, ctx.Err())
		}
		q.mu.Lock()
	}
	q.mu.Unlock()
	return nil
}

// runFlusher is the goroutine that commits the queue: FlushInterval after the first op of a
// batch was queued, or at once when batchOps are waiting or Flush asks. It also drops idle
// accounts from memory.
func (s *Store) runFlusher(interval time.Duration) {
	q := &s.queue
	defer close(q.exited)
	evictTicker := time.NewTicker(evictEvery)
	defer evictTicker.Stop()
	gather := time.NewTimer(interval)
	gather.Stop()
	for {
		select {
		case <-q.stop:
			s.stopFlusher()
			return
		case <-evictTicker.C:
			s.evict()
			continue
		case <-q.evictNow:
			s.evict()
			continue
		case <-q.urgent:
		case <-q.wake:
			gather.Reset(interval)
			select {
			case <-gather.C:
			case <-q.urgent:
				gather.Stop()
			case <-q.stop:
				gather.Stop()
				s.stopFlusher()
				return
			}
		}
		s.commitQueued()
	}
}

// stopFlusher commits what is queued if shutdown asked for it, and marks the flusher gone.
func (s *Store) stopFlusher() {
	q := &s.queue
	q.mu.Lock()
	flush := q.flushOnStop
	q.mu.Unlock()
	if flush {
		s.commitQueued()
	}
	q.mu.Lock()
	q.stopped = true
	close(q.progress)
	q.progress = make(chan struct{})
	q.mu.Unlock()
}

// commitQueued commits every queued op in one transaction, retrying a few times; if it still
// fails, the store fails: the ops stay uncommitted, and every later call reports the failure.
func (s *Store) commitQueued() {
	q := &s.queue
	q.mu.Lock()
	if q.failed != nil {
		q.mu.Unlock()
		return
	}
	batch := q.ops
	q.ops, q.spare = q.spare[:0], nil
	q.length.Store(0)
	q.taken = q.queued
	select { // this batch answers them
	case <-q.wake:
	default:
	}
	select {
	case <-q.urgent:
	default:
	}
	q.mu.Unlock()

	var err error
	if len(batch) > 0 {
		start := time.Now()
		err = s.commitWithRetries(batch)
		if err == nil && s.onCommit != nil {
			s.onCommit(time.Since(start), len(batch))
		}
	}
	if err == nil {
		for i := range batch {
			batch[i].account.pending.Add(-1)
		}
	}

	q.mu.Lock()
	if err != nil {
		err = fmt.Errorf("committing %d queued ledger writes: %w: %w", len(batch), credits.ErrStoreUnavailable, err)
		q.failed, q.refusal = err, err
		s.failure.Store(&err)
	} else {
		q.committed += uint64(len(batch))
	}
	clear(batch) // let the strings go
	q.spare = batch[:0]
	close(q.progress)
	q.progress = make(chan struct{})
	q.mu.Unlock()
}

// commitWithRetries commits the batch, trying again after each of commitRetryDelays. Trying
// again is safe even when a commit did succeed but reported an error: every op of a batch is
// idempotent (see commitBatch).
func (s *Store) commitWithRetries(batch []pendingOp) error {
	var errs []error
	for attempt := 0; ; attempt++ {
		err := s.commitBatch(batch, attempt)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("attempt %d: %w", attempt+1, err))
		if attempt == len(commitRetryDelays) {
			return errors.Join(errs...)
		}
		time.Sleep(commitRetryDelays[attempt])
	}
}

// flushHooks let tests break the flusher; production has none.
type flushHooks struct {
	// beforeCommit runs before each attempt's COMMIT; an error rolls the attempt back.
	beforeCommit func(attempt int) error
	// afterCommit runs after each attempt's COMMIT succeeded; an error stands for a commit
	// whose outcome was lost, and makes the flusher try again.
	afterCommit func(attempt int) error
}

// commitBatch writes the batch in one transaction. Each op is idempotent, so that the batch
// can be written again after a commit whose outcome was lost: an account is inserted unless it
// exists; a grant applies only while the account's refill_period is before the grant's period;
// a settle entry is inserted unless one exists for its reservation (the ledger's unique index
// on reservation_id), and only the costs of the entries inserted are taken from the balances,
// as one "balance = balance + delta" per account, never as absolute values: a credit committed
// meanwhile is neither lost nor applied twice.
func (s *Store) commitBatch(batch []pendingOp, attempt int) (err error) {
	ctx := context.Background()
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("beginning: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()

	var stmts [len(batchSQL)]*sql.Stmt // created on first use, in the order of s.stmts.batch
	stmt := func(i int) *sql.Stmt {
		if stmts[i] == nil {
			stmts[i] = tx.StmtContext(ctx, s.stmts.batch[i])
		}
		return stmts[i]
	}
	deltas := s.batchDeltas
	clear(deltas)
	addDelta := func(a *account, d credits.Amount) error {
		sum, err := deltas[a].Add(d)
		if err != nil { // not in one step: write what was summed so far
			if _, err := stmt(batchAddBalance).ExecContext(ctx, deltas[a], a.id); err != nil {
				return balanceError(a.id, err)
			}
			sum = d
		}
		deltas[a] = sum
		return nil
	}

	// On the first attempt no settle entry of the batch can exist yet (each reservation closes
	// once, its id is new, and queued ops never outlive the process), so they are inserted
	// settleChunk rows per statement, which costs much less per row; should one exist all the
	// same, the statement fails, and so does the attempt. A retry may follow a commit whose
	// outcome was lost: it inserts the entries one by one, each unless it exists, and only
	// charges those it inserted.
	chunked := attempt == 0
	settles := s.batchSettles[:0]
	defer func() { clear(settles); s.batchSettles = settles[:0] }()
	for i := range batch {
		op := &batch[i]
		switch op.kind {
		case opCreateAccount:
			if _, err := stmt(batchCreateAccount).ExecContext(ctx, op.account.id, op.at); err != nil {
				return fmt.Errorf("creating account %s: %w", op.account.id, err)
			}
		case opGrant:
			res, err := stmt(batchGrant).ExecContext(ctx, op.amount, op.period, op.account.id)
			if err != nil {
				return fmt.Errorf("refilling %s: %w", op.account.id, balanceError(op.account.id, err))
			}
			if n, err := res.RowsAffected(); err != nil {
				return fmt.Errorf("refilling %s: %w", op.account.id, err)
			} else if n == 0 || op.amount == 0 {
				continue // granted already, or nothing to record
			}
			if _, err := stmt(batchGrantEntry).ExecContext(ctx, op.account.id, op.amount, refillReason, op.at); err != nil {
				return fmt.Errorf("refilling %s: %w", op.account.id, err)
			}
		case opSettle:
			if chunked {
				settles = append(settles, op)
				if err := addDelta(op.account, -op.amount); err != nil {
					return err
				}
				continue
			}
			res, err := stmt(batchSettleEntry).ExecContext(ctx, op.account.id, op.amount, op.reservationID,
				op.usage.Model, op.usage.Backend, op.usage.InputTokens, op.usage.OutputTokens, op.at, nullString(op.usage.KeyID),
				nullCount(op.usage.CachedInputTokens), nullCount(op.usage.CacheWriteTokens), nullCount(op.usage.ReasoningTokens),
				nullString(op.usage.ResponseID))
			if err != nil {
				return fmt.Errorf("settling %s: %w", op.reservationID, err)
			}
			if n, err := res.RowsAffected(); err != nil {
				return fmt.Errorf("settling %s: %w", op.reservationID, err)
			} else if n == 0 {
				continue // settled already
			}
			if err := addDelta(op.account, -op.amount); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown queued op %d", op.kind)
		}
	}
	for len(settles) > 0 {
		n := min(len(settles), maxSettleChunk)
		if err := s.insertSettlements(ctx, tx.StmtContext(ctx, s.stmts.settleChunks[n-1]), settles[:n]); err != nil {
			return err
		}
		settles = settles[n:]
	}
	for a, d := range deltas {
		if d == 0 {
			continue
		}
		if _, err := stmt(batchAddBalance).ExecContext(ctx, d, a.id); err != nil {
			return balanceError(a.id, err)
		}
	}

	hooks := s.hooks.Load()
	if hooks != nil && hooks.beforeCommit != nil {
		if err := hooks.beforeCommit(attempt); err != nil {
			return err
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("committing: %w", err)
	}
	if hooks != nil && hooks.afterCommit != nil {
		return hooks.afterCommit(attempt) // the deferred rollback finds the transaction done
	}
	return nil
}

// The statements of a batch, in s.stmts.batch.
const (
	batchCreateAccount = iota
	batchGrant
	batchGrantEntry
	batchSettleEntry
	batchAddBalance
)

// maxSettleChunk is the most settle entries one statement inserts: s.stmts.settleChunks[n-1]
// inserts n of them, so that a batch of up to maxSettleChunk settlements takes one statement.
const maxSettleChunk = 32

// settleColumns are the columns of a settle entry, in the order of settleArgs.
const settleColumns = `(account_id, kind, amount, reservation_id, model, backend, input_tokens, output_tokens, created_at, key_id,
	cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id)`

// settleRow is the VALUES row of a settle entry.
const settleRow = `(?, 'settle', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`

// batchSQL are the statements of a batch, by their index above.
var batchSQL = [...]string{
	batchCreateAccount: `INSERT INTO accounts (id, balance, refill_period, created_at) VALUES (?, 0, NULL, ?)
		ON CONFLICT (id) DO NOTHING`,
	batchGrant: `UPDATE accounts SET balance = balance + ?1, refill_period = ?2
		WHERE id = ?3 AND (refill_period IS NULL OR refill_period < ?2)`,
	batchGrantEntry: `INSERT INTO ledger (account_id, kind, amount, reason, created_at)
		VALUES (?, 'grant', ?, ?, ?)`,
	batchSettleEntry: `INSERT INTO ledger ` + settleColumns + ` VALUES ` + settleRow + `
		ON CONFLICT (reservation_id) WHERE reservation_id IS NOT NULL DO NOTHING`,
	batchAddBalance: `UPDATE accounts SET balance = balance + ? WHERE id = ?`,
}

// settleChunkSQL inserts n new settle entries, and fails if one exists.
func settleChunkSQL(n int) string {
	return `INSERT INTO ledger ` + settleColumns + ` VALUES ` + strings.Repeat(settleRow+`, `, n-1) + settleRow
}

// insertSettlements inserts the settle entries of ops, all new, with stmt, which inserts
// len(ops) of them, and closes stmt.
func (s *Store) insertSettlements(ctx context.Context, stmt *sql.Stmt, ops []*pendingOp) error {
	args := s.settleArgs[:0]
	for _, op := range ops {
		args = append(args, op.account.id, op.amount, op.reservationID,
			op.usage.Model, op.usage.Backend, op.usage.InputTokens, op.usage.OutputTokens, op.at, nullString(op.usage.KeyID),
			nullCount(op.usage.CachedInputTokens), nullCount(op.usage.CacheWriteTokens), nullCount(op.usage.ReasoningTokens),
			nullString(op.usage.ResponseID))
	}
	_, err := stmt.ExecContext(ctx, args...)
	clear(args)
	s.settleArgs = args[:0]
	stmt.Close()
	if err != nil {
		return fmt.Errorf("settling %d reservations: %w", len(ops), err)
	}
	return nil
}
