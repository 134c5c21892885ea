package signin

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"strings"
)

// MaxRedirectLen is the longest return URL or redirect URI accepted, in bytes.
const MaxRedirectLen = 2048

// ErrRedirect is wrapped by every error of ReturnPolicy.Check, ReturnPolicy.Validate and
// ValidRedirectURI; the text after it says why, never repeating the URL. A request whose
// redirect is refused must be answered with an error page, never with a redirect (RFC 6749
// §4.1.2.1).
var ErrRedirect = errors.New("redirect refused")

// Why a URL is refused.
const (
	reasonEmpty       = "empty"
	reasonLong        = "too long"
	reasonByte        = "character not allowed"
	reasonFragment    = "has a fragment"
	reasonPercent     = "malformed percent-encoding"
	reasonNotAbsolute = "not an absolute http or https url"
	reasonUserinfo    = "has userinfo"
	reasonHost        = "malformed host"
	reasonPort        = "malformed port"
	reasonDefaultPort = "default port spelled out"
	reasonPathByte    = "encoded slash, backslash, percent or control byte in path"
	reasonDotSegment  = "dot segment in path"
	reasonCanonical   = "not in canonical form"
	reasonOrigin      = "origin not allowed"
	reasonScheme      = "must be https, or http on a loopback host"
	reasonNotOrigin   = "not an origin (scheme://host[:port])"
)

func redirectError(reason string) error {
	return fmt.Errorf("%w: %s", ErrRedirect, reason)
}

// ReturnPolicy says which browser app origins may receive a token in the fragment of a return
// URL (the Peerwave flow, API.md §7: GET /auth/authorize?redirect=URL answers
// 302 URL#token=<JWT>).
type ReturnPolicy struct {
	// Origins lists the allowed origins, each "scheme://host" or "scheme://host:port" with no
	// path (e.g. "https://app.example.com"); scheme and host compare case-insensitively, the
	// rest exactly. Empty: any https origin, and http on a loopback host ("localhost",
	// "127.0.0.1" or "[::1]") on any port.
	Origins []string
}

// Validate checks that every listed origin is one: "scheme://host[:port]" with scheme http or
// https, a host and port that Check would accept, and nothing else.
func (p ReturnPolicy) Validate() error {
	for _, o := range p.Origins {
		u, err := parseCanonical(asciiLower(o))
		if err != nil {
			return err
		}
		if u.Path != "" || u.RawQuery != "" || u.ForceQuery {
			return redirectError(reasonNotOrigin)
		}
	}
	return nil
}

// Check reads the return URL raw of a fragment flow request and returns it parsed and its
// origin, "scheme://host[:port]", to which consent is given. The URL must be in the canonical
// form a browser app would send, so that what is checked is what the browser will load:
//
//   - at most MaxRedirectLen bytes of printable ASCII, without space, backslash, '"', '<',
//     '>', '^', '`', '{', '|' or '}', every '%' starting a two-digit hex escape;
//   - absolute, "http://" or "https://" followed by a host: no scheme-relative "//host", no
//     opaque "https:host", no javascript:, data: or other scheme, no userinfo ("user@");
//   - a host of lower-case letters, digits, dots and hyphens in labels of at most 63 bytes
//     (punycode for international names; no percent-encoding, no trailing dot, no numeric forms
//     such as "127.1" or "0x7f.1" but a dotted-quad IPv4 address), or an IPv6 address in
//     brackets in its canonical form;
//   - no port, or a decimal port from 1 to 65535 that is not the scheme's default: ":443" on
//     https and ":80" on http are refused rather than normalised, so that each origin has one
//     spelling;
//   - a path without "." or ".." segments, spelled plainly or percent-encoded ("%2e%2e"), alone
//     or before a ';' ("..;"), and without encoded '/', '\', '%' or control bytes;
//   - no fragment ('#'): the token is put there;
//   - net/url re-serialises it to exactly raw.
//
// The origin must then be allowed by p. A nil error comes with a non-nil URL.
func (p ReturnPolicy) Check(raw string) (*url.URL, string, error) {
	u, err := parseCanonical(raw)
	if err != nil {
		return nil, "", err
	}
	origin := u.Scheme + "://" + u.Host
	if !p.allows(u, origin) {
		return nil, "", redirectError(reasonOrigin)
	}
	return u, origin, nil
}

// allows reports whether the origin of u (a URL parseCanonical accepted) is allowed.
func (p ReturnPolicy) allows(u *url.URL, origin string) bool {
	if len(p.Origins) == 0 {
		return u.Scheme == "https" || isLoopbackHost(u.Hostname())
	}
	for _, o := range p.Origins {
		if equalOrigin(o, origin) {
			return true
		}
	}
	return false
}

// MatchRedirectURI reports whether got, the redirect_uri of an OAuth request, equals one of the
// registered redirect URIs byte for byte (RFC 9700 §4.1.3): no prefix, case, trailing slash,
// port or any other normalisation. An empty got never matches.
func MatchRedirectURI(registered []string, got string) bool {
	if got == "" {
		return false
	}
	match := false
	for _, r := range registered {
		if r == got {
			match = true
		}
	}
	return match
}

// ValidRedirectURI checks a redirect URI an operator registers for an app: an absolute https
// URI, or http on a loopback host ("localhost", "127.0.0.1", "[::1]"; each port to be used
// registered, as matching is exact), in the canonical form ReturnPolicy.Check demands (no
// userinfo, no fragment, no dot segments, re-serialised unchanged by net/url). A query is
// allowed.
func ValidRedirectURI(s string) error {
	u, err := parseCanonical(s)
	if err != nil {
		return err
	}
	if u.Scheme != "https" && !isLoopbackHost(u.Hostname()) {
		return redirectError(reasonScheme)
	}
	return nil
}

// parseCanonical parses raw as described at ReturnPolicy.Check, the origin aside.
func parseCanonical(raw string) (*url.URL, error) {
	switch {
	case raw == "":
		return nil, redirectError(reasonEmpty)
	case len(raw) > MaxRedirectLen:
		return nil, redirectError(reasonLong)
	}
	for i := 0; i < len(raw); i++ {
		switch c := raw[i]; {
		case c == '#':
			return nil, redirectError(reasonFragment)
		case c == '%':
			if i+2 >= len(raw) || !isHex(raw[i+1]) || !isHex(raw[i+2]) {
				return nil, redirectError(reasonPercent)
			}
		case !isURLByte(c):
			return nil, redirectError(reasonByte)
		}
	}

	// The scheme and "//" are checked on raw itself: this refuses "//evil", "https:evil",
	// "https:/evil" and every other scheme before net/url gets to interpret them.
	var rest string
	switch {
	case strings.HasPrefix(raw, "https://"):
		rest = raw[len("https://"):]
	case strings.HasPrefix(raw, "http://"):
		rest = raw[len("http://"):]
	default:
		return nil, redirectError(reasonNotAbsolute)
	}
	authority := rest
	if i := strings.IndexAny(rest, "/?"); i >= 0 {
		authority = rest[:i]
	}
	if strings.IndexByte(authority, '@') >= 0 {
		return nil, redirectError(reasonUserinfo)
	}

	u, err := url.Parse(raw)
	if err != nil {
		return nil, redirectError(reasonNotAbsolute)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https", u.Opaque != "", u.Host == "":
		return nil, redirectError(reasonNotAbsolute)
	case u.User != nil:
		return nil, redirectError(reasonUserinfo)
	case u.Fragment != "" || u.RawFragment != "":
		return nil, redirectError(reasonFragment)
	case u.Host != authority:
		return nil, redirectError(reasonCanonical)
	}
	if err := checkHostPort(u.Scheme, authority); err != nil {
		return nil, err
	}
	if err := checkPath(u.EscapedPath()); err != nil {
		return nil, err
	}
	if u.String() != raw {
		return nil, redirectError(reasonCanonical)
	}
	return u, nil
}

// checkHostPort checks the authority hostport (no userinfo) of a URL of scheme.
func checkHostPort(scheme, hostport string) error {
	host, port := hostport, ""
	if strings.HasPrefix(hostport, "[") {
		end := strings.IndexByte(hostport, ']')
		if end < 0 {
			return redirectError(reasonHost)
		}
		host, port = hostport[1:end], hostport[end+1:]
		if port != "" {
			if port[0] != ':' {
				return redirectError(reasonHost)
			}
			if err := checkPort(scheme, port[1:]); err != nil {
				return err
			}
		}
		addr, err := netip.ParseAddr(host)
		if err != nil || !addr.Is6() || addr.Zone() != "" || addr.String() != host {
			return redirectError(reasonHost)
		}
		return nil
	}
	if i := strings.IndexByte(hostport, ':'); i >= 0 {
		host, port = hostport[:i], hostport[i+1:]
		if err := checkPort(scheme, port); err != nil {
			return err
		}
	}
	if !validHostName(host) {
		return redirectError(reasonHost)
	}
	return nil
}

// checkPort checks a port spelled after a colon: 1 to 65535 in decimal without leading zeros,
// and not the scheme's default.
func checkPort(scheme, port string) error {
	if port == "" || len(port) > 5 || port[0] == '0' {
		return redirectError(reasonPort)
	}
	n := 0
	for i := 0; i < len(port); i++ {
		if port[i] < '0' || port[i] > '9' {
			return redirectError(reasonPort)
		}
		n = n*10 + int(port[i]-'0')
	}
	switch {
	case n > 65535:
		return redirectError(reasonPort)
	case scheme == "https" && n == 443, scheme == "http" && n == 80:
		return redirectError(reasonDefaultPort)
	}
	return nil
}

// validHostName reports whether h is a lower-case DNS name in ASCII or a dotted-quad IPv4
// address. A name whose last label is numeric (decimal, or hex starting "0x") is read as an
// IPv4 address by browsers (WHATWG URL), so it must then be one in canonical form.
func validHostName(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	last := ""
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false // also a leading, trailing or doubled dot
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
		last = label
	}
	if strings.HasPrefix(last, "0x") || isDigits(last) {
		addr, err := netip.ParseAddr(h)
		return err == nil && addr.Is4() && addr.String() == h
	}
	return true
}

// checkPath refuses dot segments and encoded bytes that servers disagree about in the escaped
// path p.
func checkPath(p string) error {
	for seg := range strings.SplitSeq(p, "/") {
		var dec [3]byte // enough to tell ".", ".." and longer apart
		n := 0
		for i := 0; i < len(seg); i++ {
			c := seg[i]
			if c == '%' {
				c = unhex(seg[i+1])<<4 | unhex(seg[i+2])
				i += 2
				if c == '/' || c == '\\' || c == '%' || c < 0x20 || c == 0x7f {
					return redirectError(reasonPathByte)
				}
			}
			if c == ';' {
				break // "..;x" is ".." to servlet containers
			}
			if n < len(dec) {
				dec[n] = c
			}
			n++
		}
		if n == 1 && dec[0] == '.' || n == 2 && dec[0] == '.' && dec[1] == '.' {
			return redirectError(reasonDotSegment)
		}
	}
	return nil
}

// isLoopbackHost reports whether h (a URL's Hostname) is one of the loopback hosts on which
// plain http is allowed.
func isLoopbackHost(h string) bool {
	return h == "localhost" || h == "127.0.0.1" || h == "::1"
}

// equalOrigin compares a listed origin with a checked one: scheme and host case-insensitively
// (ASCII only), the port exactly. The checked origin is lower-case already, so folding the
// listed one's ASCII letters is all there is to it.
func equalOrigin(listed, origin string) bool {
	if len(listed) != len(origin) {
		return false
	}
	for i := 0; i < len(listed); i++ {
		c := listed[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != origin[i] {
			return false
		}
	}
	return true
}

// isURLByte reports whether c may appear in a URL as RFC 3986 spells one: unreserved,
// reserved and '%' ('#' is handled apart).
func isURLByte(c byte) bool {
	switch {
	case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("-._~:/?[]@!$&'()*+,;=%", c) >= 0
}

// asciiLower lower-cases the ASCII letters of s, and only those.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
