package signin

import (
	"errors"
	"strings"
	"testing"
)

func TestReturnPolicyCheckDefault(t *testing.T) {
	var p ReturnPolicy // any https origin, http on loopback
	tests := []struct {
		name, raw, origin string // origin "": refused
	}{
		{"https", "https://app.example.com/cb", "https://app.example.com"},
		{"https no path", "https://app.example.com", "https://app.example.com"},
		{"https root", "https://app.example.com/", "https://app.example.com"},
		{"query", "https://app.example.com/cb?x=1&y=%2F", "https://app.example.com"},
		{"empty query", "https://app.example.com/cb?", "https://app.example.com"},
		{"port", "https://app.example.com:8443/cb", "https://app.example.com:8443"},
		{"punycode", "https://xn--bcher-kva.example/cb", "https://xn--bcher-kva.example"},
		{"ipv4", "https://192.0.2.1/cb", "https://192.0.2.1"},
		{"ipv6", "https://[2001:db8::1]/cb", "https://[2001:db8::1]"},
		{"ipv6 port", "https://[2001:db8::1]:8443/cb", "https://[2001:db8::1]:8443"},
		{"http localhost", "http://localhost:3000/cb", "http://localhost:3000"},
		{"http 127.0.0.1", "http://127.0.0.1:5173/", "http://127.0.0.1:5173"},
		{"http ::1", "http://[::1]:8080/cb", "http://[::1]:8080"},
		{"http localhost no port", "http://localhost/cb", "http://localhost"},
		{"encoded path bytes", "https://app.example.com/a%20b/%C3%A9", "https://app.example.com"},
		{"dots inside a segment", "https://app.example.com/a..b/.well-known/...", "https://app.example.com"},
		{"at sign in path", "https://app.example.com/@user", "https://app.example.com"},

		{"empty", "", ""},
		{"too long", "https://app.example.com/" + strings.Repeat("a", 2048), ""},
		{"http elsewhere", "http://app.example.com/cb", ""},
		{"http 127.0.0.2", "http://127.0.0.2/cb", ""},
		{"http localhost suffix", "http://localhost.evil.com/cb", ""},
		{"scheme-relative", "//evil.com/cb", ""},
		{"path only", "/cb", ""},
		{"opaque", "https:evil.com", ""},
		{"one slash", "https:/evil.com", ""},
		{"three slashes", "https:///evil.com", ""},
		{"javascript", "javascript:alert(1)", ""},
		{"javascript with slashes", "javascript://app.example.com/%0aalert(1)", ""},
		{"data", "data:text/html,<script>alert(1)</script>", ""},
		{"data base64", "data:text/html;base64,PHNjcmlwdD4=", ""},
		{"ftp", "ftp://app.example.com/", ""},
		{"upper-case scheme", "HTTPS://app.example.com/", ""},
		{"upper-case host", "https://App.example.com/", ""},
		{"userinfo", "https://app@evil.com/", ""},
		{"userinfo with password", "https://app.example.com:443@evil.com/", ""},
		{"empty userinfo", "https://@evil.com/", ""},
		{"encoded at", "https://app.example.com%40evil.com/", ""},
		{"fragment", "https://app.example.com/cb#x", ""},
		{"empty fragment", "https://app.example.com/cb#", ""},
		{"backslash host", "https://app.example.com\\@evil.com/", ""},
		{"backslash start", "https:\\\\evil.com/", ""},
		{"backslash slash", "https:/\\evil.com/", ""},
		{"backslash in path", "https://app.example.com/a\\b", ""},
		{"encoded backslash in path", "https://app.example.com/a%5cb", ""},
		{"encoded slash in path", "https://app.example.com/a%2Fb", ""},
		{"dot dot", "https://app.example.com/a/../b", ""},
		{"dot", "https://app.example.com/a/./b", ""},
		{"trailing dot dot", "https://app.example.com/a/..", ""},
		{"encoded dot dot", "https://app.example.com/%2e%2e/admin", ""},
		{"encoded dot dot upper", "https://app.example.com/%2E%2E/admin", ""},
		{"half encoded dot dot", "https://app.example.com/.%2e/admin", ""},
		{"dot dot semicolon", "https://app.example.com/..;/admin", ""},
		{"dot dot semicolon param", "https://app.example.com/a/..;x=1/admin", ""},
		{"encoded semicolon", "https://app.example.com/..%3b/admin", ""},
		{"double encoded", "https://app.example.com/%252e%252e/admin", ""},
		{"encoded nul", "https://app.example.com/a%00", ""},
		{"bad percent", "https://app.example.com/a%zz", ""},
		{"truncated percent", "https://app.example.com/a%2", ""},
		{"space", "https://app.example.com/a b", ""},
		{"tab", "https://app.example.com/\tb", ""},
		{"newline", "https://app.example.com/\nb", ""},
		{"quote", "https://app.example.com/?q=\"", ""},
		{"angle bracket", "https://app.example.com/?q=<x>", ""},
		{"unicode host", "https://bücher.example/", ""},
		{"unicode path", "https://app.example.com/é", ""},
		{"fullwidth dot", "https://app.example.com．evil.com/", ""},
		{"percent-encoded host", "https://app%2eexample.com/", ""},
		{"trailing dot", "https://app.example.com./cb", ""},
		{"leading dot", "https://.app.example.com/cb", ""},
		{"double dot host", "https://app..example.com/cb", ""},
		{"underscore host", "https://app_x.example.com/", ""},
		{"hyphen label edge", "https://-app.example.com/", ""},
		{"long label", "https://" + strings.Repeat("a", 64) + ".com/", ""},
		{"empty host", "https:///cb", ""},
		{"empty host with port", "https://:443/cb", ""},
		{"numeric host", "https://2130706433/", ""},
		{"short ipv4", "https://127.1/", ""},
		{"hex ipv4", "https://0x7f.0.0.1/", ""},
		{"octal ipv4", "https://0177.0.0.1/", ""},
		{"ipv4 leading zero", "https://127.000.0.1/", ""},
		{"ipv6 not canonical", "https://[2001:DB8::1]/", ""},
		{"ipv6 long form", "https://[2001:db8:0:0:0:0:0:1]/", ""},
		{"ipv6 zone", "https://[fe80::1%25eth0]/", ""},
		{"ipv4 in brackets", "https://[127.0.0.1]/", ""},
		{"unbracketed ipv6", "https://2001:db8::1/", ""},
		{"default https port", "https://app.example.com:443/cb", ""},
		{"default http port", "http://localhost:80/cb", ""},
		{"empty port", "https://app.example.com:/cb", ""},
		{"port zero", "https://app.example.com:0/cb", ""},
		{"port leading zero", "https://app.example.com:08443/cb", ""},
		{"port too big", "https://app.example.com:65536/cb", ""},
		{"port not numeric", "https://app.example.com:abc/cb", ""},
		{"two colons", "https://app.example.com:1:2/cb", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, origin, err := p.Check(tt.raw)
			if tt.origin == "" {
				if err == nil {
					t.Fatalf("Check(%q) = %q, %q: want an error", tt.raw, u, origin)
				}
				if !errors.Is(err, ErrRedirect) || u != nil || origin != "" {
					t.Errorf("Check(%q) = %v, %q, %v: want nil, \"\", ErrRedirect", tt.raw, u, origin, err)
				}
				checkNoSecret(t, err, tt.raw)
				return
			}
			if err != nil {
				t.Fatalf("Check(%q): %v", tt.raw, err)
			}
			if origin != tt.origin || u.String() != tt.raw {
				t.Errorf("Check(%q) = %q, %q; want origin %q", tt.raw, u, origin, tt.origin)
			}
		})
	}
}

func TestReturnPolicyCheckListed(t *testing.T) {
	p := ReturnPolicy{Origins: []string{"https://App.Example.com", "http://intranet.example:8080", "http://localhost:3000"}}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, raw string
		ok        bool
	}{
		{"listed", "https://app.example.com/cb", true},
		{"listed, case of listing ignored", "https://app.example.com/any/path?q=1", true},
		{"listed http", "http://intranet.example:8080/", true},
		{"listed loopback port", "http://localhost:3000/cb", true},
		{"other loopback port", "http://localhost:3001/cb", false},
		{"other scheme", "http://app.example.com/cb", false},
		{"other port", "https://app.example.com:8443/cb", false},
		{"suffix domain", "https://app.example.com.evil.com/cb", false},
		{"prefix domain", "https://evilapp.example.com/cb", false},
		{"subdomain", "https://x.app.example.com/cb", false},
		{"parent domain", "https://example.com/cb", false},
		{"userinfo", "https://app.example.com@evil.com/cb", false},
		{"unlisted https", "https://evil.com/cb", false},
		{"listed but fragment", "https://app.example.com/cb#x", false},
		{"listed but traversal", "https://app.example.com/%2e%2e/cb", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, origin, err := p.Check(tt.raw)
			if (err == nil) != tt.ok {
				t.Fatalf("Check(%q) = %q, %v; want ok %v", tt.raw, origin, err, tt.ok)
			}
		})
	}
}

func TestReturnPolicyValidate(t *testing.T) {
	tests := []struct {
		name    string
		origins []string
		ok      bool
	}{
		{"none", nil, true},
		{"origins", []string{"https://app.example.com", "http://localhost:3000", "https://[::1]:8443"}, true},
		{"upper case", []string{"HTTPS://APP.EXAMPLE.COM"}, true},
		{"trailing slash", []string{"https://app.example.com/"}, false},
		{"path", []string{"https://app.example.com/cb"}, false},
		{"query", []string{"https://app.example.com?x"}, false},
		{"no scheme", []string{"app.example.com"}, false},
		{"default port", []string{"https://app.example.com:443"}, false},
		{"userinfo", []string{"https://u@app.example.com"}, false},
		{"kelvin sign", []string{"https://\u212aey.example.com"}, false},
		{"empty", []string{""}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ReturnPolicy{Origins: tt.origins}.Validate()
			if (err == nil) != tt.ok {
				t.Errorf("Validate(%q) = %v, want ok %v", tt.origins, err, tt.ok)
			}
		})
	}
}

func TestMatchRedirectURI(t *testing.T) {
	reg := []string{"https://app.example.com/callback", "http://127.0.0.1:8080/cb?x=1"}
	tests := []struct {
		name, got string
		want      bool
	}{
		{"first", "https://app.example.com/callback", true},
		{"second", "http://127.0.0.1:8080/cb?x=1", true},
		{"trailing slash", "https://app.example.com/callback/", false},
		{"missing trailing slash", "https://app.example.com/callbac", false},
		{"case of host", "https://APP.example.com/callback", false},
		{"case of scheme", "HTTPS://app.example.com/callback", false},
		{"case of path", "https://app.example.com/Callback", false},
		{"extra query", "https://app.example.com/callback?x=1", false},
		{"query reordered", "http://127.0.0.1:8080/cb?x=1&y=2", false},
		{"other port", "http://127.0.0.1:8081/cb?x=1", false},
		{"default port spelled out", "https://app.example.com:443/callback", false},
		{"prefix", "https://app.example.com/callback/../evil", false},
		{"encoded traversal", "https://app.example.com/callback/%2e%2e/evil", false},
		{"dot dot semicolon", "https://app.example.com/callback/..;/evil", false},
		{"userinfo", "https://app.example.com@evil.com/callback", false},
		{"opaque", "https:app.example.com/callback", false},
		{"suffix domain", "https://app.example.com.evil.com/callback", false},
		{"fragment", "https://app.example.com/callback#x", false},
		{"javascript", "javascript:alert(1)", false},
		{"data", "data:text/html,x", false},
		{"scheme-relative", "//app.example.com/callback", false},
		{"backslash", "https://app.example.com\\callback", false},
		{"percent-encoded", "https://app.example.com/%63allback", false},
		{"unicode", "https://app.example.com/callback\u200b", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MatchRedirectURI(reg, tt.got); got != tt.want {
				t.Errorf("MatchRedirectURI(%q) = %v, want %v", tt.got, got, tt.want)
			}
		})
	}
	if MatchRedirectURI([]string{""}, "") {
		t.Error("an empty registered URI matched an empty redirect_uri")
	}
	if MatchRedirectURI(nil, "https://app.example.com/callback") {
		t.Error("matched with nothing registered")
	}
}

func TestValidRedirectURI(t *testing.T) {
	tests := []struct {
		name, uri string
		ok        bool
	}{
		{"https", "https://app.example.com/callback", true},
		{"https with query", "https://app.example.com/callback?tenant=a", true},
		{"http loopback", "http://127.0.0.1:8080/cb", true},
		{"http localhost", "http://localhost:8080/cb", true},
		{"http ipv6 loopback", "http://[::1]:8080/cb", true},
		{"http elsewhere", "http://app.example.com/callback", false},
		{"fragment", "https://app.example.com/callback#x", false},
		{"userinfo", "https://u:p@app.example.com/callback", false},
		{"custom scheme", "com.example.app:/callback", false},
		{"relative", "/callback", false},
		{"not canonical", "https://app.example.com/a/../callback", false},
		{"upper-case host", "https://App.example.com/callback", false},
		{"javascript", "javascript:alert(1)", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidRedirectURI(tt.uri)
			if (err == nil) != tt.ok {
				t.Errorf("ValidRedirectURI(%q) = %v, want ok %v", tt.uri, err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrRedirect) {
				t.Errorf("error %v does not wrap ErrRedirect", err)
			}
		})
	}
}
