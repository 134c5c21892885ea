package signin

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// The prefixes of the opaque tokens the gateway makes with NewToken.
const (
	PrefixSession      = "ses"
	PrefixCode         = "ac"
	PrefixRefresh      = "rt"
	PrefixClientID     = "app"
	PrefixClientSecret = "cs"
)

// MinSecretLen is the shortest server secret (Store.ServerSecret) that Successor and
// CSRFToken accept, in bytes.
const MinSecretLen = 32

// tokenRandomLen is the length of base64url(32 bytes) without padding.
const tokenRandomLen = 43

// NewToken returns prefix + "_" + 32 bytes from crypto/rand in base64url without padding: a
// session cookie (PrefixSession), authorization code (PrefixCode), refresh token
// (PrefixRefresh), client id (PrefixClientID) or client secret (PrefixClientSecret). Only the
// HashToken of a secret token is stored.
func NewToken(prefix string) string {
	var b [32]byte
	rand.Read(b[:]) // never fails (crypto/rand crashes the program instead)
	return prefix + "_" + base64.RawURLEncoding.EncodeToString(b[:])
}

// HashToken returns the SHA-256 of s, the form in which tokens are stored and looked up.
func HashToken(s string) [32]byte {
	return sha256.Sum256([]byte(s))
}

// Successor returns the refresh token that refresh is rotated to: "rt_" + base64url of
// HMAC-SHA256(secret, "refresh-successor|" + refresh). It is deterministic, so that a second
// refresh of the same token within the grace period (a lost response, two tabs) can be
// answered with the same successor (Store.RotateRefresh's Replayed) although only hashes are
// stored, and it cannot be computed without the server secret.
//
// secret is the server secret; Successor panics when it is shorter than MinSecretLen, as a
// missing secret would make every successor guessable.
func Successor(secret []byte, refresh string) string {
	if len(secret) < MinSecretLen {
		panic("signin: server secret too short")
	}
	return PrefixRefresh + "_" + base64.RawURLEncoding.EncodeToString(mac(secret, "refresh-successor|", refresh))
}

// CSRFToken returns the token that a form posted on behalf of binding (a session, as the hex
// of its hash for instance) must carry: base64url of HMAC-SHA256(secret, "csrf|" + binding).
// It returns "" (which CheckCSRF never accepts) when binding is empty or secret is shorter
// than MinSecretLen.
func CSRFToken(secret []byte, binding string) string {
	if binding == "" || len(secret) < MinSecretLen {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString(mac(secret, "csrf|", binding))
}

// CheckCSRF reports whether token is CSRFToken(secret, binding), comparing in constant time.
// An empty binding or token, a token of the wrong length and a short secret are false.
func CheckCSRF(secret []byte, binding, token string) bool {
	if len(token) != tokenRandomLen {
		return false
	}
	want := CSRFToken(secret, binding)
	if want == "" {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(want), []byte(token)) == 1
}

// Covers reports whether the granted scopes include every asked scope, with identity.HasScope's
// meaning: identity.ScopeAll grants every scope, and an unknown scope is never granted. Asking
// for nothing is covered.
func Covers(granted, asked []string) bool {
	for _, a := range asked {
		if !identity.HasScope(granted, a) {
			return false
		}
	}
	return true
}

// mac is HMAC-SHA256(secret, label + msg).
func mac(secret []byte, label, msg string) []byte {
	h := hmac.New(sha256.New, secret)
	h.Write([]byte(label))
	h.Write([]byte(msg))
	return h.Sum(nil)
}
