package caddymodule_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// commitWindow bounds how long a settlement the client was told of may stay uncommitted: the
// embedded store's group commit interval (2 ms) with a wide margin for a loaded machine.
const commitWindow = 250 * time.Millisecond

// TestKill9DuringLoadThenRestart: a gateway process is killed with SIGKILL while it streams
// for several users; restarted on the same store file it returns every reservation the crash
// left open, and every account's books balance exactly.
func TestKill9DuringLoadThenRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes (skipped with -short)")
	}
	const in, out = "1000", "2000"
	s := setup{
		gateway: backendBlock("slow", "slow", "mock-small", in, out) + backendBlock("fast", "fast", "fast-model", in, out),
		mocks: []mockSpec{
			{key: "slow", lines: "models mock-small\n\t\tchunks 50\n\t\tchunk_interval 100ms\n\t\tcompletion_tokens 50"},
			{key: "fast", lines: "models fast-model"},
		},
	}
	e := newEnv(t, s)
	e.startChild(s)

	type account struct {
		user userView
		key  keyView
	}
	var users []account
	for i := range 3 {
		u, k := e.userWithKey(fmt.Sprintf("crash%d@example.com", i), "20")
		users = append(users, account{u, k})
	}
	// A few requests finish before the crash, so that there are settlements to keep.
	for _, a := range users {
		r := e.post("/v1/chat/completions", `{"model":"fast-model","messages":[{"role":"user","content":"quick one"}],"max_tokens":5}`, bearer(a.key.Key))
		if r.status != http.StatusOK {
			t.Fatalf("warm-up request: %s", r)
		}
	}

	// The load: 30 slow streams (5 s each), 10 per user, and short requests beside them.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	streamBody := `{"model":"mock-small","messages":[{"role":"user","content":"a long answer please"}],"max_tokens":60,"stream":true}`
	for i := range 30 {
		a := users[i%len(users)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := e.client.Do(e.newRequest(ctx, http.MethodPost, e.gw+"/v1/chat/completions", streamBody, bearer(a.key.Key)))
			if err != nil {
				return // the gateway died under it: expected
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}()
	}
	// Short requests beside them; what each was charged, as the gateway told the client, and when.
	stopShort := make(chan struct{})
	type charge struct {
		at     time.Time
		amount credits.Amount
	}
	told := make([][]charge, len(users))
	for i, a := range users {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stopShort:
					return
				default:
				}
				resp, err := e.client.Do(e.newRequest(ctx, http.MethodPost, e.gw+"/v1/chat/completions",
					`{"model":"fast-model","messages":[{"role":"user","content":"short"}],"max_tokens":3}`, bearer(a.key.Key)))
				if err != nil {
					return
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode == http.StatusOK {
					if c, perr := credits.ParseAmount(resp.Header.Get("X-Credits-Charged")); perr == nil {
						told[i] = append(told[i], charge{time.Now(), c})
					}
				}
			}
		}()
	}
	// Wait until the streams are in flight: every one was reserved before it was forwarded.
	poll(t, 60*time.Second, "30 streams reach the backend", func() (bool, string) {
		n := e.mockCounts("slow")["/v1/chat/completions"]
		return n >= 30, fmt.Sprintf("%d streams", n)
	})
	killedAt := time.Now()
	e.kill9()
	close(stopShort)
	wg.Wait()

	// The file as the crash left it (open reservations are there when the store keeps them in
	// the file; a store that keeps them in memory leaves none).
	atCrash := map[string]dbAccount{}
	var openBefore int
	for _, a := range e.accounts() {
		atCrash[a.id] = a
		openBefore += a.reservations
	}
	t.Logf("kill -9 with 30 streams in flight; %d reservations open in the file", openBefore)

	// Restart on the same file: every reservation is returned (nothing charged for them, no
	// settlement lost or doubled) and the books balance.
	e.startChild(s)
	after := e.checkAllAccounts(0)
	if len(after) != len(users) {
		t.Errorf("%d accounts in the store, want %d", len(after), len(users))
	}
	for _, a := range after {
		c := atCrash[a.id]
		if a.credited != c.credited || a.settled != c.settled || a.settleEntries != c.settleEntries {
			t.Errorf("account %s changed at the restart: %+v, at the crash %+v", a.id, a, c)
		}
		if a.balance != c.balance+c.opened {
			t.Errorf("account %s: balance %s after the restart, want %s + the %s left open", a.id, a.balance, c.balance, c.opened)
		}
	}
	for i, a := range users {
		au := e.settledAudit(a.user.ID)
		if au.Credited != credits.Amount(micro(t, "20")) {
			t.Errorf("user %s: credited %s, want 20", a.user.ID, au.Credited)
		}
		if au.Settled == 0 {
			t.Errorf("user %s: the settlements before the crash were lost", a.user.ID)
		}
		// Every charge a client was told of (a complete answer with X-Credits-Charged) more than
		// one group-commit window before the crash is in the ledger after it, plus the warm-up
		// request's. (The embedded store commits settlements every few milliseconds: a crash
		// may lose the last window's, which then count as released, never as charged twice.)
		var durable, all credits.Amount
		for _, c := range told[i] {
			all += c.amount
			if c.at.Before(killedAt.Add(-commitWindow)) {
				durable += c.amount
			}
		}
		if warm := cost(t, 2, 5, in, out); au.Settled < durable+warm {
			t.Errorf("user %s: settled %s after the restart, but clients were told of %s in charges more than %s before the crash",
				a.user.ID, au.Settled, durable+warm, commitWindow)
		}
		t.Logf("user %s: told %s in charges, %s of them more than %s before the kill; settled %s", a.user.ID, all, durable, commitWindow, au.Settled)
		// Still serving after the restart.
		r := e.post("/v1/chat/completions", `{"model":"fast-model","messages":[{"role":"user","content":"after"}],"max_tokens":2}`, bearer(a.key.Key))
		if r.status != http.StatusOK {
			t.Errorf("after the restart: %s", r)
		}
		e.settledAudit(a.user.ID)
	}
	e.checkAllAccounts(0)
}
