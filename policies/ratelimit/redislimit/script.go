package redislimit

import (
	"context"
	_ "embed"
	"fmt"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

var (
	//go:embed clock.lua
	clockLua string
	//go:embed admit.lua
	admitLua string
	//go:embed finish.lua
	finishLua string
	//go:embed peek.lua
	peekLua string
)

// scripts are a limiter's Lua scripts: clock.lua and each of admit.lua, finish.lua and
// peek.lua, after the limiter's constants (its limits and concurrency bound). The policy is
// written into the scripts rather than sent with every call: Redis's interpreter is most of
// an admission's cost, and each argument is a string it converts and parses. Limiters of the
// same policy have the same scripts (and the same SHA1); Redis keeps each one once.
type scripts struct {
	admit, finish, peek *redis.Script
	sources             []string // the three's source, for LoadScripts
}

// newScripts writes l's scripts.
func newScripts(l *Limiter) scripts {
	var b strings.Builder
	b.WriteString("-- The limiter's constants (redislimit.newScripts).\n")
	b.WriteString("local NLIM, BOUND, SLOT_TTL = ")
	b.WriteString(strconv.Itoa(len(l.limits)) + ", " + strconv.FormatInt(l.concurrent, 10) + ", " +
		strconv.FormatInt(l.slotTTL.Milliseconds(), 10) + "\n")
	list := func(name string, v func(i int) string) {
		b.WriteString("local " + name + " = {")
		for i := range l.limits {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(v(i))
		}
		b.WriteString("}\n")
	}
	list("NAMES", func(i int) string { return luaString(l.limits[i].Name) })
	list("BURST", func(i int) string { return strconv.FormatInt(l.limits[i].Burst, 10) })
	list("INTERVAL", func(i int) string { return strconv.FormatInt(l.limits[i].Interval, 10) })
	list("TOLERANCE", func(i int) string { return strconv.FormatInt(l.limits[i].Tolerance, 10) })
	list("PAD", func(i int) string { return strconv.FormatInt(l.pads[i], 10) })
	head := b.String() + clockLua
	src := []string{head + admitLua, head + finishLua, head + peekLua}
	return scripts{admit: redis.NewScript(src[0]), finish: redis.NewScript(src[1]),
		peek: redis.NewScript(src[2]), sources: src}
}

// luaString is s as a Lua string literal: every byte other than a letter, a digit, '_' or '-'
// written as a decimal escape, so that no name can end the literal or the line.
func luaString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "\\%03d", c) // three digits: a digit after it is not read into it
		}
	}
	b.WriteByte('"')
	return b.String()
}

// LoadScripts sends the scripts of limiters to Redis (SCRIPT LOAD) in one round trip, so that
// the first admission of a policy new to Redis is one round trip like every other, not three
// (EVALSHA refused, then EVAL). Optional: a script Redis does not hold is sent when first
// needed, and again after Redis has lost it.
func LoadScripts(ctx context.Context, rdb redis.Cmdable, limiters ...*Limiter) error {
	if len(limiters) == 0 {
		return nil
	}
	// Not redis.Script's Load: in a pipeline it would keep the empty reply as the SHA1.
	pipe := rdb.Pipeline()
	for _, l := range limiters {
		for _, src := range l.scripts.sources {
			pipe.ScriptLoad(ctx, src)
		}
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("redislimit: loading the scripts: %w", err)
	}
	return nil
}
