package caddymodule_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
)

// The coding agents through the gateway: Claude Code and Codex CLI, the real binaries from npm,
// run against a gateway with the mock behind it, through a recording proxy that passes
// everything on unchanged. .ci/agents (`make agents`, run by .ci/run) installs them, at the
// versions it pins, into the directory LLM_GATEWAY_AGENTS_DIR names.

// agentsDirEnv names the directory the agents are installed in (npm install --prefix); when it
// is not set, the tests look in the one .ci/agents installs into by default.
const agentsDirEnv = "LLM_GATEWAY_AGENTS_DIR"

// agentRunTimeout bounds each agent run (about a second against the mock).
const agentRunTimeout = 90 * time.Second

// agentBinary is the path of an agent's binary (node_modules/.bin/NAME) in the install dir;
// outside CI, with nothing installed, the test skips saying how to install it.
func agentBinary(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv(agentsDirEnv)
	if dir == "" {
		cache, err := os.UserCacheDir() // $XDG_CACHE_HOME or ~/.cache, as .ci/agents
		if err != nil {
			t.Fatalf("%s is not set and there is no cache directory: %v", agentsDirEnv, err)
		}
		dir = filepath.Join(cache, "llm-gateway-agents")
	}
	bin := filepath.Join(dir, "node_modules", ".bin", name)
	_, err := os.Stat(bin)
	if err == nil {
		return bin
	}
	msg := fmt.Sprintf("%s is not installed (%v): run `make agents` (.ci/agents: npm install of the pinned versions "+
		"into $%s, by default ${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway-agents), as .ci/run does", name, err, agentsDirEnv)
	if !pgtest.InCI() {
		t.Skipf("outside CI: %s", msg)
	}
	t.Fatal(msg)
	return ""
}

// agentCall is one request an agent made, as the recording proxy in front of the gateway saw it.
type agentCall struct {
	method, uri string
	// auth is how the request carried the gateway key: "bearer", "x-api-key", "none", or
	// "wrong" when a credential was not the key (the key itself is never kept).
	auth    string
	status  int
	request []byte // the request body
	body    []byte // the response body as the agent received it
}

// agentTrace is a reverse proxy in front of the gateway that records each request an agent
// makes and the response it got, and passes both on unchanged (streams flushed as they come).
type agentTrace struct {
	url   string
	key   string
	mu    sync.Mutex
	calls []*agentCall
}

func newAgentTrace(t *testing.T, gateway, key string) *agentTrace {
	t.Helper()
	target, err := url.Parse(gateway)
	if err != nil {
		t.Fatal(err)
	}
	tr := &agentTrace{key: key}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = target.Host
		},
		FlushInterval: -1,
		ModifyResponse: func(resp *http.Response) error {
			c := resp.Request.Context().Value(agentCallKey{}).(*agentCall)
			tr.mu.Lock()
			c.status = resp.StatusCode
			tr.mu.Unlock()
			resp.Body = &teeBody{ReadCloser: resp.Body, tr: tr, c: c}
			return nil
		},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := &agentCall{method: r.Method, uri: r.URL.RequestURI(), auth: tr.authOf(r)}
		var err error
		if c.request, err = io.ReadAll(r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(c.request))
		tr.mu.Lock()
		tr.calls = append(tr.calls, c)
		tr.mu.Unlock()
		rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), agentCallKey{}, c)))
	}))
	t.Cleanup(srv.Close)
	tr.url = srv.URL
	return tr
}

type agentCallKey struct{}

// authOf says how r carries the key.
func (tr *agentTrace) authOf(r *http.Request) string {
	h, x := r.Header.Get("Authorization"), r.Header.Get("X-Api-Key")
	switch {
	case h == "" && x == "":
		return "none"
	case h == "Bearer "+tr.key && x == "":
		return "bearer"
	case x == tr.key && h == "":
		return "x-api-key"
	default:
		return "wrong"
	}
}

// teeBody keeps what the agent reads of a response body.
type teeBody struct {
	io.ReadCloser
	tr *agentTrace
	c  *agentCall
}

func (b *teeBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.tr.mu.Lock()
	b.c.body = append(b.c.body, p[:n]...)
	b.tr.mu.Unlock()
	return n, err
}

// snapshot is a copy of the calls so far.
func (tr *agentTrace) snapshot() []agentCall {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	out := make([]agentCall, len(tr.calls))
	for i, c := range tr.calls {
		out[i] = *c
		out[i].body = slices.Clone(c.body)
		out[i].request = slices.Clone(c.request)
	}
	return out
}

func (tr *agentTrace) String() string {
	var b strings.Builder
	for _, c := range tr.snapshot() {
		fmt.Fprintf(&b, "\t%s %s (%s) -> %d: %s\n", c.method, c.uri, c.auth, c.status, truncate(string(c.body), 300))
	}
	return b.String()
}

// runAgent runs an agent's binary with args in dir, with exactly the environment env (plus
// PATH), within agentRunTimeout, and returns its stdout and stderr. It fails the test, with the
// agent's output and the requests it made, when the agent does not exit 0 (ok) or does (!ok).
func runAgent(t *testing.T, tr *agentTrace, ok bool, dir string, env []string, bin string, args ...string) (string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), agentRunTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	cmd.Stdin = strings.NewReader("")
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("%s ran %v", filepath.Base(bin), time.Since(start).Round(time.Millisecond))
	if ctx.Err() != nil || (err == nil) != ok {
		t.Fatalf("%s %q: %v (timeout %v, want success %v)\nstdout:\n%s\nstderr:\n%s\nrequests:\n%s", filepath.Base(bin), args, err,
			agentRunTimeout, ok, tail(stdout.String(), 4000), tail(stderr.String(), 4000), tr)
	}
	return stdout.String(), stderr.String()
}

// sseData decodes the data of each SSE event of a stream into a new T.
func sseData[T any](t *testing.T, body []byte) []T {
	t.Helper()
	var out []T
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var v T
		if err := json.Unmarshal([]byte(data), &v); err != nil {
			t.Fatalf("an SSE event that is not JSON: %v: %s", err, truncate(data, 300))
		}
		out = append(out, v)
	}
	return out
}

// servedUsage is what one answer an agent received reports it used, counted as the ledger
// records it, and the text the agent was sent.
type servedUsage struct {
	input, cachedInput, cacheWrite, output, reasoning int64
	text                                              string
}

func (s servedUsage) String() string {
	return fmt.Sprintf("input %d (cache reads %d, cache writes %d), output %d (reasoning %d)",
		s.input, s.cachedInput, s.cacheWrite, s.output, s.reasoning)
}

// messagesServed reads the usage of a Messages stream: the input counts of message_start
// (input_tokens beside the cache reads and writes), the output of the last message_delta
// (cumulative), and the text of the text deltas.
func messagesServed(t *testing.T, body []byte) servedUsage {
	t.Helper()
	type wireUsage struct {
		InputTokens              int64 `json:"input_tokens"`
		CacheCreationInputTokens int64 `json:"cache_creation_input_tokens"`
		CacheReadInputTokens     int64 `json:"cache_read_input_tokens"`
		OutputTokens             int64 `json:"output_tokens"`
	}
	type event struct {
		Type    string `json:"type"`
		Message struct {
			Usage wireUsage `json:"usage"`
		} `json:"message"`
		Delta struct {
			Type string `json:"type"`
			Text string `json:"text"`
		} `json:"delta"`
		Usage *wireUsage `json:"usage"`
	}
	var s servedUsage
	var started, ended bool
	var text strings.Builder
	for _, ev := range sseData[event](t, body) {
		switch ev.Type {
		case "message_start":
			u := ev.Message.Usage
			s.input, s.cachedInput, s.cacheWrite = u.InputTokens+u.CacheReadInputTokens+u.CacheCreationInputTokens,
				u.CacheReadInputTokens, u.CacheCreationInputTokens
			started = true
		case "content_block_delta":
			if ev.Delta.Type == "text_delta" {
				text.WriteString(ev.Delta.Text)
			}
		case "message_delta":
			if ev.Usage != nil {
				s.output = ev.Usage.OutputTokens
			}
		case "message_stop":
			ended = true
		}
	}
	if !started || !ended {
		t.Fatalf("a Messages stream without message_start or message_stop: %s", truncate(string(body), 2000))
	}
	s.text = text.String()
	return s
}

// responsesServed reads the usage of a Responses stream from its response.completed event
// (input_tokens with its cached_tokens, output_tokens with its reasoning_tokens), and the
// text of its output_text deltas.
func responsesServed(t *testing.T, body []byte) servedUsage {
	t.Helper()
	type event struct {
		Type     string `json:"type"`
		Delta    string `json:"delta"`
		Response struct {
			Usage *struct {
				InputTokens        int64 `json:"input_tokens"`
				InputTokensDetails struct {
					CachedTokens int64 `json:"cached_tokens"`
				} `json:"input_tokens_details"`
				OutputTokens        int64 `json:"output_tokens"`
				OutputTokensDetails struct {
					ReasoningTokens int64 `json:"reasoning_tokens"`
				} `json:"output_tokens_details"`
			} `json:"usage"`
		} `json:"response"`
	}
	var s servedUsage
	var text strings.Builder
	completed := false
	for _, ev := range sseData[event](t, body) {
		switch ev.Type {
		case "response.output_text.delta":
			text.WriteString(ev.Delta)
		case "response.completed":
			u := ev.Response.Usage
			if u == nil {
				t.Fatalf("response.completed without usage: %s", truncate(string(body), 2000))
			}
			s.input, s.cachedInput, s.output, s.reasoning = u.InputTokens, u.InputTokensDetails.CachedTokens,
				u.OutputTokens, u.OutputTokensDetails.ReasoningTokens
			completed = true
		}
	}
	if !completed {
		t.Fatalf("a Responses stream without response.completed: %s", truncate(string(body), 2000))
	}
	s.text = text.String()
	return s
}

// responsesBound is the max_output_tokens of the response a Responses stream made (its
// response.created event), 0 for none.
func responsesBound(t *testing.T, body []byte) int64 {
	t.Helper()
	type event struct {
		Type     string `json:"type"`
		Response struct {
			MaxOutputTokens int64 `json:"max_output_tokens"`
		} `json:"response"`
	}
	for _, ev := range sseData[event](t, body) {
		if ev.Type == "response.created" {
			return ev.Response.MaxOutputTokens
		}
	}
	t.Fatalf("a Responses stream without response.created: %s", truncate(string(body), 2000))
	return 0
}

// checkAgentBill checks that the user, who was given initial credits, was charged exactly for
// served (one settle entry per answer, recording its usage, its amount that usage at price,
// in any order: an agent may send requests side by side), the balance is initial less their
// sum, and the books of every account balance.
func checkAgentBill(t *testing.T, e *env, userID, initial string, price credits.Price, served []servedUsage) {
	t.Helper()
	e.settledAudit(userID)
	st := e.settlements(userID)
	recorded := make([]servedUsage, len(st))
	for i, s := range st {
		if s.Usage == nil {
			t.Fatalf("settle entry %d without usage: %+v", i, s)
		}
		recorded[i] = servedUsage{input: s.Usage.InputTokens, cachedInput: s.Usage.CachedInputTokens,
			cacheWrite: s.Usage.CacheWriteTokens, output: s.Usage.OutputTokens, reasoning: s.Usage.ReasoningTokens}
	}
	var want []servedUsage
	var sum credits.Amount
	for _, s := range served {
		s.text = ""
		want = append(want, s)
	}
	byCounts := func(a, b servedUsage) int { return strings.Compare(a.String(), b.String()) }
	slices.SortFunc(recorded, byCounts)
	slices.SortFunc(want, byCounts)
	if !slices.Equal(recorded, want) {
		t.Errorf("the ledger recorded %v, the agent was served %v", recorded, want)
	}
	for i, s := range st {
		u := s.Usage
		c, err := price.Charge(credits.Tokens{Input: u.InputTokens, CachedInput: u.CachedInputTokens, CacheWrite: u.CacheWriteTokens,
			Output: u.OutputTokens})
		if err != nil {
			t.Fatal(err)
		}
		if s.Amount != c {
			t.Errorf("settle entry %d charged %s for %+v, want %s", i, s.Amount, *u, c)
		}
		sum += s.Amount
	}
	if sum == 0 {
		t.Error("nothing was charged")
	}
	if got, want := e.balance(userID), credits.Amount(micro(t, initial))-sum; got != want {
		t.Errorf("balance %s, want %s - %s = %s", got, initial, sum, want)
	}
	e.checkAllAccounts(0)
}

// priceOf is a model's price from decimal credits per 1M tokens.
func priceOf(t *testing.T, in, cachedIn, cacheWrite, out string) credits.Price {
	t.Helper()
	p := credits.Price{Input: credits.Amount(micro(t, in)), Output: credits.Amount(micro(t, out))}
	if cachedIn != "" {
		p.CachedInput = credits.Amount(micro(t, cachedIn))
	}
	if cacheWrite != "" {
		p.CacheWrite = credits.Amount(micro(t, cacheWrite))
	}
	return p
}

// claudeCodeEnv is the environment of the README's Claude Code setup: the gateway at baseURL,
// the key in credential (ANTHROPIC_AUTH_TOKEN or ANTHROPIC_API_KEY), the gateway's model for
// every role, no nonessential traffic, and a HOME of its own.
func claudeCodeEnv(t *testing.T, baseURL, credential, key, model string) []string {
	home := t.TempDir()
	return []string{
		"HOME=" + home,
		"XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"ANTHROPIC_BASE_URL=" + baseURL,
		credential + "=" + key,
		"ANTHROPIC_MODEL=" + model,
		"ANTHROPIC_DEFAULT_OPUS_MODEL=" + model,
		"ANTHROPIC_DEFAULT_SONNET_MODEL=" + model,
		"ANTHROPIC_DEFAULT_HAIKU_MODEL=" + model,
		"CLAUDE_CODE_SUBAGENT_MODEL=" + model,
		"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
		"DISABLE_AUTOUPDATER=1",
	}
}

// TestClaudeCode: Claude Code (`claude -p`), with ANTHROPIC_BASE_URL at the gateway and a
// gateway key as ANTHROPIC_AUTH_TOKEN (or ANTHROPIC_API_KEY), its models all set to the
// gateway's model name, answers with the mock's words through an anthropic backend. Its
// requests are streamed POST /v1/messages?beta=true with the key as a Bearer token (as
// x-api-key) (nothing else: no count_tokens,
// no model list, no probe, with CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC), each reached the
// backend once, and the user is charged exactly the usage of the answers it received, the
// cache reads and writes at their prices. A user out of credits: Claude Code shows the 402 and
// exits 1 after one request, charged nothing.
func TestClaudeCode(t *testing.T) {
	bin := agentBinary(t, "claude")
	const in, cacheRead, cacheWrite, out = "1000", "100", "1250", "3000"
	// A model name Claude Code knows (it warns about the context window of others).
	const model = "claude-sonnet-4-5"
	e := startGateway(t, setup{
		gateway: strings.Replace(anthropicBlock("claude", "ant", model, in, out), "output_price",
			"cached_input_price "+cacheRead+"\n\t\t\t\tcache_write_price "+cacheWrite+"\n\t\t\t\toutput_price", 1),
		mocks: []mockSpec{{key: "ant", lines: "models " + model + "\n\t\tcompletion_tokens 7\n\t\tchunks 3" +
			"\n\t\tcache_read_tokens 4\n\t\tcache_write_tokens 2\n\t\tapi_key " + anthropicUpstreamKey}},
	})
	// Claude Code sends its whole system prompt and tool list (~90 kB) and max_tokens 32000:
	// the reservation's bound is some 150 credits at these prices.
	const initial = "1000"
	u, k := e.userWithKey("claude-code@example.com", initial)
	claude := func(tr *agentTrace, credential, key string, ok bool) (string, string) {
		return runAgent(t, tr, ok, t.TempDir(), claudeCodeEnv(t, tr.url, credential, key, model), bin, "-p", "say hello to the gateway")
	}
	// The key as ANTHROPIC_AUTH_TOKEN (sent as a Bearer token), then as ANTHROPIC_API_KEY
	// (sent as x-api-key), the same user charged for both.
	var served []servedUsage
	for _, run := range []struct{ credential, auth string }{{"ANTHROPIC_AUTH_TOKEN", "bearer"}, {"ANTHROPIC_API_KEY", "x-api-key"}} {
		tr := newAgentTrace(t, e.gw, k.Key)
		stdout, _ := claude(tr, run.credential, k.Key, true)
		var turn []servedUsage
		for _, c := range tr.snapshot() {
			if c.method != http.MethodPost || c.uri != "/v1/messages?beta=true" || c.auth != run.auth || c.status != http.StatusOK {
				t.Errorf("Claude Code with %s sent %s %s (%s), answered %d; want only POST /v1/messages?beta=true with the key as %s, answered 200\nrequests:\n%s",
					run.credential, c.method, c.uri, c.auth, c.status, run.auth, tr)
				continue
			}
			turn = append(turn, messagesServed(t, c.body))
		}
		if len(turn) == 0 {
			t.Fatalf("Claude Code with %s sent no message:\n%s", run.credential, tr)
		}
		// The answer printed is the last message's text, the mock's 7 words.
		if got, last := strings.TrimSpace(stdout), turn[len(turn)-1]; got != tokens(7) || last.text != tokens(7) {
			t.Errorf("Claude Code with %s printed %q, was streamed %q; want the mock's %q", run.credential, got, last.text, tokens(7))
		}
		served = append(served, turn...)
	}
	if n := e.mockCounts("ant")["/v1/messages"]; n != int64(len(served)) {
		t.Errorf("the backend got %d messages, Claude Code was answered %d", n, len(served))
	}
	checkAgentBill(t, e, u.ID, initial, priceOf(t, in, cacheRead, cacheWrite, out), served)

	// A user out of credits: the 402 in Anthropic's shape is shown, not retried, and nothing
	// is charged.
	poor, poorKey := e.userWithKey("poor-claude-code@example.com", "0.01")
	tr := newAgentTrace(t, e.gw, poorKey.Key)
	stdout, stderr := claude(tr, "ANTHROPIC_AUTH_TOKEN", poorKey.Key, false)
	checkAgentRefused(t, e, tr, "Claude Code", stdout+stderr, "POST /v1/messages?beta=true", 1, poor.ID, "0.01")
}

// checkAgentRefused checks that an agent refused for want of credits sent route calls times
// (its retries included), each answered 402 insufficient_credits, said so, and charged its
// user nothing.
func checkAgentRefused(t *testing.T, e *env, tr *agentTrace, agent, output, route string, calls int, userID, initial string) {
	t.Helper()
	sent := tr.snapshot()
	for _, c := range sent {
		if c.method+" "+c.uri != route || c.status != http.StatusPaymentRequired || !strings.Contains(string(c.body), "insufficient_credits") {
			t.Errorf("%s out of credits sent %s %s, answered %d; want %s answered 402 insufficient_credits", agent, c.method, c.uri, c.status, route)
		}
	}
	if len(sent) != calls {
		t.Errorf("%s out of credits sent %d requests, want %d:\n%s", agent, len(sent), calls, tr)
	}
	if !strings.Contains(output, "402") && !strings.Contains(output, "insufficient credits") {
		t.Errorf("%s out of credits printed %q, without the 402", agent, tail(output, 2000))
	}
	if st := e.settlements(userID); len(st) != 0 {
		t.Errorf("a refused user was charged: %+v", st)
	}
	if got := e.balance(userID); got != credits.Amount(micro(t, initial)) {
		t.Errorf("a refused user's balance %s, want %s", got, initial)
	}
	e.checkAllAccounts(0)
}

// codexEnv is the environment of the README's Codex setup: a CODEX_HOME of its own holding
// the config.toml with the gateway at baseURL as the model provider (and extra, top-level
// settings), the key in the variable its env_key names, and a HOME of its own.
func codexEnv(t *testing.T, baseURL, key, model, extra string) []string {
	t.Helper()
	codexHome := t.TempDir()
	config := extra + fmt.Sprintf(`model = %q
model_provider = "llm-gateway"
check_for_update_on_startup = false

[model_providers.llm-gateway]
name = "LLM gateway"
base_url = "%s/v1"
env_key = "LLM_GATEWAY_KEY"
wire_api = "responses"

[analytics]
enabled = false
`, model, baseURL)
	if err := os.WriteFile(filepath.Join(codexHome, "config.toml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"HOME=" + t.TempDir(), "CODEX_HOME=" + codexHome, "LLM_GATEWAY_KEY=" + key}
}

// TestCodexCLI: Codex CLI (`codex exec`), with a custom model provider in its config.toml
// (wire_api "responses", base_url the gateway's /v1, the key from env_key), answers with the
// mock's words through an openai backend. Its requests are streamed POST /v1/responses with
// the key as a Bearer token (store false, include reasoning.encrypted_content, its tools, a
// reasoning object, no max_output_tokens: max_tokens_default, 32768 here, is sent), each reached the
// backend once, and the user is charged exactly the usage of the answers it received, the
// reasoning tokens recorded and billed as output. A user out of credits: Codex shows the 402
// and exits 1 after its retries, charged nothing.
func TestCodexCLI(t *testing.T) {
	bin := agentBinary(t, "codex")
	const in, out = "1000", "3000"
	const model = "gpt-5-codex"
	e := startGateway(t, setup{
		// Codex sends no max_output_tokens: the README's advice, the default bound at the cap.
		// Codex offers OpenAI's hosted web_search tool by default, billed per search: the
		// model prices it (the README's way; unpriced, it is refused: TestCodexCLIUsesATool
		// turns it off in Codex instead). The mock makes no search, so none is charged.
		gateway: `
		max_tokens_default 32768` + strings.Replace(backendBlock("oai", "oai", model, in, out),
			"output_price "+out, "output_price "+out+"\n\t\t\t\ttool_price web_search 0.01", 1),
		mocks: []mockSpec{{key: "oai", lines: "models " + model + "\n\t\tcompletion_tokens 7\n\t\tchunks 3"}},
	})
	const initial = "1000"
	u, k := e.userWithKey("codex@example.com", initial)
	codex := func(tr *agentTrace, key string, ok bool) (string, string) {
		return runAgent(t, tr, ok, t.TempDir(), codexEnv(t, tr.url, key, model, ""), bin,
			"exec", "--skip-git-repo-check", "--sandbox", "read-only", "say hello to the gateway")
	}
	tr := newAgentTrace(t, e.gw, k.Key)
	stdout, _ := codex(tr, k.Key, true)

	calls := tr.snapshot()
	var served []servedUsage
	for _, c := range calls {
		if c.method != http.MethodPost || c.uri != "/v1/responses" || c.auth != "bearer" || c.status != http.StatusOK {
			t.Errorf("Codex sent %s %s (%s), answered %d; want only POST /v1/responses with the key as a Bearer token, answered 200\nrequests:\n%s",
				c.method, c.uri, c.auth, c.status, tr)
			continue
		}
		served = append(served, responsesServed(t, c.body))
		// The backend got the gateway's bound (the mock's response echoes it).
		if bound := responsesBound(t, c.body); bound != 32768 {
			t.Errorf("the backend was sent max_output_tokens %d, want max_tokens_default 32768", bound)
		}
	}
	if len(served) == 0 {
		t.Fatalf("Codex sent no request:\n%s", tr)
	}
	// Codex asks for reasoning: the mock makes half of its 7 tokens reasoning, the text the
	// other 4 words, which Codex prints.
	last := served[len(served)-1]
	if got := strings.TrimSpace(stdout); got != tokens(4) || last.text != tokens(4) || last.reasoning != 3 || last.output != 7 {
		t.Errorf("Codex printed %q, was streamed %q (%v); want the mock's %q, 3 reasoning tokens of 7", got, last.text, last, tokens(4))
	}
	if n := e.mockCounts("oai")["/v1/responses"]; n != int64(len(served)) {
		t.Errorf("the backend got %d responses requests, Codex was answered %d", n, len(served))
	}
	checkAgentBill(t, e, u.ID, initial, priceOf(t, in, "", "", out), served)

	// A user out of credits: Codex retries the 402 as any failed turn (stream_max_retries,
	// 5 by default, about 6 s of backoff), then shows it; nothing is charged.
	poor, poorKey := e.userWithKey("poor-codex@example.com", "0.01")
	tr = newAgentTrace(t, e.gw, poorKey.Key)
	stdout, stderr := codex(tr, poorKey.Key, false)
	checkAgentRefused(t, e, tr, "Codex", stdout+stderr, "POST /v1/responses", 1+5, poor.ID, "0.01")
}

// TestClaudeCodeUsesATool: an agent's turn of two requests through the gateway. The mock
// answers Claude Code's first message with a call of its Read tool on a file of the working
// directory; Claude Code reads the file and sends its content back as a tool_result in a
// second POST /v1/messages?beta=true, answered with text, which it prints. Both are charged,
// each its own usage, nothing else.
func TestClaudeCodeUsesATool(t *testing.T) {
	bin := agentBinary(t, "claude")
	const in, out = "1000", "3000"
	const model = "claude-sonnet-4-5"
	work := t.TempDir()
	file := filepath.Join(work, "hello.txt")
	const content = "the gateway's secret word is wombat42"
	if err := os.WriteFile(file, []byte(content+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	input, err := json.Marshal(map[string]string{"file_path": file})
	if err != nil {
		t.Fatal(err)
	}
	e := startGateway(t, setup{
		gateway: anthropicBlock("claude", "ant", model, in, out),
		mocks: []mockSpec{{key: "ant", lines: "models " + model + "\n\t\tcompletion_tokens 7\n\t\tchunks 3" +
			"\n\t\ttool_use Read `" + string(input) + "`\n\t\tapi_key " + anthropicUpstreamKey}},
	})
	const initial = "1000"
	u, k := e.userWithKey("claude-code-tool@example.com", initial)
	tr := newAgentTrace(t, e.gw, k.Key)
	stdout, _ := runAgent(t, tr, true, work, claudeCodeEnv(t, tr.url, "ANTHROPIC_AUTH_TOKEN", k.Key, model), bin,
		"-p", "read hello.txt and tell me the secret word")

	calls := tr.snapshot()
	if len(calls) != 2 {
		t.Fatalf("Claude Code sent %d requests, want 2 (the call of Read, then its result):\n%s", len(calls), tr)
	}
	var served []servedUsage
	for i, c := range calls {
		if c.method != http.MethodPost || c.uri != "/v1/messages?beta=true" || c.auth != "bearer" || c.status != http.StatusOK {
			t.Fatalf("request %d: %s %s (%s) answered %d, want POST /v1/messages?beta=true with a Bearer token, 200\n%s",
				i, c.method, c.uri, c.auth, c.status, tr)
		}
		served = append(served, messagesServed(t, c.body))
	}
	// The first answer was the tool call (no text), the second carries the file's content
	// back in a tool_result and was answered with the mock's words, which Claude Code printed.
	if !strings.Contains(string(calls[0].body), `"tool_use"`) || served[0].text != "" {
		t.Errorf("the first answer is not a tool call: %s", truncate(string(calls[0].body), 1000))
	}
	var second struct {
		Messages []struct {
			Role    string `json:"role"`
			Content json.RawMessage
		} `json:"messages"`
	}
	if err := json.Unmarshal(calls[1].request, &second); err != nil || len(second.Messages) == 0 {
		t.Fatalf("the second request: %v: %s", err, truncate(string(calls[1].request), 1000))
	}
	last := second.Messages[len(second.Messages)-1]
	if last.Role != "user" || !strings.Contains(string(last.Content), `"tool_result"`) || !strings.Contains(string(last.Content), "wombat42") {
		t.Errorf("the second request does not bring the file back in a tool_result: %s", truncate(string(last.Content), 1000))
	}
	if got := strings.TrimSpace(stdout); got != tokens(7) || served[1].text != tokens(7) {
		t.Errorf("Claude Code printed %q, was streamed %q; want the mock's %q", got, served[1].text, tokens(7))
	}
	if n := e.mockCounts("ant")["/v1/messages"]; n != 2 {
		t.Errorf("the backend got %d messages, want 2", n)
	}
	checkAgentBill(t, e, u.ID, initial, priceOf(t, in, "", "", out), served)
}

// TestCodexCLIUsesATool: an agent's turn of two requests through the gateway. The mock
// answers Codex's first request with a call of its exec_command function (cat a file of the
// working directory); Codex runs it and sends the output back as a function_call_output in a
// second POST /v1/responses, answered with text, which it prints. Both are charged, each its
// own usage, nothing else.
func TestCodexCLIUsesATool(t *testing.T) {
	bin := agentBinary(t, "codex")
	const in, out = "1000", "3000"
	const model = "gpt-5-codex"
	work := t.TempDir()
	const content = "the gateway's secret word is wombat42"
	if err := os.WriteFile(filepath.Join(work, "hello.txt"), []byte(content+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e := startGateway(t, setup{
		gateway: `
		max_tokens_default 32768` + backendBlock("oai", "oai", model, in, out),
		mocks: []mockSpec{{key: "oai", lines: "models " + model + "\n\t\tcompletion_tokens 7\n\t\tchunks 3" +
			"\n\t\ttool_use exec_command `{\"cmd\":\"cat hello.txt\"}`"}},
	})
	const initial = "1000"
	u, k := e.userWithKey("codex-tool@example.com", initial)
	tr := newAgentTrace(t, e.gw, k.Key)
	// Codex's hosted web search off, the README's other way (this gateway prices no search).
	stdout, stderr := runAgent(t, tr, true, work, codexEnv(t, tr.url, k.Key, model, "web_search = \"disabled\"\n"), bin,
		"exec", "--skip-git-repo-check", "--sandbox", "read-only", "read hello.txt and tell me the secret word")

	calls := tr.snapshot()
	if len(calls) != 2 {
		t.Fatalf("Codex sent %d requests, want 2 (the call of exec_command, then its output):\n%s\nstderr:\n%s", len(calls), tr, tail(stderr, 3000))
	}
	var served []servedUsage
	for i, c := range calls {
		if c.method != http.MethodPost || c.uri != "/v1/responses" || c.auth != "bearer" || c.status != http.StatusOK {
			t.Fatalf("request %d: %s %s (%s) answered %d, want POST /v1/responses with a Bearer token, 200\n%s", i, c.method, c.uri, c.auth, c.status, tr)
		}
		served = append(served, responsesServed(t, c.body))
	}
	if !strings.Contains(string(calls[0].body), `"function_call"`) || served[0].text != "" {
		t.Errorf("the first answer is not a function call: %s", truncate(string(calls[0].body), 1000))
	}
	var second struct {
		Input []struct {
			Type   string          `json:"type"`
			CallID string          `json:"call_id"`
			Output json.RawMessage `json:"output"`
		} `json:"input"`
	}
	if err := json.Unmarshal(calls[1].request, &second); err != nil {
		t.Fatalf("the second request: %v: %s", err, truncate(string(calls[1].request), 1000))
	}
	var output string
	for _, it := range second.Input {
		if it.Type == "function_call_output" && strings.HasPrefix(it.CallID, "call_mock") {
			output = string(it.Output)
		}
	}
	if !strings.Contains(output, "wombat42") {
		t.Errorf("the second request does not bring the command's output back in a function_call_output: %q\nstderr:\n%s", truncate(output, 1000), tail(stderr, 3000))
	}
	if got := strings.TrimSpace(stdout); got != tokens(4) || served[1].text != tokens(4) {
		t.Errorf("Codex printed %q, was streamed %q; want the mock's %q", got, served[1].text, tokens(4))
	}
	if n := e.mockCounts("oai")["/v1/responses"]; n != 2 {
		t.Errorf("the backend got %d responses requests, want 2", n)
	}
	checkAgentBill(t, e, u.ID, initial, priceOf(t, in, "", "", out), served)
}
