//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package sqlite

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// fileLock is an exclusive advisory lock (flock) on a lock file, held until release or until
// the process ends: the kernel drops it when the process dies, kill -9 included.
type fileLock struct {
	f *os.File
}

// lockFile takes the exclusive lock on path, creating the file if needed, without waiting:
// ErrInUse when another opener holds it. flock locks belong to an open file, so a second Open
// in the same process is refused too.
func lockFile(path string) (*fileLock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock file %s: %w", path, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock file %s: %w", path, ErrInUse)
		}
		return nil, fmt.Errorf("lock file %s: %w", path, err)
	}
	return &fileLock{f: f}, nil
}

// release drops the lock. The lock file stays: removing it would let two openers lock two
// different files of the same name.
func (l *fileLock) release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	err = errors.Join(err, l.f.Close())
	l.f = nil
	return err
}
