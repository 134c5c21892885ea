// Package fakebackend is a foreign-style OpenAI-compatible fake, used by llmbench as a benchmark
// backend beside the project's own llm_mock_backend: a copy of the fake of the shared
// peers-bench kit (peers-bench/fake), written outside this project and kept with its behaviour
// (its answers, its flags and their defaults), so that the gateway is also measured against a
// backend it was not written together with. It serves POST /v1/chat/completions and
// /chat/completions (streamed or not), GET /v1/models and GET /health.
//
// llmbench runs it as a separate process of itself: `llmbench fake -addr 127.0.0.1:9000`.
package fakebackend

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"strconv"
	"time"
)

// options are the fake's flags.
type options struct {
	addr     string
	delay    time.Duration
	chunks   int
	interval time.Duration
}

const answer = "Hello! This is a fixed answer from the fake backend, used to measure proxy overhead without any model in the loop."

// Main parses args (the flags, without the program or subcommand name) and serves until the
// listener fails.
func Main(args []string) error {
	var o options
	fs := flag.NewFlagSet("llmbench fake", flag.ContinueOnError)
	fs.StringVar(&o.addr, "addr", "127.0.0.1:9000", "listen address")
	fs.DurationVar(&o.delay, "delay", 0, "non-stream: delay before reply; stream: delay before first chunk")
	fs.IntVar(&o.chunks, "chunks", 20, "stream: number of content chunks")
	fs.DurationVar(&o.interval, "interval", 10*time.Millisecond, "stream: gap between chunks")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", o.chat)
	mux.HandleFunc("/chat/completions", o.chat)
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"object":"list","data":[{"id":"fake-model","object":"model","created":1700000000,"owned_by":"fake"}]}`))
	})
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) })
	log.Printf("fake backend on %s delay=%v chunks=%d interval=%v", o.addr, o.delay, o.chunks, o.interval)
	return http.ListenAndServe(o.addr, mux)
}

func nonStream(model string) []byte {
	b, _ := json.Marshal(map[string]any{
		"id": "chatcmpl-fake0001", "object": "chat.completion", "created": 1700000000, "model": model,
		"system_fingerprint": "fp_fake",
		"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
			"message": map[string]any{"role": "assistant", "content": answer}}},
		"usage": map[string]any{"prompt_tokens": 12, "completion_tokens": 24, "total_tokens": 36},
	})
	return b
}

func (o *options) chunk(model string, i int, content string, finish any) []byte {
	delta := map[string]any{"content": content}
	if i == 0 {
		delta["role"] = "assistant"
	}
	m := map[string]any{"id": "chatcmpl-fake0001", "object": "chat.completion.chunk", "created": 1700000000,
		"model": model, "choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}}}
	if finish != nil {
		m["usage"] = map[string]any{"prompt_tokens": 12, "completion_tokens": o.chunks, "total_tokens": 12 + o.chunks}
		m["choices"] = []any{map[string]any{"index": 0, "delta": map[string]any{}, "finish_reason": finish}}
	}
	b, _ := json.Marshal(m)
	return b
}

func (o *options) chat(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", 405)
		return
	}
	body, _ := io.ReadAll(r.Body)
	var req struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		http.Error(w, `{"error":{"message":"bad json"}}`, 400)
		return
	}
	if req.Model == "" {
		req.Model = "fake-model"
	}
	if !req.Stream {
		if o.delay > 0 {
			time.Sleep(o.delay)
		}
		out := nonStream(req.Model)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(out)))
		w.Write(out)
		return
	}
	fl, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	if o.delay > 0 {
		time.Sleep(o.delay)
	}
	for i := 0; i < o.chunks; i++ {
		if i > 0 {
			time.Sleep(o.interval)
		}
		fmt.Fprintf(w, "data: %s\n\n", o.chunk(req.Model, i, fmt.Sprintf("tok%d ", i), nil))
		if fl != nil {
			fl.Flush()
		}
	}
	fmt.Fprintf(w, "data: %s\n\n", o.chunk(req.Model, o.chunks, "", "stop"))
	fmt.Fprint(w, "data: [DONE]\n\n")
	if fl != nil {
		fl.Flush()
	}
}
