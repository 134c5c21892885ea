package mockbackend

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// OpenAI Responses: POST /v1/responses, and the stored response routes
// GET|DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel and
// GET /v1/responses/{id}/input_items.
//
// Token counts, as for the other paths (one word one token):
//
//   - Input tokens are the words of instructions and of input (a string, or an array of items
//     whose content is a string or parts of type input_text, output_text or text; a
//     function_call_output's output counts too), at least 1, plus, with previous_response_id,
//     the input and output tokens of that response (the conversation carried on). Those
//     carried tokens are reported as input_tokens_details.cached_tokens, as a provider's
//     prompt cache would serve them.
//   - Output tokens are CompletionTokens capped by max_output_tokens (then the response is
//     "incomplete", reason max_output_tokens). With a "reasoning" object in the request, half
//     of them (rounded down) are reasoning (output_tokens_details.reasoning_tokens) and the
//     visible text is the other words, "tok1 ... tokK"; without it, reasoning_tokens is 0.
//   - A stream sends response.created, response.in_progress, response.output_item.added,
//     response.content_part.added, then the text in Chunks response.output_text.delta events
//     (split as the other streams), response.output_text.done, response.content_part.done,
//     response.output_item.done and response.completed (or response.incomplete) with the
//     usage; each event is "event: <type>" and "data: <json>", with sequence_number. The cut
//     and truncate faults stop after the first Chunks/2 deltas, as on the other streams.
//
// With ToolUse set, a request offering a function tool of that name (tools: {"type":
// "function","name":...}) whose input has no function_call_output item is answered with one
// function_call output item instead of the message: {"type":"function_call","id":"fc_mock<n>",
// "call_id":"call_mock<n>","name":ToolUse,"arguments":ToolInput as a string}, the same usage.
// Streamed: response.output_item.added (arguments ""), the arguments in Chunks
// response.function_call_arguments.delta events, response.function_call_arguments.done,
// response.output_item.done and response.completed.
//
// Every response (unless "store": false) is kept by the mocks of the same name, at most
// maxStoredResponses of them (the oldest forgotten first), so that the stored routes answer
// for it, and a previous_response_id must name one of them (else 404
// previous_response_not_found). Responses made with "background": true are stored
// "in_progress" and never complete; cancel makes them "cancelled", and is refused (400) for
// the others, as OpenAI refuses it. input_items lists the input as message items, order desc
// (default) or asc, with after and limit (1-100, default 20).

// maxStoredResponses bounds the responses the mocks of one name keep.
const maxStoredResponses = 10_000

const responsesPath = "/v1/responses"

// storedResponseRoute returns the endpoint of a stored response route: /v1/responses/{id}
// (GET or DELETE), /v1/responses/{id}/cancel (POST) or /v1/responses/{id}/input_items (GET).
func storedResponseRoute(path, method string) (endpoint, bool) {
	rest, ok := strings.CutPrefix(path, responsesPath+"/")
	if !ok || rest == "" {
		return endpoint{}, false
	}
	id, action, _ := strings.Cut(rest, "/")
	if id == "" || strings.Contains(action, "/") {
		return endpoint{}, false
	}
	ep := endpoint{style: styleOpenAI}
	switch action {
	case "":
		ep.method = http.MethodGet
		if method == http.MethodDelete {
			ep.method = http.MethodDelete
		}
	case "cancel":
		ep.method = http.MethodPost
	case "input_items":
		ep.method = http.MethodGet
	default:
		return endpoint{}, false
	}
	ep.serve = func(x *exchange) { serveStoredResponse(x, id, action) }
	return ep, true
}

// statsPathOf is the counter key of a request path: the stored response routes count under
// "/v1/responses/{id}".
func statsPathOf(path string) string {
	if strings.HasPrefix(path, responsesPath+"/") {
		return storedResponsesKey
	}
	return path
}

const storedResponsesKey = "/v1/responses/{id}"

// responseStore is the responses the mocks of one name made.
type responseStore struct {
	mu    sync.Mutex
	byID  map[string]*storedResponse
	order []string // ids, oldest first
}

type storedResponse struct {
	resp        responseObject
	input       []responseItem
	inputTokens int // the input and output tokens of the response (for chaining)
	output      int
}

var responseStores = struct {
	sync.Mutex
	byName map[string]*responseStore
}{byName: map[string]*responseStore{}}

func responseStoreFor(name string) *responseStore {
	responseStores.Lock()
	defer responseStores.Unlock()
	s := responseStores.byName[name]
	if s == nil {
		s = &responseStore{byID: map[string]*storedResponse{}}
		responseStores.byName[name] = s
	}
	return s
}

func (s *responseStore) put(r *storedResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byID[r.resp.ID]; !ok {
		s.order = append(s.order, r.resp.ID)
	}
	s.byID[r.resp.ID] = r
	for len(s.order) > maxStoredResponses {
		delete(s.byID, s.order[0])
		s.order = s.order[1:]
	}
}

// get returns a copy of the stored response id.
func (s *responseStore) get(id string) (storedResponse, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.byID[id]
	if !ok {
		return storedResponse{}, false
	}
	return *r, true
}

func (s *responseStore) delete(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byID[id]; !ok {
		return false
	}
	delete(s.byID, id)
	s.order = slices.DeleteFunc(s.order, func(o string) bool { return o == id })
	return true
}

// cancel marks a background response cancelled; it returns the response, whether it exists,
// and whether it could be cancelled.
func (s *responseStore) cancel(id string) (responseObject, bool, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.byID[id]
	if !ok {
		return responseObject{}, false, false
	}
	if !r.resp.Background {
		return r.resp, true, false
	}
	if r.resp.Status == "in_progress" || r.resp.Status == "queued" {
		r.resp.Status = "cancelled"
	}
	return r.resp, true, true
}

// Wire types.

type responsesRequest struct {
	Model              string          `json:"model"`
	Input              json.RawMessage `json:"input"`
	Instructions       *string         `json:"instructions"`
	MaxOutputTokens    int             `json:"max_output_tokens"`
	Stream             bool            `json:"stream"`
	PreviousResponseID string          `json:"previous_response_id"`
	Store              *bool           `json:"store"`
	Background         bool            `json:"background"`
	Reasoning          json.RawMessage `json:"reasoning"`
	Tools              []mockTool      `json:"tools"`
	MaxToolCalls       *int            `json:"max_tool_calls"`
}

// callsFunction reports whether the answer to req is a call of the mock's ToolUse: the
// request offers a function tool of that name and its input has no function_call_output.
func (m *MockBackend) callsFunction(req *responsesRequest, items []responseItem) bool {
	if m.ToolUse == "" {
		return false
	}
	offered := false
	for _, t := range req.Tools {
		offered = offered || t.Type == "function" && t.Name == m.ToolUse
	}
	return offered && !slices.ContainsFunc(items, func(it responseItem) bool { return it.Type == "function_call_output" })
}

type responseObject struct {
	ID                 string            `json:"id"`
	Object             string            `json:"object"`
	CreatedAt          int64             `json:"created_at"`
	Status             string            `json:"status"`
	Background         bool              `json:"background"`
	Error              *json.RawMessage  `json:"error"`
	IncompleteDetails  *incompleteDetail `json:"incomplete_details"`
	Instructions       *string           `json:"instructions"`
	MaxOutputTokens    *int              `json:"max_output_tokens"`
	Model              string            `json:"model"`
	Output             []responseItem    `json:"output"`
	ParallelToolCalls  bool              `json:"parallel_tool_calls"`
	PreviousResponseID *string           `json:"previous_response_id"`
	Store              bool              `json:"store"`
	Temperature        float64           `json:"temperature"`
	ToolChoice         string            `json:"tool_choice"`
	Tools              []any             `json:"tools"`
	TopP               float64           `json:"top_p"`
	Truncation         string            `json:"truncation"`
	Usage              *responsesUsage   `json:"usage"` // last, as real servers put it
}

type incompleteDetail struct {
	Reason string `json:"reason"`
}

type responseItem struct {
	ID      string        `json:"id"`
	Type    string        `json:"type"`
	Status  string        `json:"status,omitempty"`
	Role    string        `json:"role"`
	Content []contentPart `json:"content"`
	// A function_call item has these instead of role and content.
	Name      string `json:"-"`
	CallID    string `json:"-"`
	Arguments string `json:"-"`
}

// MarshalJSON writes a function_call item in its own shape, the others as they are.
func (it responseItem) MarshalJSON() ([]byte, error) {
	if it.Type == "function_call" {
		return json.Marshal(struct {
			ID        string `json:"id"`
			Type      string `json:"type"`
			Status    string `json:"status"`
			Arguments string `json:"arguments"`
			CallID    string `json:"call_id"`
			Name      string `json:"name"`
		}{it.ID, it.Type, it.Status, it.Arguments, it.CallID, it.Name})
	}
	type plain responseItem
	return json.Marshal(plain(it))
}

type contentPart struct {
	Type        string `json:"type"`
	Text        string `json:"text"`
	Annotations []any  `json:"annotations,omitempty"`
}

type responsesUsage struct {
	InputTokens        int `json:"input_tokens"`
	InputTokensDetails struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"input_tokens_details"`
	OutputTokens        int `json:"output_tokens"`
	OutputTokensDetails struct {
		ReasoningTokens int `json:"reasoning_tokens"`
	} `json:"output_tokens_details"`
	TotalTokens int `json:"total_tokens"`
}

// responsesInput reads a Responses input: a string (one user message), or an array of
// items; it returns the items (as messages) and their words.
func responsesInput(raw json.RawMessage) ([]responseItem, int, error) {
	var one string
	if len(raw) > 0 && raw[0] == '"' {
		if err := json.Unmarshal(raw, &one); err != nil {
			return nil, 0, err
		}
		return []responseItem{{Type: "message", Role: "user", Content: []contentPart{{Type: "input_text", Text: one}}}},
			countWords(one), nil
	}
	var items []struct {
		Type    string          `json:"type"`
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
		Output  json.RawMessage `json:"output"`
	}
	if err := json.Unmarshal(raw, &items); err != nil || len(items) == 0 {
		return nil, 0, errors.New("must be a string or a non-empty array of items")
	}
	var out []responseItem
	words := 0
	for i, it := range items {
		item := responseItem{Type: "message", Role: it.Role}
		if it.Type != "" && it.Type != "message" {
			item.Type = it.Type
		}
		if item.Role == "" {
			item.Role = "user"
		}
		switch {
		case len(it.Content) > 0 && it.Content[0] == '"':
			var s string
			_ = json.Unmarshal(it.Content, &s)
			words += countWords(s)
			item.Content = []contentPart{{Type: "input_text", Text: s}}
		case len(it.Content) > 0 && it.Content[0] == '[':
			var parts []contentPart
			if err := json.Unmarshal(it.Content, &parts); err != nil {
				return nil, 0, fmt.Errorf("[%d].content: %w", i, err)
			}
			for _, p := range parts {
				if p.Type == "input_text" || p.Type == "output_text" || p.Type == "text" {
					words += countWords(p.Text)
					item.Content = append(item.Content, contentPart{Type: p.Type, Text: p.Text})
				}
			}
		case len(it.Output) > 0 && it.Output[0] == '"':
			var s string
			_ = json.Unmarshal(it.Output, &s)
			words += countWords(s)
			item.Content = []contentPart{{Type: "input_text", Text: s}}
		}
		out = append(out, item)
	}
	return out, words, nil
}

func serveResponses(x *exchange) {
	var req responsesRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	items, words, err := responsesInput(req.Input)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: input: "+err.Error())
		return
	}
	if req.Instructions != nil {
		words += countWords(*req.Instructions)
	}
	store := responseStoreFor(x.mock.Name)
	cached := 0
	if req.PreviousResponseID != "" {
		prev, ok := store.get(req.PreviousResponseID)
		if !ok {
			x.fail(http.StatusNotFound, "previous_response_not_found",
				fmt.Sprintf("Previous response with id '%s' not found.", req.PreviousResponseID))
			return
		}
		cached = prev.inputTokens + prev.output
	}
	seq := completionSeq.Add(1)
	id := "resp_mock" + strconv.FormatInt(seq, 10)
	for i := range items {
		items[i].ID = fmt.Sprintf("msg_in%d_%d", seq, i)
	}
	out, capped := completionTokens(x.set.completionTokens, req.MaxOutputTokens)
	reasoning := 0
	if len(req.Reasoning) > 0 && string(req.Reasoning) != "null" {
		reasoning = out / 2
	}
	u := &responsesUsage{InputTokens: max(words, 1) + cached, OutputTokens: out, TotalTokens: max(words, 1) + cached + out}
	u.InputTokensDetails.CachedTokens = cached
	u.OutputTokensDetails.ReasoningTokens = reasoning

	resp := responseObject{
		ID: id, Object: "response", CreatedAt: time.Now().Unix(), Status: "in_progress", Background: req.Background,
		Instructions: req.Instructions, Model: req.Model, Output: []responseItem{}, ParallelToolCalls: true,
		Store: req.Store == nil || *req.Store, Temperature: 1, ToolChoice: "auto", Tools: []any{}, TopP: 1,
		Truncation: "disabled",
	}
	if req.MaxOutputTokens > 0 {
		resp.MaxOutputTokens = &req.MaxOutputTokens
	}
	if req.PreviousResponseID != "" {
		resp.PreviousResponseID = &req.PreviousResponseID
	}
	keep := func(r responseObject) {
		if r.Store {
			store.put(&storedResponse{resp: r, input: items, inputTokens: u.InputTokens, output: out})
		}
	}
	if req.Background {
		keep(resp) // in progress for ever, until cancelled
		x.reply(resp)
		return
	}

	msgID := fmt.Sprintf("msg_mock%d", seq)
	visible := out - reasoning
	final := resp
	final.Status, final.Usage = "completed", u
	if capped {
		final.Status, final.IncompleteDetails = "incomplete", &incompleteDetail{Reason: "max_output_tokens"}
	}
	text := generatedPieces(visible, 1)[0]
	calls := x.mock.responsesToolCalls(req.Tools, req.MaxToolCalls, seq)
	final.Output = append(calls, responseItem{ID: msgID, Type: "message", Status: "completed", Role: "assistant",
		Content: []contentPart{{Type: "output_text", Text: text, Annotations: []any{}}}})
	call := x.mock.callsFunction(&req, items)
	if call {
		final.Output = append(calls, responseItem{ID: fmt.Sprintf("fc_mock%d", seq), Type: "function_call", Status: "completed",
			Name: x.mock.ToolUse, CallID: fmt.Sprintf("call_mock%d", seq), Arguments: string(x.mock.toolInput())})
	}
	if !req.Stream {
		keep(final)
		x.reply(final)
		return
	}

	keep(resp) // stored as soon as it is created, as OpenAI does
	if !x.startStream("text/event-stream") {
		return
	}
	n := 0
	event := func(typ string, fields map[string]any) bool {
		fields["type"] = typ
		fields["sequence_number"] = n
		n++
		body, err := json.Marshal(fields)
		if err != nil {
			return false
		}
		return x.send(fmt.Appendf(nil, "event: %s\ndata: %s\n\n", typ, body))
	}
	if call {
		x.streamFunctionCall(event, keep, resp, final, done(capped))
		return
	}
	item := responseItem{ID: msgID, Type: "message", Status: "in_progress", Role: "assistant", Content: []contentPart{}}
	part := contentPart{Type: "output_text", Text: "", Annotations: []any{}}
	if !event("response.created", map[string]any{"response": resp}) ||
		!x.pause() || !event("response.in_progress", map[string]any{"response": resp}) ||
		!x.pause() || !event("response.output_item.added", map[string]any{"output_index": 0, "item": item}) ||
		!x.pause() || !event("response.content_part.added", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "part": part}) {
		return
	}
	pieces := generatedPieces(visible, x.set.chunks)
	for i, piece := range pieces {
		if !x.pause() || x.cutHere(i, len(pieces)) {
			return
		}
		if !event("response.output_text.delta", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0,
			"delta": piece, "logprobs": []any{}}) {
			return
		}
	}
	part.Text = text
	item.Status, item.Content = "completed", []contentPart{part}
	final.Output = append(calls, item)
	keep(final)
	if !x.pause() || !event("response.output_text.done", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "text": text, "logprobs": []any{}}) ||
		!event("response.content_part.done", map[string]any{"item_id": msgID, "output_index": 0, "content_index": 0, "part": part}) ||
		!event("response.output_item.done", map[string]any{"output_index": 0, "item": item}) ||
		!x.pause() {
		return
	}
	event(done(capped), map[string]any{"response": final})
}

// done is the type of a stream's last event.
func done(capped bool) string {
	if capped {
		return "response.incomplete"
	}
	return "response.completed"
}

// streamFunctionCall streams a response whose output ends in one function_call item (final's last):
// the item added with empty arguments, the arguments in Chunks
// response.function_call_arguments.delta events, .done, the item done, and the last event;
// the response is kept (keep) complete once its arguments are through.
func (x *exchange) streamFunctionCall(event func(string, map[string]any) bool, keep func(responseObject), resp, final responseObject, last string) {
	item := final.Output[len(final.Output)-1]
	added := item
	added.Status, added.Arguments = "in_progress", ""
	if !event("response.created", map[string]any{"response": resp}) ||
		!x.pause() || !event("response.in_progress", map[string]any{"response": resp}) ||
		!x.pause() || !event("response.output_item.added", map[string]any{"output_index": 0, "item": added}) {
		return
	}
	pieces := splitPieces(item.Arguments, x.set.chunks)
	for i, piece := range pieces {
		if !x.pause() || x.cutHere(i, len(pieces)) {
			return
		}
		if !event("response.function_call_arguments.delta", map[string]any{"item_id": item.ID, "output_index": 0, "delta": piece}) {
			return
		}
	}
	keep(final)
	if !x.pause() || !event("response.function_call_arguments.done", map[string]any{"item_id": item.ID, "output_index": 0, "arguments": item.Arguments}) ||
		!event("response.output_item.done", map[string]any{"output_index": 0, "item": item}) || !x.pause() {
		return
	}
	event(last, map[string]any{"response": final})
}

// serveStoredResponse answers the stored response routes.
func serveStoredResponse(x *exchange, id, action string) {
	store := responseStoreFor(x.mock.Name)
	notFound := func() {
		x.fail(http.StatusNotFound, "not_found", fmt.Sprintf("No response found with id '%s'.", id))
	}
	switch {
	case action == "" && x.r.Method == http.MethodDelete:
		if !store.delete(id) {
			notFound()
			return
		}
		x.reply(map[string]any{"id": id, "object": "response", "deleted": true})
	case action == "":
		r, ok := store.get(id)
		if !ok {
			notFound()
			return
		}
		x.reply(r.resp)
	case action == "cancel":
		resp, ok, cancelled := store.cancel(id)
		switch {
		case !ok:
			notFound()
		case !cancelled:
			x.fail(http.StatusBadRequest, "invalid_request", "Only responses created with background=true can be cancelled.")
		default:
			x.reply(resp)
		}
	default: // input_items
		r, ok := store.get(id)
		if !ok {
			notFound()
			return
		}
		x.inputItems(r.input)
	}
}

// inputItems answers a page of input items: order desc (default) or asc, after an id, limit
// 1-100 (default 20).
func (x *exchange) inputItems(items []responseItem) {
	q := x.r.URL.Query()
	items = slices.Clone(items)
	switch q.Get("order") {
	case "", "desc":
		slices.Reverse(items)
	case "asc":
	default:
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: order must be asc or desc")
		return
	}
	if after := q.Get("after"); after != "" {
		i := slices.IndexFunc(items, func(it responseItem) bool { return it.ID == after })
		if i < 0 {
			x.fail(http.StatusBadRequest, "invalid_request", "mock backend: after names no item of the response")
			return
		}
		items = items[i+1:]
	}
	limit := 20
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			x.fail(http.StatusBadRequest, "invalid_request", "mock backend: limit must be from 1 to 100")
			return
		}
		limit = n
	}
	more := len(items) > limit
	items = items[:min(limit, len(items))]
	page := map[string]any{"object": "list", "data": items, "has_more": more, "first_id": nil, "last_id": nil}
	if len(items) > 0 {
		page["first_id"], page["last_id"] = items[0].ID, items[len(items)-1].ID
	}
	x.reply(page)
}
