package main

import (
	"fmt"
	"math"
	"os/exec"
	"runtime"
	"slices"
	"strings"
)

// Targets of the gateway, as the report checks them.
const (
	wantThroughputRatio = 0.85  // gateway/caddy req/s at c=32, at least
	wantAddedP50ms      = 0.1   // gateway − caddy p50 at c=1, at most
	wantAddedTTFTms     = 0.2   // gateway − caddy TTFT p50, at most
	wantKBPerStream     = 120.0 // gateway, at most
	wantKeysCPUGrowth   = 0.10  // CPU/request with the big store vs 1 key, at most +10%
	wantLimitsCost      = 0.05  // rate limits on vs off: throughput lost and CPU/request added, at most 5%
	wantMultiRatio      = 0.9   // one gateway on PostgreSQL + Redis / one on the embedded store, req/s at c=32, at least
	wantRoundTrips      = 1.0   // network round trips (store + Redis) per request, on average, at most
)

// report renders the run as markdown.
func (b *bench) report() string {
	cfg, r := b.cfg, b.res
	var s strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&s, format, a...) }

	w("# llmbench: gateway vs plain Caddy vs the backend directly\n\n")
	mode := ""
	if cfg.quick {
		mode = " **(-quick: rough figures)**"
	}
	w("%s, %d CPUs, load average %s at start and %s at end; %s; `%s` (%s).%s\n\n",
		b.start.UTC().Format("2006-01-02 15:04 MST"), runtime.NumCPU(), b.loadStart, b.loadEnd, runtime.Version(),
		cfg.caddyBin, caddyVersion(cfg.caddyBin), mode)
	w("Medians over %d interleaved round(s); ratios and differences are taken within each round, then their median. "+
		"Throughput: %s per target and round, closed loop at c=%d; latency: %s at c=1; TTFT: %d streams at c=1 "+
		"(mock: %d chunks, %s apart).\n\n",
		cfg.rounds, cfg.duration, cfg.conc, cfg.duration, cfg.ttftN, cfg.ttftChunks, cfg.ttftInterval)

	// The targets.
	thr := r.pairwise("rps", "gateway", "caddy", ratio)
	dp50 := r.pairwise("p50", "gateway", "caddy", diff)
	dttft := r.pairwise("ttft50", "gateway", "caddy", diff)
	kb := r.med("kbps", "gateway")
	growth := r.pairwise("cpu", "gateway-bigstore", "gateway-1key", ratio) - 1
	w("## Targets\n\n")
	w("| check | measured | plain Caddy (reference) | target | verdict |\n|---|---:|---:|---:|:---:|\n")
	w("| throughput gateway / caddy, c=%d | %s | 1 | ≥ %.2f | %s |\n", cfg.conc, f2(thr), wantThroughputRatio, verdict(thr >= wantThroughputRatio, thr))
	w("| added p50 latency gateway − caddy, c=1 | %s ms | caddy − direct: %s ms | ≤ %.1f ms | %s |\n",
		fsigned(dp50, 3), fsigned(r.pairwise("p50", "caddy", "direct", diff), 3), wantAddedP50ms, verdict(dp50 <= wantAddedP50ms, dp50))
	w("| added TTFT gateway − caddy, c=1 | %s ms | caddy − direct: %s ms | ≤ %.1f ms | %s |\n",
		fsigned(dttft, 3), fsigned(r.pairwise("ttft50", "caddy", "direct", diff), 3), wantAddedTTFTms, verdict(dttft <= wantAddedTTFTms, dttft))
	w("| memory per open stream (%d streams) | %s KB | %s KB | ≤ %.0f KB | %s |\n",
		cfg.streams, f1(kb), f1(r.med("kbps", "caddy")), wantKBPerStream, verdict(kb <= wantKBPerStream, kb))
	w("| CPU/request, %s keys vs 1 key in the store | %s | – | ≤ +%.0f%% | %s |\n",
		thousands(cfg.keys), fpct(growth), wantKeysCPUGrowth*100, verdict(growth <= wantKeysCPUGrowth, growth))
	if cfg.rateLimits {
		lthr := r.pairwise("rps", "gateway-limits", "gateway", ratio)
		lcpu := r.pairwise("cpu", "gateway-limits-1key", "gateway-1key", ratio) - 1
		w("| throughput with rate limits / without, c=%d | %s | – | ≥ %.2f | %s |\n", cfg.conc, f2(lthr), 1-wantLimitsCost,
			verdict(lthr >= 1-wantLimitsCost, lthr))
		w("| CPU/request with rate limits vs without | %s | – | ≤ +%.0f%% | %s |\n", fpct(lcpu), wantLimitsCost*100,
			verdict(lcpu <= wantLimitsCost, lcpu))
	}
	if cfg.surfaces {
		for _, sf := range []struct{ name, label string }{{"messages", "Messages (/v1/messages)"}, {"responses", "Responses (/v1/responses)"}} {
			st := r.pairwise("rps", sf.name+"-gateway", sf.name+"-caddy", ratio)
			dt := r.pairwise("ttft50", sf.name+"-gateway", sf.name+"-caddy", diff)
			w("| %s: throughput gateway / caddy, c=%d | %s | 1 | ≥ %.2f | %s |\n", sf.label, cfg.conc, f2(st), wantThroughputRatio,
				verdict(st >= wantThroughputRatio, st))
			w("| %s: added TTFT gateway − caddy, c=1 | %s ms | %s ms | ≤ %.1f ms | %s |\n", sf.label, fsigned(dt, 3),
				f3(r.med("ttft50", sf.name+"-caddy")), wantAddedTTFTms, verdict(dt <= wantAddedTTFTms, dt))
		}
	}
	if len(b.multiSetups) > 0 {
		mr := r.pairwise("rps", multiTargets[1], multiTargets[0], ratio)
		w("| one gateway on PostgreSQL (leases) + Redis / on the embedded store, c=%d | %s | – | ≥ %.2f | %s |\n", cfg.conc, f2(mr),
			wantMultiRatio, verdict(mr >= wantMultiRatio, mr))
		for _, n := range multiTargets[1:] {
			rt := r.med("storert", n) + r.med("redisrt", n)
			w("| network round trips per request (store + Redis), %s | %s | – | ≤ %.0f | %s |\n", n, f3(rt), wantRoundTrips,
				verdict(rt <= wantRoundTrips, rt))
		}
	}
	w("\n")
	if b.multiNote != "" {
		w("Multi-instance mode: %s.\n\n", b.multiNote)
	}

	// One summary table per backend.
	w("## Per backend\n\n")
	w("The same measurements in front of each backend, in the same interleaved rounds. CPU/request: utime+stime of the serving "+
		"process alone during the c=%d run, divided by the requests sent; ×plain Caddy: req/s over plain Caddy's in front "+
		"of the same backend, within each round. The fake's streams are shaped like the mock's (%d chunks, %s apart).\n\n",
		cfg.conc, cfg.ttftChunks, cfg.ttftInterval)
	for _, set := range b.sets {
		w("### In front of %s\n\n", set.label)
		w("| target | req/s c=%d | × plain Caddy | µs CPU/request | p50 ms c=1 | TTFT p50 ms c=1 | failed requests |\n|---|---:|---:|---:|---:|---:|---:|\n", cfg.conc)
		rows := []*labeledTarget{
			{"backend direct", set.direct},
			{"plain Caddy reverse_proxy", set.caddy},
			{"gateway (key, reservation, settlement, metering)", set.gateway},
		}
		if set.limited != nil {
			rows = append(rows, &labeledTarget{"gateway with rate limits", set.limited})
		}
		rows = append(rows, set.peers...)
		for _, row := range rows {
			n := row.t.name
			w("| %s | %s | ×%s | %s | %s | %s | %d |\n", row.label, f0(r.med("rps", n)), f2(r.pairwise("rps", n, set.caddy.name, ratio)),
				f1(r.med("cpureq", n)), f3(r.med("p50", n)), f3(r.med("ttft50", n)), r.errs[n])
		}
		w("\n")
	}

	if cfg.surfaces {
		w("## Messages and Responses (the mock)\n\n")
		w("/v1/messages through a gateway whose backend is the mock in the Anthropic style, /v1/responses through the gateway "+
			"in front of the mock (OpenAI style, store: false), each beside plain Caddy in front of the same mock, in interleaved rounds: "+
			"non-streaming req/s at c=%d for %s, then TTFT (first \"data:\" line) over %d streams at c=1.\n\n", cfg.conc, cfg.surfaceDur, cfg.surfaceTTFTN)
		w("| target | req/s c=%d | × plain Caddy | TTFT p50 ms c=1 | TTFT p99 ms c=1 | added TTFT ms | failed requests |\n|---|---:|---:|---:|---:|---:|---:|\n", cfg.conc)
		for _, sf := range []struct{ name, label string }{{"messages", "Messages"}, {"responses", "Responses"}} {
			for _, role := range []struct{ name, label string }{{"caddy", "plain Caddy reverse_proxy"}, {"gateway", "gateway"}} {
				n, c := sf.name+"-"+role.name, sf.name+"-caddy"
				added := "–"
				if role.name == "gateway" {
					added = fsigned(r.pairwise("ttft50", n, c, diff), 3)
				}
				w("| %s, %s | %s | ×%s | %s | %s | %s | %d |\n", sf.label, role.label, f0(r.med("rps", n)), f2(r.pairwise("rps", n, c, ratio)),
					f3(r.med("ttft50", n)), f3(r.med("ttft99", n)), added, r.errs[n])
			}
		}
		w("\n")
	}

	if len(b.multiSetups) > 0 {
		w("## Several instances (PostgreSQL + Redis)\n\n")
		w("Gateways in front of the mock with the same generous rate limits, in interleaved rounds: req/s at c=%d for %s (the load "+
			"spread over the processes request by request), then p50/p99 at c=1 for %s. Round trips per request: the processes' "+
			"llm_gateway_store_round_trips_total and llm_gateway_redis_round_trips_total scraped before and after the c=%d run, "+
			"divided by the requests sent (the scrape's own count of open reservations taken off). CPU per request: utime+stime over "+
			"the c=%d run of the configuration's gateway processes, of the Redis server and of every PostgreSQL process (read from "+
			"/proc; the servers' CPU is what this configuration's requests cost them, nothing else using them then), divided by the "+
			"requests sent. Each PostgreSQL configuration had a database of its own (lease_size %s) and a Redis prefix of its own, "+
			"dropped after; its rate limits were leased to each process (the redis block's default lease_divisor).\n\n",
			cfg.conc, cfg.multiDuration, cfg.multiDuration, cfg.conc, cfg.conc, multiLeaseSize)
		w("| configuration | processes | req/s c=%d | × embedded | p50 ms c=1 | p99 ms c=1 | store round trips/request | Redis round trips/request | µs CPU/request: gateways | Redis | PostgreSQL | failed requests |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n", cfg.conc)
		for _, s := range b.multiSetups {
			redisCPU, pgCPU := "–", "–"
			if s.db != "" {
				redisCPU, pgCPU = f0(r.med("rediscpu", s.name)), f0(r.med("pgcpu", s.name))
			}
			w("| %s | %d | %s | ×%s | %s | %s | %s | %s | %s | %s | %s | %d |\n", s.label, len(s.procs), f0(r.med("rps", s.name)),
				f2(r.pairwise("rps", s.name, multiTargets[0], ratio)), f3(r.med("p50", s.name)), f3(r.med("p99", s.name)),
				f3(r.med("storert", s.name)), f3(r.med("redisrt", s.name)), f0(r.med("gwcpu", s.name)), redisCPU, pgCPU, r.errs[s.name])
		}
		w("\n")
	}

	// Non-streaming and TTFT.
	w("## Non-streaming chat completions and time to first token (the mock)\n\n")
	w("| target | req/s, c=%d | CPU cores used, c=%d | p50 ms, c=1 | p99 ms, c=1 | TTFT p50 ms | TTFT p99 ms | whole stream p50 ms | failed requests |\n", cfg.conc, cfg.conc)
	w("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	proxied := []struct{ name, label string }{{"direct", "mock, direct"}, {"caddy", "plain Caddy reverse_proxy"}, {"gateway", "gateway"}}
	if cfg.rateLimits {
		proxied = append(proxied, struct{ name, label string }{"gateway-limits", "gateway with rate limits"})
	}
	for _, t := range proxied {
		w("| %s | %s | %s | %s | %s | %s | %s | %s | %d |\n", t.label, f0(r.med("rps", t.name)), f2(r.med("cores", t.name)), f3(r.med("p50", t.name)),
			f3(r.med("p99", t.name)), f3(r.med("ttft50", t.name)), f3(r.med("ttft99", t.name)), f3(r.med("stream50", t.name)), r.errs[t.name])
	}
	for _, p := range [][2]string{{"caddy", "direct"}, {"gateway", "caddy"}, {"gateway", "direct"}} {
		w("| *%s vs %s* | ×%s | | %s | %s | %s | %s | %s | |\n", p[0], p[1],
			f2(r.pairwise("rps", p[0], p[1], ratio)), fsigned(r.pairwise("p50", p[0], p[1], diff), 3),
			fsigned(r.pairwise("p99", p[0], p[1], diff), 3), fsigned(r.pairwise("ttft50", p[0], p[1], diff), 3),
			fsigned(r.pairwise("ttft99", p[0], p[1], diff), 3), fsigned(r.pairwise("stream50", p[0], p[1], diff), 3))
	}
	w("\nCPU cores used: utime+stime of the serving process alone (for the mock, the mock; for Caddy and the gateway, not the mock "+
		"behind them) during the c=%d run, divided by its length.\n\n", cfg.conc)

	// Memory.
	w("## Memory per open stream\n\n")
	w("%d concurrent streams (mock: %d chunks, %s apart), on a freshly started process warmed with 200 requests and 10 streams; "+
		"VmRSS %s after the last stream opened, minus VmRSS idle with no connection open, divided by the streams open. "+
		"The last column is the same difference in Go's live heap plus goroutine stacks, read from /debug/vars after a forced "+
		"collection (VmRSS growth can be smaller: the idle process may hold freed heap pages that the streams reuse).\n\n",
		cfg.streams, cfg.streamChunks, cfg.streamInterval, cfg.memSettle)
	w("| target | idle VmRSS MB | VmRSS with streams open MB | streams open | KB per open stream (VmRSS) | KB per open stream (Go live heap+stacks) |\n|---|---:|---:|---:|---:|---:|\n")
	for _, t := range []struct{ name, label string }{{"caddy", "plain Caddy reverse_proxy"}, {"gateway", "gateway"}} {
		w("| %s | %s | %s | %s | %s | %s |\n", t.label, f1(r.med("rssidle", t.name)), f1(r.med("rssopen", t.name)),
			f0(r.med("streamsopen", t.name)), f1(r.med("kbps", t.name)), f1(r.med("livekbps", t.name)))
	}
	w("\n")

	// CPU.
	w("## CPU per request\n\n")
	w("utime+stime of the serving process (/proc/<pid>/stat, CLK_TCK=%d) over %d non-streaming requests at c=%d per target and round, "+
		"sent in %d slices with the targets taking turns. The two gateways are separate fresh processes, the same configuration on "+
		"their own SQLite files (same user, key and balance; one with %s keys), warmed and loaded alike.\n\n",
		b.hz, cfg.cpuRequests, cfg.cpuConc, cfg.cpuSlices, thousands(cfg.keys))
	w("| target | API keys in the store | µs CPU per request | vs gateway, 1 key | req/s during the measurement |\n|---|---:|---:|---:|---:|\n")
	rows := []struct{ name, label, keys string }{
		{"caddy", "plain Caddy reverse_proxy", "–"},
		{"gateway-1key", "gateway", "1"},
		{"gateway-bigstore", "gateway, the same key", thousands(cfg.keys)},
	}
	if len(b.spread) > 0 {
		rows = append(rows, struct{ name, label, keys string }{"gateway-bigstore-spread",
			fmt.Sprintf("gateway, requests spread over %s keys", thousands(len(b.spread))), thousands(cfg.keys)})
	}
	if cfg.rateLimits {
		rows = append(rows, struct{ name, label, keys string }{"gateway-limits-1key", "gateway with rate limits", "1"})
	}
	for _, t := range rows {
		vs := "–"
		if t.name != "caddy" && t.name != "gateway-1key" {
			vs = fpct(r.pairwise("cpu", t.name, "gateway-1key", ratio) - 1)
		}
		if t.name == "caddy" {
			vs = "×" + f2(r.pairwise("cpu", t.name, "gateway-1key", ratio))
		}
		w("| %s | %s | %s | %s | %s |\n", t.label, t.keys, f1(r.med("cpu", t.name)), vs, f0(r.med("cpurps", t.name)))
	}
	w("\n")

	if b.pprofTop != "" {
		w("## Gateway CPU profile under load\n\n")
		w("`go tool pprof -top -nodecount=15 %s`, %ds taken during an extra (unreported) c=%d non-streaming run:\n\n```\n%s\n```\n\n",
			cfg.pprofFile, cfg.pprofSeconds, cfg.conc, b.pprofTop)
	}
	if b.pprofMultiTop != "" {
		w("## PostgreSQL + Redis gateway CPU profile under load\n\n")
		w("`go tool pprof -top -nodecount=15 %s`, %ds taken during an extra (unreported) c=%d run after the multi-instance rounds:\n\n```\n%s\n```\n\n",
			cfg.pprofMultiFile, cfg.pprofSeconds, cfg.conc, b.pprofMultiTop)
	}

	// Failures and notes.
	if len(r.errs) > 0 || len(r.notes) > 0 {
		w("## Failures and notes\n\n")
		names := make([]string, 0, len(r.errs))
		for k := range r.errs {
			names = append(names, k)
		}
		slices.Sort(names)
		for _, k := range names {
			w("- %s: %d failed requests; first: %s\n", k, r.errs[k], r.firstErr[k])
		}
		for _, n := range r.notes {
			w("- %s\n", n)
		}
		w("\n")
	}

	// Every round.
	w("## Every round\n\n")
	w("| metric | target |")
	for i := 1; i <= cfg.rounds; i++ {
		w(" round %d |", i)
	}
	w("\n|---|---|%s\n", strings.Repeat("---:|", cfg.rounds))
	keys := make([]string, 0, len(r.vals))
	for k := range r.vals {
		keys = append(keys, k)
	}
	order := map[string]int{"rps": 0, "cores": 1, "cpureq": 2, "p50": 3, "p99": 4, "ttft50": 5, "ttft99": 6, "stream50": 7, "cpu": 8,
		"cpurps": 9, "rssidle": 10, "rssopen": 11, "streamsopen": 12, "kbps": 13, "livekbps": 14, "storert": 15, "redisrt": 16,
		"gwcpu": 17, "rediscpu": 18, "pgcpu": 19}
	slices.SortFunc(keys, func(a, b string) int {
		ma, ta, _ := strings.Cut(a, "/")
		mb, tb, _ := strings.Cut(b, "/")
		if order[ma] != order[mb] {
			return order[ma] - order[mb]
		}
		return strings.Compare(ta, tb)
	})
	labels := map[string]string{"rps": "req/s c=" + fmt.Sprint(cfg.conc), "cores": "CPU cores used c=" + fmt.Sprint(cfg.conc),
		"cpureq": "µs CPU/request c=" + fmt.Sprint(cfg.conc), "p50": "p50 ms c=1", "p99": "p99 ms c=1",
		"ttft50": "TTFT p50 ms", "ttft99": "TTFT p99 ms", "stream50": "whole stream p50 ms", "cpu": "µs CPU/request",
		"cpurps": "req/s in CPU run", "rssidle": "idle VmRSS MB", "rssopen": "VmRSS streams open MB",
		"streamsopen": "streams open", "kbps": "KB per open stream (VmRSS)",
		"livekbps": "KB per open stream (Go live)", "storert": "store round trips/request", "redisrt": "Redis round trips/request",
		"gwcpu": "µs CPU/request, gateways", "rediscpu": "µs CPU/request, Redis server", "pgcpu": "µs CPU/request, PostgreSQL"}
	for _, k := range keys {
		m, t, _ := strings.Cut(k, "/")
		w("| %s | %s |", labels[m], t)
		for _, v := range r.vals[k] {
			w(" %s |", fnum(v))
		}
		w("\n")
	}
	w("\nThe load generator is this Go process, on the same %d CPUs as the servers (and as anything else running): "+
		"absolute figures move with the machine's load, the within-round comparisons much less.\n", runtime.NumCPU())
	return s.String()
}

// caddyVersion is the first word of `caddy version`.
func caddyVersion(bin string) string {
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		return "version unknown"
	}
	f := strings.Fields(string(out))
	if len(f) == 0 {
		return "version unknown"
	}
	return "Caddy " + f[0]
}

func verdict(ok bool, v float64) string {
	switch {
	case math.IsNaN(v):
		return "n/a"
	case ok:
		return "PASS"
	}
	return "**FAIL**"
}

func fmtOr(v float64, format string) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "n/a"
	}
	return fmt.Sprintf(format, v)
}

func f0(v float64) string { return fmtOr(v, "%.0f") }
func f1(v float64) string { return fmtOr(v, "%.1f") }
func f2(v float64) string { return fmtOr(v, "%.2f") }
func f3(v float64) string { return fmtOr(v, "%.3f") }

func fsigned(v float64, digits int) string { return fmtOr(v, fmt.Sprintf("%%+.%df", digits)) }

func fpct(v float64) string { return fmtOr(v*100, "%+.1f%%") }

// fnum prints a per-round value with a precision that suits its size.
func fnum(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "n/a"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func thousands(n int) string {
	s := fmt.Sprint(n)
	var out []string
	for len(s) > 3 {
		out = append([]string{s[len(s)-3:]}, out...)
		s = s[:len(s)-3]
	}
	return strings.Join(append([]string{s}, out...), ",")
}
