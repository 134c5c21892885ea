package caddymodule_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// exposedBackend is an OpenAI-style backend that answers like a stock vLLM behind a careless
// proxy: CORS for every origin with credentials, a cookie, its own Server and rate limit
// fields, beside what SDKs read. It records what reached it.
type exposedBackend struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []*http.Request
}

func newExposedBackend(t *testing.T) *exposedBackend {
	b := &exposedBackend{}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.mu.Lock()
		b.reqs = append(b.reqs, r.Clone(r.Context()))
		b.mu.Unlock()
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("Access-Control-Allow-Credentials", "true")
		h.Set("Access-Control-Allow-Headers", "*")
		h.Set("Set-Cookie", "backend_session=secret; Path=/")
		h.Set("Server", "uvicorn")
		h.Set("Alt-Svc", `h3=":443"`)
		h.Set("X-Ratelimit-Remaining-Requests", "4999")
		h.Set("X-Request-Id", "req_backend_1")
		h.Set("Openai-Processing-Ms", "12")
		h.Set("X-Internal-Node", "gpu-7.internal")
		if strings.Contains(r.URL.Path, "chat") && strings.Contains(readAll(r), `"stream":true`) {
			h.Set("Content-Type", "text/event-stream")
			fmt.Fprint(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n")
			fmt.Fprint(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n")
			fmt.Fprint(w, "data: [DONE]\n\n")
			return
		}
		h.Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}`)
	}))
	t.Cleanup(b.Close)
	return b
}

func readAll(r *http.Request) string {
	var sb strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := r.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			return sb.String()
		}
	}
}

func (b *exposedBackend) requests() []*http.Request {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*http.Request(nil), b.reqs...)
}

// exposedGateway runs an anonymous gateway in front of b that allows the origin
// http://app.example.
func exposedGateway(t *testing.T, b *exposedBackend, extra string) *env {
	return startGateway(t, setup{gateway: `
		allowed_origins http://app.example
		anonymous {
			credits 1
			period 24h
			signin_url http://app.example/signin
		}` + extra + `
		backend exposed {
			url ` + b.URL + `/base?api-version=2024-10-21
			health_check {
				disabled
			}
			model m {
				input_price 100
				output_price 200
			}
		}`})
}

// TestBackendHeadersAllowlisted: of a backend's response fields only those SDKs read reach
// the client (API.md §5's CORS is the gateway's, for its own allowed origins): a backend's
// Access-Control-Allow-Origin: * with credentials, its cookies, Server, Alt-Svc and internal
// fields never do, for buffered and streamed answers, and a disallowed origin gets no CORS
// grant. The client's browser context (Origin, Referer, Cookie, Sec-Fetch-*), its body encoding
// and the provider account fields (OpenAI-Organization, OpenAI-Project) do not reach the
// backend; other headers (X-Mock-*) do.
func TestBackendHeadersAllowlisted(t *testing.T) {
	b := newExposedBackend(t)
	e := exposedGateway(t, b, "")
	chat := `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
	for _, tc := range []struct {
		name, origin, body string
	}{
		{"buffered, allowed origin", "http://app.example", chat},
		{"buffered, foreign origin", "http://evil.example", chat},
		{"buffered, no origin", "", chat},
		{"streamed, foreign origin", "http://evil.example", strings.Replace(chat, `{"model"`, `{"stream":true,"model"`, 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr := map[string]string{"Referer": "http://evil.example/page", "Cookie": "site=1", "Sec-Fetch-Site": "cross-site", "X-Mock-Probe": "yes",
				"OpenAI-Organization": "org-of-the-callers-choice", "OpenAI-Project": "proj_x", "Content-Encoding": "identity"}
			if tc.origin != "" {
				hdr["Origin"] = tc.origin
			}
			r := e.post("/v1/chat/completions", tc.body, hdr)
			if r.status != http.StatusOK {
				t.Fatalf("%s", r)
			}
			for _, k := range []string{"Access-Control-Allow-Credentials", "Access-Control-Allow-Headers", "Set-Cookie", "Alt-Svc",
				"X-Ratelimit-Remaining-Requests", "X-Internal-Node"} {
				if v := r.header.Values(k); len(v) > 0 {
					t.Errorf("the backend's %s %q reached the client", k, v)
				}
			}
			if r.header.Get("Server") == "uvicorn" {
				t.Errorf("the backend's Server reached the client")
			}
			acao := r.header.Get("Access-Control-Allow-Origin")
			if tc.origin == "http://app.example" && acao != tc.origin || tc.origin != "http://app.example" && acao != "" {
				t.Errorf("origin %q: Access-Control-Allow-Origin %q", tc.origin, acao)
			}
			if r.header.Get("X-Request-Id") != "req_backend_1" || r.header.Get("Openai-Processing-Ms") != "12" {
				t.Errorf("the request id and processing time SDKs read did not pass: %v", r.header)
			}
			if !strings.HasPrefix(r.header.Get("Content-Type"), "application/json") && !strings.HasPrefix(r.header.Get("Content-Type"), "text/event-stream") {
				t.Errorf("Content-Type %q", r.header.Get("Content-Type"))
			}
			reqs := b.requests()
			got := reqs[len(reqs)-1].Header
			for _, k := range []string{"Origin", "Referer", "Cookie", "Sec-Fetch-Site", "Openai-Organization", "Openai-Project", "Content-Encoding"} {
				if v := got.Values(k); len(v) > 0 {
					t.Errorf("the client's %s %q reached the backend", k, v)
				}
			}
			if got.Get("X-Mock-Probe") != "yes" {
				t.Errorf("X-Mock-Probe did not reach the backend: %v", got)
			}
		})
	}
}

// TestForeignOriginSimpleRequestRefused: a page on an origin the configuration does not allow
// can POST a text/plain (or form, or untyped) body without a CORS preflight; the gateway
// refuses it 403 origin_not_allowed before anything is reserved or forwarded. Without an Origin
// (curl -d, the SDKs), or from an allowed origin, the same request passes; a JSON body from a
// foreign origin needs a preflight, which is not granted.
func TestForeignOriginSimpleRequestRefused(t *testing.T) {
	b := newExposedBackend(t)
	e := exposedGateway(t, b, "")
	chat := `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
	send := func(origin, ct string) *response {
		req := e.newRequest(t.Context(), http.MethodPost, e.gw+"/v1/chat/completions", chat, nil)
		req.Header.Del("Content-Type")
		if ct != "" {
			req.Header.Set("Content-Type", ct)
		}
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var sb strings.Builder
		buf := make([]byte, 4096)
		for {
			n, err := resp.Body.Read(buf)
			sb.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return &response{status: resp.StatusCode, header: resp.Header, body: []byte(sb.String())}
	}
	for _, ct := range []string{"text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "TEXT/PLAIN"} {
		for _, origin := range []string{"http://evil.example", "null"} {
			r := send(origin, ct)
			errorOf(t, r, http.StatusForbidden, "origin_not_allowed")
			if acao := r.header.Get("Access-Control-Allow-Origin"); acao != "" {
				t.Errorf("the refusal grants CORS to %q", acao)
			}
		}
	}
	if n := len(b.requests()); n != 0 {
		t.Fatalf("refused requests reached the backend %d times", n)
	}
	if accs := e.accounts(); len(accs) != 0 {
		t.Fatalf("refused requests touched the books: %+v", accs)
	}
	// The preflight a JSON body needs is not granted to the foreign origin.
	pre := e.request(http.MethodOptions, e.gw+"/v1/chat/completions", nil, map[string]string{
		"Origin": "http://evil.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
	if pre.header.Get("Access-Control-Allow-Origin") != "" || pre.header.Get("Access-Control-Allow-Headers") != "" {
		t.Errorf("the foreign origin's preflight was granted: %v", pre.header)
	}
	for _, tc := range []struct{ origin, ct string }{
		{"", ""}, {"", "text/plain"}, {"", "application/x-www-form-urlencoded"},
		{"http://app.example", "text/plain"}, {"http://evil.example", "application/json"},
	} {
		if r := send(tc.origin, tc.ct); r.status != http.StatusOK {
			t.Errorf("origin %q, content type %q: %s", tc.origin, tc.ct, r)
		}
	}
	e.checkAllAccounts(0)
}

// TestErrorShapePerSurface: on /api/* every gateway error is Ollama's shape, error a string
// (ollama-js shows an object as "[object Object]") with code and details beside it; the same
// refusals on /v1/* keep the OpenAI shape (API.md §5).
func TestErrorShapePerSurface(t *testing.T) {
	e := startGateway(t, setup{
		gateway: `
		max_request_body 2KB
		failover 1
		allowed_origins http://app.example
		rate_limits {
			default_tier roomy
			tier roomy {
				requests_per_minute 1000
			}
			tier tight {
				requests_per_minute 1
			}
		}
		backend ollama {
			url {mock.ollama}
			style ollama
			health_check {
				disabled
			}
			model m {
				input_price 100
				output_price 200
			}
		}
		backend oai {
			url {mock.oai}
			health_check {
				disabled
			}
			model m {
				input_price 100
				output_price 200
			}
		}
		backend gone {
			url {closed}
			style ollama
			dial_timeout 1s
			health_check {
				disabled
			}
			model m-gone {
				input_price 1
				output_price 1
			}
		}
		backend gone-oai {
			url {closed2}
			dial_timeout 1s
			health_check {
				disabled
			}
			model m-gone {
				input_price 1
				output_price 1
			}
		}`,
		mocks: []mockSpec{{key: "ollama", lines: "models m m-gone"}, {key: "oai", lines: "models m m-gone"}},
	})
	u, k := e.userWithKey("shape@example.com", "10")
	poor, _ := e.userWithKey("poor@example.com", "0.000001")
	poorKey := e.createKey(poor.ID, map[string]any{"name": "poor"})
	scoped := e.createKey(u.ID, map[string]any{"name": "models", "scopes": []string{"models:read"}})
	limited, _ := e.userWithKey("limited@example.com", "10")
	tight := e.createKey(limited.ID, map[string]any{"name": "tight", "rate_limit_tier": "tight"})
	auth := bearer(k.Key)
	chat := `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
	// The tight key's one request a minute, spent before the table.
	if r := e.post("/api/chat", chat, bearer(tight.Key)); r.status != http.StatusOK {
		t.Fatalf("the tight key's first request: %s", r)
	}
	cases := []struct {
		name, method, body string
		hdr                map[string]string
		status             int
		code               string
	}{
		{"bad json", "POST", `{"model":`, auth, 400, "invalid_request"},
		{"no credentials", "POST", chat, nil, 401, "missing_api_key"},
		{"bad key", "POST", chat, bearer(flipLast(k.Key)), 401, "invalid_api_key"},
		{"no credits", "POST", chat, bearer(poorKey.Key), 402, "insufficient_credits"},
		{"scope", "POST", chat, bearer(scoped.Key), 403, "insufficient_scope"},
		{"foreign origin", "POST", chat, map[string]string{"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403, "origin_not_allowed"},
		{"unknown model", "POST", `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`, auth, 404, "model_not_found"},
		{"method", "GET", "", auth, 405, "method_not_allowed"},
		{"too large", "POST", `{"model":"m","messages":[{"role":"user","content":"` + strings.Repeat("x", 4096) + `"}]}`, auth, 413, "request_too_large"},
		{"rate limited", "POST", chat, bearer(tight.Key), 429, "rate_limit_exceeded"},
		{"backend down", "POST", `{"model":"m-gone","messages":[{"role":"user","content":"hi"}]}`, auth, 502, "upstream_error"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var body any
			if c.body != "" {
				body = c.body
			}
			r := e.request(c.method, e.gw+"/api/chat", body, c.hdr)
			if r.status != c.status {
				t.Fatalf("/api/chat: want %d, got %s", c.status, r)
			}
			if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("/api/chat: Content-Type %q", ct)
			}
			m := r.object(t)
			if msg, ok := m["error"].(string); !ok || msg == "" {
				t.Errorf("/api/chat: error is not a message string: %s", r)
			}
			if m["code"] != c.code {
				t.Errorf("/api/chat: code %v, want %s", m["code"], c.code)
			}
			if _, ok := m["success"]; ok {
				t.Errorf("/api/chat: the OpenAI envelope leaked: %s", r)
			}
			if c.status == 402 {
				if d, _ := m["details"].(map[string]any); d["required"] == nil {
					t.Errorf("/api/chat: 402 without details.required: %s", r)
				}
			}
			// The same refusal on the OpenAI surface keeps its shape.
			r = e.request(c.method, e.gw+"/v1/chat/completions", body, c.hdr)
			errorOf(t, r, c.status, c.code)
			if _, ok := r.object(t)["error"].(map[string]any); !ok {
				t.Errorf("/v1/chat/completions: error is not an object: %s", r)
			}
		})
	}
	// The Ollama catalog route too.
	r := e.request(http.MethodGet, e.gw+"/api/tags", nil, bearer(flipLast(k.Key)))
	if msg, ok := r.object(t)["error"].(string); r.status != 401 || !ok || msg == "" {
		t.Errorf("/api/tags with a bad key: %s", r)
	}
}

// TestUnknownGatewayRoutesAnswerJSON: every path under /v1/ and /api/ the gateway does not
// serve answers the contract's JSON error in its surface's shape (404 not_found, or 501
// not_implemented for an API of a surface it speaks but does not serve yet), with CORS for an
// allowed origin, instead of the site's plain-text 404; the sign-in routes under /api/ and
// elsewhere keep working, and paths outside the prefixes still reach the next handler.
func TestUnknownGatewayRoutesAnswerJSON(t *testing.T) {
	e := startGateway(t, setup{
		gateway: `
		allowed_origins http://app.example
		signin {
			issuer {gw}
		}` + backendBlock("oai", "oai", "m", "100", "200"),
		mocks: []mockSpec{{key: "oai", lines: "models m"}},
	})
	_, k := e.userWithKey("routes@example.com", "10")
	for _, c := range []struct {
		method, path string
		status       int
		code         string
		shape        string // "openai", "ollama" or "anthropic"
	}{
		{"POST", "/v1/responses", 400, "invalid_request", "openai"}, // served: {} has no model
		{"GET", "/v1/responses/resp_1", 404, "not_found", "openai"}, // nobody's response
		{"PUT", "/v1/responses/resp_1", 405, "method_not_allowed", "openai"},
		{"POST", "/v1/completions", 400, "invalid_request", "openai"}, // served: {} has no model
		{"POST", "/v1/audio/speech", 501, "not_implemented", "openai"},
		{"POST", "/v1/images/generations", 501, "not_implemented", "openai"},
		{"POST", "/v1/messages", 400, "invalid_request", "anthropic"}, // served: {} has no model
		{"POST", "/v1/messages/count_tokens", 400, "invalid_request", "anthropic"},
		{"POST", "/v1/messages/batches", 501, "not_implemented", "anthropic"},
		{"GET", "/v1/messages/batches/msgbatch_1", 501, "not_implemented", "anthropic"},
		{"POST", "/api/embed", 400, "invalid_request", "ollama"},
		{"POST", "/api/embeddings", 400, "invalid_request", "ollama"},
		{"POST", "/api/show", 501, "not_implemented", "ollama"},
		{"POST", "/v1/nonsense", 404, "not_found", "openai"},
		{"GET", "/v1/", 404, "not_found", "openai"},
		{"POST", "/v1/chat/completions/", 404, "not_found", "openai"},
		{"POST", "/v1/completionsX", 404, "not_found", "openai"},
		{"GET", "/api/nonsense", 404, "not_found", "ollama"},
		{"DELETE", "/api/pull", 404, "not_found", "ollama"},
	} {
		r := e.request(c.method, e.gw+c.path, `{}`, map[string]string{"Authorization": "Bearer " + k.Key, "Origin": "http://app.example"})
		if r.status != c.status {
			t.Errorf("%s %s: want %d, got %s", c.method, c.path, c.status, r)
			continue
		}
		if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Errorf("%s %s: Content-Type %q", c.method, c.path, ct)
		}
		if r.header.Get("Access-Control-Allow-Origin") != "http://app.example" {
			t.Errorf("%s %s: no CORS for the allowed origin, the browser cannot read the error", c.method, c.path)
		}
		m := r.object(t)
		switch c.shape {
		case "openai":
			errorOf(t, r, c.status, c.code)
		case "ollama":
			if msg, _ := m["error"].(string); msg == "" || m["code"] != c.code {
				t.Errorf("%s %s: not Ollama's shape: %s", c.method, c.path, r)
			}
		case "anthropic":
			eo, _ := m["error"].(map[string]any)
			if m["type"] != "error" || eo == nil || eo["message"] == "" || eo["type"] == "" || m["code"] != c.code {
				t.Errorf("%s %s: not Anthropic's shape: %s", c.method, c.path, r)
			}
		}
	}
	// The sign-in routes (one of them under /api/) and the gateway's own routes still work.
	for _, c := range []struct {
		method, path string
		status       int
	}{
		{"GET", "/.well-known/oauth-authorization-server", 200},
		{"GET", "/auth/login", 200},
		{"GET", "/api/third-party/auth", 400},
		{"GET", "/v1/models", 200},
	} {
		r := e.request(c.method, e.gw+c.path, nil, bearer(k.Key))
		if r.status != c.status {
			t.Errorf("%s %s: want %d, got %s", c.method, c.path, c.status, r)
		}
	}
	// Outside the prefixes the next handler answers (the site's own 404).
	if r := e.request(http.MethodGet, e.gw+"/elsewhere", nil, nil); r.status != http.StatusNotFound || strings.HasPrefix(r.header.Get("Content-Type"), "application/json") {
		t.Errorf("GET /elsewhere: %s %q", r, r.header.Get("Content-Type"))
	}
}

// TestBackendQueryKeptClientQueryDropped: a backend URL's own query (Azure's api-version) is
// sent on every request, under its path prefix; the client's query string never reaches the
// backend, nor overrides the backend's parameters.
func TestBackendQueryKeptClientQueryDropped(t *testing.T) {
	b := newExposedBackend(t)
	e := exposedGateway(t, b, "")
	chat := `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
	for _, q := range []string{"", "?foo=bar", "?api-version=evil&stream=true", "?x=%2F..%2F&user=someone"} {
		if r := e.post("/v1/chat/completions"+q, chat, nil); r.status != http.StatusOK {
			t.Fatalf("query %q: %s", q, r)
		}
		reqs := b.requests()
		got := reqs[len(reqs)-1].URL
		if got.Path != "/base/v1/chat/completions" || got.RawQuery != "api-version=2024-10-21" {
			t.Errorf("client query %q: the backend got %s, want /base/v1/chat/completions?api-version=2024-10-21", q, got)
		}
	}
}
