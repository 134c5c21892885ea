package mockbackend

import (
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"
)

// statsPath reads (GET) and resets (DELETE) the request counter of the mock's name.
const statsPath = "/mock/stats"

// otherPath is the counter key of requests to paths the mock does not serve.
const otherPath = "other"

// counters holds one requestCounter per mock name for the life of the process, so that
// counts survive config reloads.
var counters = struct {
	sync.Mutex
	byName map[string]*requestCounter
}{byName: make(map[string]*requestCounter)}

// requestCounter counts the requests a mock received and the stream messages it sent, per
// path. Its maps are fixed when it is made (one entry per served path, and otherPath), so
// reads and increments need no lock.
type requestCounter struct {
	byPath map[string]*atomic.Int64
	chunks map[string]*atomic.Int64
}

func requestCounterFor(name string) *requestCounter {
	counters.Lock()
	defer counters.Unlock()
	c := counters.byName[name]
	if c == nil {
		c = &requestCounter{byPath: pathCounters(), chunks: pathCounters()}
		counters.byName[name] = c
	}
	return c
}

// pathCounters is a counter for each served path and otherPath.
func pathCounters() map[string]*atomic.Int64 {
	m := make(map[string]*atomic.Int64, len(endpoints)+1)
	for path := range endpoints {
		m[path] = new(atomic.Int64)
	}
	m[storedResponsesKey] = new(atomic.Int64)
	m[otherPath] = new(atomic.Int64)
	return m
}

func countPath(m map[string]*atomic.Int64, path string) {
	n, ok := m[path]
	if !ok {
		n = m[otherPath]
	}
	n.Add(1)
}

func loadCounters(m map[string]*atomic.Int64) map[string]int64 {
	out := make(map[string]int64, len(m))
	for path, n := range m {
		out[path] = n.Load()
	}
	return out
}

func (c *requestCounter) add(path string) { countPath(c.byPath, path) }

func (c *requestCounter) addChunk(path string) { countPath(c.chunks, path) }

func (c *requestCounter) snapshot() map[string]int64 { return loadCounters(c.byPath) }

func (c *requestCounter) chunkSnapshot() map[string]int64 { return loadCounters(c.chunks) }

func (c *requestCounter) reset() {
	for _, m := range []map[string]*atomic.Int64{c.byPath, c.chunks} {
		for _, n := range m {
			n.Store(0)
		}
	}
}

// RequestCounts returns how many requests the mocks named name received, by path (the
// served paths, zeros included, and "other" for the rest); in-process tests can read it
// without going through GET /mock/stats.
func RequestCounts(name string) map[string]int64 {
	return requestCounterFor(name).snapshot()
}

// ChunksSent returns how many stream messages the mocks named name wrote and flushed, by
// path, as chunks_sent of GET /mock/stats.
func ChunksSent(name string) map[string]int64 {
	return requestCounterFor(name).chunkSnapshot()
}

// ResetRequestCounts sets the request counts and the chunks sent of the mocks named name to
// zero.
func ResetRequestCounts(name string) {
	requestCounterFor(name).reset()
}

// statsResponse is the body of GET /mock/stats.
type statsResponse struct {
	Name       string           `json:"name"`
	Requests   map[string]int64 `json:"requests"`
	ChunksSent map[string]int64 `json:"chunks_sent"`
}

// serveStats answers GET /mock/stats with the counts and DELETE /mock/stats by resetting
// them (204). Requests to it are not counted.
func (m *MockBackend) serveStats(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		body, _ := json.Marshal(statsResponse{Name: m.Name, Requests: m.requests.snapshot(),
			ChunksSent: m.requests.chunkSnapshot()})
		writeBody(w, http.StatusOK, body)
	case http.MethodDelete:
		m.requests.reset()
		w.WriteHeader(http.StatusNoContent)
	default:
		w.Header().Set("Allow", "GET, DELETE")
		writeError(w, styleOpenAI, http.StatusMethodNotAllowed, "method_not_allowed",
			"mock backend: "+statsPath+" takes GET or DELETE")
	}
}
