package signin

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Limits on an external issuer's JWKS.
const (
	// MaxJWKSSize is the largest JWKS response read, in bytes (1 MiB).
	MaxJWKSSize = 1 << 20
	// maxJWKSKeys is the most keys a JWKS may hold.
	maxJWKSKeys = 100
	// RSA moduli from 2048 to 8192 bits are accepted.
	minRSABits = 2048
	maxRSABits = 8192
	// fetchTimeout bounds one JWKS fetch, whoever waits for it.
	fetchTimeout = 10 * time.Second
)

// Defaults of ExternalIssuer.
const (
	DefaultMinRefresh = time.Minute
	DefaultMaxAge     = time.Hour
)

// ErrJWKS is wrapped by the errors of fetching an external issuer's JWKS. Verify wraps it in
// ErrInvalidToken too, so that errors.Is tells "the keys could not be had" (503) from a bad
// token (401).
var ErrJWKS = errors.New("jwks unavailable")

// Why an external token is refused, beside the reasons of Verifier.Verify.
const (
	errTypExternal tokenError = "token type not accepted from an external issuer"
	errKeycloakTyp tokenError = "not an access token"
)

// jwsAlgorithm is a JWS algorithm an external issuer may use (RFC 7518 §3, RFC 8037).
type jwsAlgorithm struct {
	kty  string      // the JWK key type it needs
	crv  string      // the curve, for "EC" and "OKP"
	hash crypto.Hash // the digest (none for EdDSA)
	pss  bool        // RSASSA-PSS rather than PKCS #1 v1.5
}

// jwsAlgorithms are the algorithms ExternalIssuer.Algorithms may list. There is no "none" and
// no HMAC ("HS256"...): an issuer's JWKS holds public keys, and a public key is never used as
// an HMAC secret.
var jwsAlgorithms = map[string]jwsAlgorithm{
	"RS256": {kty: "RSA", hash: crypto.SHA256},
	"RS384": {kty: "RSA", hash: crypto.SHA384},
	"RS512": {kty: "RSA", hash: crypto.SHA512},
	"PS256": {kty: "RSA", hash: crypto.SHA256, pss: true},
	"PS384": {kty: "RSA", hash: crypto.SHA384, pss: true},
	"PS512": {kty: "RSA", hash: crypto.SHA512, pss: true},
	"ES256": {kty: "EC", crv: "P-256", hash: crypto.SHA256},
	"ES384": {kty: "EC", crv: "P-384", hash: crypto.SHA384},
	"ES512": {kty: "EC", crv: "P-521", hash: crypto.SHA512},
	"EdDSA": {kty: "OKP", crv: "Ed25519"},
}

// ExternalIssuer verifies the access tokens of another OAuth or OpenID Connect issuer, with
// the keys of its JWKS. Its exported fields are set before first use and not changed after;
// it is then safe for concurrent use. It must not be copied after first use.
//
// Keys are fetched from JWKSURL only, never from anything a token names ("jku", "x5u", "jwk"
// and "x5c" headers are refused). The fetched set is cached; it is fetched again when a token
// names an unknown key id, or when it is older than MaxAge, but at most once per MinRefresh,
// and concurrent callers share one fetch. A failed fetch keeps the previous set.
type ExternalIssuer struct {
	// Issuer is what the "iss" claim must equal. Required.
	Issuer string
	// JWKSURL is where the issuer publishes its keys: https, or http on a loopback host.
	// Required.
	JWKSURL string
	// Audience must equal the "aud" claim or be one of its strings. Required. Set it to the
	// audience the issuer puts in access tokens for this gateway, not to a client id, or the
	// issuer's ID tokens for that client would pass.
	Audience string
	// Algorithms lists the JWS algorithms accepted, e.g. []string{"RS256"}: any of RS256,
	// RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512 and EdDSA. Required; others
	// are refused.
	Algorithms []string
	// Client fetches the JWKS. Default: a client with a 10 s timeout that follows no
	// redirect.
	Client *http.Client
	// MinRefresh is the least time between two fetches of the JWKS. Default
	// DefaultMinRefresh (1 minute).
	MinRefresh time.Duration
	// MaxAge is how long a fetched JWKS is used before it is fetched again. Default
	// DefaultMaxAge (1 hour).
	MaxAge time.Duration
	// Leeway is the clock skew allowed on "exp", "nbf" and "iat"; at most MaxLeeway.
	// Default 0.
	Leeway time.Duration
	// Now returns the current time. Default time.Now.
	Now func() time.Time

	mu        sync.Mutex
	keys      map[string][]externalKey // by kid; nil before the first good fetch
	fetchedAt time.Time                // when keys was fetched
	triedAt   time.Time                // when the last fetch started
	fetching  chan struct{}            // closed when the fetch in flight ends; nil if none
	fetchErr  error                    // how the last fetch ended
}

// externalKey is one usable key of a JWKS.
type externalKey struct {
	kty, crv string
	alg      string // "" when the JWK names none
	pub      crypto.PublicKey
}

var defaultJWKSClient = &http.Client{
	Timeout: fetchTimeout,
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// Validate checks the configuration: Issuer, Audience and Algorithms are set, every algorithm
// is supported, JWKSURL is an https URL (or http on a loopback host) in canonical form, and
// the durations are not negative nor Leeway above MaxLeeway.
func (e *ExternalIssuer) Validate() error {
	switch {
	case e.Issuer == "":
		return errors.New("external issuer: missing issuer")
	case e.Audience == "":
		return errors.New("external issuer: missing audience")
	case len(e.Algorithms) == 0:
		return errors.New("external issuer: missing algorithms")
	case e.MinRefresh < 0 || e.MaxAge < 0 || e.Leeway < 0:
		return errors.New("external issuer: negative duration")
	case e.Leeway > MaxLeeway:
		return fmt.Errorf("external issuer: leeway above %v", MaxLeeway)
	}
	for _, a := range e.Algorithms {
		if _, ok := jwsAlgorithms[a]; !ok {
			return fmt.Errorf("external issuer: unsupported algorithm %q", a)
		}
	}
	if ValidRedirectURI(e.JWKSURL) != nil {
		return errors.New("external issuer: jwks url must be https, or http on a loopback host, in canonical form")
	}
	return nil
}

// Verify checks an access token of the issuer and returns its claims. The token's size and
// shape are checked as by Verifier.Verify, before anything is decoded. Then:
//
//   - "alg" must be one of e.Algorithms and fit the key (RS*/PS* an RSA key of 2048 to 8192
//     bits, ES256/384/512 a P-256/384/521 key, EdDSA an Ed25519 key, and the JWK's own "alg"
//     if it has one); "kid" is required and names a key of the JWKS;
//   - "crit", "jku", "jwk", "x5u" and "x5c" headers are refused;
//   - "typ", when present, must be "JWT", "at+jwt" or "application/at+jwt" (any case): other
//     types (an ID token's "id_token+jwt", logout and event tokens, this gateway's
//     "fragment+jwt") are not access tokens. Keycloak's "typ" claim, when present, must be
//     "Bearer", refusing its ID and refresh tokens;
//   - the signature is checked before the claims are read; the claims are checked as by
//     Verifier.Verify, with "aud" a string or an array of strings.
//
// Claims.Audience is then e.Audience, ClientID is "client_id" or else "azp", Scope is "scope"
// or else "scp" (a string or array of strings, joined by spaces), and IP is always empty: an
// external token is not bound to a client IP here. Every error wraps ErrInvalidToken; a JWKS
// that could not be fetched wraps ErrJWKS too.
func (e *ExternalIssuer) Verify(ctx context.Context, token string) (Claims, error) {
	if e.Issuer == "" || e.Audience == "" || e.JWKSURL == "" || len(e.Algorithms) == 0 {
		return Claims{}, errNotConfig
	}
	t, err := parseJWS(token)
	if err != nil {
		return Claims{}, err
	}
	for _, name := range [...]string{"crit", "jku", "jwk", "x5u", "x5c"} {
		if _, ok := t.header[name]; ok {
			return Claims{}, errHeaderMember
		}
	}
	algo, supported := jwsAlgorithms[t.alg]
	switch {
	case !supported || !oneOf(t.alg, e.Algorithms):
		return Claims{}, errAlg
	case !externalType(t.typ):
		return Claims{}, errTypExternal
	}
	key, err := e.key(ctx, t.kid, t.alg, algo)
	if err != nil {
		return Claims{}, err
	}
	if !verifySignature(algo, key.pub, t.signingInput, t.signature) {
		return Claims{}, errSignature
	}

	members, err := decodeObject(t.payload)
	if err != nil {
		return Claims{}, err
	}
	c := Claims{Type: t.typ}
	var clientID, azp string
	for _, f := range [...]struct {
		name string
		dst  *string
	}{
		{"iss", &c.Issuer}, {"sub", &c.Subject}, {"client_id", &clientID}, {"azp", &azp},
		{"jti", &c.ID},
	} {
		if *f.dst, _, err = stringMember(members, f.name); err != nil {
			return Claims{}, errClaim
		}
	}
	c.ClientID = clientID
	if c.ClientID == "" {
		c.ClientID = azp
	}
	if c.Scope, err = externalScope(members); err != nil {
		return Claims{}, err
	}
	if t, ok, err := stringMember(members, "typ"); err != nil || ok && !strings.EqualFold(t, "Bearer") {
		return Claims{}, errKeycloakTyp
	}
	auds, err := audienceMember(members)
	if err != nil {
		return Claims{}, err
	}
	switch {
	case c.Issuer != e.Issuer:
		return Claims{}, errIssuer
	case !oneOf(e.Audience, auds):
		return Claims{}, errAudience
	case c.Subject == "":
		return Claims{}, errNoSubject
	}
	c.Audience = e.Audience
	if err := checkTimes(&c, members, now(e.Now), e.Leeway); err != nil {
		return Claims{}, err
	}
	return c, nil
}

// externalType reports whether typ is a header "typ" accepted from an external issuer.
func externalType(typ string) bool {
	return typ == "" || strings.EqualFold(typ, "JWT") || strings.EqualFold(typ, "at+jwt") ||
		strings.EqualFold(typ, "application/at+jwt")
}

// audienceMember reads "aud": a string or an array of strings.
func audienceMember(m map[string]json.RawMessage) ([]string, error) {
	return stringOrStrings(m, "aud")
}

// externalScope reads "scope" (a string) or else "scp" (a string or array of strings).
func externalScope(m map[string]json.RawMessage) (string, error) {
	scope, ok, err := stringMember(m, "scope")
	if err != nil {
		return "", errClaim
	}
	if ok {
		return scope, nil
	}
	scp, err := stringOrStrings(m, "scp")
	if err != nil {
		return "", err
	}
	return strings.Join(scp, " "), nil
}

// stringOrStrings reads the member name of m, a string or an array of strings, when present.
func stringOrStrings(m map[string]json.RawMessage, name string) ([]string, error) {
	raw, ok := m[name]
	if !ok {
		return nil, nil
	}
	if s, _, err := stringMember(m, name); err == nil {
		return []string{s}, nil
	}
	var elems []json.RawMessage
	if raw = bytes.TrimSpace(raw); len(raw) == 0 || raw[0] != '[' || json.Unmarshal(raw, &elems) != nil {
		return nil, errClaim
	}
	list := make([]string, 0, len(elems))
	for _, el := range elems {
		var s string
		// Checking the quote refuses null, which encoding/json would turn into "".
		if len(el) == 0 || el[0] != '"' || json.Unmarshal(el, &s) != nil {
			return nil, errClaim
		}
		list = append(list, s)
	}
	return list, nil
}

// verifySignature checks sig over signingInput with pub under algo.
func verifySignature(algo jwsAlgorithm, pub crypto.PublicKey, signingInput string, sig []byte) bool {
	if algo.kty == "OKP" {
		k, ok := pub.(ed25519.PublicKey)
		return ok && len(sig) == ed25519.SignatureSize && ed25519.Verify(k, []byte(signingInput), sig)
	}
	var digest []byte
	switch algo.hash {
	case crypto.SHA256:
		d := sha256.Sum256([]byte(signingInput))
		digest = d[:]
	case crypto.SHA384:
		d := sha512.Sum384([]byte(signingInput))
		digest = d[:]
	case crypto.SHA512:
		d := sha512.Sum512([]byte(signingInput))
		digest = d[:]
	default:
		return false
	}
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if algo.kty != "RSA" || len(sig) != k.Size() {
			return false
		}
		if algo.pss {
			opts := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: algo.hash}
			return rsa.VerifyPSS(k, algo.hash, digest, sig, opts) == nil
		}
		return rsa.VerifyPKCS1v15(k, algo.hash, digest, sig) == nil
	case *ecdsa.PublicKey:
		size := (k.Curve.Params().BitSize + 7) / 8
		if algo.kty != "EC" || len(sig) != 2*size {
			return false
		}
		r := new(big.Int).SetBytes(sig[:size])
		s := new(big.Int).SetBytes(sig[size:])
		return ecdsa.Verify(k, digest, r, s)
	}
	return false
}

// key returns the key named kid that fits alg, fetching the JWKS when it is unknown or old and
// a fetch is allowed.
func (e *ExternalIssuer) key(ctx context.Context, kid, alg string, algo jwsAlgorithm) (externalKey, error) {
	e.mu.Lock()
	t := now(e.Now)
	k, found := lookupKey(e.keys, kid, alg, algo)
	fresh := e.keys != nil && t.Sub(e.fetchedAt) < orDefault(e.MaxAge, DefaultMaxAge)
	mayFetch := e.triedAt.IsZero() || t.Sub(e.triedAt) >= orDefault(e.MinRefresh, DefaultMinRefresh) || t.Before(e.triedAt)
	if found && fresh || !mayFetch && e.fetching == nil {
		err := e.fetchErr
		e.mu.Unlock()
		return keyResult(k, found, err)
	}
	if e.fetching == nil {
		e.fetching = make(chan struct{})
		e.triedAt = t
		go e.fetch(context.WithoutCancel(ctx), e.fetching)
	}
	done := e.fetching
	e.mu.Unlock()

	select {
	case <-done:
	case <-ctx.Done():
		return externalKey{}, fmt.Errorf("%w: %w", ErrInvalidToken, ctx.Err())
	}
	e.mu.Lock()
	k, found = lookupKey(e.keys, kid, alg, algo)
	err := e.fetchErr
	e.mu.Unlock()
	return keyResult(k, found, err)
}

func keyResult(k externalKey, found bool, fetchErr error) (externalKey, error) {
	switch {
	case found:
		return k, nil
	case fetchErr != nil:
		return externalKey{}, fmt.Errorf("%w: %w", ErrInvalidToken, fetchErr)
	}
	return externalKey{}, errUnknownKID
}

// lookupKey finds the key named kid that fits alg in keys.
func lookupKey(keys map[string][]externalKey, kid, alg string, algo jwsAlgorithm) (externalKey, bool) {
	for _, k := range keys[kid] {
		if k.kty == algo.kty && k.crv == algo.crv && (k.alg == "" || k.alg == alg) {
			return k, true
		}
	}
	return externalKey{}, false
}

// fetch fetches the JWKS, stores the outcome and closes done.
func (e *ExternalIssuer) fetch(ctx context.Context, done chan struct{}) {
	keys, err := e.download(ctx)
	e.mu.Lock()
	if err == nil {
		e.keys = keys
		e.fetchedAt = e.triedAt
	}
	e.fetchErr = err
	e.fetching = nil
	e.mu.Unlock()
	close(done)
}

// download fetches and parses the JWKS.
func (e *ExternalIssuer) download(ctx context.Context) (map[string][]externalKey, error) {
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.JWKSURL, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrJWKS, err)
	}
	req.Header.Set("Accept", "application/json, application/jwk-set+json")
	client := e.Client
	if client == nil {
		client = defaultJWKSClient
	}
	resp, err := client.Do(req)
	if err != nil {
		// Leave out the URL that *url.Error repeats; the operator knows it.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("%w: %w", ErrJWKS, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		return nil, fmt.Errorf("%w: status %d", ErrJWKS, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxJWKSSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrJWKS, err)
	}
	if len(body) > MaxJWKSSize {
		return nil, fmt.Errorf("%w: response larger than %d bytes", ErrJWKS, MaxJWKSSize)
	}
	return parseJWKS(body)
}

// jwkJSON is one JWK as a JWKS spells it (RFC 7517, RFC 7518 §6, RFC 8037).
type jwkJSON struct {
	Kty    string   `json:"kty"`
	Kid    string   `json:"kid"`
	Use    string   `json:"use"`
	KeyOps []string `json:"key_ops"`
	Alg    string   `json:"alg"`
	Crv    string   `json:"crv"`
	N      string   `json:"n"`
	E      string   `json:"e"`
	X      string   `json:"x"`
	Y      string   `json:"y"`
}

// parseJWKS reads a JWK Set. Keys that are not for signatures, have no "kid", are of a type,
// curve or algorithm not supported, or are malformed (an RSA key under 2048 bits, a point off
// its curve) are left out; a set with none left is an error.
func parseJWKS(body []byte) (map[string][]externalKey, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("%w: malformed json", ErrJWKS)
	}
	if len(set.Keys) > maxJWKSKeys {
		return nil, fmt.Errorf("%w: more than %d keys", ErrJWKS, maxJWKSKeys)
	}
	keys := make(map[string][]externalKey)
	for _, raw := range set.Keys {
		var j jwkJSON
		if json.Unmarshal(raw, &j) != nil {
			continue
		}
		k, ok := parseJWK(j)
		if !ok {
			continue
		}
		keys[j.Kid] = append(keys[j.Kid], k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: no usable keys", ErrJWKS)
	}
	return keys, nil
}

// parseJWK turns one JWK into a key, if it is usable.
func parseJWK(j jwkJSON) (externalKey, bool) {
	if j.Kid == "" || j.Use != "" && j.Use != "sig" {
		return externalKey{}, false
	}
	if j.KeyOps != nil && !oneOf("verify", j.KeyOps) {
		return externalKey{}, false
	}
	if j.Alg != "" {
		a, ok := jwsAlgorithms[j.Alg]
		if !ok || a.kty != j.Kty || a.crv != "" && a.crv != j.Crv {
			return externalKey{}, false
		}
	}
	k := externalKey{kty: j.Kty, alg: j.Alg}
	switch j.Kty {
	case "RSA":
		n, err1 := decodeJWKField(j.N)
		e, err2 := decodeJWKField(j.E)
		if err1 != nil || err2 != nil || len(e) == 0 || len(e) > 4 {
			return externalKey{}, false
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n)}
		for _, b := range e {
			pub.E = pub.E<<8 | int(b)
		}
		if bits := pub.N.BitLen(); bits < minRSABits || bits > maxRSABits || pub.E < 3 || pub.E%2 == 0 {
			return externalKey{}, false
		}
		k.pub = pub
	case "EC":
		var curve elliptic.Curve
		switch j.Crv {
		case "P-256":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			return externalKey{}, false
		}
		size := (curve.Params().BitSize + 7) / 8
		x, err1 := decodeJWKField(j.X)
		y, err2 := decodeJWKField(j.Y)
		if err1 != nil || err2 != nil || len(x) != size || len(y) != size {
			return externalKey{}, false
		}
		point := append(append([]byte{4}, x...), y...)
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
		if err != nil {
			return externalKey{}, false
		}
		k.crv, k.pub = j.Crv, pub
	case "OKP":
		x, err := decodeJWKField(j.X)
		if j.Crv != "Ed25519" || err != nil || len(x) != ed25519.PublicKeySize {
			return externalKey{}, false
		}
		k.crv, k.pub = j.Crv, ed25519.PublicKey(x)
	default:
		return externalKey{}, false
	}
	return k, true
}

// decodeJWKField decodes a base64url JWK member, tolerating padding, which some issuers add.
func decodeJWKField(s string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
