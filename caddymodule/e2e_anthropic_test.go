package caddymodule_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
)

// anthropicUpstreamKey is the key the anthropic backends of these tests send and their mocks
// want (the operator's upstream key, never the caller's).
const anthropicUpstreamKey = "sk-ant-upstream-test"

// anthropicBlock is a Caddyfile anthropic backend serving one model from the mock named mock
// (which wants anthropicUpstreamKey), health checks off.
func anthropicBlock(name, mock, model, in, out string) string {
	return fmt.Sprintf(`
		backend %s {
			url {mock.%s}
			style anthropic
			api_key %s
			health_check {
				disabled
			}
			model %s {
				input_price %s
				output_price %s
			}
		}`, name, mock, anthropicUpstreamKey, model, in, out)
}

// TestAnthropicSDKClient: the official Anthropic Go SDK works against the gateway as against
// Anthropic: a message and a streamed one (accumulated), charged their usage with the cache
// counts (input = input_tokens + cache reads + cache writes); count_tokens answered and not
// charged; a 402 and a 429 surface as *anthropic.Error with their StatusCode, in Anthropic's
// shape with the contract's code; the balance is the initial one less what was charged, and
// the books of every account balance.
func TestAnthropicSDKClient(t *testing.T) {
	const in, out = "1000", "3000"
	e := startGateway(t, setup{
		gateway: strings.Replace(anthropicBlock("claude", "ant", "claude-x", in, out), "output_price",
			"cached_input_price 100\n\t\t\t\tcache_write_price 1250\n\t\t\t\toutput_price", 1) +
			backendBlock("oai", "oai", "mock-small", in, out) + `
		rate_limits {
			default_tier roomy
			tier roomy {
				requests_per_minute 1000
			}
			tier trickle {
				requests_per_minute 1
			}
		}`,
		mocks: []mockSpec{
			{key: "ant", lines: "models claude-x\n\t\tchunks 3\n\t\tcache_read_tokens 4\n\t\tcache_write_tokens 2\n\t\tapi_key " + anthropicUpstreamKey},
			{key: "oai", lines: "models mock-small"},
		},
	})
	const initial = "5"
	u, k := e.userWithKey("claude@example.com", initial)
	client := anthropic.NewClient(option.WithBaseURL(e.gw), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	ctx := t.Context()
	var spent credits.Amount
	// The prompt: "be brief" (2 words) and "hello there gateway" (3), with 4 cache reads and
	// 2 cache writes.
	params := anthropic.MessageNewParams{
		Model:     "claude-x",
		MaxTokens: 5,
		System:    []anthropic.TextBlockParam{{Text: "be brief"}},
		Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("hello there gateway"))},
	}
	const prompt = 5 + 4 + 2
	// charge is what a message of out output tokens costs: 5 fresh input tokens at 1000, 4
	// cache reads at 100, 2 cache writes at 1250, the output at 3000 (per 1M).
	price := credits.Price{Input: credits.Amount(micro(t, in)), Output: credits.Amount(micro(t, out)),
		CachedInput: credits.Amount(micro(t, "100")), CacheWrite: credits.Amount(micro(t, "1250"))}
	charge := func(out int64) credits.Amount {
		c, err := price.Charge(credits.Tokens{Input: prompt, CachedInput: 4, CacheWrite: 2, Output: out})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// A message.
	var raw *http.Response
	msg, err := client.Messages.New(ctx, params, option.WithResponseInto(&raw))
	if err != nil {
		t.Fatalf("Messages.New: %v", err)
	}
	if len(msg.Content) != 1 || msg.Content[0].Text != tokens(5) || msg.StopReason != anthropic.StopReasonMaxTokens {
		t.Errorf("message %+v, want %q cut at max_tokens", msg.Content, tokens(5))
	}
	if msg.Usage.InputTokens != 5 || msg.Usage.CacheReadInputTokens != 4 || msg.Usage.CacheCreationInputTokens != 2 || msg.Usage.OutputTokens != 5 {
		t.Errorf("usage %+v", msg.Usage)
	}
	want := charge(5)
	if want == cost(t, prompt, 5, in, out) {
		t.Fatal("the cache prices make no difference: the test proves nothing")
	}
	spent += want
	if got := amountOf(t, raw.Header.Get("X-Credits-Charged")); got != want {
		t.Errorf("X-Credits-Charged %s, want %s", got, want)
	}
	if raw.Header.Get("X-Gateway-Backend") != "claude" {
		t.Errorf("answered by %q", raw.Header.Get("X-Gateway-Backend"))
	}

	// A stream, accumulated; the charge rides on message_stop.
	params.MaxTokens = 8
	stream := client.Messages.NewStreaming(ctx, params)
	var acc anthropic.Message
	var charged string
	for stream.Next() {
		ev := stream.Current()
		if err := acc.Accumulate(ev); err != nil {
			t.Fatalf("Accumulate: %v", err)
		}
		if ev.Type == "message_stop" {
			if f, ok := ev.AsMessageStop().JSON.ExtraFields["credits_charged"]; ok {
				charged = f.Raw()
			}
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	stream.Close()
	if len(acc.Content) != 1 || acc.Content[0].Text != tokens(8) || acc.Usage.OutputTokens != 8 || acc.Usage.InputTokens != 5 {
		t.Errorf("accumulated %+v, usage %+v; want %q", acc.Content, acc.Usage, tokens(8))
	}
	want = charge(8)
	spent += want
	if charged == "" || amountOf(t, charged) != want {
		t.Errorf("message_stop credits_charged %q, want %s", charged, want)
	}
	st := e.settlements(u.ID)
	for i, s := range st {
		if s.Usage == nil || s.Usage.InputTokens != prompt || s.Usage.CachedInputTokens != 4 || s.Usage.CacheWriteTokens != 2 {
			t.Errorf("settlement %d records %+v, want %d input tokens of which 4 cache reads and 2 cache writes", i, s.Usage, prompt)
		}
	}
	if len(st) != 2 || st[1].Usage == nil || st[1].Usage.OutputTokens != 8 || st[1].Amount != want {
		t.Errorf("settlements %+v, want the stream's %d+8 = %s last", st, prompt, want)
	}

	// count_tokens: answered by the backend, never charged.
	count, err := client.Messages.CountTokens(ctx, anthropic.MessageCountTokensParams{
		Model:    "claude-x",
		System:   anthropic.MessageCountTokensParamsSystemUnion{OfTextBlockArray: params.System},
		Messages: params.Messages,
	})
	if err != nil {
		t.Fatalf("CountTokens: %v", err)
	}
	if count.InputTokens != 5 {
		t.Errorf("count_tokens %d, want 5", count.InputTokens)
	}
	if st := e.settlements(u.ID); len(st) != 2 {
		t.Errorf("count_tokens was charged: %+v", st)
	}

	// A model no anthropic backend serves: mock-small is an openai backend's.
	bad := params
	bad.Model = "mock-small"
	_, err = client.Messages.New(ctx, bad)
	checkAnthropicError(t, err, http.StatusNotFound, "not_found_error", "model_not_found")

	// 402: a user without enough credits.
	_, poor := e.userWithKey("poor-claude@example.com", "0.000001")
	poorClient := anthropic.NewClient(option.WithBaseURL(e.gw), option.WithAPIKey(poor.Key), option.WithMaxRetries(0))
	_, err = poorClient.Messages.New(ctx, params)
	checkAnthropicError(t, err, http.StatusPaymentRequired, "billing_error", "insufficient_credits")

	// 429 with retry-after: a key of a tier of one request a minute, as a Bearer token.
	slow := e.createKey(u.ID, map[string]any{"rate_limit_tier": "trickle"})
	slowClient := anthropic.NewClient(option.WithBaseURL(e.gw), option.WithAuthToken(slow.Key), option.WithMaxRetries(0))
	if _, err := slowClient.Messages.CountTokens(ctx, anthropic.MessageCountTokensParams{Model: "claude-x", Messages: params.Messages}); err != nil {
		t.Fatalf("count_tokens with a Bearer token: %v", err)
	}
	_, err = slowClient.Messages.New(ctx, params)
	apiErr := checkAnthropicError(t, err, http.StatusTooManyRequests, "rate_limit_error", "rate_limit_exceeded")
	if apiErr != nil && apiErr.Response.Header.Get("Retry-After") == "" {
		t.Errorf("a 429 without retry-after: %v", apiErr.Response.Header)
	}

	// The bill: what was charged, nothing else.
	if got, want := e.balance(u.ID), credits.Amount(micro(t, initial))-spent; got != want {
		t.Errorf("balance %s, want %s - %s = %s", got, initial, spent, want)
	}
	e.checkAllAccounts(0)
}

// checkAnthropicError checks that err is an *anthropic.Error of status, in Anthropic's shape
// with error.type typ and the contract's code beside it (and in error.details.error_code).
func checkAnthropicError(t *testing.T, err error, status int, typ, code string) *anthropic.Error {
	t.Helper()
	var apiErr *anthropic.Error
	if !errors.As(err, &apiErr) {
		t.Errorf("err = %v, want an *anthropic.Error %d", err, status)
		return nil
	}
	body := decodeObject(t, apiErr.RawJSON())
	if apiErr.StatusCode != status || string(apiErr.Type()) != typ || string(apiErr.ErrorCode()) != code || body["code"] != code ||
		body["type"] != "error" {
		t.Errorf("status %d type %q error_code %q, body %s; want %d %s %s", apiErr.StatusCode, apiErr.Type(), apiErr.ErrorCode(),
			apiErr.RawJSON(), status, typ, code)
	}
	return apiErr
}

// TestMessagesHeadersAndFailures: the anthropic backend gets its own key (never the
// caller's), the client's anthropic-version and anthropic-beta or the configured version,
// and ?beta=true (other query parameters are not passed on); a backend failing before the
// first byte (connection refused) fails over to the next; a client leaving mid-stream is charged what was produced
// by the stated rule (the input of message_start, the output at least what was sent).
func TestMessagesHeadersAndFailures(t *testing.T) {
	const in, out = "1000", "3000"
	e := startGateway(t, setup{
		gateway: `
		backend dead {
			url {closed}
			style anthropic
			health_check {
				disabled
			}
			model claude-x {
				input_price 500
				output_price 500
			}
		}` + anthropicBlock("first", "first", "claude-x", in, out) + anthropicBlock("second", "second", "claude-x", "2000", out),
		mocks: []mockSpec{
			{key: "first", lines: "models claude-x\n\t\tanthropic_version 2023-06-01\n\t\tapi_key " + anthropicUpstreamKey},
			{key: "second", lines: "models claude-x\n\t\tapi_key " + anthropicUpstreamKey},
		},
	})
	const initial = "50"
	u, k := e.userWithKey("headers@example.com", initial)
	body := `{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi there"}]}`
	hdr := func(kv ...string) map[string]string {
		h := map[string]string{"X-Api-Key": k.Key}
		for i := 0; i+1 < len(kv); i += 2 {
			h[kv[i]] = kv[i+1]
		}
		return h
	}

	// The cheapest backend (dead) refuses the connection before any byte: the next answers,
	// charged once, at its price. No anthropic-version from the client: the backend's
	// configured one (the mock wants it).
	r := e.post("/v1/messages?beta=true&debug=1", body, hdr("Anthropic-Beta", "prompt-caching-2024-07-31"))
	if r.status != http.StatusOK || r.header.Get("X-Gateway-Backend") != "first" {
		t.Fatalf("without anthropic-version, after dead: %s from %q", r, r.header.Get("X-Gateway-Backend"))
	}
	a := e.settledAudit(u.ID)
	if st := e.settlements(u.ID); len(st) != 1 || st[0].Usage.Backend != "first" || st[0].Amount != cost(t, 2, 5, in, out) {
		t.Errorf("after the failover: settlements %+v, want one of %s by first", st, cost(t, 2, 5, in, out))
	}
	// The client's own version is passed on, not replaced: the first mock refuses it (a 4xx
	// of the backend is its answer, passed on and not charged).
	r = e.post("/v1/messages", body, hdr("Anthropic-Version", "2099-01-01"))
	if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), "anthropic-version") {
		t.Errorf("with the client's anthropic-version: %s, want the backend's 400", r)
	}

	if b := e.settledAudit(u.ID); b.Balance != a.Balance {
		t.Errorf("a refused request was charged: %+v, before %+v", b, a)
	}

	// A client leaving after 3 deltas of a slow 40-delta stream: charged the 2 prompt
	// tokens of message_start and the deltas that were produced, not the 40.
	streamBody := `{"model":"claude-x","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi there"}]}`
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp, err := e.client.Do(e.newRequest(ctx, http.MethodPost, e.gw+"/v1/messages", streamBody, hdr(
		"X-Mock-Chunks", "40", "X-Mock-Chunk-Interval", "50ms", "X-Mock-Completion-Tokens", "40")))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %v %v", resp, err)
	}
	rd := bufio.NewReader(resp.Body)
	for got := 0; got < 3; {
		line, err := rd.ReadString('\n')
		if err != nil {
			t.Fatalf("reading delta %d: %v", got+1, err)
		}
		if strings.HasPrefix(line, "data: ") && strings.Contains(line, `"content_block_delta"`) {
			got++
		}
	}
	resp.Body.Close()
	cancel()
	before := a
	a = e.settledAudit(u.ID)
	st := e.settlements(u.ID)
	last := st[len(st)-1]
	// The deltas the gateway passed on before it noticed: 3 read, a few more in flight.
	lo := metering.EstimateTokens(int64(len(tokens(3))), 3)
	hi := metering.EstimateTokens(int64(len(tokens(12))), 12)
	if last.Usage == nil || last.Usage.InputTokens != 2 || last.Usage.OutputTokens < lo || last.Usage.OutputTokens > hi {
		t.Errorf("the left stream settled %+v, want 2 input tokens and %d..%d output tokens", last.Usage, lo, hi)
	}
	if bill := before.Balance - a.Balance; last.Usage != nil && bill != cost(t, 2, last.Usage.OutputTokens, in, out) {
		t.Errorf("billed %s for %+v", bill, last.Usage)
	}
	e.expectIdleGauges("first")
	e.checkAllAccounts(0)
}
