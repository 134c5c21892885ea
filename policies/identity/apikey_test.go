package identity

import (
	"crypto/sha256"
	"errors"
	"regexp"
	"strings"
	"testing"
)

func mustNewKey(t testing.TB, prefix string) NewAPIKey {
	t.Helper()
	k, err := NewKey(prefix)
	if err != nil {
		t.Fatalf("NewKey(%q): %v", prefix, err)
	}
	return k
}

// withChecksum completes body ("<prefix>_<id>_<43 chars>") with its checksum.
func withChecksum(body string) string {
	sum := keyChecksum(body)
	return body + string(sum[:])
}

func TestNewKey(t *testing.T) {
	for _, prefix := range []string{"sk_live", "sk_test", "k", "a1_b2_c3", strings.Repeat("p", MaxPrefixLen)} {
		t.Run(prefix, func(t *testing.T) {
			k := mustNewKey(t, prefix)
			if k.Prefix != prefix || len(k.ID) != keyIDLen || !isBase62(k.ID) {
				t.Fatalf("prefix %q, id %q", k.Prefix, k.ID)
			}
			if !strings.HasPrefix(k.Full, prefix+"_"+k.ID+"_") || len(k.Full) != len(prefix)+2+keyIDLen+keySecretLen {
				t.Fatalf("full key %q", k.Full)
			}
			if k.Hash != sha256.Sum256([]byte(k.Full)) {
				t.Fatal("Hash is not the SHA-256 of Full")
			}
			p, err := ParseKey(k.Full)
			if err != nil {
				t.Fatalf("ParseKey(NewKey): %v", err)
			}
			if p.Prefix != k.Prefix || p.ID != k.ID || !HashMatches(k.Hash, p.Hash) {
				t.Fatalf("parsed %+v, made %v", p, k)
			}
			if s := fmtV(k); strings.Contains(s, k.Full[len(k.Full)-keySecretLen:]) {
				t.Fatalf("printing the key shows its secret: %s", s)
			}
		})
	}
}

func TestNewKeyInvalidPrefix(t *testing.T) {
	for _, prefix := range []string{"", "Sk", "sk-live", "sk__live", "_sk", "sk_", "1sk", strings.Repeat("p", MaxPrefixLen+1)} {
		if _, err := NewKey(prefix); !errors.Is(err, ErrInvalidPrefix) {
			t.Errorf("NewKey(%q) err = %v, want ErrInvalidPrefix", prefix, err)
		}
	}
}

func TestNewKeyRandomness(t *testing.T) {
	seen := map[string]bool{}
	var counts [62]int
	for range 200 {
		k := mustNewKey(t, "sk")
		secret := k.Full[len(k.Full)-keySecretLen:][:keyRandomLen]
		if seen[k.ID] || seen[secret] {
			t.Fatal("repeated id or secret")
		}
		seen[k.ID], seen[secret] = true, true
		for i := 0; i < len(secret); i++ {
			counts[strings.IndexByte(base62Digits, secret[i])]++
		}
	}
	// 8600 digits, about 139 of each: a digit that never or far too often appears is a bug.
	for d, n := range counts {
		if n < 60 || n > 240 {
			t.Errorf("digit %q appeared %d times in 8600", base62Digits[d], n)
		}
	}
}

func TestParseKey(t *testing.T) {
	good := mustNewKey(t, "sk_live").Full
	id := "AbCdEf012345"
	random := strings.Repeat("Z", keyRandomLen)
	flip := func(s string, i int) string {
		b := []byte(s)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		return string(b)
	}

	for _, tc := range []struct {
		name       string
		in         string
		wantPrefix string
		wantID     string
	}{
		{name: "new key", in: good, wantPrefix: "sk_live", wantID: good[8:20]},
		{name: "one-letter prefix", in: withChecksum("k_" + id + "_" + random), wantPrefix: "k", wantID: id},
		{name: "prefix with digits and groups", in: withChecksum("a1_b2_c3_" + id + "_" + random), wantPrefix: "a1_b2_c3", wantID: id},
		{name: "longest prefix", in: withChecksum(strings.Repeat("p", 32) + "_" + id + "_" + random), wantPrefix: strings.Repeat("p", 32), wantID: id},
		{name: "checksum with leading zero", in: keyWithLeadingZeroChecksum(t, "k_"+id+"_"+random), wantPrefix: "k", wantID: id},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseKey(tc.in)
			if err != nil {
				t.Fatalf("ParseKey: %v", err)
			}
			if p.Prefix != tc.wantPrefix || p.ID != tc.wantID || p.Hash != sha256.Sum256([]byte(tc.in)) {
				t.Fatalf("got %+v", p)
			}
		})
	}

	for _, tc := range []struct{ name, in string }{
		{"empty", ""},
		{"prefix only", "sk_live_"},
		{"wrong prefix shape uppercase", withChecksum("SK_" + id + "_" + random)},
		{"wrong prefix shape dash", withChecksum("sk-live_" + id + "_" + random)},
		{"wrong prefix shape double underscore", withChecksum("sk__live_" + id + "_" + random)},
		{"wrong prefix shape leading digit", withChecksum("1sk_" + id + "_" + random)},
		{"empty prefix", withChecksum("_" + id + "_" + random)},
		{"prefix too long", withChecksum(strings.Repeat("p", 33) + "_" + id + "_" + random)},
		{"bad checksum: flip last char", flip(good, len(good)-1)},
		{"bad checksum: flip a secret char", flip(good, len(good)-10)},
		{"bad checksum: flip an id char", flip(good, 10)},
		{"bad checksum: other prefix", "sk_test" + good[7:]},
		{"id too short", withChecksum("sk_" + id[1:] + "_" + random)},
		{"id too long", withChecksum("sk_" + id + "x_" + random)},
		{"id not base62", withChecksum("sk_" + id[1:] + "-_" + random)},
		{"secret too short", withChecksum("sk_" + id + "_" + random[1:])},
		{"secret too long", withChecksum("sk_" + id + "_" + random + "Z")},
		{"missing id", withChecksum("sk_" + random)},
		{"no separators", strings.Repeat("a", 70)},
		{"10 KB key", "sk_" + id + "_" + strings.Repeat("a", 10<<10)},
		{"NUL", good[:30] + "\x00" + good[31:]},
		{"trailing NUL", good + "\x00"},
		{"UTF-8", good[:len(good)-2] + "é"},
		{"space", " " + good},
		{"newline", good + "\n"},
		{"jwt", testJWT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseKey(tc.in)
			if !errors.Is(err, ErrMalformedKey) {
				t.Fatalf("err = %v, want ErrMalformedKey", err)
			}
			if p != (ParsedKey{}) {
				t.Errorf("parts %+v returned with the error", p)
			}
			if len(tc.in) > 8 && strings.Contains(err.Error(), tc.in) {
				t.Errorf("error %q contains the input", err)
			}
			if strings.Contains(err.Error(), random) || strings.Contains(err.Error(), id) {
				t.Errorf("error %q contains part of the key", err)
			}
		})
	}
}

// keyWithLeadingZeroChecksum changes the last two secret digits of body until the checksum
// starts with "0" (about one in five does), to check that padding round-trips.
func keyWithLeadingZeroChecksum(t *testing.T, body string) string {
	for i := 0; i < len(base62Digits); i++ {
		for j := 0; j < len(base62Digits); j++ {
			b := body[:len(body)-2] + base62Digits[i:i+1] + base62Digits[j:j+1]
			if sum := keyChecksum(b); sum[0] == '0' {
				return b + string(sum[:])
			}
		}
	}
	t.Fatal("no checksum with a leading zero found")
	return ""
}

func TestKeyChecksum(t *testing.T) {
	// Known CRC-32 (IEEE) values, decoded back from base62.
	for _, tc := range []struct {
		body string
		want uint32
	}{
		{"a", 0xe8b7be43},
		{"", 0},
		{"123456789", 0xcbf43926},
	} {
		sum := keyChecksum(tc.body)
		var v uint64
		for _, c := range sum {
			v = v*62 + uint64(strings.IndexByte(base62Digits, c))
		}
		if v != uint64(tc.want) {
			t.Errorf("keyChecksum(%q) = %s = %d, want %d", tc.body, sum[:], v, tc.want)
		}
	}
	// Encoded independently (Python: zlib.crc32, then base62 0-9A-Za-z).
	for body, want := range map[string]string{"": "000000", "a": "4GEHKN", "123456789": "3jZRME"} {
		if sum := keyChecksum(body); string(sum[:]) != want {
			t.Errorf("keyChecksum(%q) = %s, want %s", body, sum[:], want)
		}
	}
}

func TestValidPrefix(t *testing.T) {
	re := regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	for _, p := range []string{
		"sk", "sk_live", "sk_test", "a", "a1", "a_1", "a_b_c", "sk_live2", strings.Repeat("a", 32),
		"", "_", "A", "Sk", "sk_", "_sk", "sk__live", "1a", "sk-live", "sk live", "sk.live", "é",
		"sk\x00", strings.Repeat("a", 33), "a_" + strings.Repeat("b", 31),
	} {
		want := re.MatchString(p) && len(p) <= MaxPrefixLen
		if got := ValidPrefix(p); got != want {
			t.Errorf("ValidPrefix(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestHashMatches(t *testing.T) {
	a := sha256.Sum256([]byte("a"))
	b := a
	b[31] ^= 1
	if !HashMatches(a, a) || HashMatches(a, b) || HashMatches(a, [32]byte{}) {
		t.Error("HashMatches is wrong")
	}
}

func FuzzParseAPIKey(f *testing.F) {
	f.Add(withChecksum("sk_live_AbCdEf012345_" + strings.Repeat("Z", keyRandomLen)))
	f.Add(withChecksum("k_000000000000_" + strings.Repeat("0", keyRandomLen)))
	f.Add("sk_live_AbCdEf012345_" + strings.Repeat("Z", keySecretLen))
	f.Add("")
	f.Add("___")
	f.Add(strings.Repeat("_", 100))
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseKey(s)
		if err != nil {
			if !errors.Is(err, ErrMalformedKey) {
				t.Fatalf("unexpected error %v", err)
			}
			if len(s) >= 8 && strings.Contains(err.Error(), s) {
				t.Fatalf("error %q contains the input", err)
			}
			if p != (ParsedKey{}) {
				t.Fatalf("parts %+v returned with the error", p)
			}
			return
		}
		prefix, id, secret, err := splitKey(s)
		if err != nil {
			t.Fatalf("ParseKey accepted what splitKey refuses: %v", err)
		}
		if prefix != p.Prefix || id != p.ID {
			t.Fatalf("ParseKey %+v and splitKey %q %q disagree", p, prefix, id)
		}
		if prefix+"_"+id+"_"+secret != s {
			t.Fatalf("re-serialised key differs from the input")
		}
		if p.Hash != sha256.Sum256([]byte(s)) {
			t.Fatalf("Hash is not the SHA-256 of the input")
		}
		if !ValidPrefix(prefix) || len(id) != keyIDLen || !isBase62(id) || len(secret) != keySecretLen || !isBase62(secret) {
			t.Fatalf("accepted a key with bad parts: %q %q", prefix, id)
		}
		if sum := keyChecksum(s[:len(s)-keyChecksumLen]); string(sum[:]) != s[len(s)-keyChecksumLen:] {
			t.Fatalf("accepted a bad checksum")
		}
	})
}
