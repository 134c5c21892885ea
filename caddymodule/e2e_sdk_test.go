package caddymodule_test

import (
	"errors"
	"net/http"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestOpenAISDKClient: the official OpenAI Go SDK works against the gateway as against OpenAI:
// completions, streamed completions (accumulated), the model list, and a typed 401 error.
func TestOpenAISDKClient(t *testing.T) {
	const in, out = "1000", "2000"
	e := startGateway(t, setup{
		gateway: backendBlock("oai", "oai", "mock-small", in, out),
		mocks:   []mockSpec{{key: "oai", lines: "models mock-small\n\t\tchunks 3"}},
	})
	const initial = "5"
	u, k := e.userWithKey("sdk@example.com", initial)
	client := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	ctx := t.Context()
	var spent credits.Amount

	// A completion.
	var raw *http.Response
	c, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:     "mock-small",
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("you are terse"), openai.UserMessage("hello there")},
		MaxTokens: openai.Int(5),
	}, option.WithResponseInto(&raw))
	if err != nil {
		t.Fatalf("Chat.Completions.New: %v", err)
	}
	if len(c.Choices) != 1 || c.Choices[0].Message.Content != tokens(5) {
		t.Errorf("completion %+v, want %q", c.Choices, tokens(5))
	}
	if c.Usage.PromptTokens != 5 || c.Usage.CompletionTokens != 5 {
		t.Errorf("usage %d/%d, want 5/5", c.Usage.PromptTokens, c.Usage.CompletionTokens)
	}
	want := cost(t, 5, 5, in, out)
	spent += want
	if got := amountOf(t, raw.Header.Get("X-Credits-Charged")); got != want {
		t.Errorf("X-Credits-Charged %s, want %s", got, want)
	}

	// A stream, without and with the usage chunk.
	for _, withUsage := range []bool{false, true} {
		params := openai.ChatCompletionNewParams{
			Model:     "mock-small",
			Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("stream a few words")},
			MaxTokens: openai.Int(8),
		}
		if withUsage {
			params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		}
		stream := client.Chat.Completions.NewStreaming(ctx, params)
		acc := openai.ChatCompletionAccumulator{}
		var charged, remaining string
		chunks := 0
		for stream.Next() {
			ch := stream.Current()
			chunks++
			acc.AddChunk(ch)
			if f, ok := ch.JSON.ExtraFields["credits_charged"]; ok {
				charged = f.Raw()
			}
			if f, ok := ch.JSON.ExtraFields["credits_remaining"]; ok {
				remaining = f.Raw()
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("stream (usage %v): %v", withUsage, err)
		}
		stream.Close()
		if len(acc.Choices) != 1 || acc.Choices[0].Message.Content != tokens(8) {
			t.Errorf("accumulated stream (usage %v): %+v, want %q", withUsage, acc.Choices, tokens(8))
		}
		want := cost(t, 4, 8, in, out)
		spent += want
		if withUsage {
			if acc.Usage.PromptTokens != 4 || acc.Usage.CompletionTokens != 8 {
				t.Errorf("accumulated usage %d/%d, want 4/8", acc.Usage.PromptTokens, acc.Usage.CompletionTokens)
			}
			if charged == "" || amountOf(t, charged) != want {
				t.Errorf("credits_charged %q, want %s", charged, want)
			}
			if remaining == "" || amountOf(t, remaining) != credits.Amount(micro(t, initial))-spent {
				t.Errorf("credits_remaining %q, want %s", remaining, credits.Amount(micro(t, initial))-spent)
			}
		} else {
			if acc.Usage.CompletionTokens != 0 || charged != "" {
				t.Errorf("a usage chunk reached a client that did not ask for it (usage %+v, credits_charged %q)", acc.Usage, charged)
			}
			if chunks != 3 {
				t.Errorf("%d chunks, want the mock's 3", chunks)
			}
		}
	}

	// The model list.
	page, err := client.Models.List(ctx)
	if err != nil {
		t.Fatalf("Models.List: %v", err)
	}
	ids := map[string]bool{}
	for _, m := range page.Data {
		ids[m.ID] = true
	}
	if !ids["cheapest"] || !ids["mock-small"] {
		t.Errorf("models %v, want cheapest and mock-small", ids)
	}

	// A bad key: a typed error, 401, with the gateway's code.
	bad := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey("sk_live_notakey"), option.WithMaxRetries(0))
	_, err = bad.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: "mock-small", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) {
		t.Fatalf("bad key: error %v (%T), want *openai.Error", err, err)
	}
	if apiErr.StatusCode != http.StatusUnauthorized || apiErr.Code != "invalid_api_key" {
		t.Errorf("bad key: status %d code %q, want 401 invalid_api_key", apiErr.StatusCode, apiErr.Code)
	}

	// The books.
	a := e.settledAudit(u.ID)
	if w := credits.Amount(micro(t, initial)) - spent; a.Balance != w {
		t.Errorf("balance %s, want %s", a.Balance, w)
	}
	e.checkAllAccounts(0)
}
