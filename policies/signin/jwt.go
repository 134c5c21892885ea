package signin

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// The gateway's own JWTs are compact JWS (RFC 7515) signed with Ed25519, "alg":"EdDSA"
// (RFC 8037). Their header is exactly {"alg":"EdDSA","typ":...,"kid":...}; the "typ" tells
// the kinds of token apart (RFC 8725 §3.11), so that one kind is never taken for another.
const (
	// TypeAccess is an access token (RFC 9068), from OAuth and the password grant.
	TypeAccess = "at+jwt"
	// TypeFragment is the token of the Peerwave fragment flow (API.md §7). It is short-lived
	// and bound to the client IP in its "ip" claim, which the caller compares with the
	// request's client IP.
	TypeFragment = "fragment+jwt"
)

// MaxTokenLen is the longest JWT accepted, in bytes (8 KiB). Longer tokens are refused before
// anything else is done with them.
const MaxTokenLen = 8 << 10

// MaxLeeway is the largest clock leeway a Verifier or ExternalIssuer applies; larger values
// are read as MaxLeeway.
const MaxLeeway = time.Minute

// algEdDSA is the one algorithm of the gateway's own tokens.
const algEdDSA = "EdDSA"

// maxNumericDate is 9999-12-31T23:59:59Z, the latest time a token may carry.
const maxNumericDate = 253402300799

// ErrInvalidToken is wrapped by every error of Verifier.Verify and ExternalIssuer.Verify
// (401 invalid_token). The text after it says why in a few words; it never contains the token
// or any value taken from it.
var ErrInvalidToken = errors.New("invalid token")

// ErrClaims is wrapped by the errors of Keyset.Sign: claims that Verify would refuse.
var ErrClaims = errors.New("cannot sign claims")

// tokenError is a reason a token is invalid; it wraps ErrInvalidToken. The reasons are
// constants, so returning one allocates nothing.
type tokenError string

func (e tokenError) Error() string { return ErrInvalidToken.Error() + ": " + string(e) }
func (e tokenError) Unwrap() error { return ErrInvalidToken }

// Why a token is invalid.
const (
	errTokenLong    tokenError = "too long"
	errShape        tokenError = "not a compact jws"
	errEncoding     tokenError = "malformed base64url"
	errJSONToken    tokenError = "malformed json"
	errHeader       tokenError = "malformed header"
	errHeaderMember tokenError = "header member not allowed"
	errAlg          tokenError = "algorithm not allowed"
	errNoKID        tokenError = "missing key id"
	errUnknownKID   tokenError = "unknown key id"
	errTyp          tokenError = "token type not allowed"
	errSignature    tokenError = "bad signature"
	errClaim        tokenError = "malformed claim"
	errIssuer       tokenError = "wrong issuer"
	errAudience     tokenError = "wrong audience"
	errNoSubject    tokenError = "missing subject"
	errNoExpiry     tokenError = "missing expiry"
	errExpired      tokenError = "expired"
	errNotYet       tokenError = "not valid yet"
	errIssuedFuture tokenError = "issued in the future"
	errNoIP         tokenError = "missing ip binding"
	errNotConfig    tokenError = "verifier not configured"
)

// Claims are the claims of a token the gateway issues or accepts.
type Claims struct {
	// Issuer ("iss") is who issued the token.
	Issuer string
	// Subject ("sub") is the user id (own tokens) or the external issuer's subject.
	Subject string
	// Audience ("aud") is who the token is for; a single string in the gateway's own tokens.
	Audience string
	// ClientID ("client_id") is the OAuth client the token was issued to; "" for a token of
	// the fragment flow or of a first-party sign-in without one.
	ClientID string
	// Scope ("scope") is the granted scopes, separated by spaces.
	Scope string
	// IP ("ip") is the client IP a TypeFragment token is bound to.
	IP string
	// ID ("jti") names the token; Sign makes a random one when it is empty.
	ID string
	// Type is the JWS header's "typ": TypeAccess or TypeFragment for own tokens; Verify fills
	// it in, Sign puts it in the header.
	Type string
	// IssuedAt ("iat"), NotBefore ("nbf") and Expiry ("exp"), in whole seconds in the token.
	// A zero IssuedAt or NotBefore is left out; Expiry is required.
	IssuedAt, NotBefore, Expiry time.Time
}

// Scopes parses c.Scope with identity.ParseScopes.
func (c Claims) Scopes() ([]string, error) {
	return identity.ParseScopes(c.Scope)
}

// NewSigningKey makes a new Ed25519 signing key created at now. Its KID is the base64url of
// the first 12 bytes of the SHA-256 of the public key.
func NewSigningKey(now time.Time) (SigningKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return SigningKey{}, err
	}
	return SigningKey{KID: keyID(pub), Private: priv, CreatedAt: now}, nil
}

func keyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return base64.RawURLEncoding.EncodeToString(sum[:12])
}

// maxKIDLen bounds the KID of a signing key.
const maxKIDLen = 64

// Keyset is the gateway's signing keys: the newest signs, every one verifies, so that tokens
// signed before a rotation stay valid while their key is in the set. A Keyset does not
// change; rotating keys makes a new one. It is safe for concurrent use.
type Keyset struct {
	kid    string
	signer ed25519.PrivateKey
	keys   map[string]ed25519.PublicKey
	jwks   []byte
}

// NewKeyset makes a key set of keys, newest first (Store.SigningKeys' order): keys[0] signs.
// It fails when keys is empty, when a key's Private is not a consistent 64-byte Ed25519
// private key, or when a KID is empty, longer than 64 bytes, not base64url or repeated. The
// keys are copied.
func NewKeyset(keys []SigningKey) (*Keyset, error) {
	if len(keys) == 0 {
		return nil, errors.New("no signing keys")
	}
	ks := &Keyset{keys: make(map[string]ed25519.PublicKey, len(keys))}
	type jwk struct {
		Kty string `json:"kty"`
		Crv string `json:"crv"`
		X   string `json:"x"`
		Kid string `json:"kid"`
		Alg string `json:"alg"`
		Use string `json:"use"`
	}
	var set struct {
		Keys []jwk `json:"keys"`
	}
	for i, k := range keys {
		if k.KID == "" || len(k.KID) > maxKIDLen || !isBase64URLString(k.KID) {
			return nil, fmt.Errorf("signing key %d: malformed key id", i)
		}
		if _, dup := ks.keys[k.KID]; dup {
			return nil, fmt.Errorf("signing key %d: repeated key id", i)
		}
		if len(k.Private) != ed25519.PrivateKeySize {
			return nil, fmt.Errorf("signing key %d: malformed private key", i)
		}
		priv := ed25519.NewKeyFromSeed(k.Private[:ed25519.SeedSize])
		if subtle.ConstantTimeCompare(priv, k.Private) != 1 {
			return nil, fmt.Errorf("signing key %d: malformed private key", i)
		}
		pub := priv.Public().(ed25519.PublicKey)
		ks.keys[k.KID] = pub
		if i == 0 {
			ks.kid, ks.signer = k.KID, priv
		}
		set.Keys = append(set.Keys, jwk{
			Kty: "OKP", Crv: "Ed25519", X: base64.RawURLEncoding.EncodeToString(pub),
			Kid: k.KID, Alg: algEdDSA, Use: "sig",
		})
	}
	var err error
	if ks.jwks, err = json.Marshal(set); err != nil {
		return nil, err
	}
	return ks, nil
}

// KID returns the key id of the signing key.
func (ks *Keyset) KID() string { return ks.kid }

// JWKS returns the public keys of the set as an RFC 7517 JWK Set, for
// /.well-known/jwks.json: {"keys":[{"kty":"OKP","crv":"Ed25519","x":...,"kid":...,
// "alg":"EdDSA","use":"sig"},...]}, newest first. The slice is the caller's.
func (ks *Keyset) JWKS() []byte {
	return bytes.Clone(ks.jwks)
}

// Sign returns c as a JWT signed with the newest key. c.Type must be TypeAccess or
// TypeFragment (a TypeFragment token needs c.IP); Issuer, Audience, Subject and Expiry are
// required. An empty c.ID is replaced by a random one. Times are truncated to whole seconds.
// Errors wrap ErrClaims.
func (ks *Keyset) Sign(c Claims) (string, error) {
	switch {
	case c.Type != TypeAccess && c.Type != TypeFragment:
		return "", fmt.Errorf("%w: unknown token type", ErrClaims)
	case c.Issuer == "" || c.Audience == "":
		return "", fmt.Errorf("%w: missing issuer or audience", ErrClaims)
	case c.Subject == "":
		return "", fmt.Errorf("%w: missing subject", ErrClaims)
	case c.Expiry.IsZero():
		return "", fmt.Errorf("%w: missing expiry", ErrClaims)
	case c.Type == TypeFragment && c.IP == "":
		return "", fmt.Errorf("%w: fragment token without ip", ErrClaims)
	}
	if c.ID == "" {
		var b [16]byte
		rand.Read(b[:])
		c.ID = base64.RawURLEncoding.EncodeToString(b[:])
	}
	var err error
	payload := ownPayload{
		Iss: c.Issuer, Sub: c.Subject, Aud: c.Audience, ClientID: c.ClientID, Scope: c.Scope,
		IP: c.IP, Jti: c.ID,
	}
	if payload.Exp, err = numericDate(c.Expiry); err != nil {
		return "", err
	}
	if !c.IssuedAt.IsZero() {
		if payload.Iat, err = numericDate(c.IssuedAt); err != nil {
			return "", err
		}
	}
	if !c.NotBefore.IsZero() {
		if payload.Nbf, err = numericDate(c.NotBefore); err != nil {
			return "", err
		}
	}
	header, err := json.Marshal(ownHeader{Alg: algEdDSA, Typ: c.Type, Kid: ks.kid})
	if err != nil {
		return "", err
	}
	body, err := json.Marshal(payload)
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	var b strings.Builder
	b.Grow(enc.EncodedLen(len(header)) + enc.EncodedLen(len(body)) + enc.EncodedLen(ed25519.SignatureSize) + 2)
	b.WriteString(enc.EncodeToString(header))
	b.WriteByte('.')
	b.WriteString(enc.EncodeToString(body))
	sig := ed25519.Sign(ks.signer, []byte(b.String()))
	b.WriteByte('.')
	b.WriteString(enc.EncodeToString(sig))
	if b.Len() > MaxTokenLen {
		return "", fmt.Errorf("%w: token too long", ErrClaims)
	}
	return b.String(), nil
}

// ownHeader and ownPayload are the JSON of the gateway's own tokens, in this member order.
type ownHeader struct {
	Alg string `json:"alg"`
	Typ string `json:"typ"`
	Kid string `json:"kid"`
}

type ownPayload struct {
	Iss      string `json:"iss"`
	Sub      string `json:"sub"`
	Aud      string `json:"aud"`
	ClientID string `json:"client_id,omitempty"`
	Scope    string `json:"scope,omitempty"`
	IP       string `json:"ip,omitempty"`
	Jti      string `json:"jti"`
	Iat      int64  `json:"iat,omitempty"`
	Nbf      int64  `json:"nbf,omitempty"`
	Exp      int64  `json:"exp"`
}

// numericDate returns t in seconds since the epoch, which must be from 1970 to 9999.
func numericDate(t time.Time) (int64, error) {
	s := t.Unix()
	if s <= 0 || s > maxNumericDate {
		return 0, fmt.Errorf("%w: time out of range", ErrClaims)
	}
	return s, nil
}

// Verifier verifies the gateway's own tokens. Its fields are not changed once it is in use;
// it is then safe for concurrent use.
type Verifier struct {
	// Keys are the keys a token may be signed with. Required.
	Keys *Keyset
	// Issuer and Audience are what the "iss" and "aud" claims must equal. Required: a
	// Verifier without them refuses every token.
	Issuer, Audience string
	// Types lists the token types ("typ") accepted, e.g. []string{TypeAccess}. Empty: none.
	Types []string
	// Leeway is the clock skew allowed on "exp", "nbf" and "iat"; at most MaxLeeway.
	// Default 0.
	Leeway time.Duration
	// Now returns the current time. Default time.Now.
	Now func() time.Time
}

// Verify checks token and returns its claims. It accepts only a token that
//
//   - is at most MaxTokenLen bytes of three non-empty base64url segments (no padding) joined
//     by dots, checked before anything is decoded;
//   - has the header {"alg":"EdDSA","typ":T,"kid":K} and nothing else in it, where T is one
//     of v.Types and K names a key of v.Keys (looked up in the set, nothing else);
//   - carries a valid Ed25519 signature by that key, checked before the claims are read;
//   - has "iss" equal to v.Issuer, "aud" (one string) equal to v.Audience, a non-empty
//     "sub", an "exp" later than now minus the leeway, and no "nbf" or "iat" later than now
//     plus the leeway; a TypeFragment token must carry an "ip".
//
// JSON with repeated members, invalid UTF-8 or trailing data is refused, and so are claims of
// the wrong JSON type. Every error wraps ErrInvalidToken.
func (v *Verifier) Verify(token string) (Claims, error) {
	if v.Keys == nil || v.Issuer == "" || v.Audience == "" {
		return Claims{}, errNotConfig
	}
	t, err := parseJWS(token)
	if err != nil {
		return Claims{}, err
	}
	for name := range t.header {
		if name != "alg" && name != "typ" && name != "kid" {
			return Claims{}, errHeaderMember
		}
	}
	switch {
	case t.alg != algEdDSA:
		return Claims{}, errAlg
	case !oneOf(t.typ, v.Types):
		return Claims{}, errTyp
	}
	pub, ok := v.Keys.keys[t.kid]
	if !ok {
		return Claims{}, errUnknownKID
	}
	if len(t.signature) != ed25519.SignatureSize || !ed25519.Verify(pub, []byte(t.signingInput), t.signature) {
		return Claims{}, errSignature
	}

	members, err := decodeObject(t.payload)
	if err != nil {
		return Claims{}, err
	}
	c := Claims{Type: t.typ}
	for _, f := range [...]struct {
		name string
		dst  *string
	}{
		{"iss", &c.Issuer}, {"sub", &c.Subject}, {"aud", &c.Audience}, {"client_id", &c.ClientID},
		{"scope", &c.Scope}, {"ip", &c.IP}, {"jti", &c.ID},
	} {
		if *f.dst, _, err = stringMember(members, f.name); err != nil {
			return Claims{}, errClaim
		}
	}
	switch {
	case c.Issuer != v.Issuer:
		return Claims{}, errIssuer
	case c.Audience != v.Audience:
		return Claims{}, errAudience
	case c.Subject == "":
		return Claims{}, errNoSubject
	case c.Type == TypeFragment && c.IP == "":
		return Claims{}, errNoIP
	}
	if err := checkTimes(&c, members, now(v.Now), v.Leeway); err != nil {
		return Claims{}, err
	}
	return c, nil
}

// jws is a compact JWS with its header read, nothing verified.
type jws struct {
	header        map[string]json.RawMessage
	alg, typ, kid string
	signingInput  string // the header and payload segments, which the signature covers
	payload       string // the payload segment, still encoded
	signature     []byte
}

// parseJWS checks the size and shape of token (splitToken) and reads its header: "alg"
// (required), "typ" and "kid" (required, not empty) as strings, and the signature.
func parseJWS(token string) (jws, error) {
	head, payload, sig, err := splitToken(token)
	if err != nil {
		return jws{}, err
	}
	t := jws{payload: payload, signingInput: token[:len(head)+1+len(payload)]}
	if t.header, err = decodeObject(head); err != nil {
		return jws{}, err
	}
	var hasAlg bool
	var err1, err2, err3 error
	t.alg, hasAlg, err1 = stringMember(t.header, "alg")
	t.typ, _, err2 = stringMember(t.header, "typ")
	t.kid, _, err3 = stringMember(t.header, "kid")
	switch {
	case err1 != nil || err2 != nil || err3 != nil || !hasAlg:
		return jws{}, errHeader
	case t.kid == "":
		return jws{}, errNoKID
	}
	if t.signature, err = decodeSegment(sig); err != nil {
		return jws{}, err
	}
	return t, nil
}

// splitToken checks the size and shape of a compact JWS and returns its three segments,
// without allocating: at most MaxTokenLen bytes, three non-empty segments of base64url
// characters joined by two dots.
func splitToken(token string) (head, payload, sig string, err error) {
	if len(token) > MaxTokenLen {
		return "", "", "", errTokenLong
	}
	var dot [2]int
	dots, segLen := 0, 0
	for i := 0; i < len(token); i++ {
		c := token[i]
		switch {
		case c == '.':
			if segLen == 0 || dots == 2 {
				return "", "", "", errShape
			}
			dot[dots] = i
			dots++
			segLen = 0
		case isBase64URL(c):
			segLen++
		default:
			return "", "", "", errShape
		}
	}
	if dots != 2 || segLen == 0 {
		return "", "", "", errShape
	}
	return token[:dot[0]], token[dot[0]+1 : dot[1]], token[dot[1]+1:], nil
}

// decodeSegment decodes a base64url segment, refusing stray bits in the last character, so
// that each byte string has one encoding.
func decodeSegment(s string) ([]byte, error) {
	b, err := base64.RawURLEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, errEncoding
	}
	return b, nil
}

// decodeObject decodes the base64url segment seg and reads it as one JSON object.
func decodeObject(seg string) (map[string]json.RawMessage, error) {
	b, err := decodeSegment(seg)
	if err != nil {
		return nil, err
	}
	m, err := parseObject(b)
	if err != nil {
		return nil, errJSONToken
	}
	return m, nil
}

var errJSON = errors.New("malformed json object")

// parseObject reads data as one JSON object and returns its members, undecoded. Invalid
// UTF-8, a repeated member name (however it is escaped) and anything after the object are
// errors, so that no two readers of the object can disagree about it.
func parseObject(data []byte) (map[string]json.RawMessage, error) {
	if !utf8.Valid(data) {
		return nil, errJSON
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, errJSON
	}
	m := make(map[string]json.RawMessage)
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, errJSON
		}
		name, ok := t.(string)
		if !ok {
			return nil, errJSON
		}
		if _, dup := m[name]; dup {
			return nil, errJSON
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, errJSON
		}
		m[name] = v
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') {
		return nil, errJSON
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errJSON
	}
	return m, nil
}

// stringMember returns the member name of m, which must be a JSON string when present.
func stringMember(m map[string]json.RawMessage, name string) (string, bool, error) {
	raw, ok := m[name]
	if !ok {
		return "", false, nil
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '"' {
		return "", true, errJSON
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", true, errJSON
	}
	return s, true, nil
}

// timeMember returns the member name of m, which must be a NumericDate when present: a JSON
// number of seconds since the epoch, from 0 to 9999-12-31T23:59:59Z, fractions allowed.
func timeMember(m map[string]json.RawMessage, name string) (time.Time, bool, error) {
	raw, ok := m[name]
	if !ok {
		return time.Time{}, false, nil
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] < '0' || raw[0] > '9' {
		return time.Time{}, true, errJSON
	}
	f, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || math.IsNaN(f) || f < 0 || f > maxNumericDate {
		return time.Time{}, true, errJSON
	}
	sec := math.Floor(f)
	return time.Unix(int64(sec), int64((f-sec)*1e9)).UTC(), true, nil
}

// checkTimes reads "exp", "nbf" and "iat" from the claims members into c and checks them
// against now with leeway: "exp" is required and must be after now-leeway; "nbf" and "iat",
// when present, must not be after now+leeway.
func checkTimes(c *Claims, members map[string]json.RawMessage, now time.Time, leeway time.Duration) error {
	leeway = max(0, min(leeway, MaxLeeway))
	var hasExp bool
	var err error
	if c.Expiry, hasExp, err = timeMember(members, "exp"); err != nil {
		return errClaim
	}
	if c.NotBefore, _, err = timeMember(members, "nbf"); err != nil {
		return errClaim
	}
	if c.IssuedAt, _, err = timeMember(members, "iat"); err != nil {
		return errClaim
	}
	late := now.Add(leeway)
	switch {
	case !hasExp:
		return errNoExpiry
	case !now.Before(c.Expiry.Add(leeway)):
		return errExpired
	case !c.NotBefore.IsZero() && c.NotBefore.After(late):
		return errNotYet
	case !c.IssuedAt.IsZero() && c.IssuedAt.After(late):
		return errIssuedFuture
	}
	return nil
}

func now(f func() time.Time) time.Time {
	if f != nil {
		return f()
	}
	return time.Now()
}

func oneOf(s string, list []string) bool {
	for _, l := range list {
		if s == l {
			return true
		}
	}
	return false
}

func isBase64URLString(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isBase64URL(s[i]) {
			return false
		}
	}
	return true
}
