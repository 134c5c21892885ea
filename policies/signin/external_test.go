package signin

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

const (
	extIssuer   = "https://idp.example.com/"
	extAudience = "api://gateway"
)

var (
	testRSAKey = sync.OnceValue(func() *rsa.PrivateKey {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		return k
	})
	testECKey = sync.OnceValue(func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
	otherECKey = sync.OnceValue(func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
)

func enc(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func rsaJWK(kid string, pub *rsa.PublicKey, alg string) map[string]any {
	m := map[string]any{"kty": "RSA", "kid": kid, "use": "sig", "n": enc(pub.N.Bytes()), "e": enc(big.NewInt(int64(pub.E)).Bytes())}
	if alg != "" {
		m["alg"] = alg
	}
	return m
}

func ecJWK(kid string, pub *ecdsa.PublicKey) map[string]any {
	point, err := pub.Bytes()
	if err != nil {
		panic(err)
	}
	return map[string]any{"kty": "EC", "kid": kid, "crv": "P-256", "x": enc(point[1:33]), "y": enc(point[33:])}
}

func okpJWK(kid string, pub ed25519.PublicKey) map[string]any {
	return map[string]any{"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": enc(pub)}
}

func jwksBody(keys ...map[string]any) []byte {
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		panic(err)
	}
	return b
}

func rsSign(k *rsa.PrivateKey) func([]byte) []byte {
	return func(input []byte) []byte {
		d := sha256.Sum256(input)
		sig, err := rsa.SignPKCS1v15(nil, k, crypto.SHA256, d[:])
		if err != nil {
			panic(err)
		}
		return sig
	}
}

func psSign(k *rsa.PrivateKey) func([]byte) []byte {
	return func(input []byte) []byte {
		d := sha256.Sum256(input)
		sig, err := rsa.SignPSS(rand.Reader, k, crypto.SHA256, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		if err != nil {
			panic(err)
		}
		return sig
	}
}

func esSign(k *ecdsa.PrivateKey) func([]byte) []byte {
	return func(input []byte) []byte {
		d := sha256.Sum256(input)
		r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
		if err != nil {
			panic(err)
		}
		sig := make([]byte, 64)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
		return sig
	}
}

// jwksServer serves a JWKS that a test can change, and counts the requests.
type jwksServer struct {
	*httptest.Server
	hits atomic.Int32

	mu     sync.Mutex
	status int
	body   []byte
}

func newJWKSServer(t *testing.T, body []byte) *jwksServer {
	s := &jwksServer{status: http.StatusOK, body: body}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		status, body := s.status, s.body
		s.mu.Unlock()
		if r.URL.Path != "/jwks" {
			http.Redirect(w, r, "/jwks", http.StatusFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		w.Write(body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) set(status int, body []byte) {
	s.mu.Lock()
	s.status, s.body = status, body
	s.mu.Unlock()
}

// testClock is a clock the test moves.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func standardJWKS() []byte {
	return jwksBody(
		rsaJWK("rsa1", &testRSAKey().PublicKey, "RS256"),
		ecJWK("ec1", &testECKey().PublicKey),
		okpJWK("ed1", ed25519.PublicKey(seedKey(9, t0).Private[32:])),
	)
}

func newIssuer(s *jwksServer, clock *testClock) *ExternalIssuer {
	return &ExternalIssuer{
		Issuer: extIssuer, JWKSURL: s.URL + "/jwks", Audience: extAudience,
		Algorithms: []string{"RS256", "ES256", "EdDSA"}, Client: s.Client(),
		Leeway: 30 * time.Second, Now: clock.Now,
	}
}

func extHeader(alg, kid, extra string) string {
	h := fmt.Sprintf(`{"alg":%q,"kid":%q`, alg, kid)
	if extra != "" {
		h += "," + extra
	}
	return h + "}"
}

func extPayload(extra string) string { return extPayloadAt(t0, extra) }

// extPayloadAt is the payload of a token valid at now, issued a minute before, expiring ten
// minutes after.
func extPayloadAt(now time.Time, extra string) string {
	p := fmt.Sprintf(`{"iss":%q,"sub":"ext-1","aud":[%q,"other"],"iat":%d,"exp":%d`,
		extIssuer, extAudience, now.Unix()-60, now.Unix()+600)
	if extra != "" {
		p += "," + extra
	}
	return p + "}"
}

func extPayloadWith(members string) string {
	return "{" + members + "}"
}

func TestExternalVerify(t *testing.T) {
	srv := newJWKSServer(t, standardJWKS())
	spy := newJWKSServer(t, nil)
	clock := &testClock{t: t0}
	e := newIssuer(srv, clock)
	if err := e.Validate(); err != nil {
		t.Fatal(err)
	}
	rs := rsSign(testRSAKey())
	es := esSign(testECKey())
	ed := edSigner(seedKey(9, t0))
	der, _ := x509.MarshalPKIXPublicKey(&testRSAKey().PublicKey)
	hsWithPublicKey := func(input []byte) []byte {
		m := hmac.New(sha256.New, der)
		m.Write(input)
		return m.Sum(nil)
	}
	at := func(d time.Duration) int64 { return t0.Add(d).Unix() }
	base := fmt.Sprintf(`"iss":%q,"sub":"ext-1","aud":%q`, extIssuer, extAudience)

	tests := []struct {
		name  string
		token string
		ok    bool
	}{
		{"RS256", forge(extHeader("RS256", "rsa1", `"typ":"JWT"`), extPayload(""), rs), true},
		{"ES256", forge(extHeader("ES256", "ec1", ""), extPayload(""), es), true},
		{"EdDSA", forge(extHeader("EdDSA", "ed1", `"typ":"at+jwt"`), extPayload(""), ed), true},
		{"typ application/at+jwt", forge(extHeader("RS256", "rsa1", `"typ":"application/AT+JWT"`), extPayload(""), rs), true},
		{"aud a string", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(base+fmt.Sprintf(`,"exp":%d`, at(time.Minute))), rs), true},
		{"keycloak Bearer", forge(extHeader("RS256", "rsa1", ""), extPayload(`"typ":"Bearer"`), rs), true},
		{"unknown header member", forge(extHeader("RS256", "rsa1", `"x5t":"abc"`), extPayload(""), rs), true},
		{"exp within leeway", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(base+fmt.Sprintf(`,"exp":%d`, at(-29*time.Second))), rs), true},

		{"alg not listed", forge(extHeader("PS256", "rsa1", ""), extPayload(""), psSign(testRSAKey())), false},
		{"alg none", forge(extHeader("none", "rsa1", ""), extPayload(""), nil), false},
		{"alg none signed", forge(extHeader("none", "rsa1", ""), extPayload(""), rs), false},
		{"HS256 with the RSA public key", forge(extHeader("HS256", "rsa1", ""), extPayload(""), hsWithPublicKey), false},
		{"alg of another key type", forge(extHeader("ES256", "rsa1", ""), extPayload(""), es), false},
		{"RS256 by the EC kid", forge(extHeader("RS256", "ec1", ""), extPayload(""), rs), false},
		{"EdDSA by the RSA kid", forge(extHeader("EdDSA", "rsa1", ""), extPayload(""), ed), false},
		{"signed by another key", forge(extHeader("ES256", "ec1", ""), extPayload(""), esSign(otherECKey())), false},
		{"signature over other claims", strings.Join(append(strings.Split(forge(extHeader("RS256", "rsa1", ""), extPayload(""), rs), ".")[:1], b64(extPayload(`"scope":"*"`)), strings.Split(forge(extHeader("RS256", "rsa1", ""), extPayload(""), rs), ".")[2]), "."), false},
		{"ES256 signature too short", forge(extHeader("ES256", "ec1", ""), extPayload(""), func(in []byte) []byte { return es(in)[:63] }), false},
		{"jku to elsewhere", forge(extHeader("RS256", "spy", fmt.Sprintf(`"jku":%q`, spy.URL+"/jwks")), extPayload(""), rs), false},
		{"jku with a known kid", forge(extHeader("RS256", "rsa1", fmt.Sprintf(`"jku":%q`, spy.URL+"/jwks")), extPayload(""), rs), false},
		{"x5u", forge(extHeader("RS256", "rsa1", fmt.Sprintf(`"x5u":%q`, spy.URL+"/x")), extPayload(""), rs), false},
		{"jwk", forge(extHeader("RS256", "rsa1", `"jwk":{"kty":"RSA"}`), extPayload(""), rs), false},
		{"x5c", forge(extHeader("RS256", "rsa1", `"x5c":["MII"]`), extPayload(""), rs), false},
		{"crit", forge(extHeader("RS256", "rsa1", `"crit":["b64"],"b64":false`), extPayload(""), rs), false},
		{"missing kid", forge(`{"alg":"RS256"}`, extPayload(""), rs), false},
		{"unknown kid", forge(extHeader("RS256", "nope", ""), extPayload(""), rs), false},
		{"traversal kid", forge(extHeader("RS256", "../../etc/passwd", ""), extPayload(""), rs), false},
		{"typ id_token", forge(extHeader("RS256", "rsa1", `"typ":"id_token+jwt"`), extPayload(""), rs), false},
		{"typ refresh", forge(extHeader("RS256", "rsa1", `"typ":"refresh+jwt"`), extPayload(""), rs), false},
		{"typ fragment", forge(extHeader("RS256", "rsa1", `"typ":"fragment+jwt"`), extPayload(""), rs), false},
		{"typ logout", forge(extHeader("RS256", "rsa1", `"typ":"logout+jwt"`), extPayload(""), rs), false},
		{"keycloak Refresh", forge(extHeader("RS256", "rsa1", ""), extPayload(`"typ":"Refresh"`), rs), false},
		{"keycloak ID", forge(extHeader("RS256", "rsa1", ""), extPayload(`"typ":"ID"`), rs), false},
		{"wrong issuer", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":"https://idp.example.com","sub":"x","aud":%q,"exp":%d`, extAudience, at(time.Minute))), rs), false},
		{"wrong audience", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":%q,"sub":"x","aud":["a","b"],"exp":%d`, extIssuer, at(time.Minute))), rs), false},
		{"no audience", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":%q,"sub":"x","exp":%d`, extIssuer, at(time.Minute))), rs), false},
		{"audience null", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":%q,"sub":"x","aud":null,"exp":%d`, extIssuer, at(time.Minute))), rs), false},
		{"audience array with null", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":%q,"sub":"x","aud":[null,%q],"exp":%d`, extIssuer, extAudience, at(time.Minute))), rs), false},
		{"audience a number", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":%q,"sub":"x","aud":1,"exp":%d`, extIssuer, at(time.Minute))), rs), false},
		{"no subject", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(fmt.Sprintf(`"iss":%q,"aud":%q,"exp":%d`, extIssuer, extAudience, at(time.Minute))), rs), false},
		{"no expiry", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(base), rs), false},
		{"expired beyond leeway", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(base+fmt.Sprintf(`,"exp":%d`, at(-30*time.Second))), rs), false},
		{"nbf in the future", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(base+fmt.Sprintf(`,"exp":%d,"nbf":%d`, at(time.Hour), at(31*time.Second))), rs), false},
		{"iat in the future", forge(extHeader("RS256", "rsa1", ""), extPayloadWith(base+fmt.Sprintf(`,"exp":%d,"iat":%d`, at(time.Hour), at(31*time.Second))), rs), false},
		{"scope not a string", forge(extHeader("RS256", "rsa1", ""), extPayload(`"scope":["a"]`), rs), false},
		{"duplicate sub", forge(extHeader("RS256", "rsa1", ""), extPayload(`"sub":"admin"`), rs), false},
		{"oversized", forge(extHeader("RS256", "rsa1", ""), extPayload(`"pad":"`+strings.Repeat("x", MaxTokenLen)+`"`), rs), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := e.Verify(context.Background(), tt.token)
			if (err == nil) != tt.ok {
				t.Fatalf("Verify = %+v, %v; want ok %v", c, err, tt.ok)
			}
			if err != nil {
				if !errors.Is(err, ErrInvalidToken) || errors.Is(err, ErrJWKS) {
					t.Errorf("error %v: want ErrInvalidToken, not ErrJWKS", err)
				}
				checkNoSecret(t, err, tt.token)
				return
			}
			if c.Issuer != extIssuer || c.Subject != "ext-1" && c.Subject != "x" || c.Audience != extAudience {
				t.Errorf("claims = %+v", c)
			}
		})
	}
	if n := srv.hits.Load(); n != 1 {
		t.Errorf("%d JWKS fetches, want 1 (the clock did not move)", n)
	}
	if n := spy.hits.Load(); n != 0 {
		t.Errorf("a URL from a token header was fetched %d times", n)
	}

	// HS256 stays refused even when listed.
	e2 := newIssuer(srv, clock)
	e2.Algorithms = []string{"RS256", "HS256"}
	if err := e2.Validate(); err == nil {
		t.Error("Validate accepted HS256")
	}
	if _, err := e2.Verify(context.Background(), forge(extHeader("HS256", "rsa1", ""), extPayload(""), hsWithPublicKey)); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("HS256 listed: %v", err)
	}
}

func TestExternalClaims(t *testing.T) {
	srv := newJWKSServer(t, standardJWKS())
	e := newIssuer(srv, &testClock{t: t0})
	rs := rsSign(testRSAKey())
	tests := []struct {
		name, payload        string
		clientID, scope, jti string
	}{
		{"client_id and scope", extPayload(`"client_id":"c1","azp":"c2","scope":"chat:write models:read","jti":"j1","ip":"192.0.2.1"`), "c1", "chat:write models:read", "j1"},
		{"azp and scp array", extPayload(`"azp":"c2","scp":["chat:write","models:read"]`), "c2", "chat:write models:read", ""},
		{"scp string", extPayload(`"scp":"chat:write"`), "", "chat:write", ""},
		{"nothing", extPayload(""), "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := e.Verify(context.Background(), forge(extHeader("RS256", "rsa1", `"typ":"JWT"`), tt.payload, rs))
			if err != nil {
				t.Fatal(err)
			}
			want := Claims{Issuer: extIssuer, Subject: "ext-1", Audience: extAudience, ClientID: tt.clientID,
				Scope: tt.scope, ID: tt.jti, Type: "JWT", IssuedAt: t0.Add(-time.Minute), Expiry: t0.Add(10 * time.Minute)}
			if c != want {
				t.Errorf("claims = %+v\nwant     %+v", c, want)
			}
		})
	}
}

func TestExternalRefetch(t *testing.T) {
	srv := newJWKSServer(t, jwksBody(rsaJWK("rsa1", &testRSAKey().PublicKey, "")))
	clock := &testClock{t: t0}
	e := newIssuer(srv, clock)
	ctx := context.Background()
	rs, es := rsSign(testRSAKey()), esSign(testECKey())
	rsaToken := func() string { return forge(extHeader("RS256", "rsa1", ""), extPayloadAt(clock.Now(), ""), rs) }
	ecToken := func() string { return forge(extHeader("ES256", "ec-new", ""), extPayloadAt(clock.Now(), ""), es) }
	verify := func(what, tok string, ok bool, hits int32) {
		t.Helper()
		_, err := e.Verify(ctx, tok)
		if (err == nil) != ok {
			t.Errorf("%s: Verify = %v, want ok %v", what, err, ok)
		}
		if n := srv.hits.Load(); n != hits {
			t.Errorf("%s: %d fetches, want %d", what, n, hits)
		}
	}
	verify("first token", rsaToken(), true, 1)
	verify("cached", rsaToken(), true, 1)

	// The issuer rotates in an EC key; a token naming it triggers a refetch, but only once
	// MinRefresh has passed since the last one.
	srv.set(http.StatusOK, jwksBody(rsaJWK("rsa1", &testRSAKey().PublicKey, ""), ecJWK("ec-new", &testECKey().PublicKey)))
	verify("new kid, too soon", ecToken(), false, 1)
	verify("unknown kid, too soon", forge(extHeader("RS256", "zzz", ""), extPayload(""), rs), false, 1)
	clock.Advance(DefaultMinRefresh - time.Second)
	verify("new kid, 1s too soon", ecToken(), false, 1)
	clock.Advance(time.Second)
	verify("new kid after MinRefresh", ecToken(), true, 2)
	verify("unknown kid right after a fetch", forge(extHeader("RS256", "zzz", ""), extPayload(""), rs), false, 2)

	// The issuer drops the RSA key: noticed when the set is older than MaxAge.
	srv.set(http.StatusOK, jwksBody(ecJWK("ec-new", &testECKey().PublicKey)))
	clock.Advance(DefaultMaxAge - time.Second)
	verify("dropped key, set still fresh", rsaToken(), true, 2)
	clock.Advance(time.Second)
	verify("dropped key, set stale", rsaToken(), false, 3)

	// A failed fetch keeps the previous set.
	srv.set(http.StatusInternalServerError, []byte("oops"))
	clock.Advance(DefaultMaxAge)
	verify("stale set, fetch fails", ecToken(), true, 4)
	_, err := e.Verify(ctx, rsaToken())
	if !errors.Is(err, ErrJWKS) || !errors.Is(err, ErrInvalidToken) {
		t.Errorf("unknown kid while the JWKS fails: %v, want ErrJWKS and ErrInvalidToken", err)
	}
	if srv.hits.Load() != 4 {
		t.Errorf("failed fetch retried before MinRefresh: %d fetches", srv.hits.Load())
	}

	// A custom MinRefresh.
	e2 := newIssuer(srv, clock)
	e2.MinRefresh = 5 * time.Second
	srv.set(http.StatusOK, jwksBody(ecJWK("ec-new", &testECKey().PublicKey)))
	if _, err := e2.Verify(ctx, ecToken()); err != nil {
		t.Fatal(err)
	}
	e2.Verify(ctx, rsaToken())
	clock.Advance(5 * time.Second)
	before := srv.hits.Load()
	e2.Verify(ctx, rsaToken())
	if srv.hits.Load() != before+1 {
		t.Error("MinRefresh of 5s not honoured")
	}
}

func TestExternalFetchErrors(t *testing.T) {
	ctx := context.Background()
	token := forge(extHeader("RS256", "rsa1", ""), extPayload(""), rsSign(testRSAKey()))
	small := make([]byte, 128) // a 1024-bit modulus
	small[0] = 0x80
	small[127] = 1
	off := map[string]any{"kty": "EC", "kid": "rsa1", "crv": "P-256", "x": enc(make([]byte, 32)), "y": enc(append(make([]byte, 31), 1))}
	rsaBad := func(m map[string]any, k string, v any) map[string]any { m[k] = v; return m }
	tests := []struct {
		name   string
		status int
		body   []byte
	}{
		{"status 500", http.StatusInternalServerError, standardJWKS()},
		{"status 404", http.StatusNotFound, standardJWKS()},
		{"too large", http.StatusOK, append(standardJWKS()[:len(standardJWKS())-2], []byte(`,"pad":"`+strings.Repeat("x", MaxJWKSSize)+`"}`)...)},
		{"not json", http.StatusOK, []byte("<html>")},
		{"no keys", http.StatusOK, []byte(`{"keys":[]}`)},
		{"small rsa key", http.StatusOK, jwksBody(map[string]any{"kty": "RSA", "kid": "rsa1", "n": enc(small), "e": "AQAB"})},
		{"even exponent", http.StatusOK, jwksBody(rsaBad(rsaJWK("rsa1", &testRSAKey().PublicKey, ""), "e", "Ag"))},
		{"encryption key", http.StatusOK, jwksBody(rsaBad(rsaJWK("rsa1", &testRSAKey().PublicKey, ""), "use", "enc"))},
		{"key_ops without verify", http.StatusOK, jwksBody(rsaBad(rsaJWK("rsa1", &testRSAKey().PublicKey, ""), "key_ops", []string{"encrypt"}))},
		{"key alg of another type", http.StatusOK, jwksBody(rsaJWK("rsa1", &testRSAKey().PublicKey, "ES256"))},
		{"ec point off the curve", http.StatusOK, jwksBody(off)},
		{"too many keys", http.StatusOK, jwksBody(func() []map[string]any {
			var ks []map[string]any
			for i := range maxJWKSKeys + 1 {
				ks = append(ks, rsaJWK(fmt.Sprint("k", i), &testRSAKey().PublicKey, ""))
			}
			return ks
		}()...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newJWKSServer(t, tt.body)
			srv.set(tt.status, tt.body)
			e := newIssuer(srv, &testClock{t: t0})
			_, err := e.Verify(ctx, token)
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("Verify = %v, want ErrInvalidToken", err)
			}
		})
	}

	// An unreachable JWKS: ErrJWKS, without the URL.
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	unreachable := &ExternalIssuer{Issuer: extIssuer, JWKSURL: gone.URL + "/jwks?key=s3cr3t-value", Audience: extAudience,
		Algorithms: []string{"RS256"}, Now: fixedClock(t0)}
	_, err := unreachable.Verify(ctx, token)
	if !errors.Is(err, ErrJWKS) || !errors.Is(err, ErrInvalidToken) || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("unreachable JWKS: %v", err)
	}

	// With the default client, redirects are not followed.
	srv := newJWKSServer(t, standardJWKS())
	e := newIssuer(srv, &testClock{t: t0})
	e.Client = nil
	e.JWKSURL = srv.URL + "/moved"
	if _, err := e.Verify(ctx, token); !errors.Is(err, ErrJWKS) {
		t.Errorf("redirected JWKS: %v, want ErrJWKS", err)
	}
	if srv.hits.Load() != 1 {
		t.Errorf("%d requests, want 1 (no redirect followed)", srv.hits.Load())
	}
	e.JWKSURL = srv.URL + "/jwks"
	e.Now = fixedClock(t0.Add(time.Minute)) // MinRefresh later
	if _, err := e.Verify(ctx, forge(extHeader("RS256", "rsa1", ""), extPayloadAt(t0.Add(time.Minute), ""), rsSign(testRSAKey()))); err != nil {
		t.Errorf("default client: %v", err)
	}
}

func TestExternalPaddedJWK(t *testing.T) {
	pub := &testRSAKey().PublicKey
	m := rsaJWK("rsa1", pub, "")
	m["n"] = base64.URLEncoding.EncodeToString(pub.N.Bytes())
	m["e"] = "AQAB"
	srv := newJWKSServer(t, jwksBody(m))
	e := newIssuer(srv, &testClock{t: t0})
	if _, err := e.Verify(context.Background(), forge(extHeader("RS256", "rsa1", ""), extPayload(""), rsSign(testRSAKey()))); err != nil {
		t.Error(err)
	}
}

// blockingTransport answers every request with body once release is closed.
type blockingTransport struct {
	release chan struct{}
	hits    atomic.Int32
	body    []byte
}

func (b *blockingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	b.hits.Add(1)
	select {
	case <-b.release:
	case <-r.Context().Done():
		return nil, r.Context().Err()
	}
	return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(bytes.NewReader(b.body)), Header: http.Header{}, Request: r}, nil
}

func TestExternalSingleFlight(t *testing.T) {
	token := forge(extHeader("ES256", "ec1", ""), extPayload(""), esSign(testECKey()))
	synctest.Test(t, func(t *testing.T) {
		tr := &blockingTransport{release: make(chan struct{}), body: standardJWKS()}
		e := &ExternalIssuer{
			Issuer: extIssuer, JWKSURL: "https://idp.example.com/jwks", Audience: extAudience,
			Algorithms: []string{"ES256"}, Client: &http.Client{Transport: tr}, Now: fixedClock(t0),
		}
		const n = 8
		errs := make(chan error, n)
		for range n {
			go func() {
				_, err := e.Verify(context.Background(), token)
				errs <- err
			}()
		}
		// A caller that gives up waiting does not cancel the fetch for the others.
		ctx, cancel := context.WithCancel(context.Background())
		quitter := make(chan error, 1)
		go func() {
			_, err := e.Verify(ctx, token)
			quitter <- err
		}()
		synctest.Wait() // every caller waits on the one fetch
		cancel()
		if err := <-quitter; !errors.Is(err, context.Canceled) || !errors.Is(err, ErrInvalidToken) {
			t.Errorf("cancelled caller: %v", err)
		}
		close(tr.release)
		for range n {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
		if got := tr.hits.Load(); got != 1 {
			t.Errorf("%d fetches for %d concurrent callers, want 1", got, n+1)
		}
	})
}

func TestExternalValidate(t *testing.T) {
	good := func() *ExternalIssuer {
		return &ExternalIssuer{Issuer: extIssuer, JWKSURL: "https://idp.example.com/.well-known/jwks.json", Audience: extAudience, Algorithms: []string{"RS256", "ES256"}}
	}
	tests := []struct {
		name   string
		modify func(*ExternalIssuer)
		ok     bool
	}{
		{"good", func(*ExternalIssuer) {}, true},
		{"loopback http", func(e *ExternalIssuer) { e.JWKSURL = "http://127.0.0.1:8080/jwks" }, true},
		{"every algorithm", func(e *ExternalIssuer) {
			e.Algorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
		}, true},
		{"no issuer", func(e *ExternalIssuer) { e.Issuer = "" }, false},
		{"no audience", func(e *ExternalIssuer) { e.Audience = "" }, false},
		{"no algorithms", func(e *ExternalIssuer) { e.Algorithms = nil }, false},
		{"none", func(e *ExternalIssuer) { e.Algorithms = []string{"none"} }, false},
		{"HS256", func(e *ExternalIssuer) { e.Algorithms = []string{"HS256"} }, false},
		{"lower-case alg", func(e *ExternalIssuer) { e.Algorithms = []string{"rs256"} }, false},
		{"http jwks", func(e *ExternalIssuer) { e.JWKSURL = "http://idp.example.com/jwks" }, false},
		{"no jwks", func(e *ExternalIssuer) { e.JWKSURL = "" }, false},
		{"leeway too big", func(e *ExternalIssuer) { e.Leeway = 2 * time.Minute }, false},
		{"negative refresh", func(e *ExternalIssuer) { e.MinRefresh = -1 }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := good()
			tt.modify(e)
			if err := e.Validate(); (err == nil) != tt.ok {
				t.Errorf("Validate = %v, want ok %v", err, tt.ok)
			}
		})
	}
	// Not configured: every token refused, nothing fetched.
	if _, err := (&ExternalIssuer{}).Verify(context.Background(), "a.b.c"); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("unconfigured: %v", err)
	}
}

func TestExternalAllocs(t *testing.T) {
	srv := newJWKSServer(t, standardJWKS())
	e := newIssuer(srv, &testClock{t: t0})
	for name, tok := range map[string]string{
		"1 MB":      strings.Repeat("A", 1<<20),
		"100k dots": strings.Repeat(".", 100_000),
	} {
		allocs := testing.AllocsPerRun(100, func() {
			if _, err := e.Verify(context.Background(), tok); err == nil {
				t.Fatal("accepted")
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations, want 0", name, allocs)
		}
	}
	if srv.hits.Load() != 0 {
		t.Error("an oversized token caused a fetch")
	}
}
