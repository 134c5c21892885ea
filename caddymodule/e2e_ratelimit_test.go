package caddymodule_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
)

// fakeClock is the rate limits' clock in these tests.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func useFakeRateClock(t *testing.T) *fakeClock {
	c := &fakeClock{t: time.Unix(1_900_000_000, 0)}
	t.Cleanup(caddymodule.SetRateLimitClock(c.now))
	return c
}

const rateLimitBackend = `
		backend mock {
			url {mock.mock}
			health_check {
				disabled
			}
			model mock-small {
				input_price 1
				output_price 2
			}
		}`

// TestRateLimitMinuteE2E: a free-tier key with 3 requests a minute gets 3 answers, each with
// the rate limit headers, then a 429 (headers, Retry-After, JSON naming the limit) that takes
// no credits and never reaches the backend, and passes again once Retry-After has passed.
func TestRateLimitMinuteE2E(t *testing.T) {
	clock := useFakeRateClock(t)
	e := startGateway(t, setup{
		gateway: rateLimitBackend + `
		allowed_origins https://app.example.com
		rate_limits {
			default_tier free
			tier free {
				requests_per_minute 3
				concurrent 5
			}
			tier pro {
				requests_per_minute 300
			}
		}`,
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	})
	refusedBefore, _ := metricSum(e.scrape(), "llm_gateway_rate_limited_total", map[string]string{"tier": "free", "limit": "requests_per_minute"})
	u, k := e.userWithKey("limited@example.com", "10")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	hdr := bearer(k.Key)
	hdr["Origin"] = "https://app.example.com"
	for i := range 3 {
		r := e.post("/v1/chat/completions", body, hdr)
		if r.status != http.StatusOK {
			t.Fatalf("request %d: %s", i, r)
		}
		want := map[string]string{
			"X-RateLimit-Limit":     "3",
			"X-RateLimit-Remaining": strconv.Itoa(2 - i),
			"X-RateLimit-Reset":     strconv.FormatInt(clock.now().Unix()+int64(20*(i+1)), 10),
			"X-RateLimit-Policy":    "3;w=60",
			"RateLimit-Policy":      `"minute";q=3;w=60`,
			"RateLimit":             `"minute";r=` + strconv.Itoa(2-i) + ";t=" + strconv.Itoa(20*(i+1)),
		}
		for h, v := range want {
			if got := r.header.Get(h); got != v {
				t.Errorf("request %d: %s = %q, want %q", i, h, got, v)
			}
		}
		if exp := r.header.Get("Access-Control-Expose-Headers"); !containsAll(exp, "RateLimit-Policy", "Retry-After-Ms", "X-RateLimit-Reset") {
			t.Errorf("CORS exposes %q", exp)
		}
	}
	before := e.settledAudit(u.ID).Balance
	mockBefore := e.mockRequests("mock")

	r := e.post("/v1/chat/completions", body, hdr)
	eo := errorOf(t, r, http.StatusTooManyRequests, "rate_limit_exceeded")
	if eo["type"] != "rate_limit_error" {
		t.Errorf("type %v", eo["type"])
	}
	d, _ := eo["details"].(map[string]any)
	if d["limit"] != "requests_per_minute" || num(t, d["retry_after"]) != 20 {
		t.Errorf("details %v, want limit requests_per_minute, retry_after 20", d)
	}
	for h, v := range map[string]string{
		"Retry-After": "20", "X-RateLimit-Retry-After": "20", "Retry-After-Ms": "20000",
		"X-RateLimit-Remaining": "0", "RateLimit": `"minute";r=0;t=60`,
	} {
		if got := r.header.Get(h); got != v {
			t.Errorf("429: %s = %q, want %q", h, got, v)
		}
	}
	if got := e.balance(u.ID); got != before {
		t.Errorf("a 429 changed the balance: %s, was %s", got, before)
	}
	if got := e.mockRequests("mock"); got != mockBefore {
		t.Errorf("a 429 reached the backend: %d requests, was %d", got, mockBefore)
	}
	if l := e.ledger(u.ID); l.Audit.Open != 0 {
		t.Errorf("a 429 left %s reserved", l.Audit.Open)
	}

	// A second short of Retry-After: still refused; at it: admitted.
	clock.advance(19 * time.Second)
	if r := e.post("/v1/chat/completions", body, hdr); r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") != "1" {
		t.Fatalf("a second early: %s, Retry-After %q", r, r.header.Get("Retry-After"))
	}
	clock.advance(time.Second)
	if r := e.post("/v1/chat/completions", body, hdr); r.status != http.StatusOK {
		t.Fatalf("after Retry-After: %s", r)
	}

	poll(t, 5*time.Second, "the refusal metrics", func() (bool, string) {
		s := e.scrape()
		n, _ := metricSum(s, "llm_gateway_rate_limited_total", map[string]string{"tier": "free", "limit": "requests_per_minute"})
		c, found := metricSum(s, "llm_gateway_concurrent_requests", map[string]string{"tier": "free"})
		return n-refusedBefore == 2 && found && c == 0, "refused " + strconv.FormatFloat(n, 'f', -1, 64) + ", concurrent " + strconv.FormatFloat(c, 'f', -1, 64)
	})
}

func containsAll(s string, parts ...string) bool {
	for _, p := range parts {
		found := false
		for i := 0; i+len(p) <= len(s); i++ {
			if s[i:i+len(p)] == p {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// TestRateLimitConcurrencyE2E: with 2 concurrent requests allowed, a third at once gets 429
// concurrent, taking no credits; the slots come back after every kind of ending (success,
// upstream error, client gone, a broken stream that aborts the handler with a panic).
func TestRateLimitConcurrencyE2E(t *testing.T) {
	useFakeRateClock(t)
	e := startGateway(t, setup{
		gateway: rateLimitBackend + `
		rate_limits {
			tier solo {
				concurrent 2
			}
		}`,
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	})
	u, k := e.userWithKey("conc@example.com", "10")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	slow := bearer(k.Key)
	// Long enough that the third request comes while both are held, on a loaded machine too
	// (1.5 s let both end first once, with CI and a fuzzer sharing 2 cores).
	slow["X-Mock-Latency"] = "5s"

	gauge := func() float64 {
		c, _ := metricSum(e.scrape(), "llm_gateway_concurrent_requests", map[string]string{"tier": "solo"})
		return c
	}
	idle := func(what string) {
		t.Helper()
		poll(t, 10*time.Second, "the concurrency gauge back to 0 after "+what, func() (bool, string) {
			c := gauge()
			return c == 0, strconv.FormatFloat(c, 'f', -1, 64)
		})
	}

	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := e.post("/v1/chat/completions", body, slow); r.status != http.StatusOK {
				t.Errorf("held request: %s", r)
			}
		}()
	}
	poll(t, 5*time.Second, "two requests in flight", func() (bool, string) { return gauge() == 2, "" })
	before := e.balance(u.ID)
	r := e.post("/v1/chat/completions", body, bearer(k.Key))
	eo := errorOf(t, r, http.StatusTooManyRequests, "rate_limit_exceeded")
	if d, _ := eo["details"].(map[string]any); d["limit"] != "concurrent" || r.header.Get("Retry-After") != "1" {
		t.Errorf("third: details %v, Retry-After %q", d, r.header.Get("Retry-After"))
	}
	if got := e.balance(u.ID); got != before {
		t.Errorf("the 429 took credits: %s, was %s", got, before)
	}
	wg.Wait()
	idle("success")

	// An upstream error (the mock answers 500).
	h := bearer(k.Key)
	h["X-Mock-Fault"] = "error"
	if r := e.post("/v1/chat/completions", body, h); r.status < 500 {
		t.Errorf("upstream error: %s", r)
	}
	idle("an upstream error")

	// The client leaves while the backend is still thinking.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	req := e.newRequest(ctx, http.MethodPost, e.gw+"/v1/chat/completions", body, slow)
	if resp, err := e.client.Do(req); err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	cancel()
	idle("the client left")

	// A stream cut by the backend: the handler aborts the client's connection (a panic with
	// http.ErrAbortHandler) after settling.
	h = bearer(k.Key)
	h["X-Mock-Fault"] = "cut"
	req = e.newRequest(context.Background(), http.MethodPost, e.gw+"/v1/chat/completions",
		`{"model":"mock-small","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":16}`, h)
	if resp, err := e.client.Do(req); err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	idle("a handler panic")

	// Every slot is free again: two at once pass.
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK {
				t.Errorf("after: %s", r)
			}
		}()
	}
	wg.Wait()
	e.settledAudit(u.ID)
}

// TestRateLimitAnonymousByAddress: anonymous callers are limited per client address by the
// anonymous tier, and keys by theirs.
func TestRateLimitAnonymousByAddress(t *testing.T) {
	useFakeRateClock(t)
	s := setup{
		gateway: rateLimitBackend + `
		anonymous {
			credits 1
			signin_url https://example.com/login
		}
		rate_limits {
			default_tier free
			anonymous_tier anon
			tier anon {
				burst_per_second 1
				requests_per_minute 1
			}
			tier free {
				requests_per_minute 100
			}
		}`,
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	}
	e := startGateway(t, s)
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	if r := e.post("/v1/chat/completions", body, nil); r.status != http.StatusOK || r.header.Get("X-RateLimit-Limit") != "1" {
		t.Fatalf("first anonymous: %s, limit %q", r, r.header.Get("X-RateLimit-Limit"))
	}
	r := e.post("/v1/chat/completions", body, nil)
	eo := errorOf(t, r, http.StatusTooManyRequests, "rate_limit_exceeded")
	if d, _ := eo["details"].(map[string]any); d["tier"] != "anon" || num(t, d["retry_after"]) != 60 {
		t.Errorf("anonymous 429 details %v", d)
	}
	// A config reload keeps every caller's limits (the tier's limiter is shared).
	e.load(s)
	if r := e.post("/v1/chat/completions", body, nil); r.status != http.StatusTooManyRequests {
		t.Errorf("after a reload: %s", r)
	}
	_, k := e.userWithKey("keyed@example.com", "1")
	if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK || r.header.Get("X-RateLimit-Limit") != "100" {
		t.Fatalf("key after the anonymous refusal: %s, limit %q", r, r.header.Get("X-RateLimit-Limit"))
	}
}

// TestRateLimitCreditRefusalTakesNothing: requests refused for credits (402) take nothing
// from the rate limits, so they never turn into 429s; a request whose token bound exceeds the
// tier's tokens per minute is refused with 400, and also takes nothing.
func TestRateLimitCreditRefusalTakesNothing(t *testing.T) {
	useFakeRateClock(t)
	e := startGateway(t, setup{
		gateway: rateLimitBackend + `
		rate_limits {
			tier free {
				requests_per_minute 3
				tokens_per_minute 100
			}
		}`,
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	})
	_, k := e.userWithKey("broke@example.com", "")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	for i := range 6 {
		r := e.post("/v1/chat/completions", body, bearer(k.Key))
		errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
		if got := r.header.Get("X-RateLimit-Remaining"); got != "3" {
			t.Errorf("402 number %d: X-RateLimit-Remaining %q, want 3 (nothing taken)", i, got)
		}
	}
	big := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":500}`
	r := e.post("/v1/chat/completions", big, bearer(k.Key))
	eo := errorOf(t, r, http.StatusBadRequest, "invalid_request")
	if eo["param"] != "max_tokens" || r.header.Get("X-RateLimit-Remaining") != "3" {
		t.Errorf("too many tokens: %s, remaining %q", r, r.header.Get("X-RateLimit-Remaining"))
	}
	if n := e.mockRequests("mock"); n != 0 {
		t.Errorf("the backend saw %d requests", n)
	}
}

// TestRateLimitPerUser: a user's keys share the user's limits (its own tier's), so a second
// key does not multiply them; a key naming a bigger tier is still bound by its user's.
func TestRateLimitPerUser(t *testing.T) {
	useFakeRateClock(t)
	e := startGateway(t, freeAndProTiers)
	u, k1 := e.userWithKey("twokeys@example.com", "10")
	k2 := e.createKey(u.ID, map[string]any{"name": "second", "rate_limit_tier": "pro"})
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	for i := range 3 {
		if r := e.post("/v1/chat/completions", body, bearer(k1.Key)); r.status != http.StatusOK {
			t.Fatalf("key 1, request %d: %s", i, r)
		}
	}
	r := e.post("/v1/chat/completions", body, bearer(k2.Key))
	eo := errorOf(t, r, http.StatusTooManyRequests, "rate_limit_exceeded")
	if d, _ := eo["details"].(map[string]any); d["scope"] != "user" || d["tier"] != "free" || d["limit"] != "requests_per_minute" {
		t.Errorf("second key's 429 details %v", d)
	}
	// The refusal by the user's limits took nothing from the key's own (pro: 100 a minute).
	if r.header.Get("X-RateLimit-Remaining") != "0" {
		t.Errorf("429 remaining %q", r.header.Get("X-RateLimit-Remaining"))
	}
}

// freeAndProTiers is a gateway whose callers default to a tier of 3 requests a minute, with a
// "pro" tier of 100 beside it.
var freeAndProTiers = setup{
	gateway: rateLimitBackend + `
		rate_limits {
			default_tier free
			tier free {
				requests_per_minute 3
			}
			tier pro {
				requests_per_minute 100
			}
		}`,
	mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
}
