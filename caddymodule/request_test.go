package caddymodule

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

var testLimits = requestLimits{maxTokensDefault: 100, maxTokensCap: 1000}

func TestParseInference(t *testing.T) {
	for _, tc := range []struct {
		name   string
		format routing.Format
		body   string
		header string
		param  string // "" = accepted
		check  func(t *testing.T, inf *inference, sent map[string]any)
	}{
		{name: "defaults the output bound and keeps unknown fields", format: routing.FormatOpenAIChat,
			body: `{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"x_custom":{"a":[1,2]}}`,
			check: func(t *testing.T, inf *inference, sent map[string]any) {
				if inf.outputBound != 100 || sent["max_tokens"] != 100.0 || sent["temperature"] != 0.5 || sent["x_custom"] == nil {
					t.Fatalf("sent %v", sent)
				}
			}},
		{name: "streams get include_usage; the client did not ask", format: routing.FormatOpenAIChat,
			body: `{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":7}`,
			check: func(t *testing.T, inf *inference, sent map[string]any) {
				so, _ := sent["stream_options"].(map[string]any)
				if !inf.stream || inf.clientWantsUsage || so["include_usage"] != true || sent["max_completion_tokens"] != 7.0 || sent["max_tokens"] != nil {
					t.Fatalf("inf %+v sent %v", inf, sent)
				}
			}},
		{name: "the client asked for usage", format: routing.FormatOpenAIChat,
			body: `{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{}]}`,
			check: func(t *testing.T, inf *inference, _ map[string]any) {
				if !inf.clientWantsUsage {
					t.Fatal("clientWantsUsage false")
				}
			}},
		{name: "both output bounds: the tighter is sent in both", format: routing.FormatOpenAIChat,
			body: `{"model":"m","messages":[{}],"max_tokens":900,"max_completion_tokens":20}`,
			check: func(t *testing.T, inf *inference, sent map[string]any) {
				if inf.outputBound != 20 || sent["max_tokens"] != 20.0 || sent["max_completion_tokens"] != 20.0 {
					t.Fatalf("bound %d sent %v", inf.outputBound, sent)
				}
			}},
		{name: "a model named twice is billed and sent as one", format: routing.FormatOpenAIChat,
			body: `{"model":"cheap","model":"dear","messages":[{}]}`,
			check: func(t *testing.T, inf *inference, sent map[string]any) {
				if inf.model != "dear" {
					t.Fatalf("billed %q", inf.model)
				}
			}},
		{name: "ollama streams by default; num_predict set", format: routing.FormatOllamaChat,
			body: `{"model":"m","messages":[{"role":"user","content":"hi"}],"options":{"temperature":0}}`,
			check: func(t *testing.T, inf *inference, sent map[string]any) {
				opts := sent["options"].(map[string]any)
				if !inf.stream || opts["num_predict"] != 100.0 || opts["temperature"] != 0.0 {
					t.Fatalf("sent %v", sent)
				}
			}},
		{name: "max_price is not sent on; the header takes the lower", format: routing.FormatOpenAIChat,
			body: `{"model":"m","messages":[{}],"max_price":2}`, header: "1.5",
			check: func(t *testing.T, inf *inference, sent map[string]any) {
				if inf.maxPrice != 1_500_000 || sent["max_price"] != nil {
					t.Fatalf("maxPrice %d sent %v", inf.maxPrice, sent)
				}
			}},
		{name: "embeddings", format: routing.FormatOpenAIEmbeddings, body: `{"model":"e","input":["a","b"]}`},
		{name: "generate", format: routing.FormatOllamaGenerate, body: `{"model":"m","prompt":"hi","stream":false}`},
		{name: "not an object", format: routing.FormatOpenAIChat, body: `[1]`, param: "-"},
		{name: "broken JSON", format: routing.FormatOpenAIChat, body: `{"model":`, param: "-"},
		{name: "no model", format: routing.FormatOpenAIChat, body: `{"messages":[{}]}`, param: "model"},
		{name: "model not a string", format: routing.FormatOpenAIChat, body: `{"model":1,"messages":[{}]}`, param: "model"},
		{name: "model is a URL", format: routing.FormatOpenAIChat, body: `{"model":"http://evil/x","messages":[{}]}`, param: "model"},
		{name: "model is a path", format: routing.FormatOpenAIChat, body: `{"model":"../etc","messages":[{}]}`, param: "model"},
		{name: "model with a control byte", format: routing.FormatOpenAIChat, body: `{"model":"a\u0001","messages":[{}]}`, param: "model"},
		{name: "no messages", format: routing.FormatOpenAIChat, body: `{"model":"m"}`, param: "messages"},
		{name: "empty messages", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[ ]}`, param: "messages"},
		{name: "messages not objects", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":["hi"]}`, param: "messages"},
		{name: "negative max_tokens", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"max_tokens":-1}`, param: "max_tokens"},
		{name: "zero max_tokens", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"max_tokens":0}`, param: "max_tokens"},
		{name: "fractional max_tokens", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"max_tokens":1.5}`, param: "max_tokens"},
		{name: "absurd max_tokens", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"max_tokens":1e12}`, param: "max_tokens"},
		{name: "max_tokens over the cap", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"max_tokens":1001}`, param: "max_tokens"},
		{name: "num_predict over the cap", format: routing.FormatOllamaChat, body: `{"model":"m","messages":[{}],"options":{"num_predict":5000}}`, param: "options.num_predict"},
		{name: "stream not a boolean", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"stream":"yes"}`, param: "stream"},
		{name: "negative max_price", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}],"max_price":-1}`, param: "max_price"},
		{name: "bad X-Max-Price", format: routing.FormatOpenAIChat, body: `{"model":"m","messages":[{}]}`, header: "1e3", param: "X-Max-Price"},
		{name: "embeddings without input", format: routing.FormatOpenAIEmbeddings, body: `{"model":"e","input":[]}`, param: "input"},
		{name: "generate without prompt", format: routing.FormatOllamaGenerate, body: `{"model":"m"}`, param: "prompt"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inf, err := parseInference(tc.format, []byte(tc.body), tc.header, testLimits)
			if tc.param != "" {
				var br *badRequest
				if !errors.As(err, &br) {
					t.Fatalf("err = %v, want a bad request", err)
				}
				if want := tc.param; want != "-" && br.param != want {
					t.Fatalf("param = %q, want %q", br.param, want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			body := inf.body("upstream/name")
			var sent map[string]any
			if err := json.Unmarshal(body, &sent); err != nil {
				t.Fatalf("sent body is not JSON: %v: %s", err, body)
			}
			if sent["model"] != "upstream/name" {
				t.Fatalf("model sent: %v", sent["model"])
			}
			if tc.check != nil {
				tc.check(t, inf, sent)
			}
		})
	}
}

// FuzzParseInference: whatever the body, parsing never panics, and an accepted body is sent on
// as one JSON object with the backend's model name and the output bound that was reserved for.
func FuzzParseInference(f *testing.F) {
	f.Add(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`, "")
	f.Add(`{"model":"m","stream":true,"messages":[{}],"max_tokens":5,"x":{"y":[1,"\u0000"]}}`, "1")
	f.Add(`{"model":"a","model":"b","messages":[{}],"max_completion_tokens":3}`, "")
	f.Add(`{"model":"m","messages":[{}],"max_price":0.5,"weird \"key\"":1}`, "0.1")
	f.Add(`{"model":"m","Model":"x","MAX_TOKENS":5000,"messages":[{}]}`, "")
	f.Add(`{"model":"m","messages":[{}],"max_to\u212aens":9,"n":3,"options":{"Num_Predict":-1}}`, "")
	f.Add(`{"model":"m","messages":[{"content":[{"type":"image_url"}],"images":["a","b"]}],"best_of":2}`, "")
	f.Add(`{"model":"m","prompt":["a","b"],"n":2,"best_of":3,"echo":true,"max_tokens":7}`, "")
	f.Add(`{"model":"m","prompt":[[1,2],[3]],"stream":true,"Echo":true}`, "")
	f.Add(`{"model":"e","input":["a"],"prompt":"b"}`, "")
	f.Add(`{"model":"m","input":"hi","max_tool_calls":3,"tools":[{"type":"web_search"},{"type":"function","name":"f"},{"type":"namespace","name":"n","tools":[{"type":"function","name":"g"}]}]}`, "")
	f.Add(`{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"web_search_20250305","name":"w","max_uses":2},{"name":"f","input_schema":{}}]}`, "")
	f.Fuzz(func(t *testing.T, body, header string) {
		// Every surface: what a Go backend reads of the model and of the choices is what the
		// gateway billed; a legacy completion's output bound too.
		for _, format := range []routing.Format{routing.FormatOpenAICompletions, routing.FormatOllamaEmbed, routing.FormatOllamaEmbeddings,
			routing.FormatOpenAIEmbeddings, routing.FormatOllamaGenerate} {
			inf, err := parseInference(format, []byte(body), header, testLimits)
			if err != nil {
				continue
			}
			out := inf.body("up")
			var read struct {
				Model     string
				MaxTokens *int64 `json:"max_tokens"`
				N         *int64
				BestOf    *int64 `json:"best_of"`
			}
			if err := json.Unmarshal(out, &read); err != nil || read.Model != "up" {
				t.Fatalf("format %d: a Go backend reads model %q (%v) from %s", format, read.Model, err, out)
			}
			if format == routing.FormatOpenAICompletions && (read.MaxTokens == nil || *read.MaxTokens != inf.outputBound) {
				t.Fatalf("a Go backend reads max_tokens %v from %s; billed %d", read.MaxTokens, out, inf.outputBound)
			}
			for _, v := range []*int64{read.N, read.BestOf} {
				if v != nil && *v > inf.choices {
					t.Fatalf("format %d: a Go backend reads %d choices from %s; billed %d", format, *v, out, inf.choices)
				}
			}
		}
		// The provider tools a Go backend reads are bounded as the gateway reserved for them,
		// and no tool of a type the surface does not serve gets through.
		for _, format := range []routing.Format{routing.FormatOpenAIResponses, routing.FormatAnthropicMessages} {
			checkToolsRead(t, format, body, header)
		}
		// What a Go backend reads (encoding/json folds names) is what the gateway billed.
		if inf, err := parseInference(routing.FormatOllamaChat, []byte(body), header, testLimits); err == nil {
			out := inf.body("up")
			var read struct {
				Model   string
				Options struct {
					NumPredict *int64 `json:"num_predict"`
				}
			}
			if err := json.Unmarshal(out, &read); err != nil || read.Model != "up" || read.Options.NumPredict == nil || *read.Options.NumPredict != inf.outputBound {
				t.Fatalf("an Ollama backend reads %+v (%v) from %s; billed model up, %d tokens", read, err, out, inf.outputBound)
			}
		}
		inf, err := parseInference(routing.FormatOpenAIChat, []byte(body), header, testLimits)
		if err != nil {
			return
		}
		if inf.inputBound < int64(len(body)) || inf.choices < 1 || inf.choices > maxChoices {
			t.Fatalf("bounds: input %d for %d bytes, %d choices", inf.inputBound, len(body), inf.choices)
		}
		out := inf.body("up")
		var sent map[string]json.RawMessage
		if err := json.Unmarshal(out, &sent); err != nil {
			t.Fatalf("sent body is not JSON: %v: %s", err, out)
		}
		if string(sent["model"]) != `"up"` {
			t.Fatalf("model sent: %s", sent["model"])
		}
		if _, ok := sent["max_price"]; ok {
			t.Fatal("max_price sent on")
		}
		sawBound := false
		for _, field := range []string{"max_tokens", "max_completion_tokens"} {
			bound, ok := sent[field]
			if !ok || string(bound) == "null" {
				continue
			}
			sawBound = true
			var n int64
			if err := json.Unmarshal(bound, &n); err != nil || n != inf.outputBound || n < 1 || n > testLimits.maxTokensCap {
				t.Fatalf("%s sent %s, reserved for %d", field, bound, inf.outputBound)
			}
		}
		if !sawBound {
			t.Fatal("no output bound sent")
		}
		var read struct {
			Model               string
			MaxTokens           *int64 `json:"max_tokens"`
			MaxCompletionTokens *int64 `json:"max_completion_tokens"`
			N                   *int64
			BestOf              *int64 `json:"best_of"`
		}
		if err := json.Unmarshal(out, &read); err != nil || read.Model != "up" {
			t.Fatalf("a Go backend reads model %q (%v) from %s", read.Model, err, out)
		}
		for _, v := range []*int64{read.MaxTokens, read.MaxCompletionTokens} {
			if v != nil && *v != inf.outputBound {
				t.Fatalf("a Go backend reads an output bound of %d from %s; billed %d", *v, out, inf.outputBound)
			}
		}
		for _, v := range []*int64{read.N, read.BestOf} {
			if v != nil && *v > inf.choices {
				t.Fatalf("a Go backend reads %d choices from %s; billed %d", *v, out, inf.choices)
			}
		}
	})
}

func TestFoldedFieldNames(t *testing.T) {
	for _, c := range []struct {
		key, want string
	}{
		{"model", ""}, {"Model", "model"}, {"MODEL", "model"}, {"max_to\u212aens", "max_tokens"},
		{"me\u017f\u017fages", "messages"}, {"modelx", ""}, {"mödel", ""}, {"N", "n"},
		{strings.Repeat("x", 100), ""},
	} {
		t.Run(c.key, func(t *testing.T) {
			var key string
			if err := json.Unmarshal([]byte(`"`+c.key+`"`), &key); err != nil {
				t.Fatal(err)
			}
			name, ok := foldsOnto("", key)
			if got := map[bool]string{true: name}[ok && name != key]; got != c.want {
				t.Fatalf("foldsOnto(%q) = %q, %v; want a refusal naming %q", key, name, ok, c.want)
			}
		})
	}
}

func TestCountImages(t *testing.T) {
	for _, c := range []struct {
		body string
		want int64
	}{
		{`{"messages":[{"content":"describe an image"}]}`, 0},
		{`{"messages":[{"content":[{"type":"text","text":"x"},{"type":"image_url","image_url":{"url":"https://a/b.png"}}]}]}`, 1},
		{`{"input":[{"content":[{"type":"input_image","image_url":"https://a"}]}]}`, 1},
		{`{"messages":[{"content":[{"type":"image","source":{}}]}]}`, 1},
		{`{"prompt":"x","images":["aGk=","aGk=","aGk="]}`, 3},
		{`{"messages":[{"role":"user","IMAGES":["aGk="]}]}`, 1},
		{`{"messages":[{"content":[{"type":"\u0069mage_url"}]}]}`, 1},
		{`{"messages":[{"content":"no pictures"}]}`, 0},
	} {
		if got := countImages([]byte(c.body)); got != c.want {
			t.Errorf("countImages(%s) = %d, want %d", c.body, got, c.want)
		}
	}
}

func BenchmarkParseInference(b *testing.B) {
	body := []byte(`{"model":"mock-small","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a haiku about proxies and credits, please."}],"temperature":0.7,"stream":false}`)
	b.ReportAllocs()
	for b.Loop() {
		inf, err := parseInference(routing.FormatOpenAIChat, body, "", testLimits)
		if err != nil {
			b.Fatal(err)
		}
		inf.body("mock-small")
	}
}

// checkToolsRead: when parseInference accepts body on format, what a Go backend reads of its
// tools (encoding/json folds names) has only types the surface serves, and every provider
// tool's calls are bounded by what was reserved (Responses' max_tool_calls, Messages' max_uses).
func checkToolsRead(t *testing.T, format routing.Format, body, header string) {
	t.Helper()
	inf, err := parseInference(format, []byte(body), header, testLimits)
	if err != nil {
		return
	}
	out := inf.body("up")
	var read struct {
		Tools []struct {
			Type    string
			MaxUses *int64 `json:"max_uses"`
		}
		MaxToolCalls *int64 `json:"max_tool_calls"`
	}
	if err := json.Unmarshal(out, &read); err != nil {
		t.Fatalf("format %d: a Go backend cannot read the tools of %s: %v", format, out, err)
	}
	rules := routing.Surfaces[format].Tools
	var calls metering.ToolCalls
	for _, tool := range read.Tools {
		client := tool.Type == "" && rules.Untyped || slices.Contains(rules.Groups, tool.Type)
		for _, c := range rules.Client {
			client = client || c.Matches(tool.Type)
		}
		if client {
			continue
		}
		i := slices.IndexFunc(rules.Provider, func(p routing.ProviderTool) bool { return p.Matches(tool.Type) })
		if i < 0 {
			t.Fatalf("format %d: a Go backend reads a tool of type %q, which the surface does not serve, from %s", format, tool.Type, out)
		}
		counter := rules.Provider[i].Counter
		switch {
		case rules.CallsField != "":
			if read.MaxToolCalls == nil || *read.MaxToolCalls > inf.toolBounds[counter] {
				t.Fatalf("format %d: a Go backend reads max_tool_calls %v from %s; reserved %d calls of %v", format, read.MaxToolCalls, out, inf.toolBounds[counter], counter)
			}
		default:
			if tool.MaxUses == nil {
				t.Fatalf("format %d: a Go backend reads a %s tool without max_uses from %s", format, tool.Type, out)
			}
			calls[counter] += *tool.MaxUses
			if calls[counter] > inf.toolBounds[counter] {
				t.Fatalf("format %d: a Go backend reads %d calls of %v from %s; reserved %d", format, calls[counter], counter, out, inf.toolBounds[counter])
			}
		}
	}
}
