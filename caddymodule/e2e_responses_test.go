package caddymodule_test

import (
	"errors"
	"math/big"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// cachedCost is what in prompt tokens (cached of them read from the cache) and out output
// tokens cost, computed here: ceil(((in-cached)*inPrice + cached*cachedPrice + out*outPrice) / 1e6).
func cachedCost(t testing.TB, in, cached, out int64, inPrice, cachedPrice, outPrice string) credits.Amount {
	t.Helper()
	x := new(big.Int).Mul(big.NewInt(in-cached), big.NewInt(micro(t, inPrice)))
	x.Add(x, new(big.Int).Mul(big.NewInt(cached), big.NewInt(micro(t, cachedPrice))))
	x.Add(x, new(big.Int).Mul(big.NewInt(out), big.NewInt(micro(t, outPrice))))
	x.Add(x, big.NewInt(999_999))
	return credits.Amount(new(big.Int).Quo(x, big.NewInt(1_000_000)).Int64())
}

// TestResponsesWithTheSDK: the official OpenAI Go SDK's Responses calls through the gateway: a
// response, a stream (usage from response.completed, the charge added to it), a chained
// request (previous_response_id) that goes to the backend that made the response although
// another is cheaper, its cached tokens billed at the cached price, GET, input_items and
// DELETE of a stored response; another user's GET, chaining and DELETE, and unknown ids, are
// 404 and charge nothing; background is refused. Balance = initial - everything charged, the
// books exact.
func TestResponsesWithTheSDK(t *testing.T) {
	const in, cached, out = "1000", "100", "2000"
	gateway := `
		backend cheap {
			url {mock.a}
			health_check {
				disabled
			}
			model shared {
				input_price 10
				output_price 20
			}
		}
		backend owner {
			url {mock.b}
			health_check {
				disabled
			}
			model shared {
				input_price ` + in + `
				cached_input_price ` + cached + `
				output_price ` + out + `
			}
			model only-b {
				input_price ` + in + `
				cached_input_price ` + cached + `
				output_price ` + out + `
			}
		}`
	e := startGateway(t, setup{gateway: gateway, mocks: []mockSpec{{key: "a", lines: "chunks 3"}, {key: "b", lines: "chunks 3"}}})
	const initial = "5"
	u, k := e.userWithKey("responses@example.com", initial)
	other, ok2 := e.userWithKey("other@example.com", "5")
	client := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	intruder := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(ok2.Key), option.WithMaxRetries(0))
	ctx := t.Context()
	var spent credits.Amount

	// A response, on the only backend serving only-b: "say hi briefly" + "be terse" is 4 words.
	var raw *http.Response
	first, err := client.Responses.New(ctx, responses.ResponseNewParams{
		Model: "only-b", Instructions: openai.String("be terse"),
		Input:           responses.ResponseNewParamsInputUnion{OfString: openai.String("say hi briefly")},
		MaxOutputTokens: openai.Int(6),
	}, option.WithResponseInto(&raw))
	if err != nil {
		t.Fatalf("Responses.New: %v", err)
	}
	if first.OutputText() != tokens(6) || first.Usage.InputTokens != 5 || first.Usage.OutputTokens != 6 || !strings.HasPrefix(first.ID, "resp_") {
		t.Fatalf("response %q, usage %+v, id %q", first.OutputText(), first.Usage, first.ID)
	}
	want := cost(t, 5, 6, in, out)
	if got := amountOf(t, raw.Header.Get("X-Credits-Charged")); got != want || raw.Header.Get("X-Gateway-Backend") != "owner" {
		t.Errorf("X-Credits-Charged %s (backend %s), want %s", got, raw.Header.Get("X-Gateway-Backend"), want)
	}
	spent += want

	// A stream on the same backend.
	stream := client.Responses.NewStreaming(ctx, responses.ResponseNewParams{
		Model: "only-b", Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("stream it")}, MaxOutputTokens: openai.Int(4),
	})
	var text strings.Builder
	var done responses.Response
	charged := ""
	for stream.Next() {
		ev := stream.Current()
		switch ev.Type {
		case "response.output_text.delta":
			text.WriteString(ev.Delta)
		case "response.completed", "response.incomplete":
			done = ev.Response
			if _, after, ok := strings.Cut(ev.RawJSON(), `"credits_charged":`); ok {
				charged, _, _ = strings.Cut(after, ",")
			}
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	stream.Close()
	want = cost(t, 2, 4, in, out)
	if text.String() != tokens(4) || done.Usage.OutputTokens != 4 || charged == "" || amountOf(t, charged) != want {
		t.Errorf("stream text %q, usage %+v, credits_charged %q (want %s)", text.String(), done.Usage, charged, want)
	}
	spent += want

	// Chained on "shared": the cheap backend would be ranked first, but only the owner knows the
	// previous response (mock a would answer 404). The mock reports the 11 carried tokens as cached.
	before := e.mockCounts("a")["/v1/responses"]
	second, err := client.Responses.New(ctx, responses.ResponseNewParams{
		Model: "shared", PreviousResponseID: openai.String(first.ID),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("and again")}, MaxOutputTokens: openai.Int(3),
	}, option.WithResponseInto(&raw))
	if err != nil {
		t.Fatalf("chained: %v", err)
	}
	if second.Usage.InputTokens != 2+11 || second.Usage.InputTokensDetails.CachedTokens != 11 || raw.Header.Get("X-Gateway-Backend") != "owner" ||
		e.mockCounts("a")["/v1/responses"] != before {
		t.Errorf("chained: usage %+v, backend %s", second.Usage, raw.Header.Get("X-Gateway-Backend"))
	}
	want = cachedCost(t, 13, 11, 3, in, cached, out)
	if got := amountOf(t, raw.Header.Get("X-Credits-Charged")); got != want {
		t.Errorf("chained: charged %s, want %s (cached tokens at the cached price)", got, want)
	}
	spent += want

	// The stored routes: not charged.
	got, err := client.Responses.Get(ctx, first.ID, responses.ResponseGetParams{})
	if err != nil || got.ID != first.ID || got.OutputText() != tokens(6) {
		t.Fatalf("Get: %v %+v", err, got)
	}
	items, err := client.Responses.InputItems.List(ctx, first.ID, responses.InputItemListParams{Limit: openai.Int(1), Order: responses.InputItemListParamsOrderAsc})
	if err != nil || len(items.Data) != 1 || items.Data[0].Type != "message" {
		t.Fatalf("InputItems.List: %v %+v", err, items)
	}
	if _, err := client.Responses.Cancel(ctx, first.ID); !isStatus(err, http.StatusBadRequest) {
		t.Errorf("Cancel of a finished response: %v, want the backend's 400", err)
	}

	// Another user, and unknown ids: 404, whatever the route, nothing charged.
	otherBefore := e.balance(other.ID)
	if _, err := intruder.Responses.Get(ctx, first.ID, responses.ResponseGetParams{}); !isStatus(err, http.StatusNotFound) {
		t.Errorf("another user's GET: %v, want 404", err)
	}
	if err := intruder.Responses.Delete(ctx, first.ID); !isStatus(err, http.StatusNotFound) {
		t.Errorf("another user's DELETE: %v, want 404", err)
	}
	if _, err := intruder.Responses.New(ctx, responses.ResponseNewParams{Model: "shared", PreviousResponseID: openai.String(first.ID),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("x")}}); !isStatus(err, http.StatusNotFound) {
		t.Errorf("another user's chaining: %v, want 404", err)
	}
	if _, err := client.Responses.Get(ctx, "resp_nobody", responses.ResponseGetParams{}); !isStatus(err, http.StatusNotFound) {
		t.Errorf("unknown GET: %v, want 404", err)
	}
	if e.balance(other.ID) != otherBefore {
		t.Errorf("the other user was charged")
	}
	if _, err := client.Responses.New(ctx, responses.ResponseNewParams{Model: "shared", Background: openai.Bool(true),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("x")}}); !isStatus(err, http.StatusBadRequest) {
		t.Errorf("background: %v, want 400", err)
	}

	// DELETE, then the backend no longer has it.
	if err := client.Responses.Delete(ctx, first.ID); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := client.Responses.Get(ctx, first.ID, responses.ResponseGetParams{}); !isStatus(err, http.StatusNotFound) {
		t.Errorf("GET after DELETE: %v, want 404", err)
	}

	if b := e.balance(u.ID); b != credits.Amount(micro(t, initial))-spent {
		t.Errorf("balance %s, want %s - %s", b, initial, spent)
	}
	if a := e.settledAudit(u.ID); a.Credited != a.Balance+a.Settled+a.Open || a.Open != 0 {
		t.Errorf("books %+v", a)
	}
	e.checkAllAccounts(0)
}

// isStatus reports whether err is the SDK's API error with that status.
func isStatus(err error, status int) bool {
	var apiErr *openai.Error
	return errors.As(err, &apiErr) && apiErr.StatusCode == status
}

// TestChainedResponseIsBoundByItsContext: a request carrying on a stored response is read the
// whole conversation again as input, which its own body does not show. A tiny chained body
// after a long answer is reserved for that context and charged everything the backend
// reports, nothing left unbilled (the free-tokens hole of bounding it by its body alone). The
// context comes from the gateway's memory here; from another instance, it is the store's
// ResponseOwner.ContextTokens (the settled input and output, checked by storetest).
func TestChainedResponseIsBoundByItsContext(t *testing.T) {
	const in, out = "1", "2"
	e := startGateway(t, setup{gateway: backendBlock("oai", "oai", "mock-small", in, out), mocks: []mockSpec{{key: "oai"}}})
	u, k := e.userWithKey("chain@example.com", "100")
	unbilled := func() float64 {
		v, _ := metricSum(e.scrape(), "llm_gateway_credits_total", map[string]string{"kind": "unbilled"})
		return v
	}
	before := unbilled()
	hdr := bearer(k.Key)
	hdr["X-Mock-Completion-Tokens"] = "3000"
	r := e.post("/v1/responses", `{"model":"mock-small","input":"tell me a long story","max_output_tokens":4000}`, hdr)
	if r.status != http.StatusOK {
		t.Fatalf("first response: %s", r)
	}
	id, _ := r.object(t)["id"].(string)
	prev := id
	for i := range 3 {
		body := `{"model":"mock-small","input":"more","max_output_tokens":8,"previous_response_id":"` + prev + `"}`
		r := e.post("/v1/responses", body, bearer(k.Key))
		if r.status != http.StatusOK {
			t.Fatalf("chained %d: %s", i, r)
		}
		prev, _ = r.object(t)["id"].(string)
		st := e.settlements(u.ID)
		got := st[len(st)-1]
		if got.Usage == nil || got.Usage.InputTokens < 3000 {
			t.Fatalf("chained %d: usage %+v, want the carried context in the input", i, got.Usage)
		}
		want := cachedCost(t, got.Usage.InputTokens, got.Usage.CachedInputTokens, got.Usage.OutputTokens, in, in, out)
		if got.Amount != want {
			t.Errorf("chained %d: charged %s for %+v, want %s (its whole usage)", i, got.Amount, got.Usage, want)
		}
	}
	if after := unbilled(); after != before {
		t.Errorf("%.6f credits left unbilled by chained requests", after-before)
	}
	e.checkAllAccounts(0)
}
