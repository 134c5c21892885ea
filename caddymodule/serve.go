package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// ServeHTTP runs the gateway's pipeline for its own routes and passes every other request on.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	ep := endpoints[r.URL.Path]
	if ep == epNone {
		return next.ServeHTTP(w, r)
	}
	if g.cors(w, r) {
		return nil // a preflight, answered
	}
	if r.Method != ep.method() {
		w.Header().Set("Allow", ep.method()+", OPTIONS")
		writeError(w, &statusError{http.StatusMethodNotAllowed, "use " + ep.method() + " on " + r.URL.Path})
		return nil
	}
	ex := &exchange{g: g, ep: ep, w: w, r: r, start: time.Now()}
	// Whatever happens (a panic included), nothing stays reserved past the request.
	defer ex.release()
	err := ex.run()
	if err != nil {
		e := writeError(w, err)
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
	kind    string // "anonymous" or "api_key"
	account credits.AccountID
	userID  string
	keyID   string
	scopes  []string
	models  []string // when not empty, the only models allowed
	refill  *credits.Refill
}

var anonymousScopes = []string{identity.ScopeChatWrite, identity.ScopeEmbeddingsWrite, identity.ScopeModelsRead}

// identify turns the request's credentials into a caller.
func (g *Gateway) identify(r *http.Request) (*caller, error) {
	cred, err := identity.CredentialFrom(r.Header)
	if err != nil {
		return nil, err
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
		return &caller{
			kind:    "anonymous",
			account: credits.AnonymousAccount(identity.AnonymousKey(ip)),
			scopes:  anonymousScopes,
			refill:  &credits.Refill{Cap: g.Anonymous.Credits, Period: time.Now().Unix() / period},
		}, nil
	case identity.APIKey:
		return g.identifyKey(r.Context(), cred.Value)
	default:
		return nil, errTokenUnsupported
	}
}

// identifyKey checks an API key against the store.
func (g *Gateway) identifyKey(ctx context.Context, presented string) (*caller, error) {
	pk, err := identity.ParseKey(presented)
	if err != nil {
		return nil, err
	}
	k, err := g.keys.KeyByID(ctx, pk.ID)
	if errors.Is(err, identity.ErrNotFound) {
		return nil, errUnknownKey
	}
	if err != nil {
		return nil, fmt.Errorf("looking up key: %w", errors.Join(credits.ErrStoreUnavailable, err))
	}
	if !identity.HashMatches(k.Hash, pk.Hash) {
		return nil, errUnknownKey
	}
	if k.RevokedAt != nil {
		return nil, errRevokedKey
	}
	if k.ExpiresAt != nil && !time.Now().Before(*k.ExpiresAt) {
		return nil, &expiredKey{at: k.ExpiresAt.UTC().Format(time.RFC3339)}
	}
	return &caller{kind: "api_key", account: credits.UserAccount(k.UserID), userID: k.UserID, keyID: k.ID,
		scopes: k.Scopes, models: k.Models}, nil
}

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
	who, err := g.identify(r)
	if err != nil {
		return err
	}
	ex.who = who
	if !identity.HasScope(who.scopes, ex.ep.scope()) {
		return &missingScope{scope: ex.ep.scope()}
	}
	if ex.ep == epModels || ex.ep == epTags {
		g.writeCatalog(ex.w, ex.ep, who)
		ex.outcome = "ok"
		return nil
	}

	// The body, bounded, before anything is reserved.
	if r.ContentLength > g.MaxRequestBody {
		return errTooLarge
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, g.MaxRequestBody+1))
	if err != nil {
		return invalid("", "reading the request body: %v", err)
	}
	if int64(len(body)) > g.MaxRequestBody {
		return errTooLarge
	}
	inf, err := parseInference(ex.ep.format(), body, r.Header.Get("X-Max-Price"),
		requestLimits{maxTokensDefault: g.MaxTokensDefault, maxTokensCap: g.MaxTokensCap})
	if err != nil {
		return err
	}
	ex.inf = inf

	choices, err := g.catalog.Rank(routing.Request{
		Model: inf.model, Format: inf.format,
		InputTokens: inf.inputEstimate, OutputTokens: inf.outputBound,
		MaxPrice: inf.maxPrice, Allowed: who.allowedModel(), Healthy: g.healthy,
	})
	if err != nil {
		return &noRoute{err: err, model: inf.model, maxPrice: inf.maxPrice}
	}
	if len(choices) > g.Failover {
		choices = choices[:g.Failover]
	}
	if err := ex.reserve(choices); err != nil {
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
	ttl := time.Duration(g.ReservationTTL)
	res, balance, err := g.store.ledger.Reserve(ctx, who.account, amount, ttl, who.refill)
	if errors.Is(err, credits.ErrInsufficientCredits) && amount > choices[0].Cost && balance >= choices[0].Cost {
		amount = choices[0].Cost
		choices = slices.DeleteFunc(choices, func(c routing.Choice) bool { return c.Cost > amount })
		res, balance, err = g.store.ledger.Reserve(ctx, who.account, amount, ttl, who.refill)
	}
	if errors.Is(err, credits.ErrInsufficientCredits) {
		return &outOfCredits{balance: balance, required: choices[0].Cost, location: g.topUpLocation(ex.r, who)}
	}
	if err != nil {
		return fmt.Errorf("reserving credits: %w", errors.Join(credits.ErrStoreUnavailable, err))
	}
	g.metrics.credits.WithLabelValues("reserved").Add(amount.Credits())
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
	"X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"

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
		h.Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
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

// writeCatalog answers GET /v1/models (OpenAI list) and GET /api/tags (Ollama list) with what
// the caller may use and the prices, "cheapest" included.
func (g *Gateway) writeCatalog(w http.ResponseWriter, ep endpoint, who *caller) {
	format := routing.FormatOpenAIChat
	if ep == epTags {
		format = routing.FormatOllamaChat
	}
	type pricing struct {
		Input  credits.Amount `json:"input"`
		Output credits.Amount `json:"output"`
		Unit   string         `json:"unit"`
	}
	const unit = "credits per 1M tokens"
	list := g.catalog.List(format, who.allowedModel())
	var out any
	if ep == epModels {
		type model struct {
			ID       string   `json:"id"`
			Object   string   `json:"object"`
			Created  int64    `json:"created"`
			OwnedBy  string   `json:"owned_by"`
			Kind     string   `json:"kind"`
			Pricing  *pricing `json:"pricing,omitempty"`
			Backends []string `json:"backends,omitempty"`
		}
		data := []model{{ID: routing.Cheapest, Object: "model", OwnedBy: "llm_gateway", Kind: string(routing.KindChat)}}
		for _, l := range list {
			data = append(data, model{ID: l.Name, Object: "model", OwnedBy: "llm_gateway", Kind: string(l.Kind),
				Pricing: &pricing{l.Price.Input, l.Price.Output, unit}, Backends: l.Backends})
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
			if l.Kind != routing.KindChat {
				continue
			}
			models = append(models, tag{Name: l.Name, Model: l.Name, ModifiedAt: "1970-01-01T00:00:00Z",
				Details: map[string]any{}, Pricing: &pricing{l.Price.Input, l.Price.Output, unit}})
		}
		out = map[string]any{"models": models}
	}
	body, _ := json.Marshal(out)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
