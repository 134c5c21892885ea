package mockbackend

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// apiStyle is the API a path speaks; it decides the shape of errors.
type apiStyle int

const (
	styleOpenAI    apiStyle = iota // {"error": {"message", "type", "param", "code"}}
	styleOllama                    // {"error": "message"}
	styleAnthropic                 // {"type": "error", "error": {"type", "message"}} (anthropic.go)
)

// endpoint is one path the mock serves.
type endpoint struct {
	method string
	style  apiStyle
	serve  func(*exchange)
}

var endpoints = map[string]endpoint{
	"/v1/chat/completions": {http.MethodPost, styleOpenAI, serveChatCompletions},
	"/v1/completions":      {http.MethodPost, styleOpenAI, serveCompletions},
	"/v1/embeddings":       {http.MethodPost, styleOpenAI, serveEmbeddings},
	"/v1/models":           {http.MethodGet, styleOpenAI, serveModels},
	"/v1/responses":        {http.MethodPost, styleOpenAI, serveResponses},
	"/api/chat":            {http.MethodPost, styleOllama, serveOllamaChat},
	"/api/generate":        {http.MethodPost, styleOllama, serveOllamaGenerate},
	"/api/embed":           {http.MethodPost, styleOllama, serveOllamaEmbed},
	"/api/embeddings":      {http.MethodPost, styleOllama, serveOllamaEmbeddings},
	"/api/tags":            {http.MethodGet, styleOllama, serveOllamaTags},
}

// settings are a request's effective configuration: the config, overridden by X-Mock-*
// headers.
type settings struct {
	fault            Fault
	latency          time.Duration
	chunkInterval    time.Duration
	chunks           int
	completionTokens int
	compress         string // "gzip", "deflate" or "" for none
	// cachedTokens, cacheWriteTokens and reasoningTokens are the token kinds the usage
	// reports (X-Mock-Cached-Tokens, X-Mock-Cache-Write-Tokens, X-Mock-Reasoning-Tokens): the
	// parts of the prompt read from and written to a prompt cache, and of the output that is
	// reasoning, each cut to what the prompt or the output has. Default 0: none reported.
	cachedTokens, cacheWriteTokens, reasoningTokens int
}

// settingsFor applies the X-Mock-* headers of a request to the config.
func (m *MockBackend) settingsFor(h http.Header) (settings, error) {
	set := settings{
		fault:            m.Fault,
		latency:          time.Duration(m.Latency),
		chunkInterval:    time.Duration(m.ChunkInterval),
		chunks:           m.Chunks,
		completionTokens: m.CompletionTokens,
	}
	if v := h.Get("X-Mock-Fault"); v != "" {
		f := Fault(v)
		if err := checkFault(f); err != nil {
			return set, fmt.Errorf("header X-Mock-Fault: %w", err)
		}
		if f == faultNoneAlias {
			f = FaultNone
		}
		set.fault = f
	}
	for _, o := range []struct {
		header string
		into   *time.Duration
	}{
		{"X-Mock-Latency", &set.latency},
		{"X-Mock-Chunk-Interval", &set.chunkInterval},
	} {
		if v := h.Get(o.header); v != "" {
			d, err := caddy.ParseDuration(v)
			if err != nil {
				return set, fmt.Errorf("header %s: %w", o.header, err)
			}
			if err := checkDuration("header "+o.header, d); err != nil {
				return set, err
			}
			*o.into = d
		}
	}
	for _, o := range []struct {
		header string
		max    int
		into   *int
	}{
		{"X-Mock-Chunks", maxChunks, &set.chunks},
		{"X-Mock-Completion-Tokens", maxCompletionTokens, &set.completionTokens},
	} {
		if v := h.Get(o.header); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return set, fmt.Errorf("header %s: %w", o.header, err)
			}
			if n < 1 {
				return set, fmt.Errorf("header %s: %d is not positive", o.header, n)
			}
			if err := checkCount("header "+o.header, n, o.max); err != nil {
				return set, err
			}
			*o.into = n
		}
	}
	for _, o := range []struct {
		header string
		into   *int
	}{
		{"X-Mock-Cached-Tokens", &set.cachedTokens},
		{"X-Mock-Cache-Write-Tokens", &set.cacheWriteTokens},
		{"X-Mock-Reasoning-Tokens", &set.reasoningTokens},
	} {
		if v := h.Get(o.header); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return set, fmt.Errorf("header %s: %q is not a count", o.header, v)
			}
			if err := checkCount("header "+o.header, n, maxGeneratedTokens); err != nil {
				return set, err
			}
			*o.into = n
		}
	}
	switch v := h.Get("X-Mock-Compress"); v {
	case "", "none":
	case "gzip", "deflate":
		set.compress = v
	default:
		return set, fmt.Errorf("header X-Mock-Compress: unknown encoding %q (want gzip, deflate or none)", v)
	}
	return set, nil
}

// compressor is a gzip or zlib writer.
type compressor interface {
	io.WriteCloser
	Flush() error
}

// newCompressor compresses into w with the encoding, "gzip" or "deflate" (zlib).
func newCompressor(w io.Writer, encoding string) compressor {
	if encoding == "gzip" {
		return gzip.NewWriter(w)
	}
	return zlib.NewWriter(w)
}

// compressed is body compressed with the encoding.
func compressed(body []byte, encoding string) []byte {
	var buf bytes.Buffer
	zw := newCompressor(&buf, encoding)
	_, _ = zw.Write(body) // writes to a bytes.Buffer cannot fail
	_ = zw.Close()
	return buf.Bytes()
}

// mockCreated is the creation time the mock reports for its models.
var mockCreated = time.Date(2025, time.January, 1, 0, 0, 0, 0, time.UTC)

// completionSeq numbers the completion ids.
var completionSeq atomic.Int64

// exchange is one model request past its faults and latency, being answered.
type exchange struct {
	mock  *MockBackend
	w     http.ResponseWriter
	r     *http.Request
	rc    *http.ResponseController
	style apiStyle
	set   settings
	body  []byte
	start time.Time  // when the request arrived
	ready time.Time  // when the latency wait ended
	first time.Time  // when the first stream message was sent
	sent  int        // stream messages sent
	zw    compressor // compresses the stream under X-Mock-Compress; nil when not
}

// decode reads the JSON request body into v and checks the model; on failure it answers
// 400 or 404 and returns false.
func (x *exchange) decode(v any, model func() string) bool {
	if err := json.Unmarshal(x.body, v); err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: invalid JSON body: "+err.Error())
		return false
	}
	name := model()
	if name == "" {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: model is required")
		return false
	}
	if x.mock.accepted != nil && !x.mock.accepted[name] {
		msg := fmt.Sprintf("The model '%s' does not exist", name)
		if x.style == styleOllama {
			msg = fmt.Sprintf("model %q not found, try pulling it first", name)
		}
		x.fail(http.StatusNotFound, "model_not_found", msg)
		return false
	}
	return true
}

func (x *exchange) fail(status int, code, message string) {
	writeEncoded(x.w, status, x.set.compress, errorJSON(x.style, status, code, message))
}

// reply sends v as the whole JSON answer, compressed under X-Mock-Compress. FaultCut sends
// the first half of the (compressed) body under the Content-Length of all of it, then
// aborts; FaultTruncate sends a complete response of the first half of the JSON.
func (x *exchange) reply(v any) {
	body, err := json.Marshal(v)
	if err != nil {
		x.fail(http.StatusInternalServerError, "server_error", "mock backend: encoding the response: "+err.Error())
		return
	}
	body = append(body, '\n')
	switch x.set.fault {
	case FaultTruncate:
		writeEncoded(x.w, http.StatusOK, x.set.compress, body[:len(body)/2])
		return
	case FaultCut:
	default:
		writeEncoded(x.w, http.StatusOK, x.set.compress, body)
		return
	}
	if x.set.compress != "" {
		body = compressed(body, x.set.compress)
		x.w.Header().Set("Content-Encoding", x.set.compress)
	}
	x.w.Header().Set("Content-Type", "application/json")
	x.w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	x.w.WriteHeader(http.StatusOK)
	_, _ = x.w.Write(body[:len(body)/2])
	_ = x.rc.Flush()
	abortConnection()
}

// startStream sends the headers of a stream at once, and starts the compressor under
// X-Mock-Compress.
func (x *exchange) startStream(contentType string) bool {
	h := x.w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Cache-Control", "no-cache")
	if x.set.compress != "" {
		h.Set("Content-Encoding", x.set.compress)
		x.zw = newCompressor(x.w, x.set.compress)
	}
	x.w.WriteHeader(http.StatusOK)
	return x.flush()
}

// endStream ends the compressed stream, if any, with the compressor's trailer.
func (x *exchange) endStream() {
	if x.zw == nil {
		return
	}
	if err := x.zw.Close(); err == nil {
		x.flush()
	}
	x.zw = nil
}

// pause waits ChunkInterval before every stream message but the first; it returns false
// when the client is gone.
func (x *exchange) pause() bool {
	if x.sent == 0 {
		return x.r.Context().Err() == nil
	}
	return sleep(x.r.Context(), x.set.chunkInterval)
}

// send writes one stream message and flushes it (the compressor first); it returns false,
// writing nothing, when the client is gone (the request's context is done), or when the
// write fails. A message sent is counted in the stats' chunks_sent.
func (x *exchange) send(message []byte) bool {
	if x.r.Context().Err() != nil {
		return false
	}
	var out io.Writer = x.w
	if x.zw != nil {
		out = x.zw
	}
	if _, err := out.Write(message); err != nil {
		return false
	}
	if x.zw != nil {
		if err := x.zw.Flush(); err != nil {
			return false
		}
	}
	if x.sent == 0 {
		x.first = time.Now()
	}
	x.sent++
	if !x.flush() {
		return false
	}
	x.mock.requests.addChunk(x.r.URL.Path)
	return true
}

func (x *exchange) flush() bool {
	err := x.rc.Flush()
	return err == nil || errors.Is(err, http.ErrNotSupported)
}

// sendJSON sends v as one stream message: an SSE event (OpenAI) or an NDJSON line (Ollama).
func (x *exchange) sendJSON(v any) bool {
	body, err := json.Marshal(v)
	if err != nil {
		return false // our types always marshal; a stream cannot report it anyway
	}
	if x.style == styleOpenAI {
		return x.send(fmt.Appendf(nil, "data: %s\n\n", body))
	}
	return x.send(append(body, '\n'))
}

// cutHere acts when content step i of n is the first one not to be sent under FaultCut or
// FaultTruncate (checked after the pause before it, as a connection that drops
// mid-generation would): FaultCut aborts the connection, FaultTruncate returns true, and
// the caller ends the stream there, cleanly.
func (x *exchange) cutHere(i, n int) (stop bool) {
	if i != n/2 {
		return false
	}
	switch x.set.fault {
	case FaultCut:
		abortConnection()
	case FaultTruncate:
		return true
	}
	return false
}

// abortConnection closes the client connection without finishing the response, as Caddy's
// abort does: net/http closes an HTTP/1 connection and resets an HTTP/2 stream. It does not
// return.
func abortConnection() {
	panic(http.ErrAbortHandler)
}

// readBody reads at most maxBodyBytes of the request body.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.ContentLength > maxBodyBytes {
		return nil, &http.MaxBytesError{Limit: maxBodyBytes}
	}
	return io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
}

// sleep waits for d unless ctx ends first; it reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// writeEncoded sends a complete JSON answer, compressed with the encoding unless it is "".
func writeEncoded(w http.ResponseWriter, status int, encoding string, body []byte) {
	if encoding != "" {
		body = compressed(body, encoding)
		w.Header().Set("Content-Encoding", encoding)
	}
	writeBody(w, status, body)
}

// writeBody sends a complete JSON answer.
func writeBody(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// openAIError is OpenAI's error shape.
type openAIError struct {
	Error openAIErrorBody `json:"error"`
}

type openAIErrorBody struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    string  `json:"code"`
}

// ollamaError is Ollama's error shape.
type ollamaError struct {
	Error string `json:"error"`
}

// writeError answers with an error in the shape of the API.
func writeError(w http.ResponseWriter, style apiStyle, status int, code, message string) {
	writeBody(w, status, errorJSON(style, status, code, message))
}

// errorJSON is an error in the shape of the API.
func errorJSON(style apiStyle, status int, code, message string) []byte {
	if style == styleAnthropic {
		return anthropicErrorJSON(status, message)
	}
	var v any = ollamaError{Error: message}
	if style == styleOpenAI {
		typ := "invalid_request_error"
		if status >= 500 {
			typ = "server_error"
		}
		v = openAIError{Error: openAIErrorBody{Message: message, Type: typ, Code: code}}
	}
	body, _ := json.Marshal(v) // strings only: cannot fail
	return append(body, '\n')
}

// Token counting and generated text.

// countWords is the mock's tokenizer: one whitespace-separated word is one token.
func countWords(s string) int {
	return len(strings.Fields(s))
}

// contentWords counts the words of a chat message content: a string, an array of parts of
// which only {"type": "text"} ones count, or null.
func contentWords(raw json.RawMessage) (int, error) {
	switch {
	case len(raw) == 0 || string(raw) == "null":
		return 0, nil
	case raw[0] == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, err
		}
		return countWords(s), nil
	case raw[0] == '[':
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if err := json.Unmarshal(raw, &parts); err != nil {
			return 0, err
		}
		n := 0
		for _, p := range parts {
			if p.Type == "text" {
				n += countWords(p.Text)
			}
		}
		return n, nil
	}
	return 0, errors.New("content must be a string or an array of parts")
}

// chatMessage is a message of an OpenAI or Ollama chat request.
type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// promptTokens counts the words of all message contents, at least 1.
func promptTokens(messages []chatMessage) (int, error) {
	n := 0
	for i, msg := range messages {
		words, err := contentWords(msg.Content)
		if err != nil {
			return 0, fmt.Errorf("messages[%d].content: %w", i, err)
		}
		n += words
	}
	return max(n, 1), nil
}

// completionTokens is the configured length capped by the request's positive limits; capped
// reports whether a limit cut it short.
func completionTokens(configured int, limits ...int) (n int, capped bool) {
	n = configured
	for _, limit := range limits {
		if limit > 0 && limit < n {
			n, capped = limit, true
		}
	}
	return n, capped
}

// finishReason is "length" when the request's limit cut the completion short, else "stop".
func finishReason(capped bool) string {
	if capped {
		return "length"
	}
	return "stop"
}

// generatedPieces is the text "tok1 tok2 ... tokN" of n words split into parts pieces as
// evenly as possible, the first pieces one word longer when n does not divide; the pieces
// concatenate to the whole text.
func generatedPieces(n, parts int) []string {
	parts = max(parts, 1)
	out := make([]string, parts)
	base, extra := n/parts, n%parts
	word := 1
	for i := range out {
		size := base
		if i < extra {
			size++
		}
		var b strings.Builder
		for range size {
			if word > 1 {
				b.WriteByte(' ')
			}
			b.WriteString("tok")
			b.WriteString(strconv.Itoa(word))
			word++
		}
		out[i] = b.String()
	}
	return out
}

// OpenAI chat completions.

type chatCompletionRequest struct {
	Model         string        `json:"model"`
	Messages      []chatMessage `json:"messages"`
	Stream        bool          `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	MaxTokens           int  `json:"max_tokens"`
	MaxCompletionTokens int  `json:"max_completion_tokens"`
	N                   *int `json:"n"`
}

type usage struct {
	PromptTokens            int            `json:"prompt_tokens"`
	CompletionTokens        int            `json:"completion_tokens"`
	TotalTokens             int            `json:"total_tokens"`
	PromptTokensDetails     *promptDetails `json:"prompt_tokens_details,omitempty"`
	CompletionTokensDetails *outputDetails `json:"completion_tokens_details,omitempty"`
}

type promptDetails struct {
	CachedTokens int `json:"cached_tokens"`
}

type outputDetails struct {
	ReasoningTokens int `json:"reasoning_tokens"`
}

// openAIUsage is OpenAI's usage of prompt and completion tokens, with the details the
// settings ask for (cached prompt tokens, reasoning output tokens) cut to their wholes.
func (set settings) openAIUsage(prompt, completion int) usage {
	u := usage{PromptTokens: prompt, CompletionTokens: completion, TotalTokens: prompt + completion}
	if set.cachedTokens > 0 {
		u.PromptTokensDetails = &promptDetails{CachedTokens: min(set.cachedTokens, prompt)}
	}
	if set.reasoningTokens > 0 {
		u.CompletionTokensDetails = &outputDetails{ReasoningTokens: min(set.reasoningTokens, completion)}
	}
	return u
}

type chatCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	SystemFingerprint string       `json:"system_fingerprint"`
	Choices           []chatChoice `json:"choices"`
	Usage             usage        `json:"usage"` // last, as real servers put it
}

type chatChoice struct {
	Index        int          `json:"index"`
	Message      assistantMsg `json:"message"`
	Logprobs     *struct{}    `json:"logprobs"`
	FinishReason string       `json:"finish_reason"`
}

type assistantMsg struct {
	Role    string `json:"role,omitempty"`
	Content string `json:"content"`
}

type chatChunk struct {
	ID                string        `json:"id"`
	Object            string        `json:"object"`
	Created           int64         `json:"created"`
	Model             string        `json:"model"`
	SystemFingerprint string        `json:"system_fingerprint"`
	Choices           []chunkChoice `json:"choices"`
	Usage             *usage        `json:"usage"` // last, as real servers put it
}

type chunkChoice struct {
	Index        int          `json:"index"`
	Delta        assistantMsg `json:"delta"`
	Logprobs     *struct{}    `json:"logprobs"`
	FinishReason *string      `json:"finish_reason"`
}

const systemFingerprint = "fp_llm_mock_backend"

func serveChatCompletions(x *exchange) {
	var req chatCompletionRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	prompt, err := promptTokens(req.Messages)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: "+err.Error())
		return
	}
	choices := 1
	if req.N != nil {
		choices = *req.N
	}
	if choices < 1 || choices > maxChoices {
		x.fail(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("mock backend: n: %d is not between 1 and %d", choices, maxChoices))
		return
	}
	completion, capped := completionTokens(x.set.completionTokens, req.MaxTokens, req.MaxCompletionTokens)
	if choices*completion > maxGeneratedTokens {
		x.fail(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("mock backend: n × %d completion tokens is more than %d", completion, maxGeneratedTokens))
		return
	}
	u := x.set.openAIUsage(prompt, choices*completion)
	id := "chatcmpl-mock-" + strconv.FormatInt(completionSeq.Add(1), 10)
	created := time.Now().Unix()
	finish := finishReason(capped)

	if !req.Stream {
		text := generatedPieces(completion, 1)[0]
		out := chatCompletion{
			ID: id, Object: "chat.completion", Created: created, Model: req.Model,
			SystemFingerprint: systemFingerprint, Choices: make([]chatChoice, choices), Usage: u,
		}
		for j := range out.Choices {
			out.Choices[j] = chatChoice{Index: j, Message: assistantMsg{Role: "assistant", Content: text}, FinishReason: finish}
		}
		x.reply(out)
		return
	}

	if !x.startStream("text/event-stream") {
		return
	}
	pieces := generatedPieces(completion, x.set.chunks)
	for i, piece := range pieces {
		if !x.pause() || x.cutHere(i, len(pieces)) {
			return
		}
		for j := range choices {
			c := chunkChoice{Index: j, Delta: assistantMsg{Content: piece}}
			if i == 0 {
				c.Delta.Role = "assistant"
			}
			if i == len(pieces)-1 {
				c.FinishReason = &finish
			}
			if !x.sendJSON(chatChunk{
				ID: id, Object: "chat.completion.chunk", Created: created, Model: req.Model,
				SystemFingerprint: systemFingerprint, Choices: []chunkChoice{c},
			}) {
				return
			}
		}
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		if !x.pause() || !x.sendJSON(chatChunk{
			ID: id, Object: "chat.completion.chunk", Created: created, Model: req.Model,
			SystemFingerprint: systemFingerprint, Choices: []chunkChoice{}, Usage: &u,
		}) {
			return
		}
	}
	x.send([]byte("data: [DONE]\n\n"))
}

// OpenAI legacy completions.

type completionRequest struct {
	Model         string          `json:"model"`
	Prompt        json.RawMessage `json:"prompt"`
	Stream        bool            `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	MaxTokens int  `json:"max_tokens"`
	N         *int `json:"n"`
	Echo      bool `json:"echo"`
}

type completion struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"`
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	SystemFingerprint string             `json:"system_fingerprint"`
	Choices           []completionChoice `json:"choices"`
	Usage             *usage             `json:"usage,omitempty"` // last, as real servers put it
}

type completionChoice struct {
	Text         string    `json:"text"`
	Index        int       `json:"index"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
}

// completionPrompts reads a legacy completion's prompt: a string, an array of strings, an
// array of token ids, or an array of token id arrays. It returns the prompts as text (a token
// id array as its ids, space-separated) and their tokens (words, or ids).
func completionPrompts(raw json.RawMessage) (prompts []string, tokens int, err error) {
	var one string
	if err := json.Unmarshal(raw, &one); err == nil && len(raw) > 0 && raw[0] == '"' {
		return []string{one}, countWords(one), nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err == nil && len(many) > 0 {
		for _, p := range many {
			tokens += countWords(p)
		}
		return many, tokens, nil
	}
	ids := func(l []int) string {
		var b strings.Builder
		for i, id := range l {
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(strconv.Itoa(id))
		}
		return b.String()
	}
	var list []int
	if err := json.Unmarshal(raw, &list); err == nil && len(list) > 0 {
		return []string{ids(list)}, len(list), nil
	}
	var lists [][]int
	if err := json.Unmarshal(raw, &lists); err == nil && len(lists) > 0 {
		for _, l := range lists {
			prompts = append(prompts, ids(l))
			tokens += len(l)
		}
		return prompts, tokens, nil
	}
	return nil, 0, errors.New("must be a string, or a non-empty array of strings, of token ids or of token id arrays")
}

func serveCompletions(x *exchange) {
	var req completionRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	prompts, prompt, err := completionPrompts(req.Prompt)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: prompt: "+err.Error())
		return
	}
	prompt = max(prompt, 1)
	n := 1
	if req.N != nil {
		n = *req.N
	}
	if n < 1 || n > maxChoices {
		x.fail(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("mock backend: n: %d is not between 1 and %d", n, maxChoices))
		return
	}
	choices := n * len(prompts)
	completionN, capped := completionTokens(x.set.completionTokens, req.MaxTokens)
	if choices*completionN > maxGeneratedTokens {
		x.fail(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("mock backend: choices × %d completion tokens is more than %d", completionN, maxGeneratedTokens))
		return
	}
	u := x.set.openAIUsage(prompt, choices*completionN)
	id := "cmpl-mock-" + strconv.FormatInt(completionSeq.Add(1), 10)
	created := time.Now().Unix()
	finish := finishReason(capped)
	echoed := func(j int) string {
		if req.Echo {
			return prompts[j/n]
		}
		return ""
	}

	if !req.Stream {
		text := generatedPieces(completionN, 1)[0]
		out := completion{
			ID: id, Object: "text_completion", Created: created, Model: req.Model,
			SystemFingerprint: systemFingerprint, Choices: make([]completionChoice, choices), Usage: &u,
		}
		for j := range out.Choices {
			out.Choices[j] = completionChoice{Index: j, Text: echoed(j) + text, FinishReason: &finish}
		}
		x.reply(out)
		return
	}

	if !x.startStream("text/event-stream") {
		return
	}
	pieces := generatedPieces(completionN, x.set.chunks)
	for i, piece := range pieces {
		if !x.pause() || x.cutHere(i, len(pieces)) {
			return
		}
		for j := range choices {
			c := completionChoice{Index: j, Text: piece}
			if i == 0 {
				c.Text = echoed(j) + piece
			}
			if i == len(pieces)-1 {
				c.FinishReason = &finish
			}
			if !x.sendJSON(completion{
				ID: id, Object: "text_completion", Created: created, Model: req.Model,
				SystemFingerprint: systemFingerprint, Choices: []completionChoice{c},
			}) {
				return
			}
		}
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		if !x.pause() || !x.sendJSON(completion{
			ID: id, Object: "text_completion", Created: created, Model: req.Model,
			SystemFingerprint: systemFingerprint, Choices: []completionChoice{}, Usage: &u,
		}) {
			return
		}
	}
	x.send([]byte("data: [DONE]\n\n"))
}

// OpenAI embeddings.

type embeddingsRequest struct {
	Model          string          `json:"model"`
	Input          json.RawMessage `json:"input"`
	EncodingFormat string          `json:"encoding_format"`
}

type embeddingList struct {
	Object string      `json:"object"`
	Data   []embedding `json:"data"`
	Model  string      `json:"model"`
	Usage  struct {
		PromptTokens int `json:"prompt_tokens"`
		TotalTokens  int `json:"total_tokens"`
	} `json:"usage"` // last, as real servers put it
}

type embedding struct {
	Object    string `json:"object"`
	Index     int    `json:"index"`
	Embedding any    `json:"embedding"` // []float32, or a base64 string of little-endian float32s
}

func serveEmbeddings(x *exchange) {
	var req embeddingsRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	inputs, err := embeddingInputs(req.Input)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: input: "+err.Error())
		return
	}
	if f := req.EncodingFormat; f != "" && f != "float" && f != "base64" {
		x.fail(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("mock backend: encoding_format: %q is neither float nor base64", f))
		return
	}

	out := embeddingList{Object: "list", Model: req.Model, Data: make([]embedding, len(inputs))}
	words := 0
	for i, in := range inputs {
		words += countWords(in)
		vec := embeddingVector(in, x.mock.Dimensions)
		out.Data[i] = embedding{Object: "embedding", Index: i, Embedding: vec}
		if req.EncodingFormat == "base64" {
			buf := make([]byte, 0, 4*len(vec))
			for _, f := range vec {
				buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(f))
			}
			out.Data[i].Embedding = base64.StdEncoding.EncodeToString(buf)
		}
	}
	out.Usage.PromptTokens = max(words, 1)
	out.Usage.TotalTokens = out.Usage.PromptTokens
	x.reply(out)
}

// embeddingInputs reads an embeddings input: a string or a non-empty array of strings.
func embeddingInputs(raw json.RawMessage) ([]string, error) {
	var one string
	if err := json.Unmarshal(raw, &one); err == nil && len(raw) > 0 && raw[0] == '"' {
		return []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil || many == nil {
		return nil, errors.New("must be a string or an array of strings")
	}
	if len(many) == 0 {
		return nil, errors.New("must not be empty")
	}
	return many, nil
}

// embeddingVector is a deterministic unit vector of n components for text: the same text
// always gives the same vector.
func embeddingVector(text string, n int) []float32 {
	h := fnv.New64a()
	_, _ = io.WriteString(h, text)
	state := h.Sum64()
	raw := make([]float64, n)
	norm := 0.0
	for i := range raw {
		state += 0x9e3779b97f4a7c15 // splitmix64
		z := state
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		z ^= z >> 31
		raw[i] = float64(z>>11)/(1<<53)*2 - 1
		norm += raw[i] * raw[i]
	}
	norm = math.Sqrt(norm)
	if norm == 0 {
		norm = 1
	}
	vec := make([]float32, n)
	for i, v := range raw {
		vec[i] = float32(v / norm)
	}
	return vec
}

// OpenAI model list.

type modelList struct {
	Object string  `json:"object"`
	Data   []model `json:"data"`
}

type model struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func serveModels(x *exchange) {
	out := modelList{Object: "list", Data: make([]model, len(x.mock.listed))}
	for i, name := range x.mock.listed {
		out.Data[i] = model{ID: name, Object: "model", Created: mockCreated.Unix(), OwnedBy: "llm-mock-backend"}
	}
	x.reply(out)
}

// Ollama chat and generate.

type ollamaOptions struct {
	NumPredict int `json:"num_predict"`
}

type ollamaChatRequest struct {
	Model    string        `json:"model"`
	Messages []chatMessage `json:"messages"`
	Stream   *bool         `json:"stream"`
	Options  ollamaOptions `json:"options"`
}

type ollamaGenerateRequest struct {
	Model   string        `json:"model"`
	Prompt  string        `json:"prompt"`
	Stream  *bool         `json:"stream"`
	Options ollamaOptions `json:"options"`
}

// ollamaMessage is one NDJSON message, or the whole answer when not streaming. Message is
// set by /api/chat, Response by /api/generate; the counters only when Done. The counters
// (the usage) stay last, as Ollama puts them.
type ollamaMessage struct {
	Model              string        `json:"model"`
	CreatedAt          string        `json:"created_at"`
	Message            *assistantMsg `json:"message,omitempty"`
	Response           *string       `json:"response,omitempty"`
	Done               bool          `json:"done"`
	DoneReason         string        `json:"done_reason,omitempty"`
	TotalDuration      int64         `json:"total_duration,omitempty"`
	LoadDuration       int64         `json:"load_duration,omitempty"`
	PromptEvalCount    int           `json:"prompt_eval_count,omitempty"`
	PromptEvalDuration int64         `json:"prompt_eval_duration,omitempty"`
	EvalCount          int           `json:"eval_count,omitempty"`
	EvalDuration       int64         `json:"eval_duration,omitempty"`
}

func serveOllamaChat(x *exchange) {
	var req ollamaChatRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	prompt, err := promptTokens(req.Messages)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: "+err.Error())
		return
	}
	x.ollamaAnswer(req.Model, true, prompt, req.Stream, req.Options.NumPredict)
}

func serveOllamaGenerate(x *exchange) {
	var req ollamaGenerateRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	x.ollamaAnswer(req.Model, false, max(countWords(req.Prompt), 1), req.Stream, req.Options.NumPredict)
}

// ollamaAnswer answers /api/chat (chat) or /api/generate: NDJSON unless stream is false,
// ending with the done message.
func (x *exchange) ollamaAnswer(modelName string, chat bool, prompt int, stream *bool, numPredict int) {
	completion, capped := completionTokens(x.set.completionTokens, numPredict)
	message := func(text string) ollamaMessage {
		m := ollamaMessage{Model: modelName, CreatedAt: time.Now().UTC().Format(time.RFC3339Nano)}
		if chat {
			m.Message = &assistantMsg{Role: "assistant", Content: text}
		} else {
			m.Response = &text
		}
		return m
	}
	done := func(text string) ollamaMessage {
		m := message(text)
		now := time.Now()
		first := x.first
		if first.IsZero() {
			first = now
		}
		m.Done = true
		m.DoneReason = finishReason(capped)
		m.TotalDuration = max(now.Sub(x.start).Nanoseconds(), 1)
		m.LoadDuration = max(x.ready.Sub(x.start).Nanoseconds(), 1)
		m.PromptEvalCount = prompt
		m.PromptEvalDuration = max(first.Sub(x.ready).Nanoseconds(), 1)
		m.EvalCount = completion
		m.EvalDuration = max(now.Sub(first).Nanoseconds(), 1)
		return m
	}

	if stream != nil && !*stream {
		x.reply(done(generatedPieces(completion, 1)[0]))
		return
	}
	if !x.startStream("application/x-ndjson") {
		return
	}
	pieces := generatedPieces(completion, x.set.chunks)
	for i, piece := range pieces {
		if !x.pause() || x.cutHere(i, len(pieces)) {
			return
		}
		if !x.sendJSON(message(piece)) {
			return
		}
	}
	if x.pause() {
		x.sendJSON(done(""))
	}
}

// Ollama embeddings.

type ollamaEmbedRequest struct {
	Model string          `json:"model"`
	Input json.RawMessage `json:"input"`
}

// ollamaEmbedResponse is /api/embed's answer; its usage (prompt_eval_count) last, as
// Ollama puts it.
type ollamaEmbedResponse struct {
	Model           string      `json:"model"`
	Embeddings      [][]float32 `json:"embeddings"`
	TotalDuration   int64       `json:"total_duration"`
	LoadDuration    int64       `json:"load_duration"`
	PromptEvalCount int         `json:"prompt_eval_count"`
}

// serveOllamaEmbed answers /api/embed: one vector per input, prompt_eval_count the words of
// all inputs (at least 1).
func serveOllamaEmbed(x *exchange) {
	var req ollamaEmbedRequest
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	inputs, err := embeddingInputs(req.Input)
	if err != nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: input: "+err.Error())
		return
	}
	out := ollamaEmbedResponse{Model: req.Model, Embeddings: make([][]float32, len(inputs))}
	words := 0
	for i, in := range inputs {
		words += countWords(in)
		out.Embeddings[i] = embeddingVector(in, x.mock.Dimensions)
	}
	now := time.Now()
	out.TotalDuration = max(now.Sub(x.start).Nanoseconds(), 1)
	out.LoadDuration = max(x.ready.Sub(x.start).Nanoseconds(), 1)
	out.PromptEvalCount = max(words, 1)
	x.reply(out)
}

// serveOllamaEmbeddings answers the older /api/embeddings: one vector for the prompt, and no
// usage at all, as Ollama answers it.
func serveOllamaEmbeddings(x *exchange) {
	var req struct {
		Model  string  `json:"model"`
		Prompt *string `json:"prompt"`
	}
	if !x.decode(&req, func() string { return req.Model }) {
		return
	}
	if req.Prompt == nil {
		x.fail(http.StatusBadRequest, "invalid_request", "mock backend: prompt is required")
		return
	}
	x.reply(struct {
		Embedding []float32 `json:"embedding"`
	}{embeddingVector(*req.Prompt, x.mock.Dimensions)})
}

// Ollama model list.

type ollamaTags struct {
	Models []ollamaModel `json:"models"`
}

type ollamaModel struct {
	Name       string `json:"name"`
	Model      string `json:"model"`
	ModifiedAt string `json:"modified_at"`
	Size       int64  `json:"size"`
	Digest     string `json:"digest"`
	Details    struct {
		Format            string   `json:"format"`
		Family            string   `json:"family"`
		Families          []string `json:"families"`
		ParameterSize     string   `json:"parameter_size"`
		QuantizationLevel string   `json:"quantization_level"`
	} `json:"details"`
}

func serveOllamaTags(x *exchange) {
	out := ollamaTags{Models: make([]ollamaModel, len(x.mock.listed))}
	for i, name := range x.mock.listed {
		sum := sha256.Sum256([]byte(name))
		m := ollamaModel{
			Name: name, Model: name,
			ModifiedAt: mockCreated.Format(time.RFC3339),
			Digest:     hex.EncodeToString(sum[:]),
		}
		m.Details.Format = "gguf"
		m.Details.Family = "mock"
		m.Details.Families = []string{"mock"}
		m.Details.ParameterSize = "0B"
		m.Details.QuantizationLevel = "none"
		out.Models[i] = m
	}
	x.reply(out)
}
