package caddymodule

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// endpoint is a route the gateway serves itself.
type endpoint int

const (
	epNone endpoint = iota
	epChat
	epEmbeddings
	epOllamaChat
	epOllamaGenerate
	epModels
	epTags
	// The self-service API (selfservice.go).
	epAuthKeys // /v1/auth/keys
	epAuthKey  // /v1/auth/keys/{id}[/rotate]
	epCredits
	epUsage
)

var endpoints = map[string]endpoint{
	"/v1/chat/completions": epChat,
	"/v1/embeddings":       epEmbeddings,
	"/api/chat":            epOllamaChat,
	"/api/generate":        epOllamaGenerate,
	"/v1/models":           epModels,
	"/api/tags":            epTags,
	"/v1/auth/keys":        epAuthKeys,
	"/v1/credits":          epCredits,
	"/v1/usage":            epUsage,
}

// endpointNames are the endpoint metric label values.
var endpointNames = [...]string{"", "chat", "embeddings", "ollama_chat", "ollama_generate", "models", "tags",
	"auth_keys", "auth_key", "credits", "usage"}

func (e endpoint) String() string { return endpointNames[e] }

// method is the HTTP method of the endpoint.
func (e endpoint) method() string {
	if e == epModels || e == epTags {
		return http.MethodGet
	}
	return http.MethodPost
}

// scope is what a credential needs to call the endpoint.
func (e endpoint) scope() string {
	switch e {
	case epEmbeddings:
		return identity.ScopeEmbeddingsWrite
	case epModels, epTags:
		return identity.ScopeModelsRead
	default:
		return identity.ScopeChatWrite
	}
}

// format is the wire format of an inference endpoint.
func (e endpoint) format() routing.Format {
	switch e {
	case epEmbeddings:
		return routing.FormatOpenAIEmbeddings
	case epOllamaChat:
		return routing.FormatOllamaChat
	case epOllamaGenerate:
		return routing.FormatOllamaGenerate
	default:
		return routing.FormatOpenAIChat
	}
}

// inference is a parsed inference request body: the fields the gateway acts on, and all the
// others kept as they came so the body can be re-encoded for each backend.
type inference struct {
	format routing.Format
	model  string
	stream bool
	// clientWantsUsage: an OpenAI streaming client asked for the usage chunk itself.
	clientWantsUsage bool
	// outputBound is the most output tokens the backend may produce (sent to it).
	outputBound int64
	// inputEstimate is an upper-biased estimate of the prompt's tokens.
	inputEstimate int64
	maxPrice      credits.Amount
	fields        map[string]json.RawMessage
}

// requestLimits are the bounds a request body must respect.
type requestLimits struct {
	maxTokensDefault, maxTokensCap int64
}

// maxModelName bounds model names; longer ones are refused before any lookup.
const maxModelName = 256

// parseInference reads and checks an inference request body.
func parseInference(format routing.Format, body []byte, maxPriceHeader string, lim requestLimits) (*inference, error) {
	inf := &inference{format: format}
	if err := json.Unmarshal(body, &inf.fields); err != nil || inf.fields == nil {
		return nil, invalid("", "the request body must be a JSON object")
	}
	f := inf.fields
	if err := json.Unmarshal(f["model"], &inf.model); err != nil || inf.model == "" {
		return nil, invalid("model", "model is required and must be a string")
	}
	if err := checkModelName(inf.model); err != nil {
		return nil, err
	}

	// What the model reads, for the prompt estimate.
	var prompt json.RawMessage
	switch format {
	case routing.FormatOpenAIChat, routing.FormatOllamaChat:
		// The body is valid JSON already: an array whose first element is an object will do
		// here; the backend judges the messages themselves.
		msgs := bytes.TrimSpace(f["messages"])
		if len(msgs) < 2 || msgs[0] != '[' || bytes.TrimSpace(msgs[1:])[0] != '{' {
			return nil, invalid("messages", "messages is required and must be a non-empty array of objects")
		}
		prompt = msgs
	case routing.FormatOllamaGenerate:
		var p string
		if err := json.Unmarshal(f["prompt"], &p); err != nil {
			return nil, invalid("prompt", "prompt is required and must be a string")
		}
		prompt = f["prompt"]
	case routing.FormatOpenAIEmbeddings:
		in := bytes.TrimSpace(f["input"])
		if len(in) == 0 || (in[0] != '"' && in[0] != '[') || bytes.Equal(in, []byte("[]")) || bytes.Equal(in, []byte(`""`)) {
			return nil, invalid("input", "input is required: a string or a non-empty array")
		}
		prompt = in
	}
	inf.inputEstimate = int64(len(prompt))/3 + 1

	// Streaming: OpenAI defaults to off, Ollama to on.
	inf.stream = format == routing.FormatOllamaChat || format == routing.FormatOllamaGenerate
	if raw, ok := f["stream"]; ok && !isNull(raw) {
		if err := json.Unmarshal(raw, &inf.stream); err != nil {
			return nil, invalid("stream", "stream must be a boolean")
		}
	}
	if format == routing.FormatOpenAIEmbeddings {
		inf.stream = false
	}

	// The output bound, given or defaulted, always sent on to the backend.
	switch format {
	case routing.FormatOpenAIChat:
		// max_completion_tokens (newer) or max_tokens: the tighter of those given bounds the
		// output, and every one given is sent as that bound, so no backend reads a larger one.
		inf.outputBound = 0
		for _, field := range []string{"max_tokens", "max_completion_tokens"} {
			if raw, ok := f[field]; ok && !isNull(raw) {
				n, err := outputBound(raw, field, lim)
				if err != nil {
					return nil, err
				}
				if inf.outputBound == 0 || n < inf.outputBound {
					inf.outputBound = n
				}
			}
		}
		if inf.outputBound == 0 {
			inf.outputBound = lim.maxTokensDefault
			f["max_tokens"] = jsonInt(inf.outputBound)
		}
		for _, field := range []string{"max_tokens", "max_completion_tokens"} {
			if raw, ok := f[field]; ok && !isNull(raw) {
				f[field] = jsonInt(inf.outputBound)
			}
		}
		if inf.stream {
			var so map[string]json.RawMessage
			if raw, ok := f["stream_options"]; ok && !isNull(raw) {
				if err := json.Unmarshal(raw, &so); err != nil {
					return nil, invalid("stream_options", "stream_options must be an object")
				}
			}
			if so == nil {
				so = map[string]json.RawMessage{}
			}
			var want bool
			_ = json.Unmarshal(so["include_usage"], &want)
			inf.clientWantsUsage = want
			so["include_usage"] = json.RawMessage("true")
			f["stream_options"], _ = json.Marshal(so)
		}
	case routing.FormatOllamaChat, routing.FormatOllamaGenerate:
		var opts map[string]json.RawMessage
		if raw, ok := f["options"]; ok && !isNull(raw) {
			if err := json.Unmarshal(raw, &opts); err != nil {
				return nil, invalid("options", "options must be an object")
			}
		}
		if opts == nil {
			opts = map[string]json.RawMessage{}
		}
		n, err := outputBound(opts["num_predict"], "options.num_predict", lim)
		if err != nil {
			return nil, err
		}
		inf.outputBound = n
		opts["num_predict"] = jsonInt(n)
		f["options"], _ = json.Marshal(opts)
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
func (inf *inference) body(upstreamModel string) ([]byte, error) {
	model, err := json.Marshal(upstreamModel)
	if err != nil {
		return nil, err
	}
	inf.fields["model"] = model
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
	return append(out, '}'), nil
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
