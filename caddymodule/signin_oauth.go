package caddymodule

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// OAuth 2.0 (RFC 6749) with PKCE S256 only (RFC 7636), after RFC 9700:
//
//	GET  /oauth/authorize   authorization code; registered clients, exact redirect URIs, state
//	POST /oauth/token       authorization_code, refresh_token (rotated, reuse detected),
//	                        password (first-party clients only); form or JSON bodies
//	POST /auth/v1/token     the Human Intelligence seed's password and refresh grants
//	POST /oauth/revoke      RFC 7009
//	GET  /.well-known/oauth-authorization-server (RFC 8414), /.well-known/jwks.json
//
// Every grant answers an access token (an Ed25519 JWT, typ at+jwt) and a refresh token (opaque;
// only its hash is stored). A refresh token is rotated at each use: its successor is derived
// from it with the server secret, so that a retry within refresh_grace (a lost response, two
// tabs) gets the same successor instead of forking the family; presenting it later revokes the
// whole family, as does replaying the authorization code it came from.

// authzRequest is a checked /oauth/authorize request.
type authzRequest struct {
	app         signin.App
	redirectURI string
	scopes      []string
	state       string
	challenge   string
}

// authzError is an error of /oauth/authorize: to show (redirect == false: the client or its
// redirect URI cannot be trusted, RFC 6749 §4.1.2.1) or to send to the client's redirect URI.
type authzError struct {
	redirect    bool
	code, about string
}

// authorizeParams are the parameters of an authorization request, each at most once.
var authorizeParams = []string{"response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method"}

// parseAuthorize checks an authorization request (from the query, or the consent form).
func (g *Gateway) parseAuthorize(ctx context.Context, v url.Values) (*authzRequest, *authzError) {
	for _, p := range authorizeParams {
		if len(v[p]) > 1 {
			return nil, &authzError{code: "invalid_request", about: "the parameter " + p + " is given twice"}
		}
	}
	clientID := v.Get("client_id")
	if clientID == "" || len(clientID) > 128 {
		return nil, &authzError{code: "invalid_request", about: "unknown client_id"}
	}
	app, err := g.store.signin.AppByID(ctx, clientID)
	if err != nil {
		return nil, &authzError{code: "invalid_request", about: "unknown client_id"}
	}
	a := &authzRequest{app: app, redirectURI: v.Get("redirect_uri"), state: v.Get("state")}
	if !signin.MatchRedirectURI(app.RedirectURIs, a.redirectURI) {
		return nil, &authzError{code: "invalid_request", about: "redirect_uri is not one this client registered"}
	}
	if len(a.state) > maxStateLen {
		return nil, &authzError{code: "invalid_request", about: "state is too long"}
	}
	if v.Get("response_type") != "code" {
		return a, &authzError{redirect: true, code: "unsupported_response_type", about: "only response_type=code is supported"}
	}
	scopes, err := identity.ParseScopes(v.Get("scope"))
	if err != nil {
		return a, &authzError{redirect: true, code: "invalid_scope", about: "unknown scope"}
	}
	if len(scopes) == 0 {
		scopes = app.Scopes
	}
	if !signin.Covers(app.Scopes, scopes) {
		return a, &authzError{redirect: true, code: "invalid_scope", about: "a scope this client may not ask for"}
	}
	a.scopes = scopes
	if err := signin.CheckChallenge(v.Get("code_challenge"), v.Get("code_challenge_method")); err != nil {
		return a, &authzError{redirect: true, code: "invalid_request", about: "code_challenge with code_challenge_method=S256 is required"}
	}
	a.challenge = v.Get("code_challenge")
	return a, nil
}

func (g *Gateway) serveOAuthAuthorize(w http.ResponseWriter, r *http.Request) {
	pageHeaders(w)
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET")
		g.renderError(w, r, http.StatusMethodNotAllowed, "Method not allowed", "Use GET.")
		return
	}
	a, aerr := g.parseAuthorize(r.Context(), r.URL.Query())
	if aerr != nil {
		g.authorizeFailed(w, r, a, aerr)
		return
	}
	u, ok := g.requireSession(w, r)
	if !ok {
		return
	}
	if g.consented(r.Context(), u.ID, a.app.ClientID, a.scopes) {
		g.issueCode(w, r, u.ID, a)
		return
	}
	hidden := []hiddenField{{"flow", "oauth"}, {"response_type", "code"}, {"client_id", a.app.ClientID},
		{"redirect_uri", a.redirectURI}, {"scope", strings.Join(a.scopes, " ")}, {"state", a.state},
		{"code_challenge", a.challenge}, {"code_challenge_method", "S256"}}
	client := a.redirectURI
	if u, err := url.Parse(a.redirectURI); err == nil {
		client = u.Scheme + "://" + u.Host
	}
	pageHeaders(w, client)
	g.render(w, http.StatusOK, "consent", &pageData{Title: "Allow access", Email: u.Email, CSRF: g.csrfToken(w, r),
		Consent: &consentView{Client: client, AppName: a.app.Name, Scopes: scopeViews(a.scopes), Hidden: hidden}})
}

// authorizeFailed answers an authorization error: a page when the client cannot be trusted,
// else a redirect to its redirect URI with error, error_description and state.
func (g *Gateway) authorizeFailed(w http.ResponseWriter, r *http.Request, a *authzRequest, e *authzError) {
	if !e.redirect || a == nil {
		g.renderError(w, r, http.StatusBadRequest, "Cannot sign in to this app", e.about)
		return
	}
	q := url.Values{"error": {e.code}, "error_description": {e.about}}
	g.redirectToClient(w, r, a, q)
}

// redirectToClient sends the browser to the client's redirect URI with q (and state, iss).
func (g *Gateway) redirectToClient(w http.ResponseWriter, r *http.Request, a *authzRequest, q url.Values) {
	if a.state != "" {
		q.Set("state", a.state)
	}
	q.Set("iss", g.Signin.Issuer) // RFC 9207
	sep := "?"
	if strings.Contains(a.redirectURI, "?") {
		sep = "&"
	}
	redirectWithSecret(w, r, a.redirectURI+sep+q.Encode())
}

// issueCode makes a single-use, short-lived code bound to the client, the redirect URI and
// the PKCE challenge, and redirects with it.
func (g *Gateway) issueCode(w http.ResponseWriter, r *http.Request, userID string, a *authzRequest) {
	code := signin.NewToken("ac")
	now := g.clock().UTC()
	err := g.store.signin.CreateCode(r.Context(), signin.Code{Hash: signin.HashToken(code), ClientID: a.app.ClientID,
		UserID: userID, RedirectURI: a.redirectURI, Scopes: a.scopes, Challenge: a.challenge,
		CreatedAt: now, ExpiresAt: now.Add(time.Duration(g.Signin.CodeTTL))})
	if err != nil {
		g.redirectToClient(w, r, a, url.Values{"error": {"temporarily_unavailable"}, "error_description": {"try again"}})
		return
	}
	g.redirectToClient(w, r, a, url.Values{"code": {code}})
}

// oauthConsent takes the consent page's answer for an OAuth client.
func (g *Gateway) oauthConsent(w http.ResponseWriter, r *http.Request, u identity.User, approve bool) {
	a, aerr := g.parseAuthorize(r.Context(), r.PostForm)
	if aerr != nil {
		g.authorizeFailed(w, r, a, aerr)
		return
	}
	if !approve {
		g.redirectToClient(w, r, a, url.Values{"error": {"access_denied"}, "error_description": {"the user denied access"}})
		return
	}
	scopes := a.scopes
	if old, err := g.store.signin.ConsentFor(r.Context(), u.ID, a.app.ClientID); err == nil && old.RevokedAt == nil {
		for _, s := range old.Scopes {
			if !slices.Contains(scopes, s) {
				scopes = append(slices.Clone(scopes), s)
			}
		}
	}
	if err := g.store.signin.SaveConsent(r.Context(), signin.Consent{UserID: u.ID, Client: a.app.ClientID,
		Scopes: scopes, CreatedAt: g.clock().UTC()}); err != nil {
		g.redirectToClient(w, r, a, url.Values{"error": {"temporarily_unavailable"}, "error_description": {"try again"}})
		return
	}
	g.issueCode(w, r, u.ID, a)
}

// --- the token endpoint ---

// oauthError is an error of the token and revocation endpoints (RFC 6749 §5.2).
type oauthError struct {
	status      int
	code, about string
}

func (e *oauthError) Error() string { return e.code + ": " + e.about }

func grantError(about string) *oauthError {
	return &oauthError{http.StatusBadRequest, "invalid_grant", about}
}

// writeOAuth writes a token endpoint answer: JSON, never cached.
func writeOAuth(w http.ResponseWriter, status int, v any) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	body, _ := json.Marshal(v)
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// writeOAuthError writes err as RFC 6749 §5.2 says; other errors become server_error.
func writeOAuthError(w http.ResponseWriter, err error) {
	var oe *oauthError
	if !errors.As(err, &oe) {
		oe = oauthErrorFor(err)
	}
	if oe.code == "invalid_client" {
		w.Header().Set("WWW-Authenticate", `Basic realm="llm_gateway"`)
	}
	writeOAuth(w, oe.status, map[string]string{"error": oe.code, "error_description": oe.about})
}

// tokenParams reads a token request's parameters from its body: a form, or a JSON object of
// strings. Parameters in the query are not read (credentials never travel in URLs).
func tokenParams(r *http.Request) (url.Values, error) {
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct == "application/json" {
		var m map[string]any
		if err := json.NewDecoder(r.Body).Decode(&m); err != nil {
			return nil, &oauthError{http.StatusBadRequest, "invalid_request", "the body must be a JSON object"}
		}
		v := url.Values{}
		for k, x := range m {
			s, ok := x.(string)
			if !ok {
				return nil, &oauthError{http.StatusBadRequest, "invalid_request", "parameter " + k + " must be a string"}
			}
			v.Set(k, s)
		}
		return v, nil
	}
	if err := r.ParseForm(); err != nil {
		return nil, &oauthError{http.StatusBadRequest, "invalid_request", "unreadable form body"}
	}
	for k, vs := range r.PostForm {
		if len(vs) > 1 {
			return nil, &oauthError{http.StatusBadRequest, "invalid_request", "the parameter " + k + " is given twice"}
		}
	}
	return r.PostForm, nil
}

// tokenClient authenticates the client of a token request: HTTP Basic or client_secret in the
// body for confidential clients, client_id alone for public ones. It is the one check of
// clients for both token endpoints (/oauth/token, and /auth/v1/token with the client id in
// its apikey header).
func (g *Gateway) tokenClient(r *http.Request, v url.Values) (signin.App, error) {
	id, secret, basic := r.BasicAuth()
	if basic {
		var err1, err2 error
		id, err1 = url.QueryUnescape(id)
		secret, err2 = url.QueryUnescape(secret)
		if err1 != nil || err2 != nil || (v.Get("client_id") != "" && v.Get("client_id") != id) {
			return signin.App{}, &oauthError{http.StatusUnauthorized, "invalid_client", "client authentication failed"}
		}
	} else {
		id, secret = v.Get("client_id"), v.Get("client_secret")
	}
	bad := &oauthError{http.StatusUnauthorized, "invalid_client", "client authentication failed"}
	if id == "" || len(id) > 128 || len(secret) > 256 {
		return signin.App{}, bad
	}
	app, err := g.store.signin.AppByID(r.Context(), id)
	if errors.Is(err, identity.ErrNotFound) {
		return signin.App{}, bad
	}
	if err != nil {
		return signin.App{}, err
	}
	if app.SecretHash != nil {
		sum := sha256.Sum256([]byte(secret))
		if secret == "" || subtle.ConstantTimeCompare(sum[:], app.SecretHash) != 1 {
			return signin.App{}, bad
		}
	} else if secret != "" {
		return signin.App{}, bad // a public client has no secret to send
	}
	return app, nil
}

// tokenAnswer is a successful token response.
type tokenAnswer struct {
	AccessToken  string `json:"access_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	RefreshToken string `json:"refresh_token,omitempty"`
	Scope        string `json:"scope"`
	userID       string
}

// postOnly answers 405 to anything but a POST; it reports whether r is one.
func postOnly(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodPost {
		return true
	}
	w.Header().Set("Allow", "POST")
	writeOAuth(w, http.StatusMethodNotAllowed, map[string]string{"error": "invalid_request", "error_description": "use POST"})
	return false
}

// clientRequest reads the parameters of a token or revocation request (a POST, parameters in
// the body only) and authenticates its client; when it reports false it has answered.
func (g *Gateway) clientRequest(w http.ResponseWriter, r *http.Request) (url.Values, signin.App, bool) {
	if !postOnly(w, r) {
		return nil, signin.App{}, false
	}
	if r.URL.RawQuery != "" {
		writeOAuthError(w, &oauthError{http.StatusBadRequest, "invalid_request", "parameters go in the body, not the query"})
		return nil, signin.App{}, false
	}
	v, err := tokenParams(r)
	if err != nil {
		writeOAuthError(w, err)
		return nil, signin.App{}, false
	}
	app, err := g.tokenClient(r, v)
	if err != nil {
		writeOAuthError(w, err)
		return nil, signin.App{}, false
	}
	return v, app, true
}

func (g *Gateway) serveToken(w http.ResponseWriter, r *http.Request) {
	v, app, ok := g.clientRequest(w, r)
	if !ok {
		return
	}
	var (
		ans *tokenAnswer
		err error
	)
	switch v.Get("grant_type") {
	case "authorization_code":
		ans, err = g.grantCode(r.Context(), app, v)
	case "refresh_token":
		ans, err = g.grantRefresh(r.Context(), app, v.Get("refresh_token"), v.Get("scope"))
	case "password":
		ans, err = g.grantPassword(w, r, app, v.Get("username"), v.Get("password"), v.Get("scope"))
	case "":
		err = &oauthError{http.StatusBadRequest, "invalid_request", "grant_type is required"}
	default:
		err = &oauthError{http.StatusBadRequest, "unsupported_grant_type", "supported: authorization_code, refresh_token, password"}
	}
	if err != nil {
		writeOAuthError(w, err)
		return
	}
	writeOAuth(w, http.StatusOK, ans)
}

// grantCode redeems an authorization code (once: a replay revokes what it issued).
func (g *Gateway) grantCode(ctx context.Context, app signin.App, v url.Values) (*tokenAnswer, error) {
	code := v.Get("code")
	if code == "" || len(code) > 256 {
		return nil, grantError("invalid code")
	}
	hash := signin.HashToken(code)
	now := g.clock().UTC()
	st := g.store.signin
	c, err := st.RedeemCode(ctx, hash, now)
	switch {
	case errors.Is(err, signin.ErrCodeUsed):
		// RFC 6749 §4.1.2: the tokens issued from a replayed code are revoked.
		_ = st.RevokeRefreshByOrigin(ctx, hex.EncodeToString(hash[:]), now)
		return nil, grantError("the code was used already")
	case errors.Is(err, identity.ErrNotFound):
		return nil, grantError("invalid code")
	case err != nil:
		return nil, err
	}
	switch {
	case c.ClientID != app.ClientID:
		return nil, grantError("the code was issued to another client")
	case !now.Before(c.ExpiresAt):
		return nil, grantError("the code expired")
	case v.Get("redirect_uri") != c.RedirectURI:
		return nil, grantError("redirect_uri differs from the authorization request's")
	}
	if err := signin.VerifyPKCE(c.Challenge, v.Get("code_verifier")); err != nil {
		return nil, grantError("code_verifier does not match the code_challenge")
	}
	return g.issueTokens(ctx, c.UserID, app.ClientID, c.Scopes, hex.EncodeToString(hash[:]))
}

// grantRefresh rotates a refresh token and answers a new access token with its successor.
func (g *Gateway) grantRefresh(ctx context.Context, app signin.App, rt, scope string) (*tokenAnswer, error) {
	if rt == "" || len(rt) > 256 {
		return nil, grantError("invalid refresh token")
	}
	st := g.store.signin
	hash := signin.HashToken(rt)
	old, err := st.RefreshByHash(ctx, hash)
	if errors.Is(err, identity.ErrNotFound) {
		return nil, grantError("invalid refresh token")
	}
	if err != nil {
		return nil, err
	}
	if old.ClientID != app.ClientID {
		return nil, grantError("the refresh token was issued to another client")
	}
	scopes := old.Scopes
	if scope != "" {
		asked, err := identity.ParseScopes(scope)
		if err != nil || !signin.Covers(old.Scopes, asked) {
			return nil, &oauthError{http.StatusBadRequest, "invalid_scope", "scope must be within the original grant"}
		}
		scopes = asked
	}
	if _, err := g.store.users.UserByID(ctx, old.UserID); err != nil {
		return nil, grantError("the user no longer exists")
	}
	now := g.clock().UTC()
	next := signin.Successor(g.Signin.secret, rt)
	_, _, err = st.RotateRefresh(ctx, hash, signin.Refresh{Hash: signin.HashToken(next), CreatedAt: now,
		ExpiresAt: now.Add(time.Duration(g.Signin.RefreshTokenTTL))}, now, time.Duration(g.Signin.RefreshGrace))
	switch {
	case errors.Is(err, signin.ErrRefreshReused):
		return nil, grantError("the refresh token was used already; its family is revoked")
	case errors.Is(err, signin.ErrRefreshDead), errors.Is(err, identity.ErrNotFound):
		return nil, grantError("the refresh token is revoked or expired")
	case err != nil:
		return nil, err
	}
	access, err := g.mint(signin.TypeAccess, old.UserID, app.ClientID, scopes, noAddr, time.Duration(g.Signin.AccessTokenTTL))
	if err != nil {
		return nil, err
	}
	return &tokenAnswer{AccessToken: access, TokenType: "Bearer", ExpiresIn: int64(time.Duration(g.Signin.AccessTokenTTL) / time.Second),
		RefreshToken: next, Scope: strings.Join(scopes, " "), userID: old.UserID}, nil
}

// grantPassword signs a user in with email and password, for first-party clients only
// (RFC 9700 §2.4); throttled as the sign-in page is.
func (g *Gateway) grantPassword(w http.ResponseWriter, r *http.Request, app signin.App, email, password, scope string) (*tokenAnswer, error) {
	if !app.FirstParty {
		return nil, &oauthError{http.StatusBadRequest, "unauthorized_client", "the password grant is for first-party clients only"}
	}
	scopes := app.Scopes
	if scope != "" {
		asked, err := identity.ParseScopes(scope)
		if err != nil || !signin.Covers(app.Scopes, asked) {
			return nil, &oauthError{http.StatusBadRequest, "invalid_scope", "a scope this client may not ask for"}
		}
		scopes = asked
	}
	u, err := g.checkPassword(w, r, strings.TrimSpace(email), password)
	var rl *rateLimited
	switch {
	case errors.As(err, &rl):
		w.Header().Set("Retry-After", retrySeconds(rl.d.RetryAfter))
		return nil, &oauthError{http.StatusTooManyRequests, "temporarily_unavailable", "too many attempts; retry after " + retrySeconds(rl.d.RetryAfter) + " s"}
	case errors.Is(err, errWrongPassword):
		return nil, grantError("wrong email or password")
	case errors.Is(err, errHashBusy):
		w.Header().Set("Retry-After", hashBusyRetry)
		return nil, &oauthError{http.StatusServiceUnavailable, "temporarily_unavailable", "too many sign-ins at once; retry after " + hashBusyRetry + " s"}
	case err != nil:
		return nil, err
	}
	return g.issueTokens(r.Context(), u.ID, app.ClientID, scopes, "")
}

// noAddr: access tokens are not bound to an address.
var noAddr netip.Addr

// issueTokens answers an access token and the first refresh token of a new family.
func (g *Gateway) issueTokens(ctx context.Context, userID, clientID string, scopes []string, origin string) (*tokenAnswer, error) {
	s := g.Signin
	access, err := g.mint(signin.TypeAccess, userID, clientID, scopes, noAddr, time.Duration(s.AccessTokenTTL))
	if err != nil {
		return nil, err
	}
	rt := signin.NewToken("rt")
	now := g.clock().UTC()
	if err := g.store.signin.CreateRefresh(ctx, signin.Refresh{Hash: signin.HashToken(rt), Family: newID("fam"),
		UserID: userID, ClientID: clientID, Scopes: scopes, Origin: origin, CreatedAt: now,
		ExpiresAt: now.Add(time.Duration(s.RefreshTokenTTL))}); err != nil {
		return nil, err
	}
	return &tokenAnswer{AccessToken: access, TokenType: "Bearer", ExpiresIn: int64(time.Duration(s.AccessTokenTTL) / time.Second),
		RefreshToken: rt, Scope: strings.Join(scopes, " "), userID: userID}, nil
}

// serveSupabaseToken is the Human Intelligence seed's token endpoint:
// POST /auth/v1/token?grant_type=password|refresh_token, apikey: <a first-party client id>,
// JSON {email, password} or {refresh_token}.
func (g *Gateway) serveSupabaseToken(w http.ResponseWriter, r *http.Request) {
	if !postOnly(w, r) {
		return
	}
	var in struct {
		Email        string `json:"email"`
		Password     string `json:"password"`
		RefreshToken string `json:"refresh_token"`
		ClientSecret string `json:"client_secret"`
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		writeOAuthError(w, &oauthError{http.StatusBadRequest, "invalid_request", "the body must be a JSON object"})
		return
	}
	// The client is authenticated as at /oauth/token: a confidential one by its secret (HTTP
	// Basic, whose id must then be the apikey, or client_secret in the body).
	clientID := r.Header.Get("apikey")
	if clientID == "" {
		writeOAuthError(w, &oauthError{http.StatusUnauthorized, "invalid_client", "the apikey header must name a registered app"})
		return
	}
	app, err := g.tokenClient(r, url.Values{"client_id": {clientID}, "client_secret": {in.ClientSecret}})
	if err != nil {
		writeOAuthError(w, err)
		return
	}
	if !app.FirstParty {
		writeOAuthError(w, &oauthError{http.StatusBadRequest, "unauthorized_client", "this endpoint is for first-party apps only"})
		return
	}
	var ans *tokenAnswer
	switch r.URL.Query().Get("grant_type") {
	case "password":
		ans, err = g.grantPassword(w, r, app, in.Email, in.Password, "")
	case "refresh_token":
		ans, err = g.grantRefresh(r.Context(), app, in.RefreshToken, "")
	default:
		err = &oauthError{http.StatusBadRequest, "unsupported_grant_type", "grant_type must be password or refresh_token"}
	}
	if err != nil {
		writeOAuthError(w, err)
		return
	}
	u, err := g.store.users.UserByID(r.Context(), ans.userID)
	if err != nil {
		writeOAuthError(w, err)
		return
	}
	writeOAuth(w, http.StatusOK, map[string]any{
		"access_token": ans.AccessToken, "token_type": "bearer", "expires_in": ans.ExpiresIn,
		"expires_at": g.clock().Unix() + ans.ExpiresIn, "refresh_token": ans.RefreshToken,
		"user": map[string]string{"id": u.ID, "email": u.Email},
	})
}

// serveRevoke revokes a refresh token's family (RFC 7009). Access tokens are short-lived JWTs
// and are not revocable one by one; an unknown token, or another client's, is answered 200
// as well (§2.2), and nothing happens.
func (g *Gateway) serveRevoke(w http.ResponseWriter, r *http.Request) {
	v, app, ok := g.clientRequest(w, r)
	if !ok {
		return
	}
	tok := v.Get("token")
	if tok == "" {
		writeOAuthError(w, &oauthError{http.StatusBadRequest, "invalid_request", "token is required"})
		return
	}
	if len(tok) <= 256 {
		rt, err := g.store.signin.RefreshByHash(r.Context(), signin.HashToken(tok))
		if err == nil && rt.ClientID == app.ClientID {
			if err := g.store.signin.RevokeRefreshFamily(r.Context(), rt.Family, g.clock().UTC()); err != nil {
				writeOAuthError(w, err)
				return
			}
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
}

// serveOAuthMetadata is the RFC 8414 authorization server metadata.
func (g *Gateway) serveOAuthMetadata(w http.ResponseWriter, r *http.Request) {
	iss := g.Signin.Issuer
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Cache-Control", "public, max-age=300")
	body, _ := json.Marshal(map[string]any{
		"issuer":                                         iss,
		"authorization_endpoint":                         iss + "/oauth/authorize",
		"token_endpoint":                                 iss + "/oauth/token",
		"revocation_endpoint":                            iss + "/oauth/revoke",
		"jwks_uri":                                       iss + "/.well-known/jwks.json",
		"response_types_supported":                       []string{"code"},
		"response_modes_supported":                       []string{"query"},
		"grant_types_supported":                          []string{"authorization_code", "refresh_token", "password"},
		"code_challenge_methods_supported":               []string{"S256"},
		"token_endpoint_auth_methods_supported":          []string{"none", "client_secret_basic", "client_secret_post"},
		"revocation_endpoint_auth_methods_supported":     []string{"none", "client_secret_basic", "client_secret_post"},
		"scopes_supported":                               identity.AllScopes,
		"authorization_response_iss_parameter_supported": true,
	})
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(append(body, '\n'))
}

// serveJWKS publishes the gateway's signing keys (the current one and the one before it).
func (g *Gateway) serveJWKS(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/jwk-set+json")
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Cache-Control", "public, max-age=300")
	body := g.Signin.currentKeys().JWKS()
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}
