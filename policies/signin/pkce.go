package signin

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
)

// PKCE (RFC 7636) with the S256 method only: the client sends
// code_challenge = BASE64URL(SHA256(code_verifier)) with the authorization request and the
// code_verifier with the token request. The "plain" method is refused (RFC 9700 §2.1.1).
const (
	// MethodS256 is the one code_challenge_method accepted.
	MethodS256 = "S256"
	// MinVerifierLen and MaxVerifierLen bound a code_verifier (RFC 7636 §4.1).
	MinVerifierLen = 43
	MaxVerifierLen = 128
	// challengeLen is the length of an S256 challenge: base64url of 32 bytes, no padding.
	challengeLen = 43
)

// ErrPKCE is wrapped by every error of CheckChallenge and VerifyPKCE; the text after it says
// why, never repeating the challenge or verifier. At the authorization endpoint it answers
// invalid_request, at the token endpoint invalid_grant.
var ErrPKCE = errors.New("pkce check failed")

// Why a PKCE check failed.
const (
	reasonNoChallenge  = "missing code_challenge"
	reasonMethod       = "code_challenge_method must be S256"
	reasonBadChallenge = "malformed code_challenge"
	reasonNoVerifier   = "missing code_verifier"
	reasonBadVerifier  = "malformed code_verifier"
	reasonMismatch     = "code_verifier does not match code_challenge"
)

func pkceError(reason string) error {
	return fmt.Errorf("%w: %s", ErrPKCE, reason)
}

// CheckChallenge checks the code_challenge and code_challenge_method of an authorization
// request: method must be exactly "S256" (an empty method, which RFC 7636 reads as "plain",
// and "plain" itself are refused), and challenge must be 43 base64url characters that decode
// to 32 bytes in canonical form. A missing challenge is refused too: every client uses PKCE.
func CheckChallenge(challenge, method string) error {
	if challenge == "" {
		return pkceError(reasonNoChallenge)
	}
	if method != MethodS256 {
		return pkceError(reasonMethod)
	}
	if !validChallenge(challenge) {
		return pkceError(reasonBadChallenge)
	}
	return nil
}

// VerifyPKCE checks a token request's code_verifier against the code_challenge stored with its
// code: verifier must be 43 to 128 characters of [A-Za-z0-9-._~] and BASE64URL(SHA256(verifier))
// must equal challenge, compared in constant time. An empty challenge (a code issued without
// one) is refused, whatever the verifier.
func VerifyPKCE(challenge, verifier string) error {
	if challenge == "" {
		return pkceError(reasonNoChallenge)
	}
	if !validChallenge(challenge) {
		return pkceError(reasonBadChallenge)
	}
	if verifier == "" {
		return pkceError(reasonNoVerifier)
	}
	if !validVerifier(verifier) {
		return pkceError(reasonBadVerifier)
	}
	sum := sha256.Sum256([]byte(verifier))
	var got [challengeLen]byte
	base64.RawURLEncoding.Encode(got[:], sum[:])
	if subtle.ConstantTimeCompare(got[:], []byte(challenge)) != 1 {
		return pkceError(reasonMismatch)
	}
	return nil
}

// validChallenge reports whether c is 43 base64url characters whose last one carries no stray
// bits, i.e. the canonical encoding of 32 bytes.
func validChallenge(c string) bool {
	if len(c) != challengeLen {
		return false
	}
	for i := 0; i < len(c); i++ {
		if !isBase64URL(c[i]) {
			return false
		}
	}
	// 43 characters hold 258 bits: the last character's two low bits must be zero.
	return base64URLValue(c[len(c)-1])&3 == 0
}

// validVerifier reports whether v is a code_verifier: 43 to 128 unreserved characters.
func validVerifier(v string) bool {
	if len(v) < MinVerifierLen || len(v) > MaxVerifierLen {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !(isBase64URL(c) || c == '.' || c == '~') {
			return false
		}
	}
	return true
}

// isBase64URL reports whether c is in the base64url alphabet (RFC 4648 §5).
func isBase64URL(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// base64URLValue is the 6-bit value of the base64url character c.
func base64URLValue(c byte) byte {
	switch {
	case 'A' <= c && c <= 'Z':
		return c - 'A'
	case 'a' <= c && c <= 'z':
		return c - 'a' + 26
	case '0' <= c && c <= '9':
		return c - '0' + 52
	case c == '-':
		return 62
	}
	return 63
}
