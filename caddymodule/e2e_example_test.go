package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// TestMakeRunNewcomerCurl: what `make run` runs (Caddyfile.example, on free ports and a temp
// store) lets a newcomer without account or key chat with "cheapest" on anonymous credits
// until a 402 sends them to sign in (API.md §1).
func TestMakeRunNewcomerCurl(t *testing.T) {
	e, ports := startExample(t)
	gwPort := ports["8080"]
	dir := e.dir

	// The newcomer's curl, as API.md §1 gives it.
	curl := `{"model":"cheapest","messages":[{"role":"user","content":"hi"}]}`
	r := e.post("/v1/chat/completions", curl, nil)
	if r.status != http.StatusOK {
		// Seen: 503 no_backend_available, because each backend's first active health check
		// runs while Caddy provisions, before the mock sites of the same config listen, and the
		// backends stay "down" until the next check (10 s later).
		t.Errorf("the newcomer's first curl, right after start: %s", r)
		poll(t, 20*time.Second, "a 200 for the newcomer's curl", func() (bool, string) {
			r = e.post("/v1/chat/completions", curl, nil)
			return r.status == http.StatusOK, r.String()
		})
	}
	if charged := amountOf(t, r.header.Get("X-Credits-Charged")); charged <= 0 {
		t.Errorf("the first answer charged %s", charged)
	}
	// ... until the anonymous credits run out: long answers (X-Mock-Completion-Tokens) spend
	// them within the anonymous tier's rate limits.
	var last *response
	for i := 0; i < 50 && last == nil; i++ {
		r := e.post("/v1/chat/completions", curl, map[string]string{"X-Mock-Completion-Tokens": "200"})
		switch r.status {
		case http.StatusOK:
		case http.StatusPaymentRequired:
			last = r
		default:
			t.Fatalf("curl %d: %s", i+2, r)
		}
	}
	if last == nil {
		t.Fatalf("no 402 after 50 requests")
	}
	errorOf(t, last, http.StatusPaymentRequired, "insufficient_credits")
	loc := last.header.Get("Location")
	if want := fmt.Sprintf("http://localhost:%d/auth/authorize", gwPort); loc != want {
		t.Errorf("402 Location %q, want the sign-in flow %s", loc, want)
	}
	e.checkAllAccounts(0)
	// The sign-in it points to is served: signed out, to the sign-in page and back.
	noFollow := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(loc + "?redirect=" + url.QueryEscape(fmt.Sprintf("http://localhost:%d/", ports["3000"])))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/auth/login?next=") {
		t.Errorf("the sign-in flow of make run: %s %q", resp.Status, resp.Header.Get("Location"))
	}
	// And the demo app on its own origin.
	if r := e.request(http.MethodGet, fmt.Sprintf("http://localhost:%d/", ports["3000"]), nil, nil); r.status != http.StatusOK ||
		!strings.Contains(string(r.body), "<html") {
		t.Errorf("the demo app of make run: %s", r)
	}

	// Request headers over 16 KiB are refused before anything else (RELIABILITY.md row 50 and
	// its numeric target: 431).
	before := e.mockTotal()
	r = e.post("/v1/chat/completions", curl, map[string]string{"X-Padding": strings.Repeat("p", 24<<10)})
	if r.status != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("a request with 24 KiB of headers: %s, want 431", r)
	}
	if after := e.mockTotal(); after != before {
		t.Errorf("a request with 24 KiB of headers reached a backend")
	}

	// A user's key, sent in each accepted header, never lands in the access log of the
	// shipped configuration.
	_, k := e.userWithKey("newcomer@example.com", "1")
	for _, h := range []map[string]string{{"X-API-Key": k.Key}, {"apikey": k.Key}, bearer(k.Key)} {
		if r := e.post("/v1/chat/completions", curl, h); r.status != http.StatusOK {
			t.Errorf("keyed curl %v: %s", h, r)
		}
	}
	// The tour's legacy completion and Ollama embedding (README) are served by the shipped mocks.
	for path, body := range map[string]string{
		"/v1/completions": `{"model":"mock-small","prompt":"once upon a time","max_tokens":8}`,
		"/api/embed":      `{"model":"nomic-mock","input":["hi","there"]}`,
	} {
		if r := e.post(path, body, bearer(k.Key)); r.status != http.StatusOK || amountOf(t, r.header.Get("X-Credits-Charged")) <= 0 {
			t.Errorf("%s of the tour: %s", path, r)
		}
	}
	if err := caddy.Stop(); err != nil {
		t.Logf("stopping caddy: %v", err)
	}
	for _, name := range []string{"access.log", "caddy.log"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("reading %s: %v", name, err)
			continue
		}
		if name == "access.log" && !strings.Contains(string(b), "handled request") {
			t.Errorf("the shipped configuration's access log was not captured: the check would prove nothing")
		}
		if n := strings.Count(string(b), k.Key[strings.LastIndexByte(k.Key, '_')+1:]); n > 0 {
			t.Errorf("%s of the shipped configuration holds the API key's secret %d times", name, n)
		}
	}
}

// startExample runs Caddyfile.example as shipped, with every port moved to a free one (ports maps
// the example's port to the one used) and the store and logs in a temp dir, after the edits if
// any; it stops it when the test ends.
func startExample(t *testing.T, edits ...func(string) string) (*env, map[string]int) {
	raw, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatalf("reading Caddyfile.example: %v", err)
	}
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	text := string(raw)
	for _, edit := range edits {
		text = edit(text)
	}
	// Every port of the example moves to a free one; the store and the logs move to dir.
	ports := map[string]int{}
	text = regexp.MustCompile(`(localhost|127\.0\.0\.1|//):(\d{2,5})\b`).ReplaceAllStringFunc(text, func(m string) string {
		host, port, _ := strings.Cut(m, ":")
		if _, ok := ports[port]; !ok {
			ports[port] = freePort(t)
		}
		return fmt.Sprintf("%s:%d", host, ports[port])
	})
	text = strings.ReplaceAll(text, "./data/", dir+"/")
	accessLog := filepath.Join(dir, "access.log")
	text = regexp.MustCompile(`(?m)^(\s*)log \{$`).ReplaceAllString(text, "${1}log {\n${1}\toutput file "+accessLog)
	text = regexp.MustCompile(`(?m)^(\s*)log$`).ReplaceAllString(text, "${1}log {\n${1}\toutput file "+accessLog+"\n${1}}")
	text = strings.Replace(text, "{\n", "{\n\tlog {\n\t\toutput file "+filepath.Join(dir, "caddy.log")+"\n\t}\n\tpersist_config off\n", 1)
	gwPort, ok := ports["8080"]
	if !ok {
		t.Fatalf("Caddyfile.example no longer serves on port 8080:\n%s", raw)
	}
	adminPort, ok := ports["2019"]
	if !ok {
		t.Fatalf("Caddyfile.example no longer has its admin endpoint on 2019")
	}
	if err := caddy.Load(adapt(t, text), true); err != nil {
		t.Fatalf("loading Caddyfile.example: %v\n%s", err, text)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	e := &env{t: t, dir: dir, mockPorts: map[string]int{}, admin: fmt.Sprintf("http://localhost:%d", adminPort), gw: fmt.Sprintf("http://localhost:%d", gwPort),
		client: &http.Client{Timeout: 30 * time.Second}, dbPath: filepath.Join(dir, "gateway.db")}
	e.waitAdmin()
	// The example's mock backends (their sites are the ones answering /mock/stats).
	for port, p := range ports {
		if port != "8080" && port != "2019" && port != "3000" {
			e.mockPorts[port] = p
		}
	}
	return e, ports
}

// TestExampleServesItsHosts: the shipped configuration answers the gateway by both names its
// allowed_origins use (localhost and 127.0.0.1), and any other Host fails loudly with a JSON
// 421, never with Caddy's empty 200 (which the openai SDK reads as an empty completion).
func TestExampleServesItsHosts(t *testing.T) {
	e, ports := startExample(t)
	byIP := fmt.Sprintf("http://127.0.0.1:%d", ports["8080"])
	curl := `{"model":"cheapest","messages":[{"role":"user","content":"hi"}]}`
	poll(t, 20*time.Second, "a chat answer on 127.0.0.1", func() (bool, string) {
		r := e.request(http.MethodPost, byIP+"/v1/chat/completions", curl, nil)
		return r.status == http.StatusOK && r.header.Get("X-Credits-Charged") != "", r.String()
	})
	if r := e.request(http.MethodGet, byIP+"/v1/models", nil, nil); r.status != http.StatusOK || r.object(t)["object"] != "list" {
		t.Errorf("GET /v1/models on 127.0.0.1: %s", r)
	}
	for _, host := range []string{"evil.example", fmt.Sprintf("gateway.example:%d", ports["8080"]), "[::1]"} {
		for _, path := range []string{"/v1/chat/completions", "/", "/api/chat"} {
			req := e.newRequest(t.Context(), http.MethodPost, byIP+path, curl, nil)
			req.Host = host
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			r := &response{status: resp.StatusCode, header: resp.Header, body: b}
			errorOf(t, r, http.StatusMisdirectedRequest, "misdirected_request")
		}
	}
}

// mockTotal is how many model requests the example's mock backends got, together.
func (e *env) mockTotal() int64 {
	e.t.Helper()
	var n int64
	for port := range e.mockPorts {
		r := e.request(http.MethodGet, e.mockURL(port)+"/mock/stats", nil, nil)
		if r.status != http.StatusOK {
			e.t.Fatalf("mock stats on port %s: %s", port, r)
		}
		var st struct {
			Requests map[string]int64 `json:"requests"`
		}
		if err := json.Unmarshal(r.body, &st); err != nil {
			e.t.Fatal(err)
		}
		for path, c := range st.Requests {
			if path != "/v1/models" && path != "/api/tags" {
				n += c
			}
		}
	}
	return n
}

// TestExampleRateLimited: the shipped configuration has the built-in rate limit tiers on,
// anonymous callers included: their answers carry the X-RateLimit-* and RateLimit fields of the
// free tier, as a keyed user's do.
func TestExampleRateLimited(t *testing.T) {
	e, _ := startExample(t)
	curl := `{"model":"cheapest","messages":[{"role":"user","content":"hi"}]}`
	var r *response
	poll(t, 20*time.Second, "an anonymous chat answer", func() (bool, string) {
		r = e.post("/v1/chat/completions", curl, nil)
		return r.status == http.StatusOK, r.String()
	})
	check := func(who string, r *response, policies ...string) {
		t.Helper()
		for _, h := range []string{"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Policy", "RateLimit-Policy", "RateLimit"} {
			if r.header.Get(h) == "" {
				t.Errorf("%s: no %s on %s", who, h, r)
			}
		}
		if got := r.header.Get("X-RateLimit-Policy"); !slices.Contains(policies, got) {
			t.Errorf("%s: X-RateLimit-Policy %q, want one of the tier's %q", who, got, policies)
		}
	}
	check("anonymous", r, "10;w=1", "60;w=60")
	_, k := e.userWithKey("limited@example.com", "1")
	r = e.post("/v1/chat/completions", curl, bearer(k.Key))
	if r.status != http.StatusOK {
		t.Fatalf("keyed chat: %s", r)
	}
	check("a user's key", r, "10;w=1", "60;w=60")
}

// TestExampleClosesSlowClients (RELIABILITY.md row 49): with the shipped server timeouts
// (shortened to 2 s here), 50 clients trickling a body after Content-Length: 100000 and 20
// trickling their headers are all closed within a few seconds, without a reservation or a
// backend request; a normal request meanwhile answers at once, and a stream that lasts longer
// than the read timeouts is not cut (there is no write timeout).
func TestExampleClosesSlowClients(t *testing.T) {
	e, ports := startExample(t, func(s string) string {
		for _, d := range []string{"read_header", "read_body"} {
			re := regexp.MustCompile(`(?m)^(\s*` + d + `) \S+$`)
			if !re.MatchString(s) {
				t.Fatalf("Caddyfile.example sets no %s timeout", d)
			}
			s = re.ReplaceAllString(s, "${1} 2s")
		}
		return s
	})
	curl := `{"model":"cheapest","messages":[{"role":"user","content":"hi"}]}`
	_, k := e.userWithKey("slow@example.com", "10")
	poll(t, 20*time.Second, "a chat answer", func() (bool, string) {
		r := e.post("/v1/chat/completions", curl, bearer(k.Key))
		return r.status == http.StatusOK, r.String()
	})
	before := e.mockTotal()
	addr := fmt.Sprintf("127.0.0.1:%d", ports["8080"])
	start := time.Now()
	const slowBodies, slowHeaders = 50, 20
	type end struct {
		after  time.Duration
		answer string
		body   bool
	}
	closed := make(chan end, slowBodies+slowHeaders)
	stop := make(chan struct{})
	defer close(stop)
	for i := range slowBodies + slowHeaders {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		first := "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
		if i >= slowBodies {
			first = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
		}
		if _, err := c.Write([]byte(first)); err != nil {
			t.Fatal(err)
		}
		// One byte every 200 ms, until the gateway closes the connection.
		go func() {
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := c.Write([]byte(" ")); err != nil {
						return
					}
				}
			}
		}()
		go func() {
			b, _ := io.ReadAll(c) // an answer (408), then EOF; or a reset
			closed <- end{time.Since(start), string(b), i < slowBodies}
		}()
	}
	// Meanwhile a normal request answers at once, and a stream outlives the read timeouts.
	time.Sleep(500 * time.Millisecond)
	t0 := time.Now()
	if r := e.post("/v1/chat/completions", curl, bearer(k.Key)); r.status != http.StatusOK {
		t.Errorf("a normal request beside the slow clients: %s", r)
	} else if d := time.Since(t0); d > time.Second {
		t.Errorf("a normal request beside the slow clients took %s", d)
	}
	streamDone := make(chan *response, 1)
	go func() {
		hdr := bearer(k.Key)
		hdr["X-Mock-Chunks"], hdr["X-Mock-Chunk-Interval"] = "8", "400ms"
		streamDone <- e.post("/v1/chat/completions", `{"model":"cheapest","stream":true,"messages":[{"role":"user","content":"hi"}]}`, hdr)
	}()
	deadline := time.After(8 * time.Second)
	for range slowBodies + slowHeaders {
		select {
		case c := <-closed:
			if c.after < time.Second {
				t.Errorf("a slow client was closed after %s, before its read timeout", c.after)
			}
			if c.body && !strings.HasPrefix(c.answer, "HTTP/1.1 408 ") {
				t.Errorf("a slow body was answered %q, want 408", truncate(c.answer, 300))
			}
		case <-deadline:
			t.Fatalf("slow clients still connected %s after they started (read timeouts 2 s)", time.Since(start))
		}
	}
	r := <-streamDone
	if r.status != http.StatusOK || !strings.Contains(string(r.body), "[DONE]") {
		t.Errorf("a stream of 3 s beside 2 s read timeouts: %s", r)
	}
	if got := e.mockTotal() - before; got != 2 {
		t.Errorf("the backends got %d requests, want the 2 normal ones", got)
	}
	e.checkAllAccounts(0)
}

// TestExampleAnswersWhatClientsRead: against Caddyfile.example as shipped, the clients people
// point at it read real answers: the openai SDK on http://127.0.0.1 gets a completion and the
// model list (not Caddy's empty 200), an Ollama client reads error as a string on /api/*, and an
// unknown or not yet served route under /v1/ answers the contract's JSON, not a text page.
func TestExampleAnswersWhatClientsRead(t *testing.T) {
	e, ports := startExample(t)
	byIP := fmt.Sprintf("http://127.0.0.1:%d", ports["8080"])
	// No key, as a newcomer: the anonymous allowance answers (the SDK's Authorization header
	// is removed, since an unknown key would be refused, not taken as anonymous).
	client := openai.NewClient(option.WithBaseURL(byIP+"/v1/"), option.WithMaxRetries(0), option.WithHeaderDel("Authorization"))
	var c *openai.ChatCompletion
	poll(t, 20*time.Second, "a completion through the SDK", func() (bool, string) {
		var err error
		c, err = client.Chat.Completions.New(t.Context(), openai.ChatCompletionNewParams{
			Model: "cheapest", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		})
		return err == nil, fmt.Sprint(err)
	})
	if len(c.Choices) != 1 || c.Choices[0].Message.Content == "" {
		t.Errorf("the SDK read an empty completion: %+v", c)
	}
	models, err := client.Models.List(t.Context())
	if err != nil || len(models.Data) < 2 {
		t.Errorf("the SDK's model list: %v, %+v", err, models)
	}

	// Ollama clients read error as a string.
	r := e.request(http.MethodPost, byIP+"/api/chat", `{"model":"cheapest"}`, nil)
	var ollama struct {
		Error any    `json:"error"`
		Code  string `json:"code"`
	}
	if err := json.Unmarshal(r.body, &ollama); err != nil || r.status != http.StatusBadRequest || ollama.Code != "invalid_request" {
		t.Errorf("a bad /api/chat: %s", r)
	}
	if s, ok := ollama.Error.(string); !ok || s == "" {
		t.Errorf("on /api/chat, error is %T %v: ollama-js shows an object as \"[object Object]\"", ollama.Error, ollama.Error)
	}

	// Routes under /v1/ answer JSON: 501 for an API not served yet, 404 for none.
	for path, want := range map[string]string{"/v1/audio/speech": "not_implemented", "/v1/no-such-route": "not_found"} {
		r := e.request(http.MethodPost, byIP+path, `{}`, nil)
		status := http.StatusNotFound
		if want == "not_implemented" {
			status = http.StatusNotImplemented
		}
		errorOf(t, r, status, want)
	}
}
