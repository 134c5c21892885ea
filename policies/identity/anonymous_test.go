package identity

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestAnonymousKey(t *testing.T) {
	for _, tc := range []struct{ name, ip, want string }{
		{"ipv4", "203.0.113.5", "203.0.113.5"},
		{"ipv4 loopback", "127.0.0.1", "127.0.0.1"},
		{"ipv4 behind cgnat stays exact", "100.64.1.2", "100.64.1.2"},
		{"ipv4-mapped ipv6", "::ffff:10.0.0.5", "10.0.0.5"},
		{"ipv4-mapped ipv6 in hex", "::ffff:a00:5", "10.0.0.5"},
		{"ipv6 by /64", "2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"},
		{"ipv6 already at the prefix", "2001:db8:1:2::", "2001:db8:1:2::/64"},
		{"ipv6 zone dropped", "fe80::1%eth0", "fe80::/64"},
		{"ipv6 loopback", "::1", "::/64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := AnonymousKey(netip.MustParseAddr(tc.ip)); got != tc.want {
				t.Errorf("AnonymousKey(%s) = %q, want %q", tc.ip, got, tc.want)
			}
		})
	}
	if got := AnonymousKey(netip.Addr{}); got != "" {
		t.Errorf("AnonymousKey(zero) = %q, want empty", got)
	}
}

func TestAnonymousKeySameSlash64(t *testing.T) {
	a := AnonymousKey(netip.MustParseAddr("2001:db8:1:2::1"))
	b := AnonymousKey(netip.MustParseAddr("2001:db8:1:2:ffff:ffff:ffff:fffe"))
	c := AnonymousKey(netip.MustParseAddr("2001:db8:1:3::1"))
	if a != b {
		t.Errorf("same /64 gave %q and %q", a, b)
	}
	if a == c {
		t.Errorf("different /64s share the key %q", a)
	}
}

func TestParseClientIP(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"ipv4", "203.0.113.5", "203.0.113.5"},
		{"ipv4 with port", "203.0.113.5:443", "203.0.113.5"},
		{"ipv6", "2001:db8::1", "2001:db8::1"},
		{"ipv6 in brackets", "[::1]", "::1"},
		{"ipv6 with port", "[2001:db8::1]:8080", "2001:db8::1"},
		{"ipv6 zone dropped", "fe80::1%eth0", "fe80::1"},
		{"ipv6 zone in brackets with port", "[fe80::1%eth0]:80", "fe80::1"},
		{"ipv4-mapped unmapped", "::ffff:10.0.0.5", "10.0.0.5"},
		{"ipv4-mapped in brackets", "[::ffff:10.0.0.5]", "10.0.0.5"},
		{"unbracketed ipv6 is never host:port", "::1:80", "::1:80"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseClientIP(tc.in)
			if err != nil {
				t.Fatalf("ParseClientIP(%q): %v", tc.in, err)
			}
			if got != netip.MustParseAddr(tc.want) {
				t.Errorf("ParseClientIP(%q) = %v, want %s", tc.in, got, tc.want)
			}
		})
	}

	for _, tc := range []struct{ name, in string }{
		{"empty", ""},
		{"unix socket", "@"},
		{"hostname", "localhost"},
		{"leading space", " 1.2.3.4"},
		{"trailing newline", "1.2.3.4\n"},
		{"ipv4 leading zero", "01.2.3.4"},
		{"ipv4 in brackets", "[1.2.3.4]"},
		{"ipv4 in brackets with port", "[1.2.3.4]:80"},
		{"empty port", "1.2.3.4:"},
		{"port too large", "1.2.3.4:65536"},
		{"port not a number", "1.2.3.4:http"},
		{"two addresses", "1.2.3.4, 5.6.7.8"},
		{"cidr", "10.0.0.0/8"},
		{"double brackets", "[[::1]]"},
		{"unclosed bracket", "[::1"},
		{"too long", "[::1%" + strings.Repeat("z", 200) + "]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if ip, err := ParseClientIP(tc.in); !errors.Is(err, ErrInvalidClientIP) || ip.IsValid() {
				t.Errorf("ParseClientIP(%q) = %v, %v; want ErrInvalidClientIP", tc.in, ip, err)
			}
		})
	}
}

func FuzzClientIP(f *testing.F) {
	for _, s := range []string{
		"203.0.113.5", "::ffff:10.0.0.5", "2001:db8:1:2::1", "[::1]:443", "fe80::1%eth0",
		"[fe80::1%25en0]:80", "1.2.3.4:80", "", "[1.2.3.4]", "::",
	} {
		f.Add(s, uint64(0x0123456789abcdef))
	}
	f.Fuzz(func(t *testing.T, s string, low uint64) {
		ip, err := ParseClientIP(s)
		if err != nil {
			if ip.IsValid() {
				t.Fatalf("address %v returned with the error", ip)
			}
			return
		}
		if ip.Zone() != "" || ip.Is4In6() {
			t.Fatalf("ParseClientIP(%q) = %v: zone or mapped form kept", s, ip)
		}
		key := AnonymousKey(ip)
		if ip.Is4() {
			if key != ip.String() {
				t.Fatalf("IPv4 %v keyed %q", ip, key)
			}
			return
		}
		// Rotating the interface identifier must not give a new identity. Replacing the low
		// bits of an address in ::/64 may make an IPv4-mapped address, which is keyed as IPv4.
		b := ip.As16()
		binary.BigEndian.PutUint64(b[8:], low)
		rotated := netip.AddrFrom16(b)
		if rotated.Is4In6() {
			return
		}
		if got := AnonymousKey(rotated); got != key {
			t.Fatalf("AnonymousKey(%v) = %q, AnonymousKey(%v) = %q", ip, key, rotated, got)
		}
		if p, err := netip.ParsePrefix(key); err != nil || p.Bits() != 64 || !p.Contains(ip) {
			t.Fatalf("key %q is not the /64 of %v", key, ip)
		}
	})
}
