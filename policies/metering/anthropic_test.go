package metering

import (
	"bytes"
	"strings"
	"testing"
)

const (
	anthropicStart = "event: message_start\n" + `data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"c",` +
		`"usage":{"input_tokens":10,"cache_creation_input_tokens":3,"cache_read_input_tokens":20,"output_tokens":1}}}` + "\n\n"
	anthropicBlockStart = "event: content_block_start\n" + `data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}` + "\n\n"
	anthropicPing       = "event: ping\n" + `data: {"type": "ping"}` + "\n\n"
	anthropicUsageDelta = "event: message_delta\n" + `data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}` + "\n\n"
	anthropicStop       = "event: message_stop\n" + `data: {"type":"message_stop"}` + "\n\n"
)

func anthropicDelta(text string) string {
	return "event: content_block_delta\n" + `data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"` + text + `"}}` + "\n\n"
}

func TestAnthropicUsageFromJSON(t *testing.T) {
	for _, c := range []struct {
		body string
		want Usage
		ok   bool
	}{
		{`{"id":"m","type":"message","content":[{"type":"text","text":"\"usage\":{}"}],"usage":{"input_tokens":10,"cache_creation_input_tokens":3,"cache_read_input_tokens":20,"output_tokens":7}}`,
			Usage{InputTokens: 33, OutputTokens: 7, CachedInputTokens: 20, CacheWriteTokens: 3}, true},
		{`{"usage":{"input_tokens":10,"output_tokens":7}}`, Usage{InputTokens: 10, OutputTokens: 7}, true},
		{`{"usage":{"input_tokens":0,"output_tokens":0,"cache_read_input_tokens":null}}`, Usage{}, true},
		{`{"usage":{"output_tokens":7}}`, Usage{}, false},                       // no input_tokens
		{`{"usage":{"input_tokens":-1,"output_tokens":7}}`, Usage{}, false},     // negative
		{`{"usage":{"input_tokens":1.5,"output_tokens":7}}`, Usage{}, false},    // fractional
		{`{"usage":{"prompt_tokens":4,"completion_tokens":2}}`, Usage{}, false}, // OpenAI's is not Anthropic's
		{`{"usage":{"input_tokens":4,"cache_read_input_tokens":"x"}}`, Usage{}, false},
		{`{"usage":{"input_tokens":4}`, Usage{}, false}, // cut
	} {
		got, ok := DialectAnthropic.UsageFromJSON([]byte(c.body))
		if got != c.want || ok != c.ok {
			t.Errorf("%s: %+v %v, want %+v %v", c.body, got, ok, c.want, c.ok)
		}
		d := DocumentMeter{Dialect: DialectAnthropic}
		for i := range len(c.body) {
			d.Write([]byte{c.body[i]})
		}
		if got, ok := d.Usage(); got != c.want || ok != c.ok {
			t.Errorf("DocumentMeter %s: %+v %v, want %+v %v", c.body, got, ok, c.want, c.ok)
		}
	}
}

func TestAnthropicStream(t *testing.T) {
	full := anthropicStart + anthropicBlockStart + anthropicPing + anthropicDelta("Hello") + anthropicDelta(" world!") +
		"event: content_block_stop\n" + `data: {"type":"content_block_stop","index":0}` + "\n\n" + anthropicUsageDelta + anthropicStop
	for _, c := range []struct {
		name   string
		stream string
		want   Usage
		ok     bool
		final  bool // OnUsage called
	}{
		{"whole", full, Usage{InputTokens: 33, OutputTokens: 15, CachedInputTokens: 20, CacheWriteTokens: 3}, true, true},
		// Cut before message_stop, after message_delta: its usage, the output at least the
		// produced text (12 bytes, 2 messages: 3 tokens).
		{"cut after message_delta", strings.TrimSuffix(full, anthropicStop), Usage{InputTokens: 33, OutputTokens: 15, CachedInputTokens: 20, CacheWriteTokens: 3}, true, false},
		// Cut after the deltas: message_start's input, the produced text as output (its
		// placeholder 1 is less).
		{"cut after the deltas", anthropicStart + anthropicDelta("Hello") + anthropicDelta(" world!"), Usage{InputTokens: 33, OutputTokens: 3, CachedInputTokens: 20, CacheWriteTokens: 3}, true, false},
		{"cut after message_start", anthropicStart, Usage{InputTokens: 33, OutputTokens: 1, CachedInputTokens: 20, CacheWriteTokens: 3}, true, false},
		{"no usage at all", anthropicDelta("Hello") + anthropicStop, Usage{}, false, false},
		// A newer server's message_delta carries the input counts too: they replace the start's.
		{"input in message_delta", anthropicStart + "event: message_delta\n" +
			`data: {"type":"message_delta","delta":{},"usage":{"input_tokens":11,"cache_read_input_tokens":0,"output_tokens":4}}` + "\n\n" + anthropicStop,
			Usage{InputTokens: 14, OutputTokens: 4, CacheWriteTokens: 3}, true, true},
		{"a bad count spoils it", anthropicStart + "event: message_delta\n" + `data: {"type":"message_delta","usage":{"output_tokens":-4}}` + "\n\n" + anthropicStop,
			Usage{}, false, false},
		// Thinking and tool input are produced text too.
		{"thinking and tool input", anthropicStart + "event: content_block_delta\n" +
			`data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"let me think hard"}}` + "\n\n" +
			"event: content_block_delta\n" + `data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Paris\"}"}}` + "\n\n",
			Usage{InputTokens: 33, OutputTokens: 9, CachedInputTokens: 20, CacheWriteTokens: 3}, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			calls := 0
			m := &StreamMeter{Format: SSE, Dialect: DialectAnthropic, OnUsage: func(u Usage) []byte {
				calls++
				if u != c.want {
					t.Errorf("OnUsage %+v, want %+v", u, c.want)
				}
				return []byte(testFields)
			}}
			var out bytes.Buffer
			for _, p := range cut([]byte(c.stream), []byte{7, 30, 2}) {
				if err := m.Write(&out, p); err != nil {
					t.Fatal(err)
				}
			}
			_ = m.Flush(&out)
			got, ok := m.Usage()
			if got != c.want || ok != c.ok || (calls == 1) != c.final || calls > 1 {
				t.Errorf("usage %+v %v, OnUsage called %d times; want %+v %v, final %v", got, ok, calls, c.want, c.ok, c.final)
			}
			want := c.stream
			if c.final {
				want = strings.Replace(want, `{"type":"message_stop"}`, `{"type":"message_stop",`+testFields+`}`, 1)
			}
			if out.String() != want {
				t.Errorf("wrote\n%q\nwant\n%q", out.String(), want)
			}
			if m.Done() != strings.Contains(c.stream, `"message_stop"`) {
				t.Errorf("Done %v", m.Done())
			}
		})
	}
}
