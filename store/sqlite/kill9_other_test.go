//go:build !unix

package sqlite

// runKill9Child has no work where TestKill9 does not run (it needs SIGKILL).
func runKill9Child(string) {}
