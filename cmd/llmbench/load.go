package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// target is one thing requests are sent to.
type target struct {
	name string
	url  string // the chat completions URL (or the surface's: /v1/messages, /v1/responses)
	// urls, when set, are several processes' URLs that the requests are spread over, one after
	// the other (the multi-instance mode); url is then the first.
	urls []string
	// surface is what is sent: "" (chat completions), "messages" (Anthropic Messages) or
	// "responses" (OpenAI Responses).
	surface string
	keys    []string    // API keys sent as Authorization: Bearer, one after the other
	hdr     http.Header // more request headers (a peer's routing headers), nil for most
	proc    *proc       // the serving process, whose CPU and memory are read
}

// Every target gets the same request bytes (the mock and plain Caddy ignore the key; the
// gateway takes it off before proxying). Streams ask for the usage chunk, as the gateway does
// upstream anyway, so that every target's stream has the same messages.
var (
	chatBody = []byte(`{"model":"` + benchModel + `","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}`)
	// streamBody is chatBody with stream: true and the usage chunk.
	streamBody = []byte(`{"model":"` + benchModel + `","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}`)
	// The same request on the Messages and the Responses surfaces (not stored: the bench sends
	// tens of thousands).
	messagesBody        = []byte(`{"model":"` + benchModel + `","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}`)
	messagesStreamBody  = []byte(`{"model":"` + benchModel + `","stream":true,"messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}`)
	responsesBody       = []byte(`{"model":"` + benchModel + `","store":false,"input":"Say hello in one short sentence.","max_output_tokens":32}`)
	responsesStreamBody = []byte(`{"model":"` + benchModel + `","store":false,"stream":true,"input":"Say hello in one short sentence.","max_output_tokens":32}`)
)

// bodies are the target's non-streaming and streaming request bodies.
func (t *target) bodies() (plain, stream []byte) {
	switch t.surface {
	case "messages":
		return messagesBody, messagesStreamBody
	case "responses":
		return responsesBody, responsesStreamBody
	}
	return chatBody, streamBody
}

// streamDone reports whether data, a stream's "data:" line without its prefix, is the last
// one of the surface's streams: [DONE] for chat completions, the message_stop event for
// Messages, response.completed for Responses.
func (t *target) streamDone(data []byte) bool {
	switch t.surface {
	case "messages":
		return bytes.Contains(data, []byte(`"type":"message_stop"`))
	case "responses":
		return bytes.Contains(data, []byte(`"type":"response.completed"`))
	}
	return bytes.Equal(data, []byte("[DONE]"))
}

// newClient is a keep-alive HTTP/1.1 client that keeps up to idle connections per host.
func newClient(idle int, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        idle,
			MaxIdleConnsPerHost: idle,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
	}
}

func (t *target) request(ctx context.Context, body []byte, i int64) *http.Request {
	url := t.url
	if len(t.urls) > 0 {
		url = t.urls[int(i%int64(len(t.urls)))]
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		panic(err) // a URL we made
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range t.hdr {
		req.Header[k] = v
	}
	if len(t.keys) > 0 {
		req.Header.Set("Authorization", "Bearer "+t.keys[int(i%int64(len(t.keys)))])
	}
	return req
}

// loadResult is what a closed-loop run saw.
type loadResult struct {
	ok, errs int64
	elapsed  time.Duration
	lat      []time.Duration // sorted; only when asked for
	firstErr string
}

func (r loadResult) rps() float64 { return float64(r.ok) / r.elapsed.Seconds() }

// runLoad sends non-streaming chat completions from conc workers, each sending its next
// request when the last answer is read, until maxTime has passed or maxReq requests were sent,
// whichever comes first. Only a complete 200 answer counts as ok.
func runLoad(ctx context.Context, cl *http.Client, t *target, conc int, maxTime time.Duration, maxReq int64, keepLat bool) loadResult {
	var (
		next     atomic.Int64
		ok, errs atomic.Int64
		mu       sync.Mutex
		lat      []time.Duration
		firstErr string
		wg       sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(maxTime)
	// In-flight requests may run over the deadline by a little, never by more than 10s.
	rctx, cancel := context.WithDeadline(ctx, deadline.Add(10*time.Second))
	defer cancel()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			if keepLat {
				mine = make([]time.Duration, 0, 4096)
			}
			for rctx.Err() == nil && time.Now().Before(deadline) {
				i := next.Add(1) - 1
				if i >= maxReq {
					break
				}
				t0 := time.Now()
				err := doChat(rctx, cl, t, i)
				d := time.Since(t0)
				if err != nil {
					errs.Add(1)
					mu.Lock()
					if firstErr == "" {
						firstErr = err.Error()
					}
					mu.Unlock()
					continue
				}
				ok.Add(1)
				if keepLat {
					mine = append(mine, d)
				}
			}
			if keepLat {
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res := loadResult{ok: ok.Load(), errs: errs.Load(), elapsed: time.Since(start), firstErr: firstErr}
	if keepLat {
		slices.Sort(lat)
		res.lat = lat
	}
	if ctx.Err() != nil && res.firstErr == "" {
		res.firstErr = ctx.Err().Error()
	}
	return res
}

// doChat sends one non-streaming chat completion and reads the whole answer.
func doChat(ctx context.Context, cl *http.Client, t *target, i int64) error {
	plain, _ := t.bodies()
	resp, err := cl.Do(t.request(ctx, plain, i))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		return fmt.Errorf("%s: status %d: %s", t.name, resp.StatusCode, bytes.TrimSpace(b))
	}
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil {
		return fmt.Errorf("%s: reading the answer: %w", t.name, err)
	}
	if n == 0 {
		return fmt.Errorf("%s: empty answer", t.name)
	}
	return nil
}

// ttftResult is what a run of sequential streams saw.
type ttftResult struct {
	ttft, total []time.Duration // sorted
	errs        int64           // failed requests and truncated streams
	firstErr    string
}

// runTTFT sends up to n streamed chat completions one after the other, for at most maxTime,
// and records for each the time from sending the request to reading its first "data:" line.
// Every stream is read to its end, which must be "data: [DONE]".
func runTTFT(ctx context.Context, cl *http.Client, t *target, n int, maxTime time.Duration) ttftResult {
	var res ttftResult
	deadline := time.Now().Add(maxTime)
	rctx, cancel := context.WithDeadline(ctx, deadline.Add(10*time.Second))
	defer cancel()
	for i := 0; i < n && rctx.Err() == nil && time.Now().Before(deadline); i++ {
		first, total, err := doStream(rctx, cl, t, int64(i))
		if err != nil {
			res.errs++
			if res.firstErr == "" {
				res.firstErr = err.Error()
			}
			continue
		}
		res.ttft = append(res.ttft, first)
		res.total = append(res.total, total)
	}
	slices.Sort(res.ttft)
	slices.Sort(res.total)
	return res
}

// doStream sends one streamed chat completion and reads it to the end.
func doStream(ctx context.Context, cl *http.Client, t *target, i int64) (first, total time.Duration, err error) {
	t0 := time.Now()
	_, stream := t.bodies()
	resp, err := cl.Do(t.request(ctx, stream, i))
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		return 0, 0, fmt.Errorf("%s: stream: status %d: %s", t.name, resp.StatusCode, bytes.TrimSpace(b))
	}
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	data, done := 0, false
	for {
		line, err := br.ReadSlice('\n')
		if bytes.HasPrefix(line, []byte("data:")) {
			if data == 0 {
				first = time.Since(t0)
			}
			data++
			done = t.streamDone(bytes.TrimSpace(line[5:]))
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, 0, fmt.Errorf("%s: stream cut after %d data lines: %w", t.name, data, err)
		}
	}
	if !done {
		return 0, 0, fmt.Errorf("%s: stream ended after %d data lines without its last event", t.name, data)
	}
	return first, time.Since(t0), nil
}

// streamHold is a set of concurrent slow streams kept open.
type streamHold struct {
	opened, failed, ended atomic.Int64
	cancel                context.CancelFunc
	wg                    sync.WaitGroup
	mu                    sync.Mutex
	firstErr              string
}

// holdStreams opens n concurrent streams on t, each with the given X-Mock-* headers, and keeps
// reading them until close. A stream counts as open once its first "data:" line was read.
func holdStreams(ctx context.Context, t *target, n int, hdr http.Header) *streamHold {
	ctx, cancel := context.WithCancel(ctx)
	h := &streamHold{cancel: cancel}
	cl := newClient(n, 0) // no client timeout: cancel ends the streams
	for i := 0; i < n; i++ {
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			req := t.request(ctx, streamBody, int64(i))
			for k, v := range hdr {
				req.Header[k] = v
			}
			resp, err := cl.Do(req)
			if err != nil {
				h.fail(err)
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				h.fail(fmt.Errorf("%s: stream: status %d", t.name, resp.StatusCode))
				return
			}
			br := bufio.NewReaderSize(resp.Body, 4<<10)
			open := false
			for {
				line, err := br.ReadSlice('\n')
				if !open && bytes.HasPrefix(line, []byte("data:")) {
					open = true
					h.opened.Add(1)
				}
				if err != nil {
					if ctx.Err() == nil {
						if !open {
							h.fail(fmt.Errorf("%s: stream ended before its first data line: %w", t.name, err))
						} else {
							h.ended.Add(1) // ended (or was cut) while it should still be open
						}
					}
					return
				}
			}
		}()
	}
	return h
}

func (h *streamHold) fail(err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	h.failed.Add(1)
	h.mu.Lock()
	if h.firstErr == "" {
		h.firstErr = err.Error()
	}
	h.mu.Unlock()
}

// waitOpen waits until every stream is open or failed, for at most timeout; it reports whether
// all n are open.
func (h *streamHold) waitOpen(ctx context.Context, n int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if h.opened.Load()+h.failed.Load() >= int64(n) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return h.opened.Load() == int64(n)
}

// close cancels every stream and waits (at most 10s) for their readers to return.
func (h *streamHold) close() {
	h.cancel()
	done := make(chan struct{})
	go func() { h.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
}
