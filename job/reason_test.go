package job

import (
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"strconv"
	"testing"
)

// TestReason_ClosedList: every Reason constant of reason.go is in the list
// (with its status and whether it is final), and the list has nothing else.
func TestReason_ClosedList(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "reason.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	consts := map[Reason]bool{}
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, s := range g.Specs {
			vs := s.(*ast.ValueSpec)
			if id, ok := vs.Type.(*ast.Ident); !ok || id.Name != "Reason" {
				continue
			}
			v, _ := strconv.Unquote(vs.Values[0].(*ast.BasicLit).Value)
			if consts[Reason(v)] {
				t.Errorf("reason %q is declared twice", v)
			}
			consts[Reason(v)] = true
		}
	}
	for r := range consts {
		if !r.Known() {
			t.Errorf("reason %q is not in the list (reasons): give it a status", r)
		}
	}
	for _, r := range Reasons() {
		if !consts[r] {
			t.Errorf("the list names %q, which is no constant", r)
		}
	}
}

func TestReason_Status(t *testing.T) {
	for _, tc := range []struct {
		r     Reason
		want  int
		retry bool
	}{
		{ReasonTooLarge, http.StatusRequestEntityTooLarge, false},
		{ReasonMalformed, http.StatusBadRequest, false},
		{ReasonReplayed, http.StatusConflict, false},
		{ReasonWrongSite, http.StatusUnprocessableEntity, false},
		{ReasonBadSignature, http.StatusForbidden, false},
		{ReasonLedgerUnavailable, http.StatusServiceUnavailable, true},
		{ReasonRedisUnavailable, http.StatusServiceUnavailable, true},
		{"no_such_reason", http.StatusForbidden, false},
	} {
		if got := tc.r.Status(); got != tc.want || tc.r.Retry() != tc.retry {
			t.Errorf("%s: Status() = %d, Retry() = %v, want %d, %v", tc.r, got, tc.r.Retry(), tc.want, tc.retry)
		}
	}
	if got := Status(Verdict{State: VerdictRejected, Reason: ReasonReplayed}); got != http.StatusConflict {
		t.Errorf("Status(replayed verdict) = %d", got)
	}
	if got := Status(Verdict{State: VerdictRejected, Reason: ReasonRedisUnavailable, Retry: true}); got != http.StatusServiceUnavailable {
		t.Errorf("Status(retry verdict) = %d", got)
	}
}
