// Package credits holds the money of the gateway: amounts in integer micro-credits, prices per
// million tokens, and the Ledger that reserves, settles and releases them exactly once.
//
// No floating point touches an Amount: parsing and formatting are done on decimal strings.
package credits

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
)

// Amount is a quantity of credits in micro-credits: 1 credit = 1,000,000 micro-credits.
// In JSON it is a number of credits with up to six decimals ("1.5" is 1,500,000 micro-credits).
type Amount int64

// Credit is one credit.
const Credit Amount = 1_000_000

// MaxAmount bounds every amount the gateway accepts from outside: one trillion credits.
const MaxAmount Amount = 1_000_000_000_000 * Credit

// ErrInvalidAmount reports text that is not a decimal amount of credits.
var ErrInvalidAmount = errors.New("invalid amount")

// ErrOverflow reports arithmetic on amounts or token counts that would leave int64 range.
var ErrOverflow = errors.New("amount overflow")

// ParseAmount reads a decimal number of credits ("12", "0.000001", "-3.5") into micro-credits.
// It refuses exponents, more than six decimals, and values beyond MaxAmount.
func ParseAmount(s string) (Amount, error) {
	if s == "" || len(s) > 32 {
		return 0, ErrInvalidAmount
	}
	neg := false
	switch s[0] {
	case '-':
		neg, s = true, s[1:]
	case '+':
		s = s[1:]
	}
	whole, frac, hasDot := strings.Cut(s, ".")
	if whole == "" && frac == "" || hasDot && frac == "" || len(frac) > 6 {
		return 0, ErrInvalidAmount
	}
	if whole == "" {
		whole = "0"
	}
	for _, part := range []string{whole, frac} {
		for i := 0; i < len(part); i++ {
			if part[i] < '0' || part[i] > '9' {
				return 0, ErrInvalidAmount
			}
		}
	}
	w, err := strconv.ParseInt(whole, 10, 64)
	if err != nil || w > int64(MaxAmount/Credit) {
		return 0, ErrInvalidAmount
	}
	f := int64(0)
	if frac != "" {
		frac += strings.Repeat("0", 6-len(frac))
		f, _ = strconv.ParseInt(frac, 10, 64)
	}
	a := Amount(w)*Credit + Amount(f)
	if a > MaxAmount {
		return 0, ErrInvalidAmount
	}
	if neg {
		a = -a
	}
	return a, nil
}

// String formats the amount as decimal credits without trailing zeros: "1.5", "0.000001", "-2".
func (a Amount) String() string {
	if a == math.MinInt64 {
		return "-9223372036854.775808"
	}
	sign := ""
	if a < 0 {
		sign, a = "-", -a
	}
	whole, frac := a/Credit, a%Credit
	if frac == 0 {
		return sign + strconv.FormatInt(int64(whole), 10)
	}
	// The six fraction digits without trailing zeros, written without fmt (it is on every
	// response's credit headers).
	var buf [27]byte // sign, 19 digits, point, 6 digits
	b := append(buf[:0], sign...)
	b = strconv.AppendInt(b, int64(whole), 10)
	b = append(b, '.')
	digits := [6]byte{}
	for i := 5; i >= 0; i-- {
		digits[i] = byte('0' + frac%10)
		frac /= 10
	}
	n := 6
	for n > 0 && digits[n-1] == '0' {
		n--
	}
	return string(append(b, digits[:n]...))
}

// MarshalJSON writes the amount as a JSON number of credits.
func (a Amount) MarshalJSON() ([]byte, error) { return []byte(a.String()), nil }

// UnmarshalJSON reads a JSON number (or a string holding one) of credits.
func (a *Amount) UnmarshalJSON(b []byte) error {
	s := string(b)
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		s = s[1 : len(s)-1]
	}
	v, err := ParseAmount(s)
	if err != nil {
		return fmt.Errorf("amount %q: %w", truncate(s, 40), err)
	}
	*a = v
	return nil
}

// Add returns a+b, or ErrOverflow.
func (a Amount) Add(b Amount) (Amount, error) {
	s := a + b
	if (b > 0 && s < a) || (b < 0 && s > a) {
		return 0, ErrOverflow
	}
	return s, nil
}

// Times returns a*n for a non-negative n, or ErrOverflow (a negative n included).
func (a Amount) Times(n int64) (Amount, error) {
	if n < 0 {
		return 0, ErrOverflow
	}
	if n == 0 || a == 0 {
		return 0, nil
	}
	p := a * Amount(n)
	if p/Amount(n) != a || (a > 0) != (p > 0) {
		return 0, ErrOverflow
	}
	return p, nil
}

// Price is what a model costs: credits per one million tokens of each kind, each held as
// micro-credits per million tokens. Input is the price of a prompt token read fresh; cached
// reads (a provider's prompt cache hit) and cache writes have their own prices, which a
// model's configuration sets to Input when it gives none. Reasoning tokens are output.
type Price struct {
	// Input is the price of one million prompt tokens.
	Input Amount `json:"input"`
	// Output is the price of one million completion tokens (reasoning included).
	Output Amount `json:"output"`
	// CachedInput is the price of one million prompt tokens read from the provider's cache.
	CachedInput Amount `json:"cached_input"`
	// CacheWrite is the price of one million prompt tokens written to the provider's cache.
	CacheWrite Amount `json:"cache_write"`
}

// Tokens are the token counts of one request by kind. Input counts every prompt token;
// CachedInput and CacheWrite are the parts of it read from and written to the cache. Output
// counts every output token.
type Tokens struct {
	Input, Output, CachedInput, CacheWrite int64
}

// Cost is what inputTokens (all read fresh) and outputTokens cost at this price, rounded up
// to the next micro-credit. Negative counts or prices, or a product beyond int64, give
// ErrOverflow.
func (p Price) Cost(inputTokens, outputTokens int64) (Amount, error) {
	return p.Charge(Tokens{Input: inputTokens, Output: outputTokens})
}

// Charge is what t costs at this price: uncached input at Input, cache reads at CachedInput,
// cache writes at CacheWrite and output at Output, summed exactly and rounded up once to the
// next micro-credit. Negative counts or prices, cached parts above the input, or a total
// beyond int64 give ErrOverflow.
func (p Price) Charge(t Tokens) (Amount, error) {
	if t.Input < 0 || t.Output < 0 || t.CachedInput < 0 || t.CacheWrite < 0 ||
		p.Input < 0 || p.Output < 0 || p.CachedInput < 0 || p.CacheWrite < 0 ||
		t.CachedInput > t.Input || t.CacheWrite > t.Input-t.CachedInput {
		return 0, ErrOverflow
	}
	var sum wide
	sum.add(t.Input-t.CachedInput-t.CacheWrite, p.Input)
	sum.add(t.CachedInput, p.CachedInput)
	sum.add(t.CacheWrite, p.CacheWrite)
	sum.add(t.Output, p.Output)
	return sum.perMillion()
}

// Bound is the most inputTokens prompt tokens and outputTokens output tokens can cost,
// whichever kind each prompt token turns out to be: input at the highest of the three input
// prices. A reservation of Bound covers every Charge of counts within the bounds.
func (p Price) Bound(inputTokens, outputTokens int64) (Amount, error) {
	return Price{Input: max(p.Input, p.CachedInput, p.CacheWrite), Output: p.Output}.Cost(inputTokens, outputTokens)
}

// wide is an unsigned 128-bit sum of products of token counts and prices (the micro-credits
// times a million), with a sticky overflow.
type wide struct {
	hi, lo   uint64
	overflow bool
}

// add adds n*price; both are non-negative.
func (w *wide) add(n int64, price Amount) {
	hi, lo := bits.Mul64(uint64(n), uint64(price))
	var carry, carry2 uint64
	w.lo, carry = bits.Add64(w.lo, lo, 0)
	w.hi, carry2 = bits.Add64(w.hi, hi, carry)
	if carry2 != 0 {
		w.overflow = true
	}
}

// perMillion is the sum divided by one million, rounded up: (x + 999999) / 1e6 on 128 bits.
func (w *wide) perMillion() (Amount, error) {
	if w.overflow {
		return 0, ErrOverflow
	}
	lo, carry := bits.Add64(w.lo, 999_999, 0)
	hi, carry2 := bits.Add64(w.hi, 0, carry)
	if carry2 != 0 || hi >= 1_000_000 {
		return 0, ErrOverflow
	}
	q, _ := bits.Div64(hi, lo, 1_000_000)
	if q > math.MaxInt64 {
		return 0, ErrOverflow
	}
	return Amount(q), nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Credits is the amount as a float number of credits, for metrics only: never compute with it.
func (a Amount) Credits() float64 { return float64(a) / float64(Credit) }
