// Package size reads sizes people write: 1048576, "512M", "10G", "1.5T".
package size

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Parse reads a size in bytes: a number with an optional binary unit K, M,
// G or T (KiB, MiB, ... and a trailing B are accepted too). "" and "0"
// mean zero (callers read that as "no limit" or "the default"). Negative
// sizes and sizes past what an int64 holds are errors.
func Parse(s string) (int64, error) {
	orig := s
	s = strings.TrimSpace(strings.ToUpper(s))
	s = strings.TrimSuffix(strings.TrimSuffix(s, "IB"), "B")
	if s == "" {
		return 0, nil
	}
	mult := int64(1)
	switch s[len(s)-1] {
	case 'K':
		mult = 1 << 10
	case 'M':
		mult = 1 << 20
	case 'G':
		mult = 1 << 30
	case 'T':
		mult = 1 << 40
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G or T", orig)
	}
	if f*float64(mult) >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q is too large", orig)
	}
	return int64(f * float64(mult)), nil
}
