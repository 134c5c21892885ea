package caddymodule_test

import (
	"net"
	"sync"
	"testing"
	"time"
)

// faultProxy is a TCP proxy between the gateway and a service it depends on (Redis,
// PostgreSQL), which a test can cut (every connection closed, new ones refused at once),
// black-hole (connections stay open, nothing passes, as when packets are dropped: what was
// sent passes once restored, like TCP's retransmissions) or delay (each chunk waits), and
// restore. Stopped at the end of the test.
type faultProxy struct {
	t      testing.TB
	ln     net.Listener
	target string

	mu      sync.Mutex
	changed *sync.Cond // signalled on every change of mode
	mode    faultMode
	delay   time.Duration
	conns   map[net.Conn]bool
	closed  bool
}

type faultMode int

const (
	faultPass faultMode = iota
	faultCut
	faultBlackHole
)

// newFaultProxy listens on a loopback port and forwards to target (host:port).
func newFaultProxy(t testing.TB, target string) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{t: t, ln: ln, target: target, conns: map[net.Conn]bool{}}
	p.changed = sync.NewCond(&p.mu)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

// Addr is the proxy's host:port.
func (p *faultProxy) Addr() string { return p.ln.Addr().String() }

// Cut closes every connection, and closes new ones as soon as they are accepted.
func (p *faultProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = faultCut
	for c := range p.conns {
		_ = c.Close()
	}
	p.changed.Broadcast()
}

// BlackHole keeps connections (and accepts new ones) but lets nothing through until Restore.
func (p *faultProxy) BlackHole() { p.set(faultBlackHole, 0) }

// Delay lets everything through, each chunk d late.
func (p *faultProxy) Delay(d time.Duration) { p.set(faultPass, d) }

// Restore lets everything through at once again.
func (p *faultProxy) Restore() { p.set(faultPass, 0) }

func (p *faultProxy) set(m faultMode, d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode, p.delay = m, d
	p.changed.Broadcast()
}

func (p *faultProxy) close() {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		_ = c.Close()
	}
	p.changed.Broadcast()
	p.mu.Unlock()
	_ = p.ln.Close()
}

func (p *faultProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.mode == faultCut || p.closed {
			p.mu.Unlock()
			_ = c.Close()
			continue
		}
		p.conns[c] = true
		p.mu.Unlock()
		go p.pipe(c)
	}
}

// pipe connects c to the target for as long as both stay open.
func (p *faultProxy) pipe(c net.Conn) {
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		p.drop(c)
		return
	}
	p.mu.Lock()
	if p.mode == faultCut || p.closed {
		p.mu.Unlock()
		_ = up.Close()
		p.drop(c)
		return
	}
	p.conns[up] = true
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { p.copy(up, c) })
	wg.Go(func() { p.copy(c, up) })
	wg.Wait()
	p.drop(c)
	p.drop(up)
}

// copy forwards src to dst chunk by chunk, each chunk held while black-holed and delayed as
// set when it is forwarded; it closes both when either ends.
func (p *faultProxy) copy(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			for p.mode == faultBlackHole && !p.closed {
				p.changed.Wait()
			}
			cut, delay := p.mode == faultCut || p.closed, p.delay
			p.mu.Unlock()
			if cut {
				return
			}
			if delay > 0 {
				time.Sleep(delay)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // io.EOF or a closed connection
		}
	}
}

func (p *faultProxy) drop(c net.Conn) {
	_ = c.Close()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}
