package caddymodule

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// TestSurfaces checks the descriptions against what the pipeline expects of them.
func TestSurfaces(t *testing.T) {
	for i := range routing.Surfaces {
		sf := &routing.Surfaces[i]
		ep := endpoints[sf.Path]
		if ep.format() != routing.Format(i) || ep.String() != sf.Name || sf.Name == "" || sf.Scope == "" || len(sf.Styles) == 0 {
			t.Errorf("%s: endpoint %d, name %q, scope %q, styles %v", sf.Path, ep, ep.String(), sf.Scope, sf.Styles)
		}
		r := httptest.NewRequest(sf.Method, sf.Path, nil)
		if u := unservedRoute(r); u != nil && u.notImplemented {
			t.Errorf("%s is served and listed as not implemented", sf.Path)
		}
		prefix := shapeOpenAI
		if strings.HasPrefix(sf.Path, "/api/") {
			prefix = shapeOllama
		}
		if strings.HasPrefix(sf.Path, "/v1/messages") {
			prefix = shapeAnthropic
		}
		if errorShapeOf(sf.Path) != prefix {
			t.Errorf("%s: error shape %d, its clients read %d", sf.Path, errorShapeOf(sf.Path), prefix)
		}
		if sf.List != routing.ListNone {
			if sf.Method != http.MethodGet {
				t.Errorf("%s: a list is a GET", sf.Path)
			}
			continue
		}
		if sf.Method != http.MethodPost || sf.Prompt == "" || sf.PromptRule == routing.PromptNone {
			t.Errorf("%s: an inference route is a POST with a prompt", sf.Path)
		}
		// Every member the pipeline reads is covered by the folding check.
		read := map[string][]string{"": append([]string{sf.Prompt}, sf.ChoiceFields...)}
		read[sf.OutputIn] = append(read[sf.OutputIn], sf.OutputFields...)
		if sf.Echo != "" {
			read[""] = append(read[""], sf.Echo)
		}
		if sf.IncludeUsage {
			read[""] = append(read[""], "stream_options")
			read["stream_options"] = []string{"include_usage"}
		}
		for level, names := range read {
			for _, n := range names {
				if !slices.Contains(checkedFields[level], n) {
					t.Errorf("%s: %q (level %q) is read but not checked for folding", sf.Path, n, level)
				}
			}
		}
		if !sf.Free && (sf.Kind == routing.KindEmbeddings) != (len(sf.OutputFields) == 0) {
			t.Errorf("%s: kind %s with output fields %v", sf.Path, sf.Kind, sf.OutputFields)
		}
	}
}

func TestParseInferenceSurfaces(t *testing.T) {
	for _, tc := range []struct {
		name   string
		format routing.Format
		body   string
		param  string // "" = accepted
		// output is the output bound of all choices; stream whether it streams.
		output int64
		stream bool
		sent   string // a member of the body sent on
	}{
		{name: "completions: the default output bound is sent", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":"hi"}`, output: 100, sent: `"max_tokens":100`},
		{name: "completions: n and best_of, the larger", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":"hi","max_tokens":10,"n":2,"best_of":3}`, output: 30},
		{name: "completions: every prompt of an array has its choices", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":["a","b","c"],"max_tokens":10,"n":2}`, output: 60},
		{name: "completions: token id arrays", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":[[1,2],[3]],"max_tokens":10}`, output: 20},
		{name: "completions: one token id array is one prompt", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":[1,2,3],"max_tokens":10}`, output: 10},
		{name: "completions: echo counts the prompt as output", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":"0123456789","max_tokens":10,"echo":true}`, output: 10 + 12},
		{name: "completions: a stream is asked for its usage", format: routing.FormatOpenAICompletions,
			body: `{"model":"m","prompt":"hi","stream":true}`, output: 100, stream: true, sent: `"stream_options":{"include_usage":true}`},
		{name: "completions: no prompt", format: routing.FormatOpenAICompletions, body: `{"model":"m"}`, param: "prompt"},
		{name: "completions: empty prompt", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":""}`, param: "prompt"},
		{name: "completions: empty prompt array", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":[]}`, param: "prompt"},
		{name: "completions: an empty token array", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":[[1],[]]}`, param: "prompt"},
		{name: "completions: a prompt object", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":{"a":1}}`, param: "prompt"},
		{name: "completions: echo not a boolean", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":"a","echo":1}`, param: "echo"},
		{name: "completions: best_of over the limit", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":"a","best_of":129}`, param: "best_of"},
		{name: "completions: a folded Echo", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":"a","Echo":true}`, param: "Echo"},
		{name: "completions: max_tokens over the cap", format: routing.FormatOpenAICompletions, body: `{"model":"m","prompt":"a","max_tokens":1001}`, param: "max_tokens"},
		{name: "embed: a string", format: routing.FormatOllamaEmbed, body: `{"model":"e","input":"a"}`},
		{name: "embed: an array, never streamed", format: routing.FormatOllamaEmbed, body: `{"model":"e","input":["a","b"],"stream":true}`},
		{name: "embed: no input", format: routing.FormatOllamaEmbed, body: `{"model":"e","prompt":"a"}`, param: "input"},
		{name: "embeddings: a prompt", format: routing.FormatOllamaEmbeddings, body: `{"model":"e","prompt":"a"}`},
		{name: "embeddings: no prompt", format: routing.FormatOllamaEmbeddings, body: `{"model":"e","input":"a"}`, param: "prompt"},
		{name: "embeddings: a prompt array", format: routing.FormatOllamaEmbeddings, body: `{"model":"e","prompt":["a"]}`, param: "prompt"},
		{name: "messages: max_tokens bounds the output", format: routing.FormatAnthropicMessages,
			body: `{"model":"c","max_tokens":50,"system":"s","messages":[{"role":"user","content":"hi"}]}`, output: 50, sent: `"max_tokens":50`},
		{name: "messages: a stream", format: routing.FormatAnthropicMessages,
			body: `{"model":"c","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}`, output: 5, stream: true},
		{name: "messages: max_tokens is required", format: routing.FormatAnthropicMessages,
			body: `{"model":"c","messages":[{"role":"user","content":"hi"}]}`, param: "max_tokens"},
		{name: "messages: max_tokens null is none", format: routing.FormatAnthropicMessages,
			body: `{"model":"c","max_tokens":null,"messages":[{"role":"user","content":"hi"}]}`, param: "max_tokens"},
		{name: "messages: max_tokens over the cap", format: routing.FormatAnthropicMessages,
			body: `{"model":"c","max_tokens":1001,"messages":[{"role":"user","content":"hi"}]}`, param: "max_tokens"},
		{name: "messages: a folded Max_Tokens", format: routing.FormatAnthropicMessages,
			body: `{"model":"c","max_tokens":5,"Max_Tokens":900,"messages":[{"role":"user","content":"hi"}]}`, param: "Max_Tokens"},
		{name: "messages: no messages", format: routing.FormatAnthropicMessages, body: `{"model":"c","max_tokens":5}`, param: "messages"},
		{name: "count_tokens: no output", format: routing.FormatAnthropicCountTokens,
			body: `{"model":"c","messages":[{"role":"user","content":"hi"}],"tools":[{"name":"t"}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inf, err := parseInference(tc.format, []byte(tc.body), "", testLimits)
			if tc.param != "" {
				var br *badRequest
				if !errors.As(err, &br) || br.param != tc.param {
					t.Fatalf("err = %v, want a bad request on %q", err, tc.param)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if inf.outputTotal() != tc.output || inf.stream != tc.stream {
				t.Errorf("output bound %d, stream %v; want %d, %v", inf.outputTotal(), inf.stream, tc.output, tc.stream)
			}
			if inf.inputBound < int64(len(tc.body)) {
				t.Errorf("input bound %d below the body's %d bytes", inf.inputBound, len(tc.body))
			}
			body := inf.body("up")
			if tc.sent != "" && !strings.Contains(string(body), tc.sent) {
				t.Errorf("sent %s, want %s in it", body, tc.sent)
			}
		})
	}
}

// TestMessagesQuery: Claude Code's ?beta=true is passed on to an anthropic backend, other
// parameters of the client's query are not, and the backend URL's own query comes first.
func TestMessagesQuery(t *testing.T) {
	ep := endpoints["/v1/messages"]
	client := map[string][]string{"beta": {"true"}, "debug": {"1"}, "access_token": {"x"}}
	if got := upstreamQuery(&Backend{}, ep.surface().Query, client); got != "beta=true" {
		t.Errorf("query %q, want beta=true", got)
	}
	if got := upstreamQuery(&Backend{query: "region=eu"}, endpoints["/v1/messages/count_tokens"].surface().Query, client); got != "region=eu&beta=true" {
		t.Errorf("query %q, want region=eu&beta=true", got)
	}
	if got := upstreamQuery(&Backend{}, endpoints["/v1/chat/completions"].surface().Query, client); got != "" {
		t.Errorf("chat query %q, want none", got)
	}
}
