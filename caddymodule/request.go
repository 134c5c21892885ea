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
)

var endpoints = map[string]endpoint{
	"/v1/chat/completions": epChat,
	"/v1/embeddings":       epEmbeddings,
	"/api/chat":            epOllamaChat,
	"/api/generate":        epOllamaGenerate,
	"/v1/models":           epModels,
	"/api/tags":            epTags,
}

// endpointNames are the endpoint metric label values.
var endpointNames = [...]string{"", "chat", "embeddings", "ollama_chat", "ollama_generate", "models", "tags"}

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
		var msgs []json.RawMessage
		if err := json.Unmarshal(f["messages"], &msgs); err != nil || len(msgs) == 0 {
			return nil, invalid("messages", "messages is required and must be a non-empty array")
		}
		for _, m := range msgs {
			if len(m) == 0 || m[0] != '{' {
				return nil, invalid("messages", "each message must be an object")
			}
		}
		prompt = f["messages"]
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
		field := "max_tokens"
		if _, ok := f["max_completion_tokens"]; ok {
			field = "max_completion_tokens"
		}
		n, err := outputBound(f[field], field, lim)
		if err != nil {
			return nil, err
		}
		inf.outputBound = n
		f[field] = jsonInt(n)
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

// body encodes the request for one backend, with the model renamed for it.
func (inf *inference) body(upstreamModel string) ([]byte, error) {
	inf.fields["model"], _ = json.Marshal(upstreamModel)
	return json.Marshal(inf.fields)
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

func jsonInt(n int64) json.RawMessage { return json.RawMessage(strconv.FormatInt(n, 10)) }
