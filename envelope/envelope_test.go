package envelope

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"github.com/writ-fleet/writ/job"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/keys"
)

func TestPAE_Vectors(t *testing.T) {
	data, err := os.ReadFile("testdata/pae/pae-vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vectors []struct {
		Name        string `json:"name"`
		PayloadType string `json:"payloadType"`
		PayloadB64  string `json:"payload_b64"`
		WantHex     string `json:"expected_pae_hex"`
	}
	if err := json.Unmarshal(data, &vectors); err != nil {
		t.Fatal(err)
	}
	for _, v := range vectors {
		t.Run(v.Name, func(t *testing.T) {
			payload, _ := base64.StdEncoding.DecodeString(v.PayloadB64)
			got := hex.EncodeToString(PAE(v.PayloadType, payload))
			if got != v.WantHex {
				t.Errorf("PAE(%q, %q) = %s, want %s", v.PayloadType, payload, got, v.WantHex)
			}
		})
	}
}

type refKey struct {
	Seed string `json:"private_seed_hex"`
}

func loadRefKey(t *testing.T, name string) TrustedKey {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "keys", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var k refKey
	if err := json.Unmarshal(data, &k); err != nil {
		t.Fatal(err)
	}
	seed, _ := hex.DecodeString(k.Seed)
	priv := ed25519.NewKeyFromSeed(seed)
	// The reference envelopes carry securesystemslib key IDs, not writ's, so
	// the IDs here never match: Verify must fall back to trying each key.
	return TrustedKey{ID: name, Key: priv.Public().(ed25519.PublicKey)}
}

// TestVerify_DSSECases runs the DSSE conformance cases against the signature
// layer alone (the payloads are not writ jobs).
func TestVerify_DSSECases(t *testing.T) {
	data, err := os.ReadFile("testdata/cases.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases []struct {
		Name      string   `json:"name"`
		Envelope  string   `json:"envelope"`
		Keys      []string `json:"verifier_keys"`
		Threshold int      `json:"threshold"`
		Valid     bool     `json:"expected_valid"`
	}
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	if len(cases) < 17 {
		t.Fatalf("found %d cases, want 17", len(cases))
	}
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("testdata", tc.Envelope))
			if err != nil {
				t.Fatal(err)
			}
			env, err := Decode(raw)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			var trusted []TrustedKey
			for _, name := range tc.Keys {
				trusted = append(trusted, loadRefKey(t, name))
			}
			// Twice: the second answer comes from the verified-signature
			// cache where the first succeeded, and must be the same.
			for pass := 1; pass <= 2; pass++ {
				accepted := env.Verify(trusted)
				got := len(env.Signatures) > 0 && len(accepted) >= tc.Threshold
				if got != tc.Valid {
					t.Errorf("pass %d: valid = %v (%d keys accepted, threshold %d), want %v", pass, got, len(accepted), tc.Threshold, tc.Valid)
				}
			}
		})
	}
}

func newKey(t *testing.T) *keys.Key {
	t.Helper()
	k, err := keys.Generate("test")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestJob_SignParseVerify(t *testing.T) {
	k := newKey(t)
	now := time.Now()
	j := NewJob("hello", `job := import("job"); job.result("hi")`, "local", now)
	j.Args = json.RawMessage(`{"who":"world"}`)
	env, err := j.Sign(k)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	env2, j2, err := Parse(raw)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if env2.ID() != env.ID() {
		t.Errorf("ID changed across encode/decode: %s != %s", env2.ID(), env.ID())
	}
	if j2.Name != "hello" || j2.Site != "local" || string(j2.Args) != `{"who":"world"}` {
		t.Errorf("decoded job = %+v", j2)
	}
	if err := j2.CheckTime(now); err != nil {
		t.Errorf("CheckTime(now) = %v", err)
	}
	if got := env2.Verify([]TrustedKey{{ID: k.ID, Key: k.Public}}); len(got) != 1 {
		t.Errorf("Verify accepted %d keys, want 1", len(got))
	}
	// A second signature does not change the ID.
	k2 := newKey(t)
	id := env2.ID()
	env2.Sign(k2.ID, k2.Private)
	if env2.ID() != id {
		t.Error("adding a signature changed the job ID")
	}
	if got := env2.Verify([]TrustedKey{{ID: k.ID, Key: k.Public}, {ID: k2.ID, Key: k2.Public}}); len(got) != 2 {
		t.Errorf("Verify accepted %d keys, want 2", len(got))
	}
}

func TestJob_CheckTime(t *testing.T) {
	now := time.Now()
	j := NewJob("t", "x := 1", "local", now)
	for _, tc := range []struct {
		name string
		at   time.Time
		want job.Reason
	}{
		{"valid", now, ""},
		{"not yet valid", now.Add(-2 * ClockSkew), job.ReasonNotYetValid},
		{"expired", now.Add(DefaultValidity + time.Second), job.ReasonExpired},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ReasonOf(j.CheckTime(tc.at)); got != tc.want {
				t.Errorf("CheckTime reason = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestParse_Rejects(t *testing.T) {
	k := newKey(t)
	now := time.Now()
	sign := func(mut func(j *Job)) []byte {
		j := NewJob("t", "x := 1", "local", now)
		mut(j)
		payload, _ := json.Marshal(j)
		e := New(PayloadType, payload)
		e.Sign(k.ID, k.Private)
		raw, _ := json.Marshal(e)
		return raw
	}
	for _, tc := range []struct {
		name    string
		data    []byte
		want    job.Reason
		wantMsg string
	}{
		{"not json", []byte("{"), job.ReasonMalformed, "not valid DSSE JSON"},
		{"envelope key twice", []byte(`{"payloadType":"x","payload":"","payloadType":"y","signatures":[]}`), job.ReasonMalformed, "twice"},
		{"signature key twice", []byte(`{"payloadType":"x","payload":"","signatures":[{"keyid":"a","sig":"","sig":"AA=="}]}`), job.ReasonMalformed, "twice"},
		{"envelope not an object", []byte(`[1]`), job.ReasonMalformed, "not a JSON object"},
		{"trailing data", []byte(`{"payloadType":"x","payload":"","signatures":[]} {}`), job.ReasonMalformed, "trailing"},
		{"bad base64", []byte(`{"payloadType":"x","payload":"!!!","signatures":[]}`), job.ReasonMalformed, "not base64"},
		{"wrong type", []byte(`{"payloadType":"text/plain","payload":"aGk=","signatures":[]}`), job.ReasonPayloadType, "payloadType"},
		{"too big", bytes.Repeat([]byte(" "), MaxEnvelopeBytes+1), job.ReasonTooLarge, "limit"},
		{"big script", sign(func(j *Job) { j.Script = strings.Repeat("x", MaxScriptBytes+1) }), job.ReasonTooLarge, "script is"},
		{"big args", sign(func(j *Job) { j.Args = json.RawMessage(`{"a":"` + strings.Repeat("x", MaxArgsBytes) + `"}`) }), job.ReasonTooLarge, "args are"},
		{"args not object", sign(func(j *Job) { j.Args = json.RawMessage(`[1]`) }), job.ReasonInvalidJob, "JSON object"},
		{"no site", sign(func(j *Job) { j.Site = "" }), job.ReasonInvalidJob, "neither a site"},
		{"bad site", sign(func(j *Job) { j.Site = "../x" }), job.ReasonInvalidJob, "site"},
		{"long window", sign(func(j *Job) { j.Expires = j.NotBefore.Add(MaxValidity + time.Hour) }), job.ReasonInvalidJob, "validity window"},
		{"short nonce", sign(func(j *Job) { j.Nonce = "abc" }), job.ReasonInvalidJob, "nonce"},
		{"retries", sign(func(j *Job) { j.MaxRetries = 99 }), job.ReasonInvalidJob, "max_retries"},
		{"no signatures", func() []byte {
			j := NewJob("t", "x := 1", "local", now)
			p, _ := json.Marshal(j)
			raw, _ := json.Marshal(New(PayloadType, p))
			return raw
		}(), job.ReasonNoSignature, "no signatures"},
		{"too many signatures", func() []byte {
			j := NewJob("t", "x := 1", "local", now)
			p, _ := json.Marshal(j)
			e := New(PayloadType, p)
			for i := 0; i <= MaxSignatures; i++ {
				e.Signatures = append(e.Signatures, Signature{KeyID: string(rune('a' + i)), Sig: []byte{1}})
			}
			raw, _ := json.Marshal(e)
			return raw
		}(), job.ReasonTooLarge, "signatures"},
		{"unknown job field", func() []byte {
			p := []byte(`{"name":"t","script":"x","site":"local","nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0,"evil":1}`)
			e := New(PayloadType, p)
			e.Sign(k.ID, k.Private)
			raw, _ := json.Marshal(e)
			return raw
		}(), job.ReasonMalformed, "unknown key"},
		{"job key twice", signPayload(`{"name":"t","script":"x := 1","script":"x := 2","site":"local","nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`), job.ReasonMalformed, "twice"},
		{"job key case variant", signPayload(`{"name":"t","script":"x := 1","Script":"x := 2","site":"local","nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`), job.ReasonMalformed, "case-sensitive"},
		{"job key upper case only", signPayload(`{"name":"t","SCRIPT":"x := 1","site":"local","nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`), job.ReasonMalformed, "case-sensitive"},
		{"args key twice", signPayload(`{"name":"t","script":"x := 1","site":"local","args":{"who":"a","n":{"x":1},"who":"b"},"nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`), job.ReasonMalformed, "twice"},
		{"resources case variant", signPayload(`{"name":"t","script":"x := 1","site":"local","resources":{"CPU":2},"nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`), job.ReasonMalformed, "case-sensitive"},
		{"args too deep", signPayload(`{"name":"t","script":"x := 1","site":"local","args":{"a":` + strings.Repeat("[", maxJSONDepth) + strings.Repeat("]", maxJSONDepth) + `},"nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`), job.ReasonMalformed, "levels deep"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Parse(tc.data)
			if got := ReasonOf(err); got != tc.want {
				t.Fatalf("Parse reason = %q (%v), want %q", got, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("Parse error = %q, want it to mention %q", err, tc.wantMsg)
			}
			if !errors.Is(err, &Error{Reason: tc.want}) {
				t.Errorf("errors.Is(err, Reason %q) = false", tc.want)
			}
		})
	}
}

// signPayload signs a hand-written job payload with a fixed key.
func signPayload(payload string) []byte {
	k := keys.FromSeed(bytes.Repeat([]byte{9}, 32))
	e := New(PayloadType, []byte(payload))
	e.Sign(k.ID, k.Private)
	raw, _ := json.Marshal(e)
	return raw
}

// TestParse_Limits: each bound of the payload decoder, just inside and
// just outside.
func TestParse_Limits(t *testing.T) {
	payload := func(args string) string {
		return `{"name":"t","script":"x := 1","site":"local","args":` + args + `,"nonce":"abcdefgh","not_before":"2020-01-01T00:00:00Z","expires":"2020-01-02T00:00:00Z","max_retries":0}`
	}
	// The job object is one level, args a second: maxJSONDepth-2 more fit.
	inside := `{"a":` + strings.Repeat("[", maxJSONDepth-2) + strings.Repeat("]", maxJSONDepth-2) + `}`
	outside := `{"a":` + strings.Repeat("[", maxJSONDepth-1) + strings.Repeat("]", maxJSONDepth-1) + `}`
	if _, _, err := Parse(signPayload(payload(inside))); err != nil {
		t.Errorf("args %d levels deep: %v, want accepted", maxJSONDepth, err)
	}
	if _, _, err := Parse(signPayload(payload(outside))); ReasonOf(err) != job.ReasonMalformed {
		t.Errorf("args %d levels deep: %v, want malformed", maxJSONDepth+1, err)
	}
	// Members DSSE does not define are ignored, at the top and in signatures.
	var env map[string]any
	json.Unmarshal(signPayload(payload(`{}`)), &env)
	env["extension"] = map[string]any{"kind": "x"}
	env["signatures"].([]any)[0].(map[string]any)["note"] = "hi"
	raw, _ := json.Marshal(env)
	if _, _, err := Parse(raw); err != nil {
		t.Errorf("envelope with unknown members: %v, want accepted", err)
	}
}

func FuzzParse(f *testing.F) {
	matches, _ := filepath.Glob("testdata/envelopes/*.json")
	for _, m := range matches {
		data, _ := os.ReadFile(m)
		f.Add(data)
	}
	k := keys.FromSeed(bytes.Repeat([]byte{7}, 32))
	j := NewJob("seed", `job := import("job"); job.result(1)`, "local", time.Unix(1700000000, 0))
	env, _ := j.Sign(k)
	raw, _ := json.Marshal(env)
	f.Add(raw)
	f.Fuzz(func(t *testing.T, data []byte) {
		env, job, err := Parse(data)
		if err != nil {
			if ReasonOf(err) == "" {
				t.Fatalf("Parse error has no reason: %v", err)
			}
			return
		}
		if err := job.Validate(); err != nil {
			t.Fatalf("Parse accepted a job that fails Validate: %v", err)
		}
		// A decoded envelope re-encodes to one that decodes to the same ID.
		again, err := json.Marshal(env)
		if err != nil {
			t.Fatal(err)
		}
		env2, err := Decode(again)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if env2.ID() != env.ID() {
			t.Fatal("ID changed across re-encoding")
		}
	})
}

// BenchmarkParse: decoding and strictly checking a typical signed job, the
// work every service does per job before verifying its signature.
func BenchmarkParse(b *testing.B) {
	k := keys.FromSeed(bytes.Repeat([]byte{7}, 32))
	j := NewJob("bench", `job := import("job"); job.result(job.args.n * 2)`, "local", time.Unix(1700000000, 0))
	j.Args = json.RawMessage(`{"n":21,"who":"world"}`)
	env, _ := j.Sign(k)
	raw, _ := json.Marshal(env)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := Parse(raw); err != nil {
			b.Fatal(err)
		}
	}
}
