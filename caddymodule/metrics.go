package caddymodule

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// The gateway's metrics. Collectors are created once per process and registered in every
// configuration's registry (Caddy makes a new one per config load), so counts survive reloads.
// Labels come from closed sets only: endpoint, configured model and backend names, auth kind,
// outcome code, direction, kind. Never a user, key, address or client-supplied string.
var (
	metricRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "requests_total",
		Help: "Requests handled by the gateway, by endpoint, model, backend, auth kind and outcome (ok or the error code).",
	}, []string{"endpoint", "model", "backend", "auth", "outcome"})
	metricDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "llm_gateway", Name: "request_duration_seconds",
		Help:    "Time from the request's arrival to the end of the answer, in seconds.",
		Buckets: llmBuckets,
	}, []string{"endpoint", "outcome"})
	metricTTFT = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "llm_gateway", Name: "time_to_first_token_seconds",
		Help:    "Time from the request's arrival to the first streamed byte sent to the client, in seconds.",
		Buckets: llmBuckets,
	}, []string{"model", "backend"})
	metricTokens = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "tokens_total",
		Help: "Tokens settled, by model, backend and direction (input or output).",
	}, []string{"model", "backend", "direction"})
	metricCredits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "credits_total",
		Help: "Credits moved by requests: reserved, settled (charged) and refunded (returned at settlement or release).",
	}, []string{"kind"})
	metricCreditsReleasedExpired = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "credits_released_expired_total",
		Help: "Credits of reservations released because they expired (left open by a crash or a failed settlement).",
	})
	metricCharged = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "credits_charged_total",
		Help: "Credits charged, by model and backend.",
	}, []string{"model", "backend"})
	metricInsufficient = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "insufficient_credits_total",
		Help: "Requests refused with 402 insufficient_credits, by auth kind.",
	}, []string{"auth"})
	metricUpstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "upstream_errors_total",
		Help: "Backend attempts that produced no answer, by backend and kind (connect, timeout, status_5xx).",
	}, []string{"backend", "kind"})
	metricFailovers = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "failovers_total",
		Help: "Requests moved on to the next backend, by the backend that failed.",
	}, []string{"backend"})
	metricInflight = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "llm_gateway", Name: "backend_inflight_requests",
		Help: "Requests in flight to each backend.",
	}, []string{"backend"})
	metricKeyCache = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "key_cache_requests_total",
		Help: "API key lookups, by result: hit (answered from memory) or miss (asked the store).",
	}, []string{"result"})
	metricActiveStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "llm_gateway", Name: "active_streams",
		Help: "Streamed answers being passed to clients now.",
	})
)

// llmBuckets span LLM latencies: 50 ms to a minute.
var llmBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60}

// gatewayMetrics are the collectors a gateway records into.
type gatewayMetrics struct {
	requests       *prometheus.CounterVec
	duration       *prometheus.HistogramVec
	ttft           *prometheus.HistogramVec
	tokens         *prometheus.CounterVec
	credits        *prometheus.CounterVec
	charged        *prometheus.CounterVec
	insufficient   *prometheus.CounterVec
	upstreamErrors *prometheus.CounterVec
	failovers      *prometheus.CounterVec
	inflight       *prometheus.GaugeVec
	activeStreams  prometheus.Gauge
	keyCache       *prometheus.CounterVec
}

var allMetrics = gatewayMetrics{metricRequests, metricDuration, metricTTFT, metricTokens, metricCredits,
	metricCharged, metricInsufficient, metricUpstreamErrors, metricFailovers, metricInflight, metricActiveStreams, metricKeyCache}

// registerMetrics registers the gateway's collectors in a configuration's registry.
func registerMetrics(reg prometheus.Registerer, logger *zap.Logger) *gatewayMetrics {
	m := &allMetrics
	for _, c := range []prometheus.Collector{metricRequests, metricDuration, metricTTFT, metricTokens, metricCredits,
		metricCreditsReleasedExpired, metricCharged, metricInsufficient, metricUpstreamErrors, metricFailovers,
		metricInflight, metricActiveStreams, metricKeyCache} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				logger.Error("registering a metric", zap.Error(err))
			}
		}
	}
	return m
}

// observeKeyCache counts a key cache lookup.
func (m *gatewayMetrics) observeKeyCache(hit bool) {
	if hit {
		keyCacheHits.Inc()
	} else {
		keyCacheMisses.Inc()
	}
}

var (
	keyCacheHits   = metricKeyCache.WithLabelValues("hit")
	keyCacheMisses = metricKeyCache.WithLabelValues("miss")
)
