package dashboards

import (
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// wantUIDs are the dashboards' uids: stable, since links and alert annotations name them.
var wantUIDs = map[string]string{
	"overview.json": "llm-gateway-overview",
	"money.json":    "llm-gateway-money",
	"backends.json": "llm-gateway-backends",
	"security.json": "llm-gateway-security",
}

// TestDashboardsProvisioningReady: every dashboard loads as it is through Grafana's file
// provisioning: a stable uid, a recent schema, no export-only __inputs, a "datasource"
// variable of type prometheus that every panel and query uses.
func TestDashboardsProvisioningReady(t *testing.T) {
	ds, err := Dashboards()
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != len(wantUIDs) {
		t.Errorf("%d dashboards, want %d", len(ds), len(wantUIDs))
	}
	for file, d := range ds {
		t.Run(file, func(t *testing.T) {
			if want, ok := wantUIDs[file]; !ok || d.UID != want {
				t.Errorf("uid %q, want %q", d.UID, want)
			}
			if d.Title == "" {
				t.Error("no title")
			}
			if d.SchemaVersion < 36 {
				t.Errorf("schemaVersion %d, want 36 or more", d.SchemaVersion)
			}
			if d.Inputs != nil || d.Requires != nil {
				t.Error("has export-only __inputs or __requires")
			}
			i := slices.IndexFunc(d.Templating.List, func(v Variable) bool { return v.Name == "datasource" })
			if i < 0 || d.Templating.List[i].Type != "datasource" || d.Templating.List[i].Query != "prometheus" {
				t.Errorf("no datasource variable of type prometheus: %+v", d.Templating.List)
			}
			ids := map[int]bool{}
			for _, p := range d.Panels {
				if ids[p.ID] {
					t.Errorf("panel id %d twice", p.ID)
				}
				ids[p.ID] = true
				if p.Datasource.UID != "${datasource}" || p.Datasource.Type != "prometheus" {
					t.Errorf("panel %q: datasource %+v, want the variable", p.Title, p.Datasource)
				}
				if len(p.Targets) == 0 {
					t.Errorf("panel %q has no query", p.Title)
				}
				for _, q := range p.Targets {
					if q.Datasource.UID != "${datasource}" || strings.TrimSpace(q.Expr) == "" {
						t.Errorf("panel %q query %s: datasource %+v, expr %q", p.Title, q.RefID, q.Datasource, q.Expr)
					}
				}
			}
		})
	}
}

// TestQueriesParse: every query of the dashboards and rules is PromQL, and names only the
// gateway's series (llm_gateway_*) or a recorded one. That each of those names is really
// exported is checked against a running gateway by caddymodule's TestDashboardQueriesAgainstPrometheus.
func TestQueriesParse(t *testing.T) {
	qs, err := Queries()
	if err != nil {
		t.Fatal(err)
	}
	recorded, err := RecordedNames()
	if err != nil {
		t.Fatal(err)
	}
	if len(qs) < 30 {
		t.Errorf("only %d queries", len(qs))
	}
	for _, q := range qs {
		names, err := MetricNames(q.Expr)
		if err != nil {
			t.Errorf("%s: %v", q, err)
			continue
		}
		if len(names) == 0 {
			t.Errorf("%s: names no series", q)
		}
		for _, n := range names {
			if !strings.HasPrefix(n, "llm_gateway_") && !slices.Contains(recorded, n) {
				t.Errorf("%s: names %s, not a gateway series", q, n)
			}
			if q.Kind == "panel" && slices.Contains(recorded, n) {
				t.Errorf("%s: a dashboard uses the recorded %s: it would be empty without the rules", q, n)
			}
		}
	}
	if _, err := MetricNames(`sum(rate({__name__=~"llm_.*"}[1m]))`); err == nil {
		t.Error("a selector by name pattern passed")
	}
}

// TestRuleAnnotations: every alert has a severity, a summary, a description, a runbook row in
// the README and a unit test in rules_test.yml.
func TestRuleAnnotations(t *testing.T) {
	rg, err := Rules()
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile("rules_test.yml")
	if err != nil {
		t.Fatal(err)
	}
	alerts := 0
	for _, g := range rg.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts++
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s lacks a severity, summary or description", r.Alert)
			}
			if !strings.Contains(string(readme), "| `"+r.Alert+"` |") {
				t.Errorf("alert %s has no runbook row in the README", r.Alert)
			}
			if !strings.Contains(string(tests), "alertname: "+r.Alert+"\n") {
				t.Errorf("alert %s is not tested in rules_test.yml", r.Alert)
			}
		}
	}
	if alerts < 7 {
		t.Errorf("%d alerts, want 7 or more", alerts)
	}
}

// TestProvisioningFiles: the provisioning files are Grafana's format, version 1.
func TestProvisioningFiles(t *testing.T) {
	for _, tc := range []struct{ file, list, typ string }{
		{"provisioning/dashboards.yaml", "providers", "file"},
		{"provisioning/datasources.yaml", "datasources", "prometheus"},
	} {
		b, err := os.ReadFile(tc.file)
		if err != nil {
			t.Fatal(err)
		}
		var doc map[string]any
		if err := yaml.Unmarshal(b, &doc); err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		items, _ := doc[tc.list].([]any)
		if doc["apiVersion"] != 1 || len(items) != 1 {
			t.Fatalf("%s: apiVersion %v, %d %s", tc.file, doc["apiVersion"], len(items), tc.list)
		}
		if item, _ := items[0].(map[string]any); item["type"] != tc.typ {
			t.Errorf("%s: type %v, want %s", tc.file, item["type"], tc.typ)
		}
	}
}

// TestPromtool: `promtool check rules` and `promtool test rules` (rules_test.yml: each alert
// fires on a synthetic series) pass.
func TestPromtool(t *testing.T) {
	promtool := lookPath(t, "promtool")
	for _, args := range [][]string{{"check", "rules", RulesFile}, {"test", "rules", "rules_test.yml"}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// lookPath finds a binary; when it is missing the test fails in CI (CI set) and is skipped
// elsewhere.
func lookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is missing (apt-get install prometheus): %v", name, err)
		}
		t.Skipf("%s is missing (apt-get install prometheus provides it); skipping outside CI", name)
	}
	return p
}
