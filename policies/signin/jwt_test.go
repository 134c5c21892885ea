package signin

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

const (
	testIssuer   = "https://gw.example.com"
	testAudience = "https://gw.example.com/v1"
)

// accessClaims are the claims of a valid access token at t0.
func accessClaims() Claims {
	return Claims{
		Issuer: testIssuer, Subject: "usr_1", Audience: testAudience, ClientID: "app_1",
		Scope: "chat:write models:read", ID: "jti-1", Type: TypeAccess,
		IssuedAt: t0.Add(-time.Minute), NotBefore: t0.Add(-time.Minute), Expiry: t0.Add(time.Hour),
	}
}

func testVerifier(ks *Keyset, types ...string) *Verifier {
	if len(types) == 0 {
		types = []string{TypeAccess}
	}
	return &Verifier{Keys: ks, Issuer: testIssuer, Audience: testAudience, Types: types, Leeway: 30 * time.Second, Now: fixedClock(t0)}
}

func mustSign(t testing.TB, ks *Keyset, c Claims) string {
	t.Helper()
	tok, err := ks.Sign(c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestSignVerifyRoundTrip(t *testing.T) {
	key := seedKey(1, t0)
	ks := mustKeyset(t, key)
	want := accessClaims()
	tok := mustSign(t, ks, want)
	got, err := testVerifier(ks).Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("Verify = %+v\nwant     %+v", got, want)
	}

	// The header is exactly alg, typ, kid.
	head, _, _ := strings.Cut(tok, ".")
	raw, _ := base64.RawURLEncoding.DecodeString(head)
	if wantHead := `{"alg":"EdDSA","typ":"at+jwt","kid":"` + key.KID + `"}`; string(raw) != wantHead {
		t.Errorf("header = %s, want %s", raw, wantHead)
	}

	frag := Claims{Issuer: testIssuer, Subject: "usr_1", Audience: testAudience, IP: "192.0.2.7",
		Type: TypeFragment, Expiry: t0.Add(10 * time.Minute)}
	got, err = testVerifier(ks, TypeFragment).Verify(mustSign(t, ks, frag))
	if err != nil {
		t.Fatal(err)
	}
	if got.IP != "192.0.2.7" || got.Type != TypeFragment || got.ID == "" || !got.IssuedAt.IsZero() {
		t.Errorf("fragment claims = %+v", got)
	}

	// Times are whole seconds.
	c := accessClaims()
	c.Expiry = t0.Add(time.Hour + 900*time.Millisecond)
	got, err = testVerifier(ks).Verify(mustSign(t, ks, c))
	if err != nil || !got.Expiry.Equal(t0.Add(time.Hour)) {
		t.Errorf("expiry = %v, %v; want %v", got.Expiry, err, t0.Add(time.Hour))
	}
}

func TestSignRandomID(t *testing.T) {
	ks := mustKeyset(t, seedKey(1, t0))
	c := accessClaims()
	c.ID = ""
	v := testVerifier(ks)
	a, _ := v.Verify(mustSign(t, ks, c))
	b, _ := v.Verify(mustSign(t, ks, c))
	if a.ID == "" || a.ID == b.ID {
		t.Errorf("random jti: %q, %q", a.ID, b.ID)
	}
}

func TestSignRefuses(t *testing.T) {
	ks := mustKeyset(t, seedKey(1, t0))
	tests := []struct {
		name   string
		modify func(*Claims)
	}{
		{"no type", func(c *Claims) { c.Type = "" }},
		{"other type", func(c *Claims) { c.Type = "JWT" }},
		{"no subject", func(c *Claims) { c.Subject = "" }},
		{"no issuer", func(c *Claims) { c.Issuer = "" }},
		{"no audience", func(c *Claims) { c.Audience = "" }},
		{"no expiry", func(c *Claims) { c.Expiry = time.Time{} }},
		{"expiry before 1970", func(c *Claims) { c.Expiry = time.Unix(-5, 0) }},
		{"expiry after 9999", func(c *Claims) { c.Expiry = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) }},
		{"fragment without ip", func(c *Claims) { c.Type = TypeFragment; c.IP = "" }},
		{"too long", func(c *Claims) { c.Scope = strings.Repeat("x", MaxTokenLen) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := accessClaims()
			tt.modify(&c)
			if tok, err := ks.Sign(c); err == nil || !errors.Is(err, ErrClaims) {
				t.Errorf("Sign = %q, %v; want ErrClaims", tok, err)
			}
		})
	}
}

// header and payload JSON of forged tokens.
func headerJSON(kid string) string { return `{"alg":"EdDSA","typ":"at+jwt","kid":"` + kid + `"}` }

func payloadJSON(extra string) string {
	p := fmt.Sprintf(`{"iss":%q,"sub":"usr_1","aud":%q,"jti":"j","iat":%d,"exp":%d`,
		testIssuer, testAudience, t0.Unix()-60, t0.Unix()+3600)
	if extra != "" {
		p += "," + extra
	}
	return p + "}"
}

func TestVerifyRefuses(t *testing.T) {
	key := seedKey(1, t0)
	other := seedKey(2, t0)
	ks := mustKeyset(t, key)
	kid := key.KID
	good := mustSign(t, ks, accessClaims())
	ed := edSigner(key)
	pub := key.Private[32:]
	hs256 := func(input []byte) []byte {
		m := hmac.New(sha256.New, pub)
		m.Write(input)
		return m.Sum(nil)
	}
	hs256JWK := func(input []byte) []byte {
		m := hmac.New(sha256.New, ks.JWKS())
		m.Write(input)
		return m.Sum(nil)
	}
	frag := Claims{Issuer: testIssuer, Subject: "usr_1", Audience: testAudience, IP: "192.0.2.7",
		Type: TypeFragment, Expiry: t0.Add(10 * time.Minute)}
	fragHeader := `{"alg":"EdDSA","typ":"fragment+jwt","kid":"` + kid + `"}`
	withTimes := func(times string) string {
		return fmt.Sprintf(`{"iss":%q,"sub":"usr_1","aud":%q,%s}`, testIssuer, testAudience, times)
	}
	flipLast := func(s string) string {
		b := []byte(s)
		if b[len(b)-1] == 'A' {
			b[len(b)-1] = 'B'
		} else {
			b[len(b)-1] = 'A'
		}
		return string(b)
	}

	tests := []struct{ name, token string }{
		{"empty", ""},
		{"garbage", "not a token"},
		{"unsigned, two segments", b64(headerJSON(kid)) + "." + b64(payloadJSON(""))},
		{"alg none, empty signature", forge(`{"alg":"none","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), nil)},
		{"alg none with signature", forge(`{"alg":"none","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"alg None", forge(`{"alg":"None","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"HS256 with the public key as secret", forge(`{"alg":"HS256","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), hs256)},
		{"HS256 with the JWKS as secret", forge(`{"alg":"HS256","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), hs256JWK)},
		{"RS256 header", forge(`{"alg":"RS256","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"ES256 header", forge(`{"alg":"ES256","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"Ed25519 header", forge(`{"alg":"Ed25519","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"alg not a string", forge(`{"alg":["EdDSA"],"typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"no alg", forge(`{"typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"alg repeated", forge(`{"alg":"none","alg":"EdDSA","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"alg repeated by escape", forge(`{"alg":"EdDSA","\u0061lg":"none","typ":"at+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"jku header", forge(`{"alg":"EdDSA","typ":"at+jwt","kid":"`+kid+`","jku":"http://127.0.0.1/jwks"}`, payloadJSON(""), ed)},
		{"x5u header", forge(`{"alg":"EdDSA","typ":"at+jwt","kid":"`+kid+`","x5u":"http://127.0.0.1/x"}`, payloadJSON(""), ed)},
		{"jwk header", forge(`{"alg":"EdDSA","typ":"at+jwt","kid":"`+kid+`","jwk":{"kty":"OKP"}}`, payloadJSON(""), ed)},
		{"crit header", forge(`{"alg":"EdDSA","typ":"at+jwt","kid":"`+kid+`","crit":["exp"]}`, payloadJSON(""), ed)},
		{"header not an object", forge(`["EdDSA"]`, payloadJSON(""), ed)},
		{"header trailing data", forge(headerJSON(kid)+`{}`, payloadJSON(""), ed)},
		{"header invalid utf-8", forge(`{"alg":"EdDSA","typ":"at+jwt","kid":"`+kid+"\xff"+`"}`, payloadJSON(""), ed)},
		{"no kid", forge(`{"alg":"EdDSA","typ":"at+jwt"}`, payloadJSON(""), ed)},
		{"empty kid", forge(headerJSON(""), payloadJSON(""), ed)},
		{"unknown kid", forge(headerJSON("nope"), payloadJSON(""), ed)},
		{"traversal kid", forge(headerJSON("../../../../etc/passwd"), payloadJSON(""), ed)},
		{"sql kid", forge(headerJSON("x' OR '1'='1"), payloadJSON(""), ed)},
		{"url kid", forge(headerJSON("http://127.0.0.1/key"), payloadJSON(""), ed)},
		{"kid not a string", forge(`{"alg":"EdDSA","typ":"at+jwt","kid":1}`, payloadJSON(""), ed)},
		{"kid of another key", forge(headerJSON(other.KID), payloadJSON(""), edSigner(other))},
		{"signed by another key", forge(headerJSON(kid), payloadJSON(""), edSigner(other))},
		{"no typ", forge(`{"alg":"EdDSA","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"typ JWT", forge(`{"alg":"EdDSA","typ":"JWT","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"typ case", forge(`{"alg":"EdDSA","typ":"AT+JWT","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"fragment token as access token", mustSign(t, ks, frag)},
		{"refresh type", forge(`{"alg":"EdDSA","typ":"refresh+jwt","kid":"`+kid+`"}`, payloadJSON(""), ed)},
		{"signature flipped", flipLast(good)},
		{"signature stray bits", good[:len(good)-1] + string(good[len(good)-1]+1)},
		{"signature truncated", good[:len(good)-4]},
		{"signature padded", good + "=="},
		{"payload swapped", strings.Split(good, ".")[0] + "." + b64(payloadJSON(`"scope":"*"`)) + "." + strings.Split(good, ".")[2]},
		{"wrong issuer", forge(headerJSON(kid), `{"iss":"https://evil","sub":"u","aud":"`+testAudience+`","exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"no issuer", forge(headerJSON(kid), `{"sub":"u","aud":"`+testAudience+`","exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"wrong audience", forge(headerJSON(kid), `{"iss":"`+testIssuer+`","sub":"u","aud":"https://other","exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"audience array", forge(headerJSON(kid), `{"iss":"`+testIssuer+`","sub":"u","aud":["`+testAudience+`"],"exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"audience null", forge(headerJSON(kid), `{"iss":"`+testIssuer+`","sub":"u","aud":null,"exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"no subject", forge(headerJSON(kid), `{"iss":"`+testIssuer+`","aud":"`+testAudience+`","exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"empty subject", forge(headerJSON(kid), `{"iss":"`+testIssuer+`","sub":"","aud":"`+testAudience+`","exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"subject a number", forge(headerJSON(kid), `{"iss":"`+testIssuer+`","sub":1,"aud":"`+testAudience+`","exp":`+fmt.Sprint(t0.Unix()+60)+`}`, ed)},
		{"subject repeated", forge(headerJSON(kid), payloadJSON(`"sub":"admin"`), ed)},
		{"payload not an object", forge(headerJSON(kid), `"x"`, ed)},
		{"no expiry", forge(headerJSON(kid), withTimes(`"iat":1`), ed)},
		{"expiry a string", forge(headerJSON(kid), withTimes(fmt.Sprintf(`"exp":"%d"`, t0.Unix()+60)), ed)},
		{"expiry null", forge(headerJSON(kid), withTimes(`"exp":null`), ed)},
		{"expiry negative", forge(headerJSON(kid), withTimes(`"exp":-1`), ed)},
		{"expiry huge", forge(headerJSON(kid), withTimes(`"exp":1e300`), ed)},
		{"expiry past", forge(headerJSON(kid), withTimes(fmt.Sprintf(`"exp":%d`, t0.Unix()-3600)), ed)},
		{"not before in the future", forge(headerJSON(kid), withTimes(fmt.Sprintf(`"exp":%d,"nbf":%d`, t0.Unix()+3600, t0.Unix()+31)), ed)},
		{"issued in the future", forge(headerJSON(kid), withTimes(fmt.Sprintf(`"exp":%d,"iat":%d`, t0.Unix()+3600, t0.Unix()+31)), ed)},
		{"fragment without ip", forge(fragHeader, withTimes(fmt.Sprintf(`"exp":%d`, t0.Unix()+60)), ed)},
		{"oversized", good + strings.Repeat("A", MaxTokenLen)},
		{"many dots", strings.Repeat(".", 100_000)},
		{"four segments", good + ".AAAA"},
		{"empty payload segment", strings.Split(good, ".")[0] + ".." + strings.Split(good, ".")[2]},
		{"space", " " + good},
		{"standard base64 alphabet", good[:10] + "/" + good[11:]},
		{"padding in header", strings.Replace(good, ".", "=.", 1)},
	}
	v := testVerifier(ks)
	vf := testVerifier(ks, TypeFragment)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			verifier := v
			if strings.HasPrefix(tt.name, "fragment without") {
				verifier = vf
			}
			c, err := verifier.Verify(tt.token)
			if err == nil {
				t.Fatalf("Verify accepted: %+v", c)
			}
			if !errors.Is(err, ErrInvalidToken) {
				t.Errorf("error %v does not wrap ErrInvalidToken", err)
			}
			if c != (Claims{}) {
				t.Errorf("claims returned with an error: %+v", c)
			}
			checkNoSecret(t, err, tt.token)
			if len(err.Error()) > 64 {
				t.Errorf("error %q is not short", err)
			}
		})
	}
	if _, err := v.Verify(good); err != nil {
		t.Fatalf("good token: %v", err)
	}
	// The same header as a good token, with another key of the same set: verifies only with
	// the key it names.
	if _, err := testVerifier(mustKeyset(t, other)).Verify(good); err == nil {
		t.Error("a token verified with a set that lacks its key")
	}
}

func TestVerifyTimes(t *testing.T) {
	key := seedKey(1, t0)
	ks := mustKeyset(t, key)
	exp := t0
	tok := forge(headerJSON(key.KID), fmt.Sprintf(`{"iss":%q,"sub":"u","aud":%q,"exp":%d}`, testIssuer, testAudience, exp.Unix()), edSigner(key))
	future := func(claim string, at time.Time) string {
		return forge(headerJSON(key.KID), fmt.Sprintf(`{"iss":%q,"sub":"u","aud":%q,"exp":%d,%q:%d}`,
			testIssuer, testAudience, t0.Add(2*time.Hour).Unix(), claim, at.Unix()), edSigner(key))
	}
	const leeway = 30 * time.Second
	tests := []struct {
		name   string
		token  string
		leeway time.Duration
		now    time.Time
		ok     bool
	}{
		{"exp, no leeway, 1s before", tok, 0, exp.Add(-time.Second), true},
		{"exp, no leeway, at exp", tok, 0, exp, false},
		{"exp, leeway edge -1s", tok, leeway, exp.Add(leeway - time.Second), true},
		{"exp, leeway edge", tok, leeway, exp.Add(leeway), false},
		{"exp, leeway edge +1s", tok, leeway, exp.Add(leeway + time.Second), false},
		{"exp, leeway capped at 60s", tok, time.Hour, exp.Add(MaxLeeway), false},
		{"exp, capped leeway -1s", tok, time.Hour, exp.Add(MaxLeeway - time.Second), true},
		{"exp, negative leeway is none", tok, -time.Hour, exp.Add(-time.Second), true},
		{"nbf at now+leeway", future("nbf", t0.Add(leeway)), leeway, t0, true},
		{"nbf at now+leeway+1s", future("nbf", t0.Add(leeway+time.Second)), leeway, t0, false},
		{"nbf future, no leeway", future("nbf", t0.Add(time.Second)), 0, t0, false},
		{"nbf past", future("nbf", t0.Add(-time.Hour)), 0, t0, true},
		{"iat at now+leeway", future("iat", t0.Add(leeway)), leeway, t0, true},
		{"iat at now+leeway+1s", future("iat", t0.Add(leeway+time.Second)), leeway, t0, false},
		{"iat far future", future("iat", t0.Add(24*time.Hour)), leeway, t0, false},
		{"iat past", future("iat", t0.Add(-time.Hour)), 0, t0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := &Verifier{Keys: ks, Issuer: testIssuer, Audience: testAudience, Types: []string{TypeAccess}, Leeway: tt.leeway, Now: fixedClock(tt.now)}
			_, err := v.Verify(tt.token)
			if (err == nil) != tt.ok {
				t.Errorf("Verify = %v, want ok %v", err, tt.ok)
			}
		})
	}
	// Fractional NumericDates are read too.
	frac := forge(headerJSON(key.KID), fmt.Sprintf(`{"iss":%q,"sub":"u","aud":%q,"exp":%d.5}`, testIssuer, testAudience, exp.Unix()), edSigner(key))
	c, err := (&Verifier{Keys: ks, Issuer: testIssuer, Audience: testAudience, Types: []string{TypeAccess}, Now: fixedClock(exp)}).Verify(frac)
	if err != nil || !c.Expiry.Equal(exp.Add(500*time.Millisecond)) {
		t.Errorf("fractional exp: %v, %v", c.Expiry, err)
	}
}

func TestVerifierNotConfigured(t *testing.T) {
	ks := mustKeyset(t, seedKey(1, t0))
	tok := mustSign(t, ks, accessClaims())
	for name, v := range map[string]*Verifier{
		"no keys":     {Issuer: testIssuer, Audience: testAudience, Types: []string{TypeAccess}, Now: fixedClock(t0)},
		"no issuer":   {Keys: ks, Audience: testAudience, Types: []string{TypeAccess}, Now: fixedClock(t0)},
		"no audience": {Keys: ks, Issuer: testIssuer, Types: []string{TypeAccess}, Now: fixedClock(t0)},
		"no types":    {Keys: ks, Issuer: testIssuer, Audience: testAudience, Now: fixedClock(t0)},
	} {
		if _, err := v.Verify(tok); !errors.Is(err, ErrInvalidToken) {
			t.Errorf("%s: Verify = %v, want ErrInvalidToken", name, err)
		}
	}
}

func TestKeyRotation(t *testing.T) {
	old, cur := seedKey(1, t0.Add(-48*time.Hour)), seedKey(2, t0)
	before := mustKeyset(t, old)
	oldToken := mustSign(t, before, accessClaims())

	rotated := mustKeyset(t, cur, old) // newest first
	if rotated.KID() != cur.KID {
		t.Fatalf("signing kid = %q, want the newest %q", rotated.KID(), cur.KID)
	}
	newToken := mustSign(t, rotated, accessClaims())
	if !strings.Contains(string(mustDecodeHeader(t, newToken)), cur.KID) {
		t.Error("new token not signed by the newest key")
	}
	v := testVerifier(rotated)
	if _, err := v.Verify(oldToken); err != nil {
		t.Errorf("token of the previous key, still in the set: %v", err)
	}
	if _, err := v.Verify(newToken); err != nil {
		t.Errorf("token of the newest key: %v", err)
	}

	dropped := mustKeyset(t, cur)
	if _, err := testVerifier(dropped).Verify(oldToken); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("token of a dropped key: %v, want ErrInvalidToken", err)
	}
	if _, err := testVerifier(dropped).Verify(newToken); err != nil {
		t.Errorf("token of the newest key after the drop: %v", err)
	}
}

func mustDecodeHeader(t testing.TB, tok string) []byte {
	t.Helper()
	head, _, _ := strings.Cut(tok, ".")
	b, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestNewSigningKey(t *testing.T) {
	k, err := NewSigningKey(t0)
	if err != nil {
		t.Fatal(err)
	}
	pub := ed25519.PrivateKey(k.Private).Public().(ed25519.PublicKey)
	sum := sha256.Sum256(pub)
	if want := base64.RawURLEncoding.EncodeToString(sum[:12]); k.KID != want || len(k.KID) != 16 {
		t.Errorf("KID = %q, want %q", k.KID, want)
	}
	if !k.CreatedAt.Equal(t0) || len(k.Private) != ed25519.PrivateKeySize {
		t.Errorf("key = %v, %d bytes", k.CreatedAt, len(k.Private))
	}
	k2, _ := NewSigningKey(t0)
	if k2.KID == k.KID || bytes.Equal(k2.Private, k.Private) {
		t.Error("two keys alike")
	}
}

func TestNewKeyset(t *testing.T) {
	good := seedKey(1, t0)
	inconsistent := seedKey(2, t0)
	inconsistent.Private = bytes.Clone(inconsistent.Private)
	copy(inconsistent.Private[32:], good.Private[32:]) // another key's public half
	tests := []struct {
		name string
		keys []SigningKey
	}{
		{"none", nil},
		{"short private key", []SigningKey{{KID: "a", Private: good.Private[:32]}}},
		{"inconsistent private key", []SigningKey{inconsistent}},
		{"empty kid", []SigningKey{{Private: good.Private}}},
		{"kid with a slash", []SigningKey{{KID: "a/b", Private: good.Private}}},
		{"long kid", []SigningKey{{KID: strings.Repeat("a", 65), Private: good.Private}}},
		{"repeated kid", []SigningKey{good, {KID: good.KID, Private: seedKey(3, t0).Private}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if ks, err := NewKeyset(tt.keys); err == nil {
				t.Errorf("NewKeyset = %v, want an error", ks)
			}
		})
	}

	// The keys are copied: changing the caller's slice later changes nothing.
	k := seedKey(4, t0)
	k.Private = bytes.Clone(k.Private)
	ks := mustKeyset(t, k)
	tok := mustSign(t, ks, accessClaims())
	clear(k.Private)
	if tok2 := mustSign(t, ks, accessClaims()); tok2 != tok {
		t.Error("Keyset uses the caller's key memory")
	}
}

func TestJWKS(t *testing.T) {
	a, b := seedKey(1, t0), seedKey(2, t0)
	ks := mustKeyset(t, a, b)
	var set struct {
		Keys []map[string]string `json:"keys"`
	}
	raw := ks.JWKS()
	if err := json.Unmarshal(raw, &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 2 {
		t.Fatalf("%d keys, want 2", len(set.Keys))
	}
	for i, k := range []SigningKey{a, b} {
		want := map[string]string{
			"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": k.KID,
			"x": base64.RawURLEncoding.EncodeToString(k.Private[32:]),
		}
		if fmt.Sprint(set.Keys[i]) != fmt.Sprint(want) {
			t.Errorf("key %d = %v, want %v", i, set.Keys[i], want)
		}
	}
	if bytes.Contains(raw, []byte(`"d"`)) {
		t.Error("JWKS holds a private member")
	}
	raw[0] = 'x'
	if ks.JWKS()[0] != '{' {
		t.Error("JWKS shares its memory with the caller")
	}
}

func TestClaimsScopes(t *testing.T) {
	got, err := Claims{Scope: "chat:write models:read"}.Scopes()
	if err != nil || fmt.Sprint(got) != "[chat:write models:read]" {
		t.Errorf("Scopes = %q, %v", got, err)
	}
	if _, err := (Claims{Scope: "chat:write admin"}).Scopes(); err == nil {
		t.Error("unknown scope accepted")
	}
}

// TestVerifyAllocs checks that an oversized or many-dotted token (the CVE-2025-30204 pattern)
// is refused without allocating in proportion to it.
func TestVerifyAllocs(t *testing.T) {
	ks := mustKeyset(t, seedKey(1, t0))
	v := testVerifier(ks)
	tests := []struct {
		name  string
		token string
		max   float64
	}{
		{"1 MB", strings.Repeat("A", 1<<20), 0},
		{"100k dots", strings.Repeat(".", 100_000), 0},
		{"100k dots in bearer form", "a" + strings.Repeat(".", 100_000) + "a", 0},
		{"dots under the cap", strings.Repeat("a.", MaxTokenLen/2-1), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			allocs := testing.AllocsPerRun(100, func() {
				if _, err := v.Verify(tt.token); err == nil {
					t.Fatal("accepted")
				}
			})
			if allocs > tt.max {
				t.Errorf("%v allocations, want at most %v", allocs, tt.max)
			}
		})
	}
}
