package metering

import (
	"bytes"
	"encoding/json"
	"strings"
	"unicode/utf8"
)

// OpenAI Responses (POST /v1/responses).
//
// A whole answer is a response object: {"id": "resp_...", "object": "response", ...,
// "usage": {"input_tokens", "input_tokens_details": {"cached_tokens"}, "output_tokens",
// "output_tokens_details": {"reasoning_tokens"}}}; UsageFromJSON reads it when the top-level
// "object" is "response". input_tokens counts every prompt token, the cached ones included,
// as Usage does; reasoning tokens are part of output_tokens.
//
// A stream is SSE events whose data is an object with a "type" starting with "response."
// (and "sequence_number"); no [DONE]. The events that end a response, response.completed,
// response.incomplete and response.failed, carry the whole response, its usage included:
// that usage is the final one (OnUsage's fields are appended to that event), with the
// provider tool calls among its output items (tools.go). Every event
// whose type ends in ".delta" with a string "delta" (output text, reasoning text and
// summaries, refusals, function call arguments, transcripts) is generated text for
// Produced. The response id is read from the first event that carries the response
// (response.created), so the caller knows it before the stream ends (ResponseID).

// responsesEvents are the event types that end a response and carry its final usage.
var responsesEvents = []string{"response.completed", "response.incomplete", "response.failed"}

// responsesUsage reads a Responses usage object; input_tokens is required, a missing
// output_tokens counts 0, malformed details are no details.
func responsesUsage(v []byte) (Usage, bool) {
	var input, output, inDetails, outDetails []byte
	it := objectOf(v)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case keyIs(k, "input_tokens"):
			input = v
		case keyIs(k, "output_tokens"):
			output = v
		case keyIs(k, "input_tokens_details"):
			inDetails = v
		case keyIs(k, "output_tokens_details"):
			outDetails = v
		}
	}
	in, ok := tokenCount(input)
	if !ok || isAbsent(input) || !it.ok() {
		return Usage{}, false
	}
	out, ok := tokenCount(output)
	if !ok {
		return Usage{}, false
	}
	u := Usage{InputTokens: in, OutputTokens: out}
	u.CachedInputTokens = detailCount(inDetails, "cached_tokens")
	u.ReasoningTokens = detailCount(outDetails, "reasoning_tokens")
	return u.normal(), true
}

// responseObject reads a response object: its usage (ok false when it has none) and its id.
func responseObject(v []byte) (u Usage, ok bool, id string) {
	var usage, output []byte
	it := objectOf(v)
	for k, v, more := it.next(); more; k, v, more = it.next() {
		switch {
		case keyIs(k, "id"):
			id = jsonString(v)
		case keyIs(k, "usage"):
			usage = v
		case keyIs(k, "output"):
			output = v
		}
	}
	if !it.ok() {
		return Usage{}, false, ""
	}
	if isObject(usage) {
		u, ok = responsesUsage(usage)
	}
	if ok {
		u.ToolCalls = responsesToolCalls(output)
	}
	if ok {
		u.ResponseID = id // no usage is no usage at all: the id is still returned beside it
	}
	return u, ok, id
}

// jsonString decodes the raw JSON string v ("" when v is not a string, or longer than a
// response id may be).
func jsonString(v []byte) string {
	if len(v) < 2 || v[0] != '"' || len(v) > 1<<10 {
		return ""
	}
	if bytes.IndexByte(v, '\\') < 0 && utf8.Valid(v) {
		return string(v[1 : len(v)-1])
	}
	// Escapes, or bytes that are not UTF-8 (replaced by U+FFFD, as a Go client reads them).
	var s string
	if json.Unmarshal(v, &s) != nil {
		return ""
	}
	return s
}

// isResponsesEvent reports whether the raw "type" value of an event names a Responses event.
func isResponsesEvent(typ []byte) bool {
	return bytes.HasPrefix(typ, []byte(`"response.`))
}

// responsesEvent meters one Responses stream event, c being what chunk.read found in it.
func (m *StreamMeter) responsesEvent(w *sink, ev []byte, closing int, c *chunk) {
	typ := jsonString(c.typ)
	if strings.HasSuffix(typ, ".delta") && len(c.delta) > 0 && c.delta[0] == '"' {
		n := textLen(c.delta)
		if m.KeepText && len(m.text) < MaxKeptText {
			keepString(&m.text, c.delta)
			m.kept += n
		}
		m.count(n)
	}
	if !isObject(c.response) {
		w.write(ev)
		return
	}
	u, ok, id := responseObject(c.response)
	if m.responseID == "" {
		m.responseID = id
	}
	final := false
	for _, t := range responsesEvents {
		final = final || typ == t
	}
	if !final {
		w.write(ev)
		return
	}
	m.done = true
	if fields := m.report(u, ok, true); fields != nil {
		w.write(insertFields(ev, closing, c.members == 0, fields))
		return
	}
	w.write(ev)
}

// ResponseID returns the id of the response a Responses stream is making, once an event
// carrying the response (response.created, the first) was seen; "" before, and for other
// streams.
func (m *StreamMeter) ResponseID() string { return m.responseID }
