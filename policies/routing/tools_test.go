package routing

import (
	"errors"
	"testing"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestRankToolFees: a request naming provider tools is served only by models pricing every
// one of them, and each offer's cost adds each bound on calls at its dearest fee; none
// priced is ErrToolNotPriced naming the fee.
func TestRankToolFees(t *testing.T) {
	c, err := NewCatalog([]Backend{
		{Name: "a", Style: StyleOpenAI, Models: []Model{
			{Name: "m", Price: price(1, 2), ToolPrices: map[string]credits.Amount{"web_search": 10_000, "web_search_preview": 25_000}},
		}},
		{Name: "b", Style: StyleOpenAI, Models: []Model{
			{Name: "m", Price: price(1, 1), ToolPrices: map[string]credits.Amount{"web_search": 5_000}},
		}},
		{Name: "c", Style: StyleOpenAI, Models: []Model{{Name: "m", Price: price(0, 1)}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	req := Request{Model: "m", Format: FormatOpenAIResponses, InputTokens: 1_000_000, OutputTokens: 0}
	got, err := c.Rank(req)
	if err != nil || len(got) != 3 {
		t.Fatalf("no tools: %v %v", got, err)
	}

	req.Tools = []ToolUse{{Fees: []string{"web_search"}, Calls: 4}}
	got, err = c.Rank(req)
	if err != nil || len(got) != 2 || got[0].BackendName != "a" && got[0].BackendName != "b" {
		t.Fatalf("web_search: %v %v", got, err)
	}
	want := map[string]credits.Amount{"a": credits.Credit + 40_000, "b": credits.Credit + 20_000}
	for _, ch := range got {
		if ch.Cost != want[ch.BackendName] {
			t.Errorf("%s costs %s, want %s", ch.BackendName, ch.Cost, want[ch.BackendName])
		}
	}

	// Two fees under one bound: the dearest; only a prices both.
	req.Tools = []ToolUse{{Fees: []string{"web_search", "web_search_preview"}, Calls: 2}, {Fees: []string{"web_search"}, Calls: 1}}
	got, err = c.Rank(req)
	if err != nil || len(got) != 1 || got[0].BackendName != "a" || got[0].Cost != credits.Credit+2*25_000+10_000 {
		t.Fatalf("two fees: %+v %v", got, err)
	}

	req.Tools = []ToolUse{{Fees: []string{"mcp"}, Calls: 1}}
	_, err = c.Rank(req)
	var np *ToolNotPriced
	if !errors.Is(err, ErrToolNotPriced) || !errors.As(err, &np) || np.Fee != "mcp" {
		t.Fatalf("mcp: %v, want ToolNotPriced mcp", err)
	}

	// The prices are per call: an absurd bound overflows into no offer, never a wrapped cost.
	req.Tools = []ToolUse{{Fees: []string{"web_search"}, Calls: 1 << 62}}
	if got, err := c.Rank(req); err == nil {
		t.Fatalf("overflow ranked %+v", got)
	}
}

func TestToolTypeMatches(t *testing.T) {
	dated := ToolType{Name: "web_search_", Dated: true}
	for typ, want := range map[string]bool{"web_search_20250305": true, "web_search_2025030": false, "web_search_2025030x": false,
		"web_search_202503051": false, "web_search": false, "xweb_search_20250305": false} {
		if dated.Matches(typ) != want {
			t.Errorf("%q: %v", typ, !want)
		}
	}
	if !(ToolType{Name: "function"}).Matches("function") || (ToolType{Name: "function"}).Matches("Function") {
		t.Error("exact names")
	}
}
