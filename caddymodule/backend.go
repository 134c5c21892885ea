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
	"go.uber.org/zap/zapcore"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
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
// what was chosen, what it used and cost. They go in as one inline field (each of Caddy's
// ExtraLogFields.Add resets its logger cache): the entry has the same top-level keys as ten
// fields would give, and log filters see each of them.
func (ex *exchange) logFields() {
	if srv, ok := ex.r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv.Logs == nil {
		return // this server keeps no access log
	}
	extra, ok := ex.r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
	if !ok {
		return
	}
	f := &accessLogFields{outcome: ex.outcome, auth: ex.authKind()}
	if ex.who != nil {
		f.userID, f.keyID = ex.who.userID, ex.who.keyID
	}
	if ex.choice != nil {
		f.model, f.backend = ex.choice.Model.Name, ex.choice.BackendName
	}
	if ex.settled && ex.charged > 0 || ex.usage.InputTokens > 0 {
		f.usage, f.input, f.output, f.charged = true, ex.usage.InputTokens, ex.usage.OutputTokens, ex.charged
	}
	extra.Add(zap.Inline(f))
}

// accessLogFields are the gateway's members of an access log entry (logFields).
type accessLogFields struct {
	outcome, auth, userID, keyID, model, backend string
	// usage: the tokens and credits are logged (a charge was settled or input was read).
	usage         bool
	input, output int64
	charged       credits.Amount
}

func (f *accessLogFields) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("llm_outcome", f.outcome)
	enc.AddString("llm_auth", f.auth)
	if f.userID != "" {
		enc.AddString("llm_user_id", f.userID)
	}
	if f.keyID != "" {
		enc.AddString("llm_key_id", f.keyID)
	}
	if f.model != "" || f.backend != "" {
		enc.AddString("llm_model", f.model)
		enc.AddString("llm_backend", f.backend)
	}
	if f.usage {
		enc.AddInt64("llm_input_tokens", f.input)
		enc.AddInt64("llm_output_tokens", f.output)
		enc.AddString("llm_credits", f.charged.String())
	}
	return nil
}
