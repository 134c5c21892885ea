package postgres

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// refillReason is the reason recorded on the grant entries of refills.
const refillReason = "refill"

// newReservationID is an id sorting by time, then 128 random bits (credits.NewReservationID):
// the ledger's unique index on reservation_id grows at its end.
func newReservationID() string { return credits.NewReservationID(time.Now()) }

// refillStatement creates the account full (balance = cap) or, when it was last refilled
// before the period, grants it cap - max(balance, 0), nothing at cap or above (see
// credits.Refill): one conditional upsert, which locks the row, then the grant entry when
// something was granted. The SET clauses all see the row as it was, so last_grant is what this
// refill added.
const refillStatement = `WITH refill AS (
	INSERT INTO accounts AS a (id, balance, refill_period, last_grant, created_at)
	VALUES ($1, $2, $3, $2, $4)
	ON CONFLICT (id) DO UPDATE SET
		last_grant    = CASE WHEN a.balance >= $2 THEN 0 ELSE $2 - GREATEST(a.balance, 0) END,
		balance       = a.balance + CASE WHEN a.balance >= $2 THEN 0 ELSE $2 - GREATEST(a.balance, 0) END,
		refill_period = $3
	WHERE a.refill_period IS NULL OR a.refill_period < $3
	RETURNING id, last_grant
)
INSERT INTO ledger (account_id, kind, amount, reason, created_at)
SELECT id, 'grant', last_grant, $5, $4 FROM refill WHERE last_grant > 0`

// reserveStatement moves amount from the spendable balance into the new reservation, if the
// balance covers it: a conditional UPDATE, and the reservation's row only when it matched.
const reserveStatement = `WITH held AS (
	UPDATE accounts SET reserved = reserved + $2
	WHERE id = $1 AND balance - reserved >= $2
	RETURNING id, balance - reserved AS spendable
), opened AS (
	INSERT INTO reservations (id, account_id, amount, created_at, expires_at)
	SELECT $3, id, $2, $4, $5 FROM held
)
SELECT spendable FROM held`

// Reserve moves amount from the account's balance into a new open reservation that expires
// after ttl, in one transaction: the refill first (when refill is not nil), then the
// reservation if the balance covers amount.
//
// An account that does not exist has a balance of zero: reserving from it is
// ErrInsufficientCredits with balance 0 (a zero amount creates it empty). With refill, a missing
// account is created full (balance = Cap, with a grant entry).
//
// With leasing (Options.LeaseSize), a reservation of at most the lease size is carved from
// this instance's lease on the account without a round trip (see lease.go).
func (s *Store) Reserve(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill) (credits.Reservation, credits.Amount, error) {
	if err := checkReserve(amount, ttl, refill); err != nil {
		return credits.Reservation{}, 0, err
	}
	if s.lease != nil {
		return s.lease.reserve(ctx, account, amount, ttl, refill)
	}
	return s.reserveDirect(ctx, account, amount, ttl, refill, nil)
}

// checkReserve refuses the arguments of a reservation no store can make.
func checkReserve(amount credits.Amount, ttl time.Duration, refill *credits.Refill) error {
	if amount < 0 || amount > credits.MaxAmount {
		return fmt.Errorf("reserve %s: %w", amount, credits.ErrInvalidAmount)
	}
	if ttl <= 0 {
		return fmt.Errorf("reserve: ttl %s is not positive", ttl)
	}
	if refill != nil && (refill.Cap < 0 || refill.Cap > credits.MaxAmount) {
		return fmt.Errorf("reserve: refill cap %s: %w", refill.Cap, credits.ErrInvalidAmount)
	}
	return nil
}

// reserveDirect reserves in the database, in one transaction that runs before (when not nil)
// first: the lease layer returns this instance's unused lease on the account with it.
func (s *Store) reserveDirect(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill, before func(pgx.Tx) error) (credits.Reservation, credits.Amount, error) {
	now := time.Now().UTC().Truncate(time.Microsecond) // what timestamptz keeps
	r := credits.Reservation{
		ID:        newReservationID(),
		Account:   account,
		Amount:    amount,
		CreatedAt: now,
		ExpiresAt: now.Add(ttl).Truncate(time.Microsecond),
	}
	var (
		balance credits.Amount
		short   bool
	)
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		short = false
		if before != nil {
			if err := before(tx); err != nil {
				return err
			}
		}
		if refill != nil {
			if _, err := tx.Exec(ctx, refillStatement, account, refill.Cap, refill.Period, now, refillReason); err != nil {
				return err
			}
		} else if amount == 0 {
			// Nothing reserved from nothing: the reservation still needs its account.
			if _, err := tx.Exec(ctx, `INSERT INTO accounts (id, balance, created_at) VALUES ($1, 0, $2)
				ON CONFLICT (id) DO NOTHING`, account, now); err != nil {
				return err
			}
		}
		err := tx.QueryRow(ctx, reserveStatement, account, amount, r.ID, r.CreatedAt, r.ExpiresAt).Scan(&balance)
		if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		// Not enough (or no account): report the balance that was not enough. The refill, if
		// any, stands.
		short = true
		err = tx.QueryRow(ctx, `SELECT balance - reserved FROM accounts WHERE id = $1`, account).Scan(&balance)
		if errors.Is(err, pgx.ErrNoRows) {
			balance, err = 0, nil
		}
		return err
	})
	if err != nil {
		return credits.Reservation{}, 0, fail("reserve from "+string(account), err)
	}
	if short {
		return credits.Reservation{}, balance, credits.ErrInsufficientCredits
	}
	return r, balance, nil
}

// settleStatement closes the reservation $1 charging $2: the DELETE that gets the row is the
// one closer that wins, and the balance change and the settle entry are made only with it, in
// the same statement.
const settleStatement = `WITH closed AS (
	DELETE FROM reservations WHERE id = $1 RETURNING account_id, amount
), charged AS (
	UPDATE accounts AS a SET balance = a.balance - $2, reserved = a.reserved - closed.amount
	FROM closed WHERE a.id = closed.account_id
	RETURNING a.id, a.balance - a.reserved AS spendable
), entry AS (
	INSERT INTO ledger (account_id, kind, amount, reservation_id, model, backend,
		input_tokens, output_tokens, key_id, created_at,
		cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id)
	SELECT account_id, 'settle', $2, $1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM closed
)
SELECT id, spendable FROM charged`

// releaseStatement closes the reservation $1 returning all of it to the balance: no entry is
// written, as the credits only move back from the open reservations to the balance.
const releaseStatement = `WITH closed AS (
	DELETE FROM reservations WHERE id = $1 RETURNING account_id, amount
)
UPDATE accounts AS a SET reserved = a.reserved - closed.amount
FROM closed WHERE a.id = closed.account_id
RETURNING a.id, a.balance - a.reserved`

// Settle closes the reservation, charging cost (the difference from the reserved amount goes
// back to, or comes from, the balance) and appending its settle entry, in one statement. Only
// one closer of a reservation wins, the others get ErrReservationClosed. A reservation past
// its expiry can still be settled until ReleaseExpired closes it.
//
// With leasing, a reservation carved from this instance's lease is closed in memory, and its
// settle entry is committed by the flusher with others a few milliseconds later.
func (s *Store) Settle(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	if err := checkSettle(reservationID, cost, usage); err != nil {
		return 0, err
	}
	if s.lease != nil {
		return s.lease.settle(ctx, reservationID, cost, usage)
	}
	_, balance, err := s.settleDirect(ctx, reservationID, cost, usage)
	return balance, err
}

// checkSettle refuses the arguments of a settlement no store can make.
func checkSettle(reservationID string, cost credits.Amount, usage credits.Usage) error {
	if cost < 0 || cost > credits.MaxAmount {
		return fmt.Errorf("settle %s: cost %s: %w", reservationID, cost, credits.ErrInvalidAmount)
	}
	if err := usage.Check(); err != nil {
		return fmt.Errorf("settle %s: %w", reservationID, err)
	}
	return nil
}

// settleDirect settles a reservation of the database; it reports its account too.
func (s *Store) settleDirect(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.AccountID, credits.Amount, error) {
	var (
		account credits.AccountID
		balance credits.Amount
	)
	err := s.pool.QueryRow(ctx, settleStatement, reservationID, cost,
		nullable(usage.Model), nullable(usage.Backend), usage.InputTokens, usage.OutputTokens,
		nullable(usage.KeyID), time.Now().UTC(), nullCount(usage.CachedInputTokens), nullCount(usage.CacheWriteTokens),
		nullCount(usage.ReasoningTokens), nullable(usage.ResponseID)).Scan(&account, &balance)
	if errors.Is(err, pgx.ErrNoRows) {
		err = credits.ErrReservationClosed
	}
	if err != nil {
		return "", 0, fail("settle "+reservationID, err)
	}
	return account, balance, nil
}

// Release closes the reservation returning all of it to the balance, in one statement.
// With leasing, a reservation carved from this instance's lease goes back to the lease.
func (s *Store) Release(ctx context.Context, reservationID string) (credits.Amount, error) {
	if s.lease != nil {
		return s.lease.release(ctx, reservationID)
	}
	_, balance, err := s.releaseDirect(ctx, reservationID)
	return balance, err
}

// releaseDirect releases a reservation of the database; it reports its account too.
func (s *Store) releaseDirect(ctx context.Context, reservationID string) (credits.AccountID, credits.Amount, error) {
	var (
		account credits.AccountID
		balance credits.Amount
	)
	err := s.pool.QueryRow(ctx, releaseStatement, reservationID).Scan(&account, &balance)
	if errors.Is(err, pgx.ErrNoRows) {
		err = credits.ErrReservationClosed
	}
	if err != nil {
		return "", 0, fail("release "+reservationID, err)
	}
	return account, balance, nil
}

// expiredBatch bounds the reservations one transaction of ReleaseExpired closes.
const expiredBatch = 1000

// ReleaseExpired releases every open reservation that expired before now and reports how many
// it released and their total. Whichever instance's DELETE gets a reservation releases it:
// rows another transaction has locked (a settlement, another instance's sweep) are skipped,
// and the accounts are then updated in the order of their ids, so that sweeps never wait on
// each other in a cycle.
//
// With leasing, it releases this instance's expired local reservations too, and the expired
// leases of other instances (see (*leaser).releaseExpired).
func (s *Store) ReleaseExpired(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	if s.lease != nil {
		return s.lease.releaseExpired(ctx, now)
	}
	return s.releaseExpiredDirect(ctx, now)
}

// releaseExpiredDirect releases the expired reservations of the database.
func (s *Store) releaseExpiredDirect(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	var (
		count int
		total credits.Amount
	)
	for {
		n, sum, err := s.releaseExpiredBatch(ctx, now)
		if err != nil {
			return count, total, fail("release expired reservations", err)
		}
		count += n
		if total, err = total.Add(sum); err != nil {
			return count, 0, fmt.Errorf("release expired reservations: total of %d: %w", count, err)
		}
		if n < expiredBatch {
			return count, total, nil
		}
	}
}

// releaseExpiredBatch releases at most expiredBatch expired reservations in one transaction.
func (s *Store) releaseExpiredBatch(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	var (
		count int
		total credits.Amount
	)
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		count, total = 0, 0
		rows, err := tx.Query(ctx, `DELETE FROM reservations WHERE id IN (
				SELECT id FROM reservations WHERE expires_at < $1
				ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
			RETURNING account_id, amount`, now, expiredBatch)
		if err != nil {
			return err
		}
		byAccount := map[string]credits.Amount{}
		var (
			account string
			amount  credits.Amount
		)
		_, err = pgx.ForEachRow(rows, []any{&account, &amount}, func() error {
			count++
			var err error
			if byAccount[account], err = byAccount[account].Add(amount); err != nil {
				return err
			}
			total, err = total.Add(amount)
			return err
		})
		if err != nil {
			return err
		}
		ids := make([]string, 0, len(byAccount))
		for id := range byAccount {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		batch := &pgx.Batch{}
		for _, id := range ids {
			batch.Queue(`UPDATE accounts SET reserved = reserved - $2 WHERE id = $1`, id, byAccount[id])
		}
		return tx.SendBatch(ctx, batch).Close()
	})
	return count, total, err
}

// Credit adds amount to the account, creating it if needed, in one transaction. With an
// idempotency key, the entry is inserted first, unless the key exists (a concurrent insert of
// the same key waits for the other to commit): a credit of the same amount and reason under
// that key is a replay (its first entry is returned and nothing is credited again), any other
// is ErrIdempotencyConflict.
//
// With leasing, the settlements queued before it are committed first (so that the entries
// keep the order of the calls), and the credit goes to the balance, not to a lease.
func (s *Store) Credit(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, error) {
	if s.lease != nil {
		return s.lease.credit(ctx, account, amount, reason, idempotencyKey)
	}
	entry, replayed, _, err := s.creditDirect(ctx, account, amount, reason, idempotencyKey)
	return entry, replayed, err
}

// creditDirect credits the account in the database; it reports the spendable balance after
// (as of the replayed entry's account, for a replay: not read).
func (s *Store) creditDirect(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, credits.Amount, error) {
	if amount < -credits.MaxAmount || amount > credits.MaxAmount {
		return credits.Entry{}, false, 0, fmt.Errorf("credit %s: %w", amount, credits.ErrInvalidAmount)
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	entry := credits.Entry{
		Account:        account,
		Kind:           credits.EntryCredit,
		Amount:         amount,
		Reason:         reason,
		IdempotencyKey: idempotencyKey,
		CreatedAt:      now,
	}
	var (
		replayed  bool
		spendable credits.Amount
	)
	fingerprint := creditFingerprint(amount, reason)
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		replayed = false
		if _, err := tx.Exec(ctx, `INSERT INTO accounts (id, balance, created_at) VALUES ($1, 0, $2)
			ON CONFLICT (id) DO NOTHING`, account, now); err != nil {
			return err
		}
		var key, hash any // NULL without an idempotency key
		if idempotencyKey != "" {
			key, hash = idempotencyKey, fingerprint
		}
		err := tx.QueryRow(ctx, `INSERT INTO ledger
			(account_id, kind, amount, reason, idempotency_key, request_hash, created_at)
			VALUES ($1, 'credit', $2, $3, $4, $5, $6)
			ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
			RETURNING seq`, account, amount, reason, key, hash, now).Scan(&entry.Seq)
		if errors.Is(err, pgx.ErrNoRows) {
			// The key was used: a replay, or a conflict.
			var first []byte
			entry, err = scanEntry(tx.QueryRow(ctx, `SELECT `+entryColumns+`, request_hash FROM ledger
				WHERE account_id = $1 AND idempotency_key = $2`, account, idempotencyKey), &first)
			if err != nil {
				return err
			}
			if !bytes.Equal(first, fingerprint) {
				return credits.ErrIdempotencyConflict
			}
			replayed = true
			return nil
		}
		if err != nil {
			return err
		}
		// The spendable balance is checked too: it must stay within BIGINT.
		return tx.QueryRow(ctx, `UPDATE accounts SET balance = balance + $2 WHERE id = $1
			RETURNING balance - reserved`, account, amount).Scan(&spendable)
	})
	if err != nil {
		return credits.Entry{}, false, 0, fail("credit "+string(account), err)
	}
	return entry, replayed, spendable, nil
}

// creditFingerprint identifies the parameters of a credit, to tell a replay of an idempotent
// credit from another credit reusing its key (the same as the embedded store's).
func creditFingerprint(amount credits.Amount, reason string) []byte {
	h := sha256.New()
	h.Write([]byte("credit\x00"))
	h.Write(strconv.AppendInt(nil, int64(amount), 10))
	h.Write([]byte{0})
	h.Write([]byte(reason))
	return h.Sum(nil)
}

// Balance is the account's spendable balance (open reservations excluded), or
// ErrUnknownAccount.
//
// With leasing, it is the balance as if this instance's unused leases on the account were
// returned and its queued settlements committed (see (*leaser).balance).
func (s *Store) Balance(ctx context.Context, account credits.AccountID) (credits.Amount, error) {
	if s.lease != nil {
		return s.lease.balance(ctx, account)
	}
	var balance credits.Amount
	err := s.pool.QueryRow(ctx, `SELECT balance - reserved FROM accounts WHERE id = $1`, account).Scan(&balance)
	if errors.Is(err, pgx.ErrNoRows) {
		err = credits.ErrUnknownAccount
	}
	if err != nil {
		return 0, fail("balance of "+string(account), err)
	}
	return balance, nil
}

// entryColumns are the columns scanEntry reads.
const entryColumns = `seq, account_id, kind, amount, reason, reservation_id, idempotency_key,
	model, backend, input_tokens, output_tokens, created_at, key_id,
	cached_input_tokens, cache_write_tokens, reasoning_tokens, response_id`

// scanEntry reads a ledger row selected with entryColumns, followed by the extra columns.
func scanEntry(row pgx.Row, extra ...any) (credits.Entry, error) {
	var (
		e                                                    credits.Entry
		reservationID, idempotencyKey, model, backend, keyID *string
		inputTokens, outputTokens                            *int64
		cachedInput, cacheWrite, reasoning                   *int64
		responseID                                           *string
	)
	dest := append([]any{&e.Seq, &e.Account, &e.Kind, &e.Amount, &e.Reason, &reservationID, &idempotencyKey,
		&model, &backend, &inputTokens, &outputTokens, &e.CreatedAt, &keyID,
		&cachedInput, &cacheWrite, &reasoning, &responseID}, extra...)
	if err := row.Scan(dest...); err != nil {
		return credits.Entry{}, err
	}
	e.CreatedAt = e.CreatedAt.UTC()
	e.ReservationID = deref(reservationID)
	e.IdempotencyKey = deref(idempotencyKey)
	if e.Kind == credits.EntrySettle {
		e.Usage = &credits.Usage{
			Model:        deref(model),
			Backend:      deref(backend),
			InputTokens:  deref(inputTokens),
			OutputTokens: deref(outputTokens),
			KeyID:        deref(keyID),

			CachedInputTokens: deref(cachedInput),
			CacheWriteTokens:  deref(cacheWrite),
			ReasoningTokens:   deref(reasoning),
			ResponseID:        deref(responseID),
		}
	}
	return e, nil
}

// Entries lists the account's newest entries first, at most limit (none when limit <= 0).
// With leasing, the settlements queued before the call are committed first.
func (s *Store) Entries(ctx context.Context, account credits.AccountID, limit int) ([]credits.Entry, error) {
	if limit <= 0 {
		return nil, nil
	}
	if s.lease != nil {
		if err := s.lease.flush(ctx); err != nil {
			return nil, fmt.Errorf("entries of %s: %w", account, err)
		}
	}
	rows, err := s.pool.Query(ctx, `SELECT `+entryColumns+` FROM ledger
		WHERE account_id = $1 ORDER BY seq DESC LIMIT $2`, account, limit)
	if err != nil {
		return nil, fail("entries of "+string(account), err)
	}
	entries, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (credits.Entry, error) {
		return scanEntry(row)
	})
	if err != nil {
		return nil, fail("entries of "+string(account), err)
	}
	return entries, nil
}

// Audit returns the account's books, or ErrUnknownAccount, read in one statement (one
// snapshot): the sums of its entries, its balance, and Open as the sum of its open
// reservations' and leases' rows, so that the identity checks the account's running totals
// against the rows they sum.
//
// With leasing, the books are this instance's view (see (*leaser).audit): open includes the
// leases of other instances, and this instance's open local reservations.
func (s *Store) Audit(ctx context.Context, account credits.AccountID) (credits.Audit, error) {
	if s.lease != nil {
		return s.lease.audit(ctx, account)
	}
	db, err := s.auditDB(ctx, account, nil)
	if err != nil {
		return credits.Audit{}, err
	}
	return credits.Audit{Credited: db.credited, Settled: db.settled, Open: db.reservations + db.leases, Balance: db.spendable}, nil
}

// dbBooks are an account's books as the database has them, read in one snapshot.
type dbBooks struct {
	credited, settled credits.Amount
	reservations      credits.Amount // the sum of its open reservations' rows
	leases            credits.Amount // the sum of its leases' rows, every instance's
	mine              credits.Amount // the sum of the leases named in the call
	spendable         credits.Amount // balance - reserved
}

// auditDB reads the account's books from the database in one statement, or ErrUnknownAccount;
// mine sums the leases of the ids named.
func (s *Store) auditDB(ctx context.Context, account credits.AccountID, mine []string) (dbBooks, error) {
	var (
		db                dbBooks
		balance, reserved credits.Amount
	)
	if mine == nil {
		mine = []string{}
	}
	err := s.pool.QueryRow(ctx, `SELECT
		(SELECT coalesce(sum(amount), 0)::bigint FROM ledger WHERE account_id = a.id AND kind IN ('credit', 'grant')),
		(SELECT coalesce(sum(amount), 0)::bigint FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		(SELECT coalesce(sum(amount), 0)::bigint FROM reservations WHERE account_id = a.id),
		(SELECT coalesce(sum(amount), 0)::bigint FROM leases WHERE account_id = a.id),
		(SELECT coalesce(sum(amount), 0)::bigint FROM leases WHERE account_id = a.id AND id = ANY($2)),
		a.balance, a.reserved
		FROM accounts AS a WHERE a.id = $1`, account, mine).Scan(&db.credited, &db.settled, &db.reservations,
		&db.leases, &db.mine, &balance, &reserved)
	if errors.Is(err, pgx.ErrNoRows) {
		err = credits.ErrUnknownAccount
	}
	if err != nil {
		return dbBooks{}, fail("audit of "+string(account), err)
	}
	db.spendable = balance - reserved
	return db, nil
}

// nullable is s, or NULL when it is empty.
// nullCount stores a token count that is mostly zero: zero as NULL.
func nullCount(n int64) *int64 {
	if n == 0 {
		return nil
	}
	return &n
}

func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// deref is *p, or the zero value when p is nil.
func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// ResponseOwner is the owner and backend of the response id, read from the first settle
// entry that recorded it; credits.ErrUnknownResponse when none did. The gateway asks it only
// when its own memory of the responses it served misses.
func (s *Store) ResponseOwner(ctx context.Context, responseID string) (credits.ResponseOwner, error) {
	if s.lease != nil {
		// A settlement still queued is committed first, as for Entries.
		if err := s.lease.flush(ctx); err != nil {
			return credits.ResponseOwner{}, fmt.Errorf("response owner: %w", err)
		}
	}
	var o credits.ResponseOwner
	var backend, keyID, model *string
	err := s.pool.QueryRow(ctx, `SELECT account_id, backend, key_id, model,
		coalesce(input_tokens, 0) + coalesce(output_tokens, 0) FROM ledger
		WHERE response_id = $1 ORDER BY seq LIMIT 1`, responseID).Scan(&o.Account, &backend, &keyID, &model, &o.ContextTokens)
	if errors.Is(err, pgx.ErrNoRows) {
		return credits.ResponseOwner{}, credits.ErrUnknownResponse
	}
	if err != nil {
		return credits.ResponseOwner{}, fail("response owner", err)
	}
	o.Backend, o.KeyID, o.Model = deref(backend), deref(keyID), deref(model)
	return o, nil
}
