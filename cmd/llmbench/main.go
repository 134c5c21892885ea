// Command llmbench benchmarks the LLM gateway beside plain Caddy reverse_proxy and the mock
// backend called directly, all on 127.0.0.1 and all started by it as separate processes of one
// Caddy binary (make bench); and, with -backends mock,fake (the default), the same in front of
// a backend we did not write, the peers-bench kit's fake (package fakebackend, run as
// `llmbench fake`, a process of this program), for 1 and 2:
//
//  1. non-streaming chat completions: throughput at concurrency 32, p50/p99 latency at c=1;
//  2. time to first token (first "data:" line) of streamed completions at c=1;
//  3. memory per open stream (VmRSS growth with N slow streams open), gateway and plain Caddy;
//  4. CPU per request (utime+stime) of the gateway with 1 key and with 100,000 keys in its
//     store, and of plain Caddy;
//  5. (-surfaces) /v1/messages and /v1/responses through the gateway beside plain Caddy:
//     throughput at c=32 and time to first token at c=1;
//  6. (-multi, when PostgreSQL and Redis answer) the gateway on the embedded store, on
//     PostgreSQL with leases + Redis rate limits, and as three processes on one database and
//     Redis: throughput, p50/p99, store and Redis round trips per request (from its metrics).
//
// Every measurement runs in rounds, the targets interleaved (memory on fresh processes each
// round), and the report gives medians over rounds; ratios and differences are taken within
// each round and their median reported. The report, in markdown, is printed and written to
// -out. Run with -h for the flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/cmd/llmbench/fakebackend"
)

// config is the command line.
type config struct {
	caddyBin       string
	out            string
	pprofFile      string
	pprofMultiFile string
	pprofSeconds   int
	quick          bool
	rounds         int
	duration       time.Duration
	conc           int
	maxRequests    int64
	ttftN          int
	ttftChunks     int
	ttftInterval   time.Duration
	streams        int
	streamChunks   int
	streamInterval time.Duration
	memSettle      time.Duration
	cpuRequests    int
	cpuConc        int
	cpuSlices      int
	keys           int
	spreadKeys     int
	tmpDir         string
	keepTmp        bool
	rateLimits     bool
	backends       []string
	peers          []string
	peersDir       string
	surfaces       bool
	multi          bool
	multiDuration  time.Duration
	surfaceDur     time.Duration
	surfaceTTFTN   int
	pgURL          string
	redisAddr      string
}

func parseFlags() config {
	var c config
	fs := flag.CommandLine
	fs.StringVar(&c.caddyBin, "caddy", "bin/caddy", "the Caddy binary with the llm_gateway and llm_mock_backend modules (make build); every server is a process of it")
	fs.StringVar(&c.out, "out", "bench-results.md", "file the markdown report is written to (it is printed too); empty: print only")
	fs.StringVar(&c.pprofFile, "pprof", "", "when set, write a CPU profile of the gateway, taken from its admin endpoint (/debug/pprof/profile) during an extra,\nunreported c=-conc non-streaming run, to this file, and add its top 15 functions to the report (go tool pprof, when go is on PATH)")
	fs.StringVar(&c.pprofMultiFile, "pprof-multi", "", "as -pprof, for the multi-instance mode's one gateway on PostgreSQL + Redis, after its rounds")
	fs.IntVar(&c.pprofSeconds, "pprof-seconds", 10, "length of the -pprof profile, in seconds (-quick: 3)")
	fs.BoolVar(&c.quick, "quick", false, "a fast smoke run: -rounds 1 -duration 1s -ttft-n 30 -streams 50 -cpu-requests 1000 -pprof-seconds 3,\neach unless given explicitly; its figures are rough")
	fs.IntVar(&c.rounds, "rounds", 3, "interleaved rounds of every measurement; the report gives medians over rounds")
	fs.DurationVar(&c.duration, "duration", 5*time.Second, "length of each throughput (c=-conc) and each latency (c=1) measurement, per target and round")
	fs.IntVar(&c.conc, "conc", 32, "concurrency of the throughput measurement (closed loop: each worker sends its next request when the answer is read)")
	fs.Int64Var(&c.maxRequests, "max-requests", 1_000_000, "upper bound on requests in one throughput or latency measurement (it also ends after -duration)")
	fs.IntVar(&c.ttftN, "ttft-n", 200, "streamed requests per target and round for time to first token, sent one after the other (c=1);\nbounded in time too, by max(30s, 4 x -duration)")
	fs.IntVar(&c.ttftChunks, "ttft-chunks", 4, "content chunks of the mock's streams (its chunks setting) for the TTFT measurement")
	fs.DurationVar(&c.ttftInterval, "ttft-interval", 2*time.Millisecond, "pause between the mock's stream chunks (its chunk_interval setting) for the TTFT measurement")
	fs.IntVar(&c.streams, "streams", 200, "concurrent slow streams held open through the gateway and through plain Caddy for the memory measurement")
	fs.IntVar(&c.streamChunks, "stream-chunks", 100, "chunks of each slow stream (X-Mock-Chunks); with -stream-interval it sets how long a stream stays open")
	fs.DurationVar(&c.streamInterval, "stream-interval", 100*time.Millisecond, "pause between the chunks of a slow stream (X-Mock-Chunk-Interval)")
	fs.DurationVar(&c.memSettle, "mem-settle", time.Second, "wait between the last stream opening and reading VmRSS")
	fs.IntVar(&c.cpuRequests, "cpu-requests", 5000, "non-streaming requests per CPU-per-request measurement (per target and round); CPU time is counted\nin clock ticks (10 ms at CLK_TCK=100), so fewer requests mean coarser figures")
	fs.IntVar(&c.cpuConc, "cpu-conc", 8, "concurrency of the CPU-per-request measurement")
	fs.IntVar(&c.cpuSlices, "cpu-slices", 5, "slices each target's -cpu-requests are sent in per round, the targets taking turns slice by slice\n(so that the machine's drifting load falls on all of them alike)")
	fs.IntVar(&c.keys, "keys", 100_000, "API keys in the large store of the CPU-per-request measurement (all of the bench user; the small store has 1)")
	fs.IntVar(&c.spreadKeys, "spread-keys", 1000, "also measure CPU per request on the large store with requests spread over this many different keys\n(informative: each lookup then reads a different row of the big table, not the same hot one); 0: skip")
	fs.StringVar(&c.tmpDir, "tmpdir", "", "where the run's temporary folder (Caddyfiles, SQLite files, logs) is made; default: the system's")
	fs.BoolVar(&c.rateLimits, "rate-limits", false, "also run a gateway with a rate_limits block of one generous tier (every limit kind on, none reached)\nbeside the one without, in the same interleaved rounds of the throughput and CPU measurements, to measure what\nadmission by the rate limits costs")
	backends := fs.String("backends", "mock,fake", "comma-separated backends that the throughput, latency and TTFT measurements are made in front of, one table each:\n"+
		"mock (llm_mock_backend, required: the targets, CPU and memory measurements use it) and fake (the foreign OpenAI-compatible\n"+
		"fake of the peers-bench kit, cmd/llmbench/fakebackend, run as `llmbench fake`, a process of this program)")
	peers := fs.String("peers", "", "comma-separated gateways of other projects to measure in front of the fake (needs fake in -backends), in the same rounds:\n"+
		"portkey (@portkey-ai/gateway "+portkeyVersion+" from npm, installed into -peers-dir on first use, run by node). A peer that cannot be\n"+
		"installed or started (no node or npm, no registry) is left out with a note")
	fs.BoolVar(&c.surfaces, "surfaces", true, "also measure /v1/messages (a gateway with an Anthropic-style backend on the mock) and /v1/responses (the gateway),\n"+
		"each beside plain Caddy in front of the same mock: non-streaming throughput at c=-conc and TTFT at c=1, in interleaved rounds")
	fs.BoolVar(&c.multi, "multi", true, "the multi-instance mode: one gateway on the embedded store, one on PostgreSQL (leases) + Redis (rate limits),\n"+
		"and three processes on one PostgreSQL + Redis with the load spread over them: throughput, p50/p99, store and Redis round trips\n"+
		"per request; each on a database (-pg-url) and a Redis prefix (-redis-addr) of its own, dropped after. Left out with a note when\n"+
		"either is unreachable")
	fs.DurationVar(&c.surfaceDur, "surface-duration", 3*time.Second, "length of each Messages and Responses throughput measurement (-surfaces), per target and round")
	fs.IntVar(&c.surfaceTTFTN, "surface-ttft-n", 100, "streamed requests per Messages and Responses target and round for time to first token (-surfaces)")
	fs.DurationVar(&c.multiDuration, "multi-duration", 3*time.Second, "length of each throughput and each latency measurement of the multi-instance mode, per configuration and round")
	fs.StringVar(&c.pgURL, "pg-url", "postgres://postgres@127.0.0.1:5432", "the PostgreSQL server of the multi-instance mode, without a database (one is created and dropped per configuration)")
	fs.StringVar(&c.redisAddr, "redis-addr", "127.0.0.1:6379", "the Redis server of the multi-instance mode (each configuration's keys under a prefix of its own, deleted after)")
	cacheDir, _ := os.UserCacheDir()
	fs.StringVar(&c.peersDir, "peers-dir", filepath.Join(cacheDir, "llmbench", "peers"), "where the -peers are installed, kept between runs")
	fs.BoolVar(&c.keepTmp, "keep-tmp", false, "keep the temporary folder (its path is printed) instead of removing it")
	fs.Usage = func() {
		o := fs.Output()
		fmt.Fprintf(o, `llmbench: the LLM gateway beside plain Caddy reverse_proxy and the mock backend, on 127.0.0.1.

It starts, as separate processes of the -caddy binary: the mock backend (llm_mock_backend, admin off),
plain Caddy reverse_proxy to it (admin off), and the gateway (llm_gateway on an SQLite store seeded with
one user, plenty of credits and one API key; admin on a free loopback port); and the same in front of the
foreign fake backend (-backends), which runs as "llmbench fake -addr ...". Then, in interleaved rounds:
  1. non-streaming throughput at c=-conc and p50/p99 latency at c=1, for each of them;
  2. time to the first "data:" line of streamed completions at c=1, for each of them;
  3. CPU per request (utime+stime from /proc) of the gateway with 1 key and with -keys keys in its store
     (a second gateway process on a second file), and of plain Caddy, at c=-cpu-conc;
  4. memory per open stream: VmRSS growth of a freshly started gateway and plain Caddy with -streams
     slow streams open, divided by the number of streams;
  5. (-surfaces) /v1/messages (a gateway with an Anthropic-style backend on the mock) and /v1/responses,
     each beside plain Caddy: throughput at c=-conc and TTFT at c=1;
  6. (-multi) one gateway on the embedded store, one on PostgreSQL (leases) + Redis, three on one
     PostgreSQL + Redis: throughput, p50/p99, store and Redis round trips per request.
It prints a markdown report (medians over rounds; ratios and differences taken within a round) and
writes it to -out. Every child is stopped at the end, on error and on interrupt.

Usage: go run ./cmd/llmbench [flags]
       llmbench fake [-addr 127.0.0.1:9000] [-delay 0] [-chunks 20] [-interval 10ms]

Flags:
`)
		fs.PrintDefaults()
	}
	flag.Parse()
	for _, name := range strings.Split(*backends, ",") {
		if name = strings.TrimSpace(name); name != "" {
			c.backends = append(c.backends, name)
		}
	}
	for _, name := range strings.Split(*peers, ",") {
		if name = strings.TrimSpace(name); name != "" {
			c.peers = append(c.peers, name)
		}
	}
	if c.quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := func(name string, apply func()) {
			if !set[name] {
				apply()
			}
		}
		quick("rounds", func() { c.rounds = 1 })
		quick("duration", func() { c.duration = time.Second })
		quick("ttft-n", func() { c.ttftN = 30 })
		quick("streams", func() { c.streams = 50 })
		quick("cpu-requests", func() { c.cpuRequests = 1000 })
		quick("pprof-seconds", func() { c.pprofSeconds = 3 })
		quick("multi-duration", func() { c.multiDuration = time.Second })
		quick("surface-duration", func() { c.surfaceDur = time.Second })
		quick("surface-ttft-n", func() { c.surfaceTTFTN = 30 })
	}
	return c
}

func (c config) validate() error {
	switch {
	case c.rounds < 1:
		return fmt.Errorf("-rounds must be at least 1")
	case c.duration < 100*time.Millisecond:
		return fmt.Errorf("-duration must be at least 100ms")
	case c.conc < 1 || c.cpuConc < 1:
		return fmt.Errorf("-conc and -cpu-conc must be at least 1")
	case c.maxRequests < 1:
		return fmt.Errorf("-max-requests must be at least 1")
	case c.ttftN < 1 || c.ttftChunks < 1 || c.ttftChunks > 10000 || c.ttftInterval < 0:
		return fmt.Errorf("-ttft-n and -ttft-chunks (up to 10000) must be at least 1, -ttft-interval not negative")
	case c.streams < 1 || c.streamChunks < 1 || c.streamChunks > 10000 || c.streamInterval <= 0:
		return fmt.Errorf("-streams and -stream-chunks (up to 10000) must be at least 1, -stream-interval positive")
	case c.cpuRequests < 1 || c.cpuSlices < 1 || c.cpuSlices > c.cpuRequests:
		return fmt.Errorf("-cpu-requests and -cpu-slices must be at least 1, -cpu-slices at most -cpu-requests")
	case c.keys < 1:
		return fmt.Errorf("-keys must be at least 1")
	case c.spreadKeys < 0 || c.spreadKeys > c.keys-1:
		return fmt.Errorf("-spread-keys must be from 0 to -keys minus 1")
	case c.multi && c.multiDuration < 100*time.Millisecond:
		return fmt.Errorf("-multi-duration must be at least 100ms")
	case c.surfaces && (c.surfaceDur < 100*time.Millisecond || c.surfaceTTFTN < 1):
		return fmt.Errorf("-surface-duration must be at least 100ms, -surface-ttft-n at least 1")
	case c.pprofMultiFile != "" && !c.multi:
		return fmt.Errorf("-pprof-multi profiles a gateway of the multi-instance mode: it needs -multi")
	case c.pprofSeconds < 1:
		return fmt.Errorf("-pprof-seconds must be at least 1")
	case !slices.Contains(c.backends, "mock"):
		return fmt.Errorf("-backends must include mock (the targets, the CPU and the memory measurements use it)")
	}
	for i, name := range c.backends {
		if name != "mock" && name != "fake" {
			return fmt.Errorf("-backends: unknown backend %q (mock, fake)", name)
		}
		if slices.Index(c.backends, name) != i {
			return fmt.Errorf("-backends: %s given twice", name)
		}
	}
	for i, name := range c.peers {
		if name != "portkey" {
			return fmt.Errorf("-peers: unknown peer %q (portkey)", name)
		}
		if slices.Index(c.peers, name) != i {
			return fmt.Errorf("-peers: %s given twice", name)
		}
	}
	if len(c.peers) > 0 && !slices.Contains(c.backends, "fake") {
		return fmt.Errorf("-peers needs fake in -backends (the peers are measured in front of it)")
	}
	return nil
}

func main() {
	// `llmbench fake [flags]` is the foreign fake backend, which the benchmark runs as a process
	// of this very program.
	if len(os.Args) > 1 && os.Args[1] == "fake" {
		if err := fakebackend.Main(os.Args[2:]); err != nil && !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "llmbench fake:", err)
			os.Exit(1)
		}
		return
	}
	cfg := parseFlags()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "llmbench: unexpected arguments %q (see -h)\n", flag.Args())
		os.Exit(2)
	}
	if err := cfg.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "llmbench:", err)
		os.Exit(2)
	}

	// The first SIGINT or SIGTERM cancels the run, which then cleans up; a second one stops the
	// children and exits at once.
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	tmp, err := os.MkdirTemp(cfg.tmpDir, "llmbench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "llmbench:", err)
		os.Exit(1)
	}
	go func() {
		s := <-sigs
		logln(fmt.Sprintf("%s: stopping", s))
		cancel()
		<-sigs
		stopAll()
		if !cfg.keepTmp {
			os.RemoveAll(tmp)
		}
		os.Exit(130)
	}()

	code := 0
	b := &bench{cfg: cfg, root: tmp, res: newResults()}
	err = b.run(ctx)
	b.close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "llmbench:", err)
		code = 1
		if ctx.Err() != nil {
			code = 130
		}
	}
	cancel()
	os.Exit(code)
}

// logln prints a progress line on stderr.
func logln(s string) {
	fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05"), s)
}
