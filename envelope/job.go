package envelope

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"regexp"
	"strings"
	"time"
	"unicode"

	"github.com/writ-fleet/writ/keys"
)

// Limits and defaults of a job payload.
const (
	// MaxScriptBytes bounds the Tengo source of a job.
	MaxScriptBytes = 256 << 10
	// MaxArgsBytes bounds the JSON args object of a job.
	MaxArgsBytes = 64 << 10
	// MaxNameLen bounds a job's name.
	MaxNameLen = 128
	// MaxValidity bounds expires - not_before, which also bounds how long
	// replay records are kept.
	MaxValidity = 7 * 24 * time.Hour
	// MaxTimeout bounds a job's run time.
	MaxTimeout = 24 * time.Hour
	// MaxRetriesLimit bounds max_retries.
	MaxRetriesLimit = 25
	// DefaultTimeout is the run time of a job that names none.
	DefaultTimeout = 5 * time.Minute
	// DefaultValidity is how long a job built by NewJob stays valid.
	DefaultValidity = time.Hour
	// DefaultMaxRetries is the retry limit of a job built by NewJob.
	DefaultMaxRetries = 3
	// ClockSkew is the back-dating NewJob gives not_before so that a
	// verifier whose clock is slightly behind accepts a fresh job.
	ClockSkew = time.Minute
)

var (
	siteRe  = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	nodeRe  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	nonceRe = regexp.MustCompile(`^[A-Za-z0-9_-]{8,128}$`)
	userRe  = regexp.MustCompile(`^[a-z][a-z0-9._-]{0,63}$`)
)

// ValidUser reports whether s is a well-formed user name (the ledger's
// users; the owners of what jobs make on nodes).
func ValidUser(s string) bool { return userRe.MatchString(s) }

// ValidSite reports whether s is a well-formed site name: lower-case letters,
// digits and dashes, 1–63 characters, starting with a letter or digit.
func ValidSite(s string) bool { return siteRe.MatchString(s) }

// ValidNode reports whether s is a well-formed node ID.
func ValidNode(s string) bool { return nodeRe.MatchString(s) }

// Duration is a time.Duration that encodes as a Go duration string ("90s").
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Resources are what a job needs from the node it runs on.
type Resources struct {
	CPU      int `json:"cpu,omitempty"`
	MemoryMB int `json:"memory_mb,omitempty"`
	DiskGB   int `json:"disk_gb,omitempty"`
}

// Job is the payload of a job envelope.
type Job struct {
	// Name is a label for people; it need not be unique.
	Name string `json:"name"`
	// Script is the Tengo source to run.
	Script string `json:"script"`
	// Site is the site to run on. Required unless AnySite is set (a node
	// pinned with Node must name its site too).
	Site string `json:"site,omitempty"`
	// Node pins the job to one node; optional.
	Node string `json:"node,omitempty"`
	// AnySite lets coord send the job to any site whose signing policy its
	// signatures satisfy (and, with Resources, where a node has room); Site,
	// if set, is then only a preference. It cannot be combined with Node.
	AnySite bool `json:"any_site,omitempty"`
	// Args is a JSON object the script reads as job.args.
	Args json.RawMessage `json:"args,omitempty"`
	// NotBefore and Expires bound when the job may be accepted and run.
	NotBefore time.Time `json:"not_before"`
	Expires   time.Time `json:"expires"`
	// Nonce makes each signed job unique; reusing one is a replay.
	Nonce string `json:"nonce"`
	// Timeout bounds one run; zero means DefaultTimeout.
	Timeout Duration `json:"timeout,omitempty"`
	// MaxRetries is how often an infrastructure failure is retried.
	MaxRetries int `json:"max_retries"`
	// Resources are what the job needs from its node; optional.
	Resources Resources `json:"resources,omitzero"`
	// Secrets are values sealed (package seal: age to the ssh-ed25519
	// keys of the nodes that may run the job) so only the runner that
	// executes it can open them; the script reads them as
	// job.secrets.NAME. Each value is an ASCII-armored age file.
	Secrets map[string]string `json:"secrets,omitempty"`
}

// Bounds of a job's secrets.
const (
	MaxSecrets      = 32
	MaxSealedSecret = 16 << 10
	sealedPrefix    = "-----BEGIN AGE ENCRYPTED FILE-----"
)

var secretNameRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,63}$`)

// NewJob returns a job for script on site, valid from now (back-dated by
// ClockSkew) for DefaultValidity, with a random nonce, DefaultTimeout and
// DefaultMaxRetries. Callers adjust fields before signing.
func NewJob(name, script, site string, now time.Time) *Job {
	var nonce [16]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		panic("crypto/rand failed: " + err.Error()) // never happens on Linux
	}
	return &Job{
		Name:       name,
		Script:     script,
		Site:       site,
		NotBefore:  now.Add(-ClockSkew).UTC().Truncate(time.Second),
		Expires:    now.Add(DefaultValidity).UTC().Truncate(time.Second),
		Nonce:      hex.EncodeToString(nonce[:]),
		Timeout:    Duration(DefaultTimeout),
		MaxRetries: DefaultMaxRetries,
	}
}

// RunTimeout returns the job's timeout, or DefaultTimeout when it names none.
func (j *Job) RunTimeout() time.Duration {
	if j.Timeout <= 0 {
		return DefaultTimeout
	}
	return time.Duration(j.Timeout)
}

// Validate checks the job's fields and limits, not its time window.
func (j *Job) Validate() error {
	bad := func(format string, a ...any) error {
		return &Error{Reason: job.ReasonInvalidJob, Msg: fmt.Sprintf(format, a...)}
	}
	switch {
	case j.Name == "":
		return bad("name is empty")
	case len(j.Name) > MaxNameLen:
		return bad("name is %d bytes, the limit is %d", len(j.Name), MaxNameLen)
	case !printable(j.Name):
		return bad("name holds control characters")
	case j.Script == "":
		return bad("script is empty")
	case len(j.Script) > MaxScriptBytes:
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("script is %d bytes, the limit is %d", len(j.Script), MaxScriptBytes)}
	case len(j.Args) > MaxArgsBytes:
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("args are %d bytes, the limit is %d", len(j.Args), MaxArgsBytes)}
	case j.Site == "" && j.Node == "" && !j.AnySite:
		return bad("job names neither a site nor a node (nor allows any site)")
	case j.AnySite && j.Node != "":
		return bad("a job for any site cannot pin a node")
	case j.Site != "" && !ValidSite(j.Site):
		return bad("site %q is not a valid site name (lower-case letters, digits, dashes)", j.Site)
	case j.Node != "" && !ValidNode(j.Node):
		return bad("node %q is not a valid node id", j.Node)
	case !nonceRe.MatchString(j.Nonce):
		return bad("nonce must be 8-128 characters of [A-Za-z0-9_-]")
	case j.NotBefore.IsZero() || j.Expires.IsZero():
		return bad("not_before and expires are both required")
	case !j.Expires.After(j.NotBefore):
		return bad("expires (%s) is not after not_before (%s)", j.Expires.Format(time.RFC3339), j.NotBefore.Format(time.RFC3339))
	case j.Expires.Sub(j.NotBefore) > MaxValidity:
		return bad("validity window is %s, the limit is %s", j.Expires.Sub(j.NotBefore), MaxValidity)
	case j.Timeout < 0 || time.Duration(j.Timeout) > MaxTimeout:
		return bad("timeout %s is out of range (0 to %s)", time.Duration(j.Timeout), MaxTimeout)
	case j.MaxRetries < 0 || j.MaxRetries > MaxRetriesLimit:
		return bad("max_retries %d is out of range (0 to %d)", j.MaxRetries, MaxRetriesLimit)
	case j.Resources.CPU < 0 || j.Resources.MemoryMB < 0 || j.Resources.DiskGB < 0:
		return bad("resources must not be negative")
	}
	if len(j.Secrets) > MaxSecrets {
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("job has %d secrets, the limit is %d", len(j.Secrets), MaxSecrets)}
	}
	for name, v := range j.Secrets {
		switch {
		case !secretNameRe.MatchString(name):
			return bad("secret name %q: use letters, digits and _ (not first), at most 64", name)
		case len(v) > MaxSealedSecret:
			return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("secret %s is %d bytes sealed, the limit is %d", name, len(v), MaxSealedSecret)}
		case !strings.HasPrefix(v, sealedPrefix):
			return bad("secret %s is not sealed (an armored age file): writ run --secret seals values, never send one in the clear", name)
		}
	}
	if len(j.Args) > 0 {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(j.Args, &obj); err != nil || obj == nil {
			return bad("args must be a JSON object")
		}
	}
	return nil
}

// CheckTime checks that now lies within [not_before, expires).
func (j *Job) CheckTime(now time.Time) error {
	if now.Before(j.NotBefore) {
		return &Error{Reason: job.ReasonNotYetValid, Msg: fmt.Sprintf("job is not valid before %s (now %s)", j.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	if !now.Before(j.Expires) {
		return &Error{Reason: job.ReasonExpired, Msg: fmt.Sprintf("job expired at %s (now %s)", j.Expires.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	return nil
}

func printable(s string) bool {
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// Sign encodes the job and returns an envelope signed by k.
func (j *Job) Sign(k *keys.Key) (*Envelope, error) {
	if err := j.Validate(); err != nil {
		return nil, err
	}
	payload, err := json.Marshal(j)
	if err != nil {
		return nil, fmt.Errorf("encode job: %w", err)
	}
	e := New(PayloadType, payload)
	e.Sign(k.ID, k.Private)
	return e, nil
}

// Job decodes and validates the envelope's payload as a writ job. It checks
// the payloadType first, decodes strictly (unknown, repeated and
// case-variant member names are errors, reason malformed) and then applies
// Validate. It does not verify signatures.
func (e *Envelope) Job() (*Job, error) {
	if e.PayloadType != PayloadType {
		return nil, &Error{Reason: job.ReasonPayloadType, Msg: fmt.Sprintf("payloadType is %q, want %q", e.PayloadType, PayloadType)}
	}
	// Every reader of the payload must see the same job: no name twice at
	// any depth, and member names exactly as Job spells them (Go matches
	// them case-insensitively, so "Script" beside "script" would run one
	// and show reviewers the other).
	obj, err := members(e.Payload, true)
	if err != nil {
		return nil, &Error{Reason: job.ReasonMalformed, Msg: "job payload: " + err.Error()}
	}
	if err := checkExactNames(obj, jobNames, "job payload"); err != nil {
		return nil, &Error{Reason: job.ReasonMalformed, Msg: err.Error()}
	}
	if raw, ok := lookup(obj, "resources"); ok && string(raw) != "null" {
		res, err := members(raw, true)
		if err != nil {
			return nil, &Error{Reason: job.ReasonMalformed, Msg: "job payload resources: " + err.Error()}
		}
		if err := checkExactNames(res, resourcesNames, "job payload resources"); err != nil {
			return nil, &Error{Reason: job.ReasonMalformed, Msg: err.Error()}
		}
	}
	dec := json.NewDecoder(bytes.NewReader(e.Payload))
	dec.DisallowUnknownFields()
	var j Job
	if err := dec.Decode(&j); err != nil {
		return nil, &Error{Reason: job.ReasonMalformed, Msg: "job payload: " + err.Error()}
	}
	if dec.More() {
		return nil, &Error{Reason: job.ReasonMalformed, Msg: "job payload has trailing data"}
	}
	if err := j.Validate(); err != nil {
		return nil, err
	}
	return &j, nil
}

// Parse decodes an envelope and its job in one step (see Decode and
// Envelope.Job).
func Parse(data []byte) (*Envelope, *Job, error) {
	e, err := Decode(data)
	if err != nil {
		return nil, nil, err
	}
	j, err := e.Job()
	if err != nil {
		return nil, nil, err
	}
	if len(e.Signatures) == 0 {
		return nil, nil, &Error{Reason: job.ReasonNoSignature, Msg: "envelope carries no signatures"}
	}
	return e, j, nil
}
