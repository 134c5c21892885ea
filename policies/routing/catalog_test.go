package routing

import (
	"errors"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

func price(in, out int64) credits.Price {
	return credits.Price{Input: credits.Amount(in) * credits.Credit, Output: credits.Amount(out) * credits.Credit}
}

func testCatalog(t *testing.T) *Catalog {
	t.Helper()
	c, err := NewCatalog([]Backend{
		{Name: "a", Style: StyleOpenAI, Models: []Model{
			{Name: "small", Price: price(1, 2)},
			{Name: "large", Price: price(10, 30)},
			{Name: "embed", Kind: KindEmbeddings, Price: price(1, 0)},
		}},
		{Name: "b", Style: StyleOllama, Models: []Model{
			{Name: "small", Upstream: "small:1b", Price: price(2, 2)},
			{Name: "local", Price: price(0, 1)},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRank(t *testing.T) {
	c := testCatalog(t)
	down := func(i int) func(int) bool { return func(b int) bool { return b != i } }
	for _, tc := range []struct {
		name string
		req  Request
		want []string // backend/model in order
		err  error
	}{
		{name: "cheapest chat by expected cost", req: Request{Model: Cheapest, InputTokens: 1000, OutputTokens: 100},
			want: []string{"b/local", "a/small", "b/small", "a/large"}},
		{name: "input-heavy request prefers a cheap input price", req: Request{Model: "small", InputTokens: 1_000_000, OutputTokens: 1},
			want: []string{"a/small", "b/small"}},
		{name: "concrete model on every backend serving it", req: Request{Model: "small", InputTokens: 10, OutputTokens: 10},
			want: []string{"a/small", "b/small"}},
		{name: "embeddings only pick embedding models", req: Request{Model: Cheapest, Format: FormatOpenAIEmbeddings, InputTokens: 10},
			want: []string{"a/embed"}},
		{name: "ollama format only reaches ollama backends", req: Request{Model: "small", Format: FormatOllamaChat, InputTokens: 10},
			want: []string{"b/small"}},
		{name: "unhealthy backend skipped", req: Request{Model: "small", InputTokens: 10, Healthy: down(0)},
			want: []string{"b/small"}},
		{name: "all unhealthy", req: Request{Model: "small", InputTokens: 10, Healthy: func(int) bool { return false }},
			err: ErrNoBackend},
		{name: "max price excludes dearer", req: Request{Model: "small", InputTokens: 1_000_000, MaxPrice: credits.Credit},
			want: []string{"a/small"}},
		{name: "max price excludes all", req: Request{Model: "large", InputTokens: 1_000_000, MaxPrice: credits.Credit},
			err: ErrOverMaxPrice},
		{name: "allowlist", req: Request{Model: Cheapest, InputTokens: 1, Allowed: func(m string) bool { return m == "large" }},
			want: []string{"a/large"}},
		{name: "model not allowed", req: Request{Model: "small", Allowed: func(m string) bool { return m == "large" }},
			err: ErrModelNotAllowed},
		{name: "unknown model", req: Request{Model: "nope"}, err: ErrUnknownModel},
		{name: "embedding model asked for chat", req: Request{Model: "embed"}, err: ErrUnknownModel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.Rank(tc.req)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, ch := range got {
				names = append(names, ch.BackendName+"/"+ch.Model.Name)
			}
			if len(names) != len(tc.want) {
				t.Fatalf("got %v, want %v", names, tc.want)
			}
			for i := range names {
				if names[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", names, tc.want)
				}
			}
			for i := 1; i < len(got); i++ {
				if got[i].Cost < got[i-1].Cost {
					t.Fatalf("not sorted by cost: %v", got)
				}
			}
		})
	}
}

func TestRankCostAndUpstreamName(t *testing.T) {
	c := testCatalog(t)
	got, err := c.Rank(Request{Model: "small", Format: FormatOllamaChat, InputTokens: 500_000, OutputTokens: 250_000})
	if err != nil {
		t.Fatal(err)
	}
	// 0.5M x 2 + 0.25M x 2 credits = 1.5 credits.
	if got[0].Cost != 1_500_000 || got[0].Model.Upstream != "small:1b" {
		t.Fatalf("got %+v", got[0])
	}
}

func TestNewCatalogRefuses(t *testing.T) {
	for name, b := range map[string][]Backend{
		"cheapest as a model name": {{Name: "a", Models: []Model{{Name: Cheapest}}}},
		"empty model name":         {{Name: "a", Models: []Model{{Name: ""}}}},
		"model twice":              {{Name: "a", Models: []Model{{Name: "m"}, {Name: "m"}}}},
	} {
		if _, err := NewCatalog(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestList(t *testing.T) {
	c := testCatalog(t)
	all := c.List(FormatOpenAIChat, nil)
	if len(all) != 4 || all[0].Name != "small" || all[0].Price != price(1, 2) || len(all[0].Backends) != 2 {
		t.Fatalf("openai list: %+v", all)
	}
	ollama := c.List(FormatOllamaChat, nil)
	if len(ollama) != 2 || ollama[0].Price != price(2, 2) {
		t.Fatalf("ollama list: %+v", ollama)
	}
	only := c.List(FormatOpenAIChat, func(m string) bool { return m == "local" })
	if len(only) != 1 || only[0].Name != "local" {
		t.Fatalf("allowlisted list: %+v", only)
	}
}
