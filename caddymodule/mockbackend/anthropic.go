package mockbackend

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
)

// Anthropic Messages: POST /v1/messages (JSON, or SSE with stream: true) and
// POST /v1/messages/count_tokens, as Anthropic's API answers them:
//
//   - max_tokens is required (else 400 invalid_request_error); it caps the completion
//     tokens, and stop_reason is then "max_tokens", else "end_turn".
//   - input_tokens are the words of the system prompt (a string or text blocks) and of the
//     messages' contents (text blocks only), at least 1; cache_read_input_tokens and
//     cache_creation_input_tokens are CacheReadTokens and CacheWriteTokens (X-Mock-Cached-Tokens,
//     X-Mock-Cache-Write-Tokens override them), beside input_tokens as Anthropic counts them.
//   - A stream is message_start (message.usage: the input counts and output_tokens 1, as
//     Anthropic sends a placeholder there), content_block_start, ping, Chunks
//     content_block_delta text_delta events, content_block_stop, message_delta (usage:
//     output_tokens, the whole completion), message_stop, each as "event: <type>" and
//     "data: <json>". The cut and truncate faults stop after the first Chunks/2 deltas, before
//     content_block_stop, message_delta and message_stop.
//   - count_tokens answers {"input_tokens": <the words of system and messages>}, cache
//     counts excluded.
//   - With ToolUse set, a request offering that tool (in tools) and carrying no tool_result
//     block is answered with a tool_use block instead of text: {"type":"tool_use","id":
//     "toolu_mock_<n>","name":ToolUse,"input":ToolInput}, stop_reason "tool_use", the same
//     usage. Streamed, its content_block_start carries "input": {} and the Chunks deltas are
//     input_json_delta events whose partial_json pieces make up ToolInput.
//
// With APIKey set, every model path wants x-api-key equal to it (else 401
// authentication_error); with AnthropicVersion set, the Anthropic paths want that
// anthropic-version (else 400). Errors on the Anthropic paths have Anthropic's shape.

func init() {
	endpoints["/v1/messages"] = endpoint{http.MethodPost, styleAnthropic, serveMessages}
	endpoints["/v1/messages/count_tokens"] = endpoint{http.MethodPost, styleAnthropic, serveCountTokens}
}

// anthropicError is Anthropic's error shape.
type anthropicError struct {
	Type  string             `json:"type"`
	Error anthropicErrorBody `json:"error"`
}

type anthropicErrorBody struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// anthropicErrorJSON is an error in Anthropic's shape, its type from the status.
func anthropicErrorJSON(status int, message string) []byte {
	typ := "invalid_request_error"
	switch {
	case status == http.StatusUnauthorized:
		typ = "authentication_error"
	case status == http.StatusNotFound:
		typ = "not_found_error"
	case status == http.StatusRequestEntityTooLarge:
		typ = "request_too_large"
	case status >= 500:
		typ = "api_error"
	}
	body, _ := json.Marshal(anthropicError{Type: "error", Error: anthropicErrorBody{Type: typ, Message: message}})
	return append(body, '\n')
}

// authorized checks the x-api-key and anthropic-version a configured mock wants; it answers
// the refusal and returns false.
func (m *MockBackend) authorized(w http.ResponseWriter, r *http.Request, ep endpoint) bool {
	if m.APIKey != "" && r.Header.Get("X-Api-Key") != m.APIKey {
		style := ep.style
		if r.Header.Get("Anthropic-Version") != "" {
			style = styleAnthropic // Anthropic's /v1/models
		}
		writeError(w, style, http.StatusUnauthorized, "invalid_api_key", "mock backend: invalid x-api-key")
		return false
	}
	if m.AnthropicVersion != "" && ep.style == styleAnthropic && r.Header.Get("Anthropic-Version") != m.AnthropicVersion {
		writeError(w, styleAnthropic, http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("mock backend: anthropic-version must be %q", m.AnthropicVersion))
		return false
	}
	return true
}

type messagesRequest struct {
	Model     string          `json:"model"`
	System    json.RawMessage `json:"system"`
	Messages  []chatMessage   `json:"messages"`
	MaxTokens *int            `json:"max_tokens"`
	Stream    bool            `json:"stream"`
	Tools     []mockTool      `json:"tools"`
}

// callsTool reports whether the answer to req is a call of the mock's ToolUse: the request
// offers that tool and no message carries a tool_result block yet.
func (m *MockBackend) callsTool(req *messagesRequest) bool {
	if m.ToolUse == "" || !slices.ContainsFunc(req.Tools, func(t mockTool) bool { return t.Name == m.ToolUse }) {
		return false
	}
	for _, msg := range req.Messages {
		var blocks []struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(msg.Content, &blocks) == nil &&
			slices.ContainsFunc(blocks, func(b struct {
				Type string `json:"type"`
			}) bool {
				return b.Type == "tool_result"
			}) {
			return false
		}
	}
	return true
}

// toolUseBlock is a tool_use content block.
type toolUseBlock struct {
	Type  string          `json:"type"`
	ID    string          `json:"id"`
	Name  string          `json:"name"`
	Input json.RawMessage `json:"input"`
}

// toolInput is the mock's ToolInput, {} when unset.
func (m *MockBackend) toolInput() json.RawMessage {
	if len(m.ToolInput) == 0 {
		return json.RawMessage("{}")
	}
	return m.ToolInput
}

// splitPieces splits s into at most n pieces of nearly equal length (the first ones a byte
// longer), none empty.
func splitPieces(s string, n int) []string {
	n = max(min(n, len(s)), 1)
	out := make([]string, 0, n)
	base, extra := len(s)/n, len(s)%n
	for i := range n {
		size := base
		if i < extra {
			size++
		}
		out = append(out, s[:size])
		s = s[size:]
	}
	return out
}

// anthropicUsage is Anthropic's usage object (output_tokens last).
type anthropicUsage struct {
	InputTokens              int            `json:"input_tokens"`
	CacheCreationInputTokens int            `json:"cache_creation_input_tokens"`
	CacheReadInputTokens     int            `json:"cache_read_input_tokens"`
	ServerToolUse            *serverToolUse `json:"server_tool_use,omitempty"`
	OutputTokens             int            `json:"output_tokens"`
}

type textBlock struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type anthropicMessage struct {
	ID           string         `json:"id"`
	Type         string         `json:"type"`
	Role         string         `json:"role"`
	Model        string         `json:"model"`
	Content      []any          `json:"content"` // textBlock or toolUseBlock
	StopReason   *string        `json:"stop_reason"`
	StopSequence *string        `json:"stop_sequence"`
	Usage        anthropicUsage `json:"usage"` // last, as Anthropic puts it
}

// messagesPrompt checks a Messages or count_tokens request and counts its prompt words; on
// failure it answers and returns false.
func (x *exchange) messagesPrompt(req *messagesRequest) (int, bool) {
	if !x.decode(req, func() string { return req.Model }) {
		return 0, false
	}
	if len(req.Messages) == 0 {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: messages: at least one message is required")
		return 0, false
	}
	words, err := contentWords(req.System)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: system: "+err.Error())
		return 0, false
	}
	prompt, err := promptWords(req.Messages)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: "+err.Error())
		return 0, false
	}
	return max(prompt+words, 1), true
}

// promptWords is the words of the messages' contents (promptTokens without its floor of 1).
func promptWords(messages []chatMessage) (int, error) {
	n := 0
	for i, msg := range messages {
		w, err := contentWords(msg.Content)
		if err != nil {
			return 0, fmt.Errorf("messages[%d].content: %w", i, err)
		}
		n += w
	}
	return n, nil
}

// cacheCounts are the cache counts of a request: the config's, or its X-Mock-Cached-Tokens
// and X-Mock-Cache-Write-Tokens (read by settingsFor). Anthropic reports them beside
// input_tokens, not as parts of it.
func (x *exchange) cacheCounts() (read, write int) {
	read, write = x.mock.CacheReadTokens, x.mock.CacheWriteTokens
	if x.r.Header.Get("X-Mock-Cached-Tokens") != "" {
		read = x.set.cachedTokens
	}
	if x.r.Header.Get("X-Mock-Cache-Write-Tokens") != "" {
		write = x.set.cacheWriteTokens
	}
	return read, write
}

func serveMessages(x *exchange) {
	var req messagesRequest
	prompt, ok := x.messagesPrompt(&req)
	if !ok {
		return
	}
	if req.MaxTokens == nil {
		x.fail(http.StatusBadRequest, "invalid_request", "max_tokens: Field required")
		return
	}
	if *req.MaxTokens < 1 {
		x.fail(http.StatusBadRequest, "invalid_request", "max_tokens: must be at least 1")
		return
	}
	cacheRead, cacheWrite := x.cacheCounts()
	completion, capped := completionTokens(x.set.completionTokens, *req.MaxTokens)
	stop := "end_turn"
	if capped {
		stop = "max_tokens"
	}
	u := anthropicUsage{InputTokens: prompt, CacheCreationInputTokens: cacheWrite, CacheReadInputTokens: cacheRead, OutputTokens: completion,
		ServerToolUse: x.mock.anthropicToolUse(req.Tools)}
	seq := strconv.FormatInt(completionSeq.Add(1), 10)
	id := "msg_mock_" + seq
	tool := x.mock.callsTool(&req)
	if tool {
		stop = "tool_use"
	}

	if !req.Stream {
		var block any = textBlock{Type: "text", Text: generatedPieces(completion, 1)[0]}
		if tool {
			block = toolUseBlock{Type: "tool_use", ID: "toolu_mock_" + seq, Name: x.mock.ToolUse, Input: x.mock.toolInput()}
		}
		x.reply(anthropicMessage{ID: id, Type: "message", Role: "assistant", Model: req.Model,
			Content: []any{block}, StopReason: &stop, Usage: u})
		return
	}
	if !x.startStream("text/event-stream") {
		return
	}
	start := u
	start.OutputTokens, start.ServerToolUse = 1, nil
	var block any = textBlock{Type: "text"}
	pieces := generatedPieces(completion, x.set.chunks)
	delta := func(piece string) any { return textBlock{Type: "text_delta", Text: piece} }
	if tool {
		block = toolUseBlock{Type: "tool_use", ID: "toolu_mock_" + seq, Name: x.mock.ToolUse, Input: json.RawMessage("{}")}
		pieces = splitPieces(string(x.mock.toolInput()), x.set.chunks)
		delta = func(piece string) any { return map[string]string{"type": "input_json_delta", "partial_json": piece} }
	}
	if !x.sendEvent("message_start", map[string]any{"type": "message_start", "message": anthropicMessage{
		ID: id, Type: "message", Role: "assistant", Model: req.Model, Content: []any{}, Usage: start}}) ||
		!x.sendEvent("content_block_start", map[string]any{"type": "content_block_start", "index": 0,
			"content_block": block}) ||
		!x.sendEvent("ping", map[string]any{"type": "ping"}) {
		return
	}
	for i, piece := range pieces {
		if !x.pause() || x.cutHere(i, len(pieces)) {
			return
		}
		if !x.sendEvent("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
			"delta": delta(piece)}) {
			return
		}
	}
	if !x.sendEvent("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0}) || !x.pause() ||
		!x.sendEvent("message_delta", map[string]any{"type": "message_delta",
			"delta": map[string]any{"stop_reason": stop, "stop_sequence": nil},
			"usage": map[string]any{"output_tokens": completion, "server_tool_use": u.ServerToolUse}}) {
		return
	}
	x.sendEvent("message_stop", map[string]any{"type": "message_stop"})
}

func serveCountTokens(x *exchange) {
	var req messagesRequest
	prompt, ok := x.messagesPrompt(&req)
	if !ok {
		return
	}
	x.reply(map[string]int{"input_tokens": prompt})
}

// sendEvent sends one SSE event with its name.
func (x *exchange) sendEvent(name string, v any) bool {
	body, err := json.Marshal(v)
	if err != nil {
		return false
	}
	return x.send(fmt.Appendf(nil, "event: %s\ndata: %s\n\n", name, body))
}
