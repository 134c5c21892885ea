package identity

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Errors CheckKey reports, besides *ExpiredKeyError. They never contain a key.
var (
	// ErrUnknownKey: no stored key has this id and hash (401 invalid_api_key).
	ErrUnknownKey = errors.New("invalid api key")
	// ErrRevokedKey: the key was revoked (401 revoked_api_key).
	ErrRevokedKey = errors.New("api key revoked")
	// ErrIPNotAllowed: the key may not be used from the client's address (403 ip_not_allowed).
	ErrIPNotAllowed = errors.New("this api key may not be used from this address")
)

// ExpiredKeyError reports a key past its expiry (401 expired_api_key): its own, or the end of
// the grace period after it was rotated.
type ExpiredKeyError struct {
	At time.Time
}

func (e *ExpiredKeyError) Error() string {
	return "api key expired at " + e.At.UTC().Format(time.RFC3339)
}

// CheckKey decides whether the stored key k accepts the presented key from clientIP at now.
// The checks come in this order, so that nothing about a key leaks to whoever does not hold it:
// the hash (ErrUnknownKey, compared in constant time), revocation (ErrRevokedKey), expiry
// (*ExpiredKeyError, which a rotated key reaches at the end of its grace period), and the
// address allowlist (ErrIPNotAllowed; an invalid clientIP passes only a key without one).
// Scopes, models and credit caps are checked later, by the route.
func CheckKey(k Key, presented ParsedKey, clientIP netip.Addr, now time.Time) error {
	if !HashMatches(k.Hash, presented.Hash) || k.ID != presented.ID || k.Prefix != presented.Prefix {
		return ErrUnknownKey
	}
	if k.RevokedAt != nil {
		return ErrRevokedKey
	}
	if k.ExpiresAt != nil && !now.Before(*k.ExpiresAt) {
		return &ExpiredKeyError{At: *k.ExpiresAt}
	}
	if len(k.AllowedIPs) > 0 && !IPAllowed(k.AllowedIPs, clientIP) {
		return ErrIPNotAllowed
	}
	return nil
}

// IPAllowed reports whether addr (an IPv4-mapped IPv6 address counts as its IPv4 address) is
// inside one of the CIDR prefixes (or equal to one of the addresses) of allowlist. Other entries
// never match, and an invalid addr matches nothing.
func IPAllowed(allowlist []string, addr netip.Addr) bool {
	if !addr.IsValid() {
		return false
	}
	addr = addr.Unmap().WithZone("")
	for _, s := range allowlist {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				continue
			}
			a = a.WithZone("")
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
		}
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// MaxAllowedIPs is the most entries a key's address allowlist holds.
const MaxAllowedIPs = 64

// NormalizeAllowlist checks a key's address allowlist and returns it in canonical form: each
// entry an IPv4 or IPv6 CIDR prefix or a single address (a /32 or /128), with the host bits
// cleared and IPv4-mapped IPv6 addresses written as IPv4. Zones are refused.
func NormalizeAllowlist(list []string) ([]string, error) {
	if len(list) > MaxAllowedIPs {
		return nil, fmt.Errorf("at most %d entries", MaxAllowedIPs)
	}
	out := make([]string, 0, len(list))
	for i, s := range list {
		if len(s) > 64 || strings.Contains(s, "%") {
			return nil, fmt.Errorf("entry %d is not an IP address or CIDR prefix", i)
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, fmt.Errorf("entry %d is not an IP address or CIDR prefix", i)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return nil, fmt.Errorf("entry %d: an IPv4-mapped prefix needs at least 96 bits", i)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked().String())
	}
	return out, nil
}

// ValidCapPeriod reports whether p is a credit cap period CapPeriodStart understands: "",
// "day", "month", or a Go duration of at least one minute.
func ValidCapPeriod(p string) bool {
	switch p {
	case "", "day", "month":
		return true
	}
	d, err := time.ParseDuration(p)
	return err == nil && d >= time.Minute
}

// CapPeriodStart is when the credit cap period holding now began: the zero time for "" (the
// key's whole life), UTC midnight for "day", the first of the month UTC for "month", and for a
// duration d the last multiple of d since the Unix epoch. An invalid period is treated as "".
func CapPeriodStart(period string, now time.Time) time.Time {
	now = now.UTC()
	switch period {
	case "":
		return time.Time{}
	case "day":
		return time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, time.UTC)
	case "month":
		return time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	}
	d, err := time.ParseDuration(period)
	if err != nil || d < time.Minute {
		return time.Time{}
	}
	return time.Unix(0, now.UnixNano()-now.UnixNano()%int64(d)).UTC()
}
