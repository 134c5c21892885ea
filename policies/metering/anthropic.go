package metering

// Anthropic Messages (DialectAnthropic).
//
// A JSON answer carries "usage": {"input_tokens", "output_tokens",
// "cache_creation_input_tokens", "cache_read_input_tokens"}. Anthropic's input_tokens are
// the uncached prompt tokens only: the prompt is the sum of the three input counts (Usage's
// convention: InputTokens counts every prompt token).
//
// A stream is SSE events whose data has a "type":
//
//   - message_start: message.usage, the input counts (and a first output count);
//   - content_block_delta: the generated text, counted as produced (delta.text of a
//     text_delta, delta.thinking of a thinking_delta, delta.partial_json of an
//     input_json_delta);
//   - message_delta: usage, cumulative: each count it carries replaces the one before
//     (output_tokens always, the input counts on newer servers);
//   - message_stop: the end; the usage read so far is final, and OnUsage's fields are
//     appended to this event's data.
//
// A stream cut before message_stop is settled by the stated rule: the input counts of
// message_start (and of a message_delta, if one came), and as output the larger of the last
// reported output_tokens and the produced text counted by the estimate (EstimateTokens), so
// that a stream cut after message_start, whose output count is a placeholder, is not free.

// anthropicCounts are the counts of an Anthropic usage object, each kept when present.
type anthropicCounts struct {
	in, cacheWrite, cacheRead, out int64
	// hasIn: input_tokens was present (required of a whole answer's usage).
	hasIn bool
	// tools are the server tool calls (server_tool_use).
	tools ToolCalls
}

// read merges the counts present in the usage object v into c; it returns false when v is
// not an object or a count is not a valid token count.
func (c *anthropicCounts) read(v []byte) bool {
	if !isObject(v) {
		return false
	}
	it := objectOf(v)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		var dst *int64
		switch {
		case keyIs(k, "input_tokens"):
			dst = &c.in
		case keyIs(k, "output_tokens"):
			dst = &c.out
		case keyIs(k, "cache_creation_input_tokens"):
			dst = &c.cacheWrite
		case keyIs(k, "cache_read_input_tokens"):
			dst = &c.cacheRead
		case keyIs(k, "server_tool_use"):
			if !anthropicServerTools(v, &c.tools) {
				return false
			}
			continue
		default:
			continue
		}
		if isAbsent(v) {
			continue
		}
		n, ok := tokenCount(v)
		if !ok {
			return false
		}
		*dst = n
		if dst == &c.in {
			c.hasIn = true
		}
	}
	return it.ok()
}

// usage is the counts as a Usage: the prompt is all three input counts, the cache reads and
// writes its parts.
func (c *anthropicCounts) usage() (Usage, bool) {
	in := c.in + c.cacheWrite + c.cacheRead
	if in > MaxTokens {
		return Usage{}, false
	}
	return Usage{InputTokens: in, OutputTokens: c.out, CachedInputTokens: c.cacheRead, CacheWriteTokens: c.cacheWrite,
		ToolCalls: c.tools}, true
}

// anthropicUsageFromJSON reads the usage of a whole Messages answer (input_tokens required).
func anthropicUsageFromJSON(body []byte) (Usage, bool) {
	var usage []byte
	it := topObject(body)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		if keyIs(k, "usage") {
			usage = v
		}
	}
	if !it.ok() || !isObject(usage) {
		return Usage{}, false
	}
	var c anthropicCounts
	if !c.read(usage) || !c.hasIn {
		return Usage{}, false
	}
	return c.usage()
}

// anthropicStream is what a StreamMeter keeps of a Messages stream.
type anthropicStream struct {
	counts  anthropicCounts
	started bool // a usage was read (message_start or message_delta)
	bad     bool // a usage could not be read: the stream reports none
}

// anthropicEvent meters one SSE event of a Messages stream whose joined data is data
// (closing: the index in ev of the data's last non-space byte).
func (m *StreamMeter) anthropicEvent(w *sink, ev, data []byte, closing int) {
	var typ, message, delta, usage []byte
	it := topObject(data)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "type"):
			typ = v
		case keyIs(k, "message"):
			message = v
		case keyIs(k, "delta"):
			delta = v
		case keyIs(k, "usage"):
			usage = v
		}
	}
	if !it.ok() {
		w.write(ev)
		return
	}
	if len(typ) >= 2 && typ[0] == '"' {
		typ = typ[1 : len(typ)-1] // a string's contents, as keyIs reads them
	}
	a := &m.anthropic
	switch {
	case keyIs(typ, "message_start"):
		mi := objectOf(message)
		for k, v, ok := mi.next(); ok; k, v, ok = mi.next() {
			if keyIs(k, "usage") {
				a.readUsage(v)
			}
		}
	case keyIs(typ, "content_block_delta"):
		var text int64
		di := objectOf(delta)
		for k, v, ok := di.next(); ok; k, v, ok = di.next() {
			if keyIs(k, "text") || keyIs(k, "thinking") || keyIs(k, "partial_json") {
				text += textLen(v)
			}
		}
		m.count(text)
	case keyIs(typ, "message_delta"):
		if usage != nil {
			a.readUsage(usage)
		}
	case keyIs(typ, "message_stop"):
		m.done = true
		if a.started && !a.bad {
			u, ok := a.counts.usage()
			if fields := m.report(u, ok, true); fields != nil {
				w.write(insertFields(ev, closing, it.n == 0, fields))
				return
			}
		}
	}
	if a.started && !a.bad && !m.final {
		m.usage, m.hasUsage = a.counts.usage()
	}
	w.write(ev)
}

// readUsage merges a usage object of the stream; one that cannot be read spoils the stream's
// usage (it is then settled as a stream without usage).
func (a *anthropicStream) readUsage(v []byte) {
	if !a.counts.read(v) {
		a.bad = true
		return
	}
	a.started = true
}

// anthropicUsage is the usage of a Messages stream so far: the reported one once
// message_stop came, else the stated rule for a cut stream (the output at least what was
// produced).
func (m *StreamMeter) anthropicUsage() (Usage, bool) {
	if !m.hasUsage || m.anthropic.bad {
		return Usage{}, false
	}
	u := m.usage
	if !m.final {
		u.OutputTokens = max(u.OutputTokens, EstimateTokens(m.produced.ContentBytes, m.produced.Chunks))
	}
	return u, true
}
