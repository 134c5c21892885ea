package signin

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"strings"
	"testing"
	"time"
)

// t0 is the fixed "now" of the tests.
var t0 = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

// fixedClock returns a clock that always says t.
func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

// seedKey is a signing key made from a fixed seed, so that the tokens it signs (Ed25519 is
// deterministic) are the same on every run and can stand in fuzz corpora.
func seedKey(seed byte, created time.Time) SigningKey {
	s := make([]byte, ed25519.SeedSize)
	for i := range s {
		s[i] = seed
	}
	priv := ed25519.NewKeyFromSeed(s)
	return SigningKey{KID: keyID(priv.Public().(ed25519.PublicKey)), Private: priv, CreatedAt: created}
}

func mustKeyset(t testing.TB, keys ...SigningKey) *Keyset {
	t.Helper()
	ks, err := NewKeyset(keys)
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// forge builds a compact JWS from raw header and payload JSON, signed by sign (nil: an empty
// signature segment).
func forge(header, payload string, sign func(input []byte) []byte) string {
	input := b64(header) + "." + b64(payload)
	if sign == nil {
		return input + "."
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sign([]byte(input)))
}

// edSigner signs with an Ed25519 signing key.
func edSigner(k SigningKey) func([]byte) []byte {
	return func(input []byte) []byte { return ed25519.Sign(k.Private, input) }
}

// s256 is BASE64URL(SHA256(v)), computed apart from the code under test.
func s256(v string) string {
	sum := sha256.Sum256([]byte(v))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// checkNoSecret fails when err's text contains secret.
func checkNoSecret(t testing.TB, err error, secret string) {
	t.Helper()
	if err != nil && len(secret) >= 8 && strings.Contains(err.Error(), secret) {
		t.Errorf("error %q contains the secret", err)
	}
}
