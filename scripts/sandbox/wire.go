package sandbox

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"

	"github.com/d5/tengo/v2"
	"github.com/writ-fleet/writ/scripts"
)

// The sandbox protocol: the runner and each sandbox process exchange
// frames over the child's stdin and stdout, a 4-byte big-endian length and
// that many bytes of JSON. One job runs at a time in one child:
//
//	runner → child   run   the script, the job's input and its limits
//	child  → runner  log   a line of the job log
//	child  → runner  call  a host-layer function (storage, net, vm) with its arguments
//	runner → child   ret   what the host layer answered
//	child  → runner  over  the run's heap passed its memory limit; the
//	                       runner kills the child, since a script inside
//	                       one builtin cannot stop by itself
//	child  → runner  done  the result, or how the run stopped
//
// Host-layer calls run in the runner, under the job's owner: the child
// holds no host layer, no file, no socket. It is trusted with nothing, and
// the runner bounds what it reads from it (maxFrame).

// maxFrame bounds one frame in either direction: the largest is a call
// carrying a value of up to MaxValueBytes (4 MiB) with its encoding.
const maxFrame = 16 << 20

// frame is one message of the protocol; Op says which fields it uses.
type frame struct {
	Op string `json:"op"`

	// run
	Script  string          `json:"script,omitempty"`
	Input   *wireInput      `json:"input,omitempty"`
	Timeout time.Duration   `json:"timeout,omitempty"` // what is left of the job's timeout
	Limit   string          `json:"limit,omitempty"`   // the timeout as the job set it, for messages
	Memory  int64           `json:"memory,omitempty"`  // bytes the run may hold
	Result  json.RawMessage `json:"result,omitempty"`  // done

	// log
	Level string `json:"level,omitempty"`
	Line  string `json:"line,omitempty"`

	// call
	Module string   `json:"module,omitempty"`
	Name   string   `json:"name,omitempty"`
	Args   []*value `json:"args,omitempty"`

	// ret
	Value  *value `json:"value,omitempty"`
	Failed bool   `json:"failed,omitempty"` // the host layer stopped the run (Run.Fail)

	// ret and done: an error, and for done its kind (see stopKind)
	Kind   string `json:"kind,omitempty"`
	Reason string `json:"reason,omitempty"`
	Err    string `json:"err,omitempty"`
	// done: the child's memory after the run; the runner retires a
	// child that holds too much.
	Held int64 `json:"held,omitempty"`
}

// wireInput is the part of Input a child needs.
type wireInput struct {
	JobID   string            `json:"job_id"`
	Name    string            `json:"name"`
	Site    string            `json:"site"`
	Node    string            `json:"node"`
	Args    json.RawMessage   `json:"args,omitempty"`
	Attempt int               `json:"attempt"`
	Inputs  json.RawMessage   `json:"inputs,omitempty"`
	Item    json.RawMessage   `json:"item,omitempty"`
	Secrets map[string]string `json:"secrets,omitempty"`
}

// Kinds of a done frame's stop.
const (
	stopOK       = ""
	stopTimeout  = "timeout"
	stopAllocs   = "alloc_limit"
	stopMemory   = "memory_limit"
	stopRefused  = "refused" // compile refusal: Reason is its envelope reason
	stopRuntime  = "runtime"
	stopHost     = "host"     // a host-layer call stopped it: the runner holds the error
	stopCanceled = "canceled" // the runner asked (shutdown)
	stopCycle    = "cycle"
	stopResult   = "result_too_large"
	stopStack    = "stack_overflow" // Tengo's own stack limit (a recursion); a Go stack overflow kills the child instead
)

func writeFrame(w *bufio.Writer, f *frame) error {
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	if len(b) > maxFrame {
		return fmt.Errorf("sandbox frame of %d bytes is over the limit of %d", len(b), maxFrame)
	}
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	if _, err := w.Write(n[:]); err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return err
	}
	return w.Flush()
}

func readFrame(r *bufio.Reader) (*frame, error) {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > maxFrame {
		return nil, fmt.Errorf("sandbox frame of %d bytes is over the limit of %d", size, maxFrame)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	f := new(frame)
	if err := json.Unmarshal(b, f); err != nil {
		return nil, fmt.Errorf("sandbox frame: %w", err)
	}
	return f, nil
}

// value is a Tengo value on the wire, with its type kept (JSON alone would
// lose bytes from strings and errors from values).
type value struct {
	K string            `json:"k"` // s string, y bytes, i int, f float, b bool, c char, u undefined, e error, t time, a array, m map
	S string            `json:"s,omitempty"`
	B []byte            `json:"b,omitempty"` // bytes, and strings that are not UTF-8
	I int64             `json:"i,omitempty"`
	F float64           `json:"f,omitempty"`
	A []*value          `json:"a,omitempty"`
	M map[string]*value `json:"m,omitempty"`
}

// Bounds of a value on the wire, well above what a host call needs.
const (
	maxWireDepth = 64
	maxWireNodes = 100_000
)

// errWireLimit: a value passed to a host call is over the wire's bounds.
var errWireLimit = fmt.Errorf("value is too large to pass to the host (at most %d values, %d levels)", maxWireNodes, maxWireDepth)

// toWire converts o, refusing cycles and values over the bounds.
func toWire(o tengo.Object) (*value, error) {
	w := &wirer{onPath: map[any]bool{}}
	return w.conv(o, 0)
}

type wirer struct {
	nodes  int
	onPath map[any]bool
}

func (w *wirer) conv(o tengo.Object, depth int) (*value, error) {
	w.nodes++
	if w.nodes > maxWireNodes || depth > maxWireDepth {
		return nil, errWireLimit
	}
	str := func(s string) *value {
		if utf8.ValidString(s) {
			return &value{K: "s", S: s}
		}
		return &value{K: "s", B: []byte(s)}
	}
	switch v := o.(type) {
	case *tengo.String:
		return str(v.Value), nil
	case *tengo.Bytes:
		return &value{K: "y", B: v.Value}, nil
	case *tengo.Int:
		return &value{K: "i", I: v.Value}, nil
	case *tengo.Float:
		return &value{K: "f", F: v.Value}, nil
	case *tengo.Bool:
		if !v.IsFalsy() {
			return &value{K: "b", I: 1}, nil
		}
		return &value{K: "b"}, nil
	case *tengo.Char:
		return &value{K: "c", I: int64(v.Value)}, nil
	case *tengo.Undefined:
		return &value{K: "u"}, nil
	case *tengo.Time:
		return &value{K: "t", I: v.Value.UnixNano()}, nil
	case *tengo.Error:
		inner, err := w.conv(v.Value, depth+1)
		if err != nil {
			return nil, err
		}
		return &value{K: "e", A: []*value{inner}}, nil
	case *tengo.Array:
		return w.list(v, v.Value, depth)
	case *tengo.ImmutableArray:
		return w.list(v, v.Value, depth)
	case *tengo.Map:
		return w.dict(v, v.Value, depth)
	case *tengo.ImmutableMap:
		return w.dict(v, v.Value, depth)
	}
	return nil, fmt.Errorf("a %s value cannot be passed to the host", o.TypeName())
}

func (w *wirer) list(key any, elems []tengo.Object, depth int) (*value, error) {
	if w.onPath[key] {
		return nil, scripts.ErrCycle
	}
	w.onPath[key] = true
	defer delete(w.onPath, key)
	out := &value{K: "a", A: make([]*value, 0, len(elems))}
	for _, e := range elems {
		c, err := w.conv(e, depth+1)
		if err != nil {
			return nil, err
		}
		out.A = append(out.A, c)
	}
	return out, nil
}

func (w *wirer) dict(key any, m map[string]tengo.Object, depth int) (*value, error) {
	if w.onPath[key] {
		return nil, scripts.ErrCycle
	}
	w.onPath[key] = true
	defer delete(w.onPath, key)
	out := &value{K: "m", M: make(map[string]*value, len(m))}
	for k, e := range m {
		c, err := w.conv(e, depth+1)
		if err != nil {
			return nil, err
		}
		out.M[k] = c
	}
	return out, nil
}

// fromWire converts a wire value back. A malformed one is an error: the
// runner reads values from a child it does not trust.
func fromWire(v *value) (tengo.Object, error) {
	return fromWireDepth(v, 0)
}

func fromWireDepth(v *value, depth int) (tengo.Object, error) {
	if v == nil || depth > maxWireDepth {
		return nil, errors.New("malformed value from the sandbox")
	}
	switch v.K {
	case "s":
		if v.B != nil {
			return &tengo.String{Value: string(v.B)}, nil
		}
		return &tengo.String{Value: v.S}, nil
	case "y":
		return &tengo.Bytes{Value: v.B}, nil
	case "i":
		return &tengo.Int{Value: v.I}, nil
	case "f":
		return &tengo.Float{Value: v.F}, nil
	case "b":
		if v.I != 0 {
			return tengo.TrueValue, nil
		}
		return tengo.FalseValue, nil
	case "c":
		return &tengo.Char{Value: rune(v.I)}, nil
	case "u":
		return tengo.UndefinedValue, nil
	case "t":
		return &tengo.Time{Value: time.Unix(0, v.I)}, nil
	case "e":
		if len(v.A) != 1 {
			return nil, errors.New("malformed error value from the sandbox")
		}
		inner, err := fromWireDepth(v.A[0], depth+1)
		if err != nil {
			return nil, err
		}
		return &tengo.Error{Value: inner}, nil
	case "a":
		out := make([]tengo.Object, len(v.A))
		for i, e := range v.A {
			o, err := fromWireDepth(e, depth+1)
			if err != nil {
				return nil, err
			}
			out[i] = o
		}
		return &tengo.Array{Value: out}, nil
	case "m":
		out := make(map[string]tengo.Object, len(v.M))
		for k, e := range v.M {
			o, err := fromWireDepth(e, depth+1)
			if err != nil {
				return nil, err
			}
			out[k] = o
		}
		return &tengo.Map{Value: out}, nil
	}
	return nil, fmt.Errorf("malformed value from the sandbox (kind %q)", v.K)
}
