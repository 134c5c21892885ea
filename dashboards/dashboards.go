// Package dashboards holds the gateway's Grafana dashboards and Prometheus rules (the files
// beside this one, embedded) and reads the PromQL out of them, so that tests can check every
// query against the series the gateway really exports. Nothing in the gateway imports it.
package dashboards

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"slices"
	"strings"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

// Files are the dashboards (*.json) and the rules (rules.yml).
//
//go:embed *.json rules.yml
var Files embed.FS

// RulesFile is the rule file's name in Files.
const RulesFile = "rules.yml"

// Query is one PromQL expression of a dashboard panel or a rule.
type Query struct {
	File  string // the dashboard's file, or RulesFile
	Where string // the panel's title and the target's refId, or the rule's name
	Kind  string // "panel", "record" or "alert"
	Expr  string // as written, Grafana variables included
}

func (q Query) String() string { return q.File + ": " + q.Where + ": " + q.Expr }

// Dashboard is the part of a dashboard's JSON the checks read.
type Dashboard struct {
	UID           string                    `json:"uid"`
	Title         string                    `json:"title"`
	SchemaVersion int                       `json:"schemaVersion"`
	Inputs        json.RawMessage           `json:"__inputs"`
	Requires      json.RawMessage           `json:"__requires"`
	Templating    struct{ List []Variable } `json:"templating"`
	Panels        []Panel                   `json:"panels"`
}

// Variable is a dashboard template variable.
type Variable struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Query string `json:"query"`
}

// Panel is a dashboard panel.
type Panel struct {
	ID         int        `json:"id"`
	Title      string     `json:"title"`
	Type       string     `json:"type"`
	Datasource Datasource `json:"datasource"`
	Targets    []struct {
		RefID      string     `json:"refId"`
		Expr       string     `json:"expr"`
		Datasource Datasource `json:"datasource"`
	} `json:"targets"`
	Panels []Panel `json:"panels"` // a collapsed row's
}

// Datasource is a panel's or a target's data source reference.
type Datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// RuleGroups is the part of a Prometheus rule file the checks read.
type RuleGroups struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Record      string            `yaml:"record"`
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// Dashboards reads every dashboard, by file name.
func Dashboards() (map[string]Dashboard, error) {
	names, err := fs.Glob(Files, "*.json")
	if err != nil {
		return nil, err
	}
	out := map[string]Dashboard{}
	for _, name := range names {
		b, err := Files.ReadFile(name)
		if err != nil {
			return nil, err
		}
		var d Dashboard
		if err := json.Unmarshal(b, &d); err != nil {
			return nil, fmt.Errorf("dashboard %s: %w", name, err)
		}
		out[name] = d
	}
	return out, nil
}

// Rules reads the rule file.
func Rules() (RuleGroups, error) {
	var rg RuleGroups
	b, err := Files.ReadFile(RulesFile)
	if err != nil {
		return rg, err
	}
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&rg); err != nil {
		return rg, fmt.Errorf("%s: %w", RulesFile, err)
	}
	return rg, nil
}

// Queries lists every PromQL expression of the dashboards and the rules.
func Queries() ([]Query, error) {
	ds, err := Dashboards()
	if err != nil {
		return nil, err
	}
	var out []Query
	var walk func(file string, ps []Panel)
	walk = func(file string, ps []Panel) {
		for _, p := range ps {
			for _, t := range p.Targets {
				out = append(out, Query{File: file, Where: p.Title + " (" + t.RefID + ")", Kind: "panel", Expr: t.Expr})
			}
			walk(file, p.Panels)
		}
	}
	files := make([]string, 0, len(ds))
	for f := range ds {
		files = append(files, f)
	}
	slices.Sort(files)
	for _, f := range files {
		walk(f, ds[f].Panels)
	}
	rg, err := Rules()
	if err != nil {
		return nil, err
	}
	for _, g := range rg.Groups {
		for _, r := range g.Rules {
			q := Query{File: RulesFile, Kind: "alert", Where: g.Name + "/" + r.Alert, Expr: r.Expr}
			if r.Record != "" {
				q.Kind, q.Where = "record", g.Name+"/"+r.Record
			}
			out = append(out, q)
		}
	}
	return out, nil
}

// RecordedNames are the series the recording rules make.
func RecordedNames() ([]string, error) {
	rg, err := Rules()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, g := range rg.Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				out = append(out, r.Record)
			}
		}
	}
	return out, nil
}

// Expand replaces the Grafana variables a panel's query may hold with what Prometheus accepts:
// rateInterval for $__rate_interval and $__interval (e.g. "1m").
func Expand(expr, rateInterval string) string {
	return strings.NewReplacer("$__rate_interval", rateInterval, "${__rate_interval}", rateInterval,
		"$__interval", rateInterval, "${__interval}", rateInterval).Replace(expr)
}

// Parse parses a query (Grafana variables expanded) as PromQL.
func Parse(expr string) (parser.Expr, error) {
	return parser.NewParser(parser.Options{}).ParseExpr(Expand(expr, "1m"))
}

// MetricNames are the metric names a query selects, sorted and unique. Every selector must
// name its metric: one matching names by a pattern is an error, since it cannot be checked.
func MetricNames(expr string) ([]string, error) {
	e, err := Parse(expr)
	if err != nil {
		return nil, err
	}
	var names []string
	var bad error
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name == model.MetricNameLabel {
				if m.Type != labels.MatchEqual {
					bad = fmt.Errorf("selector %s matches metric names by a pattern", vs)
				}
				name = m.Value
			}
		}
		if name == "" {
			bad = fmt.Errorf("selector %s names no metric", vs)
		}
		names = append(names, name)
		return nil
	})
	if bad != nil {
		return nil, bad
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}
