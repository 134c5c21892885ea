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
