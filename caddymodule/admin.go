package caddymodule

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/mail"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/invalidation"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI serves the operator routes under /llm_gateway/ on Caddy's admin endpoint: users,
// credits (idempotent with an Idempotency-Key header), API keys, backends, and (with signin)
// OAuth apps and the rotation of the JWT signing key. It acts on the
// store of the running gateway configuration.
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.llm_gateway",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes.
func (AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/llm_gateway/", Handler: caddy.AdminHandlerFunc(serveAdmin)}}
}

// Admin errors beside those of the stores.
var (
	errNoGateway   = errors.New("no llm_gateway is configured")
	errRouteAbsent = errors.New("no such route")
)

// serveAdmin routes an admin request.
func serveAdmin(w http.ResponseWriter, r *http.Request) error {
	g := activeGateways.current()
	if g == nil {
		writeError(w, r, &statusError{http.StatusServiceUnavailable, errNoGateway.Error()})
		return nil
	}
	parts := strings.Split(strings.Trim(strings.TrimPrefix(r.URL.Path, "/llm_gateway/"), "/"), "/")
	r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
	var (
		status = http.StatusOK
		out    any
		err    error
	)
	switch {
	case len(parts) == 1 && parts[0] == "users" && r.Method == http.MethodPost:
		status = http.StatusCreated
		out, err = g.adminCreateUser(r)
	case len(parts) == 2 && parts[0] == "users" && r.Method == http.MethodGet:
		out, err = g.adminUser(r.Context(), parts[1])
	case len(parts) == 3 && parts[0] == "users" && parts[2] == "credits" && r.Method == http.MethodPost:
		out, err = g.adminCredit(r, parts[1])
	case len(parts) == 3 && parts[0] == "users" && parts[2] == "ledger" && r.Method == http.MethodGet:
		out, err = g.adminLedger(r.Context(), parts[1])
	case len(parts) == 3 && parts[0] == "users" && parts[2] == "keys" && r.Method == http.MethodPost:
		status = http.StatusCreated
		out, err = g.adminCreateKey(r, parts[1])
	case len(parts) == 3 && parts[0] == "users" && parts[2] == "keys" && r.Method == http.MethodGet:
		out, err = g.adminListKeys(r.Context(), parts[1])
	case len(parts) == 2 && parts[0] == "keys" && r.Method == http.MethodDelete:
		out, err = g.adminRevokeKey(r.Context(), parts[1])
	case len(parts) == 2 && parts[0] == "keys" && r.Method == http.MethodGet:
		out, err = g.adminKey(r.Context(), parts[1])
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "rotate" && r.Method == http.MethodPost:
		out, err = g.adminRotateKey(r, parts[1])
	case len(parts) == 1 && parts[0] == "backends" && r.Method == http.MethodGet:
		out = g.adminBackends()
	case len(parts) == 1 && parts[0] == "apps" && r.Method == http.MethodPost:
		status = http.StatusCreated
		out, err = g.adminCreateApp(r)
	case len(parts) == 1 && parts[0] == "apps" && r.Method == http.MethodGet:
		out, err = g.adminApps(r.Context())
	case len(parts) == 2 && parts[0] == "signing_keys" && parts[1] == "rotate" && r.Method == http.MethodPost:
		out, err = g.adminRotateSigningKey(r.Context())
	default:
		err = errRouteAbsent
	}
	if err != nil {
		writeError(w, r, err)
		return nil
	}
	body, _ := json.MarshalIndent(out, "", "  ")
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
	return nil
}

// decodeJSON reads a JSON request body strictly: unknown fields are errors.
func decodeJSON(r *http.Request, dst any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return invalid("", "the request body must be a JSON object of the documented fields: %v", err)
	}
	return nil
}

// decodeOptionalJSON is decodeJSON for a body that may be empty.
func decodeOptionalJSON(r *http.Request, dst any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil && !errors.Is(err, io.EOF) {
		return invalid("", "the request body must be a JSON object of the documented fields: %v", err)
	}
	return nil
}

// userView is a user as the admin API shows it.
type userView struct {
	ID        string         `json:"id"`
	Email     string         `json:"email"`
	Tier      string         `json:"tier"`
	Balance   credits.Amount `json:"balance"`
	CreatedAt time.Time      `json:"created_at"`
}

func (g *Gateway) adminCreateUser(r *http.Request) (any, error) {
	var in struct {
		Email    string          `json:"email"`
		Password string          `json:"password"`
		Credits  *credits.Amount `json:"credits"`
		Tier     string          `json:"tier"`
	}
	if err := decodeJSON(r, &in); err != nil {
		return nil, err
	}
	addr, err := mail.ParseAddress(in.Email)
	if err != nil || addr.Address != in.Email || len(in.Email) > 254 {
		return nil, invalid("email", "email must be a plain e-mail address")
	}
	if in.Credits != nil && (*in.Credits < 0 || *in.Credits > credits.MaxAmount) {
		return nil, invalid("credits", "credits must be between 0 and %s", credits.MaxAmount)
	}
	if len(in.Tier) > 64 {
		return nil, invalid("tier", "tier name too long")
	}
	u := identity.User{ID: newID("usr"), Email: in.Email, Tier: in.Tier, CreatedAt: time.Now().UTC()}
	if in.Password != "" {
		if u.PasswordHash, err = identity.HashPassword(in.Password); err != nil {
			return nil, invalid("password", "%v", err)
		}
	}
	if err := g.store.users.CreateUser(r.Context(), u); err != nil {
		return nil, err
	}
	var balance credits.Amount
	if in.Credits != nil && *in.Credits > 0 {
		_, _, err := g.store.ledger.Credit(r.Context(), credits.UserAccount(u.ID), *in.Credits, "initial credits", "")
		if err != nil {
			return nil, err
		}
		balance = *in.Credits
	}
	return userView{ID: u.ID, Email: u.Email, Tier: u.Tier, Balance: balance, CreatedAt: u.CreatedAt}, nil
}

func (g *Gateway) adminUser(ctx context.Context, id string) (any, error) {
	u, err := g.store.users.UserByID(ctx, id)
	if err != nil {
		return nil, err
	}
	balance, err := g.store.ledger.Balance(ctx, credits.UserAccount(id))
	if err != nil && !errors.Is(err, credits.ErrUnknownAccount) {
		return nil, err
	}
	return userView{ID: u.ID, Email: u.Email, Tier: u.Tier, Balance: balance, CreatedAt: u.CreatedAt}, nil
}

func (g *Gateway) adminCredit(r *http.Request, userID string) (any, error) {
	var in struct {
		Amount *credits.Amount `json:"amount"`
		Reason string          `json:"reason"`
	}
	if err := decodeJSON(r, &in); err != nil {
		return nil, err
	}
	if in.Amount == nil || *in.Amount == 0 || *in.Amount > credits.MaxAmount || *in.Amount < -credits.MaxAmount {
		return nil, invalid("amount", "amount must be a non-zero number of credits")
	}
	key := r.Header.Get("Idempotency-Key")
	if len(key) > 255 || len(in.Reason) > 500 {
		return nil, invalid("Idempotency-Key", "Idempotency-Key (255) or reason (500) too long")
	}
	if _, err := g.store.users.UserByID(r.Context(), userID); err != nil {
		return nil, err
	}
	entry, replayed, err := g.store.ledger.Credit(r.Context(), credits.UserAccount(userID), *in.Amount, in.Reason, key)
	if err != nil {
		return nil, err
	}
	balance, err := g.store.ledger.Balance(r.Context(), credits.UserAccount(userID))
	if err != nil {
		return nil, err
	}
	return map[string]any{"entry": entry, "replayed": replayed, "balance": balance}, nil
}

func (g *Gateway) adminLedger(ctx context.Context, userID string) (any, error) {
	if _, err := g.store.users.UserByID(ctx, userID); err != nil {
		return nil, err
	}
	entries, err := g.store.ledger.Entries(ctx, credits.UserAccount(userID), 100)
	if err != nil {
		return nil, err
	}
	audit, err := g.store.ledger.Audit(ctx, credits.UserAccount(userID))
	if err != nil && !errors.Is(err, credits.ErrUnknownAccount) {
		return nil, err
	}
	if entries == nil {
		entries = []credits.Entry{}
	}
	return map[string]any{"entries": entries, "audit": audit}, nil
}

// keyRequest is the body of a key creation (API.md §8). The expiry is given as
// expires_in_days or as expires_at (RFC 3339), not both. credit_cap (credits) bounds what the
// key may spend of its owner's credits: over its whole life, or per credit_cap_period when set
// ("day" and "month" are UTC calendar periods, a Go duration such as "12h" periods aligned on
// the Unix epoch).
type keyRequest struct {
	Name            string            `json:"name"`
	Scopes          []string          `json:"scopes"`
	ExpiresInDays   *int              `json:"expires_in_days"`
	ExpiresAt       *time.Time        `json:"expires_at"`
	AllowedIPs      []string          `json:"allowed_ips"`
	Metadata        map[string]string `json:"metadata"`
	Tier            string            `json:"rate_limit_tier"`
	Models          []string          `json:"models"`
	CreditCap       *credits.Amount   `json:"credit_cap"`
	CreditCapPeriod string            `json:"credit_cap_period"`
}

// defaultKeyScopes are granted to a key created without scopes.
var defaultKeyScopes = []string{identity.ScopeChatWrite, identity.ScopeEmbeddingsWrite, identity.ScopeModelsRead,
	identity.ScopeCreditsRead, identity.ScopeUsageRead}

// keyView is a key as shown to its owner; Key is set only in the answer that creates it.
type keyView struct {
	ID         string            `json:"id"`
	Key        string            `json:"key,omitempty"`
	Prefix     string            `json:"prefix"`
	Name       string            `json:"name"`
	Scopes     []string          `json:"scopes"`
	Tier       string            `json:"rate_limit_tier"`
	AllowedIPs []string          `json:"allowed_ips"`
	Metadata   map[string]string `json:"metadata"`
	Models     []string          `json:"models,omitempty"`
	CreditCap  *credits.Amount   `json:"credit_cap,omitempty"`
	CapPeriod  string            `json:"credit_cap_period,omitempty"`
	ExpiresAt  *time.Time        `json:"expires_at"`
	RevokedAt  *time.Time        `json:"revoked_at,omitempty"`
	CreatedAt  time.Time         `json:"created_at"`
	LastUsedAt *time.Time        `json:"last_used_at"`
	// RotatedTo and DeprecatedAt: the key was replaced, and works until ExpiresAt.
	RotatedTo    string     `json:"rotated_to,omitempty"`
	DeprecatedAt *time.Time `json:"deprecated_at,omitempty"`
}

func viewKey(k identity.Key) keyView {
	v := keyView{ID: k.ID, Prefix: k.Prefix, Name: k.Name, Scopes: k.Scopes, Tier: k.Tier, AllowedIPs: k.AllowedIPs,
		Metadata: k.Metadata, Models: k.Models, CapPeriod: k.CreditCapPeriod, ExpiresAt: k.ExpiresAt,
		RevokedAt: k.RevokedAt, CreatedAt: k.CreatedAt, LastUsedAt: k.LastUsedAt, RotatedTo: k.RotatedTo,
		DeprecatedAt: k.DeprecatedAt}
	if k.CreditCap > 0 {
		v.CreditCap = &k.CreditCap
	}
	if v.AllowedIPs == nil {
		v.AllowedIPs = []string{}
	}
	if v.Metadata == nil {
		v.Metadata = map[string]string{}
	}
	return v
}

const keyWarning = "Store this key now: it is shown only once and cannot be recovered."

func (g *Gateway) adminCreateKey(r *http.Request, userID string) (any, error) {
	var in keyRequest
	if err := decodeJSON(r, &in); err != nil {
		return nil, err
	}
	if _, err := g.store.users.UserByID(r.Context(), userID); err != nil {
		return nil, err
	}
	return g.createKey(r.Context(), userID, in, 0)
}

// createKey checks a key request, stores the key's hash, and returns the key once. maxLive,
// when above zero, bounds the user's live keys (Gateway.MaxKeysPerUser): 400 at the bound.
func (g *Gateway) createKey(ctx context.Context, userID string, in keyRequest, maxLive int) (any, error) {
	if len(in.Name) > 200 {
		return nil, invalid("name", "name too long (200)")
	}
	if in.Scopes == nil {
		in.Scopes = defaultKeyScopes
	}
	if err := identity.ValidateScopes(in.Scopes); err != nil {
		return nil, invalid("scopes", "%v", err)
	}
	ips, err := identity.NormalizeAllowlist(in.AllowedIPs)
	if err != nil {
		return nil, invalid("allowed_ips", "allowed_ips: %v", err)
	}
	in.AllowedIPs = ips
	if len(in.Metadata) > 32 {
		return nil, invalid("metadata", "metadata holds at most 32 entries")
	}
	size := 0
	for k, v := range in.Metadata {
		size += len(k) + len(v)
	}
	if size > 4096 {
		return nil, invalid("metadata", "metadata holds at most 4 KiB")
	}
	for _, m := range in.Models {
		if !g.catalog.Known(m) {
			return nil, invalid("models", "unknown model %q", m)
		}
	}
	if len(in.Tier) > 64 {
		return nil, invalid("rate_limit_tier", "rate_limit_tier name too long")
	}
	if in.CreditCap != nil && (*in.CreditCap <= 0 || *in.CreditCap > credits.MaxAmount) {
		return nil, invalid("credit_cap", "credit_cap must be a positive number of credits")
	}
	if !identity.ValidCapPeriod(in.CreditCapPeriod) || in.CreditCapPeriod != "" && in.CreditCap == nil {
		return nil, invalid("credit_cap_period", `credit_cap_period must be "day", "month" or a duration of at least 1m, with a credit_cap`)
	}
	now := g.clock().UTC()
	k := identity.Key{UserID: userID, Name: in.Name, Scopes: in.Scopes, AllowedIPs: in.AllowedIPs,
		Metadata: in.Metadata, Tier: in.Tier, Models: in.Models, CreditCapPeriod: in.CreditCapPeriod, CreatedAt: now}
	if in.CreditCap != nil {
		k.CreditCap = *in.CreditCap
	}
	switch {
	case in.ExpiresInDays != nil && in.ExpiresAt != nil:
		return nil, invalid("expires_at", "give expires_in_days or expires_at, not both")
	case in.ExpiresInDays != nil:
		if *in.ExpiresInDays < 1 || *in.ExpiresInDays > 3650 {
			return nil, invalid("expires_in_days", "expires_in_days must be from 1 to 3650")
		}
		t := now.Add(time.Duration(*in.ExpiresInDays) * 24 * time.Hour)
		k.ExpiresAt = &t
	case in.ExpiresAt != nil:
		t := in.ExpiresAt.UTC()
		if !t.After(now) || t.After(now.Add(3650*24*time.Hour)) {
			return nil, invalid("expires_at", "expires_at must be in the future, within 10 years")
		}
		k.ExpiresAt = &t
	}
	nk, err := identity.NewKey(g.KeyPrefix)
	if err != nil {
		return nil, err
	}
	k.ID, k.Prefix, k.Hash = nk.ID, nk.Prefix, nk.Hash
	if err := g.keys.CreateKeyWithin(ctx, k, maxLive); errors.Is(err, identity.ErrKeyLimit) {
		return nil, invalid("", "a user may have at most %d live api keys (a key and its rotations count once): revoke one first", maxLive)
	} else if err != nil {
		return nil, err
	}
	v := viewKey(k)
	v.Key = nk.Full
	return map[string]any{"api_key": v, "warning": keyWarning}, nil
}

func (g *Gateway) adminListKeys(ctx context.Context, userID string) (any, error) {
	if _, err := g.store.users.UserByID(ctx, userID); err != nil {
		return nil, err
	}
	keys, err := g.store.keys.KeysByUser(ctx, userID)
	if err != nil {
		return nil, err
	}
	out := make([]keyView, 0, len(keys))
	for _, k := range keys {
		out = append(out, viewKey(k))
	}
	return map[string]any{"keys": out}, nil
}

func (g *Gateway) adminKey(ctx context.Context, id string) (any, error) {
	k, err := g.store.keys.KeyByID(ctx, id)
	if err != nil {
		return nil, err
	}
	return map[string]any{"api_key": viewKey(k)}, nil
}

func (g *Gateway) adminRotateKey(r *http.Request, id string) (any, error) {
	var in rotateRequest
	if err := decodeOptionalJSON(r, &in); err != nil {
		return nil, err
	}
	old, err := g.store.keys.KeyByID(r.Context(), id)
	if err != nil {
		return nil, err
	}
	return g.rotateKey(r.Context(), old, in, nil)
}

// rotateRequest is the body of a key rotation; grace_period_hours defaults to 24.
type rotateRequest struct {
	GracePeriodHours *float64 `json:"grace_period_hours"`
}

// maxGraceHours bounds a rotation's grace period (30 days).
const maxGraceHours = 30 * 24

// rotateKey replaces old by a new key with the same attributes (and, when old expires, the
// same lifetime from now), in one store transaction: old keeps working until the grace period
// ends, then answers expired_api_key; the key old had replaced, if still in its grace period,
// stops now, so a chain never has more than two live keys. A second rotation of old gets 409
// conflict. The new key expires no later than notAfter, when set (the expiry of the key that
// asks for the rotation). The new key is returned once.
func (g *Gateway) rotateKey(ctx context.Context, old identity.Key, in rotateRequest, notAfter *time.Time) (any, error) {
	hours := 24.0
	if in.GracePeriodHours != nil {
		hours = *in.GracePeriodHours
	}
	if !(hours >= 0 && hours <= maxGraceHours) {
		return nil, invalid("grace_period_hours", "grace_period_hours must be from 0 to %d", maxGraceHours)
	}
	now := g.clock().UTC()
	graceEnd := now.Add(time.Duration(hours * float64(time.Hour)))
	next := identity.Key{UserID: old.UserID, Name: old.Name, Scopes: old.Scopes, AllowedIPs: old.AllowedIPs,
		Metadata: old.Metadata, Tier: old.Tier, CreditCap: old.CreditCap, CreditCapPeriod: old.CreditCapPeriod,
		Models: old.Models, CreatedAt: now}
	if old.ExpiresAt != nil {
		t := now.Add(old.ExpiresAt.Sub(old.CreatedAt))
		next.ExpiresAt = &t
	}
	if notAfter != nil && (next.ExpiresAt == nil || next.ExpiresAt.After(*notAfter)) {
		t := notAfter.UTC()
		next.ExpiresAt = &t
	}
	nk, err := identity.NewKey(g.KeyPrefix)
	if err != nil {
		return nil, err
	}
	next.ID, next.Prefix, next.Hash = nk.ID, nk.Prefix, nk.Hash
	if _, err := g.keys.RotateKey(ctx, old.ID, next, now, graceEnd); err != nil {
		return nil, err
	}
	oldExpires := graceEnd
	if old.ExpiresAt != nil && old.ExpiresAt.Before(graceEnd) {
		oldExpires = *old.ExpiresAt
	}
	v := viewKey(next)
	v.Key = nk.Full
	return map[string]any{
		"new_key": v,
		"old_key": map[string]any{"id": old.ID, "deprecated_at": now, "expires_at": oldExpires},
		"warning": keyWarning,
	}, nil
}

func (g *Gateway) adminRevokeKey(ctx context.Context, id string) (any, error) {
	if err := g.keys.RevokeKey(ctx, id, g.clock().UTC()); err != nil {
		return nil, err
	}
	k, err := g.store.keys.KeyByID(ctx, id)
	if err != nil {
		return nil, err
	}
	return map[string]any{"id": k.ID, "revoked_at": k.RevokedAt}, nil
}

func (g *Gateway) adminBackends() any {
	type modelView struct {
		Name        string         `json:"name"`
		Upstream    string         `json:"upstream"`
		Kind        string         `json:"kind"`
		InputPrice  credits.Amount `json:"input_price"`
		OutputPrice credits.Amount `json:"output_price"`
	}
	type backendView struct {
		Name     string      `json:"name"`
		URL      string      `json:"url"`
		Style    string      `json:"style"`
		Healthy  bool        `json:"healthy"`
		InFlight int         `json:"in_flight"`
		Models   []modelView `json:"models"`
	}
	out := []backendView{}
	for i, b := range g.Backends {
		v := backendView{Name: b.Name, URL: b.URL, Style: string(b.Style), Healthy: g.healthy(i)}
		for _, u := range b.proxy.Upstreams {
			if u.Host != nil {
				v.InFlight += u.Host.NumRequests()
			}
		}
		for _, m := range b.Models {
			up := m.Upstream
			if up == "" {
				up = m.Name
			}
			kind := string(m.Kind)
			if kind == "" {
				kind = "chat"
			}
			v.Models = append(v.Models, modelView{m.Name, up, kind, m.InputPrice, m.OutputPrice})
		}
		out = append(out, v)
	}
	return map[string]any{"backends": out}
}

// appView is a registered app as the admin API shows it; ClientSecret is set only in the
// answer that creates a confidential app.
type appView struct {
	ClientID     string    `json:"client_id"`
	ClientSecret string    `json:"client_secret,omitempty"`
	Name         string    `json:"name"`
	RedirectURIs []string  `json:"redirect_uris"`
	FirstParty   bool      `json:"first_party"`
	Scopes       []string  `json:"scopes"`
	Confidential bool      `json:"confidential"`
	CreatedAt    time.Time `json:"created_at"`
}

func viewApp(a signin.App) appView {
	return appView{ClientID: a.ClientID, Name: a.Name, RedirectURIs: a.RedirectURIs, FirstParty: a.FirstParty,
		Scopes: a.Scopes, Confidential: a.SecretHash != nil, CreatedAt: a.CreatedAt}
}

// errNoSignin: the app routes need the signin block.
var errNoSignin = &statusError{http.StatusConflict, "sign-in is not configured: add a signin block to llm_gateway"}

// adminCreateApp registers an OAuth client: POST /llm_gateway/apps
// {name, redirect_uris, first_party, scopes, confidential} -> {client_id, client_secret?}.
// A public client (the default: browser and native apps) has no secret and relies on PKCE.
func (g *Gateway) adminCreateApp(r *http.Request) (any, error) {
	if g.Signin == nil {
		return nil, errNoSignin
	}
	var in struct {
		Name         string   `json:"name"`
		RedirectURIs []string `json:"redirect_uris"`
		FirstParty   bool     `json:"first_party"`
		Scopes       []string `json:"scopes"`
		Confidential bool     `json:"confidential"`
	}
	if err := decodeJSON(r, &in); err != nil {
		return nil, err
	}
	if in.Name == "" || len(in.Name) > 200 {
		return nil, invalid("name", "name is required (at most 200 characters)")
	}
	if len(in.RedirectURIs) > 20 || len(in.RedirectURIs) == 0 && !in.FirstParty {
		return nil, invalid("redirect_uris", "give 1 to 20 redirect_uris (a first-party app using only the password grant may give none)")
	}
	for i, u := range in.RedirectURIs {
		if err := signin.ValidRedirectURI(u); err != nil {
			return nil, invalid("redirect_uris", "redirect_uris[%d]: %v", i, err)
		}
	}
	if in.Scopes == nil {
		in.Scopes = defaultKeyScopes
	}
	if err := identity.ValidateScopes(in.Scopes); err != nil || len(in.Scopes) == 0 {
		return nil, invalid("scopes", "scopes must be known scopes (API.md §7)")
	}
	a := signin.App{ClientID: newID("app"), Name: in.Name, RedirectURIs: in.RedirectURIs, FirstParty: in.FirstParty,
		Scopes: in.Scopes, CreatedAt: g.clock().UTC()}
	if a.RedirectURIs == nil {
		a.RedirectURIs = []string{}
	}
	var secret string
	if in.Confidential {
		secret = signin.NewToken("cs")
		sum := signin.HashToken(secret)
		a.SecretHash = sum[:]
	}
	if err := g.store.signin.CreateApp(r.Context(), a); err != nil {
		return nil, err
	}
	v := viewApp(a)
	v.ClientSecret = secret
	return v, nil
}

func (g *Gateway) adminApps(ctx context.Context) (any, error) {
	if g.Signin == nil {
		return nil, errNoSignin
	}
	apps, err := g.store.signin.Apps(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]appView, 0, len(apps))
	for _, a := range apps {
		out = append(out, viewApp(a))
	}
	return map[string]any{"apps": out}, nil
}

// adminRotateSigningKey makes a new JWT signing key, which signs from now on; the previous
// one stays published in the JWKS (and verifies) until the next rotation, so tokens it signed
// keep working until they expire.
func (g *Gateway) adminRotateSigningKey(ctx context.Context) (any, error) {
	if g.Signin == nil {
		return nil, errNoSignin
	}
	kids, err := g.loadSigningKeys(ctx, true)
	if err != nil {
		return nil, err
	}
	// Every configuration sharing the store signs with the new key.
	for _, other := range activeGateways.all() {
		if other != g && other.Signin != nil && other.store == g.store {
			if _, err := other.loadSigningKeys(ctx, false); err != nil {
				return nil, err
			}
		}
	}
	// And every other instance sharing the store, at once (pub/sub with Redis).
	g.publish(invalidation.SigningKeys)
	return map[string]any{"published": kids, "signing": kids[0]}, nil
}

// newID returns a random identifier with a type prefix, e.g. "usr_k3j5...".
func newID(prefix string) string {
	var b [10]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	return prefix + "_" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
}

// Interface guards
var _ caddy.AdminRouter = AdminAPI{}
