package sqlite

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// refillReason is the reason recorded on the grant entries of refills.
const refillReason = "refill"

// Reserve moves amount from the account's balance into a new open reservation that expires
// after ttl, in one write transaction: the refill (when refill is not nil), then a conditional
// decrement that only succeeds when the balance covers amount, then the reservation.
//
// An account that does not exist has a balance of zero: reserving from it is
// ErrInsufficientCredits with balance 0 (a zero amount creates it empty). With refill, a missing
// account is created full (balance = Cap, with a grant entry), and an account last refilled
// before refill.Period is filled up to Cap, never above, once per period.
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
	now := s.now()
	r := credits.Reservation{
		ID:        rand.Text(),
		Account:   account,
		Amount:    amount,
		CreatedAt: fromMicros(micros(now)),
		ExpiresAt: fromMicros(micros(now.Add(ttl))),
	}
	var (
		balance credits.Amount
		short   bool // the balance did not cover amount: commit the refill alone
	)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		balance, short = 0, false
		if refill != nil {
			if err := s.refill(ctx, tx, account, *refill, now); err != nil {
				return err
			}
		}
		err := tx.StmtContext(ctx, s.stmts.takeBalance).QueryRowContext(ctx, amount, account).Scan(&balance)
		if errors.Is(err, sql.ErrNoRows) {
			// Either the balance is short or there is no account.
			var period sql.NullInt64
			err = tx.StmtContext(ctx, s.stmts.accountState).QueryRowContext(ctx, account).Scan(&balance, &period)
			switch {
			case err == nil:
				short = true
				return nil
			case !errors.Is(err, sql.ErrNoRows):
				return err
			case amount > 0:
				balance, short = 0, true
				return nil
			}
			// Nothing reserved from nothing: the reservation still needs its account.
			balance = 0
			if err := insertAccount(ctx, tx, account, 0, sql.NullInt64{}, now); err != nil {
				return err
			}
		} else if err != nil {
			return err
		}
		_, err = tx.StmtContext(ctx, s.stmts.insertReservation).ExecContext(ctx,
			r.ID, account, amount, micros(r.CreatedAt), micros(r.ExpiresAt))
		return err
	})
	if err != nil {
		return credits.Reservation{}, 0, fail("reserve", err)
	}
	if short {
		return credits.Reservation{}, balance, credits.ErrInsufficientCredits
	}
	return r, balance, nil
}

// refill fills the account up for the period r.Period inside tx, at most once per period.
func (s *Store) refill(ctx context.Context, tx *sql.Tx, account credits.AccountID, r credits.Refill, now time.Time) error {
	var (
		balance credits.Amount
		period  sql.NullInt64
		grant   credits.Amount
	)
	err := tx.StmtContext(ctx, s.stmts.accountState).QueryRowContext(ctx, account).Scan(&balance, &period)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		grant = r.Cap
		if err := insertAccount(ctx, tx, account, r.Cap, sql.NullInt64{Int64: r.Period, Valid: true}, now); err != nil {
			return err
		}
	case err != nil:
		return err
	case period.Valid && period.Int64 >= r.Period:
		return nil // already refilled in this period
	default:
		if balance < r.Cap {
			if balance < r.Cap-math.MaxInt64 { // Cap - balance would leave int64
				return fmt.Errorf("refilling %s: %w", account, credits.ErrOverflow)
			}
			grant = r.Cap - balance
		}
		if _, err := tx.ExecContext(ctx, `UPDATE accounts SET balance = balance + ?, refill_period = ? WHERE id = ?`,
			grant, r.Period, account); err != nil {
			return err
		}
	}
	if grant == 0 {
		return nil
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO ledger (account_id, kind, amount, reason, created_at)
		VALUES (?, 'grant', ?, ?, ?)`, account, grant, refillReason, micros(now))
	return err
}

// insertAccount creates an account.
func insertAccount(ctx context.Context, tx *sql.Tx, account credits.AccountID, balance credits.Amount, refillPeriod sql.NullInt64, now time.Time) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO accounts (id, balance, refill_period, created_at) VALUES (?, ?, ?, ?)`,
		account, balance, refillPeriod, micros(now))
	return err
}

// Settle closes the reservation in one write transaction: it deletes it (which only one closer
// can do: the others find no row and get ErrReservationClosed), returns reserved - cost to the
// balance and appends a settle entry of cost with the usage. A reservation past its expiry can
// still be settled until ReleaseExpired closes it.
func (s *Store) Settle(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	if cost < 0 || cost > credits.MaxAmount {
		return 0, fmt.Errorf("settle %s: cost %s: %w", reservationID, cost, credits.ErrInvalidAmount)
	}
	if usage.InputTokens < 0 || usage.OutputTokens < 0 {
		return 0, fmt.Errorf("settle %s: negative token counts %d, %d", reservationID, usage.InputTokens, usage.OutputTokens)
	}
	now := micros(s.now())
	var balance credits.Amount
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		account, reserved, err := s.closeReservation(ctx, tx, reservationID)
		if err != nil {
			return err
		}
		if err := tx.StmtContext(ctx, s.stmts.addBalance).QueryRowContext(ctx, reserved-cost, account).Scan(&balance); err != nil {
			return balanceError(account, err)
		}
		_, err = tx.StmtContext(ctx, s.stmts.insertSettlement).ExecContext(ctx,
			account, cost, reservationID, usage.Model, usage.Backend, usage.InputTokens, usage.OutputTokens, now)
		return err
	})
	if err != nil {
		return 0, fail("settle "+reservationID, err)
	}
	return balance, nil
}

// Release closes the reservation returning all of it to the balance; no entry is written, as
// the credits only move back from the open reservations to the balance.
func (s *Store) Release(ctx context.Context, reservationID string) (credits.Amount, error) {
	var balance credits.Amount
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		account, reserved, err := s.closeReservation(ctx, tx, reservationID)
		if err != nil {
			return err
		}
		if err := tx.StmtContext(ctx, s.stmts.addBalance).QueryRowContext(ctx, reserved, account).Scan(&balance); err != nil {
			return balanceError(account, err)
		}
		return nil
	})
	if err != nil {
		return 0, fail("release "+reservationID, err)
	}
	return balance, nil
}

// closeReservation deletes the open reservation and reports its account and amount, or
// ErrReservationClosed when it is not open.
func (s *Store) closeReservation(ctx context.Context, tx *sql.Tx, id string) (credits.AccountID, credits.Amount, error) {
	var (
		account  credits.AccountID
		reserved credits.Amount
	)
	err := tx.StmtContext(ctx, s.stmts.closeReservation).QueryRowContext(ctx, id).Scan(&account, &reserved)
	if errors.Is(err, sql.ErrNoRows) {
		return "", 0, credits.ErrReservationClosed
	}
	return account, reserved, err
}

// balanceError tells an update of the balance that left int64 from other failures.
func balanceError(account credits.AccountID, err error) error {
	if isOverflow(err) {
		return fmt.Errorf("balance of %s: %w", account, credits.ErrOverflow)
	}
	return err
}

// ReleaseExpired releases, in one write transaction, every open reservation that expired
// before now, and reports how many it released and their total.
func (s *Store) ReleaseExpired(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	var (
		count int
		total credits.Amount
	)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		count, total = 0, 0
		rows, err := tx.QueryContext(ctx, `DELETE FROM reservations WHERE expires_at < ? RETURNING account_id, amount`, micros(now))
		if err != nil {
			return err
		}
		perAccount := make(map[credits.AccountID]credits.Amount)
		for rows.Next() {
			var (
				account credits.AccountID
				amount  credits.Amount
			)
			if err := rows.Scan(&account, &amount); err != nil {
				rows.Close()
				return err
			}
			if perAccount[account], err = perAccount[account].Add(amount); err != nil {
				rows.Close()
				return err
			}
			if total, err = total.Add(amount); err != nil {
				rows.Close()
				return err
			}
			count++
		}
		if err := rows.Close(); err != nil {
			return err
		}
		if err := rows.Err(); err != nil {
			return err
		}
		accounts := make([]credits.AccountID, 0, len(perAccount))
		for account := range perAccount {
			accounts = append(accounts, account)
		}
		slices.Sort(accounts)
		add := tx.StmtContext(ctx, s.stmts.addBalance)
		for _, account := range accounts {
			var balance credits.Amount
			if err := add.QueryRowContext(ctx, perAccount[account], account).Scan(&balance); err != nil {
				return balanceError(account, err)
			}
		}
		return nil
	})
	if err != nil {
		return 0, 0, fail("release expired reservations", err)
	}
	return count, total, nil
}

// Credit adds amount to the account in one write transaction, creating the account if needed.
// With an idempotency key, the key is looked up first in the same transaction: a credit of the
// same amount and reason under that key is a replay (its first entry is returned and nothing
// is credited again), any other is ErrIdempotencyConflict.
func (s *Store) Credit(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, error) {
	if amount < -credits.MaxAmount || amount > credits.MaxAmount {
		return credits.Entry{}, false, fmt.Errorf("credit %s: %w", amount, credits.ErrInvalidAmount)
	}
	now := s.now()
	fingerprint := creditFingerprint(amount, reason)
	var (
		entry    credits.Entry
		replayed bool
	)
	err := s.inWriteTx(ctx, func(tx *sql.Tx) error {
		if idempotencyKey != "" {
			var (
				hash []byte
				err  error
			)
			entry, err = scanEntry(tx.QueryRowContext(ctx, `SELECT `+entryColumns+`, request_hash FROM ledger
				WHERE account_id = ? AND idempotency_key = ?`, account, idempotencyKey), &hash)
			switch {
			case err == nil:
				if !bytes.Equal(hash, fingerprint) {
					return credits.ErrIdempotencyConflict
				}
				replayed = true
				return nil
			case !errors.Is(err, sql.ErrNoRows):
				return err
			}
		}

		var balance credits.Amount
		err := tx.QueryRowContext(ctx, `SELECT balance FROM accounts WHERE id = ?`, account).Scan(&balance)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			if err := insertAccount(ctx, tx, account, amount, sql.NullInt64{}, now); err != nil {
				return err
			}
		case err != nil:
			return err
		default:
			if balance, err = balance.Add(amount); err != nil {
				return fmt.Errorf("balance of %s: %w", account, err)
			}
			if _, err := tx.ExecContext(ctx, `UPDATE accounts SET balance = ? WHERE id = ?`, balance, account); err != nil {
				return err
			}
		}

		entry = credits.Entry{
			Account:        account,
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
		return tx.QueryRowContext(ctx, `INSERT INTO ledger
			(account_id, kind, amount, reason, idempotency_key, request_hash, created_at)
			VALUES (?, 'credit', ?, ?, ?, ?, ?) RETURNING seq`,
			account, amount, reason, key, hash, micros(now)).Scan(&entry.Seq)
	})
	if err != nil {
		return credits.Entry{}, false, fail("credit "+string(account), err)
	}
	return entry, replayed, nil
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

// Balance is the account's spendable balance (open reservations excluded), or
// ErrUnknownAccount.
func (s *Store) Balance(ctx context.Context, account credits.AccountID) (credits.Amount, error) {
	var balance credits.Amount
	err := s.read.QueryRowContext(ctx, `SELECT balance FROM accounts WHERE id = ?`, account).Scan(&balance)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, credits.ErrUnknownAccount
	}
	if err != nil {
		return 0, fail("balance of "+string(account), err)
	}
	return balance, nil
}

// entryColumns are the columns scanEntry reads.
const entryColumns = `seq, account_id, kind, amount, reason, reservation_id, idempotency_key,
	model, backend, input_tokens, output_tokens, created_at`

// rowScanner is a *sql.Row or *sql.Rows.
type rowScanner interface {
	Scan(dest ...any) error
}

// scanEntry reads a ledger row selected with entryColumns, followed by the extra columns.
func scanEntry(row rowScanner, extra ...any) (credits.Entry, error) {
	var (
		e                                             credits.Entry
		reservationID, idempotencyKey, model, backend sql.NullString
		inputTokens, outputTokens                     sql.NullInt64
		createdAt                                     int64
	)
	dest := append([]any{&e.Seq, &e.Account, &e.Kind, &e.Amount, &e.Reason, &reservationID, &idempotencyKey,
		&model, &backend, &inputTokens, &outputTokens, &createdAt}, extra...)
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
		}
	}
	return e, nil
}

// Entries lists the account's newest entries first, at most limit (none when limit <= 0).
func (s *Store) Entries(ctx context.Context, account credits.AccountID, limit int) ([]credits.Entry, error) {
	if limit <= 0 {
		return nil, nil
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

// Audit returns the account's books, read in one statement so that they come from one
// snapshot; ErrUnknownAccount when there is no such account.
func (s *Store) Audit(ctx context.Context, account credits.AccountID) (credits.Audit, error) {
	var a credits.Audit
	err := s.read.QueryRowContext(ctx, `SELECT
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind IN ('credit', 'grant')),
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		(SELECT coalesce(sum(amount), 0) FROM reservations WHERE account_id = a.id),
		a.balance
		FROM accounts AS a WHERE a.id = ?`, account).Scan(&a.Credited, &a.Settled, &a.Open, &a.Balance)
	if errors.Is(err, sql.ErrNoRows) {
		return credits.Audit{}, credits.ErrUnknownAccount
	}
	if err != nil {
		return credits.Audit{}, fail("audit of "+string(account), err)
	}
	return a, nil
}
