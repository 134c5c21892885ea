package identity

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestHasScope(t *testing.T) {
	for _, tc := range []struct {
		name    string
		granted []string
		want    string
		ok      bool
	}{
		{"granted", []string{ScopeChatWrite, ScopeModelsRead}, ScopeModelsRead, true},
		{"not granted", []string{ScopeChatWrite}, ScopeEmbeddingsWrite, false},
		{"chat key on keys route", []string{ScopeChatWrite}, ScopeKeysWrite, false},
		{"all grants any", []string{ScopeAll}, ScopeKeysWrite, true},
		{"all grants all", []string{ScopeAll}, ScopeAll, true},
		{"all is not granted by a list", AllScopes[:len(AllScopes)-1], ScopeAll, false},
		{"write does not grant read", []string{ScopeKeysWrite}, ScopeKeysRead, false},
		{"none granted", nil, ScopeChatWrite, false},
		{"unknown want, even with all", []string{ScopeAll}, "chat:wrte", false},
		{"empty want", []string{ScopeAll}, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := HasScope(tc.granted, tc.want); got != tc.ok {
				t.Errorf("HasScope(%q, %q) = %v, want %v", tc.granted, tc.want, got, tc.ok)
			}
		})
	}
}

func TestParseScopes(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want []string
	}{
		{"empty", "", nil},
		{"only separators", " , ,", nil},
		{"one", "chat:write", []string{ScopeChatWrite}},
		{"space separated", "chat:write models:read", []string{ScopeChatWrite, ScopeModelsRead}},
		{"comma separated", "models:read,chat:write", []string{ScopeModelsRead, ScopeChatWrite}},
		{"mixed separators", " keys:read, keys:write ,,usage:read ", []string{ScopeKeysRead, ScopeKeysWrite, ScopeUsageRead}},
		{"duplicates dropped, order kept", "usage:read chat:write usage:read chat:write", []string{ScopeUsageRead, ScopeChatWrite}},
		{"all", "*", []string{ScopeAll}},
		{"every scope", strings.Join(AllScopes, " "), AllScopes},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseScopes(tc.in)
			if err != nil {
				t.Fatalf("ParseScopes(%q): %v", tc.in, err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("ParseScopes(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
	for _, tc := range []struct{ name, in string }{
		{"unknown", "chat:write admin"},
		{"case differs", "Chat:Write"},
		{"tab separated", "chat:write\tmodels:read"},
		{"keys wildcard is not a scope", "keys:*"},
		{"semicolon", "chat:write;models:read"},
		{"UTF-8", "chat:write é"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := ParseScopes(tc.in); !errors.Is(err, ErrUnknownScope) || got != nil {
				t.Errorf("ParseScopes(%q) = %q, %v; want ErrUnknownScope", tc.in, got, err)
			}
		})
	}
}

func TestValidateScopes(t *testing.T) {
	if err := ValidateScopes(nil); err != nil {
		t.Errorf("ValidateScopes(nil) = %v", err)
	}
	if err := ValidateScopes(AllScopes); err != nil {
		t.Errorf("ValidateScopes(AllScopes) = %v", err)
	}
	for _, bad := range [][]string{{""}, {"chat:write", "chat"}, {"chat:write models:read"}} {
		if err := ValidateScopes(bad); !errors.Is(err, ErrUnknownScope) {
			t.Errorf("ValidateScopes(%q) = %v, want ErrUnknownScope", bad, err)
		}
	}
}

func TestAllScopesMatchAPI(t *testing.T) {
	// API.md §7, in its order.
	want := []string{"chat:write", "embeddings:write", "models:read", "keys:read", "keys:write",
		"credits:read", "usage:read", "offline_access", "*"}
	if !slices.Equal(AllScopes, want) {
		t.Errorf("AllScopes = %q, want %q", AllScopes, want)
	}
}

func FuzzScopeParse(f *testing.F) {
	for _, s := range []string{"", "chat:write", "chat:write,models:read", " * , keys:read ", "chat:write chat:write", "admin", "chat:write\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseScopes(s)
		if err != nil {
			if !errors.Is(err, ErrUnknownScope) || got != nil {
				t.Fatalf("ParseScopes(%q) = %q, %v", s, got, err)
			}
			if err.Error() != ErrUnknownScope.Error() {
				t.Fatalf("error %q says more than ErrUnknownScope", err)
			}
			return
		}
		if err := ValidateScopes(got); err != nil {
			t.Fatalf("ParseScopes(%q) = %q, which ValidateScopes refuses", s, got)
		}
		if len(got) > len(AllScopes) {
			t.Fatalf("ParseScopes(%q) = %q: duplicates", s, got)
		}
		tokens := strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' })
		for i, g := range got {
			if slices.Contains(got[:i], g) {
				t.Fatalf("ParseScopes(%q) = %q: duplicate %q", s, got, g)
			}
			if !slices.Contains(tokens, g) {
				t.Fatalf("ParseScopes(%q) = %q: %q not in the input", s, got, g)
			}
			if !HasScope(got, g) {
				t.Fatalf("HasScope(%q, %q) = false", got, g)
			}
		}
		var firsts []string
		for _, tok := range tokens {
			if !slices.Contains(firsts, tok) {
				firsts = append(firsts, tok)
			}
		}
		if !slices.Equal(got, firsts) {
			t.Fatalf("ParseScopes(%q) = %q, want the first occurrences %q", s, got, firsts)
		}
		again, err := ParseScopes(strings.Join(got, " "))
		if err != nil || !slices.Equal(again, got) {
			t.Fatalf("re-parsing %q gave %q, %v", got, again, err)
		}
	})
}
