package identity

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// MaxCredentialLen is the longest credential header value accepted, in bytes (8 KiB). Longer
// values are refused before anything else is done with them.
const MaxCredentialLen = 8 << 10

// CredentialKind tells what a request's credential looks like.
type CredentialKind uint8

// The kinds of credential.
const (
	// None: the request carries no credential (the anonymous identity, when that is on).
	None CredentialKind = iota
	// APIKey: a value to check with ParseKey; it may still be malformed.
	APIKey
	// JWT: a value with the shape of a compact JWS (three base64url segments); it is not verified.
	JWT
)

// String returns "none", "api_key" or "jwt".
func (k CredentialKind) String() string {
	switch k {
	case None:
		return "none"
	case APIKey:
		return "api_key"
	case JWT:
		return "jwt"
	}
	return "unknown"
}

// Credential is the one credential a request carries.
type Credential struct {
	Kind CredentialKind
	// Value is the credential itself: the token after "Bearer ", or the whole header value. It
	// is a secret: never log it.
	Value string
	// Header names the header it came from: "Authorization", "X-API-Key" or "apikey".
	Header string
}

// String describes the credential without its value, so that it is safe to print.
func (c Credential) String() string {
	if c.Kind == None {
		return "none"
	}
	return c.Kind.String() + " from " + c.Header
}

// Errors CredentialFrom reports. They name headers, never values.
var (
	// ErrTwoCredentials: the request carries two different credentials (400 invalid_request).
	ErrTwoCredentials = errors.New("two different credentials")
	// ErrMalformedCredential: a credential header that cannot hold a credential.
	ErrMalformedCredential = errors.New("malformed credential")
)

// The headers a credential may come in, in the order they are read. key is the canonical
// MIME header key, name the spelling used in Credential.Header and in errors.
var credentialHeaders = [...]struct{ key, name string }{
	{"Authorization", "Authorization"},
	{"X-Api-Key", "X-API-Key"},
	{"Apikey", "apikey"},
}

// Why a credential header is malformed; the only texts (besides header names) errors carry.
const (
	reasonTooLong      = "value too long"
	reasonBadByte      = "control or non-ASCII byte"
	reasonSpace        = "space inside the credential"
	reasonEmptyBearer  = "empty bearer token"
	reasonScheme       = "unsupported authorization scheme"
	reasonNotBearerJWT = "neither a bearer token nor a JWT"
)

// CredentialFrom returns the credential carried by the request headers h. Accepted are
//
//	Authorization: Bearer <api key or JWT>   (scheme case-insensitive)
//	Authorization: <JWT>                     (raw, as the Peerwave seed sends it)
//	X-API-Key: <api key>
//	apikey: <api key>
//
// A Bearer token with the shape of a JWT is of Kind JWT, any other is an APIKey; the
// X-API-Key and apikey headers always carry an APIKey. Surrounding spaces and tabs are trimmed,
// and an empty value carries nothing. The same value in several headers, or repeated in one, is
// one credential; two different values are ErrTwoCredentials. ErrMalformedCredential reports a
// value longer than MaxCredentialLen, control, NUL or non-ASCII bytes, a space inside the
// credential, an empty Bearer token, any scheme but Bearer, and a raw Authorization value that
// is not a JWT. Without any credential header it returns a Credential of Kind None and no error.
//
// h must have canonical keys, as net/http gives them. Both errors can be matched with errors.Is
// and never contain a credential.
func CredentialFrom(h http.Header) (Credential, error) {
	var found Credential
	for _, ch := range credentialHeaders {
		for _, v := range h[ch.key] {
			c, err := parseCredential(ch.name, v)
			if err != nil {
				return Credential{}, err
			}
			if c.Kind == None {
				continue
			}
			if found.Kind == None {
				found = c
				continue
			}
			// Both values come from this request, so comparing them leaks nothing stored.
			if c.Value != found.Value {
				return Credential{}, twoCredentials(found.Header, c.Header)
			}
		}
	}
	return found, nil
}

// parseCredential reads one value of the header called name.
func parseCredential(name, v string) (Credential, error) {
	if len(v) > MaxCredentialLen {
		return Credential{}, malformedCredential(name, reasonTooLong)
	}
	v = strings.Trim(v, " \t")
	if v == "" {
		return Credential{}, nil
	}
	for i := 0; i < len(v); i++ {
		if b := v[i]; b < 0x20 || b >= 0x7f {
			return Credential{}, malformedCredential(name, reasonBadByte)
		}
	}
	if name != "Authorization" {
		if strings.IndexByte(v, ' ') >= 0 {
			return Credential{}, malformedCredential(name, reasonSpace)
		}
		return Credential{Kind: APIKey, Value: v, Header: name}, nil
	}

	scheme, token, hasToken := strings.Cut(v, " ")
	if !hasToken {
		switch {
		case strings.EqualFold(v, "Bearer"):
			return Credential{}, malformedCredential(name, reasonEmptyBearer)
		case isJWTShape(v):
			return Credential{Kind: JWT, Value: v, Header: name}, nil
		}
		return Credential{}, malformedCredential(name, reasonNotBearerJWT)
	}
	if !strings.EqualFold(scheme, "Bearer") {
		return Credential{}, malformedCredential(name, reasonScheme)
	}
	token = strings.TrimLeft(token, " ")
	if token == "" {
		return Credential{}, malformedCredential(name, reasonEmptyBearer)
	}
	if strings.IndexByte(token, ' ') >= 0 {
		return Credential{}, malformedCredential(name, reasonSpace)
	}
	if isJWTShape(token) {
		return Credential{Kind: JWT, Value: token, Header: name}, nil
	}
	return Credential{Kind: APIKey, Value: token, Header: name}, nil
}

func twoCredentials(header1, header2 string) error {
	return fmt.Errorf("%w: in %s and %s", ErrTwoCredentials, header1, header2)
}

func malformedCredential(header, reason string) error {
	return fmt.Errorf("%w in %s header: %s", ErrMalformedCredential, header, reason)
}

// isJWTShape reports whether s is three non-empty base64url segments (no padding) joined by
// two dots: the compact serialisation of a JWS. The signature is not checked here.
func isJWTShape(s string) bool {
	dots, segLen := 0, 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if segLen == 0 || dots == 2 {
				return false
			}
			dots++
			segLen = 0
		case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
			segLen++
		default:
			return false
		}
	}
	return dots == 2 && segLen > 0
}
