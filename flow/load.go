// Package flow reads a flow document as its author writes it (YAML, or
// JSON, which is YAML too), checks it against the flow schema
// (flow.schema.json), embeds the scripts it names and returns the flow
// payload that writ flow sign signs (envelope.Flow).
package flow

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.yaml.in/yaml/v3"

	"github.com/writ-fleet/writ/envelope"
)

// Schema is the JSON Schema of a flow document.
//
//go:embed flow.schema.json
var Schema []byte

// MaxDocumentBytes bounds a flow document file.
const MaxDocumentBytes = 1 << 20

// Options say how Load builds the flow.
type Options struct {
	// Site is the flow's site when the document names none.
	Site string
	// Args set the flow's args (over the document's).
	Args map[string]json.RawMessage
	// Now and Valid: the flow is signed now, valid for Valid (default
	// envelope.DefaultFlowValidity).
	Now   time.Time
	Valid time.Duration
}

// document is the authored form: what the schema describes.
type document struct {
	Name      string                     `json:"name"`
	Site      string                     `json:"site"`
	Args      map[string]json.RawMessage `json:"args"`
	NotBefore time.Time                  `json:"not_before"`
	Steps     []docStep                  `json:"steps"`
	Finally   *docStep                   `json:"finally"`
}

type docStep struct {
	Name              string             `json:"name"`
	Script            string             `json:"script"`
	Args              json.RawMessage    `json:"args"`
	DependsOn         []string           `json:"depends_on"`
	ForEach           json.RawMessage    `json:"for_each"`
	Retries           int                `json:"retries"`
	Timeout           string             `json:"timeout"`
	Site              string             `json:"site"`
	Node              string             `json:"node"`
	Resources         envelope.Resources `json:"resources"`
	ContinueOnFailure bool               `json:"continue_on_failure"`
	NotBefore         time.Time          `json:"not_before"`
}

// Load reads the flow document at path and returns its flow, scripts
// embedded, validated and ready to sign. A script named by path is read
// from the document's directory and must stay inside it (no absolute
// path, no "..", no symlink out of it): a flow file from someone else
// cannot make its signer embed, and send, a file of theirs.
func Load(path string, opt Options) (*envelope.Flow, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("flow: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxDocumentBytes+1))
	if err != nil {
		return nil, fmt.Errorf("flow: %w", err)
	}
	if len(data) > MaxDocumentBytes {
		return nil, fmt.Errorf("flow: %s is over %d bytes", path, MaxDocumentBytes)
	}
	dir, err := os.OpenRoot(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("flow: %w", err)
	}
	defer dir.Close()
	return Parse(data, dir, opt)
}

// Parse builds the flow of document data; scripts named by path are read
// from dir.
func Parse(data []byte, dir *os.Root, opt Options) (*envelope.Flow, error) {
	var raw any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("flow: %w", err)
	}
	js, err := json.Marshal(raw)
	if err != nil {
		return nil, fmt.Errorf("flow: the document must map string keys to values: %w", err)
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(js))
	if err != nil {
		return nil, fmt.Errorf("flow: %w", err)
	}
	sch, err := schema()
	if err != nil {
		return nil, err
	}
	if err := sch.Validate(inst); err != nil {
		return nil, fmt.Errorf("flow: the document does not match the flow schema: %w", err)
	}
	var doc document
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("flow: %w", err)
	}

	now := opt.Now
	if now.IsZero() {
		now = time.Now()
	}
	site := doc.Site
	if site == "" {
		site = opt.Site
	}
	fl := envelope.NewFlow(doc.Name, site, now)
	if opt.Valid > 0 {
		fl.Expires = now.Add(opt.Valid).UTC().Truncate(time.Second)
	}
	fl.NotBefore = doc.NotBefore
	if len(doc.Args) > 0 || len(opt.Args) > 0 {
		args := map[string]json.RawMessage{}
		for k, v := range doc.Args {
			args[k] = v
		}
		for k, v := range opt.Args {
			args[k] = v
		}
		if fl.Args, err = json.Marshal(args); err != nil {
			return nil, fmt.Errorf("flow: args: %w", err)
		}
	}
	for i := range doc.Steps {
		s, err := doc.Steps[i].step(dir)
		if err != nil {
			return nil, err
		}
		fl.Steps = append(fl.Steps, s)
	}
	if doc.Finally != nil {
		s, err := doc.Finally.step(dir)
		if err != nil {
			return nil, err
		}
		fl.Finally = &s
	}
	if err := fl.Validate(); err != nil {
		return nil, err
	}
	return fl, nil
}

func (d *docStep) step(dir *os.Root) (envelope.Step, error) {
	s := envelope.Step{Name: d.Name, Script: d.Script, Args: d.Args, DependsOn: d.DependsOn, ForEach: d.ForEach, Retries: d.Retries,
		Site: d.Site, Node: d.Node, Resources: d.Resources, ContinueOnFailure: d.ContinueOnFailure, NotBefore: d.NotBefore}
	if d.Timeout != "" {
		t, err := time.ParseDuration(d.Timeout)
		if err != nil {
			return s, fmt.Errorf("flow: step %s: timeout: %w", d.Name, err)
		}
		s.Timeout = envelope.Duration(t)
	}
	if p, ok := ScriptPath(d.Script); ok {
		src, err := readScript(dir, p)
		if err != nil {
			return s, fmt.Errorf("flow: step %s: %w", d.Name, err)
		}
		s.Script = src
	}
	return s, nil
}

// ScriptPath reports whether a step's script names a file (one line ending
// in .tengo) rather than holding the source, and returns the path.
func ScriptPath(script string) (string, bool) {
	p := strings.TrimSpace(script)
	return p, !strings.ContainsAny(p, "\n\r") && strings.HasSuffix(p, ".tengo")
}

func readScript(dir *os.Root, p string) (string, error) {
	if dir == nil {
		return "", fmt.Errorf("script %s: a flow given inline cannot name script files", p)
	}
	if !filepath.IsLocal(p) {
		return "", fmt.Errorf("script %s: the path must be relative and inside the flow's directory", p)
	}
	f, err := dir.Open(p)
	if err != nil {
		return "", fmt.Errorf("script: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, envelope.MaxScriptBytes+1))
	if err != nil {
		return "", fmt.Errorf("script %s: %w", p, err)
	}
	if len(b) > envelope.MaxScriptBytes {
		return "", fmt.Errorf("script %s is over %d bytes", p, envelope.MaxScriptBytes)
	}
	if len(b) == 0 {
		return "", errors.New("script " + p + " is empty")
	}
	return string(b), nil
}

var (
	schemaOnce sync.Once
	compiled   *jsonschema.Schema
	schemaErr  error
)

func schema() (*jsonschema.Schema, error) {
	schemaOnce.Do(func() {
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(Schema))
		if err != nil {
			schemaErr = fmt.Errorf("flow schema: %w", err)
			return
		}
		c := jsonschema.NewCompiler()
		c.AssertFormat()
		const url = "https://writ-fleet.github.io/schemas/flow.schema.json"
		if err := c.AddResource(url, doc); err != nil {
			schemaErr = fmt.Errorf("flow schema: %w", err)
			return
		}
		compiled, schemaErr = c.Compile(url)
	})
	return compiled, schemaErr
}
