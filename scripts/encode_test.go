package scripts

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/d5/tengo/v2"
	tjson "github.com/d5/tengo/v2/stdlib/json"
)

// upstreamValues are one of every Tengo value type (maps with one key,
// since Tengo writes a map in Go's map order).
func upstreamValues() map[string]tengo.Object {
	at := time.Date(2026, 12, 8, 1, 2, 3, 4000, time.FixedZone("CET", 3600))
	return map[string]tengo.Object{
		"int":             &tengo.Int{Value: -42},
		"float":           &tengo.Float{Value: 0.1},
		"float big":       &tengo.Float{Value: 1e21},
		"float small":     &tengo.Float{Value: 1e-7},
		"float whole":     &tengo.Float{Value: 3},
		"true":            tengo.TrueValue,
		"false":           tengo.FalseValue,
		"char":            &tengo.Char{Value: 'é'},
		"string":          &tengo.String{Value: "plain"},
		"string escapes":  &tengo.String{Value: "a\"b\\c\nd\re\tf\x01g"},
		"string html":     &tengo.String{Value: "<a href='x'>&amp;</a>"},
		"string unicode":  &tengo.String{Value: "héllo \u2028 wörld ☃"},
		"bytes":           &tengo.Bytes{Value: []byte("hi\x00there")},
		"time":            &tengo.Time{Value: at},
		"undefined":       tengo.UndefinedValue,
		"array":           &tengo.Array{Value: []tengo.Object{&tengo.Int{Value: 1}, &tengo.String{Value: "two"}, &tengo.Char{Value: 'x'}}},
		"immutable array": &tengo.ImmutableArray{Value: []tengo.Object{tengo.TrueValue, tengo.UndefinedValue}},
		"map":             &tengo.Map{Value: map[string]tengo.Object{"k<": &tengo.Float{Value: 2.5}}},
		"immutable map":   &tengo.ImmutableMap{Value: map[string]tengo.Object{"k": &tengo.Bytes{Value: []byte{1, 2}}}},
		"nested":          &tengo.Map{Value: map[string]tengo.Object{"a": &tengo.Array{Value: []tengo.Object{&tengo.Map{Value: map[string]tengo.Object{"t": &tengo.Time{Value: at}}}}}}},
		"error":           &tengo.Error{Value: &tengo.String{Value: "boom"}},
		"error empty":     &tengo.Error{},
		"function":        &tengo.UserFunction{Name: "f", Value: func(...tengo.Object) (tengo.Object, error) { return nil, nil }},
		"error in array":  &tengo.Array{Value: []tengo.Object{&tengo.Int{Value: 1}, &tengo.Error{Value: &tengo.Int{Value: 2}}}},
	}
}

// TestEncodeJSON_AsUpstream: json.encode gives, byte for byte, what
// Tengo v2.17's own json.encode gives, for every value type.
func TestEncodeJSON_AsUpstream(t *testing.T) {
	for name, v := range upstreamValues() {
		want, werr := tjson.Encode(v)
		got, err := EncodeJSON(v, 1<<20)
		if string(got) != string(want) || (err == nil) != (werr == nil) {
			t.Errorf("%s: EncodeJSON = %s, %v; Tengo's json.encode = %s, %v", name, got, err, want, werr)
		}
	}
}

// TestEncodeValue: a result is Tengo's encoding where that is valid JSON;
// what Tengo's would drop or leave invalid is refused or mended.
func TestEncodeValue(t *testing.T) {
	for name, v := range upstreamValues() {
		want, _ := tjson.Encode(v)
		got, err := EncodeValue(v, 1<<20)
		switch name {
		case "error", "error empty", "function", "error in array":
			if err == nil || !strings.Contains(err.Error(), "not JSON-encodable") {
				t.Errorf("%s: EncodeValue = %s, %v; want refused", name, got, err)
			}
		default:
			if err != nil || string(got) != string(want) {
				t.Errorf("%s: EncodeValue = %s, %v; want %s", name, got, err, want)
			}
		}
	}
	got, err := EncodeValue(&tengo.String{Value: "a\xffb"}, 100)
	if err != nil || string(got) != "\"a\uFFFDb\"" {
		t.Errorf("EncodeValue(invalid UTF-8) = %q, %v", got, err)
	}
}

// TestRender_AsUpstream: log values print as Tengo's String prints them.
func TestRender_AsUpstream(t *testing.T) {
	for name, v := range upstreamValues() {
		if got, want := render(v, 1<<20), v.String(); got != want {
			t.Errorf("%s: render = %q, Tengo's String = %q", name, got, want)
		}
	}
}

// TestPrint_AsUpstream: fmt.print and fmt.println write what Tengo's do
// (tengo.ToString of each argument, nothing between them); log.info puts
// a space between them.
func TestPrint_AsUpstream(t *testing.T) {
	e := New(Config{}, nil)
	var lines []string
	_, err := e.Run(context.Background(), `fmt := import("fmt"); log := import("log")
x := undefined
fmt.println("a", 1, 'c', [1, "s"], x, {k: "v"}, error("e"))
fmt.print("p", 2.5)
log.info("a", 1, x, "b")`, Input{JobID: "j", Log: func(_, line string) { lines = append(lines, line) }})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{`a1c[1, "s"]{k: "v"}error: "e"`, "p2.5", "a 1  b"}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Errorf("log lines = %q, want %q", lines, want)
	}
}
