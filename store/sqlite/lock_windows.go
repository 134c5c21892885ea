//go:build windows

package sqlite

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/windows"
)

// fileLock is an exclusive lock (LockFileEx) on a lock file, held until release or until the
// process ends.
type fileLock struct {
	f *os.File
}

// lockFile takes the exclusive lock on path, creating the file if needed, without waiting:
// ErrInUse when another opener holds it.
func lockFile(path string) (*fileLock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock file %s: %w", path, err)
	}
	var whole windows.Overlapped
	err = windows.LockFileEx(windows.Handle(f.Fd()),
		windows.LOCKFILE_EXCLUSIVE_LOCK|windows.LOCKFILE_FAIL_IMMEDIATELY, 0, 1, 0, &whole)
	if err != nil {
		f.Close()
		if errors.Is(err, windows.ERROR_LOCK_VIOLATION) {
			return nil, fmt.Errorf("lock file %s: %w", path, ErrInUse)
		}
		return nil, fmt.Errorf("lock file %s: %w", path, err)
	}
	return &fileLock{f: f}, nil
}

// release drops the lock; the lock file stays.
func (l *fileLock) release() error {
	if l == nil || l.f == nil {
		return nil
	}
	var whole windows.Overlapped
	err := windows.UnlockFileEx(windows.Handle(l.f.Fd()), 0, 1, 0, &whole)
	err = errors.Join(err, l.f.Close())
	l.f = nil
	return err
}
