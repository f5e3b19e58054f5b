package envelope

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
)

// maxJSONDepth bounds the nesting of a payload's JSON: the job's own
// structure is two levels deep, args a few more.
const maxJSONDepth = 64

// member is one name and value of a JSON object; value is the raw JSON,
// a slice of the input.
type member struct {
	name  string
	value []byte
}

// members reads a JSON object's members in one pass, with their exact
// (unescaped) names. A name that appears twice is an error: encoding/json
// would keep the last one silently, while another reader (jq, Python) may
// show the first, so a reviewer and writ would see different documents.
// With deep, every object nested in the values is held to the same rule
// and nesting is bounded by maxJSONDepth. Trailing data after the object
// is an error. members checks structure only as far as it must to find
// names: callers decode the values with encoding/json, which refuses what
// is not JSON.
//
// It is a small scanner rather than json.Decoder.Token, which allocates per
// token and made checking a job four times slower than decoding it.
func members(data []byte, deep bool) ([]member, error) {
	sc := &scanner{data: data, deep: deep}
	sc.ws()
	if sc.i >= len(data) || data[sc.i] != '{' {
		return nil, errors.New("not a JSON object")
	}
	var out []member
	if err := sc.object(&out); err != nil {
		return nil, err
	}
	sc.ws()
	if sc.i != len(data) {
		return nil, errors.New("trailing data after the JSON object")
	}
	return out, nil
}

// lookup returns the value of the member called name.
func lookup(ms []member, name string) ([]byte, bool) {
	for _, m := range ms {
		if m.name == name {
			return m.value, true
		}
	}
	return nil, false
}

type scanner struct {
	data  []byte
	i     int
	depth int
	deep  bool
}

var errSyntax = errors.New("not valid JSON")

func (s *scanner) ws() {
	for s.i < len(s.data) {
		switch s.data[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// object reads the object at s.i; with out, it collects its members.
func (s *scanner) object(out *[]member) error {
	s.depth++
	if s.depth > maxJSONDepth {
		return fmt.Errorf("nested more than %d levels deep", maxJSONDepth)
	}
	s.i++ // '{'
	var names []string
	var seen map[string]bool // past a few names, so a big object costs n, not n²
	for first := true; ; first = false {
		s.ws()
		if s.i >= len(s.data) {
			return errSyntax
		}
		if s.data[s.i] == '}' && first {
			s.i++
			break
		}
		if s.data[s.i] != '"' {
			return errSyntax
		}
		name, err := s.str()
		if err != nil {
			return err
		}
		dup := seen[name]
		if seen == nil {
			for _, n := range names {
				dup = dup || n == name
			}
			names = append(names, name)
			if len(names) > 8 {
				seen = make(map[string]bool, 2*len(names))
				for _, n := range names {
					seen[n] = true
				}
			}
		} else {
			seen[name] = true
		}
		if dup {
			return fmt.Errorf("key %q appears twice in one object", name)
		}
		s.ws()
		if s.i >= len(s.data) || s.data[s.i] != ':' {
			return errSyntax
		}
		s.i++
		s.ws()
		start := s.i
		if err := s.value(); err != nil {
			return err
		}
		if out != nil {
			*out = append(*out, member{name: name, value: s.data[start:s.i]})
		}
		if done, err := s.after('}'); err != nil || done {
			s.depth--
			return err
		}
	}
	s.depth--
	return nil
}

// after steps over what follows a member or element: the container's
// closing byte (done) or a comma (more to come).
func (s *scanner) after(closing byte) (done bool, err error) {
	s.ws()
	switch {
	case s.i >= len(s.data):
		return false, errSyntax
	case s.data[s.i] == closing:
		s.i++
		return true, nil
	case s.data[s.i] == ',':
		s.i++
		return false, nil
	}
	return false, errSyntax
}

// value reads the value at s.i; nested objects are checked when s.deep.
func (s *scanner) value() error {
	if s.i >= len(s.data) {
		return errSyntax
	}
	switch s.data[s.i] {
	case '{':
		if !s.deep {
			return s.skipContainer()
		}
		return s.object(nil)
	case '[':
		if !s.deep {
			return s.skipContainer()
		}
		s.depth++
		if s.depth > maxJSONDepth {
			return fmt.Errorf("nested more than %d levels deep", maxJSONDepth)
		}
		s.i++
		for first := true; ; first = false {
			s.ws()
			if s.i >= len(s.data) {
				return errSyntax
			}
			if s.data[s.i] == ']' && first {
				s.i++
				break
			}
			if err := s.value(); err != nil {
				return err
			}
			if done, err := s.after(']'); err != nil {
				return err
			} else if done {
				break
			}
		}
		s.depth--
		return nil
	case '"':
		return s.skipString()
	}
	// A number, true, false or null: up to the next delimiter.
	start := s.i
	for s.i < len(s.data) {
		switch s.data[s.i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			if s.i == start {
				return errSyntax
			}
			return nil
		}
		s.i++
	}
	if s.i == start {
		return errSyntax
	}
	return nil
}

// skipContainer steps over an object or array without looking inside,
// but for strings, whose brackets do not count.
func (s *scanner) skipContainer() error {
	level := 0
	for s.i < len(s.data) {
		switch s.data[s.i] {
		case '"':
			if err := s.skipString(); err != nil {
				return err
			}
			continue
		case '{', '[':
			level++
		case '}', ']':
			level--
			if level == 0 {
				s.i++
				return nil
			}
		}
		s.i++
	}
	return errSyntax
}

// skipString steps over the string at s.i.
func (s *scanner) skipString() error {
	s.i++ // opening quote
	for s.i < len(s.data) {
		switch s.data[s.i] {
		case '\\':
			s.i += 2
			continue
		case '"':
			s.i++
			return nil
		}
		s.i++
	}
	return errSyntax
}

// str reads the string at s.i and returns it unescaped: "\u0073cript" is
// the name "script", as every JSON reader sees it.
func (s *scanner) str() (string, error) {
	start := s.i
	escaped := false
	s.i++
	for s.i < len(s.data) {
		switch s.data[s.i] {
		case '\\':
			escaped = true
			s.i += 2
			continue
		case '"':
			s.i++
			raw := s.data[start:s.i]
			if !escaped {
				return string(raw[1 : len(raw)-1]), nil
			}
			var v string
			if err := json.Unmarshal(raw, &v); err != nil {
				return "", errSyntax
			}
			return v, nil
		}
		s.i++
	}
	return "", errSyntax
}

// jsonNames returns the JSON member names of struct type t's fields.
func jsonNames(t reflect.Type) map[string]bool {
	names := map[string]bool{}
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			names[name] = true
		}
	}
	return names
}

var (
	jobNames       = jsonNames(reflect.TypeFor[Job]())
	resourcesNames = jsonNames(reflect.TypeFor[Resources]())
)

// checkExactNames fails when obj has a member whose name is not exactly
// one of names. encoding/json matches names case-insensitively, so
// "Script" would fill the script field while every other reader treats
// it as another key.
func checkExactNames(obj []member, names map[string]bool, where string) error {
	for _, m := range obj {
		name := m.name
		if !names[name] {
			if known := foldMatch(name, names); known != "" {
				return fmt.Errorf("%s: key %q is not %q: names are case-sensitive", where, name, known)
			}
			return fmt.Errorf("%s: unknown key %q", where, name)
		}
	}
	return nil
}

func foldMatch(name string, names map[string]bool) string {
	for n := range names {
		if strings.EqualFold(n, name) {
			return n
		}
	}
	return ""
}
