package caddymodule_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
)

// The sign-in exposed to the internet (issue 11): password hashing cannot take the memory,
// one host cannot lock an account's owner out, sign-ups cannot be farmed, confidential clients
// always need their secret, and a TLS-terminating proxy in front changes nothing.

// argonMiB is what one password hash takes (identity.HashPassword's argon2id memory).
const argonMiB = 64

// send sends req with the browser's client, reporting errors instead of failing (for other
// goroutines than the test's).
func (b *browser) send(req *http.Request) (*response, error) {
	resp, err := b.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	return &response{status: resp.StatusCode, header: resp.Header, body: raw}, err
}

// TestSigninHashingBounded: 200 password attempts at once (half on the sign-in page, half on
// the password grant, from ten addresses, so that no throttle refuses them) never hash more
// than the slots (max(2, GOMAXPROCS)) at once; the heap stays within twice the baseline plus
// (2 × slots + 2) × 64 MiB (the hashes in flight, as much garbage before the collector runs,
// and room), where unbounded they would take 200 × 64 MiB; those that wait too long for a slot
// are answered 503 with Retry-After, in the shape of their route.
func TestSigninHashingBounded(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	app := e.createApp(map[string]any{"name": "first", "first_party": true, "redirect_uris": []string{}})
	const n, sources = 200, 10
	browsers := make([]*browser, sources)
	tokens := make([]string, sources)
	for i := range browsers {
		browsers[i] = newBrowserFrom(e, fmt.Sprintf("127.0.0.%d", 10+i))
		tokens[i] = csrf(t, browsers[i].get("/auth/login"))
	}
	caddymodule.PasswordHashPeak() // from zero

	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	baseline := ms.HeapInuse
	var peakHeap atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			runtime.ReadMemStats(&m)
			if m.HeapInuse > peakHeap.Load() {
				peakHeap.Store(m.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()

	type outcome struct {
		page bool
		r    *response
		err  error
	}
	outcomes := make(chan outcome, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := browsers[i%sources]
			email := fmt.Sprintf("nobody%d@example.com", i)
			var req *http.Request
			page := i%2 == 0
			if page {
				form := url.Values{"csrf": {tokens[i%sources]}, "email": {email}, "password": {"a wrong password"}}
				req, _ = http.NewRequest(http.MethodPost, e.gw+"/auth/login", strings.NewReader(form.Encode()))
			} else {
				form := url.Values{"grant_type": {"password"}, "client_id": {app.ClientID}, "username": {email}, "password": {"a wrong password"}}
				req, _ = http.NewRequest(http.MethodPost, e.gw+"/oauth/token", strings.NewReader(form.Encode()))
			}
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			r, err := b.send(req)
			outcomes <- outcome{page, r, err}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	close(outcomes)

	counts := map[string]int{}
	for o := range outcomes {
		if o.err != nil {
			t.Fatalf("request: %v", o.err)
		}
		r := o.r
		switch {
		case r.status == http.StatusServiceUnavailable && o.page:
			if !strings.HasPrefix(r.header.Get("Content-Type"), "text/html") || r.header.Get("Retry-After") == "" ||
				!strings.Contains(string(r.body), "Too many sign-ins at once") {
				t.Fatalf("a busy sign-in page: %s %v", r, r.header)
			}
		case r.status == http.StatusServiceUnavailable:
			var body struct{ Error string }
			if json.Unmarshal(r.body, &body) != nil || body.Error != "temporarily_unavailable" || r.header.Get("Retry-After") == "" {
				t.Fatalf("a busy password grant: %s %v", r, r.header)
			}
		case o.page && r.status == http.StatusUnauthorized, !o.page && r.status == http.StatusBadRequest:
		default:
			t.Fatalf("page %v: %s", o.page, r)
		}
		counts[fmt.Sprintf("page=%v %d", o.page, r.status)]++
	}
	peak, slots := caddymodule.PasswordHashPeak()
	heap := peakHeap.Load()
	t.Logf("outcomes %v; at most %d of %d slots hashing at once; heap in use %d MiB at the start, %d MiB at the peak",
		counts, peak, slots, baseline>>20, heap>>20)
	if peak < 1 || peak > int64(slots) {
		t.Fatalf("%d password hashes ran at once, with %d slots", peak, slots)
	}
	if bound := 2*baseline + uint64(2*slots+2)*argonMiB<<20; heap > bound {
		t.Fatalf("heap in use peaked at %d MiB, over the bound of %d MiB", heap>>20, bound>>20)
	}
	if counts["page=true 503"]+counts["page=false 503"] == 0 || counts["page=true 401"]+counts["page=false 400"] == 0 {
		t.Fatalf("want both checked passwords and busy answers: %v", counts)
	}
}

// TestSignupsPerAddress: five sign-ups per address per hour; the sixth is refused with 429 (no
// account, no credits), while another address still signs up.
func TestSignupsPerAddress(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	signup := func(source, email string) *response {
		b := newBrowserFrom(e, source)
		page := b.get("/auth/signup")
		return b.do(http.MethodPost, "/auth/signup", url.Values{"csrf": {csrf(t, page)}, "email": {email},
			"password": {"a fine password"}}, nil)
	}
	for i := 0; i < 5; i++ {
		if r := signup("127.0.0.51", fmt.Sprintf("farm%d@example.com", i)); r.status != http.StatusSeeOther {
			t.Fatalf("sign-up %d: %s", i, r)
		}
	}
	r := signup("127.0.0.51", "farm5@example.com")
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" || r.header.Get("X-RateLimit-Limit") != "5" ||
		!strings.HasPrefix(r.header.Get("Content-Type"), "text/html") {
		t.Fatalf("the 6th sign-up from one address: %s %v", r, r.header)
	}
	var n int
	if err := e.openDB().QueryRow(`SELECT count(*) FROM users WHERE email = 'farm5@example.com'`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("the refused sign-up made %d accounts (%v)", n, err)
	}
	if r := signup("127.0.0.52", "elsewhere@example.com"); r.status != http.StatusSeeOther {
		t.Fatalf("a sign-up from another address: %s", r)
	}
}

// TestSigninLockoutPerAddress: failures from address A lock A out of the account, not the
// owner at address B; guessing spread over addresses still trips the account-wide bound. (The
// bounds are lowered to 3 per account and address and 6 per account, from 10 and 100, so that
// few passwords are hashed.)
func TestSigninLockoutPerAddress(t *testing.T) {
	defer caddymodule.SetSigninLimit(caddymodule.LimiterSigninAccount, 3)()
	defer caddymodule.SetSigninLimit(caddymodule.LimiterSigninAccountWide, 6)()
	e := startGateway(t, signinSetup(""))
	newBrowser(e).signup("owner@example.com", "the right password")
	from := func(source string) *browser { return newBrowserFrom(e, source) }
	a, b, c, d := from("127.0.0.41"), from("127.0.0.42"), from("127.0.0.43"), from("127.0.0.44")
	fail := func(br *browser, what string) {
		t.Helper()
		for i := 0; i < 3; i++ {
			if r := br.login("owner@example.com", fmt.Sprintf("guess %d", i)); r.status != http.StatusUnauthorized {
				t.Fatalf("%s, guess %d: %s", what, i, r)
			}
		}
	}
	refused := func(tier string) float64 {
		n, _ := metricSum(e.scrape(), "llm_gateway_rate_limited_total", map[string]string{"tier": tier, "limit": "signin_per_15m"})
		return n
	}

	fail(a, "address A")
	if r := a.login("owner@example.com", "the right password"); r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
		t.Fatalf("the right password from A after its failures: %s", r)
	}
	if r := b.login("owner@example.com", "the right password"); r.status != http.StatusSeeOther {
		t.Fatalf("the owner from a clean address B: %s", r)
	}
	wideBefore := refused(caddymodule.LimiterSigninAccountWide)
	fail(c, "address C") // 6 failures for the account, from two addresses
	if r := d.login("owner@example.com", "the right password"); r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
		t.Fatalf("the right password from D once the account-wide bound is reached: %s", r)
	}
	if got := refused(caddymodule.LimiterSigninAccountWide); got != wideBefore+1 {
		t.Fatalf("refusals by the account-wide limiter: %v, want %v", got, wideBefore+1)
	}
}

// TestConfidentialClientBothTokenEndpoints: a confidential client needs its secret for the
// password and refresh grants at /oauth/token and at /auth/v1/token alike.
func TestConfidentialClientBothTokenEndpoints(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	conf := e.createApp(map[string]any{"name": "Server", "confidential": true, "first_party": true, "redirect_uris": []string{}})
	newBrowser(e).signup("conf@example.com", "the right password")
	basic := func(id, secret string) map[string]string {
		return map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(id+":"+secret))}
	}
	password := url.Values{"grant_type": {"password"}, "username": {"conf@example.com"}, "password": {"the right password"}}

	// /oauth/token, password grant.
	withID := url.Values{"client_id": {conf.ClientID}}
	for k, v := range password {
		withID[k] = v
	}
	oauthErrorOf(t, e.token(withID, nil), http.StatusUnauthorized, "invalid_client")
	rt := tokensOf(t, e.token(password, basic(conf.ClientID, conf.ClientSecret))).RefreshToken

	// /oauth/token, refresh grant.
	oauthErrorOf(t, e.token(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {conf.ClientID}}, nil),
		http.StatusUnauthorized, "invalid_client")
	rt = tokensOf(t, e.token(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {conf.ClientID},
		"client_secret": {conf.ClientSecret}}, nil)).RefreshToken

	// /auth/v1/token, both grants: the apikey alone is not enough.
	supabase := func(grant string, body map[string]string, hdr map[string]string) *response {
		h := map[string]string{"apikey": conf.ClientID}
		for k, v := range hdr {
			h[k] = v
		}
		return e.request(http.MethodPost, e.gw+"/auth/v1/token?grant_type="+grant, body, h)
	}
	creds := map[string]string{"email": "conf@example.com", "password": "the right password"}
	oauthErrorOf(t, supabase("password", creds, nil), http.StatusUnauthorized, "invalid_client")
	oauthErrorOf(t, supabase("password", creds, basic(conf.ClientID, "wrong")), http.StatusUnauthorized, "invalid_client")
	oauthErrorOf(t, supabase("password", creds, basic("app_other", conf.ClientSecret)), http.StatusUnauthorized, "invalid_client")
	if r := supabase("password", creds, basic(conf.ClientID, conf.ClientSecret)); r.status != http.StatusOK {
		t.Fatalf("/auth/v1/token password grant with the secret (Basic): %s", r)
	}
	oauthErrorOf(t, supabase("refresh_token", map[string]string{"refresh_token": rt}, nil), http.StatusUnauthorized, "invalid_client")
	if r := supabase("refresh_token", map[string]string{"refresh_token": rt, "client_secret": conf.ClientSecret}, nil); r.status != http.StatusOK {
		t.Fatalf("/auth/v1/token refresh grant with the secret (in the body): %s", r)
	}
}

// TestSigninBehindTLSProxy: the gateway serves plain HTTP behind a proxy that terminates TLS;
// its issuer is https. The browser's form posts carry Origin: https://<issuer host> and are
// taken; the cookies are Secure, with the __Host- prefix; other origins are still refused.
func TestSigninBehindTLSProxy(t *testing.T) {
	e := startGateway(t, signinSetup(""))
	c := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	proxied := func(method, path string, form url.Values, hdr map[string]string) *response {
		t.Helper()
		var body io.Reader
		if form != nil {
			body = strings.NewReader(form.Encode())
		}
		req, _ := http.NewRequest(method, e.gw+path, body)
		req.Header.Set("X-Forwarded-Proto", "https")
		req.Header.Set("X-Forwarded-Host", "gw.test")
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return &response{status: resp.StatusCode, header: resp.Header, body: raw}
	}
	cookieOf := func(r *response, name string) *http.Cookie {
		t.Helper()
		for _, ck := range (&http.Response{Header: r.header}).Cookies() {
			if ck.Name == name {
				if !ck.Secure || !ck.HttpOnly || ck.Path != "/" || ck.Domain != "" {
					t.Fatalf("cookie %s: %+v (raw %q)", name, ck, r.header.Values("Set-Cookie"))
				}
				return ck
			}
		}
		t.Fatalf("no %s cookie: %q", name, r.header.Values("Set-Cookie"))
		return nil
	}

	page := proxied(http.MethodGet, "/auth/signup", nil, nil)
	binding := cookieOf(page, "__Host-llm_gateway_csrf")
	form := url.Values{"csrf": {csrf(t, page)}, "email": {"proxied@example.com"}, "password": {"a fine password"}}
	withCSRF := "__Host-llm_gateway_csrf=" + binding.Value
	if r := proxied(http.MethodPost, "/auth/signup", form, map[string]string{"Origin": "https://evil.test", "Cookie": withCSRF}); r.status != http.StatusForbidden {
		t.Fatalf("a cross-site sign-up: %s", r)
	}
	if r := proxied(http.MethodPost, "/auth/signup", form, map[string]string{"Origin": "http://gw.test", "Cookie": withCSRF}); r.status != http.StatusForbidden {
		t.Fatalf("a sign-up from the http origin: %s", r)
	}
	r := proxied(http.MethodPost, "/auth/signup", form, map[string]string{"Origin": "https://gw.test", "Cookie": withCSRF})
	if r.status != http.StatusSeeOther {
		t.Fatalf("the sign-up form behind the proxy: %s", r)
	}
	session := cookieOf(r, "__Host-llm_gateway_session")
	if a := proxied(http.MethodGet, "/account", nil, map[string]string{"Cookie": "__Host-llm_gateway_session=" + session.Value}); a.status != http.StatusOK ||
		!strings.Contains(string(a.body), "proxied@example.com") {
		t.Fatalf("the account page with the session: %s", a)
	}
	login := proxied(http.MethodGet, "/auth/login", nil, map[string]string{"Cookie": withCSRF})
	r = proxied(http.MethodPost, "/auth/login", url.Values{"csrf": {csrf(t, login)}, "email": {"proxied@example.com"},
		"password": {"a fine password"}}, map[string]string{"Origin": "https://gw.test", "Cookie": withCSRF})
	if r.status != http.StatusSeeOther {
		t.Fatalf("the sign-in form behind the proxy: %s", r)
	}
	cookieOf(r, "__Host-llm_gateway_session")
}
