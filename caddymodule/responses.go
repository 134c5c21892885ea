package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
)

// Stored responses (OpenAI Responses): a response lives on the backend that made it. The
// gateway remembers which backend made which response id, for which account, as soon as the
// id is read from the answer (responseOwners, in this process), and the ledger records it in
// the settle entry (the store's ResponseOwner, for the ids this process does not know: another
// instance's, or from before a restart). A request that follows a response
// (previous_response_id) and every stored response route (Surface.Stored) go to that backend,
// for that account only: an unknown id and another account's id get the same 404.

// maxRememberedResponses bounds the response ids one gateway process remembers; the oldest
// are forgotten first (the store still knows them).
const maxRememberedResponses = 100_000

// responseOwners is the bounded in-process map of response ids to their owners. The zero
// value is ready.
type responseOwners struct {
	mu   sync.Mutex
	byID map[string]credits.ResponseOwner
	ring []string // ids in the order they came, for eviction
	next int      // the ring slot the next id takes once the ring is full
}

func (o *responseOwners) remember(id string, owner credits.ResponseOwner) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.byID == nil {
		o.byID = map[string]credits.ResponseOwner{}
	}
	if _, ok := o.byID[id]; ok {
		return
	}
	if len(o.ring) < maxRememberedResponses {
		o.ring = append(o.ring, id)
	} else {
		delete(o.byID, o.ring[o.next])
		o.ring[o.next] = id
		o.next = (o.next + 1) % maxRememberedResponses
	}
	o.byID[id] = owner
}

func (o *responseOwners) lookup(id string) (credits.ResponseOwner, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	owner, ok := o.byID[id]
	return owner, ok
}

// unknownResponse is a response id that is not the caller's: unknown, or another account's
// (404 either way, in the same words).
type unknownResponse struct {
	id, param string
}

func (e *unknownResponse) Error() string {
	id := e.id
	if len(id) > 200 {
		id = id[:200] + "..."
	}
	return fmt.Sprintf("No response found with id '%s'.", id)
}

// maxResponseID bounds the response ids the gateway looks up.
const maxResponseID = 256

// responseOwner finds who made response id, for the caller: the in-process map first, then the
// store.
func (g *Gateway) responseOwner(ctx context.Context, who *caller, id, param string) (credits.ResponseOwner, error) {
	if id == "" || len(id) > maxResponseID {
		return credits.ResponseOwner{}, &unknownResponse{id: id, param: param}
	}
	owner, ok := g.owners.lookup(id)
	if !ok {
		if g.store.responses == nil {
			return credits.ResponseOwner{}, &unknownResponse{id: id, param: param}
		}
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
		defer cancel()
		var err error
		owner, err = g.store.responses(ctx, id)
		if errors.Is(err, credits.ErrUnknownResponse) {
			return credits.ResponseOwner{}, &unknownResponse{id: id, param: param}
		}
		if err != nil {
			return credits.ResponseOwner{}, fmt.Errorf("looking up a response: %w", errors.Join(credits.ErrStoreUnavailable, err))
		}
	}
	if owner.Account != who.account {
		return credits.ResponseOwner{}, &unknownResponse{id: id, param: param}
	}
	return owner, nil
}

// ownerBackend is the index of the configured backend named name, or -1.
func (g *Gateway) ownerBackend(name string) int {
	for i, b := range g.Backends {
		if b.Name == name {
			return i
		}
	}
	return -1
}

// followOwner keeps, of the ranked choices of a request that follows the stored response of
// owner, those on the backend that made it. The choices were ranked with the caller's
// allowlist and the backends' health already.
func followOwner(owner credits.ResponseOwner, choices []routing.Choice, ex *exchange) ([]routing.Choice, error) {
	var kept []routing.Choice
	for _, c := range choices {
		if c.BackendName == owner.Backend {
			kept = append(kept, c)
		}
	}
	if len(kept) == 0 {
		// The backend that made the response does not serve this model now (or is down).
		return nil, &noRoute{err: routing.ErrNoBackend, model: ex.inf.model, maxPrice: ex.inf.maxPrice}
	}
	return kept, nil
}

// noteResponse remembers the response id an answer carries as the caller's, made by the
// answering backend (once per exchange).
func (ex *exchange) noteResponse(id string) {
	if id == "" || ex.noted || ex.choice == nil || ex.who == nil || len(id) > maxResponseID {
		return
	}
	ex.noted = true
	// The context it holds is bounded by what this request could be: its prompt bound (which
	// holds the context it carried on, if any) and its output bound. Known now, before the
	// usage, so that a request chained at once is bounded too.
	ex.g.owners.remember(id, credits.ResponseOwner{Account: ex.who.account, Backend: ex.choice.BackendName,
		KeyID: ex.who.keyID, Model: ex.choice.Model.Name, ContextTokens: ex.inf.inputBound + ex.inf.outputTotal()})
}

// storedRequest is a request to a stored response route.
type storedRequest struct {
	format routing.Format
	route  *routing.StoredRoute
	id     string
}

// storedRouteAt finds the stored response route of path (whatever the method: route is nil
// when no route of that path takes it, and allow lists the methods that do).
func storedRouteAt(path, method string) (sr storedRequest, allow []string, ok bool) {
	for i := range routing.Surfaces {
		sf := &routing.Surfaces[i]
		rest, found := strings.CutPrefix(path, sf.Path+"/")
		if len(sf.Stored) == 0 || !found || rest == "" {
			continue
		}
		id, suffix, _ := strings.Cut(rest, "/")
		if suffix != "" {
			suffix = "/" + suffix
		}
		for j := range sf.Stored {
			r := &sf.Stored[j]
			if r.Suffix != suffix || id == "" {
				continue
			}
			ok = true
			allow = append(allow, r.Method)
			if r.Method == method {
				sr = storedRequest{format: routing.Format(i), route: r, id: id}
			}
		}
		if ok {
			return sr, allow, true
		}
	}
	return storedRequest{}, nil, false
}

// serveStored answers a stored response route: authenticated and limited like the surface's
// inference route, not charged, passed to the backend that made the response.
func (g *Gateway) serveStored(w http.ResponseWriter, r *http.Request, sr storedRequest, allow []string) {
	if sr.route == nil {
		w.Header().Set("Allow", strings.Join(allow, ", ")+", OPTIONS")
		writeError(w, r, &statusError{http.StatusMethodNotAllowed, "use " + strings.Join(allow, " or ") + " on " + r.URL.Path})
		return
	}
	ex := &exchange{g: g, ep: epSurface + endpoint(sr.format), w: w, r: r, start: time.Now()}
	defer ex.finishLimits()
	if err := ex.runStored(sr); err != nil {
		ex.peekLimitHeaders()
		ex.outcome = writeError(w, r, err).Code
	}
	ex.record()
	if ex.aborted {
		panic(http.ErrAbortHandler)
	}
}

func (ex *exchange) runStored(sr storedRequest) error {
	g, r := ex.g, ex.r
	if err := g.checkOrigin(r); err != nil {
		return err
	}
	who, err := g.identify(r)
	if err != nil {
		return err
	}
	ex.who = who
	if !identity.HasScope(who.scopes, ex.ep.scope()) {
		return &missingScope{scope: ex.ep.scope()}
	}
	owner, err := g.responseOwner(r.Context(), who, sr.id, "")
	if err != nil {
		return err
	}
	i := g.ownerBackend(owner.Backend)
	if i < 0 {
		return &unknownResponse{id: sr.id} // its backend is no longer configured
	}
	if allowed := who.allowedModel(); allowed != nil && !allowed(owner.Model) {
		return &noRoute{err: routing.ErrModelNotAllowed, model: owner.Model}
	}
	if !g.healthy(i) {
		return &noRoute{err: routing.ErrNoBackend, model: owner.Model}
	}
	b := g.Backends[i]
	ex.choice = &routing.Choice{Offer: routing.Offer{Backend: i, BackendName: b.Name, Model: routing.Model{Name: owner.Model}}}
	ex.inf = &inference{format: sr.format, choices: 1} // no tokens: only the request counts
	if err := ex.admitLimits(); err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Duration(b.Timeout))
	defer cancel()
	stop := context.AfterFunc(r.Context(), cancel) // nothing to meter: the client gone, so is the request
	defer stop()
	stripCredentials(r.Header)
	req := r.WithContext(ctx)
	req.URL = cloneURL(r.URL)
	req.URL.Path = b.base + r.URL.Path
	req.URL.RawPath = ""
	req.URL.RawQuery = upstreamQuery(b, sr.route.Query, r.URL.Query())
	req.Body, req.ContentLength = http.NoBody, 0
	req.Header = r.Header
	req.Header.Del("Content-Length")
	req.Header.Del("Content-Type")
	sw := &storedWriter{ex: ex, hdr: http.Header{}}
	perr := ex.passStored(b, sw, req)
	if sw.status == 0 {
		if errors.Is(perr, context.DeadlineExceeded) {
			return errUpstreamTimeout
		}
		return errNoOutput
	}
	return nil
}

// passStored proxies a stored response request to its backend, as attempt does.
func (ex *exchange) passStored(b *Backend, sw *storedWriter, req *http.Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			if p != http.ErrAbortHandler {
				panic(p)
			}
			ex.aborted = true
			err = errAborted
		}
	}()
	return b.proxy.ServeHTTP(sw, req, noNext)
}

// storedWriter passes a backend's answer to a stored response route on to the client, with the
// backend's headers filtered as for any answer.
type storedWriter struct {
	ex     *exchange
	hdr    http.Header
	status int
}

func (s *storedWriter) Header() http.Header { return s.hdr }

func (s *storedWriter) WriteHeader(status int) {
	if s.status != 0 || status < 200 {
		return
	}
	s.status = status
	ex := s.ex
	ex.passHeaders(s.hdr)
	for _, k := range []string{"Content-Length", "Content-Encoding"} {
		if v := s.hdr.Get(k); v != "" {
			ex.w.Header().Set(k, v)
		}
	}
	ex.w.WriteHeader(status)
	ex.outcome = outcomeOf(status)
}

func (s *storedWriter) Write(p []byte) (int, error) {
	if s.status == 0 {
		s.WriteHeader(http.StatusOK)
	}
	return s.ex.w.Write(p)
}

func (s *storedWriter) FlushError() error {
	return http.NewResponseController(s.ex.w).Flush()
}
