package demoapp

import (
	"context"
	"encoding/json"
	"html"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the caddyfile adapter
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// provisioned provisions and validates a.
func provisioned(t *testing.T, a *DemoApp) *DemoApp {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := a.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if err := a.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	return a
}

// serve calls a.ServeHTTP, failing the test if it calls the next handler.
func serve(t *testing.T, a *DemoApp, method, target string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
		t.Error("the demo app called the next handler")
		return nil
	})
	if err := a.ServeHTTP(rec, httptest.NewRequest(method, target, nil), next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return rec
}

var (
	configBlock  = regexp.MustCompile(`(?s)<script type="application/json" id="config">(.*?)</script>`)
	inlineScript = regexp.MustCompile(`(?s)<script>(.*?)</script>`)
	inlineStyle  = regexp.MustCompile(`(?s)<style>(.*?)</style>`)
	titleElement = regexp.MustCompile(`(?s)<title>(.*?)</title>`)
)

// pageConfigOf decodes the page's config block.
func pageConfigOf(t *testing.T, page string) pageConfig {
	t.Helper()
	m := configBlock.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no config block in the page:\n%s", page)
	}
	var c pageConfig
	if err := json.Unmarshal([]byte(m[1]), &c); err != nil {
		t.Fatalf("config block %q: %v", m[1], err)
	}
	return c
}

// TestServe: GET and HEAD on any path answer the page with its security headers; the CSP names
// the page's own script and stylesheet by hash and the gateway's origin only; other methods 405.
func TestServe(t *testing.T) {
	a := provisioned(t, &DemoApp{GatewayURL: "http://127.0.0.1:8080/"})
	for _, target := range []string{"/", "/chat", "/deep/path/?q=1"} {
		rec := serve(t, a, http.MethodGet, target)
		if rec.Code != http.StatusOK {
			t.Fatalf("GET %s: %d", target, rec.Code)
		}
		h := rec.Result().Header
		for name, want := range map[string]string{
			"Content-Type":           "text/html; charset=utf-8",
			"Referrer-Policy":        "no-referrer",
			"X-Frame-Options":        "DENY",
			"Cache-Control":          "no-store",
			"X-Content-Type-Options": "nosniff",
		} {
			if got := h.Get(name); got != want {
				t.Errorf("GET %s: %s %q, want %q", target, name, got, want)
			}
		}
		page := rec.Body.String()
		csp := h.Get("Content-Security-Policy")
		directives := map[string]string{}
		for _, d := range strings.Split(csp, ";") {
			name, value, _ := strings.Cut(strings.TrimSpace(d), " ")
			directives[name] = value
		}
		script := inlineScript.FindStringSubmatch(page)
		style := inlineStyle.FindStringSubmatch(page)
		if script == nil || style == nil {
			t.Fatalf("page lacks its inline script or style:\n%s", page)
		}
		for name, want := range map[string]string{
			"default-src":     "'none'",
			"script-src":      cspHash(script[1]),
			"style-src":       cspHash(style[1]),
			"connect-src":     "http://127.0.0.1:8080",
			"base-uri":        "'none'",
			"frame-ancestors": "'none'",
		} {
			if got := directives[name]; got != want {
				t.Errorf("CSP %s %q, want %q (CSP %q)", name, got, want, csp)
			}
		}
		if strings.Contains(page, "http://") && !strings.Contains(page, `"http://127.0.0.1:8080"`) {
			t.Errorf("page refers to an external resource:\n%s", page)
		}
		if got := pageConfigOf(t, page); got != (pageConfig{GatewayURL: "http://127.0.0.1:8080", Model: "cheapest"}) {
			t.Errorf("config %+v", got)
		}
		if got := titleElement.FindStringSubmatch(page); got == nil || got[1] != defaultTitle {
			t.Errorf("title %q, want %q", got, defaultTitle)
		}
		for _, id := range []string{"status", "balance", "messages", "chat", "prompt", "send", "forget", "error"} {
			if !strings.Contains(page, `id="`+id+`"`) {
				t.Errorf("page has no #%s", id)
			}
		}
	}

	head := serve(t, a, http.MethodHead, "/")
	if head.Code != http.StatusOK || head.Body.Len() != 0 {
		t.Errorf("HEAD: %d with %d bytes", head.Code, head.Body.Len())
	}
	if head.Header().Get("Content-Security-Policy") == "" || head.Header().Get("Content-Length") == "" {
		t.Errorf("HEAD headers %v", head.Header())
	}

	for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete} {
		rec := serve(t, a, m, "/")
		if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "GET, HEAD" {
			t.Errorf("%s: %d, Allow %q", m, rec.Code, rec.Header().Get("Allow"))
		}
	}
}

// TestConfigEscaping: a gateway_url, model or title with markup cannot break out of its place
// in the page, and the script still reads them exactly.
func TestConfigEscaping(t *testing.T) {
	const (
		gw    = `http://127.0.0.1:8080/x</script><script>alert(1)</script><!--`
		model = `m</script><script>alert("m")</script>`
		title = `<b>T</b></title><script>alert('t')</script> & co`
	)
	a := provisioned(t, &DemoApp{GatewayURL: gw, Model: model, Title: title})
	page := serve(t, a, http.MethodGet, "/").Body.String()

	if got := strings.Count(page, "<script"); got != 2 {
		t.Errorf("page has %d <script elements, want 2 (config and the app):\n%s", got, page)
	}
	if got := strings.Count(page, "</script>"); got != 2 {
		t.Errorf("page has %d </script>, want 2:\n%s", got, page)
	}
	if strings.Contains(page, "alert") && strings.Contains(page, "<script>alert") {
		t.Errorf("injected script in the page:\n%s", page)
	}
	if got := pageConfigOf(t, page); got != (pageConfig{GatewayURL: gw, Model: model}) {
		t.Errorf("config %+v, want gateway_url %q, model %q", got, gw, model)
	}
	m := titleElement.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no title element:\n%s", page)
	}
	if got := html.UnescapeString(m[1]); got != title {
		t.Errorf("title reads %q, want %q", got, title)
	}
	if got := a.csp; !strings.Contains(got, "connect-src http://127.0.0.1:8080;") {
		t.Errorf("CSP %q: connect-src is not the gateway's origin", got)
	}
}

// TestValidate: the errors of an unusable configuration.
func TestValidate(t *testing.T) {
	long := strings.Repeat("x", 300)
	for _, tc := range []struct {
		app  DemoApp
		want string
	}{
		{DemoApp{}, "gateway_url is required"},
		{DemoApp{GatewayURL: "localhost:8080"}, "absolute http or https"},
		{DemoApp{GatewayURL: "/relative"}, "absolute http or https"},
		{DemoApp{GatewayURL: "ftp://example.com"}, "absolute http or https"},
		{DemoApp{GatewayURL: "http://"}, "no host"},
		{DemoApp{GatewayURL: "http://user:pw@example.com"}, "user info"},
		{DemoApp{GatewayURL: "http://example.com/?a=1"}, "query or fragment"},
		{DemoApp{GatewayURL: "http://example.com/?"}, "query or fragment"},
		{DemoApp{GatewayURL: "http://example.com/#x"}, "query or fragment"},
		{DemoApp{GatewayURL: "http://exa'mple.com"}, "bad host"},
		{DemoApp{GatewayURL: "http://example.com;script-src"}, "bad host"},
		{DemoApp{GatewayURL: "http://example.com:99999"}, "bad port"},
		{DemoApp{GatewayURL: "http://example.com", Model: long}, "model: 300 bytes"},
		{DemoApp{GatewayURL: "http://example.com", Title: long}, "title: 300 bytes"},
		{DemoApp{GatewayURL: "http://example.com", Title: "\xff"}, "not valid UTF-8"},
	} {
		err := tc.app.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Validate %v, want an error with %q", tc.app, err, tc.want)
		}
	}
	for _, ok := range []string{"http://localhost:8080", "https://gw.example.com/llm/", "http://[::1]:8080"} {
		a := DemoApp{GatewayURL: ok}
		if err := a.Validate(); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := new(DemoApp).Provision(ctx); err == nil {
		t.Error("Provision without gateway_url succeeded")
	}
}

// TestCaddyfile: the block maps one to one onto the JSON fields, and bad blocks are refused.
func TestCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		in, json string
	}{
		{`llm_demo_app {
			gateway_url http://localhost:8080
		}`, `{"gateway_url":"http://localhost:8080"}`},
		{`llm_demo_app {
			gateway_url https://gw.example.com/llm
			model mock-small
			title "My demo"
		}`, `{"gateway_url":"https://gw.example.com/llm","model":"mock-small","title":"My demo"}`},
	} {
		a := new(DemoApp)
		if err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in)); err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		var warnings []caddyconfig.Warning
		if got := string(caddyconfig.JSON(a, &warnings)); got != tc.json || len(warnings) > 0 {
			t.Errorf("%s: JSON %s (warnings %v), want %s", tc.in, got, warnings, tc.json)
		}
		provisioned(t, a)
	}

	for _, tc := range []struct {
		in, want string
	}{
		{`llm_demo_app`, "gateway_url is required"},
		{`llm_demo_app http://localhost:8080`, "wrong argument count"},
		{`llm_demo_app {
			gateway_url
		}`, "wrong argument count"},
		{`llm_demo_app {
			gateway_url http://a http://b
		}`, "wrong argument count"},
		{`llm_demo_app {
			gateway_url ftp://a
		}`, "absolute http or https"},
		{`llm_demo_app {
			gateway_url http://a
			gateway_url http://b
		}`, "gateway_url already specified"},
		{`llm_demo_app {
			gateway_url http://a
			colour blue
		}`, "unrecognized subdirective 'colour'"},
		{`llm_demo_app {
			gateway_url http://a
			title two words
		}`, "wrong argument count"},
	} {
		err := new(DemoApp).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.in, err, tc.want)
		}
	}
}

// TestCaddyfileSite: the directive is ordered, so it may stand in a site block without route.
func TestCaddyfileSite(t *testing.T) {
	in := `:8081 {
	llm_demo_app {
		gateway_url http://localhost:8080
	}
}`
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(in), nil)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	if !strings.Contains(string(cfg), `{"gateway_url":"http://localhost:8080","handler":"llm_demo_app"}`) {
		t.Errorf("adapted config lacks the handler: %s", cfg)
	}
}
