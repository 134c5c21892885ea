package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// UsageByDay sums the account's settle entries since the given time by UTC day and model,
// newest day first.
func (s *Store) UsageByDay(ctx context.Context, account credits.AccountID, since time.Time) ([]credits.UsageDay, error) {
	rows, err := s.pool.Query(ctx, `SELECT
		to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, coalesce(model, '') AS m,
		count(*), coalesce(sum(input_tokens), 0)::bigint, coalesce(sum(output_tokens), 0)::bigint,
		coalesce(sum(amount), 0)::bigint
		FROM ledger WHERE account_id = $1 AND kind = 'settle' AND created_at >= $2
		GROUP BY day, m ORDER BY day DESC, coalesce(model, '') COLLATE "C"`, account, since)
	if err != nil {
		return nil, fail("usage of "+string(account), err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (credits.UsageDay, error) {
		var u credits.UsageDay
		err := row.Scan(&u.Day, &u.Model, &u.Requests, &u.InputTokens, &u.OutputTokens, &u.Credits)
		return u, err
	})
	if err != nil {
		return nil, fail("usage of "+string(account), err)
	}
	if out == nil {
		out = []credits.UsageDay{}
	}
	return out, nil
}

// openReservationsTimeout bounds the query of OpenReservations, which has no context.
const openReservationsTimeout = 2 * time.Second

// OpenReservations counts the open reservations of every instance sharing the database and
// the credits they hold (for metrics); ErrStoreUnavailable when the database cannot say
// within openReservationsTimeout (never zeros that would read as "nothing open").
func (s *Store) OpenReservations() (count int, total credits.Amount, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), openReservationsTimeout)
	defer cancel()
	if err := s.pool.QueryRow(ctx, `SELECT count(*), coalesce(sum(amount), 0)::bigint FROM reservations`).
		Scan(&count, &total); err != nil {
		return 0, 0, fail("counting open reservations", err)
	}
	return count, total, nil
}
