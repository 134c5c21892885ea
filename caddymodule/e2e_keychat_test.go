package caddymodule_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddyserver/caddy/v2"
)

// keyChatSetup: an OpenAI-style backend (chat and embeddings) and an Ollama-style one.
const (
	oaiIn, oaiOut     = "1000", "2000"
	embedIn           = "500"
	ollamaIn, ollaOut = "300", "600"
)

func keyChatSetup() setup {
	return setup{
		logLevel: "DEBUG",
		gateway: `
		billing_url http://billing.example/top-up
		backend oai {
			url {mock.oai}
			style openai
			health_check {
				disabled
			}
			model mock-small {
				input_price ` + oaiIn + `
				output_price ` + oaiOut + `
			}
			model mock-embed {
				kind embeddings
				input_price ` + embedIn + `
				output_price 0
			}
		}
		backend oll {
			url {mock.oll}
			style ollama
			health_check {
				disabled
			}
			model llama-mock {
				upstream llama3.2:1b
				input_price ` + ollamaIn + `
				output_price ` + ollaOut + `
			}
		}`,
		mocks: []mockSpec{
			{key: "oai", lines: "models mock-small mock-embed"},
			{key: "oll", lines: "models llama3.2:1b"},
		},
	}
}

// TestKeyChatBothStyles: a user with credits and an API key uses every inference route, in both
// API styles, streaming and not, with each header form of API.md §3, and pays exactly what the
// backend reported; the key never shows up in Caddy's logs.
func TestKeyChatBothStyles(t *testing.T) {
	e := startGateway(t, keyChatSetup())
	const initial = "10"
	u, k := e.userWithKey("alice@example.com", initial)
	broke, brokeKey := e.userWithKey("broke@example.com", "")
	var spent credits.Amount
	headerForms := []map[string]string{
		{"Authorization": "Bearer " + k.Key},
		{"X-API-Key": k.Key},
		{"apikey": k.Key},
		{"Authorization": "bearer " + k.Key},
	}

	// OpenAI, not streaming, each header form.
	for i, h := range headerForms {
		r := e.post("/v1/chat/completions",
			`{"model":"mock-small","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello big world"}],"max_tokens":12}`, h)
		if r.status != http.StatusOK {
			t.Fatalf("header form %d: %s", i, r)
		}
		want := cost(t, 5, 12, oaiIn, oaiOut)
		spent += want
		if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
			t.Errorf("header form %d: X-Credits-Charged %s, want %s", i, got, want)
		}
		if got, w := amountOf(t, r.header.Get("X-Credits-Remaining")), credits.Amount(micro(t, initial))-spent; got != w {
			t.Errorf("header form %d: X-Credits-Remaining %s, want %s", i, got, w)
		}
		if r.header.Get("X-Gateway-Model") != "mock-small" || r.header.Get("X-Gateway-Backend") != "oai" {
			t.Errorf("header form %d: X-Gateway-Model %q, X-Gateway-Backend %q", i, r.header.Get("X-Gateway-Model"), r.header.Get("X-Gateway-Backend"))
		}
		m := r.object(t)
		choice := m["choices"].([]any)[0].(map[string]any)
		if got := choice["message"].(map[string]any)["content"]; got != tokens(12) {
			t.Errorf("content %q, want %q", got, tokens(12))
		}
		us := m["usage"].(map[string]any)
		if num(t, us["prompt_tokens"]) != 5 || num(t, us["completion_tokens"]) != 12 {
			t.Errorf("usage %v, want 5 and 12", us)
		}
	}

	// OpenAI streaming without include_usage: correct billing, no usage chunk, [DONE].
	{
		r := e.post("/v1/chat/completions",
			`{"model":"mock-small","messages":[{"role":"user","content":"stream to me please"}],"max_tokens":10,"stream":true}`,
			map[string]string{"X-API-Key": k.Key})
		if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("Content-Type"), "text/event-stream") {
			t.Fatalf("stream: %s (%s)", r, r.header.Get("Content-Type"))
		}
		events := sseEvents(t, r.body)
		if len(events) == 0 || events[len(events)-1] != "[DONE]" {
			t.Fatalf("stream does not end with [DONE]: %q", events)
		}
		var content strings.Builder
		for _, ev := range events[:len(events)-1] {
			m := decodeObject(t, ev)
			if u, ok := m["usage"]; ok && u != nil {
				t.Errorf("a usage chunk the client did not ask for reached it: %s", ev)
			}
			if strings.Contains(ev, "credits_charged") {
				t.Errorf("credits fields without a usage chunk: %s", ev)
			}
			for _, c := range m["choices"].([]any) {
				if d, ok := c.(map[string]any)["delta"].(map[string]any); ok {
					s, _ := d["content"].(string)
					content.WriteString(s)
				}
			}
		}
		if content.String() != tokens(10) {
			t.Errorf("streamed content %q, want %q", content.String(), tokens(10))
		}
		want := cost(t, 4, 10, oaiIn, oaiOut)
		spent += want
		st := e.settlements(u.ID)
		if last := st[len(st)-1]; last.Amount != want || last.Usage == nil || last.Usage.InputTokens != 4 || last.Usage.OutputTokens != 10 {
			t.Errorf("stream without usage settled %+v (usage %+v), want %s for 4+10 tokens", last, last.Usage, want)
		}
	}

	// OpenAI streaming with include_usage: the usage chunk carries the credits.
	{
		r := e.post("/v1/chat/completions",
			`{"model":"mock-small","messages":[{"role":"user","content":"count with me"}],"max_tokens":7,"stream":true,"stream_options":{"include_usage":true}}`,
			map[string]string{"apikey": k.Key})
		if r.status != http.StatusOK {
			t.Fatalf("stream with usage: %s", r)
		}
		events := sseEvents(t, r.body)
		if len(events) < 2 || events[len(events)-1] != "[DONE]" {
			t.Fatalf("stream does not end with [DONE]: %q", events)
		}
		want := cost(t, 3, 7, oaiIn, oaiOut)
		spent += want
		usageChunks := 0
		for _, ev := range events[:len(events)-1] {
			m := decodeObject(t, ev)
			us, ok := m["usage"].(map[string]any)
			if !ok {
				continue
			}
			usageChunks++
			if num(t, us["prompt_tokens"]) != 3 || num(t, us["completion_tokens"]) != 7 {
				t.Errorf("usage %v, want 3 and 7", us)
			}
			if got := amountOf(t, m["credits_charged"]); got != want {
				t.Errorf("usage chunk credits_charged %s, want %s: %s", got, want, ev)
			}
			if got, w := amountOf(t, m["credits_remaining"]), credits.Amount(micro(t, initial))-spent; got != w {
				t.Errorf("usage chunk credits_remaining %s, want %s", got, w)
			}
		}
		if usageChunks != 1 {
			t.Errorf("%d usage chunks, want 1", usageChunks)
		}
	}

	// Ollama /api/chat and /api/generate, NDJSON: the done message carries the credits.
	for _, c := range []struct {
		path, body string
		in, out    int64
	}{
		{"/api/chat", `{"model":"llama-mock","messages":[{"role":"user","content":"why is the sky blue"}],"options":{"num_predict":6}}`, 5, 6},
		{"/api/generate", `{"model":"llama-mock","prompt":"once upon a time","options":{"num_predict":9}}`, 4, 9},
	} {
		r := e.post(c.path, c.body, bearer(k.Key))
		if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("Content-Type"), "application/x-ndjson") {
			t.Fatalf("%s: %s (%s)", c.path, r, r.header.Get("Content-Type"))
		}
		if r.header.Get("X-Gateway-Backend") != "oll" || r.header.Get("X-Gateway-Model") != "llama-mock" {
			t.Errorf("%s: X-Gateway-Backend %q, X-Gateway-Model %q", c.path, r.header.Get("X-Gateway-Backend"), r.header.Get("X-Gateway-Model"))
		}
		msgs := ndjson(t, r.body)
		want := cost(t, c.in, c.out, ollamaIn, ollaOut)
		spent += want
		var text strings.Builder
		for i, m := range msgs {
			if m["done"] == true {
				if i != len(msgs)-1 {
					t.Errorf("%s: done message is not the last", c.path)
				}
				continue
			}
			if mm, ok := m["message"].(map[string]any); ok {
				s, _ := mm["content"].(string)
				text.WriteString(s)
			}
			if s, ok := m["response"].(string); ok {
				text.WriteString(s)
			}
		}
		done := msgs[len(msgs)-1]
		if done["done"] != true {
			t.Fatalf("%s: last message is not done: %v", c.path, done)
		}
		if num(t, done["prompt_eval_count"]) != c.in || num(t, done["eval_count"]) != c.out {
			t.Errorf("%s: done counts %v/%v, want %d/%d", c.path, done["prompt_eval_count"], done["eval_count"], c.in, c.out)
		}
		if got := amountOf(t, done["credits_charged"]); got != want {
			t.Errorf("%s: credits_charged %s, want %s", c.path, got, want)
		}
		if got, w := amountOf(t, done["credits_remaining"]), credits.Amount(micro(t, initial))-spent; got != w {
			t.Errorf("%s: credits_remaining %s, want %s", c.path, got, w)
		}
		if text.String() != tokens(int(c.out)) {
			t.Errorf("%s: text %q, want %q", c.path, text.String(), tokens(int(c.out)))
		}
	}

	// Ollama without streaming: one JSON document, credits in the headers.
	{
		r := e.post("/api/chat", `{"model":"llama-mock","messages":[{"role":"user","content":"short one"}],"stream":false,"options":{"num_predict":3}}`, bearer(k.Key))
		if r.status != http.StatusOK {
			t.Fatalf("/api/chat stream false: %s", r)
		}
		want := cost(t, 2, 3, ollamaIn, ollaOut)
		spent += want
		if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
			t.Errorf("/api/chat stream false: X-Credits-Charged %s, want %s", got, want)
		}
	}

	// Embeddings, priced on input tokens.
	{
		r := e.post("/v1/embeddings", `{"model":"mock-embed","input":["a b c","d e"]}`, map[string]string{"X-API-Key": k.Key})
		if r.status != http.StatusOK {
			t.Fatalf("embeddings: %s", r)
		}
		want := cost(t, 5, 0, embedIn, "0")
		spent += want
		if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
			t.Errorf("embeddings X-Credits-Charged %s, want %s", got, want)
		}
		if got, w := amountOf(t, r.header.Get("X-Credits-Remaining")), credits.Amount(micro(t, initial))-spent; got != w {
			t.Errorf("embeddings X-Credits-Remaining %s, want %s", got, w)
		}
		m := r.object(t)
		if data, _ := m["data"].([]any); len(data) != 2 {
			t.Errorf("embeddings data %v, want 2 vectors", m["data"])
		}
	}

	// The catalog, with "cheapest" and prices.
	{
		r := e.request(http.MethodGet, e.gw+"/v1/models", nil, bearer(k.Key))
		if r.status != http.StatusOK {
			t.Fatalf("/v1/models: %s", r)
		}
		ids := map[string]bool{}
		for _, d := range r.object(t)["data"].([]any) {
			ids[d.(map[string]any)["id"].(string)] = true
		}
		for _, id := range []string{"cheapest", "mock-small", "mock-embed", "llama-mock"} {
			if !ids[id] {
				t.Errorf("/v1/models lacks %s: %s", id, r)
			}
		}
	}

	// Failures a key owner makes, with the key in the headers: nothing is charged.
	r := e.post("/v1/chat/completions", `{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}`, map[string]string{"X-API-Key": k.Key})
	errorOf(t, r, http.StatusNotFound, "model_not_found")
	r = e.post("/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"x"}]}`, map[string]string{"apikey": brokeKey.Key})
	errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
	if got := r.header.Get("Location"); got != "http://billing.example/top-up" {
		t.Errorf("402 of a user: Location %q, want the billing URL", got)
	}

	// The books: exactly what was charged, every reservation closed.
	a := e.settledAudit(u.ID)
	if want := credits.Amount(micro(t, initial)) - spent; a.Balance != want || a.Settled != spent {
		t.Errorf("balance %s, settled %s; want balance %s = %s - %s charged", a.Balance, a.Settled, want, initial, spent)
	}
	if got := len(e.settlements(u.ID)); got != 10 {
		t.Errorf("%d settlements, want 10", got)
	}
	e.settledAudit(broke.ID)
	e.checkAllAccounts(0)

	// No secret in anything Caddy logged (access log and Caddy's own log, at DEBUG).
	if err := caddy.Stop(); err != nil {
		t.Logf("stopping caddy: %v", err)
	}
	secrets := map[string]string{"alice's key": k.Key, "broke's key": brokeKey.Key,
		"alice's key secret": k.Key[strings.LastIndexByte(k.Key, '_')+1:]}
	for _, name := range []string{"access.log", "caddy.log"} {
		b, err := os.ReadFile(filepath.Join(e.dir, name))
		if err != nil {
			t.Errorf("reading %s: %v", name, err)
			continue
		}
		if len(b) == 0 && name == "access.log" {
			t.Errorf("%s is empty: the check would prove nothing", name)
		}
		for what, s := range secrets {
			if n := strings.Count(string(b), s); n > 0 {
				line := ""
				for _, l := range strings.Split(string(b), "\n") {
					if strings.Contains(l, s) {
						line = strings.ReplaceAll(l, s, "<SECRET>")
						break
					}
				}
				t.Errorf("%s holds %s %d times, e.g. %s", name, what, n, truncate(line, 700))
			}
		}
	}
}
