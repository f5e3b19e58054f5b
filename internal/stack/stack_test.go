package stack

import (
	"strings"
	"testing"
)

func boom() { panic("boom") } // the line PanicSite must name

func TestPanicSite(t *testing.T) {
	var site string
	func() {
		defer func() {
			recover()
			site = PanicSite()
		}()
		boom()
	}()
	if !strings.HasSuffix(site, "stack_test.go:8") {
		t.Errorf("PanicSite() = %q, want stack_test.go:8", site)
	}
}
