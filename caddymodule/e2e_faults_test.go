package caddymodule_test

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
)

// faultPoint is where the faulty backend of TestBillMatchesWhatWasServed breaks its answer.
type faultPoint string

const (
	faultNone          faultPoint = ""               // a whole answer
	faultBeforeHeaders faultPoint = "before-headers" // the connection closes with no answer
	faultAfterHeaders  faultPoint = "after-headers"  // headers, then the connection breaks
	faultMidBody       faultPoint = "mid-body"       // half the content, then it breaks
	faultMidUsage      faultPoint = "mid-usage"      // all the content and half the usage message
	faultAfterUsage    faultPoint = "after-usage"    // everything but the stream's terminator
	faultOversized     faultPoint = "oversized"      // a whole answer larger than the gateway holds
)

// faultyChunks is how many content messages the faulty backend's answers have: chunk i is the
// text " w<i>".
const faultyChunks = 8

// faultyBackend answers OpenAI chat and legacy completions and embeddings, Ollama chat,
// generate and embed, and Anthropic Messages,
// JSON or streamed, with usage (prompt 11, output 8), breaking where X-Fault says. It is
// written for this test, not the mock.
func faultyBackend(t testing.TB) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fault := faultPoint(r.Header.Get("X-Fault"))
		stream := strings.Contains(string(body), `"stream":true`) ||
			strings.HasPrefix(r.URL.Path, "/api/") && r.URL.Path != "/api/embed" && !strings.Contains(string(body), `"stream":false`)
		abort := func() {
			if rc := http.NewResponseController(w); rc.Flush() == nil {
				conn, _, err := rc.Hijack()
				if err == nil {
					conn.Close()
					return
				}
			}
			panic(http.ErrAbortHandler)
		}
		if fault == faultBeforeHeaders {
			conn, _, _ := http.NewResponseController(w).Hijack()
			conn.Close()
			return
		}
		pad := ""
		if fault == faultOversized {
			pad = strings.Repeat("p", 20<<10)
		}
		msgs, usage, end, ctype := faultyAnswer(r.URL.Path, stream, pad)
		w.Header().Set("Content-Type", ctype)
		if !stream {
			doc := strings.Join(msgs, "") + usage + end
			w.Header().Set("Content-Length", strconv.Itoa(len(doc)))
			w.WriteHeader(http.StatusOK)
			switch fault {
			case faultAfterHeaders:
				abort()
			case faultMidBody:
				_, _ = io.WriteString(w, doc[:len(doc)/2])
				abort()
			case faultMidUsage:
				_, _ = io.WriteString(w, doc[:len(doc)-len(end)-len(usage)/2])
				abort()
			default:
				_, _ = io.WriteString(w, doc)
			}
			return
		}
		w.WriteHeader(http.StatusOK)
		if fault == faultAfterHeaders {
			abort()
		}
		for i, m := range msgs {
			if fault == faultMidBody && i == len(msgs)/2 {
				abort()
			}
			_, _ = io.WriteString(w, m)
		}
		switch fault {
		case faultMidUsage:
			_, _ = io.WriteString(w, usage[:len(usage)/2])
			abort()
		case faultAfterUsage:
			_, _ = io.WriteString(w, usage)
			abort()
		}
		_, _ = io.WriteString(w, usage+end)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// faultyAnswer is the faulty backend's answer for a path: the content messages (for a JSON
// answer, the document up to its usage), the usage message (member), what ends it, and the
// content type.
func faultyAnswer(path string, stream bool, pad string) (msgs []string, usage, end, ctype string) {
	text := func(i int) string { return " w" + strconv.Itoa(i) }
	switch {
	case path == "/v1/messages" && stream:
		// message_start (input 11, Anthropic's placeholder output 1) comes with the first
		// delta; the usage message is message_delta (output 8), the end message_stop.
		for i := range faultyChunks {
			m := "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"" + text(i) + "\"}}\n\n"
			if i == 0 {
				m = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[]," +
					"\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n" + m
			}
			msgs = append(msgs, m)
		}
		return msgs, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":8}}\n\n",
			"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", "text/event-stream"
	case path == "/v1/messages":
		var content strings.Builder
		for i := range faultyChunks {
			content.WriteString(text(i))
		}
		return []string{`{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"` + content.String() + pad + `"}],"stop_reason":"end_turn"`},
			`,"usage":{"input_tokens":11,"output_tokens":8}`, "}", "application/json"
	case path == "/v1/embeddings":
		return []string{`{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,0.25]}],"pad":"` + pad + `"`},
			`,"usage":{"prompt_tokens":11,"total_tokens":11}`, "}", "application/json"
	case path == "/api/embed":
		return []string{`{"model":"o","embeddings":[[0.5,0.25]],"pad":"` + pad + `"`}, `,"prompt_eval_count":11`, "}", "application/json"
	case path == "/v1/responses" && stream:
		// The first message starts with response.created.
		created := "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_f\",\"object\":\"response\",\"status\":\"in_progress\",\"usage\":null}}\n\n"
		for i := range faultyChunks {
			if i > 0 {
				created = ""
			}
			msgs = append(msgs, created+`event: response.output_text.delta`+"\n"+`data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"m","delta":"`+text(i)+`"}`+"\n\n")
		}
		return msgs, `event: response.completed` + "\n" + `data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_f","object":"response","status":"completed","usage":{"input_tokens":11,"output_tokens":8}}}` + "\n\n",
			"", "text/event-stream"
	case path == "/v1/responses":
		var content strings.Builder
		for i := range faultyChunks {
			content.WriteString(text(i))
		}
		return []string{`{"id":"resp_f","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"` + content.String() + pad + `"}]}]`},
			`,"usage":{"input_tokens":11,"output_tokens":8}`, "}", "application/json"
	case path == "/v1/completions" && stream:
		for i := range faultyChunks {
			msgs = append(msgs, `data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":"`+text(i)+`","finish_reason":null}]}`+"\n\n")
		}
		return msgs, `data: {"id":"c","object":"text_completion","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":8}}` + "\n\n",
			"data: [DONE]\n\n", "text/event-stream"
	case path == "/v1/completions":
		var content strings.Builder
		for i := range faultyChunks {
			content.WriteString(text(i))
		}
		return []string{`{"id":"c","object":"text_completion","choices":[{"index":0,"text":"` + content.String() + pad + `","finish_reason":"stop"}]`},
			`,"usage":{"prompt_tokens":11,"completion_tokens":8}`, "}", "application/json"
	case path == "/v1/chat/completions" && stream:
		for i := range faultyChunks {
			msgs = append(msgs, `data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"`+text(i)+`"},"finish_reason":null}]}`+"\n\n")
		}
		return msgs, `data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":8}}` + "\n\n",
			"data: [DONE]\n\n", "text/event-stream"
	case path == "/v1/chat/completions":
		var content strings.Builder
		for i := range faultyChunks {
			content.WriteString(text(i))
		}
		return []string{`{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"` + content.String() + pad + `"},"finish_reason":"stop"}]`},
			`,"usage":{"prompt_tokens":11,"completion_tokens":8}`, "}", "application/json"
	case stream: // Ollama NDJSON
		for i := range faultyChunks {
			if path == "/api/chat" {
				msgs = append(msgs, `{"model":"o","message":{"role":"assistant","content":"`+text(i)+`"},"done":false}`+"\n")
			} else {
				msgs = append(msgs, `{"model":"o","response":"`+text(i)+`","done":false}`+"\n")
			}
		}
		return msgs, `{"model":"o","done":true,"done_reason":"stop","prompt_eval_count":11,"eval_count":8}` + "\n", "", "application/x-ndjson"
	default: // Ollama, stream false
		content := ""
		for i := range faultyChunks {
			content += text(i)
		}
		field := `"response":"` + content + pad + `"`
		if path == "/api/chat" {
			field = `"message":{"role":"assistant","content":"` + content + pad + `"}`
		}
		return []string{`{"model":"o",` + field + `,"done":true`}, `,"prompt_eval_count":11,"eval_count":8`, "}", "application/json"
	}
}

// TestBillMatchesWhatWasServed: for every endpoint, streamed and not, with the backend's
// answer broken at every point (before its headers, after them, mid-body, mid-usage, after the
// usage, or too large to hold), the bill is what the client was served by the stated rules:
// the reported usage when it came; what was produced (counted with the tokenizer for OpenAI
// backends, the estimate for others) when a stream broke before its usage; nothing when
// nothing was served (a broken JSON answer reached nobody: 502, refunded). Never more than
// the reservation; the books balance after every case.
func TestBillMatchesWhatWasServed(t *testing.T) {
	defer caddymodule.SetMaxBufferedResponse(16 << 10)()
	const in, out = "1000", "5000"
	type target struct {
		path, body  string // body: a format with the model name
		stream      bool
		style, kind string
		family      metering.Family
	}
	targets := []target{
		{"/v1/chat/completions", `{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":50}`, false, "openai", "chat", metering.FamilyOpenAI},
		{"/v1/chat/completions", `{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":50,"stream":true}`, true, "openai", "chat", metering.FamilyOpenAI},
		{"/v1/embeddings", `{"model":"%s","input":"hello there"}`, false, "openai", "embeddings", metering.FamilyOpenAI},
		{"/v1/completions", `{"model":"%s","prompt":"hi","max_tokens":50}`, false, "openai", "chat", metering.FamilyOpenAI},
		{"/v1/completions", `{"model":"%s","prompt":"hi","max_tokens":50,"stream":true}`, true, "openai", "chat", metering.FamilyOpenAI},
		{"/v1/responses", `{"model":"%s","input":"hi","max_output_tokens":50}`, false, "openai", "chat", metering.FamilyOpenAI},
		{"/v1/responses", `{"model":"%s","input":"hi","max_output_tokens":50,"stream":true}`, true, "openai", "chat", metering.FamilyOpenAI},
		{"/api/embed", `{"model":"%s","input":"hello there"}`, false, "ollama", "embeddings", metering.FamilyEstimate},
		{"/api/chat", `{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":50}}`, false, "ollama", "chat", metering.FamilyEstimate},
		{"/api/chat", `{"model":"%s","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":50}}`, true, "ollama", "chat", metering.FamilyEstimate},
		{"/api/generate", `{"model":"%s","prompt":"hi","stream":false,"options":{"num_predict":50}}`, false, "ollama", "chat", metering.FamilyEstimate},
		{"/api/generate", `{"model":"%s","prompt":"hi","options":{"num_predict":50}}`, true, "ollama", "chat", metering.FamilyEstimate},
		{"/v1/messages", `{"model":"%s","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}`, false, "anthropic", "chat", metering.FamilyEstimate},
		{"/v1/messages", `{"model":"%s","max_tokens":50,"messages":[{"role":"user","content":"hi"}],"stream":true}`, true, "anthropic", "chat", metering.FamilyEstimate},
	}
	// One backend (its own server, so that Caddy's passive health checks of one address do
	// not see the other targets' faults) and one model per target.
	gateway := `
		on_disconnect stop`
	for i, tg := range targets {
		gateway += fmt.Sprintf(`
		backend b%d {
			url %s
			style %s
			health_check {
				disabled
			}
			model m%d {
				kind %s
				input_price %s
				output_price %s
			}
		}`, i, faultyBackend(t).URL, tg.style, i, tg.kind, in, out)
		targets[i].body = fmt.Sprintf(tg.body, "m"+strconv.Itoa(i))
	}
	e := startGateway(t, setup{gateway: gateway})
	u, k := e.userWithKey("faults@example.com", "1000")
	usageCost := func(outTokens int64) credits.Amount { return cost(t, 11, outTokens, in, out) }

	for _, tg := range targets {
		embeddings := tg.kind == "embeddings"
		outBound := int64(50)
		if embeddings {
			outBound = 0
		}
		reserved := cost(t, inputBound(tg.body), outBound, in, out)
		// produced is the bill of a stream that broke after n content messages.
		produced := func(n int) credits.Amount {
			var text strings.Builder
			for i := range n {
				text.WriteString(" w" + strconv.Itoa(i))
			}
			outTokens := metering.CountTokens(tg.family, []byte(text.String()), int64(n))
			if tg.family == metering.FamilyEstimate {
				outTokens = metering.EstimateTokens(int64(text.Len()), int64(n))
			}
			if tg.path == "/v1/messages" {
				// Anthropic's stated rule: the input of message_start, the output at least
				// its placeholder and what was produced.
				return cost(t, 11, min(max(outTokens, 1), outBound), in, out)
			}
			return cost(t, min(metering.CountTokens(tg.family, []byte(tg.body), 1), inputBound(tg.body)), min(outTokens, outBound), in, out)
		}
		full := usageCost(faultyChunks)
		if embeddings {
			full = usageCost(0)
		}
		for _, fault := range []faultPoint{faultNone, faultBeforeHeaders, faultAfterHeaders, faultMidBody, faultMidUsage, faultAfterUsage, faultOversized} {
			if fault == faultAfterUsage && !tg.stream {
				continue // a whole document is the usage's end
			}
			name := fmt.Sprintf("%s stream=%v fault=%q", tg.path, tg.stream, fault)
			var (
				wantStatus = http.StatusOK
				wantBill   credits.Amount
			)
			switch {
			case fault == faultNone, fault == faultOversized, fault == faultAfterUsage:
				wantBill = full
			case fault == faultBeforeHeaders:
				wantStatus = http.StatusBadGateway
			case !tg.stream:
				wantStatus = http.StatusBadGateway // a broken document reached nobody
			case fault == faultAfterHeaders:
				wantBill = 0 // headers only: nothing was produced
			case fault == faultMidBody:
				wantBill = produced(faultyChunks / 2)
			case fault == faultMidUsage:
				wantBill = produced(faultyChunks)
			}
			before := e.settledAudit(u.ID)
			resp, err := e.client.Do(e.newRequest(t.Context(), http.MethodPost, e.gw+tg.path, tg.body,
				map[string]string{"Authorization": "Bearer " + k.Key, "X-Fault": string(fault)}))
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			served, _ := io.ReadAll(bufio.NewReader(resp.Body))
			resp.Body.Close()
			if resp.StatusCode != wantStatus {
				t.Errorf("%s: status %d, want %d: %.300s", name, resp.StatusCode, wantStatus, served)
			}
			a := e.settledAudit(u.ID)
			bill := before.Balance - a.Balance
			if bill != wantBill || bill > reserved {
				t.Errorf("%s: billed %s, want %s (reserved %s); served %d bytes", name, bill, wantBill, reserved, len(served))
			}
			if a.Credited != a.Balance+a.Settled+a.Open || a.Balance < 0 {
				t.Fatalf("%s: books %+v", name, a)
			}
		}
	}
	e.checkAllAccounts(0)
}
