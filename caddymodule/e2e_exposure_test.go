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
// grant. The client's browser context (Origin, Referer, Cookie, Sec-Fetch-*) does not reach the
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
			hdr := map[string]string{"Referer": "http://evil.example/page", "Cookie": "site=1", "Sec-Fetch-Site": "cross-site", "X-Mock-Probe": "yes"}
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
			for _, k := range []string{"Origin", "Referer", "Cookie", "Sec-Fetch-Site"} {
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
