package mockbackend

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

func TestCompletions(t *testing.T) {
	type answer struct {
		Object  string `json:"object"`
		Choices []struct {
			Index        int    `json:"index"`
			Text         string `json:"text"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage usage `json:"usage"`
	}
	tests := []struct {
		name    string
		body    string
		choices int
		text    []string // per choice
		usage   usage
		finish  string
	}{
		{name: "a string prompt", body: `{"model":"m","prompt":"one two three"}`, choices: 1,
			text: []string{words(16)}, usage: usage{PromptTokens: 3, CompletionTokens: 16, TotalTokens: 19}, finish: "stop"},
		{name: "max_tokens and n", body: `{"model":"m","prompt":"one two","max_tokens":3,"n":2}`, choices: 2,
			text: []string{words(3), words(3)}, usage: usage{PromptTokens: 2, CompletionTokens: 6, TotalTokens: 8}, finish: "length"},
		{name: "an array of prompts, n each, echoed", body: `{"model":"m","prompt":["a b","c"],"max_tokens":1,"n":2,"echo":true}`,
			choices: 4, text: []string{"a btok1", "a btok1", "ctok1", "ctok1"}, usage: usage{PromptTokens: 3, CompletionTokens: 4, TotalTokens: 7}, finish: "length"},
		{name: "token ids", body: `{"model":"m","prompt":[[1,2,3],[4]],"max_tokens":2}`, choices: 2,
			text: []string{words(2), words(2)}, usage: usage{PromptTokens: 4, CompletionTokens: 4, TotalTokens: 8}, finish: "length"},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, _ := serve(t, m, request("POST", "/v1/completions", tt.body))
			if rec.Code != http.StatusOK {
				t.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
			got := decodeJSON[answer](t, rec.Body.Bytes())
			if got.Object != "text_completion" || len(got.Choices) != tt.choices || got.Usage != tt.usage {
				t.Fatalf("got %+v", got)
			}
			for i, c := range got.Choices {
				if c.Index != i || c.Text != tt.text[i] || c.FinishReason != tt.finish {
					t.Errorf("choice %d: %+v, want text %q, finish %s", i, c, tt.text[i], tt.finish)
				}
			}
		})
	}
	for _, body := range []string{`{"model":"m"}`, `{"model":"m","prompt":[]}`, `{"model":"m","prompt":{}}`, `{"model":"m","prompt":"a","n":0}`} {
		if rec, _ := serve(t, m, request("POST", "/v1/completions", body)); rec.Code != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", body, rec.Code)
		}
	}
}

func TestCompletionsStream(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	body := `{"model":"m","prompt":"one two","stream":true,"n":2,"max_tokens":8,"stream_options":{"include_usage":true}}`
	rec, aborted := serve(t, m, request("POST", "/v1/completions", body))
	if aborted || rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, aborted %v, %q", rec.Code, aborted, rec.Header().Get("Content-Type"))
	}
	checkFlushedPerMessage(t, rec, "\n\n")
	events := sseEvents(t, rec.Body.String())
	if len(events) != 4*2+2 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("%d events: %q", len(events), events)
	}
	text := map[int]string{}
	for _, ev := range events[:8] {
		var c completion
		if err := json.Unmarshal([]byte(ev), &c); err != nil || len(c.Choices) != 1 || c.Usage != nil || c.Object != "text_completion" {
			t.Fatalf("chunk %s: %v", ev, err)
		}
		text[c.Choices[0].Index] += c.Choices[0].Text
	}
	if text[0] != words(8) || text[1] != words(8) {
		t.Errorf("texts %v", text)
	}
	var last completion
	if err := json.Unmarshal([]byte(events[8]), &last); err != nil || last.Usage == nil || *last.Usage != (usage{PromptTokens: 2, CompletionTokens: 16, TotalTokens: 18}) || len(last.Choices) != 0 {
		t.Errorf("usage chunk %s", events[8])
	}
	// Without include_usage there is no usage chunk; the cut fault aborts halfway.
	rec, _ = serve(t, m, request("POST", "/v1/completions", `{"model":"m","prompt":"a","stream":true}`))
	if strings.Contains(rec.Body.String(), `"usage"`) {
		t.Errorf("usage without include_usage: %s", rec.Body)
	}
	if _, aborted := serve(t, m, request("POST", "/v1/completions", `{"model":"m","prompt":"a","stream":true}`, "X-Mock-Fault", "cut")); !aborted {
		t.Error("cut fault did not abort")
	}
}

func TestOllamaEmbed(t *testing.T) {
	m := provisioned(t, &MockBackend{Dimensions: 4})
	rec, _ := serve(t, m, request("POST", "/api/embed", `{"model":"e","input":["one two","three"]}`))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	got := decodeJSON[ollamaEmbedResponse](t, rec.Body.Bytes())
	if got.Model != "e" || len(got.Embeddings) != 2 || len(got.Embeddings[0]) != 4 || got.PromptEvalCount != 3 {
		t.Errorf("got %+v", got)
	}
	if !strings.HasSuffix(strings.TrimSpace(rec.Body.String()), `"prompt_eval_count":3}`) {
		t.Errorf("the usage is not last: %s", rec.Body)
	}
	rec, _ = serve(t, m, request("POST", "/api/embeddings", `{"model":"e","prompt":"one two"}`))
	if rec.Code != http.StatusOK || strings.Contains(rec.Body.String(), "prompt_eval_count") {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	if old := decodeJSON[struct{ Embedding []float32 }](t, rec.Body.Bytes()); len(old.Embedding) != 4 {
		t.Errorf("embeddings: %s", rec.Body)
	}
	for path, body := range map[string]string{"/api/embed": `{"model":"e"}`, "/api/embeddings": `{"model":"e"}`} {
		if rec, _ := serve(t, m, request("POST", path, body)); rec.Code != http.StatusBadRequest || !strings.HasPrefix(rec.Body.String(), `{"error":"`) {
			t.Errorf("%s without input: %d %s", path, rec.Code, rec.Body)
		}
	}
}
