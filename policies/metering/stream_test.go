package metering

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

const testFields = `"credits_charged":0.12,"credits_remaining":3`

// Realistic OpenAI stream pieces.
func sseContent(s string) string {
	return `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"` + s + `"},"finish_reason":null}],"usage":null}` + "\n\n"
}

const (
	sseRole    = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}` + "\n\n"
	sseFinish  = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}` + "\n\n"
	sseUsage   = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}` + "\n\n"
	sseCharged = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21},` + testFields + `}` + "\n\n"
	sseDone    = "data: [DONE]\n\n"
)

type meterCase struct {
	name     string
	parts    []string // the upstream reads
	hide     bool
	want     string // the output
	usage    Usage
	hasUsage bool
	calls    int // OnUsage calls
	produced Produced
	done     bool
}

func TestStreamMeterSSE(t *testing.T) {
	zeroUsage := `data: {"id":"c","choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}` + "\n\n"
	lastContentUsage := `data: {"id":"c","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}` + "\n\n"
	crlf := func(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }
	cr := func(s string) string { return strings.ReplaceAll(s, "\n", "\r") }
	hello := sseContent("Hello")

	runMeterCases(t, SSE, []meterCase{
		{
			name:     "plain",
			parts:    []string{sseRole, hello, sseContent(" world"), sseFinish, sseDone},
			want:     sseRole + hello + sseContent(" world") + sseFinish + sseDone,
			produced: Produced{2, 11}, done: true,
		},
		{
			name:  "usage",
			parts: []string{hello, sseFinish, sseUsage, sseDone},
			want:  hello + sseFinish + sseCharged + sseDone,
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "usage hidden",
			parts: []string{hello, sseFinish, sseUsage, sseDone},
			hide:  true,
			want:  hello + sseFinish + sseDone,
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "usage split across writes",
			parts: []string{hello + sseUsage[:30], sseUsage[30:150], sseUsage[150 : len(sseUsage)-1], "\n" + sseDone[:3], sseDone[3:]},
			want:  hello + sseCharged + sseDone,
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "usage split and hidden",
			parts: []string{hello + sseUsage[:30], sseUsage[30 : len(sseUsage)-1], "\n", sseDone},
			hide:  true,
			want:  hello + sseDone,
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:     "usage missing",
			parts:    []string{hello, sseFinish, sseDone},
			want:     hello + sseFinish + sseDone,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:     "explicit zero usage",
			parts:    []string{zeroUsage, sseDone},
			want:     strings.Replace(zeroUsage, "0}}", "0},"+testFields+"}", 1) + sseDone,
			hasUsage: true, calls: 1, done: true,
		},
		{
			name: "multi-line data",
			parts: []string{
				"data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"Hi\"}}],\ndata: \"usage\":null}\n\n",
				"data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
			},
			want: "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"Hi\"}}],\ndata: \"usage\":null}\n\n" +
				"data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}," + testFields + "}\n\n",
			usage: Usage{InputTokens: 3, OutputTokens: 4}, hasUsage: true, calls: 1,
			produced: Produced{1, 2},
		},
		{
			name:  "multi-line data with empty last line",
			parts: []string{"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}} \ndata:\n\n"},
			want:  "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}," + testFields + "} \ndata:\n\n",
			usage: Usage{InputTokens: 3, OutputTokens: 0}, hasUsage: true, calls: 1,
		},
		{
			name:  "crlf",
			parts: []string{crlf(hello), crlf(sseUsage), crlf(sseDone)},
			want:  crlf(hello) + crlf(sseCharged) + crlf(sseDone),
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "crlf hidden",
			parts: []string{crlf(hello), crlf(sseUsage), crlf(sseDone)},
			hide:  true,
			want:  crlf(hello) + crlf(sseDone),
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "cr",
			parts: []string{cr(hello), cr(sseUsage), cr(sseDone)},
			hide:  true,
			want:  cr(hello) + cr(sseDone),
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "cr before lf across events",
			parts: []string{"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\r", "\n", sseDone},
			hide:  true,
			want:  sseDone,
			usage: Usage{InputTokens: 1, OutputTokens: 0}, hasUsage: true, calls: 1, done: true,
		},
		{
			name:  "comments and fields",
			parts: []string{": keep-alive\n\n", "event: message\nid: 7\n: note\n" + hello, "retry: 10\n" + sseUsage, sseDone},
			hide:  true,
			want:  ": keep-alive\n\n" + "event: message\nid: 7\n: note\n" + hello + sseDone,
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5}, done: true,
		},
		{
			name:  "no space after colon",
			parts: []string{"data:{\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n"},
			want:  "data:{\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}," + testFields + "}\n\n",
			usage: Usage{InputTokens: 2, OutputTokens: 1}, hasUsage: true, calls: 1,
		},
		{
			name:  "usage on the last content chunk",
			parts: []string{hello, lastContentUsage, sseDone},
			hide:  true,
			want:  hello + strings.Replace(lastContentUsage, "4}}", "4},"+testFields+"}", 1) + sseDone,
			usage: Usage{InputTokens: 3, OutputTokens: 4}, hasUsage: true, calls: 1,
			produced: Produced{2, 6}, done: true,
		},
		{
			name: "running usage on every chunk",
			parts: []string{
				`data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":1}}` + "\n\n",
				`data: {"choices":[{"delta":{"content":"b"},"finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":2}}` + "\n\n",
				`data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":3}}` + "\n\n",
				`data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3}}` + "\n\n",
			},
			hide: true,
			want: `data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":1}}` + "\n\n" +
				`data: {"choices":[{"delta":{"content":"b"},"finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":2}}` + "\n\n" +
				`data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":3},` + testFields + "}\n\n",
			usage: Usage{InputTokens: 3, OutputTokens: 3}, hasUsage: true, calls: 1,
			produced: Produced{2, 2},
		},
		{
			name:  "two usage chunks",
			parts: []string{sseUsage, strings.Replace(sseUsage, ":9,", ":99,", 1), sseDone},
			want:  sseCharged + strings.Replace(sseUsage, ":9,", ":99,", 1) + sseDone,
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1, done: true,
		},
		{
			name:  "invalid counts",
			parts: []string{`data: {"choices":[],"usage":{"prompt_tokens":-9,"completion_tokens":12}}` + "\n\n", sseDone},
			want:  `data: {"choices":[],"usage":{"prompt_tokens":-9,"completion_tokens":12}}` + "\n\n" + sseDone,
			done:  true,
		},
		{
			name:  "invalid counts hidden",
			parts: []string{`data: {"choices":[],"usage":{"prompt_tokens":1.5}}` + "\n\n", sseDone},
			hide:  true,
			want:  sseDone,
			done:  true,
		},
		{
			name: "garbage",
			parts: []string{
				"data: {not json}\n\n",
				`data: {"choices":[],"usage":{"prompt_tokens":1}` + "\n\n",
				`data: {"choices":[{"delta":{"content":"x"}}],"usage":null}}` + "\n\n",
				"data: [DONE] x\n\n",
				"\n\n\x00\xff\n\n",
			},
			hide: true,
			want: "data: {not json}\n\n" + `data: {"choices":[],"usage":{"prompt_tokens":1}` + "\n\n" +
				`data: {"choices":[{"delta":{"content":"x"}}],"usage":null}}` + "\n\n" + "data: [DONE] x\n\n" + "\n\n\x00\xff\n\n",
		},
		{
			name:     "generated text",
			parts:    []string{`data: {"choices":[{"delta":{"reasoning_content":"\u00e9\n","tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}` + "\n\n"},
			want:     `data: {"choices":[{"delta":{"reasoning_content":"\u00e9\n","tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}` + "\n\n",
			produced: Produced{1, 10},
		},
		{
			name:  "unterminated tail",
			parts: []string{hello, strings.TrimSuffix(sseUsage, "\n\n")},
			want:  hello + strings.TrimSuffix(sseCharged, "\n\n"),
			usage: Usage{InputTokens: 9, OutputTokens: 12}, hasUsage: true, calls: 1,
			produced: Produced{1, 5},
		},
		{
			name:  "empty",
			parts: nil,
		},
	})
}

func TestStreamMeterNDJSON(t *testing.T) {
	chat := func(s string) string {
		return `{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"` + s + `"},"done":false}` + "\n"
	}
	const (
		chatDone        = `{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":5,"prompt_eval_count":26,"prompt_eval_duration":1,"eval_count":290,"eval_duration":2}` + "\n"
		chatDoneCharged = `{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":5,"prompt_eval_count":26,"prompt_eval_duration":1,"eval_count":290,"eval_duration":2,` + testFields + `}` + "\n"
	)
	crlf := func(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }
	hi := chat("Hi")

	runMeterCases(t, NDJSON, []meterCase{
		{
			name:  "chat",
			parts: []string{hi, chat(" there"), chatDone},
			want:  hi + chat(" there") + chatDoneCharged,
			usage: Usage{InputTokens: 26, OutputTokens: 290}, hasUsage: true, calls: 1,
			produced: Produced{2, 8}, done: true,
		},
		{
			name: "generate",
			parts: []string{
				`{"model":"m","response":"The","done":false}` + "\n",
				`{"model":"m","response":"","done":true,"context":[1,2,3],"prompt_eval_count":5,"eval_count":2}` + "\n",
			},
			want: `{"model":"m","response":"The","done":false}` + "\n" +
				`{"model":"m","response":"","done":true,"context":[1,2,3],"prompt_eval_count":5,"eval_count":2,` + testFields + "}\n",
			usage: Usage{InputTokens: 5, OutputTokens: 2}, hasUsage: true, calls: 1,
			produced: Produced{1, 3}, done: true,
		},
		{
			name:  "usage split across writes",
			parts: []string{hi + chatDone[:40], chatDone[40:100], chatDone[100 : len(chatDone)-1], "\n"},
			want:  hi + chatDoneCharged,
			usage: Usage{InputTokens: 26, OutputTokens: 290}, hasUsage: true, calls: 1,
			produced: Produced{1, 2}, done: true,
		},
		{
			name:  "crlf",
			parts: []string{crlf(hi), crlf(chatDone)},
			want:  crlf(hi) + crlf(chatDoneCharged),
			usage: Usage{InputTokens: 26, OutputTokens: 290}, hasUsage: true, calls: 1,
			produced: Produced{1, 2}, done: true,
		},
		{
			name:     "usage missing",
			parts:    []string{hi, `{"model":"m","done":true}` + "\n"},
			want:     hi + `{"model":"m","done":true}` + "\n",
			produced: Produced{1, 2}, done: true,
		},
		{
			name:     "explicit zero usage",
			parts:    []string{`{"done":true,"prompt_eval_count":0,"eval_count":0}` + "\n"},
			want:     `{"done":true,"prompt_eval_count":0,"eval_count":0,` + testFields + "}\n",
			hasUsage: true, calls: 1, done: true,
		},
		{
			name:  "prompt count omitted",
			parts: []string{`{"done":true,"eval_count":7}` + "\n"},
			want:  `{"done":true,"eval_count":7,` + testFields + "}\n",
			usage: Usage{InputTokens: 0, OutputTokens: 7}, hasUsage: true, calls: 1, done: true,
		},
		{
			name:  "hide usage is for sse only",
			parts: []string{hi, chatDone},
			hide:  true,
			want:  hi + chatDoneCharged,
			usage: Usage{InputTokens: 26, OutputTokens: 290}, hasUsage: true, calls: 1,
			produced: Produced{1, 2}, done: true,
		},
		{
			name:  "invalid counts",
			parts: []string{`{"done":true,"prompt_eval_count":-1,"eval_count":7}` + "\n"},
			want:  `{"done":true,"prompt_eval_count":-1,"eval_count":7}` + "\n",
			done:  true,
		},
		{
			name:  "two done objects",
			parts: []string{chatDone, chatDone},
			want:  chatDoneCharged + chatDone,
			usage: Usage{InputTokens: 26, OutputTokens: 290}, hasUsage: true, calls: 1, done: true,
		},
		{
			name:     "garbage and blank lines",
			parts:    []string{"\n", "{not json}\n", `{"done":true,"eval_count":1` + "\n", "[1]\n", "\r\n", hi},
			want:     "\n" + "{not json}\n" + `{"done":true,"eval_count":1` + "\n" + "[1]\n" + "\r\n" + hi,
			produced: Produced{1, 2},
		},
		{
			name:     "thinking and tool calls",
			parts:    []string{`{"message":{"role":"assistant","content":"","thinking":"hmm","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":false}` + "\n"},
			want:     `{"message":{"role":"assistant","content":"","thinking":"hmm","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":false}` + "\n",
			produced: Produced{1, 10},
		},
		{
			name:  "unterminated last line",
			parts: []string{hi, strings.TrimSuffix(chatDone, "\n")},
			want:  hi + strings.TrimSuffix(chatDoneCharged, "\n"),
			usage: Usage{InputTokens: 26, OutputTokens: 290}, hasUsage: true, calls: 1,
			produced: Produced{1, 2}, done: true,
		},
	})
}

// runMeterCases runs each case fed as its parts, whole, byte by byte and at random splits.
func runMeterCases(t *testing.T, format Format, cases []meterCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := strings.Join(tc.parts, "")
			feeds := map[string][]string{
				"parts":        tc.parts,
				"whole":        {in},
				"byte by byte": splitEvery(in, 1),
			}
			rng := rand.New(rand.NewPCG(1, uint64(len(in))))
			for i := range 20 {
				feeds["random split "+string(rune('a'+i))] = splitRandom(rng, in)
			}
			for how, parts := range feeds {
				m := &StreamMeter{Format: format, HideUsage: tc.hide}
				calls := 0
				m.OnUsage = func(u Usage) []byte {
					calls++
					return []byte(testFields)
				}
				out := feedStrings(t, m, parts)
				if out != tc.want {
					t.Fatalf("%s: output\n%q\nwant\n%q", how, out, tc.want)
				}
				if u, ok := m.Usage(); u != tc.usage || ok != tc.hasUsage {
					t.Errorf("%s: Usage() = %+v, %v; want %+v, %v", how, u, ok, tc.usage, tc.hasUsage)
				}
				if calls != tc.calls {
					t.Errorf("%s: OnUsage called %d times, want %d", how, calls, tc.calls)
				}
				if p := m.Produced(); p != tc.produced {
					t.Errorf("%s: Produced() = %+v, want %+v", how, p, tc.produced)
				}
				if m.Done() != tc.done {
					t.Errorf("%s: Done() = %v, want %v", how, m.Done(), tc.done)
				}
			}
		})
	}
}

func feedStrings(t testing.TB, m *StreamMeter, parts []string) string {
	t.Helper()
	var out bytes.Buffer
	for _, p := range parts {
		if err := m.Write(&out, []byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Flush(&out); err != nil {
		t.Fatal(err)
	}
	return out.String()
}

func splitEvery(s string, n int) []string {
	var parts []string
	for len(s) > n {
		parts = append(parts, s[:n])
		s = s[n:]
	}
	return append(parts, s)
}

func splitRandom(rng *rand.Rand, s string) []string {
	var parts []string
	for len(s) > 0 {
		n := 1 + rng.IntN(min(len(s), 64))
		parts = append(parts, s[:n])
		s = s[n:]
	}
	return parts
}

func TestStreamMeterLongMessage(t *testing.T) {
	for _, format := range []Format{SSE, NDJSON} {
		long := `{"choices":[],"pad":"` + strings.Repeat("x", MaxMessage) + `","usage":{"prompt_tokens":1},"done":true,"eval_count":1}`
		short := `{"choices":[],"usage":{"prompt_tokens":2},"done":true,"eval_count":2}`
		sep := "\n"
		if format == SSE {
			long, short, sep = "data: "+long, "data: "+short, "\n\n"
		}
		in := long + sep + short + sep
		want := long + sep + short[:len(short)-1] + "," + testFields + "}" + sep

		for _, size := range []int{1 << 12, 1000, len(in)} {
			m := &StreamMeter{Format: format, OnUsage: func(Usage) []byte { return []byte(testFields) }}
			var out bytes.Buffer
			for p := in; len(p) > 0; {
				n := min(size, len(p))
				if err := m.Write(&out, []byte(p[:n])); err != nil {
					t.Fatal(err)
				}
				if len(m.buf) > MaxMessage {
					t.Fatalf("format %d: held back %d bytes", format, len(m.buf))
				}
				p = p[n:]
			}
			if err := m.Flush(&out); err != nil {
				t.Fatal(err)
			}
			if out.String() != want {
				t.Errorf("format %d, writes of %d: output differs from the input with fields on the second message", format, size)
			}
			if u, ok := m.Usage(); !ok || u.InputTokens+u.OutputTokens != 2 {
				t.Errorf("format %d, writes of %d: Usage() = %+v, %v; want the second message's", format, size, u, ok)
			}
		}
	}
}

func TestStreamMeterLimitBoundary(t *testing.T) {
	// A message of exactly the limit is parsed; one byte more is not.
	msg := "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"
	for _, limit := range []int{len(msg), len(msg) - 1} {
		for _, size := range []int{1, 7, len(msg)} {
			m := &StreamMeter{Format: SSE, HideUsage: true, limit: limit}
			out := feedStrings(t, m, splitEvery(msg+sseDone, size))
			_, ok := m.Usage()
			if parsed := limit >= len(msg); ok != parsed || (out == sseDone) != parsed {
				t.Errorf("limit %d, writes of %d: usage %v, output %q", limit, size, ok, out)
			}
		}
	}
}

func TestStreamMeterCountsUnparsedMessages(t *testing.T) {
	// A message too long to parse still counts as generated text: a stream of huge messages
	// without usage is never free.
	msg := sseContent(strings.Repeat("x", 200))
	for _, size := range []int{1, 13, len(msg)} {
		m := &StreamMeter{Format: SSE, limit: 64, KeepText: true}
		out := feedStrings(t, m, splitEvery(msg+msg, size))
		if out != msg+msg {
			t.Fatalf("writes of %d: output changed", size)
		}
		if p := m.Produced(); p.ContentBytes < int64(2*len(msg)) || p.Chunks != 2 {
			t.Errorf("writes of %d: produced %+v, want the %d bytes of 2 unparsed messages", size, p, 2*len(msg))
		}
		if n := m.ProducedTokens(FamilyOpenAI); n < int64(2*len(msg))/4 {
			t.Errorf("writes of %d: %d tokens produced, want at least a token per 4 bytes", size, n)
		}
	}
}

type failingWriter struct{ n int }

var errClientGone = errors.New("client gone")

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.n == 0 {
		return 0, errClientGone
	}
	w.n--
	return len(p), nil
}

func TestStreamMeterClientGone(t *testing.T) {
	calls := 0
	m := &StreamMeter{Format: SSE, OnUsage: func(Usage) []byte { calls++; return nil }}
	in := sseContent("a") + sseContent("b") + sseContent("c") + sseFinish + sseUsage
	if err := m.Write(&failingWriter{n: 1}, []byte(in[:len(in)-100])); !errors.Is(err, errClientGone) {
		t.Fatalf("Write = %v, want the writer's error", err)
	}
	// The caller drains the rest of the stream into io.Discard.
	if err := m.Write(io.Discard, []byte(in[len(in)-100:])); err != nil {
		t.Fatal(err)
	}
	if err := m.Flush(io.Discard); err != nil {
		t.Fatal(err)
	}
	if u, ok := m.Usage(); !ok || u != (Usage{InputTokens: 9, OutputTokens: 12}) || calls != 1 {
		t.Errorf("Usage() = %+v, %v, %d calls; want the usage, once", u, ok, calls)
	}
	if p := m.Produced(); p != (Produced{3, 3}) {
		t.Errorf("Produced() = %+v", p)
	}
}

func TestStreamMeterOtherFormats(t *testing.T) {
	for _, format := range []Format{0, JSON} {
		m := &StreamMeter{Format: format}
		if out := feedStrings(t, m, []string{sseUsage[:10], sseUsage[10:]}); out != sseUsage {
			t.Errorf("format %d: output %q", format, out)
		}
		if _, ok := m.Usage(); ok {
			t.Errorf("format %d: metered", format)
		}
	}
}

func TestStreamMeterChunkAllocations(t *testing.T) {
	m := &StreamMeter{Format: SSE, OnUsage: func(Usage) []byte { return []byte(testFields) }}
	chunk := []byte(sseContent("Hello"))
	split := []byte(sseContent("Hello, world"))
	multi := []byte("data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"Hi\"}}],\ndata: \"usage\":null}\n\n")
	line := []byte(`{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}` + "\n")
	n := &StreamMeter{Format: NDJSON}
	allocs := testing.AllocsPerRun(100, func() {
		_ = m.Write(io.Discard, chunk)
		_ = m.Write(io.Discard, split[:50])
		_ = m.Write(io.Discard, split[50:])
		_ = m.Write(io.Discard, multi)
		_ = n.Write(io.Discard, line)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per content chunk, want 0", allocs)
	}
}

// sseStream is a realistic stream: role chunk, 100 content chunks, finish, usage, [DONE].
func sseStream() [][]byte {
	words := strings.Fields("The quick brown fox jumps over the lazy dog while a caf\u00e9 owner writes notes")
	reads := [][]byte{[]byte(sseRole)}
	for i := range 100 {
		reads = append(reads, []byte(sseContent(" "+words[i%len(words)])))
	}
	return append(reads, []byte(sseFinish), []byte(sseUsage), []byte(sseDone))
}

func BenchmarkStreamMeterSSE(b *testing.B) {
	reads := sseStream()
	var size int64
	for _, r := range reads {
		size += int64(len(r))
	}
	fields := []byte(testFields)
	b.SetBytes(size)
	b.ReportAllocs()
	for b.Loop() {
		m := StreamMeter{Format: SSE, OnUsage: func(Usage) []byte { return fields }}
		for _, r := range reads {
			if err := m.Write(io.Discard, r); err != nil {
				b.Fatal(err)
			}
		}
		_ = m.Flush(io.Discard)
		if _, ok := m.Usage(); !ok {
			b.Fatal("no usage")
		}
	}
}

func BenchmarkStreamMeterSSEHidden(b *testing.B) {
	reads := sseStream()
	b.ReportAllocs()
	for b.Loop() {
		m := StreamMeter{Format: SSE, HideUsage: true}
		for _, r := range reads {
			_ = m.Write(io.Discard, r)
		}
		_ = m.Flush(io.Discard)
	}
}

func BenchmarkStreamMeterNDJSON(b *testing.B) {
	var reads [][]byte
	for range 100 {
		reads = append(reads, []byte(`{"model":"m","created_at":"2024-01-01T00:00:00.000000Z","message":{"role":"assistant","content":" word"},"done":false}`+"\n"))
	}
	reads = append(reads, []byte(`{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":5,"prompt_eval_count":26,"prompt_eval_duration":1,"eval_count":290,"eval_duration":2}`+"\n"))
	fields := []byte(testFields)
	b.ReportAllocs()
	for b.Loop() {
		m := StreamMeter{Format: NDJSON, OnUsage: func(Usage) []byte { return fields }}
		for _, r := range reads {
			_ = m.Write(io.Discard, r)
		}
		_ = m.Flush(io.Discard)
	}
}

func TestStreamMeterLinearTime(t *testing.T) {
	// Inputs that would make a careless scanner quadratic; each must take well under a second.
	for name, in := range map[string]string{
		"cr lines":      strings.Repeat("a\r", MaxMessage/2),
		"cr only":       strings.Repeat("\r", MaxMessage),
		"one long line": "data: " + strings.Repeat("x", MaxMessage-10),
		"deep json":     "data: " + strings.Repeat("[", MaxMessage/4) + "\n\n",
		"many keys":     "data: {" + strings.Repeat(`"k":1,`, MaxMessage/8) + `"usage":{"prompt_tokens":1}}` + "\n\n",
		"escaped keys":  "data: {" + strings.Repeat(`"\u006b":1,`, MaxMessage/16) + `"usage":{"prompt_tokens":1}}` + "\n\n",
		"ndjson":        strings.Repeat(`{"response":"x","done":false}`+"\n", MaxMessage/32),
	} {
		for _, format := range []Format{SSE, NDJSON} {
			for _, size := range []int{len(in), 4096} {
				start := time.Now()
				m := &StreamMeter{Format: format}
				for _, p := range splitEvery(in, size) {
					_ = m.Write(io.Discard, []byte(p))
				}
				_ = m.Flush(io.Discard)
				if d := time.Since(start); d > 2*time.Second {
					t.Errorf("%s, format %d, writes of %d: %v", name, format, size, d)
				}
			}
		}
	}
}

func TestStreamMeterLegacyCompletions(t *testing.T) {
	// A legacy completion's chunks carry their text in choices[].text: it is generated text,
	// kept for the tokenizer like a chat delta's content.
	stream := `data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":"tok1 tok2","logprobs":null,"finish_reason":null}]}` + "\n\n" +
		`data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":" tok3\n","logprobs":null,"finish_reason":"length"}]}` + "\n\n"
	for _, size := range []int{1, 7, len(stream)} {
		m := &StreamMeter{Format: SSE, KeepText: true}
		if out := feedStrings(t, m, splitEvery(stream, size)); out != stream {
			t.Fatalf("writes of %d: output changed:\n%s", size, out)
		}
		if p := m.Produced(); p.Chunks != 2 || p.ContentBytes != int64(len("tok1 tok2 tok3\n")) {
			t.Errorf("writes of %d: produced %+v, want 2 chunks of %d bytes", size, p, len("tok1 tok2 tok3\n"))
		}
		if got := string(m.Text()); got != "tok1 tok2 tok3\n" {
			t.Errorf("writes of %d: kept %q", size, got)
		}
	}
}
