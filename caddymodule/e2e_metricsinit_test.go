package caddymodule_test

import (
	"testing"
)

// TestMetricsZeroAtStart: right after start, before any request, a scrape shows at zero the
// series of every label set the configuration can produce (configured backends and models,
// auth kinds, outcomes, kinds, tiers and limits), so rates and alerts see the first event.
func TestMetricsZeroAtStart(t *testing.T) {
	// Names no other test uses: the collectors live as long as the process.
	e := startGateway(t, setup{
		gateway: `
		anonymous {
			credits 1
			period 24h
			signin_url http://app.example/signin
		}
		rate_limits {
			default_tier zi-free
			tier zi-free {
				requests_per_minute 60
				burst_per_second 5
				concurrent 3
			}
		}` + backendBlock("zi-oai", "oai", "zi-model", "100", "200") + `
		backend zi-ollama {
			url {mock.oai}
			style ollama
			health_check {
				disabled
			}
			model zi-model {
				input_price 50
				output_price 100
			}
			model zi-embed {
				kind embeddings
				input_price 10
				output_price 0
			}
		}`,
		mocks: []mockSpec{{key: "oai", lines: "models zi-model zi-embed"}},
	})
	s := e.scrape()
	zero := func(name string, labels map[string]string) {
		t.Helper()
		v, found := metricSum(s, name, labels)
		if !found || v != 0 {
			t.Errorf("%s%v = %v (found %v), want a series at 0 right after start", name, labels, v, found)
		}
	}
	present := func(name string, labels map[string]string) {
		t.Helper()
		if _, found := metricSum(s, name, labels); !found {
			t.Errorf("%s%v: no series right after start", name, labels)
		}
	}
	for _, b := range []string{"zi-oai", "zi-ollama"} {
		for _, a := range []string{"api_key", "anonymous"} {
			zero("llm_gateway_requests_total", map[string]string{"endpoint": "chat", "model": "zi-model", "backend": b, "auth": a, "outcome": "ok"})
		}
		for _, k := range []string{"connect", "timeout", "status_5xx"} {
			zero("llm_gateway_upstream_errors_total", map[string]string{"backend": b, "kind": k})
		}
		zero("llm_gateway_failovers_total", map[string]string{"backend": b})
		zero("llm_gateway_backend_inflight_requests", map[string]string{"backend": b})
		zero("llm_gateway_tokens_total", map[string]string{"model": "zi-model", "backend": b, "direction": "output"})
		zero("llm_gateway_credits_charged_total", map[string]string{"model": "zi-model", "backend": b})
		zero("llm_gateway_time_to_first_token_seconds_count", map[string]string{"model": "zi-model", "backend": b})
	}
	zero("llm_gateway_requests_total", map[string]string{"endpoint": "ollama_chat", "model": "zi-model", "backend": "zi-ollama", "auth": "api_key", "outcome": "ok"})
	zero("llm_gateway_requests_total", map[string]string{"endpoint": "embeddings", "model": "zi-embed", "backend": "zi-ollama", "auth": "api_key", "outcome": "ok"})
	if _, found := metricSum(s, "llm_gateway_requests_total", map[string]string{"endpoint": "chat", "model": "zi-embed"}); found {
		t.Errorf("an embeddings model has chat series")
	}
	for _, limit := range []string{"requests_per_minute", "burst_per_second", "concurrent"} {
		zero("llm_gateway_rate_limited_total", map[string]string{"tier": "zi-free", "limit": limit})
	}
	zero("llm_gateway_concurrent_requests", map[string]string{"tier": "zi-free"})
	zero("llm_gateway_store_round_trips_total", nil) // the embedded store makes none
	// Shared label sets (other tests' configurations count into them too): present.
	for _, o := range []string{"upstream_error", "no_backend_available", "store_unavailable", "rate_limit_exceeded"} {
		present("llm_gateway_requests_total", map[string]string{"endpoint": "chat", "model": "none", "backend": "none", "auth": "anonymous", "outcome": o})
	}
	for _, k := range []string{"reserved", "settled", "refunded", "unbilled"} {
		present("llm_gateway_credits_total", map[string]string{"kind": k})
	}
	present("llm_gateway_insufficient_credits_total", map[string]string{"auth": "anonymous"})
	present("llm_gateway_redis_round_trips_total", nil)
	present("llm_gateway_request_duration_seconds_count", map[string]string{"endpoint": "chat", "outcome": "ok"})
}
