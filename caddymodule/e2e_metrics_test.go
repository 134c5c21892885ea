package caddymodule_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestMetricsSurviveReload: the gateway's Prometheus series are on the admin endpoint's
// /metrics after traffic, are still there after a config reload, and keep counting from where
// they were; no label carries a user, a key or an address.
func TestMetricsSurviveReload(t *testing.T) {
	gatewayCfg := func(outPrice string) string {
		return `
		backend oai {
			url {mock.oai}
			health_check {
				disabled
			}
			model mock-small {
				input_price 1000
				output_price ` + outPrice + `
			}
		}`
	}
	s := setup{gateway: gatewayCfg("2000"), mocks: []mockSpec{{key: "oai", lines: "models mock-small"}}}
	e := startGateway(t, s)
	u, k := e.userWithKey("metered@example.com", "10")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"count me"}],"max_tokens":4}`
	okLabels := map[string]string{"endpoint": "chat", "model": "mock-small", "backend": "oai", "auth": "api_key", "outcome": "ok"}

	// Counters are per process: read them before, and compare differences.
	s0 := e.scrape()
	ok0, _ := metricSum(s0, "llm_gateway_requests_total", okLabels)
	nf0, _ := metricSum(s0, "llm_gateway_requests_total", map[string]string{"outcome": "model_not_found"})
	tok0, _ := metricSum(s0, "llm_gateway_tokens_total", map[string]string{"model": "mock-small", "backend": "oai", "direction": "output"})

	for range 3 {
		if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK {
			t.Fatalf("chat: %s", r)
		}
	}
	if r := e.post("/v1/chat/completions", `{"model":"nope","messages":[{"role":"user","content":"x"}]}`, bearer(k.Key)); r.status != http.StatusNotFound {
		t.Fatalf("unknown model: %s", r)
	}
	s1 := e.scrape()
	expect := func(samples []sample, name string, labels map[string]string, want float64) {
		t.Helper()
		got, found := metricSum(samples, name, labels)
		if !found || got != want {
			t.Errorf("%s%v = %v (found %v), want %v", name, labels, got, found, want)
		}
	}
	expect(s1, "llm_gateway_requests_total", okLabels, ok0+3)
	expect(s1, "llm_gateway_requests_total", map[string]string{"outcome": "model_not_found"}, nf0+1)
	expect(s1, "llm_gateway_tokens_total", map[string]string{"model": "mock-small", "backend": "oai", "direction": "output"}, tok0+12)
	for _, name := range []string{"llm_gateway_request_duration_seconds_count", "llm_gateway_credits_total",
		"llm_gateway_credits_charged_total", "llm_gateway_backend_inflight_requests", "llm_gateway_active_streams"} {
		if _, found := metricSum(s1, name, nil); !found {
			t.Errorf("%s is not exported", name)
		}
	}
	checkLabels(t, s1, u.ID, k)

	// Reload with a changed config (another price): the same series, still counting.
	s.gateway = gatewayCfg("3000")
	e.load(s)
	s2 := e.scrape()
	expect(s2, "llm_gateway_requests_total", okLabels, ok0+3)
	expect(s2, "llm_gateway_tokens_total", map[string]string{"model": "mock-small", "backend": "oai", "direction": "output"}, tok0+12)
	for range 2 {
		r := e.post("/v1/chat/completions", body, bearer(k.Key))
		if r.status != http.StatusOK {
			t.Fatalf("chat after the reload: %s", r)
		}
		// The new price is in force: 2 prompt words, 4 output tokens.
		if got, want := amountOf(t, r.header.Get("X-Credits-Charged")), cost(t, 2, 4, "1000", "3000"); got != want {
			t.Errorf("charged %s after the reload, want %s at the new price", got, want)
		}
	}
	s3 := e.scrape()
	expect(s3, "llm_gateway_requests_total", okLabels, ok0+5)
	expect(s3, "llm_gateway_tokens_total", map[string]string{"model": "mock-small", "backend": "oai", "direction": "output"}, tok0+20)
	checkLabels(t, s3, u.ID, k)

	// The store survived the reload too: the books are whole.
	a := e.settledAudit(u.ID)
	want := credits.Amount(micro(t, "10")) - 3*cost(t, 2, 4, "1000", "2000") - 2*cost(t, 2, 4, "1000", "3000")
	if a.Balance != want {
		t.Errorf("balance %s, want %s", a.Balance, want)
	}
	e.checkAllAccounts(0)
}

// checkLabels fails if a gateway series carries a user id, a key (id or secret) or an address.
func checkLabels(t *testing.T, samples []sample, userID string, k keyView) {
	t.Helper()
	for _, s := range samples {
		if !strings.HasPrefix(s.name, "llm_gateway_") {
			continue
		}
		for name, v := range s.labels {
			if strings.Contains(v, userID) || strings.Contains(v, k.ID) || strings.Contains(v, k.Key) || strings.Contains(v, "127.0.0.1") {
				t.Errorf("%s has label %s=%q naming a user, key or address", s.name, name, v)
			}
		}
	}
}
