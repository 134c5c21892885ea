package caddymodule

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// TestReadTools: the tools of a request are read against the surface's allowlist: client
// tools pass unchanged, provider tools are noted with their call bound (given, or the
// default set in the body sent on), and other types, bad bounds and folded names are refused.
func TestReadTools(t *testing.T) {
	lim := requestLimits{maxTokensDefault: 100, maxTokensCap: 1000, toolCallsDefault: 3}
	const msgs = `"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]`
	const input = `"model":"m","input":"hi"`
	for _, tc := range []struct {
		name   string
		format routing.Format
		body   string
		refuse string // the error's code or param; "" accepted
		uses   []routing.ToolUse
		bounds metering.ToolCalls
		sent   func(sent map[string]any) bool
	}{
		{name: "client tools only", format: routing.FormatAnthropicMessages,
			body: `{` + msgs + `,"tools":[{"name":"f","input_schema":{}},{"type":"custom","name":"g"},{"type":"bash_20250124","name":"bash"},{"type":"text_editor_20250728","name":"e"}]}`},
		{name: "anthropic web search, max_uses given and defaulted", format: routing.FormatAnthropicMessages,
			body:   `{` + msgs + `,"tools":[{"type":"web_search_20250305","name":"a","max_uses":7},{"type":"web_search_20260209","name":"b"},{"type":"web_fetch_20250910","name":"c","max_uses":null}]}`,
			uses:   []routing.ToolUse{{Fees: []string{"web_search"}, Calls: 7}, {Fees: []string{"web_search"}, Calls: 3}, {Fees: []string{"web_fetch"}, Calls: 3}},
			bounds: metering.ToolCalls{metering.ToolWebSearch: 10, metering.ToolWebFetch: 3},
			sent: func(sent map[string]any) bool {
				tools := sent["tools"].([]any)
				return tools[0].(map[string]any)["max_uses"] == 7.0 && tools[1].(map[string]any)["max_uses"] == 3.0 &&
					tools[2].(map[string]any)["max_uses"] == 3.0
			}},
		{name: "responses tools share max_tool_calls (defaulted)", format: routing.FormatOpenAIResponses,
			body:   `{` + input + `,"tools":[{"type":"function","name":"f"},{"type":"web_search_preview"},{"type":"file_search","vector_store_ids":["v"]},{"type":"shell","environment":{"type":"local"}}]}`,
			uses:   []routing.ToolUse{{Fees: []string{"web_search_preview", "file_search"}, Calls: 3}},
			bounds: metering.ToolCalls{metering.ToolWebSearch: 3, metering.ToolFileSearch: 3},
			sent:   func(sent map[string]any) bool { return sent["max_tool_calls"] == 3.0 }},
		{name: "responses max_tool_calls given", format: routing.FormatOpenAIResponses,
			body: `{` + input + `,"max_tool_calls":12,"tools":[{"type":"web_search"}]}`,
			uses: []routing.ToolUse{{Fees: []string{"web_search"}, Calls: 12}}, bounds: metering.ToolCalls{metering.ToolWebSearch: 12},
			sent: func(sent map[string]any) bool { return sent["max_tool_calls"] == 12.0 }},
		{name: "no provider tool: no max_tool_calls added", format: routing.FormatOpenAIResponses,
			body: `{` + input + `,"tools":[{"type":"function","name":"f"}]}`,
			sent: func(sent map[string]any) bool { _, ok := sent["max_tool_calls"]; return !ok }},
		{name: "a namespace of functions (Codex CLI) is the client's", format: routing.FormatOpenAIResponses,
			body: `{` + input + `,"tools":[{"type":"namespace","name":"mcp","description":"d","tools":[{"type":"function","name":"f"},{"type":"custom","name":"g"}]}]}`,
			sent: func(sent map[string]any) bool { _, ok := sent["max_tool_calls"]; return !ok }},
		{name: "a namespace holding a provider tool", format: routing.FormatOpenAIResponses,
			body: `{` + input + `,"tools":[{"type":"namespace","name":"n","tools":[{"type":"function","name":"f"},{"type":"web_search"}]}]}`, refuse: "tools[0].type"},
		{name: "a namespace in a namespace", format: routing.FormatOpenAIResponses,
			body: `{` + input + `,"tools":[{"type":"namespace","name":"n","tools":[{"type":"namespace","name":"m","tools":[{"type":"function","name":"f"}]}]}]}`, refuse: "tools[0].type"},
		{name: "an empty namespace", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"type":"namespace","name":"n","tools":[]}]}`, refuse: "tools[0].type"},
		{name: "a namespace with an untyped tool", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"type":"namespace","name":"n","tools":[{"name":"f"}]}]}`, refuse: "tools[0].type"},
		{name: "a namespace with a folded type", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"type":"namespace","name":"n","tools":[{"type":"function","TYPE":"web_search","name":"f"}]}]}`, refuse: "tools[0].type"},
		{name: "a namespace in Messages is no tool type of Anthropic's", format: routing.FormatAnthropicMessages,
			body: `{` + msgs + `,"tools":[{"type":"namespace","name":"n","tools":[{"type":"custom","name":"f"}]}]}`, refuse: "tools[0].type"},
		{name: "unknown responses type", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"type":"tool_search"}]}`, refuse: "tools[0].type"},
		{name: "hosted shell", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"type":"shell","environment":{"type":"container_auto"}}]}`, refuse: "tools[0].type"},
		{name: "untyped responses tool", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"name":"f"}]}`, refuse: "tools[0].type"},
		{name: "anthropic code execution", format: routing.FormatAnthropicMessages, body: `{` + msgs + `,"tools":[{"type":"code_execution_20250825","name":"x"}]}`, refuse: "tools[0].type"},
		{name: "anthropic undated family", format: routing.FormatAnthropicMessages, body: `{` + msgs + `,"tools":[{"name":"f"},{"type":"web_search_2025030","name":"x"}]}`, refuse: "tools[1].type"},
		{name: "max_uses 0", format: routing.FormatAnthropicMessages, body: `{` + msgs + `,"tools":[{"type":"web_search_20250305","name":"x","max_uses":0}]}`, refuse: "tools[0].max_uses"},
		{name: "max_tool_calls too large", format: routing.FormatOpenAIResponses, body: `{` + input + `,"max_tool_calls":1001,"tools":[{"type":"web_search"}]}`, refuse: "max_tool_calls"},
		{name: "tools not an array", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":{"type":"web_search"}}`, refuse: "tools"},
		{name: "type not a string", format: routing.FormatOpenAIResponses, body: `{` + input + `,"tools":[{"type":1}]}`, refuse: "tools[0].type"},
		{name: "folded type", format: routing.FormatAnthropicMessages, body: `{` + msgs + `,"tools":[{"name":"f","Type":"web_search_20250305"}]}`, refuse: "tools[].Type"},
		{name: "folded max_uses", format: routing.FormatAnthropicMessages, body: `{` + msgs + `,"tools":[{"type":"web_search_20250305","name":"x","max_uses":1,"MAX_USES":99}]}`, refuse: "tools[].MAX_USES"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inf, err := parseInference(tc.format, []byte(tc.body), "", lim)
			if tc.refuse != "" {
				e := errorResponse(err)
				if err == nil || e.status != 400 || e.Param == nil || *e.Param != tc.refuse {
					t.Fatalf("err %v (%+v), want a 400 on %s", err, e, tc.refuse)
				}
				var tr *toolRefused
				if errors.As(err, &tr) && (e.Code != "tool_not_priced" || !strings.Contains(e.Message, "not served")) {
					t.Errorf("refusal %+v", e)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.EqualFunc(inf.tools, tc.uses, func(a, b routing.ToolUse) bool { return a.Calls == b.Calls && slices.Equal(a.Fees, b.Fees) }) ||
				inf.toolBounds != tc.bounds {
				t.Errorf("uses %+v bounds %v, want %+v %v", inf.tools, inf.toolBounds, tc.uses, tc.bounds)
			}
			body := inf.body("up")
			var sent map[string]any
			if err := json.Unmarshal(body, &sent); err != nil {
				t.Fatal(err)
			}
			if tc.sent != nil && !tc.sent(sent) {
				t.Errorf("sent %s", body)
			}
		})
	}
}

// TestToolPriceValidate: a tool_price names a tool the gateway counts, at a price that is not
// negative.
func TestToolPriceValidate(t *testing.T) {
	for _, tc := range []struct {
		prices map[string]credits.Amount
		err    string
	}{
		{map[string]credits.Amount{"web_search": 10_000, "web_fetch": 0, "mcp": 1}, ""},
		{map[string]credits.Amount{"code_execution": 1}, `tool_price "code_execution": not a provider tool`},
		{map[string]credits.Amount{"web_search": -1}, "tool_price web_search is negative"},
	} {
		g := &Gateway{KeyPrefix: "sk_live", Backends: []*Backend{{Name: "b", URL: "http://127.0.0.1:1", Style: routing.StyleOpenAI, Models: []*Model{{Name: "m", ToolPrices: tc.prices}}}}}
		err := g.Validate()
		// (The rest of this bare configuration is not valid: a valid price passes the models' checks.)
		if tc.err == "" && err != nil && strings.Contains(err.Error(), "tool_price") ||
			tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%v: err %v, want %q", tc.prices, err, tc.err)
		}
	}
}
