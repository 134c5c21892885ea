package signin

import (
	"encoding/base64"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"
)

// FuzzRedirectMatch checks the redirect checks' promises: a return URL that Check accepts
// re-serialises to itself, has an allowed origin, no userinfo, fragment or backslash, and no
// dot segment; a redirect_uri that MatchRedirectURI accepts equals a registered string.
func FuzzRedirectMatch(f *testing.F) {
	for _, s := range []string{
		"https://app.example.com/cb", "http://localhost:8080/cb?x=1", "https://[::1]:8443/",
		"https://app.example.com.evil.com/cb", "https://app@evil.com/", "https:evil.com",
		"//evil.com", "https://app.example.com/%2e%2e/x", "https://app.example.com/..;/x",
		"javascript:alert(1)", "data:text/html,x", "https://app.example.com/cb#x",
		"https:\\\\evil.com", "https://bücher.example/", "https://app.example.com:443/",
	} {
		f.Add(s, "https://app.example.com/cb")
	}
	listed := ReturnPolicy{Origins: []string{"https://App.example.com", "http://localhost:8080", "https://[::1]:8443"}}
	policies := []ReturnPolicy{{}, listed}
	f.Fuzz(func(t *testing.T, raw, registered string) {
		for _, p := range policies {
			u, origin, err := p.Check(raw)
			if len(p.Origins) == 0 && (err == nil) != (ValidRedirectURI(raw) == nil) {
				t.Fatalf("Check and ValidRedirectURI disagree on %q: %v", raw, err)
			}
			if err != nil {
				if u != nil || origin != "" || !errors.Is(err, ErrRedirect) {
					t.Fatalf("Check(%q) = %v, %q, %v", raw, u, origin, err)
				}
				continue
			}
			if u.String() != raw {
				t.Fatalf("Check(%q) accepted a URL that re-serialises to %q", raw, u)
			}
			if u.User != nil || u.Fragment != "" || strings.ContainsAny(raw, "#\\ ") {
				t.Fatalf("Check(%q) accepted userinfo, a fragment, a backslash or a space", raw)
			}
			if origin != u.Scheme+"://"+u.Host || !strings.HasPrefix(raw, origin) {
				t.Fatalf("Check(%q): origin %q is not the URL's", raw, origin)
			}
			if rest := raw[len(origin):]; rest != "" && rest[0] != '/' && rest[0] != '?' {
				t.Fatalf("Check(%q): origin %q followed by %q", raw, origin, rest)
			}
			if strings.Trim(u.Host, "abcdefghijklmnopqrstuvwxyz0123456789.-:[]") != "" {
				t.Fatalf("Check(%q): host %q has other characters", raw, u.Host)
			}
			again, err := url.Parse(raw)
			if err != nil || again.Scheme != u.Scheme || again.Host != u.Host || again.Opaque != "" {
				t.Fatalf("Check(%q): parses differently again", raw)
			}
			for _, seg := range strings.Split(u.Path, "/") {
				if seg, _, _ = strings.Cut(seg, ";"); seg == "." || seg == ".." {
					t.Fatalf("Check(%q): dot segment", raw)
				}
			}
			if !allowedOrigin(p, u.Scheme, u.Hostname(), origin) {
				t.Fatalf("Check(%q): origin %q not allowed by %v", raw, origin, p.Origins)
			}
		}

		reg := []string{registered, "https://app.example.com/cb"}
		if MatchRedirectURI(reg, raw) {
			if raw != reg[0] && raw != reg[1] {
				t.Fatalf("MatchRedirectURI(%q, %q) is true", reg, raw)
			}
		} else if raw != "" && (raw == reg[0] || raw == reg[1]) {
			t.Fatalf("MatchRedirectURI(%q, %q) is false", reg, raw)
		}
	})
}

// allowedOrigin decides, apart from the code under test, whether p allows origin.
func allowedOrigin(p ReturnPolicy, scheme, host, origin string) bool {
	if len(p.Origins) == 0 {
		return scheme == "https" || scheme == "http" && (host == "localhost" || host == "127.0.0.1" || host == "::1")
	}
	for _, o := range p.Origins {
		if strings.ToLower(o) == origin {
			return true
		}
	}
	return false
}

// fuzzTokens are tokens signed by seedKey(1): Ed25519 is deterministic, so they are the same
// on every run, and the seed corpus can hold them.
func fuzzTokens(t testing.TB) (*Verifier, map[string]Claims) {
	ks := mustKeyset(t, seedKey(1, t0), seedKey(2, t0.Add(-time.Hour)))
	v := testVerifier(ks, TypeAccess, TypeFragment)
	frag := Claims{Issuer: testIssuer, Subject: "usr_2", Audience: testAudience, IP: "2001:db8::1",
		ID: "jti-2", Type: TypeFragment, Expiry: t0.Add(10 * time.Minute)}
	good := map[string]Claims{}
	for _, c := range []Claims{accessClaims(), frag} {
		tok := mustSign(t, ks, c)
		got, err := v.Verify(tok)
		if err != nil {
			t.Fatal(err)
		}
		good[tok] = got
	}
	return v, good
}

// FuzzJWTVerify checks that Verify never panics, refuses with ErrInvalidToken and no token in
// the error, and accepts only the tokens that were signed: the fuzzed token itself, and each
// signed token with one byte replaced.
func FuzzJWTVerify(f *testing.F) {
	v, good := fuzzTokens(f)
	for tok := range good {
		f.Add(tok, uint16(0), byte('A'))
		f.Add(tok[:len(tok)-1], uint16(len(tok)-1), byte('.'))
	}
	f.Add("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", uint16(3), byte('x'))
	f.Add(strings.Repeat(".", 1000), uint16(10), byte('.'))
	f.Fuzz(func(t *testing.T, token string, pos uint16, b byte) {
		check := func(tok string) {
			c, err := v.Verify(tok)
			if err != nil {
				if !errors.Is(err, ErrInvalidToken) {
					t.Fatalf("error %v does not wrap ErrInvalidToken", err)
				}
				checkNoSecret(t, err, tok)
				return
			}
			want, ok := good[tok]
			if !ok {
				t.Fatalf("accepted a token that was never signed: %q", tok)
			}
			if c != want {
				t.Fatalf("claims %+v, want %+v", c, want)
			}
		}
		check(token)
		for tok := range good {
			m := []byte(tok)
			m[int(pos)%len(m)] = b
			check(string(m))
		}
	})
}

// FuzzPKCE checks that VerifyPKCE accepts only a well-formed verifier whose S256 is the
// challenge, and always accepts one; and that CheckChallenge accepts only 43 canonical
// base64url characters, never with "plain".
func FuzzPKCE(f *testing.F) {
	f.Add(rfcChallenge, rfcVerifier)
	f.Add(rfcChallenge, strings.Repeat("a", 42))
	f.Add(rfcVerifier, rfcVerifier)
	f.Add("", rfcVerifier)
	f.Add(s256(strings.Repeat("~", 128)), strings.Repeat("~", 128))
	f.Fuzz(func(t *testing.T, challenge, verifier string) {
		wellFormed := len(verifier) >= 43 && len(verifier) <= 128 &&
			strings.Trim(verifier, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~") == ""
		err := VerifyPKCE(challenge, verifier)
		if err == nil && (!wellFormed || s256(verifier) != challenge) {
			t.Fatalf("VerifyPKCE(%q, %q) accepted", challenge, verifier)
		}
		if err != nil && !errors.Is(err, ErrPKCE) {
			t.Fatalf("error %v does not wrap ErrPKCE", err)
		}
		if own := VerifyPKCE(s256(verifier), verifier); (own == nil) != wellFormed {
			t.Fatalf("VerifyPKCE of %q with its own challenge = %v, well-formed %v", verifier, own, wellFormed)
		}

		if CheckChallenge(challenge, "S256") == nil {
			raw, err := base64.RawURLEncoding.Strict().DecodeString(challenge)
			if err != nil || len(raw) != 32 || len(challenge) != 43 || strings.ContainsAny(challenge, "\r\n") {
				t.Fatalf("CheckChallenge accepted %q", challenge)
			}
		}
		if CheckChallenge(challenge, "plain") == nil || CheckChallenge(challenge, "") == nil {
			t.Fatal("CheckChallenge accepted plain")
		}
	})
}
