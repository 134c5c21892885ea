package metering

import (
	"io"
	"strings"
	"testing"
)

// TestToolCalls: provider tool calls are read from an Anthropic usage's server_tool_use (a
// whole answer, and a stream's cumulative message_delta) and from a Responses object's output
// items (a whole answer, and the response of the event that ends a stream); client tool calls
// (function_call) are not counted.
func TestToolCalls(t *testing.T) {
	u, ok := DialectAnthropic.UsageFromJSON([]byte(`{"type":"message","usage":{"input_tokens":3,"output_tokens":4,` +
		`"server_tool_use":{"web_search_requests":2,"web_fetch_requests":5}}}`))
	if !ok || u.ToolCalls != (ToolCalls{ToolWebSearch: 2, ToolWebFetch: 5}) {
		t.Errorf("Anthropic JSON: %+v %v", u, ok)
	}
	if _, ok := DialectAnthropic.UsageFromJSON([]byte(`{"usage":{"input_tokens":3,"output_tokens":4,"server_tool_use":{"web_search_requests":1.5}}}`)); ok {
		t.Error("a fractional count read as usage")
	}
	delta := "event: message_delta\n" + `data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15,"server_tool_use":{"web_search_requests":3}}}` + "\n\n"
	m := &StreamMeter{Format: SSE, Dialect: DialectAnthropic}
	_ = m.Write(io.Discard, []byte(anthropicStart+anthropicDelta("hi")+delta+anthropicStop))
	_ = m.Flush(io.Discard)
	if u, ok := m.Usage(); !ok || u.ToolCalls != (ToolCalls{ToolWebSearch: 3}) || u.OutputTokens != 15 {
		t.Errorf("Anthropic stream: %+v %v", u, ok)
	}

	const output = `"output":[{"type":"web_search_call","id":"ws_1","status":"completed"},{"type":"web_search_call","id":"ws_2"},` +
		`{"type":"function_call","name":"f"},{"type":"file_search_call"},{"type":"mcp_call"},{"type":"message","content":[]}]`
	u, ok = UsageFromJSON([]byte(`{"id":"resp_1","object":"response",` + output + `,"usage":{"input_tokens":9,"output_tokens":2}}`))
	want := ToolCalls{ToolWebSearch: 2, ToolFileSearch: 1, ToolMCP: 1}
	if !ok || u.ToolCalls != want {
		t.Errorf("Responses JSON: %+v %v", u, ok)
	}
	stream := strings.Replace(responsesStream, `"object":"response","status":"completed",`, `"object":"response","status":"completed",`+output+`,`, 1)
	if stream == responsesStream {
		t.Fatal("the test stream has no completed response to add output to")
	}
	m = &StreamMeter{Format: SSE}
	_ = m.Write(io.Discard, []byte(stream))
	_ = m.Flush(io.Discard)
	if u, ok := m.Usage(); !ok || u.ToolCalls != want {
		t.Errorf("Responses stream: %+v %v", u, ok)
	}
}
