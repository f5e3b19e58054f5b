// Package seal seals a job's secrets so only the node that runs the job
// can open them: each value is an age file (filippo.io/age) to the
// ssh-ed25519 recipients of node keys (agessh), ASCII-armored, carried in
// the signed job (envelope.Job.Secrets). coord, the supervisor and Redis
// see ciphertext only; the runner opens the values with its node key just
// before the script runs and keeps them out of everything it reports.
package seal

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"filippo.io/age"
	"filippo.io/age/agessh"
	"filippo.io/age/armor"
	"golang.org/x/crypto/ssh"

	"github.com/writ-fleet/writ/keys"
)

// MaxValue bounds one secret's plain value.
const MaxValue = 8 << 10

// ErrNotRecipient is a sealed value this node's key cannot open: it was
// sealed to other nodes.
var ErrNotRecipient = errors.New("the secret is not sealed to this node's key")

// Seal encrypts value to the node keys (OpenSSH authorized_keys lines) and
// returns the armored age file.
func Seal(value []byte, nodeKeys []string) (string, error) {
	if len(value) > MaxValue {
		return "", fmt.Errorf("secret is %d bytes, the limit is %d", len(value), MaxValue)
	}
	if len(nodeKeys) == 0 {
		return "", errors.New("no node to seal the secret to")
	}
	var rs []age.Recipient
	for _, line := range nodeKeys {
		pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
		if err != nil {
			return "", fmt.Errorf("node key %q: %w", line, err)
		}
		r, err := agessh.NewEd25519Recipient(pk)
		if err != nil {
			return "", fmt.Errorf("node key: %w", err)
		}
		rs = append(rs, r)
	}
	var out bytes.Buffer
	aw := armor.NewWriter(&out)
	w, err := age.Encrypt(aw, rs...)
	if err != nil {
		return "", err
	}
	if _, err := w.Write(value); err != nil {
		return "", err
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	if err := aw.Close(); err != nil {
		return "", err
	}
	return out.String(), nil
}

// Opener opens sealed values with a node's key.
type Opener struct {
	id *agessh.Ed25519Identity
}

// NewOpener returns an Opener for the node key k.
func NewOpener(k *keys.Key) (*Opener, error) {
	id, err := agessh.NewEd25519Identity(ed25519.PrivateKey(k.Private))
	if err != nil {
		return nil, err
	}
	return &Opener{id: id}, nil
}

// Open decrypts one armored value.
func (o *Opener) Open(sealed string) ([]byte, error) {
	if o == nil {
		return nil, errors.New("this runner has no node key to open secrets with (run it as writ node, or give writ runner --node-key)")
	}
	r, err := age.Decrypt(armor.NewReader(strings.NewReader(sealed)), o.id)
	if err != nil {
		var nm *age.NoIdentityMatchError
		if errors.As(err, &nm) {
			return nil, ErrNotRecipient
		}
		return nil, fmt.Errorf("open secret: %w", err)
	}
	b, err := io.ReadAll(io.LimitReader(r, MaxValue+1))
	if err != nil {
		return nil, fmt.Errorf("open secret: %w", err)
	}
	if len(b) > MaxValue {
		return nil, fmt.Errorf("secret is larger than %d bytes", MaxValue)
	}
	return b, nil
}

// OpenAll opens every value of secrets.
func (o *Opener) OpenAll(secrets map[string]string) (map[string]string, error) {
	if len(secrets) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(secrets))
	for name, v := range secrets {
		b, err := o.Open(v)
		if err != nil {
			return nil, fmt.Errorf("secret %s: %w", name, err)
		}
		out[name] = string(b)
	}
	return out, nil
}

// MinRedacted is the shortest value Redact hides: shorter ones would turn
// every common word of a log into a mark.
const MinRedacted = 4

// Redact replaces every occurrence of a secret's value in s, as is and as
// JSON escapes it (in a result), with [secret NAME], so a script that
// logs or returns one reports nothing.
func Redact(s string, plain map[string]string) string {
	for name, v := range plain {
		if len(v) < MinRedacted {
			continue
		}
		mark := "[secret " + name + "]"
		s = strings.ReplaceAll(s, v, mark)
		if b, err := json.Marshal(v); err == nil {
			if esc := string(b[1 : len(b)-1]); esc != v {
				s = strings.ReplaceAll(s, esc, mark)
			}
		}
	}
	return s
}
