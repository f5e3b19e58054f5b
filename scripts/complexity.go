package scripts

import (
	"fmt"
	"github.com/writ-fleet/writ/job"

	"github.com/d5/tengo/v2/parser"
	"github.com/d5/tengo/v2/token"

	"github.com/writ-fleet/writ/envelope"
)

// Compile limits: a script past them is refused as too_complex before
// Tengo's parser and compiler see it.
const (
	// MaxNesting bounds how deeply brackets ((, [, {) nest. Tengo's parser
	// and compiler recurse once per level.
	MaxNesting = 200
	// MaxGlobals bounds the names a script defines at its top level. Tengo's
	// VM has room for 1024 globals (tengo.GlobalsSize), and its compiler
	// does not check: past that, Script.Compile panics.
	MaxGlobals = 1000
)

// checkComplexity refuses a script that nests past MaxNesting. It uses
// Tengo's own scanner, so brackets inside strings and comments do not
// count.
func checkComplexity(src []byte) error {
	fs := parser.NewFileSet()
	f := fs.AddFile("(main)", -1, len(src))
	s := parser.NewScanner(f, src, nil, 0)
	depth := 0
	for {
		tok, _, _ := s.Scan()
		switch tok {
		case token.EOF:
			return nil
		case token.LParen, token.LBrack, token.LBrace:
			depth++
			if depth > MaxNesting {
				return envelope.Refuse(job.ReasonTooComplex, fmt.Sprintf("script nests brackets more than %d deep", MaxNesting))
			}
		case token.RParen, token.RBrack, token.RBrace:
			depth--
		}
	}
}
