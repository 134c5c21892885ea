package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite"
)

// signinRequest is a sign-in request from the client address ip, as Caddy gives it.
func signinRequest(ip string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "http://gw.test/auth/login", nil)
	vars := map[string]any{caddyhttp.ClientIPVarKey: ip}
	return r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, vars))
}

// TestSigninThrottleSharedByA64: the sign-in throttle keys an IPv6 client by its /64, so a host
// that rotates through its /64 shares one limit; another /64 has its own. (The per-address
// limit is lowered to 3 here, so that only 4 passwords are hashed.)
func TestSigninThrottleSharedByA64(t *testing.T) {
	defer SetSigninLimit(LimiterSigninIP, 3)()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "gw.db"), sqlite.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	g := &Gateway{Signin: &Signin{Issuer: "https://gw.test"}, logger: zap.NewNop(),
		store: &storeHandle{users: st, signin: st}}
	if err := g.provisionRateLimits(nil); err != nil {
		t.Fatal(err)
	}
	defer g.cleanupRateLimits()

	attempt := func(i int, ip string) error {
		_, err := g.checkPassword(httptest.NewRecorder(), signinRequest(ip), fmt.Sprintf("nobody%d@example.com", i), "a wrong password")
		return err
	}
	for i, ip := range []string{"2001:db8:1:2::1", "2001:db8:1:2::2", "[2001:db8:1:2:ffff:ffff:ffff:ffff]:443"} {
		if err := attempt(i, ip); !errors.Is(err, errWrongPassword) {
			t.Fatalf("attempt %d from %s: %v", i, ip, err)
		}
	}
	var rl *rateLimited
	if err := attempt(3, "2001:db8:1:2:abcd::1"); !errors.As(err, &rl) || rl.tier != LimiterSigninIP {
		t.Fatalf("a 4th address of the /64: %v, want the per-address limit", err)
	}
	if err := attempt(4, "2001:db8:1:3::1"); !errors.Is(err, errWrongPassword) {
		t.Fatalf("another /64: %v, want its own limit", err)
	}
}

// TestHashSlots: of many callers at once, no more than the slots hash together; those that
// wait longer than passwordHashWait are refused with errHashBusy, and a slot held by a caller
// that finished is free again.
func TestHashSlots(t *testing.T) {
	h := newHashSlots(2)
	release := make(chan struct{})
	started := make(chan struct{}, 2)
	done := make(chan error, 2)
	for range 2 {
		go func() {
			done <- h.do(context.Background(), func() { started <- struct{}{}; <-release })
		}()
	}
	<-started
	<-started
	if err := h.do(context.Background(), func() { t.Error("ran without a slot") }); !errors.Is(err, errHashBusy) {
		t.Fatalf("a third caller: %v, want errHashBusy", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := h.do(ctx, func() {}); !errors.Is(err, context.Canceled) {
		t.Fatalf("a canceled caller: %v", err)
	}
	close(release)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if err := h.do(context.Background(), func() {}); err != nil || h.peak.Load() != 2 || h.held.Load() != 0 {
		t.Fatalf("after: %v, peak %d, held %d", err, h.peak.Load(), h.held.Load())
	}
}
