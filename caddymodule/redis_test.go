package caddymodule

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
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

// FuzzRedisCaddyfile: whatever the redis block, parsing does not panic, and what it accepts
// either validates or is refused by validate with an error; a lease_divisor below -1 is refused.
func FuzzRedisCaddyfile(f *testing.F) {
	f.Add("redis redis://127.0.0.1:6379 {\n prefix gw:\n timeout 250ms\n lease_divisor 32\n}")
	f.Add("redis {env.REDIS_URL}")
	f.Add("redis redis://h {\n lease_divisor -1\n}")
	f.Add("redis redis://h {\n lease_divisor -9223372036854775808\n prefix {a}\n}")
	f.Fuzz(func(t *testing.T, src string) {
		d := caddyfile.NewTestDispenser(src)
		d.Next()
		rc, err := unmarshalRedis(d)
		if err != nil {
			return
		}
		err = rc.validate()
		if rc.LeaseDivisor < -1 && err == nil {
			t.Fatalf("lease_divisor %d validated", rc.LeaseDivisor)
		}
		if err == nil && (rc.URL == "" || rc.Timeout < 0 || strings.ContainsAny(rc.Prefix, "{}")) {
			t.Fatalf("validated %+v", rc)
		}
	})
}
