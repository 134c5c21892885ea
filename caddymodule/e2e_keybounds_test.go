package caddymodule_test

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// A key kind is a key with all scopes and one restriction (or none, or only some scopes).
type keyKind struct {
	name string
	body map[string]any // the restriction, for the admin route
}

// boundScopes are the scopes of the "scoped" kinds: enough to manage keys.
var boundScopes = []string{"keys:read", "keys:write", "chat:write"}

// keyKinds are the callers' and the targets' restrictions; the same values throughout, so that
// a target is no broader than a caller of the same kind.
func keyKinds(expiry time.Time) []keyKind {
	return []keyKind{
		{"unrestricted", map[string]any{}},
		{"scoped", map[string]any{"scopes": boundScopes}},
		{"ip", map[string]any{"allowed_ips": []string{"127.0.0.0/8"}}},
		{"cap", map[string]any{"credit_cap": 1}},
		{"models", map[string]any{"models": []string{"mock-small"}}},
		{"expiry", map[string]any{"expires_at": expiry.Format(time.RFC3339)}},
		{"tier", map[string]any{"rate_limit_tier": "pro"}},
	}
}

// keyBody is the admin request of a key of kind k: all scopes unless the kind says otherwise.
func keyBody(k keyKind, name string) map[string]any {
	b := map[string]any{"name": name, "scopes": []string{"*"}}
	for f, v := range k.body {
		b[f] = v
	}
	return b
}

// boundView is a key as the self-service answers show it, with its restrictions.
type boundView struct {
	ID         string          `json:"id"`
	Key        string          `json:"key"`
	Scopes     []string        `json:"scopes"`
	AllowedIPs []string        `json:"allowed_ips"`
	Models     []string        `json:"models"`
	CreditCap  *credits.Amount `json:"credit_cap"`
	ExpiresAt  *time.Time      `json:"expires_at"`
	RevokedAt  *time.Time      `json:"revoked_at"`
	Tier       string          `json:"rate_limit_tier"`
}

// widens names how a key yielded to a caller of kind caller is broader than the caller ("":
// it is not). A user's token ("jwt") is bounded by nothing; "jwt-scoped" by its scopes.
func widens(caller string, k boundView, expiry time.Time) string {
	subset := func(have, of []string) bool {
		for _, s := range have {
			if !slices.Contains(of, s) {
				return false
			}
		}
		return true
	}
	switch caller {
	case "scoped", "jwt-scoped":
		if !subset(k.Scopes, boundScopes) {
			return fmt.Sprintf("scopes %v", k.Scopes)
		}
	case "ip":
		if len(k.AllowedIPs) == 0 || !subset(k.AllowedIPs, []string{"127.0.0.0/8"}) {
			return fmt.Sprintf("allowed_ips %v", k.AllowedIPs)
		}
	case "cap":
		if k.CreditCap == nil || *k.CreditCap > credits.Credit {
			return fmt.Sprintf("credit_cap %v", k.CreditCap)
		}
	case "models":
		if len(k.Models) == 0 || !subset(k.Models, []string{"mock-small"}) {
			return fmt.Sprintf("models %v", k.Models)
		}
	case "expiry":
		if k.ExpiresAt == nil || k.ExpiresAt.After(expiry) {
			return fmt.Sprintf("expires_at %v", k.ExpiresAt)
		}
	}
	switch caller {
	case "jwt", "jwt-scoped":
	case "tier":
		if k.Tier != "pro" {
			return fmt.Sprintf("rate_limit_tier %q", k.Tier)
		}
	default:
		if k.Tier != "" {
			return fmt.Sprintf("rate_limit_tier %q", k.Tier)
		}
	}
	return ""
}

// mayActOn is whether a caller of kind caller may rotate or revoke a key of kind target: a
// user's token any key (its scopes permitting), an unrestricted key any key of its tier, a
// restricted key only keys restricted as it is, a capped key only its own chain; any key
// itself.
func mayActOn(caller, target string) bool {
	switch {
	case target == "self", caller == "jwt":
		return true
	case caller == "jwt-scoped":
		return target == "scoped"
	case caller == "unrestricted":
		return target != "tier"
	case caller == "cap":
		return false
	}
	return caller == target
}

// TestKeysNoRouteWidensCaller: for every pair of caller (a user's token, with all scopes or
// some; a key unrestricted or with one restriction) and target key (each kind, and the caller
// itself), rotate and revoke act only on a target no broader than the caller (403 otherwise),
// and no credential the self-service routes yield (a rotation's successor, a created key) is
// broader than its caller.
func TestKeysNoRouteWidensCaller(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	expiry := time.Now().Add(30 * 24 * time.Hour).UTC().Truncate(time.Second)
	kinds := keyKinds(expiry)
	app := e.createApp(map[string]any{"name": "Ours", "first_party": true, "redirect_uris": []string{}, "scopes": []string{"*"}})

	type callerKind struct {
		name string
		user string
		// credential is a fresh credential of the kind (a key, or the user's token).
		credential func(name string) (secret, id string)
	}
	var callers []callerKind
	for _, c := range []struct{ name, scope string }{{"jwt", ""}, {"jwt-scoped", "keys:read keys:write chat:write"}} {
		email := c.name + "@example.com"
		var u userView
		e.adminCall(http.MethodPost, "/llm_gateway/users", map[string]any{"email": email, "password": "bounds password"},
			http.StatusCreated, &u, nil)
		form := url.Values{"grant_type": {"password"}, "client_id": {app.ClientID}, "username": {email}, "password": {"bounds password"}}
		if c.scope != "" {
			form.Set("scope", c.scope)
		}
		token := tokensOf(t, e.token(form, nil)).AccessToken
		callers = append(callers, callerKind{c.name, u.ID, func(string) (string, string) { return token, "" }})
	}
	for _, k := range kinds {
		u := e.createUser(k.name+"@example.com", "1")
		callers = append(callers, callerKind{k.name, u.ID, func(name string) (string, string) {
			ck := e.createKey(u.ID, keyBody(k, name))
			return ck.Key, ck.ID
		}})
	}
	targets := append([]keyKind{{name: "self"}}, kinds...)

	for _, c := range callers {
		for _, tk := range targets {
			if tk.name == "self" && strings.HasPrefix(c.name, "jwt") {
				continue
			}
			for _, route := range []string{"rotate", "revoke"} {
				name := fmt.Sprintf("%s %s %s", c.name, route, tk.name)
				secret, selfID := c.credential(name)
				target := selfID
				if tk.name != "self" {
					target = e.createKey(c.user, keyBody(tk, name+" target")).ID
				}
				var r *response
				if route == "rotate" {
					r = e.request(http.MethodPost, e.gw+"/v1/auth/keys/"+target+"/rotate", map[string]any{"grace_period_hours": 1}, bearer(secret))
				} else {
					r = e.request(http.MethodDelete, e.gw+"/v1/auth/keys/"+target, nil, bearer(secret))
				}
				var got struct {
					APIKey boundView `json:"api_key"`
				}
				e.adminCall(http.MethodGet, "/llm_gateway/keys/"+target, nil, http.StatusOK, &got, nil)
				if !mayActOn(c.name, tk.name) {
					if r.status != http.StatusForbidden {
						t.Errorf("%s: want 403, got %s", name, r)
					}
					if got.APIKey.RevokedAt != nil || got.APIKey.ExpiresAt != nil && tk.name != "expiry" {
						t.Errorf("%s: refused, but the target changed: %+v", name, got.APIKey)
					}
					continue
				}
				if r.status != http.StatusOK {
					t.Errorf("%s: want 200, got %s", name, r)
					continue
				}
				if route == "revoke" {
					if got.APIKey.RevokedAt == nil {
						t.Errorf("%s: the target is not revoked", name)
					}
					continue
				}
				var rot struct {
					NewKey boundView `json:"new_key"`
				}
				decodeInto(t, r, http.StatusOK, &rot)
				if w := widens(c.name, rot.NewKey, expiry); w != "" {
					t.Errorf("%s: the new key widens the caller: %s", name, w)
				}
			}
		}

		// Creation: asked for each kind, or with the defaults, a key is never broader than its
		// creator; a creator gets at least a key of its own kind (but a capped key none).
		secret, _ := c.credential(c.name + " creator")
		for _, tk := range append([]keyKind{{name: "defaults"}}, kinds...) {
			body := map[string]any{"name": c.name + " creates " + tk.name}
			if tk.name != "defaults" {
				body = keyBody(tk, c.name+" creates "+tk.name)
			}
			r := e.request(http.MethodPost, e.gw+"/v1/auth/keys", body, bearer(secret))
			own := tk.name == c.name || c.name == "jwt-scoped" && tk.name == "scoped" ||
				c.name == "jwt" && tk.name != "tier" || c.name == "unrestricted" && tk.name != "tier"
			switch {
			case r.status == http.StatusCreated:
				var created struct {
					APIKey boundView `json:"api_key"`
				}
				decodeInto(t, r, http.StatusCreated, &created)
				if c.name == "cap" {
					t.Errorf("a capped key created a key: %s", r)
				}
				if w := widens(c.name, created.APIKey, expiry); w != "" {
					t.Errorf("%s creates %s: the key widens its creator: %s", c.name, tk.name, w)
				}
			case r.status != http.StatusForbidden && r.status != http.StatusBadRequest:
				t.Errorf("%s creates %s: %s", c.name, tk.name, r)
			case own && c.name != "cap":
				t.Errorf("%s creates %s: refused: %s", c.name, tk.name, r)
			}
		}
	}
}

// TestKeysPerUserBound: a user has at most 100 live keys from the self-service API and the
// account page (400 invalid_request past it, on both); a rotation is not refused at the
// bound and does not add to it; revoking a key makes room; the operator's route is not bound.
func TestKeysPerUserBound(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("many@example.com", "many keys password")
	user := e.userIDByEmail("many@example.com")
	manager := e.createKey(user, map[string]any{"name": "manager", "scopes": allScopes})
	create := func() *response {
		return e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"name": "one more"}, manager.Key)
	}
	var last boundView
	for i := 1; i < 100; i++ {
		var created struct {
			APIKey boundView `json:"api_key"`
		}
		decodeInto(t, create(), http.StatusCreated, &created)
		last = created.APIKey
	}
	eo := errorOf(t, create(), http.StatusBadRequest, "invalid_request")
	if msg, _ := eo["message"].(string); !strings.Contains(msg, "100") {
		t.Errorf("message %q does not state the bound", msg)
	}
	page := b.get("/account")
	if r := b.do(http.MethodPost, "/account/keys", url.Values{"csrf": {csrf(t, page)}, "name": {"from the page"}}, nil); r.status != http.StatusBadRequest ||
		!strings.Contains(string(r.body), "at most 100 live api keys") {
		t.Errorf("account page at the bound: %s", r)
	}
	// A rotation at the bound: allowed, and it does not make room.
	var rot rotation
	decodeInto(t, e.self(http.MethodPost, "/v1/auth/keys/"+last.ID+"/rotate", map[string]any{"grace_period_hours": 1}, manager.Key), http.StatusOK, &rot)
	errorOf(t, create(), http.StatusBadRequest, "invalid_request")
	// Revoking one makes room for one.
	if r := e.self(http.MethodDelete, "/v1/auth/keys/"+rot.NewKey.ID, nil, manager.Key); r.status != http.StatusOK {
		t.Fatalf("revoke: %s", r)
	}
	if r := create(); r.status != http.StatusCreated {
		t.Fatalf("after a revocation: %s", r)
	}
	errorOf(t, create(), http.StatusBadRequest, "invalid_request")
	// The operator is not bound.
	e.createKey(user, nil)
}

// TestKeysPerUserBoundConfigured: max_keys_per_user sets the bound.
func TestKeysPerUserBoundConfigured(t *testing.T) {
	s := keysSetup("")
	s.gateway = "\n\t\tmax_keys_per_user 3" + s.gateway
	e := startGateway(t, s)
	u := e.createUser("three@example.com", "1")
	manager := e.createKey(u.ID, map[string]any{"name": "manager", "scopes": allScopes})
	for range 2 {
		if r := e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"name": "one more"}, manager.Key); r.status != http.StatusCreated {
			t.Fatalf("within the bound: %s", r)
		}
	}
	eo := errorOf(t, e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"name": "one too many"}, manager.Key), http.StatusBadRequest, "invalid_request")
	if msg, _ := eo["message"].(string); !strings.Contains(msg, "at most 3 live api keys") {
		t.Errorf("message %q", msg)
	}
}

// TestRateLimitPerRotationChain: a key's own rate limits belong to its rotation chain, as its
// cap does: rotating itself does not give a key a fresh allowance, and the old key and the new
// one share it during the grace.
func TestRateLimitPerRotationChain(t *testing.T) {
	useFakeRateClock(t)
	e := startGateway(t, freeAndProTiers)
	var u userView
	e.adminCall(http.MethodPost, "/llm_gateway/users", map[string]any{"email": "rl@example.com", "credits": 10, "tier": "pro"},
		http.StatusCreated, &u, nil)
	k := e.createKey(u.ID, map[string]any{"name": "free", "scopes": allScopes, "rate_limit_tier": "free"})
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":16}`
	for i := range 3 {
		if r := e.post("/v1/chat/completions", body, bearer(k.Key)); r.status != http.StatusOK {
			t.Fatalf("request %d: %s", i, r)
		}
	}
	var rot rotation
	decodeInto(t, e.self(http.MethodPost, "/v1/auth/keys/"+k.ID+"/rotate", map[string]any{"grace_period_hours": 1}, k.Key), http.StatusOK, &rot)
	for _, key := range []string{rot.NewKey.Key, k.Key} {
		eo := errorOf(t, e.post("/v1/chat/completions", body, bearer(key)), http.StatusTooManyRequests, "rate_limit_exceeded")
		if d, _ := eo["details"].(map[string]any); d["tier"] != "free" {
			t.Errorf("429 details %v, want the key's tier", d)
		}
	}
}
