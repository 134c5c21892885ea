package caddymodule

import (
	"errors"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

func TestInheritRestrictions(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	soon := now.Add(48 * time.Hour)
	later := now.Add(30 * 24 * time.Hour)
	days := func(n int) *int { return &n }
	restricted := &caller{allowedIPs: []string{"10.0.0.0/8"}, expiresAt: &soon}
	for _, tc := range []struct {
		name    string
		who     *caller
		in      keyRequest
		wantErr bool
		check   func(t *testing.T, in keyRequest)
	}{
		{name: "an unrestricted creator passes the request as it is", who: &caller{}, in: keyRequest{AllowedIPs: []string{"0.0.0.0/0"}},
			check: func(t *testing.T, in keyRequest) {
				if len(in.AllowedIPs) != 1 || in.ExpiresAt != nil {
					t.Fatalf("%+v", in)
				}
			}},
		{name: "the creator's allowlist and expiry are inherited", who: restricted,
			check: func(t *testing.T, in keyRequest) {
				if len(in.AllowedIPs) != 1 || in.AllowedIPs[0] != "10.0.0.0/8" || in.ExpiresAt == nil || !in.ExpiresAt.Equal(soon) {
					t.Fatalf("%+v", in)
				}
			}},
		{name: "a narrower allowlist and an earlier expiry are fine", who: restricted,
			in: keyRequest{AllowedIPs: []string{"10.1.0.0/16", "10.2.3.4"}, ExpiresInDays: days(1)}},
		{name: "a wider allowlist is refused", who: restricted, in: keyRequest{AllowedIPs: []string{"0.0.0.0/0"}}, wantErr: true},
		{name: "an address outside is refused", who: restricted, in: keyRequest{AllowedIPs: []string{"192.168.1.1"}}, wantErr: true},
		{name: "a later expiry is refused", who: restricted, in: keyRequest{ExpiresAt: &later}, wantErr: true},
		{name: "outliving by days is refused", who: restricted, in: keyRequest{ExpiresInDays: days(3)}, wantErr: true},
		{name: "a capped key creates no keys", who: &caller{keyCap: credits.Credit}, wantErr: true},
		{name: "the creator's tier is inherited", who: &caller{tier: "pro"},
			check: func(t *testing.T, in keyRequest) {
				if in.Tier != "pro" {
					t.Fatalf("tier %q", in.Tier)
				}
			}},
		{name: "the creator's own tier may be named", who: &caller{tier: "pro"}, in: keyRequest{Tier: "pro"}},
		{name: "another tier is refused", who: &caller{tier: "free"}, in: keyRequest{Tier: "enterprise"}, wantErr: true},
		{name: "a user's token names no tier", who: &caller{kind: "jwt"}, in: keyRequest{Tier: "enterprise"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.in
			err := inheritRestrictions(tc.who, &in, now)
			if tc.wantErr {
				var br *badRequest
				if err == nil || !errors.As(err, &br) && !errors.Is(err, errCappedCreator) {
					t.Fatalf("err = %v, want a refusal", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, in)
			}
		})
	}
}
