package identity

import (
	"errors"
	"net/netip"
	"strings"
)

// ErrInvalidClientIP: the client address is not an IP address.
var ErrInvalidClientIP = errors.New("invalid client ip")

// maxClientIPLen bounds what ParseClientIP reads: the longest IPv6 text (45 bytes) with room
// for brackets, a zone and a port.
const maxClientIPLen = 128

// AnonymousKey names the anonymous caller at ip, the account its free credits belong to. IPv4
// addresses, IPv4-mapped IPv6 ones included, are keyed exactly ("203.0.113.5"); other IPv6
// addresses by their /64, written as a prefix ("2001:db8:1:2::/64"), since one host usually
// holds a whole /64 and rotates through it. Zones are dropped. The zero Addr gives "", which
// names nobody: callers must not key credits by it.
func AnonymousKey(ip netip.Addr) string {
	if !ip.IsValid() {
		return ""
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is4() {
		return ip.String()
	}
	p, err := ip.Prefix(64)
	if err != nil {
		return ""
	}
	return p.String()
}

// ParseClientIP reads the client address as Caddy gives it in its client_ip variable: an IPv4
// or IPv6 address, possibly with a zone, possibly an IPv6 address in brackets ("[::1]"), or an
// address with a port ("203.0.113.5:443", "[::1]:443"), whose port is dropped. The result has
// no zone, and an IPv4-mapped IPv6 address comes back as IPv4 (netip.Addr.Unmap), so that keys
// and CIDR allowlists see one form. Anything else, an empty string included, is
// ErrInvalidClientIP.
func ParseClientIP(s string) (netip.Addr, error) {
	if s == "" || len(s) > maxClientIPLen {
		return netip.Addr{}, ErrInvalidClientIP
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
			ip, err = netip.ParseAddr(s[1 : len(s)-1])
			if err == nil && !ip.Is6() {
				return netip.Addr{}, ErrInvalidClientIP
			}
		} else {
			var ap netip.AddrPort
			ap, err = netip.ParseAddrPort(s)
			ip = ap.Addr()
		}
	}
	if err != nil {
		return netip.Addr{}, ErrInvalidClientIP
	}
	return ip.Unmap().WithZone(""), nil
}
