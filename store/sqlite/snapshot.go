package sqlite

import (
	"context"
	"database/sql"
	"fmt"
)

// Snapshot runs fn in a read-only transaction on one consistent state of the file, once every
// queued settlement and grant is committed: for tools that copy the store as a whole
// (store/transfer). fn must not keep tx.
func (s *Store) Snapshot(ctx context.Context, fn func(tx *sql.Tx) error) error {
	if err := s.Flush(ctx); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	tx, err := s.read.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return fail("snapshot", err)
	}
	defer tx.Rollback()
	return fn(tx)
}
