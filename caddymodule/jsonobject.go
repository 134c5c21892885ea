package caddymodule

import (
	"encoding/json"
)

// objectMembers splits a JSON object into its members as json.Unmarshal into a
// map[string]json.RawMessage does, in one pass and without its reflection: names are
// unescaped, a name sent twice keeps its last value, and whatever json.Unmarshal refuses there
// (invalid JSON, trailing data, nesting deeper than its 10,000 levels, a value that is not an
// object, null) is refused. The values are slices of data, not copies. FuzzObjectMembers holds
// it to json.Unmarshal on every input.
func objectMembers(data []byte) (map[string]json.RawMessage, bool) {
	s := objectScanner{data: data, members: make(map[string]json.RawMessage, 8)}
	s.space()
	if s.i >= len(data) || data[s.i] != '{' || !s.container('{', 1) || !s.end() {
		return nil, false
	}
	return s.members, true
}

// maxJSONDepth is encoding/json's bound on nesting: an object or array inside 10,000 others
// is refused.
const maxJSONDepth = 10000

// objectScanner reads JSON from data at i.
type objectScanner struct {
	data []byte
	i    int
	// members, when not nil, gets the members of the outermost object (depth 1).
	members map[string]json.RawMessage
}

// space skips JSON's whitespace.
func (s *objectScanner) space() {
	for s.i < len(s.data) {
		switch s.data[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// next consumes c if it is the next byte.
func (s *objectScanner) next(c byte) bool {
	if s.i < len(s.data) && s.data[s.i] == c {
		s.i++
		return true
	}
	return false
}

// end reports whether only whitespace is left.
func (s *objectScanner) end() bool {
	s.space()
	return s.i == len(s.data)
}

// value reads one JSON value at nesting depth (the outermost object is 1).
func (s *objectScanner) value(depth int) bool {
	if s.i >= len(s.data) {
		return false
	}
	switch c := s.data[s.i]; {
	case c == '"':
		_, ok := s.string()
		return ok
	case c == '{' || c == '[':
		if depth > maxJSONDepth {
			return false
		}
		return s.container(c, depth)
	case c == '-' || ('0' <= c && c <= '9'):
		return s.number()
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	}
	return false
}

// container reads an object or an array (open is its first byte) at depth.
func (s *objectScanner) container(open byte, depth int) bool {
	s.i++
	closing := byte(']')
	if open == '{' {
		closing = '}'
	}
	s.space()
	if s.next(closing) {
		return true
	}
	for {
		s.space()
		var name []byte
		var plain bool
		if open == '{' {
			start := s.i
			var ok bool
			if plain, ok = s.string(); !ok {
				return false
			}
			name = s.data[start:s.i]
			s.space()
			if !s.next(':') {
				return false
			}
			s.space()
		}
		start := s.i
		if !s.value(depth + 1) {
			return false
		}
		if open == '{' && depth == 1 && s.members != nil {
			n, ok := memberName(name, plain)
			if !ok {
				return false
			}
			s.members[n] = s.data[start:s.i:s.i]
		}
		s.space()
		if s.next(closing) {
			return true
		}
		if !s.next(',') {
			return false
		}
	}
}

// string reads a JSON string; plain reports that it has no escape and only ASCII, so that its
// bytes between the quotes are its value.
func (s *objectScanner) string() (plain, ok bool) {
	if !s.next('"') {
		return false, false
	}
	plain = true
	for s.i < len(s.data) {
		c := s.data[s.i]
		s.i++
		switch {
		case c == '"':
			return plain, true
		case c == '\\':
			plain = false
			if s.i >= len(s.data) {
				return false, false
			}
			e := s.data[s.i]
			s.i++
			switch e {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if s.i+4 > len(s.data) {
					return false, false
				}
				for _, h := range s.data[s.i : s.i+4] {
					if !isHex(h) {
						return false, false
					}
				}
				s.i += 4
			default:
				return false, false
			}
		case c < 0x20:
			return false, false
		case c >= 0x80:
			plain = false
		}
	}
	return false, false
}

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

// number reads a JSON number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *objectScanner) number() bool {
	s.next('-')
	if s.next('0') {
		// no more integer digits
	} else if !s.digits() {
		return false
	}
	if s.next('.') && !s.digits() {
		return false
	}
	if s.next('e') || s.next('E') {
		if !s.next('+') {
			s.next('-')
		}
		if !s.digits() {
			return false
		}
	}
	return true
}

// digits reads one or more decimal digits.
func (s *objectScanner) digits() bool {
	start := s.i
	for s.i < len(s.data) && '0' <= s.data[s.i] && s.data[s.i] <= '9' {
		s.i++
	}
	return s.i > start
}

// literal reads word (true, false or null).
func (s *objectScanner) literal(word string) bool {
	if len(s.data)-s.i < len(word) || string(s.data[s.i:s.i+len(word)]) != word {
		return false
	}
	s.i += len(word)
	return true
}

// memberName is the name a JSON string (quoted, valid) stands for: its bytes when plain, else
// what encoding/json makes of it (escapes, surrogate pairs, invalid UTF-8 as U+FFFD).
func memberName(quoted []byte, plain bool) (string, bool) {
	if plain {
		return string(quoted[1 : len(quoted)-1]), true
	}
	var name string
	if err := json.Unmarshal(quoted, &name); err != nil {
		return "", false
	}
	return name, true
}

// stringValue is the string a JSON value is, as json.Unmarshal into a string reads it; not a
// string (null included), false.
func stringValue(raw json.RawMessage) (string, bool) {
	s := objectScanner{data: raw}
	s.space()
	start := s.i
	plain, ok := s.string()
	if !ok {
		return "", false
	}
	end := s.i
	if !s.end() {
		return "", false
	}
	return memberName(raw[start:end], plain)
}

// boolValue is the boolean a JSON value is, as json.Unmarshal into a bool reads it; not a
// boolean (null included), false.
func boolValue(raw json.RawMessage) (v, ok bool) {
	s := objectScanner{data: raw}
	s.space()
	switch {
	case s.literal("true"):
		v = true
	case !s.literal("false"):
		return false, false
	}
	return v, s.end()
}
