package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/metering"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// exchange is one inference request on its way through the gateway: who sent it, what was
// reserved, which backend answered, and how the answer is metered and settled.
type exchange struct {
	g       *Gateway
	ep      endpoint
	w       http.ResponseWriter
	r       *http.Request
	start   time.Time
	who     *caller
	inf     *inference
	choices []routing.Choice
	res     credits.Reservation
	limits  *admission // what the request took from its rate limits (ratelimit.go)
	outcome string
	// aborted: the backend's response broke mid-way; the client connection is aborted after
	// settlement.
	aborted bool

	// Set once a backend answers.
	choice    *routing.Choice
	mode      responseMode
	meter     *metering.StreamMeter
	document  *metering.DocumentMeter // modeLarge: the usage of a document too large to hold
	buf       bytes.Buffer
	header    http.Header // modeBuffer: the backend's headers, passed on with the document
	docUsage  metering.Usage
	docOK     bool // modeBuffer: the document reported its usage
	firstByte time.Time
	noted     bool // the answer's response id is remembered (responses.go)

	mu      sync.Mutex // guards settled, gone, stop, and writes to w after the client left
	settled bool
	gone    bool
	// defaulted are the request fields set from a backend's defaults (not the client's), which
	// the next backend's defaults replace.
	defaulted map[string]bool
	// stop cancels the backend request (on_disconnect stop, for a streamed answer).
	stop      context.CancelFunc
	charged   credits.Amount
	remaining credits.Amount
	usage     metering.Usage
}

// responseMode is how a backend's answer travels to the client.
type responseMode int

const (
	modeNone        responseMode = iota
	modeStream                   // SSE or NDJSON: passed on as it comes, metered on the way
	modeBuffer                   // one JSON document: held until complete to put the charge in the headers
	modeLarge                    // a document too large to hold: passed on as it comes, its usage read on the way
	modePassthrough              // an error answer of the backend: passed on, nothing charged
)

// maxBufferedResponse bounds a non-streaming answer held to read its usage (a variable for
// tests); a larger one is passed on as it comes (modeLarge).
var maxBufferedResponse = 32 << 20

// proxy tries the ranked backends in order until one answers, never re-sending the request
// after a byte of an answer went to the client, and settles the reservation exactly once.
func (ex *exchange) proxy() error {
	g := ex.g
	// The backend request outlives the client by at most DrainTimeout, so a stream cut by
	// the client can still be read to its usage and charged for what was produced.
	ctx, cancel := context.WithCancel(context.WithoutCancel(ex.r.Context()))
	defer cancel()
	if ex.inf.stream && g.OnDisconnect == onDisconnectStop {
		ex.stop = cancel
	}
	stopWatch := context.AfterFunc(ex.r.Context(), func() {
		ex.mu.Lock()
		ex.gone = true
		stop := ex.stop
		ex.mu.Unlock()
		if stop != nil {
			stop() // on_disconnect stop: the model stops, and so does the billing
			return
		}
		time.AfterFunc(time.Duration(g.DrainTimeout), cancel)
	})
	defer stopWatch()
	stripCredentials(ex.r.Header)

	var lastErr error
	for i := range ex.choices {
		c := &ex.choices[i]
		b := g.Backends[c.Backend]
		body := ex.inf.body(c.Model.Upstream)
		aw := &attemptWriter{ex: ex, hdr: http.Header{}}
		actx, acancel := context.WithTimeout(ctx, time.Duration(b.Timeout))
		req := ex.r.WithContext(actx)
		req.URL = cloneURL(ex.r.URL)
		req.URL.Path = b.base + ex.r.URL.Path
		req.URL.RawPath = ""
		req.URL.RawQuery = upstreamQuery(b, ex.ep.surface().Query, ex.r.URL.Query())
		req.Body = readCloser{bytes.NewReader(body)}
		req.ContentLength = int64(len(body))
		// The request's own header map: it is this handler's to change (Caddy's access log
		// took its copy before), and the reverse proxy copies it for each attempt.
		req.Header = ex.r.Header
		req.Header.Set("Content-Length", strconv.Itoa(len(body)))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept-Encoding", "identity")
		ex.defaultHeaders(b, req.Header)
		ex.choice = c
		err := ex.attempt(b, aw, req)
		acancel()
		if aw.encoded {
			err = errEncodedAnswer
		}
		if ex.mode == modeBuffer && !ex.wholeDocument(err) {
			// Cut or malformed: nothing reached the client, so it is no answer at all.
			ex.mode, ex.buf, ex.header = modeNone, bytes.Buffer{}, nil
			err = errCutAnswer
		}
		if ex.mode == modeNone {
			ex.aborted = false // nothing reached the client: the next backend may still answer
			if ctx.Err() != nil {
				lastErr = errClientLeft // the client's doing, not the backend's
				break
			}
		}
		if ex.mode != modeNone {
			// This backend answered: finish with it, whatever happened after.
			ex.finish(err)
			return nil
		}
		lastErr = classifyUpstream(err)
		g.metrics.upstreamErrors.WithLabelValues(b.Name, upstreamErrorKind(lastErr, aw)).Inc()
		if i < len(ex.choices)-1 {
			g.metrics.failovers.WithLabelValues(b.Name).Inc()
		}
	}
	// No backend answered: everything is returned.
	ex.release()
	ex.choice = nil
	if lastErr == nil {
		lastErr = errNoOutput
	}
	return lastErr
}

// wholeDocument reports whether the buffered answer is one whole JSON document that came to
// its end (a backend can cut it, or end it mid-way with a Content-Length that matches), and
// reads its usage.
func (ex *exchange) wholeDocument(proxyErr error) bool {
	if proxyErr != nil {
		return false
	}
	ex.docUsage, ex.docOK = ex.ep.surface().Usage.UsageFromJSON(ex.buf.Bytes())
	ex.noteResponse(ex.docUsage.ResponseID)
	return ex.docOK || json.Valid(ex.buf.Bytes())
}

// errAborted: the reverse proxy aborted the response (the backend's stream broke after its
// headers were passed on). The client's connection is aborted too, once the request is settled.
var errAborted = errors.New("backend response aborted")

// noNext is the next handler given to a backend's reverse_proxy: it has none.
var noNext = caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })

// attempt proxies the request to one backend. Caddy's reverse proxy panics with
// http.ErrAbortHandler when a response breaks after its headers were written; that is turned
// into errAborted so the exchange can settle what was produced before the connection is aborted.
func (ex *exchange) attempt(b *Backend, aw *attemptWriter, req *http.Request) (err error) {
	inflight := ex.g.metrics.inflight.WithLabelValues(b.Name)
	inflight.Inc()
	defer inflight.Dec()
	defer func() {
		if p := recover(); p != nil {
			if p != http.ErrAbortHandler {
				panic(p)
			}
			ex.aborted = true
			err = errAborted
		}
	}()
	return b.proxy.ServeHTTP(aw, req, noNext)
}

// classifyUpstream names why an attempt produced no answer.
func classifyUpstream(err error) error {
	if errors.Is(err, errCutAnswer) || errors.Is(err, errEncodedAnswer) {
		return err
	}
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode == http.StatusGatewayTimeout {
		return errUpstreamTimeout
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return errUpstreamTimeout
	}
	return errNoOutput
}

func upstreamErrorKind(err error, aw *attemptWriter) string {
	switch {
	case errors.Is(err, errCutAnswer):
		return "cut"
	case errors.Is(err, errEncodedAnswer):
		return "encoded"
	case aw.status >= 500:
		return "status_5xx"
	case errors.Is(err, errUpstreamTimeout):
		return "timeout"
	default:
		return "connect"
	}
}

// commit is called when a backend's answer is taken: its status and headers go to the client
// (at once for streams and errors, after the body for single JSON documents).
func (ex *exchange) commit(hdr http.Header, status int) {
	ct := strings.ToLower(hdr.Get("Content-Type"))
	switch {
	case status < 200 || status > 299:
		ex.mode = modePassthrough
		ex.passHeaders(hdr)
		if cl := hdr.Get("Content-Length"); cl != "" {
			ex.w.Header().Set("Content-Length", cl)
		}
	case strings.HasPrefix(ct, "text/event-stream"):
		ex.startStream(hdr, metering.SSE)
	case strings.HasPrefix(ct, "application/x-ndjson"):
		ex.startStream(hdr, metering.NDJSON)
	default:
		ex.mode, ex.header = modeBuffer, hdr
		if n, err := strconv.Atoi(hdr.Get("Content-Length")); err == nil && n > 0 && n <= maxBufferedResponse {
			ex.buf.Grow(n)
		}
		return
	}
	ex.w.WriteHeader(status)
	ex.outcome = outcomeOf(status)
}

// startStream takes a streamed answer: metered on its way, the model family's tokenizer
// counting its text should it end without usage.
func (ex *exchange) startStream(hdr http.Header, format metering.Format) {
	ex.mode = modeStream
	ex.meter = &metering.StreamMeter{Format: format, Dialect: ex.ep.surface().Usage, OnUsage: ex.onUsage}
	if format == metering.SSE {
		ex.meter.HideUsage = !ex.inf.clientWantsUsage
		ex.meter.KeepText = ex.family() == metering.FamilyOpenAI
	}
	ex.passHeaders(hdr)
	h := ex.w.Header()
	ex.g.metrics.activeStreams.Inc()
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
}

// passHeaders sets the client's response headers from the backend's, and says which backend
// and model answered.
func (ex *exchange) passHeaders(hdr http.Header) {
	c := ex.choice
	h := ex.w.Header()
	copyBackendHeaders(h, hdr, ex.limits != nil)
	h.Set("X-Gateway-Model", c.Model.Name)
	h.Set("X-Gateway-Backend", c.BackendName)
}

// family is how the answering backend's model counts tokens.
func (ex *exchange) family() metering.Family {
	if ex.g.Backends[ex.choice.Backend].Style == routing.StyleOpenAI {
		return metering.FamilyOpenAI
	}
	return metering.FamilyEstimate
}

// body takes bytes of the answer from the backend.
func (ex *exchange) body(p []byte) {
	switch ex.mode {
	case modeStream:
		if ex.firstByte.IsZero() {
			ex.firstByte = time.Now()
		}
		_ = ex.meter.Write(clientWriter{ex}, p)
		ex.noteResponse(ex.meter.ResponseID())
	case modeBuffer:
		if ex.buf.Len()+len(p) > maxBufferedResponse {
			// Too large to hold: passed on as it comes (without the charge in the headers),
			// its usage read on the way; never free (see finish).
			ex.mode = modeLarge
			ex.document = &metering.DocumentMeter{Dialect: ex.ep.surface().Usage}
			ex.passHeaders(ex.header)
			ex.w.WriteHeader(http.StatusOK)
			ex.outcome = "ok"
			ex.document.Write(ex.buf.Bytes())
			_, _ = clientWriter{ex}.Write(ex.buf.Bytes())
			ex.buf = bytes.Buffer{}
			ex.document.Write(p)
			_, _ = clientWriter{ex}.Write(p)
			return
		}
		ex.buf.Write(p)
	case modeLarge:
		ex.document.Write(p)
		_, _ = clientWriter{ex}.Write(p)
	case modePassthrough:
		_, _ = clientWriter{ex}.Write(p)
	}
}

// finish completes an answered request: the rest of the stream, or the buffered document with
// the charge in its headers, and the settlement if the usage message did not already make it.
// Once any of the answer went to the client, the reservation is never released: the request
// is charged its usage, or what it produced, or (a large document without usage) all of it.
func (ex *exchange) finish(proxyErr error) {
	switch ex.mode {
	case modeStream:
		_ = ex.meter.Flush(clientWriter{ex})
		ex.g.metrics.activeStreams.Dec()
		if u, ok := ex.meter.Usage(); ok {
			if !ex.meter.Done() {
				// Cut before its last event: the provider tool calls made after the last usage
				// read are unknown, and billed by the provider all the same: their bound.
				for c, bound := range ex.inf.toolBounds {
					u.ToolCalls[c] = max(u.ToolCalls[c], bound)
				}
			}
			ex.settle(u, true) // no-op when OnUsage already settled
		} else {
			ex.settleProduced(ex.meter.ProducedTokens(ex.family()))
		}
		ex.flushClient()
	case modeBuffer:
		if ex.docOK {
			ex.settle(ex.docUsage, true)
		} else {
			ex.settleProduced(metering.EstimateTokens(int64(ex.buf.Len()), 1))
		}
		ex.passHeaders(ex.header)
		h := ex.w.Header()
		h.Set("X-Credits-Charged", ex.charged.String())
		h.Set("X-Credits-Remaining", ex.remaining.String())
		h.Set("Content-Length", strconv.Itoa(ex.buf.Len()))
		ex.w.WriteHeader(http.StatusOK)
		ex.outcome = "ok"
		_, _ = clientWriter{ex}.Write(ex.buf.Bytes())
	case modeLarge:
		if u, ok := ex.document.Usage(); ok && proxyErr == nil {
			ex.noteResponse(u.ResponseID)
			ex.settle(u, true)
		} else {
			ex.settleReserved()
		}
	case modePassthrough:
		ex.release()
	}
	if ex.clientGone() && ex.outcome == "ok" {
		ex.outcome = "client_gone"
	}
	if proxyErr != nil && (ex.mode == modeStream || ex.mode == modeLarge) {
		ex.g.logger.Debug("backend answer ended with an error", zap.String("backend", ex.choice.BackendName), zap.Error(proxyErr))
	}
}

// onUsage settles from a stream's usage message, and returns the fields added to it.
func (ex *exchange) onUsage(u metering.Usage) []byte {
	ex.settle(u, true)
	return []byte(`"credits_charged":` + ex.charged.String() + `,"credits_remaining":` + ex.remaining.String())
}

// settleProduced settles an answer that reported no usage: the prompt counted with the model
// family's tokenizer (the whole request body, at most its bound) and out output tokens (at
// most the output bound), never more than was reserved; nothing when nothing was produced.
func (ex *exchange) settleProduced(out int64) {
	if out == 0 {
		ex.release()
		return
	}
	in := min(metering.CountTokens(ex.family(), ex.inf.raw, 1), ex.inf.inputBound)
	// The provider tool calls it made are unknown: the provider bills them whether the answer
	// reached its end or not, so they are charged at their bound.
	ex.settle(metering.Usage{InputTokens: in, OutputTokens: min(out, ex.inf.outputTotal()), ToolCalls: ex.inf.toolBounds}, false)
}

// settleReserved charges the whole reservation: an answer that went to the client but whose
// usage cannot be known.
func (ex *exchange) settleReserved() {
	// Every prompt token is taken to be of the dearest input kind, as the reservation did.
	u := metering.Usage{InputTokens: ex.inf.inputBound, OutputTokens: ex.inf.outputTotal(), ToolCalls: ex.inf.toolBounds}
	switch p := ex.choice.Model.Price; max(p.Input, p.CachedInput, p.CacheWrite) {
	case p.Input:
	case p.CacheWrite:
		u.CacheWriteTokens = u.InputTokens
	default:
		u.CachedInputTokens = u.InputTokens
	}
	ex.settle(u, false)
}

// settle charges the reservation for what was used, exactly once.
func (ex *exchange) settle(u metering.Usage, reported bool) {
	ex.mu.Lock()
	defer ex.mu.Unlock()
	if ex.settled {
		return
	}
	ex.settled = true
	ex.usage = u
	if ex.res.ID == "" {
		return // a free route (count_tokens): nothing was reserved, nothing is charged
	}
	c := ex.choice
	cost, err := c.Model.Price.Charge(credits.Tokens{Input: u.InputTokens, Output: u.OutputTokens,
		CachedInput: u.CachedInputTokens, CacheWrite: u.CacheWriteTokens})
	if err == nil {
		var fees credits.Amount
		if fees, err = ex.toolFees(u.ToolCalls); err == nil {
			cost, err = cost.Add(fees)
		}
	}
	if err != nil {
		cost = ex.res.Amount // absurd usage: charge what was reserved, never more
	}
	// The reservation bounds what a request costs: a backend reporting more (it ignored the
	// output bound, or the prompt was dearer than its bound) is charged the reservation, and
	// the rest is counted as unbilled, so no balance ever goes below zero.
	unbilled := max(cost-ex.res.Amount, 0)
	cost -= unbilled
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	balance, err := ex.g.store.ledger.Settle(ctx, ex.res.ID, cost, credits.Usage{
		Model: c.Model.Name, Backend: c.BackendName, InputTokens: u.InputTokens, OutputTokens: u.OutputTokens,
		CachedInputTokens: u.CachedInputTokens, CacheWriteTokens: u.CacheWriteTokens, ReasoningTokens: u.ReasoningTokens,
		ResponseID: u.ResponseID,
	})
	if err != nil {
		// Logged once here. A store that could not take it (unreachable) gets it again in the
		// background until it answers (retriedLedger, store.go); else the reservation stays
		// open and expires, uncharged.
		ex.g.logger.Error("settling a reservation", zap.String("reservation", ex.res.ID), zap.Error(err))
		return
	}
	ex.charged, ex.remaining = cost, balance
	m := ex.g.metrics
	creditsSettled.Add(cost.Credits())
	creditsRefunded.Add(max(ex.res.Amount-cost, 0).Credits())
	if unbilled > 0 {
		creditsUnbilled.Add(unbilled.Credits())
		ex.g.logger.Warn("backend reported usage above the reservation: charged the reservation",
			zap.String("backend", c.BackendName), zap.String("model", c.Model.Name),
			zap.Int64("input_tokens", u.InputTokens), zap.Int64("output_tokens", u.OutputTokens),
			zap.String("unbilled", unbilled.String()))
	}
	m.tokens.WithLabelValues(c.Model.Name, c.BackendName, "input").Add(float64(u.InputTokens))
	m.tokens.WithLabelValues(c.Model.Name, c.BackendName, "output").Add(float64(u.OutputTokens))
	m.charged.WithLabelValues(c.Model.Name, c.BackendName).Add(cost.Credits())
}

// toolFees is what the provider tool calls of an answer cost on the answering model: each
// counter's calls at the dearest fee the request named for it (calls of a counter it named
// none for cannot have been made, and are not priced).
func (ex *exchange) toolFees(calls metering.ToolCalls) (credits.Amount, error) {
	var sum credits.Amount
	for counter, n := range calls {
		fees := ex.inf.toolFees[counter]
		if n == 0 || len(fees) == 0 {
			continue
		}
		price, _ := ex.choice.Model.ToolPrice(fees)
		c, err := price.Times(n)
		if err != nil {
			return 0, err
		}
		if sum, err = sum.Add(c); err != nil {
			return 0, err
		}
	}
	return sum, nil
}

// release returns the whole reservation, exactly once.
func (ex *exchange) release() {
	ex.mu.Lock()
	defer ex.mu.Unlock()
	if ex.settled || ex.res.ID == "" {
		return
	}
	ex.settled = true
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	balance, err := ex.g.store.ledger.Release(ctx, ex.res.ID)
	if err != nil {
		ex.g.logger.Error("releasing a reservation", zap.String("reservation", ex.res.ID), zap.Error(err))
		return
	}
	ex.remaining = balance
	creditsRefunded.Add(ex.res.Amount.Credits())
}

func (ex *exchange) clientGone() bool {
	ex.mu.Lock()
	defer ex.mu.Unlock()
	return ex.gone
}

func (ex *exchange) flushClient() {
	if !ex.clientGone() {
		_ = http.NewResponseController(ex.w).Flush()
	}
}

// authKind is the caller's kind for metric labels.
func (ex *exchange) authKind() string {
	if ex.who == nil {
		return "none"
	}
	return ex.who.kind
}

// record counts the request in the metrics.
func (ex *exchange) record() {
	model, backend := "none", "none"
	if ex.choice != nil {
		model, backend = ex.choice.Model.Name, ex.choice.BackendName
	}
	if ex.outcome == "" {
		ex.outcome = "ok"
	}
	m := ex.g.metrics
	m.requests.WithLabelValues(ex.ep.String(), model, backend, ex.authKind(), ex.outcome).Inc()
	m.duration.WithLabelValues(ex.ep.String(), ex.outcome).Observe(time.Since(ex.start).Seconds())
	if !ex.firstByte.IsZero() {
		m.ttft.WithLabelValues(model, backend).Observe(ex.firstByte.Sub(ex.start).Seconds())
	}
	ex.logFields()
}

func outcomeOf(status int) string {
	if status >= 200 && status < 300 {
		return "ok"
	}
	if status >= 500 {
		return "upstream_error"
	}
	return "upstream_client_error"
}

// attemptWriter is the ResponseWriter one backend attempt writes to. A 5xx answer is held
// back (another backend may be tried); any other answer is committed to the client.
type attemptWriter struct {
	ex      *exchange
	hdr     http.Header
	status  int
	failed  bool // the answer was a 5xx, or compressed, held back for failover
	encoded bool // the answer was compressed although identity was asked for
}

func (a *attemptWriter) Header() http.Header { return a.hdr }

func (a *attemptWriter) WriteHeader(status int) {
	if a.status != 0 || status < 200 {
		return // informational answers are not passed on
	}
	a.status = status
	if status >= 500 {
		// Held back: the next backend is tried, or, after the last, the gateway answers
		// 502 upstream_error itself (with everything reserved returned).
		a.failed = true
		return
	}
	if ce := a.hdr.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		// Asked for identity, answered compressed: unreadable to the meter, so no answer
		// (the next backend is tried; after the last, 502 with everything returned).
		a.failed, a.encoded = true, true
		return
	}
	a.ex.commit(a.hdr, status)
}

func (a *attemptWriter) Write(p []byte) (int, error) {
	if a.status == 0 {
		a.WriteHeader(http.StatusOK)
	}
	if !a.failed {
		a.ex.body(p)
	}
	return len(p), nil
}

// FlushError flushes a streamed answer to the client.
func (a *attemptWriter) FlushError() error {
	if a.ex.mode == modeStream || a.ex.mode == modePassthrough {
		a.ex.flushClient()
	}
	return nil
}

// clientWriter writes to the client until it goes away, then discards, so the backend's
// answer can still be read to its end (and its usage) after the client left.
type clientWriter struct{ ex *exchange }

func (c clientWriter) Write(p []byte) (int, error) {
	ex := c.ex
	ex.mu.Lock()
	gone := ex.gone
	ex.mu.Unlock()
	if gone {
		return len(p), nil
	}
	if _, err := ex.w.Write(p); err != nil {
		ex.mu.Lock()
		ex.gone = true
		ex.mu.Unlock()
	}
	return len(p), nil
}

// credentialHeaders are never sent to a backend (its own credentials are set per backend).
var credentialHeaders = []string{"Authorization", "X-Api-Key", "Apikey", "Cookie", "Redirect", "X-Max-Price", "Proxy-Authorization"}

func stripCredentials(h http.Header) {
	for _, k := range credentialHeaders {
		h.Del(k)
	}
	stripClientContext(h)
}

// defaultHeaders sets on h, the request to backend b, b's default fields (an anthropic
// backend's anthropic-version) that the client did not send itself.
func (ex *exchange) defaultHeaders(b *Backend, h http.Header) {
	for k, v := range b.defaults {
		if h.Get(k) != "" && !ex.defaulted[k] {
			continue // the client's own value
		}
		h.Set(k, v)
		if ex.defaulted == nil {
			ex.defaulted = map[string]bool{}
		}
		ex.defaulted[k] = true
	}
}

type readCloser struct{ *bytes.Reader }

func (readCloser) Close() error { return nil }
