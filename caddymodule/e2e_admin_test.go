package caddymodule_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestAdminAPIAndCLI: an operator manages users, credits (idempotently), keys and looks at the
// ledger and the backends through Caddy's admin API, and does the same with
// `caddy llm-gateway ...`; a key made by the CLI is printed once and works.
func TestAdminAPIAndCLI(t *testing.T) {
	// Only the last backend runs active health checks: see raceyHealthChecks in the report of
	// TestActiveHealthChecksDuringProvisionRace.
	e := startGateway(t, setup{
		gateway: `
		backend oai {
			url {mock.oai}
			health_check {
				disabled
			}
			model mock-small {
				input_price 1000
				output_price 2000
			}
		}
		backend down {
			url {closed}
			health_check {
				interval 200ms
				timeout 200ms
			}
			model mock-large {
				input_price 10
				output_price 20
			}
		}`,
		mocks: []mockSpec{{key: "oai", lines: "models mock-small"}},
	})

	// Users.
	u := e.createUser("ops@example.com", "1.5")
	if u.Email != "ops@example.com" || u.Balance != credits.Amount(micro(t, "1.5")) {
		t.Errorf("created user %+v", u)
	}
	var got userView
	e.adminCall(http.MethodGet, "/llm_gateway/users/"+u.ID, nil, http.StatusOK, &got, nil)
	if got.ID != u.ID || got.Balance != u.Balance {
		t.Errorf("GET user %+v, want %+v", got, u)
	}
	errorOf(t, e.request(http.MethodGet, e.admin+"/llm_gateway/users/usr_nosuchuser", nil, nil), http.StatusNotFound, "not_found")
	errorOf(t, e.request(http.MethodPost, e.admin+"/llm_gateway/users", `{"email":"not an email"}`, nil), http.StatusBadRequest, "invalid_request")
	errorOf(t, e.request(http.MethodPost, e.admin+"/llm_gateway/users", `{"email":"x@example.com","bogus":1}`, nil), http.StatusBadRequest, "invalid_request")
	errorOf(t, e.request(http.MethodPost, e.admin+"/llm_gateway/users", `{"email":"OPS@example.com"}`, nil), http.StatusConflict, "conflict")

	// Credits with an Idempotency-Key: 5 concurrent identical calls credit once.
	credit := func(amount, key string) *response {
		hdr := map[string]string{}
		if key != "" {
			hdr["Idempotency-Key"] = key
		}
		return e.request(http.MethodPost, e.admin+"/llm_gateway/users/"+u.ID+"/credits",
			`{"amount":`+amount+`,"reason":"top-up"}`, hdr)
	}
	var wg sync.WaitGroup
	answers := make([]*response, 5)
	errs := make([]error, 5)
	start := make(chan struct{})
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req := e.newRequest(t.Context(), http.MethodPost, e.admin+"/llm_gateway/users/"+u.ID+"/credits",
				`{"amount":2.25,"reason":"top-up"}`, map[string]string{"Idempotency-Key": "pay-123"})
			resp, err := e.client.Do(req)
			if err != nil {
				errs[i] = err
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			answers[i], errs[i] = &response{status: resp.StatusCode, header: resp.Header, body: b}, err
		}()
	}
	close(start)
	wg.Wait()
	replays := 0
	for i, r := range answers {
		if errs[i] != nil {
			t.Fatalf("idempotent credit %d: %v", i, errs[i])
		}
		if r.status != http.StatusOK {
			t.Fatalf("idempotent credit: %s", r)
		}
		var out struct {
			Replayed bool           `json:"replayed"`
			Balance  credits.Amount `json:"balance"`
		}
		if err := json.Unmarshal(r.body, &out); err != nil {
			t.Fatal(err)
		}
		if out.Replayed {
			replays++
		}
		if out.Balance != credits.Amount(micro(t, "3.75")) {
			t.Errorf("balance after the credit %s, want 3.75", out.Balance)
		}
	}
	if replays != 4 {
		t.Errorf("%d of 5 identical credits were replays, want 4", replays)
	}
	errorOf(t, credit("3", "pay-123"), http.StatusUnprocessableEntity, "idempotency_conflict")
	if r := credit("-0.25", ""); r.status != http.StatusOK {
		t.Errorf("taking credits away: %s", r)
	}
	errorOf(t, credit("0", ""), http.StatusBadRequest, "invalid_request")
	errorOf(t, credit("1.0000001", ""), http.StatusBadRequest, "invalid_request")
	if b := e.balance(u.ID); b != credits.Amount(micro(t, "3.5")) {
		t.Errorf("balance %s, want 3.5 (1.5 + 2.25 once - 0.25)", b)
	}

	// The ledger.
	l := e.ledger(u.ID)
	var creditEntries []entry
	for _, en := range l.Entries {
		if en.Kind == "credit" {
			creditEntries = append(creditEntries, en)
		}
	}
	if len(creditEntries) != 3 {
		t.Errorf("%d credit entries, want 3 (initial, top-up once, take-away): %+v", len(creditEntries), l.Entries)
	}
	if l.Audit != (audit{Credited: credits.Amount(micro(t, "3.5")), Balance: credits.Amount(micro(t, "3.5"))}) {
		t.Errorf("audit %+v", l.Audit)
	}

	// Keys: create, list (never the secret), use, revoke.
	k := e.createKey(u.ID, map[string]any{"name": "ci", "scopes": []string{"chat:write", "models:read"}, "metadata": map[string]string{"team": "ops"}})
	if !strings.HasPrefix(k.Key, "sk_live_"+k.ID+"_") || k.Name != "ci" {
		t.Errorf("created key %+v", k)
	}
	list := e.request(http.MethodGet, e.admin+"/llm_gateway/users/"+u.ID+"/keys", nil, nil)
	if list.status != http.StatusOK || !strings.Contains(string(list.body), k.ID) {
		t.Fatalf("list keys: %s", list)
	}
	if strings.Contains(string(list.body), k.Key) || strings.Contains(string(list.body), `"key"`) {
		t.Errorf("the key list shows a secret: %s", list)
	}
	chat := `{"model":"mock-small","messages":[{"role":"user","content":"ops check"}],"max_tokens":3}`
	if r := e.post("/v1/chat/completions", chat, bearer(k.Key)); r.status != http.StatusOK {
		t.Errorf("the new key: %s", r)
	}
	e.adminCall(http.MethodDelete, "/llm_gateway/keys/"+k.ID, nil, http.StatusOK, nil, nil)
	errorOf(t, e.post("/v1/chat/completions", chat, bearer(k.Key)), http.StatusUnauthorized, "revoked_api_key")
	errorOf(t, e.request(http.MethodDelete, e.admin+"/llm_gateway/keys/nosuchkeyid", nil, nil), http.StatusNotFound, "not_found")
	errorOf(t, e.request(http.MethodPost, e.admin+"/llm_gateway/users/"+u.ID+"/keys", `{"scopes":["root"]}`, nil), http.StatusBadRequest, "invalid_request")
	errorOf(t, e.request(http.MethodPost, e.admin+"/llm_gateway/users/usr_nosuchuser/keys", `{}`, nil), http.StatusNotFound, "not_found")

	// Backends: models, prices, health.
	type backendView struct {
		Name    string `json:"name"`
		Healthy bool   `json:"healthy"`
		Models  []struct {
			Name        string         `json:"name"`
			InputPrice  credits.Amount `json:"input_price"`
			OutputPrice credits.Amount `json:"output_price"`
		} `json:"models"`
	}
	var backends struct {
		Backends []backendView `json:"backends"`
	}
	poll(t, 10*time.Second, "the down backend is seen down", func() (bool, string) {
		e.adminCall(http.MethodGet, "/llm_gateway/backends", nil, http.StatusOK, &backends, nil)
		for _, b := range backends.Backends {
			if b.Name == "down" {
				return !b.Healthy, "down is healthy"
			}
		}
		return false, "no backend down"
	})
	if len(backends.Backends) != 2 || backends.Backends[0].Name != "oai" || !backends.Backends[0].Healthy ||
		len(backends.Backends[0].Models) != 1 || backends.Backends[0].Models[0].OutputPrice != credits.Amount(micro(t, "2000")) {
		t.Errorf("backends %+v", backends.Backends)
	}

	// The CLI, against the same admin endpoint.
	addr := "--address=" + e.adminAddr
	cli := func(args ...string) map[string]any {
		t.Helper()
		stdout, stderr, err := runCLI(t, e.dir, append(append([]string{"llm-gateway"}, args...), addr)...)
		if err != nil {
			t.Fatalf("caddy llm-gateway %v: %v\nstdout: %s\nstderr: %s", args, err, stdout, truncate(stderr, 2000))
		}
		var m map[string]any
		dec := json.NewDecoder(strings.NewReader(stdout))
		dec.UseNumber()
		if err := dec.Decode(&m); err != nil {
			t.Fatalf("caddy llm-gateway %v printed no JSON: %v\n%s", args, err, stdout)
		}
		return m
	}
	created := cli("users", "create", "--email", "cli@example.com", "--credits", "4")
	cliUser, _ := created["id"].(string)
	if cliUser == "" || created["email"] != "cli@example.com" || amountOf(t, created["balance"]) != credits.Amount(micro(t, "4")) {
		t.Fatalf("users create printed %v", created)
	}
	if got := cli("users", "get", cliUser); got["id"] != cliUser {
		t.Errorf("users get printed %v", got)
	}
	for range 2 {
		cli("credits", "add", cliUser, "1.25", "--reason", "cli top-up", "--idempotency-key", "cli-1")
	}
	if b := e.balance(cliUser); b != credits.Amount(micro(t, "5.25")) {
		t.Errorf("balance after two identical CLI credits %s, want 5.25", b)
	}
	kc := cli("keys", "create", cliUser, "--name", "from-cli", "--scopes", "chat:write,models:read")
	apiKey, _ := kc["api_key"].(map[string]any)
	key, _ := apiKey["key"].(string)
	keyID, _ := apiKey["id"].(string)
	if key == "" || keyID == "" {
		t.Fatalf("keys create printed %v", kc)
	}
	if w, _ := kc["warning"].(string); w == "" {
		t.Errorf("keys create printed no warning that the key is shown once")
	}
	r := e.post("/v1/chat/completions", chat, bearer(key))
	if r.status != http.StatusOK {
		t.Fatalf("the CLI's key: %s", r)
	}
	charged := amountOf(t, r.header.Get("X-Credits-Charged"))
	if charged != cost(t, 2, 3, "1000", "2000") {
		t.Errorf("charged %s", charged)
	}
	listed := cli("keys", "list", cliUser)
	raw, _ := json.Marshal(listed)
	if !strings.Contains(string(raw), keyID) || strings.Contains(string(raw), key) {
		t.Errorf("keys list printed %s", raw)
	}
	ledger := cli("ledger", cliUser)
	au, _ := ledger["audit"].(map[string]any)
	if au == nil || amountOf(t, au["balance"]) != credits.Amount(micro(t, "5.25"))-charged || amountOf(t, au["open"]) != 0 {
		t.Errorf("ledger printed %v", ledger)
	}
	if got := cli("backends"); len(got["backends"].([]any)) != 2 {
		t.Errorf("backends printed %v", got)
	}
	cli("keys", "revoke", keyID)
	errorOf(t, e.post("/v1/chat/completions", chat, bearer(key)), http.StatusUnauthorized, "revoked_api_key")

	// A CLI error exits non-zero and says why.
	_, stderr, err := runCLI(t, e.dir, "llm-gateway", "users", "get", "usr_nosuchuser", addr)
	if err == nil || !strings.Contains(stderr, "404") {
		t.Errorf("users get of an unknown user: err %v, stderr %q", err, truncate(stderr, 500))
	}

	e.settledAudit(u.ID)
	e.settledAudit(cliUser)
	e.checkAllAccounts(0)
}
