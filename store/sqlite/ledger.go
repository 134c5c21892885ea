package sqlite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// refillReason is the reason recorded on the grant entries of refills.
const refillReason = "refill"

// Reserve moves amount from the account's balance into a new open reservation that expires
// after ttl, in memory, under the account's lock: the refill first (when refill is not nil),
// then the reservation if the balance covers amount. Only the refill reaches the database,
// through the queue.
//
// An account that does not exist has a balance of zero: reserving from it is
// ErrInsufficientCredits with balance 0 (a zero amount creates it empty). With refill, a missing
// account is created full (balance = Cap, with a grant entry), and an account last refilled
// before refill.Period is granted, once per period, refillGrant of its durable balance: the
// balance never goes above Cap, not even once open reservations are released, and a debt is
// paid from the new allowance, never forgiven.
func (s *Store) Reserve(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill) (credits.Reservation, credits.Amount, error) {
	if amount < 0 || amount > credits.MaxAmount {
		return credits.Reservation{}, 0, fmt.Errorf("reserve %s: %w", amount, credits.ErrInvalidAmount)
	}
	if ttl <= 0 {
		return credits.Reservation{}, 0, fmt.Errorf("reserve: ttl %s is not positive", ttl)
	}
	if refill != nil && (refill.Cap < 0 || refill.Cap > credits.MaxAmount) {
		return credits.Reservation{}, 0, fmt.Errorf("reserve: refill cap %s: %w", refill.Cap, credits.ErrInvalidAmount)
	}
	if err := s.usable(ctx); err != nil {
		return credits.Reservation{}, 0, fmt.Errorf("reserve from %s: %w", account, err)
	}
	if err := s.queue.waitForRoom(ctx); err != nil {
		return credits.Reservation{}, 0, fmt.Errorf("reserve from %s: %w", account, err)
	}
	now := s.now()
	r := credits.Reservation{
		ID:        credits.NewReservationID(now),
		Account:   account,
		Amount:    amount,
		CreatedAt: fromMicros(micros(now)),
		ExpiresAt: fromMicros(micros(now.Add(ttl))),
	}
	at := micros(now)

	a, err := s.acquire(ctx, account)
	if err != nil {
		return credits.Reservation{}, 0, fail("reserve from "+string(account), err)
	}
	defer a.mu.Unlock()
	a.lastUsed = now.UnixNano()

	// What the account becomes; applied once its ops are queued.
	var (
		ops          [2]pendingOp
		nops         int
		exists       = a.exists
		durable      = a.durable
		refilled     = a.refilled
		refillPeriod = a.refillPeriod
	)
	if refill != nil && !(exists && refilled && refillPeriod >= refill.Period) {
		if !exists {
			ops[nops] = pendingOp{kind: opCreateAccount, account: a, at: at}
			nops++
			exists = true
		}
		grant := refillGrant(refill.Cap, durable) // durable is 0 for a new account: Cap
		if durable, err = durable.Add(grant); err != nil {
			return credits.Reservation{}, 0, fmt.Errorf("reserve: refilling %s: %w", account, err)
		}
		ops[nops] = pendingOp{kind: opGrant, account: a, amount: grant, period: refill.Period, at: at}
		nops++
		refilled, refillPeriod = true, refill.Period
	}
	short := false
	switch {
	case !exists && amount > 0:
		short = true // no account, no credits: nothing to create
	case !exists:
		// Nothing reserved from nothing: the reservation still needs its account.
		ops[nops] = pendingOp{kind: opCreateAccount, account: a, at: at}
		nops++
		exists = true
	case durable-a.open < amount:
		short = true
	}
	if nops > 0 {
		if err := s.queue.enqueue(ops[:nops]...); err != nil {
			return credits.Reservation{}, 0, fmt.Errorf("reserve from %s: %w", account, err)
		}
		a.exists, a.durable, a.refilled, a.refillPeriod = exists, durable, refilled, refillPeriod
	}
	if short {
		return credits.Reservation{}, a.spendable(), credits.ErrInsufficientCredits
	}
	open, err := a.open.Add(amount)
	if err != nil {
		return credits.Reservation{}, 0, fmt.Errorf("reserve: open reservations of %s: %w", account, err)
	}

	sh := s.reservations.shard(r.ID)
	sh.mu.Lock()
	sh.open[r.ID] = openReservation{account: a, amount: amount, expiresAt: micros(r.ExpiresAt)}
	sh.mu.Unlock()
	a.open = open
	a.openCount++
	return r, a.spendable(), nil
}

// refillGrant is what a period's refill grants an account of durable balance durable
// (credited - settled: its open reservations included) under the cap limit:
// limit - max(durable, 0), and nothing when durable is limit or more. After the grant the
// durable balance is min(limit, durable + limit):
//
//   - never above the cap, so that no open reservation released later (they are part of the
//     durable balance) can leave more than the cap to spend: an allowance fully reserved when
//     the period turns gets nothing more, and its credits come back on release;
//   - a debt (durable < 0, from settlements above their reservations) is carried: the whole
//     grant goes to it first, so that a debt of several allowances takes as many periods to
//     pay, instead of being wiped by the next refill.
//
// With 0 <= limit <= MaxAmount (Reserve checks it), it cannot leave int64.
func refillGrant(limit, durable credits.Amount) credits.Amount {
	if durable >= limit {
		return 0
	}
	return limit - max(durable, 0)
}

// Settle closes the reservation in memory, charging cost (the difference from the reserved
// amount goes back to, or comes from, the balance), and queues its settle entry: the balance
// it reports is already the new one, and the entry is committed within FlushInterval. Only one
// closer of a reservation wins, the others get ErrReservationClosed. A reservation past its
// expiry can still be settled until ReleaseExpired closes it.
func (s *Store) Settle(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	if cost < 0 || cost > credits.MaxAmount {
		return 0, fmt.Errorf("settle %s: cost %s: %w", reservationID, cost, credits.ErrInvalidAmount)
	}
	if err := usage.Check(); err != nil {
		return 0, fmt.Errorf("settle %s: %w", reservationID, err)
	}
	if err := s.usable(ctx); err != nil {
		return 0, fmt.Errorf("settle %s: %w", reservationID, err)
	}
	if err := s.queue.waitForRoom(ctx); err != nil {
		return 0, fmt.Errorf("settle %s: %w", reservationID, err)
	}
	now := s.now()
	settle := pendingOp{kind: opSettle, amount: cost, reservationID: reservationID, usage: usage, at: micros(now)}
	balance, _, err := s.closeReservation(ctx, reservationID, now, &settle)
	if err != nil {
		return 0, fail("settle "+reservationID, err)
	}
	return balance, nil
}

// Release closes the reservation returning all of it to the balance, in memory only: no entry
// is written, as the credits only move back from the open reservations to the balance.
func (s *Store) Release(ctx context.Context, reservationID string) (credits.Amount, error) {
	if err := s.usable(ctx); err != nil {
		return 0, fmt.Errorf("release %s: %w", reservationID, err)
	}
	balance, _, err := s.closeReservation(ctx, reservationID, s.now(), nil)
	if err != nil {
		return 0, fail("release "+reservationID, err)
	}
	return balance, nil
}

// closeReservation closes the open reservation id, queuing settle (whose account it fills in)
// when it is not nil, and reports the balance after and the amount that was reserved;
// ErrReservationClosed when it is not open.
func (s *Store) closeReservation(ctx context.Context, id string, now time.Time, settle *pendingOp) (credits.Amount, credits.Amount, error) {
	sh := s.reservations.shard(id)
	sh.mu.Lock()
	r, ok := sh.open[id]
	sh.mu.Unlock()
	if !ok {
		return 0, 0, credits.ErrReservationClosed
	}
	// Lock order: account, then reservation shard, then queue.
	a := r.account // cached for as long as the reservation is open
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.loaded { // see Credit
		if err := s.load(ctx, a); err != nil {
			return 0, 0, err
		}
	}
	sh.mu.Lock()
	if _, ok := sh.open[id]; !ok {
		sh.mu.Unlock()
		return 0, 0, credits.ErrReservationClosed // another closer was first
	}
	durable := a.durable
	if settle != nil {
		// The balance after is a.spendable() + r.amount - cost: check it and the durable
		// balance stay within int64 (the spendable one then does too, as open stays >= 0).
		var errDurable, errSpendable error
		durable, errDurable = durable.Add(-settle.amount)
		_, errSpendable = a.spendable().Add(-settle.amount)
		if errDurable != nil || errSpendable != nil {
			sh.mu.Unlock()
			return 0, 0, fmt.Errorf("balance of %s: %w", a.id, credits.ErrOverflow)
		}
		settle.account = a
		if err := s.queue.enqueue(*settle); err != nil {
			sh.mu.Unlock()
			return 0, 0, err
		}
	}
	delete(sh.open, id)
	sh.mu.Unlock()
	a.durable = durable
	a.open -= r.amount
	a.openCount--
	a.lastUsed = now.UnixNano()
	return a.spendable(), r.amount, nil
}

// ReleaseExpired releases every open reservation that expired before now, in memory, and
// reports how many it released and their total. A reservation settled or released meanwhile
// is not counted.
func (s *Store) ReleaseExpired(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	if err := s.usable(ctx); err != nil {
		return 0, 0, fmt.Errorf("release expired reservations: %w", err)
	}
	cutoff := micros(now)
	var expired []string
	for i := range s.reservations.shards {
		sh := &s.reservations.shards[i]
		sh.mu.Lock()
		for id, r := range sh.open {
			if r.expiresAt < cutoff {
				expired = append(expired, id)
			}
		}
		sh.mu.Unlock()
	}
	var (
		count    int
		total    credits.Amount
		overflow error
	)
	at := s.now()
	for _, id := range expired {
		_, amount, err := s.closeReservation(ctx, id, at, nil)
		if errors.Is(err, credits.ErrReservationClosed) {
			continue
		}
		if err != nil {
			return count, total, fail("release expired reservations", err)
		}
		count++
		if overflow == nil {
			total, overflow = total.Add(amount)
		}
	}
	if overflow != nil {
		return count, 0, fmt.Errorf("release expired reservations: total of %d: %w", count, overflow)
	}
	return count, total, nil
}

// Credit adds amount to the account, creating it if needed, and returns once the credit is
// committed and synced to disk. Everything queued before, the account's settlements included,
// is committed first, so that the ledger keeps the order of the calls. With an idempotency key,
// the key is looked up first in the same transaction: a credit of the same amount and reason
// under that key is a replay (its first entry is returned and nothing is credited again), any
// other is ErrIdempotencyConflict.
func (s *Store) Credit(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, error) {
	if amount < -credits.MaxAmount || amount > credits.MaxAmount {
		return credits.Entry{}, false, fmt.Errorf("credit %s: %w", amount, credits.ErrInvalidAmount)
	}
	if err := s.usable(ctx); err != nil {
		return credits.Entry{}, false, fmt.Errorf("credit %s: %w", account, err)
	}
	now := s.now()
	a, err := s.acquire(ctx, account)
	if err != nil {
		return credits.Entry{}, false, fail("credit "+string(account), err)
	}
	defer a.mu.Unlock()
	a.lastUsed = now.UnixNano()
	// While the account is locked, nothing more of it can be queued.
	if err := s.flush(ctx); err != nil {
		return credits.Entry{}, false, fmt.Errorf("credit %s: %w", account, err)
	}
	entry, replayed, err := s.commitCredit(ctx, a, amount, reason, idempotencyKey, now)
	if err != nil {
		err = fail("credit "+string(account), err)
		if errors.Is(err, credits.ErrStoreUnavailable) {
			// Whether the credit was committed is not known for sure: read the balance again
			// before the account is next used (nothing of it is queued: the queue was
			// committed while it was locked).
			a.loaded = false
		}
		return credits.Entry{}, false, err
	}
	if !replayed {
		a.exists = true
		a.durable += amount // checked by commitCredit
	}
	return entry, replayed, nil
}

// commitCredit writes the credit of the locked account a in one transaction, on the writer
// connection switched to synchronous=FULL for it, so that the commit is on disk when it
// returns.
func (s *Store) commitCredit(ctx context.Context, a *account, amount credits.Amount, reason, idempotencyKey string, now time.Time) (entry credits.Entry, replayed bool, err error) {
	conn, err := s.write.Conn(ctx)
	if err != nil {
		return credits.Entry{}, false, err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `PRAGMA synchronous = FULL`); err != nil {
		return credits.Entry{}, false, err
	}
	defer func() {
		// The credit stands either way: a connection left in FULL is only slower.
		_, _ = conn.ExecContext(context.Background(), `PRAGMA synchronous = NORMAL`)
	}()
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return credits.Entry{}, false, err
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()

	fingerprint := creditFingerprint(amount, reason)
	if idempotencyKey != "" {
		var hash []byte
		entry, err = scanEntry(tx.QueryRowContext(ctx, `SELECT `+entryColumns+`, request_hash FROM ledger
			WHERE account_id = ? AND idempotency_key = ?`, a.id, idempotencyKey), &hash)
		switch {
		case err == nil:
			if !bytes.Equal(hash, fingerprint) {
				return credits.Entry{}, false, credits.ErrIdempotencyConflict
			}
			return entry, true, tx.Commit()
		case !errors.Is(err, sql.ErrNoRows):
			return credits.Entry{}, false, err
		}
	}

	// The balance in memory is the one the database will hold once the queue is committed:
	// it must stay within int64, and so must the spendable one.
	_, errDurable := a.durable.Add(amount)
	_, errSpendable := a.spendable().Add(amount)
	if errDurable != nil || errSpendable != nil {
		return credits.Entry{}, false, fmt.Errorf("balance of %s: %w", a.id, credits.ErrOverflow)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO accounts (id, balance, refill_period, created_at)
		VALUES (?1, ?2, NULL, ?3) ON CONFLICT (id) DO UPDATE SET balance = balance + excluded.balance`,
		a.id, amount, micros(now)); err != nil {
		return credits.Entry{}, false, balanceError(a.id, err)
	}

	entry = credits.Entry{
		Account:        a.id,
		Kind:           credits.EntryCredit,
		Amount:         amount,
		Reason:         reason,
		IdempotencyKey: idempotencyKey,
		CreatedAt:      fromMicros(micros(now)),
	}
	var key, hash any // NULL without an idempotency key
	if idempotencyKey != "" {
		key, hash = idempotencyKey, fingerprint
	}
	if err := tx.QueryRowContext(ctx, `INSERT INTO ledger
		(account_id, kind, amount, reason, idempotency_key, request_hash, created_at)
		VALUES (?, 'credit', ?, ?, ?, ?, ?) RETURNING seq`,
		a.id, amount, reason, key, hash, micros(now)).Scan(&entry.Seq); err != nil {
		return credits.Entry{}, false, err
	}
	return entry, false, tx.Commit()
}

// balanceError tells an update of the balance that left int64 from other failures.
func balanceError(account credits.AccountID, err error) error {
	if isOverflow(err) {
		return fmt.Errorf("balance of %s: %w", account, credits.ErrOverflow)
	}
	return err
}

// creditFingerprint identifies the parameters of a credit, to tell a replay of an idempotent
// credit from another credit reusing its key.
func creditFingerprint(amount credits.Amount, reason string) []byte {
	h := sha256.New()
	h.Write([]byte("credit\x00"))
	h.Write(strconv.AppendInt(nil, int64(amount), 10))
	h.Write([]byte{0})
	h.Write([]byte(reason))
	return h.Sum(nil)
}

// Balance is the account's spendable balance (open reservations excluded), read from memory,
// or ErrUnknownAccount.
func (s *Store) Balance(ctx context.Context, account credits.AccountID) (credits.Amount, error) {
	if err := s.usable(ctx); err != nil {
		return 0, fmt.Errorf("balance of %s: %w", account, err)
	}
	a, err := s.acquire(ctx, account)
	if err != nil {
		return 0, fail("balance of "+string(account), err)
	}
	defer a.mu.Unlock()
	a.lastUsed = s.now().UnixNano()
	if !a.exists {
		return 0, credits.ErrUnknownAccount
	}
	return a.spendable(), nil
}

// entryColumns are the columns scanEntry reads.
const entryColumns = `seq, account_id, kind, amount, reason, reservation_id, idempotency_key,
	model, backend, input_tokens, output_tokens, created_at, key_id,
	cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id`

// rowScanner is a *sql.Row or *sql.Rows.
type rowScanner interface {
	Scan(dest ...any) error
}

// scanEntry reads a ledger row selected with entryColumns, followed by the extra columns.
func scanEntry(row rowScanner, extra ...any) (credits.Entry, error) {
	var (
		e                                             credits.Entry
		reservationID, idempotencyKey, model, backend sql.NullString
		keyID, responseID                             sql.NullString
		inputTokens, outputTokens                     sql.NullInt64
		cachedInput, cacheWrite, reasoning            sql.NullInt64
		createdAt                                     int64
	)
	dest := append([]any{&e.Seq, &e.Account, &e.Kind, &e.Amount, &e.Reason, &reservationID, &idempotencyKey,
		&model, &backend, &inputTokens, &outputTokens, &createdAt, &keyID,
		&cachedInput, &cacheWrite, &reasoning, &responseID}, extra...)
	if err := row.Scan(dest...); err != nil {
		return credits.Entry{}, err
	}
	e.ReservationID = reservationID.String
	e.IdempotencyKey = idempotencyKey.String
	e.CreatedAt = fromMicros(createdAt)
	if e.Kind == credits.EntrySettle {
		e.Usage = &credits.Usage{
			Model:        model.String,
			Backend:      backend.String,
			InputTokens:  inputTokens.Int64,
			OutputTokens: outputTokens.Int64,
			KeyID:        keyID.String,

			CachedInputTokens: cachedInput.Int64,
			CacheWriteTokens:  cacheWrite.Int64,
			ReasoningTokens:   reasoning.Int64,
			ResponseID:        responseID.String,
		}
	}
	return e, nil
}

// Entries lists the account's newest entries first, at most limit (none when limit <= 0),
// once everything queued before the call is committed.
func (s *Store) Entries(ctx context.Context, account credits.AccountID, limit int) ([]credits.Entry, error) {
	if err := s.usable(ctx); err != nil {
		return nil, fmt.Errorf("entries of %s: %w", account, err)
	}
	if limit <= 0 {
		return nil, nil
	}
	if err := s.flush(ctx); err != nil {
		return nil, fmt.Errorf("entries of %s: %w", account, err)
	}
	rows, err := s.read.QueryContext(ctx, `SELECT `+entryColumns+` FROM ledger
		WHERE account_id = ? ORDER BY seq DESC LIMIT ?`, account, limit)
	if err != nil {
		return nil, fail("entries of "+string(account), err)
	}
	defer rows.Close()
	var entries []credits.Entry
	for rows.Next() {
		e, err := scanEntry(rows)
		if err != nil {
			return nil, fail("entries of "+string(account), err)
		}
		entries = append(entries, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fail("entries of "+string(account), err)
	}
	return entries, nil
}

// Audit returns the account's books, or ErrUnknownAccount. With the account locked, so that
// nothing of it can change meanwhile, it waits until the queue is committed, then reads the
// sums of its entries and its balance from the database in one statement; Open is the sum of
// its open reservations, in memory, and Balance the database's less Open.
func (s *Store) Audit(ctx context.Context, account credits.AccountID) (credits.Audit, error) {
	if err := s.usable(ctx); err != nil {
		return credits.Audit{}, fmt.Errorf("audit of %s: %w", account, err)
	}
	a, err := s.acquire(ctx, account)
	if err != nil {
		return credits.Audit{}, fail("audit of "+string(account), err)
	}
	defer a.mu.Unlock()
	a.lastUsed = s.now().UnixNano()
	if !a.exists {
		return credits.Audit{}, credits.ErrUnknownAccount
	}
	if err := s.flush(ctx); err != nil {
		return credits.Audit{}, fmt.Errorf("audit of %s: %w", account, err)
	}
	var (
		books   credits.Audit
		balance credits.Amount
	)
	err = s.read.QueryRowContext(ctx, `SELECT
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind IN ('credit', 'grant')),
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		a.balance
		FROM accounts AS a WHERE a.id = ?`, account).Scan(&books.Credited, &books.Settled, &balance)
	if errors.Is(err, sql.ErrNoRows) {
		err = errors.New("account is in memory but not in the database")
	}
	if err != nil {
		return credits.Audit{}, fail("audit of "+string(account), err)
	}
	books.Open = a.open
	books.Balance = balance - a.open
	return books, nil
}

// ResponseOwner is the owner and backend of the response id, read from the first settle
// entry that recorded it; credits.ErrUnknownResponse when none did. A settlement still
// queued is waited for before the answer is no.
func (s *Store) ResponseOwner(ctx context.Context, responseID string) (credits.ResponseOwner, error) {
	if err := s.usable(ctx); err != nil {
		return credits.ResponseOwner{}, fmt.Errorf("response owner: %w", err)
	}
	for flushed := false; ; flushed = true {
		var o credits.ResponseOwner
		var backend, keyID, model sql.NullString
		err := s.read.QueryRowContext(ctx, `SELECT account_id, backend, key_id, model,
			coalesce(input_tokens, 0) + coalesce(output_tokens, 0) FROM ledger
			WHERE response_id = ? ORDER BY seq LIMIT 1`, responseID).Scan(&o.Account, &backend, &keyID, &model, &o.ContextTokens)
		switch {
		case err == nil:
			o.Backend, o.KeyID, o.Model = backend.String, keyID.String, model.String
			return o, nil
		case !errors.Is(err, sql.ErrNoRows):
			return credits.ResponseOwner{}, fail("response owner", err)
		case flushed:
			return credits.ResponseOwner{}, credits.ErrUnknownResponse
		}
		if err := s.flush(ctx); err != nil {
			return credits.ResponseOwner{}, fmt.Errorf("response owner: %w", err)
		}
	}
}
