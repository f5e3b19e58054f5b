package envelope

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
)

// tokenDuplicates is the reference the scanner is held to: json.Decoder's
// tokens, and every object's names, unescaped, at any depth.
func tokenDuplicates(data []byte) (dup bool, err error) {
	type frame struct {
		object, wantKey bool
		keys            map[string]bool
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return false, nil
		}
		if err != nil {
			return false, err
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
				return true, nil
			}
			top.keys[name], top.wantKey = true, false
			continue
		}
		if top != nil && top.object {
			top.wantKey = true
		}
		if d, ok := tok.(json.Delim); ok {
			stack = append(stack, &frame{object: d == '{', wantKey: d == '{', keys: map[string]bool{}})
		}
	}
}

func TestMembers(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // "" for accepted, else part of the error
	}{
		{`{}`, ""},
		{` {"a":1, "b":[1,{"a":2}], "c":{"a":{"a":null}}, "d":"}\"{"} `, ""},
		{`{"a":1,"a":2}`, "twice"},
		{`{"a":1,"\u0061":2}`, "twice"},
		{`{"x":{"k":true,"k":false}}`, "twice"},
		{`{"x":[{"k":1},{"k":1,"k":2}]}`, "twice"},
		{`{"a":1} x`, "trailing"},
		{`[1]`, "not a JSON object"},
		{`{"a":}`, "not valid"},
		{`{"a":1,}`, "not valid"},
		{`{"a" 1}`, "not valid"},
		{`{"a":"open}`, "not valid"},
		{`{"a":` + strings.Repeat("[", maxJSONDepth) + strings.Repeat("]", maxJSONDepth) + `}`, "levels deep"},
	} {
		_, err := members([]byte(tc.in), true)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("members(%s) = %v, want %q", tc.in, err, tc.want)
		}
	}
	// Many names cost n, not n²: 10,000 distinct ones, then one repeated.
	var b strings.Builder
	b.WriteString("{")
	for i := 0; i < 10000; i++ {
		fmt.Fprintf(&b, `"k%d":%d,`, i, i)
	}
	b.WriteString(`"k42":0}`)
	if _, err := members([]byte(b.String()), true); err == nil || !strings.Contains(err.Error(), `"k42"`) {
		t.Errorf("members(10,000 names and a repeat) = %v, want k42 twice", err)
	}
}

// FuzzMembers holds the scanner to json.Decoder on every valid JSON object:
// the same documents have repeated names, and the values it returns are
// exactly the members' JSON.
func FuzzMembers(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":1,"a":2}`, `{"a":{"b":[1,{"c":2,"c":3}]}}`, `{"\u0061":1,"a":2}`, `{"s":"x\"y","n":-1.5e3,"t":true}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var obj map[string]json.RawMessage
		if json.Unmarshal(data, &obj) != nil || obj == nil {
			members(data, true) // must not panic
			return
		}
		dup, err := tokenDuplicates(data)
		if err != nil {
			return
		}
		ms, serr := members(data, true)
		if serr != nil && strings.Contains(serr.Error(), "levels deep") {
			return
		}
		if dup != (serr != nil) {
			t.Fatalf("members(%q) = %v; json.Decoder finds a repeated name: %v", data, serr, dup)
		}
		if serr == nil {
			for _, m := range ms {
				if !json.Valid(m.value) {
					t.Fatalf("member %q value %q is not JSON", m.name, m.value)
				}
			}
		}
	})
}
