//go:build !race

package caddymodule_test

// raceEnabled: the tests run under the race detector.
const raceEnabled = false
