package identity

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"runtime"
	"strings"
	"testing"
)

const testJWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln-_0"

// headers builds a header from name, value pairs, canonicalising names as net/http does.
func headers(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

func TestCredentialFrom(t *testing.T) {
	key := mustNewKey(t, "sk_live").Full
	other := mustNewKey(t, "sk_live").Full
	long := strings.Repeat("a", 10<<10)

	for _, tc := range []struct {
		name    string
		h       http.Header
		want    Credential
		wantErr error
	}{
		{name: "no header", h: headers(), want: Credential{}},
		{name: "unrelated headers", h: headers("Cookie", "a=b", "X-Api", "k"), want: Credential{}},
		{name: "bearer api key", h: headers("Authorization", "Bearer "+key), want: Credential{APIKey, key, "Authorization"}},
		{name: "bearer scheme lowercase", h: headers("Authorization", "bearer "+key), want: Credential{APIKey, key, "Authorization"}},
		{name: "bearer scheme uppercase", h: headers("Authorization", "BEARER "+key), want: Credential{APIKey, key, "Authorization"}},
		{name: "bearer several spaces", h: headers("Authorization", "Bearer   "+key), want: Credential{APIKey, key, "Authorization"}},
		{name: "surrounding spaces and tabs", h: headers("Authorization", " \tBearer "+key+" \t"), want: Credential{APIKey, key, "Authorization"}},
		{name: "bearer jwt", h: headers("Authorization", "Bearer "+testJWT), want: Credential{JWT, testJWT, "Authorization"}},
		{name: "raw jwt in authorization", h: headers("Authorization", testJWT), want: Credential{JWT, testJWT, "Authorization"}},
		{name: "bearer non-key candidate", h: headers("Authorization", "Bearer a.b"), want: Credential{APIKey, "a.b", "Authorization"}},
		{name: "x-api-key", h: headers("X-API-Key", key), want: Credential{APIKey, key, "X-API-Key"}},
		{name: "apikey", h: headers("apikey", key), want: Credential{APIKey, key, "apikey"}},
		{name: "jwt shape in x-api-key is an api key", h: headers("X-API-Key", testJWT), want: Credential{APIKey, testJWT, "X-API-Key"}},
		{name: "same key in authorization and x-api-key", h: headers("Authorization", "Bearer "+key, "X-API-Key", key), want: Credential{APIKey, key, "Authorization"}},
		{name: "same key in all three", h: headers("apikey", key, "Authorization", "Bearer "+key, "X-API-Key", key), want: Credential{APIKey, key, "Authorization"}},
		{name: "same authorization twice", h: headers("Authorization", "Bearer "+key, "Authorization", "bearer "+key), want: Credential{APIKey, key, "Authorization"}},
		{name: "empty header carries nothing", h: headers("Authorization", "", "X-API-Key", "  "), want: Credential{}},
		{name: "empty header beside a key", h: headers("X-API-Key", "", "apikey", key), want: Credential{APIKey, key, "apikey"}},
		{name: "exactly max length", h: headers("X-API-Key", strings.Repeat("a", MaxCredentialLen)), want: Credential{APIKey, strings.Repeat("a", MaxCredentialLen), "X-API-Key"}},

		{name: "two authorization headers differ", h: headers("Authorization", "Bearer "+key, "Authorization", "Bearer "+other), wantErr: ErrTwoCredentials},
		{name: "x-api-key and apikey differ", h: headers("X-API-Key", key, "apikey", other), wantErr: ErrTwoCredentials},
		{name: "jwt and api key", h: headers("Authorization", testJWT, "X-API-Key", key), wantErr: ErrTwoCredentials},
		{name: "x-api-key repeated with different values", h: headers("X-API-Key", key, "X-API-Key", other), wantErr: ErrTwoCredentials},

		{name: "bearer empty", h: headers("Authorization", "Bearer "), wantErr: ErrMalformedCredential},
		{name: "bearer alone", h: headers("Authorization", "Bearer"), wantErr: ErrMalformedCredential},
		{name: "basic", h: headers("Authorization", "Basic dXNlcjpwYXNz"), wantErr: ErrMalformedCredential},
		{name: "digest", h: headers("Authorization", "Digest username=x"), wantErr: ErrMalformedCredential},
		{name: "raw api key in authorization", h: headers("Authorization", key), wantErr: ErrMalformedCredential},
		{name: "raw two segments", h: headers("Authorization", "a.b"), wantErr: ErrMalformedCredential},
		{name: "raw four segments", h: headers("Authorization", "a.b.c.d"), wantErr: ErrMalformedCredential},
		{name: "raw empty signature", h: headers("Authorization", "a.b."), wantErr: ErrMalformedCredential},
		{name: "raw empty payload", h: headers("Authorization", "a..c"), wantErr: ErrMalformedCredential},
		{name: "raw padded segment", h: headers("Authorization", "a=.b.c"), wantErr: ErrMalformedCredential},
		{name: "bearer with two tokens", h: headers("Authorization", "Bearer "+key+" "+key), wantErr: ErrMalformedCredential},
		{name: "space in x-api-key", h: headers("X-API-Key", "Bearer "+key), wantErr: ErrMalformedCredential},
		{name: "10 KB key", h: headers("X-API-Key", long), wantErr: ErrMalformedCredential},
		{name: "10 KB bearer", h: headers("Authorization", "Bearer "+long), wantErr: ErrMalformedCredential},
		{name: "one byte over max", h: headers("apikey", strings.Repeat("a", MaxCredentialLen+1)), wantErr: ErrMalformedCredential},
		{name: "NUL in key", h: headers("X-API-Key", key[:20]+"\x00"+key[20:]), wantErr: ErrMalformedCredential},
		{name: "NUL in bearer", h: headers("Authorization", "Bearer "+key+"\x00"), wantErr: ErrMalformedCredential},
		{name: "UTF-8 in key", h: headers("apikey", key+"é"), wantErr: ErrMalformedCredential},
		{name: "UTF-8 in jwt", h: headers("Authorization", testJWT+"ü"), wantErr: ErrMalformedCredential},
		{name: "DEL byte", h: headers("X-API-Key", key+"\x7f"), wantErr: ErrMalformedCredential},
		{name: "tab inside", h: headers("Authorization", "Bearer\t"+key), wantErr: ErrMalformedCredential},
		{name: "CRLF", h: http.Header{"Authorization": {"Bearer " + key + "\r\nX: y"}}, wantErr: ErrMalformedCredential},
		{name: "malformed beside a good key", h: headers("Authorization", "Bearer "+key, "apikey", "\x01"), wantErr: ErrMalformedCredential},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CredentialFrom(tc.h)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if got != (Credential{}) {
					t.Errorf("credential = %v with an error, want zero", got)
				}
				for _, vs := range tc.h {
					for _, v := range vs {
						if v = strings.TrimSpace(v); len(v) > 6 && strings.Contains(err.Error(), v) {
							t.Errorf("error %q contains a header value", err)
						}
					}
				}
				if strings.Contains(err.Error(), key) || strings.Contains(err.Error(), other) {
					t.Errorf("error %q contains the key", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if got != tc.want {
				t.Errorf("got %+v (value %q), want %+v (value %q)", got, got.Value, tc.want, tc.want.Value)
			}
		})
	}
}

func TestCredentialString(t *testing.T) {
	key := mustNewKey(t, "sk_test").Full
	c, err := CredentialFrom(headers("X-API-Key", key))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{c.String(), fmtV(c)} {
		if strings.Contains(s, key) {
			t.Errorf("%q shows the key", s)
		}
	}
	if got := c.String(); got != "api_key from X-API-Key" {
		t.Errorf("String() = %q", got)
	}
	if got := (Credential{}).String(); got != "none" {
		t.Errorf("String() = %q", got)
	}
}

func TestIsJWTShape(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
	}{
		{testJWT, true},
		{"a.b.c", true},
		{"A-_.0.z", true},
		{"", false},
		{"..", false},
		{"a.b", false},
		{".b.c", false},
		{"a..c", false},
		{"a.b.", false},
		{"a.b.c.", false},
		{"a.b.c.d", false},
		{"a.b.c=", false},
		{"a+b.c.d", false},
		{"a/b.c.d", false},
		{"a b.c.d", false},
	} {
		if got := isJWTShape(tc.in); got != tc.want {
			t.Errorf("isJWTShape(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

// A huge header value is refused after a constant amount of work: CVE-2025-30204 split a 1 MB
// token of dots into a slice per dot.
func TestCredentialFromAllocsBounded(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header string
		value  string
	}{
		{"1 MB bearer", "Authorization", "Bearer " + strings.Repeat("a", 1<<20)},
		{"1 MB of dots", "Authorization", strings.Repeat(".", 1<<20)},
		{"100k dots raw jwt", "Authorization", "a" + strings.Repeat(".a", 100_000)},
		{"1 MB api key", "X-Api-Key", strings.Repeat("k", 1<<20)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{tc.header: {tc.value}}
			small := http.Header{tc.header: {tc.value[:MaxCredentialLen+1]}}
			// AllocsPerRun counts the whole process's allocations: the least of three runs
			// keeps a background goroutine's from being counted (seen under -race with other
			// packages' tests on the same cores).
			allocs, smallAllocs := math.Inf(1), math.Inf(1)
			for range 3 {
				allocs = min(allocs, testing.AllocsPerRun(50, func() {
					if _, err := CredentialFrom(h); !errors.Is(err, ErrMalformedCredential) {
						t.Fatalf("err = %v", err)
					}
				}))
				smallAllocs = min(smallAllocs, testing.AllocsPerRun(50, func() { _, _ = CredentialFrom(small) }))
			}
			if allocs > 8 || allocs > smallAllocs+1 {
				t.Errorf("allocs = %v for 1 MB, %v for 8 KiB: want a small constant", allocs, smallAllocs)
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for range 20 {
				_, _ = CredentialFrom(h)
			}
			runtime.ReadMemStats(&after)
			if perCall := (after.TotalAlloc - before.TotalAlloc) / 20; perCall > 1024 {
				t.Errorf("%d bytes allocated per call", perCall)
			}
		})
	}
}

func FuzzAuthorizationHeader(f *testing.F) {
	key := "sk_live_0123456789ab_" + strings.Repeat("x", 43) + "000000"
	f.Add("Bearer "+key, "", "")
	f.Add(testJWT, "", "")
	f.Add("bearer "+testJWT, key, "")
	f.Add("", key, key)
	f.Add("Basic dXNlcjpwYXNz", "", "")
	f.Add("Bearer ", "", "")
	f.Add("Bearer a\x00b", "é", "")
	f.Add("a"+strings.Repeat(".a", 100), "", "")
	f.Fuzz(func(t *testing.T, auth, xAPIKey, apikey string) {
		h := http.Header{}
		inputs := []string{auth, xAPIKey, apikey}
		for i, name := range []string{"Authorization", "X-Api-Key", "Apikey"} {
			if inputs[i] != "" {
				h[name] = []string{inputs[i]}
			}
		}
		c, err := CredentialFrom(h)
		if err != nil {
			if c != (Credential{}) {
				t.Fatalf("credential %v returned with error %v", c, err)
			}
			if !errors.Is(err, ErrMalformedCredential) && !errors.Is(err, ErrTwoCredentials) {
				t.Fatalf("unexpected error %v", err)
			}
			msg := err.Error()
			for _, in := range inputs {
				in = strings.Trim(in, " \t")
				if len(in) >= 4 && strings.Contains(msg, in) && !strings.Contains(credentialErrorWords, in) {
					t.Fatalf("error %q contains an input", msg)
				}
			}
			return
		}
		switch c.Kind {
		case None:
			if c != (Credential{}) {
				t.Fatalf("None with fields: %+v", c)
			}
			return
		case JWT:
			if !isJWTShape(c.Value) {
				t.Fatalf("JWT without the shape")
			}
		case APIKey:
		default:
			t.Fatalf("kind %d", c.Kind)
		}
		if c.Value == "" || len(c.Value) > MaxCredentialLen {
			t.Fatalf("value of length %d accepted", len(c.Value))
		}
		from := map[string]string{"Authorization": auth, "X-API-Key": xAPIKey, "apikey": apikey}[c.Header]
		if !strings.Contains(from, c.Value) {
			t.Fatalf("value %q is not in the %s header %q", c.Value, c.Header, from)
		}
		for i := 0; i < len(c.Value); i++ {
			if b := c.Value[i]; b <= ' ' || b >= 0x7f {
				t.Fatalf("value %q has byte %#x", c.Value, b)
			}
		}
	})
}

// credentialErrorWords holds every text a credential error can have, so that the fuzz target
// can tell an input that happens to be part of such a text from a leaked value.
var credentialErrorWords = func() string {
	var all []string
	reasons := []string{reasonTooLong, reasonBadByte, reasonSpace, reasonEmptyBearer, reasonScheme, reasonNotBearerJWT}
	for _, h1 := range credentialHeaders {
		for _, r := range reasons {
			all = append(all, malformedCredential(h1.name, r).Error())
		}
		for _, h2 := range credentialHeaders {
			all = append(all, twoCredentials(h1.name, h2.name).Error())
		}
	}
	return strings.Join(all, "\n")
}()

func fmtV(v any) string { return fmt.Sprintf("%v %+v %s", v, v, v) }
