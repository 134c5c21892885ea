package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// The self-service API (API.md §8): a caller manages its own keys and reads its own credits
// and usage. It works from the caller, whatever authenticated it (an API key today): a key's
// owner is its user, and a caller sees only that user's things; another user's key id answers
// 404, as an unknown one does.
//
//	POST   /v1/auth/keys              keys:write   create a key (scopes: a subset of the caller's)
//	GET    /v1/auth/keys              keys:read    list the user's keys (never the secrets)
//	GET    /v1/auth/keys/{id}         keys:read    one key
//	DELETE /v1/auth/keys/{id}         keys:write   revoke it, at once on this instance
//	POST   /v1/auth/keys/{id}/rotate  keys:write   rotate it {grace_period_hours}
//	GET    /v1/credits                credits:read balance and recent ledger entries (?limit=, at most 100)
//	GET    /v1/usage                  usage:read   tokens and credits by UTC day and model (?days=, at most 366)
//
// No route widens its caller. A key with keys:write acts for its owner, within its own
// bounds: the keys it creates, rotates or revokes are no broader than itself (scopes a subset
// of its own, allowlist within its own, models among its own, expiry no later, the same rate
// limit tier); a key with a credit cap creates no keys and acts only on its own rotation chain
// (the keys of a chain share one cap). The successor of a rotation never outlives a caller
// that expires. A user's token is bounded by its scopes only; listing and reading keys show
// all the user's keys (never a secret) to a caller with keys:read.

// defaultMaxKeysPerUser is the default of Gateway.MaxKeysPerUser: the live keys of a user
// that the self-service API and the account page create, a key neither revoked nor expired,
// each rotation chain counted once (the key in its grace period after a rotation is not
// counted, so rotating is never refused by the bound).
const defaultMaxKeysPerUser = 100

// selfKeyPath is the prefix of the routes of one key.
const selfKeyPath = "/v1/auth/keys/"

// selfService reports whether e is a route of the self-service API.
func (e endpoint) selfService() bool {
	switch e {
	case epAuthKeys, epAuthKey, epCredits, epUsage:
		return true
	}
	return false
}

// serveSelfService answers a self-service request, never cached.
func (g *Gateway) serveSelfService(w http.ResponseWriter, r *http.Request, ep endpoint) {
	w.Header().Set("Cache-Control", "no-store")
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	status, out, err := g.selfServiceRoute(w, r, ep)
	if err != nil {
		writeError(w, r, err)
		return
	}
	body, _ := json.Marshal(out)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// selfRoute is one method on one self-service path.
type selfRoute struct {
	method string
	scope  string
	do     func(r *http.Request, who *caller, id string) (int, any, error)
}

// selfServiceRoute authenticates the caller, picks the route and checks its scope.
func (g *Gateway) selfServiceRoute(w http.ResponseWriter, r *http.Request, ep endpoint) (int, any, error) {
	var (
		routes []selfRoute
		id     string
	)
	switch ep {
	case epAuthKeys:
		routes = []selfRoute{
			{http.MethodGet, identity.ScopeKeysRead, g.selfListKeys},
			{http.MethodPost, identity.ScopeKeysWrite, g.selfCreateKey},
		}
	case epAuthKey:
		rest := strings.TrimPrefix(r.URL.Path, selfKeyPath)
		var action string
		id, action, _ = strings.Cut(rest, "/")
		switch {
		case id == "" || len(id) > 64:
			return 0, nil, errRouteAbsent
		case action == "":
			routes = []selfRoute{
				{http.MethodGet, identity.ScopeKeysRead, g.selfGetKey},
				{http.MethodDelete, identity.ScopeKeysWrite, g.selfRevokeKey},
			}
		case action == "rotate":
			routes = []selfRoute{{http.MethodPost, identity.ScopeKeysWrite, g.selfRotateKey}}
		default:
			return 0, nil, errRouteAbsent
		}
	case epCredits:
		routes = []selfRoute{{http.MethodGet, identity.ScopeCreditsRead, g.selfCredits}}
	case epUsage:
		routes = []selfRoute{{http.MethodGet, identity.ScopeUsageRead, g.selfUsage}}
	}
	i := slices.IndexFunc(routes, func(rt selfRoute) bool { return rt.method == r.Method })
	if i < 0 {
		methods := make([]string, 0, len(routes)+1)
		for _, rt := range routes {
			methods = append(methods, rt.method)
		}
		w.Header().Set("Allow", strings.Join(append(methods, http.MethodOptions), ", "))
		return 0, nil, &statusError{http.StatusMethodNotAllowed, "use " + strings.Join(methods, " or ") + " on " + r.URL.Path}
	}
	rt := routes[i]
	who, err := g.identify(r)
	if err != nil {
		return 0, nil, err
	}
	if !identity.HasScope(who.scopes, rt.scope) || who.userID == "" {
		return 0, nil, &missingScope{scope: rt.scope}
	}
	return rt.do(r, who, id)
}

// ownKey is the caller's key id; identity.ErrNotFound when it does not exist or is another
// user's (the same answer, so ids of others cannot be probed).
func (g *Gateway) ownKey(ctx context.Context, who *caller, id string) (identity.Key, error) {
	k, err := g.store.keys.KeyByID(ctx, id)
	if err != nil {
		return identity.Key{}, err
	}
	if k.UserID != who.userID {
		return identity.Key{}, identity.ErrNotFound
	}
	return k, nil
}

func (g *Gateway) selfListKeys(r *http.Request, who *caller, _ string) (int, any, error) {
	keys, err := g.store.keys.KeysByUser(r.Context(), who.userID)
	if err != nil {
		return 0, nil, err
	}
	out := make([]keyView, 0, len(keys))
	for _, k := range keys {
		out = append(out, viewKey(k))
	}
	return http.StatusOK, map[string]any{"keys": out}, nil
}

func (g *Gateway) selfGetKey(r *http.Request, who *caller, id string) (int, any, error) {
	k, err := g.ownKey(r.Context(), who, id)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]any{"api_key": viewKey(k)}, nil
}

func (g *Gateway) selfCreateKey(r *http.Request, who *caller, _ string) (int, any, error) {
	var in keyRequest
	if err := decodeJSON(r, &in); err != nil {
		return 0, nil, err
	}
	if in.Scopes == nil {
		// By default, the default scopes the caller itself holds.
		in.Scopes = []string{}
		for _, s := range defaultKeyScopes {
			if identity.HasScope(who.scopes, s) {
				in.Scopes = append(in.Scopes, s)
			}
		}
	}
	if err := identity.ValidateScopes(in.Scopes); err != nil {
		return 0, nil, invalid("scopes", "%v", err)
	}
	if err := who.holdsScopes(in.Scopes); err != nil {
		return 0, nil, err
	}
	if len(who.models) > 0 {
		if len(in.Models) == 0 {
			in.Models = who.models
		}
		for _, m := range in.Models {
			if !slices.Contains(who.models, m) {
				return 0, nil, invalid("models", "this credential may not use model %q", m)
			}
		}
	}
	if err := inheritRestrictions(who, &in, g.clock()); err != nil {
		return 0, nil, err
	}
	out, err := g.createKey(r.Context(), who.userID, in, int(g.MaxKeysPerUser))
	if err != nil {
		return 0, nil, err
	}
	return http.StatusCreated, out, nil
}

// errCappedCreator: keys each have their own cap, so a capped key creating keys would
// multiply what it may spend.
var errCappedCreator = &statusError{http.StatusForbidden, "a key with a credit cap cannot create keys"}

// inheritRestrictions keeps a key created by a restricted key at least as restricted: no wider
// address allowlist (the creator's when none is asked), no later expiry (the creator's when none
// is asked), the creator's rate limit tier, and no key at all from a key with a credit cap.
func inheritRestrictions(who *caller, in *keyRequest, now time.Time) error {
	if who.keyCap > 0 {
		return errCappedCreator
	}
	switch {
	case in.Tier == "":
		in.Tier = who.tier
	case in.Tier != who.tier:
		// Tiers are not ordered: another one may be better. The operator sets them.
		return invalid("rate_limit_tier", "rate_limit_tier can only be the creating credential's (%q)", who.tier)
	}
	if len(who.allowedIPs) > 0 {
		if len(in.AllowedIPs) == 0 {
			in.AllowedIPs = who.allowedIPs
		}
		for i, s := range in.AllowedIPs {
			if !prefixWithin(s, who.allowedIPs) {
				return invalid("allowed_ips", "allowed_ips[%d] is wider than the creating key's allowlist", i)
			}
		}
	}
	if who.expiresAt != nil {
		switch {
		case in.ExpiresAt != nil:
			if in.ExpiresAt.After(*who.expiresAt) {
				return invalid("expires_at", "expires_at is later than the creating key's expiry")
			}
		case in.ExpiresInDays != nil:
			if now.Add(time.Duration(*in.ExpiresInDays) * 24 * time.Hour).After(*who.expiresAt) {
				return invalid("expires_in_days", "the key would outlive the creating key")
			}
		default:
			in.ExpiresAt = who.expiresAt
		}
	}
	return nil
}

// holdsScopes refuses scopes the caller does not hold; "*" only from a caller holding "*".
func (who *caller) holdsScopes(scopes []string) error {
	for _, s := range scopes {
		if s == identity.ScopeAll && !slices.Contains(who.scopes, identity.ScopeAll) || !identity.HasScope(who.scopes, s) {
			return &missingScope{scope: s}
		}
	}
	return nil
}

// outOfBounds is a 403: the key a self-service route would act on is broader than the caller.
func outOfBounds(what string) error {
	return &statusError{http.StatusForbidden, "this key acts only on keys no broader than itself: the key's " + what}
}

// covers checks that the key k, which a self-service route would rotate or revoke, is no
// broader than the caller: every scope of k held by the caller, and, for a key with such
// restrictions, k's allowlist within the caller's, k's models among the caller's, k expiring
// no later, k with the caller's tier, and, for a key with a credit cap, k in the caller's own
// rotation chain (another key's cap would add to what the caller may spend). So rotating k
// yields the caller nothing it does not already have.
func (who *caller) covers(k identity.Key) error {
	if err := who.holdsScopes(k.Scopes); err != nil {
		return err
	}
	if who.kind != "api_key" {
		return nil // a user's token or session: bounded by its scopes only
	}
	if who.keyCap > 0 && k.ChainID != who.keyChain {
		return outOfBounds("spending is not this key's: a key with a credit cap acts only on its own rotation chain")
	}
	if len(who.allowedIPs) > 0 {
		if len(k.AllowedIPs) == 0 {
			return outOfBounds("allowed_ips are wider (any address)")
		}
		for _, p := range k.AllowedIPs {
			if !prefixWithin(p, who.allowedIPs) {
				return outOfBounds("allowed_ips are wider")
			}
		}
	}
	if len(who.models) > 0 {
		if len(k.Models) == 0 {
			return outOfBounds("models are wider (all)")
		}
		for _, m := range k.Models {
			if !slices.Contains(who.models, m) {
				return outOfBounds("models are wider")
			}
		}
	}
	if who.expiresAt != nil && (k.ExpiresAt == nil || k.ExpiresAt.After(*who.expiresAt)) {
		return outOfBounds("expiry is later")
	}
	if k.Tier != who.tier {
		return outOfBounds("rate_limit_tier is another")
	}
	return nil
}

// prefixWithin reports whether the address or prefix s lies inside one of the list's prefixes.
func prefixWithin(s string, list []string) bool {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil {
			return false
		}
		a = a.Unmap()
		p = netip.PrefixFrom(a, a.BitLen())
	}
	for _, l := range list {
		q, err := netip.ParsePrefix(l)
		if err == nil && q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

func (g *Gateway) selfRevokeKey(r *http.Request, who *caller, id string) (int, any, error) {
	k, err := g.ownKey(r.Context(), who, id)
	if err != nil {
		return 0, nil, err
	}
	if err := who.covers(k); err != nil {
		return 0, nil, err
	}
	out, err := g.adminRevokeKey(r.Context(), id)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, out, nil
}

func (g *Gateway) selfRotateKey(r *http.Request, who *caller, id string) (int, any, error) {
	var in rotateRequest
	if err := decodeOptionalJSON(r, &in); err != nil {
		return 0, nil, err
	}
	old, err := g.ownKey(r.Context(), who, id)
	if err != nil {
		return 0, nil, err
	}
	if err := who.covers(old); err != nil {
		return 0, nil, err
	}
	out, err := g.rotateKey(r.Context(), old, in, who.expiresAt)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, out, nil
}

func (g *Gateway) selfCredits(r *http.Request, who *caller, _ string) (int, any, error) {
	limit, err := queryInt(r, "limit", 20, 1, 100)
	if err != nil {
		return 0, nil, err
	}
	ctx := r.Context()
	balance, err := g.store.ledger.Balance(ctx, who.account)
	if err != nil && !errors.Is(err, credits.ErrUnknownAccount) {
		return 0, nil, err
	}
	entries, err := g.store.ledger.Entries(ctx, who.account, limit)
	if err != nil {
		return 0, nil, err
	}
	if entries == nil {
		entries = []credits.Entry{}
	}
	return http.StatusOK, map[string]any{"balance": balance, "entries": entries}, nil
}

func (g *Gateway) selfUsage(r *http.Request, who *caller, _ string) (int, any, error) {
	days, err := queryInt(r, "days", 30, 1, 366)
	if err != nil {
		return 0, nil, err
	}
	now := g.clock().UTC()
	since := usageSince(now, days)
	rows, err := g.store.usage(r.Context(), who.account, since)
	if err != nil {
		return 0, nil, err
	}
	var total struct {
		Requests     int64          `json:"requests"`
		InputTokens  int64          `json:"input_tokens"`
		OutputTokens int64          `json:"output_tokens"`
		Credits      credits.Amount `json:"credits"`
	}
	for _, u := range rows {
		total.Requests += u.Requests
		total.InputTokens += u.InputTokens
		total.OutputTokens += u.OutputTokens
		total.Credits += u.Credits
	}
	return http.StatusOK, map[string]any{"since": since, "usage": rows, "total": total}, nil
}

// usageSince is the start of the UTC day days-1 days before now: the first day of a usage
// report of days days, today included.
func usageSince(now time.Time, days int) time.Time {
	now = now.UTC()
	return time.Date(now.Year(), now.Month(), now.Day()-days+1, 0, 0, 0, 0, time.UTC)
}

// queryInt reads an integer query parameter from lo to hi, def when absent.
func queryInt(r *http.Request, name string, def, lo, hi int) (int, error) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		return 0, invalid(name, "%s must be a whole number from %d to %d", name, lo, hi)
	}
	return n, nil
}
