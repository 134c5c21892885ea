package caddymodule_test

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
)

// roundTripWindows is how many measurement windows a round-trip test tries: a window into
// which the store's background work (the key use times written every 2 s, the sweeper every
// 10 s) falls counts more than the request made, and is tried again.
const roundTripWindows = 6

// TestStoreRoundTripsMetric: llm_gateway_store_round_trips_total is at zero right after start
// on the embedded store, and on a direct (unleased) PostgreSQL store a chat request, its key
// cached, moves it by exactly the round trips of one Reserve and one Settle of that store
// (measured on a store of its own, not written down here), plus the scrape's own count of the
// open reservations.
func TestStoreRoundTripsMetric(t *testing.T) {
	t.Run("embedded", func(t *testing.T) {
		e := startGateway(t, setup{gateway: backendBlock("rt-oai", "oai", "rt-model", "1", "2"),
			mocks: []mockSpec{{key: "oai", lines: "models rt-model"}}})
		if v, found := metricSum(e.scrape(), "llm_gateway_store_round_trips_total", nil); !found || v != 0 {
			t.Fatalf("llm_gateway_store_round_trips_total = %v (found %v) on the embedded store, want 0", v, found)
		}
	})
	t.Run("postgres", func(t *testing.T) {
		ref := reserveSettleRoundTrips(t)
		if ref < 2 {
			t.Fatalf("a Reserve and a Settle on a direct PostgreSQL store made %d round trips, want at least 2", ref)
		}
		s := setup{gateway: backendBlock("rt-oai", "oai", "rt-model", "1", "2"),
			mocks: []mockSpec{{key: "oai", lines: "models rt-model"}}, dsn: pgtest.NewDatabase(t)}
		e := startGateway(t, s)
		if _, found := metricSum(e.scrape(), "llm_gateway_store_round_trips_total", nil); !found {
			t.Fatalf("no llm_gateway_store_round_trips_total right after start")
		}
		u, k := e.userWithKey("rt@example.com", "10")
		body := `{"model":"rt-model","messages":[{"role":"user","content":"one two"}],"max_tokens":4}`
		if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK {
			t.Fatalf("warm-up request: %s", r) // it caches the key
		}
		want := float64(ref + 1) // the request's, and the next scrape's count of open reservations
		var seen []float64
		for range roundTripWindows {
			before, _ := metricSum(e.scrape(), "llm_gateway_store_round_trips_total", nil)
			if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK {
				t.Fatalf("request: %s", r)
			}
			after, _ := metricSum(e.scrape(), "llm_gateway_store_round_trips_total", nil)
			d := after - before
			seen = append(seen, d)
			if d < want {
				t.Fatalf("a request moved llm_gateway_store_round_trips_total by %v, want %v (%d for its Reserve and Settle, 1 for the scrape)", d, want, ref)
			}
			if d == want {
				break
			}
		}
		if seen[len(seen)-1] != want {
			t.Fatalf("no window of one request moved llm_gateway_store_round_trips_total by %v; saw %v", want, seen)
		}
		t.Logf("store round trips per request: %d (windows seen: %v, each with 1 for the scrape)", ref, seen)
		if n := len(e.settlements(u.ID)); n != len(seen)+1 {
			t.Errorf("%d settle entries, want %d", n, len(seen)+1)
		}
		e.checkAllAccounts(0)
	})
}

// reserveSettleRoundTrips is the round trips that one Reserve and one Settle make on a direct
// PostgreSQL store of the test's own.
func reserveSettleRoundTrips(t *testing.T) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := postgres.Open(ctx, pgtest.NewDatabase(t))
	if err != nil {
		t.Fatalf("opening a postgres store: %v", err)
	}
	defer st.Close()
	acct := credits.UserAccount("usr_roundtrips")
	if _, _, err := st.Credit(ctx, acct, 10*credits.Credit, "test", ""); err != nil {
		t.Fatal(err)
	}
	before := st.RoundTrips()
	r, _, err := st.Reserve(ctx, acct, credits.Credit, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Settle(ctx, r.ID, 1, credits.Usage{Model: "rt-model", Backend: "rt-oai", InputTokens: 2, OutputTokens: 4}); err != nil {
		t.Fatal(err)
	}
	return st.RoundTrips() - before
}

// TestRedisRoundTripsMetric: llm_gateway_redis_round_trips_total counts Redis round trips: a
// request refused by the shared rate limits is one (its admission, every limit of the tier in
// one script), an admitted one at least one.
func TestRedisRoundTripsMetric(t *testing.T) {
	prefix := redisPrefix(t)
	e := startGateway(t, sharedLimitsSetup(testRedisAddr, prefix, 1, 5))
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	count := func() float64 {
		v, found := metricSum(e.scrape(), "llm_gateway_redis_round_trips_total", nil)
		if !found {
			t.Fatalf("no llm_gateway_redis_round_trips_total")
		}
		return v
	}
	before := count()
	if r := e.post("/v1/chat/completions", body, nil); r.status != http.StatusOK {
		t.Fatalf("first request: %s", r)
	}
	admitted := count() - before
	if admitted < 1 {
		t.Fatalf("an admitted request moved llm_gateway_redis_round_trips_total by %v, want at least 1", admitted)
	}
	for i := range 3 {
		before = count()
		if r := e.post("/v1/chat/completions", body, nil); r.status != http.StatusTooManyRequests {
			t.Fatalf("request %d over a limit of 1 a day: %s", i+2, r)
		}
		if d := count() - before; d != 1 {
			t.Fatalf("a request refused by the rate limits moved llm_gateway_redis_round_trips_total by %v, want 1", d)
		}
	}
	t.Log(fmt.Sprintf("an admitted request: %v Redis round trips", admitted))
}

// TestRedisRoundTripsPerKeyRequest: a request with an API key is admitted under its key's
// limits and its user's, both in one Redis round trip, and its two ends go together, with the
// next admission or on their own: at most 2 round trips a request (each of the four was one
// before), at least 1. With the key's limit spent, a refusal takes the admission's round trip
// and gives the user's admission back later (riding with another, or on its own).
func TestRedisRoundTripsPerKeyRequest(t *testing.T) {
	prefix := redisPrefix(t)
	e := startGateway(t, setup{
		gateway: rateLimitBackend + `
		failover 1
		rate_limits {
			default_tier free
			tier free {
				requests_per_day 10
				tokens_per_minute 100000
				concurrent 5
			}
		}` + redisBlock(testRedisAddr, prefix, "1s"),
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	})
	_, k := e.userWithKey("rt-key@example.com", "10")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	settled := func() float64 { return settledRedisRoundTrips(t, e) }
	const n = 10
	before := settled()
	for i := range n {
		if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK {
			t.Fatalf("request %d: %s", i+1, r)
		}
	}
	d := settled() - before
	if d < n || d > 2*n {
		t.Fatalf("%d admitted key requests took %v Redis round trips, want %d to %d", n, d, n, 2*n)
	}
	t.Logf("%d admitted key requests: %v Redis round trips", n, d)
	before = settled()
	if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusTooManyRequests {
		t.Fatalf("request %d over a limit of %d a day: %s", n+1, n, r)
	}
	if d := settled() - before; d < 1 || d > 2 {
		t.Fatalf("a refused key request took %v Redis round trips, want 1 or 2", d)
	}
}

// settledRedisRoundTrips waits until the ends queued on the gateway's Redis hub have gone
// (2 ms), then reads llm_gateway_redis_round_trips_total.
func settledRedisRoundTrips(t *testing.T, e *env) float64 {
	t.Helper()
	time.Sleep(50 * time.Millisecond)
	v, found := metricSum(e.scrape(), "llm_gateway_redis_round_trips_total", nil)
	if !found {
		t.Fatalf("no llm_gateway_redis_round_trips_total")
	}
	return v
}

// TestRedisRoundTripsUnderConcurrency: concurrent requests of one key share Redis round trips
// (admissions group-sent, ends riding with them): 400 requests at concurrency 40 take fewer
// round trips than requests, every limit kind on; none is refused (40 at once is the bound).
func TestRedisRoundTripsUnderConcurrency(t *testing.T) {
	prefix := redisPrefix(t)
	e := startGateway(t, setup{
		gateway: rateLimitBackend + `
		failover 1
		rate_limits {
			default_tier free
			tier free {
				burst_per_second 100000
				requests_per_minute 1000000
				requests_per_hour 10000000
				requests_per_day 100000000
				tokens_per_minute 100000000
				concurrent 40
			}
		}` + redisBlock(testRedisAddr, prefix, "5s"),
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	})
	_, k := e.userWithKey("rt-concurrent@example.com", "100")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	count := func() float64 { return settledRedisRoundTrips(t, e) }
	if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK { // warm: scripts loaded, key cached
		t.Fatal(r)
	}
	const n, c = 400, 40
	before := count()
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	errs := make(chan error, n)
	for range c {
		go func() {
			for i := range work {
				r := e.post("/v1/chat/completions", body, bearer(k.Key))
				if r.status != http.StatusOK {
					errs <- fmt.Errorf("request %d: %s", i, r)
					continue
				}
				errs <- nil
			}
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	d := count() - before
	t.Logf("%d requests at concurrency %d: %v Redis round trips (%.2f a request)", n, c, d, d/n)
	if d >= n {
		t.Fatalf("%d concurrent requests took %v Redis round trips: not shared (want fewer than one a request)", n, d)
	}
}

// TestRedisLeasedLimitsAcrossSites: with leases (lease_divisor 8: leases of 32 requests of a
// limit of 256 an hour), two gateways on one Redis, each with a client of its own, admit at
// most 256 requests of one key in total, not 512, and no fewer than the limit less a lease
// on each; most of them without a Redis round trip; each gateway's rate limit headers count
// down.
func TestRedisLeasedLimitsAcrossSites(t *testing.T) {
	prefix := redisPrefix(t)
	limits := `
		rate_limits {
			default_tier free
			tier free {
				requests_per_hour 256
			}
		}`
	leasing := func(addr string) string {
		return fmt.Sprintf(`
		redis redis://%s {
			prefix %s
			timeout 1s
			lease_divisor 8
		}`, addr, prefix)
	}
	proxy := newFaultProxy(t, testRedisAddr) // another address: a client of its own
	e := startGateway(t, setup{
		gateway: rateLimitBackend + `
		failover 1` + limits + leasing(proxy.Addr()),
		sites: secondSite(limits + leasing(testRedisAddr)),
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	})
	_, k := e.userWithKey("leased@example.com", "100")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	gw := []string{e.gw, fmt.Sprintf("http://127.0.0.1:%d", e.port("gw2"))}
	fromLease := func() float64 {
		n, _ := metricSum(e.scrape(), "llm_gateway_rate_limit_admissions_total", map[string]string{"source": "lease"})
		return n
	}
	before, leasedBefore := settledRedisRoundTrips(t, e), fromLease()
	admitted := 0
	last := []int64{-1, -1}
	for i := range 300 {
		r := e.request(http.MethodPost, gw[i%2]+"/v1/chat/completions", body, bearer(k.Key))
		switch r.status {
		case http.StatusOK:
			admitted++
			rem, err := strconv.ParseInt(r.header.Get("X-Ratelimit-Remaining"), 10, 64)
			if err != nil {
				t.Fatalf("request %d: X-RateLimit-Remaining %q", i, r.header.Get("X-Ratelimit-Remaining"))
			}
			if last[i%2] >= 0 && rem >= last[i%2] {
				t.Fatalf("request %d on gateway %d: X-RateLimit-Remaining %d after %d", i, i%2, rem, last[i%2])
			}
			last[i%2] = rem
		case http.StatusTooManyRequests:
		default:
			t.Fatalf("request %d: %s", i, r)
		}
	}
	if admitted > 256 || admitted < 256-2*32 {
		t.Fatalf("two leasing gateways admitted %d requests of a limit of 256", admitted)
	}
	trips, leased := settledRedisRoundTrips(t, e)-before, fromLease()-leasedBefore
	t.Logf("300 requests over two gateways: %d admitted, %v from leases, %v Redis round trips", admitted, leased, trips)
	// Two admissions a request (the key's and its user's); a lease of 32 covers 31 more of each.
	if leased < 1.5*float64(admitted) || trips > 100 {
		t.Fatalf("%v of %d admissions from leases, %v Redis round trips for 300 requests", leased, 2*admitted, trips)
	}

	// Redis cut: a caller with a lease here is admitted from it for at most its life (a
	// second), at most what it holds, then refused with 503 limits_unavailable, as a caller
	// without one is at once.
	_, k2 := e.userWithKey("leased-cut@example.com", "100")
	_, k3 := e.userWithKey("unleased-cut@example.com", "100")
	if r := e.post("/v1/chat/completions", body, bearer(k2.Key)); r.status != http.StatusOK {
		t.Fatalf("before the cut: %s", r)
	}
	if r := e.post("/v1/chat/completions", body, bearer(k3.Key)); r.status != http.StatusOK { // cached, no lease left: it has one
		t.Fatalf("before the cut: %s", r)
	}
	for range 31 { // k3's lease spent: its next request needs Redis
		if r := e.post("/v1/chat/completions", body, bearer(k3.Key)); r.status != http.StatusOK {
			t.Fatalf("before the cut: %s", r)
		}
	}
	proxy.Cut()
	cut := time.Now()
	errorOf(t, e.post("/v1/chat/completions", body, bearer(k3.Key)), http.StatusServiceUnavailable, "limits_unavailable")
	passed := 0
	for {
		r := e.post("/v1/chat/completions", body, bearer(k2.Key))
		if r.status == http.StatusServiceUnavailable {
			errorOf(t, r, http.StatusServiceUnavailable, "limits_unavailable")
			break
		}
		if r.status != http.StatusOK {
			t.Fatalf("after the cut: %s", r)
		}
		passed++
		if passed > 31 || time.Since(cut) > 3*time.Second {
			t.Fatalf("after the cut: %d admitted from a lease of 32 in %s", passed, time.Since(cut))
		}
	}
	t.Logf("after the cut: %d admitted from the lease in %s, then 503", passed, time.Since(cut).Round(time.Millisecond))
}
