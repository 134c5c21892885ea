package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/invalidation"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit/redislimit"
)

// Redis is the Redis server several instances of the gateway share: with it, every rate limit
// of a caller (rate_limits) is admitted on Redis, all of a caller's limits at once in one
// round trip on Redis's clock, so N instances together admit what one would (a tier large
// enough is leased to each instance in chunks, and most admissions are then decided here from
// the lease, see LeaseDivisor); the credit caps
// of API keys count every instance's spending and reservations; and a key revoked or rotated,
// or the signing keys rotated, on one instance is forgotten by every other at once (pub/sub;
// the key cache TTL stays the bound when a message is lost). The ledger of the store stays the
// record of money: Redis holds counters only, and a lost counter is rebuilt from the ledger.
//
// When Redis cannot be reached (or does not answer within Timeout), inference requests that
// need it are refused with 503 limits_unavailable and nothing is forwarded: limits are never
// silently multiplied by the number of instances. Requests that need no Redis (callers without
// rate limits or key caps, the catalog, sign-in, the admin API) are served as usual. Each
// change between reachable and unreachable is logged once, and llm_gateway_redis_up shows it;
// the gateway recovers by itself when Redis answers again.
type Redis struct {
	// URL is the server, redis://[[user]:password@]host[:port][/db] (rediss:// for TLS), with
	// go-redis's query options if any (e.g. ?pool_size=20). Placeholders such as
	// {env.REDIS_URL} are expanded. Required. It never appears in a log line.
	URL string `json:"url"`
	// Prefix begins every key the gateway writes, and the invalidation channel: instances with
	// the same URL and prefix share their limits, caps and invalidations. It must not contain
	// '{' or '}'. Default: "llm_gateway:".
	Prefix string `json:"prefix,omitempty"`
	// Timeout bounds one Redis round trip of a request; a request whose round trip takes
	// longer is refused with 503 limits_unavailable. An admission that waits for the
	// pipeline ahead of it (admissions are group-sent) waits at most twice this. Default: 1s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// LeaseDivisor sizes the rate limit leases: an instance takes a caller's budget from
	// Redis at most 1/LeaseDivisor of each limit's burst (and of its concurrency bound) at a
	// time, at most 64 requests, and admits the caller's next requests from it without a
	// round trip; what a lease leaves unspent is given back within two
	// seconds (its second of life, then the next sweep). A tier with a
	// limit too small to split (a share under 2 requests, or under one slot: a burst or a
	// concurrency bound under 128 and 64 at the default) is admitted on Redis request by
	// request. -1: no leases, every admission is a round trip. Default: 64.
	LeaseDivisor int64 `json:"lease_divisor,omitempty"`
}

// errLimitsUnavailable: Redis, which holds the shared rate limits and key caps, did not
// answer (503 limits_unavailable; nothing was forwarded).
var errLimitsUnavailable = errors.New("the shared rate limits are unavailable")

func (rc *Redis) validate() error {
	if rc.URL == "" {
		return errors.New("redis: a url is required")
	}
	if strings.ContainsAny(rc.Prefix, "{}") {
		return errors.New("redis: the prefix must not contain '{' or '}'")
	}
	if rc.Timeout < 0 {
		return errors.New("redis: the timeout must not be negative")
	}
	if rc.LeaseDivisor < -1 {
		return errors.New("redis: lease_divisor is a positive number, or -1 for no leases")
	}
	return nil
}

// The Redis metrics.
var (
	metricRedisUp = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "llm_gateway", Name: "redis_up",
		Help: "Whether the last round trip to the configured Redis succeeded (1) or failed (0: requests needing the shared limits get 503 limits_unavailable); 1 without Redis.",
	})
	metricRedisErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "redis_errors_total",
		Help: "Redis round trips that failed, by operation (admit, finish, peek, cap_hold, cap_settle, cap_release, publish).",
	}, []string{"operation"})
	metricRedisRoundTrips = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "redis_round_trips_total",
		Help: "Round trips to Redis: each command, pipeline or script sent is one, failed ones included (the invalidation subscription's messages are not counted).",
	})
	metricRevocationLag = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "llm_gateway", Name: "revocation_lag_seconds",
		Help:    "Time from an invalidation's publication on another instance (a key revoked or rotated, the signing keys rotated) to its receipt here, in seconds (the instances' clock skew included).",
		Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
	})
)

func init() { metricRedisUp.Set(1) }

// registerRedisMetrics registers the Redis collectors in a configuration's registry.
func registerRedisMetrics(reg prometheus.Registerer, logger *zap.Logger) {
	if reg == nil {
		return
	}
	for _, c := range []prometheus.Collector{metricRedisUp, metricRedisErrors, metricRedisRoundTrips, metricRevocationLag} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				logger.Warn("registering a redis metric", zap.Error(err))
			}
		}
	}
}

// redisOperations are the values of metricRedisErrors's label.
var redisOperations = []string{"admit", "finish", "peek", "cap_hold", "cap_settle", "cap_release", "publish"}

// redisPool shares one client and one invalidation bus per Redis URL and prefix between the
// configurations (a reload keeps the connections and the subscription).
var redisPool = caddy.NewUsagePool()

// sharedRedis is a Redis client, its invalidation bus, and whether it answers.
type sharedRedis struct {
	rdb *redis.Client
	// hub carries the rate limiters' scripts on rdb: a request's key and user admissions in
	// one round trip, the ends of requests riding with the next admissions.
	hub     *redislimit.Hub
	bus     *invalidation.Redis
	prefix  string
	timeout time.Duration
	logger  *zap.Logger

	mu   sync.Mutex
	down bool
}

func (s *sharedRedis) Destruct() error {
	s.hub.Close()
	err := s.bus.Close()
	return errors.Join(err, s.rdb.Close())
}

// openRedis is the shared client of rc (validated), made on first use; key is its pool key.
func openRedis(rc *Redis, logger *zap.Logger) (*sharedRedis, string, error) {
	url := caddy.NewReplacer().ReplaceKnown(rc.URL, "")
	prefix := rc.Prefix
	if prefix == "" {
		prefix = "llm_gateway:"
	}
	timeout := time.Duration(rc.Timeout)
	if timeout == 0 {
		timeout = time.Second
	}
	key := url + "\x00" + prefix + "\x00" + timeout.String()
	v, _, err := redisPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		opts, err := redis.ParseURL(url)
		if err != nil {
			// go-redis's message may quote the URL, and with it a password.
			return nil, errors.New("redis: the url is not a valid redis:// or rediss:// URL")
		}
		opts.ContextTimeoutEnabled = true
		if opts.DialTimeout == 0 {
			opts.DialTimeout = timeout
		}
		if opts.ReadTimeout == 0 {
			opts.ReadTimeout = timeout
		}
		if opts.WriteTimeout == 0 {
			opts.WriteTimeout = timeout
		}
		if opts.PoolTimeout == 0 {
			opts.PoolTimeout = timeout
		}
		if opts.MaxRetries == 0 {
			opts.MaxRetries = -1 // a request's round trip is bounded by Timeout, not retried
		}
		rdb := redis.NewClient(opts)
		rdb.AddHook(roundTripHook{})
		s := &sharedRedis{rdb: rdb, prefix: prefix, timeout: timeout, logger: logger}
		s.hub = redislimit.NewHub(rdb, redislimit.HubOptions{Timeout: timeout,
			OnError: func(err error) { _ = s.observe("finish", err) }})
		s.bus = invalidation.NewRedis(rdb, prefix+"invalidation", invalidation.RedisOptions{
			OnReceive: func(m invalidation.Message, lag time.Duration) {
				metricRevocationLag.Observe(max(lag, 0).Seconds())
			},
		})
		return s, nil
	})
	if err != nil {
		return nil, "", err
	}
	return v.(*sharedRedis), key, nil
}

// roundTripHook counts the round trips of a Redis client in llm_gateway_redis_round_trips_total:
// a command, and a pipeline (or transaction) however many commands it carries, is one.
type roundTripHook struct{}

func (roundTripHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (roundTripHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		metricRedisRoundTrips.Inc()
		return next(ctx, cmd)
	}
}

func (roundTripHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		metricRedisRoundTrips.Inc()
		return next(ctx, cmds)
	}
}

// context is the context of one round trip: ctx's values, not its cancellation (a caller
// going away does not make Redis look down), and the timeout.
func (s *sharedRedis) context(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), s.timeout)
}

// observe records the outcome of a round trip of op: a failure is counted, and the first
// failure after a success (and the first success after a failure) is logged. It returns err
// wrapped in errLimitsUnavailable, or nil.
func (s *sharedRedis) observe(op string, err error) error {
	if err != nil && errors.Is(err, redis.Nil) {
		err = nil
	}
	s.mu.Lock()
	changed := s.down != (err != nil)
	s.down = err != nil
	s.mu.Unlock()
	if err != nil {
		metricRedisErrors.WithLabelValues(op).Inc()
	}
	if changed {
		if err != nil {
			metricRedisUp.Set(0)
			s.logger.Error("redis unreachable: requests needing the shared rate limits or key caps are refused with 503 limits_unavailable until it answers",
				zap.String("operation", op), zap.String("error", redactedError(err)))
		} else {
			metricRedisUp.Set(1)
			s.logger.Info("redis reachable again: shared rate limits and key caps are admitted")
		}
	}
	if err != nil {
		return fmt.Errorf("%w: %s", errLimitsUnavailable, op)
	}
	return nil
}

// redactedError is err's text without anything that could be a URL (go-redis errors name the
// address, never the password; this is a second guard).
func redactedError(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "redis://"); i >= 0 {
		return msg[:i] + "[url]"
	}
	if i := strings.Index(msg, "rediss://"); i >= 0 {
		return msg[:i] + "[url]"
	}
	return msg
}

// localBus carries invalidations between the gateways of this process that use no Redis
// (several configurations, or sites, sharing one store).
var localBus = invalidation.NewLocal()

// bus is where the gateway publishes and hears invalidations.
func (g *Gateway) bus() invalidation.Bus {
	if g.redis != nil {
		return g.redis.bus
	}
	return localBus
}

// subscribeInvalidations makes the gateway forget what other instances (or other
// configurations of this process) invalidate.
func (g *Gateway) subscribeInvalidations() {
	g.unsubscribe = g.bus().Subscribe(func(m invalidation.Message) {
		switch m.Kind {
		case invalidation.Key:
			for _, id := range m.IDs {
				g.keys.Forget(id)
			}
		case invalidation.SigningKeys:
			g.reloadSigningKeysAsync()
		case invalidation.All:
			g.keys.ForgetAll()
			g.limits.userTiers.Clear()
			g.reloadSigningKeysAsync()
		}
	})
}

// reloadSigningKeysAsync reads the signing keys again, off the subscriber's goroutine.
func (g *Gateway) reloadSigningKeysAsync() {
	if g.Signin == nil {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		defer cancel()
		if _, err := g.loadSigningKeys(ctx, false); err != nil {
			g.logger.Warn("reloading the signing keys after an invalidation", zap.Error(err))
		}
	}()
}

// publish tells the other instances of an invalidation this one already applied. A failure
// is logged: the others then stop honouring what changed within key_cache_ttl.
func (g *Gateway) publish(kind string, ids ...string) {
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	err := g.bus().Publish(ctx, invalidation.Message{Kind: kind, IDs: ids})
	if g.redis != nil {
		err = g.redis.observe("publish", err)
	}
	if err != nil {
		g.logger.Warn("publishing an invalidation: other instances apply it within key_cache_ttl",
			zap.String("kind", kind), zap.Error(err))
	}
}
