package metering

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"
)

// This file is a small validating JSON walker that reads the few members the meter needs out of
// a document without decoding it and without allocating. It accepts exactly the texts that
// encoding/json accepts, except that nesting is limited to maxDepth.

// maxDepth bounds the nesting of arrays and objects, and with it the recursion of skipValue.
const maxDepth = 1000

// isSpace reports JSON whitespace.
func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// lastNonSpace returns the index of the last byte of b that is not JSON whitespace, or -1.
func lastNonSpace(b []byte) int {
	i := len(b) - 1
	for i >= 0 && isSpace(b[i]) {
		i--
	}
	return i
}

// topObject walks the JSON text b, which must be one object with nothing but whitespace around
// it, and returns an iterator over its members. Callers range over next and then check ok.
func topObject(b []byte) objectIter {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return objectIter{failed: true}
	}
	return objectIter{b: b, i: i + 1, top: true}
}

// objectIter iterates over the members of an object. It reads b from i, which is just after
// the opening brace.
type objectIter struct {
	b      []byte
	i      int
	depth  int
	n      int  // members read so far
	top    bool // b must end with the object, apart from whitespace
	end    int  // index just past the closing brace, once reached
	failed bool
}

// next returns the next member, key as raw string contents (without quotes, escapes kept) and
// val as the raw value. It returns ok=false at the end of the object or on a syntax error.
func (it *objectIter) next() (key, val []byte, ok bool) {
	if it.failed || it.end > 0 {
		return nil, nil, false
	}
	b := it.b
	i := skipSpace(b, it.i)
	if i < len(b) && b[i] == '}' {
		it.end = i + 1
		if it.top && skipSpace(b, it.end) != len(b) {
			it.failed = true
		}
		return nil, nil, false
	}
	if it.n > 0 {
		if i >= len(b) || b[i] != ',' {
			it.failed = true
			return nil, nil, false
		}
		i = skipSpace(b, i+1)
	}
	ke := skipString(b, i)
	if ke < 0 {
		it.failed = true
		return nil, nil, false
	}
	key = b[i+1 : ke-1]
	i = skipSpace(b, ke)
	if i >= len(b) || b[i] != ':' {
		it.failed = true
		return nil, nil, false
	}
	i = skipSpace(b, i+1)
	ve := skipValue(b, i, it.depth+1)
	if ve < 0 {
		it.failed = true
		return nil, nil, false
	}
	it.i = ve
	it.n++
	return key, b[i:ve], true
}

// ok reports whether the whole object was read without a syntax error.
func (it *objectIter) ok() bool {
	for !it.failed && it.end == 0 {
		it.next()
	}
	return !it.failed
}

// arrayIter iterates over the elements of an array. It reads b from i, which is just after the
// opening bracket.
type arrayIter struct {
	b      []byte
	i      int
	depth  int
	n      int
	end    int
	failed bool
}

func (it *arrayIter) next() (val []byte, ok bool) {
	if it.failed || it.end > 0 {
		return nil, false
	}
	b := it.b
	i := skipSpace(b, it.i)
	if i < len(b) && b[i] == ']' {
		it.end = i + 1
		return nil, false
	}
	if it.n > 0 {
		if i >= len(b) || b[i] != ',' {
			it.failed = true
			return nil, false
		}
		i = skipSpace(b, i+1)
	}
	ve := skipValue(b, i, it.depth+1)
	if ve < 0 {
		it.failed = true
		return nil, false
	}
	it.i = ve
	it.n++
	return b[i:ve], true
}

// objectOf returns an iterator over the members of the raw object value v. If v is not an
// object, the iterator yields nothing.
func objectOf(v []byte) objectIter {
	if len(v) < 2 || v[0] != '{' {
		return objectIter{failed: true}
	}
	return objectIter{b: v, i: 1}
}

// arrayOf returns an iterator over the elements of the raw array value v.
func arrayOf(v []byte) arrayIter {
	if len(v) < 2 || v[0] != '[' {
		return arrayIter{failed: true}
	}
	return arrayIter{b: v, i: 1}
}

// skipValue returns the index just past the JSON value that starts at b[i], or -1 when there
// is no valid value there.
func skipValue(b []byte, i, depth int) int {
	if i >= len(b) {
		return -1
	}
	switch c := b[i]; c {
	case '{':
		if depth >= maxDepth {
			return -1
		}
		it := objectIter{b: b, i: i + 1, depth: depth}
		for _, _, ok := it.next(); ok; _, _, ok = it.next() {
		}
		if it.failed {
			return -1
		}
		return it.end
	case '[':
		if depth >= maxDepth {
			return -1
		}
		it := arrayIter{b: b, i: i + 1, depth: depth}
		for _, ok := it.next(); ok; _, ok = it.next() {
		}
		if it.failed {
			return -1
		}
		return it.end
	case '"':
		return skipString(b, i)
	case 't':
		return skipLiteral(b, i, "true")
	case 'f':
		return skipLiteral(b, i, "false")
	case 'n':
		return skipLiteral(b, i, "null")
	default:
		if c == '-' || c >= '0' && c <= '9' {
			return skipNumber(b, i)
		}
		return -1
	}
}

func skipLiteral(b []byte, i int, lit string) int {
	if len(b)-i < len(lit) || string(b[i:i+len(lit)]) != lit {
		return -1
	}
	return i + len(lit)
}

// skipNumber follows the JSON number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func skipNumber(b []byte, i int) int {
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		i = skipDigits(b, i)
	default:
		return -1
	}
	if i < len(b) && b[i] == '.' {
		j := skipDigits(b, i+1)
		if j == i+1 {
			return -1
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := skipDigits(b, i)
		if j == i {
			return -1
		}
		i = j
	}
	return i
}

func skipDigits(b []byte, i int) int {
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		i++
	}
	return i
}

// skipString returns the index just past the string literal that starts at b[i], or -1.
func skipString(b []byte, i int) int {
	if i >= len(b) || b[i] != '"' {
		return -1
	}
	for i++; i < len(b); i++ {
		for i < len(b) && plain[b[i]] {
			i++
		}
		if i >= len(b) {
			break
		}
		switch c := b[i]; {
		case c == '"':
			return i + 1
		case c < 0x20:
			return -1
		}
		// c is a backslash.
		i++
		if i >= len(b) {
			return -1
		}
		switch b[i] {
		case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
		case 'u':
			if _, ok := hex4(b, i+1); !ok {
				return -1
			}
			i += 4
		default:
			return -1
		}
	}
	return -1
}

// plain tells the bytes that stand for themselves inside a JSON string.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// hex4 reads the four hex digits of a \u escape at b[i:].
func hex4(b []byte, i int) (rune, bool) {
	if len(b)-i < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[i : i+4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	return r, true
}

// textLen returns the number of bytes of text the raw string value v decodes to (as UTF-8,
// the way encoding/json decodes it), or 0 when v is not a string.
func textLen(v []byte) int64 {
	if len(v) < 2 || v[0] != '"' {
		return 0
	}
	var n int64
	s := v[1 : len(v)-1]
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			n++
			continue
		}
		i++
		if i >= len(s) || s[i] != 'u' {
			n++
			continue
		}
		r, _ := hex4(s, i+1)
		i += 4
		if r >= 0xD800 && r < 0xDC00 && i+6 < len(s) && s[i+1] == '\\' && s[i+2] == 'u' {
			if lo, ok := hex4(s, i+3); ok && lo >= 0xDC00 && lo < 0xE000 {
				n += 4
				i += 6
				continue
			}
		}
		if r >= 0xD800 && r < 0xE000 {
			r = utf8.RuneError
		}
		n += int64(utf8.RuneLen(r))
	}
	return n
}

// keyIs reports whether the raw key (string contents as they appear in the text) equals name.
func keyIs(key []byte, name string) bool {
	if string(key) == name {
		return true
	}
	// An escape is longer than what it stands for.
	if len(key) <= len(name) || bytes.IndexByte(key, '\\') < 0 {
		return false
	}
	// Escaped keys are rare: decode them the way encoding/json does.
	q := make([]byte, 0, len(key)+2)
	q = append(append(append(q, '"'), key...), '"')
	var s string
	return json.Unmarshal(q, &s) == nil && s == name
}
