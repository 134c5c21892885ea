package main

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// The Portkey gateway peer (-peers portkey): @portkey-ai/gateway from npm, run by node with the
// two preloads of the peers-bench kit: portkey-loopback.cjs forces its listener onto 127.0.0.1
// (it listens on all interfaces otherwise), portkey-streamfix.cjs re-wraps SSE responses whose
// headers Node's fetch made immutable (stream=true otherwise fails on Node 20; Portkey-AI/gateway
// issues #1389/#1550, PR #1551).
const portkeyVersion = "1.15.2"

//go:embed portkey/*.cjs
var portkeyPreloads embed.FS

// labeledTarget is a target with its row label in the report: a gateway of another project
// measured in front of a backend (-peers), or one of the project's own targets.
type labeledTarget struct {
	label string
	t     *target
}

// errPeerUnavailable marks a peer that cannot be installed or started here: the run goes on
// without it, with a note.
var errPeerUnavailable = errors.New("peer unavailable")

// startPortkey installs (once, under peersDir) and starts the Portkey gateway in front of the
// OpenAI-compatible backend at backendAddr, as a target named name.
func (b *bench) startPortkey(ctx context.Context, name, backendAddr string) (*labeledTarget, error) {
	node, errNode := exec.LookPath("node")
	npm, errNpm := exec.LookPath("npm")
	if errNode != nil || errNpm != nil {
		return nil, fmt.Errorf("%w: portkey needs node and npm on PATH", errPeerUnavailable)
	}
	dir := filepath.Join(b.cfg.peersDir, "portkey-"+portkeyVersion)
	server := filepath.Join(dir, "node_modules", "@portkey-ai", "gateway", "build", "start-server.js")
	if _, err := os.Stat(server); err != nil {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, "package.json"), []byte(`{"name":"llmbench-peers","private":true}`+"\n"), 0o644); err != nil {
			return nil, err
		}
		logln(fmt.Sprintf("installing @portkey-ai/gateway@%s with npm into %s", portkeyVersion, dir))
		ictx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ictx, npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "@portkey-ai/gateway@"+portkeyVersion)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("%w: npm install @portkey-ai/gateway@%s: %v: %s", errPeerUnavailable, portkeyVersion, err, lastLines(string(out), 5))
		}
		if _, err := os.Stat(server); err != nil {
			return nil, fmt.Errorf("%w: npm installed no %s", errPeerUnavailable, server)
		}
	}
	for _, f := range []string{"portkey-loopback.cjs", "portkey-streamfix.cjs"} {
		data, err := portkeyPreloads.ReadFile("portkey/" + f)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o644); err != nil {
			return nil, err
		}
	}
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	_, port, _ := strings.Cut(addr, ":")
	pdir, err := os.MkdirTemp(b.root, name+"-")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(node, "-r", filepath.Join(dir, "portkey-loopback.cjs"), "-r", filepath.Join(dir, "portkey-streamfix.cjs"),
		server, "--port="+port, "--headless")
	cmd.Env = append(os.Environ(), "NODE_ENV=production")
	p, err := spawn(ctx, cmd, name, addr, "", pdir, 60*time.Second)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errPeerUnavailable, err)
	}
	t := &target{name: name, url: p.baseURL() + "/v1/chat/completions", keys: []string{b.key}, proc: p,
		hdr: http.Header{
			"X-Portkey-Provider":    {"openai"},
			"X-Portkey-Custom-Host": {"http://" + backendAddr + "/v1"},
		}}
	if err := smoke(ctx, t); err != nil {
		p.stop()
		return nil, fmt.Errorf("%w: %v", errPeerUnavailable, err)
	}
	return &labeledTarget{label: "Portkey gateway " + portkeyVersion + " (npm)", t: t}, nil
}

func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, " | ")
}
