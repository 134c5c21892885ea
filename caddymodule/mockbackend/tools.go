package mockbackend

import (
	"fmt"
	"strings"
)

// Provider tools: the mock "runs" the provider tools a request names, MockBackend.ToolCalls
// calls of each, never more than the request's bound (absent, no bound: all of them, as a
// provider would run as many as the model asks for).

// mockTool is a tool of a request as the mock reads it.
type mockTool struct {
	Type    string `json:"type"`
	Name    string `json:"name"`
	MaxUses *int   `json:"max_uses"`
}

// serverToolUse is Anthropic's usage.server_tool_use.
type serverToolUse struct {
	WebSearchRequests int `json:"web_search_requests"`
	WebFetchRequests  int `json:"web_fetch_requests"`
}

// anthropicToolUse is what the Anthropic server tools of tools did (nil: none named).
func (m *MockBackend) anthropicToolUse(tools []mockTool) *serverToolUse {
	var u *serverToolUse
	for _, t := range tools {
		var dst *int
		switch {
		case strings.HasPrefix(t.Type, "web_search_"):
			u = cmpOr(u)
			dst = &u.WebSearchRequests
		case strings.HasPrefix(t.Type, "web_fetch_"):
			u = cmpOr(u)
			dst = &u.WebFetchRequests
		default:
			continue
		}
		n := m.ToolCalls
		if t.MaxUses != nil {
			n = min(n, *t.MaxUses)
		}
		*dst += n
	}
	return u
}

func cmpOr(u *serverToolUse) *serverToolUse {
	if u == nil {
		return &serverToolUse{}
	}
	return u
}

// responsesToolCalls are the web_search_call output items the Responses web search tools
// of tools make, at most maxCalls (nil: no bound) in all.
func (m *MockBackend) responsesToolCalls(tools []mockTool, maxCalls *int, seq int64) []responseItem {
	searches := false
	for _, t := range tools {
		searches = searches || strings.HasPrefix(t.Type, "web_search")
	}
	if !searches {
		return nil
	}
	n := m.ToolCalls
	if maxCalls != nil {
		n = min(n, *maxCalls)
	}
	var out []responseItem
	for i := range n {
		out = append(out, responseItem{ID: fmt.Sprintf("ws_mock%d_%d", seq, i), Type: "web_search_call", Status: "completed"})
	}
	return out
}
