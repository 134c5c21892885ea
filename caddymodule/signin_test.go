package caddymodule

import (
	"crypto/tls"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestSigninValidate(t *testing.T) {
	ok := func() *Signin {
		return &Signin{Issuer: "https://gw.example.com", FragmentTokenTTL: caddy.Duration(15 * time.Minute),
			AccessTokenTTL: caddy.Duration(time.Hour), CodeTTL: caddy.Duration(time.Minute),
			RefreshGrace: caddy.Duration(30 * time.Second), RefreshTokenTTL: caddy.Duration(time.Hour),
			SessionTTL: caddy.Duration(time.Hour)}
	}
	if err := ok().validate(); err != nil {
		t.Fatalf("a good configuration: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*Signin)
		want string
	}{
		{"no issuer", func(s *Signin) { s.Issuer = "" }, "issuer"},
		{"issuer with a path", func(s *Signin) { s.Issuer = "https://gw.example.com/auth" }, "issuer"},
		{"issuer not http", func(s *Signin) { s.Issuer = "ftp://gw.example.com" }, "issuer"},
		{"issuer with userinfo", func(s *Signin) { s.Issuer = "https://a@gw.example.com" }, "issuer"},
		{"return origin with a path", func(s *Signin) { s.ReturnOrigins = []string{"https://app.example.com/x"} }, "return_origins"},
		{"fragment token too long", func(s *Signin) { s.FragmentTokenTTL = caddy.Duration(16 * time.Minute) }, "fragment_token_ttl"},
		{"access token too long", func(s *Signin) { s.AccessTokenTTL = caddy.Duration(2 * time.Hour) }, "access_token_ttl"},
		{"code too long", func(s *Signin) { s.CodeTTL = caddy.Duration(61 * time.Second) }, "code_ttl"},
		{"grace too long", func(s *Signin) { s.RefreshGrace = caddy.Duration(2 * time.Minute) }, "refresh_grace"},
		{"refresh too short", func(s *Signin) { s.RefreshTokenTTL = caddy.Duration(time.Second) }, "refresh_token_ttl"},
		{"negative signup credits", func(s *Signin) { s.SignupCredits = -1 }, "signup_credits"},
		{"external without audience", func(s *Signin) {
			s.ExternalIssuers = []*ExternalIssuer{{Issuer: "https://idp", JWKSURL: "https://idp/jwks"}}
		}, "audience"},
		{"external is the gateway", func(s *Signin) {
			s.ExternalIssuers = []*ExternalIssuer{{Issuer: s.Issuer, JWKSURL: "https://idp/jwks", Audience: "a"}}
		}, "issuer"},
		{"external HS256", func(s *Signin) {
			s.ExternalIssuers = []*ExternalIssuer{{Issuer: "https://idp", JWKSURL: "https://idp/jwks", Audience: "a", Algorithms: []string{"HS256"}}}
		}, "HS256"},
		{"external without issuer", func(s *Signin) {
			s.ExternalIssuers = []*ExternalIssuer{{JWKSURL: "https://idp/jwks", Audience: "a"}}
		}, "issuer"},
		{"external bad JWKS URL", func(s *Signin) {
			s.ExternalIssuers = []*ExternalIssuer{{Issuer: "https://idp", JWKSURL: "file:///etc/passwd", Audience: "a"}}
		}, "jwks url"},
		{"external unknown scope", func(s *Signin) {
			s.ExternalIssuers = []*ExternalIssuer{{Issuer: "https://idp", JWKSURL: "https://idp/jwks", Audience: "a", Scopes: []string{"admin"}}}
		}, "scope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := ok()
			tc.mod(s)
			err := s.validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one naming %q", err, tc.want)
			}
		})
	}
}

// The cookies are HttpOnly and SameSite=Lax; when the issuer is https they are Secure with the
// __Host- prefix, and read back under that name, whether the request itself came over TLS or
// not (behind a TLS-terminating proxy it does not); when the issuer is http, neither, even over
// TLS.
func TestSigninCookies(t *testing.T) {
	plainGW := &Gateway{Signin: &Signin{Issuer: "http://gw.test"}}
	secureGW := &Gateway{Signin: &Signin{Issuer: "https://gw.test"}}
	plain := httptest.NewRequest(http.MethodGet, "http://gw.test/auth/login", nil)
	tlsReq := httptest.NewRequest(http.MethodGet, "https://gw.test/auth/login", nil)
	tlsReq.TLS = &tls.ConnectionState{}
	for _, r := range []*http.Request{plain, tlsReq} {
		c := plainGW.cookie(r, sessionCookieName, "v", 60)
		if c.Name != sessionCookieName || c.Secure || !c.HttpOnly || c.SameSite != http.SameSiteLaxMode || c.Path != "/" {
			t.Fatalf("http issuer: cookie %+v", c)
		}
		c = secureGW.cookie(r, sessionCookieName, "v", 60)
		if c.Name != "__Host-"+sessionCookieName || !c.Secure || !c.HttpOnly || c.Domain != "" || c.Path != "/" {
			t.Fatalf("https issuer (request TLS %v): cookie %+v", r.TLS != nil, c)
		}
	}
	plain.AddCookie(&http.Cookie{Name: sessionCookieName, Value: "plain-name"})
	if got := secureGW.readCookie(plain, sessionCookieName); got != "" {
		t.Fatalf("with an https issuer the cookie without its prefix was read: %q", got)
	}
	plain.AddCookie(&http.Cookie{Name: "__Host-" + sessionCookieName, Value: "prefixed"})
	if got := secureGW.readCookie(plain, sessionCookieName); got != "prefixed" {
		t.Fatalf("read %q", got)
	}
	if got := plainGW.readCookie(plain, sessionCookieName); got != "plain-name" {
		t.Fatalf("http issuer read %q", got)
	}
}

// The expected Origin of form posts is the issuer's, default port or not.
func TestSigninOrigin(t *testing.T) {
	for issuer, want := range map[string]string{
		"https://gw.test":          "https://gw.test",
		"https://gw.test:443":      "https://gw.test",
		"https://gw.test:8443":     "https://gw.test:8443",
		"http://127.0.0.1:80":      "http://127.0.0.1",
		"http://[::1]:80":          "http://[::1]",
		"https://[2001:db8::1]:99": "https://[2001:db8::1]:99",
	} {
		if got := (&Signin{Issuer: issuer}).origin(); got != want {
			t.Errorf("origin of %s = %q, want %q", issuer, got, want)
		}
	}
}

func TestLocalNext(t *testing.T) {
	for in, want := range map[string]string{
		"":                               "/account",
		"/auth/authorize?redirect=x&s=1": "/auth/authorize?redirect=x&s=1",
		"//evil.test/":                   "/account",
		"/\\evil.test":                   "/account",
		"https://evil.test/":             "/account",
		"javascript:alert(1)":            "/account",
		"/a\r\nSet-Cookie: x":            "/account",
		"relative":                       "/account",
		"/" + strings.Repeat("a", 5000):  "/account",
	} {
		if got := localNext(in); got != want {
			t.Errorf("localNext(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestUnverifiedIssuer(t *testing.T) {
	enc := base64.RawURLEncoding.EncodeToString
	for _, tc := range []struct{ token, want string }{
		{enc([]byte(`{}`)) + "." + enc([]byte(`{"iss":"https://idp"}`)) + ".sig", "https://idp"},
		{enc([]byte(`{}`)) + "." + enc([]byte(`{"iss":7}`)) + ".sig", ""},
		{"a.b", ""},
		{"a.%%%.c", ""},
		{strings.Repeat("a", 9000) + ".b.c", ""},
	} {
		if got := unverifiedIssuer(tc.token); got != tc.want {
			t.Errorf("unverifiedIssuer(%.40q) = %q, want %q", tc.token, got, tc.want)
		}
	}
}

func TestSigninRoute(t *testing.T) {
	for path, want := range map[string]bool{
		"/auth/login": true, "/auth/authorize": true, "/api/third-party/auth": true, "/account": true,
		"/account/keys": true, "/oauth/token": true, "/.well-known/jwks.json": true, "/auth/v1/token": true,
		"/v1/chat/completions": false, "/auth": false, "/accounts": false, "/oauth": false, "/": false,
	} {
		if got := signinRoute(path) != nil; got != want {
			t.Errorf("signinRoute(%q) != nil: %v", path, got)
		}
	}
}
