package caddymodule

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("llm_gateway", parseCaddyfile)
	// Inside encode, before respond and reverse_proxy.
	httpcaddyfile.RegisterDirectiveOrder("llm_gateway", httpcaddyfile.Before, "invoke")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	g := new(Gateway)
	err := g.UnmarshalCaddyfile(h.Dispenser)
	return g, err
}

// UnmarshalCaddyfile sets up the gateway from Caddyfile tokens. Each subdirective is one JSON
// field:
//
//	llm_gateway {
//		store sqlite <path> | postgres <dsn> {
//			lease_size <credits>
//			lease_ttl <duration>
//		}
//		key_prefix <prefix>
//		max_keys_per_user <n>
//		max_request_body <size>
//		max_tokens_default <n>
//		max_tokens_cap <n>
//		tool_calls_default <n>
//		reservation_ttl <duration>
//		on_disconnect stop|drain
//		drain_timeout <duration>
//		failover <n>
//		key_cache_ttl <duration>
//		billing_url <url>
//		allowed_origins <origin...>
//		anonymous {
//			credits <amount>
//			period <duration>
//			signin_url <url>
//		}
//		signin {
//			...                      (see unmarshalSignin)
//		}
//		redis <url> {
//			prefix <prefix>
//			timeout <duration>
//			lease_divisor <n>|-1
//		}
//		rate_limits {
//			default_tier <name>
//			anonymous_tier <name>
//			tier <name> {
//				requests_per_minute <n>
//				requests_per_hour <n>
//				requests_per_day <n>
//				burst_per_second <n>
//				concurrent <n>
//				tokens_per_minute <n>
//			}
//		}
//		backend <name> {
//			url <url>
//			style openai|ollama|anthropic
//			api_key <key>                (anthropic: sent as x-api-key)
//			anthropic_version <version>  (anthropic: default 2023-06-01)
//			header <field> <value>
//			dial_timeout <duration>
//			response_header_timeout <duration>
//			timeout <duration>
//			health_check {
//				path <path>
//				interval <duration>
//				timeout <duration>
//				disabled
//			}
//			model <name> {
//				upstream <name>
//				kind chat|embeddings
//				input_price <credits per 1M tokens>
//				output_price <credits per 1M tokens>
//				cached_input_price <credits per 1M tokens>
//				cache_write_price <credits per 1M tokens>
//				tool_price <tool> <credits per call>
//			}
//		}
//	}
func (g *Gateway) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "store":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.ArgErr()
			}
			g.Store = StoreConfig{Driver: args[0]}
			if args[0] == storePostgres {
				g.Store.DSN = args[1]
			} else {
				g.Store.Path = args[1]
			}
			for d.NextBlock(1) {
				switch d.Val() {
				case "lease_size":
					if err := oneAmount(d, &g.Store.LeaseSize); err != nil {
						return err
					}
				case "lease_ttl":
					if err := oneDuration(d, &g.Store.LeaseTTL); err != nil {
						return err
					}
				default:
					return d.Errf("unrecognized store subdirective %q", d.Val())
				}
			}
		case "key_prefix":
			if err := oneString(d, &g.KeyPrefix); err != nil {
				return err
			}
		case "billing_url":
			if err := oneString(d, &g.BillingURL); err != nil {
				return err
			}
		case "max_request_body":
			var s string
			if err := oneString(d, &s); err != nil {
				return err
			}
			n, err := humanize.ParseBytes(s)
			if err != nil {
				return d.Errf("max_request_body: %v", err)
			}
			g.MaxRequestBody = int64(n)
		case "max_keys_per_user":
			if err := oneInt64(d, &g.MaxKeysPerUser); err != nil {
				return err
			}
		case "max_tokens_default":
			if err := oneInt64(d, &g.MaxTokensDefault); err != nil {
				return err
			}
		case "max_tokens_cap":
			if err := oneInt64(d, &g.MaxTokensCap); err != nil {
				return err
			}
		case "tool_calls_default":
			if err := oneInt64(d, &g.ToolCallsDefault); err != nil {
				return err
			}
		case "reservation_ttl":
			if err := oneDuration(d, &g.ReservationTTL); err != nil {
				return err
			}
		case "on_disconnect":
			if err := oneString(d, &g.OnDisconnect); err != nil {
				return err
			}
		case "drain_timeout":
			if err := oneDuration(d, &g.DrainTimeout); err != nil {
				return err
			}
		case "key_cache_ttl":
			if err := oneDuration(d, &g.KeyCacheTTL); err != nil {
				return err
			}
		case "failover":
			var n int64
			if err := oneInt64(d, &n); err != nil {
				return err
			}
			g.Failover = int(n)
		case "allowed_origins":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			g.AllowedOrigins = append(g.AllowedOrigins, args...)
		case "anonymous":
			a, err := unmarshalAnonymous(d)
			if err != nil {
				return err
			}
			g.Anonymous = a
		case "backend":
			b, err := unmarshalBackend(d)
			if err != nil {
				return err
			}
			g.Backends = append(g.Backends, b)
		case "signin":
			if g.Signin != nil {
				return d.Err("signin given twice")
			}
			s, err := unmarshalSignin(d)
			if err != nil {
				return err
			}
			g.Signin = s
		case "rate_limits":
			if g.RateLimits != nil {
				return d.Err("rate_limits given twice")
			}
			rl, err := unmarshalRateLimits(d)
			if err != nil {
				return err
			}
			g.RateLimits = rl
		case "redis":
			if g.Redis != nil {
				return d.Err("redis given twice")
			}
			rc, err := unmarshalRedis(d)
			if err != nil {
				return err
			}
			g.Redis = rc
		default:
			return d.Errf("unrecognized llm_gateway subdirective %q", d.Val())
		}
	}
	return nil
}

// unmarshalRedis parses
//
//	redis <url> {
//		prefix        <prefix>
//		timeout       <duration>
//		lease_divisor <n>|-1
//	}
func unmarshalRedis(d *caddyfile.Dispenser) (*Redis, error) {
	rc := new(Redis)
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	rc.URL = d.Val()
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "prefix":
			if err := oneString(d, &rc.Prefix); err != nil {
				return nil, err
			}
		case "timeout":
			if err := oneDuration(d, &rc.Timeout); err != nil {
				return nil, err
			}
		case "lease_divisor":
			if err := oneInt64(d, &rc.LeaseDivisor); err != nil {
				return nil, err
			}
		default:
			return nil, d.Errf("unrecognized redis subdirective %q", d.Val())
		}
	}
	return rc, nil
}

func unmarshalAnonymous(d *caddyfile.Dispenser) (*Anonymous, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	a := new(Anonymous)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "credits":
			if err := oneAmount(d, &a.Credits); err != nil {
				return nil, err
			}
		case "period":
			if err := oneDuration(d, &a.Period); err != nil {
				return nil, err
			}
		case "signin_url":
			if err := oneString(d, &a.SigninURL); err != nil {
				return nil, err
			}
		default:
			return nil, d.Errf("unrecognized anonymous subdirective %q", d.Val())
		}
	}
	return a, nil
}

// unmarshalSignin parses
//
//	signin {
//		issuer <base url>
//		return_origins <origin...>
//		signup_credits <credits>
//		disable_signup
//		fragment_token_ttl <duration>
//		access_token_ttl <duration>
//		refresh_token_ttl <duration>
//		refresh_grace <duration>
//		code_ttl <duration>
//		session_ttl <duration>
//		external_issuer <issuer> {
//			jwks_url <url>
//			audience <aud>
//			algorithms <alg...>
//			scopes <scope...>
//		}
//	}
func unmarshalSignin(d *caddyfile.Dispenser) (*Signin, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	s := new(Signin)
	durations := map[string]*caddy.Duration{
		"fragment_token_ttl": &s.FragmentTokenTTL, "access_token_ttl": &s.AccessTokenTTL,
		"refresh_token_ttl": &s.RefreshTokenTTL, "refresh_grace": &s.RefreshGrace,
		"code_ttl": &s.CodeTTL, "session_ttl": &s.SessionTTL,
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		field := d.Val()
		if dst, ok := durations[field]; ok {
			if err := oneDuration(d, dst); err != nil {
				return nil, err
			}
			continue
		}
		switch field {
		case "issuer":
			if err := oneString(d, &s.Issuer); err != nil {
				return nil, err
			}
		case "return_origins":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			s.ReturnOrigins = append(s.ReturnOrigins, args...)
		case "signup_credits":
			if err := oneAmount(d, &s.SignupCredits); err != nil {
				return nil, err
			}
		case "disable_signup":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			s.DisableSignup = true
		case "external_issuer":
			e := new(ExternalIssuer)
			if !d.NextArg() {
				return nil, d.Err("external_issuer needs the issuer")
			}
			e.Issuer = d.Val()
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			for en := d.Nesting(); d.NextBlock(en); {
				switch d.Val() {
				case "jwks_url":
					if err := oneString(d, &e.JWKSURL); err != nil {
						return nil, err
					}
				case "audience":
					if err := oneString(d, &e.Audience); err != nil {
						return nil, err
					}
				case "algorithms":
					if e.Algorithms = d.RemainingArgs(); len(e.Algorithms) == 0 {
						return nil, d.ArgErr()
					}
				case "scopes":
					if e.Scopes = d.RemainingArgs(); len(e.Scopes) == 0 {
						return nil, d.ArgErr()
					}
				default:
					return nil, d.Errf("unrecognized external_issuer subdirective %q", d.Val())
				}
			}
			s.ExternalIssuers = append(s.ExternalIssuers, e)
		default:
			return nil, d.Errf("unrecognized signin subdirective %q", field)
		}
	}
	return s, nil
}

// unmarshalRateLimits parses
//
//	rate_limits {
//		default_tier <name>
//		anonymous_tier <name>
//		tier <name> {
//			requests_per_minute <n>
//			requests_per_hour <n>
//			requests_per_day <n>
//			burst_per_second <n>
//			concurrent <n>
//			tokens_per_minute <n>
//		}
//	}
func unmarshalRateLimits(d *caddyfile.Dispenser) (*RateLimits, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	rl := new(RateLimits)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "default_tier":
			if err := oneString(d, &rl.DefaultTier); err != nil {
				return nil, err
			}
		case "anonymous_tier":
			if err := oneString(d, &rl.AnonymousTier); err != nil {
				return nil, err
			}
		case "tier":
			if !d.NextArg() {
				return nil, d.Err("tier needs a name")
			}
			name := d.Val()
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			if rl.Tiers[name] != nil {
				return nil, d.Errf("tier %q given twice", name)
			}
			t := new(Tier)
			for tn := d.Nesting(); d.NextBlock(tn); {
				var dst *int64
				field := d.Val()
				switch field {
				case "requests_per_minute":
					dst = &t.RequestsPerMinute
				case "requests_per_hour":
					dst = &t.RequestsPerHour
				case "requests_per_day":
					dst = &t.RequestsPerDay
				case "burst_per_second":
					dst = &t.BurstPerSecond
				case "concurrent":
					dst = &t.Concurrent
				case "tokens_per_minute":
					dst = &t.TokensPerMinute
				default:
					return nil, d.Errf("unrecognized tier subdirective %q", d.Val())
				}
				if err := oneInt64(d, dst); err != nil {
					return nil, err
				}
				if *dst < 0 {
					return nil, d.Errf("%s must not be negative", field)
				}
			}
			if rl.Tiers == nil {
				rl.Tiers = map[string]*Tier{}
			}
			rl.Tiers[name] = t
		default:
			return nil, d.Errf("unrecognized rate_limits subdirective %q", d.Val())
		}
	}
	return rl, nil
}

func unmarshalBackend(d *caddyfile.Dispenser) (*Backend, error) {
	b := new(Backend)
	if !d.NextArg() {
		return nil, d.Err("backend needs a name")
	}
	b.Name = d.Val()
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "url":
			if err := oneString(d, &b.URL); err != nil {
				return nil, err
			}
		case "style":
			var s string
			if err := oneString(d, &s); err != nil {
				return nil, err
			}
			b.Style = routing.Style(s)
		case "api_key":
			if err := oneString(d, &b.APIKey); err != nil {
				return nil, err
			}
		case "anthropic_version":
			if err := oneString(d, &b.AnthropicVersion); err != nil {
				return nil, err
			}
		case "header":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return nil, d.ArgErr()
			}
			if b.Headers == nil {
				b.Headers = map[string]string{}
			}
			b.Headers[args[0]] = args[1]
		case "dial_timeout":
			if err := oneDuration(d, &b.DialTimeout); err != nil {
				return nil, err
			}
		case "response_header_timeout":
			if err := oneDuration(d, &b.ResponseHeaderTimeout); err != nil {
				return nil, err
			}
		case "timeout":
			if err := oneDuration(d, &b.Timeout); err != nil {
				return nil, err
			}
		case "health_check":
			hc, err := unmarshalHealthCheck(d)
			if err != nil {
				return nil, err
			}
			b.HealthCheck = hc
		case "model":
			m, err := unmarshalModel(d)
			if err != nil {
				return nil, err
			}
			b.Models = append(b.Models, m)
		default:
			return nil, d.Errf("unrecognized backend subdirective %q", d.Val())
		}
	}
	return b, nil
}

func unmarshalHealthCheck(d *caddyfile.Dispenser) (*HealthCheck, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	hc := new(HealthCheck)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "path":
			if err := oneString(d, &hc.Path); err != nil {
				return nil, err
			}
		case "interval":
			if err := oneDuration(d, &hc.Interval); err != nil {
				return nil, err
			}
		case "timeout":
			if err := oneDuration(d, &hc.Timeout); err != nil {
				return nil, err
			}
		case "disabled":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			hc.Disabled = true
		default:
			return nil, d.Errf("unrecognized health_check subdirective %q", d.Val())
		}
	}
	return hc, nil
}

func unmarshalModel(d *caddyfile.Dispenser) (*Model, error) {
	m := new(Model)
	if !d.NextArg() {
		return nil, d.Err("model needs a name")
	}
	m.Name = d.Val()
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "upstream":
			if err := oneString(d, &m.Upstream); err != nil {
				return nil, err
			}
		case "kind":
			var s string
			if err := oneString(d, &s); err != nil {
				return nil, err
			}
			m.Kind = routing.Kind(s)
		case "input_price":
			if err := oneAmount(d, &m.InputPrice); err != nil {
				return nil, err
			}
		case "output_price":
			if err := oneAmount(d, &m.OutputPrice); err != nil {
				return nil, err
			}
		case "cached_input_price", "cache_write_price":
			field := &m.CachedInputPrice
			if d.Val() == "cache_write_price" {
				field = &m.CacheWritePrice
			}
			var a credits.Amount
			if err := oneAmount(d, &a); err != nil {
				return nil, err
			}
			*field = &a
		case "tool_price":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			tool := d.Val()
			var a credits.Amount
			if err := oneAmount(d, &a); err != nil {
				return nil, err
			}
			if m.ToolPrices == nil {
				m.ToolPrices = map[string]credits.Amount{}
			}
			if _, dup := m.ToolPrices[tool]; dup {
				return nil, d.Errf("tool_price %s given twice", tool)
			}
			m.ToolPrices[tool] = a
		default:
			return nil, d.Errf("unrecognized model subdirective %q", d.Val())
		}
	}
	return m, nil
}

func oneString(d *caddyfile.Dispenser, dst *string) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	*dst = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func oneInt64(d *caddyfile.Dispenser, dst *int64) error {
	var s string
	if err := oneString(d, &s); err != nil {
		return err
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return d.Errf("%s: not a whole number: %s", d.Val(), s)
	}
	*dst = n
	return nil
}

func oneDuration(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	var s string
	if err := oneString(d, &s); err != nil {
		return err
	}
	v, err := caddy.ParseDuration(s)
	if err != nil {
		return d.Errf("bad duration %q: %v", s, err)
	}
	*dst = caddy.Duration(v)
	return nil
}

func oneAmount(d *caddyfile.Dispenser, dst *credits.Amount) error {
	var s string
	if err := oneString(d, &s); err != nil {
		return err
	}
	v, err := credits.ParseAmount(s)
	if err != nil {
		return d.Errf("bad amount of credits %q: %v", s, err)
	}
	*dst = v
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Gateway)(nil)
