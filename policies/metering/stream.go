package metering

import (
	"bytes"
	"encoding/json"
	"io"
)

// MaxMessage bounds the size of one SSE event or NDJSON line that a StreamMeter parses. A
// longer one is written on as it comes, unparsed (its bytes counted as generated text), and the
// meter holds at most this many bytes.
const MaxMessage = 1 << 20

// Produced is what a stream has generated so far, counted whether or not the backend reports
// usage, so that a stream that ends without usage can still be charged for what it produced.
type Produced struct {
	// Chunks is the number of messages that carried generated text.
	Chunks int64
	// ContentBytes is the number of bytes of generated text, decoded from JSON: message
	// content (SSE delta.content or a legacy completion's text, Ollama message.content or
	// response), reasoning text (reasoning_content, reasoning, thinking) and tool call
	// arguments.
	ContentBytes int64
}

// StreamMeter meters a streaming response on its way to the client. Feed it every upstream read
// with Write, then call Flush at the end of the stream; it writes the stream on to dst, the
// same bytes in the same order, except for the message that carries the final usage:
// OnUsage's fields are appended to it, or it is dropped (see HideUsage).
//
// Whatever the split of the stream into Writes, the output and the metering are the same.
// Malformed messages are written on unchanged and count for nothing. Messages longer than
// MaxMessage are written on unparsed.
//
// For SSE, events end with a blank line (LF, CRLF or CR line ends); the data lines of an
// event are joined with a newline and read as one chunk; "data: [DONE]" is the terminal
// message. The usage is the "usage" object of a chunk; it is final on a chunk whose choices are
// empty or all have a finish_reason (some servers put usage on the last content chunk).
//
// For NDJSON, every line is one JSON object (a CR before the LF is tolerated); the object with
// "done":true is the terminal message, and its prompt_eval_count and eval_count are the usage.
//
// A StreamMeter is for one stream and one goroutine; the zero value with Format set is ready.
// Formats other than SSE and NDJSON are written on unmetered.
type StreamMeter struct {
	// Format is SSE or NDJSON.
	Format Format
	// Dialect is how the stream's messages are read (the zero value: OpenAI's chunks and
	// Ollama's lines; DialectAnthropic: Messages events, anthropic.go).
	Dialect Dialect

	// HideUsage drops the SSE usage-only chunk (the one with "usage" set and empty "choices"),
	// including the blank line that ends it, because the client did not ask for it (the gateway
	// set stream_options.include_usage itself). A usage on a chunk with content is never
	// dropped. Only for SSE.
	HideUsage bool

	// OnUsage, if set, is called at most once, synchronously, when the final usage message is
	// seen, before that message is written on. It returns raw JSON members to append to that
	// message (e.g. `"credits_charged":0.12,"credits_remaining":3`), or nil. When HideUsage
	// drops the message, the fields are ignored.
	OnUsage func(Usage) []byte

	// KeepText keeps the generated text of an SSE stream (up to MaxKeptText bytes) so that
	// ProducedTokens can count it with a real tokenizer when the stream ends without usage.
	KeepText bool

	buf      []byte // the held-back start of an incomplete message
	skipping bool   // the current message is longer than the limit and passes unparsed
	lineText bool   // SSE: the current line has some bytes
	cr       bool   // SSE: the last byte was a CR line end, which absorbs a following LF
	crBlank  bool   // SSE: that CR ended a blank line, so the event ends with it (and its LF)
	joined   []byte // SSE: reused buffer for the data lines of an event joined together
	limit    int    // MaxMessage; tests lower it

	usage    Usage
	hasUsage bool
	final    bool // the final usage was seen (OnUsage called)
	done     bool
	produced Produced
	// anthropic: what a DialectAnthropic stream reported so far.
	anthropic anthropicStream
	text      []byte // KeepText: the generated text as raw JSON string contents (escapes kept)
	kept      int64  // the decoded bytes of text

	responseID string // a Responses stream's response id (responses.go)
}

// MaxKeptText bounds the generated text a StreamMeter keeps for KeepText; what comes after is
// counted by the estimate.
const MaxKeptText = 1 << 20

// Write feeds the upstream bytes p to the meter. It writes every message that p completes to
// dst, holding back only an incomplete trailing one. Write always meters all of p: when dst
// fails, it returns the first error after metering the rest, so the caller can go on metering
// the stream into io.Discard when the client has gone away.
func (m *StreamMeter) Write(dst io.Writer, p []byte) error {
	w := sink{dst: dst}
	if m.Format != SSE && m.Format != NDJSON {
		w.write(p)
		return w.err
	}
	limit := m.limit
	if limit <= 0 {
		limit = MaxMessage
	}
	for len(p) > 0 {
		n, ended := m.boundary(p)
		switch {
		case m.skipping:
			w.write(p[:n])
			m.produced.ContentBytes += int64(n)
			m.skipping = !ended
		case len(m.buf)+n > limit:
			// Too long to parse: passed on, and its bytes counted as generated text, so that
			// a stream of huge messages without usage is not free.
			w.write(m.buf)
			w.write(p[:n])
			m.produced.Chunks++
			m.produced.ContentBytes += int64(len(m.buf) + n)
			m.buf = m.buf[:0]
			m.skipping = !ended
		case !ended:
			m.buf = append(m.buf, p[:n]...)
		case len(m.buf) == 0:
			m.message(&w, p[:n])
		default:
			m.buf = append(m.buf, p[:n]...)
			m.message(&w, m.buf)
			m.buf = m.buf[:0]
		}
		p = p[n:]
	}
	if len(m.buf) == 0 && cap(m.buf) > 64<<10 {
		m.buf = nil // do not keep a long message's memory for the rest of the stream
	}
	if cap(m.joined) > 64<<10 {
		m.joined = nil
	}
	return w.err
}

// Flush ends the stream: it meters and writes on the held-back bytes as the last message, as if
// it were complete, so that a final line or event without its line end still counts.
func (m *StreamMeter) Flush(dst io.Writer) error {
	w := sink{dst: dst}
	if len(m.buf) > 0 {
		m.message(&w, m.buf)
	}
	m.buf = nil
	m.skipping, m.lineText, m.cr, m.crBlank = false, false, false, false
	return w.err
}

// Usage returns the usage the stream reported, and whether it reported one. Before the final
// usage message it is the latest running usage, if the backend sends one on every chunk.
func (m *StreamMeter) Usage() (Usage, bool) {
	if m.Dialect == DialectAnthropic {
		return m.anthropicUsage()
	}
	return m.usage, m.hasUsage
}

// Produced returns what the stream has generated so far.
func (m *StreamMeter) Produced() Produced { return m.produced }

// Done reports whether the terminal message was seen: SSE "data: [DONE]", or the NDJSON object
// with "done":true.
func (m *StreamMeter) Done() bool { return m.done }

// boundary scans p for the end of the current message. It returns the length of the prefix of
// p that belongs to the current message and whether that prefix completes it.
func (m *StreamMeter) boundary(p []byte) (int, bool) {
	if m.Format == NDJSON {
		if i := bytes.IndexByte(p, '\n'); i >= 0 {
			return i + 1, true
		}
		return len(p), false
	}
	i := 0
	if m.cr {
		m.cr = false
		if p[0] == '\n' {
			i = 1
		}
		if m.crBlank {
			m.crBlank = false
			return i, true
		}
	}
	for i < len(p) {
		switch p[i] {
		case '\n':
			i++
		case '\r':
			i++
			if i == len(p) {
				m.cr, m.crBlank = true, !m.lineText
				m.lineText = false
				return i, false
			}
			if p[i] == '\n' {
				i++
			}
		default:
			m.lineText = true
			j := lineEnd(p[i:])
			if j < 0 {
				return len(p), false
			}
			i += j
			continue
		}
		if !m.lineText {
			return i, true
		}
		m.lineText = false
	}
	return len(p), false
}

// lineEnd returns the index of the first CR or LF in b, or -1. It looks through windows that
// double in size, so that its cost stays proportional to the distance it finds, even when one
// of the two bytes is far away or absent.
func lineEnd(b []byte) int {
	for start, size := 0, 64; start < len(b); start, size = start+size, size*2 {
		w := b[start:min(len(b), start+size)]
		lf := bytes.IndexByte(w, '\n')
		if lf >= 0 {
			w = w[:lf]
		}
		if cr := bytes.IndexByte(w, '\r'); cr >= 0 {
			return start + cr
		}
		if lf >= 0 {
			return start + lf
		}
	}
	return -1
}

// message meters one complete message and writes it on, rewritten or dropped as needed.
func (m *StreamMeter) message(w *sink, msg []byte) {
	if m.Format == NDJSON {
		m.line(w, msg)
	} else {
		m.event(w, msg)
	}
}

// event meters one SSE event.
func (m *StreamMeter) event(w *sink, ev []byte) {
	var data []byte
	ndata := 0
	closing := -1 // index in ev of the last non-space byte of the data
	for i := 0; i < len(ev); {
		start := i
		line, next := nextLine(ev, i)
		i = next
		if len(line) == 0 || line[0] == ':' {
			continue
		}
		name, value := line, line[len(line):]
		valueAt := start + len(line)
		if c := bytes.IndexByte(line, ':'); c >= 0 {
			name, value, valueAt = line[:c], line[c+1:], start+c+1
			if len(value) > 0 && value[0] == ' ' {
				value, valueAt = value[1:], valueAt+1
			}
		}
		if string(name) != "data" {
			continue
		}
		switch ndata {
		case 0:
			data = value
		case 1:
			m.joined = append(append(append(m.joined[:0], data...), '\n'), value...)
			data = m.joined
		default:
			m.joined = append(append(m.joined, '\n'), value...)
			data = m.joined
		}
		ndata++
		if j := lastNonSpace(value); j >= 0 {
			closing = valueAt + j
		}
	}
	if ndata == 0 {
		w.write(ev)
		return
	}
	if string(bytes.TrimSpace(data)) == "[DONE]" {
		m.done = true
		w.write(ev)
		return
	}

	if m.Dialect == DialectAnthropic {
		m.anthropicEvent(w, ev, data, closing)
		return
	}
	var c chunk
	if m.KeepText && len(m.text) < MaxKeptText {
		c.keep = &m.text
	}
	c.read(data)
	m.kept += c.kept
	if !c.valid {
		w.write(ev)
		return
	}
	if isResponsesEvent(c.typ) {
		m.responsesEvent(w, ev, closing, &c)
		return
	}
	m.count(c.text)
	if !isObject(c.usage) {
		w.write(ev)
		return
	}
	usageOnly := c.choices == 0
	u, ok := openAIUsage(c.usage)
	fields := m.report(u, ok, usageOnly || c.finished == c.choices)
	switch {
	case m.HideUsage && usageOnly:
	case fields != nil:
		w.write(insertFields(ev, closing, c.members == 0, fields))
	default:
		w.write(ev)
	}
}

// line meters one NDJSON line.
func (m *StreamMeter) line(w *sink, ln []byte) {
	var text int64
	var done bool
	var prompt, eval []byte
	it := topObject(ln)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "done"):
			done = string(v) == "true"
		case keyIs(k, "message"):
			text += messageText(v, nil)
		case keyIs(k, "response"), keyIs(k, "thinking"):
			text += textLen(v)
		case keyIs(k, "prompt_eval_count"):
			prompt = v
		case keyIs(k, "eval_count"):
			eval = v
		}
	}
	if !it.ok() {
		w.write(ln)
		return
	}
	m.count(text)
	if !done {
		w.write(ln)
		return
	}
	m.done = true
	u, ok := ollamaUsage(prompt, eval)
	if fields := m.report(u, ok, true); fields != nil {
		w.write(insertFields(ln, lastNonSpace(ln), it.n == 0, fields))
		return
	}
	w.write(ln)
}

// count adds one message's generated text to what the stream produced.
func (m *StreamMeter) count(text int64) {
	if text > 0 {
		m.produced.Chunks++
		m.produced.ContentBytes += text
	}
}

// report records a usage read from a message, final or running, and returns the fields to
// append to that message.
func (m *StreamMeter) report(u Usage, ok, final bool) []byte {
	if !ok || m.final {
		return nil
	}
	m.usage, m.hasUsage = u, true
	if !final {
		return nil
	}
	m.final = true
	if m.OnUsage == nil {
		return nil
	}
	return m.OnUsage(u)
}

// nextLine returns the line of b that starts at i, without its line end, and the index of the
// next line. Lines end with CRLF, LF or CR.
func nextLine(b []byte, i int) ([]byte, int) {
	j := lineEnd(b[i:])
	if j < 0 {
		return b[i:], len(b)
	}
	end := i + j
	next := end + 1
	if b[end] == '\r' && next < len(b) && b[next] == '\n' {
		next++
	}
	return b[i:end], next
}

// chunk is what the meter reads out of one OpenAI chat completion chunk.
type chunk struct {
	valid    bool    // one valid JSON object
	members  int     // members of the object
	choices  int     // elements of "choices"
	finished int     // choices with a finish_reason
	text     int64   // bytes of generated text in the choices' deltas
	usage    []byte  // the raw "usage" value
	keep     *[]byte // when set, the generated text's raw string contents are appended to it
	kept     int64   // the decoded bytes appended to keep

	// An OpenAI Responses event's raw "type", "response" and "delta" (responses.go).
	typ, response, delta []byte
}

func (c *chunk) read(data []byte) {
	it := topObject(data)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "choices"):
			c.choices, c.finished, c.text = 0, 0, 0
			ch := arrayOf(v)
			for e, ok := ch.next(); ok; e, ok = ch.next() {
				c.choices++
				ci := objectOf(e)
				for k, v, ok := ci.next(); ok; k, v, ok = ci.next() {
					switch {
					case keyIs(k, "delta"), keyIs(k, "message"):
						n := messageText(v, c.keep)
						c.text += n
						if c.keep != nil {
							c.kept += n
						}
					case keyIs(k, "text") && len(v) > 0 && v[0] == '"':
						// A legacy completion's choice: its text.
						n := textLen(v)
						keepString(c.keep, v)
						c.text += n
						if c.keep != nil {
							c.kept += n
						}
					case keyIs(k, "finish_reason"):
						if !isAbsent(v) {
							c.finished++
						}
					}
				}
			}
		case keyIs(k, "usage"):
			c.usage = v
		case keyIs(k, "type"):
			c.typ = v
		case keyIs(k, "response"):
			c.response = v
		case keyIs(k, "delta"):
			c.delta = v
		}
	}
	c.valid = it.ok()
	c.members = it.n
}

// messageText returns the bytes of generated text in an OpenAI delta or message, or an Ollama
// message: its content, reasoning and tool call arguments. When keep is not nil, the raw
// contents of those strings are appended to it.
func messageText(v []byte, keep *[]byte) int64 {
	var n int64
	it := objectOf(v)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "content"), keyIs(k, "reasoning_content"), keyIs(k, "reasoning"), keyIs(k, "thinking"):
			n += textLen(v)
			keepString(keep, v)
		case keyIs(k, "tool_calls"):
			calls := arrayOf(v)
			for call, ok := calls.next(); ok; call, ok = calls.next() {
				ci := objectOf(call)
				for k, v, ok := ci.next(); ok; k, v, ok = ci.next() {
					if !keyIs(k, "function") {
						continue
					}
					fi := objectOf(v)
					for k, v, ok := fi.next(); ok; k, v, ok = fi.next() {
						if !keyIs(k, "arguments") {
							continue
						}
						if v[0] == '"' {
							n += textLen(v) // OpenAI: a JSON string
							keepString(keep, v)
						} else if !isAbsent(v) {
							n += int64(len(v)) // Ollama: a JSON object
						}
					}
				}
			}
		}
	}
	return n
}

// keepString appends the contents of the raw JSON string v (escapes kept) to keep.
func keepString(keep *[]byte, v []byte) {
	if keep != nil && len(v) >= 2 && v[0] == '"' {
		*keep = append(*keep, v[1:len(v)-1]...)
	}
}

// Text returns the generated text kept with KeepText, decoded.
func (m *StreamMeter) Text() []byte {
	if len(m.text) == 0 {
		return nil
	}
	q := make([]byte, 0, len(m.text)+2)
	q = append(append(append(q, '"'), m.text...), '"')
	var s string
	if json.Unmarshal(q, &s) != nil {
		return m.text // cannot happen: pieces of valid strings make a valid string
	}
	return []byte(s)
}

// ProducedTokens counts the tokens the stream generated so far, for a stream that ended
// without usage: the kept text with the family's tokenizer (FamilyOpenAI with KeepText), the
// rest by the estimate.
func (m *StreamMeter) ProducedTokens(f Family) int64 {
	p := m.produced
	if f != FamilyOpenAI || !m.KeepText || m.kept == 0 {
		return EstimateTokens(p.ContentBytes, p.Chunks)
	}
	return CountTokens(f, m.Text(), 0) + EstimateTokens(p.ContentBytes-m.kept, 0)
}

// sink writes to dst until the first error, which it keeps.
type sink struct {
	dst io.Writer
	err error
}

func (s *sink) write(b []byte) {
	if s.err != nil || len(b) == 0 {
		return
	}
	_, s.err = s.dst.Write(b)
}
