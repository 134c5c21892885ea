package metering

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestUsageFromJSON(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
		want Usage
		ok   bool
	}{
		{"openai chat", `{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}`, Usage{InputTokens: 9, OutputTokens: 12}, true},
		{"openai embeddings", `{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-2.5e-3]}],"model":"e","usage":{"prompt_tokens":5,"total_tokens":5}}`, Usage{InputTokens: 5, OutputTokens: 0}, true},
		{"ollama chat", `{"model":"m","message":{"role":"assistant","content":"Hi"},"done":true,"prompt_eval_count":26,"eval_count":290}` + "\n", Usage{InputTokens: 26, OutputTokens: 290}, true},
		{"ollama generate cached prompt", `{"model":"m","response":"Hi","done":true,"eval_count":3}`, Usage{InputTokens: 0, OutputTokens: 3}, true},
		{"ollama embed", `{"model":"m","embeddings":[[0.1,0.2]],"prompt_eval_count":8}`, Usage{InputTokens: 8, OutputTokens: 0}, true},
		{"explicit zero", `{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}`, Usage{InputTokens: 0, OutputTokens: 0}, true},
		{"ollama explicit zero", `{"done":true,"prompt_eval_count":0,"eval_count":0}`, Usage{InputTokens: 0, OutputTokens: 0}, true},
		{"whitespace around", " \n{ \"usage\" : { \"prompt_tokens\" : 1 , \"completion_tokens\" : 2 } }\r\n", Usage{InputTokens: 1, OutputTokens: 2}, true},
		{"largest count", `{"usage":{"prompt_tokens":1000000000000,"completion_tokens":1}}`, Usage{InputTokens: 1e12, OutputTokens: 1}, true},
		{"openai cached and reasoning", `{"usage":{"prompt_tokens":2006,"completion_tokens":300,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":256,"accepted_prediction_tokens":0}}}`,
			Usage{InputTokens: 2006, OutputTokens: 300, CachedInputTokens: 1920, ReasoningTokens: 256}, true},
		{"details above their wholes are cut", `{"usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":11},"completion_tokens_details":{"reasoning_tokens":4}}}`,
			Usage{InputTokens: 10, OutputTokens: 3, CachedInputTokens: 10, ReasoningTokens: 3}, true},
		{"malformed details are no details", `{"usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":-1},"completion_tokens_details":[1]}}`,
			Usage{InputTokens: 10, OutputTokens: 3}, true},
		{"escaped key", `{"us\u0061ge":{"prompt_tokens":4,"completion_tokens":5}}`, Usage{InputTokens: 4, OutputTokens: 5}, true},
		{"last duplicate wins", `{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}`, Usage{InputTokens: 2, OutputTokens: 0}, true},
		{"completion null", `{"usage":{"prompt_tokens":7,"completion_tokens":null}}`, Usage{InputTokens: 7, OutputTokens: 0}, true},

		{"no usage", `{"id":"x","choices":[]}`, Usage{}, false},
		{"usage null", `{"usage":null}`, Usage{}, false},
		{"usage empty", `{"usage":{}}`, Usage{}, false},
		{"prompt tokens missing", `{"usage":{"completion_tokens":3}}`, Usage{}, false},
		{"negative", `{"usage":{"prompt_tokens":-1,"completion_tokens":3}}`, Usage{}, false},
		{"negative zero", `{"usage":{"prompt_tokens":-0}}`, Usage{}, false},
		{"fraction", `{"usage":{"prompt_tokens":1.5,"completion_tokens":3}}`, Usage{}, false},
		{"integral fraction", `{"usage":{"prompt_tokens":2.0}}`, Usage{}, false},
		{"exponent", `{"usage":{"prompt_tokens":1e3}}`, Usage{}, false},
		{"absurd", `{"usage":{"prompt_tokens":1000000000001}}`, Usage{}, false},
		{"huge", `{"usage":{"prompt_tokens":99999999999999999999999}}`, Usage{}, false},
		{"string count", `{"usage":{"prompt_tokens":"9"}}`, Usage{}, false},
		{"bad completion", `{"usage":{"prompt_tokens":9,"completion_tokens":-2}}`, Usage{}, false},
		{"ollama negative", `{"done":true,"prompt_eval_count":3,"eval_count":-1}`, Usage{}, false},
		{"garbage", `{usage:1}`, Usage{}, false},
		{"truncated", `{"usage":{"prompt_tokens":9,"completion_tokens":12}`, Usage{}, false},
		{"trailing data", `{"usage":{"prompt_tokens":9}} {}`, Usage{}, false},
		{"not an object", `[{"usage":{"prompt_tokens":9}}]`, Usage{}, false},
		{"empty", ``, Usage{}, false},
		{"invalid elsewhere", `{"usage":{"prompt_tokens":9},"x":[1,]}`, Usage{}, false},
		{"control char in string", "{\"a\":\"\x01\",\"usage\":{\"prompt_tokens\":9}}", Usage{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := UsageFromJSON([]byte(tc.body))
			if ok != tc.ok || got != tc.want {
				t.Errorf("UsageFromJSON(%s) = %+v, %v; want %+v, %v", tc.body, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestAppendFields(t *testing.T) {
	const fields = `"credits_charged":0.12,"credits_remaining":3`
	for _, tc := range []struct {
		name, obj, fields, want string
		ok                      bool
	}{
		{"object", `{"a":1}`, fields, `{"a":1,"credits_charged":0.12,"credits_remaining":3}`, true},
		{"trailing newline", "{\"a\":1}\n", fields, "{\"a\":1,\"credits_charged\":0.12,\"credits_remaining\":3}\n", true},
		{"trailing crlf and spaces", "{\"a\":1 } \r\n", fields, "{\"a\":1 ,\"credits_charged\":0.12,\"credits_remaining\":3} \r\n", true},
		{"empty object", `{}`, fields, `{"credits_charged":0.12,"credits_remaining":3}`, true},
		{"empty object with space", "{ \n}\n", fields, "{ \n\"credits_charged\":0.12,\"credits_remaining\":3}\n", true},
		{"nested empty object last", `{"a":{}}`, `"b":2`, `{"a":{},"b":2}`, true},
		{"brace in string last", `{"a":"{"}`, `"b":2`, `{"a":"{","b":2}`, true},
		{"no fields", `{"a":1}`, ``, `{"a":1}`, true},
		{"array", `[1]`, fields, `[1]`, false},
		{"lone brace", ` }`, fields, ` }`, false},
		{"empty", ``, fields, ``, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			obj := []byte(tc.obj)
			got, ok := AppendFields(obj, []byte(tc.fields))
			if string(got) != tc.want || ok != tc.ok {
				t.Errorf("AppendFields(%q, %q) = %q, %v; want %q, %v", tc.obj, tc.fields, got, ok, tc.want, tc.ok)
			}
			if string(obj) != tc.obj {
				t.Errorf("AppendFields modified its input: %q", obj)
			}
		})
	}
}

func TestTextLen(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want int64
	}{
		{`"Hello"`, 5},
		{`""`, 0},
		{`"a\nb\"c\\"`, 6},
		{`"\u00e9"`, 2},
		{`"é"`, 2},
		{`"\u20ac"`, 3},
		{`"\ud83d\ude00"`, 4},
		{`"\ud83d"`, 3},       // lone surrogate decodes to U+FFFD
		{`"\ud83dx"`, 4},      // U+FFFD and x
		{`"\ud83d\u0041"`, 4}, // U+FFFD and A
		{`"\ude00\ud83d"`, 6}, // two lone surrogates
		{`null`, 0},
		{`12`, 0},
	} {
		if got := textLen([]byte(tc.raw)); got != tc.want {
			t.Errorf("textLen(%s) = %d, want %d", tc.raw, got, tc.want)
		}
	}
}

func BenchmarkUsageFromJSON(b *testing.B) {
	body := []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how may I assist you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}`)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := UsageFromJSON(body); !ok {
			b.Fatal("no usage")
		}
	}
}
