package metering

import (
	"bytes"
	"encoding/json"
	"io"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// The committed seed corpora under testdata/fuzz/ hold realistic streams and bodies; the
// targets add a few more here.

func FuzzSSEUsage(f *testing.F) {
	f.Add([]byte(sseRole+sseContent("Hi")+sseFinish+sseUsage+sseDone), []byte{}, true, false)
	f.Add([]byte(strings.ReplaceAll(sseContent("Hi")+sseUsage, "\n", "\r\n")), []byte{3, 50, 7}, false, true)
	f.Add([]byte("data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3}}\r\r\n: c\n\n"), []byte{1, 2}, true, true)
	f.Add([]byte(responsesStream), []byte{5, 40, 3}, true, false)
	fuzzStream(f, SSE, DialectOpenAI)
}

// FuzzAnthropicSSEUsage: Anthropic Messages streams (anthropic.go), with the same properties.
func FuzzAnthropicSSEUsage(f *testing.F) {
	f.Add([]byte(anthropicStart+anthropicDelta("Hi")+anthropicUsageDelta+anthropicStop), []byte{}, false, false)
	f.Add([]byte(strings.ReplaceAll(anthropicStart+anthropicDelta("a")+anthropicUsageDelta, "\n", "\r\n")), []byte{5, 9}, false, true)
	f.Add([]byte("event: message_stop\ndata: {}\n\ndata: {\"type\":\"message_stop\"}\n\n"), []byte{2}, true, false)
	fuzzStream(f, SSE, DialectAnthropic)
}

func FuzzNDJSONUsage(f *testing.F) {
	f.Add([]byte(`{"message":{"content":"Hi"},"done":false}`+"\n"+`{"done":true,"prompt_eval_count":2,"eval_count":1}`+"\n"), []byte{}, false, false)
	f.Add([]byte(`{"response":"a","done":false}`+"\r\n"+`{"done":true,"eval_count":0}`), []byte{9}, false, true)
	fuzzStream(f, NDJSON, DialectOpenAI)
}

// fuzzStream checks that a stream cut anywhere meters and writes exactly as the whole stream,
// and that nothing but the usage message is ever changed.
func fuzzStream(f *testing.F, format Format, dialect Dialect) {
	f.Fuzz(func(t *testing.T, stream, cuts []byte, hide, small bool) {
		checkStream(t, format, dialect, stream, cuts, hide, small)
	})
}

// checkStream is the property of fuzzStream.
func checkStream(t *testing.T, format Format, dialect Dialect, stream, cuts []byte, hide, small bool) {
	fields := []byte(`"credits_charged":1`)
	type result struct {
		out      string
		usage    Usage
		hasUsage bool
		calls    int
		produced Produced
		done     bool
	}
	run := func(parts [][]byte, hide bool, onUsage bool) result {
		var r result
		m := &StreamMeter{Format: format, Dialect: dialect, HideUsage: hide}
		limit := MaxMessage
		if small {
			m.limit, limit = 64, 64
		}
		if onUsage {
			m.OnUsage = func(u Usage) []byte {
				r.calls++
				return fields
			}
		}
		var out bytes.Buffer
		for _, p := range parts {
			if err := m.Write(&out, p); err != nil {
				t.Fatal(err)
			}
			if len(m.buf) > limit {
				t.Fatalf("held back %d bytes", len(m.buf))
			}
		}
		if err := m.Flush(&out); err != nil {
			t.Fatal(err)
		}
		r.out = out.String()
		r.usage, r.hasUsage = m.Usage()
		r.produced, r.done = m.Produced(), m.Done()
		return r
	}

	split := cut(stream, cuts)
	whole := run([][]byte{stream}, hide, true)
	if got := run(split, hide, true); got != whole {
		t.Fatalf("split into %d writes:\n%+v\nwhole:\n%+v", len(split), got, whole)
	}
	if whole.calls > 1 {
		t.Fatalf("OnUsage called %d times", whole.calls)
	}
	if u := whole.usage; whole.hasUsage && (u.InputTokens < 0 || u.InputTokens > MaxTokens || u.OutputTokens < 0 || u.OutputTokens > MaxTokens) {
		t.Fatalf("usage out of range: %+v", u)
	}

	// Without fields to add and nothing to hide, the output is the input.
	plain := run(split, false, false)
	if plain.out != string(stream) {
		t.Fatalf("pass-through changed the stream:\n%q\nto\n%q", stream, plain.out)
	}
	if plain.usage != whole.usage || plain.hasUsage != whole.hasUsage || plain.produced != whole.produced || plain.done != whole.done {
		t.Fatalf("metering depends on OnUsage or HideUsage: %+v vs %+v", plain, whole)
	}

	// With fields, the output is the input with the fields inserted once, if at all.
	added := run(split, false, true)
	if added.calls == 0 {
		if added.out != string(stream) {
			t.Fatalf("changed a stream without usage")
		}
		return
	}
	if !removesTo(added.out, ","+string(fields), string(stream)) && !removesTo(added.out, string(fields), string(stream)) {
		t.Fatalf("usage message rewritten beyond the fields:\n%q\nto\n%q", stream, added.out)
	}
}

// cut splits b into writes whose lengths come from cuts; no cuts means byte by byte.
func cut(b, cuts []byte) [][]byte {
	var parts [][]byte
	for i := 0; len(b) > 0; i++ {
		n := 1
		if len(cuts) > 0 {
			n = 1 + int(cuts[i%len(cuts)])%48
		}
		n = min(n, len(b))
		parts = append(parts, b[:n])
		b = b[n:]
	}
	return parts
}

// removesTo reports whether removing one occurrence of sub from s gives want.
func removesTo(s, sub, want string) bool {
	if len(s) != len(want)+len(sub) {
		return false
	}
	prefix := 0 // s and want agree on their first prefix bytes
	for prefix < len(want) && s[prefix] == want[prefix] {
		prefix++
	}
	suffix := 0 // and on their last suffix bytes
	for suffix < len(want) && s[len(s)-1-suffix] == want[len(want)-1-suffix] {
		suffix++
	}
	for i := max(0, len(want)-suffix); i <= prefix; i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// FuzzAnthropicJSONUsage: a Messages answer's usage is read or refused, never out of range,
// and the same through the DocumentMeter (which keeps the top-level usage) as whole.
func FuzzAnthropicJSONUsage(f *testing.F) {
	f.Add([]byte(`{"id":"m","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"cache_creation_input_tokens":2,"cache_read_input_tokens":5,"output_tokens":7}}`))
	f.Add([]byte(`{"usage":{"input_tokens":3,"output_tokens":null,"cache_read_input_tokens":-1}}`))
	f.Add([]byte(`{"usage":{"output_tokens":4}}`))
	f.Add([]byte(`{"usage":{"input_tokens":3,"output_tokens":4,"server_tool_use":{"web_search_requests":2,"web_fetch_requests":1}}}`))
	f.Add([]byte(`{"usage":{"input_tokens":3,"output_tokens":4,"server_tool_use":{"web_search_requests":-2}}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		u, ok := DialectAnthropic.UsageFromJSON(body)
		if !ok {
			return
		}
		for _, n := range u.ToolCalls {
			if n < 0 || n > MaxTokens {
				t.Fatalf("tool calls out of range: %+v", u)
			}
		}
		if u.InputTokens < 0 || u.InputTokens > MaxTokens || u.OutputTokens < 0 || u.OutputTokens > MaxTokens {
			t.Fatalf("usage out of range: %+v", u)
		}
		if !json.Valid(body) {
			t.Fatalf("usage %+v from invalid JSON %q", u, body)
		}
		d := DocumentMeter{Dialect: DialectAnthropic}
		d.Write(body)
		if du, dok := d.Usage(); dok && du != u {
			t.Fatalf("DocumentMeter read %+v, whole %+v", du, u)
		}
	})
}

func FuzzJSONUsage(f *testing.F) {
	f.Add([]byte(`{"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}`))
	f.Add([]byte(`{"done":true,"prompt_eval_count":26,"eval_count":290}`))
	f.Add([]byte(`"\ud83d\ude00 caf\u00e9"`))
	f.Add([]byte(`{"id":"resp_1","object":"response","usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens":12,"output_tokens_details":{"reasoning_tokens":5}}}`))
	f.Add([]byte(`{"id":"resp_2","object":"response","output":[{"type":"web_search_call","id":"ws"},{"type":"message","type":"mcp_call"},{"type":"file_search_call","type":"message"},"x",{"type":"\u0077eb_search_call"}],"usage":{"input_tokens":9,"output_tokens":2}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		u, ok := UsageFromJSON(body)
		if ok && (u.InputTokens < 0 || u.InputTokens > MaxTokens || u.OutputTokens < 0 || u.OutputTokens > MaxTokens) {
			t.Fatalf("usage out of range: %+v", u)
		}
		if !ok && u != (Usage{}) {
			t.Fatalf("usage %+v without ok", u)
		}
		if ok && !json.Valid(body) {
			t.Fatalf("usage read from invalid JSON")
		}
		want, wantOK := referenceUsage(body)
		if ok != wantOK && !(wantOK && nesting(body) >= maxDepth) || ok && u != want {
			t.Fatalf("UsageFromJSON = %+v, %v; encoding/json reads %+v, %v", u, ok, want, wantOK)
		}

		// The walker accepts what encoding/json accepts, and counts text as it decodes it.
		end := skipValue(body, skipSpace(body, 0), 0)
		if (end >= 0 && skipSpace(body, end) == len(body)) != json.Valid(body) && nesting(body) < maxDepth {
			t.Fatalf("walker and encoding/json disagree on validity")
		}
		var s string
		if start := skipSpace(body, 0); end > start && body[start] == '"' && utf8.Valid(body) && json.Unmarshal(body, &s) == nil {
			if n := textLen(body[start:end]); n != int64(len(s)) {
				t.Fatalf("textLen = %d, decoded %d bytes", n, len(s))
			}
		}
	})
}

// referenceUsage is UsageFromJSON written with encoding/json.
func referenceUsage(body []byte) (Usage, bool) {
	d := json.NewDecoder(bytes.NewReader(body))
	d.UseNumber()
	var top map[string]any
	if d.Decode(&top) != nil || top == nil {
		return Usage{}, false
	}
	if _, err := d.Token(); err != io.EOF {
		return Usage{}, false
	}
	count := func(v any, present bool) (int64, bool) {
		if !present || v == nil {
			return 0, true
		}
		n, isNum := v.(json.Number)
		if !isNum || strings.ContainsAny(string(n), "-.eE") {
			return 0, false
		}
		i, err := strconv.ParseInt(string(n), 10, 64)
		return i, err == nil && i <= MaxTokens
	}
	if top["object"] == "response" {
		return referenceResponsesUsage(top, count)
	}
	if usage, isObj := top["usage"].(map[string]any); isObj {
		p, hasP := usage["prompt_tokens"]
		c, hasC := usage["completion_tokens"]
		in, ok1 := count(p, hasP)
		out, ok2 := count(c, hasC)
		if !ok1 || !ok2 || p == nil {
			return Usage{}, false
		}
		return Usage{InputTokens: in, OutputTokens: out}, true
	}
	p, hasP := top["prompt_eval_count"]
	e, hasE := top["eval_count"]
	if (!hasP || p == nil) && (!hasE || e == nil) {
		return Usage{}, false
	}
	in, ok1 := count(p, hasP)
	out, ok2 := count(e, hasE)
	if !ok1 || !ok2 {
		return Usage{}, false
	}
	return Usage{InputTokens: in, OutputTokens: out}, true
}

// nesting returns the deepest nesting of arrays and objects in b, roughly.
func nesting(b []byte) int {
	depth, deepest, inString := 0, 0, false
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case inString && c == '\\':
			i++
		case c == '"':
			inString = !inString
		case !inString && (c == '[' || c == '{'):
			depth++
			deepest = max(deepest, depth)
		case !inString && (c == ']' || c == '}'):
			depth--
		}
	}
	return deepest
}

func TestFuzzHelpers(t *testing.T) {
	if got := cut([]byte("abcdef"), []byte{1, 0}); len(got) != 4 {
		t.Errorf("cut = %q", got)
	}
	if !removesTo(`{"a":1,"x":2}`, `,"x":2`, `{"a":1}`) || removesTo(`{"a":1}`, `,"x":2`, `{"a":1}`) {
		t.Error("removesTo")
	}
}

// FuzzDocumentUsage: a DocumentMeter fed a valid JSON document in any split reads the same
// usage as UsageFromJSON reads from the whole.
func FuzzDocumentUsage(f *testing.F) {
	f.Add([]byte(`{"id":"x","choices":[{"message":{"content":"\"usage\":{}"}}],"usage":{"prompt_tokens":9,"completion_tokens":12}}`), uint16(7))
	f.Add([]byte(`{"model":"m","done":true,"prompt_eval_count":26,"eval_count":290}`), uint16(1))
	f.Add([]byte(`{"data":[{"embedding":[0.1,-2e3]}],"us\u0061ge":{"prompt_tokens":4}}`), uint16(3))
	f.Add([]byte(`{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2,"completion_tokens":0}}`), uint16(0))
	f.Add([]byte(` {"a":[{"usage":{"prompt_tokens":5}}],"b":"}"} `), uint16(2))
	f.Fuzz(func(t *testing.T, body []byte, split uint16) {
		var d DocumentMeter
		at := int(split) % (len(body) + 1)
		d.Write(body[:at])
		d.Write(body[at:])
		u, ok := d.Usage()
		if !json.Valid(body) || nesting(body) >= maxDepth {
			if ok && (u.InputTokens < 0 || u.OutputTokens < 0) {
				t.Fatalf("usage out of range: %+v", u)
			}
			return
		}
		want, wantOK := UsageFromJSON(body)
		if ok != wantOK || u != want {
			t.Fatalf("DocumentMeter = %+v, %v; UsageFromJSON = %+v, %v", u, ok, want, wantOK)
		}
	})
}

// referenceResponsesUsage is the usage of an OpenAI Responses object, read with encoding/json.
func referenceResponsesUsage(top map[string]any, count func(any, bool) (int64, bool)) (Usage, bool) {
	usage, isObj := top["usage"].(map[string]any)
	if !isObj {
		return Usage{}, false
	}
	i, hasI := usage["input_tokens"]
	o, hasO := usage["output_tokens"]
	in, ok1 := count(i, hasI)
	out, ok2 := count(o, hasO)
	if !ok1 || !ok2 || i == nil {
		return Usage{}, false
	}
	detail := func(of, name string) int64 {
		d, _ := usage[of].(map[string]any)
		v, has := d[name]
		n, ok := count(v, has)
		if !ok {
			return 0
		}
		return n
	}
	id, _ := top["id"].(string)
	u := Usage{InputTokens: in, OutputTokens: out, ResponseID: id,
		CachedInputTokens: detail("input_tokens_details", "cached_tokens"),
		ReasoningTokens:   detail("output_tokens_details", "reasoning_tokens")}
	items, _ := top["output"].([]any)
	for _, item := range items {
		if obj, isObj := item.(map[string]any); isObj {
			typ, _ := obj["type"].(string)
			if n, counted := responsesToolItems[typ]; counted {
				u.ToolCalls[n]++
			}
		}
	}
	return u.normal(), true
}
