package credits

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// AccountID names whose credits move: "user:<user id>" for people, "anon:<client key>" for
// anonymous callers (see identity.AnonymousKey).
type AccountID string

// UserAccount is the account of a user.
func UserAccount(userID string) AccountID { return AccountID("user:" + userID) }

// AnonymousAccount is the account of an anonymous caller, keyed by its client key.
func AnonymousAccount(clientKey string) AccountID { return AccountID("anon:" + clientKey) }

// Errors a Ledger reports.
var (
	// ErrInsufficientCredits: the balance cannot cover the reservation.
	ErrInsufficientCredits = errors.New("insufficient credits")
	// ErrReservationClosed: the reservation was already settled, released or expired.
	ErrReservationClosed = errors.New("reservation already closed")
	// ErrUnknownAccount: no such account.
	ErrUnknownAccount = errors.New("unknown account")
	// ErrIdempotencyConflict: an idempotency key was reused with a different request.
	ErrIdempotencyConflict = errors.New("idempotency key reused with different parameters")
	// ErrStoreUnavailable wraps any failure of the store itself: the gateway fails closed on it.
	ErrStoreUnavailable = errors.New("store unavailable")
	// ErrUnknownResponse: no settle entry recorded that response id.
	ErrUnknownResponse = errors.New("unknown response")
)

// ResponseOwner is who asked for a stored response and where it lives: read from the settle
// entry of the request that made it (Usage.ResponseID).
type ResponseOwner struct {
	Account AccountID
	Backend string
	KeyID   string
	Model   string
	// ContextTokens are the tokens of the conversation the response holds (its input and its
	// output): a request carrying it on is read, and billed, that much input again.
	ContextTokens int64
}

// Refill tops an anonymous account up to Cap once per period. Period is the index of the current
// period (unix time / period length); an account is refilled at most once per index, on every
// instance together. The refill grants Cap - max(balance, 0) on the balance open reservations
// included, nothing at Cap or above: the balance becomes min(Cap, balance + Cap), never above Cap
// (not even once open reservations are released), and a debt (settlements above their
// reservations) is paid from the allowance, never forgiven.
type Refill struct {
	Cap    Amount
	Period int64
}

// Reservation is credits held for one request until it is settled or released.
type Reservation struct {
	ID        string    `json:"id"`
	Account   AccountID `json:"account"`
	Amount    Amount    `json:"amount"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Usage is what a settled request consumed, recorded on its ledger entry.
type Usage struct {
	Model        string `json:"model,omitempty"`
	Backend      string `json:"backend,omitempty"`
	InputTokens  int64  `json:"input_tokens"`
	OutputTokens int64  `json:"output_tokens"`
	// CachedInputTokens and CacheWriteTokens are the parts of InputTokens read from and written
	// to the provider's prompt cache; ReasoningTokens the part of OutputTokens that is reasoning.
	CachedInputTokens int64 `json:"cached_input_tokens,omitempty"`
	CacheWriteTokens  int64 `json:"cache_write_tokens,omitempty"`
	ReasoningTokens   int64 `json:"reasoning_tokens,omitempty"`
	// ResponseID is the id of the response the backend stored (OpenAI Responses), if any: the
	// entry is its record of owner and backend (ResponseOwner).
	ResponseID string `json:"response_id,omitempty"`
	// KeyID is the API key the request was made with, if any: a key's spending under its
	// credit cap is the sum of its settle entries.
	KeyID string `json:"key_id,omitempty"`
}

// Check reports a usage whose counts cannot be: negative, or parts above their wholes.
func (u Usage) Check() error {
	if u.InputTokens < 0 || u.OutputTokens < 0 || u.CachedInputTokens < 0 || u.CacheWriteTokens < 0 || u.ReasoningTokens < 0 {
		return fmt.Errorf("negative token counts %d, %d (%d cached, %d written, %d reasoning)",
			u.InputTokens, u.OutputTokens, u.CachedInputTokens, u.CacheWriteTokens, u.ReasoningTokens)
	}
	if u.CachedInputTokens+u.CacheWriteTokens > u.InputTokens || u.ReasoningTokens > u.OutputTokens {
		return fmt.Errorf("token counts above their wholes: %d cached and %d written of %d input, %d reasoning of %d output",
			u.CachedInputTokens, u.CacheWriteTokens, u.InputTokens, u.ReasoningTokens, u.OutputTokens)
	}
	return nil
}

// UsageDay is what an account spent on one model in one UTC day: the sum of its settle entries.
type UsageDay struct {
	Day          string `json:"day"` // YYYY-MM-DD, UTC
	Model        string `json:"model"`
	Requests     int64  `json:"requests"`
	InputTokens  int64  `json:"input_tokens"`
	OutputTokens int64  `json:"output_tokens"`
	// CachedInputTokens and CacheWriteTokens are the parts of InputTokens read from and written
	// to the provider's prompt cache; ReasoningTokens the part of OutputTokens that is reasoning.
	CachedInputTokens int64 `json:"cached_input_tokens,omitempty"`
	CacheWriteTokens  int64 `json:"cache_write_tokens,omitempty"`
	ReasoningTokens   int64 `json:"reasoning_tokens,omitempty"`
	// ResponseID is the id of the response the backend stored (OpenAI Responses), if any: the
	// entry is its record of owner and backend (ResponseOwner).
	ResponseID string `json:"response_id,omitempty"`
	Credits    Amount `json:"credits"`
}

// EntryKind says what moved credits.
type EntryKind string

const (
	// EntryCredit: an operator or a payment added credits (amount > 0) or took them away (< 0).
	EntryCredit EntryKind = "credit"
	// EntryGrant: an anonymous account was filled up for a new period.
	EntryGrant EntryKind = "grant"
	// EntrySettle: a request was charged (amount is the cost, >= 0).
	EntrySettle EntryKind = "settle"
)

// Entry is one line of the append-only ledger. Only movements into or out of the account's
// total are entries (credits, grants, settlements); reservations and releases only move credits
// between the balance and the open reservations.
type Entry struct {
	Seq            int64     `json:"seq"`
	Account        AccountID `json:"account"`
	Kind           EntryKind `json:"kind"`
	Amount         Amount    `json:"amount"`
	Reason         string    `json:"reason,omitempty"`
	ReservationID  string    `json:"reservation_id,omitempty"`
	IdempotencyKey string    `json:"-"`
	Usage          *Usage    `json:"usage,omitempty"`
	CreatedAt      time.Time `json:"created_at"`
}

// Audit is an account's books. For every account at every moment:
// Credited == Balance + Settled + Open.
type Audit struct {
	Credited Amount `json:"credited"` // sum of credit and grant entries
	Settled  Amount `json:"settled"`  // sum of settle entries
	Open     Amount `json:"open"`     // sum of open reservations
	Balance  Amount `json:"balance"`
}

// Ledger moves credits. Every method is atomic; a reservation is settled or released exactly
// once, whichever comes first wins and the other gets ErrReservationClosed.
type Ledger interface {
	// Reserve moves amount from the account's balance into a new open reservation that expires
	// after ttl, refilling the account first when refill is not nil. It reports the balance after.
	// ErrInsufficientCredits when the balance (after any refill) is below amount; the balance it
	// reports then is the one that was not enough.
	Reserve(ctx context.Context, account AccountID, amount Amount, ttl time.Duration, refill *Refill) (Reservation, Amount, error)
	// Settle closes the reservation, charging cost (which may exceed the reserved amount: the
	// difference is taken from the balance, which may then go below zero) and returning the rest
	// to the balance. It reports the balance after.
	Settle(ctx context.Context, reservationID string, cost Amount, usage Usage) (Amount, error)
	// Release closes the reservation returning all of it to the balance, and reports the balance.
	Release(ctx context.Context, reservationID string) (Amount, error)
	// ReleaseExpired releases every open reservation whose expiry is before now; it reports how
	// many it released and their total.
	ReleaseExpired(ctx context.Context, now time.Time) (int, Amount, error)
	// Credit adds amount (negative to take away) to the account, creating it if needed. With an
	// idempotency key, the same key and amount for the same account credits once and returns the
	// first entry with replayed = true; the same key with other parameters is ErrIdempotencyConflict.
	Credit(ctx context.Context, account AccountID, amount Amount, reason, idempotencyKey string) (entry Entry, replayed bool, err error)
	// Balance is the account's spendable balance (open reservations excluded);
	// ErrUnknownAccount if it has none.
	Balance(ctx context.Context, account AccountID) (Amount, error)
	// Entries lists the account's newest entries first, at most limit.
	Entries(ctx context.Context, account AccountID, limit int) ([]Entry, error)
	// Audit returns the account's books.
	Audit(ctx context.Context, account AccountID) (Audit, error)
}
