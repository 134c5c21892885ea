package caddymodule_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/mockbackend"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
)

// TestClientDisconnectStopsTheModel: with on_disconnect stop (the default), a client that goes
// away after 3 chunks of a slow 40-chunk stream stops the backend at once and is charged what
// was produced up to then, counted with the OpenAI tokenizer (the prompt: the request body),
// not the whole answer; the reservation is closed and the gauges return to 0.
func TestClientDisconnectStopsTheModel(t *testing.T) {
	const in, out = "1000", "3000"
	e := startGateway(t, setup{
		gateway: backendBlock("slow", "slow", "mock-small", in, out),
		mocks:   []mockSpec{{key: "slow", lines: "models mock-small"}},
	})
	const initial = "50"
	u, k := e.userWithKey("stopper@example.com", initial)
	body := `{"model":"mock-small","messages":[{"role":"user","content":"tell me a long story"}],"max_tokens":100,"stream":true}`
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp, err := e.client.Do(e.newRequest(ctx, http.MethodPost, e.gw+"/v1/chat/completions", body, map[string]string{
		"Authorization": "Bearer " + k.Key, "X-Mock-Chunks": "40", "X-Mock-Chunk-Interval": "50ms", "X-Mock-Completion-Tokens": "40"}))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %v %v", resp, err)
	}
	rd := bufio.NewReader(resp.Body)
	for got := 0; got < 3; {
		line, err := rd.ReadString('\n')
		if err != nil {
			t.Fatalf("reading event %d: %v", got+1, err)
		}
		if strings.HasPrefix(line, "data: ") {
			got++
		}
	}
	resp.Body.Close()
	cancel()
	a := e.settledAudit(u.ID)
	st := e.settlements(u.ID)
	if len(st) != 1 || st[0].Usage == nil {
		t.Fatalf("%d settlements after the disconnect, want 1: %+v", len(st), st)
	}
	// The client read 3 chunks; the gateway may have passed on a few more before it noticed.
	// The full answer (40 chunks, 2 s) would be tok1 ... tok40.
	wantIn := metering.CountTokens(metering.FamilyOpenAI, []byte(body), 1)
	lo := metering.CountTokens(metering.FamilyOpenAI, []byte(tokens(3)), 3)
	hi := metering.CountTokens(metering.FamilyOpenAI, []byte(tokens(12)), 12)
	u0 := st[0].Usage
	if u0.InputTokens != wantIn || u0.OutputTokens < lo || u0.OutputTokens > hi {
		t.Errorf("the left stream settled usage %+v, want %d prompt tokens (the body, tokenized) and %d..%d output tokens (what was produced before the client left)",
			u0, wantIn, lo, hi)
	}
	if want := cost(t, u0.InputTokens, u0.OutputTokens, in, out); st[0].Amount != want {
		t.Errorf("charged %s for %+v, want %s", st[0].Amount, u0, want)
	}
	if want := credits.Amount(micro(t, initial)) - st[0].Amount; a.Balance != want {
		t.Errorf("balance %s, want %s", a.Balance, want)
	}
	// The mock stopped generating: it wrote a few chunks past the client's 3, not 40 (a count,
	// not a timing: a drained stream would have written all 40 before the settlement).
	time.Sleep(200 * time.Millisecond) // longer than a chunk interval: a running stream would have written more
	if sent := mockbackend.ChunksSent(e.mockName("slow"))["/v1/chat/completions"]; sent < 3 || sent > 12 {
		t.Errorf("the backend wrote %d chunks, want about the 3 the client read (it was not stopped)", sent)
	}
	e.expectIdleGauges("slow")

	// A client that leaves before the first byte: the backend request is cancelled, nothing
	// is charged, and no other backend is tried for nobody.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	_, err = e.client.Do(e.newRequest(ctx2, http.MethodPost, e.gw+"/v1/chat/completions", body, map[string]string{
		"Authorization": "Bearer " + k.Key, "X-Mock-Latency": "3s"}))
	if err == nil {
		t.Fatalf("a request the client gave up on answered")
	}
	if a2 := e.settledAudit(u.ID); a2.Balance != a.Balance || a2.Settled != a.Settled {
		t.Errorf("books %+v after a client left before any answer, want %+v", a2, a)
	}
	e.expectIdleGauges("slow")
	e.checkAllAccounts(0)
}

// TestClientDisconnectMidStream: with on_disconnect drain, a client that goes away after 3
// chunks of a slow stream is still charged exactly the full usage the backend reports at the
// end (the gateway drains the stream), the reservation is closed and the in-flight and stream
// gauges return to 0; a backend that cuts its stream mid-way gets the request charged for what
// was produced, once.
func TestClientDisconnectMidStream(t *testing.T) {
	const in, out = "1000", "3000"
	e := startGateway(t, setup{
		gateway: `
		on_disconnect drain
		drain_timeout 30s` + backendBlock("slow", "slow", "mock-small", in, out),
		mocks: []mockSpec{{key: "slow", lines: "models mock-small"}},
	})
	const initial = "50"
	u, k := e.userWithKey("leaver@example.com", initial)
	const messages = `[{"role":"user","content":"tell me a long story"}]` // 5 words
	body := `{"model":"mock-small","messages":` + messages + `,"max_tokens":100,"stream":true}`

	// openStream starts a stream and reads n SSE events of it.
	openStream := func(hdr map[string]string, n int) (*http.Response, *bufio.Reader, context.CancelFunc) {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		h := map[string]string{"Authorization": "Bearer " + k.Key}
		for k, v := range hdr {
			h[k] = v
		}
		resp, err := e.client.Do(e.newRequest(ctx, http.MethodPost, e.gw+"/v1/chat/completions", body, h))
		if err != nil {
			cancel()
			t.Fatalf("stream: %v", err)
		}
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			cancel()
			t.Fatalf("stream: %d %s", resp.StatusCode, b)
		}
		rd := bufio.NewReader(resp.Body)
		for got := 0; got < n; {
			line, err := rd.ReadString('\n')
			if err != nil {
				t.Fatalf("reading event %d: %v", got+1, err)
			}
			if strings.HasPrefix(line, "data: ") {
				got++
			}
		}
		return resp, rd, cancel
	}
	open := func() credits.Amount { return e.ledger(u.ID).Audit.Open }
	reserved := cost(t, inputBound(body), 100, in, out)

	// 1. The client leaves after 3 of 40 chunks (50 ms apart).
	resp, _, cancel := openStream(map[string]string{"X-Mock-Chunks": "40", "X-Mock-Chunk-Interval": "50ms",
		"X-Mock-Completion-Tokens": "40"}, 3)
	if got := open(); got != reserved {
		t.Errorf("open reservation during the stream %s, want %s", got, reserved)
	}
	resp.Body.Close()
	cancel()
	full := cost(t, 5, 40, in, out)
	a := e.settledAudit(u.ID)
	st := e.settlements(u.ID)
	if len(st) != 1 {
		t.Fatalf("%d settlements after the disconnect, want 1: %+v", len(st), st)
	}
	if st[0].Amount != full || st[0].Usage == nil || st[0].Usage.InputTokens != 5 || st[0].Usage.OutputTokens != 40 {
		t.Errorf("the left stream settled %s (usage %+v), want the full usage 5+40 = %s", st[0].Amount, st[0].Usage, full)
	}
	if want := credits.Amount(micro(t, initial)) - full; a.Balance != want {
		t.Errorf("balance %s, want %s", a.Balance, want)
	}
	e.expectIdleGauges("slow")

	// 2. The backend cuts its stream after half of its chunks.
	before := credits.Amount(micro(t, initial)) - full
	resp, rd, cancel := openStream(map[string]string{"X-Mock-Fault": "cut", "X-Mock-Chunks": "4",
		"X-Mock-Chunk-Interval": "300ms", "X-Mock-Completion-Tokens": "16"}, 1)
	if got := open(); got != reserved {
		t.Errorf("open reservation during the cut stream %s, want %s", got, reserved)
	}
	rest, err := io.ReadAll(rd)
	resp.Body.Close()
	cancel()
	t.Logf("after the cut the client read %q, err %v", truncate(string(rest), 200), err)
	if strings.Contains(string(rest), "[DONE]") {
		t.Errorf("a cut stream reached the client as complete")
	}
	// Settled (not left open until the reservation expires), exactly once.
	if ok, last := waitFor(10*time.Second, func() (bool, string) {
		a := e.ledger(u.ID).Audit
		return a.Open == 0, fmt.Sprintf("%+v", a)
	}); !ok {
		t.Errorf("the cut stream's reservation is still open 10s after the cut: %s", last)
	}
	if ok, last := e.idleGauges("slow"); !ok {
		t.Errorf("after the cut stream: %s", last)
	}
	st = e.settlements(u.ID)
	if len(st) != 2 {
		t.Fatalf("%d settlements, want 2 (the cut stream settled once): %+v", len(st), st)
	}
	charged := st[1].Amount
	if charged <= 0 || charged > reserved {
		t.Errorf("the cut stream was charged %s, want more than 0 and at most the reservation %s", charged, reserved)
	}
	a = e.settledAudit(u.ID)
	if a.Balance != before-charged {
		t.Errorf("balance %s, want %s - %s", a.Balance, before, charged)
	}
	e.checkAllAccounts(0)
}

// expectIdleGauges waits until the admin metrics show nothing in flight to backend and no
// active stream.
func (e *env) expectIdleGauges(backend string) {
	e.t.Helper()
	if ok, last := e.idleGauges(backend); !ok {
		e.t.Fatalf("gauges not back to 0: %s", last)
	}
}

// idleGauges waits (10s at most) until nothing is in flight to backend and no stream is active.
func (e *env) idleGauges(backend string) (bool, string) {
	e.t.Helper()
	return waitFor(10*time.Second, func() (bool, string) {
		s := e.scrape()
		inflight, ok1 := metricSum(s, "llm_gateway_backend_inflight_requests", map[string]string{"backend": backend})
		streams, ok2 := metricSum(s, "llm_gateway_active_streams", nil)
		return ok1 && ok2 && inflight == 0 && streams == 0,
			fmt.Sprintf("backend_inflight_requests{backend=%q} = %v (found %v), active_streams = %v (found %v)", backend, inflight, ok1, streams, ok2)
	})
}

// TestResponsesDisconnectAndFailover: on /v1/responses, a backend refusing the connection
// before the first byte fails over to the next, for a response and for a stream, charged once
// at the answering backend's price; a client that leaves a slow stream after 3 text deltas
// (on_disconnect stop) is charged what was produced before it left, by the stated rule for a
// stream cut before response.completed (the prompt and the text produced, tokenized), not the
// whole answer, and the backend is stopped. (The Messages cases are in
// TestMessagesHeadersAndFailures.)
func TestResponsesDisconnectAndFailover(t *testing.T) {
	const in, out = "1000", "3000"
	e := startGateway(t, setup{
		gateway: `
		backend dead {
			url {closed}
			health_check {
				disabled
			}
			model shared {
				input_price 500
				output_price 500
			}
		}` + backendBlock("live", "live", "shared", in, out),
		mocks: []mockSpec{{key: "live", lines: "models shared"}},
	})
	const initial = "50"
	u, k := e.userWithKey("responses-faults@example.com", initial)
	auth := bearer(k.Key)
	// failedOver is how many requests moved on from dead so far.
	failedOver := func() float64 {
		n, _ := metricSum(e.scrape(), "llm_gateway_failovers_total", map[string]string{"backend": "dead"})
		return n
	}
	failovers := failedOver()

	// A response: the cheapest backend (dead) refuses, live answers, charged its usage once:
	// "hi there" is 2 input tokens, 5 output tokens (max_output_tokens).
	r := e.post("/v1/responses", `{"model":"shared","input":"hi there","max_output_tokens":5}`, auth)
	if r.status != http.StatusOK || r.header.Get("X-Gateway-Backend") != "live" {
		t.Fatalf("after dead: %s from %q", r, r.header.Get("X-Gateway-Backend"))
	}
	a := e.settledAudit(u.ID)
	st := e.settlements(u.ID)
	if len(st) != 1 || st[0].Usage == nil || st[0].Usage.Backend != "live" || st[0].Amount != cost(t, 2, 5, in, out) {
		t.Fatalf("after the failover: settlements %+v, want one of %s by live", st, cost(t, 2, 5, in, out))
	}
	if n := e.mockCounts("live")["/v1/responses"]; n != 1 {
		t.Errorf("live got %d responses requests, want 1", n)
	}
	if n := failedOver(); n != failovers+1 {
		t.Errorf("failovers from dead %v, want %v: dead was not tried first", n, failovers+1)
	}

	// A slow stream of 40 deltas, failed over too; the client leaves after 3 deltas.
	body := `{"model":"shared","input":"tell me a long story","max_output_tokens":100,"stream":true}`
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hdr := map[string]string{"Authorization": "Bearer " + k.Key, "X-Mock-Chunks": "40", "X-Mock-Chunk-Interval": "150ms",
		"X-Mock-Completion-Tokens": "40"}
	resp, err := e.client.Do(e.newRequest(ctx, http.MethodPost, e.gw+"/v1/responses", body, hdr))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %v %v", resp, err)
	}
	if b := resp.Header.Get("X-Gateway-Backend"); b != "live" || failedOver() != failovers+2 {
		t.Errorf("the stream was answered by %q after %v failovers from dead, want live after dead", b, failedOver()-failovers-1)
	}
	rd := bufio.NewReader(resp.Body)
	for got := 0; got < 3; {
		line, err := rd.ReadString('\n')
		if err != nil {
			t.Fatalf("reading delta %d: %v", got+1, err)
		}
		if strings.HasPrefix(line, "data: ") && strings.Contains(line, `"response.output_text.delta"`) {
			got++
		}
	}
	resp.Body.Close()
	cancel()
	before := a
	a = e.settledAudit(u.ID)
	st = e.settlements(u.ID)
	if len(st) != 2 || st[1].Usage == nil {
		t.Fatalf("%d settlements after the disconnect, want 2: %+v", len(st), st)
	}
	// The client read 3 deltas; the gateway may have passed on some more before it noticed
	// (up to 20 here, 3 s on a loaded machine), not the 40 of the whole answer.
	wantIn := metering.CountTokens(metering.FamilyOpenAI, []byte(body), 1)
	lo := metering.CountTokens(metering.FamilyOpenAI, []byte(tokens(3)), 3)
	hi := metering.CountTokens(metering.FamilyOpenAI, []byte(tokens(20)), 20)
	left := st[1].Usage
	if left.Backend != "live" || left.InputTokens != wantIn || left.OutputTokens < lo || left.OutputTokens > hi {
		t.Errorf("the left stream settled %+v, want %d input tokens (the body, tokenized) and %d..%d output tokens by live",
			left, wantIn, lo, hi)
	}
	if bill := before.Balance - a.Balance; bill != cost(t, left.InputTokens, left.OutputTokens, in, out) || bill != st[1].Amount {
		t.Errorf("billed %s (entry %s) for %+v", bill, st[1].Amount, left)
	}
	if want := credits.Amount(micro(t, initial)) - st[0].Amount - st[1].Amount; a.Balance != want {
		t.Errorf("balance %s, want %s", a.Balance, want)
	}
	// The backend was stopped: it wrote a few events past the client's (4 before the first
	// delta, 3 deltas read, some in flight), not its 40 deltas and the 4 closing events.
	time.Sleep(500 * time.Millisecond) // longer than a chunk interval: a running stream would have written more
	if sent := mockbackend.ChunksSent(e.mockName("live"))["/v1/responses"]; sent > 4+20 {
		t.Errorf("the backend wrote %d stream events, want about the 4+3 the client read (it was not stopped)", sent)
	}
	e.expectIdleGauges("live")
	e.checkAllAccounts(0)
}
