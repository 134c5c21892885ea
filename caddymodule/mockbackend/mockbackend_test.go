package mockbackend

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"compress/zlib"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// provisioned provisions and validates m; an empty Name becomes the test's name, its
// counters reset, so that tests (and -count runs) do not share request counters.
func provisioned(t *testing.T, m *MockBackend) *MockBackend {
	t.Helper()
	if m.Name == "" {
		m.Name = t.Name()
		ResetRequestCounts(m.Name)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := m.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if err := m.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	return m
}

// flushRecorder records the body length at every flush and whether headers were written.
type flushRecorder struct {
	*httptest.ResponseRecorder
	flushes     []int
	wroteHeader bool
}

func newFlushRecorder() *flushRecorder {
	return &flushRecorder{ResponseRecorder: httptest.NewRecorder()}
}

func (f *flushRecorder) WriteHeader(code int) {
	f.wroteHeader = true
	f.ResponseRecorder.WriteHeader(code)
}

func (f *flushRecorder) Flush() {
	f.flushes = append(f.flushes, f.Body.Len())
	f.ResponseRecorder.Flush()
}

// serve calls m.ServeHTTP; aborted reports that it aborted the connection.
func serve(t *testing.T, m *MockBackend, r *http.Request) (rec *flushRecorder, aborted bool) {
	t.Helper()
	rec = newFlushRecorder()
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
		t.Error("the mock called the next handler")
		return nil
	})
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler { //nolint:errorlint // the sentinel itself is panicked
				panic(v)
			}
			aborted = true
		}
	}()
	if err := m.ServeHTTP(rec, r, next); err != nil {
		t.Errorf("ServeHTTP returned %v", err)
	}
	return rec, false
}

// request builds a request; headers are name, value pairs.
func request(method, path, body string, headers ...string) *http.Request {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Set(headers[i], headers[i+1])
	}
	return r
}

func decodeJSON[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decoding %q: %v", b, err)
	}
	return v
}

// words is the text the mock generates for n tokens.
func words(n int) string {
	w := make([]string, n)
	for i := range w {
		w[i] = "tok" + strconv.Itoa(i+1)
	}
	return strings.Join(w, " ")
}

// sseEvents splits an SSE body into its data payloads and checks the framing.
func sseEvents(t *testing.T, body string) []string {
	t.Helper()
	if !strings.HasSuffix(body, "\n\n") {
		t.Fatalf("SSE body does not end with a blank line: %q", body)
	}
	var out []string
	for ev := range strings.SplitSeq(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		data, ok := strings.CutPrefix(ev, "data: ")
		if !ok || strings.Contains(data, "\n") {
			t.Fatalf("bad SSE event %q", ev)
		}
		out = append(out, data)
	}
	return out
}

// messageEnds are the offsets at which each message of a stream ends.
func messageEnds(body, sep string) []int {
	var ends []int
	off := 0
	for {
		i := strings.Index(body[off:], sep)
		if i < 0 {
			return ends
		}
		off += i + len(sep)
		ends = append(ends, off)
	}
}

// checkFlushedPerMessage checks that the headers and then each message were flushed alone.
func checkFlushedPerMessage(t *testing.T, rec *flushRecorder, sep string) {
	t.Helper()
	want := append([]int{0}, messageEnds(rec.Body.String(), sep)...)
	if !reflect.DeepEqual(rec.flushes, want) {
		t.Errorf("flushed at body offsets %v, want after the headers and each message %v", rec.flushes, want)
	}
}

type errorBody struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	} `json:"error"`
}

func TestChatCompletions(t *testing.T) {
	const user = `{"role":"user","content":"hello there world"}`
	tests := []struct {
		name       string
		body       string
		headers    []string
		prompt     int
		completion int
		finish     string
	}{
		{
			name:       "string contents, default length",
			body:       `{"model":"m1","messages":[{"role":"system","content":"be brief"},` + user + `]}`,
			prompt:     5,
			completion: 16,
			finish:     "stop",
		},
		{
			name: "text parts count, other parts do not",
			body: `{"model":"m1","messages":[{"role":"user","content":[{"type":"text","text":"a b"},` +
				`{"type":"image_url","image_url":{"url":"http://x/y z"}},{"type":"text","text":" c\n"}]}]}`,
			prompt: 3, completion: 16, finish: "stop",
		},
		{
			name:   "null and empty contents count at least 1",
			body:   `{"model":"m1","messages":[{"role":"assistant","content":null},{"role":"user","content":"   "}]}`,
			prompt: 1, completion: 16, finish: "stop",
		},
		{
			name:   "no messages count 1",
			body:   `{"model":"m1"}`,
			prompt: 1, completion: 16, finish: "stop",
		},
		{
			name:   "max_tokens caps",
			body:   `{"model":"m1","max_tokens":5,"messages":[` + user + `]}`,
			prompt: 3, completion: 5, finish: "length",
		},
		{
			name:   "max_completion_tokens caps",
			body:   `{"model":"m1","max_completion_tokens":3,"messages":[` + user + `]}`,
			prompt: 3, completion: 3, finish: "length",
		},
		{
			name:   "the smaller of both limits caps",
			body:   `{"model":"m1","max_tokens":7,"max_completion_tokens":4,"messages":[` + user + `]}`,
			prompt: 3, completion: 4, finish: "length",
		},
		{
			name:   "a limit above the length changes nothing",
			body:   `{"model":"m1","max_tokens":100,"messages":[` + user + `]}`,
			prompt: 3, completion: 16, finish: "stop",
		},
		{
			name:   "zero and negative limits are ignored",
			body:   `{"model":"m1","max_tokens":0,"max_completion_tokens":-2,"messages":[` + user + `]}`,
			prompt: 3, completion: 16, finish: "stop",
		},
		{
			name:    "X-Mock-Completion-Tokens overrides the config",
			body:    `{"model":"m1","messages":[` + user + `]}`,
			headers: []string{"X-Mock-Completion-Tokens", "3"},
			prompt:  3, completion: 3, finish: "stop",
		},
		{
			name:    "the request limit caps the header's length",
			body:    `{"model":"m1","max_tokens":2,"messages":[` + user + `]}`,
			headers: []string{"X-Mock-Completion-Tokens", "30"},
			prompt:  3, completion: 2, finish: "length",
		},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, aborted := serve(t, m, request("POST", "/v1/chat/completions", tt.body, tt.headers...))
			if aborted || rec.Code != http.StatusOK {
				t.Fatalf("status %d, aborted %v: %s", rec.Code, aborted, rec.Body)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			if cl := rec.Header().Get("Content-Length"); cl != strconv.Itoa(rec.Body.Len()) {
				t.Errorf("Content-Length %s for %d bytes", cl, rec.Body.Len())
			}
			got := decodeJSON[chatCompletion](t, rec.Body.Bytes())
			if got.Object != "chat.completion" || got.Model != "m1" || !strings.HasPrefix(got.ID, "chatcmpl-mock-") {
				t.Errorf("object %q, model %q, id %q", got.Object, got.Model, got.ID)
			}
			want := usage{PromptTokens: tt.prompt, CompletionTokens: tt.completion, TotalTokens: tt.prompt + tt.completion}
			if got.Usage != want {
				t.Errorf("usage %+v, want %+v", got.Usage, want)
			}
			if len(got.Choices) != 1 {
				t.Fatalf("%d choices", len(got.Choices))
			}
			c := got.Choices[0]
			if c.Message.Role != "assistant" || c.Message.Content != words(tt.completion) || c.FinishReason != tt.finish {
				t.Errorf("choice %+v, want content %q and finish %q", c, words(tt.completion), tt.finish)
			}
		})
	}
}

func TestChatCompletionsStream(t *testing.T) {
	const msgs = `"messages":[{"role":"user","content":"one two"}]`
	tests := []struct {
		name       string
		body       string
		headers    []string
		completion int
		pieces     []int // words per content chunk
		usage      bool
		finish     string
	}{
		{
			name:       "defaults, no usage asked",
			body:       `{"model":"m","stream":true,` + msgs + `}`,
			completion: 16, pieces: []int{4, 4, 4, 4},
		},
		{
			name:       "include_usage adds the usage chunk",
			body:       `{"model":"m","stream":true,"stream_options":{"include_usage":true},` + msgs + `}`,
			completion: 16, pieces: []int{4, 4, 4, 4}, usage: true,
		},
		{
			name:       "include_usage false",
			body:       `{"model":"m","stream":true,"stream_options":{"include_usage":false},` + msgs + `}`,
			completion: 16, pieces: []int{4, 4, 4, 4},
		},
		{
			name:       "uneven split puts the longer chunks first",
			body:       `{"model":"m","stream":true,"stream_options":{"include_usage":true},` + msgs + `}`,
			headers:    []string{"X-Mock-Completion-Tokens", "10"},
			completion: 10, pieces: []int{3, 3, 2, 2}, usage: true,
		},
		{
			name:       "fewer words than chunks leaves empty chunks",
			body:       `{"model":"m","stream":true,"max_tokens":2,` + msgs + `}`,
			completion: 2, pieces: []int{1, 1, 0, 0}, finish: "length",
		},
		{
			name:       "X-Mock-Chunks",
			body:       `{"model":"m","stream":true,` + msgs + `}`,
			headers:    []string{"X-Mock-Chunks", "3"},
			completion: 16, pieces: []int{6, 5, 5},
		},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, aborted := serve(t, m, request("POST", "/v1/chat/completions", tt.body, tt.headers...))
			if aborted || rec.Code != http.StatusOK {
				t.Fatalf("status %d, aborted %v: %s", rec.Code, aborted, rec.Body)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "text/event-stream" {
				t.Errorf("Content-Type %q", ct)
			}
			checkFlushedPerMessage(t, rec, "\n\n")
			events := sseEvents(t, rec.Body.String())
			want := len(tt.pieces) + 1
			if tt.usage {
				want++
			}
			if len(events) != want {
				t.Fatalf("%d events, want %d: %q", len(events), want, events)
			}
			if events[len(events)-1] != "[DONE]" {
				t.Errorf("last event %q, want [DONE]", events[len(events)-1])
			}

			var text strings.Builder
			for i, n := range tt.pieces {
				raw := decodeJSON[map[string]json.RawMessage](t, []byte(events[i]))
				if u, ok := raw["usage"]; !ok || string(u) != "null" {
					t.Errorf("chunk %d: usage %q, want null", i, u)
				}
				c := decodeJSON[chatChunk](t, []byte(events[i]))
				if c.Object != "chat.completion.chunk" || c.Model != "m" || len(c.Choices) != 1 {
					t.Fatalf("chunk %d: %s", i, events[i])
				}
				ch := c.Choices[0]
				if got := len(strings.Fields(ch.Delta.Content)); got != n {
					t.Errorf("chunk %d carries %d words, want %d", i, got, n)
				}
				if (ch.Delta.Role == "assistant") != (i == 0) {
					t.Errorf("chunk %d: role %q", i, ch.Delta.Role)
				}
				last := i == len(tt.pieces)-1
				if (ch.FinishReason != nil) != last || last && *ch.FinishReason != cmp.Or(tt.finish, "stop") {
					t.Errorf("chunk %d: finish_reason %v", i, ch.FinishReason)
				}
				text.WriteString(ch.Delta.Content)
			}
			if text.String() != words(tt.completion) {
				t.Errorf("streamed text %q, want %q", text.String(), words(tt.completion))
			}
			if tt.usage {
				c := decodeJSON[chatChunk](t, []byte(events[len(events)-2]))
				want := usage{PromptTokens: 2, CompletionTokens: tt.completion, TotalTokens: 2 + tt.completion}
				if c.Choices == nil || len(c.Choices) != 0 || c.Usage == nil || *c.Usage != want {
					t.Errorf("usage chunk %s, want choices [] and usage %+v", events[len(events)-2], want)
				}
			}
		})
	}
}

func TestEmbeddings(t *testing.T) {
	tests := []struct {
		name       string
		mock       MockBackend
		body       string
		inputs     []string
		prompt     int
		dimensions int
	}{
		{
			name:   "one string",
			body:   `{"model":"e","input":"the quick brown fox"}`,
			inputs: []string{"the quick brown fox"}, prompt: 4, dimensions: 8,
		},
		{
			name:   "array of strings",
			body:   `{"model":"e","input":["a b","c","d e f"],"encoding_format":"float"}`,
			inputs: []string{"a b", "c", "d e f"}, prompt: 6, dimensions: 8,
		},
		{
			name:   "empty string counts 1",
			body:   `{"model":"e","input":""}`,
			inputs: []string{""}, prompt: 1, dimensions: 8,
		},
		{
			name:   "configured dimensions",
			mock:   MockBackend{Dimensions: 3},
			body:   `{"model":"e","input":["x","y"]}`,
			inputs: []string{"x", "y"}, prompt: 2, dimensions: 3,
		},
		{
			name:   "base64",
			body:   `{"model":"e","input":["x y"],"encoding_format":"base64"}`,
			inputs: []string{"x y"}, prompt: 2, dimensions: 8,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := provisioned(t, &tt.mock)
			rec, _ := serve(t, m, request("POST", "/v1/embeddings", tt.body))
			if rec.Code != http.StatusOK {
				t.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
			got := decodeJSON[embeddingAnswer](t, rec.Body.Bytes())
			if got.Object != "list" || got.Model != "e" || len(got.Data) != len(tt.inputs) {
				t.Fatalf("answer %s", rec.Body)
			}
			if want := map[string]int{"prompt_tokens": tt.prompt, "total_tokens": tt.prompt}; !reflect.DeepEqual(got.Usage, want) {
				t.Errorf("usage %v, want %v", got.Usage, want)
			}
			for i, d := range got.Data {
				var vec []float32
				if d.Embedding[0] == '"' {
					b, err := base64.StdEncoding.DecodeString(decodeJSON[string](t, d.Embedding))
					if err != nil {
						t.Fatal(err)
					}
					for j := 0; j+4 <= len(b); j += 4 {
						vec = append(vec, math.Float32frombits(binary.LittleEndian.Uint32(b[j:])))
					}
				} else {
					vec = decodeJSON[[]float32](t, d.Embedding)
				}
				if d.Object != "embedding" || d.Index != i || len(vec) != tt.dimensions {
					t.Errorf("data[%d]: object %q index %d, %d dimensions", i, d.Object, d.Index, len(vec))
				}
				if !reflect.DeepEqual(vec, embeddingVector(tt.inputs[i], tt.dimensions)) {
					t.Errorf("data[%d] is not the deterministic vector of %q", i, tt.inputs[i])
				}
				norm := 0.0
				for _, f := range vec {
					norm += float64(f) * float64(f)
				}
				if math.Abs(norm-1) > 1e-5 {
					t.Errorf("data[%d] has squared norm %v, want 1", i, norm)
				}
			}
		})
	}
}

// embeddingAnswer is an embeddings answer, its vectors left raw (floats or base64).
type embeddingAnswer struct {
	Object string `json:"object"`
	Model  string `json:"model"`
	Data   []struct {
		Object    string          `json:"object"`
		Index     int             `json:"index"`
		Embedding json.RawMessage `json:"embedding"`
	} `json:"data"`
	Usage map[string]int `json:"usage"`
}

func TestEmbeddingVector(t *testing.T) {
	a, b := embeddingVector("hello", 16), embeddingVector("hello", 16)
	if !reflect.DeepEqual(a, b) {
		t.Error("the same text gave two vectors")
	}
	if reflect.DeepEqual(a, embeddingVector("hellp", 16)) {
		t.Error("two texts gave the same vector")
	}
	if got := embeddingVector("hello", 4); len(got) != 4 {
		t.Errorf("%d dimensions", len(got))
	}
}

func TestModelLists(t *testing.T) {
	tests := []struct {
		name   string
		models []string
		want   []string
	}{
		{name: "defaults", want: []string{"mock-small", "mock-large"}},
		{name: "configured", models: []string{"a", "b:latest", "c"}, want: []string{"a", "b:latest", "c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := provisioned(t, &MockBackend{Models: tt.models})

			rec, _ := serve(t, m, request("GET", "/v1/models", ""))
			openai := decodeJSON[modelList](t, rec.Body.Bytes())
			var ids []string
			for _, d := range openai.Data {
				ids = append(ids, d.ID)
				if d.Object != "model" || d.OwnedBy == "" || d.Created == 0 {
					t.Errorf("model %+v", d)
				}
			}
			if rec.Code != http.StatusOK || openai.Object != "list" || !reflect.DeepEqual(ids, tt.want) {
				t.Errorf("/v1/models: %d %s", rec.Code, rec.Body)
			}

			rec, _ = serve(t, m, request("GET", "/api/tags", ""))
			tags := decodeJSON[ollamaTags](t, rec.Body.Bytes())
			var names []string
			for _, d := range tags.Models {
				names = append(names, d.Name)
				if d.Model != d.Name || len(d.Digest) != 64 || d.ModifiedAt == "" || d.Details.Format == "" {
					t.Errorf("tag %+v", d)
				}
			}
			if rec.Code != http.StatusOK || !reflect.DeepEqual(names, tt.want) {
				t.Errorf("/api/tags: %d %s", rec.Code, rec.Body)
			}
		})
	}
}

// ollamaLine is an NDJSON message of /api/chat or /api/generate, decoded for the tests.
type ollamaLine struct {
	Model   string `json:"model"`
	Created string `json:"created_at"`
	Message *struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"message"`
	Response           *string `json:"response"`
	Done               bool    `json:"done"`
	DoneReason         string  `json:"done_reason"`
	TotalDuration      int64   `json:"total_duration"`
	LoadDuration       int64   `json:"load_duration"`
	PromptEvalCount    int     `json:"prompt_eval_count"`
	PromptEvalDuration int64   `json:"prompt_eval_duration"`
	EvalCount          int     `json:"eval_count"`
	EvalDuration       int64   `json:"eval_duration"`
}

func (l ollamaLine) text() string {
	if l.Message != nil {
		return l.Message.Content
	}
	if l.Response != nil {
		return *l.Response
	}
	return "<none>"
}

func ndjsonLines(t *testing.T, body string) []ollamaLine {
	t.Helper()
	if !strings.HasSuffix(body, "\n") {
		t.Fatalf("NDJSON body does not end with a newline: %q", body)
	}
	var out []ollamaLine
	for line := range strings.SplitSeq(strings.TrimSuffix(body, "\n"), "\n") {
		out = append(out, decodeJSON[ollamaLine](t, []byte(line)))
	}
	return out
}

func checkDone(t *testing.T, l ollamaLine, prompt, completion int, reason string) {
	t.Helper()
	if !l.Done || l.DoneReason != reason || l.PromptEvalCount != prompt || l.EvalCount != completion {
		t.Errorf("done message %+v, want prompt_eval_count %d, eval_count %d, done_reason %q",
			l, prompt, completion, reason)
	}
	if l.TotalDuration <= 0 || l.LoadDuration <= 0 || l.PromptEvalDuration <= 0 || l.EvalDuration <= 0 {
		t.Errorf("done message durations %+v, want all positive", l)
	}
	if _, err := time.Parse(time.RFC3339Nano, l.Created); err != nil {
		t.Errorf("created_at: %v", err)
	}
}

func TestOllama(t *testing.T) {
	const chatMsgs = `"messages":[{"role":"system","content":"a b"},{"role":"user","content":"c d e"}]`
	tests := []struct {
		name       string
		path       string
		body       string
		headers    []string
		stream     bool
		prompt     int
		completion int
		pieces     []int
		reason     string
	}{
		{
			name: "chat streams by default", path: "/api/chat",
			body:   `{"model":"llama3",` + chatMsgs + `}`,
			stream: true, prompt: 5, completion: 16, pieces: []int{4, 4, 4, 4}, reason: "stop",
		},
		{
			name: "chat stream true with num_predict", path: "/api/chat",
			body:   `{"model":"llama3","stream":true,"options":{"num_predict":6},` + chatMsgs + `}`,
			stream: true, prompt: 5, completion: 6, pieces: []int{2, 2, 1, 1}, reason: "length",
		},
		{
			name: "chat stream false", path: "/api/chat",
			body:   `{"model":"llama3","stream":false,` + chatMsgs + `}`,
			prompt: 5, completion: 16, reason: "stop",
		},
		{
			name: "negative num_predict is ignored", path: "/api/chat",
			body:   `{"model":"llama3","stream":false,"options":{"num_predict":-1},` + chatMsgs + `}`,
			prompt: 5, completion: 16, reason: "stop",
		},
		{
			name: "generate streams by default", path: "/api/generate",
			body:    `{"model":"llama3","prompt":"why is the sky blue"}`,
			headers: []string{"X-Mock-Chunks", "2", "X-Mock-Completion-Tokens", "5"},
			stream:  true, prompt: 5, completion: 5, pieces: []int{3, 2}, reason: "stop",
		},
		{
			name: "generate stream false with num_predict", path: "/api/generate",
			body:   `{"model":"llama3","prompt":"","stream":false,"options":{"num_predict":2}}`,
			prompt: 1, completion: 2, reason: "length",
		},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, aborted := serve(t, m, request("POST", tt.path, tt.body, tt.headers...))
			if aborted || rec.Code != http.StatusOK {
				t.Fatalf("status %d, aborted %v: %s", rec.Code, aborted, rec.Body)
			}
			chat := tt.path == "/api/chat"
			checkShape := func(l ollamaLine) {
				t.Helper()
				if l.Model != "llama3" || chat != (l.Message != nil) || chat == (l.Response != nil) {
					t.Errorf("message %+v: wrong model or field for %s", l, tt.path)
				}
				if chat && l.Message.Role != "assistant" {
					t.Errorf("role %q", l.Message.Role)
				}
			}
			if !tt.stream {
				if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
					t.Errorf("Content-Type %q", ct)
				}
				l := decodeJSON[ollamaLine](t, rec.Body.Bytes())
				checkShape(l)
				checkDone(t, l, tt.prompt, tt.completion, tt.reason)
				if l.text() != words(tt.completion) {
					t.Errorf("text %q, want %q", l.text(), words(tt.completion))
				}
				return
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/x-ndjson" {
				t.Errorf("Content-Type %q", ct)
			}
			checkFlushedPerMessage(t, rec, "\n")
			lines := ndjsonLines(t, rec.Body.String())
			if len(lines) != len(tt.pieces)+1 {
				t.Fatalf("%d messages, want %d: %s", len(lines), len(tt.pieces)+1, rec.Body)
			}
			var text strings.Builder
			for i, n := range tt.pieces {
				l := lines[i]
				checkShape(l)
				if l.Done || l.EvalCount != 0 || l.DoneReason != "" {
					t.Errorf("message %d is not a plain content message: %+v", i, l)
				}
				if got := len(strings.Fields(l.text())); got != n {
					t.Errorf("message %d carries %d words, want %d", i, got, n)
				}
				text.WriteString(l.text())
			}
			if text.String() != words(tt.completion) {
				t.Errorf("streamed text %q, want %q", text.String(), words(tt.completion))
			}
			done := lines[len(lines)-1]
			checkShape(done)
			checkDone(t, done, tt.prompt, tt.completion, tt.reason)
			if done.text() != "" {
				t.Errorf("done message carries text %q", done.text())
			}
		})
	}
}

func TestModelNotFound(t *testing.T) {
	tests := []struct {
		name   string
		models []string
		path   string
		body   string
		status int
		ollama bool
	}{
		{name: "configured model accepted", models: []string{"a", "b"}, path: "/v1/chat/completions",
			body: `{"model":"b"}`, status: 200},
		{name: "other model refused, OpenAI", models: []string{"a", "b"}, path: "/v1/chat/completions",
			body: `{"model":"c"}`, status: 404},
		{name: "other model refused, embeddings", models: []string{"a"}, path: "/v1/embeddings",
			body: `{"model":"c","input":"x"}`, status: 404},
		{name: "other model refused, Ollama chat", models: []string{"a"}, path: "/api/chat",
			body: `{"model":"c"}`, status: 404, ollama: true},
		{name: "other model refused, Ollama generate", models: []string{"a"}, path: "/api/generate",
			body: `{"model":"c","prompt":"x"}`, status: 404, ollama: true},
		{name: "any model accepted without models", path: "/v1/chat/completions",
			body: `{"model":"anything-at-all"}`, status: 200},
		{name: "default models do not restrict", path: "/api/generate",
			body: `{"model":"llama3","stream":false}`, status: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := provisioned(t, &MockBackend{Models: tt.models})
			rec, _ := serve(t, m, request("POST", tt.path, tt.body))
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tt.status, rec.Body)
			}
			if tt.status != http.StatusNotFound {
				return
			}
			if tt.ollama {
				if e := decodeJSON[ollamaError](t, rec.Body.Bytes()); !strings.Contains(e.Error, `"c" not found`) {
					t.Errorf("Ollama error %s", rec.Body)
				}
				return
			}
			e := decodeJSON[errorBody](t, rec.Body.Bytes())
			if e.Error.Code != "model_not_found" || e.Error.Type != "invalid_request_error" || e.Error.Message == "" {
				t.Errorf("OpenAI error %s", rec.Body)
			}
		})
	}
}

func TestBadRequests(t *testing.T) {
	tests := []struct {
		name    string
		method  string
		path    string
		body    string
		headers []string
		status  int
		code    string // OpenAI error code; empty for an Ollama error
	}{
		{name: "unknown path", method: "GET", path: "/v2/nothing", status: 404, code: "not_found"},
		{name: "unknown path under /api", method: "POST", path: "/api/pull", body: `{}`, status: 404, code: "not_found"},
		{name: "wrong method", method: "GET", path: "/v1/chat/completions", status: 405, code: "method_not_allowed"},
		{name: "wrong method, Ollama", method: "POST", path: "/api/tags", status: 405},
		{name: "invalid JSON", method: "POST", path: "/v1/chat/completions", body: `{"model":`, status: 400, code: "invalid_request"},
		{name: "invalid JSON, Ollama", method: "POST", path: "/api/chat", body: `[`, status: 400},
		{name: "missing model", method: "POST", path: "/v1/chat/completions", body: `{"messages":[]}`, status: 400, code: "invalid_request"},
		{name: "missing model, Ollama", method: "POST", path: "/api/generate", body: `{"prompt":"x"}`, status: 400},
		{name: "content of a wrong type", method: "POST", path: "/v1/chat/completions",
			body: `{"model":"m","messages":[{"role":"user","content":42}]}`, status: 400, code: "invalid_request"},
		{name: "stream of a wrong type", method: "POST", path: "/v1/chat/completions",
			body: `{"model":"m","stream":"yes"}`, status: 400, code: "invalid_request"},
		{name: "embedding input of numbers", method: "POST", path: "/v1/embeddings",
			body: `{"model":"m","input":[1,2]}`, status: 400, code: "invalid_request"},
		{name: "embedding input empty", method: "POST", path: "/v1/embeddings",
			body: `{"model":"m","input":[]}`, status: 400, code: "invalid_request"},
		{name: "embedding input missing", method: "POST", path: "/v1/embeddings",
			body: `{"model":"m"}`, status: 400, code: "invalid_request"},
		{name: "embedding encoding_format unknown", method: "POST", path: "/v1/embeddings",
			body: `{"model":"m","input":"x","encoding_format":"int8"}`, status: 400, code: "invalid_request"},
		{name: "X-Mock-Fault unknown", method: "GET", path: "/v1/models",
			headers: []string{"X-Mock-Fault", "explode"}, status: 400, code: "invalid_request"},
		{name: "X-Mock-Latency not a duration", method: "GET", path: "/v1/models",
			headers: []string{"X-Mock-Latency", "soon"}, status: 400, code: "invalid_request"},
		{name: "X-Mock-Latency negative", method: "GET", path: "/api/tags",
			headers: []string{"X-Mock-Latency", "-1s"}, status: 400},
		{name: "X-Mock-Chunk-Interval negative", method: "GET", path: "/v1/models",
			headers: []string{"X-Mock-Chunk-Interval", "-5ms"}, status: 400, code: "invalid_request"},
		{name: "X-Mock-Chunks zero", method: "GET", path: "/v1/models",
			headers: []string{"X-Mock-Chunks", "0"}, status: 400, code: "invalid_request"},
		{name: "X-Mock-Chunks not a number", method: "GET", path: "/v1/models",
			headers: []string{"X-Mock-Chunks", "four"}, status: 400, code: "invalid_request"},
		{name: "X-Mock-Completion-Tokens too many", method: "GET", path: "/v1/models",
			headers: []string{"X-Mock-Completion-Tokens", "100001"}, status: 400, code: "invalid_request"},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, aborted := serve(t, m, request(tt.method, tt.path, tt.body, tt.headers...))
			if aborted || rec.Code != tt.status {
				t.Fatalf("status %d, aborted %v, want %d: %s", rec.Code, aborted, tt.status, rec.Body)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			if tt.status == http.StatusMethodNotAllowed && rec.Header().Get("Allow") == "" {
				t.Error("405 without Allow")
			}
			if tt.code == "" {
				if e := decodeJSON[ollamaError](t, rec.Body.Bytes()); e.Error == "" {
					t.Errorf("Ollama error %s", rec.Body)
				}
				return
			}
			e := decodeJSON[errorBody](t, rec.Body.Bytes())
			if e.Error.Code != tt.code || e.Error.Message == "" || e.Error.Type == "" {
				t.Errorf("error %s, want code %q", rec.Body, tt.code)
			}
		})
	}
}

func TestBodyTooLarge(t *testing.T) {
	big := `{"model":"m","input":"` + strings.Repeat("a", maxBodyBytes) + `"}`
	tests := []struct {
		name          string
		path          string
		contentLength bool
		ollama        bool
	}{
		{name: "declared length", path: "/v1/embeddings", contentLength: true},
		{name: "unknown length", path: "/v1/chat/completions"},
		{name: "Ollama", path: "/api/generate", contentLength: true, ollama: true},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := request("POST", tt.path, "")
			r.Body = io.NopCloser(strings.NewReader(big))
			r.ContentLength = -1
			if tt.contentLength {
				r.ContentLength = int64(len(big))
			}
			rec, _ := serve(t, m, r)
			if rec.Code != http.StatusRequestEntityTooLarge {
				t.Fatalf("status %d: %.200s", rec.Code, rec.Body)
			}
			if tt.ollama {
				if e := decodeJSON[ollamaError](t, rec.Body.Bytes()); e.Error == "" {
					t.Errorf("Ollama error %s", rec.Body)
				}
				return
			}
			if e := decodeJSON[errorBody](t, rec.Body.Bytes()); e.Error.Code != "request_too_large" {
				t.Errorf("error %s", rec.Body)
			}
		})
	}
	// exactly the limit is accepted
	body := `{"model":"m"}` + strings.Repeat(" ", maxBodyBytes-len(`{"model":"m"}`))
	if rec, _ := serve(t, m, request("POST", "/v1/chat/completions", body)); rec.Code != http.StatusOK {
		t.Errorf("a body of exactly %d bytes: status %d", len(body), rec.Code)
	}
}

func TestFaults(t *testing.T) {
	const (
		chat       = `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
		chatStream = `{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`
		generate   = `{"model":"m","prompt":"hi"}`
	)
	type outcome int
	const (
		refused   outcome = iota // aborted before any header
		failed                   // 500 JSON error
		cut                      // aborted after a partial answer
		truncated                // a complete response of a partial answer
		completed                // a normal answer
	)
	tests := []struct {
		name     string
		config   Fault
		header   string
		path     string
		body     string
		want     outcome
		ollama   bool
		messages int // complete stream messages before a cut
	}{
		{name: "refuse from config", config: FaultRefuse, path: "/v1/chat/completions", body: chat, want: refused},
		{name: "refuse from header", header: "refuse", path: "/api/tags", want: refused},
		{name: "error from config", config: FaultError, path: "/v1/chat/completions", body: chat, want: failed},
		{name: "error from header, Ollama", header: "error", path: "/api/generate", body: generate, want: failed, ollama: true},
		{name: "error on a model list", header: "error", path: "/v1/models", want: failed},
		{name: "cut SSE stream", config: FaultCut, path: "/v1/chat/completions", body: chatStream, want: cut, messages: 2},
		{name: "cut NDJSON stream", header: "cut", path: "/api/generate", body: generate, want: cut, ollama: true, messages: 2},
		{name: "cut JSON answer", header: "cut", path: "/v1/chat/completions", body: chat, want: cut},
		{name: "cut Ollama JSON answer", header: "cut", path: "/api/chat",
			body: `{"model":"m","stream":false}`, want: cut, ollama: true},
		{name: "cut model list", header: "cut", path: "/api/tags", want: cut, ollama: true},
		{name: "truncate SSE stream", config: FaultTruncate, path: "/v1/chat/completions", body: chatStream,
			want: truncated, messages: 2},
		{name: "truncate NDJSON stream", header: "truncate", path: "/api/chat", body: `{"model":"m"}`,
			want: truncated, ollama: true, messages: 2},
		{name: "truncate JSON answer", header: "truncate", path: "/v1/chat/completions", body: chat, want: truncated},
		{name: "truncate embeddings", header: "truncate", path: "/v1/embeddings",
			body: `{"model":"m","input":"a b"}`, want: truncated},
		{name: "truncate Ollama JSON answer", config: FaultTruncate, path: "/api/generate",
			body: `{"model":"m","prompt":"hi","stream":false}`, want: truncated, ollama: true},
		{name: "truncate model list", header: "truncate", path: "/v1/models", want: truncated},
		{name: "header none lifts the config's fault", config: FaultRefuse, header: "none",
			path: "/v1/chat/completions", body: chat, want: completed},
		{name: "header overrides the config's fault", config: FaultRefuse, header: "error",
			path: "/v1/chat/completions", body: chat, want: failed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := provisioned(t, &MockBackend{Fault: tt.config})
			var headers []string
			if tt.header != "" {
				headers = []string{"X-Mock-Fault", tt.header}
			}
			method := http.MethodPost
			if tt.body == "" {
				method = http.MethodGet
			}
			rec, aborted := serve(t, m, request(method, tt.path, tt.body, headers...))
			body := rec.Body.String()
			switch tt.want {
			case refused:
				if !aborted || rec.wroteHeader || body != "" || len(rec.flushes) != 0 {
					t.Errorf("aborted %v, wrote header %v, body %q: want a silent abort", aborted, rec.wroteHeader, body)
				}
			case failed:
				if aborted || rec.Code != http.StatusInternalServerError {
					t.Fatalf("status %d, aborted %v", rec.Code, aborted)
				}
				if tt.ollama {
					if e := decodeJSON[ollamaError](t, rec.Body.Bytes()); e.Error == "" {
						t.Errorf("error %s", body)
					}
				} else if e := decodeJSON[errorBody](t, rec.Body.Bytes()); e.Error.Code != "mock_fault" || e.Error.Type != "server_error" {
					t.Errorf("error %s", body)
				}
			case cut, truncated:
				if tt.want == truncated {
					if aborted || rec.Code != http.StatusOK {
						t.Fatalf("status %d, aborted %v: want a complete response of a truncated answer", rec.Code, aborted)
					}
				} else if !aborted || rec.Code != http.StatusOK {
					t.Fatalf("status %d, aborted %v: want a cut answer", rec.Code, aborted)
				}
				if tt.messages > 0 {
					sep := "\n\n"
					if tt.ollama {
						sep = "\n"
					}
					if got := len(messageEnds(body, sep)); got != tt.messages || !strings.HasSuffix(body, sep) {
						t.Errorf("%d messages before the cut, want %d: %q", got, tt.messages, body)
					}
					if strings.Contains(body, "[DONE]") || strings.Contains(body, `"done":true`) ||
						strings.Contains(body, `"usage":{`) || strings.Contains(body, "finish_reason\":\"") {
						t.Errorf("the cut stream carries its end: %q", body)
					}
					checkFlushedPerMessage(t, rec, sep)
					return
				}
				length, _ := strconv.Atoi(rec.Header().Get("Content-Length"))
				if tt.want == truncated {
					if length == 0 || len(body) != length || json.Valid(rec.Body.Bytes()) || !strings.HasPrefix(body, "{") {
						t.Errorf("Content-Length %d, %d bytes sent %q: want exactly that many bytes of invalid JSON",
							length, len(body), body)
					}
				} else if length == 0 || len(body) != length/2 || json.Valid(rec.Body.Bytes()) {
					t.Errorf("Content-Length %d, %d bytes sent: want half of a JSON answer", length, len(body))
				}
			case completed:
				if aborted || rec.Code != http.StatusOK {
					t.Errorf("status %d, aborted %v: %s", rec.Code, aborted, body)
				}
			}
		})
	}
}

func TestCutSingleChunk(t *testing.T) {
	m := provisioned(t, &MockBackend{Chunks: 1, Fault: FaultCut})
	rec, aborted := serve(t, m, request("POST", "/api/chat", `{"model":"m"}`))
	if !aborted || !rec.wroteHeader || rec.Body.Len() != 0 || !reflect.DeepEqual(rec.flushes, []int{0}) {
		t.Errorf("aborted %v, flushes %v, body %q: want the headers alone", aborted, rec.flushes, rec.Body)
	}
}

func TestStall(t *testing.T) {
	for _, source := range []string{"config", "header"} {
		t.Run(source, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				m := &MockBackend{}
				r := request("GET", "/v1/models", "")
				if source == "config" {
					m.Fault = FaultStall
				} else {
					r.Header.Set("X-Mock-Fault", "stall")
				}
				provisioned(t, m)
				ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
				defer cancel()
				start := time.Now()
				rec, aborted := serve(t, m, r.WithContext(ctx))
				if took := time.Since(start); took != time.Hour {
					t.Errorf("returned after %v, want when the request ended (1h)", took)
				}
				if aborted || rec.wroteHeader || rec.Body.Len() != 0 {
					t.Errorf("wrote header %v, body %q: want nothing", rec.wroteHeader, rec.Body)
				}
			})
		})
	}
}

func TestLatencyAndInterval(t *testing.T) {
	const stream = `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`
	tests := []struct {
		name     string
		mock     MockBackend
		path     string
		body     string
		headers  []string
		cancelAt time.Duration // 0: never
		took     time.Duration
		complete bool
	}{
		{name: "no latency", path: "/v1/models", took: 0, complete: true},
		{name: "config latency", mock: MockBackend{Latency: caddy.Duration(2 * time.Second)},
			path: "/v1/models", took: 2 * time.Second, complete: true},
		{name: "header latency overrides", mock: MockBackend{Latency: caddy.Duration(2 * time.Second)},
			path: "/api/tags", headers: []string{"X-Mock-Latency", "250ms"}, took: 250 * time.Millisecond, complete: true},
		{name: "latency then error", mock: MockBackend{Latency: caddy.Duration(time.Second), Fault: FaultError},
			path: "/v1/models", took: time.Second, complete: true},
		{name: "cancel during latency", mock: MockBackend{Latency: caddy.Duration(time.Hour)},
			path: "/v1/models", cancelAt: 3 * time.Second, took: 3 * time.Second},
		// 4 content chunks and the usage chunk: 4 pauses
		{name: "config chunk interval", mock: MockBackend{ChunkInterval: caddy.Duration(10 * time.Millisecond)},
			path: "/v1/chat/completions", body: stream, took: 40 * time.Millisecond, complete: true},
		{name: "header chunk interval and chunks", path: "/v1/chat/completions", body: stream,
			headers: []string{"X-Mock-Chunk-Interval", "1s", "X-Mock-Chunks", "2", "X-Mock-Latency", "1s"},
			took:    3 * time.Second, complete: true},
		// 4 content messages and the done message: 4 pauses
		{name: "Ollama interval", mock: MockBackend{ChunkInterval: caddy.Duration(time.Second)},
			path: "/api/generate", body: `{"model":"m"}`, took: 4 * time.Second, complete: true},
		{name: "cancel during interval", mock: MockBackend{ChunkInterval: caddy.Duration(time.Minute)},
			path: "/v1/chat/completions", body: stream, cancelAt: 90 * time.Second, took: 90 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				m := provisioned(t, &tt.mock)
				method := http.MethodGet
				if tt.body != "" {
					method = http.MethodPost
				}
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				if tt.cancelAt > 0 {
					ctx, cancel = context.WithTimeout(ctx, tt.cancelAt)
					defer cancel()
				}
				start := time.Now()
				rec, aborted := serve(t, m, request(method, tt.path, tt.body, tt.headers...).WithContext(ctx))
				if took := time.Since(start); took != tt.took {
					t.Errorf("took %v, want %v", took, tt.took)
				}
				body := rec.Body.String()
				complete := rec.wroteHeader && (tt.body == "" || strings.Contains(body, "[DONE]") || strings.Contains(body, `"done":true`))
				if aborted || complete != tt.complete {
					t.Errorf("aborted %v, complete %v, want %v: %q", aborted, complete, tt.complete, body)
				}
			})
		})
	}
}

func TestOllamaDurations(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := provisioned(t, &MockBackend{Latency: caddy.Duration(time.Second), ChunkInterval: caddy.Duration(time.Second)})
		rec, _ := serve(t, m, request("POST", "/api/chat", `{"model":"m"}`))
		lines := ndjsonLines(t, rec.Body.String())
		done := lines[len(lines)-1]
		// latency 1s is the load; 3 pauses between the 4 content messages and 1 before done
		want := []int64{int64(5 * time.Second), int64(time.Second), 1, int64(4 * time.Second)}
		got := []int64{done.TotalDuration, done.LoadDuration, done.PromptEvalDuration, done.EvalDuration}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("total, load, prompt eval, eval durations %v, want %v", got, want)
		}
	})
}

func TestStats(t *testing.T) {
	name := t.Name()
	ResetRequestCounts(name)
	m := provisioned(t, &MockBackend{Name: name})
	stats := func(m *MockBackend) map[string]int64 {
		t.Helper()
		rec, _ := serve(t, m, request("GET", "/mock/stats", ""))
		if rec.Code != http.StatusOK {
			t.Fatalf("GET /mock/stats: %d", rec.Code)
		}
		got := decodeJSON[statsResponse](t, rec.Body.Bytes())
		if got.Name != name {
			t.Errorf("name %q", got.Name)
		}
		return got.Requests
	}
	zero := map[string]int64{
		"/v1/chat/completions": 0, "/v1/completions": 0, "/v1/embeddings": 0, "/v1/models": 0,
		"/api/chat": 0, "/api/generate": 0, "/api/embed": 0, "/api/embeddings": 0, "/api/tags": 0, "other": 0,
		"/v1/responses": 0, "/v1/responses/{id}": 0,
		"/v1/messages": 0, "/v1/messages/count_tokens": 0,
	}
	if got := stats(m); !reflect.DeepEqual(got, zero) {
		t.Errorf("fresh stats %v", got)
	}

	calls := []*http.Request{
		request("POST", "/v1/chat/completions", `{"model":"m"}`),
		request("POST", "/v1/chat/completions", `{"model":"m"}`, "X-Mock-Fault", "refuse"),
		request("GET", "/v1/chat/completions", ""), // 405, still received
		request("POST", "/v1/chat/completions", `{`),
		request("GET", "/api/tags", ""),
		request("GET", "/nope", ""),
		request("GET", "/nope/either", ""),
	}
	for _, r := range calls {
		serve(t, m, r)
	}
	want := maps.Clone(zero)
	want["/v1/chat/completions"], want["/api/tags"], want["other"] = 4, 1, 2
	if got := stats(m); !reflect.DeepEqual(got, want) {
		t.Errorf("stats %v, want %v", got, want)
	}

	// a reloaded config (a new module value of the same name) keeps the counts
	reloaded := provisioned(t, &MockBackend{Name: name, Fault: FaultError})
	serve(t, reloaded, request("POST", "/api/chat", `{"model":"m"}`))
	want["/api/chat"] = 1
	if got := stats(reloaded); !reflect.DeepEqual(got, want) {
		t.Errorf("stats after reload %v, want %v", got, want)
	}
	if got := RequestCounts(name); !reflect.DeepEqual(got, want) {
		t.Errorf("RequestCounts %v, want %v", got, want)
	}
	if got := RequestCounts(name + "-other"); !reflect.DeepEqual(got, zero) {
		t.Errorf("another name's counts %v", got)
	}

	rec, _ := serve(t, m, request("DELETE", "/mock/stats", ""))
	if rec.Code != http.StatusNoContent {
		t.Errorf("DELETE /mock/stats: %d", rec.Code)
	}
	if got := stats(reloaded); !reflect.DeepEqual(got, zero) {
		t.Errorf("stats after reset %v", got)
	}
	rec, _ = serve(t, m, request("POST", "/mock/stats", `{}`))
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "GET, DELETE" {
		t.Errorf("POST /mock/stats: %d, Allow %q", rec.Code, rec.Header().Get("Allow"))
	}

	// faults and latency never touch the stats
	stalled := provisioned(t, &MockBackend{Name: name, Fault: FaultStall, Latency: caddy.Duration(time.Hour)})
	if got := stats(stalled); !reflect.DeepEqual(got, zero) {
		t.Errorf("stats of a stalling mock %v", got)
	}
	serve(t, m, request("GET", "/v1/models", ""))
	ResetRequestCounts(name)
	if got := stats(m); !reflect.DeepEqual(got, zero) {
		t.Errorf("stats after ResetRequestCounts %v", got)
	}
}

func TestConcurrentRequests(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	srv := httptest.NewServer(asHandler(m))
	defer srv.Close()
	const n = 20
	errs := make(chan error, n)
	for range n {
		go func() {
			resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json",
				strings.NewReader(`{"model":"m","stream":true}`))
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if got := RequestCounts(m.Name)["/v1/chat/completions"]; got != n {
		t.Errorf("counted %d requests, want %d", got, n)
	}
}

// asHandler serves m as a plain net/http handler.
func asHandler(m *MockBackend) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = m.ServeHTTP(w, r, caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
			panic("the mock called the next handler")
		}))
	})
}

// TestOverTheWire checks the faults and the flushing on a real HTTP/1.1 connection.
func TestOverTheWire(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	srv := httptest.NewServer(asHandler(m))
	defer srv.Close()
	post := func(ctx context.Context, path, body string, headers ...string) (*http.Response, error) {
		r, err := http.NewRequestWithContext(ctx, "POST", srv.URL+path, strings.NewReader(body))
		if err != nil {
			return nil, err
		}
		for i := 0; i+1 < len(headers); i += 2 {
			r.Header.Set(headers[i], headers[i+1])
		}
		return srv.Client().Do(r)
	}
	ctx := context.Background()

	t.Run("refuse closes without a response", func(t *testing.T) {
		resp, err := post(ctx, "/v1/chat/completions", `{"model":"m"}`, "X-Mock-Fault", "refuse")
		if err == nil {
			resp.Body.Close()
			t.Fatalf("got a response %s", resp.Status)
		}
	})

	t.Run("cut stream ends early", func(t *testing.T) {
		resp, err := post(ctx, "/v1/chat/completions",
			`{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, "X-Mock-Fault", "cut")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("reading the cut stream: %v, want unexpected EOF", err)
		}
		if n := strings.Count(string(body), "data: "); n != 2 || bytes.Contains(body, []byte("[DONE]")) {
			t.Errorf("received %q", body)
		}
	})

	t.Run("cut JSON ends early", func(t *testing.T) {
		resp, err := post(ctx, "/api/generate", `{"model":"m","stream":false}`, "X-Mock-Fault", "cut")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if _, err := io.ReadAll(resp.Body); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("reading the cut answer: %v, want unexpected EOF", err)
		}
	})

	t.Run("truncated JSON is a complete response", func(t *testing.T) {
		resp, err := post(ctx, "/v1/chat/completions", `{"model":"m"}`, "X-Mock-Fault", "truncate")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || resp.ContentLength != int64(len(body)) || json.Valid(body) {
			t.Errorf("status %d, Content-Length %d, read %d bytes, %v: want a whole response of cut JSON",
				resp.StatusCode, resp.ContentLength, len(body), err)
		}
	})

	t.Run("truncated stream ends cleanly", func(t *testing.T) {
		resp, err := post(ctx, "/v1/chat/completions",
			`{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, "X-Mock-Fault", "truncate")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Errorf("reading the truncated stream: %v, want a clean end", err)
		}
		if n := strings.Count(string(body), "data: "); n != 2 || bytes.Contains(body, []byte("[DONE]")) {
			t.Errorf("received %q", body)
		}
	})

	t.Run("each message arrives when written", func(t *testing.T) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		// the second message would come an hour later: the first must arrive alone
		resp, err := post(ctx, "/api/chat", `{"model":"m"}`, "X-Mock-Chunk-Interval", "1h")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		line, err := bufio.NewReader(resp.Body).ReadString('\n')
		if err != nil || !strings.Contains(line, `"content":"tok1 tok2 tok3 tok4"`) {
			t.Errorf("first message %q, %v", line, err)
		}
		cancel() // ends the server's wait too, so that srv.Close does not block
	})
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		mock    MockBackend
		wantErr string
	}{
		{name: "zero value", mock: MockBackend{}},
		{name: "everything set", mock: MockBackend{Name: "a", Models: []string{"x"}, CompletionTokens: 1, Chunks: 1,
			ChunkInterval: 1, Latency: 1, Dimensions: 1, Fault: FaultCut}},
		{name: "fault none", mock: MockBackend{Fault: "none"}},
		{name: "negative completion_tokens", mock: MockBackend{CompletionTokens: -1}, wantErr: "completion_tokens: -1 is negative"},
		{name: "too many completion_tokens", mock: MockBackend{CompletionTokens: maxCompletionTokens + 1}, wantErr: "completion_tokens: 100001 is more than 100000"},
		{name: "negative chunks", mock: MockBackend{Chunks: -4}, wantErr: "chunks: -4 is negative"},
		{name: "too many chunks", mock: MockBackend{Chunks: maxChunks + 1}, wantErr: "chunks"},
		{name: "negative dimensions", mock: MockBackend{Dimensions: -8}, wantErr: "dimensions: -8 is negative"},
		{name: "too many dimensions", mock: MockBackend{Dimensions: maxDimensions + 1}, wantErr: "dimensions"},
		{name: "negative latency", mock: MockBackend{Latency: caddy.Duration(-time.Second)}, wantErr: "latency: -1s is negative"},
		{name: "negative chunk_interval", mock: MockBackend{ChunkInterval: -1}, wantErr: "chunk_interval: -1ns is negative"},
		{name: "unknown fault", mock: MockBackend{Fault: "explode"}, wantErr: `fault: unknown fault "explode"`},
		{name: "empty model name", mock: MockBackend{Models: []string{"a", ""}}, wantErr: "models: empty model name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			m := tt.mock
			if err := m.Provision(ctx); err != nil {
				t.Fatal(err)
			}
			err := m.Validate()
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("Validate() = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestProvisionDefaults(t *testing.T) {
	m := provisioned(t, &MockBackend{Name: "", Fault: "none"})
	if m.CompletionTokens != 16 || m.Chunks != 4 || m.Dimensions != 8 || m.Fault != FaultNone ||
		m.Latency != 0 || m.ChunkInterval != 0 || m.Models != nil || m.accepted != nil ||
		!reflect.DeepEqual(m.listed, []string{"mock-small", "mock-large"}) {
		t.Errorf("defaults %+v", m)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	unnamed := new(MockBackend)
	if err := unnamed.Provision(ctx); err != nil || unnamed.Name != "mock" {
		t.Errorf("name %q, %v", unnamed.Name, err)
	}
}

func TestGeneratedPieces(t *testing.T) {
	tests := []struct {
		n, parts int
		want     []string
	}{
		{n: 4, parts: 1, want: []string{"tok1 tok2 tok3 tok4"}},
		{n: 4, parts: 2, want: []string{"tok1 tok2", " tok3 tok4"}},
		{n: 5, parts: 3, want: []string{"tok1 tok2", " tok3 tok4", " tok5"}},
		{n: 1, parts: 3, want: []string{"tok1", "", ""}},
		{n: 0, parts: 2, want: []string{"", ""}},
		{n: 3, parts: 0, want: []string{"tok1 tok2 tok3"}},
	}
	for _, tt := range tests {
		t.Run(strconv.Itoa(tt.n)+"/"+strconv.Itoa(tt.parts), func(t *testing.T) {
			if got := generatedPieces(tt.n, tt.parts); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("generatedPieces(%d, %d) = %q, want %q", tt.n, tt.parts, got, tt.want)
			}
		})
	}
}

func FuzzContentWords(f *testing.F) {
	for _, seed := range []string{
		`"hello world"`, `null`, `[{"type":"text","text":"a b"},{"type":"image_url"}]`, `42`, `[1]`, `"`, ``, `{}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		n, err := contentWords(raw)
		if n < 0 {
			t.Fatalf("contentWords(%q) = %d", raw, n)
		}
		var s string
		if json.Unmarshal(raw, &s) == nil && len(raw) > 0 && raw[0] == '"' {
			if err != nil || n != len(strings.Fields(s)) {
				t.Fatalf("contentWords(%q) = %d, %v; want %d words", raw, n, err, len(strings.Fields(s)))
			}
		}
	})
}

func FuzzEmbeddingInputs(f *testing.F) {
	for _, seed := range []string{`"x"`, `["a","b c"]`, `[]`, `[1,2]`, `null`, `[[1]]`, ``} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		inputs, err := embeddingInputs(raw)
		if err == nil && len(inputs) == 0 {
			t.Fatalf("embeddingInputs(%q) accepted no inputs", raw)
		}
	})
}

func TestChatCompletionsN(t *testing.T) {
	const msgs = `"messages":[{"role":"user","content":"one two"}]`
	tests := []struct {
		name       string
		body       string
		headers    []string
		choices    int
		completion int // per choice
		finish     string
	}{
		{name: "no n is one choice", body: `{"model":"m",` + msgs + `}`, choices: 1, completion: 16, finish: "stop"},
		{name: "n 1", body: `{"model":"m","n":1,` + msgs + `}`, choices: 1, completion: 16, finish: "stop"},
		{name: "n 3", body: `{"model":"m","n":3,` + msgs + `}`, choices: 3, completion: 16, finish: "stop"},
		{name: "n 3 capped by max_tokens", body: `{"model":"m","n":3,"max_tokens":5,` + msgs + `}`,
			choices: 3, completion: 5, finish: "length"},
		{name: "n 128, the largest", body: `{"model":"m","n":128,` + msgs + `}`,
			headers: []string{"X-Mock-Completion-Tokens", "2"}, choices: 128, completion: 2, finish: "stop"},
	}
	m := provisioned(t, &MockBackend{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, aborted := serve(t, m, request("POST", "/v1/chat/completions", tt.body, tt.headers...))
			if aborted || rec.Code != http.StatusOK {
				t.Fatalf("status %d, aborted %v: %s", rec.Code, aborted, rec.Body)
			}
			got := decodeJSON[chatCompletion](t, rec.Body.Bytes())
			total := tt.choices * tt.completion
			if want := (usage{PromptTokens: 2, CompletionTokens: total, TotalTokens: 2 + total}); got.Usage != want {
				t.Errorf("usage %+v, want %+v", got.Usage, want)
			}
			if len(got.Choices) != tt.choices {
				t.Fatalf("%d choices, want %d", len(got.Choices), tt.choices)
			}
			for j, c := range got.Choices {
				if c.Index != j || c.Message.Role != "assistant" || c.Message.Content != words(tt.completion) || c.FinishReason != tt.finish {
					t.Errorf("choice %d: %+v", j, c)
				}
			}
		})
	}

	for _, bad := range []struct{ name, body, header string }{
		{name: "n 0", body: `{"model":"m","n":0}`},
		{name: "n negative", body: `{"model":"m","n":-1}`},
		{name: "n 129", body: `{"model":"m","n":129}`},
		{name: "n 129 streamed", body: `{"model":"m","n":129,"stream":true}`},
		{name: "n × tokens too many", body: `{"model":"m","n":11}`, header: "100000"},
	} {
		t.Run(bad.name, func(t *testing.T) {
			var headers []string
			if bad.header != "" {
				headers = []string{"X-Mock-Completion-Tokens", bad.header}
			}
			rec, _ := serve(t, m, request("POST", "/v1/chat/completions", bad.body, headers...))
			if rec.Code != http.StatusBadRequest {
				t.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
			if e := decodeJSON[errorBody](t, rec.Body.Bytes()); e.Error.Code != "invalid_request" {
				t.Errorf("error %s", rec.Body)
			}
		})
	}
}

func TestChatCompletionsStreamN(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	const body = `{"model":"m","n":2,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a"}]}`
	rec, aborted := serve(t, m, request("POST", "/v1/chat/completions", body, "X-Mock-Completion-Tokens", "10"))
	if aborted || rec.Code != http.StatusOK {
		t.Fatalf("status %d, aborted %v: %s", rec.Code, aborted, rec.Body)
	}
	checkFlushedPerMessage(t, rec, "\n\n")
	events := sseEvents(t, rec.Body.String())
	// 4 steps of 2 messages, the usage chunk, [DONE]
	if len(events) != 4*2+2 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("%d events: %q", len(events), events)
	}
	texts := make([]string, 2)
	for i, ev := range events[:8] {
		c := decodeJSON[chatChunk](t, []byte(ev))
		if len(c.Choices) != 1 {
			t.Fatalf("event %d: %s", i, ev)
		}
		ch := c.Choices[0]
		if ch.Index != i%2 {
			t.Errorf("event %d: index %d, want %d", i, ch.Index, i%2)
		}
		if (ch.Delta.Role == "assistant") != (i < 2) {
			t.Errorf("event %d: role %q", i, ch.Delta.Role)
		}
		if last := i >= 6; (ch.FinishReason != nil) != last || last && *ch.FinishReason != "stop" {
			t.Errorf("event %d: finish_reason %v", i, ch.FinishReason)
		}
		texts[ch.Index] += ch.Delta.Content
	}
	for j, text := range texts {
		if text != words(10) {
			t.Errorf("choice %d streamed %q, want %q", j, text, words(10))
		}
	}
	u := decodeJSON[chatChunk](t, []byte(events[8]))
	if want := (usage{PromptTokens: 1, CompletionTokens: 20, TotalTokens: 21}); u.Usage == nil || *u.Usage != want {
		t.Errorf("usage chunk %s, want %+v", events[8], want)
	}

	// a cut stream stops at a step: 2 steps of 2 messages
	rec, aborted = serve(t, m, request("POST", "/v1/chat/completions", body, "X-Mock-Fault", "cut"))
	if got := len(messageEnds(rec.Body.String(), "\n\n")); !aborted || got != 4 {
		t.Errorf("aborted %v, %d messages before the cut, want 4", aborted, got)
	}
}

// inflate decompresses b of the encoding; it returns what it could read and the error that
// stopped it (nil at a clean end).
func inflate(t *testing.T, encoding string, b []byte) (string, error) {
	t.Helper()
	var (
		r   io.ReadCloser
		err error
	)
	switch encoding {
	case "gzip":
		r, err = gzip.NewReader(bytes.NewReader(b))
	case "deflate":
		r, err = zlib.NewReader(bytes.NewReader(b))
	default:
		t.Fatalf("encoding %q", encoding)
	}
	if err != nil {
		return "", err
	}
	out, err := io.ReadAll(r)
	return string(out), err
}

func TestCompress(t *testing.T) {
	const (
		chat       = `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
		chatStream = `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`
	)
	m := provisioned(t, &MockBackend{Models: []string{"m"}})
	for _, enc := range []string{"gzip", "deflate"} {
		t.Run(enc, func(t *testing.T) {
			// the request says identity only: the mock compresses anyway
			do := func(method, path, body string, headers ...string) (*flushRecorder, bool) {
				t.Helper()
				headers = append([]string{"X-Mock-Compress", enc, "Accept-Encoding", "identity"}, headers...)
				return serve(t, m, request(method, path, body, headers...))
			}
			checkJSON := func(rec *flushRecorder, status int) string {
				t.Helper()
				if rec.Code != status || rec.Header().Get("Content-Encoding") != enc {
					t.Fatalf("status %d, Content-Encoding %q", rec.Code, rec.Header().Get("Content-Encoding"))
				}
				if cl := rec.Header().Get("Content-Length"); cl != strconv.Itoa(rec.Body.Len()) {
					t.Errorf("Content-Length %s for %d compressed bytes", cl, rec.Body.Len())
				}
				text, err := inflate(t, enc, rec.Body.Bytes())
				if err != nil {
					t.Fatalf("decompressing: %v", err)
				}
				return text
			}

			rec, _ := do("POST", "/v1/chat/completions", chat)
			if c := decodeJSON[chatCompletion](t, []byte(checkJSON(rec, http.StatusOK))); c.Usage.CompletionTokens != 16 {
				t.Errorf("answer %+v", c)
			}
			rec, _ = do("GET", "/api/tags", "")
			if tags := decodeJSON[ollamaTags](t, []byte(checkJSON(rec, http.StatusOK))); len(tags.Models) != 1 {
				t.Errorf("tags %+v", tags)
			}
			rec, _ = do("POST", "/v1/chat/completions", `{"model":"other"}`)
			if e := decodeJSON[errorBody](t, []byte(checkJSON(rec, http.StatusNotFound))); e.Error.Code != "model_not_found" {
				t.Errorf("error %+v", e)
			}
			rec, _ = do("POST", "/api/generate", `{"model":"m"}`, "X-Mock-Fault", "error")
			if e := decodeJSON[ollamaError](t, []byte(checkJSON(rec, http.StatusInternalServerError))); e.Error == "" {
				t.Errorf("injected error %+v", e)
			}
			rec, aborted := do("POST", "/v1/chat/completions", chat, "X-Mock-Fault", "truncate")
			if text := checkJSON(rec, http.StatusOK); aborted || json.Valid([]byte(text)) || !strings.HasPrefix(text, `{"id":`) {
				t.Errorf("aborted %v, truncated answer %q", aborted, text)
			}
			rec, aborted = do("POST", "/v1/chat/completions", chat, "X-Mock-Fault", "cut")
			length, _ := strconv.Atoi(rec.Header().Get("Content-Length"))
			if text, err := inflate(t, enc, rec.Body.Bytes()); !aborted || rec.Header().Get("Content-Encoding") != enc ||
				length == 0 || rec.Body.Len() != length/2 || err == nil || json.Valid([]byte(text)) {
				t.Errorf("aborted %v, Content-Length %d, %d bytes, %q, %v: want half of the compressed answer",
					aborted, length, rec.Body.Len(), text, err)
			}

			for _, stream := range []struct{ path, body, sep string }{
				{"/v1/chat/completions", chatStream, "\n\n"},
				{"/api/chat", `{"model":"m"}`, "\n"},
			} {
				rec, aborted := do("POST", stream.path, stream.body)
				if aborted || rec.Code != http.StatusOK || rec.Header().Get("Content-Encoding") != enc {
					t.Fatalf("%s: status %d, aborted %v, Content-Encoding %q", stream.path, rec.Code, aborted, rec.Header().Get("Content-Encoding"))
				}
				text, err := inflate(t, enc, rec.Body.Bytes())
				if err != nil {
					t.Fatalf("%s: decompressing: %v", stream.path, err)
				}
				if stream.sep == "\n\n" {
					if events := sseEvents(t, text); len(events) != 6 || events[5] != "[DONE]" {
						t.Errorf("events %q", events)
					}
				} else if lines := ndjsonLines(t, text); len(lines) != 5 || !lines[4].Done {
					t.Errorf("lines %+v", lines)
				}
				// every flush after the headers' ends a message of the decompressed stream
				for _, at := range rec.flushes[1:] {
					part, _ := inflate(t, enc, rec.Body.Bytes()[:at])
					if part == "" || !strings.HasSuffix(part, stream.sep) {
						t.Errorf("%s: at a flush the stream decompresses to %q", stream.path, part)
					}
				}
			}
		})
	}

	for _, v := range []string{"none", ""} {
		rec, _ := serve(t, m, request("POST", "/v1/chat/completions", chat, "X-Mock-Compress", v))
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Encoding") != "" || !json.Valid(rec.Body.Bytes()) {
			t.Errorf("X-Mock-Compress %q: status %d, Content-Encoding %q", v, rec.Code, rec.Header().Get("Content-Encoding"))
		}
	}
	rec, _ := serve(t, m, request("POST", "/v1/chat/completions", chat, "X-Mock-Compress", "br"))
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "X-Mock-Compress") {
		t.Errorf("X-Mock-Compress br: status %d, %s", rec.Code, rec.Body)
	}
}

// TestCompressOverTheWire: a Go client that asked for identity gets gzip anyway, and
// decodes each message of a compressed stream as it arrives.
func TestCompressOverTheWire(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	srv := httptest.NewServer(asHandler(m))
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, _ := http.NewRequestWithContext(ctx, "POST", srv.URL+"/api/chat", strings.NewReader(`{"model":"m"}`))
	r.Header.Set("Accept-Encoding", "identity")
	r.Header.Set("X-Mock-Compress", "gzip")
	r.Header.Set("X-Mock-Chunk-Interval", "1h")
	resp, err := srv.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ce := resp.Header.Get("Content-Encoding"); ce != "gzip" || resp.Uncompressed {
		t.Fatalf("Content-Encoding %q, uncompressed by the client %v", ce, resp.Uncompressed)
	}
	zr, err := gzip.NewReader(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	// the second message would come an hour later: the first must decode alone
	line, err := bufio.NewReader(zr).ReadString('\n')
	if err != nil || !strings.Contains(line, `"content":"tok1 tok2 tok3 tok4"`) {
		t.Errorf("first message %q, %v", line, err)
	}
	cancel()
}

// topLevelKeys are the keys of a JSON object, in order.
func topLevelKeys(t *testing.T, b []byte) []string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("%q is not an object: %v", b, err)
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatalf("decoding %q: %v", b, err)
		}
		keys = append(keys, tok.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			t.Fatalf("decoding %q: %v", b, err)
		}
	}
	return keys
}

// TestUsageLast: the usage is the last member wherever it is carried, as real servers put it.
func TestUsageLast(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	last := func(b []byte, n int) []string {
		keys := topLevelKeys(t, b)
		return keys[max(len(keys)-n, 0):]
	}
	ollamaCounters := []string{"prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}

	rec, _ := serve(t, m, request("POST", "/v1/chat/completions", `{"model":"m","n":2}`))
	if got := last(rec.Body.Bytes(), 1); !reflect.DeepEqual(got, []string{"usage"}) {
		t.Errorf("chat completion ends with %v", got)
	}
	rec, _ = serve(t, m, request("POST", "/v1/embeddings", `{"model":"m","input":["a","b"]}`))
	if got := last(rec.Body.Bytes(), 1); !reflect.DeepEqual(got, []string{"usage"}) {
		t.Errorf("embeddings end with %v", got)
	}
	rec, _ = serve(t, m, request("POST", "/v1/chat/completions",
		`{"model":"m","stream":true,"stream_options":{"include_usage":true}}`))
	events := sseEvents(t, rec.Body.String())
	if got := last([]byte(events[len(events)-2]), 1); !reflect.DeepEqual(got, []string{"usage"}) {
		t.Errorf("usage chunk ends with %v", got)
	}
	for _, path := range []string{"/api/chat", "/api/generate"} {
		rec, _ = serve(t, m, request("POST", path, `{"model":"m","stream":false}`))
		if got := last(rec.Body.Bytes(), 4); !reflect.DeepEqual(got, ollamaCounters) {
			t.Errorf("%s answer ends with %v", path, got)
		}
		rec, _ = serve(t, m, request("POST", path, `{"model":"m"}`))
		lines := strings.Split(strings.TrimSuffix(rec.Body.String(), "\n"), "\n")
		if got := last([]byte(lines[len(lines)-1]), 4); !reflect.DeepEqual(got, ollamaCounters) {
			t.Errorf("%s done message ends with %v", path, got)
		}
	}
}

// cancelingRecorder cancels the request's context at its cancelAt-th flush, as a client
// that goes away after reading that much.
type cancelingRecorder struct {
	*flushRecorder
	cancelAt int
	cancel   context.CancelFunc
}

func (c *cancelingRecorder) Flush() {
	c.flushRecorder.Flush()
	if len(c.flushes) == c.cancelAt {
		c.cancel()
	}
}

// TestChunksSent: the stats count the stream messages sent, and a stream stops at the
// first message after its request's context ended.
func TestChunksSent(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	zero := ChunksSent(m.Name)
	for path, n := range zero {
		if n != 0 {
			t.Errorf("fresh chunks_sent[%s] = %d", path, n)
		}
	}
	serve(t, m, request("POST", "/v1/chat/completions", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`))
	serve(t, m, request("POST", "/api/generate", `{"model":"m"}`))
	serve(t, m, request("POST", "/api/chat", `{"model":"m","stream":false}`)) // not a stream
	serve(t, m, request("POST", "/api/chat", `{"model":"m"}`, "X-Mock-Fault", "cut"))
	want := maps.Clone(zero)
	// 4 contents, usage, [DONE]; 4 contents and done; 2 contents before the cut
	want["/v1/chat/completions"], want["/api/generate"], want["/api/chat"] = 6, 5, 2
	if got := ChunksSent(m.Name); !reflect.DeepEqual(got, want) {
		t.Errorf("ChunksSent %v, want %v", got, want)
	}
	rec, _ := serve(t, m, request("GET", "/mock/stats", ""))
	if got := decodeJSON[statsResponse](t, rec.Body.Bytes()); !reflect.DeepEqual(got.ChunksSent, want) {
		t.Errorf("chunks_sent %v, want %v", got.ChunksSent, want)
	}
	serve(t, m, request("DELETE", "/mock/stats", ""))
	if got := ChunksSent(m.Name); !reflect.DeepEqual(got, zero) {
		t.Errorf("ChunksSent after DELETE %v", got)
	}

	for _, tt := range []struct{ path, body string }{
		{"/v1/chat/completions", `{"model":"m","stream":true,"n":3}`},
		{"/api/generate", `{"model":"m"}`},
	} {
		t.Run(tt.path, func(t *testing.T) {
			ResetRequestCounts(m.Name)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			// the headers' flush, then 4 messages: the client goes away
			rec := &cancelingRecorder{flushRecorder: newFlushRecorder(), cancelAt: 5, cancel: cancel}
			r := request("POST", tt.path, tt.body, "X-Mock-Chunks", "1000").WithContext(ctx)
			if err := m.ServeHTTP(rec, r, nil); err != nil {
				t.Fatal(err)
			}
			if got := ChunksSent(m.Name)[tt.path]; got != 4 {
				t.Errorf("chunks_sent %d, want 4", got)
			}
			if got := len(rec.flushes); got != 5 {
				t.Errorf("%d flushes after the cancel at the 5th", got)
			}
		})
	}
}

// TestDisconnectStopsStream: a client that hangs up over the wire stops the generation.
func TestDisconnectStopsStream(t *testing.T) {
	m := provisioned(t, &MockBackend{})
	returned := make(chan struct{}, 1)
	handler := asHandler(m)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		handler.ServeHTTP(w, r)
		returned <- struct{}{}
	}))
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// 10000 messages 5ms apart would take 50s
	r, _ := http.NewRequestWithContext(ctx, "POST", srv.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"m","stream":true}`))
	r.Header.Set("X-Mock-Chunks", "10000")
	r.Header.Set("X-Mock-Chunk-Interval", "5ms")
	resp, err := srv.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(resp.Body)
	for range 3 {
		if _, err := rd.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	resp.Body.Close()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("the mock still streams 10s after the client went away")
	}
	if got := ChunksSent(m.Name)["/v1/chat/completions"]; got < 2 || got > 1000 {
		t.Errorf("chunks_sent %d, want the few before the disconnect", got)
	}
}
