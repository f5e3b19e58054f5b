package scripts

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/d5/tengo/v2"
)

// maxEncodeDepth bounds how deeply encoders follow nested values: the JSON
// a job reads (args) is bounded the same way by envelope.
const maxEncodeDepth = 64

// Errors of the bounded encoders. They stop while encoding, so a value that
// contains itself, or one that is small to build and huge to write out (a
// = [a, a] forty times is 2^40 elements), costs at most the limit.
var (
	// ErrCycle: the value contains itself.
	ErrCycle = errors.New("value contains itself (a cycle)")
	// ErrTooDeep: the value nests deeper than maxEncodeDepth.
	ErrTooDeep = fmt.Errorf("value nests deeper than %d levels", maxEncodeDepth)
)

// TooLargeError: the encoding passed its limit.
type TooLargeError struct{ Limit int }

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("encoded value is larger than the limit of %d bytes", e.Limit)
}

// EncodeJSON writes o as JSON, at most max bytes, exactly as Tengo's own
// json.encode does (d5/tengo v2.17.0 stdlib/json/encode.go) for every
// value type: Undefined is null, a char its code point, a time
// time.Time's JSON, bytes base64, strings escaped as Tengo escapes them
// (control characters, quote and backslash; not <, > or &), and a value
// Tengo cannot encode (an error, a function) written as nothing. Maps are
// written with sorted keys (Tengo's order is Go's map order: sorted is
// one of its outputs). Unlike Tengo's it stops at a cycle, a depth and
// the size limit, while encoding.
func EncodeJSON(o tengo.Object, max int) ([]byte, error) {
	e := &encoder{max: max, path: map[tengo.Object]bool{}}
	if err := e.value(o, 0); err != nil {
		return nil, err
	}
	return e.buf.Bytes(), nil
}

// EncodeValue is EncodeJSON for a value writ keeps and parses again (a
// job's result, a VM spec): what Tengo's encoder would make invalid JSON
// of is refused or mended instead. A value it drops (an error, a
// function) is refused, naming its type, and invalid UTF-8 in a string is
// written as U+FFFD, as Go's encoding/json writes it.
func EncodeValue(o tengo.Object, max int) ([]byte, error) {
	e := &encoder{max: max, path: map[tengo.Object]bool{}, strict: true}
	if err := e.value(o, 0); err != nil {
		return nil, err
	}
	return e.buf.Bytes(), nil
}

type encoder struct {
	buf    bytes.Buffer
	max    int
	path   map[tengo.Object]bool // containers being written: meeting one again is a cycle
	strict bool                  // refuse what Tengo's encoder drops
}

func (e *encoder) write(b []byte) error {
	if e.buf.Len()+len(b) > e.max {
		return &TooLargeError{Limit: e.max}
	}
	e.buf.Write(b)
	return nil
}

func (e *encoder) str(s string) error {
	if e.strict && !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if len(s)+2 > e.max-e.buf.Len() {
		return &TooLargeError{Limit: e.max}
	}
	return e.write(appendTengoString(nil, s))
}

// appendTengoString appends s as a JSON string the way Tengo's
// encodeString does: quote, backslash and bytes below 0x20 escaped (\n,
// \r, \t, or \u00XX), everything else, invalid UTF-8, <, > and & too,
// as it is.
func appendTengoString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c == '\n':
			b = append(b, '\\', 'n')
		case c == '\r':
			b = append(b, '\\', 'r')
		case c == '\t':
			b = append(b, '\\', 't')
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

// enter marks container c as being written.
func (e *encoder) enter(c tengo.Object, depth int) error {
	if depth >= maxEncodeDepth {
		return ErrTooDeep
	}
	if e.path[c] {
		return ErrCycle
	}
	e.path[c] = true
	return nil
}

func (e *encoder) object(m map[string]tengo.Object, depth int) error {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if err := e.write([]byte{'{'}); err != nil {
		return err
	}
	for i, k := range keys {
		if i > 0 {
			if err := e.write([]byte{','}); err != nil {
				return err
			}
		}
		if err := e.str(k); err != nil {
			return err
		}
		if err := e.write([]byte{':'}); err != nil {
			return err
		}
		if err := e.value(m[k], depth+1); err != nil {
			return err
		}
	}
	return e.write([]byte{'}'})
}

func (e *encoder) array(a []tengo.Object, depth int) error {
	if err := e.write([]byte{'['}); err != nil {
		return err
	}
	for i, x := range a {
		if i > 0 {
			if err := e.write([]byte{','}); err != nil {
				return err
			}
		}
		if err := e.value(x, depth+1); err != nil {
			return err
		}
	}
	return e.write([]byte{']'})
}

// container returns a Tengo container's members: a map's (isMap) or an
// array's, or ok false for a value that holds no others.
func container(o tengo.Object) (m map[string]tengo.Object, a []tengo.Object, isMap, ok bool) {
	switch v := o.(type) {
	case *tengo.Map:
		return v.Value, nil, true, true
	case *tengo.ImmutableMap:
		return v.Value, nil, true, true
	case *tengo.Array:
		return nil, v.Value, false, true
	case *tengo.ImmutableArray:
		return nil, v.Value, false, true
	}
	return nil, nil, false, false
}

func (e *encoder) value(o tengo.Object, depth int) error {
	if m, a, isMap, ok := container(o); ok {
		if err := e.enter(o, depth); err != nil {
			return err
		}
		defer delete(e.path, o)
		if isMap {
			return e.object(m, depth)
		}
		return e.array(a, depth)
	}
	switch v := o.(type) {
	case *tengo.String:
		return e.str(v.Value)
	case *tengo.Int:
		return e.write(strconv.AppendInt(nil, v.Value, 10))
	case *tengo.Float:
		if math.IsNaN(v.Value) || math.IsInf(v.Value, 0) {
			return fmt.Errorf("unsupported float value %v", v.Value)
		}
		b, _ := json.Marshal(v.Value) // Go's and Tengo's: both ES6 number formatting
		return e.write(b)
	case *tengo.Bool:
		if v.IsFalsy() {
			return e.write([]byte("false"))
		}
		return e.write([]byte("true"))
	case *tengo.Char:
		return e.write(strconv.AppendInt(nil, int64(v.Value), 10))
	case *tengo.Bytes:
		if base64.StdEncoding.EncodedLen(len(v.Value))+2 > e.max-e.buf.Len() {
			return &TooLargeError{Limit: e.max}
		}
		return e.str(base64.StdEncoding.EncodeToString(v.Value))
	case *tengo.Time:
		b, err := v.Value.MarshalJSON()
		if err != nil {
			return err
		}
		return e.write(b)
	case *tengo.Undefined, nil:
		return e.write([]byte("null"))
	}
	if e.strict {
		return fmt.Errorf("a %s value is not JSON-encodable", o.TypeName())
	}
	return nil // Tengo's encoder writes nothing for it
}

// render writes o as text for a log line exactly as Tengo's String does
// for every value type (maps with sorted keys), at most max bytes: a value
// met again inside itself is written "<cycle>", one nested too deep
// "<too deep>", and a cut line ends in "…". Unlike Tengo's String, it
// never recurses forever.
func render(o tengo.Object, max int) string {
	r := &renderer{max: max, path: map[tengo.Object]bool{}}
	r.value(o, 0)
	if r.cut {
		return r.buf.String() + "…"
	}
	return r.buf.String()
}

type renderer struct {
	buf  bytes.Buffer
	max  int
	cut  bool
	path map[tengo.Object]bool
}

func (r *renderer) write(s string) {
	if r.cut {
		return
	}
	if room := r.max - r.buf.Len(); len(s) > room {
		r.buf.WriteString(s[:max(room, 0)])
		r.cut = true
		return
	}
	r.buf.WriteString(s)
}

func (r *renderer) value(o tengo.Object, depth int) {
	if r.cut {
		return
	}
	var m map[string]tengo.Object
	var a []tengo.Object
	isMap := false
	switch v := o.(type) {
	case *tengo.Map:
		m, isMap = v.Value, true
	case *tengo.ImmutableMap:
		m, isMap = v.Value, true
	case *tengo.Array:
		a = v.Value
	case *tengo.ImmutableArray:
		a = v.Value
	case *tengo.Error:
		if v.Value == nil {
			r.write("error")
			return
		}
		r.write("error: ")
		r.value(v.Value, depth+1)
		return
	case *tengo.String:
		r.write(strconv.Quote(v.Value))
		return
	case nil:
		r.write("<undefined>")
		return
	default:
		r.write(o.String())
		return
	}
	if depth >= maxEncodeDepth {
		r.write("<too deep>")
		return
	}
	if r.path[o] {
		r.write("<cycle>")
		return
	}
	r.path[o] = true
	defer delete(r.path, o)
	if isMap {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		r.write("{")
		for i, k := range keys {
			if i > 0 {
				r.write(", ")
			}
			r.write(k + ": ")
			r.value(m[k], depth+1)
		}
		r.write("}")
		return
	}
	r.write("[")
	for i, x := range a {
		if i > 0 {
			r.write(", ")
		}
		r.value(x, depth+1)
	}
	r.write("]")
}

// maxFormatNodes bounds the values fmt.printf and fmt.sprintf may format:
// Tengo's formatter follows nested values with no end, so they are walked
// here first.
const maxFormatNodes = 10000

// checkFormattable refuses arguments Tengo's formatter cannot print in
// bounded time: one that contains itself, nests past maxEncodeDepth, or
// holds more than maxFormatNodes values in all.
func checkFormattable(args []tengo.Object) error {
	nodes := 0
	path := map[tengo.Object]bool{}
	var walk func(o tengo.Object, depth int) error
	walk = func(o tengo.Object, depth int) error {
		nodes++
		if nodes > maxFormatNodes {
			return fmt.Errorf("arguments hold more than %d values", maxFormatNodes)
		}
		m, kids, _, ok := container(o)
		if !ok {
			return nil
		}
		for _, x := range m {
			kids = append(kids, x)
		}
		if depth >= maxEncodeDepth {
			return ErrTooDeep
		}
		if path[o] {
			return ErrCycle
		}
		path[o] = true
		defer delete(path, o)
		for _, k := range kids {
			if err := walk(k, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	for _, a := range args {
		if err := walk(a, 0); err != nil {
			return err
		}
	}
	return nil
}
