// Package routing turns a request's model name into an ordered list of backends: the catalog
// of what each configured backend serves at what price, and the ranking by this request's
// expected cost ("cheapest", a concrete model, an optional price ceiling). It also describes,
// once each, the API surfaces the gateway serves (Surfaces): their routes, the body members
// that bound their cost, their error shape and the backend styles that serve them.
package routing

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// Cheapest is the model name that asks for the cheapest model able to serve the request.
const Cheapest = "cheapest"

// Style is the API a backend speaks.
type Style string

const (
	// StyleOpenAI backends serve /v1/chat/completions, /v1/completions, /v1/embeddings and
	// /v1/models.
	StyleOpenAI Style = "openai"
	// StyleOllama backends serve Ollama's /api/chat, /api/generate, /api/embed,
	// /api/embeddings and /api/tags, and also its OpenAI-compatible /v1 chat and embeddings.
	StyleOllama Style = "ollama"
	// StyleAnthropic backends serve Anthropic's /v1/messages and /v1/messages/count_tokens
	// (and /v1/models, for the health check), with their key in x-api-key.
	StyleAnthropic Style = "anthropic"
)

// Kind is what a model does.
type Kind string

const (
	KindChat       Kind = "chat"
	KindEmbeddings Kind = "embeddings"
)

// Model is one model a backend serves.
type Model struct {
	// Name is what clients ask for.
	Name string
	// Upstream is the name sent to the backend.
	Upstream string
	Kind     Kind
	Price    credits.Price
	// ToolPrices are what one call of each provider tool costs on this model, by fee name
	// (ProviderTool.Fee); a tool without a price is not served on it.
	ToolPrices map[string]credits.Amount
}

// ToolPrice is the most one call counted by a provider tool's counter costs on m, among the
// fees fees the request names for it; ok false when m prices none of them.
func (m Model) ToolPrice(fees []string) (price credits.Amount, ok bool) {
	for _, f := range fees {
		p, priced := m.ToolPrices[f]
		if !priced {
			return 0, false
		}
		price, ok = max(price, p), true
	}
	return price, ok
}

// ToolUse is a bound on provider tool calls of one request: at most Calls calls, each of
// one of the tools Fees names.
type ToolUse struct {
	Fees  []string
	Calls int64
}

// ToolNotPriced is the error of a request naming a provider tool that no model able to serve
// it prices.
type ToolNotPriced struct{ Fee string }

func (e *ToolNotPriced) Error() string {
	return "the tool " + e.Fee + " is billed by the provider and not priced on this model"
}

// Is makes a ToolNotPriced an ErrToolNotPriced.
func (e *ToolNotPriced) Is(target error) bool { return target == ErrToolNotPriced }

// Backend is what the catalog knows of one configured backend.
type Backend struct {
	Name   string
	Style  Style
	Models []Model
}

// Offer is one (backend, model) pair able to serve a request.
type Offer struct {
	// Backend is the index of the backend in the catalog's configuration order.
	Backend     int
	BackendName string
	Model       Model
}

// Choice is an offer ranked for one request, with what it is expected to cost.
type Choice struct {
	Offer
	Cost credits.Amount
}

// Errors of Rank.
var (
	ErrUnknownModel    = errors.New("unknown model")
	ErrModelNotAllowed = errors.New("model not allowed")
	ErrNoBackend       = errors.New("no healthy backend")
	ErrOverMaxPrice    = errors.New("every choice costs more than max_price")
	ErrToolNotPriced   = errors.New("provider tool not priced")
)

// Catalog is the immutable set of offers built from the configured backends.
type Catalog struct {
	backends []Backend
	offers   map[string][]Offer // by client-facing model name
	names    []string           // model names in configuration order
}

// NewCatalog indexes the backends. Model names must be non-empty and not "cheapest"; one
// backend may not list a model twice.
func NewCatalog(backends []Backend) (*Catalog, error) {
	c := &Catalog{backends: backends, offers: map[string][]Offer{}}
	for i, b := range backends {
		seen := map[string]bool{}
		for _, m := range b.Models {
			if m.Name == "" || m.Name == Cheapest {
				return nil, fmt.Errorf("backend %s: invalid model name %q", b.Name, m.Name)
			}
			if seen[m.Name] {
				return nil, fmt.Errorf("backend %s: model %s listed twice", b.Name, m.Name)
			}
			seen[m.Name] = true
			if m.Upstream == "" {
				m.Upstream = m.Name
			}
			if m.Kind == "" {
				m.Kind = KindChat
			}
			if _, ok := c.offers[m.Name]; !ok {
				c.names = append(c.names, m.Name)
			}
			c.offers[m.Name] = append(c.offers[m.Name], Offer{Backend: i, BackendName: b.Name, Model: m})
		}
	}
	return c, nil
}

// Backends returns the catalog's backends in configuration order.
func (c *Catalog) Backends() []Backend { return c.backends }

// Known reports whether name is a model of the catalog (or "cheapest").
func (c *Catalog) Known(name string) bool {
	_, ok := c.offers[name]
	return ok || name == Cheapest
}

// Request is what ranking needs to know of one inference request.
type Request struct {
	// Model is "cheapest" or a model name.
	Model  string
	Format Format
	// InputTokens is the prompt estimate; OutputTokens the output bound (max_tokens).
	InputTokens, OutputTokens int64
	// MaxPrice, when above zero, excludes choices expected to cost more.
	MaxPrice credits.Amount
	// Allowed, when not nil, says which models the caller may use.
	Allowed func(model string) bool
	// Healthy, when not nil, says which backends (by index) may be tried now: Caddy's reverse
	// proxy refuses an upstream its health checks marked down, so trying one is pointless.
	Healthy func(backend int) bool
	// Tools bound the provider tool calls the request may make: only models pricing every
	// fee they name serve it, and its cost counts each bound at its dearest fee.
	Tools []ToolUse
}

// toolsCost is the most the tool calls of uses cost on m; ok false when m does not price one.
func toolsCost(m Model, uses []ToolUse) (sum credits.Amount, notPriced string, err error) {
	for _, u := range uses {
		p, ok := m.ToolPrice(u.Fees)
		if !ok {
			for _, f := range u.Fees {
				if _, priced := m.ToolPrices[f]; !priced {
					return 0, f, nil
				}
			}
		}
		c, err := p.Times(u.Calls)
		if err != nil {
			return 0, "", err
		}
		if sum, err = sum.Add(c); err != nil {
			return 0, "", err
		}
	}
	return sum, "", nil
}

// Rank lists the offers able to serve the request, cheapest expected cost first (ties keep
// configuration order). The error says why the list is empty.
func (c *Catalog) Rank(req Request) ([]Choice, error) {
	var candidates []Offer
	if req.Model == Cheapest {
		for _, name := range c.names {
			candidates = append(candidates, c.offers[name]...)
		}
	} else {
		offers, ok := c.offers[req.Model]
		if !ok {
			return nil, ErrUnknownModel
		}
		candidates = offers
	}
	kind := req.Format.Kind()
	var out []Choice
	sawAllowed, sawHealthy, notPriced := false, false, ""
	priced := len(req.Tools) == 0
	for _, o := range candidates {
		if o.Model.Kind != kind || !req.Format.ServedBy(c.backends[o.Backend].Style) {
			continue
		}
		if req.Allowed != nil && !req.Allowed(o.Model.Name) {
			continue
		}
		sawAllowed = true
		if req.Healthy != nil && !req.Healthy(o.Backend) {
			continue
		}
		sawHealthy = true
		fees, missing, err := toolsCost(o.Model, req.Tools)
		if missing != "" {
			notPriced = missing
			continue
		}
		priced = true
		if err != nil {
			continue
		}
		cost, err := o.Model.Price.Bound(req.InputTokens, req.OutputTokens)
		if err == nil {
			cost, err = cost.Add(fees)
		}
		if err != nil {
			continue
		}
		if req.MaxPrice > 0 && cost > req.MaxPrice {
			continue
		}
		out = append(out, Choice{Offer: o, Cost: cost})
	}
	if len(out) == 0 {
		switch {
		case !sawAllowed && req.Model != Cheapest && len(candidates) > 0 && req.Allowed != nil:
			return nil, ErrModelNotAllowed
		case !sawAllowed:
			return nil, ErrUnknownModel
		case !sawHealthy:
			return nil, ErrNoBackend
		case !priced:
			return nil, &ToolNotPriced{Fee: notPriced}
		default:
			return nil, ErrOverMaxPrice
		}
	}
	slices.SortStableFunc(out, func(a, b Choice) int { return cmp.Compare(a.Cost, b.Cost) })
	return out, nil
}

// Listing is one model of the catalog as a caller sees it: the cheapest price among the
// backends serving it.
type Listing struct {
	Name     string
	Kind     Kind
	Price    credits.Price
	Backends []string
	// Surfaces are the paths of the API surfaces that serve the model (those of its kind that
	// a backend serving it speaks), in the order of Surfaces; catalog lists are not among them.
	Surfaces []string
}

// List returns the models the caller may use in configuration order, optionally only those a
// backend of the given format serves.
func (c *Catalog) List(format Format, allowed func(string) bool) []Listing {
	var out []Listing
	for _, name := range c.names {
		if allowed != nil && !allowed(name) {
			continue
		}
		var l *Listing
		for _, o := range c.offers[name] {
			if !format.ServedBy(c.backends[o.Backend].Style) {
				continue
			}
			if l == nil {
				l = &Listing{Name: name, Kind: o.Model.Kind, Price: o.Model.Price}
			}
			if o.Model.Price.Input+o.Model.Price.Output < l.Price.Input+l.Price.Output {
				l.Price = o.Model.Price
			}
			l.Backends = append(l.Backends, o.BackendName)
		}
		if l != nil {
			l.Surfaces = c.surfacesOf(name, l.Kind)
			out = append(out, *l)
		}
	}
	return out
}

// surfacesOf returns the paths of the surfaces (not the catalog lists) that serve model name
// of kind on at least one of its backends.
func (c *Catalog) surfacesOf(name string, kind Kind) []string {
	var out []string
	for i := range Surfaces {
		sf := &Surfaces[i]
		if sf.List != ListNone || sf.Kind != kind {
			continue
		}
		for _, o := range c.offers[name] {
			if Format(i).ServedBy(c.backends[o.Backend].Style) {
				out = append(out, sf.Path)
				break
			}
		}
	}
	return out
}
