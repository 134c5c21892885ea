package routing

import (
	"net/http"
	"slices"
	"strings"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
)

// Format is the wire format of a request: the index of its Surface in Surfaces.
type Format int

const (
	FormatOpenAIChat Format = iota
	FormatOpenAIEmbeddings
	FormatOllamaChat
	FormatOllamaGenerate
	FormatOpenAICompletions
	FormatOllamaEmbed
	FormatOllamaEmbeddings
	FormatOpenAIModels
	FormatOllamaTags
	FormatOpenAIResponses
	FormatAnthropicMessages
	FormatAnthropicCountTokens
)

// Surface describes one API route the gateway serves itself, once: everything the gateway's
// pipeline (identify, admit, route, reserve, proxy, meter, settle) needs to know of it. The
// pipeline has no other knowledge of a route: serving a new one is adding its Surface. The
// usage of every surface is read by the same parsers (metering.UsageFromJSON and the
// StreamMeter know OpenAI's usage, its chat deltas and legacy texts, and Ollama's counters).
type Surface struct {
	// Name is the endpoint label of the metrics.
	Name string
	// Method and Path are the route.
	Method, Path string
	// Scope is what a credential needs to call it.
	Scope string
	// List, when set, makes the route a listing of the catalog in that shape (no body, no
	// charge): the models of Kind (any kind when empty) that a backend of Styles serves.
	List ListShape
	// Kind is the kind of model it needs; Styles the backend styles that serve it.
	Kind   Kind
	Styles []Style
	// Errors is the shape of the gateway's own errors on the route.
	Errors ErrorShape

	// Prompt is the body member the model reads, which must be present, and how it is
	// checked (the backend judges its contents).
	Prompt     string
	PromptRule PromptRule
	// OutputIn is the object the output bound fields sit in ("" for the top level,
	// "options" for Ollama); OutputFields bound the output tokens of one choice: the tightest
	// given bounds it and every one given is sent as that bound; none given, the first is set
	// to the default. None: the route produces no output tokens (embeddings).
	OutputIn     string
	OutputFields []string
	// ChoiceFields ask for several choices (n, best_of): the output is bounded by the largest
	// of them times the output bound.
	ChoiceFields []string
	// Batch: the prompt may be an array of prompts, each answered with its own choices (the
	// number of prompts multiplies the choices).
	Batch bool
	// Echo, when set, is a boolean member that makes the prompt part of every choice's
	// output: the prompt's bytes are added to the output bound of each choice.
	Echo string
	// Streams: the route may stream (member "stream"); StreamDefault is its default.
	Streams, StreamDefault bool
	// IncludeUsage: a stream is asked for its usage with stream_options.include_usage
	// (OpenAI SSE), which the client gets only if it asked for it itself.
	IncludeUsage bool
	// Checked are, per level of the body ("" for the top), the members the gateway reads,
	// rewrites or counts on this route, besides those of every route (CommonChecked). A
	// member whose name folds onto one of any route's (as encoding/json folds names) is
	// refused: a Go backend would read it in place of the one the gateway billed.
	Checked map[string][]string
	// Query are the parameters of the client's query string passed on to the backend.
	Query []string
	// Follows, when set, is the body member naming a stored response the request carries on
	// (OpenAI's previous_response_id): the backend that made that response answers, and only
	// for the account that owns it (else 404, nothing charged).
	Follows string
	// Unmetered are boolean members that, when true, ask for an answer the gateway cannot
	// meter when it is served (OpenAI's background responses, whose usage comes later): such a
	// request is refused with 400.
	Unmetered []string
	// Stored, when set, are the routes under Path + "/{id}" that reach a stored response of
	// the surface (not charged, still authenticated and limited; see StoredRoute).
	Stored []StoredRoute
	// OutputRequired: one of OutputFields must be given (Anthropic's max_tokens); absent,
	// the request is refused with 400 rather than given the default.
	OutputRequired bool
	// Free: the route is free by contract (count_tokens): authenticated, scoped and rate
	// limited like the others, but nothing is reserved or charged.
	Free bool
	// Usage is the dialect of the usage the answers carry (metering.DialectOpenAI reads
	// OpenAI's and Ollama's).
	Usage metering.Dialect
	// Tools, when set, is how the body's "tools" array is read: a tool the client executes
	// costs its tokens only; a tool the provider runs and bills per call is served only on a
	// model that prices it (tool_price), its calls bounded and counted; any other type is
	// refused (400 tool_not_priced). Nil: the tools are the client's (function tools).
	Tools *ToolRules
}

// ToolRules say which tool types a surface serves and how the provider's are bounded. An
// allowlist: a type that none of them names is refused.
type ToolRules struct {
	// Untyped: a tool without a type is the client's (Anthropic's custom tools).
	Untyped bool
	// Client are the types the client executes (function, custom, Anthropic's bash...).
	Client []ToolType
	// Provider are the types the provider runs itself and bills beyond tokens.
	Provider []ProviderTool
	// Groups are the types that group tools under a name (Responses' "namespace", as Codex
	// CLI sends its tools), the grouped ones in the member "tools": a group is the client's
	// when every tool in it is of a Client type (typed, no group in a group), else refused.
	Groups []string
	// CallsField, when set, is the top-level member bounding the calls of all provider tools
	// together (Responses' max_tool_calls); PerToolField, when set, is each tool's member
	// bounding its own calls (Anthropic's max_uses). Absent, the bound is set to the
	// gateway's default and sent, so the bound the reservation holds is the provider's.
	CallsField, PerToolField string
}

// ToolType matches a tool's "type": Name exactly, or with Dated Name followed by an
// eight-digit version date (Anthropic's "web_search_20250305").
type ToolType struct {
	Name  string
	Dated bool
	// Environment, when set, is the only type the tool's "environment" object may have
	// (absent is fine): OpenAI's shell tool runs on the client only in a "local" one.
	Environment string
}

// ProviderTool is a tool type the provider runs and bills per call.
type ProviderTool struct {
	ToolType
	// Fee is the name an operator prices it under (a model's tool_price).
	Fee string
	// Counter is the usage count of its calls.
	Counter metering.ToolCounter
}

// Matches reports whether the tool type typ is t.
func (t ToolType) Matches(typ string) bool {
	if !t.Dated {
		return typ == t.Name
	}
	date, ok := strings.CutPrefix(typ, t.Name)
	if !ok || len(date) != 8 {
		return false
	}
	for i := 0; i < len(date); i++ {
		if date[i] < '0' || date[i] > '9' {
			return false
		}
	}
	return true
}

// ToolFees are the fee names a provider tool can be priced under, each known to a surface.
func ToolFees() []string {
	var out []string
	for i := range Surfaces {
		if r := Surfaces[i].Tools; r != nil {
			for _, p := range r.Provider {
				if !slices.Contains(out, p.Fee) {
					out = append(out, p.Fee)
				}
			}
		}
	}
	return out
}

// StoredRoute is a route to a stored response: Path + "/{id}" + Suffix, with its method and
// the query parameters passed on.
type StoredRoute struct {
	Method, Suffix string
	Query          []string
}

// PromptRule is how a surface's prompt member is checked.
type PromptRule int

const (
	// PromptNone: no prompt (the catalog lists).
	PromptNone PromptRule = iota
	// PromptMessages: a non-empty array whose first element is an object.
	PromptMessages
	// PromptString: a string.
	PromptString
	// PromptInput: a non-empty string or a non-empty array.
	PromptInput
	// PromptTexts: a non-empty string, or a non-empty array of strings, or of token ids, or
	// of non-empty arrays of token ids (OpenAI's legacy completions).
	PromptTexts
)

// ListShape is the shape of a catalog listing.
type ListShape int

const (
	// ListNone: the route is not a listing.
	ListNone ListShape = iota
	// ListOpenAIModels: {"object": "list", "data": [{"id", "object": "model", ...}]}.
	ListOpenAIModels
	// ListOllamaTags: {"models": [{"name", "model", "modified_at", ...}]}.
	ListOllamaTags
)

// ErrorShape is the JSON error body a family of clients reads.
type ErrorShape int

const (
	ErrorsOpenAI ErrorShape = iota
	ErrorsOllama
	ErrorsAnthropic
)

var (
	openAIStyles    = []Style{StyleOpenAI, StyleOllama}
	ollamaStyles    = []Style{StyleOllama}
	anthropicStyles = []Style{StyleAnthropic}
)

// responsesTools are the Responses tool types (openai-go's ToolUnionParam): the client
// executes functions, custom tools, the local shell, apply_patch, the computer actions and
// a shell in a local environment, and namespaces of functions and custom tools; OpenAI runs
// and bills web search (per call, the preview at its own price), file search (per call), the
// code interpreter (per container: priced per call here, an upper bound), image generation
// and remote MCP calls. Anything else (tool_search, programmatic_tool_calling, a shell in a
// container, a namespace holding anything but the client's tools...) is refused.
var responsesTools = &ToolRules{
	Client: []ToolType{{Name: "function"}, {Name: "custom"}, {Name: "local_shell"}, {Name: "apply_patch"},
		{Name: "computer_use_preview"}, {Name: "computer"}, {Name: "shell", Environment: "local"}},
	Groups: []string{"namespace"},
	Provider: []ProviderTool{
		{ToolType{Name: "web_search"}, "web_search", metering.ToolWebSearch},
		{ToolType{Name: "web_search_2025_08_26"}, "web_search", metering.ToolWebSearch},
		{ToolType{Name: "web_search_preview"}, "web_search_preview", metering.ToolWebSearch},
		{ToolType{Name: "web_search_preview_2025_03_11"}, "web_search_preview", metering.ToolWebSearch},
		{ToolType{Name: "file_search"}, "file_search", metering.ToolFileSearch},
		{ToolType{Name: "code_interpreter"}, "code_interpreter", metering.ToolCodeInterpreter},
		{ToolType{Name: "image_generation"}, "image_generation", metering.ToolImageGeneration},
		{ToolType{Name: "mcp"}, "mcp", metering.ToolMCP},
	},
	CallsField: "max_tool_calls",
}

// anthropicTools are the Messages tool types (anthropic-sdk-go's ToolUnionParam): the client
// executes custom tools (no type, or "custom") and the Anthropic-defined client tools (bash,
// text editor, memory, computer); Anthropic runs web search (billed per search) and web
// fetch (counted in usage; tokens only today, so an operator may price it 0). Code
// execution (billed per container hour, not counted in usage), the tool search tools and
// the toolsets are refused.
var anthropicTools = &ToolRules{
	Untyped: true,
	Client: []ToolType{{Name: "custom"}, {Name: "bash_", Dated: true}, {Name: "text_editor_", Dated: true},
		{Name: "memory_", Dated: true}, {Name: "computer_", Dated: true}},
	Provider: []ProviderTool{
		{ToolType{Name: "web_search_", Dated: true}, "web_search", metering.ToolWebSearch},
		{ToolType{Name: "web_fetch_", Dated: true}, "web_fetch", metering.ToolWebFetch},
	},
	PerToolField: "max_uses",
}

// CommonChecked are the members every route's folding check covers (model, max_price, the
// fields that reach the model and are counted in the input bound).
var CommonChecked = map[string][]string{
	"": {"model", "max_price", "stream", "system", "context", "suffix", "tools", "functions", "tool_choice",
		"response_format", "logprobs", "top_logprobs", "dimensions", "raw", "template", "format", "images", "options"},
}

// Surfaces are the routes the gateway serves, indexed by Format.
var Surfaces = [...]Surface{
	FormatOpenAIChat: {
		Name: "chat", Method: http.MethodPost, Path: "/v1/chat/completions",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: openAIStyles, Errors: ErrorsOpenAI,
		Prompt: "messages", PromptRule: PromptMessages,
		OutputFields: []string{"max_tokens", "max_completion_tokens"}, ChoiceFields: []string{"n", "best_of"},
		Streams: true, IncludeUsage: true,
		Checked: map[string][]string{
			"":               {"messages", "stream_options", "max_tokens", "max_completion_tokens", "n", "best_of"},
			"stream_options": {"include_usage"},
		},
	},
	FormatOpenAIEmbeddings: {
		Name: "embeddings", Method: http.MethodPost, Path: "/v1/embeddings",
		Scope: identity.ScopeEmbeddingsWrite, Kind: KindEmbeddings, Styles: openAIStyles, Errors: ErrorsOpenAI,
		Prompt: "input", PromptRule: PromptInput,
		Checked: map[string][]string{"": {"input"}},
	},
	FormatOllamaChat: {
		Name: "ollama_chat", Method: http.MethodPost, Path: "/api/chat",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: ollamaStyles, Errors: ErrorsOllama,
		Prompt: "messages", PromptRule: PromptMessages,
		OutputIn: "options", OutputFields: []string{"num_predict"},
		Streams: true, StreamDefault: true,
		Checked: map[string][]string{"": {"messages"}, "options": {"num_predict", "num_ctx"}},
	},
	FormatOllamaGenerate: {
		Name: "ollama_generate", Method: http.MethodPost, Path: "/api/generate",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: ollamaStyles, Errors: ErrorsOllama,
		Prompt: "prompt", PromptRule: PromptString,
		OutputIn: "options", OutputFields: []string{"num_predict"},
		Streams: true, StreamDefault: true,
		Checked: map[string][]string{"": {"prompt"}, "options": {"num_predict", "num_ctx"}},
	},
	FormatOpenAICompletions: {
		Name: "completions", Method: http.MethodPost, Path: "/v1/completions",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: []Style{StyleOpenAI}, Errors: ErrorsOpenAI,
		Prompt: "prompt", PromptRule: PromptTexts,
		OutputFields: []string{"max_tokens"}, ChoiceFields: []string{"n", "best_of"}, Batch: true, Echo: "echo",
		Streams: true, IncludeUsage: true,
		Checked: map[string][]string{
			"":               {"prompt", "stream_options", "max_tokens", "n", "best_of", "echo"},
			"stream_options": {"include_usage"},
		},
	},
	FormatOllamaEmbed: {
		Name: "ollama_embed", Method: http.MethodPost, Path: "/api/embed",
		Scope: identity.ScopeEmbeddingsWrite, Kind: KindEmbeddings, Styles: ollamaStyles, Errors: ErrorsOllama,
		Prompt: "input", PromptRule: PromptInput,
		Checked: map[string][]string{"": {"input"}},
	},
	FormatOllamaEmbeddings: {
		Name: "ollama_embeddings", Method: http.MethodPost, Path: "/api/embeddings",
		Scope: identity.ScopeEmbeddingsWrite, Kind: KindEmbeddings, Styles: ollamaStyles, Errors: ErrorsOllama,
		Prompt: "prompt", PromptRule: PromptString,
		Checked: map[string][]string{"": {"prompt"}},
	},
	FormatOpenAIModels: {
		Name: "models", Method: http.MethodGet, Path: "/v1/models", List: ListOpenAIModels,
		Scope: identity.ScopeModelsRead, Styles: []Style{StyleOpenAI, StyleOllama, StyleAnthropic}, Errors: ErrorsOpenAI,
	},
	FormatOllamaTags: {
		Name: "tags", Method: http.MethodGet, Path: "/api/tags", List: ListOllamaTags,
		Scope: identity.ScopeModelsRead, Kind: KindChat, Styles: ollamaStyles, Errors: ErrorsOllama,
	},
	FormatOpenAIResponses: {
		Name: "responses", Method: http.MethodPost, Path: "/v1/responses",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: []Style{StyleOpenAI}, Errors: ErrorsOpenAI,
		Prompt: "input", PromptRule: PromptInput,
		OutputFields: []string{"max_output_tokens"},
		Streams:      true,
		Follows:      "previous_response_id", Unmetered: []string{"background"},
		Checked: map[string][]string{
			"":        {"input", "instructions", "max_output_tokens", "previous_response_id", "background", "reasoning", "store", "max_tool_calls"},
			"tools[]": {"type", "environment"},
		},
		Tools: responsesTools,
		Stored: []StoredRoute{
			{Method: http.MethodGet, Query: []string{"include", "include[]"}},
			{Method: http.MethodDelete},
			{Method: http.MethodPost, Suffix: "/cancel"},
			{Method: http.MethodGet, Suffix: "/input_items", Query: []string{"after", "limit", "order", "include", "include[]"}},
		},
	},
	// Anthropic Messages: max_tokens is required (as Anthropic's API has it); thinking's
	// budget_tokens is part of max_tokens, so max_tokens bounds all output. Claude Code
	// sends ?beta=true.
	FormatAnthropicMessages: {
		Name: "messages", Method: http.MethodPost, Path: "/v1/messages",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: anthropicStyles, Errors: ErrorsAnthropic,
		Prompt: "messages", PromptRule: PromptMessages,
		OutputFields: []string{"max_tokens"}, OutputRequired: true,
		Streams: true, Usage: metering.DialectAnthropic,
		Checked: map[string][]string{"": {"messages", "max_tokens", "thinking"}, "tools[]": {"type", "max_uses"}},
		Query:   []string{"beta"},
		Tools:   anthropicTools,
	},
	FormatAnthropicCountTokens: {
		Name: "messages_count_tokens", Method: http.MethodPost, Path: "/v1/messages/count_tokens",
		Scope: identity.ScopeChatWrite, Kind: KindChat, Styles: anthropicStyles, Errors: ErrorsAnthropic,
		Prompt: "messages", PromptRule: PromptMessages, Free: true, Usage: metering.DialectAnthropic,
		Checked: map[string][]string{"": {"messages"}},
		Query:   []string{"beta"},
	},
}

// surfaceByPath indexes Surfaces by path.
var surfaceByPath = func() map[string]Format {
	m := map[string]Format{}
	for i := range Surfaces {
		m[Surfaces[i].Path] = Format(i)
	}
	return m
}()

// SurfaceAt returns the format of the route at path, if the gateway serves it.
func SurfaceAt(path string) (Format, bool) {
	f, ok := surfaceByPath[path]
	return f, ok
}

// Surface returns the description of format f.
func (f Format) Surface() *Surface { return &Surfaces[f] }

// Kind is the kind of model a request of this format needs.
func (f Format) Kind() Kind { return Surfaces[f].Kind }

// ServedBy reports whether a backend of style s accepts requests in format f.
func (f Format) ServedBy(s Style) bool {
	for _, st := range Surfaces[f].Styles {
		if st == s {
			return true
		}
	}
	return false
}
