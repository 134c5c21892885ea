package identity

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash/crc32"
	"strings"
)

// An API key reads <prefix>_<id>_<secret>:
//
//   - prefix names the kind of key (e.g. "sk_live"): a lowercase letter, then lowercase letters
//     and digits, optionally in groups joined by single underscores; at most MaxPrefixLen bytes;
//   - id is 12 random base62 characters, the key's Key.ID in the store;
//   - secret is 43 random base62 characters (256 bits) followed by a 6-character checksum: the
//     CRC-32 (IEEE) of "<prefix>_<id>_<the 43 characters>", in base62, zero-padded.
//
// Base62 digits are 0-9, A-Z, a-z in that order. The checksum lets a mistyped or made-up key be
// refused without asking the store.
const (
	// MaxPrefixLen is the longest key prefix, in bytes.
	MaxPrefixLen = 32

	keyIDLen       = 12
	keyRandomLen   = 43
	keyChecksumLen = 6
	keySecretLen   = keyRandomLen + keyChecksumLen
	minKeyLen      = 1 + 1 + keyIDLen + 1 + keySecretLen
	maxKeyLen      = MaxPrefixLen + 1 + keyIDLen + 1 + keySecretLen
)

const base62Digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// Errors about API keys. They never contain a key.
var (
	// ErrMalformedKey: not an API key of this gateway (length, characters, prefix or checksum).
	ErrMalformedKey = errors.New("malformed api key")
	// ErrInvalidPrefix: a prefix for NewKey that ValidPrefix refuses.
	ErrInvalidPrefix = errors.New("invalid api key prefix")
)

// NewAPIKey is a key just made. Full is shown to its owner once and never stored; the store keeps
// ID, Prefix and Hash.
type NewAPIKey struct {
	// Full is the whole key, the secret.
	Full   string
	ID     string
	Prefix string
	// Hash is the SHA-256 of Full.
	Hash [32]byte
}

// String describes the key without its secret, so that it is safe to print.
func (k NewAPIKey) String() string { return k.Prefix + "_" + k.ID + "_..." }

// ParsedKey is a well-formed key as presented by a client. Look it up by ID and accept it only
// when HashMatches(stored.Hash, Hash).
type ParsedKey struct {
	Prefix string
	ID     string
	// Hash is the SHA-256 of the whole key as presented.
	Hash [32]byte
}

// ValidPrefix reports whether p can be a key prefix: it matches [a-z][a-z0-9]*(_[a-z0-9]+)* and
// is at most MaxPrefixLen bytes long.
func ValidPrefix(p string) bool {
	if p == "" || len(p) > MaxPrefixLen || p[0] < 'a' || p[0] > 'z' {
		return false
	}
	afterUnderscore := false
	for i := 1; i < len(p); i++ {
		switch c := p[i]; {
		case c == '_':
			if afterUnderscore {
				return false
			}
			afterUnderscore = true
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
			afterUnderscore = false
		default:
			return false
		}
	}
	return !afterUnderscore
}

// NewKey makes a key with the given prefix from crypto/rand. It fails with ErrInvalidPrefix when
// ValidPrefix(prefix) is false.
func NewKey(prefix string) (NewAPIKey, error) {
	if !ValidPrefix(prefix) {
		return NewAPIKey{}, ErrInvalidPrefix
	}
	id, err := randomBase62(keyIDLen)
	if err != nil {
		return NewAPIKey{}, err
	}
	secret, err := randomBase62(keyRandomLen)
	if err != nil {
		return NewAPIKey{}, err
	}
	body := prefix + "_" + id + "_" + secret
	sum := keyChecksum(body)
	full := body + string(sum[:])
	return NewAPIKey{Full: full, ID: id, Prefix: prefix, Hash: sha256.Sum256([]byte(full))}, nil
}

// ParseKey checks that s is a well-formed API key, checksum included, and returns its parts and
// hash. Anything else is ErrMalformedKey, decided before any store lookup; the error never
// contains s.
func ParseKey(s string) (ParsedKey, error) {
	prefix, id, _, err := splitKey(s)
	if err != nil {
		return ParsedKey{}, err
	}
	return ParsedKey{Prefix: prefix, ID: id, Hash: sha256.Sum256([]byte(s))}, nil
}

// HashMatches reports whether a stored key hash equals the hash of a presented key, in constant
// time.
func HashMatches(stored, presented [32]byte) bool {
	return subtle.ConstantTimeCompare(stored[:], presented[:]) == 1
}

// splitKey checks s and splits it from the right: the secret is the last "_" segment, the id the
// one before, the prefix the rest.
func splitKey(s string) (prefix, id, secret string, err error) {
	if len(s) < minKeyLen || len(s) > maxKeyLen {
		return "", "", "", malformedKey("wrong length")
	}
	i := strings.LastIndexByte(s, '_')
	if i < 0 {
		return "", "", "", malformedKey("missing separator")
	}
	j := strings.LastIndexByte(s[:i], '_')
	if j < 0 {
		return "", "", "", malformedKey("missing separator")
	}
	prefix, id, secret = s[:j], s[j+1:i], s[i+1:]
	switch {
	case len(secret) != keySecretLen || !isBase62(secret):
		return "", "", "", malformedKey("malformed secret")
	case len(id) != keyIDLen || !isBase62(id):
		return "", "", "", malformedKey("malformed id")
	case !ValidPrefix(prefix):
		return "", "", "", malformedKey("malformed prefix")
	}
	sum := keyChecksum(s[:len(s)-keyChecksumLen])
	if subtle.ConstantTimeCompare(sum[:], []byte(s[len(s)-keyChecksumLen:])) != 1 {
		return "", "", "", malformedKey("bad checksum")
	}
	return prefix, id, secret, nil
}

func malformedKey(reason string) error {
	return fmt.Errorf("%w: %s", ErrMalformedKey, reason)
}

// keyChecksum is the CRC-32 (IEEE) of body in base62, zero-padded to six digits (62^6 > 2^32).
func keyChecksum(body string) [keyChecksumLen]byte {
	v := crc32.ChecksumIEEE([]byte(body))
	var out [keyChecksumLen]byte
	for i := len(out) - 1; i >= 0; i-- {
		out[i] = base62Digits[v%62]
		v /= 62
	}
	return out
}

// randomBase62 returns n uniformly random base62 digits from crypto/rand.
func randomBase62(n int) (string, error) {
	out := make([]byte, 0, n)
	var buf [64]byte
	for len(out) < n {
		if _, err := rand.Read(buf[:]); err != nil {
			return "", err
		}
		for _, b := range buf {
			// 248 = 4*62: dropping the bytes above keeps every digit equally likely.
			if b < 248 && len(out) < n {
				out = append(out, base62Digits[b%62])
			}
		}
	}
	return string(out), nil
}

func isBase62(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z') {
			return false
		}
	}
	return true
}
