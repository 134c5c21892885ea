package caddymodule_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	antoption "github.com/anthropics/anthropic-sdk-go/v2/option"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestModelsListSurfaces: /v1/models says, for each model, the paths of the surfaces that
// serve it, from the styles of the backends serving it and its kind: a chat model on an openai
// backend serves chat, completions and Responses; one on an anthropic backend Messages and
// count_tokens; one on an ollama backend Ollama's chat and generate and the OpenAI chat; an
// embeddings model the embeddings routes of its backend's style; a model on two styles the
// union. openai-go's Models.List still reads the list, with the member among its extra fields.
func TestModelsListSurfaces(t *testing.T) {
	e := startGateway(t, setup{
		gateway: backendBlock("oai", "oai", "gpt-x", "1", "2") +
			strings.Replace(backendBlock("oll", "oll", "llama-x", "1", "2"), "health_check", "style ollama\n\t\t\thealth_check", 1) +
			anthropicBlock("ant", "ant", "claude-x", "1", "2") + `
		backend emb {
			url {mock.oai}
			health_check {
				disabled
			}
			model embed-x {
				kind embeddings
				input_price 1
				output_price 0
			}
		}
		backend both {
			url {mock.oll}
			style ollama
			health_check {
				disabled
			}
			model gpt-x {
				input_price 1
				output_price 2
			}
		}`,
		mocks: []mockSpec{
			{key: "oai", lines: "models gpt-x embed-x"},
			{key: "oll", lines: "models llama-x gpt-x"},
			{key: "ant", lines: "models claude-x\n\t\tapi_key " + anthropicUpstreamKey},
		},
	})
	_, k := e.userWithKey("models@example.com", "1")
	want := map[string][]string{
		"gpt-x":    {"/v1/chat/completions", "/api/chat", "/api/generate", "/v1/completions", "/v1/responses"},
		"llama-x":  {"/v1/chat/completions", "/api/chat", "/api/generate"},
		"claude-x": {"/v1/messages", "/v1/messages/count_tokens"},
		"embed-x":  {"/v1/embeddings"},
		"cheapest": nil,
	}

	r := e.request(http.MethodGet, e.gw+"/v1/models", nil, bearer(k.Key))
	if r.status != http.StatusOK {
		t.Fatalf("/v1/models: %s", r)
	}
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID       string   `json:"id"`
			Object   string   `json:"object"`
			Surfaces []string `json:"surfaces"`
		} `json:"data"`
	}
	if err := json.Unmarshal(r.body, &list); err != nil || list.Object != "list" {
		t.Fatalf("not an OpenAI list (%v): %s", err, r)
	}
	seen := map[string]bool{}
	for _, m := range list.Data {
		seen[m.ID] = true
		w, ok := want[m.ID]
		if !ok {
			t.Errorf("unexpected model %q", m.ID)
			continue
		}
		if m.Object != "model" || !slices.Equal(m.Surfaces, w) {
			t.Errorf("%s: object %q, surfaces %q; want model, %q", m.ID, m.Object, m.Surfaces, w)
		}
	}
	if len(seen) != len(want) {
		t.Errorf("models %v, want %d of them", seen, len(want))
	}

	client := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	page, err := client.Models.List(t.Context())
	if err != nil {
		t.Fatalf("Models.List: %v", err)
	}
	for _, m := range page.Data {
		var got []string
		if f, ok := m.JSON.ExtraFields["surfaces"]; ok {
			if err := json.Unmarshal([]byte(f.Raw()), &got); err != nil {
				t.Errorf("%s: surfaces %s: %v", m.ID, f.Raw(), err)
			}
		}
		if !slices.Equal(got, want[m.ID]) || m.Object != "model" {
			t.Errorf("SDK: %s surfaces %q, want %q", m.ID, got, want[m.ID])
		}
	}
	if len(page.Data) != len(want) {
		t.Errorf("SDK: %d models, want %d", len(page.Data), len(want))
	}
}

// toolsSetup is a gateway with an openai backend (gpt-x, Responses) and an anthropic one
// (claude-x); modelLines are added to both models' blocks (a tool_price). Both mocks make
// 10 calls of every provider tool a request names, within its bound; the default bound is 3.
func toolsSetup(modelLines string) setup {
	add := func(block string) string {
		return strings.Replace(block, "output_price", modelLines+"\n\t\t\t\toutput_price", 1)
	}
	return setup{
		gateway: "tool_calls_default 3\n" + add(backendBlock("oai", "oai", "gpt-x", toolIn, toolOut)) +
			add(anthropicBlock("ant", "ant", "claude-x", toolIn, toolOut)),
		mocks: []mockSpec{
			{key: "oai", lines: "models gpt-x\n\t\ttool_calls 10"},
			{key: "ant", lines: "models claude-x\n\t\ttool_calls 10\n\t\tapi_key " + anthropicUpstreamKey},
		},
	}
}

const toolIn, toolOut = "1000", "2000"

// TestProviderToolsRefusedByDefault: a tool the provider runs and bills per call (OpenAI's
// web search on Responses, Anthropic's web search server tool) on a model that does not
// price it is refused through the official SDKs with a typed 400 tool_not_priced in the
// surface's shape, and so is a tool type the gateway does not know (fail closed); nothing
// is reserved nor charged, and nothing reaches the backend. The client's own tools (function
// tools, Anthropic custom tools) pass and cost their tokens only.
func TestProviderToolsRefusedByDefault(t *testing.T) {
	e := startGateway(t, toolsSetup(""))
	const initial = "5"
	u, k := e.userWithKey("tools@example.com", initial)
	ctx := t.Context()

	oc := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	_, err := oc.Responses.New(ctx, responses.ResponseNewParams{
		Model: "gpt-x", Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("news today")},
		Tools: []responses.ToolUnionParam{{OfWebSearch: &responses.WebSearchToolParam{Type: responses.WebSearchToolTypeWebSearch}}},
	})
	var oerr *openai.Error
	if !errors.As(err, &oerr) || oerr.StatusCode != http.StatusBadRequest || oerr.Code != "tool_not_priced" || !strings.Contains(oerr.Message, "web_search") {
		t.Errorf("Responses with web_search: %v, want a 400 tool_not_priced naming web_search", err)
	}

	ac := anthropic.NewClient(antoption.WithBaseURL(e.gw), antoption.WithAPIKey(k.Key), antoption.WithMaxRetries(0))
	_, err = ac.Messages.New(ctx, anthropic.MessageNewParams{
		Model: "claude-x", MaxTokens: 5,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("news today"))},
		Tools:    []anthropic.ToolUnionParam{{OfWebSearchTool20250305: &anthropic.WebSearchTool20250305Param{}}},
	})
	if ae := checkAnthropicError(t, err, http.StatusBadRequest, "invalid_request_error", "tool_not_priced"); ae != nil &&
		!strings.Contains(string(ae.RawJSON()), "web_search") {
		t.Errorf("the refusal does not name the tool: %s", ae.RawJSON())
	}

	// Types the gateway does not count are refused whatever the prices (an allowlist).
	for _, c := range []struct{ path, body string }{
		{"/v1/responses", `{"model":"gpt-x","input":"hi","tools":[{"type":"tool_search"}]}`},
		{"/v1/responses", `{"model":"gpt-x","input":"hi","tools":[{"type":"shell","environment":{"type":"container_auto"}}]}`},
		{"/v1/responses", `{"model":"gpt-x","input":"hi","tools":[{"type":"web_search_2099_01_01"}]}`},
		{"/v1/messages", `{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"code_execution_20250825","name":"code_execution"}]}`},
		{"/v1/messages", `{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"web_search_2025","name":"web_search"}]}`},
	} {
		r := e.post(c.path, c.body, bearer(k.Key))
		if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), `"tool_not_priced"`) {
			t.Errorf("%s %s: %s, want 400 tool_not_priced", c.path, c.body, r)
		}
	}
	if got := e.balance(u.ID); got != credits.Amount(micro(t, initial)) || len(e.settlements(u.ID)) != 0 {
		t.Fatalf("refused requests changed the books: balance %s, %d settlements", got, len(e.settlements(u.ID)))
	}
	if n := e.ledger(u.ID).Entries; len(n) != 1 {
		t.Errorf("ledger %+v: want only the credit (nothing reserved)", n)
	}

	// The client's own tools cost their tokens.
	resp, err := oc.Responses.New(ctx, responses.ResponseNewParams{
		Model: "gpt-x", Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("call it")},
		Tools: []responses.ToolUnionParam{{OfFunction: &responses.FunctionToolParam{Name: "lookup",
			Parameters: map[string]any{"type": "object"}}}},
	})
	if err != nil {
		t.Fatalf("Responses with a function tool: %v", err)
	}
	msg, err := ac.Messages.New(ctx, anthropic.MessageNewParams{
		Model: "claude-x", MaxTokens: 5,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("call it"))},
		Tools: []anthropic.ToolUnionParam{{OfTool: &anthropic.ToolParam{Name: "lookup",
			InputSchema: anthropic.ToolInputSchemaParam{Properties: map[string]any{}}}},
			{OfBashTool20250124: &anthropic.ToolBash20250124Param{}}},
	})
	if err != nil {
		t.Fatalf("Messages with client tools: %v", err)
	}
	s := e.settlements(u.ID)
	if len(s) != 2 {
		t.Fatalf("%d settlements, want 2", len(s))
	}
	for i, want := range []int64{resp.Usage.InputTokens, msg.Usage.InputTokens} {
		if s[i].Usage.InputTokens != want || s[i].Amount != cost(t, s[i].Usage.InputTokens, s[i].Usage.OutputTokens, toolIn, toolOut) {
			t.Errorf("settlement %d: %+v (%s), want its tokens' cost, input %d", i, s[i].Usage, s[i].Amount, want)
		}
	}
	e.checkAllAccounts(0)
}

// TestProviderToolsPriced: with tool_price web_search 0.01 on both models, a web search
// request reserves its bounded calls at that price on top of its tokens (a 402 names that
// exact amount as required), the bound given (max_uses, max_tool_calls) or, absent, the
// gateway's default set and sent (the mocks make 10 calls but for it); the settlement is
// the tokens plus the calls the usage reports, exact, through the SDKs, streamed or not;
// the books balance.
func TestProviderToolsPriced(t *testing.T) {
	const fee = "0.01"
	e := startGateway(t, toolsSetup("tool_price web_search "+fee))
	feeAmount := credits.Amount(micro(t, fee))
	const initial = "5"
	u, k := e.userWithKey("priced@example.com", initial)
	ctx := t.Context()
	spent := credits.Amount(0)
	check := func(what string, calls int64) {
		t.Helper()
		s := e.settlements(u.ID)
		last := s[len(s)-1]
		want := cost(t, last.Usage.InputTokens, last.Usage.OutputTokens, toolIn, toolOut) + feeAmount*credits.Amount(calls)
		if last.Amount != want {
			t.Errorf("%s: charged %s (usage %+v), want the tokens and %d calls: %s", what, last.Amount, last.Usage, calls, want)
		}
		spent += last.Amount
	}

	oc := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	search := []responses.ToolUnionParam{{OfWebSearch: &responses.WebSearchToolParam{Type: responses.WebSearchToolTypeWebSearch}}}
	// max_tool_calls 2: two calls.
	res, err := oc.Responses.New(ctx, responses.ResponseNewParams{
		Model: "gpt-x", Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("news today")},
		Tools: search, MaxToolCalls: openai.Int(2), MaxOutputTokens: openai.Int(5),
	})
	if err != nil {
		t.Fatalf("Responses with web_search: %v", err)
	}
	if n := countItems(res.Output, "web_search_call"); n != 2 {
		t.Errorf("%d web_search_call items, want 2", n)
	}
	check("Responses, max_tool_calls 2", 2)
	// No bound: the default (3) is sent; streamed.
	stream := oc.Responses.NewStreaming(ctx, responses.ResponseNewParams{
		Model: "gpt-x", Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("news today")},
		Tools: search, MaxOutputTokens: openai.Int(5),
	})
	var final responses.Response
	for stream.Next() {
		if ev := stream.Current(); ev.Type == "response.completed" || ev.Type == "response.incomplete" {
			final = ev.Response
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	stream.Close()
	if n := countItems(final.Output, "web_search_call"); n != 3 {
		t.Errorf("streamed: %d web_search_call items, want the default bound 3", n)
	}
	check("Responses streamed, default bound", 3)

	ac := anthropic.NewClient(antoption.WithBaseURL(e.gw), antoption.WithAPIKey(k.Key), antoption.WithMaxRetries(0))
	msg, err := ac.Messages.New(ctx, anthropic.MessageNewParams{
		Model: "claude-x", MaxTokens: 5,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("news today"))},
		Tools:    []anthropic.ToolUnionParam{{OfWebSearchTool20250305: &anthropic.WebSearchTool20250305Param{MaxUses: anthropic.Int(4)}}},
	})
	if err != nil {
		t.Fatalf("Messages with web search: %v", err)
	}
	if msg.Usage.ServerToolUse.WebSearchRequests != 4 {
		t.Errorf("web_search_requests %d, want 4", msg.Usage.ServerToolUse.WebSearchRequests)
	}
	check("Messages, max_uses 4", 4)
	ms := ac.Messages.NewStreaming(ctx, anthropic.MessageNewParams{
		Model: "claude-x", MaxTokens: 5,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("news today"))},
		Tools:    []anthropic.ToolUnionParam{{OfWebSearchTool20250305: &anthropic.WebSearchTool20250305Param{}}},
	})
	for ms.Next() {
	}
	if err := ms.Err(); err != nil {
		t.Fatalf("Messages stream: %v", err)
	}
	ms.Close()
	check("Messages streamed, default bound", 3)

	// A stream cut before its last usage: the tool calls are charged at their bound (2), as
	// the provider bills them; the tokens by the rule for a cut stream.
	hdr := bearer(k.Key)
	hdr["X-Mock-Fault"], hdr["X-Mock-Chunks"] = "cut", "4"
	req := e.newRequest(ctx, http.MethodPost, e.gw+"/v1/messages", `{"model":"claude-x","max_tokens":8,"stream":true,`+
		`"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":2}]}`, hdr)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil || strings.Contains(string(got), "message_stop") {
		t.Fatalf("the mock did not cut the stream (%v): %s", err, got)
	}
	poll(t, 10*time.Second, "the cut stream is settled", func() (bool, string) {
		n := len(e.settlements(u.ID))
		return n == 5, fmt.Sprint(n, " settlements")
	})
	check("Messages stream cut", 2)

	// Web fetch is not priced: refused, though web search is.
	r := e.post("/v1/messages", `{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}],`+
		`"tools":[{"type":"web_search_20250305","name":"web_search"},{"type":"web_fetch_20250910","name":"web_fetch"}]}`, bearer(k.Key))
	if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), `"tool_not_priced"`) || !strings.Contains(string(r.body), "web_fetch") {
		t.Errorf("web fetch unpriced: %s, want 400 tool_not_priced naming web_fetch", r)
	}

	// The reservation: a caller with too little is told the exact bound, tokens and calls.
	poor, pk := e.userWithKey("poor@example.com", "0.01")
	for _, c := range []struct {
		path, body string
		out, calls int64
	}{
		{"/v1/responses", `{"model":"gpt-x","input":"hi","max_output_tokens":7,"max_tool_calls":9,"tools":[{"type":"web_search"}]}`, 7, 9},
		{"/v1/responses", `{"model":"gpt-x","input":"hi","max_output_tokens":7,"tools":[{"type":"web_search_preview"},{"type":"web_search"}]}`, 7, 0},
		{"/v1/messages", `{"model":"claude-x","max_tokens":7,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"web_search_20250305","name":"a","max_uses":6},{"type":"web_search_20260209","name":"b"}]}`, 7, 6 + 3},
	} {
		r := e.post(c.path, c.body, bearer(pk.Key))
		if c.calls == 0 {
			// web_search_preview has no price: refused before anything else.
			if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), "web_search_preview") {
				t.Errorf("%s: %s, want 400 tool_not_priced naming web_search_preview", c.body, r)
			}
			continue
		}
		want := cost(t, int64(len(c.body)), c.out, toolIn, toolOut) + feeAmount*credits.Amount(c.calls)
		obj := r.object(t)
		details, _ := obj["details"].(map[string]any) // Anthropic's shape
		if inner, ok := obj["error"].(map[string]any); ok && details == nil {
			details, _ = inner["details"].(map[string]any) // OpenAI's
		}
		if r.status != http.StatusPaymentRequired || details == nil || amountOf(t, details["required"]) != want {
			t.Errorf("%s: %s, want 402 with required %s", c.body, r, want)
		}
	}
	if got := e.balance(poor.ID); got != credits.Amount(micro(t, "0.01")) {
		t.Errorf("the refused caller's balance is %s", got)
	}
	if got := e.balance(u.ID); got != credits.Amount(micro(t, initial))-spent {
		t.Errorf("balance %s, want %s less %s", got, initial, spent)
	}
	e.checkAllAccounts(0)
}

// countItems counts the output items of type typ.
func countItems(items []responses.ResponseOutputItemUnion, typ string) int {
	n := 0
	for _, it := range items {
		if it.Type == typ {
			n++
		}
	}
	return n
}
