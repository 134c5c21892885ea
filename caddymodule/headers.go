package caddymodule

import (
	"mime"
	"net/http"
	"strings"
)

// backendResponseHeaders are the only response fields of a backend that reach the client: what
// SDKs read (the content type, request ids, OpenAI's processing time and version) and how long
// to wait before a retry. Everything else stays behind: the backend's CORS fields (vLLM sends
// Access-Control-Allow-Origin: * by default; the gateway answers CORS itself, for the origins it
// allows), cookies, Server, Alt-Svc, the framing (Content-Length, Content-Encoding,
// Transfer-Encoding: the gateway frames what it sends) and the backend's own rate limit fields,
// which describe the operator's upstream account, not the caller.
var backendResponseHeaders = map[string]bool{
	"Content-Type":         true,
	"Cache-Control":        true,
	"X-Request-Id":         true,
	"Request-Id":           true,
	"Openai-Processing-Ms": true,
	"Openai-Version":       true,
	"Retry-After":          true,
	"Retry-After-Ms":       true,
}

// copyBackendHeaders copies to dst the fields of a backend's answer a client may see. With
// the gateway's own rate limits on, their fields (Retry-After included) are the gateway's.
func copyBackendHeaders(dst, src http.Header, gatewayLimits bool) {
	for k, v := range src {
		if !backendResponseHeaders[k] || gatewayLimits && rateLimitFields[k] {
			continue
		}
		dst[k] = v
	}
}

// clientContextHeaders are request fields of a browser or of the client's own network that no
// backend needs: where the request comes from (Origin, Referer, the Fetch metadata), what the
// client's proxies said about it (Caddy's reverse proxy sets X-Forwarded-* itself, from the
// trusted client address), and its CORS preflight fields; the body's encoding (the gateway
// sends the body it re-encoded, as identity); and the fields that choose which account of the
// operator's a provider bills (OpenAI-Organization, OpenAI-Project: per backend, in the
// configuration, never the caller's to pick).
var clientContextHeaders = []string{"Origin", "Referer", "Forwarded", "X-Real-Ip", "Via",
	"Access-Control-Request-Method", "Access-Control-Request-Headers", "Content-Encoding",
	"Openai-Organization", "Openai-Project"}

// stripClientContext removes clientContextHeaders and the Sec-Fetch-* fields from a request
// going to a backend.
func stripClientContext(h http.Header) {
	for _, k := range clientContextHeaders {
		h.Del(k)
	}
	for k := range h {
		if strings.HasPrefix(k, "Sec-Fetch-") {
			delete(h, k)
		}
	}
}

// checkOrigin refuses an inference request that carries an Origin the configuration does not
// allow with a body type a browser sends without a preflight (text/plain, a form, or none):
// any web page could otherwise spend its visitors' anonymous credits. A request without an
// Origin (curl, the SDKs) passes whatever its content type; one with a JSON body from a foreign
// origin needs a preflight, which the gateway does not grant.
func (g *Gateway) checkOrigin(r *http.Request) error {
	origin := r.Header.Get("Origin")
	if origin == "" || g.originAllowed(origin) {
		return nil
	}
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return errOriginNotAllowed
	}
	mt, _, err := mime.ParseMediaType(ct)
	switch {
	case err != nil, mt == "text/plain", mt == "application/x-www-form-urlencoded", mt == "multipart/form-data":
		return errOriginNotAllowed
	}
	return nil
}
