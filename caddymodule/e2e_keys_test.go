package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// keysSetup: one backend with no input price and completions of exactly max_tokens tokens, so
// that every request settles what it reserved.
const keysOut = "1000"

func keysSetup(latency string) setup {
	lines := "models mock-small"
	if latency != "" {
		lines += "\n\t\tlatency " + latency
	}
	return setup{
		gateway: `
		backend mock {
			url {mock.mock}
			health_check {
				disabled
			}
			model mock-small {
				input_price 0
				output_price ` + keysOut + `
			}
		}`,
		mocks: []mockSpec{{key: "mock", lines: lines}},
	}
}

const keysChat = `{"model":"mock-small","messages":[{"role":"user","content":"go"}],"max_tokens":16}`

// allScopes are the scopes of a key that manages its owner's keys.
var allScopes = []any{"chat:write", "embeddings:write", "models:read", "keys:read", "keys:write", "credits:read", "usage:read"}

// self sends a self-service request with an API key.
func (e *env) self(method, path string, body any, key string) *response {
	e.t.Helper()
	return e.request(method, e.gw+path, body, bearer(key))
}

// selfKey is a key as the self-service API shows it.
type selfKey struct {
	ID           string     `json:"id"`
	Key          string     `json:"key"`
	Scopes       []string   `json:"scopes"`
	ExpiresAt    *time.Time `json:"expires_at"`
	RevokedAt    *time.Time `json:"revoked_at"`
	LastUsedAt   *time.Time `json:"last_used_at"`
	RotatedTo    string     `json:"rotated_to"`
	DeprecatedAt *time.Time `json:"deprecated_at"`
}

func decodeInto(t testing.TB, r *response, want int, out any) {
	t.Helper()
	if r.status != want {
		t.Fatalf("want %d, got %s", want, r)
	}
	if err := json.Unmarshal(r.body, out); err != nil {
		t.Fatalf("decoding %T: %v: %s", out, err, r)
	}
}

// rotation is the answer of a rotation.
type rotation struct {
	NewKey selfKey `json:"new_key"`
	OldKey struct {
		ID           string    `json:"id"`
		DeprecatedAt time.Time `json:"deprecated_at"`
		ExpiresAt    time.Time `json:"expires_at"`
	} `json:"old_key"`
	Warning string `json:"warning"`
}

// TestKeyLifecycle: through the self-service API, a key is created with a subset of the
// caller's scopes, used with each header form, rotated (the old key works during the grace
// period, then answers expired_api_key), revoked (refused at once); its last use is recorded
// without a write per request; credits and usage are readable; the operator rotates too.
func TestKeyLifecycle(t *testing.T) {
	e := startGateway(t, keysSetup(""))
	u := e.createUser("life@example.com", "10")
	admin := e.createKey(u.ID, map[string]any{"name": "manager", "scopes": allScopes})

	// Create: a subset of the caller's scopes; more is 403, none of the secret is listed later.
	r := e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"name": "child", "scopes": []string{"chat:write", "models:read"},
		"expires_in_days": 30, "metadata": map[string]string{"app": "e2e"}}, admin.Key)
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q", cc)
	}
	var created struct {
		APIKey  selfKey `json:"api_key"`
		Warning string  `json:"warning"`
	}
	decodeInto(t, r, http.StatusCreated, &created)
	child := created.APIKey
	if child.Key == "" || created.Warning == "" || child.ExpiresAt == nil || len(child.Scopes) != 2 {
		t.Fatalf("created key %+v, warning %q", child, created.Warning)
	}
	r = e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"scopes": []string{"chat:write", "keys:write"}}, child.Key)
	errorOf(t, r, http.StatusForbidden, "insufficient_scope")
	r = e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"scopes": []string{"*"}}, admin.Key)
	errorOf(t, r, http.StatusForbidden, "insufficient_scope")
	if h := r.header.Get("WWW-Authenticate"); !strings.Contains(h, `scope="*"`) {
		t.Errorf("WWW-Authenticate %q", h)
	}
	r = e.self(http.MethodPost, "/v1/auth/keys", map[string]any{"expires_in_days": 1, "expires_at": "2099-01-01T00:00:00Z"}, admin.Key)
	errorOf(t, r, http.StatusBadRequest, "invalid_request")
	// The child key lacks keys:read.
	errorOf(t, e.self(http.MethodGet, "/v1/auth/keys", nil, child.Key), http.StatusForbidden, "insufficient_scope")

	// Use with each header form.
	charged := 0 // requests charged
	for i, h := range []map[string]string{
		{"Authorization": "Bearer " + child.Key}, {"X-API-Key": child.Key}, {"apikey": child.Key}, {"Authorization": "bearer " + child.Key},
	} {
		if r := e.post("/v1/chat/completions", keysChat, h); r.status != http.StatusOK {
			t.Fatalf("header form %d: %s", i, r)
		}
		charged++
	}
	// A scope the child lacks.
	errorOf(t, e.post("/v1/embeddings", `{"model":"mock-small","input":"x"}`, bearer(child.Key)), http.StatusForbidden, "insufficient_scope")

	// Listed and read without the secret.
	var list struct {
		Keys []map[string]any `json:"keys"`
	}
	decodeInto(t, e.self(http.MethodGet, "/v1/auth/keys", nil, admin.Key), http.StatusOK, &list)
	if len(list.Keys) != 2 {
		t.Fatalf("listed %d keys, want 2", len(list.Keys))
	}
	for _, k := range list.Keys {
		if _, ok := k["key"]; ok {
			t.Errorf("a listed key shows its secret: %v", k)
		}
	}

	// last_used_at: recorded within the flush interval, without a store write per request.
	var got struct {
		APIKey selfKey `json:"api_key"`
	}
	poll(t, 15*time.Second, "last_used_at", func() (bool, string) {
		r := e.self(http.MethodGet, "/v1/auth/keys/"+child.ID, nil, admin.Key)
		decodeInto(t, r, http.StatusOK, &got)
		return got.APIKey.LastUsedAt != nil, r.String()
	})
	if strings.Contains(string(e.self(http.MethodGet, "/v1/auth/keys/"+child.ID, nil, admin.Key).body), child.Key) {
		t.Error("GET of a key shows its secret")
	}

	// Rotate with a short grace: both keys work, a second rotation is a conflict.
	const graceHours = 0.002 // 7.2 s
	var rot rotation
	decodeInto(t, e.self(http.MethodPost, "/v1/auth/keys/"+child.ID+"/rotate", map[string]any{"grace_period_hours": graceHours}, admin.Key),
		http.StatusOK, &rot)
	if rot.NewKey.Key == "" || rot.NewKey.ID == child.ID || rot.OldKey.ID != child.ID || rot.OldKey.ExpiresAt.Sub(rot.OldKey.DeprecatedAt) != 7200*time.Millisecond {
		t.Fatalf("rotation %+v", rot)
	}
	errorOf(t, e.self(http.MethodPost, "/v1/auth/keys/"+child.ID+"/rotate", map[string]any{"grace_period_hours": 1}, admin.Key),
		http.StatusConflict, "conflict")
	if r := e.post("/v1/chat/completions", keysChat, bearer(rot.NewKey.Key)); r.status != http.StatusOK {
		t.Fatalf("new key: %s", r)
	}
	charged++
	if time.Now().Before(rot.OldKey.ExpiresAt.Add(-time.Second)) {
		if r := e.post("/v1/chat/completions", keysChat, bearer(child.Key)); r.status != http.StatusOK {
			t.Fatalf("old key during the grace period: %s", r)
		}
		charged++
	}
	// The old key is refused once the grace is over (polled on a route that charges nothing).
	var last *response
	poll(t, 30*time.Second, "the old key to expire", func() (bool, string) {
		last = e.request(http.MethodGet, e.gw+"/v1/models", nil, bearer(child.Key))
		return last.status == http.StatusUnauthorized, last.String()
	})
	errorOf(t, e.post("/v1/chat/completions", keysChat, bearer(child.Key)), http.StatusUnauthorized, "expired_api_key")
	eo := errorOf(t, last, http.StatusUnauthorized, "expired_api_key")
	if d, _ := eo["details"].(map[string]any); d == nil || d["expired_at"] == nil {
		t.Errorf("expired_api_key without details.expired_at: %s", last)
	}
	if h := last.header.Get("WWW-Authenticate"); !strings.Contains(h, `error="invalid_token"`) {
		t.Errorf("WWW-Authenticate %q", h)
	}

	// Revoke: refused at once.
	r = e.self(http.MethodDelete, "/v1/auth/keys/"+rot.NewKey.ID, nil, admin.Key)
	if r.status != http.StatusOK {
		t.Fatalf("revoke: %s", r)
	}
	errorOf(t, e.post("/v1/chat/completions", keysChat, bearer(rot.NewKey.Key)), http.StatusUnauthorized, "revoked_api_key")
	errorOf(t, e.self(http.MethodPost, "/v1/auth/keys/"+rot.NewKey.ID+"/rotate", nil, admin.Key), http.StatusConflict, "conflict")

	// Credits and usage: the requests charged, of 16 output tokens each.
	n := credits.Amount(charged)
	per := cost(t, 0, 16, "0", keysOut)
	var cr struct {
		Balance credits.Amount `json:"balance"`
		Entries []entry        `json:"entries"`
	}
	decodeInto(t, e.self(http.MethodGet, "/v1/credits", nil, admin.Key), http.StatusOK, &cr)
	if want := credits.Amount(micro(t, "10")) - n*per; cr.Balance != want || len(cr.Entries) != charged+1 {
		t.Errorf("credits: balance %s (want %s), %d entries", cr.Balance, want, len(cr.Entries))
	}
	var us struct {
		Usage []credits.UsageDay `json:"usage"`
	}
	decodeInto(t, e.self(http.MethodGet, "/v1/usage", nil, admin.Key), http.StatusOK, &us)
	if len(us.Usage) != 1 || us.Usage[0].Model != "mock-small" || us.Usage[0].Requests != int64(charged) ||
		us.Usage[0].OutputTokens != 16*int64(charged) || us.Usage[0].Credits != n*per {
		t.Errorf("usage %+v", us.Usage)
	}
	errorOf(t, e.self(http.MethodGet, "/v1/usage?days=0", nil, admin.Key), http.StatusBadRequest, "invalid_request")
	errorOf(t, e.self(http.MethodPut, "/v1/credits", nil, admin.Key), http.StatusMethodNotAllowed, "method_not_allowed")

	// The operator rotates through the admin API and the CLI; the new key is printed once.
	var arot rotation
	e.adminCall(http.MethodPost, "/llm_gateway/keys/"+admin.ID+"/rotate", map[string]any{"grace_period_hours": 1}, http.StatusOK, &arot, nil)
	if arot.NewKey.Key == "" || arot.OldKey.ID != admin.ID {
		t.Fatalf("admin rotation %+v", arot)
	}
	for _, k := range []string{admin.Key, arot.NewKey.Key} {
		if r := e.self(http.MethodGet, "/v1/credits", nil, k); r.status != http.StatusOK {
			t.Errorf("key during the admin rotation's grace: %s", r)
		}
	}
	e.adminCall(http.MethodPost, "/llm_gateway/keys/"+admin.ID+"/rotate", nil, http.StatusConflict, nil, nil)
	stdout, stderr, err := runCLI(t, e.dir, "llm-gateway", "keys", "rotate", arot.NewKey.ID, "--grace-hours", "0.5", "--address="+e.adminAddr)
	if err != nil {
		t.Fatalf("caddy llm-gateway keys rotate: %v\n%s\n%s", err, stdout, truncate(stderr, 2000))
	}
	var crot rotation
	if err := json.Unmarshal([]byte(stdout), &crot); err != nil || crot.NewKey.Key == "" || crot.OldKey.ID != arot.NewKey.ID {
		t.Fatalf("CLI rotation printed %q (%v)", stdout, err)
	}
	if r := e.self(http.MethodGet, "/v1/credits", nil, crot.NewKey.Key); r.status != http.StatusOK {
		t.Errorf("the CLI's new key: %s", r)
	}
	// Chain admin -> arot -> crot: rotating arot ended admin's grace at once.
	errorOf(t, e.self(http.MethodGet, "/v1/credits", nil, admin.Key), http.StatusUnauthorized, "expired_api_key")
	e.settledAudit(u.ID)
}

// TestKeyConcurrentRotations: 20 rotations of one key at once: one new key, 19 conflicts,
// and the chain has two live keys.
func TestKeyConcurrentRotations(t *testing.T) {
	e := startGateway(t, keysSetup(""))
	u := e.createUser("rot@example.com", "1")
	k := e.createKey(u.ID, map[string]any{"name": "k", "scopes": allScopes})
	const n = 20
	statuses := make([]int, n)
	keys := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			req := e.newRequest(t.Context(), http.MethodPost, e.gw+"/v1/auth/keys/"+k.ID+"/rotate", `{"grace_period_hours":1}`, bearer(k.Key))
			resp, err := e.client.Do(req)
			if err != nil {
				statuses[i] = -1
				return
			}
			defer resp.Body.Close()
			statuses[i] = resp.StatusCode
			var rot rotation
			_ = json.NewDecoder(resp.Body).Decode(&rot)
			keys[i] = rot.NewKey.Key
		})
	}
	wg.Wait()
	ok, conflicts := 0, 0
	var newKey string
	for i, s := range statuses {
		switch s {
		case http.StatusOK:
			ok++
			newKey = keys[i]
		case http.StatusConflict:
			conflicts++
		default:
			t.Errorf("rotation %d: status %d", i, s)
		}
	}
	if ok != 1 || conflicts != n-1 {
		t.Fatalf("%d rotations succeeded, %d conflicts", ok, conflicts)
	}
	var list struct {
		Keys []selfKey `json:"keys"`
	}
	decodeInto(t, e.self(http.MethodGet, "/v1/auth/keys", nil, newKey), http.StatusOK, &list)
	live := 0
	for _, k := range list.Keys {
		if k.RevokedAt == nil && (k.ExpiresAt == nil || time.Now().Before(*k.ExpiresAt)) {
			live++
		}
	}
	if len(list.Keys) != 2 || live != 2 {
		t.Errorf("%d keys, %d live; want 2 and 2", len(list.Keys), live)
	}
}

// TestKeysCreditCapConcurrent: 20 concurrent requests on a key whose credit cap covers 5,
// while its owner has credits for 100: exactly 5 are forwarded, the others get 402
// insufficient_credits naming the key's cap; the owner's other keys are not limited by it.
func TestKeysCreditCapConcurrent(t *testing.T) {
	e := startGateway(t, keysSetup("150ms"))
	per := cost(t, 0, 16, "0", keysOut)
	u := e.createUser("cap@example.com", (100 * per).String())
	capped := e.createKey(u.ID, map[string]any{"name": "capped", "credit_cap": json.Number((5 * per).String())})
	free := e.createKey(u.ID, nil)
	const n = 20
	type result struct {
		status int
		body   []byte
	}
	results := make([]result, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			req := e.newRequest(t.Context(), http.MethodPost, e.gw+"/v1/chat/completions", keysChat, bearer(capped.Key))
			resp, err := e.client.Do(req)
			if err != nil {
				results[i] = result{-1, []byte(err.Error())}
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results[i] = result{resp.StatusCode, b}
		})
	}
	close(start)
	wg.Wait()
	ok := 0
	for i, r := range results {
		switch r.status {
		case http.StatusOK:
			ok++
		case http.StatusPaymentRequired:
			eo := errorOf(t, &response{status: r.status, header: http.Header{"Content-Type": {"application/json"}}, body: r.body},
				http.StatusPaymentRequired, "insufficient_credits")
			d, _ := eo["details"].(map[string]any)
			if d == nil || amountOf(t, d["key_credit_cap"]) != 5*per || d["key_spent"] == nil {
				t.Errorf("402 %d without the key's cap: %s", i, r.body)
			}
		default:
			t.Errorf("request %d: %d %s", i, r.status, r.body)
		}
	}
	if ok != 5 {
		t.Errorf("%d requests admitted, want 5", ok)
	}
	// Spent up to the cap: the next one is refused, naming the cap and what was spent.
	r := e.post("/v1/chat/completions", keysChat, bearer(capped.Key))
	eo := errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
	d, _ := eo["details"].(map[string]any)
	if d == nil || amountOf(t, d["key_spent"]) != 5*per || !strings.Contains(fmt.Sprint(eo["message"]), (5*per).String()) {
		t.Errorf("402 after the cap: %s", r)
	}
	// The owner's other key still works.
	if r := e.post("/v1/chat/completions", keysChat, bearer(free.Key)); r.status != http.StatusOK {
		t.Errorf("uncapped key: %s", r)
	}
	if got := e.balance(u.ID); got != 94*per {
		t.Errorf("balance %s, want %s", got, 94*per)
	}
	e.settledAudit(u.ID)
}

// TestKeysIPAllowlist: the harness talks from 127.0.0.1.
func TestKeysIPAllowlist(t *testing.T) {
	e := startGateway(t, keysSetup(""))
	u := e.createUser("ip@example.com", "1")
	ten := e.createKey(u.ID, map[string]any{"name": "ten", "allowed_ips": []string{"10.0.0.0/8"}})
	loop := e.createKey(u.ID, map[string]any{"name": "loop", "allowed_ips": []string{"::ffff:127.0.0.0/104", "2001:db8::/32"}})
	errorOf(t, e.post("/v1/chat/completions", keysChat, bearer(ten.Key)), http.StatusForbidden, "ip_not_allowed")
	if r := e.post("/v1/chat/completions", keysChat, bearer(loop.Key)); r.status != http.StatusOK {
		t.Fatalf("allowed address: %s", r)
	}
	var got struct {
		APIKey struct {
			AllowedIPs []string `json:"allowed_ips"`
		} `json:"api_key"`
	}
	e.adminCall(http.MethodGet, "/llm_gateway/keys/"+loop.ID, nil, http.StatusOK, &got, nil)
	if strings.Join(got.APIKey.AllowedIPs, ",") != "127.0.0.0/8,2001:db8::/32" {
		t.Errorf("stored allowlist %q", got.APIKey.AllowedIPs)
	}
	r := e.request(http.MethodPost, e.admin+"/llm_gateway/users/"+u.ID+"/keys", map[string]any{"allowed_ips": []string{"10.0.0.0/33"}}, nil)
	errorOf(t, r, http.StatusBadRequest, "invalid_request")
	// Nothing was reserved for the refused request.
	e.settledAudit(u.ID)
}

// TestKeysBola: user A's key cannot see, rotate or revoke user B's keys: 404, as for an
// unknown id; A's list holds only A's keys.
func TestKeysBola(t *testing.T) {
	e := startGateway(t, keysSetup(""))
	a := e.createUser("a@example.com", "1")
	b := e.createUser("b@example.com", "1")
	ak := e.createKey(a.ID, map[string]any{"name": "a", "scopes": allScopes})
	bk := e.createKey(b.ID, map[string]any{"name": "b", "scopes": allScopes})
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/v1/auth/keys/" + bk.ID},
		{http.MethodPost, "/v1/auth/keys/" + bk.ID + "/rotate"},
		{http.MethodDelete, "/v1/auth/keys/" + bk.ID},
		{http.MethodGet, "/v1/auth/keys/nosuchkeyid0"},
		{http.MethodGet, "/v1/auth/keys/" + bk.ID + "/other"},
	} {
		errorOf(t, e.self(tc.method, tc.path, nil, ak.Key), http.StatusNotFound, "not_found")
	}
	var list struct {
		Keys []selfKey `json:"keys"`
	}
	decodeInto(t, e.self(http.MethodGet, "/v1/auth/keys", nil, ak.Key), http.StatusOK, &list)
	if len(list.Keys) != 1 || list.Keys[0].ID != ak.ID {
		t.Errorf("A lists %+v", list.Keys)
	}
	// B's key is untouched.
	if r := e.self(http.MethodGet, "/v1/auth/keys/"+bk.ID, nil, bk.Key); r.status != http.StatusOK {
		t.Errorf("B's own key: %s", r)
	}
	// Without credentials: 401.
	errorOf(t, e.request(http.MethodGet, e.gw+"/v1/auth/keys", nil, nil), http.StatusUnauthorized, "missing_api_key")
}

// TestKeysCapSharedByRotationChain: a key's credit cap belongs to its rotation chain. A capped
// key with keys:write rotating itself gets a successor that continues its spending, not a new
// cap; the old key during its grace and the new one share the cap; four rotations later, the
// chain has made exactly the requests the cap covers.
func TestKeysCapSharedByRotationChain(t *testing.T) {
	e := startGateway(t, keysSetup(""))
	per := cost(t, 0, 16, "0", keysOut)
	u := e.createUser("chain@example.com", (100 * per).String())
	k := e.createKey(u.ID, map[string]any{"name": "capped", "scopes": allScopes, "credit_cap": json.Number((2 * per).String())})
	ok := 0
	try := func(key string) {
		t.Helper()
		r := e.post("/v1/chat/completions", keysChat, bearer(key))
		switch r.status {
		case http.StatusOK:
			ok++
		case http.StatusPaymentRequired:
			errorOf(t, r, http.StatusPaymentRequired, "insufficient_credits")
		default:
			t.Fatalf("request: %s", r)
		}
	}
	try(k.Key)
	old := k.Key
	var rot rotation
	decodeInto(t, e.self(http.MethodPost, "/v1/auth/keys/"+k.ID+"/rotate", map[string]any{"grace_period_hours": 1}, old), http.StatusOK, &rot)
	// During the grace: the old key and the new one, one cap of 2 between them.
	try(old)
	try(rot.NewKey.Key)
	try(old)
	if ok != 2 {
		t.Errorf("%d requests admitted by the old and the new key, want 2 (the cap)", ok)
	}
	cur := rot.NewKey
	for range 3 {
		decodeInto(t, e.self(http.MethodPost, "/v1/auth/keys/"+cur.ID+"/rotate", map[string]any{"grace_period_hours": 1}, cur.Key), http.StatusOK, &rot)
		try(rot.NewKey.Key)
		try(cur.Key)
		cur = rot.NewKey
	}
	if ok != 2 {
		t.Errorf("%d requests admitted over 4 rotations, want 2 (the cap)", ok)
	}
	if got := e.balance(u.ID); got != 98*per {
		t.Errorf("balance %s, want %s", got, 98*per)
	}
	e.settledAudit(u.ID)
}
