package caddymodule_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// scripted is a model backend written for these tests (not the mock): every answer is one
// OpenAI chat completion whose usage, size and faults the request's X-Script-* headers say,
// so that a test can make a backend report more than it was allowed, answer huge, cut its
// JSON, or compress against the request.
//
//	X-Script-Usage  "in,out" reported as prompt_tokens and completion_tokens; "none": no usage
//	X-Script-Pad    bytes of content in the answer
//	X-Script-Fault  "truncate" (a complete HTTP answer with cut JSON), "gzip" (compressed
//	                whatever Accept-Encoding says), "500"
type scripted struct {
	srv      *httptest.Server
	requests atomic.Int64
	lastBody atomic.Pointer[[]byte]
	lastAE   atomic.Pointer[string]
}

func newScripted(t testing.TB) *scripted {
	s := &scripted{}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		body, _ := io.ReadAll(r.Body)
		s.lastBody.Store(&body)
		ae := r.Header.Get("Accept-Encoding")
		s.lastAE.Store(&ae)
		pad := 0
		if v := r.Header.Get("X-Script-Pad"); v != "" {
			pad, _ = strconv.Atoi(v)
		}
		doc := `{"id":"chatcmpl-s","object":"chat.completion","model":"s","choices":[{"index":0,"message":{"role":"assistant","content":"` +
			strings.Repeat("a", pad) + `"},"finish_reason":"stop"}]`
		if u := r.Header.Get("X-Script-Usage"); u != "none" {
			in, out, _ := strings.Cut(u, ",")
			if in == "" {
				in, out = "3", "2"
			}
			doc += `,"usage":{"prompt_tokens":` + in + `,"completion_tokens":` + out + `,"total_tokens":0}`
		}
		doc += "}"
		w.Header().Set("Content-Type", "application/json")
		switch r.Header.Get("X-Script-Fault") {
		case "truncate":
			doc = doc[:len(doc)/2]
		case "gzip":
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			_, _ = zw.Write([]byte(doc))
			_ = zw.Close()
			w.Header().Set("Content-Encoding", "gzip")
			doc = b.String()
		case "500":
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, `{"error":{"message":"scripted"}}`)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(doc)))
		_, _ = io.WriteString(w, doc)
	}))
	t.Cleanup(s.srv.Close)
	return s
}

// block is the scripted backend's backend block.
func (s *scripted) block(name, model, in, out string) string {
	return fmt.Sprintf(`
		backend %s {
			url %s
			health_check {
				disabled
			}
			model %s {
				input_price %s
				output_price %s
			}
		}`, name, s.srv.URL, model, in, out)
}

// TestReservationBoundsTheCost: what a request reserves is the most it can cost (the whole
// body, images, every choice of n), and a backend reporting more than that is charged the
// reservation, not more: no balance goes below zero.
func TestReservationBoundsTheCost(t *testing.T) {
	const in, out = "1", "1000" // micro-credits: one a prompt token, a thousand an output token
	sc := newScripted(t)
	e := startGateway(t, setup{gateway: sc.block("s", "s-model", in, out)})
	required := func(r *response) credits.Amount {
		t.Helper()
		eo := errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
		return amountOf(t, eo["details"].(map[string]any)["required"])
	}
	u, k := e.userWithKey("bound@example.com", "1")

	// n multiplies the output: 128 choices of 10 tokens cost 1.28 credits of output at most,
	// more than the balance of 1: refused before anything is forwarded.
	body := `{"model":"s-model","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"n":128}`
	r := e.post("/v1/chat/completions", body, bearer(k.Key))
	if got, want := required(r), cost(t, inputBound(body), 10*128, in, out); got != want {
		t.Errorf("n=128: required %s, want %s (the prompt bound and 128 choices of 10 tokens)", got, want)
	}
	for _, bad := range []string{`"n":129`, `"n":0`, `"best_of":1000`, `"n":1.5`, `"n":"2"`} {
		r := e.post("/v1/chat/completions", `{"model":"s-model","messages":[{"role":"user","content":"hi"}],`+bad+`}`, bearer(k.Key))
		errorOf(t, r, http.StatusBadRequest, "invalid_request")
	}
	if sc.requests.Load() != 0 {
		t.Fatalf("the backend got %d requests, want 0", sc.requests.Load())
	}

	// Everything in the body is in the prompt bound: tools, response_format, images (each at
	// the image rate, whatever its URL's length).
	tools := `[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"x":{"type":"string","description":"` + strings.Repeat("d", 5000) + `"}}}}}]`
	image := `{"type":"image_url","image_url":{"url":"https://example.com/a.png"}}`
	body = `{"model":"s-model","max_tokens":1000,"tools":` + tools + `,"response_format":{"type":"json_object"},` +
		`"messages":[{"role":"user","content":[{"type":"text","text":"what is this"},` + image + `,` + image + `]}]}`
	if got, want := required(e.post("/v1/chat/completions", body, bearer(k.Key))), cost(t, inputBound(body)+2*2560, 1000, in, out); got != want {
		t.Errorf("tools and images: required %s, want %s", got, want)
	}

	// A backend that reports more than the bounds (it ignored max_tokens) is charged the
	// reservation and no more.
	body = `{"model":"s-model","messages":[{"role":"user","content":"hi"}],"max_tokens":10}`
	reserved := cost(t, inputBound(body), 10, in, out)
	r = e.post("/v1/chat/completions", body, map[string]string{"Authorization": "Bearer " + k.Key, "X-Script-Usage": "1000000,1000000"})
	if r.status != http.StatusOK {
		t.Fatalf("over-reporting backend: %s", r)
	}
	if got := amountOf(t, r.header.Get("X-Credits-Charged")); got != reserved {
		t.Errorf("charged %s for a usage above the reservation, want the reservation %s", got, reserved)
	}
	a := e.settledAudit(u.ID)
	if a.Balance != credits.Amount(micro(t, "1"))-reserved || a.Balance < 0 {
		t.Errorf("balance %s, want 1 - %s", a.Balance, reserved)
	}

	// Nor does a key's spending pass its cap that way: a cap covering one reservation admits
	// one over-reporting request, charged the reservation, and refuses the next.
	capped := e.createKey(u.ID, map[string]any{"name": "capped", "credit_cap": json.Number(reserved.String())})
	over := map[string]string{"Authorization": "Bearer " + capped.Key, "X-Script-Usage": "1000000,1000000"}
	if r := e.post("/v1/chat/completions", body, over); r.status != http.StatusOK || amountOf(t, r.header.Get("X-Credits-Charged")) != reserved {
		t.Fatalf("capped key, over-reporting backend: %s, charged %s", r, r.header.Get("X-Credits-Charged"))
	}
	if r := e.post("/v1/chat/completions", body, over); r.status != http.StatusPaymentRequired && r.status != http.StatusForbidden {
		t.Errorf("a second request past the key's cap: %s", r)
	}
	e.checkAllAccounts(0)
}

// TestCaseVariantKeysRefused: a member whose name folds onto a field the gateway reads (as
// Go's encoding/json folds, which Go backends use) is refused before anything is reserved or
// forwarded, so that no backend reads another model or bound than the one billed.
func TestCaseVariantKeysRefused(t *testing.T) {
	e := startGateway(t, setup{
		gateway: backendBlock("m", "m", "mock-small", "1", "1") + backendBlock("l", "m", "mock-large", "100", "100"),
		mocks:   []mockSpec{{key: "m", lines: "models mock-small mock-large"}},
	})
	u, k := e.userWithKey("fold@example.com", "10")
	for _, c := range []struct{ path, body string }{
		{"/v1/chat/completions", `{"model":"mock-small","Model":"mock-large","MAX_TOKENS":5000,"messages":[{"role":"user","content":"hi"}]}`},
		{"/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"Max_Tokens":5000}`},
		{"/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"N":100}`},
		// U+212A KELVIN SIGN folds onto "k", U+017F LATIN SMALL LETTER LONG S onto "s".
		{"/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_to\u212aens":5000}`},
		{"/v1/chat/completions", `{"model":"mock-small","me\u017f\u017fages":[{"role":"user","content":"hi"}],"messages":[{"role":"user","content":"hi"}]}`},
		{"/v1/chat/completions", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"Include_Usage":false}}`},
		{"/v1/embeddings", `{"model":"mock-small","input":"a","INPUT":["b","c"]}`},
		{"/api/chat", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"Options":{"num_predict":-1}}`},
		{"/api/chat", `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":5,"Num_Predict":-1}}`},
		{"/api/generate", `{"model":"mock-small","prompt":"hi","Stream":false}`},
	} {
		r := e.post(c.path, c.body, bearer(k.Key))
		if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), "only by case") {
			t.Errorf("%s %s: %s, want 400 invalid_request (differs only by case)", c.path, c.body, r)
		}
	}
	if n := e.mockRequests("m"); n != 0 {
		t.Errorf("the backend got %d requests, want 0", n)
	}
	if a := e.settledAudit(u.ID); a.Settled != 0 || a.Balance != credits.Amount(micro(t, "10")) {
		t.Errorf("books changed: %+v", a)
	}
	// Exact names keep working, and a duplicate exact name is one value (the last) for both.
	r := e.post("/v1/chat/completions", `{"model":"mock-large","model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":3}`, bearer(k.Key))
	if r.status != http.StatusOK || r.header.Get("X-Gateway-Model") != "mock-small" {
		t.Errorf("duplicate exact key: %s (model %q)", r, r.header.Get("X-Gateway-Model"))
	}
}

// TestCutOrMalformedAnswerFailsOver: a non-streaming answer cut mid-JSON (aborted, or complete
// at the HTTP level with half a document) reached nobody yet: the next backend answers, and
// when none does the client gets 502 upstream_error with everything returned. A backend that
// compresses its answer against the gateway's Accept-Encoding: identity is treated the same.
func TestCutOrMalformedAnswerFailsOver(t *testing.T) {
	sc := newScripted(t)
	e := startGateway(t, setup{
		gateway: `
		failover 2` + backendBlock("cutter", "cutter", "mock-small", "1", "1") + sc.block("scripted", "mock-small", "2", "2") +
			backendBlock("good", "good", "mock-small", "3", "3"),
		mocks: []mockSpec{{key: "cutter", lines: "models mock-small"}, {key: "good", lines: "models mock-small"}},
	})
	u, k := e.userWithKey("cut@example.com", "10")
	body := `{"model":"mock-small","messages":[{"role":"user","content":"hi"}],"max_tokens":5}`
	post := func(hdr map[string]string) *response {
		h := map[string]string{"Authorization": "Bearer " + k.Key}
		for k, v := range hdr {
			h[k] = v
		}
		return e.post("/v1/chat/completions", body, h)
	}

	// The cheapest (the mock, cut mid-body) fails: the scripted one answers, charged once.
	r := post(map[string]string{"X-Mock-Fault": "cut"})
	if r.status != http.StatusOK || r.header.Get("X-Gateway-Backend") != "scripted" {
		t.Fatalf("after a cut answer: %s from %q, want 200 from the next backend", r, r.header.Get("X-Gateway-Backend"))
	}
	if st := e.settlements(u.ID); len(st) != 1 || st[0].Usage.Backend != "scripted" {
		t.Errorf("settlements %+v, want one, from the backend that answered", st)
	}

	// Both tried backends break (cut, then truncated JSON, or compressed): 502 and nothing
	// charged.
	for _, fault := range []string{"truncate", "gzip"} {
		before := e.settledAudit(u.ID)
		r = post(map[string]string{"X-Mock-Fault": "cut", "X-Script-Fault": fault})
		errorOf(t, r, http.StatusBadGateway, "upstream_error")
		if a := e.settledAudit(u.ID); a.Balance != before.Balance || a.Settled != before.Settled {
			t.Errorf("%s: books %+v after a 502, want %+v", fault, a, before)
		}
	}
	if ae := *sc.lastAE.Load(); ae != "identity" {
		t.Errorf("the backend was asked for Accept-Encoding %q, want identity", ae)
	}
	e.checkAllAccounts(0)
}

// TestLargeAnswerIsCharged: an answer past the gateway's buffer goes to the client as it comes
// and is charged the usage it reports at its end, or, when it reports none, the whole
// reservation: never released once any of it went out.
func TestLargeAnswerIsCharged(t *testing.T) {
	defer caddymodule.SetMaxBufferedResponse(16 << 10)()
	sc := newScripted(t)
	e := startGateway(t, setup{
		gateway: `
		backend emb {
			url {mock.emb}
			health_check {
				disabled
			}
			model mock-embed {
				kind embeddings
				input_price 1
				output_price 0
			}
		}` + sc.block("s", "s-model", "10", "100"),
		mocks: []mockSpec{{key: "emb", lines: "models mock-embed\n\t\tdimensions 1024"}},
	})
	u, k := e.userWithKey("large@example.com", "100")

	// 16 embeddings of 1,024 dimensions: far past 16 KiB, charged their reported usage.
	inputs, _ := json.Marshal(strings.Fields(strings.Repeat("word ", 16)))
	r := e.post("/v1/embeddings", `{"model":"mock-embed","input":`+string(inputs)+`}`, bearer(k.Key))
	if r.status != http.StatusOK || len(r.body) < 64<<10 {
		t.Fatalf("large embeddings: %d, %d bytes", r.status, len(r.body))
	}
	var doc struct {
		Data  []struct{ Embedding []float64 }
		Usage struct {
			PromptTokens int64 `json:"prompt_tokens"`
		}
	}
	if err := json.Unmarshal(r.body, &doc); err != nil || len(doc.Data) != 16 || doc.Usage.PromptTokens == 0 {
		t.Fatalf("the client's document: %v, %d vectors, usage %+v", err, len(doc.Data), doc.Usage)
	}
	st := e.settlements(u.ID)
	if len(st) != 1 || st[0].Amount != cost(t, doc.Usage.PromptTokens, 0, "1", "0") || st[0].Usage.InputTokens != doc.Usage.PromptTokens {
		t.Errorf("large embeddings settled %+v, want the reported %d prompt tokens", st, doc.Usage.PromptTokens)
	}

	// A large chat answer with its usage: charged that; without: charged the reservation.
	body := `{"model":"s-model","messages":[{"role":"user","content":"hi"}],"max_tokens":50}`
	r = e.post("/v1/chat/completions", body, map[string]string{"Authorization": "Bearer " + k.Key, "X-Script-Pad": "40000", "X-Script-Usage": "7,40"})
	if r.status != http.StatusOK || len(r.body) < 40000 {
		t.Fatalf("large chat: %s", r)
	}
	r = e.post("/v1/chat/completions", body, map[string]string{"Authorization": "Bearer " + k.Key, "X-Script-Pad": "40000", "X-Script-Usage": "none"})
	if r.status != http.StatusOK || len(r.body) < 40000 {
		t.Fatalf("large chat without usage: %s", r)
	}
	st = e.settlements(u.ID)
	if len(st) != 3 {
		t.Fatalf("%d settlements, want 3", len(st))
	}
	if want := cost(t, 7, 40, "10", "100"); st[1].Amount != want {
		t.Errorf("large chat with usage charged %s, want %s", st[1].Amount, want)
	}
	if want := cost(t, inputBound(body), 50, "10", "100"); st[2].Amount != want {
		t.Errorf("large chat without usage charged %s, want the reservation %s", st[2].Amount, want)
	}
	e.checkAllAccounts(0)
}

// TestReservationLifetimeCoversTheWorstCase: a reservation_ttl shorter than the longest a
// request can run (its attempts on the failover backends at their timeouts) is refused, so the
// sweeper can never release the reservation of a request still running.
func TestReservationLifetimeCoversTheWorstCase(t *testing.T) {
	e := startGateway(t, setup{gateway: backendBlock("a", "m", "mock-small", "1", "1"), mocks: []mockSpec{{key: "m", lines: "models mock-small"}}})
	slow := func(name string) string {
		return strings.Replace(backendBlock(name, "m", "mock-small", "1", "1"), "health_check {", "timeout 20s\n\t\t\thealth_check {", 1)
	}
	cfg := adapt(t, e.caddyfile(setup{gateway: `
		failover 3
		reservation_ttl 30s` + slow("a") + slow("b") + slow("c"), mocks: []mockSpec{{key: "m", lines: "models mock-small"}}}))
	err := caddy.Load(cfg, true)
	if err == nil || !strings.Contains(err.Error(), "reservation_ttl") {
		t.Fatalf("a 30s reservation_ttl for 3 attempts of 20s loaded (err %v): the sweeper would release live requests", err)
	}
	// 3 x 20s, the store calls, and a minute: accepted.
	cfg = adapt(t, e.caddyfile(setup{gateway: `
		failover 3
		reservation_ttl 2m` + slow("a") + slow("b") + slow("c"), mocks: []mockSpec{{key: "m", lines: "models mock-small"}}}))
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("a 2m reservation_ttl: %v", err)
	}
	cfg = adapt(t, e.caddyfile(setup{gateway: `
		on_disconnect sometimes` + slow("a"), mocks: []mockSpec{{key: "m", lines: "models mock-small"}}}))
	if err := caddy.Load(cfg, true); err == nil || !strings.Contains(err.Error(), "on_disconnect") {
		t.Fatalf("on_disconnect sometimes: %v, want refused", err)
	}
}

// TestLedgerPropertyRandomRequests: random request bodies (n, tools, images, case variants,
// huge fields, streams) against a backend with random answers (over-reported usage, none,
// cut, compressed, 5xx, huge): after every step the balance is never below zero and the books
// balance exactly (credited = balance + settled + open), and no request is charged more than
// its bound.
func TestLedgerPropertyRandomRequests(t *testing.T) {
	defer caddymodule.SetMaxBufferedResponse(8 << 10)()
	const in, out = "3", "700"
	sc := newScripted(t)
	e := startGateway(t, setup{gateway: sc.block("s", "s-model", in, out)})
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	u, k := e.userWithKey("prop@example.com", "2")
	start := credits.Amount(micro(t, "2"))
	var charged credits.Amount
	for step := range 60 {
		n := 1 + rng.IntN(4)
		maxTokens := 1 + rng.IntN(60)
		images := rng.IntN(3)
		var parts []string
		parts = append(parts, `{"type":"text","text":"`+strings.Repeat("x", rng.IntN(300))+`"}`)
		for range images {
			parts = append(parts, `{"type":"image_url","image_url":{"url":"https://e.x/i.png"}}`)
		}
		fields := []string{`"model":"s-model"`, `"messages":[{"role":"user","content":[` + strings.Join(parts, ",") + `]}]`,
			`"max_tokens":` + strconv.Itoa(maxTokens), `"n":` + strconv.Itoa(n)}
		if rng.IntN(3) == 0 {
			fields = append(fields, `"tools":[{"type":"function","function":{"name":"t","description":"`+strings.Repeat("y", rng.IntN(2000))+`"}}]`)
		}
		variant := rng.IntN(8) == 0
		if variant {
			fields = append(fields, []string{`"MAX_TOKENS":100000`, `"Model":"other"`, `"N":50`}[rng.IntN(3)])
		}
		rng.Shuffle(len(fields), func(i, j int) { fields[i], fields[j] = fields[j], fields[i] })
		body := "{" + strings.Join(fields, ",") + "}"
		hdr := map[string]string{"Authorization": "Bearer " + k.Key}
		switch rng.IntN(6) {
		case 0:
			hdr["X-Script-Usage"] = strconv.Itoa(rng.IntN(100000)) + "," + strconv.Itoa(rng.IntN(100000)) // may be far above the bound
		case 1:
			hdr["X-Script-Usage"] = "none"
		case 2:
			hdr["X-Script-Fault"] = []string{"truncate", "gzip", "500"}[rng.IntN(3)]
		case 3:
			hdr["X-Script-Pad"] = strconv.Itoa(rng.IntN(20000))
		default:
			hdr["X-Script-Usage"] = strconv.Itoa(rng.IntN(50)) + "," + strconv.Itoa(rng.IntN(maxTokens*n+1))
		}
		bound := cost(t, inputBound(body)+int64(images)*2560, int64(maxTokens*n), in, out)
		r := e.post("/v1/chat/completions", body, hdr)
		a := e.settledAudit(u.ID)
		switch {
		case variant:
			if r.status != http.StatusBadRequest {
				t.Fatalf("step %d (seed %d): a case variant got %s", step, seed, r)
			}
		case r.status != http.StatusOK && r.status != http.StatusPaymentRequired && r.status != http.StatusBadGateway:
			t.Fatalf("step %d (seed %d): %s", step, seed, r)
		}
		got := start - charged - a.Balance // what this request was charged
		if got < 0 || got > bound || got > 0 && r.status != http.StatusOK {
			t.Fatalf("step %d (seed %d): %d charged %s, bound %s (%s)", step, seed, r.status, got, bound, body)
		}
		if h := r.header.Get("X-Credits-Charged"); h != "" && amountOf(t, h) != got {
			t.Fatalf("step %d (seed %d): X-Credits-Charged %s, the ledger says %s", step, seed, h, got)
		}
		charged += got
		if a.Balance < 0 || a.Credited != a.Balance+a.Settled+a.Open {
			t.Fatalf("step %d (seed %d): books %+v", step, seed, a)
		}
	}
	e.checkAllAccounts(0)
}

// TestChoicesAreCharged: with the mock honouring n, every choice is reserved and charged, JSON
// and streamed: n=3 of 5 tokens is 15 output tokens.
func TestChoicesAreCharged(t *testing.T) {
	const in, out = "10", "1000"
	e := startGateway(t, setup{gateway: backendBlock("m", "m", "mock-small", in, out), mocks: []mockSpec{{key: "m", lines: "models mock-small"}}})
	u, k := e.userWithKey("choices@example.com", "5")
	for _, stream := range []string{"false", "true"} {
		body := `{"model":"mock-small","messages":[{"role":"user","content":"two words"}],"max_tokens":5,"n":3,"stream":` + stream + `}`
		r := e.post("/v1/chat/completions", body, bearer(k.Key))
		if r.status != http.StatusOK {
			t.Fatalf("n=3 stream=%s: %s", stream, r)
		}
		st := e.settlements(u.ID)
		if got := st[len(st)-1]; got.Usage == nil || got.Usage.OutputTokens != 15 || got.Amount != cost(t, 2, 15, in, out) {
			t.Errorf("n=3 stream=%s settled %+v (usage %+v), want 2 + 15 tokens", stream, got, got.Usage)
		}
	}
	e.checkAllAccounts(0)
}

// TestTokenKindsArePriced: cached prompt tokens are charged at the model's cached input price
// and reasoning tokens as output; the settle entry records each kind; the reservation prices
// the prompt at the dearest input kind, so a cheaper cache read never makes a request cost
// more than it reserved.
func TestTokenKindsArePriced(t *testing.T) {
	gw := `
		backend m {
			url {mock.m}
			health_check {
				disabled
			}
			model mock-small {
				input_price 2
				output_price 8
				cached_input_price 0.5
				cache_write_price 2.5
			}
		}`
	e := startGateway(t, setup{gateway: gw, mocks: []mockSpec{{key: "m", lines: "models mock-small"}}})
	u, k := e.userWithKey("kinds@example.com", "5")
	price := credits.Price{Input: 2_000_000, Output: 8_000_000, CachedInput: 500_000, CacheWrite: 2_500_000}
	var charged credits.Amount
	for _, stream := range []string{"false", "true"} {
		body := `{"model":"mock-small","messages":[{"role":"user","content":"one two three four five six"}],"max_tokens":4,"stream":` + stream + `}`
		hdr := bearer(k.Key)
		hdr["X-Mock-Cached-Tokens"] = "4"
		hdr["X-Mock-Reasoning-Tokens"] = "3"
		r := e.post("/v1/chat/completions", body, hdr)
		if r.status != http.StatusOK {
			t.Fatalf("stream=%s: %s", stream, r)
		}
		st := e.settlements(u.ID)
		got := st[len(st)-1]
		want, err := price.Charge(credits.Tokens{Input: 6, Output: 4, CachedInput: 4})
		if err != nil {
			t.Fatal(err)
		}
		if got.Usage == nil || *got.Usage != (usage{Model: "mock-small", Backend: "m", InputTokens: 6, OutputTokens: 4, CachedInputTokens: 4, ReasoningTokens: 3}) {
			t.Errorf("stream=%s: the entry records %+v", stream, got.Usage)
		}
		if got.Amount != want {
			t.Errorf("stream=%s: charged %d, want %d (2 fresh x 2 + 4 cached x 0.5 + 4 out x 8 per 1M)", stream, got.Amount, want)
		}
		charged += got.Amount
	}
	if got, want := e.balance(u.ID), credits.Amount(5_000_000)-charged; got != want {
		t.Errorf("balance %d, want %d", got, want)
	}
	e.checkAllAccounts(0)
}
