package metering

import (
	"bytes"
	"strings"
	"testing"
)

// responsesStream is an OpenAI Responses stream, as OpenAI sends it.
var responsesStream = strings.Join([]string{
	"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_67c\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[],\"usage\":null}}\n\n",
	"event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"sequence_number\":1,\"output_index\":0,\"item\":{\"id\":\"msg_1\",\"type\":\"message\",\"content\":[]}}\n\n",
	"event: response.reasoning_summary_text.delta\ndata: {\"type\":\"response.reasoning_summary_text.delta\",\"sequence_number\":2,\"delta\":\"Thinking\"}\n\n",
	"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"delta\":\"Hello\"}\n\n",
	"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"delta\":\" w\\u00f6rld\"}\n\n",
	"event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"sequence_number\":5,\"text\":\"Hello w\\u00f6rld\"}\n\n",
	"event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":6,\"response\":{\"id\":\"resp_67c\",\"object\":\"response\",\"status\":\"completed\"," +
		"\"usage\":{\"input_tokens\":36,\"input_tokens_details\":{\"cached_tokens\":20},\"output_tokens\":87,\"output_tokens_details\":{\"reasoning_tokens\":64},\"total_tokens\":123}}}\n\n",
}, "")

func TestResponsesUsageFromJSON(t *testing.T) {
	for _, tt := range []struct {
		name, body string
		want       Usage
		ok         bool
	}{
		{"whole", `{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]}],` +
			`"usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":256},"output_tokens":52,"output_tokens_details":{"reasoning_tokens":32},"total_tokens":380}}`,
			Usage{InputTokens: 328, OutputTokens: 52, CachedInputTokens: 256, ReasoningTokens: 32, ResponseID: "resp_1"}, true},
		{"no details", `{"object":"response","id":"resp_2","usage":{"input_tokens":3,"output_tokens":4}}`, Usage{InputTokens: 3, OutputTokens: 4, ResponseID: "resp_2"}, true},
		{"details above their wholes", `{"object":"response","usage":{"input_tokens":3,"output_tokens":4,"input_tokens_details":{"cached_tokens":9},"output_tokens_details":{"reasoning_tokens":9}}}`,
			Usage{InputTokens: 3, OutputTokens: 4, CachedInputTokens: 3, ReasoningTokens: 4}, true},
		{"chat names are not Responses names", `{"object":"response","usage":{"prompt_tokens":3,"completion_tokens":4}}`, Usage{}, false},
		{"usage null (background)", `{"object":"response","id":"resp_3","status":"queued","usage":null}`, Usage{}, false},
		{"negative", `{"object":"response","usage":{"input_tokens":-3,"output_tokens":4}}`, Usage{}, false},
	} {
		u, ok := UsageFromJSON([]byte(tt.body))
		if ok != tt.ok || ok && u != tt.want {
			t.Errorf("%s: %+v %v, want %+v %v", tt.name, u, ok, tt.want, tt.ok)
		}
	}
}

func TestStreamMeterResponses(t *testing.T) {
	for _, size := range []int{len(responsesStream), 7, 1} {
		var out bytes.Buffer
		calls := 0
		m := &StreamMeter{Format: SSE, HideUsage: true, KeepText: true, OnUsage: func(u Usage) []byte {
			calls++
			return []byte(`"credits_charged":2`)
		}}
		sawID := ""
		for i := 0; i < len(responsesStream); i += size {
			if err := m.Write(&out, []byte(responsesStream[i:min(i+size, len(responsesStream))])); err != nil {
				t.Fatal(err)
			}
			if sawID == "" && m.ResponseID() != "" {
				sawID = m.ResponseID()
				if m.Done() && size < len(responsesStream) {
					t.Errorf("the id came only with the end")
				}
			}
		}
		_ = m.Flush(&out)
		u, ok := m.Usage()
		want := Usage{InputTokens: 36, OutputTokens: 87, CachedInputTokens: 20, ReasoningTokens: 64, ResponseID: "resp_67c"}
		if !ok || u != want || calls != 1 || !m.Done() || sawID != "resp_67c" {
			t.Fatalf("size %d: usage %+v %v, calls %d, done %v, id %q", size, u, ok, calls, m.Done(), sawID)
		}
		if p := m.Produced(); p != (Produced{Chunks: 3, ContentBytes: int64(len("Thinking") + len("Hello wörld"))}) {
			t.Errorf("produced %+v", p)
		}
		if string(m.Text()) != "ThinkingHello wörld" {
			t.Errorf("kept %q", m.Text())
		}
		wantOut := strings.Replace(responsesStream, `"total_tokens":123}}}`, `"total_tokens":123}},"credits_charged":2}`, 1)
		if out.String() != wantOut {
			t.Errorf("size %d: out\n%q\nwant\n%q", size, out.String(), wantOut)
		}
	}

	// Cut before response.completed: no usage, the text produced so far, the id known.
	m := &StreamMeter{Format: SSE}
	cut := responsesStream[:strings.Index(responsesStream, "event: response.output_text.done")]
	_ = m.Write(&bytes.Buffer{}, []byte(cut))
	if _, ok := m.Usage(); ok || m.Done() || m.ResponseID() != "resp_67c" || m.Produced().Chunks != 3 {
		t.Errorf("cut stream: usage %v, done %v, id %q, produced %+v", ok, m.Done(), m.ResponseID(), m.Produced())
	}
}
