package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is one Caddy process started by the benchmark, in its own process group.
type proc struct {
	name    string
	addr    string // the site's 127.0.0.1:port
	admin   string // the admin endpoint's 127.0.0.1:port, "" when admin is off
	dir     string // its folder: Caddyfile, log, XDG data and config
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	waitErr error
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// baseURL is the site's http://127.0.0.1:port.
func (p *proc) baseURL() string { return "http://" + p.addr }

// children are the processes still to stop; stopAll stops them all.
var children struct {
	mu   sync.Mutex
	list []*proc
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// globalOptions is the Caddyfile global block: loopback admin (or none), no HTTPS, no saved
// config, Caddy's storage inside dir, and a short grace period so stopping never hangs.
func globalOptions(admin, dir string) string {
	a := "off"
	if admin != "" {
		a = admin
	}
	return fmt.Sprintf(`{
	admin %s
	auto_https off
	persist_config off
	grace_period 1s
	storage file_system %s
}
`, a, filepath.Join(dir, "storage"))
}

// mockCaddyfile: the mock backend alone. Streams carry chunks content messages chunkInterval
// apart unless a request's X-Mock-* headers say otherwise.
func mockCaddyfile(addr, dir string, chunks int, chunkInterval time.Duration) string {
	return globalOptions("", dir) + fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	llm_mock_backend {
		name bench-mock
		models %s
		chunks %d
		chunk_interval %s
	}
}
`, addr, benchModel, chunks, chunkInterval)
}

// caddyCaddyfile: plain reverse_proxy to the backend (the mock or the fake), Caddy's defaults
// otherwise (no access log); admin off unless admin is set.
func caddyCaddyfile(addr, admin, dir, backend string) string {
	return globalOptions(admin, dir) + fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	reverse_proxy %s
}
`, addr, backend)
}

// generousRateLimits turns every kind of rate limit on, far above what the bench can send.
const generousRateLimits = `
		rate_limits {
			tier bench {
				burst_per_second 100000000
				requests_per_minute 1000000000
				requests_per_hour 10000000000
				requests_per_day 100000000000
				concurrent 1000000
				tokens_per_minute 100000000000
			}
		}`

// gatewayCaddyfile: the gateway on its SQLite file with one OpenAI-style backend, named
// backendName at backendAddr (the mock or the fake); the admin endpoint on loopback for pprof.
// No access log, like plain Caddy. extra is added to its llm_gateway block (generousRateLimits
// for the gateway with rate limits).
func gatewayCaddyfile(addr, admin, dir, backendName, backendAddr, db, extra string) string {
	return gatewayCaddyfileStore(addr, admin, dir, backendName, backendAddr, "openai", "store sqlite "+db, extra)
}

// gatewayCaddyfileStore is gatewayCaddyfile with the store line (and its block) given, and the
// backend's style (openai, anthropic).
func gatewayCaddyfileStore(addr, admin, dir, backendName, backendAddr, style, store, extra string) string {
	return globalOptions(admin, dir) + fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	llm_gateway {
		%s%s
		backend %s {
			url http://%s
			style %s
			health_check {
				disabled
			}
			model %s {
				input_price 1
				output_price 2
			}
		}
	}
	respond "Not found" 404
}
`, addr, store, extra, backendName, backendAddr, style, benchModel)
}

// startCaddy writes the Caddyfile that makeConfig returns for the given ports into a folder of
// its own under root, starts caddyBin on it in a new process group, and waits until the site
// accepts connections.
func startCaddy(ctx context.Context, caddyBin, root, name string, withAdmin bool,
	makeConfig func(addr, admin, dir string) string) (*proc, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	admin := ""
	if withAdmin {
		if admin, err = freePort(); err != nil {
			return nil, err
		}
	}
	dir, err := os.MkdirTemp(root, name+"-")
	if err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(makeConfig(addr, admin, dir)), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(caddyBin, "run", "--config", cfg, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(),
		"XDG_DATA_HOME="+filepath.Join(dir, "xdg-data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "xdg-config"))
	return spawn(ctx, cmd, name, addr, admin, dir, 20*time.Second)
}

// startFake starts the foreign fake backend (package fakebackend) as a process of this very
// program, `llmbench fake -addr ... args...`, in a folder of its own under root.
func startFake(ctx context.Context, root, name string, args ...string) (*proc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding this program to run the fake backend: %w", err)
	}
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(root, name+"-")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, append([]string{"fake", "-addr", addr}, args...)...)
	return spawn(ctx, cmd, name, addr, "", dir, 20*time.Second)
}

// spawn starts cmd in dir, its output in dir's log, in a new process group, and waits (at most
// timeout) until addr accepts connections.
func spawn(ctx context.Context, cmd *exec.Cmd, name, addr, admin, dir string, timeout time.Duration) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor

	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group, so that stopping kills whatever it started too; and killed with
	// this process should it die without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &proc{name: name, addr: addr, admin: admin, dir: dir, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	children.mu.Lock()
	if err := cmd.Start(); err != nil {
		children.mu.Unlock()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	children.list = append(children.list, p)
	children.mu.Unlock()
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()

	if err := p.waitListening(ctx, timeout); err != nil {
		p.stop()
		return nil, fmt.Errorf("%s: %w\n%s", name, err, p.logTail(20))
	}
	msg := fmt.Sprintf("started %s pid %d on %s", name, p.pid(), addr)
	if admin != "" {
		msg += " (admin " + admin + ")"
	}
	logln(msg)
	return p, nil
}

// waitListening waits until the site accepts TCP connections, the process exits, or timeout.
func (p *proc) waitListening(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("exited during start: %v", p.waitErr)
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		c, err := net.DialTimeout("tcp", p.addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("not listening on %s after %s", p.addr, timeout)
}

// stop ends the process group: SIGTERM, then SIGKILL after 5s; signals go to the group only
// while its leader, our child, has not been reaped. Safe to call twice.
func (p *proc) stop() {
	select {
	case <-p.done:
	default:
		_ = syscall.Kill(-p.pid(), syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
			}
		}
	}
	children.mu.Lock()
	for i, c := range children.list {
		if c == p {
			children.list = append(children.list[:i], children.list[i+1:]...)
			break
		}
	}
	children.mu.Unlock()
}

// stopAll stops every process still running, the most recently started first.
func stopAll() {
	children.mu.Lock()
	list := append([]*proc(nil), children.list...)
	children.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].stop()
	}
}

// logTail is the end of the process's log, for error messages.
func (p *proc) logTail(lines int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return "--- " + p.name + " log (last lines) ---\n" + strings.Join(ls, "\n")
}

// rssKB reads VmRSS of the process, in KiB.
func rssKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) < 1 {
				break
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

// cpuTicks reads utime+stime of the process (all its threads), in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces: count after it.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("malformed utime/stime in /proc stat")
	}
	return ut + st, nil
}

// clockTicks is the kernel's USER_HZ (getconf CLK_TCK), 100 when getconf is unavailable.
func clockTicks() int64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return 100
}

// loadAvg is the first three fields of /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// goLiveKB forces a garbage collection in the process (its admin endpoint's
// /debug/pprof/heap?gc=1) and then reads its memstats (/debug/vars): the live heap plus the
// goroutine stacks, in KiB.
func (p *proc) goLiveKB(ctx context.Context) (int64, error) {
	if p.admin == "" {
		return 0, errors.New(p.name + ": no admin endpoint")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	get := func(path string) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.admin+path, nil)
		if err != nil {
			return nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s%s: status %d", p.admin, path, resp.StatusCode)
		}
		return b, err
	}
	if _, err := get("/debug/pprof/heap?gc=1"); err != nil {
		return 0, err
	}
	b, err := get("/debug/vars")
	if err != nil {
		return 0, err
	}
	var vars struct {
		Memstats struct {
			HeapAlloc  int64
			StackInuse int64
		} `json:"memstats"`
	}
	if err := json.Unmarshal(b, &vars); err != nil {
		return 0, fmt.Errorf("%s /debug/vars: %w", p.name, err)
	}
	return (vars.Memstats.HeapAlloc + vars.Memstats.StackInuse) / 1024, nil
}
