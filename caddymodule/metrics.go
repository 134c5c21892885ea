package caddymodule

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
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
		Help: "Credits moved by requests: reserved, settled (charged), refunded (returned at settlement or release), so reserved = settled + refunded + released after expiry + open; and unbilled (a cost the backend reported above the reservation, not charged: a request never costs more than it reserved).",
	}, []string{"kind"})
	metricCreditsReleasedExpired = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "credits_released_expired_total",
		Help: "Credits of reservations released by the sweeper because they expired (a failed settlement, a stuck request).",
	})
	metricCreditsReleasedAtStart = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "credits_released_at_start_total",
		Help: "Credits of reservations left open by an earlier run (a crash), released when the store was opened.",
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
		Help: "Backend attempts that produced no answer, by backend and kind (connect, timeout, status_5xx, cut: a JSON answer cut or not JSON, encoded: compressed against Accept-Encoding identity).",
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
	metricStoreDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "llm_gateway", Name: "store_operation_duration_seconds",
		Help:    "Time taken by the store, in seconds, by operation: reserve, settle, release, release_expired, credit, and commit (one group commit of queued settlements).",
		Buckets: storeBuckets,
	}, []string{"operation"})
	metricStoreCommitted = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "store_committed_operations_total",
		Help: "Settlements and grants written to disk by the store's group commits.",
	})
	metricSettlementsDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "store_settlements_dropped_total",
		Help: "Leased settlements the PostgreSQL store refused for good (a constraint violation or a data error) and dropped: never charged.",
	})
	metricState = &stateCollector{
		backendUp: prometheus.NewDesc("llm_gateway_backend_up",
			"Whether a configured backend may be tried now (1) or is marked down by its health checks (0).",
			[]string{"backend"}, nil),
		openCredits: prometheus.NewDesc("llm_gateway_reservations_open_credits",
			"Credits held by open reservations now.", nil, nil),
		openCount: prometheus.NewDesc("llm_gateway_reservations_open",
			"Reservations open now.", nil, nil),
		storeRoundTrips: prometheus.NewDesc("llm_gateway_store_round_trips_total",
			"Round trips to the store's database server since it was opened (PostgreSQL: statements, batches, and the BEGIN and COMMIT of transactions; 0 for the embedded store, which makes none).",
			nil, nil),
	}
)

// The credits counter of each kind, looked up once: they count on every request.
var (
	creditsReserved = metricCredits.WithLabelValues("reserved")
	creditsSettled  = metricCredits.WithLabelValues("settled")
	creditsRefunded = metricCredits.WithLabelValues("refunded")
	creditsUnbilled = metricCredits.WithLabelValues("unbilled")
)

// storeBuckets span store latencies: 100 µs to 5 s.
var storeBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

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
		metricCreditsReleasedExpired, metricCreditsReleasedAtStart, metricCharged, metricInsufficient, metricUpstreamErrors, metricFailovers,
		metricInflight, metricActiveStreams, metricKeyCache, metricStoreDuration, metricStoreCommitted, metricSettlementsDropped, metricState} {
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

// stateCollector reads, at scrape time, the state of the running configuration: each configured
// backend's health (from its reverse proxy's upstreams), the open reservations of each store and
// the round trips each store has made to its database server (summed over the stores in use:
// a store shared by a reload keeps its count).
// It reads the provisioned gateways, so after a reload it reports the new configuration's
// backends (the newest gateway wins for a name several configurations share).
type stateCollector struct {
	backendUp, openCredits, openCount, storeRoundTrips *prometheus.Desc
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.backendUp
	ch <- c.openCredits
	ch <- c.openCount
	ch <- c.storeRoundTrips
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	activeGateways.mu.Lock()
	gateways := append([]*Gateway(nil), activeGateways.list...)
	activeGateways.mu.Unlock()
	seen := map[string]bool{}
	stores := map[*storeHandle]bool{}
	var count int
	var open credits.Amount
	known := true // every store could say what it holds open
	var roundTrips uint64
	for i := len(gateways) - 1; i >= 0; i-- {
		g := gateways[i]
		for j, b := range g.Backends {
			if seen[b.Name] || b.proxy == nil {
				continue
			}
			seen[b.Name] = true
			up := 0.0
			if g.healthy(j) {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(c.backendUp, prometheus.GaugeValue, up, b.Name)
		}
		if h := g.store; h != nil && !stores[h] && h.openReservations != nil {
			stores[h] = true
			n, amount, err := h.openReservations()
			if err != nil {
				known = false
			}
			count += n
			open += amount
			if h.roundTrips != nil {
				roundTrips += h.roundTrips()
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(c.storeRoundTrips, prometheus.CounterValue, float64(roundTrips))
	if !known {
		// A store that cannot be read (PostgreSQL unreachable): the gauges are left out of
		// this scrape (a gap in the series), never a zero that would read as nothing open.
		return
	}
	ch <- prometheus.MustNewConstMetric(c.openCredits, prometheus.GaugeValue, open.Credits())
	ch <- prometheus.MustNewConstMetric(c.openCount, prometheus.GaugeValue, float64(count))
}

// observeCommit records one group commit of the store.
func observeCommit(d time.Duration, ops int) {
	storeCommitDuration.Observe(d.Seconds())
	metricStoreCommitted.Add(float64(ops))
}

var (
	storeReserveDuration        = metricStoreDuration.WithLabelValues("reserve")
	storeSettleDuration         = metricStoreDuration.WithLabelValues("settle")
	storeReleaseDuration        = metricStoreDuration.WithLabelValues("release")
	storeReleaseExpiredDuration = metricStoreDuration.WithLabelValues("release_expired")
	storeCreditDuration         = metricStoreDuration.WithLabelValues("credit")
	storeCommitDuration         = metricStoreDuration.WithLabelValues("commit")
)

// timedLedger measures how long the store's ledger operations take.
type timedLedger struct {
	credits.Ledger
}

func (l timedLedger) Reserve(ctx context.Context, account credits.AccountID, amount credits.Amount, ttl time.Duration, refill *credits.Refill) (credits.Reservation, credits.Amount, error) {
	start := time.Now()
	defer func() { storeReserveDuration.Observe(time.Since(start).Seconds()) }()
	return l.Ledger.Reserve(ctx, account, amount, ttl, refill)
}

func (l timedLedger) Settle(ctx context.Context, reservationID string, cost credits.Amount, usage credits.Usage) (credits.Amount, error) {
	start := time.Now()
	defer func() { storeSettleDuration.Observe(time.Since(start).Seconds()) }()
	return l.Ledger.Settle(ctx, reservationID, cost, usage)
}

func (l timedLedger) Release(ctx context.Context, reservationID string) (credits.Amount, error) {
	start := time.Now()
	defer func() { storeReleaseDuration.Observe(time.Since(start).Seconds()) }()
	return l.Ledger.Release(ctx, reservationID)
}

func (l timedLedger) ReleaseExpired(ctx context.Context, now time.Time) (int, credits.Amount, error) {
	start := time.Now()
	defer func() { storeReleaseExpiredDuration.Observe(time.Since(start).Seconds()) }()
	return l.Ledger.ReleaseExpired(ctx, now)
}

func (l timedLedger) Credit(ctx context.Context, account credits.AccountID, amount credits.Amount, reason, idempotencyKey string) (credits.Entry, bool, error) {
	start := time.Now()
	defer func() { storeCreditDuration.Observe(time.Since(start).Seconds()) }()
	return l.Ledger.Credit(ctx, account, amount, reason, idempotencyKey)
}

// serverOutcomes are the outcomes a request can end with on the server's side (the alert rules
// divide by them), initialised at zero for every endpoint.
var serverOutcomes = []string{"upstream_error", "upstream_timeout", "no_backend_available", "store_unavailable",
	"internal_error", "rate_limit_exceeded", "insufficient_credits", "limits_unavailable"}

// initMetricLabels creates, at zero, the series of the label sets this configuration can
// produce, so a scrape right after start shows them (a rate() or an alert over a series that
// appears only with its first event misses that event): requests by endpoint, model, backend
// and auth kind (ok, and the server-side outcomes), upstream errors and failovers per backend,
// tokens and charges per model and backend, credit movements, 402s per auth kind, and 429s per
// tier and limit.
func (g *Gateway) initMetricLabels() {
	m := g.metrics
	auths := []string{"api_key"}
	if g.Anonymous != nil {
		auths = append(auths, "anonymous")
	}
	if g.Signin != nil {
		auths = append(auths, "jwt")
	}
	for i := range routing.Surfaces {
		ep := epSurface + endpoint(i)
		sf := ep.surface()
		if ep.lists() {
			continue
		}
		for _, l := range g.catalog.List(ep.format(), nil) {
			if l.Kind != sf.Kind {
				continue
			}
			for _, b := range l.Backends {
				for _, a := range auths {
					m.requests.WithLabelValues(ep.String(), l.Name, b, a, "ok")
				}
			}
		}
		for _, a := range auths {
			for _, o := range serverOutcomes {
				m.requests.WithLabelValues(ep.String(), "none", "none", a, o)
			}
		}
		m.duration.WithLabelValues(ep.String(), "ok")
	}
	for _, a := range auths {
		m.insufficient.WithLabelValues(a)
	}
	for _, k := range []string{"reserved", "settled", "refunded", "unbilled"} {
		m.credits.WithLabelValues(k)
	}
	for _, b := range g.Backends {
		for _, k := range []string{"connect", "timeout", "status_5xx", "cut", "encoded"} {
			m.upstreamErrors.WithLabelValues(b.Name, k)
		}
		m.failovers.WithLabelValues(b.Name)
		m.inflight.WithLabelValues(b.Name)
		for _, model := range b.Models {
			m.charged.WithLabelValues(model.Name, b.Name)
			m.ttft.WithLabelValues(model.Name, b.Name)
			for _, d := range []string{"input", "output"} {
				m.tokens.WithLabelValues(model.Name, b.Name, d)
			}
		}
	}
	if g.RateLimits != nil {
		for name, t := range g.RateLimits.Tiers {
			p := t.policy()
			for _, l := range p.Limits {
				metricRateLimited.WithLabelValues(name, l.Name)
			}
			if p.Concurrent > 0 {
				metricRateLimited.WithLabelValues(name, ratelimit.ConcurrentLimit)
			}
		}
	}
	if g.Signin != nil {
		for _, name := range []string{LimiterSigninAccount, LimiterSigninIP} {
			metricRateLimited.WithLabelValues(name, "signin_per_15m")
		}
	}
}
