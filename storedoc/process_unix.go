//go:build unix

package storedoc

import (
	"errors"
	"syscall"
)

// processRuns reports whether a process with this ID exists (signal 0 checks
// without signalling; EPERM means it exists under another user).
func processRuns(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
