package caddymodule

import (
	"bytes"
	"encoding/json"
	"slices"
	"strconv"
	"strings"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// endpoint is a route the gateway serves itself: one of the self-service API, or an API
// surface (epSurface + its routing.Format), described in routing.Surfaces.
type endpoint int

const (
	epNone endpoint = iota
	// The self-service API (selfservice.go).
	epAuthKeys // /v1/auth/keys
	epAuthKey  // /v1/auth/keys/{id}[/rotate]
	epCredits
	epUsage
	// epSurface is the first API surface.
	epSurface
)

var endpoints = func() map[string]endpoint {
	m := map[string]endpoint{
		"/v1/auth/keys": epAuthKeys,
		"/v1/credits":   epCredits,
		"/v1/usage":     epUsage,
	}
	for i := range routing.Surfaces {
		m[routing.Surfaces[i].Path] = epSurface + endpoint(i)
	}
	return m
}()

// selfServiceNames are the endpoint metric label values of the self-service API.
var selfServiceNames = [...]string{"", "auth_keys", "auth_key", "credits", "usage"}

func (e endpoint) String() string {
	if e >= epSurface {
		return e.surface().Name
	}
	return selfServiceNames[e]
}

// format is the routing format of a surface endpoint.
func (e endpoint) format() routing.Format { return routing.Format(e - epSurface) }

// surface is the description of a surface endpoint.
func (e endpoint) surface() *routing.Surface { return e.format().Surface() }

// lists reports whether a surface endpoint lists the catalog.
func (e endpoint) lists() bool { return e.surface().List != routing.ListNone }

// method is the HTTP method of a surface endpoint.
func (e endpoint) method() string { return e.surface().Method }

// scope is what a credential needs to call a surface endpoint.
func (e endpoint) scope() string { return e.surface().Scope }

// inference is a parsed inference request body: the fields the gateway acts on, and all the
// others kept as they came so the body can be re-encoded for each backend.
type inference struct {
	format routing.Format
	model  string
	stream bool
	// clientWantsUsage: an OpenAI streaming client asked for the usage chunk itself.
	clientWantsUsage bool
	// outputBound is the most output tokens the backend may produce for one choice (sent to
	// it); choices is how many it is asked for (n, best_of). The output the request can
	// cost is their product.
	outputBound int64
	choices     int64
	// echoBound is what the prompt adds to each choice's output when it is echoed (its bytes).
	echoBound int64
	// inputBound is the most prompt tokens the request can cost: one token per byte of the
	// whole body (a byte-level tokenizer never makes more), and imageTokens per image.
	inputBound int64
	maxPrice   credits.Amount
	// follows is the stored response the request carries on (Surface.Follows), if any.
	follows string
	// tools bound the provider tool calls the request may make (Surface.Tools); toolFees
	// are, per usage counter, the fees its calls are priced at (the dearest on the model);
	// toolBounds the most calls each counter can report.
	tools      []routing.ToolUse
	toolFees   [metering.NumToolCounters][]string
	toolBounds metering.ToolCalls
	fields     map[string]json.RawMessage
	// raw is the body as the client sent it (the prompt counted when no usage is reported).
	raw []byte
}

// outputTotal is the most output tokens the request can cost: every choice at its bound, and
// the prompt again in each when it is echoed.
func (inf *inference) outputTotal() int64 { return (inf.outputBound + inf.echoBound) * inf.choices }

// requestLimits are the bounds a request body must respect.
type requestLimits struct {
	maxTokensDefault, maxTokensCap int64
	// toolCallsDefault bounds provider tool calls when the request gives no bound.
	toolCallsDefault int64
}

// maxToolCalls bounds max_tool_calls and max_uses: more is refused with 400.
const maxToolCalls = 1000

// maxModelName bounds model names; longer ones are refused before any lookup.
const maxModelName = 256

// maxChoices bounds n and best_of (OpenAI's own limit): more is refused with 400.
const maxChoices = 128

// imageTokens is what one image in a request is reserved at, whatever its size: above the
// most the providers bill for one (OpenAI's high detail tiles and patches, Anthropic's
// 1.15 megapixels, Ollama's fixed 576 of LLaVA). An image sent as data counts its bytes too.
const imageTokens = 2560

// checkedFields are, per level of a request body, the members the gateway reads, rewrites or
// counts on any route (routing.CommonChecked and every surface's Checked). A member whose name
// differs from one of them only by case, as encoding/json folds names (Unicode's simple folds
// included: "K" is "k"), is refused: a Go backend would read it in place of the one the
// gateway billed.
var checkedFields = func() map[string][]string {
	out := map[string][]string{}
	add := func(m map[string][]string) {
		for level, names := range m {
			for _, n := range names {
				if !slices.Contains(out[level], n) {
					out[level] = append(out[level], n)
				}
			}
		}
	}
	add(routing.CommonChecked)
	for i := range routing.Surfaces {
		add(routing.Surfaces[i].Checked)
	}
	return out
}()

// longestChecked is the length of the longest checked name.
var longestChecked = func() int {
	n := 0
	for _, names := range checkedFields {
		for _, name := range names {
			n = max(n, len(name))
		}
	}
	return n
}()

// foldedFields maps each checked name, ASCII-lowercased, to itself, per level.
var foldedFields = func() map[string]map[string]string {
	out := map[string]map[string]string{}
	for level, names := range checkedFields {
		m := map[string]string{}
		for _, n := range names {
			m[n] = n
		}
		out[level] = m
	}
	return out
}()

// checkFolding refuses a member of obj (at level, "" for the top) whose name folds onto a
// checked field's without being that name.
func checkFolding(level string, obj map[string]json.RawMessage) error {
	for k := range obj {
		if name, ok := foldsOnto(level, k); ok && name != k {
			param := k
			if level != "" {
				param = level + "." + k
			}
			return invalid(param, "%q differs from the field %q only by case: send it as %q", k, name, name)
		}
	}
	return nil
}

// foldsOnto returns the checked field of level that key folds onto, if any.
func foldsOnto(level, key string) (string, bool) {
	// A fold takes an ASCII letter to at most three bytes (U+212A KELVIN SIGN is "k").
	if len(key) > 3*longestChecked {
		return "", false
	}
	var lower [32]byte
	ascii := len(key) <= len(lower)
	for i := 0; ascii && i < len(key); i++ {
		c := key[i]
		if c >= 0x80 {
			ascii = false
		}
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		lower[i] = c
	}
	if ascii {
		name, ok := foldedFields[level][string(lower[:len(key)])]
		return name, ok
	}
	for _, n := range checkedFields[level] {
		if strings.EqualFold(key, n) {
			return n, true
		}
	}
	return "", false
}

// parseInference reads and checks an inference request body of the surface of format.
func parseInference(format routing.Format, body []byte, maxPriceHeader string, lim requestLimits) (*inference, error) {
	sf := format.Surface()
	inf := &inference{format: format, choices: 1, raw: body}
	fields, ok := objectMembers(body)
	if !ok {
		return nil, invalid("", "the request body must be a JSON object")
	}
	inf.fields = fields
	f := inf.fields
	if err := checkFolding("", f); err != nil {
		return nil, err
	}
	if inf.model, ok = stringValue(f["model"]); !ok || inf.model == "" {
		return nil, invalid("model", "model is required and must be a string")
	}
	if err := checkModelName(inf.model); err != nil {
		return nil, err
	}
	// What the model reads must be there; the backend judges it.
	prompts, err := checkPrompt(sf.PromptRule, sf.Prompt, f[sf.Prompt])
	if err != nil {
		return nil, err
	}
	// Everything in the body can reach the model (messages, system, tools, functions,
	// response_format, context, suffix, images): the bound counts all of it.
	inf.inputBound = int64(len(body)) + imageTokens*countImages(body)

	for _, field := range sf.Unmetered {
		if raw, ok := f[field]; ok && string(bytes.TrimSpace(raw)) == "true" {
			return nil, invalid(field, "%s: true is not served: its usage would come after the answer, unmetered", field)
		}
	}
	if raw, ok := f[sf.Follows]; sf.Follows != "" && ok && !isNull(raw) {
		if err := json.Unmarshal(raw, &inf.follows); err != nil || inf.follows == "" {
			return nil, invalid(sf.Follows, "%s must be a response id", sf.Follows)
		}
	}
	inf.stream = sf.StreamDefault
	if raw, ok := f["stream"]; ok && !isNull(raw) {
		if inf.stream, ok = boolValue(raw); !ok {
			return nil, invalid("stream", "stream must be a boolean")
		}
	}
	if !sf.Streams {
		inf.stream = false
	}

	// The output bound, given or defaulted, always sent on to the backend.
	if len(sf.OutputFields) > 0 {
		if err := inf.boundOutput(sf, lim); err != nil {
			return nil, err
		}
	}
	// Several choices (n, best_of for the servers that take it), each up to the bound.
	for _, field := range sf.ChoiceFields {
		if raw, ok := f[field]; ok && !isNull(raw) {
			n, err := strconv.ParseInt(string(bytes.TrimSpace(raw)), 10, 64)
			if err != nil || n < 1 || n > maxChoices {
				return nil, invalid(field, "%s must be a whole number from 1 to %d", field, maxChoices)
			}
			inf.choices = max(inf.choices, n)
		}
	}
	if sf.Batch {
		inf.choices *= prompts
	}
	if raw, ok := f[sf.Echo]; sf.Echo != "" && ok && !isNull(raw) {
		echo, ok := boolValue(raw)
		if !ok {
			return nil, invalid(sf.Echo, "%s must be a boolean", sf.Echo)
		}
		if echo {
			inf.echoBound = int64(len(f[sf.Prompt]))
		}
	}
	if inf.stream && sf.IncludeUsage {
		var so map[string]json.RawMessage
		if raw, ok := f["stream_options"]; ok && !isNull(raw) {
			if so, ok = objectMembers(raw); !ok {
				return nil, invalid("stream_options", "stream_options must be an object")
			}
			if err := checkFolding("stream_options", so); err != nil {
				return nil, err
			}
		}
		if so == nil {
			so = map[string]json.RawMessage{}
		}
		inf.clientWantsUsage, _ = boolValue(so["include_usage"])
		so["include_usage"] = json.RawMessage("true")
		f["stream_options"], _ = json.Marshal(so)
	}

	if sf.Tools != nil {
		if err := inf.readTools(sf.Tools, lim); err != nil {
			return nil, err
		}
	}

	// The price ceiling, from the body or the X-Max-Price header; never sent on.
	if raw, ok := f["max_price"]; ok {
		delete(f, "max_price")
		if err := json.Unmarshal(raw, &inf.maxPrice); err != nil || inf.maxPrice < 0 {
			return nil, invalid("max_price", "max_price must be a non-negative number of credits")
		}
	}
	if maxPriceHeader != "" {
		p, err := credits.ParseAmount(strings.TrimSpace(maxPriceHeader))
		if err != nil || p < 0 {
			return nil, invalid("X-Max-Price", "X-Max-Price must be a non-negative number of credits")
		}
		if inf.maxPrice == 0 || p < inf.maxPrice {
			inf.maxPrice = p
		}
	}
	return inf, nil
}

// readTools checks the "tools" array against the surface's rules: the client's tools pass,
// a provider tool is noted with its bound on calls (given, or the default, set and sent),
// and any other type is refused with tool_not_priced. Which model prices the provider tools
// is the routing's to decide (routing.Request.Tools).
func (inf *inference) readTools(rules *routing.ToolRules, lim requestLimits) error {
	raw, ok := inf.fields["tools"]
	if !ok || isNull(raw) {
		return nil
	}
	var tools []json.RawMessage
	if err := json.Unmarshal(raw, &tools); err != nil {
		return invalid("tools", "tools must be an array of objects")
	}
	var shared []string // the fees of the tools bound together (rules.CallsField)
	changed := false
	for i, t := range tools {
		param := "tools[" + strconv.Itoa(i) + "]"
		tool, ok := objectMembers(t)
		if !ok {
			return invalid(param, "each tool must be an object")
		}
		if err := checkFolding("tools[]", tool); err != nil {
			return err
		}
		var typ string
		rawType, typed := tool["type"]
		if typed && !isNull(rawType) {
			if err := json.Unmarshal(rawType, &typ); err != nil {
				return invalid(param+".type", "a tool's type must be a string")
			}
		} else {
			typed = false
		}
		client, provider := classifyTool(rules, typed, typ, tool)
		if client {
			continue
		}
		if provider == nil {
			return &toolRefused{param: param + ".type", tool: typ}
		}
		inf.toolFees[provider.Counter] = appendNew(inf.toolFees[provider.Counter], provider.Fee)
		if rules.CallsField != "" {
			shared = appendNew(shared, provider.Fee)
			continue
		}
		calls, err := toolCalls(tool, rules.PerToolField, param+"."+rules.PerToolField, lim)
		if err != nil {
			return err
		}
		if _, given := tool[rules.PerToolField]; !given || isNull(tool[rules.PerToolField]) {
			tool[rules.PerToolField] = jsonInt(calls)
			tools[i], _ = json.Marshal(tool)
			changed = true
		}
		inf.tools = append(inf.tools, routing.ToolUse{Fees: []string{provider.Fee}, Calls: calls})
		inf.toolBounds[provider.Counter] += calls
	}
	if len(shared) > 0 {
		calls, err := toolCalls(inf.fields, rules.CallsField, rules.CallsField, lim)
		if err != nil {
			return err
		}
		inf.fields[rules.CallsField] = jsonInt(calls)
		inf.tools = append(inf.tools, routing.ToolUse{Fees: shared, Calls: calls})
		for c, fees := range inf.toolFees {
			if len(fees) > 0 {
				inf.toolBounds[c] = calls
			}
		}
	}
	if changed {
		inf.fields["tools"], _ = json.Marshal(tools)
	}
	return nil
}

// classifyTool says whether a tool of type typ (typed: it has one) is the client's, or which
// provider tool it is; neither is a type the surface does not serve.
func classifyTool(rules *routing.ToolRules, typed bool, typ string, tool map[string]json.RawMessage) (bool, *routing.ProviderTool) {
	if !typed {
		return rules.Untyped, nil
	}
	if slices.Contains(rules.Groups, typ) {
		return clientGroup(rules, tool["tools"]), nil
	}
	if clientTool(rules, typ, tool) {
		return true, nil
	}
	for i := range rules.Provider {
		if rules.Provider[i].Matches(typ) {
			return false, &rules.Provider[i]
		}
	}
	return false, nil
}

// clientGroup reports whether grouped (a group tool's "tools") is an array of tools of the
// client's types only.
func clientGroup(rules *routing.ToolRules, grouped json.RawMessage) bool {
	var tools []map[string]json.RawMessage
	if json.Unmarshal(grouped, &tools) != nil || len(tools) == 0 {
		return false
	}
	for _, tool := range tools {
		var typ string
		if tool == nil || checkFolding("tools[]", tool) != nil || json.Unmarshal(tool["type"], &typ) != nil ||
			!clientTool(rules, typ, tool) {
			return false
		}
	}
	return true
}

// clientTool reports whether a tool of type typ is one the client executes.
func clientTool(rules *routing.ToolRules, typ string, tool map[string]json.RawMessage) bool {
	for _, c := range rules.Client {
		if !c.Matches(typ) {
			continue
		}
		if c.Environment != "" {
			if env, ok := tool["environment"]; ok && !isNull(env) {
				var e struct {
					Type string `json:"type"`
				}
				if json.Unmarshal(env, &e) != nil || e.Type != c.Environment {
					return false
				}
			}
		}
		return true
	}
	return false
}

// toolCalls reads the call bound field of obj: absent or null, the default; else a whole
// number from 1 to maxToolCalls.
func toolCalls(obj map[string]json.RawMessage, field, param string, lim requestLimits) (int64, error) {
	raw, ok := obj[field]
	if !ok || isNull(raw) {
		return max(lim.toolCallsDefault, 1), nil
	}
	n, err := strconv.ParseInt(string(bytes.TrimSpace(raw)), 10, 64)
	if err != nil || n < 1 || n > maxToolCalls {
		return 0, invalid(param, "%s must be a whole number from 1 to %d", field, maxToolCalls)
	}
	return n, nil
}

func appendNew(list []string, s string) []string {
	if slices.Contains(list, s) {
		return list
	}
	return append(list, s)
}

// boundOutput sets the output bound from the surface's output fields (in the top level or
// in sf.OutputIn): the tightest of those given, every one given sent as that bound so no
// backend reads a larger one; none given, the default, sent as the first.
func (inf *inference) boundOutput(sf *routing.Surface, lim requestLimits) error {
	obj, prefix := inf.fields, ""
	if sf.OutputIn != "" {
		prefix = sf.OutputIn + "."
		obj = nil
		if raw, ok := inf.fields[sf.OutputIn]; ok && !isNull(raw) {
			var ok bool
			if obj, ok = objectMembers(raw); !ok {
				return invalid(sf.OutputIn, "%s must be an object", sf.OutputIn)
			}
			if err := checkFolding(sf.OutputIn, obj); err != nil {
				return err
			}
		}
		if obj == nil {
			obj = map[string]json.RawMessage{}
		}
	}
	inf.outputBound = 0
	for _, field := range sf.OutputFields {
		if raw, ok := obj[field]; ok && !isNull(raw) {
			n, err := outputBound(raw, prefix+field, lim)
			if err != nil {
				return err
			}
			if inf.outputBound == 0 || n < inf.outputBound {
				inf.outputBound = n
			}
		}
	}
	if inf.outputBound == 0 && sf.OutputRequired {
		return invalid(prefix+sf.OutputFields[0], "%s is required", sf.OutputFields[0])
	}
	if inf.outputBound == 0 {
		inf.outputBound = lim.maxTokensDefault
		obj[sf.OutputFields[0]] = jsonInt(inf.outputBound)
	}
	for _, field := range sf.OutputFields {
		if raw, ok := obj[field]; ok && !isNull(raw) {
			obj[field] = jsonInt(inf.outputBound)
		}
	}
	if sf.OutputIn != "" {
		inf.fields[sf.OutputIn], _ = json.Marshal(obj)
	}
	return nil
}

// checkPrompt checks that the prompt member raw (named field) is there as rule says, and
// returns how many prompts it holds (PromptTexts: an array of several; else 1).
func checkPrompt(rule routing.PromptRule, field string, raw json.RawMessage) (int64, error) {
	switch rule {
	case routing.PromptMessages:
		// The body is valid JSON already: an array whose first element is an object will do
		// here; the backend judges the messages themselves.
		msgs := bytes.TrimSpace(raw)
		if len(msgs) < 2 || msgs[0] != '[' || bytes.TrimSpace(msgs[1:])[0] != '{' {
			return 0, invalid(field, "%s is required and must be a non-empty array of objects", field)
		}
	case routing.PromptString:
		var p string
		if err := json.Unmarshal(raw, &p); err != nil {
			return 0, invalid(field, "%s is required and must be a string", field)
		}
	case routing.PromptInput:
		in := bytes.TrimSpace(raw)
		if len(in) == 0 || (in[0] != '"' && in[0] != '[') || bytes.Equal(in, []byte("[]")) || bytes.Equal(in, []byte(`""`)) {
			return 0, invalid(field, "%s is required: a string or a non-empty array", field)
		}
	case routing.PromptTexts:
		n := textPrompts(raw)
		if n == 0 {
			return 0, invalid(field, "%s is required: a string, or a non-empty array of strings, of token ids or of token id arrays", field)
		}
		return n, nil
	}
	return 1, nil
}

// textPrompts returns how many prompts raw holds: 1 for a non-empty string or a non-empty
// array of token ids, the length of a non-empty array of strings or of non-empty arrays of
// token ids; 0 for anything else.
func textPrompts(raw json.RawMessage) int64 {
	if t := bytes.TrimSpace(raw); len(t) > 0 && t[0] == '"' {
		var s string
		if json.Unmarshal(raw, &s) != nil || s == "" {
			return 0
		}
		return 1
	}
	var strs []string
	if err := json.Unmarshal(raw, &strs); err == nil && len(strs) > 0 {
		return int64(len(strs))
	}
	var ids []uint32
	if err := json.Unmarshal(raw, &ids); err == nil && len(ids) > 0 {
		return 1
	}
	var lists [][]uint32
	if err := json.Unmarshal(raw, &lists); err != nil || len(lists) == 0 {
		return 0
	}
	for _, l := range lists {
		if len(l) == 0 {
			return 0
		}
	}
	return int64(len(lists))
}

// outputBound reads a max_tokens-like field: absent or null means the default; otherwise a
// whole number from 1 to the cap.
func outputBound(raw json.RawMessage, field string, lim requestLimits) (int64, error) {
	if len(raw) == 0 || isNull(raw) {
		return lim.maxTokensDefault, nil
	}
	n, err := strconv.ParseInt(string(bytes.TrimSpace(raw)), 10, 64)
	if err != nil || n < 1 {
		return 0, invalid(field, "%s must be a whole number of at least 1", field)
	}
	if n > lim.maxTokensCap {
		return 0, invalid(field, "%s must be at most %d", field, lim.maxTokensCap)
	}
	return n, nil
}

// checkModelName refuses names that are not plain model names: URLs, paths, control bytes.
func checkModelName(name string) error {
	if len(name) > maxModelName {
		return invalid("model", "model name too long")
	}
	if strings.Contains(name, "://") || strings.HasPrefix(name, "/") || strings.Contains(name, "..") ||
		strings.ContainsAny(name, "\\?#@ ") {
		return invalid("model", "model must be a model name, not a URL or a path")
	}
	for i := 0; i < len(name); i++ {
		if name[i] < 0x21 || name[i] > 0x7e {
			return invalid("model", "model name has a character that is not printable ASCII")
		}
	}
	return nil
}

// body encodes the request for one backend, with the model renamed for it. The members are
// written as they were decoded (one per name: a name sent twice was collapsed by the decoder,
// so the backend cannot read another model than the one billed).
func (inf *inference) body(upstreamModel string) []byte {
	inf.fields["model"] = appendJSONString(nil, upstreamModel)
	size := 2
	for k, v := range inf.fields {
		size += len(k) + len(v) + 4
	}
	out := make([]byte, 0, size)
	out = append(out, '{')
	for k, v := range inf.fields {
		if len(out) > 1 {
			out = append(out, ',')
		}
		out = appendJSONString(out, k)
		out = append(out, ':')
		out = append(out, v...)
	}
	return append(out, '}')
}

// appendJSONString appends s as a JSON string.
func appendJSONString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == '"' || c == '\\' || c >= 0x7f {
			b, _ := json.Marshal(s)
			return append(dst, b...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

func jsonInt(n int64) json.RawMessage { return json.RawMessage(strconv.FormatInt(n, 10)) }

// countImages counts the images of a request body, upper-biased: every part whose type is an
// image ("image_url", "input_image", "image") and every element of an "images" array
// (Ollama). A body that cannot spell "image" in any case, even escaped, is not decoded.
func countImages(body []byte) int64 {
	if !mayNameImage(body) {
		return 0
	}
	type frame struct {
		object  bool // an object (else an array)
		wantKey bool // an object whose next string is a key
		images  bool // an array that is the value of "images"
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	var (
		stack      []frame
		n          int64
		nextImages bool // the value about to start is that of an "images" key
	)
	for {
		tok, err := dec.Token()
		if err != nil {
			return n
		}
		top := len(stack) - 1
		if d, ok := tok.(json.Delim); ok && (d == '}' || d == ']') {
			stack = stack[:top]
			continue
		}
		if top >= 0 && stack[top].object && stack[top].wantKey {
			key, _ := tok.(string)
			stack[top].wantKey = false
			nextImages = strings.EqualFold(key, "images")
			continue
		}
		// A value: an element of an images array counts, and so does an image part's type.
		if top >= 0 {
			if stack[top].object {
				stack[top].wantKey = true
			} else if stack[top].images {
				n++
			}
		}
		switch v := tok.(type) {
		case json.Delim:
			stack = append(stack, frame{object: v == '{', wantKey: v == '{', images: v == '[' && nextImages})
		case string:
			if strings.EqualFold(v, "image_url") || strings.EqualFold(v, "input_image") || strings.EqualFold(v, "image") {
				n++
			}
		}
		nextImages = false
	}
}

// mayNameImage reports whether body holds "image" in any ASCII case, or a \u escape that could
// spell it. It looks for the g's (a fast search) and reads around them.
func mayNameImage(body []byte) bool {
	if bytes.Contains(body, []byte(`\u`)) {
		return true
	}
	for _, g := range []byte{'g', 'G'} {
		for i := 3; i+1 < len(body); i++ {
			j := bytes.IndexByte(body[i:len(body)-1], g)
			if j < 0 {
				break
			}
			i += j
			w := body[i-3 : i+2]
			if w[0]|0x20 == 'i' && w[1]|0x20 == 'm' && w[2]|0x20 == 'a' && w[4]|0x20 == 'e' {
				return true
			}
		}
	}
	return false
}
