package caddymodule

import (
	"encoding/json"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// reverseProxyConfig is the JSON of the reverse_proxy handler that carries one backend's
// traffic: Caddy keeps the transport, TLS, per-backend headers and health checks; the gateway
// keeps the failover order, so the handler itself never retries.
func reverseProxyConfig(b *Backend, u *url.URL) (json.RawMessage, error) {
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	transport := map[string]any{
		"protocol":                "http",
		"dial_timeout":            b.DialTimeout,
		"response_header_timeout": b.ResponseHeaderTimeout,
		"compression":             false,
	}
	if u.Scheme == "https" {
		transport["tls"] = map[string]any{"server_name": u.Hostname()}
	}
	headers := b.upstreamHeaders()
	set := map[string][]string{"Host": {u.Host}}
	for k, v := range headers {
		set[k] = []string{v}
	}
	hc := b.HealthCheck
	if hc == nil {
		hc = &HealthCheck{}
	}
	if hc.Path == "" {
		hc.Path = "/v1/models"
		if b.Style == routing.StyleOllama {
			hc.Path = "/api/tags"
		}
	}
	if hc.Interval == 0 {
		hc.Interval = caddy.Duration(10 * time.Second)
	}
	if hc.Timeout == 0 {
		hc.Timeout = caddy.Duration(5 * time.Second)
	}
	checks := map[string]any{
		// A backend that refuses or times out twice is skipped for 10s.
		"passive": map[string]any{"fail_duration": caddy.Duration(10 * time.Second), "max_fails": 2},
	}
	if !hc.Disabled {
		// Two failed checks in a row mark the backend down: the first check runs while Caddy
		// is still starting, possibly before a backend in the same process listens.
		uri := b.base + hc.Path
		if b.query != "" && !strings.Contains(hc.Path, "?") {
			uri += "?" + b.query
		}
		active := map[string]any{"uri": uri, "interval": hc.Interval, "timeout": hc.Timeout, "fails": 2}
		if len(headers) > 0 || len(b.defaults) > 0 {
			hdr := map[string][]string{}
			for k, v := range b.defaults {
				hdr[k] = []string{v}
			}
			for k, v := range headers {
				hdr[k] = []string{v}
			}
			active["headers"] = hdr
		}
		checks["active"] = active
	}
	return json.Marshal(map[string]any{
		"upstreams":      []map[string]string{{"dial": net.JoinHostPort(u.Hostname(), port)}},
		"transport":      transport,
		"flush_interval": -1,
		"headers":        map[string]any{"request": map[string]any{"set": set}},
		"health_checks":  checks,
	})
}

// upstreamHeaders are the fields set on every request to b: its Headers, and an anthropic
// backend's api_key as X-Api-Key.
func (b *Backend) upstreamHeaders() map[string]string {
	if b.APIKey == "" {
		return b.Headers
	}
	h := map[string]string{"X-Api-Key": b.APIKey}
	for k, v := range b.Headers {
		h[k] = v
	}
	return h
}

func cloneURL(u *url.URL) *url.URL {
	c := *u
	return &c
}

// logFields adds the gateway's fields to Caddy's access log entry: who (ids, never secrets),
// what was chosen, what it used and cost.
func (ex *exchange) logFields() {
	if srv, ok := ex.r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv.Logs == nil {
		return // this server keeps no access log
	}
	extra, ok := ex.r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
	if !ok {
		return
	}
	fields := []zap.Field{zap.String("llm_outcome", ex.outcome), zap.String("llm_auth", ex.authKind())}
	if ex.who != nil {
		if ex.who.userID != "" {
			fields = append(fields, zap.String("llm_user_id", ex.who.userID))
		}
		if ex.who.keyID != "" {
			fields = append(fields, zap.String("llm_key_id", ex.who.keyID))
		}
	}
	if ex.choice != nil {
		fields = append(fields, zap.String("llm_model", ex.choice.Model.Name), zap.String("llm_backend", ex.choice.BackendName))
	}
	if ex.settled && ex.charged > 0 || ex.usage.InputTokens > 0 {
		fields = append(fields, zap.Int64("llm_input_tokens", ex.usage.InputTokens),
			zap.Int64("llm_output_tokens", ex.usage.OutputTokens), zap.Stringer("llm_credits", ex.charged))
	}
	for _, f := range fields {
		extra.Add(f)
	}
}
