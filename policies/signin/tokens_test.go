package signin

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

func TestNewToken(t *testing.T) {
	seen := map[string]bool{}
	for _, prefix := range []string{PrefixSession, PrefixCode, PrefixRefresh, PrefixClientID, PrefixClientSecret} {
		for range 50 {
			tok := NewToken(prefix)
			rest, ok := strings.CutPrefix(tok, prefix+"_")
			if !ok {
				t.Fatalf("NewToken(%q) = %q: wrong prefix", prefix, tok)
			}
			raw, err := base64.RawURLEncoding.Strict().DecodeString(rest)
			if err != nil || len(raw) != 32 || len(rest) != 43 {
				t.Fatalf("NewToken(%q) = %q: not base64url of 32 bytes", prefix, tok)
			}
			if seen[tok] {
				t.Fatalf("NewToken(%q) repeated %q", prefix, tok)
			}
			seen[tok] = true
		}
	}
}

func TestHashToken(t *testing.T) {
	if got, want := HashToken("ses_abc"), sha256.Sum256([]byte("ses_abc")); got != want {
		t.Errorf("HashToken = %x, want %x", got, want)
	}
}

func TestSuccessor(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	other := bytes.Repeat([]byte{8}, 32)
	rt := NewToken(PrefixRefresh)
	s1, s2 := Successor(secret, rt), Successor(secret, rt)
	if s1 != s2 {
		t.Errorf("Successor not deterministic: %q, %q", s1, s2)
	}
	if !strings.HasPrefix(s1, "rt_") || len(s1) != 3+43 {
		t.Errorf("Successor = %q: want rt_ and 43 base64url characters", s1)
	}
	if s1 == rt {
		t.Error("Successor returned the token itself")
	}
	if Successor(other, rt) == s1 {
		t.Error("Successor does not depend on the secret")
	}
	if Successor(secret, rt+"x") == s1 {
		t.Error("Successor does not depend on the token")
	}
	if Successor(secret, s1) == s1 {
		t.Error("successor of the successor is the successor")
	}
	defer func() {
		if recover() == nil {
			t.Error("Successor with a short secret did not panic")
		}
	}()
	Successor(secret[:31], rt)
}

func TestCSRF(t *testing.T) {
	secret := bytes.Repeat([]byte{1}, 32)
	other := bytes.Repeat([]byte{2}, 32)
	good := CSRFToken(secret, "session-a")
	if len(good) != 43 {
		t.Fatalf("CSRFToken = %q, want 43 characters", good)
	}
	flipped := []byte(good)
	flipped[10] ^= 1
	tests := []struct {
		name    string
		secret  []byte
		binding string
		token   string
		want    bool
	}{
		{"good", secret, "session-a", good, true},
		{"other binding", secret, "session-b", good, false},
		{"other secret", other, "session-a", good, false},
		{"empty binding", secret, "", CSRFToken(secret, ""), false},
		{"empty token", secret, "session-a", "", false},
		{"short secret", secret[:16], "session-a", good, false},
		{"nil secret", nil, "session-a", good, false},
		{"one bit changed", secret, "session-a", string(flipped), false},
		{"truncated", secret, "session-a", good[:42], false},
		{"extended", secret, "session-a", good + "A", false},
		{"huge", secret, "session-a", strings.Repeat("A", 1<<20), false},
		{"padded", secret, "session-a", good + "=", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := CheckCSRF(tt.secret, tt.binding, tt.token); got != tt.want {
				t.Errorf("CheckCSRF = %v, want %v", got, tt.want)
			}
		})
	}
	if CSRFToken(secret, "") != "" || CSRFToken(nil, "x") != "" {
		t.Error("CSRFToken with an empty binding or no secret is not empty")
	}
}

func TestCovers(t *testing.T) {
	tests := []struct {
		name           string
		granted, asked []string
		want           bool
	}{
		{"nothing asked", nil, nil, true},
		{"nothing asked of something", []string{identity.ScopeChatWrite}, nil, true},
		{"exact", []string{identity.ScopeChatWrite, identity.ScopeModelsRead}, []string{identity.ScopeModelsRead}, true},
		{"all of them", []string{identity.ScopeChatWrite, identity.ScopeModelsRead}, []string{identity.ScopeModelsRead, identity.ScopeChatWrite}, true},
		{"one missing", []string{identity.ScopeChatWrite}, []string{identity.ScopeChatWrite, identity.ScopeKeysWrite}, false},
		{"star grants all", []string{identity.ScopeAll}, []string{identity.ScopeKeysWrite, identity.ScopeUsageRead}, true},
		{"star asked needs star", []string{identity.ScopeChatWrite}, []string{identity.ScopeAll}, false},
		{"star asked and granted", []string{identity.ScopeAll}, []string{identity.ScopeAll}, true},
		{"unknown never granted", []string{identity.ScopeAll}, []string{"admin"}, false},
		{"unknown granted literally", []string{"admin"}, []string{"admin"}, false},
		{"nothing granted", nil, []string{identity.ScopeChatWrite}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Covers(tt.granted, tt.asked); got != tt.want {
				t.Errorf("Covers(%q, %q) = %v, want %v", tt.granted, tt.asked, got, tt.want)
			}
		})
	}
}
