package metering

// Provider tool calls: the tools a provider runs itself and bills per call, beyond tokens.
//
// Anthropic reports them in the usage object: "server_tool_use": {"web_search_requests",
// "web_fetch_requests"} (in a whole answer's usage, and in a stream's cumulative usage).
// OpenAI Responses reports each call as an item of the response's "output" array, whose
// "type" names the tool ("web_search_call", "file_search_call", "code_interpreter_call",
// "image_generation_call", "mcp_call"); a stream carries the whole response, its output
// included, in the event that ends it (response.completed).

// ToolCounter is one count of provider tool calls.
type ToolCounter int

const (
	// ToolWebSearch: Anthropic's web_search_requests, Responses' web_search_call items.
	ToolWebSearch ToolCounter = iota
	// ToolWebFetch: Anthropic's web_fetch_requests.
	ToolWebFetch
	// ToolFileSearch: Responses' file_search_call items.
	ToolFileSearch
	// ToolCodeInterpreter: Responses' code_interpreter_call items.
	ToolCodeInterpreter
	// ToolImageGeneration: Responses' image_generation_call items.
	ToolImageGeneration
	// ToolMCP: Responses' mcp_call items (a call to a remote MCP server).
	ToolMCP
	// NumToolCounters is the number of counters.
	NumToolCounters
)

// ToolCalls are call counts by ToolCounter.
type ToolCalls [NumToolCounters]int64

// Any reports whether any call was counted.
func (c ToolCalls) Any() bool { return c != ToolCalls{} }

// responsesToolItems are the Responses output item types counted, by counter.
var responsesToolItems = map[string]ToolCounter{
	"web_search_call":       ToolWebSearch,
	"file_search_call":      ToolFileSearch,
	"code_interpreter_call": ToolCodeInterpreter,
	"image_generation_call": ToolImageGeneration,
	"mcp_call":              ToolMCP,
}

// responsesToolCalls counts the provider tool calls among the items of a response's output
// array (a value that is not an array counts none).
func responsesToolCalls(output []byte) (c ToolCalls) {
	if len(output) == 0 || output[0] != '[' {
		return c
	}
	items := arrayOf(output)
	for item, ok := items.next(); ok; item, ok = items.next() {
		if !isObject(item) {
			continue
		}
		var typ []byte // the last "type", as encoding/json reads a duplicate
		it := objectOf(item)
		for k, v, more := it.next(); more; k, v, more = it.next() {
			if keyIs(k, "type") {
				typ = v
			}
		}
		if n, ok := responsesToolItems[jsonString(typ)]; ok && it.ok() && c[n] < MaxTokens {
			c[n]++
		}
	}
	return c
}

// anthropicServerTools reads a usage's server_tool_use object into c (counts present and
// valid replace those before, as the stream's cumulative usage has it).
func anthropicServerTools(v []byte, c *ToolCalls) bool {
	if !isObject(v) {
		return isAbsent(v)
	}
	it := objectOf(v)
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		var dst *int64
		switch {
		case keyIs(k, "web_search_requests"):
			dst = &c[ToolWebSearch]
		case keyIs(k, "web_fetch_requests"):
			dst = &c[ToolWebFetch]
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
	}
	return it.ok()
}
