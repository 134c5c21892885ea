package caddymodule

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestRedisValidate: the redis block's settings are checked at load, with an error naming the
// setting; lease_divisor is a positive number, 0 for the default, or -1 for no leases.
func TestRedisValidate(t *testing.T) {
	for _, tc := range []struct {
		rc   Redis
		want string // "" valid
	}{
		{Redis{URL: "redis://127.0.0.1:6379"}, ""},
		{Redis{URL: "redis://127.0.0.1:6379", LeaseDivisor: -1}, ""},
		{Redis{URL: "redis://127.0.0.1:6379", LeaseDivisor: 8}, ""},
		{Redis{}, "a url is required"},
		{Redis{URL: "redis://127.0.0.1:6379", Prefix: "a{b}"}, "prefix"},
		{Redis{URL: "redis://127.0.0.1:6379", Timeout: caddy.Duration(-1)}, "timeout"},
		{Redis{URL: "redis://127.0.0.1:6379", LeaseDivisor: -2}, "lease_divisor"},
	} {
		err := tc.rc.validate()
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.rc, err, tc.want)
		}
	}
}
