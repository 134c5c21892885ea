package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/cmd/llmbench/fakebackend"
)

// TestMain lets the test binary be `llmbench fake` too, as startFake re-executes it.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "fake" {
		if err := fakebackend.Main(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "fake:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestValidateBackendsAndPeers(t *testing.T) {
	base := config{rounds: 1, duration: time.Second, conc: 1, cpuConc: 1, maxRequests: 1, ttftN: 1, ttftChunks: 1,
		streams: 1, streamChunks: 1, streamInterval: time.Millisecond, cpuRequests: 1, cpuSlices: 1, keys: 1, pprofSeconds: 1,
		surfaces: true, surfaceDur: time.Second, surfaceTTFTN: 1, multi: true, multiDuration: time.Second}
	for _, tc := range []struct {
		backends, peers []string
		wantErr         string
	}{
		{[]string{"mock"}, nil, ""},
		{[]string{"mock", "fake"}, nil, ""},
		{[]string{"fake", "mock"}, []string{"portkey"}, ""},
		{[]string{"fake"}, nil, "must include mock"},
		{[]string{"mock", "other"}, nil, `unknown backend "other"`},
		{[]string{"mock", "fake", "fake"}, nil, "fake given twice"},
		{[]string{"mock"}, []string{"portkey"}, "needs fake"},
		{[]string{"mock", "fake"}, []string{"bifrost"}, `unknown peer "bifrost"`},
		{[]string{"mock", "fake"}, []string{"portkey", "portkey"}, "portkey given twice"},
	} {
		c := base
		c.backends, c.peers = tc.backends, tc.peers
		err := c.validate()
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("-backends %v -peers %v: got %v, want %q", tc.backends, tc.peers, err, tc.wantErr)
		}
	}
	c := base
	c.backends, c.pprofMultiFile = []string{"mock"}, "multi.prof"
	if err := c.validate(); err != nil {
		t.Errorf("-pprof-multi with -multi: %v", err)
	}
	c.multi = false
	if err := c.validate(); err == nil || !strings.Contains(err.Error(), "needs -multi") {
		t.Errorf("-pprof-multi without -multi: got %v", err)
	}
}

// The fake runs as a process of this program and answers what every target must: a chat
// completion and a whole stream ending in [DONE].
func TestFakeBackendProcess(t *testing.T) {
	ctx := context.Background()
	p, err := startFake(ctx, t.TempDir(), "fake", "-chunks", "3", "-interval", "1ms")
	if err != nil {
		t.Fatal(err)
	}
	defer p.stop()
	tg := &target{name: "fake", url: p.baseURL() + "/v1/chat/completions", keys: []string{"sk_test"}, proc: p}
	if err := smoke(ctx, tg); err != nil {
		t.Fatal(err)
	}
	cl := newClient(1, 10*time.Second)
	defer cl.CloseIdleConnections()
	first, total, err := doStream(ctx, cl, tg, 0)
	if err != nil {
		t.Fatal(err)
	}
	if first <= 0 || total < first+2*time.Millisecond {
		t.Errorf("stream of 3 chunks 1ms apart: first data after %s, whole stream %s", first, total)
	}
}

// A peer that cannot run here is reported as unavailable (the run leaves it out), not as a
// failure of the run.
func TestPortkeyWithoutNodeIsLeftOut(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	b := &bench{cfg: config{peersDir: t.TempDir()}, root: t.TempDir(), res: newResults()}
	_, err := b.startPortkey(context.Background(), "fake-portkey", "127.0.0.1:1")
	if !errors.Is(err, errPeerUnavailable) {
		t.Fatalf("got %v, want errPeerUnavailable", err)
	}
}

// The report has one table per backend, with the rows the run measured, each ratio taken to
// plain Caddy in front of the same backend.
func TestReportHasOneTablePerBackend(t *testing.T) {
	b := &bench{cfg: config{rounds: 1, conc: 32, keys: 1, caddyBin: "/nonexistent", rateLimits: true}, res: newResults()}
	for _, name := range []string{"mock", "fake"} {
		set := &backendSet{name: name, label: "backend " + name}
		mk := func(role string) *target { return &target{name: targetName(name, role)} }
		set.direct, set.caddy, set.gateway, set.limited = mk("direct"), mk("caddy"), mk("gateway"), mk("gateway-limits")
		if name == "fake" {
			set.peers = []*labeledTarget{{"Portkey", mk("portkey")}}
		}
		b.sets = append(b.sets, set)
	}
	rps := map[string]float64{"direct": 8000, "caddy": 4000, "gateway": 3000, "gateway-limits": 2000,
		"fake-direct": 20000, "fake-caddy": 5000, "fake-gateway": 4000, "fake-gateway-limits": 3500, "fake-portkey": 500}
	for n, v := range rps {
		b.res.add("rps", n, v)
		b.res.add("cpureq", n, 1e6/v)
	}
	out := b.report()
	for _, want := range []string{
		"### In front of backend mock\n",
		"| gateway (key, reservation, settlement, metering) | 3000 | ×0.75 | 333.3 |",
		"| gateway with rate limits | 2000 | ×0.50 | 500.0 |",
		"### In front of backend fake\n",
		"| backend direct | 20000 | ×4.00 | 50.0 |",
		"| gateway (key, reservation, settlement, metering) | 4000 | ×0.80 | 250.0 |",
		"| Portkey | 500 | ×0.10 | 2000.0 |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Count(out, "### In front of") != 2 {
		t.Errorf("want 2 per-backend tables:\n%s", out)
	}
}

// TestScrapeRoundTrips: the round-trip counters are read from a Prometheus text exposition,
// and a process without them is an error, not zero round trips.
func TestScrapeRoundTrips(t *testing.T) {
	body := "# HELP llm_gateway_store_round_trips_total x\n# TYPE llm_gateway_store_round_trips_total counter\n" +
		"llm_gateway_store_round_trips_total 1234\nllm_gateway_redis_errors_total{operation=\"admit\"} 3\n" +
		"llm_gateway_redis_round_trips_total 5.6789e+06\n"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(body))
	}))
	defer srv.Close()
	p := &proc{name: "test", admin: strings.TrimPrefix(srv.URL, "http://")}
	store, rds, err := p.scrapeRoundTrips(context.Background())
	if err != nil || store != 1234 || rds != 5678900 {
		t.Fatalf("got %v, %v, %v; want 1234, 5678900, nil", store, rds, err)
	}
	body = "llm_gateway_store_round_trips_total 1\n"
	if _, _, err := p.scrapeRoundTrips(context.Background()); err == nil {
		t.Fatalf("no error without the Redis counter")
	}
}

// TestStreamDone: each surface's stream ends on its own last event.
func TestStreamDone(t *testing.T) {
	for _, tc := range []struct {
		surface, data string
		want          bool
	}{
		{"", "[DONE]", true},
		{"", `{"choices":[]}`, false},
		{"messages", `{"type":"message_stop"}`, true},
		{"messages", `{"type":"message_delta","delta":{}}`, false},
		{"responses", `{"type":"response.completed","response":{}}`, true},
		{"responses", `{"type":"response.output_text.delta"}`, false},
	} {
		tg := &target{surface: tc.surface}
		if got := tg.streamDone([]byte(tc.data)); got != tc.want {
			t.Errorf("%q %s: %v, want %v", tc.surface, tc.data, got, tc.want)
		}
	}
}

// TestProcessesNamed: the multi-instance mode's CPU of PostgreSQL is found by command name;
// this test binary finds itself so.
func TestProcessesNamed(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc (Linux only; CI runs on Linux)")
	}
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	if pids := processesNamed(strings.TrimSpace(string(comm))); !slices.Contains(pids, os.Getpid()) {
		t.Fatalf("processesNamed(%q) = %v, without this process %d", strings.TrimSpace(string(comm)), pids, os.Getpid())
	}
	if before, err := cpuTicks(os.Getpid()); err != nil || before < 0 {
		t.Fatal(before, err)
	}
}
