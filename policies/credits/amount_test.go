package credits

import (
	"encoding/json"
	"errors"
	"math"
	"testing"
)

func TestParseAmount(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Amount
		err  bool
	}{
		{in: "0", want: 0},
		{in: "1", want: Credit},
		{in: "1.5", want: 1_500_000},
		{in: "0.000001", want: 1},
		{in: ".5", want: 500_000},
		{in: "-3.25", want: -3_250_000},
		{in: "+2", want: 2 * Credit},
		{in: "1000000000000", want: MaxAmount},
		{in: "1000000000001", err: true},
		{in: "1000000000000.1", err: true},
		{in: "-1000000000000.000001", err: true},
		{in: "999999999999.999999", want: MaxAmount - 1},
		{in: "0.0000001", err: true},
		{in: "1e3", err: true},
		{in: "1.", err: true},
		{in: "", err: true},
		{in: "-", err: true},
		{in: ".", err: true},
		{in: "1.2.3", err: true},
		{in: "NaN", err: true},
		{in: " 1", err: true},
		{in: "99999999999999999999999999999", err: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseAmount(tc.in)
			if tc.err {
				if !errors.Is(err, ErrInvalidAmount) {
					t.Fatalf("ParseAmount(%q) = %v, %v; want ErrInvalidAmount", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseAmount(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
			back, err := ParseAmount(got.String())
			if err != nil || back != got {
				t.Fatalf("round trip of %q through %q: %d, %v", tc.in, got.String(), back, err)
			}
		})
	}
}

func TestAmountJSON(t *testing.T) {
	var v struct{ A, B Amount }
	if err := json.Unmarshal([]byte(`{"A":0.000123,"B":"7"}`), &v); err != nil {
		t.Fatal(err)
	}
	if v.A != 123 || v.B != 7*Credit {
		t.Fatalf("got %d %d", v.A, v.B)
	}
	out, _ := json.Marshal(v)
	if string(out) != `{"A":0.000123,"B":7}` {
		t.Fatalf("marshal: %s", out)
	}
	if err := json.Unmarshal([]byte(`{"A":1e2}`), &v); err == nil {
		t.Fatal("exponent accepted")
	}
	if s := Amount(math.MinInt64).String(); s != "-9223372036854.775808" {
		t.Fatalf("min: %s", s)
	}
}

func TestPriceCost(t *testing.T) {
	for _, tc := range []struct {
		name    string
		price   Price
		in, out int64
		want    Amount
		err     bool
	}{
		{name: "exact", price: Price{Input: 1 * Credit, Output: 2 * Credit}, in: 1_000_000, out: 500_000, want: 2 * Credit},
		{name: "rounds up", price: Price{Input: 100 * Credit}, in: 1, want: 100},
		{name: "a part of a micro-credit is one", price: Price{Input: 1}, in: 1, want: 1},
		{name: "zero", price: Price{Input: 5 * Credit, Output: 5 * Credit}, want: 0},
		{name: "free", price: Price{}, in: 1 << 40, out: 1 << 40, want: 0},
		{name: "negative tokens", price: Price{Input: 1}, in: -1, err: true},
		{name: "negative price", price: Price{Input: -1}, in: 1, err: true},
		{name: "huge but fits", price: Price{Input: MaxAmount}, in: 1_000_000, want: MaxAmount},
		{name: "overflow", price: Price{Input: MaxAmount, Output: MaxAmount}, in: math.MaxInt64, out: math.MaxInt64, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.price.Cost(tc.in, tc.out)
			if tc.err {
				if !errors.Is(err, ErrOverflow) {
					t.Fatalf("got %d, %v; want ErrOverflow", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func FuzzLedgerOps(f *testing.F) {
	f.Add("1.5", int64(10), int64(20), int64(3), int64(7))
	f.Add("0.000001", int64(1), int64(1), int64(0), int64(0))
	f.Add("-2", int64(0), int64(1<<62), int64(1<<62), int64(1))
	f.Fuzz(func(t *testing.T, s string, in, out, pin, pout int64) {
		a, err := ParseAmount(s)
		if err == nil {
			if a > MaxAmount || a < -MaxAmount {
				t.Fatalf("%q parsed beyond bounds: %d", s, a)
			}
			if b, err := ParseAmount(a.String()); err != nil || b != a {
				t.Fatalf("%q: round trip %q -> %d, %v", s, a.String(), b, err)
			}
		}
		p := Price{Input: Amount(pin), Output: Amount(pout)}
		c, err := p.Cost(in, out)
		if err != nil {
			return
		}
		if c < 0 {
			t.Fatalf("negative cost %d", c)
		}
		// Monotone: one more output token never costs less.
		if out < math.MaxInt64 {
			if c2, err := p.Cost(in, out+1); err == nil && c2 < c {
				t.Fatalf("cost decreased: %d then %d", c, c2)
			}
		}
	})
}

func TestPriceChargeByTokenKind(t *testing.T) {
	p := Price{Input: 3_000_000, Output: 15_000_000, CachedInput: 300_000, CacheWrite: 3_750_000}
	for _, tc := range []struct {
		name string
		t    Tokens
		want Amount
		err  bool
	}{
		{"fresh only equals Cost", Tokens{Input: 1000, Output: 100}, 4_500, false},
		// 100 fresh x 3 + 800 cached x 0.3 + 100 written x 3.75 + 50 out x 15 = 300+240+375+750.
		{"every kind", Tokens{Input: 1000, Output: 50, CachedInput: 800, CacheWrite: 100}, 1_665, false},
		{"rounded up once", Tokens{Input: 1, CachedInput: 1}, 1, false},
		{"cached above input", Tokens{Input: 10, CachedInput: 11}, 0, true},
		{"written above the rest", Tokens{Input: 10, CachedInput: 5, CacheWrite: 6}, 0, true},
		{"negative", Tokens{Input: -1}, 0, true},
	} {
		got, err := p.Charge(tc.t)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("%s: Charge(%+v) = %d, %v; want %d, error %v", tc.name, tc.t, got, err, tc.want, tc.err)
		}
	}
	// The bound covers every split of the prompt between the kinds.
	bound, err := p.Bound(1000, 50)
	if err != nil {
		t.Fatal(err)
	}
	for _, split := range []Tokens{{Input: 1000, Output: 50}, {Input: 1000, Output: 50, CachedInput: 1000}, {Input: 1000, Output: 50, CacheWrite: 1000}} {
		c, err := p.Charge(split)
		if err != nil || c > bound {
			t.Errorf("Charge(%+v) = %d, %v, above Bound %d", split, c, err, bound)
		}
	}
	if want := Amount(4_500); bound != want {
		t.Errorf("Bound = %d, want %d", bound, want)
	}
	if _, err := (Price{Input: 1 << 62, Output: 1 << 62}).Charge(Tokens{Input: 1 << 62, Output: 1 << 62}); err == nil {
		t.Error("an overflowing charge gave no error")
	}
}

func TestAmountTimes(t *testing.T) {
	for _, tc := range []struct {
		a    Amount
		n    int64
		want Amount
		err  bool
	}{
		{10_000, 3, 30_000, false}, {0, 1 << 62, 0, false}, {5, 0, 0, false},
		{MaxAmount, 10, 0, true}, {1 << 40, 1 << 30, 0, true}, {1, -1, 0, true},
	} {
		got, err := tc.a.Times(tc.n)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("%d x %d = %d, %v", tc.a, tc.n, got, err)
		}
	}
}

// TestAmountString: the decimal form, without trailing zeros in the fraction.
func TestAmountString(t *testing.T) {
	for a, want := range map[Amount]string{
		0: "0", 1: "0.000001", 10: "0.00001", 1_500_000: "1.5", 10 * Credit: "10", -2_500_001: "-2.500001",
		123_456_789: "123.456789", 100_010: "0.10001", math.MaxInt64: "9223372036854.775807",
	} {
		if got := a.String(); got != want {
			t.Errorf("Amount(%d).String() = %q, want %q", int64(a), got, want)
		}
	}
}
