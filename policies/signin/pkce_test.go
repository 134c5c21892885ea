package signin

import (
	"errors"
	"strings"
	"testing"
)

// The example of RFC 7636 Appendix B.
const (
	rfcVerifier  = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
	rfcChallenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
)

func TestPKCERFC7636Vector(t *testing.T) {
	if err := CheckChallenge(rfcChallenge, "S256"); err != nil {
		t.Errorf("CheckChallenge: %v", err)
	}
	if err := VerifyPKCE(rfcChallenge, rfcVerifier); err != nil {
		t.Errorf("VerifyPKCE: %v", err)
	}
}

func TestCheckChallenge(t *testing.T) {
	tests := []struct {
		name, challenge, method string
		ok                      bool
	}{
		{"s256", rfcChallenge, "S256", true},
		{"missing challenge", "", "S256", false},
		{"missing challenge and method", "", "", false},
		{"missing method means plain", rfcChallenge, "", false},
		{"plain", rfcChallenge, "plain", false},
		{"plain verifier as challenge", rfcVerifier, "plain", false},
		{"lower-case method", rfcChallenge, "s256", false},
		{"other method", rfcChallenge, "S512", false},
		{"42 characters", rfcChallenge[:42], "S256", false},
		{"44 characters", rfcChallenge + "A", "S256", false},
		{"padding", rfcChallenge[:42] + "=", "S256", false},
		{"standard alphabet", strings.ReplaceAll(rfcChallenge, "-", "+"), "S256", false},
		{"space", rfcChallenge[:42] + " ", "S256", false},
		{"stray low bits", rfcChallenge[:42] + "N", "S256", false},
		{"canonical last character", rfcChallenge[:42] + "Q", "S256", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckChallenge(tt.challenge, tt.method)
			if (err == nil) != tt.ok {
				t.Fatalf("CheckChallenge = %v, want ok %v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrPKCE) {
				t.Errorf("error %v does not wrap ErrPKCE", err)
			}
			checkNoSecret(t, err, tt.challenge)
		})
	}
}

func TestVerifyPKCE(t *testing.T) {
	v43 := strings.Repeat("a", 43)
	v128 := strings.Repeat("Az09-._~", 16)
	tests := []struct {
		name, challenge, verifier string
		ok                        bool
	}{
		{"rfc vector", rfcChallenge, rfcVerifier, true},
		{"43 characters", s256(v43), v43, true},
		{"128 characters, every kind of character", s256(v128), v128, true},
		{"wrong verifier", rfcChallenge, strings.Repeat("b", 43), false},
		{"verifier one character off", rfcChallenge, rfcVerifier[:42] + "l", false},
		{"missing verifier", rfcChallenge, "", false},
		{"42 characters", s256(v43[:42]), v43[:42], false},
		{"129 characters", s256(v128 + "a"), v128 + "a", false},
		{"plus", s256(v43[:42] + "+"), v43[:42] + "+", false},
		{"slash", s256(v43[:42] + "/"), v43[:42] + "/", false},
		{"equals", s256(v43[:42] + "="), v43[:42] + "=", false},
		{"space", s256(v43[:42] + " "), v43[:42] + " ", false},
		{"percent", s256(v43[:42] + "%"), v43[:42] + "%", false},
		{"non-ascii", s256(v43[:41] + "é"), v43[:41] + "é", false},
		{"nul", s256(v43[:42] + "\x00"), v43[:42] + "\x00", false},
		{"code without challenge (downgrade)", "", rfcVerifier, false},
		{"plain: challenge equal to verifier", rfcVerifier, rfcVerifier, false},
		{"malformed challenge", rfcChallenge[:42], rfcVerifier, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := VerifyPKCE(tt.challenge, tt.verifier)
			if (err == nil) != tt.ok {
				t.Fatalf("VerifyPKCE = %v, want ok %v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrPKCE) {
				t.Errorf("error %v does not wrap ErrPKCE", err)
			}
			checkNoSecret(t, err, tt.verifier)
			checkNoSecret(t, err, tt.challenge)
		})
	}
}
