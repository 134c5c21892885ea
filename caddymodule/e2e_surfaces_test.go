package caddymodule_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
)

// surfacesSetup serves the legacy completions model "txt" on a broken OpenAI backend (the
// cheapest, failing with 500) and a good one, "solo" on the good one only, and the embedding
// model "emb" on an Ollama backend.
var surfacesSetup = setup{
	gateway: `
		backend broken {
			url {mock.broken}
			health_check {
				disabled
			}
			model txt {
				input_price 1
				output_price 1
			}
		}
		backend oai {
			url {mock.oai}
			health_check {
				disabled
			}
			model txt {
				input_price 1000
				output_price 2000
			}
			model solo {
				input_price 1000
				output_price 2000
			}
		}
		backend ol {
			url {mock.ol}
			style ollama
			health_check {
				disabled
			}
			model emb {
				kind embeddings
				input_price 100
				output_price 0
			}
			model txt {
				input_price 1
				output_price 1
			}
		}`,
	mocks: []mockSpec{{key: "broken", lines: "fault error"}, {key: "oai", lines: "chunks 4"}, {key: "ol"}},
}

// TestLegacyCompletions: POST /v1/completions is served like chat: a 5xx before the first
// byte fails over, n and an array of prompts are charged their usage, a stream reports its
// usage and charge to a client that asks, a cut stream settles by the produced rule; Ollama
// backends (which the description does not list) are never tried.
func TestLegacyCompletions(t *testing.T) {
	e := startGateway(t, surfacesSetup)
	const in, out = "1000", "2000"
	const initial = "10"
	u, k := e.userWithKey("legacy@example.com", initial)
	var spent credits.Amount

	// JSON: the broken backend fails, the good one answers; 2 prompts × n 2 choices.
	body := `{"model":"txt","prompt":["one two three","four"],"max_tokens":5,"n":2}`
	r := e.post("/v1/completions", body, bearer(k.Key))
	if r.status != http.StatusOK || r.header.Get("X-Gateway-Backend") != "oai" {
		t.Fatalf("completion: %s from %q, want 200 from oai", r, r.header.Get("X-Gateway-Backend"))
	}
	var c struct {
		Object  string `json:"object"`
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
		Usage struct {
			PromptTokens     int64 `json:"prompt_tokens"`
			CompletionTokens int64 `json:"completion_tokens"`
		} `json:"usage"`
	}
	if err := json.Unmarshal(r.body, &c); err != nil || c.Object != "text_completion" || len(c.Choices) != 4 || c.Choices[3].Text != tokens(5) {
		t.Fatalf("completion %s (%v)", r.body, err)
	}
	want := cost(t, 4, 20, in, out)
	spent += want
	if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
		t.Errorf("charged %s, want %s (4 prompt tokens, 4 choices of 5)", got, want)
	}
	if n := e.mockRequests("broken"); n != 1 {
		t.Errorf("the broken backend got %d requests, want 1", n)
	}
	if n := e.mockRequests("ol"); n != 0 {
		t.Errorf("an Ollama backend got %d legacy completions", n)
	}

	// A stream with the usage chunk: the charge is in it.
	body = `{"model":"solo","prompt":"one two","max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}`
	r = e.post("/v1/completions", body, bearer(k.Key))
	if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("stream: %s", r)
	}
	events := sseEvents(t, r.body)
	var text strings.Builder
	var charged any
	for _, ev := range events {
		if ev == "[DONE]" {
			continue
		}
		m := decodeObject(t, ev)
		for _, ch := range m["choices"].([]any) {
			text.WriteString(ch.(map[string]any)["text"].(string))
		}
		if v, ok := m["credits_charged"]; ok {
			charged = v
		}
	}
	want = cost(t, 2, 8, in, out)
	spent += want
	if text.String() != tokens(8) || charged == nil || amountOf(t, charged) != want {
		t.Errorf("stream text %q, credits_charged %v; want %q, %s", text.String(), charged, tokens(8), want)
	}

	// A stream without include_usage: the client sees no usage chunk, and is still charged it.
	body = `{"model":"solo","prompt":"one two","max_tokens":8,"stream":true}`
	r = e.post("/v1/completions", body, bearer(k.Key))
	if r.status != http.StatusOK || strings.Contains(string(r.body), `"usage"`) {
		t.Errorf("stream without include_usage: %s", r)
	}
	spent += want

	// A cut stream: the client's connection breaks; charged the prompt (the body tokenized)
	// and the 2 of 4 chunks produced ("tok1 tok2 tok3 tok4").
	body = `{"model":"solo","prompt":"one two","max_tokens":8,"stream":true}`
	req := e.newRequest(context.Background(), http.MethodPost, e.gw+"/v1/completions", body,
		map[string]string{"Authorization": "Bearer " + k.Key, "X-Mock-Fault": "cut"})
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil {
		t.Errorf("a cut stream ended cleanly for the client: %s", got)
	}
	st := e.settlements(u.ID)
	last := st[len(st)-1]
	wantIn := min(metering.CountTokens(metering.FamilyOpenAI, []byte(body), 1), inputBound(body))
	wantOut := metering.CountTokens(metering.FamilyOpenAI, []byte(tokens(4)), 2)
	if last.Usage == nil || last.Usage.InputTokens != wantIn || last.Usage.OutputTokens != wantOut {
		t.Errorf("the cut stream settled %+v, want %d in, %d out (what was produced)", last.Usage, wantIn, wantOut)
	}
	if w := cost(t, wantIn, wantOut, in, out); last.Amount != w {
		t.Errorf("the cut stream was charged %s, want %s", last.Amount, w)
	}
	spent += last.Amount

	// A bad prompt is refused in OpenAI's shape, nothing charged.
	r = e.post("/v1/completions", `{"model":"txt","prompt":[]}`, bearer(k.Key))
	if eo := errorOf(t, r, http.StatusBadRequest, "invalid_request"); eo["param"] != "prompt" {
		t.Errorf("param %v, want prompt", eo["param"])
	}

	if a := e.settledAudit(u.ID); a.Balance != credits.Amount(micro(t, initial))-spent {
		t.Errorf("balance %s, want %s", a.Balance, credits.Amount(micro(t, initial))-spent)
	}
	e.checkAllAccounts(0)
}

// TestOllamaEmbed: POST /api/embed is charged the prompt_eval_count the backend reports, the
// older /api/embeddings (no usage in its answer) its prompt counted from the body; errors
// have Ollama's shape; OpenAI backends are never tried.
func TestOllamaEmbed(t *testing.T) {
	e := startGateway(t, surfacesSetup)
	const initial = "10"
	u, k := e.userWithKey("embed@example.com", initial)
	var spent credits.Amount

	r := e.post("/api/embed", `{"model":"emb","input":["one two","three"]}`, bearer(k.Key))
	if r.status != http.StatusOK || r.header.Get("X-Gateway-Backend") != "ol" {
		t.Fatalf("embed: %s", r)
	}
	m := r.object(t)
	if embs, _ := m["embeddings"].([]any); len(embs) != 2 || num(t, m["prompt_eval_count"]) != 3 {
		t.Errorf("embed answer %s", r.body)
	}
	want := cost(t, 3, 0, "100", "0")
	spent += want
	if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
		t.Errorf("embed charged %s, want %s (prompt_eval_count 3)", got, want)
	}

	body := `{"model":"emb","prompt":"one two"}`
	r = e.post("/api/embeddings", body, bearer(k.Key))
	if r.status != http.StatusOK {
		t.Fatalf("embeddings: %s", r)
	}
	if _, ok := r.object(t)["embedding"].([]any); !ok {
		t.Errorf("embeddings answer %s", r.body)
	}
	want = cost(t, min(metering.CountTokens(metering.FamilyEstimate, []byte(body), 1), inputBound(body)), 0, "100", "0")
	spent += want
	if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != want {
		t.Errorf("embeddings charged %s, want %s (the body counted)", got, want)
	}

	// Refusals in Ollama's shape: no input; a chat model; streaming is not a thing here.
	eo := errorOf(t, e.post("/api/embed", `{"model":"emb"}`, bearer(k.Key)), http.StatusBadRequest, "invalid_request")
	if eo["param"] != "input" {
		t.Errorf("param %v, want input", eo["param"])
	}
	errorOf(t, e.post("/api/embeddings", `{"model":"emb","input":"a"}`, bearer(k.Key)), http.StatusBadRequest, "invalid_request")
	errorOf(t, e.post("/api/embed", `{"model":"txt","input":"a"}`, bearer(k.Key)), http.StatusNotFound, "model_not_found")
	if n := e.mockRequests("oai") + e.mockRequests("broken"); n != 0 {
		t.Errorf("OpenAI backends got %d Ollama embeddings", n)
	}

	if a := e.settledAudit(u.ID); a.Balance != credits.Amount(micro(t, initial))-spent {
		t.Errorf("balance %s, want %s", a.Balance, credits.Amount(micro(t, initial))-spent)
	}
	e.checkAllAccounts(0)
}

// TestOpenAISDKLegacyCompletions: the official OpenAI Go SDK's Completions.New and its
// streaming variant work against the gateway, charged their usage.
func TestOpenAISDKLegacyCompletions(t *testing.T) {
	e := startGateway(t, surfacesSetup)
	const in, out = "1000", "2000"
	u, k := e.userWithKey("sdk-legacy@example.com", "5")
	client := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	ctx := t.Context()
	var spent credits.Amount

	var raw *http.Response
	c, err := client.Completions.New(ctx, openai.CompletionNewParams{
		Model:     "solo",
		Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String("say three words")},
		MaxTokens: openai.Int(6),
		N:         openai.Int(2),
	}, option.WithResponseInto(&raw))
	if err != nil {
		t.Fatalf("Completions.New: %v", err)
	}
	if len(c.Choices) != 2 || c.Choices[1].Text != tokens(6) || c.Usage.PromptTokens != 3 || c.Usage.CompletionTokens != 12 {
		t.Errorf("completion %+v", c)
	}
	want := cost(t, 3, 12, in, out)
	spent += want
	if got := amountOf(t, raw.Header.Get("X-Credits-Charged")); got != want {
		t.Errorf("X-Credits-Charged %s, want %s", got, want)
	}

	stream := client.Completions.NewStreaming(ctx, openai.CompletionNewParams{
		Model:         "solo",
		Prompt:        openai.CompletionNewParamsPromptUnion{OfArrayOfStrings: []string{"stream a few words"}},
		MaxTokens:     openai.Int(8),
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	})
	var text strings.Builder
	var usage openai.CompletionUsage
	for stream.Next() {
		ch := stream.Current()
		for _, choice := range ch.Choices {
			text.WriteString(choice.Text)
		}
		if ch.Usage.CompletionTokens > 0 {
			usage = ch.Usage
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	stream.Close()
	if text.String() != tokens(8) || usage.PromptTokens != 4 || usage.CompletionTokens != 8 {
		t.Errorf("stream text %q usage %+v, want %q, 4/8", text.String(), usage, tokens(8))
	}
	spent += cost(t, 4, 8, in, out)

	if a := e.settledAudit(u.ID); a.Balance != credits.Amount(micro(t, "5"))-spent {
		t.Errorf("balance %s, want %s", a.Balance, credits.Amount(micro(t, "5"))-spent)
	}
	e.checkAllAccounts(0)
}
