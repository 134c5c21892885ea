package caddymodule_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// walkSetup serves, for every backend style, a chat and an embeddings model of that style
// only, so that a request of each surface on each style it lists reaches that style.
var walkSetup = setup{
	gateway: `
		backend oai {
			url {mock.oai}
			health_check {
				disabled
			}
			model oai-chat {
				input_price 1000
				output_price 2000
			}
			model oai-emb {
				kind embeddings
				input_price 1000
				output_price 0
			}
		}
		backend ol {
			url {mock.ol}
			style ollama
			health_check {
				disabled
			}
			model ol-chat {
				input_price 1000
				output_price 2000
			}
			model ol-emb {
				kind embeddings
				input_price 1000
				output_price 0
			}
		}
		backend ant {
			url {mock.ant}
			style anthropic
			health_check {
				disabled
			}
			model ant-chat {
				input_price 1000
				output_price 2000
			}
		}`,
	mocks: []mockSpec{{key: "oai"}, {key: "ol"}, {key: "ant"}},
}

// walkModels are walkSetup's models by style and kind, and the mock serving them.
var walkModels = map[routing.Style]struct{ mock, chat, embeddings string }{
	routing.StyleOpenAI:    {"oai", "oai-chat", "oai-emb"},
	routing.StyleOllama:    {"ol", "ol-chat", "ol-emb"},
	routing.StyleAnthropic: {"ant", "ant-chat", ""},
}

// walkPrompt is a prompt of each rule.
var walkPrompt = map[routing.PromptRule]any{
	routing.PromptMessages: []map[string]string{{"role": "user", "content": "one two three"}},
	routing.PromptString:   "one two three",
	routing.PromptInput:    "one two three",
	routing.PromptTexts:    "one two three",
}

// TestEveryRouteIsMetered walks every route of every surface the gateway serves, on every
// backend style the surface lists, JSON and streaming, and proves that each forwarded request
// was reserved and settled (a settle entry with a charge), and that the listings forward
// nothing. Then it walks the routes of the same APIs the gateway does not serve, and
// variants of the served paths (case, slashes, dot segments, encoded slashes, suffixes), and
// proves none of them reached a backend unmetered: over the whole walk, the backends received
// exactly as many model requests as there are settle entries. A new surface is walked as soon
// as it is described (routing.Surfaces); a new style or prompt rule fails here until the walk
// knows a backend or a prompt of it.
func TestEveryRouteIsMetered(t *testing.T) {
	e := startGateway(t, walkSetup)
	u, k := e.userWithKey("walk@example.com", "1000")
	// free counts the requests forwarded on routes free by contract (count_tokens).
	var free int64
	forwarded := func() int64 { return e.mockRequests("oai") + e.mockRequests("ol") + e.mockRequests("ant") - free }
	settled := func() int { return len(e.settlements(u.ID)) }

	for i := range routing.Surfaces {
		sf := &routing.Surfaces[i]
		if sf.List != routing.ListNone {
			before := forwarded()
			r := e.request(sf.Method, e.gw+sf.Path, nil, bearer(k.Key))
			if r.status != http.StatusOK {
				t.Errorf("%s %s: %s", sf.Method, sf.Path, r)
			}
			if n := forwarded() - before; n != 0 {
				t.Errorf("%s %s: a listing forwarded %d requests", sf.Method, sf.Path, n)
			}
			continue
		}
		prompt, ok := walkPrompt[sf.PromptRule]
		if !ok {
			t.Errorf("%s: the walk has no prompt of rule %d: add one to walkPrompt", sf.Path, sf.PromptRule)
			continue
		}
		for _, style := range sf.Styles {
			m, ok := walkModels[style]
			if !ok {
				t.Errorf("%s: the walk has no backend of style %q: add one to walkSetup and walkModels", sf.Path, style)
				continue
			}
			model := m.chat
			if sf.Kind == routing.KindEmbeddings {
				model = m.embeddings
			}
			streams := []bool{false}
			if sf.Streams {
				streams = append(streams, true)
			}
			for _, stream := range streams {
				body := map[string]any{"model": model, sf.Prompt: prompt}
				if sf.Streams {
					body["stream"] = stream
				}
				if len(sf.OutputFields) > 0 {
					if sf.OutputIn == "" {
						body[sf.OutputFields[0]] = 4
					} else {
						body[sf.OutputIn] = map[string]any{sf.OutputFields[0]: 4}
					}
				}
				raw, _ := json.Marshal(body)
				beforeForwarded, beforeSettled := e.mockCounts(m.mock)[sf.Path], settled()
				r := e.post(sf.Path, string(raw), bearer(k.Key))
				name := sf.Path + " on " + string(style)
				if stream {
					name += " streaming"
				}
				if r.status != http.StatusOK {
					t.Errorf("%s: %s", name, r)
					continue
				}
				if n := e.mockCounts(m.mock)[sf.Path] - beforeForwarded; n != 1 {
					t.Errorf("%s: the %s backend received %d requests, want 1", name, style, n)
				}
				st := e.settlements(u.ID)
				if sf.Free {
					free++
					if len(st) != beforeSettled {
						t.Errorf("%s: free by contract, but settled %+v", name, st[len(st)-1])
					}
					continue
				}
				newest := st[len(st)-1]
				if len(st) != beforeSettled+1 || newest.Amount <= 0 || newest.Usage == nil || newest.Usage.Model != model {
					t.Errorf("%s: settle entries %d -> %d, newest %+v: want one new entry charging %s", name, beforeSettled, len(st), newest, model)
				}
			}
		}
	}

	// The routes of the same APIs that the gateway does not serve, and variants of the paths
	// it serves: whatever each is answered, nothing reaches a backend without its settle entry.
	var paths []string
	for _, p := range []string{
		"/v1/audio/speech", "/v1/audio/transcriptions", "/v1/images/generations", "/v1/files",
		"/v1/batches", "/v1/fine_tuning/jobs", "/v1/moderations", "/v1/assistants", "/v1/threads",
		"/v1/vector_stores", "/v1/uploads", "/v1/realtime/sessions", "/v1/organization/costs",
		"/v1/models/oai-chat", "/v1/embeddings/x", "/v1/complete",
		"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/show", "/api/copy", "/api/ps",
		"/api/version", "/api/blobs/sha256:00", "/api/chat/x",
	} {
		paths = append(paths, p)
	}
	for i := range routing.Surfaces {
		p := routing.Surfaces[i].Path
		paths = append(paths, strings.ToUpper(p), p+"/", p+"/x", strings.Replace(p, "/", "//", 2),
			strings.Replace(p, "/", "/./", 2), strings.Replace(p, "/", "/x/../", 2),
			strings.Replace(p[1:], "/", "%2F", -1), p+"%2F", p+";x", p+"%00", p+".json")
	}
	chat, _ := json.Marshal(map[string]any{"model": "oai-chat", "messages": walkPrompt[routing.PromptMessages],
		"prompt": "one two", "input": "one two", "max_tokens": 4, "options": map[string]any{"num_predict": 4}})
	for _, p := range paths {
		if !strings.HasPrefix(p, "/") {
			p = "/" + p
		}
		for _, method := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete} {
			var body any
			if method != http.MethodGet && method != http.MethodDelete {
				body = string(chat)
			}
			r := e.request(method, e.gw+p, body, bearer(k.Key))
			if r.status == http.StatusOK {
				continue // a served route after Caddy's cleaning: counted by the invariant below
			}
			// Under the gateway's prefixes, an error its clients can read; elsewhere the
			// site's own answer (the gateway never sees the request).
			mine := strings.HasPrefix(p, "/v1/") || strings.HasPrefix(p, "/api/")
			if r.status < 400 || mine && !json.Valid(r.body) {
				t.Errorf("%s %s: %d %q, want a JSON error", method, p, r.status, truncate(string(r.body), 200))
			}
		}
	}
	if f, s := forwarded(), int64(settled()); f != s {
		t.Errorf("the backends received %d model requests and %d were settled: some route forwards unmetered", f, s)
	}
	e.checkAllAccounts(0)
}
