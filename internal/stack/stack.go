// Package stack tells where a panic happened, so recovered panics can be
// reported as errors that carry file and line.
package stack

import (
	"fmt"
	"runtime"
	"strings"
)

// PanicSite returns "file:line" of the frame that panicked. Call it from
// the deferred function that recovers.
func PanicSite() string {
	pcs := make([]uintptr, 32)
	n := runtime.Callers(3, pcs)
	frames := runtime.CallersFrames(pcs[:n])
	for {
		f, more := frames.Next()
		if !strings.HasPrefix(f.Function, "runtime.") {
			return fmt.Sprintf("%s:%d", f.File, f.Line)
		}
		if !more {
			return "unknown"
		}
	}
}
