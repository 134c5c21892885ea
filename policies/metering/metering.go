// Package metering reads the token usage that model backends report, out of their responses,
// while the bytes pass through to the client.
//
// A non-streaming response is one JSON document: UsageFromJSON reads its usage and
// AppendFields adds members to it. A streaming response (OpenAI server-sent events or Ollama
// NDJSON) goes through a StreamMeter, which writes every complete event on as soon as it is
// complete, holding back only an incomplete one, and rewrites or drops just the message that
// carries the usage. Nothing here buffers a whole stream.
//
// Counts come from the backend as it reports them: an explicit zero is a zero, and a missing,
// negative, fractional or absurd count is no usage at all, so that the caller settles by its own
// policy instead of billing nothing.
package metering

// Usage is the token usage of one request as the backend reported it.
//
// InputTokens counts every prompt token, cache reads and cache writes included;
// CachedInputTokens and CacheWriteTokens are the parts of it read from and written to the
// provider's prompt cache (never more than InputTokens together: a report claiming more is
// cut to it). OutputTokens counts every output token; ReasoningTokens is the part of it that
// is reasoning (billed as output). ResponseID is the id of a response the backend stored.
type Usage struct {
	InputTokens, OutputTokens           int64
	CachedInputTokens, CacheWriteTokens int64
	ReasoningTokens                     int64
	ResponseID                          string
	// ToolCalls are the calls of the provider's own tools the answer reports, by counter
	// (tools.go): what the provider bills beyond tokens.
	ToolCalls ToolCalls
}

// normal is u with its parts within their wholes: cache reads, then cache writes, within the
// input; reasoning within the output.
func (u Usage) normal() Usage {
	u.CachedInputTokens = min(u.CachedInputTokens, u.InputTokens)
	u.CacheWriteTokens = min(u.CacheWriteTokens, u.InputTokens-u.CachedInputTokens)
	u.ReasoningTokens = min(u.ReasoningTokens, u.OutputTokens)
	return u
}

// Format is the shape of a backend response body. The zero Format is none of them.
type Format int

// The response formats.
const (
	// JSON is one JSON document (a non-streaming response).
	JSON Format = iota + 1
	// SSE is an OpenAI chat completions stream: text/event-stream.
	SSE
	// NDJSON is an Ollama stream: application/x-ndjson, one JSON object per line.
	NDJSON
)

// Dialect is the family of usage reports an API surface's answers carry: how a JSON answer's
// usage and a stream's events are read.
type Dialect int

// The usage dialects.
const (
	// DialectOpenAI: OpenAI's "usage" (chat and legacy completions, embeddings) and Ollama's
	// prompt_eval_count and eval_count; SSE chunks with "choices", NDJSON lines with "done".
	DialectOpenAI Dialect = iota
	// DialectAnthropic: Anthropic Messages (anthropic.go): "usage" with input_tokens,
	// output_tokens, cache_creation_input_tokens, cache_read_input_tokens; SSE events
	// message_start, content_block_delta, message_delta and message_stop.
	DialectAnthropic
)

// UsageFromJSON reads the usage out of a whole JSON answer of dialect d.
func (d Dialect) UsageFromJSON(body []byte) (Usage, bool) {
	if d == DialectAnthropic {
		return anthropicUsageFromJSON(body)
	}
	return UsageFromJSON(body)
}

// MaxTokens bounds every token count the meter accepts: a larger count is not believed.
const MaxTokens = 1_000_000_000_000

// UsageFromJSON reads the usage out of a whole JSON response body:
//
//   - OpenAI chat completions and embeddings: "usage": {"prompt_tokens", "completion_tokens"};
//     prompt_tokens is required, a missing completion_tokens (embeddings) counts 0.
//   - Ollama /api/chat, /api/generate, /api/embed: top-level "prompt_eval_count" and
//     "eval_count"; Ollama omits a count that is zero, so one of the two is enough and the
//     other counts 0.
//   - OpenAI Responses (top-level "object": "response"): "usage": {"input_tokens",
//     "output_tokens", and their details}, with the response's "id" as ResponseID (see
//     responses.go).
//
// It returns ok=false when body is not one valid JSON object, when no usage is present, or when
// a count is negative, not an integer, or above MaxTokens. An explicit zero is a real zero.
func UsageFromJSON(body []byte) (Usage, bool) {
	var openai, prompt, eval, object []byte
	it := topObject(body)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "object"):
			object = v
		case keyIs(k, "usage"):
			openai = v
		case keyIs(k, "prompt_eval_count"):
			prompt = v
		case keyIs(k, "eval_count"):
			eval = v
		}
	}
	if !it.ok() {
		return Usage{}, false
	}
	if string(object) == `"response"` { // OpenAI Responses (responses.go)
		u, ok, _ := responseObject(body)
		return u, ok
	}
	if isObject(openai) {
		return openAIUsage(openai)
	}
	return ollamaUsage(prompt, eval)
}

// openAIUsage reads an OpenAI usage object, with its prompt_tokens_details.cached_tokens and
// completion_tokens_details.reasoning_tokens when given (a malformed detail is no detail:
// the whole counts are what is billed).
func openAIUsage(v []byte) (Usage, bool) {
	var prompt, completion, promptDetails, completionDetails []byte
	it := objectOf(v)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "prompt_tokens"):
			prompt = v
		case keyIs(k, "completion_tokens"):
			completion = v
		case keyIs(k, "prompt_tokens_details"):
			promptDetails = v
		case keyIs(k, "completion_tokens_details"):
			completionDetails = v
		}
	}
	in, ok := tokenCount(prompt)
	if !ok || isAbsent(prompt) {
		return Usage{}, false
	}
	out, ok := tokenCount(completion)
	if !ok {
		return Usage{}, false
	}
	u := Usage{InputTokens: in, OutputTokens: out}
	u.CachedInputTokens = detailCount(promptDetails, "cached_tokens")
	u.ReasoningTokens = detailCount(completionDetails, "reasoning_tokens")
	return u.normal(), true
}

// detailCount is the count named name in the details object v, 0 when v is not an object or
// the count is absent or not a valid count.
func detailCount(v []byte, name string) int64 {
	if !isObject(v) {
		return 0
	}
	it := objectOf(v)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		if keyIs(k, name) {
			if n, ok := tokenCount(v); ok {
				return n
			}
			return 0
		}
	}
	return 0
}

// ollamaUsage reads Ollama's prompt_eval_count and eval_count values.
func ollamaUsage(prompt, eval []byte) (Usage, bool) {
	if isAbsent(prompt) && isAbsent(eval) {
		return Usage{}, false
	}
	in, ok1 := tokenCount(prompt)
	out, ok2 := tokenCount(eval)
	if !ok1 || !ok2 {
		return Usage{}, false
	}
	return Usage{InputTokens: in, OutputTokens: out}, true
}

// tokenCount reads a raw JSON value as a token count. An absent value (nil or null) is 0.
func tokenCount(v []byte) (int64, bool) {
	if isAbsent(v) {
		return 0, true
	}
	if len(v) == 0 || len(v) > len("1000000000000") {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	if n > MaxTokens || (len(v) > 1 && v[0] == '0') {
		return 0, false
	}
	return n, true
}

func isAbsent(v []byte) bool { return v == nil || string(v) == "null" }

func isObject(v []byte) bool { return len(v) > 0 && v[0] == '{' }

// AppendFields returns a copy of the JSON object obj with the raw JSON members fields (such as
// `"credits_charged":0.12,"credits_remaining":3`, without surrounding braces or commas)
// inserted before its closing brace, after a comma unless the object is empty. Whitespace after
// the closing brace, such as a final newline, is kept. obj is not otherwise checked: it must be
// a valid object. When obj does not end with '}', AppendFields returns obj unchanged and false;
// when fields is empty, obj and true.
func AppendFields(obj []byte, fields []byte) ([]byte, bool) {
	end := lastNonSpace(obj)
	if end < 0 || obj[end] != '}' {
		return obj, false
	}
	prev := lastNonSpace(obj[:end])
	if prev < 0 {
		return obj, false
	}
	if len(fields) == 0 {
		return obj, true
	}
	return insertFields(obj, end, obj[prev] == '{', fields), true
}

// insertFields returns a new slice: b with fields inserted at index at (the closing brace of
// an object), preceded by a comma unless the object is empty.
func insertFields(b []byte, at int, empty bool, fields []byte) []byte {
	out := make([]byte, 0, len(b)+1+len(fields))
	out = append(out, b[:at]...)
	if !empty {
		out = append(out, ',')
	}
	out = append(out, fields...)
	return append(out, b[at:]...)
}
