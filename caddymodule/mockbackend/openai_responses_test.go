package mockbackend

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// responseEvents splits a Responses SSE body into its events (type, data), checking that
// each event line names the type its data carries.
func responseEvents(t *testing.T, body string) (types []string, data []map[string]any) {
	t.Helper()
	for ev := range strings.SplitSeq(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		typ, rest, ok := strings.Cut(strings.TrimPrefix(ev, "event: "), "\ndata: ")
		if !ok || !strings.HasPrefix(ev, "event: ") {
			t.Fatalf("bad SSE event %q", ev)
		}
		d := decodeJSON[map[string]any](t, []byte(rest))
		if d["type"] != typ {
			t.Fatalf("event %s carries type %v", typ, d["type"])
		}
		types, data = append(types, typ), append(data, d)
	}
	return types, data
}

func TestResponses(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	type answer struct {
		ID     string         `json:"id"`
		Object string         `json:"object"`
		Status string         `json:"status"`
		Output []responseItem `json:"output"`
		Usage  responsesUsage `json:"usage"`
	}
	rec, _ := serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":"one two three","instructions":"be brief"}`))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	first := decodeJSON[answer](t, rec.Body.Bytes())
	if first.Object != "response" || first.Status != "completed" || first.Usage.InputTokens != 5 ||
		first.Usage.OutputTokens != 16 || first.Usage.InputTokensDetails.CachedTokens != 0 ||
		len(first.Output) != 1 || first.Output[0].Content[0].Text != words(16) {
		t.Fatalf("got %+v", first)
	}

	// Chained, with reasoning and a bound: the previous response's tokens are cached input.
	rec, _ = serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"a b"}]}],`+
		`"previous_response_id":"`+first.ID+`","max_output_tokens":6,"reasoning":{"effort":"low"}}`))
	second := decodeJSON[answer](t, rec.Body.Bytes())
	if second.Status != "incomplete" || second.Usage.InputTokens != 2+5+16 || second.Usage.InputTokensDetails.CachedTokens != 21 ||
		second.Usage.OutputTokens != 6 || second.Usage.OutputTokensDetails.ReasoningTokens != 3 || second.Output[0].Content[0].Text != words(3) {
		t.Fatalf("chained: %s", rec.Body)
	}
	if rec, _ := serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":"x","previous_response_id":"resp_nope"}`)); rec.Code != http.StatusNotFound ||
		decodeJSON[errorBody](t, rec.Body.Bytes()).Error.Code != "previous_response_not_found" {
		t.Fatalf("unknown previous: %d %s", rec.Code, rec.Body)
	}

	// The stored routes.
	rec, _ = serve(t, m, request("GET", "/v1/responses/"+first.ID, ""))
	if got := decodeJSON[answer](t, rec.Body.Bytes()); rec.Code != http.StatusOK || got.ID != first.ID || got.Usage != first.Usage {
		t.Fatalf("GET: %d %s", rec.Code, rec.Body)
	}
	rec, _ = serve(t, m, request("GET", "/v1/responses/"+first.ID+"/input_items?order=asc&limit=1", ""))
	var page struct {
		Data    []responseItem `json:"data"`
		HasMore bool           `json:"has_more"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &page); err != nil || len(page.Data) != 1 || page.HasMore ||
		page.Data[0].Content[0].Text != "one two three" {
		t.Fatalf("input_items: %d %s", rec.Code, rec.Body)
	}
	if rec, _ := serve(t, m, request("POST", "/v1/responses/"+first.ID+"/cancel", "")); rec.Code != http.StatusBadRequest {
		t.Fatalf("cancel of a finished response: %d %s", rec.Code, rec.Body)
	}
	rec, _ = serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":"x","background":true}`))
	bg := decodeJSON[answer](t, rec.Body.Bytes())
	if rec, _ := serve(t, m, request("POST", "/v1/responses/"+bg.ID+"/cancel", "")); rec.Code != http.StatusOK ||
		decodeJSON[answer](t, rec.Body.Bytes()).Status != "cancelled" {
		t.Fatalf("cancel of a background response: %d %s", rec.Code, rec.Body)
	}
	if rec, _ := serve(t, m, request("DELETE", "/v1/responses/"+first.ID, "")); rec.Code != http.StatusOK ||
		!strings.Contains(rec.Body.String(), `"deleted":true`) {
		t.Fatalf("DELETE: %d %s", rec.Code, rec.Body)
	}
	for _, method := range []string{"GET", "DELETE"} {
		if rec, _ := serve(t, m, request(method, "/v1/responses/"+first.ID, "")); rec.Code != http.StatusNotFound {
			t.Fatalf("%s after DELETE: %d %s", method, rec.Code, rec.Body)
		}
	}
	if rec, _ := serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":[]}`)); rec.Code != http.StatusBadRequest {
		t.Fatalf("empty input: %d", rec.Code)
	}
	if got := RequestCounts(m.Name)[storedResponsesKey]; got != 7 {
		t.Errorf("stored routes counted %d times, want 7", got)
	}
}

func TestResponsesStream(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	rec, _ := serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":"a b","stream":true}`, "X-Mock-Completion-Tokens", "10"))
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	checkFlushedPerMessage(t, rec, "\n\n")
	types, data := responseEvents(t, rec.Body.String())
	want := []string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
		"response.output_text.delta", "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
		"response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"}
	if strings.Join(types, ",") != strings.Join(want, ",") {
		t.Fatalf("events %v, want %v", types, want)
	}
	var text strings.Builder
	for i, d := range data {
		if d["sequence_number"] != float64(i) {
			t.Errorf("event %d: sequence_number %v", i, d["sequence_number"])
		}
		if types[i] == "response.output_text.delta" {
			text.WriteString(d["delta"].(string))
		}
	}
	if text.String() != words(10) {
		t.Errorf("deltas make %q", text.String())
	}
	usage := data[len(data)-1]["response"].(map[string]any)["usage"].(map[string]any)
	if usage["input_tokens"] != float64(2) || usage["output_tokens"] != float64(10) {
		t.Errorf("usage %v", usage)
	}
	id := data[0]["response"].(map[string]any)["id"].(string)
	if rec, _ := serve(t, m, request("GET", "/v1/responses/"+id, "")); !strings.Contains(rec.Body.String(), `"status":"completed"`) {
		t.Errorf("stored after the stream: %s", rec.Body)
	}

	// Cut: the first half of the deltas, no response.completed.
	rec, aborted := serve(t, m, request("POST", "/v1/responses", `{"model":"m","input":"a b","stream":true}`, "X-Mock-Fault", "cut"))
	types, _ = responseEvents(t, rec.Body.String())
	if !aborted || len(types) != 4+2 || types[len(types)-1] != "response.output_text.delta" {
		t.Errorf("cut: aborted %v, events %v", aborted, types)
	}
}

// TestResponsesFunctionCall: with tool_use set, a request offering that function tool and
// carrying no function_call_output is answered with a function_call item (JSON, or streamed
// with its arguments in function_call_arguments.delta pieces), the usual usage; the request
// bringing the output back, and one not offering the tool, get the message.
func TestResponsesFunctionCall(t *testing.T) {
	const args = `{"cmd":"cat hello.txt"}`
	m := provisioned(t, &MockBackend{CompletionTokens: 5, Chunks: 3, ToolUse: "exec_command", ToolInput: json.RawMessage(args)})
	const tools = `,"tools":[{"type":"function","name":"apply_patch"},{"type":"function","name":"exec_command"}]`
	first := `{"model":"m","input":"read the file"` + tools

	type call struct {
		ID, Type, Status, Name, Arguments string
		CallID                            string `json:"call_id"`
	}
	rec, _ := serve(t, m, request("POST", "/v1/responses", first+"}"))
	got := decodeJSON[struct {
		Status string
		Output []call
		Usage  responsesUsage
	}](t, rec.Body.Bytes())
	if got.Status != "completed" || len(got.Output) != 1 || got.Output[0].Type != "function_call" || got.Output[0].Name != "exec_command" ||
		got.Output[0].Arguments != args || !strings.HasPrefix(got.Output[0].CallID, "call_mock") || got.Usage.InputTokens != 3 || got.Usage.OutputTokens != 5 {
		t.Errorf("answer %s, want a call of exec_command with %s", rec.Body, args)
	}
	if strings.Contains(rec.Body.String(), `"content"`) || strings.Contains(rec.Body.String(), `"role"`) {
		t.Errorf("a function_call item with content or role: %s", rec.Body)
	}

	rec, _ = serve(t, m, request("POST", "/v1/responses", first+`,"stream":true}`))
	types, data := responseEvents(t, rec.Body.String())
	want := []string{"response.created", "response.in_progress", "response.output_item.added",
		"response.function_call_arguments.delta", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
		"response.function_call_arguments.done", "response.output_item.done", "response.completed"}
	if strings.Join(types, ",") != strings.Join(want, ",") {
		t.Fatalf("events %v, want %v", types, want)
	}
	if it := data[2]["item"].(map[string]any); it["type"] != "function_call" || it["arguments"] != "" || it["status"] != "in_progress" {
		t.Errorf("output_item.added %v", it)
	}
	var streamed string
	for _, d := range data[3:6] {
		streamed += d["delta"].(string)
	}
	if streamed != args || data[6]["arguments"] != args || data[7]["item"].(map[string]any)["arguments"] != args {
		t.Errorf("streamed arguments %q, done %v", streamed, data[6])
	}
	out := data[8]["response"].(map[string]any)
	if u := out["usage"].(map[string]any); u["output_tokens"] != 5.0 || out["output"].([]any)[0].(map[string]any)["call_id"] == "" {
		t.Errorf("response.completed %v", out)
	}

	for name, body := range map[string]string{
		"the call's output back": `{"model":"m","input":[{"role":"user","content":"read the file"},` +
			`{"type":"function_call","call_id":"call_1","name":"exec_command","arguments":"{}"},` +
			`{"type":"function_call_output","call_id":"call_1","output":"hello"}]` + tools + "}",
		"the tool not offered": `{"model":"m","input":"read the file"}`,
	} {
		rec, _ := serve(t, m, request("POST", "/v1/responses", body))
		got := decodeJSON[struct{ Output []responseItem }](t, rec.Body.Bytes())
		if rec.Code != http.StatusOK || len(got.Output) != 1 || got.Output[0].Type != "message" || got.Output[0].Content[0].Text != words(5) {
			t.Errorf("%s: answer %s, want the message %q", name, rec.Body, words(5))
		}
	}
}
