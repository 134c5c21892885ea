// Package caddymodule is the only package that imports Caddy: it registers the llm_gateway
// HTTP handler, its Caddyfile directive, its admin API routes, its CLI verbs and its metrics,
// and enforces what the Caddy-free packages under policies/ decide.
package caddymodule

import (
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/invalidation"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

func init() {
	caddy.RegisterModule(Gateway{})
}

// Gateway is an HTTP handler that makes LLM backends a metered, paid service. Every inference
// request (OpenAI /v1/chat/completions and /v1/embeddings, Ollama /api/chat and /api/generate)
// is authenticated (API key, a JWT of the gateway's sign-in or of an external issuer, or an
// anonymous identity by client IP), admitted by a credit reservation, routed to the cheapest
// healthy backend able to serve it, proxied through Caddy's own reverse_proxy, metered while it
// streams, and settled to the exact micro-credit. The catalog routes (GET /v1/models, GET
// /api/tags) list what the caller may use, the self-service routes (/v1/auth/keys...,
// /v1/credits, /v1/usage) manage the caller's keys, and, with Signin, the sign-in routes
// (/auth/..., /oauth/..., /account, /.well-known/...) are served. Every other request is passed
// to the next handler.
type Gateway struct {
	// Store is where users, API keys, balances and the ledger live. Default: an SQLite file
	// "llm_gateway/gateway.db" under Caddy's data directory.
	Store StoreConfig `json:"store,omitempty"`

	// Backends are the model servers requests are routed to. At least one is required.
	Backends []*Backend `json:"backends,omitempty"`

	// Anonymous, when set, lets callers without credentials in, on a credit allowance per client
	// address (IPv4 address, or IPv6 /64) refilled every period. When nil, a request without
	// credentials is refused with 401 missing_api_key.
	Anonymous *Anonymous `json:"anonymous,omitempty"`

	// BillingURL is where a signed-in user who runs out of credits is sent (the Location of
	// the 402). Empty: no Location.
	BillingURL string `json:"billing_url,omitempty"`

	// AllowedOrigins are the browser origins (scheme://host[:port]) that may call the gateway
	// with CORS and be returned to after sign-in. "*" allows any origin. Empty: none.
	AllowedOrigins []string `json:"allowed_origins,omitempty"`

	// MaxRequestBody is the largest request body accepted, in bytes; larger ones get 413.
	// Default: 10 MiB.
	MaxRequestBody int64 `json:"max_request_body,omitempty"`

	// MaxTokensDefault is the output bound used (and sent to the backend) when a request gives
	// none. Default: 1024.
	MaxTokensDefault int64 `json:"max_tokens_default,omitempty"`

	// MaxTokensCap is the largest output bound a request may ask for; more is refused with 400.
	// Default: 32768.
	MaxTokensCap int64 `json:"max_tokens_cap,omitempty"`

	// ToolCallsDefault bounds the provider tool calls of a request that gives no bound of its
	// own (Responses' max_tool_calls, each Anthropic server tool's max_uses): it is set and sent,
	// so the reservation bounds what the provider bills. A request may ask for at most
	// maxToolCalls. Default: 5.
	ToolCallsDefault int64 `json:"tool_calls_default,omitempty"`

	// KeyPrefix is the prefix of the API keys this gateway issues (e.g. "sk_live", "sk_test").
	// Default: "sk_live".
	KeyPrefix string `json:"key_prefix,omitempty"`

	// MaxKeysPerUser bounds a user's live API keys created through the self-service API and the
	// account page, each rotation chain counted once (rotating is never refused); one more is
	// refused with 400. The operator's admin route is not bounded. Default: 100.
	MaxKeysPerUser int64 `json:"max_keys_per_user,omitempty"`

	// ReservationTTL is how long a reservation may stay open before it is released as orphaned
	// (after a crash). It must cover the longest a request can run: its attempts on up to
	// Failover backends, each bounded by that backend's timeout, and the store calls around
	// them; a shorter one is refused, so the sweeper never releases a live request's
	// reservation. Default: that worst case plus one minute.
	ReservationTTL caddy.Duration `json:"reservation_ttl,omitempty"`

	// OnDisconnect is what happens to a streamed answer when the client goes away mid-way:
	// "stop" (the default) cancels the backend request at once and charges what was produced
	// up to then, counted with the model family's tokenizer (never more than reserved);
	// "drain" reads the backend's answer to its end, within DrainTimeout, and charges the usage
	// it reports (exact, but the caller pays for tokens it never read). Answers that are not
	// streamed are always read to their end.
	OnDisconnect string `json:"on_disconnect,omitempty"`

	// DrainTimeout bounds how long the gateway keeps reading a backend's response after the
	// client went away, to learn the usage it must charge. Default: 30s.
	DrainTimeout caddy.Duration `json:"drain_timeout,omitempty"`

	// Failover is how many backends one request may be tried on, in order of expected cost,
	// before any response byte was sent. Default: 3.
	Failover int `json:"failover,omitempty"`

	// KeyCacheTTL is how long a looked-up API key (or an unknown key id) is remembered: a key
	// revoked on another instance stops working here within this time; revoked through this
	// instance, at once. Default: 5s on a store shared by instances (postgres); 10m on the
	// embedded store, which one process holds, so that every change of a key passes through
	// this process's caches (each configuration's, told by the in-process invalidation bus)
	// and the TTL bounds nothing but how long an idle key stays in memory. A user's tier is
	// remembered for this time, at most 5s unless configured.
	KeyCacheTTL caddy.Duration `json:"key_cache_ttl,omitempty"`

	// Signin, when set, serves the sign-in pages, the fragment flow, OAuth 2.0 and the
	// password grant (API.md §7), and accepts the gateway's own JWTs (and, when configured,
	// those of external issuers) beside API keys. Nil: no sign-in; only API keys and anonymous
	// callers.
	Signin *Signin `json:"signin,omitempty"`

	// RateLimits, when set, limits the inference requests of each caller by its tier
	// (requests per second, minute, hour and day, tokens per minute, concurrent requests),
	// taken all or none with the credit reservation. Nil: no rate limits.
	RateLimits *RateLimits `json:"rate_limits,omitempty"`

	// Redis, when set, is the Redis server that several instances of the gateway share: the
	// rate limits, the API keys' credit caps and the invalidation of revoked keys and rotated
	// signing keys (see Redis). Nil: all of these are this process's own, as one instance
	// needs.
	Redis *Redis `json:"redis,omitempty"`

	catalog *routing.Catalog
	keys    *identity.KeyCache
	// userTierTTL is how long a user's tier is remembered (ratelimit.go).
	userTierTTL time.Duration
	store       *storeHandle
	storeKey    string
	origins     map[string]bool
	anyOrig     bool
	logger      *zap.Logger
	metrics     *gatewayMetrics
	limits      *limiters
	// owners remembers which backend made which stored response, for whom (responses.go).
	owners   *responseOwners
	redis    *sharedRedis
	redisKey string
	// caps keeps the API keys' credit caps on Redis (nil without Redis).
	caps *sharedCaps
	// unsubscribe ends the subscription to invalidations.
	unsubscribe func()
	// now is the gateway's clock for key expiry and rotation; nil means time.Now.
	now func() time.Time
}

// The default key cache TTLs (Gateway.KeyCacheTTL).
const (
	sharedKeyCacheTTL   = 5 * time.Second
	embeddedKeyCacheTTL = 10 * time.Minute
)

// StoreConfig says which store holds the gateway's state.
type StoreConfig struct {
	// Driver is the store implementation: "sqlite" (the embedded store, one Caddy process per
	// file) or "postgres" (PostgreSQL, shared by any number of gateway instances).
	// Default: "sqlite".
	Driver string `json:"driver,omitempty"`
	// Path is the SQLite file (driver sqlite). Default: "llm_gateway/gateway.db" under Caddy's
	// data directory.
	Path string `json:"path,omitempty"`
	// DSN is the PostgreSQL connection string (driver postgres), a URL or key=value pairs as
	// libpq reads them, e.g. "postgres://gateway@db.internal/gateway?sslmode=verify-full".
	// Placeholders are expanded, so a password can come from the environment:
	// "{env.GATEWAY_DSN}". It never appears in a log line or an error. Required for postgres.
	DSN string `json:"dsn,omitempty"`
	// LeaseSize (driver postgres), when above zero, lets this instance lease chunks of a busy
	// account's balance from the database and reserve from them in memory, settlements
	// committed in batches every few milliseconds: no database round trip per request on
	// average, never an overspend (a lease is taken atomically; see store/postgres/lease.go).
	// A crash leaves its leases to expire (30 s) and loses the settlements of its last batch
	// (an undercharge of a few milliseconds' requests). Accounts with less than four leases'
	// worth, and requests reserving more than a lease, reserve in the database as without
	// it. Default 0: every reservation is a database statement.
	LeaseSize credits.Amount `json:"lease_size,omitempty"`
	// LeaseTTL (driver postgres, with LeaseSize) is how long a lease lives without renewal
	// (renewed every third of it): the delay before a crashed instance's leases go back to
	// the balances, released by any other instance's sweeper (every 10 s), and how long an
	// account stays idle before this instance returns its unused leases. Default 30s.
	LeaseTTL caddy.Duration `json:"lease_ttl,omitempty"`
}

// Backend is one model server.
type Backend struct {
	// Name identifies the backend in responses (X-Gateway-Backend), metrics and the admin API.
	// Required, unique.
	Name string `json:"name"`
	// URL is the server's base address, e.g. "http://127.0.0.1:11434". A path, if any, is
	// prepended to the request paths (/v1/..., /api/...); a query, if any (e.g.
	// "?api-version=2024-10-21"), is sent on every request, health checks included. The
	// client's own query is not passed on.
	URL string `json:"url"`
	// Style is the API the server speaks: "openai" (default), "ollama" or "anthropic"
	// (Anthropic's Messages API: only /v1/messages and /v1/messages/count_tokens are sent to
	// it).
	Style routing.Style `json:"style,omitempty"`
	// APIKey (anthropic style) is sent as x-api-key on every request to the backend, health
	// checks included, e.g. "{env.ANTHROPIC_API_KEY}" (a placeholder, expanded when sent).
	APIKey string `json:"api_key,omitempty"`
	// AnthropicVersion (anthropic style) is the anthropic-version sent when the client sent
	// none (a client's own value, and its anthropic-beta, are passed on). Default:
	// "2023-06-01".
	AnthropicVersion string `json:"anthropic_version,omitempty"`
	// Headers are set on every request to this backend, e.g. an upstream API key:
	// {"Authorization": "Bearer {env.OPENAI_API_KEY}"}. Placeholders are expanded.
	Headers map[string]string `json:"headers,omitempty"`
	// Models are the models the backend serves, with their prices. Required.
	Models []*Model `json:"models,omitempty"`
	// HealthCheck configures active health checks. Default: GET /v1/models (openai) or
	// /api/tags (ollama) every 10s with a 5s timeout.
	HealthCheck *HealthCheck `json:"health_check,omitempty"`
	// DialTimeout bounds connecting to the backend. Default: 3s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`
	// ResponseHeaderTimeout bounds the wait for the response headers (time to first token for
	// streams). Default: 60s.
	ResponseHeaderTimeout caddy.Duration `json:"response_header_timeout,omitempty"`
	// Timeout bounds a whole request to this backend. Default: 10m.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	proxy *reverseproxy.Handler
	base  string // URL path prefix
	query string // URL query (e.g. api-version=...), sent on every request
	// defaults are request fields sent when the client sent none (exchange.defaultHeaders).
	defaults map[string]string
}

// defaultAnthropicVersion is the anthropic-version an anthropic backend is sent by default.
const defaultAnthropicVersion = "2023-06-01"

// Model is one model of a backend with its price.
type Model struct {
	// Name is the model name clients use. Required.
	Name string `json:"name"`
	// Upstream is the name sent to the backend. Default: Name.
	Upstream string `json:"upstream,omitempty"`
	// Kind is "chat" (default) or "embeddings".
	Kind routing.Kind `json:"kind,omitempty"`
	// InputPrice is credits per one million prompt tokens.
	InputPrice credits.Amount `json:"input_price"`
	// OutputPrice is credits per one million completion tokens (reasoning tokens included).
	OutputPrice credits.Amount `json:"output_price"`
	// CachedInputPrice is credits per one million prompt tokens the backend reports as read
	// from its prompt cache (OpenAI's cached_tokens, Anthropic's cache_read_input_tokens).
	// Default: InputPrice.
	CachedInputPrice *credits.Amount `json:"cached_input_price,omitempty"`
	// CacheWritePrice is credits per one million prompt tokens the backend reports as written
	// to its prompt cache (Anthropic's cache_creation_input_tokens). Default: InputPrice.
	// A reservation prices every prompt token at the highest of the three input prices.
	CacheWritePrice *credits.Amount `json:"cache_write_price,omitempty"`
	// ToolPrices are credits per call of the provider's own tools on this model (README,
	// "Provider tools"), by tool: "web_search", "web_search_preview", "file_search",
	// "code_interpreter", "image_generation", "mcp" (OpenAI Responses), "web_search",
	// "web_fetch" (Anthropic). A request naming a provider tool the model does not price is
	// refused with 400 tool_not_priced before anything is reserved; a priced one reserves its
	// bounded calls (max_tool_calls, max_uses) and is charged the calls the usage reports.
	ToolPrices map[string]credits.Amount `json:"tool_prices,omitempty"`
}

// price is the model's price, the cache prices defaulting to the input price.
func (m Model) price() credits.Price {
	p := credits.Price{Input: m.InputPrice, Output: m.OutputPrice, CachedInput: m.InputPrice, CacheWrite: m.InputPrice}
	if m.CachedInputPrice != nil {
		p.CachedInput = *m.CachedInputPrice
	}
	if m.CacheWritePrice != nil {
		p.CacheWrite = *m.CacheWritePrice
	}
	return p
}

// HealthCheck configures a backend's active health check.
type HealthCheck struct {
	// Path is requested with GET; a 2xx answer is healthy. Default per style.
	Path string `json:"path,omitempty"`
	// Interval between checks. Default: 10s.
	Interval caddy.Duration `json:"interval,omitempty"`
	// Timeout of one check. Default: 5s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Disabled turns active checks off (passive checks stay on).
	Disabled bool `json:"disabled,omitempty"`
}

// Anonymous configures access without credentials.
type Anonymous struct {
	// Credits is the allowance per client address and period. Required.
	Credits credits.Amount `json:"credits"`
	// Period is how often the allowance is refilled (up to Credits, never above; a debt left
	// by answers that cost more than reserved is paid from the next allowances). Default: 24h.
	Period caddy.Duration `json:"period,omitempty"`
	// SigninURL is where an anonymous caller who ran out is sent (the 402's Location), with
	// "redirect=" naming where to come back to. Required.
	SigninURL string `json:"signin_url"`
}

// CaddyModule returns the Caddy module information.
func (Gateway) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_gateway",
		New: func() caddy.Module { return new(Gateway) },
	}
}

// Provision sets defaults, opens (or shares) the store, and loads one reverse_proxy handler per
// backend.
func (g *Gateway) Provision(ctx caddy.Context) error {
	g.logger = ctx.Logger()
	g.metrics = registerMetrics(ctx.GetMetricsRegistry(), g.logger)
	if g.MaxRequestBody == 0 {
		g.MaxRequestBody = 10 << 20
	}
	if g.MaxTokensDefault == 0 {
		g.MaxTokensDefault = 1024
	}
	if g.MaxTokensCap == 0 {
		g.MaxTokensCap = 32768
	}
	if g.KeyPrefix == "" {
		g.KeyPrefix = "sk_live"
	}
	if g.ToolCallsDefault == 0 {
		g.ToolCallsDefault = 5
	}
	if g.MaxKeysPerUser == 0 {
		g.MaxKeysPerUser = defaultMaxKeysPerUser
	}
	if g.DrainTimeout == 0 {
		g.DrainTimeout = caddy.Duration(30 * time.Second)
	}
	if g.Failover == 0 {
		g.Failover = 3
	}
	g.userTierTTL = time.Duration(g.KeyCacheTTL)
	if g.KeyCacheTTL == 0 {
		g.userTierTTL = sharedKeyCacheTTL
		g.KeyCacheTTL = caddy.Duration(sharedKeyCacheTTL)
		if g.Store.Driver != storePostgres {
			g.KeyCacheTTL = caddy.Duration(embeddedKeyCacheTTL)
		}
	}
	if g.Anonymous != nil && g.Anonymous.Period == 0 {
		g.Anonymous.Period = caddy.Duration(24 * time.Hour)
	}
	g.origins = map[string]bool{}
	for _, o := range g.AllowedOrigins {
		if o == "*" {
			g.anyOrig = true
		}
		g.origins[strings.TrimSuffix(o, "/")] = true
	}

	var catalog []routing.Backend
	for _, b := range g.Backends {
		if err := b.provision(ctx); err != nil {
			return fmt.Errorf("backend %s: %w", b.Name, err)
		}
		rb := routing.Backend{Name: b.Name, Style: b.Style}
		for _, m := range b.Models {
			rb.Models = append(rb.Models, routing.Model{Name: m.Name, Upstream: m.Upstream, Kind: m.Kind,
				Price: m.price(), ToolPrices: m.ToolPrices})
		}
		catalog = append(catalog, rb)
	}
	if g.ReservationTTL == 0 {
		g.ReservationTTL = caddy.Duration(g.longestRequest() + time.Minute)
	}
	if g.OnDisconnect == "" {
		g.OnDisconnect = onDisconnectStop
	}
	var err error
	g.owners = &responseOwners{}
	registerRedisMetrics(ctx.GetMetricsRegistry(), g.logger)
	if g.Redis != nil {
		if err := g.Redis.validate(); err != nil {
			return err
		}
		if g.redis, g.redisKey, err = openRedis(g.Redis, g.logger); err != nil {
			return err
		}
		g.caps = newSharedCaps(g.redis, time.Duration(g.ReservationTTL))
		for _, op := range redisOperations {
			metricRedisErrors.WithLabelValues(op)
		}
	}
	if err := g.provisionRateLimits(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	if g.catalog, err = routing.NewCatalog(catalog); err != nil {
		return err
	}

	if g.Store.Driver == "" {
		g.Store.Driver = storeSQLite
	}
	if g.Store.Path == "" && g.Store.Driver == storeSQLite {
		g.Store.Path = filepath.Join(caddy.AppDataDir(), "llm_gateway", "gateway.db")
	}
	g.store, g.storeKey, err = openStore(ctx, g.Store, g.logger)
	if err != nil {
		return err
	}
	if err := g.provisionSignin(ctx); err != nil {
		return err
	}
	g.keys, err = identity.NewKeyCache(g.store.keys, time.Duration(g.KeyCacheTTL), 1<<20, g.metrics.observeKeyCache)
	if err != nil {
		return err
	}
	g.keys.Changed = func(ids ...string) { g.publish(invalidation.Key, ids...) }
	g.subscribeInvalidations()
	g.initMetricLabels()
	activeGateways.add(g)
	return nil
}

func (b *Backend) provision(ctx caddy.Context) error {
	if b.Style == "" {
		b.Style = routing.StyleOpenAI
	}
	if b.DialTimeout == 0 {
		b.DialTimeout = caddy.Duration(3 * time.Second)
	}
	if b.ResponseHeaderTimeout == 0 {
		b.ResponseHeaderTimeout = caddy.Duration(60 * time.Second)
	}
	if b.Timeout == 0 {
		b.Timeout = caddy.Duration(10 * time.Minute)
	}
	if b.Style == routing.StyleAnthropic {
		if b.AnthropicVersion == "" {
			b.AnthropicVersion = defaultAnthropicVersion
		}
		b.defaults = map[string]string{"Anthropic-Version": b.AnthropicVersion}
	}
	u, err := url.Parse(b.URL)
	if err != nil {
		return fmt.Errorf("url: %w", err)
	}
	b.base = strings.TrimSuffix(u.Path, "/")
	b.query = u.RawQuery
	raw, err := reverseProxyConfig(b, u)
	if err != nil {
		return err
	}
	// Each backend's handler gets a context of its own: Caddy's module ancestry is a slice
	// appended to in place, so siblings loaded from one context would share (and race on) its
	// last element, which the health checker reads when it emits events. The handler is
	// cleaned up by the gateway's Cleanup; the context ends with the configuration's.
	bctx, _ := caddy.NewContext(ctx)
	mod, err := bctx.LoadModuleByID("http.handlers.reverse_proxy", raw)
	if err != nil {
		return fmt.Errorf("loading reverse_proxy: %w", err)
	}
	b.proxy = mod.(*reverseproxy.Handler)
	return nil
}

// Validate checks the configuration.
func (g *Gateway) Validate() error {
	if len(g.Backends) == 0 {
		return errors.New("at least one backend is required")
	}
	names := map[string]bool{}
	for _, b := range g.Backends {
		if b.Name == "" || names[b.Name] {
			return fmt.Errorf("backend name %q: empty or used twice", b.Name)
		}
		names[b.Name] = true
		if b.Style != routing.StyleOpenAI && b.Style != routing.StyleOllama && b.Style != routing.StyleAnthropic {
			return fmt.Errorf("backend %s: style must be openai, ollama or anthropic, not %q", b.Name, b.Style)
		}
		if (b.APIKey != "" || b.AnthropicVersion != "") && b.Style != routing.StyleAnthropic {
			return fmt.Errorf("backend %s: api_key and anthropic_version are for anthropic backends (use header for others)", b.Name)
		}
		if len(b.Models) == 0 {
			return fmt.Errorf("backend %s: no models", b.Name)
		}
		for _, m := range b.Models {
			if m.InputPrice < 0 || m.OutputPrice < 0 {
				return fmt.Errorf("backend %s, model %s: negative price", b.Name, m.Name)
			}
			for fee, price := range m.ToolPrices {
				if !slices.Contains(routing.ToolFees(), fee) {
					return fmt.Errorf("backend %s, model %s: tool_price %q: not a provider tool the gateway counts (one of %s)",
						b.Name, m.Name, fee, strings.Join(routing.ToolFees(), ", "))
				}
				if price < 0 {
					return fmt.Errorf("backend %s, model %s: tool_price %s is negative", b.Name, m.Name, fee)
				}
			}
			if m.Kind != "" && m.Kind != routing.KindChat && m.Kind != routing.KindEmbeddings {
				return fmt.Errorf("backend %s, model %s: kind must be chat or embeddings", b.Name, m.Name)
			}
		}
	}
	if g.Anonymous != nil {
		if g.Anonymous.Credits < 0 {
			return errors.New("anonymous credits must not be negative")
		}
		if g.Anonymous.SigninURL == "" {
			return errors.New("anonymous access needs a signin_url")
		}
		if time.Duration(g.Anonymous.Period) < time.Second {
			return errors.New("anonymous period must be at least 1s")
		}
	}
	if !identity.ValidPrefix(g.KeyPrefix) {
		return fmt.Errorf("key_prefix %q: lowercase letters and digits in parts joined by _", g.KeyPrefix)
	}
	if g.MaxKeysPerUser < 0 || g.MaxKeysPerUser > 1_000_000 {
		return errors.New("max_keys_per_user must be from 1 to 1000000")
	}
	if g.MaxTokensDefault < 0 || g.MaxTokensCap < g.MaxTokensDefault {
		return errors.New("max_tokens_default must be between 0 and max_tokens_cap")
	}
	if worst := g.longestRequest(); time.Duration(g.ReservationTTL) < worst {
		return fmt.Errorf("reservation_ttl %s is shorter than the longest a request can run (%s: %d attempts at the backends' timeouts, and the store calls): its reservation would be released while it runs",
			time.Duration(g.ReservationTTL), worst, min(g.Failover, len(g.Backends)))
	}
	if g.OnDisconnect != onDisconnectStop && g.OnDisconnect != onDisconnectDrain {
		return fmt.Errorf("on_disconnect %q: stop or drain", g.OnDisconnect)
	}
	if g.RateLimits != nil {
		if err := g.RateLimits.validate(); err != nil {
			return err
		}
	}
	if g.Signin != nil {
		if err := g.Signin.validate(); err != nil {
			return err
		}
	}
	if g.Redis != nil {
		if err := g.Redis.validate(); err != nil {
			return err
		}
	}
	switch g.Store.Driver {
	case storeSQLite:
		if g.Store.DSN != "" || g.Store.LeaseSize != 0 || g.Store.LeaseTTL != 0 {
			return fmt.Errorf("store: a dsn, a lease_size and a lease_ttl are for the postgres driver; sqlite takes a path")
		}
	case storePostgres:
		if g.Store.DSN == "" || g.Store.Path != "" {
			return fmt.Errorf("store postgres: a dsn is required, and no path")
		}
		if g.Store.LeaseSize < 0 {
			return fmt.Errorf("store postgres: lease_size %s is negative", g.Store.LeaseSize)
		}
		if g.Store.LeaseTTL < 0 || (g.Store.LeaseTTL != 0 && g.Store.LeaseSize == 0) {
			return fmt.Errorf("store postgres: lease_ttl %s needs a lease_size and must be positive", time.Duration(g.Store.LeaseTTL))
		}
	default:
		return fmt.Errorf("store driver %q: want sqlite or postgres", g.Store.Driver)
	}
	return nil
}

// The values of OnDisconnect.
const (
	onDisconnectStop  = "stop"
	onDisconnectDrain = "drain"
)

// longestRequest is the longest one request can hold its reservation: an attempt at each of
// the Failover slowest backends (an attempt, its stream and any drain included, is bounded by
// the backend's timeout), and the store calls that reserve and settle.
func (g *Gateway) longestRequest() time.Duration {
	timeouts := make([]time.Duration, 0, len(g.Backends))
	for _, b := range g.Backends {
		timeouts = append(timeouts, time.Duration(b.Timeout))
	}
	slices.Sort(timeouts)
	slices.Reverse(timeouts)
	worst := 2 * storeTimeout
	for _, t := range timeouts[:min(g.Failover, len(timeouts))] {
		worst += t
	}
	return worst
}

// Cleanup releases the store (closed when the last configuration using it is gone).
func (g *Gateway) Cleanup() error {
	activeGateways.remove(g)
	if g.unsubscribe != nil {
		g.unsubscribe()
	}
	g.cleanupRateLimits()
	if g.keys != nil {
		g.keys.Close()
	}
	for _, b := range g.Backends {
		if b.proxy != nil {
			_ = b.proxy.Cleanup()
		}
	}
	var err error
	if g.redisKey != "" {
		_, err = redisPool.Delete(g.redisKey)
	}
	if g.storeKey != "" {
		_, serr := stores.Delete(g.storeKey)
		err = errors.Join(err, serr)
	}
	return err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Gateway)(nil)
	_ caddy.Validator             = (*Gateway)(nil)
	_ caddy.CleanerUpper          = (*Gateway)(nil)
	_ caddyhttp.MiddlewareHandler = (*Gateway)(nil)
)
