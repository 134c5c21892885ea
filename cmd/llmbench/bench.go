package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// bench is one run: its temporary folder, its processes and what they measured.
type bench struct {
	cfg  config
	root string // temporary folder, removed by close unless -keep-tmp
	res  *results

	hz      int64  // clock ticks per second of /proc stat times
	key     string // the bench user's API key, in every store
	baseDB  string // the seeded store (1 key) that the gateways' files are copies of
	bigDB   string // the seeded store with -keys keys
	spread  []string
	mock    *proc
	caddy   *proc
	gateway *proc
	limited *proc         // the gateway with rate limits (-rate-limits)
	sets    []*backendSet // the mock's first, then the fake's (-backends)

	multiNote     string // why the multi-instance mode was left out, "" when it ran (or was off)
	multiSetups   []*multiSetup
	pgDatabases   []string // the multi-instance mode's databases, dropped by close
	redisPrefixes []string // its Redis prefixes, whose keys close deletes

	start              time.Time
	loadStart, loadEnd string
	pprofTop           string
	pprofMultiTop      string // the PostgreSQL + Redis gateway's (-pprof-multi)
}

// Time bounds of the steps that are not bounded by -duration.
const (
	warmTime    = 10 * time.Second  // each warm-up
	cpuMaxTime  = 120 * time.Second // one slice of a CPU-per-request measurement
	openMaxTime = 30 * time.Second  // opening the slow streams
)

func (b *bench) close() {
	stopAll()
	b.dropMulti()
	if b.cfg.keepTmp {
		logln("kept " + b.root)
		return
	}
	os.RemoveAll(b.root)
}

func (b *bench) run(ctx context.Context) error {
	cfg := b.cfg
	b.start = time.Now()
	b.loadStart = loadAvg()
	bin, err := filepath.Abs(cfg.caddyBin)
	if err != nil {
		return err
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("-caddy %s: not an executable file (make build)", cfg.caddyBin)
	}
	b.cfg.caddyBin = bin
	b.hz = clockTicks()

	// The stores, before any server runs, so that seeding costs no measurement anything.
	b.baseDB = filepath.Join(b.root, "base.db")
	if b.key, err = seedBase(ctx, b.baseDB); err != nil {
		return fmt.Errorf("seeding the store: %w", err)
	}
	b.bigDB = filepath.Join(b.root, "big.db")
	if err := copyDB(b.baseDB, b.bigDB); err != nil {
		return err
	}
	t0 := time.Now()
	if b.spread, err = addKeys(ctx, b.bigDB, cfg.keys-1, cfg.spreadKeys); err != nil {
		return fmt.Errorf("adding %d keys: %w", cfg.keys-1, err)
	}
	logln(fmt.Sprintf("seeded %d keys in %s", cfg.keys, time.Since(t0).Round(time.Millisecond)))

	if b.mock, err = startCaddy(ctx, bin, b.root, "mock", false, func(addr, _, dir string) string {
		return mockCaddyfile(addr, dir, cfg.ttftChunks, cfg.ttftInterval)
	}); err != nil {
		return err
	}
	mock, err := b.startSet(ctx, "mock", "the mock backend (llm_mock_backend)", b.mock)
	if err != nil {
		return err
	}
	b.sets = append(b.sets, mock)
	b.caddy, b.gateway = mock.caddy.proc, mock.gateway.proc
	if mock.limited != nil {
		b.limited = mock.limited.proc
	}
	if slices.Contains(cfg.backends, "fake") {
		// Its streams shaped like the mock's for the TTFT measurement.
		fake, err := startFake(ctx, b.root, "fake", "-chunks", strconv.Itoa(cfg.ttftChunks), "-interval", cfg.ttftInterval.String())
		if err != nil {
			return err
		}
		set, err := b.startSet(ctx, "fake", "the foreign fake backend (peers-bench fake, cmd/llmbench/fakebackend)", fake)
		if err != nil {
			return err
		}
		if slices.Contains(cfg.peers, "portkey") {
			p, err := b.startPortkey(ctx, "fake-portkey", fake.addr)
			switch {
			case errors.Is(err, errPeerUnavailable):
				logln("leaving portkey out: " + err.Error())
				b.res.notes = append(b.res.notes, "portkey left out: "+err.Error())
			case err != nil:
				return err
			default:
				set.peers = append(set.peers, p)
			}
		}
		b.sets = append(b.sets, set)
	}
	var targets []*target
	for _, set := range b.sets {
		targets = append(targets, set.targets()...)
	}
	for _, t := range targets {
		if err := smoke(ctx, t); err != nil {
			return err
		}
	}
	caddy, gateway := mock.caddy, mock.gateway

	if err := b.proxying(ctx, targets); err != nil {
		return err
	}
	if cfg.surfaces {
		st, err := b.surfaceTargets(ctx, mock)
		if err != nil {
			return err
		}
		if err := b.surfaces(ctx, st); err != nil {
			return err
		}
		st[1].proc.stop() // the Anthropic-style gateway
	}
	if cfg.multi {
		setups, note, err := b.startMulti(ctx)
		if err != nil {
			return fmt.Errorf("multi-instance mode: %w", err)
		}
		if note != "" {
			logln(note)
			b.multiNote = note
		} else {
			b.multiSetups = setups
			if err := b.multi(ctx, setups); err != nil {
				return err
			}
			if cfg.pprofMultiFile != "" {
				s := setups[1] // one gateway on PostgreSQL + Redis
				if b.pprofMultiTop, err = b.profileProcess(ctx, s.t, s.procs[0].admin, cfg.pprofMultiFile); err != nil {
					return fmt.Errorf("profile: %w", err)
				}
			}
			for _, s := range setups {
				for _, p := range s.procs {
					p.stop()
				}
			}
			b.dropMulti()
		}
	}
	if cfg.pprofFile != "" {
		if err := b.profile(ctx, gateway); err != nil {
			return fmt.Errorf("profile: %w", err)
		}
	}
	if err := b.cpu(ctx, caddy); err != nil {
		return err
	}
	if err := b.memory(ctx); err != nil {
		return err
	}
	b.loadEnd = loadAvg()

	report := b.report()
	fmt.Print(report)
	if cfg.out != "" {
		if err := os.WriteFile(cfg.out, []byte(report), 0o644); err != nil {
			return err
		}
		logln("report written to " + cfg.out)
	}
	return nil
}

// backendSet is one backend and what is measured in front of it, as one table of the report
// shows them: the backend directly, plain Caddy reverse_proxy to it, the gateway with it as its
// backend and, with -rate-limits, the same gateway with a rate_limits tier.
type backendSet struct {
	name, label string
	backend     *proc
	direct      *target
	caddy       *target
	gateway     *target
	limited     *target          // nil without -rate-limits
	peers       []*labeledTarget // gateways of other projects in front of it (-peers)
}

func (s *backendSet) targets() []*target {
	ts := []*target{s.direct, s.caddy, s.gateway}
	if s.limited != nil {
		ts = append(ts, s.limited)
	}
	for _, p := range s.peers {
		ts = append(ts, p.t)
	}
	return ts
}

// targetName is the name of a target in front of the backend: the bare role for the mock (the
// names the rest of the report uses), prefixed with the backend's name for the others.
func targetName(backend, role string) string {
	if backend == "mock" {
		return role
	}
	return backend + "-" + role
}

// startSet starts plain Caddy and the gateway(s) in front of backend, which is running.
func (b *bench) startSet(ctx context.Context, name, label string, backend *proc) (*backendSet, error) {
	s := &backendSet{name: name, label: label, backend: backend}
	newTarget := func(role string, p *proc) *target {
		return &target{name: targetName(name, role), url: p.baseURL() + "/v1/chat/completions", keys: []string{b.key}, proc: p}
	}
	s.direct = newTarget("direct", backend)
	p, err := b.startPlainCaddy(ctx, targetName(name, "caddy"), backend.addr, false)
	if err != nil {
		return nil, err
	}
	s.caddy = newTarget("caddy", p)
	if p, err = b.startGatewayTo(ctx, targetName(name, "gateway"), "bench-"+name, backend.addr, "", ""); err != nil {
		return nil, err
	}
	s.gateway = newTarget("gateway", p)
	if b.cfg.rateLimits {
		if p, err = b.startGatewayTo(ctx, targetName(name, "gateway-limits"), "bench-"+name, backend.addr, "", generousRateLimits); err != nil {
			return nil, err
		}
		s.limited = newTarget("gateway-limits", p)
	}
	return s, nil
}

// startPlainCaddy starts plain Caddy reverse_proxy to the backend at backendAddr, with a
// loopback admin endpoint when withAdmin (for /debug/vars).
func (b *bench) startPlainCaddy(ctx context.Context, name, backendAddr string, withAdmin bool) (*proc, error) {
	return startCaddy(ctx, b.cfg.caddyBin, b.root, name, withAdmin, func(addr, admin, dir string) string {
		return caddyCaddyfile(addr, admin, dir, backendAddr)
	})
}

// startGateway starts a gateway in front of the mock on db, or on a fresh copy of the seeded
// store when db is "", with extra in its llm_gateway block.
func (b *bench) startGateway(ctx context.Context, name, db, extra string) (*proc, error) {
	return b.startGatewayTo(ctx, name, "bench-mock", b.mock.addr, db, extra)
}

// startGatewayTo is startGateway with the backend named backendName at backendAddr.
func (b *bench) startGatewayTo(ctx context.Context, name, backendName, backendAddr, db, extra string) (*proc, error) {
	if db == "" {
		var err error
		if db, err = b.freshDB(name); err != nil {
			return nil, err
		}
	}
	return startCaddy(ctx, b.cfg.caddyBin, b.root, name, true, func(addr, admin, dir string) string {
		return gatewayCaddyfile(addr, admin, dir, backendName, backendAddr, db, extra)
	})
}

// freshDB is a new copy of the seeded store, named after name, in the run's folder.
func (b *bench) freshDB(name string) (string, error) {
	f, err := os.CreateTemp(b.root, name+"-*.db")
	if err != nil {
		return "", err
	}
	db := f.Name()
	f.Close()
	os.Remove(db)
	return db, copyDB(b.baseDB, db)
}

// smoke checks that a target answers a chat completion and a whole stream.
func smoke(ctx context.Context, t *target) error {
	cl := newClient(2, 30*time.Second)
	defer cl.CloseIdleConnections()
	if err := doChat(ctx, cl, t, 0); err != nil {
		return fmt.Errorf("smoke test: %w\n%s", err, t.proc.logTail(20))
	}
	if _, _, err := doStream(ctx, cl, t, 0); err != nil {
		return fmt.Errorf("smoke test: %w\n%s", err, t.proc.logTail(20))
	}
	return nil
}

// proxying measures, in interleaved rounds: throughput at c=conc, latency at c=1 and time to
// first token at c=1 of each target.
func (b *bench) proxying(ctx context.Context, targets []*target) error {
	cfg, res := b.cfg, b.res
	clients := map[string]*http.Client{}
	for _, t := range targets {
		clients[t.name] = newClient(2*cfg.conc, 60*time.Second)
		defer clients[t.name].CloseIdleConnections()
	}
	ttftMax := max(30*time.Second, 4*cfg.duration)
	logln("warming up")
	for _, t := range targets {
		runLoad(ctx, clients[t.name], t, cfg.conc, min(time.Second, cfg.duration), cfg.maxRequests, false)
		runTTFT(ctx, clients[t.name], t, 10, warmTime)
	}
	for r := 0; r < cfg.rounds; r++ {
		for _, t := range rotate(targets, r) {
			if err := ctx.Err(); err != nil {
				return err
			}
			cl := clients[t.name]
			c0, err0 := cpuTicks(t.proc.pid())
			tp := runLoad(ctx, cl, t, cfg.conc, cfg.duration, cfg.maxRequests, false)
			c1, err1 := cpuTicks(t.proc.pid())
			res.add("rps", t.name, nanIf(tp.ok == 0, tp.rps()))
			res.add("cores", t.name, nanIf(err0 != nil || err1 != nil, float64(c1-c0)/float64(b.hz)/tp.elapsed.Seconds()))
			res.add("cpureq", t.name, nanIf(err0 != nil || err1 != nil || tp.ok+tp.errs == 0,
				float64(c1-c0)*1e6/float64(b.hz)/float64(tp.ok+tp.errs)))
			res.fail(t.name, tp.errs, tp.firstErr)

			lat := runLoad(ctx, cl, t, 1, cfg.duration, cfg.maxRequests, true)
			res.add("p50", t.name, nanIf(lat.ok == 0, ms(pct(lat.lat, .50))))
			res.add("p99", t.name, nanIf(lat.ok == 0, ms(pct(lat.lat, .99))))
			res.fail(t.name, lat.errs, lat.firstErr)

			tt := runTTFT(ctx, cl, t, cfg.ttftN, ttftMax)
			n := len(tt.ttft)
			res.add("ttft50", t.name, nanIf(n == 0, ms(pct(tt.ttft, .50))))
			res.add("ttft99", t.name, nanIf(n == 0, ms(pct(tt.ttft, .99))))
			res.add("stream50", t.name, nanIf(n == 0, ms(pct(tt.total, .50))))
			res.fail(t.name, tt.errs, tt.firstErr)
			if n < cfg.ttftN && tt.errs == 0 {
				res.notes = append(res.notes, fmt.Sprintf("round %d, %s: %d of %d TTFT streams within the time bound", r+1, t.name, n, cfg.ttftN))
			}

			logln(fmt.Sprintf("round %d %-19s %8.0f req/s (c=%d)  p50 %.3f ms  p99 %.3f ms (c=1)  TTFT p50 %.3f ms (%d streams)  errors %d",
				r+1, t.name, tp.rps(), cfg.conc, ms(pct(lat.lat, .5)), ms(pct(lat.lat, .99)), ms(pct(tt.ttft, .5)), n,
				tp.errs+lat.errs+tt.errs))
		}
	}
	return nil
}

// profile takes a CPU profile of the gateway from its admin endpoint during an extra c=conc
// run, which is not reported, so that the profiler costs no reported figure anything.
func (b *bench) profile(ctx context.Context, gateway *target) error {
	top, err := b.profileProcess(ctx, gateway, b.gateway.admin, b.cfg.pprofFile)
	b.pprofTop = top
	return err
}

// profileProcess profiles the process whose admin endpoint is admin during an extra run of
// t at c=conc into file, and returns the profile's top 15 ("" without the go tool).
func (b *bench) profileProcess(ctx context.Context, t *target, admin, file string) (string, error) {
	cfg := b.cfg
	secs := cfg.pprofSeconds
	logln(fmt.Sprintf("profiling %s for %ds at c=%d", t.name, secs, cfg.conc))
	cl := newClient(2*cfg.conc, 60*time.Second)
	defer cl.CloseIdleConnections()
	loadDone := make(chan loadResult, 1)
	go func() {
		loadDone <- runLoad(ctx, cl, t, cfg.conc, time.Duration(secs)*time.Second+1500*time.Millisecond, cfg.maxRequests, false)
	}()
	time.Sleep(300 * time.Millisecond) // let the load reach its pace
	err := fetchProfile(ctx, "http://"+admin+"/debug/pprof/profile?seconds="+strconv.Itoa(secs), file,
		time.Duration(secs)*time.Second+30*time.Second)
	lr := <-loadDone
	if err != nil {
		return "", err
	}
	logln(fmt.Sprintf("profile written to %s (%.0f req/s, %d errors during it)", file, lr.rps(), lr.errs))
	b.res.fail(t.name+" (profiled run)", lr.errs, lr.firstErr)

	// Its top, when the go tool is at hand.
	tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(tctx, "go", "tool", "pprof", "-top", "-nodecount=15", file).Output()
	if err != nil {
		b.res.notes = append(b.res.notes, "go tool pprof -top "+file+" failed ("+err.Error()+"): no profile summary in this report")
		return "", nil
	}
	return strings.TrimSpace(string(out)), nil
}

func fetchProfile(ctx context.Context, url, file string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		return fmt.Errorf("%s: status %d: %s", url, resp.StatusCode, msg)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return err
	}
	if len(data) == 0 {
		return errors.New("empty profile")
	}
	return os.WriteFile(file, data, 0o644)
}

// cpu measures CPU time per request: plain Caddy, a gateway on a store with 1 key and a gateway
// on a store with -keys keys (the same key used, and, with -spread-keys, requests spread over
// many keys). The two gateways are fresh processes started together, warmed alike and sent the
// same requests, so that they differ in their store only.
func (b *bench) cpu(ctx context.Context, caddy *target) error {
	cfg, res := b.cfg, b.res
	small, err := b.startGateway(ctx, "gateway-1key", "", "")
	if err != nil {
		return err
	}
	defer small.stop()
	big, err := b.startGateway(ctx, "gateway-bigstore", b.bigDB, "")
	if err != nil {
		return err
	}
	defer big.stop()
	url := "/v1/chat/completions"
	targets := []*target{
		caddy,
		{name: "gateway-1key", url: small.baseURL() + url, keys: []string{b.key}, proc: small},
		{name: "gateway-bigstore", url: big.baseURL() + url, keys: []string{b.key}, proc: big},
	}
	if len(b.spread) > 0 {
		targets = append(targets, &target{name: "gateway-bigstore-spread", url: big.baseURL() + url, keys: b.spread, proc: big})
	}
	if cfg.rateLimits {
		limited, err := b.startGateway(ctx, "gateway-limits-1key", "", generousRateLimits)
		if err != nil {
			return err
		}
		defer limited.stop()
		targets = append(targets, &target{name: "gateway-limits-1key", url: limited.baseURL() + url, keys: []string{b.key}, proc: limited})
	}
	clients := map[string]*http.Client{}
	for _, t := range targets {
		if err := smoke(ctx, t); err != nil {
			return err
		}
		clients[t.name] = newClient(2*cfg.cpuConc, 60*time.Second)
		defer clients[t.name].CloseIdleConnections()
	}
	logln("warming up")
	for _, t := range targets {
		runLoad(ctx, clients[t.name], t, cfg.cpuConc, warmTime, int64(min(1000, cfg.cpuRequests)), false)
	}
	// Each round's count is sent in -cpu-slices slices, the targets taking turns slice by slice,
	// so that the machine's load, which drifts over seconds here, falls on all of them alike.
	type acc struct {
		ticks, sent, ok, errs int64
		elapsed               time.Duration
		firstErr              string
	}
	for r := 0; r < cfg.rounds; r++ {
		sums := map[string]*acc{}
		for _, t := range targets {
			sums[t.name] = &acc{}
		}
		for k := 0; k < cfg.cpuSlices; k++ {
			n := cfg.cpuRequests / cfg.cpuSlices
			if k == cfg.cpuSlices-1 {
				n = cfg.cpuRequests - n*(cfg.cpuSlices-1)
			}
			for _, t := range rotate(targets, r+k) {
				if err := ctx.Err(); err != nil {
					return err
				}
				pid := t.proc.pid()
				t0, err := cpuTicks(pid)
				if err != nil {
					return fmt.Errorf("%s: %w", t.name, err)
				}
				lr := runLoad(ctx, clients[t.name], t, cfg.cpuConc, cpuMaxTime, int64(n), false)
				t1, err := cpuTicks(pid)
				if err != nil {
					return fmt.Errorf("%s: %w", t.name, err)
				}
				a := sums[t.name]
				a.ticks += t1 - t0
				a.sent += lr.ok + lr.errs
				a.ok += lr.ok
				a.errs += lr.errs
				a.elapsed += lr.elapsed
				if a.firstErr == "" {
					a.firstErr = lr.firstErr
				}
			}
		}
		for _, t := range targets {
			a := sums[t.name]
			us := float64(a.ticks) * 1e6 / float64(b.hz) / float64(a.sent)
			rps := float64(a.ok) / a.elapsed.Seconds()
			res.add("cpu", t.name, nanIf(a.sent == 0, us))
			res.add("cpurps", t.name, nanIf(a.ok == 0, rps))
			res.fail(t.name, a.errs, a.firstErr)
			if a.sent < int64(cfg.cpuRequests) {
				res.notes = append(res.notes, fmt.Sprintf("round %d, %s: %d of %d requests within the time bounds", r+1, t.name, a.sent, cfg.cpuRequests))
			}
			logln(fmt.Sprintf("round %d %-24s %6.1f µs CPU/request (%d ticks, %d requests, %.0f req/s, %d errors)",
				r+1, t.name, us, a.ticks, a.sent, rps, a.errs))
		}
	}
	return nil
}

// memory measures the resident memory an open stream costs a freshly started gateway and a
// freshly started plain Caddy: VmRSS with -streams slow streams open, minus VmRSS when idle,
// divided by the streams open when it was read.
func (b *bench) memory(ctx context.Context) error {
	cfg, res := b.cfg, b.res
	hdr := http.Header{
		"X-Mock-Chunks":         {strconv.Itoa(cfg.streamChunks)},
		"X-Mock-Chunk-Interval": {cfg.streamInterval.String()},
	}
	life := time.Duration(cfg.streamChunks) * cfg.streamInterval
	for r := 0; r < cfg.rounds; r++ {
		for _, kind := range rotate([]string{"caddy", "gateway"}, r) {
			if err := ctx.Err(); err != nil {
				return err
			}
			var (
				p   *proc
				err error
			)
			if kind == "caddy" {
				p, err = b.startPlainCaddy(ctx, "caddy-mem", b.mock.addr, true)
			} else {
				p, err = b.startGateway(ctx, "gateway-mem", "", "")
			}
			if err != nil {
				return err
			}
			kb, err := b.memoryOnce(ctx, r, kind, p, hdr, life)
			p.stop()
			if err != nil {
				return err
			}
			res.add("kbps", kind, kb)
		}
	}
	return nil
}

func (b *bench) memoryOnce(ctx context.Context, r int, kind string, p *proc, hdr http.Header, life time.Duration) (float64, error) {
	cfg, res := b.cfg, b.res
	t := &target{name: kind, url: p.baseURL() + "/v1/chat/completions", keys: []string{b.key}, proc: p}
	if err := smoke(ctx, t); err != nil {
		return 0, err
	}
	// Warm the code paths, then leave it idle with no connection open.
	cl := newClient(16, 60*time.Second)
	runLoad(ctx, cl, t, 8, warmTime, 200, false)
	runTTFT(ctx, cl, t, 10, warmTime)
	cl.CloseIdleConnections()
	time.Sleep(time.Second)
	idle, err := rssKB(p.pid())
	if err != nil {
		return 0, err
	}
	liveIdle, err := p.goLiveKB(ctx)
	if err != nil {
		return 0, err
	}

	opening := time.Now()
	h := holdStreams(ctx, t, cfg.streams, hdr)
	defer h.close()
	allOpen := h.waitOpen(ctx, cfg.streams, min(openMaxTime, life))
	took := time.Since(opening)
	time.Sleep(cfg.memSettle)
	rss, err := rssKB(p.pid())
	if err != nil {
		return 0, err
	}
	open := h.opened.Load() - h.ended.Load()
	// After VmRSS, as the collection it forces may change what follows.
	liveOpen, err := p.goLiveKB(ctx)
	if err != nil {
		return 0, err
	}
	res.fail(kind+" (memory)", h.failed.Load(), h.firstErr)
	if !allOpen || h.ended.Load() > 0 {
		res.notes = append(res.notes, fmt.Sprintf("round %d, %s memory: %d of %d streams open when VmRSS was read (%d failed, %d ended early)",
			r+1, kind, open, cfg.streams, h.failed.Load(), h.ended.Load()))
	}
	if open <= 0 {
		return math.NaN(), nil
	}
	kb := float64(rss-idle) / float64(open)
	res.add("rssidle", kind, float64(idle)/1024)
	res.add("rssopen", kind, float64(rss)/1024)
	res.add("streamsopen", kind, float64(open))
	res.add("livekbps", kind, float64(liveOpen-liveIdle)/float64(open))
	logln(fmt.Sprintf("round %d %-8s idle %d KB, %d streams open (in %s) %d KB: %.1f KB per open stream (Go live heap+stacks: %.1f KB)",
		r+1, kind, idle, open, took.Round(time.Millisecond), rss, kb, float64(liveOpen-liveIdle)/float64(open)))
	return kb, nil
}

func nanIf(cond bool, v float64) float64 {
	if cond {
		return math.NaN()
	}
	return v
}
