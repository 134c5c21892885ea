package caddymodule_test

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// The sign-in, end to end through the in-process Caddy: pages, the fragment flow, the tokens at
// the gateway. A "browser" here is an http.Client with a cookie jar that does not follow
// redirects, so that every hop is checked.

// signinIssuer is the issuer of the test gateways' tokens (any base URL will do: the pages
// redirect with relative paths).
const signinIssuer = "https://gw.test"

// signinSetup is a gateway with sign-in, anonymous access for the app origin, and one backend.
func signinSetup(extra string) setup {
	return setup{
		gateway: `
		billing_url https://billing.test/top-up
		allowed_origins http://app.test
		anonymous {
			credits 0.004
			signin_url ` + signinIssuer + `/auth/authorize
		}
		signin {
			issuer ` + signinIssuer + `
			signup_credits 1
			return_origins http://app.test https://app.test
` + extra + `
		}` + backendBlock("mock", "mock", "mock-small", "100", "200"),
		mocks: []mockSpec{{key: "mock", lines: "models mock-small"}},
	}
}

// browser is a cookie-keeping client that does not follow redirects.
type browser struct {
	e      *env
	client *http.Client
}

func newBrowser(e *env) *browser { return newBrowserFrom(e, "") }

// newBrowserFrom is a browser whose connections come from the loopback address source ("":
// the default one).
func newBrowserFrom(e *env, source string) *browser {
	jar, _ := cookiejar.New(nil)
	tr := &http.Transport{}
	if source != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}, Timeout: 5 * time.Second}
		tr.DialContext = d.DialContext
	}
	e.t.Cleanup(tr.CloseIdleConnections)
	return &browser{e: e, client: &http.Client{Jar: httpsJar{jar}, Timeout: 30 * time.Second, Transport: tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

// httpsJar keeps cookies as a browser talking to the https issuer would: the test gateway
// serves plain HTTP, as behind a TLS-terminating proxy, and its cookies are Secure (sent
// over https only), so every URL is taken for its https twin.
type httpsJar struct{ http.CookieJar }

func asHTTPS(u *url.URL) *url.URL {
	c := *u
	c.Scheme = "https"
	return &c
}

func (j httpsJar) SetCookies(u *url.URL, cs []*http.Cookie) { j.CookieJar.SetCookies(asHTTPS(u), cs) }

func (j httpsJar) Cookies(u *url.URL) []*http.Cookie { return j.CookieJar.Cookies(asHTTPS(u)) }

// do sends one request to the gateway (path, or absolute URL on it).
func (b *browser) do(method, path string, form url.Values, hdr map[string]string) *response {
	b.e.t.Helper()
	u := path
	if strings.HasPrefix(path, "/") {
		u = b.e.gw + path
	}
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		b.e.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := b.client.Do(req)
	if err != nil {
		b.e.t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return &response{status: resp.StatusCode, header: resp.Header, body: raw}
}

func (b *browser) get(path string) *response { return b.do(http.MethodGet, path, nil, nil) }

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf is the CSRF token of a page's forms.
func csrf(t testing.TB, page *response) string {
	t.Helper()
	m := csrfField.FindSubmatch(page.body)
	if m == nil {
		t.Fatalf("no csrf field on the page: %s", page)
	}
	return string(m[1])
}

// gatewayPath is the path (and query) of a Location on the gateway, failing on other places.
func gatewayPath(t testing.TB, loc string) string {
	t.Helper()
	u, err := url.Parse(loc)
	if err != nil || u.Host != "" && u.Host != "gw.test" {
		t.Fatalf("Location %q is not on the gateway", loc)
	}
	return u.RequestURI()
}

// signup makes an account through the sign-up page and stays signed in.
func (b *browser) signup(email, password string) {
	t := b.e.t
	t.Helper()
	page := b.get("/auth/signup")
	if page.status != http.StatusOK {
		t.Fatalf("signup page: %s", page)
	}
	r := b.do(http.MethodPost, "/auth/signup", url.Values{"csrf": {csrf(t, page)}, "email": {email},
		"password": {password}, "next": {"/account"}}, nil)
	if r.status != http.StatusSeeOther || r.header.Get("Location") != "/account" {
		t.Fatalf("signup: %s (Location %q)", r, r.header.Get("Location"))
	}
}

// login signs in through the sign-in page.
func (b *browser) login(email, password string) *response {
	b.e.t.Helper()
	page := b.get("/auth/login")
	return b.do(http.MethodPost, "/auth/login", url.Values{"csrf": {csrf(b.e.t, page)}, "email": {email},
		"password": {password}}, nil)
}

// fragmentToken runs the fragment flow for redirect (consenting when asked) and returns the
// token from the Location's fragment.
func (b *browser) fragmentToken(redirect, state string) string {
	t := b.e.t
	t.Helper()
	q := url.Values{"redirect": {redirect}}
	if state != "" {
		q.Set("state", state)
	}
	r := b.get("/auth/authorize?" + q.Encode())
	if r.status == http.StatusOK {
		r = b.do(http.MethodPost, "/auth/consent", consentForm(t, r, "approve"), nil)
	}
	return fragmentOf(t, r, redirect, state).Get("token")
}

// consentForm is the consent page's form, answered with decision.
func consentForm(t testing.TB, page *response, decision string) url.Values {
	t.Helper()
	if !strings.Contains(string(page.body), `id="approve"`) {
		t.Fatalf("not the consent page: %s", page)
	}
	f := url.Values{"csrf": {csrf(t, page)}, "decision": {decision}}
	for _, m := range regexp.MustCompile(`<input type="hidden" name="([a-z_]+)" value="([^"]*)">`).FindAllSubmatch(page.body, -1) {
		if name := string(m[1]); name != "csrf" {
			f.Set(name, htmlUnescape(string(m[2])))
		}
	}
	return f
}

func htmlUnescape(s string) string {
	return strings.NewReplacer("&amp;", "&", "&#34;", `"`, "&#39;", "'", "&lt;", "<", "&gt;", ">", "&#43;", "+").Replace(s)
}

// fragmentOf checks a redirect back to the app and returns its fragment's parameters.
func fragmentOf(t testing.TB, r *response, redirect, state string) url.Values {
	t.Helper()
	if r.status != http.StatusFound && r.status != http.StatusSeeOther {
		t.Fatalf("want a redirect back to the app, got %s", r)
	}
	loc := r.header.Get("Location")
	base, frag, ok := strings.Cut(loc, "#")
	if !ok || base != redirect {
		t.Fatalf("Location %q: want %s#...", loc, redirect)
	}
	v, err := url.ParseQuery(frag)
	if err != nil {
		t.Fatalf("fragment %q: %v", frag, err)
	}
	if v.Get("state") != state {
		t.Fatalf("state %q, want %q", v.Get("state"), state)
	}
	return v
}

// chat sends a small chat with the given headers.
func (e *env) chat(hdr map[string]string) *response {
	e.t.Helper()
	return e.post("/v1/chat/completions", `{"model":"cheapest","messages":[{"role":"user","content":"hi"}],"max_tokens":8}`, hdr)
}

// chatFrom sends the chat from another loopback source address.
func (e *env) chatFrom(source string, hdr map[string]string) *response {
	e.t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}, Timeout: 5 * time.Second}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: d.DialContext}}
	defer c.CloseIdleConnections()
	req := e.newRequest(context.Background(), http.MethodPost, e.gw+"/v1/chat/completions",
		`{"model":"cheapest","messages":[{"role":"user","content":"hi"}],"max_tokens":8}`, hdr)
	resp, err := c.Do(req)
	if err != nil {
		e.t.Fatalf("chat from %s: %v", source, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return &response{status: resp.StatusCode, header: resp.Header, body: raw}
}

func (e *env) openDB() *sql.DB {
	e.t.Helper()
	db, err := sql.Open("sqlite", "file:"+e.dbPath+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { db.Close() })
	return db
}

// signingKeys reads the gateway's signing keys from the store file, newest first, to forge
// tokens a test needs (expired, for another audience, ...).
func (e *env) signingKeys() []signin.SigningKey {
	e.t.Helper()
	rows, err := e.openDB().Query(`SELECT kid, private, created_at FROM signing_keys ORDER BY seq DESC`)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	var keys []signin.SigningKey
	for rows.Next() {
		var k signin.SigningKey
		var at int64
		if err := rows.Scan(&k.KID, &k.Private, &at); err != nil {
			e.t.Fatal(err)
		}
		keys = append(keys, k)
	}
	return keys
}

// pageSecurityHeaders checks the headers every sign-in page must carry.
func pageSecurityHeaders(t testing.TB, what string, r *response) {
	t.Helper()
	h := r.header
	for name, want := range map[string]string{
		"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
		"X-Content-Type-Options": "nosniff",
	} {
		if got := h.Get(name); got != want {
			t.Errorf("%s: %s = %q, want %q", what, name, got, want)
		}
	}
	if csp := h.Get("Content-Security-Policy"); !strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("%s: Content-Security-Policy = %q", what, csp)
	}
	if h.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("%s: CORS on a sign-in page", what)
	}
}

// TestSigninPages: the pages render without JavaScript, each with its security headers, and
// sign-up, sign-in (with a rotated session), sign-out and the account page work.
func TestSigninPages(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	for _, p := range []string{"/auth/login", "/auth/signup", "/auth/logout", "/auth/authorize?redirect=javascript:alert(1)",
		"/oauth/authorize?client_id=nope", "/account"} {
		r := b.get(p)
		pageSecurityHeaders(t, p, r)
		if strings.HasPrefix(p, "/auth/") && !strings.Contains(p, "authorize") && !strings.Contains(string(r.body), `<form method="post"`) {
			t.Errorf("%s: no form: %s", p, r)
		}
	}
	// No CORS on the pages, whatever the Origin (an allowed one included).
	for _, p := range []string{"/auth/authorize?redirect=" + url.QueryEscape("http://app.test/"), "/auth/login", "/oauth/authorize"} {
		if r := b.do(http.MethodGet, p, nil, map[string]string{"Origin": "http://app.test"}); r.header.Get("Access-Control-Allow-Origin") != "" {
			t.Errorf("%s answers CORS", p)
		}
	}
	if r := b.get("/account"); r.status != http.StatusSeeOther || r.header.Get("Location") != "/auth/login?next=%2Faccount" {
		t.Fatalf("account signed out: %s %q", r, r.header.Get("Location"))
	}
	if r := b.get("/auth/style.css"); r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("Content-Type"), "text/css") {
		t.Fatalf("style: %s", r)
	}

	b.signup("Ada@Example.com", "correct horse battery")
	account := b.get("/account")
	if account.status != http.StatusOK || !strings.Contains(string(account.body), `id="balance">1</strong>`) {
		t.Fatalf("account after signup (signup_credits 1): %s", account)
	}
	pageSecurityHeaders(t, "/account signed in", account)

	// The same email again (in another case): refused, nothing made.
	other := newBrowser(e)
	page := other.get("/auth/signup")
	r := other.do(http.MethodPost, "/auth/signup", url.Values{"csrf": {csrf(t, page)}, "email": {"ada@example.com"},
		"password": {"another password"}}, nil)
	if r.status != http.StatusConflict {
		t.Fatalf("second signup: %s", r)
	}
	// A short password, a bad email: 400, the form again.
	for _, f := range []url.Values{{"email": {"bob@example.com"}, "password": {"short"}}, {"email": {"not an email"}, "password": {"long enough pw"}}} {
		f.Set("csrf", csrf(t, page))
		if r := other.do(http.MethodPost, "/auth/signup", f, nil); r.status != http.StatusBadRequest || !strings.Contains(string(r.body), `id="signup"`) {
			t.Errorf("signup %v: %s", f, r)
		}
	}

	// Wrong password and unknown email: the same answer.
	wrong := other.login("ada@example.com", "wrong password")
	unknown := other.login("nobody@example.com", "wrong password")
	if wrong.status != http.StatusUnauthorized || unknown.status != http.StatusUnauthorized ||
		!strings.Contains(string(wrong.body), "Wrong email or password.") || !strings.Contains(string(unknown.body), "Wrong email or password.") {
		t.Fatalf("wrong password %s / unknown email %s", wrong, unknown)
	}

	// Sign in: a new session id each time.
	before := sessionCookie(t, other)
	if r := other.login("ada@example.com", "correct horse battery"); r.status != http.StatusSeeOther || r.header.Get("Location") != "/account" {
		t.Fatalf("login: %s", r)
	}
	first := sessionCookie(t, other)
	if first == "" || first == before {
		t.Fatal("no new session cookie at sign-in")
	}
	other.login("ada@example.com", "correct horse battery")
	second := sessionCookie(t, other)
	if second == first {
		t.Fatal("the session id was not rotated at the second sign-in")
	}
	if r := newBrowser(e).do(http.MethodGet, "/account", nil, map[string]string{"Cookie": "__Host-llm_gateway_session=" + second}); r.status != http.StatusOK {
		t.Fatalf("the current session, sent by hand: %s", r)
	}
	// The replaced session is gone, not only forgotten by this browser.
	if r := newBrowser(e).do(http.MethodGet, "/account", nil, map[string]string{"Cookie": "__Host-llm_gateway_session=" + first}); r.status != http.StatusSeeOther {
		t.Fatalf("the session replaced at sign-in still works: %s", r)
	}
	// next= may only be a path on this site.
	page = other.get("/auth/login")
	for next, want := range map[string]string{"/auth/authorize?redirect=x": "/auth/authorize?redirect=x",
		"//evil.test/": "/account", "https://evil.test/": "/account", `/\evil.test`: "/account"} {
		r := other.do(http.MethodPost, "/auth/login", url.Values{"csrf": {csrf(t, page)}, "email": {"ada@example.com"},
			"password": {"correct horse battery"}, "next": {next}}, nil)
		if got := r.header.Get("Location"); got != want {
			t.Errorf("next=%q: Location %q, want %q", next, got, want)
		}
	}

	// A form without its CSRF token, with another browser's, or from another site: 403.
	stranger := newBrowser(e)
	strangerToken := csrf(t, stranger.get("/auth/login"))
	for name, tc := range map[string]struct {
		form url.Values
		hdr  map[string]string
	}{
		"no token":      {url.Values{"email": {"ada@example.com"}, "password": {"correct horse battery"}}, nil},
		"foreign token": {url.Values{"csrf": {strangerToken}, "email": {"ada@example.com"}, "password": {"correct horse battery"}}, nil},
		"cross-site": {url.Values{"csrf": {csrf(t, other.get("/auth/login"))}, "email": {"ada@example.com"},
			"password": {"correct horse battery"}}, map[string]string{"Origin": "https://evil.test"}},
	} {
		if r := other.do(http.MethodPost, "/auth/login", tc.form, tc.hdr); r.status != http.StatusForbidden {
			t.Errorf("%s: %s", name, r)
		}
	}

	// Sign out: the session is gone.
	page = other.get("/auth/logout")
	if r := other.do(http.MethodPost, "/auth/logout", url.Values{"csrf": {csrf(t, page)}}, nil); r.status != http.StatusSeeOther {
		t.Fatalf("logout: %s", r)
	}
	if r := other.get("/account"); r.status != http.StatusSeeOther {
		t.Fatalf("account after logout: %s", r)
	}
}

func sessionCookie(t testing.TB, b *browser) string {
	t.Helper()
	u, _ := url.Parse(b.e.gw)
	for _, c := range b.client.Jar.Cookies(u) {
		if c.Name == "__Host-llm_gateway_session" {
			return c.Value
		}
	}
	return ""
}

// TestSigninThrottle: ten wrong passwords for one account lock it for the window, with
// Retry-After and the rate limit headers; a right password does not count.
func TestSigninThrottle(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("grace@example.com", "the right password")
	refusals := map[string]string{"tier": "signin_account", "limit": "signin_per_15m"}
	refusedBefore, _ := metricSum(e.scrape(), "llm_gateway_rate_limited_total", refusals)
	for i := 0; i < 3; i++ {
		if r := b.login("grace@example.com", "the right password"); r.status != http.StatusSeeOther {
			t.Fatalf("right password %d: %s", i, r)
		}
	}
	var last *response
	for i := 0; i < 10; i++ {
		last = b.login("grace@example.com", fmt.Sprintf("wrong %d", i))
		if last.status != http.StatusUnauthorized {
			t.Fatalf("wrong password %d: %s", i, last)
		}
	}
	if last.header.Get("X-RateLimit-Remaining") != "0" || last.header.Get("X-RateLimit-Limit") != "10" {
		t.Errorf("headers after 10 failures: %v", last.header)
	}
	r := b.login("grace@example.com", "the right password")
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" || r.header.Get("X-RateLimit-Policy") == "" {
		t.Fatalf("11th attempt: %s %v", r, r.header)
	}
	if n, _ := metricSum(e.scrape(), "llm_gateway_rate_limited_total", refusals); n != refusedBefore+1 {
		t.Errorf("llm_gateway_rate_limited_total for the account's limiter: %v, want %v", n, refusedBefore+1)
	}
	// The password grant shares the throttle.
	app := e.createApp(map[string]any{"name": "first", "first_party": true, "redirect_uris": []string{}})
	tr := e.request(http.MethodPost, e.gw+"/oauth/token", url.Values{"grant_type": {"password"}, "client_id": {app.ClientID},
		"username": {"grace@example.com"}, "password": {"the right password"}}.Encode(),
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
	if tr.status != http.StatusTooManyRequests || tr.header.Get("Retry-After") == "" {
		t.Fatalf("password grant while locked: %s", tr)
	}
	// Another account from the same address still signs in (10 < 30 per address).
	b2 := newBrowser(e)
	b2.signup("hopper@example.com", "another right one")
	if r := b2.login("hopper@example.com", "another right one"); r.status != http.StatusSeeOther {
		t.Fatalf("another account: %s", r)
	}
}

// TestFragmentFlow: the Peerwave story without a browser engine: an app out of anonymous
// credits is sent to sign in, consents once, comes back with an IP-bound token in the fragment
// and chats on the user's credits; the second time there is no consent; the token works from
// no other address; a denial comes back as an error; malformed return addresses are refused
// without any redirect.
func TestFragmentFlow(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	const app = "http://app.test/chat/"

	// Anonymous until the 402, whose Location is the fragment flow for this app.
	var r *response
	for i := 0; i < 20; i++ {
		r = e.chat(map[string]string{"Origin": "http://app.test", "Redirect": "/chat/"})
		if r.status != http.StatusOK {
			break
		}
	}
	errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
	loc := r.header.Get("Location")
	if want := signinIssuer + "/auth/authorize?redirect=" + url.QueryEscape(app); loc != want {
		t.Fatalf("402 Location %q, want %q", loc, want)
	}

	// The browser follows it: sign in first, then back to the authorize request.
	b := newBrowser(e)
	r = b.get(gatewayPath(t, loc))
	if r.status != http.StatusSeeOther || !strings.HasPrefix(r.header.Get("Location"), "/auth/login?next=") {
		t.Fatalf("authorize signed out: %s %q", r, r.header.Get("Location"))
	}
	next, _ := url.Parse(r.header.Get("Location"))
	login := b.get(next.RequestURI())
	if !strings.Contains(string(login.body), `id="signup-link"`) {
		t.Fatalf("login page without signup link: %s", login)
	}
	signupPage := b.get("/auth/signup?next=" + url.QueryEscape(next.Query().Get("next")))
	r = b.do(http.MethodPost, "/auth/signup", url.Values{"csrf": {csrf(t, signupPage)}, "email": {"lin@example.com"},
		"password": {"a long password"}, "next": {next.Query().Get("next")}}, nil)
	if r.status != http.StatusSeeOther || !strings.HasPrefix(r.header.Get("Location"), "/auth/authorize?redirect=") {
		t.Fatalf("signup: %s %q", r, r.header.Get("Location"))
	}
	consent := b.get(r.header.Get("Location") + "&state=s1")
	if consent.status != http.StatusOK || !strings.Contains(string(consent.body), `<strong id="client">http://app.test</strong>`) {
		t.Fatalf("consent page does not name the origin: %s", consent)
	}
	pageSecurityHeaders(t, "consent", consent)

	// Approving by GET, without the CSRF token, with another's, or from another site: refused.
	if r := b.do(http.MethodGet, "/auth/consent?"+consentForm(t, consent, "approve").Encode(), nil, nil); r.status != http.StatusMethodNotAllowed {
		t.Errorf("approve by GET: %s", r)
	}
	noToken := consentForm(t, consent, "approve")
	noToken.Del("csrf")
	foreign := consentForm(t, consent, "approve")
	foreign.Set("csrf", csrf(t, newBrowser(e).get("/auth/login")))
	for name, tc := range map[string]struct {
		form url.Values
		hdr  map[string]string
	}{"no token": {noToken, nil}, "foreign token": {foreign, nil},
		"cross-site": {consentForm(t, consent, "approve"), map[string]string{"Origin": "http://app.test"}}} {
		if r := b.do(http.MethodPost, "/auth/consent", tc.form, tc.hdr); r.status != http.StatusForbidden || r.header.Get("Location") != "" {
			t.Errorf("consent %s: %s", name, r)
		}
	}
	user := e.userIDByEmail("lin@example.com")
	if n := e.consentCount(user); n != 0 {
		t.Fatalf("%d consents stored by refused posts", n)
	}

	r = b.do(http.MethodPost, "/auth/consent", consentForm(t, consent, "approve"), nil)
	token := fragmentOf(t, r, app, "s1").Get("token")
	if token == "" || strings.Contains(r.header.Get("Location"), "?token") {
		t.Fatalf("no token in the fragment: %q", r.header.Get("Location"))
	}

	// The app chats with it (raw Authorization, as the seed sends it, and Bearer).
	before := e.balance(user)
	r = e.chat(map[string]string{"Authorization": token, "Origin": "http://app.test"})
	if r.status != http.StatusOK {
		t.Fatalf("chat with the fragment token: %s", r)
	}
	charged := amountOf(t, r.header.Get("X-Credits-Charged"))
	if got := e.balance(user); got != before-charged || charged <= 0 {
		t.Fatalf("balance %s, want %s - %s", got, before, charged)
	}
	if r := e.chat(map[string]string{"Authorization": "Bearer " + token}); r.status != http.StatusOK {
		t.Fatalf("chat with Bearer: %s", r)
	}
	// From another address: invalid_token, nothing charged.
	afterChats := e.balance(user)
	r = e.chatFrom("127.0.0.2", map[string]string{"Authorization": token})
	errorOf(t, r, http.StatusUnauthorized, "invalid_token")
	if !strings.Contains(r.header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Errorf("WWW-Authenticate %q", r.header.Get("WWW-Authenticate"))
	}
	if e.balance(user) != afterChats {
		t.Fatal("a refused token was charged")
	}
	// The fragment token grants inference only.
	errorOf(t, e.request(http.MethodGet, e.gw+"/v1/auth/keys", nil, bearer(token)), http.StatusForbidden, "insufficient_scope")

	// The second time: no consent page.
	if tok := b.fragmentToken(app, "s2"); tok == "" || tok == token {
		t.Fatalf("second token %q", tok)
	}
	// Another origin asks again; a denial comes back as error=access_denied.
	consent = b.get("/auth/authorize?redirect=" + url.QueryEscape("https://app.test/"))
	if consent.status != http.StatusOK {
		t.Fatalf("another origin: %s", consent)
	}
	r = b.do(http.MethodPost, "/auth/consent", consentForm(t, consent, "deny"), nil)
	if v := fragmentOf(t, r, "https://app.test/", ""); v.Get("error") != "access_denied" || v.Get("token") != "" {
		t.Fatalf("deny: %v", v)
	}

	// Malformed or unlisted return addresses: an error page, never a redirect.
	for _, bad := range []string{"//evil.test/", "https://app.test@evil.test/", `https://app.test\@evil.test/`,
		"javascript:alert(1)", "https://evil.test/", "http://app.test.evil.test/", "http://app.test/#x",
		"http://app.test/%2e%2e/x", "data:text/html,hi", "", "https:app.test"} {
		r := b.get("/auth/authorize?redirect=" + url.QueryEscape(bad))
		if r.status != http.StatusBadRequest || r.header.Get("Location") != "" {
			t.Errorf("redirect=%q: %s, Location %q", bad, r, r.header.Get("Location"))
		}
	}

	// No token reaches a log.
	for _, name := range []string{"access.log", "caddy.log"} {
		raw, _ := os.ReadFile(filepath.Join(e.dir, name))
		if strings.Contains(string(raw), token) || strings.Contains(string(raw), strings.Split(token, ".")[2]) {
			t.Errorf("%s holds the token", name)
		}
	}
}

// consentCount counts a user's stored consents.
func (e *env) consentCount(user string) int {
	var n int
	if err := e.openDB().QueryRow(`SELECT count(*) FROM consents WHERE user_id = ?`, user).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n
}

// TestGatewayTokens: the gateway accepts exactly its own, well-formed, current tokens: forged,
// expired, foreign or oversized ones get 401 invalid_token; a signed-in user without credits
// gets a 402 pointing to the billing URL; a key rotation keeps the previous key's tokens good
// until the next one.
func TestGatewayTokens(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("kim@example.com", "kim's password")
	user := e.userIDByEmail("kim@example.com")
	keys := e.signingKeys()
	if len(keys) != 1 {
		t.Fatalf("%d signing keys at first start, want 1", len(keys))
	}
	ks, err := signin.NewKeyset(keys)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	claims := func(mod func(*signin.Claims)) string {
		c := signin.Claims{Issuer: signinIssuer, Audience: signinIssuer, Subject: user, Scope: "chat:write models:read",
			Type: signin.TypeAccess, IssuedAt: now, NotBefore: now, Expiry: now.Add(10 * time.Minute)}
		if mod != nil {
			mod(&c)
		}
		tok, err := ks.Sign(c)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	good := claims(nil)
	if r := e.chat(bearer(good)); r.status != http.StatusOK {
		t.Fatalf("a good token: %s", r)
	}
	pub := ed25519.PrivateKey(keys[0].Private).Public().(ed25519.PublicKey)
	parts := strings.Split(good, ".")
	b64 := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	cases := map[string]string{
		"expired": claims(func(c *signin.Claims) {
			c.IssuedAt, c.NotBefore, c.Expiry = now.Add(-time.Hour), now.Add(-time.Hour), now.Add(-2*time.Minute)
		}),
		"not yet":        claims(func(c *signin.Claims) { c.NotBefore = now.Add(10 * time.Minute) }),
		"other audience": claims(func(c *signin.Claims) { c.Audience = "https://other.test" }),
		"other issuer":   claims(func(c *signin.Claims) { c.Issuer = "https://other.test" }),
		"fragment without its address": claims(func(c *signin.Claims) {
			c.Type = signin.TypeFragment
			c.IP = "10.9.9.9"
		}),
		"alg none":   b64(`{"alg":"none","typ":"at+jwt","kid":"`+keys[0].KID+`"}`) + "." + parts[1] + ".",
		"alg HS256":  hs256(b64(`{"alg":"HS256","typ":"at+jwt","kid":"`+keys[0].KID+`"}`)+"."+parts[1], pub),
		"bad sig":    parts[0] + "." + parts[1] + "." + b64("not the signature at all, sixty-four bytes of it, padded.........."),
		"kid path":   b64(`{"alg":"EdDSA","typ":"at+jwt","kid":"../../etc/passwd"}`) + "." + parts[1] + "." + parts[2],
		"many dots":  strings.Repeat(".", 7000),
		"oversized":  parts[0] + "." + strings.Repeat("A", 9000) + "." + parts[2],
		"typ JWT":    b64(`{"alg":"EdDSA","typ":"JWT","kid":"`+keys[0].KID+`"}`) + "." + parts[1] + "." + parts[2],
		"other user": claims(func(c *signin.Claims) { c.Subject = "usr_nobody" }),
	}
	for name, tok := range cases {
		r := e.chat(bearer(tok))
		if name == "other user" {
			// A valid token of a user without an account: nothing to spend.
			errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
			continue
		}
		if r.status != http.StatusUnauthorized {
			t.Errorf("%s: %s", name, r)
		}
	}
	// Tokens are not read from the query string (RFC 6750 §2.3 is not offered), alone or
	// beside a header.
	for _, hdr := range []map[string]string{nil, bearer(good)} {
		r := e.post("/v1/chat/completions?access_token="+good, `{"model":"cheapest","messages":[{"role":"user","content":"hi"}]}`, hdr)
		errorOf(t, r, http.StatusBadRequest, "invalid_request")
	}

	// Out of credits: 402 with the billing URL.
	e.adminCall(http.MethodPost, "/llm_gateway/users/"+user+"/credits", map[string]any{"amount": "-" + e.balance(user).String()}, http.StatusOK, nil, nil)
	r := e.chat(bearer(good))
	errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
	if r.header.Get("Location") != "https://billing.test/top-up" {
		t.Fatalf("402 for a user: Location %q", r.header.Get("Location"))
	}
	e.adminCall(http.MethodPost, "/llm_gateway/users/"+user+"/credits", map[string]any{"amount": "1"}, http.StatusOK, nil, nil)

	// Rotation: the previous key still verifies (and is published), the one before it not.
	var rotated struct {
		Published []string `json:"published"`
		Signing   string   `json:"signing"`
	}
	e.adminCall(http.MethodPost, "/llm_gateway/signing_keys/rotate", nil, http.StatusOK, &rotated, nil)
	if len(rotated.Published) != 2 || rotated.Signing != rotated.Published[0] || rotated.Published[1] != keys[0].KID {
		t.Fatalf("rotation answer %+v, first key %s", rotated, keys[0].KID)
	}
	jwks := e.request(http.MethodGet, e.gw+"/.well-known/jwks.json", nil, nil)
	if n := strings.Count(string(jwks.body), `"kid"`); n != 2 {
		t.Fatalf("JWKS after a rotation has %d keys: %s", n, jwks)
	}
	if r := e.chat(bearer(good)); r.status != http.StatusOK {
		t.Fatalf("previous key's token after one rotation: %s", r)
	}
	fresh := b.fragmentToken("http://app.test/", "")
	e.adminCall(http.MethodPost, "/llm_gateway/signing_keys/rotate", nil, http.StatusOK, nil, nil)
	if r := e.chat(bearer(good)); r.status != http.StatusUnauthorized {
		t.Fatalf("a token of a key two rotations old: %s", r)
	}
	if r := e.chat(bearer(fresh)); r.status != http.StatusOK {
		t.Fatalf("the previous key's token: %s", r)
	}
}

// hs256 signs input with HMAC-SHA256 under key: the algorithm confusion attack, with the
// public key as the secret.
func hs256(input string, key []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(input))
	return input + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// TestSigninConcurrentSignups: eight sign-ups of one email at once make one account (those
// past the address's five sign-ups, or that found no hashing slot in time, none).
func TestSigninConcurrentSignups(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	var wg sync.WaitGroup
	statuses := make(chan int, 8)
	for i := 0; i < 8; i++ {
		b := newBrowser(e)
		page := b.get("/auth/signup")
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := b.do(http.MethodPost, "/auth/signup", url.Values{"csrf": {csrf(t, page)}, "email": {"same@example.com"},
				"password": {"the same password"}}, nil)
			statuses <- r.status
		}()
	}
	wg.Wait()
	close(statuses)
	created := 0
	for s := range statuses {
		if s == http.StatusSeeOther {
			created++
		} else if s != http.StatusConflict && s != http.StatusTooManyRequests && s != http.StatusServiceUnavailable {
			// 429: five sign-ups per address; 503: every password hashing slot stayed taken.
			t.Errorf("status %d", s)
		}
	}
	if created != 1 {
		t.Fatalf("%d accounts made", created)
	}
	user := e.userIDByEmail("same@example.com")
	if got := e.balance(user); got.String() != "1" {
		t.Fatalf("balance %s: signup credits granted more than once", got)
	}
}

// TestSigninLifetimes, on the gateway's clock: a fragment token lives 15 minutes, an access
// token an hour, a code 60 seconds, a session a week; a rotated refresh token presented after
// the grace period revokes its family.
func TestSigninLifetimes(t *testing.T) {
	base := time.Now()
	var offset atomic.Int64
	restore := caddymodule.SetClock(func() time.Time { return base.Add(time.Duration(offset.Load())) })
	defer restore()
	at := func(d time.Duration) { offset.Store(int64(d)) }

	e := startGateway(t, signinSetup(""))
	app := e.publicApp()
	b := newBrowser(e)
	b.signup("clock@example.com", "a fine password")
	fragment := b.fragmentToken("http://app.test/", "")
	verifier, challenge := pkce()
	code := b.code(authorizeQuery(app.ClientID, challenge, "c1"))
	tk := tokensOf(t, e.token(url.Values{"grant_type": {"authorization_code"}, "code": {code}, "code_verifier": {verifier},
		"client_id": {app.ClientID}, "redirect_uri": {clientRedirect}}, nil))
	refresh := func(rt string) *response {
		return e.token(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {app.ClientID}}, nil)
	}

	// Within the leeway of 30 s past expiry: still good; past it: invalid_token.
	at(15*time.Minute + 29*time.Second)
	if r := e.chat(bearer(fragment)); r.status != http.StatusOK {
		t.Fatalf("fragment token at 15m29s: %s", r)
	}
	at(15*time.Minute + 31*time.Second)
	errorOf(t, e.chat(bearer(fragment)), http.StatusUnauthorized, "invalid_token")
	if r := e.chat(bearer(tk.AccessToken)); r.status != http.StatusOK {
		t.Fatalf("access token at 15m31s: %s", r)
	}
	at(time.Hour + 31*time.Second)
	errorOf(t, e.chat(bearer(tk.AccessToken)), http.StatusUnauthorized, "invalid_token")

	// A code redeemed after 60 s: expired.
	at(2 * time.Hour)
	code = b.code(authorizeQuery(app.ClientID, challenge, "c2"))
	at(2*time.Hour + 61*time.Second)
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"authorization_code"}, "code": {code}, "code_verifier": {verifier},
		"client_id": {app.ClientID}, "redirect_uri": {clientRedirect}}, nil), http.StatusBadRequest, "invalid_grant")

	// Refresh: RT1 -> RT2; RT1 again within the 30 s grace gives RT2 again; after it, the
	// family is revoked, RT2 with it.
	rt2 := tokensOf(t, refresh(tk.RefreshToken)).RefreshToken
	at(2*time.Hour + 61*time.Second + 29*time.Second)
	if again := tokensOf(t, refresh(tk.RefreshToken)).RefreshToken; again != rt2 {
		t.Fatal("a replay within the grace period got another successor")
	}
	at(2*time.Hour + 61*time.Second + 31*time.Second)
	oauthErrorOf(t, refresh(tk.RefreshToken), http.StatusBadRequest, "invalid_grant")
	oauthErrorOf(t, refresh(rt2), http.StatusBadRequest, "invalid_grant")

	// The session ends after a week.
	at(7*24*time.Hour - time.Minute)
	if r := b.get("/account"); r.status != http.StatusOK {
		t.Fatalf("account before the session ends: %s", r)
	}
	at(7*24*time.Hour + time.Second)
	if r := b.get("/account"); r.status != http.StatusSeeOther {
		t.Fatalf("account after the session ended: %s", r)
	}
}

// TestSigninThrottlePerAddress: 30 attempts from one address (a sign-up and 29 failed sign-ins,
// on any accounts) refuse the next, for a right password too.
func TestSigninThrottlePerAddress(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("ip@example.com", "the right password")
	// 30 attempts per 15 minutes: the limiter gives one back every 30 s, so on a machine slow
	// enough that the attempts (an argon2id check each) take longer than that, one more may
	// pass for each 30 s they took.
	start := time.Now()
	failures := 0
	for ; ; failures++ {
		r := b.login(fmt.Sprintf("user%d@example.com", failures), "wrong password")
		if r.status == http.StatusTooManyRequests {
			break
		}
		if r.status != http.StatusUnauthorized || failures > 40 {
			t.Fatalf("failure %d: %s", failures, r)
		}
	}
	refilled := int(time.Since(start) / (30 * time.Second))
	if failures < 29 || failures > 29+refilled {
		t.Fatalf("%d failed attempts from the address (signup included: %d) before a 429 in %s, want 30 (+%d given back)",
			failures, failures+1, time.Since(start), refilled)
	}
	r := b.login("ip@example.com", "the right password")
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" || r.header.Get("X-RateLimit-Limit") != "30" {
		t.Fatalf("the right password after the limit from the address: %s %v", r, r.header)
	}
}

// TestSigninTimingSmoke (RELIABILITY row 32): a wrong password for a known email and any
// password for an unknown one do the same work (an argon2id check, against a dummy hash for
// unknown emails), so their medians stay within a factor that a skipped hash (~100x faster)
// could never meet, even on a noisy machine.
func TestSigninTimingSmoke(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("known@example.com", "the right password")
	page := b.get("/auth/login")
	token := csrf(t, page)
	median := func(email string) time.Duration {
		var ds []time.Duration
		for i := 0; i < 5; i++ {
			start := time.Now()
			r := b.do(http.MethodPost, "/auth/login", url.Values{"csrf": {token}, "email": {email}, "password": {"wrong password"}}, nil)
			ds = append(ds, time.Since(start))
			if r.status != http.StatusUnauthorized {
				t.Fatalf("%s: %s", email, r)
			}
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	known, unknown := median("known@example.com"), median("unknown@example.com")
	if ratio := float64(unknown) / float64(known); ratio < 0.2 || ratio > 5 {
		t.Fatalf("unknown email %v, known email %v: the unknown one skips the work", unknown, known)
	}
}

// TestSigningKeyRotationUnderTraffic: a rotation while tokens are being checked loses none of
// them (the previous key stays valid), and races nothing (-race).
func TestSigningKeyRotationUnderTraffic(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	b := newBrowser(e)
	b.signup("rot@example.com", "a fine password")
	token := b.fragmentToken("http://app.test/", "")
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				req := e.newRequest(context.Background(), http.MethodGet, e.gw+"/v1/models", nil, bearer(token))
				resp, err := e.client.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Errorf("during a rotation: %d", resp.StatusCode)
				}
			}
		}()
	}
	e.adminCall(http.MethodPost, "/llm_gateway/signing_keys/rotate", nil, http.StatusOK, nil, nil)
	wg.Wait()
}
