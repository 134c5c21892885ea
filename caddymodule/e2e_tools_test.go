package caddymodule_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// TestModelsListSurfaces: /v1/models says, for each model, the paths of the surfaces that
// serve it, from the styles of the backends serving it and its kind: a chat model on an openai
// backend serves chat, completions and Responses; one on an anthropic backend Messages and
// count_tokens; one on an ollama backend Ollama's chat and generate and the OpenAI chat; an
// embeddings model the embeddings routes of its backend's style; a model on two styles the
// union. openai-go's Models.List still reads the list, with the member among its extra fields.
func TestModelsListSurfaces(t *testing.T) {
	e := startGateway(t, setup{
		gateway: backendBlock("oai", "oai", "gpt-x", "1", "2") +
			strings.Replace(backendBlock("oll", "oll", "llama-x", "1", "2"), "health_check", "style ollama\n\t\t\thealth_check", 1) +
			anthropicBlock("ant", "ant", "claude-x", "1", "2") + `
		backend emb {
			url {mock.oai}
			health_check {
				disabled
			}
			model embed-x {
				kind embeddings
				input_price 1
				output_price 0
			}
		}
		backend both {
			url {mock.oll}
			style ollama
			health_check {
				disabled
			}
			model gpt-x {
				input_price 1
				output_price 2
			}
		}`,
		mocks: []mockSpec{
			{key: "oai", lines: "models gpt-x embed-x"},
			{key: "oll", lines: "models llama-x gpt-x"},
			{key: "ant", lines: "models claude-x\n\t\tapi_key " + anthropicUpstreamKey},
		},
	})
	_, k := e.userWithKey("models@example.com", "1")
	want := map[string][]string{
		"gpt-x":    {"/v1/chat/completions", "/api/chat", "/api/generate", "/v1/completions", "/v1/responses"},
		"llama-x":  {"/v1/chat/completions", "/api/chat", "/api/generate"},
		"claude-x": {"/v1/messages", "/v1/messages/count_tokens"},
		"embed-x":  {"/v1/embeddings"},
		"cheapest": nil,
	}

	r := e.request(http.MethodGet, e.gw+"/v1/models", nil, bearer(k.Key))
	if r.status != http.StatusOK {
		t.Fatalf("/v1/models: %s", r)
	}
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID       string   `json:"id"`
			Object   string   `json:"object"`
			Surfaces []string `json:"surfaces"`
		} `json:"data"`
	}
	if err := json.Unmarshal(r.body, &list); err != nil || list.Object != "list" {
		t.Fatalf("not an OpenAI list (%v): %s", err, r)
	}
	seen := map[string]bool{}
	for _, m := range list.Data {
		seen[m.ID] = true
		w, ok := want[m.ID]
		if !ok {
			t.Errorf("unexpected model %q", m.ID)
			continue
		}
		if m.Object != "model" || !slices.Equal(m.Surfaces, w) {
			t.Errorf("%s: object %q, surfaces %q; want model, %q", m.ID, m.Object, m.Surfaces, w)
		}
	}
	if len(seen) != len(want) {
		t.Errorf("models %v, want %d of them", seen, len(want))
	}

	client := openai.NewClient(option.WithBaseURL(e.gw+"/v1/"), option.WithAPIKey(k.Key), option.WithMaxRetries(0))
	page, err := client.Models.List(t.Context())
	if err != nil {
		t.Fatalf("Models.List: %v", err)
	}
	for _, m := range page.Data {
		var got []string
		if f, ok := m.JSON.ExtraFields["surfaces"]; ok {
			if err := json.Unmarshal([]byte(f.Raw()), &got); err != nil {
				t.Errorf("%s: surfaces %s: %v", m.ID, f.Raw(), err)
			}
		}
		if !slices.Equal(got, want[m.ID]) || m.Object != "model" {
			t.Errorf("SDK: %s surfaces %q, want %q", m.ID, got, want[m.ID])
		}
	}
	if len(page.Data) != len(want) {
		t.Errorf("SDK: %d models, want %d", len(page.Data), len(want))
	}
}
