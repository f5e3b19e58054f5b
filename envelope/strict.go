package envelope

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
)

// maxJSONDepth bounds the nesting of a payload's JSON: the job's own
// structure is two levels deep, args a few more.
const maxJSONDepth = 64

// members reads a JSON object's members in one pass, keyed by their exact
// names. A name that appears twice is an error: encoding/json would keep
// the last one silently, while another reader (jq, Python) may show the
// first, so a reviewer and writ would see different documents. Trailing
// data after the object is an error too.
func members(data []byte) (map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	out := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		name := tok.(string) // inside an object, Token returns a name here
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("key %q appears twice", name)
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		out[name] = v
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after the JSON object")
	}
	return out, nil
}

// checkDuplicateKeys walks a JSON document and fails on the first object,
// at any depth, that holds a name twice, or on nesting past maxJSONDepth.
func checkDuplicateKeys(data []byte) error {
	type frame struct {
		object  bool
		wantKey bool
		keys    map[string]bool
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if d, ok := tok.(json.Delim); ok && (d == '}' || d == ']') {
			stack = stack[:len(stack)-1]
			continue
		}
		if top != nil && top.object && top.wantKey {
			name := tok.(string)
			if top.keys[name] {
				return fmt.Errorf("key %q appears twice in one object", name)
			}
			top.keys[name] = true
			top.wantKey = false
			continue
		}
		if top != nil && top.object {
			top.wantKey = true // this value ends the member; a name follows
		}
		if d, ok := tok.(json.Delim); ok {
			if len(stack) >= maxJSONDepth {
				return fmt.Errorf("nested more than %d levels deep", maxJSONDepth)
			}
			stack = append(stack, &frame{object: d == '{', wantKey: d == '{', keys: map[string]bool{}})
		}
	}
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
func checkExactNames(obj map[string]json.RawMessage, names map[string]bool, where string) error {
	for name := range obj {
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
