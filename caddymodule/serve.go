package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// ServeHTTP runs the gateway's pipeline for its own routes and passes every other request on.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	ep := endpoints[r.URL.Path]
	if ep == epNone && strings.HasPrefix(r.URL.Path, selfKeyPath) {
		ep = epAuthKey
	}
	if ep == epNone {
		if sr, allow, ok := storedRouteAt(r.URL.Path, r.Method); ok {
			if !g.cors(w, r) {
				g.serveStored(w, r, sr, allow)
			}
			return nil
		}
		if h := signinRoute(r.URL.Path); h != nil && g.Signin != nil {
			r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
			h(g, w, r)
			return nil
		}
		if u := unservedRoute(r); u != nil {
			if !g.cors(w, r) {
				writeError(w, r, u)
			}
			return nil
		}
		return next.ServeHTTP(w, r)
	}
	if g.cors(w, r) {
		return nil // a preflight, answered
	}
	if ep.selfService() {
		g.serveSelfService(w, r, ep)
		return nil
	}
	if r.Method != ep.method() {
		w.Header().Set("Allow", ep.method()+", OPTIONS")
		writeError(w, r, &statusError{http.StatusMethodNotAllowed, "use " + ep.method() + " on " + r.URL.Path})
		return nil
	}
	ex := &exchange{g: g, ep: ep, w: w, r: r, start: time.Now()}
	// Whatever happens (a panic included), nothing stays reserved past the request, and its
	// concurrency slot is freed.
	defer func() {
		ex.release()
		ex.finishLimits()
	}()
	err := ex.run()
	if err != nil {
		ex.peekLimitHeaders()
		e := writeError(w, r, err)
		ex.outcome = e.Code
		if e.status == http.StatusPaymentRequired {
			g.metrics.insufficient.WithLabelValues(ex.authKind()).Inc()
		}
	}
	ex.record()
	if ex.aborted {
		panic(http.ErrAbortHandler) // the backend's stream broke: so does the client's
	}
	return nil
}

// statusError is an error with a plain HTTP status (405).
type statusError struct {
	status  int
	message string
}

func (e *statusError) Error() string { return e.message }

// caller is who a request comes from, once authenticated.
type caller struct {
	kind    string // "anonymous", "api_key" or "jwt" ("session" on the account page)
	account credits.AccountID
	userID  string
	keyID   string
	// keyChain is the key's rotation chain (identity.Key.ChainID), whose keys share its cap.
	keyChain string
	// keyCap and keyCapPeriod are the key's credit cap (0: none) and its period.
	keyCap       credits.Amount
	keyCapPeriod string
	scopes       []string
	models       []string // when not empty, the only models allowed
	refill       *credits.Refill
	// allowedIPs and expiresAt restrict the key the caller used (nil: none); keys it creates
	// inherit them.
	allowedIPs []string
	expiresAt  *time.Time
	// tier is the rate limit tier the key names ("": its user's); limitKey is what the rate
	// limits key on: the key's rotation chain (a rotation is the same key to the limits), the
	// user, or the anonymous client address.
	tier     string
	limitKey string
}

var anonymousScopes = []string{identity.ScopeChatWrite, identity.ScopeEmbeddingsWrite, identity.ScopeModelsRead}

// identify turns the request's credentials into a caller.
func (g *Gateway) identify(r *http.Request) (*caller, error) {
	cred, err := identity.CredentialFrom(r.Header)
	if err != nil {
		return nil, err
	}
	if strings.Contains(r.URL.RawQuery, "access_token") && r.URL.Query().Has("access_token") {
		// RFC 6750 §2.3 is not offered: a token in a URL ends up in logs and Referer headers.
		return nil, invalid("access_token", "send the token in the Authorization header, not in the URL")
	}
	switch cred.Kind {
	case identity.None:
		if g.Anonymous == nil {
			return nil, errMissingCredential
		}
		ipStr, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
		ip, err := identity.ParseClientIP(ipStr)
		if err != nil {
			return nil, fmt.Errorf("client address %q: %w", ipStr, err)
		}
		period := int64(time.Duration(g.Anonymous.Period) / time.Second)
		anon := identity.AnonymousKey(ip)
		return &caller{
			kind:     "anonymous",
			limitKey: "a:" + anon,
			account:  credits.AnonymousAccount(anon),
			scopes:   anonymousScopes,
			refill:   &credits.Refill{Cap: g.Anonymous.Credits, Period: g.clock().Unix() / period},
		}, nil
	case identity.APIKey:
		ipStr, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
		ip, _ := identity.ParseClientIP(ipStr) // an unknown address passes only keys without an allowlist
		return g.identifyKey(r.Context(), cred.Value, ip)
	default: // a JWT
		return g.identifyJWT(r.Context(), cred.Value, clientAddr(r))
	}
}

// identifyKey checks an API key against the store (through the key cache) with
// identity.CheckKey, and records its use.
func (g *Gateway) identifyKey(ctx context.Context, presented string, clientIP netip.Addr) (*caller, error) {
	pk, err := identity.ParseKey(presented)
	if err != nil {
		return nil, err
	}
	k, err := g.keys.KeyByID(ctx, pk.ID)
	if errors.Is(err, identity.ErrNotFound) {
		return nil, identity.ErrUnknownKey
	}
	if err != nil {
		return nil, fmt.Errorf("looking up key: %w", errors.Join(credits.ErrStoreUnavailable, err))
	}
	now := g.clock()
	if err := identity.CheckKey(k, pk, clientIP, now); err != nil {
		return nil, err
	}
	g.store.touch(k.ID, now)
	chain := k.ChainID
	if chain == "" {
		chain = k.ID
	}
	return &caller{kind: "api_key", account: credits.UserAccount(k.UserID), userID: k.UserID, keyID: k.ID,
		keyChain: chain, keyCap: k.CreditCap, keyCapPeriod: k.CreditCapPeriod, scopes: k.Scopes, models: k.Models,
		allowedIPs: k.AllowedIPs, expiresAt: k.ExpiresAt, tier: k.Tier, limitKey: "k:" + chain}, nil
}

// clock is the gateway's time: g.now, or time.Now.
func (g *Gateway) clock() time.Time {
	if g.now != nil {
		return g.now()
	}
	if c := gatewayClock.Load(); c != nil {
		return (*c)()
	}
	return time.Now()
}

// gatewayClock, when set, is the clock of every gateway in the process (tests only, through
// SetClock in export_test.go: key expiry, token lifetimes, codes, sessions, refresh grace).
var gatewayClock atomic.Pointer[func() time.Time]

// allowedModel is the caller's model allowlist as a predicate (nil: all models).
func (c *caller) allowedModel() func(string) bool {
	if len(c.models) == 0 {
		return nil
	}
	return func(m string) bool { return slices.Contains(c.models, m) }
}

// run authenticates, admits, routes, proxies and settles one request. An error returned
// before anything was written is answered by ServeHTTP.
func (ex *exchange) run() error {
	g, r := ex.g, ex.r
	if !ex.ep.lists() {
		if err := g.checkOrigin(r); err != nil {
			return err
		}
	}
	who, err := g.identify(r)
	if err != nil {
		return err
	}
	ex.who = who
	if !identity.HasScope(who.scopes, ex.ep.scope()) {
		return &missingScope{scope: ex.ep.scope()}
	}
	if ex.ep.lists() {
		g.writeCatalog(ex.w, ex.ep.format(), who)
		ex.outcome = "ok"
		return nil
	}

	// The body, bounded, before anything is reserved.
	if r.ContentLength > g.MaxRequestBody {
		return errTooLarge
	}
	buf := bytes.NewBuffer(make([]byte, 0, max(r.ContentLength, 0)+bytes.MinRead))
	if _, err := buf.ReadFrom(io.LimitReader(r.Body, g.MaxRequestBody+1)); err != nil {
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
			return errBodyTimeout // the server's read timeout (timeouts read_body) passed
		}
		return invalid("", "reading the request body: %v", err)
	}
	body := buf.Bytes()
	if int64(len(body)) > g.MaxRequestBody {
		return errTooLarge
	}
	inf, err := parseInference(ex.ep.format(), body, r.Header.Get("X-Max-Price"),
		requestLimits{maxTokensDefault: g.MaxTokensDefault, maxTokensCap: g.MaxTokensCap, toolCallsDefault: g.ToolCallsDefault})
	if err != nil {
		return err
	}
	ex.inf = inf
	var owner credits.ResponseOwner
	if inf.follows != "" {
		// A request carrying on a stored response is read the whole conversation again as
		// input: its prompt bound holds that context, or a chained request would cost more
		// than it reserved.
		if owner, err = g.responseOwner(r.Context(), who, inf.follows, ex.ep.surface().Follows); err != nil {
			return err
		}
		inf.inputBound += owner.ContextTokens
	}

	choices, err := g.catalog.Rank(routing.Request{
		Model: inf.model, Format: inf.format,
		InputTokens: inf.inputBound, OutputTokens: inf.outputTotal(),
		MaxPrice: inf.maxPrice, Allowed: who.allowedModel(), Healthy: g.healthy, Tools: inf.tools,
	})
	if err != nil {
		return &noRoute{err: err, model: inf.model, maxPrice: inf.maxPrice}
	}
	if inf.follows != "" {
		if choices, err = followOwner(owner, choices, ex); err != nil {
			return err
		}
	}
	if len(choices) > g.Failover {
		choices = choices[:g.Failover]
	}
	// Rate limits, then credits: all or none (a refusal by the credits gives the limits back).
	if err := ex.admitLimits(); err != nil {
		return err
	}
	if ex.ep.surface().Free {
		// Free by contract (count_tokens): limited, never reserved nor charged.
		ex.choices = choices
		return ex.proxy()
	}
	if err := ex.reserve(choices); err != nil {
		ex.cancelLimits()
		return err
	}
	return ex.proxy()
}

// reserve holds the most the request can cost on any backend it may be tried on; when the
// balance cannot cover that but covers the cheapest, only the backends at that price remain.
func (ex *exchange) reserve(choices []routing.Choice) error {
	g, who := ex.g, ex.who
	amount := choices[0].Cost
	for _, c := range choices {
		amount = max(amount, c.Cost)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ex.r.Context()), storeTimeout)
	defer cancel()
	if who.keyID != "" {
		// The key's credit cap is held in the same step as the balance (keyLedger).
		ctx = withKey(ctx, keyUse{id: who.keyID, chain: who.keyChain, cap: who.keyCap, period: who.keyCapPeriod,
			shared: g.caps})
	}
	ttl := time.Duration(g.ReservationTTL)
	cheapest := choices[0].Cost
	res, balance, err := g.store.ledger.Reserve(ctx, who.account, amount, ttl, who.refill)
	var capped *keyCapReached
	if amount > cheapest && (errors.Is(err, credits.ErrInsufficientCredits) && balance >= cheapest ||
		errors.As(err, &capped) && capped.room() >= cheapest) {
		amount = cheapest
		choices = slices.DeleteFunc(choices, func(c routing.Choice) bool { return c.Cost > amount })
		res, balance, err = g.store.ledger.Reserve(ctx, who.account, amount, ttl, who.refill)
	}
	if errors.As(err, &capped) {
		capped.required = cheapest
		return capped
	}
	if errors.Is(err, credits.ErrInsufficientCredits) {
		return &outOfCredits{balance: balance, required: cheapest, location: g.topUpLocation(ex.r, who)}
	}
	if errors.Is(err, errLimitsUnavailable) {
		return err // the key's shared cap could not be checked
	}
	if err != nil {
		return fmt.Errorf("reserving credits: %w", errors.Join(credits.ErrStoreUnavailable, err))
	}
	creditsReserved.Add(amount.Credits())
	ex.res = res
	ex.choices = choices
	return nil
}

// storeTimeout bounds one store operation on the request path.
const storeTimeout = 5 * time.Second

// healthy reports whether backend i may be tried now.
func (g *Gateway) healthy(i int) bool {
	for _, u := range g.Backends[i].proxy.Upstreams {
		if u.Available() {
			return true
		}
	}
	return false
}

// topUpLocation is where a caller without credits is sent: for anonymous callers the sign-in
// URL with redirect= the absolute return address (from Origin and the Redirect header, for
// allowed origins only); for users the billing URL.
func (g *Gateway) topUpLocation(r *http.Request, who *caller) string {
	if who.kind != "anonymous" {
		return g.BillingURL
	}
	signin := g.Anonymous.SigninURL
	back := g.returnAddress(r)
	if back == "" {
		return signin
	}
	sep := "?"
	if strings.Contains(signin, "?") {
		sep = "&"
	}
	return signin + sep + "redirect=" + url.QueryEscape(back)
}

// returnAddress builds the absolute URL the browser should come back to after signing in:
// the request's Origin joined with the Redirect header (a path, or an absolute URL on that same
// origin). Empty when the origin is not allowed or the header is unusable.
func (g *Gateway) returnAddress(r *http.Request) string {
	origin := r.Header.Get("Origin")
	if origin == "" || !g.originAllowed(origin) {
		return ""
	}
	redirect := r.Header.Get("Redirect")
	if redirect == "" {
		return origin + "/"
	}
	if len(redirect) > 2048 || strings.ContainsAny(redirect, "\\\r\n\t") {
		return ""
	}
	if strings.HasPrefix(redirect, "/") && !strings.HasPrefix(redirect, "//") {
		return origin + redirect
	}
	u, err := url.Parse(redirect)
	if err != nil || u.User != nil || u.Scheme+"://"+u.Host != origin {
		return ""
	}
	return u.String()
}

// originAllowed reports whether a browser origin may call the gateway and be returned to.
func (g *Gateway) originAllowed(origin string) bool {
	if g.anyOrig {
		u, err := url.Parse(origin)
		return err == nil && (u.Scheme == "https" || u.Scheme == "http") && u.Host != "" && u.Path == "" && u.User == nil
	}
	return g.origins[origin]
}

// exposedHeaders are the response headers a browser app may read.
const exposedHeaders = "Location, X-Credits-Charged, X-Credits-Remaining, X-Gateway-Model, X-Gateway-Backend, " +
	"X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, X-RateLimit-Policy, X-RateLimit-Retry-After, " +
	"RateLimit-Policy, RateLimit, Retry-After, Retry-After-Ms"

// cors answers CORS for allowed origins; it reports true when it answered a preflight.
func (g *Gateway) cors(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	h := w.Header()
	h.Add("Vary", "Origin")
	allowed := origin != "" && g.originAllowed(origin)
	if allowed {
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Expose-Headers", exposedHeaders)
	}
	if r.Method != http.MethodOptions || r.Header.Get("Access-Control-Request-Method") == "" {
		return false
	}
	if allowed {
		h.Set("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
		if req := r.Header.Get("Access-Control-Request-Headers"); req != "" && isTokenList(req) {
			h.Set("Access-Control-Allow-Headers", req)
		}
		h.Set("Access-Control-Max-Age", "600")
	}
	w.WriteHeader(http.StatusNoContent)
	return true
}

// isTokenList reports whether s is a comma-separated list of header names.
func isTokenList(s string) bool {
	if len(s) > 1024 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c == ',' || c == ' ' || c == '-' || c == '_' || c == '.' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
			return false
		}
	}
	return true
}

// writeCatalog answers a catalog list, GET /v1/models (OpenAI list) or GET /api/tags (Ollama
// list, chat models), with what the caller may use and the prices, "cheapest" included.
func (g *Gateway) writeCatalog(w http.ResponseWriter, format routing.Format, who *caller) {
	sf := format.Surface()
	type pricing struct {
		Input       credits.Amount `json:"input"`
		Output      credits.Amount `json:"output"`
		CachedInput credits.Amount `json:"cached_input"`
		CacheWrite  credits.Amount `json:"cache_write"`
		Unit        string         `json:"unit"`
	}
	const unit = "credits per 1M tokens"
	list := g.catalog.List(format, who.allowedModel())
	var out any
	if sf.List == routing.ListOpenAIModels {
		type model struct {
			ID       string   `json:"id"`
			Object   string   `json:"object"`
			Created  int64    `json:"created"`
			OwnedBy  string   `json:"owned_by"`
			Kind     string   `json:"kind"`
			Pricing  *pricing `json:"pricing,omitempty"`
			Backends []string `json:"backends,omitempty"`
			// Surfaces are the paths of the API routes that serve the model (README, "The
			// surfaces"); "cheapest" has none of its own, it is what the request's route serves.
			Surfaces []string `json:"surfaces,omitempty"`
		}
		data := []model{{ID: routing.Cheapest, Object: "model", OwnedBy: "llm_gateway", Kind: string(routing.KindChat)}}
		for _, l := range list {
			data = append(data, model{ID: l.Name, Object: "model", OwnedBy: "llm_gateway", Kind: string(l.Kind),
				Pricing: &pricing{l.Price.Input, l.Price.Output, l.Price.CachedInput, l.Price.CacheWrite, unit}, Backends: l.Backends,
				Surfaces: l.Surfaces})
		}
		out = map[string]any{"object": "list", "data": data}
	} else {
		type tag struct {
			Name       string         `json:"name"`
			Model      string         `json:"model"`
			ModifiedAt string         `json:"modified_at"`
			Size       int64          `json:"size"`
			Digest     string         `json:"digest"`
			Details    map[string]any `json:"details"`
			Pricing    *pricing       `json:"pricing,omitempty"`
		}
		models := []tag{{Name: routing.Cheapest, Model: routing.Cheapest, ModifiedAt: "1970-01-01T00:00:00Z", Details: map[string]any{}}}
		for _, l := range list {
			if l.Kind != sf.Kind {
				continue
			}
			models = append(models, tag{Name: l.Name, Model: l.Name, ModifiedAt: "1970-01-01T00:00:00Z",
				Details: map[string]any{}, Pricing: &pricing{l.Price.Input, l.Price.Output, l.Price.CachedInput, l.Price.CacheWrite, unit}})
		}
		out = map[string]any{"models": models}
	}
	body, _ := json.Marshal(out)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
