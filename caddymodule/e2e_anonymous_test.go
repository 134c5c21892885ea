package caddymodule_test

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestAnonymousChatUntil402: a newcomer without account or key chats with "cheapest" on the
// anonymous allowance until it runs out; the 402 says how much is left and needed, sends an
// allowed browser origin to the sign-in page with its return address (and a disallowed one
// without), and CORS lets the browser read it.
func TestAnonymousChatUntil402(t *testing.T) {
	const (
		signin   = "http://signin.example/auth/login"
		app      = "http://app.example"
		evil     = "http://evil.example"
		cheapIn  = "100"
		cheapOut = "2000"
		dearIn   = "5000"
		dearOut  = "9000"
	)
	e := startGateway(t, setup{
		gateway: `
		allowed_origins ` + app + `
		anonymous {
			credits 0.1
			period 24h
			signin_url ` + signin + `
		}` + backendBlock("cheap", "cheap", "mock-small", cheapIn, cheapOut) + backendBlock("dear", "dear", "mock-large", dearIn, dearOut),
		mocks: []mockSpec{{key: "cheap", lines: "models mock-small"}, {key: "dear", lines: "models mock-large"}},
	})

	const messages = `[{"role":"user","content":"hi there"}]`
	body := `{"model":"cheapest","messages":` + messages + `,"max_tokens":8}`
	// The mock counts 2 prompt words and answers min(16, 8) = 8 tokens.
	charge := cost(t, 2, 8, cheapIn, cheapOut)
	// Reservations: the gateway may hold the dearest choice it could fail over to, but must
	// admit the request whenever the cheapest choice is covered.
	est := inputBound(body)
	needCheap := cost(t, est, 8, cheapIn, cheapOut)
	allowance := credits.Amount(micro(t, "0.1"))

	// Expected: requests succeed while the balance covers the cheapest reservation.
	balance := allowance
	wantOK := 0
	for balance >= needCheap {
		balance -= charge
		wantOK++
	}
	if wantOK < 2 {
		t.Fatalf("test setup: only %d requests fit the allowance", wantOK)
	}

	var last *response
	okCount := 0
	for i := 0; i < wantOK+5; i++ {
		r := e.post("/v1/chat/completions", body, map[string]string{"Origin": app, "Redirect": "/chat?room=1"})
		if r.status == http.StatusPaymentRequired {
			last = r
			break
		}
		if r.status != http.StatusOK {
			t.Fatalf("request %d: %s", i+1, r)
		}
		okCount++
		if got := r.header.Get("X-Gateway-Backend"); got != "cheap" {
			t.Errorf("request %d: cheapest chose backend %q, want cheap", i+1, got)
		}
		if got := r.header.Get("X-Gateway-Model"); got != "mock-small" {
			t.Errorf("request %d: cheapest chose model %q, want mock-small", i+1, got)
		}
		if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != charge {
			t.Errorf("request %d: X-Credits-Charged %s, want %s", i+1, got, charge)
		}
		if got, want := amountOf(t, r.header.Get("X-Credits-Remaining")), allowance-credits.Amount(okCount)*charge; got != want {
			t.Errorf("request %d: X-Credits-Remaining %s, want %s", i+1, got, want)
		}
		if got := r.header.Get("Access-Control-Allow-Origin"); got != app {
			t.Errorf("request %d: Access-Control-Allow-Origin %q, want %q", i+1, got, app)
		}
	}
	if okCount != wantOK {
		t.Errorf("answered %d requests before the 402, want %d", okCount, wantOK)
	}
	if last == nil {
		t.Fatalf("no 402 after %d requests", okCount)
	}

	// The 402 for an allowed origin.
	eo := errorOf(t, last, http.StatusPaymentRequired, "insufficient_credits")
	details, _ := eo["details"].(map[string]any)
	if details == nil {
		t.Fatalf("402 without details: %s", last)
	}
	if got := amountOf(t, details["balance"]); got != balance {
		t.Errorf("402 details.balance %s, want %s", got, balance)
	}
	if got := amountOf(t, details["required"]); got != needCheap {
		t.Errorf("402 details.required %s, want %s (the reservation of the cheapest choice, which is all this request needs)", got, needCheap)
	}
	wantLocation := signin + "?redirect=" + url.QueryEscape(app+"/chat?room=1")
	if got := last.header.Get("Location"); got != wantLocation {
		t.Errorf("402 Location %q, want %q", got, wantLocation)
	}
	if got, _ := details["login_url"].(string); got != wantLocation {
		t.Errorf("402 details.login_url %q, want %q", got, wantLocation)
	}
	if got := last.header.Get("Access-Control-Allow-Origin"); got != app {
		t.Errorf("402 Access-Control-Allow-Origin %q, want %q", got, app)
	}
	if !exposes(last.header, "Location") {
		t.Errorf("402 Access-Control-Expose-Headers %q does not include Location", last.header.Get("Access-Control-Expose-Headers"))
	}

	// An absolute return address on the allowed origin is kept as it is.
	r := e.post("/v1/chat/completions", body, map[string]string{"Origin": app, "Redirect": app + "/back/here"})
	errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
	if got, want := r.header.Get("Location"), signin+"?redirect="+url.QueryEscape(app+"/back/here"); got != want {
		t.Errorf("Location for an absolute Redirect %q, want %q", got, want)
	}

	// A disallowed origin, or a return address elsewhere, is never a redirect target.
	for _, h := range []map[string]string{
		{"Origin": evil, "Redirect": "/chat"},
		{"Origin": app, "Redirect": evil + "/steal"},
		{"Origin": app, "Redirect": "//evil.example/steal"},
		{"Origin": app, "Redirect": "https://app.example@evil.example/"},
	} {
		r := e.post("/v1/chat/completions", body, h)
		eo := errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
		loc := r.header.Get("Location")
		if strings.Contains(loc, "redirect=") || strings.Contains(loc, "evil") {
			t.Errorf("%v: Location %q redirects", h, loc)
		}
		if loc != "" && loc != signin {
			t.Errorf("%v: Location %q, want the bare sign-in URL", h, loc)
		}
		if d, _ := eo["details"].(map[string]any); d != nil {
			if s, _ := d["login_url"].(string); strings.Contains(s, "evil") {
				t.Errorf("%v: details.login_url %q", h, s)
			}
		}
		if h["Origin"] == evil {
			if got := r.header.Get("Access-Control-Allow-Origin"); got != "" {
				t.Errorf("disallowed origin got Access-Control-Allow-Origin %q", got)
			}
		}
	}

	// CORS preflight: allowed origin.
	pre := e.request(http.MethodOptions, e.gw+"/v1/chat/completions", nil, map[string]string{
		"Origin": app, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, redirect",
	})
	if pre.status != http.StatusNoContent {
		t.Errorf("preflight: %s, want 204", pre)
	}
	if got := pre.header.Get("Access-Control-Allow-Origin"); got != app {
		t.Errorf("preflight Access-Control-Allow-Origin %q, want %q", got, app)
	}
	if got := pre.header.Get("Access-Control-Allow-Methods"); !strings.Contains(got, "POST") {
		t.Errorf("preflight Access-Control-Allow-Methods %q lacks POST", got)
	}
	if got := strings.ToLower(pre.header.Get("Access-Control-Allow-Headers")); !strings.Contains(got, "redirect") || !strings.Contains(got, "content-type") {
		t.Errorf("preflight Access-Control-Allow-Headers %q lacks content-type or redirect", got)
	}
	// Disallowed origin: no CORS grant.
	pre = e.request(http.MethodOptions, e.gw+"/v1/chat/completions", nil, map[string]string{
		"Origin": evil, "Access-Control-Request-Method": "POST",
	})
	if got := pre.header.Get("Access-Control-Allow-Origin"); got != "" {
		t.Errorf("preflight from a disallowed origin got Access-Control-Allow-Origin %q", got)
	}

	// Nothing reached a backend after the allowance ran out, the dear one never.
	if got := e.mockRequests("cheap"); got != int64(wantOK) {
		t.Errorf("cheap backend got %d requests, want %d", got, wantOK)
	}
	if got := e.mockRequests("dear"); got != 0 {
		t.Errorf("dear backend got %d requests, want 0", got)
	}

	// The anonymous account's books, read from the store file: one grant of the allowance,
	// wantOK settlements (given a moment, for a store that commits asynchronously).
	accs := e.checkAllAccounts(0)
	want := dbAccount{id: "anon:127.0.0.1", balance: balance, credited: allowance,
		settled: credits.Amount(wantOK) * charge, settleEntries: wantOK}
	if ok, last := waitFor(10*time.Second, func() (bool, string) {
		accs = e.accounts()
		return len(accs) == 1 && accs[0] == want, fmt.Sprintf("%+v", accs)
	}); !ok {
		t.Errorf("accounts in the store %s, want only %+v", last, want)
	}
}

// exposes reports whether Access-Control-Expose-Headers lists name.
func exposes(h http.Header, name string) bool {
	for _, v := range h.Values("Access-Control-Expose-Headers") {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), name) || strings.TrimSpace(f) == "*" {
				return true
			}
		}
	}
	return false
}
