// Package poolfile is the one type through which a file of the node's
// storage pool reaches a hypervisor. Only packages under sal/ may import
// it, so only they can make a File: sal/storage, after resolving a path to
// a regular file of a volume or a cached image (storage.Pool.Holds), and
// sal/vm, reading back a record it wrote. Everyone else holds Files they
// were given and reads their paths; a string from a script, a request or a
// peer never becomes one by conversion (STYLE.md, "Hostile input").
package poolfile

import "encoding/json"

// File is a resolved path to a regular file of the storage pool. The zero
// File is "no file". It has no UnmarshalJSON on purpose: decoding cannot
// make one either.
type File struct{ path string }

// Make wraps a path the caller has resolved and checked (or wrote itself).
func Make(path string) File { return File{path: path} }

// Path is the file's resolved path ("" for the zero File).
func (f File) Path() string { return f.path }

// IsZero reports whether f is no file.
func (f File) IsZero() bool { return f.path == "" }

// String is the path.
func (f File) String() string { return f.path }

// MarshalJSON writes the path as a JSON string, for records and views.
func (f File) MarshalJSON() ([]byte, error) { return json.Marshal(f.path) }
