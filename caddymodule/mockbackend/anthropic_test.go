package mockbackend

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// anthropicEvents splits an Anthropic SSE body into (event name, data) pairs.
func anthropicEvents(t *testing.T, body string) (names []string, data []map[string]any) {
	t.Helper()
	for ev := range strings.SplitSeq(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		name, rest, ok := strings.Cut(ev, "\n")
		name, ok1 := strings.CutPrefix(name, "event: ")
		payload, ok2 := strings.CutPrefix(rest, "data: ")
		if !ok || !ok1 || !ok2 {
			t.Fatalf("bad Anthropic SSE event %q", ev)
		}
		var d map[string]any
		if err := json.Unmarshal([]byte(payload), &d); err != nil {
			t.Fatalf("event %s: %v", name, err)
		}
		if d["type"] != name {
			t.Errorf("event %s has data type %v", name, d["type"])
		}
		names = append(names, name)
		data = append(data, d)
	}
	return names, data
}

func TestMessages(t *testing.T) {
	m := provisioned(t, &MockBackend{CompletionTokens: 10, Chunks: 4, CacheReadTokens: 7})
	body := `{"model":"claude-x","system":"be brief","max_tokens":%d,"messages":[{"role":"user","content":"one two three"},` +
		`{"role":"assistant","content":[{"type":"text","text":"four"},{"type":"image","source":{}}]}]%s}`

	t.Run("json", func(t *testing.T) {
		rec, _ := serve(t, m, request("POST", "/v1/messages", strings.Replace(strings.Replace(body, "%d", "100", 1), "%s", "", 1),
			"X-Mock-Cache-Write-Tokens", "3"))
		if rec.Code != 200 {
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
		got := decodeJSON[anthropicMessage](t, rec.Body.Bytes())
		want := anthropicUsage{InputTokens: 6, CacheCreationInputTokens: 3, CacheReadInputTokens: 7, OutputTokens: 10}
		if got.Usage != want || got.Type != "message" || *got.StopReason != "end_turn" || got.Content[0].(map[string]any)["text"] != words(10) {
			t.Errorf("answer %+v, want usage %+v, end_turn, %q", got, want, words(10))
		}
		if !strings.HasSuffix(strings.TrimSpace(rec.Body.String()), `"output_tokens":10}}`) {
			t.Errorf("usage is not the last member: %s", rec.Body)
		}
	})
	t.Run("capped", func(t *testing.T) {
		rec, _ := serve(t, m, request("POST", "/v1/messages", strings.Replace(strings.Replace(body, "%d", "4", 1), "%s", "", 1)))
		got := decodeJSON[anthropicMessage](t, rec.Body.Bytes())
		if got.Usage.OutputTokens != 4 || *got.StopReason != "max_tokens" {
			t.Errorf("answer %+v, want 4 output tokens and max_tokens", got)
		}
	})
	t.Run("stream", func(t *testing.T) {
		rec, _ := serve(t, m, request("POST", "/v1/messages", strings.Replace(strings.Replace(body, "%d", "100", 1), "%s", `,"stream":true`, 1)))
		names, data := anthropicEvents(t, rec.Body.String())
		want := []string{"message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
			"content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
		if strings.Join(names, ",") != strings.Join(want, ",") {
			t.Fatalf("events %v, want %v", names, want)
		}
		start := data[0]["message"].(map[string]any)["usage"].(map[string]any)
		if start["input_tokens"] != 6.0 || start["cache_read_input_tokens"] != 7.0 || start["output_tokens"] != 1.0 {
			t.Errorf("message_start usage %v", start)
		}
		var text string
		for _, d := range data[3:7] {
			text += d["delta"].(map[string]any)["text"].(string)
		}
		if text != strings.ReplaceAll(words(10), " ", "") && text != words(10) {
			t.Errorf("streamed text %q", text)
		}
		if u := data[8]["usage"].(map[string]any); u["output_tokens"] != 10.0 {
			t.Errorf("message_delta usage %v", u)
		}
		checkFlushedPerMessage(t, rec, "\n\n")
	})
	t.Run("cut", func(t *testing.T) {
		rec, aborted := serve(t, m, request("POST", "/v1/messages", strings.Replace(strings.Replace(body, "%d", "100", 1), "%s", `,"stream":true`, 1),
			"X-Mock-Fault", "truncate"))
		names, _ := anthropicEvents(t, rec.Body.String())
		if aborted || strings.Join(names, ",") != "message_start,content_block_start,ping,content_block_delta,content_block_delta" {
			t.Errorf("truncated stream: aborted %v, events %v", aborted, names)
		}
	})
	t.Run("max_tokens required", func(t *testing.T) {
		rec, _ := serve(t, m, request("POST", "/v1/messages", `{"model":"claude-x","messages":[{"role":"user","content":"hi"}]}`))
		var e anthropicError
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || rec.Code != 400 || e.Type != "error" || e.Error.Type != "invalid_request_error" {
			t.Errorf("status %d, body %s", rec.Code, rec.Body)
		}
	})
	t.Run("count_tokens", func(t *testing.T) {
		rec, _ := serve(t, m, request("POST", "/v1/messages/count_tokens", strings.Replace(strings.Replace(body, "%d", "1", 1), "%s", "", 1)))
		if rec.Code != 200 || strings.TrimSpace(rec.Body.String()) != `{"input_tokens":6}` {
			t.Errorf("status %d, body %s", rec.Code, rec.Body)
		}
	})
	t.Run("error fault", func(t *testing.T) {
		rec, _ := serve(t, m, request("POST", "/v1/messages", strings.Replace(strings.Replace(body, "%d", "1", 1), "%s", "", 1), "X-Mock-Fault", "error"))
		var e anthropicError
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || rec.Code != 500 || e.Error.Type != "api_error" {
			t.Errorf("status %d, body %s", rec.Code, rec.Body)
		}
	})
}

func TestMessagesKeyAndVersion(t *testing.T) {
	m := provisioned(t, &MockBackend{APIKey: "sk-ant-test", AnthropicVersion: "2023-06-01"})
	msg := `{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`
	for _, c := range []struct {
		name, path, body string
		headers          []string
		status           int
	}{
		{"no key", "/v1/messages", msg, []string{"Anthropic-Version", "2023-06-01"}, http.StatusUnauthorized},
		{"wrong key", "/v1/messages", msg, []string{"X-Api-Key", "nope", "Anthropic-Version", "2023-06-01"}, http.StatusUnauthorized},
		{"no version", "/v1/messages", msg, []string{"X-Api-Key", "sk-ant-test"}, http.StatusBadRequest},
		{"wrong version", "/v1/messages/count_tokens", msg, []string{"X-Api-Key", "sk-ant-test", "Anthropic-Version", "2020-01-01"}, http.StatusBadRequest},
		{"both", "/v1/messages", msg, []string{"X-Api-Key", "sk-ant-test", "Anthropic-Version", "2023-06-01"}, http.StatusOK},
		{"models with the key", "/v1/models", "", []string{"X-Api-Key", "sk-ant-test"}, http.StatusOK},
		{"models without it", "/v1/models", "", nil, http.StatusUnauthorized},
	} {
		method := "POST"
		if c.body == "" {
			method = "GET"
		}
		rec, _ := serve(t, m, request(method, c.path, c.body, c.headers...))
		if rec.Code != c.status {
			t.Errorf("%s: status %d, want %d: %s", c.name, rec.Code, c.status, rec.Body)
		}
		if c.status == http.StatusUnauthorized && c.path == "/v1/messages" && !strings.Contains(rec.Body.String(), `"authentication_error"`) {
			t.Errorf("%s: %s, want Anthropic's authentication_error", c.name, rec.Body)
		}
	}
}

// TestMessagesToolUse: with tool_use set, a request offering the tool and carrying no
// tool_result is answered with a tool_use block (JSON, or streamed as input_json_delta pieces
// that make up the input), stop_reason tool_use, the usual usage; the request bringing the
// tool_result back, and one not offering the tool, get text.
func TestMessagesToolUse(t *testing.T) {
	const input = `{"file_path":"/tmp/hello.txt"}`
	m := provisioned(t, &MockBackend{CompletionTokens: 5, Chunks: 3, ToolUse: "Read", ToolInput: json.RawMessage(input)})
	const tools = `,"tools":[{"name":"Bash","input_schema":{}},{"name":"Read","input_schema":{}}]`
	first := `{"model":"claude-x","max_tokens":100,"messages":[{"role":"user","content":"read the file"}]` + tools
	back := `{"model":"claude-x","max_tokens":100,"messages":[{"role":"user","content":"read the file"},` +
		`{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"Read","input":` + input + `}]},` +
		`{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"hello"}]}]` + tools

	rec, _ := serve(t, m, request("POST", "/v1/messages", first+"}"))
	got := decodeJSON[struct {
		Content []struct {
			Type, ID, Name string
			Input          json.RawMessage
		}
		StopReason string `json:"stop_reason"`
		Usage      anthropicUsage
	}](t, rec.Body.Bytes())
	if len(got.Content) != 1 || got.Content[0].Type != "tool_use" || got.Content[0].Name != "Read" ||
		!strings.HasPrefix(got.Content[0].ID, "toolu_mock_") || string(got.Content[0].Input) != input ||
		got.StopReason != "tool_use" || got.Usage.InputTokens != 3 || got.Usage.OutputTokens != 5 {
		t.Errorf("answer %s, want a call of Read with %s", rec.Body, input)
	}

	rec, _ = serve(t, m, request("POST", "/v1/messages", first+`,"stream":true}`))
	names, data := anthropicEvents(t, rec.Body.String())
	want := []string{"message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
		"content_block_delta", "content_block_stop", "message_delta", "message_stop"}
	if strings.Join(names, ",") != strings.Join(want, ",") {
		t.Fatalf("events %v, want %v", names, want)
	}
	if b := data[1]["content_block"].(map[string]any); b["type"] != "tool_use" || b["name"] != "Read" || fmt.Sprint(b["input"]) != "map[]" {
		t.Errorf("content_block_start %v", b)
	}
	var partial string
	for _, d := range data[3:6] {
		delta := d["delta"].(map[string]any)
		if delta["type"] != "input_json_delta" {
			t.Errorf("delta %v", delta)
		}
		partial += delta["partial_json"].(string)
	}
	if partial != input {
		t.Errorf("streamed input %q, want %q", partial, input)
	}
	if d := data[7]; d["delta"].(map[string]any)["stop_reason"] != "tool_use" || d["usage"].(map[string]any)["output_tokens"] != 5.0 {
		t.Errorf("message_delta %v", d)
	}

	for name, body := range map[string]string{
		"the tool's result back": back + "}",
		"the tool not offered":   `{"model":"claude-x","max_tokens":100,"messages":[{"role":"user","content":"read the file"}]}`,
	} {
		rec, _ := serve(t, m, request("POST", "/v1/messages", body))
		got := decodeJSON[anthropicMessage](t, rec.Body.Bytes())
		if rec.Code != 200 || len(got.Content) != 1 || got.Content[0].(map[string]any)["text"] != words(5) || *got.StopReason != "end_turn" {
			t.Errorf("%s: answer %s, want the text %q", name, rec.Body, words(5))
		}
	}
}
