//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly || windows)

package sqlite

// fileLock stands for the ownership lock on systems without flock or LockFileEx, where it is
// not taken: there, keeping a second process off the file is up to the operator.
type fileLock struct{}

// lockFile takes no lock here.
func lockFile(string) (*fileLock, error) { return &fileLock{}, nil }

// release does nothing here.
func (*fileLock) release() error { return nil }
