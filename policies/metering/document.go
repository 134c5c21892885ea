package metering

// DocumentMeter reads the usage of one JSON document (a non-streaming answer) that is too
// large to hold, as its bytes pass: it follows the document's structure byte by byte and keeps
// only the values of the top-level members that carry usage ("usage", "prompt_eval_count",
// "eval_count"), which OpenAI and Ollama put last. Feed it every read with Write; Usage reads
// the result. The zero value is ready.
type DocumentMeter struct {
	// Dialect is how the kept usage is read (the zero value: OpenAI's and Ollama's).
	Dialect Dialect

	depth    int
	inString bool
	escape   bool
	broken   bool // not one JSON object (or a usage value beyond maxUsageValue)
	closed   bool // the top-level object was closed

	// At depth 1: the key being read or just read, and whether the next value is kept.
	wantKey  bool
	key      []byte
	keyLong  bool
	afterKey bool // the key ended; waiting for ':' and the value
	capture  int  // index into values of the value being kept, or -1
	values   [len(documentUsageKeys)][]byte
	started  bool
}

// maxUsageValue bounds a kept usage value; a longer one is not believed.
const maxUsageValue = 4 << 10

// documentUsageKeys are the top-level members kept: the usage, and what tells an OpenAI
// Responses object (its "object" and "id", see responses.go).
var documentUsageKeys = [5]string{"usage", "prompt_eval_count", "eval_count", "object", "id"}

// Write meters p.
func (d *DocumentMeter) Write(p []byte) {
	if !d.started {
		d.started, d.capture = true, -1
	}
	for _, c := range p {
		if d.broken {
			return
		}
		d.step(c)
	}
}

func (d *DocumentMeter) step(c byte) {
	if d.capture >= 0 {
		// A kept value ends at depth 1, at the ',' or '}' after it (outside strings).
		if !d.inString && d.depth == 1 && (c == ',' || c == '}') {
			d.capture = -1
		} else {
			v := &d.values[d.capture]
			if len(*v) >= maxUsageValue {
				d.broken = true
				return
			}
			*v = append(*v, c)
		}
	}
	if d.inString {
		closing := !d.escape && c == '"'
		switch {
		case d.escape:
			d.escape = false
		case c == '\\':
			d.escape = true
		}
		if closing {
			d.inString = false
			if d.depth == 1 && d.wantKey {
				d.wantKey, d.afterKey = false, true
			}
			return
		}
		if d.depth == 1 && d.wantKey {
			if len(d.key) < 32 {
				d.key = append(d.key, c) // raw contents, escapes kept (keyIs decodes them)
			} else {
				d.keyLong = true
			}
		}
		return
	}
	switch c {
	case ' ', '\t', '\n', '\r':
		return
	case '"':
		d.inString = true
		if d.depth == 1 && d.wantKey {
			d.key, d.keyLong = d.key[:0], false
		}
	case '{', '[':
		if d.closed {
			d.broken = true
			return
		}
		d.depth++
		if d.depth == 1 {
			if c != '{' {
				d.broken = true
				return
			}
			d.wantKey = true
		}
	case '}', ']':
		d.depth--
		if d.depth < 0 {
			d.broken = true
			return
		}
		if d.depth == 0 {
			d.closed = true
		}
	case ',':
		if d.depth == 1 {
			d.wantKey = true
		}
	case ':':
		if d.depth == 1 && d.afterKey {
			d.afterKey = false
			if !d.keyLong {
				for i, k := range documentUsageKeys {
					if keyIs(d.key, k) {
						d.values[i] = d.values[i][:0]
						d.capture = i
					}
				}
			}
		}
	default:
		if d.depth == 0 {
			d.broken = true
		}
	}
}

// Usage returns the document's usage, read as UsageFromJSON reads it, and whether the
// document was complete with a usage in it.
func (d *DocumentMeter) Usage() (Usage, bool) {
	if d.broken || !d.closed || d.inString {
		return Usage{}, false
	}
	doc := []byte{'{'}
	for i, k := range documentUsageKeys {
		if len(d.values[i]) == 0 {
			continue
		}
		if len(doc) > 1 {
			doc = append(doc, ',')
		}
		doc = append(append(append(append(doc, '"'), k...), `":`...), d.values[i]...)
	}
	return d.Dialect.UsageFromJSON(append(doc, '}'))
}
