package main

import (
	"context"
	"fmt"
	"net/http"
	"time"
)

// The Messages and Responses rows: /v1/messages through a gateway whose backend is the mock in
// the Anthropic style, and /v1/responses through the gateway in front of the mock (OpenAI
// style), each beside plain Caddy in front of the same mock, in interleaved rounds: non-
// streaming throughput at c=conc and time to first token at c=1.

// surfaceTargets are the four targets, in the report's order: plain Caddy then the gateway,
// for Messages then Responses.
func (b *bench) surfaceTargets(ctx context.Context, mock *backendSet) ([]*target, error) {
	db, err := b.freshDB("gateway-anthropic")
	if err != nil {
		return nil, err
	}
	p, err := startCaddy(ctx, b.cfg.caddyBin, b.root, "gateway-anthropic", true, func(addr, admin, dir string) string {
		return gatewayCaddyfileStore(addr, admin, dir, "bench-mock-anthropic", b.mock.addr, "anthropic", "store sqlite "+db, "")
	})
	if err != nil {
		return nil, err
	}
	key := []string{b.key}
	caddy, gateway := mock.caddy.proc, mock.gateway.proc
	return []*target{
		{name: "messages-caddy", url: caddy.baseURL() + "/v1/messages", surface: "messages", keys: key, proc: caddy},
		{name: "messages-gateway", url: p.baseURL() + "/v1/messages", surface: "messages", keys: key, proc: p},
		{name: "responses-caddy", url: caddy.baseURL() + "/v1/responses", surface: "responses", keys: key, proc: caddy},
		{name: "responses-gateway", url: gateway.baseURL() + "/v1/responses", surface: "responses", keys: key, proc: gateway},
	}, nil
}

// surfaces measures the targets in interleaved rounds: throughput at c=conc, TTFT at c=1.
func (b *bench) surfaces(ctx context.Context, targets []*target) error {
	cfg, res := b.cfg, b.res
	clients := map[string]*http.Client{}
	for _, t := range targets {
		if err := smoke(ctx, t); err != nil {
			return err
		}
		clients[t.name] = newClient(2*cfg.conc, 60*time.Second)
		defer clients[t.name].CloseIdleConnections()
	}
	ttftMax := max(30*time.Second, 4*cfg.surfaceDur)
	logln("warming up Messages and Responses")
	for _, t := range targets {
		runLoad(ctx, clients[t.name], t, cfg.conc, min(time.Second, cfg.surfaceDur), cfg.maxRequests, false)
		runTTFT(ctx, clients[t.name], t, 10, warmTime)
	}
	for r := 0; r < cfg.rounds; r++ {
		for _, t := range rotate(targets, r) {
			if err := ctx.Err(); err != nil {
				return err
			}
			cl := clients[t.name]
			tp := runLoad(ctx, cl, t, cfg.conc, cfg.surfaceDur, cfg.maxRequests, false)
			res.add("rps", t.name, nanIf(tp.ok == 0, tp.rps()))
			res.fail(t.name, tp.errs, tp.firstErr)
			tt := runTTFT(ctx, cl, t, cfg.surfaceTTFTN, ttftMax)
			n := len(tt.ttft)
			res.add("ttft50", t.name, nanIf(n == 0, ms(pct(tt.ttft, .50))))
			res.add("ttft99", t.name, nanIf(n == 0, ms(pct(tt.ttft, .99))))
			res.fail(t.name, tt.errs, tt.firstErr)
			logln(fmt.Sprintf("round %d %-19s %8.0f req/s (c=%d)  TTFT p50 %.3f ms (%d streams)  errors %d",
				r+1, t.name, tp.rps(), cfg.conc, ms(pct(tt.ttft, .5)), n, tp.errs+tt.errs))
		}
	}
	return nil
}
