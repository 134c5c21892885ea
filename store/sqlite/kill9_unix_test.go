//go:build unix

package sqlite

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// kill9Accounts are the accounts the child of TestKill9 uses.
var kill9Accounts = []credits.AccountID{credits.UserAccount("a"), credits.UserAccount("b"), credits.AnonymousAccount("c")}

// runKill9Child is the child process of TestKill9 (TestMain runs it when kill9Env names a
// store file): it credits the accounts, then reserves and settles (and releases, and leaves
// open) until it is killed, reporting on stdout each call that returned.
func runKill9Child(path string) {
	ctx := context.Background()
	s, err := Open(ctx, path, Options{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	report := func(format string, args ...any) {
		fmt.Fprintf(out, format+"\n", args...)
		out.Flush()
	}
	for _, account := range kill9Accounts {
		if _, _, err := s.Credit(ctx, account, 1_000_000*c, "seed", "seed"); err != nil {
			report("error %v", err)
			os.Exit(1)
		}
		report("credited %s %d", account, 1_000_000*c)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; ; i++ {
		account := kill9Accounts[i%len(kill9Accounts)]
		var refill *credits.Refill
		if strings.HasPrefix(string(account), "anon:") {
			refill = &credits.Refill{Cap: 2_000_000 * c, Period: time.Now().Unix() / 2} // a new period every 2 s
		}
		r, _, err := s.Reserve(ctx, account, 3*c, time.Hour, refill)
		if err != nil {
			report("error %v", err)
			os.Exit(1)
		}
		switch k := rng.IntN(20); {
		case k == 0: // left open
		case k < 3:
			if _, err := s.Release(ctx, r.ID); err != nil {
				report("error %v", err)
				os.Exit(1)
			}
		default:
			cost := credits.Amount(rng.Int64N(int64(5 * c)))
			if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: "m"}); err != nil {
				report("error %v", err)
				os.Exit(1)
			}
			report("settled %s %s %d", account, r.ID, cost)
		}
	}
}

// TestKill9 runs a store in a child process, kills it with SIGKILL while it settles, and opens
// the file again: the lock was the child's until it died; every acknowledged credit is there;
// the settlements there are a prefix of those the child made, each whole, once, at its cost;
// nothing is open; the books of every account balance exactly.
func TestKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child process (skipped with -short)")
	}
	ctx := context.Background()
	path := t.TempDir() + "/gateway.db"
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.count=1")
	cmd.Env = append(os.Environ(), kill9Env+"="+path)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	defer func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()

	type settlement struct {
		account credits.AccountID
		cost    credits.Amount
	}
	var (
		credited = make(map[credits.AccountID]credits.Amount)
		order    []string // reservation ids in the order the child settled them
		settled  = make(map[string]settlement)
		lines    = bufio.NewScanner(stdout)
		deadline = time.Now().Add(20 * time.Second)
	)
	for len(order) < 3000 && time.Now().Before(deadline) && lines.Scan() {
		f := strings.Fields(lines.Text())
		switch {
		case len(f) == 3 && f[0] == "credited":
			n, _ := strconv.ParseInt(f[2], 10, 64)
			credited[credits.AccountID(f[1])] += credits.Amount(n)
		case len(f) == 4 && f[0] == "settled":
			n, _ := strconv.ParseInt(f[3], 10, 64)
			order = append(order, f[2])
			settled[f[2]] = settlement{credits.AccountID(f[1]), credits.Amount(n)}
		default:
			t.Fatalf("child: %s", lines.Text())
		}
	}
	if len(order) == 0 {
		t.Fatalf("the child settled nothing (%v)", lines.Err())
	}

	// The file is the child's while it lives.
	if s, err := Open(ctx, path, Options{}); !errors.Is(err, ErrInUse) {
		if err == nil {
			s.Close()
		}
		t.Fatalf("open while the child runs: %v, want ErrInUse", err)
	}

	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed = true
	cmd.Wait()
	for lines.Scan() { // what the child wrote before it died
		f := strings.Fields(lines.Text())
		if len(f) == 4 && f[0] == "settled" {
			n, _ := strconv.ParseInt(f[3], 10, 64)
			order = append(order, f[2])
			settled[f[2]] = settlement{credits.AccountID(f[1]), credits.Amount(n)}
		}
	}

	s := openAt(t, path, Options{})
	defer s.Close()
	present := make(map[string]credits.Amount)
	for _, account := range kill9Accounts {
		for id, cost := range settleEntries(t, s, account) {
			present[id] = cost
		}
	}
	kept := 0
	for kept < len(order) {
		if _, ok := present[order[kept]]; !ok {
			break
		}
		kept++
	}
	// At most one settlement can be committed without the child having reported it: the one
	// it was making when it died (it settles one at a time).
	if unreported := len(present) - kept; unreported > 1 {
		t.Errorf("%d settlements present beyond the first %d reported, in order", unreported, kept)
	}
	lost := len(order) - kept
	t.Logf("the child reported %d settlements; %d are committed, the last %d were lost", len(order), len(present), lost)
	// Backpressure bounds what can be lost: what waits, and the batch being committed.
	if lost > 2*queueHighWater {
		t.Errorf("%d reported settlements lost, more than the queue can hold", lost)
	}
	sums := make(map[credits.AccountID]credits.Amount)
	for id, cost := range present {
		st, reported := settled[id]
		if reported && st.cost != cost {
			t.Errorf("settlement %s: cost %s, made %s", id, cost, st.cost)
		}
	}
	for _, id := range order[:kept] {
		sums[settled[id].account] += settled[id].cost
	}
	for _, account := range kill9Accounts {
		books := checkBooks(t, s, account)
		if books.Open != 0 {
			t.Errorf("%s: %s open after the restart", account, books.Open)
		}
		if books.Credited < credited[account] {
			t.Errorf("%s: credited %s, the child was told %s", account, books.Credited, credited[account])
		}
		if books.Settled < sums[account] {
			t.Errorf("%s: settled %s, the reported prefix adds up to %s", account, books.Settled, sums[account])
		}
		if b, err := s.Balance(ctx, account); err != nil || b != books.Balance {
			t.Errorf("%s: balance %s, %v; books %s", account, b, err, books.Balance)
		}
	}
}
