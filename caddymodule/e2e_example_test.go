package caddymodule_test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestMakeRunNewcomerCurl: what `make run` runs (Caddyfile.example, on free ports and a temp
// store) lets a newcomer without account or key chat with "cheapest" on anonymous credits
// until a 402 sends them to sign in (API.md §1).
func TestMakeRunNewcomerCurl(t *testing.T) {
	raw, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatalf("reading Caddyfile.example: %v", err)
	}
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	text := string(raw)
	// Every port of the example moves to a free one; the store and the logs move to dir.
	ports := map[string]int{}
	text = regexp.MustCompile(`(localhost|127\.0\.0\.1):(\d{2,5})\b`).ReplaceAllStringFunc(text, func(m string) string {
		host, port, _ := strings.Cut(m, ":")
		if _, ok := ports[port]; !ok {
			ports[port] = freePort(t)
		}
		return fmt.Sprintf("%s:%d", host, ports[port])
	})
	text = strings.ReplaceAll(text, "./data/", dir+"/")
	text = regexp.MustCompile(`(?m)^(\s*)log$`).ReplaceAllString(text, "${1}log {\n${1}\toutput file "+filepath.Join(dir, "access.log")+"\n${1}}")
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
	e := &env{t: t, dir: dir, admin: fmt.Sprintf("http://localhost:%d", adminPort), gw: fmt.Sprintf("http://localhost:%d", gwPort),
		client: &http.Client{Timeout: 30 * time.Second}, dbPath: filepath.Join(dir, "gateway.db")}
	e.waitAdmin()

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
	// ... until the anonymous credits run out.
	var last *response
	for i := 0; i < 500 && last == nil; i++ {
		r := e.post("/v1/chat/completions", curl, nil)
		switch r.status {
		case http.StatusOK:
		case http.StatusPaymentRequired:
			last = r
		default:
			t.Fatalf("curl %d: %s", i+2, r)
		}
	}
	if last == nil {
		t.Fatalf("no 402 after 500 requests")
	}
	errorOf(t, last, http.StatusPaymentRequired, "insufficient_credits")
	if loc := last.header.Get("Location"); !strings.Contains(loc, "/auth/login") {
		t.Errorf("402 Location %q, want the sign-in page", loc)
	}
	e.checkAllAccounts(0)
}
