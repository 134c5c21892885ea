// Package demoapp is a DEMO and test tool: a Caddy HTTP handler that serves a minimal browser
// chat app showing the Peerwave flow against the LLM gateway. The page chats anonymously, is
// sent to the gateway's sign-in by the 402's Location when the anonymous credits run out,
// comes back with #token=<JWT> in its fragment, keeps the token in sessionStorage, strips it
// from the URL and chats on as the signed-in user. It is not a product: it has no server side
// beyond serving one page, and exists for `make run` and the end-to-end browser test.
package demoapp

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(DemoApp{})
	httpcaddyfile.RegisterHandlerDirective("llm_demo_app", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("llm_demo_app", httpcaddyfile.Before, "respond")
}

// Defaults and bounds of the configuration.
const (
	defaultModel = "cheapest"
	defaultTitle = "LLM gateway demo chat"

	// maxModelLen and maxTitleLen bound the strings put into the page.
	maxModelLen = 256
	maxTitleLen = 200
)

// The page: an html/template with the stylesheet and the script put in verbatim, so that the
// Content-Security-Policy can name them by their SHA-256 hashes.
var (
	//go:embed page.html
	pageHTML string
	//go:embed page.css
	pageCSS string
	//go:embed page.js
	pageJS string

	pageTemplate = template.Must(template.New("page").Parse(pageHTML))
	scriptHash   = cspHash(pageJS)
	styleHash    = cspHash(pageCSS)
)

// cspHash is the CSP hash-source of an inline element's text.
func cspHash(text string) string {
	sum := sha256.Sum256([]byte(text))
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

// DemoApp is a DEMO browser chat app, for tests and the demo only. It answers GET and HEAD on
// any path it is mounted on with the same page, and 405 to other methods; it never calls the
// next handler. The page talks to the gateway from its own origin, so the gateway's
// allowed_origins must list this site's origin (CORS, and the sign-in's return address), and
// the gateway's sign-in must accept it as a return origin.
//
// The page's behaviour:
//
//   - On load, a fragment with token= (the gateway's sign-in coming back, #token=<JWT>&state=...)
//     is stored in sessionStorage under "llm_gateway_token", and the fragment is removed from the
//     URL with history.replaceState; a fragment with error= is shown.
//   - Each prompt is sent to <gateway_url>/v1/chat/completions as a non-streaming chat of the
//     whole conversation so far, with the header Redirect: <the page's path> (where the sign-in
//     comes back to) and, once signed in, Authorization: <JWT>.
//   - A 402 with a Location (the anonymous credits ran out) sends the browser there: the
//     gateway's sign-in, which returns to this page. A 401 while signed in forgets the token.
//
// Responses carry a Content-Security-Policy that allows only the page's own inline script and
// stylesheet (by hash) and connections to the gateway's origin, Referrer-Policy: no-referrer,
// X-Frame-Options: DENY and Cache-Control: no-store.
type DemoApp struct {
	// GatewayURL is the gateway's base URL as the browser reaches it, e.g.
	// http://localhost:8080: an absolute http or https URL, optionally with a path prefix (a
	// trailing slash is dropped), without user info, query or fragment. The page posts to
	// GatewayURL + "/v1/chat/completions", and the Content-Security-Policy lets it connect
	// to GatewayURL's origin only. Required.
	GatewayURL string `json:"gateway_url"`

	// Model is the model the page asks for: a model name, or "cheapest" to let the gateway
	// choose. At most 256 bytes. Default: "cheapest".
	Model string `json:"model,omitempty"`

	// Title is the page's title and heading. At most 200 bytes. Default: "LLM gateway demo
	// chat".
	Title string `json:"title,omitempty"`

	page []byte // the rendered page
	csp  string // its Content-Security-Policy
}

// CaddyModule returns the Caddy module information.
func (DemoApp) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_demo_app",
		New: func() caddy.Module { return new(DemoApp) },
	}
}

// pageConfig is what the page's script reads from its <script type="application/json"
// id="config"> block.
type pageConfig struct {
	GatewayURL string `json:"gateway_url"`
	Model      string `json:"model"`
}

// Provision sets the defaults and renders the page and its Content-Security-Policy.
func (a *DemoApp) Provision(caddy.Context) error {
	if a.Model == "" {
		a.Model = defaultModel
	}
	if a.Title == "" {
		a.Title = defaultTitle
	}
	base, origin, err := parseGatewayURL(a.GatewayURL)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	err = pageTemplate.Execute(&buf, struct {
		Title  string
		Config pageConfig
		CSS    template.CSS
		JS     template.JS
	}{
		Title:  a.Title,
		Config: pageConfig{GatewayURL: base, Model: a.Model},
		CSS:    template.CSS(pageCSS), //nolint:gosec // our own embedded stylesheet
		JS:     template.JS(pageJS),   //nolint:gosec // our own embedded script
	})
	if err != nil {
		return fmt.Errorf("rendering the page: %w", err)
	}
	a.page = buf.Bytes()
	a.csp = strings.Join([]string{
		"default-src 'none'",
		"script-src " + scriptHash,
		"style-src " + styleHash,
		"connect-src " + origin,
		"img-src data:",
		"base-uri 'none'",
		"form-action 'self'",
		"frame-ancestors 'none'",
	}, "; ")
	return nil
}

// Validate rejects a missing or unusable gateway_url and oversized model or title.
func (a *DemoApp) Validate() error {
	if _, _, err := parseGatewayURL(a.GatewayURL); err != nil {
		return err
	}
	if len(a.Model) > maxModelLen {
		return fmt.Errorf("model: %d bytes is more than %d", len(a.Model), maxModelLen)
	}
	if len(a.Title) > maxTitleLen {
		return fmt.Errorf("title: %d bytes is more than %d", len(a.Title), maxTitleLen)
	}
	for field, s := range map[string]string{"model": a.Model, "title": a.Title} {
		if !utf8.ValidString(s) {
			return fmt.Errorf("%s: not valid UTF-8", field)
		}
	}
	return nil
}

// hostPort is what a Content-Security-Policy source may carry as host and port, and all a
// gateway URL's host needs: a DNS name or IPv4 address, or a bracketed IPv6 address.
var hostPort = regexp.MustCompile(`^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$`)

// parseGatewayURL checks a gateway_url and returns it without a trailing slash (the base the
// page appends API paths to) and its origin (scheme://host[:port]).
func parseGatewayURL(raw string) (base, origin string, err error) {
	if raw == "" {
		return "", "", errors.New("gateway_url is required")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", "", fmt.Errorf("gateway_url: %v", err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", "", fmt.Errorf("gateway_url %q: want an absolute http or https URL", raw)
	case u.Opaque != "" || u.Host == "":
		return "", "", fmt.Errorf("gateway_url %q: no host", raw)
	case u.User != nil:
		return "", "", fmt.Errorf("gateway_url %q: user info is not allowed", raw)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(raw, "#"):
		return "", "", fmt.Errorf("gateway_url %q: a query or fragment is not allowed", raw)
	case !hostPort.MatchString(u.Host):
		return "", "", fmt.Errorf("gateway_url %q: bad host %q", raw, u.Host)
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return "", "", fmt.Errorf("gateway_url %q: bad port %q", raw, p)
		}
	}
	return strings.TrimRight(raw, "/"), u.Scheme + "://" + strings.ToLower(u.Host), nil
}

// ServeHTTP answers GET and HEAD with the page, other methods with 405; it never calls next.
func (a *DemoApp) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	h := w.Header()
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.Set("Allow", "GET, HEAD")
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusMethodNotAllowed)
		_, _ = w.Write([]byte("method not allowed\n"))
		return nil
	}
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(a.page)))
	h.Set("Content-Security-Policy", a.csp)
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(a.page)
	}
	return nil
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	a := new(DemoApp)
	if err := a.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return a, nil
}

// UnmarshalCaddyfile sets up the demo app from Caddyfile tokens. Syntax:
//
//	llm_demo_app [<matcher>] {
//	    gateway_url <url>
//	    model       <name>
//	    title       <text>
//	}
//
// Each subdirective sets the JSON field of the same name, at most once; gateway_url is
// required.
func (a *DemoApp) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}

	seen := make(map[string]bool)
	for d.NextBlock(0) {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s already specified", sub)
		}
		seen[sub] = true

		switch sub {
		case "gateway_url":
			if !d.AllArgs(&a.GatewayURL) {
				return d.ArgErr()
			}
			if _, _, err := parseGatewayURL(a.GatewayURL); err != nil {
				return d.WrapErr(err)
			}
		case "model":
			if !d.AllArgs(&a.Model) {
				return d.ArgErr()
			}
		case "title":
			if !d.AllArgs(&a.Title) {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	if a.GatewayURL == "" {
		return d.Err("gateway_url is required")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*DemoApp)(nil)
	_ caddy.Validator             = (*DemoApp)(nil)
	_ caddyhttp.MiddlewareHandler = (*DemoApp)(nil)
	_ caddyfile.Unmarshaler       = (*DemoApp)(nil)
)
