package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit/redislimit"
)

// RateLimits are the request, token and concurrency limits of the inference routes, by tier.
// Each caller is limited on its own: an API key by its rotation chain (the key and its
// successors), an anonymous caller by its client address (IPv4, or IPv6 /64). Every limit of a
// tier and the credit reservation are taken all or none.
type RateLimits struct {
	// DefaultTier is the tier of keys whose key and user name none (or a tier not configured).
	// Default: "free" when the tiers are the built-in ones, the only tier when there is one.
	DefaultTier string `json:"default_tier,omitempty"`
	// AnonymousTier is the tier of callers without credentials. Default: DefaultTier.
	AnonymousTier string `json:"anonymous_tier,omitempty"`
	// Tiers by name. Empty: the built-in tiers free (60 requests per minute, a burst of 10 per
	// second, 5 concurrent), pro (300, 50, 25), business (1,000, 100, 100) and enterprise
	// (10,000, 500, 500), with no hourly, daily or token limit.
	Tiers map[string]*Tier `json:"tiers,omitempty"`
}

// Tier is one set of limits. Zero means no such limit. The request limits are GCRA limits
// (exact: a greedy caller gets exactly burst + rate × time): each admits at once at most the
// quota of the next shorter request limit (its burst; burst_per_second for the per-minute
// limit), and its own quota per window sustained, so in any window of its length a limit lets
// through at most its quota plus that burst, never twice its quota.
type Tier struct {
	// RequestsPerMinute is the sustained rate per minute.
	RequestsPerMinute int64 `json:"requests_per_minute,omitempty"`
	// RequestsPerHour is the sustained rate per hour.
	RequestsPerHour int64 `json:"requests_per_hour,omitempty"`
	// RequestsPerDay is the sustained rate per day.
	RequestsPerDay int64 `json:"requests_per_day,omitempty"`
	// BurstPerSecond is the most requests admitted at once, refilled at that many per second.
	BurstPerSecond int64 `json:"burst_per_second,omitempty"`
	// Concurrent is the most requests in flight at once.
	Concurrent int64 `json:"concurrent,omitempty"`
	// TokensPerMinute bounds the tokens per minute: a request takes its token bound (prompt
	// estimate plus output bound) when admitted, and gets back what its usage did not use
	// when it is settled. A request whose bound alone exceeds it is refused with 400.
	TokensPerMinute int64 `json:"tokens_per_minute,omitempty"`
}

// builtinTiers are the WAVE seed's tiers.
func builtinTiers() map[string]*Tier {
	return map[string]*Tier{
		"free":       {RequestsPerMinute: 60, BurstPerSecond: 10, Concurrent: 5},
		"pro":        {RequestsPerMinute: 300, BurstPerSecond: 50, Concurrent: 25},
		"business":   {RequestsPerMinute: 1000, BurstPerSecond: 100, Concurrent: 100},
		"enterprise": {RequestsPerMinute: 10000, BurstPerSecond: 500, Concurrent: 500},
	}
}

// policy turns a tier into limits, shortest window first.
func (t *Tier) policy() ratelimit.Policy {
	p := ratelimit.Policy{Concurrent: t.Concurrent}
	var shorter int64 // the quota of the next shorter request limit: this one's burst
	add := func(name string, quota int64, window time.Duration) {
		if quota <= 0 {
			return
		}
		burst := quota
		if shorter > 0 {
			burst = min(shorter, quota)
		}
		p.Limits = append(p.Limits, ratelimit.Limit{Name: name, Quota: quota, Window: window, Burst: burst})
		shorter = quota
	}
	add("burst_per_second", t.BurstPerSecond, time.Second)
	add("requests_per_minute", t.RequestsPerMinute, time.Minute)
	add("requests_per_hour", t.RequestsPerHour, time.Hour)
	add("requests_per_day", t.RequestsPerDay, 24*time.Hour)
	if t.TokensPerMinute > 0 {
		p.Limits = append(p.Limits, ratelimit.Limit{Name: "tokens_per_minute", Unit: ratelimit.Tokens,
			Quota: t.TokensPerMinute, Window: time.Minute})
	}
	return p
}

func (t *Tier) validate() error {
	for _, v := range []int64{t.RequestsPerMinute, t.RequestsPerHour, t.RequestsPerDay, t.BurstPerSecond, t.Concurrent, t.TokensPerMinute} {
		if v < 0 {
			return errors.New("limits must not be negative")
		}
	}
	return nil
}

// validate checks the configuration and fills the defaults.
func (rl *RateLimits) validate() error {
	if len(rl.Tiers) == 0 {
		rl.Tiers = builtinTiers()
		if rl.DefaultTier == "" {
			rl.DefaultTier = "free"
		}
	}
	if rl.DefaultTier == "" && len(rl.Tiers) == 1 {
		for name := range rl.Tiers {
			rl.DefaultTier = name
		}
	}
	if rl.DefaultTier == "" {
		return errors.New("rate_limits: default_tier is required with several tiers")
	}
	if rl.AnonymousTier == "" {
		rl.AnonymousTier = rl.DefaultTier
	}
	for _, name := range []string{rl.DefaultTier, rl.AnonymousTier} {
		if rl.Tiers[name] == nil {
			return fmt.Errorf("rate_limits: no tier %q", name)
		}
	}
	for name, t := range rl.Tiers {
		if t == nil {
			return fmt.Errorf("rate_limits: tier %q is empty", name)
		}
		if name == "" || len(name) > 64 {
			return fmt.Errorf("rate_limits: tier name %q: 1 to 64 characters", name)
		}
		if err := t.validate(); err != nil {
			return fmt.Errorf("rate_limits: tier %s: %w", name, err)
		}
	}
	return nil
}

// The rate limit metrics, created once per process (registered in every configuration's
// registry). Tier names come from the configuration, limit names from a closed set.
var (
	metricRateLimited = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "rate_limited_total",
		Help: "Requests refused with 429 rate_limit_exceeded, by tier (or sign-in limiter: signin_account, signin_account_wide, signin_ip, signup_ip) and the limit that refused (burst_per_second, requests_per_minute, requests_per_hour, requests_per_day, tokens_per_minute, concurrent, signin_per_15m, signup_per_hour).",
	}, []string{"tier", "limit"})
	metricLimitAdmissions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "llm_gateway", Name: "rate_limit_admissions_total",
		Help: "Admissions by the rate limits shared on Redis, by where they were decided: lease (from budget this instance leased, no round trip) or redis (a script on Redis; the lease it took, if any, included).",
	}, []string{"source"})
	metricConcurrent = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "llm_gateway", Name: "concurrent_requests",
		Help: "Requests admitted by the rate limits and not finished yet, by tier.",
	}, []string{"tier"})
)

// registerRateLimitMetrics registers the rate limit collectors in reg (a new registry per
// configuration load).
func registerRateLimitMetrics(reg prometheus.Registerer, logger *zap.Logger) {
	if reg == nil {
		return
	}
	for _, c := range []prometheus.Collector{metricRateLimited, metricLimitAdmissions, metricConcurrent} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				logger.Warn("registering a rate limit metric", zap.Error(err))
			}
		}
	}
}

// rateLimitClock, when set, is the clock of every gateway's rate limits (tests only, through
// export_test.go, so an end-to-end test need not wait for windows to pass).
var rateLimitClock atomic.Pointer[func() time.Time]

// defaultLeaseDivisor is Redis.LeaseDivisor's default.
const defaultLeaseDivisor = 64

// limiterPool shares each tier's limiter between the configurations that define the tier the
// same way, so a config reload does not make every caller's limits whole again (nor forget the
// requests in flight). Keyed by the tier's name and limits.
var limiterPool = caddy.NewUsagePool()

// pooledLimiter is a limiter in limiterPool.
type pooledLimiter struct{ *ratelimit.Limiter }

func (pooledLimiter) Destruct() error { return nil }

// sharedLimiter is the pooled limiter of key, made with policy p the first time.
func sharedLimiter(key string, p ratelimit.Policy) (*ratelimit.Limiter, error) {
	v, _, err := limiterPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		lim, err := ratelimit.New(p, limitClock)
		if err != nil {
			return nil, err
		}
		return pooledLimiter{lim}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(pooledLimiter).Limiter, nil
}

// limitClock is the rate limits' clock: time.Now, or rateLimitClock in tests.
func limitClock() time.Time {
	if c := rateLimitClock.Load(); c != nil {
		return (*c)()
	}
	return time.Now()
}

// limiters are a configuration's rate limiters: one per tier, and the named ones.
type limiters struct {
	pooled    []string // the limiterPool keys this configuration holds
	tiers     map[string]*tierLimiter
	def, anon *tierLimiter
	// named are limiters for other routes, by name (see namedLimiter).
	named map[string]*ratelimit.Limiter

	userTierTTL time.Duration
	userTiers   sync.Map // user id -> userTier
}

// tierLimiter is one tier's limiter and its metrics.
type tierLimiter struct {
	name string
	// lim is the in-process limiter (without Redis), shared is the Redis one (with).
	lim        *ratelimit.Limiter
	shared     *redislimit.Limiter
	redis      *sharedRedis
	concurrent prometheus.Gauge
}

// admit takes the request from the tier's limits for key: in this process, or on Redis in one
// round trip (an error wraps errLimitsUnavailable: nothing was taken).
func (t *tierLimiter) admit(ctx context.Context, key string, tokens int64) (ratelimit.Ticket, ratelimit.Decision, error) {
	if t.shared == nil {
		tk, d := t.lim.Admit(key, tokens)
		return tk, d, nil
	}
	ctx, cancel := t.redis.context(ctx)
	defer cancel()
	tk, d, err := t.shared.AdmitContext(ctx, key, tokens)
	return tk, d, t.redis.observe("admit", err)
}

// admitBoth admits key under t and, when u is not nil, userKey under u (its decision
// computed only when key is admitted, as if made after it): on Redis in one round trip,
// each decision its own (the caller cancels one admitted beside a refusal). An error takes
// nothing.
func admitBoth(ctx context.Context, t *tierLimiter, key string, u *tierLimiter, userKey string, tokens int64) (
	ratelimit.Ticket, ratelimit.Decision, ratelimit.Ticket, ratelimit.Decision, error) {
	if u == nil || t.shared == nil || u.shared == nil {
		tk, d, err := t.admit(ctx, key, tokens)
		if err != nil || !d.Allowed || u == nil {
			return tk, d, ratelimit.Ticket{}, ratelimit.Decision{}, err
		}
		utk, ud, err := u.admit(ctx, userKey, tokens)
		if err != nil {
			tk.Cancel()
		}
		return tk, d, utk, ud, err
	}
	ctx, cancel := t.redis.context(ctx)
	defer cancel()
	tks, ds, err := redislimit.AdmitEach(ctx, redislimit.Call{L: t.shared, Key: key, Tokens: tokens},
		redislimit.Call{L: u.shared, Key: userKey, Tokens: tokens})
	if err = t.redis.observe("admit", err); err != nil {
		return ratelimit.Ticket{}, ratelimit.Decision{}, ratelimit.Ticket{}, ratelimit.Decision{}, err
	}
	return tks[0], ds[0], tks[1], ds[1], nil
}

// peek is where the tightest limit stands for key (ok false when Redis did not answer).
func (t *tierLimiter) peek(ctx context.Context, key string) (ratelimit.Status, bool) {
	if t.shared == nil {
		return t.lim.Peek(key), true
	}
	ctx, cancel := t.redis.context(ctx)
	defer cancel()
	st, err := t.shared.PeekContext(ctx, key)
	return st, t.redis.observe("peek", err) == nil
}

type userTier struct {
	name  string
	until time.Time
}

// Named limiters for the sign-in endpoints. Addresses are anonymous identities (an IPv4
// address, an IPv6 /64). Failed sign-ins: 10 per 15 minutes per account and address (so that
// guessing from one place locks out that place only, not the account's owner), 100 per 15
// minutes per account from anywhere (distributed guessing), 30 per 15 minutes per address (a
// sign-up counts: each is a password hash). Sign-ups: 5 per hour per address.
const (
	LimiterSigninAccount     = "signin_account"
	LimiterSigninAccountWide = "signin_account_wide"
	LimiterSigninIP          = "signin_ip"
	LimiterSignupIP          = "signup_ip"
)

// namedPolicies are the named limiters' limits (a variable for tests, which lower them).
var namedPolicies = map[string]ratelimit.Policy{
	LimiterSigninAccount:     {Limits: []ratelimit.Limit{{Name: "signin_per_15m", Quota: 10, Window: 15 * time.Minute}}},
	LimiterSigninAccountWide: {Limits: []ratelimit.Limit{{Name: "signin_per_15m", Quota: 100, Window: 15 * time.Minute}}},
	LimiterSigninIP:          {Limits: []ratelimit.Limit{{Name: "signin_per_15m", Quota: 30, Window: 15 * time.Minute}}},
	LimiterSignupIP:          {Limits: []ratelimit.Limit{{Name: "signup_per_hour", Quota: 5, Window: time.Hour}}},
}

// provisionRateLimits builds the limiters of g.RateLimits (validated).
func (g *Gateway) provisionRateLimits(reg prometheus.Registerer) error {
	registerRateLimitMetrics(reg, g.logger)
	l := &limiters{tiers: map[string]*tierLimiter{}, named: map[string]*ratelimit.Limiter{},
		userTierTTL: g.userTierTTL}
	g.limits = l
	shared := func(key string, p ratelimit.Policy) (*ratelimit.Limiter, error) {
		key = fmt.Sprintf("%s %+v", key, p)
		lim, err := sharedLimiter(key, p)
		if err == nil {
			l.pooled = append(l.pooled, key)
		}
		return lim, err
	}
	for name, p := range namedPolicies {
		lim, err := shared("named "+name, p)
		if err != nil {
			return err
		}
		l.named[name] = lim
	}
	if g.RateLimits == nil {
		return nil
	}
	if err := g.RateLimits.validate(); err != nil {
		return err
	}
	names := make([]string, 0, len(g.RateLimits.Tiers))
	for name := range g.RateLimits.Tiers {
		names = append(names, name)
	}
	sort.Strings(names)
	var onRedis []*redislimit.Limiter
	var lease redislimit.LeaseOptions
	if g.Redis != nil && g.Redis.LeaseDivisor != -1 {
		lease.Divisor = g.Redis.LeaseDivisor
		if lease.Divisor == 0 {
			lease.Divisor = defaultLeaseDivisor
		}
		fromLease, byScript := metricLimitAdmissions.WithLabelValues("lease"), metricLimitAdmissions.WithLabelValues("redis")
		lease.OnAdmit = func(local bool) {
			if local {
				fromLease.Inc()
			} else {
				byScript.Inc()
			}
		}
	}
	for _, name := range names {
		tl := &tierLimiter{name: name, concurrent: metricConcurrent.WithLabelValues(name)}
		p := g.RateLimits.Tiers[name].policy()
		var err error
		if g.redis != nil {
			r := g.redis
			tl.redis = r
			tl.shared, err = redislimit.New(r.rdb, p, redislimit.Options{
				Prefix:        r.prefix + "rl:" + redisKeyPart(name) + ":",
				SlotTTL:       time.Duration(g.ReservationTTL),
				FinishTimeout: r.timeout,
				OnFinishError: func(err error) { _ = r.observe("finish", err) },
				Lease:         lease,
				Hub:           r.hub,
			})
		} else {
			tl.lim, err = shared("tier "+name, p)
		}
		if err != nil {
			return fmt.Errorf("rate_limits: tier %s: %w", name, err)
		}
		l.tiers[name] = tl
		if tl.shared != nil {
			onRedis = append(onRedis, tl.shared)
		}
	}
	if len(onRedis) > 0 {
		// The tiers' scripts, sent now rather than by the first request of each (a
		// failure here is only that: they are sent when first needed).
		ctx, cancel := context.WithTimeout(context.Background(), g.redis.timeout)
		defer cancel()
		if err := redislimit.LoadScripts(ctx, g.redis.rdb, onRedis...); err != nil {
			g.logger.Debug("rate_limits: the scripts will be sent to Redis at first use", zap.Error(err))
		}
	}
	l.def, l.anon = l.tiers[g.RateLimits.DefaultTier], l.tiers[g.RateLimits.AnonymousTier]
	return nil
}

// namedLimiter is the limiter called name (LimiterSigninAccount, ...), for routes
// other than inference, e.g. sign-in: admit with admitNamed. Nil when there is none.
func (g *Gateway) namedLimiter(name string) *ratelimit.Limiter {
	if g.limits == nil {
		return nil
	}
	return g.limits.named[name]
}

// namedAttempt is one attempt taken from a named limiter: the limiter and the key (an
// account, or a client address).
type namedAttempt struct{ limiter, key string }

// admitNamed takes one attempt from each named limiter, all or none, sets the rate limit
// headers of each decision on w (the last one's stay), and returns the 429 error of the first
// that refuses, counted in llm_gateway_rate_limited_total under the limiter's name. giveBack
// returns what was taken (a sign-in with the right password is not an attempt to throttle).
// Nothing is held: there is no concurrency bound on named limiters.
func (g *Gateway) admitNamed(w http.ResponseWriter, attempts ...namedAttempt) (giveBack func(), err error) {
	var taken []ratelimit.Ticket
	giveBack = func() {
		for i := range taken {
			taken[i].Cancel()
		}
	}
	for _, a := range attempts {
		lim := g.namedLimiter(a.limiter)
		if lim == nil {
			continue
		}
		t, d := lim.Admit(a.key, 0)
		setRateLimitHeaders(w.Header(), d, g.limitClock())
		if !d.Allowed {
			giveBack()
			metricRateLimited.WithLabelValues(a.limiter, d.Refused).Inc()
			return func() {}, &rateLimited{tier: a.limiter, d: d}
		}
		taken = append(taken, t)
	}
	return giveBack, nil
}

func (g *Gateway) limitClock() time.Time { return limitClock() }

// cleanupRateLimits lets go of the configuration's pooled limiters.
func (g *Gateway) cleanupRateLimits() {
	if g.limits == nil {
		return
	}
	for _, key := range g.limits.pooled {
		_, _ = limiterPool.Delete(key)
	}
	g.limits.pooled = nil
	for _, t := range g.limits.tiers {
		if t.shared != nil {
			t.shared.Close() // its leases given back: the next configuration takes its own
		}
	}
}

// tierOf is the caller's tier: the key's, else its user's, else the default (also for names
// no tier has); the anonymous tier for anonymous callers.
func (g *Gateway) tierOf(ctx context.Context, who *caller) *tierLimiter {
	l := g.limits
	if who.kind == "anonymous" {
		return l.anon
	}
	name := who.tier
	if name == "" && who.userID != "" {
		name = g.userTier(ctx, who.userID)
	}
	if t := l.tiers[name]; t != nil {
		return t
	}
	return l.def
}

// userTier is the user's tier, remembered for the key cache's TTL; "" when unknown (the store
// failing included: the default tier applies then, the request is not refused for it).
func (g *Gateway) userTier(ctx context.Context, userID string) string {
	l := g.limits
	now := time.Now()
	if v, ok := l.userTiers.Load(userID); ok && now.Before(v.(userTier).until) {
		return v.(userTier).name
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	u, err := g.store.users.UserByID(ctx, userID)
	if err != nil {
		return ""
	}
	l.userTiers.Store(userID, userTier{name: u.Tier, until: now.Add(l.userTierTTL)})
	return u.Tier
}

// admission is what one request took from its tier's limits: its key's (or its address's),
// and for a key its user's.
type admission struct {
	tier   *tierLimiter
	ticket ratelimit.Ticket
	key    string
	// user and userTicket are the user's limits, for a key caller.
	user       *tierLimiter
	userTicket ratelimit.Ticket
	// headers: the rate limit headers were set on the response.
	headers bool
	done    bool
}

// rateLimited is a request refused by a rate limit (429 rate_limit_exceeded).
type rateLimited struct {
	tier  string
	scope string // "key", "user" or "address"; "" for named limiters
	d     ratelimit.Decision
}

func (e *rateLimited) Error() string {
	return fmt.Sprintf("rate limit exceeded: %s of tier %s; retry after %s", e.d.Refused, e.tier, retrySeconds(e.d.RetryAfter))
}

// tooManyTokens is a request whose token bound alone exceeds its tier's tokens per minute
// (400: it can never pass).
type tooManyTokens struct{ bound, limit int64 }

func (e *tooManyTokens) Error() string {
	return fmt.Sprintf("this request may use up to %d tokens (prompt estimate plus max_tokens), more than the %d tokens per minute of this credential's tier: lower max_tokens", e.bound, e.limit)
}

// admitLimits takes the request from every limit of the caller's tier (its key's, or its
// address's) and, for a key, of its user's tier under the user's id, or nothing; it sets the
// rate limit headers either way.
func (ex *exchange) admitLimits() error {
	g := ex.g
	if g.limits == nil || g.limits.def == nil {
		return nil
	}
	who := ex.who
	ctx := ex.r.Context()
	t := g.tierOf(ctx, who)
	tokens := ex.inf.inputBound + ex.inf.outputTotal()
	scope := "key"
	switch who.kind {
	case "anonymous":
		scope = "address"
	case "jwt":
		scope = "user" // a signed-in user is limited as the user, in the user's tier
	}
	a := &admission{tier: t, key: who.limitKey, headers: true}
	ex.limits = a
	// A key's caller is limited by its user's limits too: its keys together get no more
	// than one key would. On Redis both admissions are one round trip.
	var ut *tierLimiter
	if who.kind == "api_key" && who.userID != "" {
		ut = g.userLimiter(ctx, who.userID)
	}
	ticket, d, uticket, ud, err := admitBoth(ctx, t, who.limitKey, ut, "u:"+who.userID, tokens)
	if err != nil {
		a.done = true
		return err
	}
	if !d.Allowed {
		uticket.Cancel() // admitted beside the refused key on Redis: given back
	} else if ut != nil {
		if !ud.Allowed {
			ticket.Cancel()
			t, d, scope = ut, ud, "user"
		} else {
			a.user, a.userTicket = ut, uticket
			if ud.Tightest.OK() && (!d.Tightest.OK() || ud.Tightest.Remaining < d.Tightest.Remaining) {
				d.Tightest = ud.Tightest
			}
		}
	}
	setRateLimitHeaders(ex.w.Header(), d, g.limitClock())
	if !d.Allowed {
		a.done = true
		if d.TooLarge {
			return &tooManyTokens{bound: tokens, limit: g.RateLimits.Tiers[t.name].TokensPerMinute}
		}
		metricRateLimited.WithLabelValues(t.name, d.Refused).Inc()
		return &rateLimited{tier: t.name, scope: scope, d: d}
	}
	a.ticket = ticket
	a.tier.concurrent.Inc()
	return nil
}

// userLimiter is the limiter of the user's own tier (User.Tier, else the default).
func (g *Gateway) userLimiter(ctx context.Context, userID string) *tierLimiter {
	if t := g.limits.tiers[g.userTier(ctx, userID)]; t != nil {
		return t
	}
	return g.limits.def
}

// cancelLimits gives back everything the request took from its limits (a later step refused
// it), and sets the headers again.
func (ex *exchange) cancelLimits() {
	a := ex.limits
	if a == nil || a.done {
		return
	}
	a.done = true
	a.ticket.Cancel()
	a.userTicket.Cancel()
	a.tier.concurrent.Dec()
	if st, ok := a.tier.peek(ex.r.Context(), a.key); ok {
		setStatusHeaders(ex.w.Header(), st, ex.g.limitClock())
	}
}

// finishLimits frees the request's concurrency slots and corrects its tokens by the usage
// settled (none when released). Called once the request is over, whatever its ending.
func (ex *exchange) finishLimits() {
	a := ex.limits
	if a == nil || a.done {
		return
	}
	a.done = true
	ex.mu.Lock()
	used := ex.usage.InputTokens + ex.usage.OutputTokens
	ex.mu.Unlock()
	a.ticket.Settle(used)
	a.userTicket.Settle(used)
	a.tier.concurrent.Dec()
}

// peekLimitHeaders sets the rate limit headers of an answer given before admission (an error
// after the caller is known), taking nothing.
func (ex *exchange) peekLimitHeaders() {
	g := ex.g
	if g.limits == nil || g.limits.def == nil || ex.who == nil || (ex.limits != nil && ex.limits.headers) {
		return
	}
	if ex.ep.lists() {
		return // the catalog routes are not limited
	}
	t := g.tierOf(ex.r.Context(), ex.who)
	if st, ok := t.peek(ex.r.Context(), ex.who.limitKey); ok {
		setStatusHeaders(ex.w.Header(), st, g.limitClock())
	}
}

// rateLimitFields are the response fields the gateway sets; a backend's own are not passed
// on over them.
var rateLimitFields = map[string]bool{
	"X-Ratelimit-Limit": true, "X-Ratelimit-Remaining": true, "X-Ratelimit-Reset": true,
	"X-Ratelimit-Policy": true, "Ratelimit-Policy": true, "Ratelimit": true,
	"Retry-After": true, "X-Ratelimit-Retry-After": true, "Retry-After-Ms": true,
}

// setRateLimitHeaders sets the headers of a decision: the tightest request limit's, and on a
// refusal when to retry.
func setRateLimitHeaders(h http.Header, d ratelimit.Decision, now time.Time) {
	setStatusHeaders(h, d.Tightest, now)
	if d.Allowed || d.TooLarge {
		return
	}
	secs := retrySeconds(d.RetryAfter)
	h["Retry-After"] = []string{secs}
	h["X-Ratelimit-Retry-After"] = []string{secs}
	ms := (d.RetryAfter + time.Millisecond - 1) / time.Millisecond
	h["Retry-After-Ms"] = []string{strconv.FormatInt(int64(max(ms, 1)), 10)}
}

// retrySeconds is a wait in whole seconds, rounded up, at least 1.
func retrySeconds(d time.Duration) string {
	return strconv.FormatInt(int64(max((d+time.Second-1)/time.Second, 1)), 10)
}

// setStatusHeaders sets X-RateLimit-* and the IETF RateLimit-Policy / RateLimit fields
// (draft-ietf-httpapi-ratelimit-headers) for one limit's status.
func setStatusHeaders(h http.Header, s ratelimit.Status, now time.Time) {
	if !s.OK() {
		return
	}
	reset := int64((s.Reset + time.Second - 1) / time.Second)
	window := int64(s.Limit.Window / time.Second)
	name := windowName(s.Limit.Window)
	// The six values are written into one buffer and cut from one string, and the six
	// fields' slices from one array (each capped: an Add to one copies it): two allocations
	// for every request under rate limits, not fourteen.
	var buf [256]byte
	b := buf[:0]
	var ends [6]int
	b = strconv.AppendInt(b, s.Limit.Quota, 10) // X-Ratelimit-Limit
	ends[0] = len(b)
	b = strconv.AppendInt(b, s.Remaining, 10) // X-Ratelimit-Remaining
	ends[1] = len(b)
	b = strconv.AppendInt(b, now.Unix()+reset, 10) // X-Ratelimit-Reset
	ends[2] = len(b)
	b = strconv.AppendInt(b, s.Limit.Quota, 10) // X-Ratelimit-Policy
	b = append(b, ";w="...)
	b = strconv.AppendInt(b, window, 10)
	ends[3] = len(b)
	b = append(b, '"') // Ratelimit-Policy
	b = append(b, name...)
	b = append(b, `";q=`...)
	b = strconv.AppendInt(b, s.Limit.Quota, 10)
	b = append(b, ";w="...)
	b = strconv.AppendInt(b, window, 10)
	ends[4] = len(b)
	b = append(b, '"') // Ratelimit
	b = append(b, name...)
	b = append(b, `";r=`...)
	b = strconv.AppendInt(b, s.Remaining, 10)
	b = append(b, ";t="...)
	b = strconv.AppendInt(b, reset, 10)
	ends[5] = len(b)
	all := string(b)
	vals := make([]string, len(ends))
	start := 0
	for i, end := range ends {
		vals[i] = all[start:end]
		start = end
	}
	h["X-Ratelimit-Limit"] = vals[0:1:1]
	h["X-Ratelimit-Remaining"] = vals[1:2:2]
	h["X-Ratelimit-Reset"] = vals[2:3:3]
	h["X-Ratelimit-Policy"] = vals[3:4:4]
	h["Ratelimit-Policy"] = vals[4:5:5]
	h["Ratelimit"] = vals[5:6:6]
}

func windowName(w time.Duration) string {
	switch w {
	case time.Second:
		return "second"
	case time.Minute:
		return "minute"
	case time.Hour:
		return "hour"
	case 24 * time.Hour:
		return "day"
	}
	return "window"
}

// redisKeyPart is a configured name made fit for a Redis key prefix (no braces).
func redisKeyPart(name string) string {
	return strings.NewReplacer("%", "%25", "{", "%7B", "}", "%7D").Replace(name)
}
