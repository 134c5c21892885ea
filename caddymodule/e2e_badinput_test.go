package caddymodule_test

import (
	"net/http"
	"strings"
	"testing"
)

// TestBadInputChangesNothing: every malformed, oversized, unauthorised or unroutable request is
// answered with its status and stable JSON error code, and neither moves a credit nor reaches a
// backend.
func TestBadInputChangesNothing(t *testing.T) {
	e := startGateway(t, setup{
		gateway: `
		max_request_body 2KB
		max_tokens_cap 4096
		backend oai {
			url {mock.oai}
			health_check {
				disabled
			}
			model mock-small {
				input_price 1000
				output_price 2000
			}
			model mock-embed {
				kind embeddings
				input_price 100
				output_price 0
			}
		}`,
		mocks: []mockSpec{{key: "oai", lines: "models mock-small mock-embed"}},
	})
	u, k := e.userWithKey("careful@example.com", "10")
	other, otherKey := e.userWithKey("other@example.com", "10")
	revoked := e.createKey(u.ID, nil)
	e.adminCall(http.MethodDelete, "/llm_gateway/keys/"+revoked.ID, nil, http.StatusOK, nil, nil)
	modelsOnly := e.createKey(u.ID, map[string]any{"name": "catalog", "scopes": []string{"models:read"}})
	chatOnly := e.createKey(u.ID, map[string]any{"name": "chat", "scopes": []string{"chat:write"}})

	good := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}]}`
	withMax := func(v string) string {
		return `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":` + v + `}`
	}
	withModel := func(m string) string {
		return `{"model":` + m + `,"messages":[{"role":"user","content":"hi"}]}`
	}
	auth := bearer(k.Key)
	bigBody := `{"model":"mock-small","messages":[{"role":"user","content":"` + strings.Repeat("word ", 1000) + `"}]}`

	cases := []struct {
		name         string
		method, path string
		body         string
		hdr          map[string]string
		status       int
		code         string // "" for a plain-status answer (405)
		wwwAuth      string // a substring of WWW-Authenticate, if any
	}{
		{"malformed JSON", "POST", "/v1/chat/completions", `{"model":"mock-small","messages":[`, auth, 400, "invalid_request", ""},
		{"JSON array body", "POST", "/v1/chat/completions", `[1,2]`, auth, 400, "invalid_request", ""},
		{"empty body", "POST", "/v1/chat/completions", ``, auth, 400, "invalid_request", ""},
		{"missing model", "POST", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, auth, 400, "invalid_request", ""},
		{"model not a string", "POST", "/v1/chat/completions", withModel(`42`), auth, 400, "invalid_request", ""},
		{"missing messages", "POST", "/v1/chat/completions", `{"model":"mock-small"}`, auth, 400, "invalid_request", ""},
		{"empty messages", "POST", "/v1/chat/completions", `{"model":"mock-small","messages":[]}`, auth, 400, "invalid_request", ""},
		{"message not an object", "POST", "/v1/chat/completions", `{"model":"mock-small","messages":["hi"]}`, auth, 400, "invalid_request", ""},
		{"stream not a boolean", "POST", "/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"stream":"yes"}`, auth, 400, "invalid_request", ""},
		{"unknown model", "POST", "/v1/chat/completions", withModel(`"gpt-9"`), auth, 404, "model_not_found", ""},
		{"chat model for embeddings", "POST", "/v1/embeddings", `{"model":"mock-small","input":"hi"}`, auth, 404, "model_not_found", ""},
		{"missing embeddings input", "POST", "/v1/embeddings", `{"model":"mock-embed"}`, auth, 400, "invalid_request", ""},
		{"oversized body", "POST", "/v1/chat/completions", bigBody, auth, 413, "request_too_large", ""},
		{"negative max_tokens", "POST", "/v1/chat/completions", withMax("-1"), auth, 400, "invalid_request", ""},
		{"zero max_tokens", "POST", "/v1/chat/completions", withMax("0"), auth, 400, "invalid_request", ""},
		{"absurd max_tokens", "POST", "/v1/chat/completions", withMax("99999999999999999999"), auth, 400, "invalid_request", ""},
		{"max_tokens above the cap", "POST", "/v1/chat/completions", withMax("5000"), auth, 400, "invalid_request", ""},
		{"fractional max_tokens", "POST", "/v1/chat/completions", withMax("1.5"), auth, 400, "invalid_request", ""},
		{"string max_tokens", "POST", "/v1/chat/completions", withMax(`"10"`), auth, 400, "invalid_request", ""},
		{"negative num_predict", "POST", "/api/chat", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":-5}}`, auth, 400, "invalid_request", ""},
		{"negative max_price", "POST", "/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_price":-1}`, auth, 400, "invalid_request", ""},
		{"bad X-Max-Price", "POST", "/v1/chat/completions", good, map[string]string{"Authorization": "Bearer " + k.Key, "X-Max-Price": "1e9"}, 400, "invalid_request", ""},
		{"model is a URL", "POST", "/v1/chat/completions", withModel(`"http://127.0.0.1:22/x"`), auth, 400, "invalid_request", ""},
		{"model is a path", "POST", "/v1/chat/completions", withModel(`"../../etc/passwd"`), auth, 400, "invalid_request", ""},
		{"model is an absolute path", "POST", "/v1/chat/completions", withModel(`"/v1/models"`), auth, 400, "invalid_request", ""},
		{"model with a query", "POST", "/v1/chat/completions", withModel(`"mock-small?x=1"`), auth, 400, "invalid_request", ""},
		{"model with a control byte", "POST", "/v1/chat/completions", withModel(`"mock-small\n"`), auth, 400, "invalid_request", ""},
		{"model with an at sign", "POST", "/v1/chat/completions", withModel(`"user@host"`), auth, 400, "invalid_request", ""},
		{"wrong method GET", "GET", "/v1/chat/completions", "", auth, 405, "", ""},
		{"wrong method PUT", "PUT", "/v1/embeddings", good, auth, 405, "", ""},
		{"wrong method POST on the catalog", "POST", "/v1/models", good, auth, 405, "", ""},
		{"two different credentials", "POST", "/v1/chat/completions", good, map[string]string{"Authorization": "Bearer " + k.Key, "X-API-Key": otherKey.Key}, 400, "invalid_request", ""},
		{"10 KB Authorization", "POST", "/v1/chat/completions", good, map[string]string{"Authorization": "Bearer " + strings.Repeat("a", 10<<10)}, 401, "invalid_api_key", `realm="llm_gateway"`},
		{"binary X-API-Key", "POST", "/v1/chat/completions", good, map[string]string{"X-API-Key": "sk_live_\x80\xff\xfe\x90abc"}, 401, "invalid_api_key", `realm="llm_gateway"`},
		{"malformed key", "POST", "/v1/chat/completions", good, bearer("sk_live_not_a_key"), 401, "invalid_api_key", `Bearer realm="llm_gateway"`},
		{"key with a wrong checksum", "POST", "/v1/chat/completions", good, bearer(flipLast(k.Key)), 401, "invalid_api_key", `error="invalid_token"`},
		{"unsupported scheme", "POST", "/v1/chat/completions", good, map[string]string{"Authorization": "Basic dXNlcjpwYXNz"}, 401, "invalid_api_key", `realm="llm_gateway"`},
		{"empty bearer", "POST", "/v1/chat/completions", good, map[string]string{"Authorization": "Bearer "}, 401, "", `realm="llm_gateway"`},
		{"revoked key", "POST", "/v1/chat/completions", good, bearer(revoked.Key), 401, "revoked_api_key", `error="invalid_token"`},
		{"key without chat:write", "POST", "/v1/chat/completions", good, bearer(modelsOnly.Key), 403, "insufficient_scope", `scope="chat:write"`},
		{"key without embeddings:write", "POST", "/v1/embeddings", `{"model":"mock-embed","input":"hi"}`, bearer(chatOnly.Key), 403, "insufficient_scope", `scope="embeddings:write"`},
		{"key without models:read", "GET", "/v1/models", "", bearer(chatOnly.Key), 403, "insufficient_scope", `scope="models:read"`},
		{"no credentials, anonymous off", "POST", "/v1/chat/completions", good, nil, 401, "missing_api_key", `Bearer realm="llm_gateway"`},
	}

	balances := func() [2]string {
		return [2]string{e.balance(u.ID).String(), e.balance(other.ID).String()}
	}
	startBalances := balances()
	startRequests := e.mockRequests("oai")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var body any
			if c.body != "" {
				body = c.body
			}
			r := e.request(c.method, e.gw+c.path, body, c.hdr)
			switch {
			case c.code != "":
				eo := errorOf(t, r, c.status, c.code)
				if c.status == 400 && c.name == "two different credentials" {
					if msg, _ := eo["message"].(string); strings.Contains(msg, k.Key) || strings.Contains(msg, otherKey.Key) {
						t.Errorf("the error repeats a key: %s", msg)
					}
				}
			case r.status != c.status:
				t.Errorf("want %d, got %s", c.status, r)
			default:
				if c.status == 405 {
					if r.header.Get("Allow") == "" {
						t.Errorf("405 without Allow")
					}
					errorOf(t, r, 405, "method_not_allowed")
				}
			}
			if c.wwwAuth != "" {
				if got := r.header.Get("WWW-Authenticate"); !strings.Contains(got, c.wwwAuth) || !strings.HasPrefix(got, "Bearer ") {
					t.Errorf("WWW-Authenticate %q, want it to contain %q", got, c.wwwAuth)
				}
			}
			if c.code == "missing_api_key" {
				if got := r.header.Get("WWW-Authenticate"); strings.Contains(got, "error=") {
					t.Errorf("no credentials: WWW-Authenticate %q must not carry an error (RFC 6750 §3.1)", got)
				}
			}
			for _, s := range []string{k.Key, otherKey.Key, revoked.Key} {
				if strings.Contains(string(r.body), s) {
					t.Errorf("the answer repeats a key")
				}
			}
			if got := balances(); got != startBalances {
				t.Errorf("balances %v, want %v unchanged", got, startBalances)
			}
			if got := e.mockRequests("oai"); got != startRequests {
				t.Errorf("the backend got %d requests", got-startRequests)
			}
		})
	}
	// And the same key still works, and only now does a credit move.
	r := e.post("/v1/chat/completions", good, auth)
	if r.status != http.StatusOK {
		t.Fatalf("a good request after the bad ones: %s", r)
	}
	e.settledAudit(u.ID)
	e.settledAudit(other.ID)
	e.checkAllAccounts(0)
}

// flipLast changes the last character of a key, which breaks its checksum.
func flipLast(key string) string {
	b := []byte(key)
	if b[len(b)-1] == 'a' {
		b[len(b)-1] = 'b'
	} else {
		b[len(b)-1] = 'a'
	}
	return string(b)
}
