// Package mockbackend is a MOCK model backend for tests and for the demo (`make run`). It is a
// Caddy HTTP handler that answers like an OpenAI-compatible server and like Ollama, with
// deterministic token counts, injectable faults and a per-path request counter. It runs no model:
// the "generated" text is the words tok1, tok2, ... and every word is one token.
//
// The gateway's tests rely on the exact counts documented on MockBackend's fields.
package mockbackend

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(MockBackend{})
	httpcaddyfile.RegisterHandlerDirective("llm_mock_backend", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("llm_mock_backend", httpcaddyfile.Before, "respond")
}

// Defaults and bounds of the configuration.
const (
	defaultName             = "mock"
	defaultCompletionTokens = 16
	defaultChunks           = 4
	defaultDimensions       = 8

	// maxCompletionTokens, maxChunks and maxDimensions bound what a config or an X-Mock-*
	// header can ask for, so that a request cannot make the mock allocate without limit.
	maxCompletionTokens = 100_000
	maxChunks           = 10_000
	maxDimensions       = 65_536

	// maxChoices is the largest n of a chat completion, as OpenAI's; maxGeneratedTokens
	// bounds n × completion tokens, the words one answer carries.
	maxChoices         = 128
	maxGeneratedTokens = 1_000_000

	// maxBodyBytes is the largest request body the mock reads; larger bodies get 413.
	maxBodyBytes = 10 << 20
)

// defaultModels are the models listed when Models is empty.
var defaultModels = []string{"mock-small", "mock-large"}

// Fault is a failure the mock injects on purpose.
type Fault string

// The faults a MockBackend can inject.
const (
	// FaultNone injects nothing. "none" is accepted as a synonym, so that an X-Mock-Fault
	// header can switch off a fault set in the config.
	FaultNone Fault = ""
	// FaultRefuse closes the connection without any response.
	FaultRefuse Fault = "refuse"
	// FaultError answers 500 with a JSON error.
	FaultError Fault = "error"
	// FaultStall never sends headers: the handler blocks until the request's context is done.
	FaultStall Fault = "stall"
	// FaultCut starts the response and aborts the connection halfway: a stream gets the first
	// chunks/2 (rounded down) content messages and neither the final message, the usage
	// chunk nor [DONE]; a JSON answer gets its first half (of a correct Content-Length).
	FaultCut Fault = "cut"
	// FaultTruncate is a fault that looks like success: the response ends properly but its
	// content is cut. A JSON answer is 200 with the first half of its JSON (so it does not
	// parse) and a Content-Length of exactly what is sent; a stream gets the same first
	// chunks/2 content messages as with FaultCut, then ends cleanly (the end of the chunked
	// body, no abort) without the final message, the usage chunk or [DONE].
	FaultTruncate Fault = "truncate"

	faultNoneAlias Fault = "none"
)

// MockBackend is a MOCK model backend, for tests and the demo only. It serves:
//
//	POST /v1/chat/completions   OpenAI chat completions, JSON or SSE (stream: true)
//	POST /v1/completions        OpenAI legacy completions, JSON or SSE (stream: true)
//	POST /v1/embeddings         OpenAI embeddings
//	POST /v1/responses          OpenAI Responses, JSON or SSE, stored (see openai_responses.go),
//	GET|DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel,
//	GET  /v1/responses/{id}/input_items   the stored responses (counted as "/v1/responses/{id}")
//	GET  /v1/models             OpenAI model list
//	POST /api/chat              Ollama chat, NDJSON unless stream: false
//	POST /api/generate          Ollama generate, NDJSON unless stream: false
//	POST /api/embed             Ollama embeddings, with prompt_eval_count
//	POST /api/embeddings        Ollama's older embeddings: no usage, as Ollama answers
//	POST /v1/messages           Anthropic Messages, JSON or SSE (stream: true); anthropic.go
//	POST /v1/messages/count_tokens  Anthropic token counting
//	GET  /api/tags              Ollama model list
//	GET  /mock/stats            {"name": ..., "requests": {path: count},
//	                             "chunks_sent": {path: count}}; DELETE resets both (204)
//
// It is a terminal handler: it never calls the next handler, and answers 404 (JSON) for
// other paths. The stats count every request received, whatever its answer (a refused
// one too), under its path for the model paths and under "other" for the rest;
// requests to /mock/stats are not counted. chunks_sent counts, per path, the stream
// messages (SSE events, [DONE] included, and NDJSON lines) actually written and flushed:
// a stream stops at the first message after its client went away (the request's context
// ends), so a test can prove that a disconnect stopped the generation.
//
// Token counts are deterministic, and the gateway's tests rely on them:
//
//   - Prompt tokens are the number of whitespace-separated words in all message contents
//     (chat; a content is a string or an array of parts, of which only {"type":"text"}
//     parts count; roles do not count), in the prompt (generate, legacy completions, whose
//     token id arrays count one token per id), or in all inputs (embeddings, embed); at
//     least 1.
//   - Completion tokens are CompletionTokens, capped by the request's max_tokens or
//     max_completion_tokens (OpenAI; the smaller when both are given) or options.num_predict
//     (Ollama) when that is positive. When the cap applies, finish_reason / done_reason is
//     "length", else "stop".
//   - The generated text is that many words, "tok1 tok2 ... tokN": one word is one token.
//     A stream splits it over Chunks content messages as evenly as possible, the first
//     messages taking one word more when it does not divide (10 words in 4 chunks: 3,3,2,2;
//     2 words in 4 chunks: 1,1,0,0). The concatenated contents equal the non-stream text.
//   - An OpenAI chat completion honours n (default 1, from 1 to 128, else 400
//     invalid_request): n choices (index 0 to n-1), each the same text of the completion
//     tokens above, so usage.completion_tokens is n × that count. A stream sends, for each of
//     the Chunks steps, one message per choice in index order (n × Chunks content messages,
//     each choice's last one with its finish_reason); the pause of ChunkInterval comes
//     before each step, not between the messages of a step. n × completion tokens is at
//     most 1000000 (else 400).
//   - A legacy completion (/v1/completions) is the same with choices[].text, n choices per
//     prompt of an array of prompts (index i × n + j); max_tokens caps it. With echo: true
//     each choice's text starts with its prompt (not counted in completion_tokens).
//   - The usage is the last member of every JSON answer and stream message that carries
//     it (OpenAI's "usage", Ollama's counters ending with eval_count and eval_duration), as
//     real servers put it: a reader may look for it in the tail of a large answer.
//
// Responses echo the request's model. Every request may override the config with headers
// (a mock only; a real backend has nothing like them):
//
//	X-Mock-Fault              refuse, error, stall, cut, truncate, or none
//	X-Mock-Latency            a duration, e.g. 250ms
//	X-Mock-Chunks             a positive integer
//	X-Mock-Completion-Tokens  a positive integer
//	X-Mock-Chunk-Interval     a duration
//	X-Mock-Compress           gzip, deflate, or none
//	X-Mock-Cached-Tokens      a count (prompt tokens reported as read from a cache)
//	X-Mock-Cache-Write-Tokens a count (prompt tokens reported as written to a cache)
//	X-Mock-Reasoning-Tokens   a count (output tokens reported as reasoning)
//
// X-Mock-Compress makes the mock compress its answer, as a faulty backend would, whatever
// the request's Accept-Encoding says (identity included): the body of every answer of the
// model endpoints once the X-Mock-* headers are read (JSON answers, their errors and
// the injected error fault, SSE and NDJSON) is gzip (RFC 1952) or
// deflate (the zlib format, RFC 1950, as HTTP's "deflate" means) with Content-Encoding set,
// and a JSON answer's Content-Length is that of the compressed body. A stream flushes the
// compressor after every message, so each one can be decoded as it arrives; the cut fault
// aborts within the compressed stream, and truncate compresses the truncated content.
// There is no config field for it.
//
// A header with a bad value answers 400. Faults and latency apply to the nine model
// endpoints, never to /mock/stats. A request body over 10 MiB answers 413
// request_too_large. Errors have OpenAI's shape on /v1 paths and Ollama's on /api paths.
type MockBackend struct {
	// Name keys the request counter of GET /mock/stats. Counters live in the process, not
	// in the config, so they survive config reloads; two mocks with the same name share
	// them. Default: "mock".
	Name string `json:"name,omitempty"`

	// Models are the model names listed by GET /v1/models and GET /api/tags. When set, only
	// these are accepted and any other model gets 404 model_not_found. When empty, the mock
	// lists "mock-small" and "mock-large" and accepts any model name.
	Models []string `json:"models,omitempty"`

	// CompletionTokens is how many tokens a completion has: the words "tok1 tok2 ... tokN",
	// one word one token. The request's max_tokens or max_completion_tokens (OpenAI) or
	// options.num_predict (Ollama) caps it when positive, and the answer then says
	// "length" instead of "stop". X-Mock-Completion-Tokens overrides it. At most 100000.
	// Default: 16.
	CompletionTokens int `json:"completion_tokens,omitempty"`

	// Chunks is how many content messages a stream (SSE or NDJSON) carries, not counting
	// Ollama's final done message, the OpenAI usage chunk and [DONE]. The words are split
	// as evenly as possible, the first messages one word longer. X-Mock-Chunks overrides
	// it. At most 10000. Default: 4.
	Chunks int `json:"chunks,omitempty"`

	// ChunkInterval is the pause before each stream message after the first (content
	// messages, Ollama's done message and the OpenAI usage chunk; [DONE] follows the last
	// message at once). X-Mock-Chunk-Interval overrides it. Default: 0, no pause.
	ChunkInterval caddy.Duration `json:"chunk_interval,omitempty"`

	// Latency is how long the mock waits, after reading the request body, before it sends
	// the response headers. X-Mock-Latency overrides it. Default: 0, no wait.
	Latency caddy.Duration `json:"latency,omitempty"`

	// Dimensions is the length of each embedding vector. Vectors are deterministic: the
	// same input text always gives the same unit-length vector. At most 65536. Default: 8.
	Dimensions int `json:"dimensions,omitempty"`

	// Fault is the failure injected into every model request: "" (or "none") for none,
	// "refuse", "error", "stall", "cut" or "truncate"; see the Fault constants. X-Mock-Fault overrides
	// it. Default: none.
	Fault Fault `json:"fault,omitempty"`

	// CacheReadTokens and CacheWriteTokens are the cache_read_input_tokens and
	// cache_creation_input_tokens of every Anthropic Messages answer (anthropic.go);
	// X-Mock-Cached-Tokens and X-Mock-Cache-Write-Tokens override them. Default: 0.
	CacheReadTokens  int `json:"cache_read_tokens,omitempty"`
	CacheWriteTokens int `json:"cache_write_tokens,omitempty"`

	// ToolCalls is how many calls of each provider tool a request names the mock makes, at
	// most the request's bound (Anthropic's max_uses per tool, Responses' max_tool_calls):
	// Anthropic web_search_* and web_fetch_* tools are reported in usage.server_tool_use,
	// Responses web_search* tools as web_search_call output items (tools.go). Default: 0.
	ToolCalls int `json:"tool_calls,omitempty"`

	// APIKey, when set, is the x-api-key every model path wants (401 without it), as
	// Anthropic's API does. Default: none checked.
	APIKey string `json:"api_key,omitempty"`
	// AnthropicVersion, when set, is the anthropic-version the Anthropic paths want (400
	// without it). Default: none checked.
	AnthropicVersion string `json:"anthropic_version,omitempty"`

	// ToolUse, when set, makes Messages and Responses answers call a tool as a model does
	// (anthropic.go, openai_responses.go): a request that offers a tool of this name and
	// carries no tool result yet (tool_result block, function_call_output item) is answered
	// with one call of it with ToolInput (a tool_use block, stop_reason "tool_use"; a
	// function_call item); the request that brings the result back is answered with text as
	// usual. Default: none.
	ToolUse string `json:"tool_use,omitempty"`
	// ToolInput is the JSON object a ToolUse call passes. Default: {}.
	ToolInput json.RawMessage `json:"tool_input,omitempty"`

	listed   []string        // the models listed
	accepted map[string]bool // the models accepted; nil accepts any
	requests *requestCounter
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (MockBackend) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_mock_backend",
		New: func() caddy.Module { return new(MockBackend) },
	}
}

// Provision sets the defaults and attaches the request counter of the mock's name.
func (m *MockBackend) Provision(ctx caddy.Context) error {
	m.logger = ctx.Logger()
	if m.Name == "" {
		m.Name = defaultName
	}
	if m.CompletionTokens == 0 {
		m.CompletionTokens = defaultCompletionTokens
	}
	if m.Chunks == 0 {
		m.Chunks = defaultChunks
	}
	if m.Dimensions == 0 {
		m.Dimensions = defaultDimensions
	}
	if m.Fault == faultNoneAlias {
		m.Fault = FaultNone
	}
	m.listed, m.accepted = defaultModels, nil
	if len(m.Models) > 0 {
		m.listed = m.Models
		m.accepted = make(map[string]bool, len(m.Models))
		for _, name := range m.Models {
			m.accepted[name] = true
		}
	}
	m.requests = requestCounterFor(m.Name)
	return nil
}

// Validate rejects negative or oversized numbers and durations, empty model names and
// unknown faults.
func (m *MockBackend) Validate() error {
	for _, check := range []error{
		checkCount("completion_tokens", m.CompletionTokens, maxCompletionTokens),
		checkCount("chunks", m.Chunks, maxChunks),
		checkCount("dimensions", m.Dimensions, maxDimensions),
		checkCount("cache_read_tokens", m.CacheReadTokens, maxCompletionTokens),
		checkCount("cache_write_tokens", m.CacheWriteTokens, maxCompletionTokens),
		checkDuration("chunk_interval", time.Duration(m.ChunkInterval)),
		checkDuration("latency", time.Duration(m.Latency)),
		checkFault(m.Fault),
	} {
		if check != nil {
			return check
		}
	}
	for _, name := range m.Models {
		if name == "" {
			return errors.New("models: empty model name")
		}
	}
	return checkToolInput(m.ToolInput)
}

// checkToolInput rejects a tool input that is not a JSON object.
func checkToolInput(input json.RawMessage) error {
	if len(input) == 0 {
		return nil
	}
	var obj map[string]any
	if err := json.Unmarshal(input, &obj); err != nil || obj == nil {
		return fmt.Errorf("tool_input: not a JSON object: %s", input)
	}
	return nil
}

func checkCount(field string, n, limit int) error {
	if n < 0 {
		return fmt.Errorf("%s: %d is negative", field, n)
	}
	if n > limit {
		return fmt.Errorf("%s: %d is more than %d", field, n, limit)
	}
	return nil
}

func checkDuration(field string, d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("%s: %s is negative", field, d)
	}
	return nil
}

func checkFault(f Fault) error {
	switch f {
	case FaultNone, faultNoneAlias, FaultRefuse, FaultError, FaultStall, FaultCut, FaultTruncate:
		return nil
	}
	return fmt.Errorf("fault: unknown fault %q (want refuse, error, stall, cut, truncate or none)", string(f))
}

// ServeHTTP answers the request as the mock backend; it never calls next.
func (m *MockBackend) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	start := time.Now()
	if r.URL.Path == statsPath {
		m.serveStats(w, r)
		return nil
	}
	m.requests.add(statsPathOf(r.URL.Path))

	ep, ok := endpoints[r.URL.Path]
	if !ok {
		ep, ok = storedResponseRoute(r.URL.Path, r.Method)
	}
	if !ok {
		writeError(w, styleOpenAI, http.StatusNotFound, "not_found",
			fmt.Sprintf("mock backend: no route for %s %s", r.Method, r.URL.Path))
		return nil
	}
	if r.Method != ep.method {
		w.Header().Set("Allow", ep.method)
		writeError(w, ep.style, http.StatusMethodNotAllowed, "method_not_allowed",
			fmt.Sprintf("mock backend: %s takes %s, not %s", r.URL.Path, ep.method, r.Method))
		return nil
	}
	if !m.authorized(w, r, ep) {
		return nil
	}
	set, err := m.settingsFor(r.Header)
	if err != nil {
		writeError(w, ep.style, http.StatusBadRequest, "invalid_request", err.Error())
		return nil
	}
	if set.fault != FaultNone {
		m.logger.Debug("mock backend injects a fault",
			zap.String("name", m.Name), zap.String("fault", string(set.fault)), zap.String("path", r.URL.Path))
	}
	if set.fault == FaultRefuse {
		abortConnection()
	}

	var body []byte
	if r.Method == http.MethodPost {
		if body, err = readBody(w, r); err != nil {
			var tooLarge *http.MaxBytesError
			if errors.As(err, &tooLarge) {
				writeEncoded(w, http.StatusRequestEntityTooLarge, set.compress, errorJSON(ep.style,
					http.StatusRequestEntityTooLarge, "request_too_large",
					fmt.Sprintf("mock backend: request body exceeds %d bytes", maxBodyBytes)))
			}
			return nil // otherwise the client went away while sending
		}
	}
	if !sleep(r.Context(), set.latency) {
		return nil
	}
	switch set.fault {
	case FaultStall:
		<-r.Context().Done()
		return nil
	case FaultError:
		writeEncoded(w, http.StatusInternalServerError, set.compress, errorJSON(ep.style,
			http.StatusInternalServerError, "mock_fault", "mock backend: injected fault \"error\""))
		return nil
	}

	x := &exchange{
		mock:  m,
		w:     w,
		r:     r,
		rc:    http.NewResponseController(w),
		style: ep.style,
		set:   set,
		body:  body,
		start: start,
		ready: time.Now(),
	}
	ep.serve(x)
	x.endStream()
	return nil
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(MockBackend)
	if err := m.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return m, nil
}

// UnmarshalCaddyfile sets up the mock from Caddyfile tokens. Syntax:
//
//	llm_mock_backend [<matcher>] {
//	    name              <name>
//	    models            <names...>
//	    completion_tokens <n>
//	    chunks            <n>
//	    chunk_interval    <duration>
//	    latency           <duration>
//	    dimensions        <n>
//	    fault             refuse|error|stall|cut|truncate|none
//	    cache_read_tokens  <n>
//	    cache_write_tokens <n>
//	    api_key           <key>
//	    anthropic_version <version>
//	    tool_use          <name> [<input JSON object>]
//	}
//
// Each subdirective sets the JSON field of the same name, at most once (tool_use sets
// ToolUse and ToolInput; quote the JSON with backticks); the block may be left out to take
// every default.
func (m *MockBackend) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}

	seen := make(map[string]bool)
	for d.NextBlock(0) {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s already specified", sub)
		}
		seen[sub] = true

		switch sub {
		case "models":
			m.Models = d.RemainingArgs()
			if len(m.Models) == 0 {
				return d.ArgErr()
			}

		case "name":
			if !d.AllArgs(&m.Name) {
				return d.ArgErr()
			}

		case "api_key":
			if !d.AllArgs(&m.APIKey) {
				return d.ArgErr()
			}

		case "anthropic_version":
			if !d.AllArgs(&m.AnthropicVersion) {
				return d.ArgErr()
			}

		case "tool_use":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 || args[0] == "" {
				return d.ArgErr()
			}
			m.ToolUse = args[0]
			if len(args) == 2 {
				m.ToolInput = json.RawMessage(args[1])
			}
			if err := checkToolInput(m.ToolInput); err != nil {
				return d.WrapErr(err)
			}

		case "completion_tokens", "chunks", "dimensions", "cache_read_tokens", "cache_write_tokens", "tool_calls":
			var arg string
			if !d.AllArgs(&arg) {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(arg)
			if err != nil {
				return d.Errf("bad %s number '%s': %v", sub, arg, err)
			}
			var limit int
			switch sub {
			case "completion_tokens":
				m.CompletionTokens, limit = n, maxCompletionTokens
			case "chunks":
				m.Chunks, limit = n, maxChunks
			case "dimensions":
				m.Dimensions, limit = n, maxDimensions
			case "cache_read_tokens":
				m.CacheReadTokens, limit = n, maxCompletionTokens
			case "cache_write_tokens":
				m.CacheWriteTokens, limit = n, maxCompletionTokens
			case "tool_calls":
				m.ToolCalls, limit = n, maxCompletionTokens
			}
			if err := checkCount(sub, n, limit); err != nil {
				return d.WrapErr(err)
			}

		case "chunk_interval", "latency":
			var arg string
			if !d.AllArgs(&arg) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(arg)
			if err != nil {
				return d.Errf("bad %s duration '%s': %v", sub, arg, err)
			}
			if err := checkDuration(sub, dur); err != nil {
				return d.WrapErr(err)
			}
			if sub == "latency" {
				m.Latency = caddy.Duration(dur)
			} else {
				m.ChunkInterval = caddy.Duration(dur)
			}

		case "fault":
			var arg string
			if !d.AllArgs(&arg) {
				return d.ArgErr()
			}
			m.Fault = Fault(arg)
			if err := checkFault(m.Fault); err != nil {
				return d.WrapErr(err)
			}

		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*MockBackend)(nil)
	_ caddy.Validator             = (*MockBackend)(nil)
	_ caddyhttp.MiddlewareHandler = (*MockBackend)(nil)
	_ caddyfile.Unmarshaler       = (*MockBackend)(nil)
)
