package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres"
)

// The multi-instance mode (-multi): the gateway on the embedded store, on PostgreSQL (leases
// on) with its rate limits on Redis, and three gateway processes sharing one PostgreSQL
// database and one Redis prefix, the load spread over them.

// multiLeaseSize is the lease_size of the PostgreSQL gateways, in credits: far more than a
// round's requests cost (the model costs 1 and 2 credits per million tokens).
const multiLeaseSize = "10"

// multiSetup is one of the multi-instance configurations.
type multiSetup struct {
	name, label string
	procs       []*proc
	t           *target
	db          string // the PostgreSQL database it was given, "" for the embedded store
	prefix      string // its Redis prefix, "" without Redis
}

// multiTargets are the names of the multi-instance configurations, in the report's order.
var multiTargets = []string{"multi-embedded", "multi-pg-redis", "multi-pg-redis-x3"}

// reachable reports whether a TCP connection to addr can be opened within a second.
func reachable(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// pgServerAddr is the host:port of the -pg-url server.
func pgServerAddr(url string) string {
	cfg, err := pgx.ParseConfig(strings.TrimSuffix(url, "/") + "/postgres?sslmode=disable")
	if err != nil {
		return ""
	}
	return net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
}

// pgDSN is the DSN of database on the -pg-url server.
func (b *bench) pgDSN(database string) string {
	return strings.TrimSuffix(b.cfg.pgURL, "/") + "/" + database + "?sslmode=disable"
}

// pgAdmin runs stmt on the server's postgres database.
func (b *bench) pgAdmin(ctx context.Context, stmt string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, b.pgDSN("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, stmt)
	return err
}

// newPGDatabase creates a database of the run's own, seeds it with the bench user and key
// (through the store package, which also makes the schema) and returns its name and the key.
// dropPG drops it.
func (b *bench) newPGDatabase(ctx context.Context, name string) (string, string, error) {
	db := fmt.Sprintf("llmbench_%d_%s", os.Getpid(), strings.ReplaceAll(name, "-", "_"))
	if err := b.pgAdmin(ctx, "CREATE DATABASE "+pgx.Identifier{db}.Sanitize()); err != nil {
		return "", "", fmt.Errorf("creating database %s: %w", db, err)
	}
	b.pgDatabases = append(b.pgDatabases, db)
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	s, err := postgres.Open(sctx, b.pgDSN(db))
	if err != nil {
		return "", "", err
	}
	defer s.Close()
	key, err := seedStore(sctx, s)
	return db, key, err
}

// dropMulti drops the run's databases and deletes its Redis keys (the processes using them are
// stopped first).
func (b *bench) dropMulti() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, db := range b.pgDatabases {
		if err := b.pgAdmin(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{db}.Sanitize()+" WITH (FORCE)"); err != nil {
			logln(fmt.Sprintf("dropping database %s: %v", db, err))
		}
	}
	b.pgDatabases = nil
	if len(b.redisPrefixes) == 0 {
		return
	}
	rdb := redis.NewClient(&redis.Options{Addr: b.cfg.redisAddr})
	defer rdb.Close()
	for _, p := range b.redisPrefixes {
		iter := rdb.Scan(ctx, 0, p+"*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
	}
	b.redisPrefixes = nil
}

// startMulti starts the three configurations, or says why it cannot (nil, reason).
func (b *bench) startMulti(ctx context.Context) ([]*multiSetup, string, error) {
	pgAddr := pgServerAddr(b.cfg.pgURL)
	if !reachable(pgAddr) || !reachable(b.cfg.redisAddr) {
		return nil, fmt.Sprintf("the multi-instance mode needs PostgreSQL at %s and Redis at %s; not both reachable, left out", pgAddr, b.cfg.redisAddr), nil
	}
	var setups []*multiSetup
	// (a) the embedded store, rate limits on (in memory).
	p, err := b.startGateway(ctx, "multi-embedded", "", generousRateLimits)
	if err != nil {
		return nil, "", err
	}
	setups = append(setups, &multiSetup{name: "multi-embedded", label: "one gateway, embedded store, rate limits in memory", procs: []*proc{p}})
	// (b) and (c): PostgreSQL with leases, rate limits on Redis.
	for _, n := range []int{1, 3} {
		name := multiTargets[1]
		label := "one gateway, PostgreSQL (leases) + Redis rate limits"
		if n == 3 {
			name, label = multiTargets[2], "three gateway processes, one PostgreSQL (leases) + Redis, load spread"
		}
		db, key, err := b.newPGDatabase(ctx, name)
		if err != nil {
			return nil, "", err
		}
		prefix := fmt.Sprintf("llmbench:%d:%s:", os.Getpid(), name)
		b.redisPrefixes = append(b.redisPrefixes, prefix)
		store := fmt.Sprintf("store postgres %s {\n\t\t\tlease_size %s\n\t\t}", b.pgDSN(db), multiLeaseSize)
		extra := fmt.Sprintf("\n\t\tredis redis://%s {\n\t\t\tprefix %s\n\t\t}%s", b.cfg.redisAddr, prefix, generousRateLimits)
		s := &multiSetup{name: name, label: label, db: db, prefix: prefix}
		for i := range n {
			p, err := startCaddy(ctx, b.cfg.caddyBin, b.root, fmt.Sprintf("%s-%d", name, i+1), true, func(addr, admin, dir string) string {
				return gatewayCaddyfileStore(addr, admin, dir, "bench-mock", b.mock.addr, "openai", store, extra)
			})
			if err != nil {
				return nil, "", err
			}
			s.procs = append(s.procs, p)
		}
		s.t = &target{name: name, url: s.procs[0].baseURL() + "/v1/chat/completions", keys: []string{key}, proc: s.procs[0]}
		for _, p := range s.procs {
			s.t.urls = append(s.t.urls, p.baseURL()+"/v1/chat/completions")
		}
		setups = append(setups, s)
	}
	setups[0].t = &target{name: setups[0].name, url: setups[0].procs[0].baseURL() + "/v1/chat/completions", keys: []string{b.key}, proc: setups[0].procs[0]}
	return setups, "", nil
}

// roundTrips sums the store's and Redis's round-trip counters over the processes' metrics.
func roundTrips(ctx context.Context, procs []*proc) (store, rds float64, err error) {
	for _, p := range procs {
		s, r, err := p.scrapeRoundTrips(ctx)
		if err != nil {
			return 0, 0, err
		}
		store += s
		rds += r
	}
	return store, rds, nil
}

// scrapeRoundTrips reads llm_gateway_store_round_trips_total and
// llm_gateway_redis_round_trips_total from the process's admin /metrics.
func (p *proc) scrapeRoundTrips(ctx context.Context) (store, rds float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.admin+"/metrics", nil)
	if err != nil {
		return 0, 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("%s /metrics: status %d", p.name, resp.StatusCode)
	}
	found := 0
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 64<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		var dst *float64
		switch name {
		case "llm_gateway_store_round_trips_total":
			dst = &store
		case "llm_gateway_redis_round_trips_total":
			dst = &rds
		default:
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s /metrics: %s: %w", p.name, name, err)
		}
		*dst = v
		found++
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	if found < 2 {
		return 0, 0, fmt.Errorf("%s /metrics: no round-trip counters (a binary older than the bench?)", p.name)
	}
	return store, rds, nil
}

// serviceCPU is the CPU ticks used so far by a configuration's gateway processes, by the
// Redis server and by every PostgreSQL process (-1 where it cannot be read: a server not on
// this machine, or not Linux).
type serviceCPU struct{ gateways, redis, postgres int64 }

// readServiceCPU reads the configuration's serviceCPU; redisPID is the Redis server's (0:
// unknown).
func readServiceCPU(s *multiSetup, redisPID int) serviceCPU {
	c := serviceCPU{redis: -1, postgres: -1}
	for _, p := range s.procs {
		t, err := cpuTicks(p.pid())
		if err != nil {
			c.gateways = -1
			break
		}
		c.gateways += t
	}
	if redisPID > 0 {
		if t, err := cpuTicks(redisPID); err == nil {
			c.redis = t
		}
	}
	if pids := processesNamed("postgres"); len(pids) > 0 {
		c.postgres = 0
		for _, pid := range pids {
			if t, err := cpuTicks(pid); err == nil { // one may have ended since
				c.postgres += t
			}
		}
	}
	return c
}

// processesNamed is the pids of the processes whose command name (/proc/<pid>/comm) is name.
func processesNamed(name string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + e.Name() + "/comm"); err == nil && strings.TrimSpace(string(b)) == name {
			pids = append(pids, pid)
		}
	}
	return pids
}

// redisServerPID is the Redis server's process id (INFO server), 0 when unknown.
func (b *bench) redisServerPID(ctx context.Context) int {
	rdb := redis.NewClient(&redis.Options{Addr: b.cfg.redisAddr})
	defer rdb.Close()
	info, err := rdb.Info(ctx, "server").Result()
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "process_id:"); ok {
			pid, _ := strconv.Atoi(v)
			return pid
		}
	}
	return 0
}

// cpuPerRequest is µs of CPU per request from ticks used over sent requests (NaN when
// either is unknown).
func (b *bench) cpuPerRequest(before, after int64, sent float64) float64 {
	if before < 0 || after < 0 || sent == 0 {
		return math.NaN()
	}
	return float64(after-before) * 1e6 / float64(b.hz) / sent
}

// multi measures the multi-instance configurations in interleaved rounds: throughput at
// c=conc (the round trips per request counted over it, from the metrics scraped before and
// after), then p50/p99 at c=1.
func (b *bench) multi(ctx context.Context, setups []*multiSetup) error {
	cfg, res := b.cfg, b.res
	clients := map[string]*http.Client{}
	for _, s := range setups {
		if err := smoke(ctx, s.t); err != nil {
			return err
		}
		clients[s.name] = newClient(2*cfg.conc, 60*time.Second)
		defer clients[s.name].CloseIdleConnections()
	}
	redisPID := b.redisServerPID(ctx)
	logln("warming up the multi-instance configurations")
	for _, s := range setups {
		runLoad(ctx, clients[s.name], s.t, cfg.conc, min(2*time.Second, cfg.multiDuration), cfg.maxRequests, false)
	}
	for r := 0; r < cfg.rounds; r++ {
		for _, s := range rotate(setups, r) {
			if err := ctx.Err(); err != nil {
				return err
			}
			cl := clients[s.name]
			st0, rd0, err := roundTrips(ctx, s.procs)
			if err != nil {
				return err
			}
			cpu0 := readServiceCPU(s, redisPID)
			tp := runLoad(ctx, cl, s.t, cfg.conc, cfg.multiDuration, cfg.maxRequests, false)
			cpu1 := readServiceCPU(s, redisPID)
			st1, rd1, err := roundTrips(ctx, s.procs)
			if err != nil {
				return err
			}
			sent := float64(tp.ok + tp.errs)
			res.add("gwcpu", s.name, b.cpuPerRequest(cpu0.gateways, cpu1.gateways, sent))
			res.add("rediscpu", s.name, b.cpuPerRequest(cpu0.redis, cpu1.redis, sent))
			res.add("pgcpu", s.name, b.cpuPerRequest(cpu0.postgres, cpu1.postgres, sent))
			res.add("rps", s.name, nanIf(tp.ok == 0, tp.rps()))
			// The scrape after the run counts the open reservations in the store (one query
			// per process on PostgreSQL): not the requests', taken off.
			scrapeQueries := 0.0
			if s.db != "" {
				scrapeQueries = float64(len(s.procs))
			}
			res.add("storert", s.name, nanIf(sent == 0, (st1-st0-scrapeQueries)/sent))
			res.add("redisrt", s.name, nanIf(sent == 0, (rd1-rd0)/sent))
			res.fail(s.name, tp.errs, tp.firstErr)

			lat := runLoad(ctx, cl, s.t, 1, cfg.multiDuration, cfg.maxRequests, true)
			res.add("p50", s.name, nanIf(lat.ok == 0, ms(pct(lat.lat, .50))))
			res.add("p99", s.name, nanIf(lat.ok == 0, ms(pct(lat.lat, .99))))
			res.fail(s.name, lat.errs, lat.firstErr)
			logln(fmt.Sprintf("round %d %-19s %8.0f req/s (c=%d)  p50 %.3f ms  p99 %.3f ms (c=1)  store %.3f, redis %.3f round trips/request  "+
				"µs CPU/request: gateways %.0f, Redis %.0f, PostgreSQL %.0f  errors %d",
				r+1, s.name, tp.rps(), cfg.conc, ms(pct(lat.lat, .5)), ms(pct(lat.lat, .99)),
				(st1-st0-scrapeQueries)/sent, (rd1-rd0)/sent, b.cpuPerRequest(cpu0.gateways, cpu1.gateways, sent),
				b.cpuPerRequest(cpu0.redis, cpu1.redis, sent), b.cpuPerRequest(cpu0.postgres, cpu1.postgres, sent), tp.errs+lat.errs))
		}
	}
	return nil
}
