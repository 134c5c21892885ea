package caddymodule

import "time"

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
