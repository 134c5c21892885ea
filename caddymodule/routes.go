package caddymodule

import (
	"net/http"
	"net/url"
	"strings"
)

// The paths under gatewayPrefixes belong to the gateway: one it does not serve is answered
// with the contract's JSON error in its client's shape, never with what the next handler
// (often a plain-text 404, or Caddy's empty 200) would say, which SDKs cannot read.
var gatewayPrefixes = []string{"/v1/", "/api/"}

// notImplementedRoutes are the APIs of the surfaces the gateway speaks that it does not serve
// yet: 501 not_implemented. A path ending in "/" names the route and everything under it.
var notImplementedRoutes = []string{
	// OpenAI
	"/v1/audio/", "/v1/images/", "/v1/moderations",
	"/v1/realtime", "/v1/realtime/",
	// Anthropic
	"/v1/messages/batches", "/v1/messages/batches/",
	// Ollama
	"/api/show", "/api/ps", "/api/version",
}

// unknownRoute is a path under the gateway's prefixes that it does not serve.
type unknownRoute struct {
	method, path string
	// notImplemented: an API of a surface the gateway speaks, not served yet (501).
	notImplemented bool
}

func (e *unknownRoute) Error() string {
	p := e.path
	if len(p) > 200 {
		p = p[:200] + "..."
	}
	if e.notImplemented {
		return "the gateway does not serve " + e.method + " " + p + " yet"
	}
	return "the gateway has no route " + e.method + " " + p
}

// unservedRoute reports, for a path the gateway has no handler for, whether it is under the
// gateway's prefixes, and how it is refused.
func unservedRoute(r *http.Request) *unknownRoute {
	path := r.URL.Path
	mine := false
	for _, p := range gatewayPrefixes {
		if strings.HasPrefix(path, p) {
			mine = true
			break
		}
	}
	if !mine {
		return nil
	}
	e := &unknownRoute{method: r.Method, path: path}
	for _, n := range notImplementedRoutes {
		if path == n || strings.HasSuffix(n, "/") && strings.HasPrefix(path, n) {
			e.notImplemented = true
			break
		}
	}
	return e
}

// upstreamQuery is the query string of a request to backend b: the backend URL's own query
// (e.g. Azure's api-version), then the client's parameters its route passes on (names: a
// surface's Query, a stored route's), unless the backend's query sets them already.
func upstreamQuery(b *Backend, names []string, client url.Values) string {
	if len(names) == 0 {
		return b.query
	}
	own, _ := url.ParseQuery(b.query)
	q := b.query
	for _, n := range names {
		if own.Has(n) {
			continue
		}
		for _, v := range client[n] {
			if q != "" {
				q += "&"
			}
			q += url.QueryEscape(n) + "=" + url.QueryEscape(v)
		}
	}
	return q
}
