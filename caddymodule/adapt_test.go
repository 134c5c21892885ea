package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/mockbackend"
)

var updateGolden = flag.Bool("update", false, "rewrite the JSON half of the golden adapt files")

// TestCaddyfileAdapt adapts every testdata/caddyfile_adapt/*.caddyfiletest (a Caddyfile, a line
// of dashes, the JSON it must give) and compares the JSON exactly. Files under errors/ must fail
// to adapt with the message given on their first line ("# error: ...").
func TestCaddyfileAdapt(t *testing.T) {
	files, _ := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	if len(files) == 0 {
		t.Fatal("no golden adapt files")
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, want, ok := strings.Cut(string(raw), "\n----------\n")
			if !ok {
				t.Fatal("no ---------- separator")
			}
			got, warnings, err := adapter.Adapt([]byte(caddyfile+"\n"), nil)
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("warning: line %d: %s", w.Line, w.Message)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, got, "", "\t"); err != nil {
				t.Fatal(err)
			}
			if *updateGolden {
				if err := os.WriteFile(file, []byte(caddyfile+"\n----------\n"+pretty.String()+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if strings.TrimSpace(pretty.String()) != strings.TrimSpace(want) {
				t.Errorf("adapted JSON differs from the golden file\n--- got ---\n%s", pretty.String())
			}
		})
	}
	errFiles, _ := filepath.Glob("testdata/caddyfile_adapt/errors/*.caddyfile")
	if len(errFiles) == 0 {
		t.Fatal("no error cases")
	}
	for _, file := range errFiles {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			first, _, _ := strings.Cut(string(raw), "\n")
			want, ok := strings.CutPrefix(first, "# error: ")
			if !ok {
				t.Fatal(`first line must be "# error: <expected message part>"`)
			}
			_, _, err = adapter.Adapt(raw, nil)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("err = %v, want one containing %q", err, want)
			}
		})
	}
}

// TestCaddyfileExampleAdapts keeps the configuration `make run` uses valid and formatted.
func TestCaddyfileExampleAdapts(t *testing.T) {
	raw, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	_, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		t.Errorf("warning: line %d: %s", w.Line, w.Message)
	}
}
