package caddymodule

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

func TestTierPolicyCascadesBursts(t *testing.T) {
	p := (&Tier{RequestsPerMinute: 60, RequestsPerHour: 1000, RequestsPerDay: 10000, BurstPerSecond: 10,
		Concurrent: 5, TokensPerMinute: 100000}).policy()
	want := []ratelimit.Limit{
		{Name: "burst_per_second", Quota: 10, Window: time.Second, Burst: 10},
		{Name: "requests_per_minute", Quota: 60, Window: time.Minute, Burst: 10},
		{Name: "requests_per_hour", Quota: 1000, Window: time.Hour, Burst: 60},
		{Name: "requests_per_day", Quota: 10000, Window: 24 * time.Hour, Burst: 1000},
		{Name: "tokens_per_minute", Unit: ratelimit.Tokens, Quota: 100000, Window: time.Minute},
	}
	if len(p.Limits) != len(want) || p.Concurrent != 5 {
		t.Fatalf("policy %+v", p)
	}
	for i := range want {
		if p.Limits[i] != want[i] {
			t.Errorf("limit %d: %+v, want %+v", i, p.Limits[i], want[i])
		}
	}
	// Only an hourly limit: a plain bucket of its quota.
	p = (&Tier{RequestsPerHour: 100}).policy()
	if len(p.Limits) != 1 || p.Limits[0].Burst != 100 {
		t.Errorf("hour only: %+v", p)
	}
}

func TestRateLimitsValidate(t *testing.T) {
	tests := []struct {
		name string
		rl   RateLimits
		err  string
		def  string
		anon string
	}{
		{"builtin", RateLimits{}, "", "free", "free"},
		{"builtin_pro", RateLimits{DefaultTier: "pro", AnonymousTier: "free"}, "", "pro", "free"},
		{"one_tier", RateLimits{Tiers: map[string]*Tier{"only": {Concurrent: 1}}}, "", "only", "only"},
		{"no_default", RateLimits{Tiers: map[string]*Tier{"a": {}, "b": {}}}, "default_tier is required", "", ""},
		{"unknown_default", RateLimits{DefaultTier: "gold", Tiers: map[string]*Tier{"a": {}}}, `no tier "gold"`, "", ""},
		{"unknown_anonymous", RateLimits{AnonymousTier: "anon", Tiers: map[string]*Tier{"a": {}}}, `no tier "anon"`, "", ""},
		{"negative", RateLimits{Tiers: map[string]*Tier{"a": {RequestsPerDay: -1}}}, "negative", "", ""},
		{"builtin_unknown", RateLimits{DefaultTier: "gold"}, `no tier "gold"`, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.rl.validate()
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.rl.DefaultTier != tt.def || tt.rl.AnonymousTier != tt.anon {
				t.Errorf("default %q anonymous %q", tt.rl.DefaultTier, tt.rl.AnonymousTier)
			}
		})
	}
	rl := RateLimits{}
	_ = rl.validate()
	if f := rl.Tiers["free"]; f.RequestsPerMinute != 60 || f.BurstPerSecond != 10 || f.Concurrent != 5 {
		t.Errorf("built-in free tier %+v", f)
	}
}

func TestRateLimitHeaders(t *testing.T) {
	now := time.Unix(2_000_000_000, 0)
	l, _ := ratelimit.New((&Tier{RequestsPerMinute: 300, BurstPerSecond: 50}).policy(), func() time.Time { return now })
	_, d := l.Admit("k", 0)
	h := http.Header{}
	setRateLimitHeaders(h, d, now)
	want := map[string]string{
		// After one of a burst of 50 at 300/min: 49 left; whole again in 200 ms (one emission interval).
		"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "49", "X-RateLimit-Reset": "2000000001",
		"X-RateLimit-Policy": "300;w=60", "RateLimit-Policy": `"minute";q=300;w=60`, "RateLimit": `"minute";r=49;t=1`,
		"Retry-After": "", "Retry-After-Ms": "",
	}
	for k, v := range want {
		if got := h.Get(k); got != v {
			t.Errorf("success: %s = %q, want %q", k, got, v)
		}
	}
	for range 49 {
		l.Admit("k", 0)
	}
	_, d = l.Admit("k", 0)
	h = http.Header{}
	setRateLimitHeaders(h, d, now)
	for k, v := range map[string]string{
		"Retry-After": "1", "X-RateLimit-Retry-After": "1", "Retry-After-Ms": "200", "X-RateLimit-Remaining": "0",
		"RateLimit": `"minute";r=0;t=10`, "X-RateLimit-Reset": "2000000010",
	} {
		if got := h.Get(k); got != v {
			t.Errorf("refused: %s = %q, want %q", k, got, v)
		}
	}
	e := errorResponse(&rateLimited{tier: "pro", d: d})
	if e.status != http.StatusTooManyRequests || e.Code != "rate_limit_exceeded" || e.Type != "rate_limit_error" ||
		e.Details["retry_after"] != int64(1) || e.Details["limit"] != "requests_per_minute" {
		t.Errorf("429 answer %+v", e)
	}
	e = errorResponse(&tooManyTokens{bound: 5000, limit: 1000})
	if e.status != http.StatusBadRequest || e.Param == nil || *e.Param != "max_tokens" {
		t.Errorf("too many tokens answer %+v", e)
	}
	if !errors.As(error(&rateLimited{}), new(*rateLimited)) {
		t.Fatal("unreachable")
	}
}

func TestRetrySeconds(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "1", time.Nanosecond: "1", time.Second: "1", time.Second + 1: "2", 20 * time.Second: "20", 59*time.Second + 999*time.Millisecond: "60",
	} {
		if got := retrySeconds(d); got != want {
			t.Errorf("retrySeconds(%v) = %s, want %s", d, got, want)
		}
	}
}

// TestNamedLimitersForSignin: the sign-in limiters admit 10 attempts per account (and
// address) in 15 minutes, 100 per account, 30 per address and 5 sign-ups per address per
// hour, each key on its own, and answer the 429 with its headers.
func TestNamedLimitersForSignin(t *testing.T) {
	now := time.Unix(2_000_000_000, 0)
	t.Cleanup(SetRateLimitClock(func() time.Time { return now }))
	g := &Gateway{}
	if err := g.provisionRateLimits(nil); err != nil {
		t.Fatal(err)
	}
	defer g.cleanupRateLimits()
	acct := "usr_" + strconv.FormatInt(time.Now().UnixNano(), 36) // the limiter may be shared with other configurations
	allow := func(w http.ResponseWriter, limiter, key string) error {
		_, err := g.admitNamed(w, namedAttempt{limiter, key})
		return err
	}
	for i := range 10 {
		if err := allow(httptestRecorder(), LimiterSigninAccount, acct); err != nil {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	h := httptestRecorder()
	err := allow(h, LimiterSigninAccount, acct)
	var rl *rateLimited
	if !errors.As(err, &rl) || rl.d.Refused != "signin_per_15m" {
		t.Fatalf("11th attempt: %v", err)
	}
	if h.Header().Get("Retry-After") != "90" || h.Header().Get("X-RateLimit-Limit") != "10" {
		t.Errorf("11th attempt headers %v", h.Header())
	}
	if err := allow(httptestRecorder(), LimiterSigninAccount, acct+"b"); err != nil {
		t.Errorf("another account: %v", err)
	}
	for i := range 30 {
		if err := allow(httptestRecorder(), LimiterSigninIP, acct+"ip"); err != nil {
			t.Fatalf("address attempt %d: %v", i, err)
		}
	}
	if err := allow(httptestRecorder(), LimiterSigninIP, acct+"ip"); err == nil {
		t.Error("31st attempt from one address admitted")
	}
	// The account-wide bound (100 per 15 minutes) and the sign-ups (5 per hour per address).
	for _, c := range []struct {
		limiter string
		quota   int
		retry   string
	}{{LimiterSigninAccountWide, 100, "9"}, {LimiterSignupIP, 5, "720"}} {
		for i := range c.quota {
			if err := allow(httptestRecorder(), c.limiter, acct+"wide"); err != nil {
				t.Fatalf("%s attempt %d: %v", c.limiter, i, err)
			}
		}
		h := httptestRecorder()
		if err := allow(h, c.limiter, acct+"wide"); err == nil || h.Header().Get("Retry-After") != c.retry {
			t.Errorf("%s: attempt %d: %v, Retry-After %q, want %s", c.limiter, c.quota+1, err, h.Header().Get("Retry-After"), c.retry)
		}
	}
	if g.namedLimiter("nope") != nil || allow(httptestRecorder(), "nope", "x") != nil {
		t.Error("an unknown named limiter limits")
	}
	// All or none: the address's limit refusing gives the account's attempt back, and a
	// given-back attempt does not count.
	other := acct + "c"
	if _, err := g.admitNamed(httptestRecorder(), namedAttempt{LimiterSigninAccount, other}, namedAttempt{LimiterSigninIP, acct + "ip"}); err == nil {
		t.Fatal("the full address admitted an attempt")
	}
	for i := range 10 {
		giveBack, err := g.admitNamed(httptestRecorder(), namedAttempt{LimiterSigninAccount, other})
		if err != nil {
			t.Fatalf("attempt %d after a refusal and give-backs: %v", i, err)
		}
		if i%2 == 0 {
			giveBack()
		}
	}
	for i := range 5 {
		if err := allow(httptestRecorder(), LimiterSigninAccount, other); err != nil {
			t.Fatalf("attempt %d: the given-back ones counted: %v", i, err)
		}
	}
	if err := allow(httptestRecorder(), LimiterSigninAccount, other); err == nil {
		t.Error("an 11th attempt that was kept passed")
	}
}

type headerRecorder struct{ h http.Header }

func (r *headerRecorder) Header() http.Header         { return r.h }
func (r *headerRecorder) Write(p []byte) (int, error) { return len(p), nil }
func (r *headerRecorder) WriteHeader(int)             {}

func httptestRecorder() *headerRecorder { return &headerRecorder{h: http.Header{}} }

// FuzzRateLimitsCaddyfile: whatever the rate_limits block, parsing does not panic, and what it
// accepts has no negative limit and builds limiters (or fails validation with an error).
func FuzzRateLimitsCaddyfile(f *testing.F) {
	f.Add("rate_limits {\n default_tier free\n tier free {\n requests_per_minute 60\n burst_per_second 10\n concurrent 5\n tokens_per_minute 1000\n }\n}")
	f.Add("rate_limits")
	f.Add("rate_limits {\n tier a {\n requests_per_day 9223372036854775807\n requests_per_hour 1\n }\n}")
	f.Add("rate_limits {\n tier {\n }\n}")
	f.Fuzz(func(t *testing.T, src string) {
		d := caddyfile.NewTestDispenser(src)
		d.Next()
		rl, err := unmarshalRateLimits(d)
		if err != nil {
			return
		}
		for _, tier := range rl.Tiers {
			if err := tier.validate(); err != nil {
				t.Fatalf("parsed a tier that does not validate: %+v", tier)
			}
		}
		if rl.validate() != nil {
			return
		}
		for name, tier := range rl.Tiers {
			if _, err := ratelimit.New(tier.policy(), nil); err != nil && !strings.Contains(err.Error(), "too large") {
				t.Fatalf("tier %s: %v", name, err)
			}
		}
	})
}

// BenchmarkRateLimitRequestPath is what the rate limits add to one request in ServeHTTP:
// admission of the key and of its user in a tier with every kind of limit, the header fields,
// and the settlements.
func BenchmarkRateLimitRequestPath(b *testing.B) {
	tier := &Tier{RequestsPerMinute: 1 << 40, RequestsPerHour: 1 << 41, RequestsPerDay: 1 << 42,
		BurstPerSecond: 1 << 39, Concurrent: 1 << 20, TokensPerMinute: 1 << 50}
	l, _ := ratelimit.New(tier.policy(), nil)
	h := http.Header{}
	b.ReportAllocs()
	for b.Loop() {
		tk, d := l.Admit("k:key_0123456789abcdef", 1200)
		utk, _ := l.Admit("u:usr_0123456789abcdef", 1200)
		setRateLimitHeaders(h, d, time.Now())
		tk.Settle(800)
		utk.Settle(800)
	}
}
