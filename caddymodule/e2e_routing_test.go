package caddymodule_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestCheapestRoutingAndFailover: among backends serving one model, the cheapest healthy one
// answers; a backend failing before any byte (5xx, refused connection, stall before headers) is
// skipped for the next one without its answer leaking; when every backend fails the client gets
// a gateway error and every credit back; max_price (body or X-Max-Price) rules dearer backends
// out.
func TestCheapestRoutingAndFailover(t *testing.T) {
	const (
		cheapIn, cheapOut = "100", "200"
		dearIn, dearOut   = "1000", "2000"
	)
	price := func(in, out string) string {
		return "\t\t\t\tinput_price " + in + "\n\t\t\t\toutput_price " + out + "\n"
	}
	cheapModel := func(name string) string {
		return "\t\t\tmodel " + name + " {\n" + price(cheapIn, cheapOut) + "\t\t\t}\n"
	}
	dearModel := func(name string) string { return "\t\t\tmodel " + name + " {\n" + price(dearIn, dearOut) + "\t\t\t}\n" }
	noHC := "\t\t\thealth_check {\n\t\t\t\tdisabled\n\t\t\t}\n"
	e := startGateway(t, setup{
		gateway: `
		failover 3
		backend dear {
			url {mock.dear}
` + noHC + dearModel("m1") + dearModel("m-fail") + dearModel("m-closed") + dearModel("m-capped") + dearModel("m-stall") + `
		}
		backend cheap {
			url {mock.cheap}
` + noHC + cheapModel("m1") + `
		}
		backend broken {
			url {mock.broken}
` + noHC + cheapModel("m-fail") + cheapModel("m-fail-only") + `
		}
		backend closed {
			url {closed}
			dial_timeout 1s
` + noHC + cheapModel("m-closed") + `
		}
		backend closed2 {
			url {closed2}
			dial_timeout 1s
` + noHC + cheapModel("m-capped") + `
		}
		backend staller {
			url {mock.staller}
			response_header_timeout 400ms
` + noHC + cheapModel("m-stall") + cheapModel("m-stall-only") + `
		}`,
		mocks: []mockSpec{
			{key: "dear"},
			{key: "cheap"},
			{key: "broken", lines: "fault error"},
			{key: "staller", lines: "fault stall"},
		},
	})
	const initial = "100"
	u, k := e.userWithKey("router@example.com", initial)
	var spent credits.Amount
	messages := `[{"role":"user","content":"route me well"}]` // 3 words
	chat := func(model, extra string) string {
		return `{"model":"` + model + `","messages":` + messages + `,"max_tokens":10` + extra + `}`
	}
	stats := func() map[string]int64 {
		return map[string]int64{"dear": e.mockRequests("dear"), "cheap": e.mockRequests("cheap"),
			"broken": e.mockRequests("broken"), "staller": e.mockRequests("staller")}
	}
	expectStats := func(what string, before map[string]int64, delta map[string]int64) {
		t.Helper()
		after := stats()
		for k, v := range after {
			if v-before[k] != delta[k] {
				t.Errorf("%s: backend %s got %d requests, want %d", what, k, v-before[k], delta[k])
			}
		}
	}
	expectOK := func(what string, r *response, backend, in, out string) {
		t.Helper()
		if r.status != http.StatusOK {
			t.Errorf("%s: %s, want 200 from %s", what, r, backend)
			return
		}
		if got := r.header.Get("X-Gateway-Backend"); got != backend {
			t.Errorf("%s: answered by %q, want %q", what, got, backend)
		}
		want := cost(t, 3, 10, in, out)
		spent += want
		if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
			t.Errorf("%s: charged %s, want %s", what, got, want)
		}
		if strings.Contains(string(r.body), "mock_fault") || strings.Contains(string(r.body), "injected fault") {
			t.Errorf("%s: a failed backend's answer leaked: %s", what, r)
		}
		m := r.object(t)
		if c := m["choices"].([]any)[0].(map[string]any)["message"].(map[string]any)["content"]; c != tokens(10) {
			t.Errorf("%s: content %q", what, c)
		}
	}
	expectRefund := func(what string, before credits.Amount) {
		t.Helper()
		a := e.settledAudit(u.ID)
		if a.Balance != before {
			t.Errorf("%s: balance %s after a failed request, want %s (everything returned)", what, a.Balance, before)
		}
	}

	// The cheapest healthy backend answers.
	s := stats()
	expectOK("m1", e.post("/v1/chat/completions", chat("m1", ""), bearer(k.Key)), "cheap", cheapIn, cheapOut)
	expectStats("m1", s, map[string]int64{"cheap": 1})

	// A 5xx before any byte: the next backend answers, the client sees one 200.
	s = stats()
	expectOK("m-fail", e.post("/v1/chat/completions", chat("m-fail", ""), bearer(k.Key)), "dear", dearIn, dearOut)
	expectStats("m-fail", s, map[string]int64{"broken": 1, "dear": 1})

	// A refused connection: the next backend answers.
	s = stats()
	expectOK("m-closed", e.post("/v1/chat/completions", chat("m-closed", ""), bearer(k.Key)), "dear", dearIn, dearOut)
	expectStats("m-closed", s, map[string]int64{"dear": 1})

	// max_price in the body, or X-Max-Price, rules the dear backend out: only a closed one is
	// left (another address than above, so that passive health checks, which mark an address
	// down after 2 failures, do not change the answer), it fails, the request fails, and
	// nothing is charged.
	// The bound counts the whole body, max_price included: sized for the longest body sent.
	longest := inputBound(chat("m-capped", `,"max_price":0.000000000000`))
	between := cost(t, longest, 10, cheapIn, cheapOut) + 1 // above the cheap reservation, below the dear one
	if dear := cost(t, inputBound(chat("m-capped", "")), 10, dearIn, dearOut); between >= dear {
		t.Fatalf("test setup: max price %s not below the dear cost %s", between, dear)
	}
	for _, c := range []struct {
		name, extra string
		hdr         map[string]string
	}{
		{"max_price in the body", `,"max_price":` + between.String(), bearer(k.Key)},
		{"X-Max-Price", "", map[string]string{"Authorization": "Bearer " + k.Key, "X-Max-Price": between.String()}},
	} {
		s = stats()
		before := e.balance(u.ID)
		r := e.post("/v1/chat/completions", chat("m-capped", c.extra), c.hdr)
		if r.status != http.StatusBadGateway && r.status != http.StatusServiceUnavailable {
			t.Errorf("%s: %s, want 502 upstream_error or 503 no_backend_available", c.name, r)
		} else if r.status == http.StatusBadGateway {
			errorOf(t, r, http.StatusBadGateway, "upstream_error")
		} else {
			errorOf(t, r, http.StatusServiceUnavailable, "no_backend_available")
		}
		expectStats(c.name, s, map[string]int64{})
		expectRefund(c.name, before)
	}
	// A ceiling below every choice: nothing to route to.
	r := e.post("/v1/chat/completions", chat("m1", `,"max_price":0.000001`), bearer(k.Key))
	errorOf(t, r, http.StatusNotFound, "model_not_found")

	// A stall before the headers, with no other backend: 504, credits returned.
	s = stats()
	before := e.balance(u.ID)
	r = e.post("/v1/chat/completions", chat("m-stall-only", ""), bearer(k.Key))
	if r.status == http.StatusServiceUnavailable {
		errorOf(t, r, http.StatusServiceUnavailable, "no_backend_available")
	} else {
		errorOf(t, r, http.StatusGatewayTimeout, "upstream_timeout")
	}
	expectStats("m-stall-only", s, map[string]int64{"staller": 1})
	expectRefund("m-stall-only", before)

	// A stall before the headers, with another backend: it answers.
	s = stats()
	expectOK("m-stall", e.post("/v1/chat/completions", chat("m-stall", ""), bearer(k.Key)), "dear", dearIn, dearOut)
	expectStats("m-stall", s, map[string]int64{"staller": 1, "dear": 1})

	// Every backend fails (a 5xx from the only one): a gateway error, everything returned, and
	// the backend's own error body does not reach the client.
	s = stats()
	before = e.balance(u.ID)
	r = e.post("/v1/chat/completions", chat("m-fail-only", ""), bearer(k.Key))
	if r.status != http.StatusBadGateway && r.status != http.StatusServiceUnavailable {
		t.Errorf("every backend failing: %s, want 502 upstream_error (or 503 no_backend_available)", r)
	} else {
		errorOf(t, r, r.status, map[int]string{502: "upstream_error", 503: "no_backend_available"}[r.status])
	}
	expectStats("m-fail-only", s, map[string]int64{"broken": 1})
	expectRefund("m-fail-only", before)

	// Every backend fails (the same fault injected into both): likewise.
	s = stats()
	before = e.balance(u.ID)
	r = e.post("/v1/chat/completions", chat("m-fail", ""), map[string]string{"Authorization": "Bearer " + k.Key, "X-Mock-Fault": "error"})
	if r.status != http.StatusBadGateway && r.status != http.StatusServiceUnavailable {
		t.Errorf("both backends failing: %s, want 502 upstream_error (or 503 no_backend_available)", r)
	}
	expectStats("m-fail both failing", s, map[string]int64{"broken": 1, "dear": 1})
	expectRefund("m-fail both failing", before)

	// The books.
	a := e.settledAudit(u.ID)
	if want := credits.Amount(micro(t, initial)) - spent; a.Balance != want || a.Settled != spent {
		t.Errorf("balance %s, settled %s; want %s and %s", a.Balance, a.Settled, want, spent)
	}
	e.checkAllAccounts(0)
}
