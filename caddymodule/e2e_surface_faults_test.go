package caddymodule_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// TestEveryStreamFailsOverAndBillsALeaver: on every surface that streams (routing.Surfaces),
// a backend that refuses before the first byte is failed over (the stream answered by the
// next backend, charged once at its price), and a client that leaves after 3 chunks of a slow
// stream of 40 is charged its prompt and what was produced before the backend was stopped:
// more than nothing, less than the whole answer, the amount its settle entry's usage costs.
// The books balance after all of them.
func TestEveryStreamFailsOverAndBillsALeaver(t *testing.T) {
	const in, out = "1000", "3000"
	// A streamed request per surface, model %s, an output bound of 100 (the mock answers 40).
	bodies := map[routing.Format]string{
		routing.FormatOpenAIChat:        `{"model":"%s","messages":[{"role":"user","content":"tell me a long story"}],"max_tokens":100,"stream":true}`,
		routing.FormatOpenAICompletions: `{"model":"%s","prompt":"tell me a long story","max_tokens":100,"stream":true}`,
		routing.FormatOpenAIResponses:   `{"model":"%s","input":"tell me a long story","max_output_tokens":100,"stream":true}`,
		routing.FormatAnthropicMessages: `{"model":"%s","max_tokens":100,"messages":[{"role":"user","content":"tell me a long story"}],"stream":true}`,
		routing.FormatOllamaChat:        `{"model":"%s","messages":[{"role":"user","content":"tell me a long story"}],"options":{"num_predict":100}}`,
		routing.FormatOllamaGenerate:    `{"model":"%s","prompt":"tell me a long story","options":{"num_predict":100}}`,
	}
	type target struct {
		sf    *routing.Surface
		model string
		body  string
	}
	var targets []target
	gateway := ""
	var mocks []mockSpec
	for f := range routing.Surfaces {
		sf := &routing.Surfaces[f]
		if !sf.Streams || sf.List != routing.ListNone {
			continue
		}
		body, ok := bodies[routing.Format(f)]
		if !ok {
			t.Fatalf("surface %s streams and has no body in this test: add one", sf.Name)
		}
		style := string(sf.Styles[0])
		model := fmt.Sprintf("m%d", f)
		live := fmt.Sprintf("live%d", f)
		// The dead backend is the cheaper one: tried first. Each on a closed port of its own
		// (Caddy's passive health state is per address: a shared one would be skipped).
		gateway += fmt.Sprintf(`
		backend dead%d {
			url http://127.0.0.1:%d
			style %s
			health_check {
				disabled
			}
			model %s {
				input_price 500
				output_price 500
			}
		}`, f, freePort(t), style, model)
		if style == "anthropic" {
			gateway += anthropicBlock(live, live, model, in, out)
		} else {
			gateway += strings.Replace(backendBlock(live, live, model, in, out), "health_check", "style "+style+"\n\t\t\thealth_check", 1)
		}
		mocks = append(mocks, mockSpec{key: live, lines: "models " + model})
		targets = append(targets, target{sf: sf, model: model, body: fmt.Sprintf(body, model)})
	}
	if len(targets) < 6 {
		t.Fatalf("%d streaming surfaces, want at least the 6 this test knows", len(targets))
	}
	e := startGateway(t, setup{gateway: gateway, mocks: mocks})
	u, k := e.userWithKey("leaver-everywhere@example.com", "100")

	for i, tg := range targets {
		t.Run(tg.sf.Name, func(t *testing.T) {
			live := "live" + strings.TrimPrefix(tg.model, "m")
			dead := "dead" + strings.TrimPrefix(tg.model, "m")
			failovers, _ := metricSum(e.scrape(), "llm_gateway_failovers_total", map[string]string{"backend": dead})
			before := e.settledAudit(u.ID)

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			hdr := map[string]string{"Authorization": "Bearer " + k.Key, "X-Mock-Chunks": "40",
				"X-Mock-Chunk-Interval": "150ms", "X-Mock-Completion-Tokens": "40"}
			if tg.sf.Errors == routing.ErrorsAnthropic {
				hdr["anthropic-version"] = "2023-06-01"
			}
			resp, err := e.client.Do(e.newRequest(ctx, tg.sf.Method, e.gw+tg.sf.Path, tg.body, hdr))
			if err != nil {
				t.Fatalf("stream: %v", err)
			}
			if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Gateway-Backend") != live {
				resp.Body.Close()
				t.Fatalf("stream: %d from %q, want 200 from %s after %s refused", resp.StatusCode, resp.Header.Get("X-Gateway-Backend"), live, dead)
			}
			if n, _ := metricSum(e.scrape(), "llm_gateway_failovers_total", map[string]string{"backend": dead}); n != failovers+1 {
				t.Errorf("failovers from %s: %v, want %v (it was not tried first)", dead, n, failovers+1)
			}
			// 3 chunks of text: SSE data lines or NDJSON lines that carry some of it.
			rd := bufio.NewReader(resp.Body)
			for got := 0; got < 3; {
				line, err := rd.ReadString('\n')
				if err != nil {
					t.Fatalf("reading chunk %d: %v", got+1, err)
				}
				if strings.Contains(line, "delta") || strings.Contains(line, `"text":"`) && !strings.Contains(line, `"text":""`) ||
					strings.Contains(line, `"response":"`) || strings.Contains(line, `"content":"`) && !strings.Contains(line, `"content":""`) {
					got++
				}
			}
			resp.Body.Close()
			cancel()

			var st []entry
			poll(t, 10*time.Second, "the leaver's settlement", func() (bool, string) {
				st = e.settlements(u.ID)
				return len(st) == i+1 && e.ledger(u.ID).Audit.Open == 0, fmt.Sprintf("%d settlements", len(st))
			})
			left := st[len(st)-1]
			a := e.settledAudit(u.ID)
			t.Logf("the leaver settled %s for %+v", left.Amount, left.Usage)
			if left.Usage == nil || left.Usage.Backend != live || left.Usage.InputTokens <= 0 ||
				left.Usage.OutputTokens < 1 || left.Usage.OutputTokens >= 40 {
				t.Errorf("the leaver settled %+v, want its prompt and 1..39 output tokens by %s (some of the 40 produced)", left.Usage, live)
			}
			if left.Usage != nil && left.Amount != cost(t, left.Usage.InputTokens, left.Usage.OutputTokens, in, out) {
				t.Errorf("the leaver was charged %s for %+v, want its usage at %s's prices", left.Amount, left.Usage, live)
			}
			if bill := before.Balance - a.Balance; bill != left.Amount || bill <= 0 {
				t.Errorf("billed %s, entry %s", bill, left.Amount)
			}
			if n := e.mockCounts(live)[tg.sf.Path]; n != 1 {
				t.Errorf("%s got %d requests on %s, want 1", live, n, tg.sf.Path)
			}
			e.expectIdleGauges(live)
		})
	}
	if want := credits.Amount(micro(t, "100")); e.settledAudit(u.ID).Credited != want {
		t.Errorf("credited %s, want %s", e.settledAudit(u.ID).Credited, want)
	}
	e.checkAllAccounts(0)
}
