package mockbackend

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

var update = flag.Bool("update", false, "rewrite the golden JSON files of testdata/")

// checkGolden compares got, indented, with the golden file; -update rewrites it.
func checkGolden(t *testing.T, golden string, got []byte) {
	t.Helper()
	var buf bytes.Buffer
	if err := json.Indent(&buf, got, "", "\t"); err != nil {
		t.Fatalf("indenting %s: %v", got, err)
	}
	buf.WriteByte('\n')
	if *update {
		if err := os.WriteFile(golden, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("adapted JSON differs from %s\ngot:\n%s\nwant:\n%s", golden, buf.Bytes(), want)
	}
}

// TestCaddyfileAdapt parses every testdata/*.caddyfiletest block into the module and
// compares its JSON with the .json golden file next to it; the JSON must then load.
func TestCaddyfileAdapt(t *testing.T) {
	fixtures, err := filepath.Glob(filepath.Join("testdata", "*.caddyfiletest"))
	if err != nil || len(fixtures) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	for _, fixture := range fixtures {
		name := strings.TrimSuffix(filepath.Base(fixture), ".caddyfiletest")
		t.Run(name, func(t *testing.T) {
			input, err := os.ReadFile(fixture)
			if err != nil {
				t.Fatal(err)
			}
			m := new(MockBackend)
			if err := m.UnmarshalCaddyfile(caddyfile.NewTestDispenser(string(input))); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			var warnings []caddyconfig.Warning
			got := caddyconfig.JSON(m, &warnings)
			if len(warnings) > 0 {
				t.Errorf("warnings: %v", warnings)
			}
			checkGolden(t, strings.TrimSuffix(fixture, ".caddyfiletest")+".json", got)

			loaded := new(MockBackend)
			if err := json.Unmarshal(got, loaded); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			if err := loaded.Provision(ctx); err != nil {
				t.Fatalf("Provision: %v", err)
			}
			if err := loaded.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

// TestCaddyfileSite adapts a whole Caddyfile: the directive is registered and ordered
// before respond.
func TestCaddyfileSite(t *testing.T) {
	input, err := os.ReadFile(filepath.Join("testdata", "adapt", "site.caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter")
	}
	got, warnings, err := adapter.Adapt(input, map[string]any{"filename": "site.caddyfile"})
	if err != nil {
		t.Fatalf("Adapt: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("warnings: %v", warnings)
	}
	checkGolden(t, filepath.Join("testdata", "adapt", "site.json"), got)
	if mock, respond := bytes.Index(got, []byte(`"llm_mock_backend"`)), bytes.Index(got, []byte(`"static_response"`)); mock < 0 || respond < mock {
		t.Errorf("llm_mock_backend does not come before respond: %s", got)
	}
}

func TestCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		wantErr string
	}{
		{name: "unknown subdirective", input: "llm_mock_backend {\n\tmodel a\n}", wantErr: "unrecognized subdirective 'model'"},
		{name: "arguments on the directive", input: "llm_mock_backend mock-small", wantErr: "wrong argument count"},
		{name: "models without names", input: "llm_mock_backend {\n\tmodels\n}", wantErr: "wrong argument count"},
		{name: "name without value", input: "llm_mock_backend {\n\tname\n}", wantErr: "wrong argument count"},
		{name: "name with two values", input: "llm_mock_backend {\n\tname a b\n}", wantErr: "wrong argument count"},
		{name: "completion_tokens not a number", input: "llm_mock_backend {\n\tcompletion_tokens many\n}", wantErr: "bad completion_tokens number 'many'"},
		{name: "completion_tokens negative", input: "llm_mock_backend {\n\tcompletion_tokens -1\n}", wantErr: "completion_tokens: -1 is negative"},
		{name: "completion_tokens too many", input: "llm_mock_backend {\n\tcompletion_tokens 100001\n}", wantErr: "is more than 100000"},
		{name: "chunks negative", input: "llm_mock_backend {\n\tchunks -4\n}", wantErr: "chunks: -4 is negative"},
		{name: "chunks two values", input: "llm_mock_backend {\n\tchunks 1 2\n}", wantErr: "wrong argument count"},
		{name: "dimensions not a number", input: "llm_mock_backend {\n\tdimensions 8.5\n}", wantErr: "bad dimensions number '8.5'"},
		{name: "latency not a duration", input: "llm_mock_backend {\n\tlatency soon\n}", wantErr: "bad latency duration 'soon'"},
		{name: "latency missing", input: "llm_mock_backend {\n\tlatency\n}", wantErr: "wrong argument count"},
		{name: "chunk_interval negative", input: "llm_mock_backend {\n\tchunk_interval -10ms\n}", wantErr: "chunk_interval: -10ms is negative"},
		{name: "unknown fault", input: "llm_mock_backend {\n\tfault explode\n}", wantErr: `unknown fault "explode"`},
		{name: "fault missing", input: "llm_mock_backend {\n\tfault\n}", wantErr: "wrong argument count"},
		{name: "subdirective twice", input: "llm_mock_backend {\n\tchunks 2\n\tchunks 3\n}", wantErr: "chunks already specified"},
		{name: "models twice", input: "llm_mock_backend {\n\tmodels a\n\tmodels b\n}", wantErr: "models already specified"},
		{name: "tool_use without a name", input: "llm_mock_backend {\n\ttool_use\n}", wantErr: "wrong argument count"},
		{name: "tool_use with three values", input: "llm_mock_backend {\n\ttool_use Read `{}` more\n}", wantErr: "wrong argument count"},
		{name: "tool_use input not an object", input: "llm_mock_backend {\n\ttool_use Read `[1]`\n}", wantErr: "tool_input: not a JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := new(MockBackend).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("UnmarshalCaddyfile() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}
