package caddymodule

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// Sign-in (API.md §7): the gateway is its own authorization server. People sign up and sign in
// on its pages (signin_pages.go); browser apps get an IP-bound token in a URL fragment (the
// Peerwave flow, /auth/authorize); registered apps use OAuth 2.0 with PKCE, refresh tokens and,
// for first-party apps, the password grant (signin_oauth.go). The tokens are the gateway's own
// Ed25519 JWTs, which identify() accepts beside API keys, charging the signed-in user.

// Signin configures the sign-in routes and the gateway's own tokens. Nil: none of the routes
// exist (they pass to the next handler) and only API keys and anonymous callers are served.
type Signin struct {
	// Issuer is the gateway's public base URL (scheme://host[:port], no path), the "iss" and
	// "aud" of its tokens and the base of the URLs in its metadata. Required.
	Issuer string `json:"issuer"`

	// ReturnOrigins are the browser app origins the fragment flow (/auth/authorize) may send
	// tokens to, compared exactly. Empty: any https origin, and http on localhost, 127.0.0.1
	// and [::1].
	ReturnOrigins []string `json:"return_origins,omitempty"`

	// SignupCredits are granted, once, to every account made on the sign-up page. Default: 0.
	SignupCredits credits.Amount `json:"signup_credits,omitempty"`

	// DisableSignup removes the sign-up page: accounts are then made by operators only.
	DisableSignup bool `json:"disable_signup,omitempty"`

	// FragmentTokenTTL is the lifetime of the fragment flow's IP-bound token. Default: 15m,
	// at most 15m.
	FragmentTokenTTL caddy.Duration `json:"fragment_token_ttl,omitempty"`

	// AccessTokenTTL is the lifetime of OAuth and password grant access tokens. Default: 1h,
	// at most 1h.
	AccessTokenTTL caddy.Duration `json:"access_token_ttl,omitempty"`

	// RefreshTokenTTL is the lifetime of a refresh token (each rotation starts a new one).
	// Default: 720h (30 days).
	RefreshTokenTTL caddy.Duration `json:"refresh_token_ttl,omitempty"`

	// RefreshGrace is how long a rotated refresh token still yields its successor (a lost
	// response, two tabs) before presenting it counts as reuse and revokes its family.
	// Default: 30s, from 0 to 60s.
	RefreshGrace caddy.Duration `json:"refresh_grace,omitempty"`

	// CodeTTL is the lifetime of an authorization code. Default: 60s, at most 60s.
	CodeTTL caddy.Duration `json:"code_ttl,omitempty"`

	// SessionTTL is how long a browser stays signed in. Default: 168h (7 days).
	SessionTTL caddy.Duration `json:"session_ttl,omitempty"`

	// ExternalIssuers are other issuers whose JWTs the gateway accepts, verified with the keys
	// of their JWKS URL; a token's "sub" is linked to a user of the gateway the first time it
	// is seen (a new user, with no credits).
	ExternalIssuers []*ExternalIssuer `json:"external_issuers,omitempty"`

	policy signin.ReturnPolicy
	secret []byte
	// verifier is the configuration of the gateway's token verification; each verification
	// takes a copy with the current keyset.
	verifier signin.Verifier
	external []*signin.ExternalIssuer
	// keysMu guards keys: the signing keys change when an operator rotates them.
	keysMu sync.RWMutex
	keys   *signin.Keyset
}

// ExternalIssuer is another issuer whose access tokens the gateway accepts.
type ExternalIssuer struct {
	// Issuer is the "iss" its tokens carry, compared exactly. Required.
	Issuer string `json:"issuer"`
	// JWKSURL is where its signing keys are published. Required.
	JWKSURL string `json:"jwks_url"`
	// Audience is the "aud" its tokens must carry. Required.
	Audience string `json:"audience"`
	// Algorithms are the JWS algorithms accepted (RS256, ES256, EdDSA, ...). Default: RS256.
	Algorithms []string `json:"algorithms,omitempty"`
	// Scopes are granted to its users on the gateway. Default: chat:write,
	// embeddings:write, models:read.
	Scopes []string `json:"scopes,omitempty"`
}

// fragmentScopes are what a fragment flow token grants: what an anonymous caller may do
// (inference and the catalog), on the user's credits.
var fragmentScopes = anonymousScopes

// Sign-in defaults and bounds (RELIABILITY §3 lifetimes).
const (
	maxFragmentTTL    = 15 * time.Minute
	maxAccessTTL      = time.Hour
	maxCodeTTL        = 60 * time.Second
	maxRefreshGrace   = 60 * time.Second
	jwtLeeway         = 30 * time.Second
	signingKeysKept   = 2 // the current key and the one before it stay published
	sessionCookieName = "llm_gateway_session"
	csrfCookieName    = "llm_gateway_csrf"
)

// provisionSignin sets the defaults, loads (or makes, on first start) the signing keys and the
// server secret, and builds the token verifiers.
func (g *Gateway) provisionSignin(ctx context.Context) error {
	s := g.Signin
	if s == nil {
		return nil
	}
	setDuration := func(d *caddy.Duration, def time.Duration) {
		if *d == 0 {
			*d = caddy.Duration(def)
		}
	}
	setDuration(&s.FragmentTokenTTL, maxFragmentTTL)
	setDuration(&s.AccessTokenTTL, maxAccessTTL)
	setDuration(&s.RefreshTokenTTL, 30*24*time.Hour)
	setDuration(&s.RefreshGrace, 30*time.Second)
	setDuration(&s.CodeTTL, maxCodeTTL)
	setDuration(&s.SessionTTL, 7*24*time.Hour)
	s.Issuer = strings.TrimSuffix(s.Issuer, "/")
	s.policy = signin.ReturnPolicy{Origins: s.ReturnOrigins}

	st := g.store.signin
	var err error
	if s.secret, err = st.ServerSecret(ctx); err != nil {
		return fmt.Errorf("signin: server secret: %w", err)
	}
	if _, err := g.loadSigningKeys(ctx, false); err != nil {
		return err
	}
	s.verifier = signin.Verifier{Issuer: s.Issuer, Audience: s.Issuer,
		Types: []string{signin.TypeAccess, signin.TypeFragment}, Leeway: jwtLeeway, Now: g.clock}
	for _, e := range s.ExternalIssuers {
		if e.Scopes == nil {
			e.Scopes = fragmentScopes
		}
		s.external = append(s.external, e.verifier(g.clock))
	}
	return nil
}

// verifier is the policy's verifier of the issuer's tokens (RS256 when no algorithm is given).
func (e *ExternalIssuer) verifier(now func() time.Time) *signin.ExternalIssuer {
	algs := e.Algorithms
	if len(algs) == 0 {
		algs = []string{"RS256"}
	}
	return &signin.ExternalIssuer{Issuer: e.Issuer, JWKSURL: e.JWKSURL, Audience: e.Audience, Algorithms: algs,
		Leeway: jwtLeeway, Now: now}
}

// loadSigningKeys reads the signing keys into the keyset; with rotate, or when there are none
// yet, it first makes a new one, which signs from then on (the previous one stays published,
// so tokens it signed keep working until they expire). It returns the key ids, newest (the
// signing one) first.
func (g *Gateway) loadSigningKeys(ctx context.Context, rotate bool) ([]string, error) {
	st := g.store.signin
	keys, err := st.SigningKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("signin: signing keys: %w", err)
	}
	if rotate || len(keys) == 0 {
		k, err := signin.NewSigningKey(g.clock())
		if err != nil {
			return nil, fmt.Errorf("signin: new signing key: %w", err)
		}
		if err := st.AddSigningKey(ctx, k, signingKeysKept); err != nil {
			return nil, fmt.Errorf("signin: storing the signing key: %w", err)
		}
		if keys, err = st.SigningKeys(ctx); err != nil {
			return nil, fmt.Errorf("signin: signing keys: %w", err)
		}
	}
	ks, err := signin.NewKeyset(keys)
	if err != nil {
		return nil, fmt.Errorf("signin: signing keys: %w", err)
	}
	s := g.Signin
	s.keysMu.Lock()
	s.keys = ks
	s.keysMu.Unlock()
	kids := make([]string, len(keys))
	for i, k := range keys {
		kids[i] = k.KID
	}
	return kids, nil
}

// currentKeys is the keyset in use.
func (s *Signin) currentKeys() *signin.Keyset {
	s.keysMu.RLock()
	defer s.keysMu.RUnlock()
	return s.keys
}

// validate checks the sign-in configuration.
func (s *Signin) validate() error {
	u, err := url.Parse(s.Issuer)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || strings.Trim(u.Path, "/") != "" ||
		u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return fmt.Errorf("signin: issuer %q must be the gateway's base URL, scheme://host[:port]", s.Issuer)
	}
	if err := (signin.ReturnPolicy{Origins: s.ReturnOrigins}).Validate(); err != nil {
		return fmt.Errorf("signin: return_origins: %w", err)
	}
	if s.SignupCredits < 0 || s.SignupCredits > credits.MaxAmount {
		return errors.New("signin: signup_credits out of range")
	}
	for _, c := range []struct {
		name     string
		d, limit time.Duration
	}{
		{"fragment_token_ttl", time.Duration(s.FragmentTokenTTL), maxFragmentTTL},
		{"access_token_ttl", time.Duration(s.AccessTokenTTL), maxAccessTTL},
		{"code_ttl", time.Duration(s.CodeTTL), maxCodeTTL},
		{"refresh_grace", time.Duration(s.RefreshGrace), maxRefreshGrace},
	} {
		if c.d < 0 || c.d > c.limit {
			return fmt.Errorf("signin: %s must be from 0 to %s", c.name, c.limit)
		}
	}
	if time.Duration(s.RefreshTokenTTL) < time.Minute || time.Duration(s.SessionTTL) < time.Minute {
		return errors.New("signin: refresh_token_ttl and session_ttl must be at least 1m")
	}
	for _, e := range s.ExternalIssuers {
		if e.Issuer == s.Issuer {
			return fmt.Errorf("signin: external issuer %q is the gateway itself", e.Issuer)
		}
		if err := e.verifier(nil).Validate(); err != nil {
			return fmt.Errorf("signin: %w", err)
		}
		if err := identity.ValidateScopes(e.Scopes); err != nil {
			return fmt.Errorf("signin: external issuer %s: %w", e.Issuer, err)
		}
	}
	return nil
}

// signinHandler answers one sign-in path.
type signinHandler func(g *Gateway, w http.ResponseWriter, r *http.Request)

// signinRoutes are the paths the sign-in serves and who answers each; the pages route by
// method in servePage, which also takes the account page's forms under /account/.
var signinRoutes = map[string]signinHandler{
	"/.well-known/jwks.json":                  (*Gateway).serveJWKS,
	"/.well-known/oauth-authorization-server": (*Gateway).serveOAuthMetadata,
	"/oauth/authorize":                        (*Gateway).serveOAuthAuthorize,
	"/oauth/token":                            (*Gateway).serveToken,
	"/oauth/revoke":                           (*Gateway).serveRevoke,
	"/auth/v1/token":                          (*Gateway).serveSupabaseToken,
	"/auth/style.css":                         func(_ *Gateway, w http.ResponseWriter, r *http.Request) { serveStyle(w, r) },
	"/auth/login":                             (*Gateway).servePage,
	"/auth/signup":                            (*Gateway).servePage,
	"/auth/logout":                            (*Gateway).servePage,
	"/auth/consent":                           (*Gateway).servePage,
	"/auth/authorize":                         (*Gateway).servePage,
	"/api/third-party/auth":                   (*Gateway).servePage,
	"/account":                                (*Gateway).servePage,
}

// signinRoute is the handler of a sign-in path, or nil.
func signinRoute(path string) signinHandler {
	if h := signinRoutes[path]; h != nil {
		return h
	}
	if strings.HasPrefix(path, "/account/") {
		return (*Gateway).servePage
	}
	return nil
}

// errInvalidToken is a bearer JWT that is not accepted (401 invalid_token).
var errInvalidToken = errors.New("invalid token")

// identifyJWT checks a bearer JWT: the gateway's own (an access token, or a fragment token,
// which must come from the address it was issued to), or an external issuer's.
func (g *Gateway) identifyJWT(ctx context.Context, token string, clientIP netip.Addr) (*caller, error) {
	s := g.Signin
	if s == nil {
		return nil, errTokenUnsupported
	}
	if ext := s.externalFor(token); ext != nil {
		return g.identifyExternal(ctx, ext, token)
	}
	v := s.verifier
	v.Keys = s.currentKeys()
	c, err := v.Verify(token)
	if err != nil {
		return nil, errInvalidToken
	}
	if c.Type == signin.TypeFragment || c.IP != "" {
		ip, err := netip.ParseAddr(c.IP)
		if err != nil || !clientIP.IsValid() || ip.Unmap() != clientIP.Unmap() {
			return nil, errInvalidToken
		}
	}
	scopes, err := identity.ParseScopes(c.Scope)
	if err != nil {
		return nil, errInvalidToken
	}
	return &caller{kind: "jwt", account: credits.UserAccount(c.Subject), userID: c.Subject, scopes: scopes,
		limitKey: "u:" + c.Subject}, nil
}

// externalFor is the external issuer named by the token's (unverified) "iss", or nil. The
// claim only chooses the verifier; the verifier checks it again.
func (s *Signin) externalFor(token string) *signin.ExternalIssuer {
	if len(s.external) == 0 {
		return nil
	}
	iss := unverifiedIssuer(token)
	for _, e := range s.external {
		if iss != "" && e.Issuer == iss {
			return e
		}
	}
	return nil
}

// identifyExternal verifies an external issuer's token and maps its subject to a user,
// making one the first time.
func (g *Gateway) identifyExternal(ctx context.Context, ext *signin.ExternalIssuer, token string) (*caller, error) {
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := ext.Verify(vctx, token)
	if err != nil {
		return nil, errInvalidToken
	}
	var scopes []string
	for _, e := range g.Signin.ExternalIssuers {
		if e.Issuer == ext.Issuer {
			scopes = e.Scopes
		}
	}
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
	defer scancel()
	st := g.store.signin
	userID, err := st.UserForSubject(sctx, ext.Issuer, c.Subject)
	if errors.Is(err, identity.ErrNotFound) {
		userID, err = g.linkExternalUser(sctx, ext.Issuer, c.Subject)
	}
	if err != nil {
		return nil, fmt.Errorf("mapping an external subject: %w", errors.Join(credits.ErrStoreUnavailable, err))
	}
	return &caller{kind: "jwt", account: credits.UserAccount(userID), userID: userID, scopes: scopes,
		limitKey: "u:" + userID}, nil
}

// linkExternalUser makes a user for an external subject and links them; when another request
// linked the subject first, that user is the one.
func (g *Gateway) linkExternalUser(ctx context.Context, issuer, subject string) (string, error) {
	host := issuer
	if u, err := url.Parse(issuer); err == nil && u.Host != "" {
		host = u.Host
	}
	u := identity.User{ID: newID("usr"), Email: newID("ext") + "@" + host, CreatedAt: g.clock().UTC()}
	if err := g.store.users.CreateUser(ctx, u); err != nil {
		return "", err
	}
	err := g.store.signin.LinkSubject(ctx, issuer, subject, u.ID)
	if errors.Is(err, identity.ErrConflict) {
		return g.store.signin.UserForSubject(ctx, issuer, subject)
	}
	return u.ID, err
}

// unverifiedIssuer reads the "iss" claim of a compact JWS without verifying it ("" when it
// cannot be read). Only for choosing a verifier.
func unverifiedIssuer(token string) string {
	if len(token) > signin.MaxTokenLen {
		return ""
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return ""
	}
	var c struct {
		Iss string `json:"iss"`
	}
	if json.Unmarshal(payload, &c) != nil {
		return ""
	}
	return c.Iss
}

// clientAddr is Caddy's client IP of the request (invalid when unknown).
func clientAddr(r *http.Request) netip.Addr {
	ipStr, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	ip, _ := identity.ParseClientIP(ipStr)
	return ip
}

// mint signs a token of the gateway for user, with scopes, for client.
func (g *Gateway) mint(typ, userID, clientID string, scopes []string, ip netip.Addr, ttl time.Duration) (string, error) {
	s := g.Signin
	now := g.clock()
	c := signin.Claims{Issuer: s.Issuer, Audience: s.Issuer, Subject: userID, ClientID: clientID,
		Scope: strings.Join(scopes, " "), Type: typ, IssuedAt: now, NotBefore: now, Expiry: now.Add(ttl)}
	if ip.IsValid() {
		c.IP = ip.Unmap().String()
	}
	tok, err := s.currentKeys().Sign(c)
	if err != nil {
		g.logger.Error("signing a token", zap.Error(err))
		return "", err
	}
	return tok, nil
}
