package identity

import (
	"errors"
	"slices"
)

// The scopes a credential can grant (API.md §7).
const (
	ScopeChatWrite       = "chat:write"
	ScopeEmbeddingsWrite = "embeddings:write"
	ScopeModelsRead      = "models:read"
	ScopeKeysRead        = "keys:read"
	ScopeKeysWrite       = "keys:write"
	ScopeCreditsRead     = "credits:read"
	ScopeUsageRead       = "usage:read"
	ScopeOfflineAccess   = "offline_access"
	// ScopeAll grants every scope.
	ScopeAll = "*"
)

// AllScopes lists every scope there is, in the order API.md names them, ScopeAll last. Changing
// it changes nothing: the known scopes are fixed.
var AllScopes = []string{
	ScopeChatWrite,
	ScopeEmbeddingsWrite,
	ScopeModelsRead,
	ScopeKeysRead,
	ScopeKeysWrite,
	ScopeCreditsRead,
	ScopeUsageRead,
	ScopeOfflineAccess,
	ScopeAll,
}

// ErrUnknownScope: a scope that is not one of AllScopes. It does not repeat the scope.
var ErrUnknownScope = errors.New("unknown scope")

// HasScope reports whether the granted scopes include want, ScopeAll granting every scope. An
// unknown want is never granted, so that a mistyped scope fails closed.
func HasScope(granted []string, want string) bool {
	if _, ok := knownScope(want); !ok {
		return false
	}
	for _, g := range granted {
		if g == want || g == ScopeAll {
			return true
		}
	}
	return false
}

// ParseScopes reads a list of scopes separated by spaces, commas or both (OAuth's scope
// parameter is space-separated). Duplicates are dropped, the first place kept; an empty list
// gives none and no error. Any unknown scope is ErrUnknownScope. The returned strings are the
// Scope constants, so they share no memory with s.
func ParseScopes(s string) ([]string, error) {
	var out []string
	for start := 0; start < len(s); {
		if s[start] == ' ' || s[start] == ',' {
			start++
			continue
		}
		end := start
		for end < len(s) && s[end] != ' ' && s[end] != ',' {
			end++
		}
		scope, ok := knownScope(s[start:end])
		if !ok {
			return nil, ErrUnknownScope
		}
		if !slices.Contains(out, scope) {
			out = append(out, scope)
		}
		start = end
	}
	return out, nil
}

// ValidateScopes returns ErrUnknownScope when any of scopes is not a known scope.
func ValidateScopes(scopes []string) error {
	for _, s := range scopes {
		if _, ok := knownScope(s); !ok {
			return ErrUnknownScope
		}
	}
	return nil
}

// knownScope returns the constant equal to s, if there is one.
func knownScope(s string) (string, bool) {
	switch s {
	case ScopeChatWrite:
		return ScopeChatWrite, true
	case ScopeEmbeddingsWrite:
		return ScopeEmbeddingsWrite, true
	case ScopeModelsRead:
		return ScopeModelsRead, true
	case ScopeKeysRead:
		return ScopeKeysRead, true
	case ScopeKeysWrite:
		return ScopeKeysWrite, true
	case ScopeCreditsRead:
		return ScopeCreditsRead, true
	case ScopeUsageRead:
		return ScopeUsageRead, true
	case ScopeOfflineAccess:
		return ScopeOfflineAccess, true
	case ScopeAll:
		return ScopeAll, true
	}
	return "", false
}
