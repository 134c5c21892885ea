package caddymodule_test

import (
	"io"
	"net/http"
	"sync"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestConcurrentReservationsNeverOverspend: 200 concurrent requests against a balance that
// covers exactly 50 of them: exactly 50 are forwarded and answered, the other 150 get 402, and
// the books balance to the micro-credit with nothing below zero.
func TestConcurrentReservationsNeverOverspend(t *testing.T) {
	// No input price, and a completion (16 tokens, the mock's default) equal to max_tokens:
	// every request settles exactly what it reserved, so refunds cannot let a 51st in.
	const in, out = "0", "1000"
	e := startGateway(t, setup{
		gateway: backendBlock("mock", "mock", "mock-small", in, out),
		mocks:   []mockSpec{{key: "mock", lines: "models mock-small\n\t\tlatency 150ms"}},
	})
	const n, fit = 200, 50
	per := cost(t, 1, 16, in, out)
	u := e.createUser("crowd@example.com", (credits.Amount(fit) * per).String())
	k := e.createKey(u.ID, nil)
	body := `{"model":"mock-small","messages":[{"role":"user","content":"go"}],"max_tokens":16}`

	type result struct {
		status int
		body   []byte
	}
	results := make([]result, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req := e.newRequest(t.Context(), http.MethodPost, e.gw+"/v1/chat/completions", body, bearer(k.Key))
			resp, err := e.client.Do(req)
			if err != nil {
				results[i] = result{status: -1, body: []byte(err.Error())}
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results[i] = result{resp.StatusCode, b}
		}()
	}
	close(start)
	wg.Wait()

	ok, refused := 0, 0
	for i, r := range results {
		switch r.status {
		case http.StatusOK:
			ok++
		case http.StatusPaymentRequired:
			refused++
			rr := &response{status: r.status, header: http.Header{"Content-Type": {"application/json"}}, body: r.body}
			eo := errorOf(t, rr, http.StatusPaymentRequired, "insufficient_credits")
			d, _ := eo["details"].(map[string]any)
			if d == nil {
				t.Errorf("402 without details")
				continue
			}
			if b := amountOf(t, d["balance"]); b < 0 || b >= per {
				t.Errorf("402 with balance %s: want 0 <= balance < %s", b, per)
			}
			if req := amountOf(t, d["required"]); req != per {
				t.Errorf("402 required %s, want %s", req, per)
			}
		default:
			t.Errorf("request %d: %d %s", i, r.status, truncate(string(r.body), 300))
		}
	}
	if ok != fit || refused != n-fit {
		t.Errorf("%d answered, %d refused with 402; want %d and %d", ok, refused, fit, n-fit)
	}
	if got := e.mockRequests("mock"); got > fit || got != int64(ok) {
		t.Errorf("the backend got %d requests; want %d (= answered, at most %d)", got, ok, fit)
	}
	a := e.settledAudit(u.ID)
	if a.Balance != 0 || a.Settled != credits.Amount(fit)*per || a.Credited != credits.Amount(fit)*per {
		t.Errorf("books %+v, want everything settled and a balance of 0", a)
	}
	if got := len(e.settlements(u.ID)); got != ok {
		t.Errorf("%d settlements for %d answers", got, ok)
	}
	e.checkAllAccounts(0)
}
