package identity

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"
)

// TestCheckKey: every answer of CheckKey, with an injected clock for expiry and grace ends.
func TestCheckKey(t *testing.T) {
	nk := mustNewKey(t, "sk_test")
	other := mustNewKey(t, "sk_test")
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	expires := created.Add(24 * time.Hour)
	graceEnd := created.Add(2 * time.Hour)
	revoked := created.Add(time.Hour)
	base := Key{ID: nk.ID, Prefix: nk.Prefix, Hash: nk.Hash, UserID: "u", CreatedAt: created}
	presented, err := ParseKey(nk.Full)
	if err != nil {
		t.Fatal(err)
	}
	otherPresented, _ := ParseKey(other.Full)
	// The same id with the secret of another key: a forgery of a known id.
	forged := presented
	forged.Hash = other.Hash

	loop4 := netip.MustParseAddr("127.0.0.1")
	mapped := netip.MustParseAddr("::ffff:127.0.0.1")
	ten := netip.MustParseAddr("10.1.2.3")
	v6 := netip.MustParseAddr("2001:db8::5")
	with := func(f func(*Key)) Key {
		k := base
		f(&k)
		return k
	}
	expiring := with(func(k *Key) { k.ExpiresAt = &expires })
	rotated := with(func(k *Key) { k.RotatedTo, k.DeprecatedAt, k.ExpiresAt = "next", &created, &graceEnd })

	tests := []struct {
		name      string
		key       Key
		presented ParsedKey
		ip        netip.Addr
		now       time.Time
		want      error
		expiredAt time.Time
	}{
		{"valid", base, presented, loop4, created, nil, time.Time{}},
		{"wrong secret for the id", base, forged, loop4, created, ErrUnknownKey, time.Time{}},
		{"another key", base, otherPresented, loop4, created, ErrUnknownKey, time.Time{}},
		{"revoked", with(func(k *Key) { k.RevokedAt = &revoked }), presented, loop4, created, ErrRevokedKey, time.Time{}},
		{"revoked beats expired", with(func(k *Key) { k.RevokedAt, k.ExpiresAt = &revoked, &expires }), presented, loop4,
			expires.Add(time.Hour), ErrRevokedKey, time.Time{}},
		{"expiry - 1s", expiring, presented, loop4, expires.Add(-time.Second), nil, time.Time{}},
		{"expiry - 1ns", expiring, presented, loop4, expires.Add(-1), nil, time.Time{}},
		{"at expiry", expiring, presented, loop4, expires, &ExpiredKeyError{}, expires},
		{"expiry + 1s", expiring, presented, loop4, expires.Add(time.Second), &ExpiredKeyError{}, expires},
		{"rotated, in grace", rotated, presented, loop4, graceEnd.Add(-time.Second), nil, time.Time{}},
		{"rotated, grace over", rotated, presented, loop4, graceEnd, &ExpiredKeyError{}, graceEnd},
		{"allowlist v4 in", with(func(k *Key) { k.AllowedIPs = []string{"127.0.0.0/8"} }), presented, loop4, created, nil, time.Time{}},
		{"allowlist mapped v4 in", with(func(k *Key) { k.AllowedIPs = []string{"127.0.0.0/8"} }), presented, mapped, created, nil, time.Time{}},
		{"allowlist v4 out", with(func(k *Key) { k.AllowedIPs = []string{"10.0.0.0/8"} }), presented, loop4, created, ErrIPNotAllowed, time.Time{}},
		{"allowlist v4 in, second entry", with(func(k *Key) { k.AllowedIPs = []string{"192.0.2.0/24", "10.0.0.0/8"} }), presented, ten, created, nil, time.Time{}},
		{"allowlist v6 in", with(func(k *Key) { k.AllowedIPs = []string{"2001:db8::/32"} }), presented, v6, created, nil, time.Time{}},
		{"allowlist v6 out", with(func(k *Key) { k.AllowedIPs = []string{"2001:db9::/32"} }), presented, v6, created, ErrIPNotAllowed, time.Time{}},
		{"allowlist v4 does not match v6", with(func(k *Key) { k.AllowedIPs = []string{"0.0.0.0/0"} }), presented, v6, created, ErrIPNotAllowed, time.Time{}},
		{"allowlist, unknown client address", with(func(k *Key) { k.AllowedIPs = []string{"0.0.0.0/0"} }), presented, netip.Addr{}, created, ErrIPNotAllowed, time.Time{}},
		{"no allowlist, unknown client address", base, presented, netip.Addr{}, created, nil, time.Time{}},
		{"expired beats the allowlist", with(func(k *Key) { k.AllowedIPs, k.ExpiresAt = []string{"10.0.0.0/8"}, &expires }), presented, loop4,
			expires, &ExpiredKeyError{}, expires},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckKey(tc.key, tc.presented, tc.ip, tc.now)
			var ek *ExpiredKeyError
			switch want := tc.want.(type) {
			case nil:
				if err != nil {
					t.Fatalf("CheckKey = %v, want nil", err)
				}
			case *ExpiredKeyError:
				if !errors.As(err, &ek) || !ek.At.Equal(tc.expiredAt) {
					t.Fatalf("CheckKey = %v, want expired at %s", err, tc.expiredAt)
				}
			default:
				if !errors.Is(err, want) {
					t.Fatalf("CheckKey = %v, want %v", err, want)
				}
			}
		})
	}
}

func TestIPAllowed(t *testing.T) {
	tests := []struct {
		list []string
		ip   string
		want bool
	}{
		{[]string{"127.0.0.0/8"}, "127.0.0.1", true},
		{[]string{"127.0.0.0/8"}, "::ffff:127.0.0.1", true},
		{[]string{"::ffff:127.0.0.0/104"}, "127.0.0.1", true},
		{[]string{"::ffff:127.0.0.0/104"}, "::ffff:127.0.0.1", true},
		{[]string{"10.0.0.0/8"}, "::ffff:10.0.0.5", true},
		{[]string{"10.0.0.0/8"}, "127.0.0.1", false},
		{[]string{"10.0.0.5/32"}, "10.0.0.5", true},
		{[]string{"10.0.0.5/32"}, "10.0.0.6", false},
		{[]string{"2001:db8::/32"}, "2001:db8:1::1", true},
		{[]string{"2001:db8::/32"}, "2001:db8:1::1%eth0", true},
		{[]string{"::/0"}, "127.0.0.1", false}, // IPv4 is not inside an IPv6 prefix
		{[]string{"garbage", "127.0.0.1/32"}, "127.0.0.1", true},
		{[]string{"garbage"}, "127.0.0.1", false},
		{nil, "127.0.0.1", false},
	}
	for _, tc := range tests {
		if got := IPAllowed(tc.list, netip.MustParseAddr(tc.ip)); got != tc.want {
			t.Errorf("IPAllowed(%q, %s) = %v, want %v", tc.list, tc.ip, got, tc.want)
		}
	}
	if IPAllowed([]string{"0.0.0.0/0"}, netip.Addr{}) {
		t.Error("the zero address is allowed")
	}
}

func TestNormalizeAllowlist(t *testing.T) {
	got, err := NormalizeAllowlist([]string{"10.1.2.3/8", "192.0.2.7", "::ffff:127.0.0.1", "::ffff:127.0.0.0/104", "2001:DB8::1/32", "::1"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.0.2.7/32", "127.0.0.1/32", "127.0.0.0/8", "2001:db8::/32", "::1/128"}
	if len(got) != len(want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: %q, want %q", i, got[i], want[i])
		}
	}
	for _, bad := range [][]string{{"10.0.0.0/33"}, {"host.example"}, {"fe80::1%eth0"}, {"::ffff:0.0.0.0/64"}, {""}, make([]string, MaxAllowedIPs+1)} {
		if _, err := NormalizeAllowlist(bad); err == nil {
			t.Errorf("NormalizeAllowlist(%q) accepted", bad)
		}
	}
}

func TestCapPeriodStart(t *testing.T) {
	now := time.Date(2026, 3, 15, 13, 47, 5, 0, time.FixedZone("x", 2*3600))
	tests := []struct {
		period string
		want   time.Time
	}{
		{"", time.Time{}},
		{"day", time.Date(2026, 3, 15, 0, 0, 0, 0, time.UTC)},
		{"month", time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)},
		{"1h", time.Date(2026, 3, 15, 11, 0, 0, 0, time.UTC)},
		{"bogus", time.Time{}},
	}
	for _, tc := range tests {
		if got := CapPeriodStart(tc.period, now); !got.Equal(tc.want) {
			t.Errorf("CapPeriodStart(%q) = %s, want %s", tc.period, got, tc.want)
		}
	}
	for p, want := range map[string]bool{"": true, "day": true, "month": true, "1h": true, "30s": false, "week": false, "-1h": false} {
		if ValidCapPeriod(p) != want {
			t.Errorf("ValidCapPeriod(%q) = %v", p, !want)
		}
	}
}

// FuzzCIDRAllowlist: whatever the allowlist entry and address, nothing panics, a normalised
// list allows exactly what the original allows, and an address is allowed the same in its
// IPv4 and IPv4-mapped forms.
func FuzzCIDRAllowlist(f *testing.F) {
	for _, s := range [][2]string{
		{"10.0.0.0/8", "10.0.0.5"}, {"10.0.0.0/8", "::ffff:10.0.0.5"}, {"::ffff:10.0.0.0/104", "10.1.1.1"},
		{"2001:db8::/32", "2001:db8::1"}, {"0.0.0.0/0", "::"}, {"::/0", "1.2.3.4"}, {"127.0.0.1", "127.0.0.1"},
		{"fe80::1%eth0", "fe80::1"}, {"1.2.3.4/33", "1.2.3.4"}, {"", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, entry, addr string) {
		ip, err := netip.ParseAddr(addr)
		if err != nil {
			ip = netip.Addr{}
		}
		allowed := IPAllowed([]string{entry}, ip)
		if ip.Is4() || ip.Is4In6() {
			v4 := ip.Unmap()
			mapped := netip.AddrFrom16(v4.As16())
			if IPAllowed([]string{entry}, v4) != IPAllowed([]string{entry}, mapped) {
				t.Fatalf("%q: %s and %s differ", entry, v4, mapped)
			}
		}
		norm, err := NormalizeAllowlist([]string{entry})
		if err != nil {
			return
		}
		if len(norm) != 1 {
			t.Fatalf("NormalizeAllowlist(%q) = %q", entry, norm)
		}
		if again, err := NormalizeAllowlist(norm); err != nil || again[0] != norm[0] {
			t.Fatalf("normalising %q again: %q, %v", norm[0], again, err)
		}
		if ip.IsValid() && ip.Zone() == "" {
			if got := IPAllowed(norm, ip); got != allowed {
				t.Fatalf("%q allows %s: %v; normalised %q: %v", entry, ip, allowed, norm[0], got)
			}
		}
	})
}

// BenchmarkCachedKeyVerification: what a request with a valid, cached key costs before its
// route: ParseKey, a key cache hit, CheckKey with an allowlist.
func BenchmarkCachedKeyVerification(b *testing.B) {
	nk := mustNewKey(b, "sk_live")
	store := &countingKeys{keys: map[string]Key{}}
	c, err := NewKeyCache(store, time.Minute, 1<<10, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	k := Key{ID: nk.ID, Prefix: nk.Prefix, Hash: nk.Hash, UserID: "u", Scopes: []string{ScopeChatWrite},
		AllowedIPs: []string{"10.0.0.0/8", "127.0.0.0/8"}}
	if err := c.CreateKey(ctx, k); err != nil {
		b.Fatal(err)
	}
	// Fill the cache, and wait for ristretto's buffered Set to land.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, _ = c.KeyByID(ctx, nk.ID)
		if n := store.count(); func() bool { _, _ = c.KeyByID(ctx, nk.ID); return store.count() == n }() || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	ip := netip.MustParseAddr("127.0.0.1")
	now := time.Now()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		pk, err := ParseKey(nk.Full)
		if err != nil {
			b.Fatal(err)
		}
		got, err := c.KeyByID(ctx, pk.ID)
		if err != nil {
			b.Fatal(err)
		}
		if err := CheckKey(got, pk, ip, now); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if misses := store.count(); misses > 2 {
		b.Logf("%d store lookups", misses)
	}
}
