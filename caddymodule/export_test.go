package caddymodule

import (
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/ratelimit"
)

// SetRateLimitClock makes now the clock of every gateway's rate limits in this process until
// the returned function is called (end-to-end tests: no waiting for windows to pass).
func SetRateLimitClock(now func() time.Time) (restore func()) {
	rateLimitClock.Store(&now)
	return func() { rateLimitClock.Store(nil) }
}

// SetClock makes now the clock of every gateway in this process (token lifetimes, codes,
// sessions, refresh grace, key expiry) until the returned function is called.
func SetClock(now func() time.Time) (restore func()) {
	gatewayClock.Store(&now)
	return func() { gatewayClock.Store(nil) }
}

// SetMaxBufferedResponse lowers the largest non-streaming answer the gateway holds, until the
// returned function is called (tests of large answers without sending 32 MiB).
func SetMaxBufferedResponse(n int) (restore func()) {
	old := maxBufferedResponse
	maxBufferedResponse = n
	return func() { maxBufferedResponse = old }
}

// PasswordHashPeak is the most password hashes that ran at once since the last call, and the
// number of slots; the count starts again at zero.
func PasswordHashPeak() (peak int64, slots int) {
	return passwordHashing.peak.Swap(passwordHashing.held.Load()), cap(passwordHashing.slots)
}

// SetSigninLimit sets the quota of the named sign-in limiter (LimiterSigninAccount, ...) for
// the gateways provisioned until the returned function is called (so that a test need not
// hash a hundred passwords to reach a bound).
func SetSigninLimit(name string, quota int64) (restore func()) {
	old := namedPolicies[name]
	p := old
	p.Limits = append([]ratelimit.Limit(nil), old.Limits...)
	p.Limits[0].Quota = quota
	namedPolicies[name] = p
	return func() { namedPolicies[name] = old }
}

// TestRedisAddr and TestRedisClient are the test Redis (keycap_redis_test.go).
const TestRedisAddr = testRedisAddr

var TestRedisClient = testRedisClient
