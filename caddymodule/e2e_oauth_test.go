package caddymodule_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

// OAuth 2.0 end to end: golang.org/x/oauth2 as an independent client, then the reliability
// cases of RELIABILITY.md rows 18-32 against the running gateway.

const clientRedirect = "https://client.test/cb"

// appView is a registered app as the admin API answers it.
type appView struct {
	ClientID     string `json:"client_id"`
	ClientSecret string `json:"client_secret"`
}

// createApp registers an OAuth app through the admin API.
func (e *env) createApp(body map[string]any) appView {
	e.t.Helper()
	var a appView
	e.adminCall(http.MethodPost, "/llm_gateway/apps", body, http.StatusCreated, &a, nil)
	if a.ClientID == "" {
		e.t.Fatal("no client_id")
	}
	return a
}

// publicApp is a third-party public client (PKCE only) allowed the usual scopes.
func (e *env) publicApp() appView {
	return e.createApp(map[string]any{"name": "Client App", "redirect_uris": []string{clientRedirect},
		"scopes": []string{"chat:write", "models:read", "keys:read", "keys:write", "offline_access"}})
}

// pkce is a verifier and its S256 challenge.
func pkce() (verifier, challenge string) {
	verifier = oauth2.GenerateVerifier()
	sum := sha256.Sum256([]byte(verifier))
	return verifier, base64.RawURLEncoding.EncodeToString(sum[:])
}

// authorizeQuery is a valid authorization request's query.
func authorizeQuery(clientID, challenge, state string) url.Values {
	return url.Values{"response_type": {"code"}, "client_id": {clientID}, "redirect_uri": {clientRedirect},
		"scope": {"chat:write models:read offline_access"}, "state": {state}, "code_challenge": {challenge},
		"code_challenge_method": {"S256"}}
}

// clientRedirectOf checks a redirect to the client's redirect URI and returns its query.
func clientRedirectOf(t testing.TB, r *response) url.Values {
	t.Helper()
	if r.status != http.StatusFound && r.status != http.StatusSeeOther {
		t.Fatalf("want a redirect to the client, got %s", r)
	}
	loc := r.header.Get("Location")
	base, q, _ := strings.Cut(loc, "?")
	if base != clientRedirect {
		t.Fatalf("Location %q is not the registered redirect URI", loc)
	}
	v, err := url.ParseQuery(q)
	if err != nil {
		t.Fatal(err)
	}
	if v.Get("iss") != signinIssuer {
		t.Errorf("iss = %q (RFC 9207)", v.Get("iss"))
	}
	return v
}

// code runs an authorization request (consenting when asked) and returns the code.
func (b *browser) code(q url.Values) string {
	t := b.e.t
	t.Helper()
	r := b.get("/oauth/authorize?" + q.Encode())
	if r.status == http.StatusOK {
		pageSecurityHeaders(t, "oauth consent", r)
		r = b.do(http.MethodPost, "/auth/consent", consentForm(t, r, "approve"), nil)
	}
	v := clientRedirectOf(t, r)
	if v.Get("state") != q.Get("state") || v.Get("code") == "" {
		t.Fatalf("redirect %v", v)
	}
	return v.Get("code")
}

// tokenRequest is a request of form to the token endpoint, for goroutines to send themselves
// (they may not end the test as e.token does).
func (e *env) tokenRequest(form url.Values) *http.Request {
	return e.newRequest(context.Background(), http.MethodPost, e.gw+"/oauth/token", form.Encode(),
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
}

// token posts a form to the token endpoint.
func (e *env) token(form url.Values, hdr map[string]string) *response {
	e.t.Helper()
	h := map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
	for k, v := range hdr {
		h[k] = v
	}
	r := e.request(http.MethodPost, e.gw+"/oauth/token", form.Encode(), h)
	if r.header.Get("Cache-Control") != "no-store" {
		e.t.Errorf("token answer without Cache-Control: no-store: %v", r.header)
	}
	return r
}

// oauthErrorOf checks an RFC 6749 §5.2 error answer.
func oauthErrorOf(t testing.TB, r *response, status int, code string) {
	t.Helper()
	var body struct {
		Error string `json:"error"`
	}
	if r.status != status || json.Unmarshal(r.body, &body) != nil || body.Error != code {
		t.Fatalf("want %d %s, got %s", status, code, r)
	}
}

type tokenSet struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	Scope        string `json:"scope"`
}

func tokensOf(t testing.TB, r *response) tokenSet {
	t.Helper()
	var tk tokenSet
	if r.status != http.StatusOK || json.Unmarshal(r.body, &tk) != nil || tk.AccessToken == "" || tk.RefreshToken == "" {
		t.Fatalf("want tokens, got %s", r)
	}
	return tk
}

// TestOAuthWithXOAuth2: golang.org/x/oauth2 completes code + PKCE, uses the access token at the
// gateway (charged to the user), and refreshes (the refresh token rotated).
func TestOAuthWithXOAuth2(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	app := e.publicApp()
	b := newBrowser(e)
	b.signup("oauth@example.com", "a fine password")
	user := e.userIDByEmail("oauth@example.com")

	meta := e.request(http.MethodGet, e.gw+"/.well-known/oauth-authorization-server", nil, nil).object(t)
	if meta["issuer"] != signinIssuer || meta["token_endpoint"] != signinIssuer+"/oauth/token" {
		t.Fatalf("metadata: %v", meta)
	}
	if m, _ := json.Marshal(meta["code_challenge_methods_supported"]); string(m) != `["S256"]` {
		t.Fatalf("code_challenge_methods_supported %s", m)
	}

	conf := &oauth2.Config{ClientID: app.ClientID, RedirectURL: clientRedirect,
		Scopes:   []string{"chat:write", "models:read", "offline_access"},
		Endpoint: oauth2.Endpoint{AuthURL: e.gw + "/oauth/authorize", TokenURL: e.gw + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	verifier := oauth2.GenerateVerifier()
	authURL := conf.AuthCodeURL("xyz", oauth2.S256ChallengeOption(verifier))
	r := b.get(authURL)
	if r.status != http.StatusOK || !strings.Contains(string(r.body), "Client App") {
		t.Fatalf("consent page: %s", r)
	}
	r = b.do(http.MethodPost, "/auth/consent", consentForm(t, r, "approve"), nil)
	v := clientRedirectOf(t, r)
	if v.Get("state") != "xyz" {
		t.Fatalf("state %q", v.Get("state"))
	}
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, e.client)
	tok, err := conf.Exchange(ctx, v.Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("exchange: %v", err)
	}
	if tok.RefreshToken == "" || tok.Expiry.Before(time.Now().Add(50*time.Minute)) {
		t.Fatalf("token %+v", tok)
	}
	before := e.balance(user)
	r = e.chat(bearer(tok.AccessToken))
	if r.status != http.StatusOK {
		t.Fatalf("chat with the access token: %s", r)
	}
	if got := e.balance(user); got != before-amountOf(t, r.header.Get("X-Credits-Charged")) {
		t.Fatalf("balance %s after a charge of %s from %s", got, r.header.Get("X-Credits-Charged"), before)
	}
	// The consent is remembered: the next authorization goes straight back.
	r = b.get(conf.AuthCodeURL("again", oauth2.S256ChallengeOption(verifier)))
	if clientRedirectOf(t, r).Get("code") == "" {
		t.Fatal("no code without consent the second time")
	}

	// Refresh: a new access token and a rotated refresh token.
	expired := &oauth2.Token{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, Expiry: time.Now().Add(-time.Minute)}
	fresh, err := conf.TokenSource(ctx, expired).Token()
	if err != nil {
		t.Fatalf("refresh: %v", err)
	}
	if fresh.RefreshToken == "" || fresh.RefreshToken == tok.RefreshToken || fresh.AccessToken == tok.AccessToken {
		t.Fatalf("refresh did not rotate: %+v", fresh)
	}
	if r := e.chat(bearer(fresh.AccessToken)); r.status != http.StatusOK {
		t.Fatalf("chat with the refreshed token: %s", r)
	}
	// The rotated token within the grace period yields the same successor (a lost response).
	again, err := conf.TokenSource(ctx, expired).Token()
	if err != nil || again.RefreshToken != fresh.RefreshToken {
		t.Fatalf("replay within grace: %v %+v", err, again)
	}

	// No code, token or refresh token reaches a log.
	secrets := []string{v.Get("code"), tok.AccessToken, tok.RefreshToken, fresh.RefreshToken}
	for _, name := range []string{"access.log", "caddy.log"} {
		raw, _ := os.ReadFile(filepath.Join(e.dir, name))
		for _, s := range secrets {
			if strings.Contains(string(raw), s) {
				t.Errorf("%s holds a secret", name)
			}
		}
	}
}

// TestOAuthAuthorizeErrors: redirect URIs match byte for byte or nothing is redirected;
// other errors go back to the client with error and state; PKCE S256 is required.
func TestOAuthAuthorizeErrors(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	app := e.publicApp()
	b := newBrowser(e)
	b.signup("errs@example.com", "a fine password")
	_, challenge := pkce()

	for _, ru := range []string{clientRedirect + "/", "https://CLIENT.test/cb", clientRedirect + "?x=1", "https://client.test/cb/%2e%2e/cb",
		"https://client.test@evil.test/cb", "https://client.test.evil.test/cb", clientRedirect + "#f", "https://client.test/CB",
		"javascript:alert(1)", "", "https://client.test/cb/../cb", "https://client.test/cb;x", "http://client.test/cb"} {
		q := authorizeQuery(app.ClientID, challenge, "s")
		q.Set("redirect_uri", ru)
		r := b.get("/oauth/authorize?" + q.Encode())
		if r.status != http.StatusBadRequest || r.header.Get("Location") != "" {
			t.Errorf("redirect_uri %q: %s, Location %q", ru, r, r.header.Get("Location"))
		}
	}
	q := authorizeQuery("app_unknown", challenge, "s")
	if r := b.get("/oauth/authorize?" + q.Encode()); r.status != http.StatusBadRequest || r.header.Get("Location") != "" {
		t.Errorf("unknown client: %s", r)
	}
	q = authorizeQuery(app.ClientID, challenge, "s")
	q.Add("redirect_uri", clientRedirect)
	if r := b.get("/oauth/authorize?" + q.Encode()); r.status != http.StatusBadRequest || r.header.Get("Location") != "" {
		t.Errorf("redirect_uri twice: %s", r)
	}

	for name, tc := range map[string]struct {
		set  map[string]string
		code string
	}{
		"response_type token": {map[string]string{"response_type": "token"}, "unsupported_response_type"},
		"unknown scope":       {map[string]string{"scope": "chat:write admin"}, "invalid_scope"},
		"scope not allowed":   {map[string]string{"scope": "usage:read"}, "invalid_scope"},
		"no challenge":        {map[string]string{"code_challenge": ""}, "invalid_request"},
		"plain":               {map[string]string{"code_challenge_method": "plain"}, "invalid_request"},
		"no method":           {map[string]string{"code_challenge_method": ""}, "invalid_request"},
		"short challenge":     {map[string]string{"code_challenge": "abc"}, "invalid_request"},
	} {
		q := authorizeQuery(app.ClientID, challenge, "st-"+name)
		for k, v := range tc.set {
			q.Set(k, v)
		}
		r := b.get("/oauth/authorize?" + q.Encode())
		v := clientRedirectOf(t, r)
		if v.Get("error") != tc.code || v.Get("state") != "st-"+name || v.Get("code") != "" {
			t.Errorf("%s: %v", name, v)
		}
	}
	// A denial: access_denied with the state.
	r := b.get("/oauth/authorize?" + authorizeQuery(app.ClientID, challenge, "d").Encode())
	r = b.do(http.MethodPost, "/auth/consent", consentForm(t, r, "deny"), nil)
	if v := clientRedirectOf(t, r); v.Get("error") != "access_denied" || v.Get("state") != "d" {
		t.Errorf("deny: %v", v)
	}
	// Tampered hidden fields are checked again on the POST.
	r = b.get("/oauth/authorize?" + authorizeQuery(app.ClientID, challenge, "t").Encode())
	f := consentForm(t, r, "approve")
	f.Set("redirect_uri", "https://evil.test/cb")
	if r := b.do(http.MethodPost, "/auth/consent", f, nil); r.status != http.StatusBadRequest || r.header.Get("Location") != "" {
		t.Errorf("tampered redirect_uri: %s", r)
	}
}

// TestOAuthCodes: codes are single-use (one of 50 concurrent redemptions wins; a replay
// revokes what the code gave), bound to their client, redirect URI and PKCE verifier.
func TestOAuthCodes(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	app := e.publicApp()
	other := e.publicApp()
	b := newBrowser(e)
	b.signup("codes@example.com", "a fine password")
	redeem := func(code, verifier, clientID, redirect string) *response {
		return e.token(url.Values{"grant_type": {"authorization_code"}, "code": {code}, "code_verifier": {verifier},
			"client_id": {clientID}, "redirect_uri": {redirect}}, nil)
	}

	verifier, challenge := pkce()
	code := b.code(authorizeQuery(app.ClientID, challenge, "a"))
	first := tokensOf(t, redeem(code, verifier, app.ClientID, clientRedirect))
	oauthErrorOf(t, redeem(code, verifier, app.ClientID, clientRedirect), http.StatusBadRequest, "invalid_grant")
	// The replay revoked the refresh token the code gave.
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {first.RefreshToken},
		"client_id": {app.ClientID}}, nil), http.StatusBadRequest, "invalid_grant")

	for name, tc := range map[string]struct{ verifier, client, redirect string }{
		"wrong verifier":     {strings.Repeat("a", 43), app.ClientID, clientRedirect},
		"no verifier":        {"", app.ClientID, clientRedirect},
		"short verifier":     {verifier[:42], app.ClientID, clientRedirect},
		"other client":       {verifier, other.ClientID, clientRedirect},
		"other redirect_uri": {verifier, app.ClientID, clientRedirect + "/"},
		"no redirect_uri":    {verifier, app.ClientID, ""},
	} {
		c := b.code(authorizeQuery(app.ClientID, challenge, "x"))
		oauthErrorOf(t, redeem(c, tc.verifier, tc.client, tc.redirect), http.StatusBadRequest, "invalid_grant")
		// The failed attempt used the code up.
		oauthErrorOf(t, redeem(c, verifier, app.ClientID, clientRedirect), http.StatusBadRequest, "invalid_grant")
		_ = name
	}

	// 50 concurrent redemptions of one code: exactly one gets tokens.
	for round := 0; round < 5; round++ {
		c := b.code(authorizeQuery(app.ClientID, challenge, "race"))
		var wg sync.WaitGroup
		var mu sync.Mutex
		wins := 0
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := e.client.Do(e.tokenRequest(url.Values{"grant_type": {"authorization_code"}, "code": {c},
					"code_verifier": {verifier}, "client_id": {app.ClientID}, "redirect_uri": {clientRedirect}}))
				if err != nil {
					t.Error(err)
					return
				}
				resp.Body.Close()
				mu.Lock()
				defer mu.Unlock()
				switch resp.StatusCode {
				case http.StatusOK:
					wins++
				case http.StatusBadRequest:
				default:
					t.Errorf("status %d", resp.StatusCode)
				}
			}()
		}
		wg.Wait()
		if wins != 1 {
			t.Fatalf("round %d: %d redemptions won", round, wins)
		}
	}
}

// TestOAuthRefresh: refresh tokens rotate; concurrent refreshes of one token all get the same
// successor (no fork, no family revoke); reuse of a superseded token revokes the family; a
// token is bound to its client; RFC 7009 revocation ends the family.
func TestOAuthRefresh(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	app := e.publicApp()
	other := e.publicApp()
	b := newBrowser(e)
	b.signup("refresh@example.com", "a fine password")
	verifier, challenge := pkce()
	grant := func() tokenSet {
		c := b.code(authorizeQuery(app.ClientID, challenge, "r"))
		return tokensOf(t, e.token(url.Values{"grant_type": {"authorization_code"}, "code": {c}, "code_verifier": {verifier},
			"client_id": {app.ClientID}, "redirect_uri": {clientRedirect}}, nil))
	}
	refresh := func(rt, client string) *response {
		return e.token(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {client}}, nil)
	}

	rt1 := grant().RefreshToken
	// 20 concurrent refreshes (tabs, retries): one rotation, the same successor for all.
	var wg sync.WaitGroup
	succ := make(chan string, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := e.client.Do(e.tokenRequest(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt1},
				"client_id": {app.ClientID}}))
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var tk tokenSet
			if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&tk) != nil {
				t.Errorf("concurrent refresh: %d", resp.StatusCode)
				return
			}
			succ <- tk.RefreshToken
		}()
	}
	wg.Wait()
	close(succ)
	var rt2 string
	for s := range succ {
		if rt2 == "" {
			rt2 = s
		}
		if s != rt2 || s == rt1 {
			t.Fatalf("forked successors: %q and %q", rt2, s)
		}
	}
	// RT2 works and rotates to RT3; RT1 now (its successor no longer live) is reuse: the
	// whole family is revoked, RT3 included.
	rt3 := tokensOf(t, refresh(rt2, app.ClientID)).RefreshToken
	oauthErrorOf(t, refresh(rt1, app.ClientID), http.StatusBadRequest, "invalid_grant")
	oauthErrorOf(t, refresh(rt3, app.ClientID), http.StatusBadRequest, "invalid_grant")

	// Bound to its client: another client gets invalid_grant, and the token still works.
	rt := grant().RefreshToken
	oauthErrorOf(t, refresh(rt, other.ClientID), http.StatusBadRequest, "invalid_grant")
	rt = tokensOf(t, refresh(rt, app.ClientID)).RefreshToken
	// A narrower scope on refresh is fine; a wider one is not.
	r := e.token(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {app.ClientID}, "scope": {"keys:write"}}, nil)
	oauthErrorOf(t, r, http.StatusBadRequest, "invalid_scope")
	// Revocation (RFC 7009): 200, and the family is gone; unknown tokens are 200 too.
	rev := e.request(http.MethodPost, e.gw+"/oauth/revoke", url.Values{"token": {rt}, "client_id": {app.ClientID}}.Encode(),
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
	if rev.status != http.StatusOK {
		t.Fatalf("revoke: %s", rev)
	}
	oauthErrorOf(t, refresh(rt, app.ClientID), http.StatusBadRequest, "invalid_grant")
	if r := e.request(http.MethodPost, e.gw+"/oauth/revoke", url.Values{"token": {"rt_unknown"}, "client_id": {app.ClientID}}.Encode(),
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"}); r.status != http.StatusOK {
		t.Fatalf("revoke unknown: %s", r)
	}

	// Disconnecting the app on the account page ends its refresh tokens and asks consent again.
	rt = grant().RefreshToken
	account := b.get("/account")
	if !strings.Contains(string(account.body), "Client App") {
		t.Fatalf("account page lists no connected app: %s", account)
	}
	r = b.do(http.MethodPost, "/account/apps/revoke", url.Values{"csrf": {csrf(t, account)}, "client": {app.ClientID}}, nil)
	if r.status != http.StatusSeeOther {
		t.Fatalf("disconnect: %s", r)
	}
	oauthErrorOf(t, refresh(rt, app.ClientID), http.StatusBadRequest, "invalid_grant")
	if r := b.get("/oauth/authorize?" + authorizeQuery(app.ClientID, challenge, "c").Encode()); r.status != http.StatusOK {
		t.Fatalf("no consent asked after disconnecting: %s", r)
	}
}

// TestTokenEndpoint: the token endpoint's errors (RFC 6749 §5.2), client authentication,
// and the password grant for first-party clients only, in both shapes.
func TestTokenEndpoint(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	third := e.publicApp()
	first := e.createApp(map[string]any{"name": "Our App", "first_party": true, "redirect_uris": []string{},
		"scopes": []string{"chat:write", "models:read", "keys:read", "keys:write", "credits:read", "offline_access"}})
	conf := e.createApp(map[string]any{"name": "Server", "confidential": true, "first_party": true, "redirect_uris": []string{clientRedirect}})
	if conf.ClientSecret == "" || first.ClientSecret != "" {
		t.Fatalf("secrets: confidential %q, public %q", conf.ClientSecret, first.ClientSecret)
	}
	b := newBrowser(e)
	b.signup("pw@example.com", "password grant pw")
	user := e.userIDByEmail("pw@example.com")

	if r := e.request(http.MethodGet, e.gw+"/oauth/token", nil, nil); r.status != http.StatusMethodNotAllowed {
		t.Errorf("GET: %s", r)
	}
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"device_code"}, "client_id": {third.ClientID}}, nil), http.StatusBadRequest, "unsupported_grant_type")
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"password"}, "client_id": {"app_nope"}}, nil), http.StatusUnauthorized, "invalid_client")
	r := e.token(url.Values{"grant_type": {"password"}, "username": {"pw@example.com"}, "password": {"password grant pw"}},
		map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(conf.ClientID+":wrong"))})
	oauthErrorOf(t, r, http.StatusUnauthorized, "invalid_client")
	if !strings.HasPrefix(r.header.Get("WWW-Authenticate"), "Basic") {
		t.Errorf("invalid_client without WWW-Authenticate: %v", r.header)
	}
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"password"}, "client_id": {conf.ClientID}, "username": {"pw@example.com"},
		"password": {"password grant pw"}}, nil), http.StatusUnauthorized, "invalid_client")
	q := e.request(http.MethodPost, e.gw+"/oauth/token?grant_type=password&client_id="+first.ClientID+"&username=pw@example.com&password=x", "",
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
	oauthErrorOf(t, q, http.StatusBadRequest, "invalid_request")

	// The password grant: first-party only.
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"password"}, "client_id": {third.ClientID}, "username": {"pw@example.com"},
		"password": {"password grant pw"}}, nil), http.StatusBadRequest, "unauthorized_client")
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"password"}, "client_id": {first.ClientID}, "username": {"pw@example.com"},
		"password": {"wrong"}}, nil), http.StatusBadRequest, "invalid_grant")
	tk := tokensOf(t, e.token(url.Values{"grant_type": {"password"}, "client_id": {first.ClientID}, "username": {"pw@example.com"},
		"password": {"password grant pw"}}, nil))
	if tk.TokenType != "Bearer" || tk.ExpiresIn != 3600 {
		t.Errorf("token answer %+v", tk)
	}
	if r := e.chat(bearer(tk.AccessToken)); r.status != http.StatusOK {
		t.Fatalf("chat with a password grant token: %s", r)
	}
	// Confidential client with Basic auth, and a JSON body.
	tokensOf(t, e.request(http.MethodPost, e.gw+"/oauth/token", map[string]string{"grant_type": "password",
		"username": "pw@example.com", "password": "password grant pw"},
		map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(conf.ClientID+":"+conf.ClientSecret))}))

	// The Human Intelligence seed's shape.
	hi := e.request(http.MethodPost, e.gw+"/auth/v1/token?grant_type=password", map[string]string{"email": "pw@example.com",
		"password": "password grant pw"}, map[string]string{"apikey": first.ClientID})
	var ans struct {
		AccessToken  string `json:"access_token"`
		TokenType    string `json:"token_type"`
		ExpiresIn    int64  `json:"expires_in"`
		RefreshToken string `json:"refresh_token"`
		User         struct{ ID, Email string }
	}
	if hi.status != http.StatusOK || json.Unmarshal(hi.body, &ans) != nil || ans.TokenType != "bearer" || ans.User.ID != user ||
		ans.User.Email != "pw@example.com" || ans.RefreshToken == "" || ans.ExpiresIn != 3600 {
		t.Fatalf("/auth/v1/token: %s", hi)
	}
	hr := e.request(http.MethodPost, e.gw+"/auth/v1/token?grant_type=refresh_token", map[string]string{"refresh_token": ans.RefreshToken},
		map[string]string{"apikey": first.ClientID})
	if hr.status != http.StatusOK || !strings.Contains(string(hr.body), `"user":{"email":"pw@example.com","id":"`+user+`"}`) {
		t.Fatalf("/auth/v1/token refresh: %s", hr)
	}
	oauthErrorOf(t, e.request(http.MethodPost, e.gw+"/auth/v1/token?grant_type=password", map[string]string{"email": "pw@example.com",
		"password": "password grant pw"}, map[string]string{"apikey": third.ClientID}), http.StatusBadRequest, "unauthorized_client")
	oauthErrorOf(t, e.request(http.MethodPost, e.gw+"/auth/v1/token?grant_type=password", map[string]string{"email": "pw@example.com",
		"password": "password grant pw"}, nil), http.StatusUnauthorized, "invalid_client")

	// The self-service API with the user's token; user B cannot reach A's key (BOLA).
	created := e.request(http.MethodPost, e.gw+"/v1/auth/keys", map[string]any{"name": "from a token", "scopes": []string{"chat:write"}}, bearer(tk.AccessToken))
	if created.status != http.StatusCreated {
		t.Fatalf("create a key with the user's token: %s", created)
	}
	var ck struct {
		APIKey struct{ ID, Key string } `json:"api_key"`
	}
	_ = json.Unmarshal(created.body, &ck)
	if r := e.chat(bearer(ck.APIKey.Key)); r.status != http.StatusOK {
		t.Fatalf("the new key: %s", r)
	}
	nb := newBrowser(e)
	nb.signup("bob@example.com", "bob's password!")
	bob := tokensOf(t, e.token(url.Values{"grant_type": {"password"}, "client_id": {first.ClientID}, "username": {"bob@example.com"},
		"password": {"bob's password!"}}, nil))
	for _, c := range []struct{ method, path string }{{http.MethodGet, "/v1/auth/keys/" + ck.APIKey.ID},
		{http.MethodDelete, "/v1/auth/keys/" + ck.APIKey.ID}, {http.MethodPost, "/v1/auth/keys/" + ck.APIKey.ID + "/rotate"}} {
		errorOf(t, e.request(c.method, e.gw+c.path, nil, bearer(bob.AccessToken)), http.StatusNotFound, "not_found")
	}
	if r := e.request(http.MethodGet, e.gw+"/v1/auth/keys", nil, bearer(bob.AccessToken)); r.status != http.StatusOK || strings.Contains(string(r.body), ck.APIKey.ID) {
		t.Fatalf("bob's list: %s", r)
	}
}

// TestAccountPageKeys: the account page creates (shown once), rotates and revokes keys.
func TestAccountPageKeys(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("keys@example.com", "a fine password")
	page := b.get("/account")
	r := b.do(http.MethodPost, "/account/keys", url.Values{"csrf": {csrf(t, page)}, "name": {"laptop"}}, nil)
	key := regexpFind(t, `<code id="new-key">([^<]+)</code>`, r)
	if chat := e.chat(bearer(key)); chat.status != http.StatusOK {
		t.Fatalf("the key from the account page: %s", chat)
	}
	page = b.get("/account")
	if strings.Contains(string(page.body), key) || !strings.Contains(string(page.body), "laptop") {
		t.Fatal("the account page shows the key again, or not its name")
	}
	id := regexpFind(t, `action="/account/keys/([^/"]+)/rotate"`, page)
	r = b.do(http.MethodPost, "/account/keys/"+id+"/rotate", url.Values{"csrf": {csrf(t, page)}}, nil)
	rotated := regexpFind(t, `<code id="new-key">([^<]+)</code>`, r)
	if rotated == key || e.chat(bearer(rotated)).status != http.StatusOK || e.chat(bearer(key)).status != http.StatusOK {
		t.Fatal("rotation: the new key, and the old one in its grace, must both work")
	}
	newID := strings.Split(strings.TrimPrefix(rotated, "sk_live_"), "_")[0]
	page = b.get("/account")
	if r := b.do(http.MethodPost, "/account/keys/"+newID+"/revoke", url.Values{"csrf": {csrf(t, page)}}, nil); r.status != http.StatusSeeOther {
		t.Fatalf("revoke: %s", r)
	}
	errorOf(t, e.chat(bearer(rotated)), http.StatusUnauthorized, "revoked_api_key")
	// Another user's key id: not found, nothing revoked.
	other := newBrowser(e)
	other.signup("other@example.com", "a fine password")
	op := other.get("/account")
	if r := other.do(http.MethodPost, "/account/keys/"+id+"/revoke", url.Values{"csrf": {csrf(t, op)}}, nil); r.status != http.StatusNotFound {
		t.Fatalf("revoking another user's key: %s", r)
	}
	if e.chat(bearer(key)).status != http.StatusOK {
		t.Fatal("another user revoked the key")
	}
}

func regexpFind(t testing.TB, pattern string, r *response) string {
	t.Helper()
	m := regexp.MustCompile(pattern).FindSubmatch(r.body)
	if m == nil {
		t.Fatalf("%s not found in %s", pattern, r)
	}
	return htmlUnescape(string(m[1]))
}

// TestExternalIssuer: an external issuer's token (ES256, keys from its JWKS URL) is accepted
// and its subject becomes a user of the gateway, the same one each time; a token signed by
// another key, or for another audience, is not.
func TestExternalIssuer(t *testing.T) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pad := func(n *big.Int) string {
		b := make([]byte, 32)
		n.FillBytes(b)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{{"kty": "EC", "crv": "P-256", "kid": "k1",
			"alg": "ES256", "use": "sig", "x": pad(priv.X), "y": pad(priv.Y)}}})
	}))
	defer jwks.Close()
	e := startGateway(t, signinSetup(`
			external_issuer https://idp.test {
				jwks_url `+jwks.URL+`
				audience llm-gateway
				algorithms ES256
			}`))
	sign := func(key *ecdsa.PrivateKey, claims map[string]any) string {
		h := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES256","typ":"JWT","kid":"k1"}`))
		p, _ := json.Marshal(claims)
		input := h + "." + base64.RawURLEncoding.EncodeToString(p)
		sum := sha256.Sum256([]byte(input))
		r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
		if err != nil {
			t.Fatal(err)
		}
		sig := make([]byte, 64)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
		return input + "." + base64.RawURLEncoding.EncodeToString(sig)
	}
	now := time.Now().Unix()
	claims := map[string]any{"iss": "https://idp.test", "aud": "llm-gateway", "sub": "alice-42", "iat": now, "exp": now + 300}
	tok := sign(priv, claims)
	// A new user without credits: 402 (to the billing URL), which proves the token was taken.
	r := e.chat(bearer(tok))
	errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
	var user string
	if err := e.openDB().QueryRow(`SELECT user_id FROM external_subjects WHERE issuer = ? AND subject = ?`, "https://idp.test", "alice-42").Scan(&user); err != nil {
		t.Fatalf("no linked user: %v", err)
	}
	e.adminCall(http.MethodPost, "/llm_gateway/users/"+user+"/credits", map[string]any{"amount": "1"}, http.StatusOK, nil, nil)
	if r := e.chat(bearer(tok)); r.status != http.StatusOK {
		t.Fatalf("external token with credits: %s", r)
	}
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	errorOf(t, e.chat(bearer(sign(otherKey, claims))), http.StatusUnauthorized, "invalid_token")
	claims["aud"] = "someone-else"
	errorOf(t, e.chat(bearer(sign(priv, claims))), http.StatusUnauthorized, "invalid_token")
}

// TestOAuthConsentOnce (RELIABILITY row 29): the same or narrower scopes skip the consent
// page, broader ones ask again, and so does the app after the user disconnected it.
func TestOAuthConsentOnce(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	app := e.publicApp()
	b := newBrowser(e)
	b.signup("once@example.com", "a fine password")
	_, challenge := pkce()
	ask := func(scope string) *response {
		q := authorizeQuery(app.ClientID, challenge, "s")
		q.Set("scope", scope)
		return b.get("/oauth/authorize?" + q.Encode())
	}
	r := ask("chat:write models:read")
	if r.status != http.StatusOK {
		t.Fatalf("first time: %s", r)
	}
	clientRedirectOf(t, b.do(http.MethodPost, "/auth/consent", consentForm(t, r, "approve"), nil))
	for _, scope := range []string{"chat:write models:read", "models:read chat:write", "chat:write"} {
		if v := clientRedirectOf(t, ask(scope)); v.Get("code") == "" {
			t.Fatalf("scope %q asked again: %v", scope, v)
		}
	}
	r = ask("chat:write keys:read")
	if r.status != http.StatusOK {
		t.Fatalf("broader scopes did not ask: %s", r)
	}
	// Approving the broader set keeps the earlier scopes too.
	clientRedirectOf(t, b.do(http.MethodPost, "/auth/consent", consentForm(t, r, "approve"), nil))
	if v := clientRedirectOf(t, ask("models:read keys:read")); v.Get("code") == "" {
		t.Fatal("the union of both consents was not kept")
	}
	account := b.get("/account")
	b.do(http.MethodPost, "/account/apps/revoke", url.Values{"csrf": {csrf(t, account)}, "client": {app.ClientID}}, nil)
	if r := ask("chat:write"); r.status != http.StatusOK {
		t.Fatalf("after disconnecting: %s", r)
	}
}
