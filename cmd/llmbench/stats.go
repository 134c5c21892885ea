package main

import (
	"math"
	"slices"
	"time"
)

// results holds one value per round for each metric, keyed "metric/target".
type results struct {
	vals     map[string][]float64
	errs     map[string]int64  // target -> failed requests over the whole run
	firstErr map[string]string // target -> the first failure seen
	notes    []string          // anything the reader must know about this run
}

func newResults() *results {
	return &results{vals: map[string][]float64{}, errs: map[string]int64{}, firstErr: map[string]string{}}
}

func (r *results) add(metric, target string, v float64) {
	k := metric + "/" + target
	r.vals[k] = append(r.vals[k], v)
}

func (r *results) fail(target string, n int64, msg string) {
	if n == 0 {
		return
	}
	r.errs[target] += n
	if r.firstErr[target] == "" && msg != "" {
		r.firstErr[target] = msg
	}
}

func (r *results) get(metric, target string) []float64 { return r.vals[metric+"/"+target] }

// med is the median over rounds of a metric, NaN when it was not measured.
func (r *results) med(metric, target string) float64 { return median(r.get(metric, target)) }

// pairwise is the median over rounds of f(a, b), a and b taken in the same round.
func (r *results) pairwise(metric, a, b string, f func(a, b float64) float64) float64 {
	va, vb := r.get(metric, a), r.get(metric, b)
	var out []float64
	for i := 0; i < min(len(va), len(vb)); i++ {
		if v := f(va[i], vb[i]); !math.IsNaN(v) && !math.IsInf(v, 0) {
			out = append(out, v)
		}
	}
	return median(out)
}

func median(v []float64) float64 {
	var s []float64
	for _, x := range v {
		if !math.IsNaN(x) {
			s = append(s, x)
		}
	}
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// pct is the p-quantile (0..1) of sorted durations, nearest rank; 0 when empty.
func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func ratio(a, b float64) float64 { return a / b }
func diff(a, b float64) float64  { return a - b }

// rotate returns the list starting at element r (mod its length), so that no target always
// runs first or last in a round.
func rotate[T any](list []T, r int) []T {
	if len(list) == 0 {
		return nil
	}
	r %= len(list)
	return append(append([]T(nil), list[r:]...), list[:r]...)
}
