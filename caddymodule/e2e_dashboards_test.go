package caddymodule_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/dashboards"
)

// TestDashboardQueriesAgainstPrometheus: the SRE's story. A real Prometheus (Debian's binary)
// scrapes a running gateway every second, with dashboards/rules.yml loaded; traffic goes
// through the gateway (answers, streams, a failover, a request no backend answers, a bad key, a
// 402, a 429); then every series a dashboard or rule names is one the gateway exports, every dashboard
// query and recording rule returns data through Prometheus' HTTP API, `promtool check metrics`
// finds nothing to lint in the gateway's series, the README's metrics table lists every series,
// the ledger identity of the credit counters holds, and the access log carries the gateway's
// fields and no key.
func TestDashboardQueriesAgainstPrometheus(t *testing.T) {
	prometheusBin := lookBinary(t, "prometheus", "prometheus")
	promtool := lookBinary(t, "prometheus", "promtool")
	noHC := "\t\t\thealth_check {\n\t\t\t\tdisabled\n\t\t\t}\n"
	model := func(name, in, out string) string {
		return "\t\t\tmodel " + name + " {\n\t\t\t\tinput_price " + in + "\n\t\t\t\toutput_price " + out + "\n\t\t\t}\n"
	}
	e := startGateway(t, setup{
		gateway: `
		failover 3
		backend flaky {
			url {closed}
			dial_timeout 1s
` + noHC + model("mock-small", "100", "200") + `
		}
		backend oai {
			url {mock.oai}
` + noHC + model("mock-small", "1000", "2000") + `
		}
		backend gone {
			url {closed2}
			dial_timeout 1s
			health_check {
				interval 200ms
				timeout 200ms
			}
` + model("mock-gone", "100", "200") + `
		}
		anonymous {
			credits 1
			signin_url https://example.com/login
		}
		rate_limits {
			default_tier free
			anonymous_tier anon
			tier anon {
				burst_per_second 1
				requests_per_minute 1
			}
			tier free {
				requests_per_minute 1000
			}
		}`,
		mocks: []mockSpec{{key: "oai", lines: "models mock-small"}},
	})
	prom := startPrometheus(t, prometheusBin, e.adminAddr)

	drift0 := ledgerDrift(t, e.scrape())
	u, k := e.userWithKey("sre@example.com", "10")
	chat := func(model string, stream bool) string {
		return fmt.Sprintf(`{"model":%q,"stream":%v,"messages":[{"role":"user","content":"watch me"}],"max_tokens":4}`, model, stream)
	}
	for i := range 4 {
		if r := e.post("/v1/chat/completions", chat("mock-small", i%2 == 1), bearer(k.Key)); r.status != http.StatusOK {
			t.Fatalf("chat %d: %s", i, r)
		}
	}
	if r := e.post("/v1/chat/completions", chat("mock-gone", false), bearer(k.Key)); r.status < 500 {
		t.Fatalf("a model no backend serves answered: %s", r)
	}
	if r := e.post("/v1/chat/completions", chat("mock-small", false), bearer("sk_live_nope_nope")); r.status != http.StatusUnauthorized {
		t.Fatalf("a bad key: %s", r)
	}
	_, poor := e.userWithKey("poor@example.com", "0.000001")
	if r := e.post("/v1/chat/completions", chat("mock-small", false), bearer(poor.Key)); r.status != http.StatusPaymentRequired {
		t.Fatalf("a poor caller: %s", r)
	}
	// An anonymous caller over its tier's rate: 429.
	if r := e.post("/v1/chat/completions", chat("mock-small", false), nil); r.status != http.StatusOK {
		t.Fatalf("anonymous: %s", r)
	}
	if r := e.post("/v1/chat/completions", chat("mock-small", false), nil); r.status != http.StatusTooManyRequests {
		t.Fatalf("anonymous over its rate: %s", r)
	}
	// The backend whose health checks fail is reported down.
	poll(t, 20*time.Second, "llm_gateway_backend_up{backend=gone} is 0", func() (bool, string) {
		s := e.scrape()
		up, found := metricSum(s, "llm_gateway_backend_up", map[string]string{"backend": "gone"})
		oai, _ := metricSum(s, "llm_gateway_backend_up", map[string]string{"backend": "oai"})
		return found && up == 0 && oai == 1, fmt.Sprintf("gone %v (found %v), oai %v", up, found, oai)
	})

	raw := scrapeText(t, e)
	samples := e.scrape()
	if f, _ := metricSum(samples, "llm_gateway_failovers_total", map[string]string{"backend": "flaky"}); f == 0 {
		t.Error("no failover was counted")
	}

	// The credit counters' identity: reserved = settled + refunded + released after
	// expiry + open, so their difference did not move.
	if d := ledgerDrift(t, samples); math.Abs(d-drift0) > 1e-9 {
		t.Errorf("ledger drift moved from %v to %v", drift0, d)
	}

	// Every name a dashboard or rule uses is exported (or recorded by a rule).
	exported := map[string]bool{}
	for _, s := range samples {
		exported[s.name] = true
	}
	recorded, err := dashboards.RecordedNames()
	if err != nil {
		t.Fatal(err)
	}
	queries, err := dashboards.Queries()
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range queries {
		names, err := dashboards.MetricNames(q.Expr)
		if err != nil {
			t.Errorf("%s: %v", q, err)
			continue
		}
		for _, n := range names {
			if !exported[n] && !slices.Contains(recorded, n) {
				t.Errorf("%s: names %s, which the gateway does not export", q, n)
			}
		}
	}

	// The README's table lists every series; promtool finds nothing to lint in them.
	families := metricFamilies(raw)
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if !strings.Contains(string(readme), "| `"+f+"` |") {
			t.Errorf("%s is not in the README's metrics table", f)
		}
	}
	if len(families) < 18 {
		t.Errorf("only %d gateway series: %v", len(families), families)
	}
	lint := exec.Command(promtool, "check", "metrics")
	lint.Stdin = strings.NewReader(gatewayLines(raw))
	if out, err := lint.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// Through Prometheus: every dashboard query and recording rule returns data.
	var pending []string
	for _, q := range queries {
		switch q.Kind {
		case "panel":
			pending = append(pending, dashboards.Expand(q.Expr, "1m"))
		case "record":
			pending = append(pending, strings.TrimPrefix(q.Where, q.Where[:strings.Index(q.Where, "/")+1]))
		}
	}
	ok, why := waitFor(60*time.Second, func() (bool, string) {
		pending = slices.DeleteFunc(pending, func(expr string) bool { return prom.query(t, expr) > 0 })
		return len(pending) == 0, fmt.Sprintf("%d queries return no data, the first: %s", len(pending), strings.Join(pending, "\n"))
	})
	if !ok {
		t.Errorf("through Prometheus: %s", why)
	}

	// The access log: the gateway's fields, ids only, never a key.
	checkAccessLog(t, e, u.ID, k)
}

// lookBinary finds the first of names in PATH, which Debian's package pkg provides: when none
// is there, the test fails in CI (CI set) and is skipped elsewhere.
func lookBinary(t *testing.T, pkg string, names ...string) string {
	t.Helper()
	for _, name := range names {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	missing := strings.Join(names, ", ")
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is missing (apt-get install %s)", missing, pkg)
	}
	t.Skipf("%s is missing (apt-get install %s provides it); skipping outside CI", missing, pkg)
	return ""
}

// prometheus is a Prometheus server started by a test.
type prometheus struct {
	url    string
	client *http.Client
}

// startPrometheus runs Prometheus on a free loopback port, scraping the gateway's admin
// endpoint every second and evaluating dashboards/rules.yml every second, with its storage in
// a temp dir; it is killed when the test ends.
func startPrometheus(t *testing.T, bin, target string) *prometheus {
	t.Helper()
	dir := t.TempDir()
	rules, err := filepath.Abs("../dashboards/rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: llm-gateway
    static_configs:
      - targets: [%q]
`, rules, target)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	logFile, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting prometheus: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logFile.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logFile.Name())
			t.Logf("prometheus log:\n%s", truncate(string(b), 4000))
		}
	})
	p := &prometheus{url: "http://" + addr, client: &http.Client{Timeout: 10 * time.Second}}
	poll(t, 30*time.Second, "prometheus is ready", func() (bool, string) {
		resp, err := p.client.Get(p.url + "/-/ready")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
	return p
}

// query runs an instant query and returns how many series it answered.
func (p *prometheus) query(t *testing.T, expr string) int {
	t.Helper()
	resp, err := p.client.Get(p.url + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		t.Logf("query %s: %v", expr, err)
		return 0
	}
	defer resp.Body.Close()
	var out struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out.Status != "success" {
		t.Errorf("query %s: %s %v %s", expr, resp.Status, err, out.Error)
		return 0
	}
	return len(out.Data.Result)
}

// scrapeText is the admin endpoint's /metrics as text.
func scrapeText(t *testing.T, e *env) string {
	t.Helper()
	resp, err := e.client.Get(e.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s %v", resp.Status, err)
	}
	return string(b)
}

var typeLine = regexp.MustCompile(`(?m)^# TYPE (llm_gateway_\w+) `)

// metricFamilies are the gateway's series in a scrape, by the names of their families.
func metricFamilies(raw string) []string {
	var out []string
	for _, m := range typeLine.FindAllStringSubmatch(raw, -1) {
		out = append(out, m[1])
	}
	return out
}

// gatewayLines keeps the lines of the gateway's series (comments included).
func gatewayLines(raw string) string {
	var b strings.Builder
	sc := bufio.NewScanner(strings.NewReader(raw))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		name := strings.TrimPrefix(strings.TrimPrefix(line, "# HELP "), "# TYPE ")
		if strings.HasPrefix(name, "llm_gateway_") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// ledgerDrift is reserved - settled - refunded - released after expiry - open
// credits: it moves only when credits are lost track of.
func ledgerDrift(t *testing.T, s []sample) float64 {
	t.Helper()
	get := func(name string, labels map[string]string) float64 {
		v, _ := metricSum(s, name, labels)
		return v
	}
	kind := func(k string) float64 { return get("llm_gateway_credits_total", map[string]string{"kind": k}) }
	return kind("reserved") - kind("settled") - kind("refunded") -
		get("llm_gateway_credits_released_expired_total", nil) - get("llm_gateway_reservations_open_credits", nil)
}

// checkAccessLog: the access log entry of a request made with the key carries the user and key
// ids, the model, the backend, the tokens, the credits and the outcome; no log has the key.
func checkAccessLog(t *testing.T, e *env, userID string, k keyView) {
	t.Helper()
	want := map[string]any{"llm_user_id": userID, "llm_key_id": k.ID, "llm_model": "mock-small",
		"llm_backend": "oai", "llm_outcome": "ok", "llm_auth": "api_key"}
	var entry map[string]any
	poll(t, 10*time.Second, "the access log has the request", func() (bool, string) {
		b, err := os.ReadFile(filepath.Join(e.dir, "access.log"))
		if err != nil {
			return false, err.Error()
		}
		for line := range strings.Lines(string(b)) {
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil && m["llm_key_id"] == k.ID && m["llm_outcome"] == "ok" {
				entry = m
				return true, ""
			}
		}
		return false, truncate(string(b), 2000)
	})
	for f, v := range want {
		if entry[f] != v {
			t.Errorf("access log %s = %v, want %v", f, entry[f], v)
		}
	}
	for _, f := range []string{"llm_input_tokens", "llm_output_tokens"} {
		if n, ok := entry[f].(float64); !ok || n <= 0 {
			t.Errorf("access log %s = %v, want a count", f, entry[f])
		}
	}
	if c, ok := entry["llm_credits"].(string); !ok || c == "" || c == "0" {
		t.Errorf("access log llm_credits = %v, want the charge", entry["llm_credits"])
	}
	secret := k.Key[strings.LastIndex(k.Key, "_")+1:]
	for _, name := range []string{"access.log", "caddy.log"} {
		b, err := os.ReadFile(filepath.Join(e.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(secret)) {
			t.Errorf("%s holds the key's secret", name)
		}
	}
}

// TestBackendUpFollowsReload: llm_gateway_backend_up reports the running configuration's
// backends: after a reload that drops one and adds another, the dropped one is gone.
func TestBackendUpFollowsReload(t *testing.T) {
	backend := func(name string) string {
		return `
		backend ` + name + ` {
			url {mock.oai}
			health_check {
				disabled
			}
			model mock-small {
				input_price 1
				output_price 1
			}
		}`
	}
	s := setup{gateway: backend("one") + backend("two"), mocks: []mockSpec{{key: "oai", lines: "models mock-small"}}}
	e := startGateway(t, s)
	expect := func(want map[string]bool) {
		t.Helper()
		got := map[string]bool{}
		for _, x := range e.scrape() {
			if x.name == "llm_gateway_backend_up" {
				got[x.labels["backend"]] = x.value == 1
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("llm_gateway_backend_up: %v, want %v", got, want)
		}
	}
	expect(map[string]bool{"one": true, "two": true})
	s.gateway = backend("one") + backend("three")
	e.load(s)
	expect(map[string]bool{"one": true, "three": true})
}
