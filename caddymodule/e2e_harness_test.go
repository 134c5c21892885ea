package caddymodule_test

// The end-to-end harness: one in-process Caddy per test (caddy.Load of an adapted Caddyfile on
// free loopback ports, the admin endpoint included), mock model backends as extra sites of the
// same config, a temp-dir SQLite store, helpers for the admin API, the ledger, the mock stats and
// the metrics, and the ledger invariant check. Child processes (kill -9, the CLI) re-exec this
// test binary: TestMain runs caddycmd.Main when LLM_GATEWAY_E2E_CHILD_ARGS is set.

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "modernc.org/sqlite"

	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/demoapp"
	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/mockbackend"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// childArgsEnv, when set in the environment, makes this test binary run Caddy's command line
// with the JSON array it holds as arguments, instead of the tests.
const childArgsEnv = "LLM_GATEWAY_E2E_CHILD_ARGS"

func TestMain(m *testing.M) {
	if raw := os.Getenv(childArgsEnv); raw != "" {
		var args []string
		if err := json.Unmarshal([]byte(raw), &args); err != nil {
			fmt.Fprintln(os.Stderr, "bad", childArgsEnv, err)
			os.Exit(2)
		}
		os.Args = append([]string{"caddy"}, args...)
		caddycmd.Main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// freePort returns a loopback TCP port that was free a moment ago, and never one it returned
// before in this process: the kernel may hand the same ephemeral port to two listen-and-close
// calls in a row, and two sites of one config on one port do not load ("ambiguous site").
func freePort(t testing.TB) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
	t.Fatal("finding a free port: 100 tries gave ports handed out before")
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// mockSpec is one mock backend site: key names it in placeholders ({mock.KEY}), lines are extra
// lines of its llm_mock_backend block (its name is set by the harness, unique per test).
type mockSpec struct {
	key   string
	lines string
}

// setup describes one gateway configuration.
type setup struct {
	// gateway is the body of the llm_gateway block without the store line. Placeholders:
	// {mock.KEY} (a mock's base URL), {closed} and {closed2} (URLs on ports nobody listens
	// on), {gw} (the gateway's own base URL), {port.NAME} (a free port picked for NAME, the
	// same number wherever NAME appears), {dir}.
	gateway string
	mocks   []mockSpec
	// sites are raw Caddyfile site blocks appended after the mock sites, with the same
	// placeholders (e.g. a site on http://127.0.0.1:{port.app}).
	sites string
	// logLevel of Caddy's default logger (written to {dir}/caddy.log). Default INFO.
	logLevel string
	// dsn, when set, is the PostgreSQL store of the gateway (pgtest.NewDatabase) in place of
	// an embedded store file in the test's directory.
	dsn string
	// storeBlock is the body of the store directive's block (e.g. "lease_size 1").
	storeBlock string
}

// env is a running gateway.
type env struct {
	t         testing.TB
	dir       string
	adminAddr string // 127.0.0.1:port
	admin     string // http://127.0.0.1:port
	gwPort    int
	gw        string // http://127.0.0.1:port
	mockPorts map[string]int
	// ports are the ports picked for the {port.NAME} placeholders.
	ports     map[string]int
	closed    int // a port nobody listens on
	closed2   int // another one
	dbPath    string
	dsn       string // the PostgreSQL store, when the setup names one
	storeOpts string // the store directive's block
	client    *http.Client
	child     *exec.Cmd // set for a child-process gateway
	childLog  *os.File
	childDone chan struct{} // closed when the child process has exited
}

// newEnv picks the ports and the temp dir of a gateway; start or startChild runs it.
func newEnv(t testing.TB, s setup) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), mockPorts: map[string]int{}, ports: map[string]int{}}
	e.pickPorts(s)
	e.dbPath = filepath.Join(e.dir, "gateway.db")
	e.dsn = s.dsn
	e.storeOpts = s.storeBlock
	e.client = &http.Client{
		Timeout: 60 * time.Second,
		Transport: &http.Transport{
			MaxIdleConns: 300, MaxIdleConnsPerHost: 300, MaxConnsPerHost: 0,
			DisableCompression: true,
		},
	}
	t.Cleanup(e.client.CloseIdleConnections)
	return e
}

// pickPorts chooses free loopback ports for the admin endpoint, the gateway and the mocks.
// A port found free may be taken by another process before Caddy binds it: startChild picks
// again when its child could not start.
func (e *env) pickPorts(s setup) {
	t := e.t
	ap := freePort(t)
	e.adminAddr = fmt.Sprintf("127.0.0.1:%d", ap)
	e.admin = "http://" + e.adminAddr
	e.gwPort = freePort(t)
	e.gw = fmt.Sprintf("http://127.0.0.1:%d", e.gwPort)
	for _, m := range s.mocks {
		e.mockPorts[m.key] = freePort(t)
	}
	e.closed = freePort(t)
	e.closed2 = freePort(t)
	for _, m := range portPlaceholder.FindAllStringSubmatch(s.gateway+s.sites, -1) {
		e.ports[m[1]] = freePort(t)
	}
}

// backendBlock is a Caddyfile backend serving one model from the mock named mock, with health
// checks off and the given prices (credits per 1M tokens).
func backendBlock(name, mock, model, in, out string) string {
	return fmt.Sprintf(`
		backend %s {
			url {mock.%s}
			health_check {
				disabled
			}
			model %s {
				input_price %s
				output_price %s
			}
		}`, name, mock, model, in, out)
}

// mockName is the stats name of a mock: unique per test, since counters live in the process.
func (e *env) mockName(key string) string {
	return strings.NewReplacer("/", "-", " ", "-").Replace(e.t.Name()) + "-" + key
}

func (e *env) mockURL(key string) string {
	p, ok := e.mockPorts[key]
	if !ok {
		e.t.Fatalf("no mock %q", key)
	}
	return fmt.Sprintf("http://127.0.0.1:%d", p)
}

// caddyfile renders the whole Caddyfile of s.
func (e *env) caddyfile(s setup) string {
	level := s.logLevel
	if level == "" {
		level = "INFO"
	}
	var b strings.Builder
	fmt.Fprintf(&b, `{
	admin %s
	persist_config off
	auto_https off
	grace_period 3s
	storage file_system %s
	log {
		output file %s
		level %s
	}
	servers {
		trusted_proxies_strict
	}
}

http://127.0.0.1:%d {
	bind 127.0.0.1
	log {
		output file %s%s
	}
	llm_gateway {
		store %s
%s
	}
	respond "Not found" 404
}
`, e.adminAddr, filepath.Join(e.dir, "storage"), filepath.Join(e.dir, "caddy.log"), level,
		e.gwPort, filepath.Join(e.dir, "access.log"), accessLogFormat, e.storeLine(), e.expand(s.gateway))
	for _, m := range s.mocks {
		fmt.Fprintf(&b, `
http://127.0.0.1:%d {
	bind 127.0.0.1
	llm_mock_backend {
		name %s
%s
	}
}
`, e.mockPorts[m.key], e.mockName(m.key), m.lines)
	}
	b.WriteString(e.expand(s.sites))
	return b.String()
}

// accessLogFormat is put in the gateway site's access log block. Keep it the same as what
// Caddyfile.example ships: Caddy redacts Authorization and Cookie itself, but logs every other
// request header as it came, so the X-API-Key and apikey headers must be filtered out
// (TestKeyChatBothStyles and TestMakeRunNewcomerCurl check that no key reaches a log).
const accessLogFormat = `
		format filter {
			request>headers>X-Api-Key delete
			request>headers>Apikey delete
		}`

var (
	placeholder     = regexp.MustCompile(`\{mock\.([a-zA-Z0-9_-]+)\}`)
	portPlaceholder = regexp.MustCompile(`\{port\.([a-zA-Z0-9_-]+)\}`)
)

func (e *env) expand(s string) string {
	s = placeholder.ReplaceAllStringFunc(s, func(m string) string {
		return e.mockURL(placeholder.FindStringSubmatch(m)[1])
	})
	s = portPlaceholder.ReplaceAllStringFunc(s, func(m string) string {
		return strconv.Itoa(e.port(portPlaceholder.FindStringSubmatch(m)[1]))
	})
	s = strings.ReplaceAll(s, "{gw}", e.gw)
	s = strings.ReplaceAll(s, "{closed}", fmt.Sprintf("http://127.0.0.1:%d", e.closed))
	s = strings.ReplaceAll(s, "{closed2}", fmt.Sprintf("http://127.0.0.1:%d", e.closed2))
	return strings.ReplaceAll(s, "{dir}", e.dir)
}

// port is the free port picked for a {port.NAME} placeholder.
func (e *env) port(name string) int {
	p, ok := e.ports[name]
	if !ok {
		e.t.Fatalf("no port %q", name)
	}
	return p
}

// adapt turns a Caddyfile into Caddy's JSON config.
func adapt(t testing.TB, caddyfile string) []byte {
	t.Helper()
	a := caddyconfig.GetAdapter("caddyfile")
	if a == nil {
		t.Fatal("no caddyfile adapter")
	}
	cfg, warnings, err := a.Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting the Caddyfile: %v\n%s", err, caddyfile)
	}
	for _, w := range warnings {
		if strings.Contains(w.Message, "not formatted") {
			continue
		}
		t.Logf("caddyfile warning: %s", w.String())
	}
	return cfg
}

// startGateway runs s in this process and stops it when the test ends.
func startGateway(t testing.TB, s setup) *env {
	t.Helper()
	e := newEnv(t, s)
	e.load(s)
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Logf("stopping caddy: %v", err)
		}
	})
	return e
}

// load (re)loads s into the running Caddy.
func (e *env) load(s setup) {
	e.t.Helper()
	if err := caddy.Load(adapt(e.t, e.caddyfile(s)), true); err != nil {
		e.t.Fatalf("loading the config: %v", err)
	}
	e.waitAdmin()
}

// waitAdmin polls the admin endpoint until it answers.
func (e *env) waitAdmin() {
	e.t.Helper()
	poll(e.t, 60*time.Second, "the admin endpoint answers", func() (bool, string) {
		resp, err := e.client.Get(e.admin + "/llm_gateway/backends")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
}

// startChild runs s in a child process (this test binary running `caddy run`) and kills it when
// the test ends.
func (e *env) startChild(s setup) {
	e.t.Helper()
	first := e.child == nil
	for attempt := 1; ; attempt++ {
		e.launchChild(s)
		if e.childServing() {
			return
		}
		// The child could not bind its ports (another process took one after it was found
		// free): on the first start, pick new ports and try again.
		_ = e.child.Process.Kill()
		<-e.childDone
		if !first || attempt == 3 {
			log, _ := os.ReadFile(filepath.Join(e.dir, "child.log"))
			e.t.Fatalf("the child gateway is not serving on %s; its log:\n%s", e.gw, tail(string(log), 3000))
		}
		e.pickPorts(s)
	}
}

// childServing waits until the child's admin endpoint answers and its gateway site answers as
// the gateway does (not another process that took the port), and reports whether it did.
func (e *env) childServing() bool {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-e.childDone:
			return false // it exited
		default:
		}
		resp, err := e.client.Get(e.admin + "/llm_gateway/backends")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				r, err := e.client.Get(e.gw + "/v1/models")
				if err == nil {
					body, _ := io.ReadAll(r.Body)
					r.Body.Close()
					return strings.Contains(string(body), `"object":"list"`) || strings.Contains(string(body), `"success":false`)
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// launchChild starts the child process on the current ports.
func (e *env) launchChild(s setup) {
	e.t.Helper()
	file := filepath.Join(e.dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(e.caddyfile(s)), 0o600); err != nil {
		e.t.Fatal(err)
	}
	logf, err := os.OpenFile(filepath.Join(e.dir, "child.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := childCommand(e.t, e.dir, "run", "--config", file, "--adapter", "caddyfile")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		e.t.Fatalf("starting the child: %v", err)
	}
	e.child, e.childLog = cmd, logf
	done := make(chan struct{})
	e.childDone = done
	go func() { _ = cmd.Wait(); close(done) }()
	e.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		logf.Close()
	})
}

// kill9 kills the child process with SIGKILL and reaps it.
func (e *env) kill9() {
	e.t.Helper()
	if err := e.child.Process.Kill(); err != nil {
		e.t.Fatalf("kill -9: %v", err)
	}
	<-e.childDone
}

// childCommand is this test binary running Caddy's command line with args.
func childCommand(t testing.TB, dir string, args ...string) *exec.Cmd {
	t.Helper()
	raw, _ := json.Marshal(args)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childArgsEnv+"="+string(raw),
		"HOME="+dir, "XDG_CONFIG_HOME="+filepath.Join(dir, "xdg-config"), "XDG_DATA_HOME="+filepath.Join(dir, "xdg-data"))
	return cmd
}

// runCLI runs `caddy <args...>` in a child process and returns its stdout and stderr.
func runCLI(t testing.TB, dir string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := childCommand(t, dir, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		return "", "", err
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		err = <-done
	}
	return o.String(), e.String(), err
}

// poll calls f until it reports true or the deadline passes, then fails the test with what f
// said last.
func poll(t testing.TB, within time.Duration, what string, f func() (bool, string)) {
	t.Helper()
	if ok, last := waitFor(within, f); !ok {
		t.Fatalf("waited %s for %s; last: %s", within, what, last)
	}
}

// waitFor calls f until it reports true or the deadline passes; it reports whether f did, and
// what f said last.
func waitFor(within time.Duration, f func() (bool, string)) (bool, string) {
	deadline := time.Now().Add(within)
	delay := 5 * time.Millisecond
	for {
		ok, msg := f()
		if ok {
			return true, msg
		}
		if time.Now().After(deadline) {
			return false, msg
		}
		time.Sleep(delay) // bounded polling
		delay = min(delay*2, 200*time.Millisecond)
	}
}

// HTTP

// response is a whole HTTP answer.
type response struct {
	status int
	header http.Header
	body   []byte
}

func (r *response) String() string {
	return fmt.Sprintf("%d %s", r.status, truncate(string(r.body), 600))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// object decodes the body as a JSON object (numbers kept as json.Number).
func (r *response) object(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("answer is not a JSON object: %v: %s", err, r)
	}
	return m
}

// request sends one request. body is a string, []byte, nil, or any value encoded as JSON.
func (e *env) request(method, url string, body any, hdr map[string]string) *response {
	e.t.Helper()
	req := e.newRequest(context.Background(), method, url, body, hdr)
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s: reading the answer: %v", method, url, err)
	}
	return &response{status: resp.StatusCode, header: resp.Header, body: b}
}

func (e *env) newRequest(ctx context.Context, method, url string, body any, hdr map[string]string) *http.Request {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return req
}

// post sends a JSON body to a gateway path.
func (e *env) post(path string, body any, hdr map[string]string) *response {
	e.t.Helper()
	return e.request(http.MethodPost, e.gw+path, body, hdr)
}

// bearer is the Authorization header of an API key.
func bearer(key string) map[string]string { return map[string]string{"Authorization": "Bearer " + key} }

// Admin API

// adminCall sends a request to the admin API and decodes the JSON answer into out (if not nil),
// failing the test unless the status is want.
func (e *env) adminCall(method, path string, body any, want int, out any, hdr map[string]string) *response {
	e.t.Helper()
	r := e.request(method, e.admin+path, body, hdr)
	if r.status != want {
		e.t.Fatalf("%s %s: want %d, got %s", method, path, want, r)
	}
	if out != nil {
		if err := json.Unmarshal(r.body, out); err != nil {
			e.t.Fatalf("%s %s: decoding %T: %v: %s", method, path, out, err, r)
		}
	}
	return r
}

type userView struct {
	ID      string         `json:"id"`
	Email   string         `json:"email"`
	Tier    string         `json:"tier"`
	Balance credits.Amount `json:"balance"`
}

// createUser makes a user with an initial credit (decimal credits, "" for none).
func (e *env) createUser(email, amount string) userView {
	e.t.Helper()
	body := map[string]any{"email": email}
	if amount != "" {
		body["credits"] = json.Number(amount)
	}
	var u userView
	e.adminCall(http.MethodPost, "/llm_gateway/users", body, http.StatusCreated, &u, nil)
	if u.ID == "" {
		e.t.Fatalf("created user has no id")
	}
	return u
}

type keyView struct {
	ID     string   `json:"id"`
	Key    string   `json:"key"`
	Prefix string   `json:"prefix"`
	Name   string   `json:"name"`
	Scopes []string `json:"scopes"`
}

// createKey makes an API key for the user; body nil takes the defaults.
func (e *env) createKey(userID string, body map[string]any) keyView {
	e.t.Helper()
	if body == nil {
		body = map[string]any{"name": "e2e"}
	}
	var out struct {
		APIKey  keyView `json:"api_key"`
		Warning string  `json:"warning"`
	}
	e.adminCall(http.MethodPost, "/llm_gateway/users/"+userID+"/keys", body, http.StatusCreated, &out, nil)
	if out.APIKey.Key == "" || out.APIKey.ID == "" {
		e.t.Fatalf("created key lacks id or key: %+v", out.APIKey)
	}
	return out.APIKey
}

// userWithKey makes a user with credits and a key with the default scopes.
func (e *env) userWithKey(email, amount string) (userView, keyView) {
	e.t.Helper()
	u := e.createUser(email, amount)
	return u, e.createKey(u.ID, nil)
}

type audit struct {
	Credited credits.Amount `json:"credited"`
	Settled  credits.Amount `json:"settled"`
	Open     credits.Amount `json:"open"`
	Balance  credits.Amount `json:"balance"`
}

type usage struct {
	Model             string `json:"model"`
	Backend           string `json:"backend"`
	InputTokens       int64  `json:"input_tokens"`
	OutputTokens      int64  `json:"output_tokens"`
	CachedInputTokens int64  `json:"cached_input_tokens"`
	CacheWriteTokens  int64  `json:"cache_write_tokens"`
	ReasoningTokens   int64  `json:"reasoning_tokens"`
	ResponseID        string `json:"response_id"`
}

type entry struct {
	Seq           int64          `json:"seq"`
	Kind          string         `json:"kind"`
	Amount        credits.Amount `json:"amount"`
	Reason        string         `json:"reason"`
	ReservationID string         `json:"reservation_id"`
	Usage         *usage         `json:"usage"`
}

type ledgerView struct {
	Entries []entry `json:"entries"`
	Audit   audit   `json:"audit"`
}

func (e *env) ledger(userID string) ledgerView {
	e.t.Helper()
	var l ledgerView
	e.adminCall(http.MethodGet, "/llm_gateway/users/"+userID+"/ledger", nil, http.StatusOK, &l, nil)
	return l
}

// settlements are the user's settle entries, oldest first.
func (e *env) settlements(userID string) []entry {
	e.t.Helper()
	var out []entry
	for _, en := range e.ledger(userID).Entries {
		if en.Kind == "settle" {
			out = append(out, en)
		}
	}
	slices.Reverse(out)
	return out
}

func (e *env) balance(userID string) credits.Amount {
	e.t.Helper()
	var u userView
	e.adminCall(http.MethodGet, "/llm_gateway/users/"+userID, nil, http.StatusOK, &u, nil)
	return u.Balance
}

// settledAudit waits until the user has no open reservation, then checks the invariant
// credited == balance + settled + open and returns the books.
func (e *env) settledAudit(userID string) audit {
	e.t.Helper()
	var a audit
	poll(e.t, 15*time.Second, "user "+userID+" has no open reservation", func() (bool, string) {
		a = e.ledger(userID).Audit
		return a.Open == 0, fmt.Sprintf("%+v", a)
	})
	if a.Credited != a.Balance+a.Settled+a.Open {
		e.t.Errorf("user %s: credited %s != balance %s + settled %s + open %s", userID, a.Credited, a.Balance, a.Settled, a.Open)
	}
	return a
}

// Store, read directly

// dbAccount is one account's books, read straight from the SQLite file.
type dbAccount struct {
	id                                 string
	balance, credited, settled, opened credits.Amount
	settleEntries, reservations        int
}

// storeLine is the arguments of the gateway's store directive.
func (e *env) storeLine() string {
	if e.dsn != "" {
		if e.storeOpts != "" {
			return "postgres " + e.dsn + " {\n\t\t\t" + e.storeOpts + "\n\t\t}"
		}
		return "postgres " + e.dsn
	}
	return "sqlite " + e.dbPath
}

// accounts reads every account's books from the store, independently of the gateway.
func (e *env) accounts() []dbAccount {
	e.t.Helper()
	if e.dsn != "" {
		return postgresAccounts(e.t, e.dsn)
	}
	db, err := sql.Open("sqlite", "file:"+e.dbPath+"?_pragma=busy_timeout(10000)&_pragma=query_only(1)")
	if err != nil {
		e.t.Fatalf("opening the store file: %v", err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT a.id, a.balance,
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind IN ('credit', 'grant')),
		(SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		(SELECT coalesce(sum(amount), 0) FROM reservations WHERE account_id = a.id),
		(SELECT count(*) FROM ledger WHERE account_id = a.id AND kind = 'settle'),
		(SELECT count(*) FROM reservations WHERE account_id = a.id)
		FROM accounts AS a ORDER BY a.id`)
	if err != nil {
		e.t.Fatalf("reading the accounts: %v", err)
	}
	defer rows.Close()
	var out []dbAccount
	for rows.Next() {
		var a dbAccount
		if err := rows.Scan(&a.id, &a.balance, &a.credited, &a.settled, &a.opened, &a.settleEntries, &a.reservations); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, a)
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// checkAllAccounts waits until no reservation is open in the store file and the books of every
// account in it balance (credited == balance + settled + open; a store may commit
// asynchronously, so it is given a moment), then checks that, and that no balance is below
// floor. It returns the accounts.
func (e *env) checkAllAccounts(floor credits.Amount) []dbAccount {
	e.t.Helper()
	var accs []dbAccount
	_, last := waitFor(15*time.Second, func() (bool, string) {
		accs = e.accounts()
		var bad []string
		for _, a := range accs {
			if a.reservations > 0 || a.credited != a.balance+a.settled+a.opened {
				bad = append(bad, fmt.Sprintf("%s: %d open (%s), %+v", a.id, a.reservations, a.opened, a))
			}
		}
		return len(bad) == 0, strings.Join(bad, "; ")
	})
	for _, a := range accs {
		if a.reservations > 0 {
			e.t.Errorf("account %s: %d reservations (%s) still open in the store: %s", a.id, a.reservations, a.opened, last)
		}
		if a.credited != a.balance+a.settled+a.opened {
			e.t.Errorf("account %s: credited %s != balance %s + settled %s + open %s", a.id, a.credited, a.balance, a.settled, a.opened)
		}
		if a.balance < floor {
			e.t.Errorf("account %s: balance %s below %s", a.id, a.balance, floor)
		}
	}
	return accs
}

// Mock stats

// mockRequests is how many requests a mock received, over all its model paths.
func (e *env) mockRequests(key string) int64 {
	e.t.Helper()
	counts := e.mockCounts(key)
	var n int64
	for _, c := range counts {
		n += c
	}
	return n
}

// mockCounts reads GET /mock/stats of a mock.
func (e *env) mockCounts(key string) map[string]int64 {
	e.t.Helper()
	r := e.request(http.MethodGet, e.mockURL(key)+"/mock/stats", nil, nil)
	if r.status != http.StatusOK {
		e.t.Fatalf("mock stats of %s: %s", key, r)
	}
	var s struct {
		Name     string           `json:"name"`
		Requests map[string]int64 `json:"requests"`
	}
	if err := json.Unmarshal(r.body, &s); err != nil {
		e.t.Fatal(err)
	}
	if s.Name != e.mockName(key) {
		e.t.Fatalf("mock stats of %s name %q, want %q", key, s.Name, e.mockName(key))
	}
	delete(s.Requests, "/v1/models") // health checks
	delete(s.Requests, "/api/tags")
	return s.Requests
}

// Metrics

var metricLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)`)
var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// sample is one exposed metric sample.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape reads the admin endpoint's /metrics.
func (e *env) scrape() []sample {
	e.t.Helper()
	r := e.request(http.MethodGet, e.admin+"/metrics", nil, nil)
	if r.status != http.StatusOK {
		e.t.Fatalf("GET /metrics: %s", r)
	}
	var out []sample
	sc := bufio.NewScanner(bytes.NewReader(r.body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		m := metricLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v, err := strconv.ParseFloat(m[4], 64)
		if err != nil {
			continue
		}
		s := sample{name: m[1], labels: map[string]string{}, value: v}
		for _, lp := range labelPair.FindAllStringSubmatch(m[3], -1) {
			s.labels[lp[1]] = lp[2]
		}
		out = append(out, s)
	}
	return out
}

// metricSum adds the samples of name whose labels include want; found reports any match.
func metricSum(samples []sample, name string, want map[string]string) (sum float64, found bool) {
	for _, s := range samples {
		if s.name != name {
			continue
		}
		match := true
		for k, v := range want {
			if s.labels[k] != v {
				match = false
				break
			}
		}
		if match {
			sum += s.value
			found = true
		}
	}
	return sum, found
}

// Money

// cost is what in and out tokens cost at prices in credits per 1M tokens (decimal strings),
// computed here independently of the gateway: ceil((in*inPrice + out*outPrice) / 1e6)
// micro-credits, with the prices in micro-credits.
func cost(t testing.TB, in, out int64, inPrice, outPrice string) credits.Amount {
	t.Helper()
	ip, op := micro(t, inPrice), micro(t, outPrice)
	x := new(big.Int).Mul(big.NewInt(in), big.NewInt(ip))
	x.Add(x, new(big.Int).Mul(big.NewInt(out), big.NewInt(op)))
	x.Add(x, big.NewInt(999_999))
	x.Quo(x, big.NewInt(1_000_000))
	return credits.Amount(x.Int64())
}

// micro parses decimal credits into micro-credits.
func micro(t testing.TB, s string) int64 {
	t.Helper()
	whole, frac, _ := strings.Cut(s, ".")
	if len(frac) > 6 {
		t.Fatalf("amount %q has more than 6 decimals", s)
	}
	frac += strings.Repeat("0", 6-len(frac))
	w, err1 := strconv.ParseInt(whole, 10, 64)
	f, err2 := strconv.ParseInt(frac, 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("bad amount %q", s)
	}
	return w*1_000_000 + f
}

// amountOf parses a decimal amount of credits (a header value or a JSON number).
func amountOf(t testing.TB, v any) credits.Amount {
	t.Helper()
	var s string
	switch x := v.(type) {
	case string:
		s = x
	case json.Number:
		s = x.String()
	default:
		t.Fatalf("amount %v is a %T", v, v)
	}
	a, err := credits.ParseAmount(s)
	if err != nil {
		t.Fatalf("amount %q: %v", s, err)
	}
	return a
}

// inputBound mirrors the gateway's prompt bound (request.go: one token per byte of the whole
// request body, images aside), to size reservations in tests.
func inputBound(body string) int64 { return int64(len(body)) }

// tokens is the mock's generated text of n tokens: "tok1 tok2 ... tokN".
func tokens(n int) string {
	parts := make([]string, n)
	for i := range parts {
		parts[i] = "tok" + strconv.Itoa(i+1)
	}
	return strings.Join(parts, " ")
}

// errorOf checks an API.md §5 error body and returns its error object.
func errorOf(t testing.TB, r *response, status int, code string) map[string]any {
	t.Helper()
	if r.status != status {
		t.Fatalf("want %d %s, got %s", status, code, r)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("error Content-Type %q", ct)
	}
	m := r.object(t)
	if msg, ok := m["error"].(string); ok {
		// The Ollama shape (on /api/*): {"error": "<message>", "code", "details"}.
		if m["code"] != code || msg == "" {
			t.Errorf("Ollama-shaped error: code %v, want %s, message %q: %s", m["code"], code, msg, r)
		}
		return map[string]any{"code": m["code"], "message": msg, "param": m["param"], "details": m["details"]}
	}
	if m["success"] != false {
		t.Errorf("error body success = %v, want false: %s", m["success"], r)
	}
	eo, ok := m["error"].(map[string]any)
	if !ok {
		t.Fatalf("error body has no error object: %s", r)
	}
	if eo["code"] != code {
		t.Errorf("error code %v, want %s: %s", eo["code"], code, r)
	}
	for _, f := range []string{"type", "message"} {
		if s, _ := eo[f].(string); s == "" {
			t.Errorf("error.%s empty: %s", f, r)
		}
	}
	if _, ok := eo["param"]; !ok {
		t.Errorf("error.param missing: %s", r)
	}
	return eo
}

// SSE and NDJSON

// sseEvents splits an SSE body into the data of its events.
func sseEvents(t testing.TB, body []byte) []string {
	t.Helper()
	var out []string
	for _, ev := range strings.Split(strings.ReplaceAll(string(body), "\r\n", "\n"), "\n\n") {
		ev = strings.TrimSpace(ev)
		if ev == "" {
			continue
		}
		var data []string
		for _, line := range strings.Split(ev, "\n") {
			if d, ok := strings.CutPrefix(line, "data:"); ok {
				data = append(data, strings.TrimPrefix(d, " "))
			}
		}
		out = append(out, strings.Join(data, "\n"))
	}
	return out
}

// ndjson splits an NDJSON body into objects.
func ndjson(t testing.TB, body []byte) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(string(body), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		var m map[string]any
		dec := json.NewDecoder(strings.NewReader(line))
		dec.UseNumber()
		if err := dec.Decode(&m); err != nil {
			t.Fatalf("NDJSON line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

func decodeObject(t testing.TB, s string) map[string]any {
	t.Helper()
	var m map[string]any
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("not a JSON object: %v: %q", err, s)
	}
	return m
}

func num(t testing.TB, v any) int64 {
	t.Helper()
	n, ok := v.(json.Number)
	if !ok {
		t.Fatalf("%v (%T) is not a number", v, v)
	}
	i, err := n.Int64()
	if err != nil {
		t.Fatalf("%v is not an integer", v)
	}
	return i
}
