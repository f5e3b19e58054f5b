package envelope

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
)

// A flow step's output passes from the node that made it, through the
// site's Redis and coord (neither trusted), to the steps that read it. The
// node signs it, so the runner of a dependent step can tell that each
// input is what a node of the producing step's site returned for that
// very job (the job ID binds the flow, the step, the item and the run).

// OutputPayloadType is the DSSE payload type of what an output proof
// signs: PAE(OutputPayloadType, job ID || 0x00 || SHA-256(output)).
const OutputPayloadType = "application/vnd.writ.output.v1"

// OutputProof is a node's signature over one job's output. In a step's
// inputs, a dependency's proofs are listed in the order of its items.
type OutputProof struct {
	Attempt int    `json:"attempt"` // the run of the item that made the output
	Node    string `json:"node"`    // the node's ID, as the ledger knows it
	Sig     []byte `json:"sig"`     // ed25519, base64 in JSON
}

// OutputMessage is what a node signs for job id's output ("null" for
// none), in a canonical form: coord stores and passes outputs re-encoded
// (compacted, HTML characters escaped, inside lists), so the bytes are
// decoded (numbers as written) and encoded again, objects' keys sorted,
// before they are hashed. Two outputs with the same canonical form read
// the same to the script given them.
func OutputMessage(jobID string, output []byte) ([]byte, error) {
	canon, err := CanonicalJSON(output)
	if err != nil {
		return nil, fmt.Errorf("output of job %s is not JSON: %w", jobID, err)
	}
	sum := sha256.Sum256(canon)
	msg := make([]byte, 0, len(jobID)+1+len(sum))
	msg = append(append(append(msg, jobID...), 0), sum[:]...)
	return PAE(OutputPayloadType, msg), nil
}

// CanonicalJSON is raw decoded and encoded again by encoding/json
// (numbers kept as written, objects' keys sorted); "null" for nothing.
func CanonicalJSON(raw []byte) ([]byte, error) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return []byte("null"), nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("more than one JSON value")
	}
	return json.Marshal(v)
}

// SignOutput signs job id's output with a node's private key.
func SignOutput(priv ed25519.PrivateKey, jobID string, output []byte) ([]byte, error) {
	msg, err := OutputMessage(jobID, output)
	if err != nil {
		return nil, err
	}
	return ed25519.Sign(priv, msg), nil
}

// VerifyOutput checks sig over job id's output with a node's public key.
func VerifyOutput(pub ed25519.PublicKey, jobID string, output, sig []byte) error {
	msg, err := OutputMessage(jobID, output)
	if err != nil {
		return err
	}
	if len(pub) != ed25519.PublicKeySize || !ed25519.Verify(pub, msg, sig) {
		return errors.New("the signature does not match the output")
	}
	return nil
}
