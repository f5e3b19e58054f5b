// Package keys creates, stores and loads the ed25519 keys every writ principal
// signs with: users, nodes, coords and supervisors.
//
// A private key is stored as a PKCS#8 PEM file ("writ key gen") or read from an
// existing OpenSSH private key such as ~/.ssh/id_ed25519, the way git signs with
// SSH keys. A public key is written in OpenSSH authorized_keys form
// ("ssh-ed25519 AAAA… comment"), and its key ID is the OpenSSH SHA256
// fingerprint ("SHA256:…"), the same string `ssh-keygen -lf` prints, so users
// can tell their keys apart with tools they already have.
package keys

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"filippo.io/edwards25519"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/ssh"
)

// PassphraseEnv names the environment variable that unlocks a
// passphrase-protected OpenSSH private key.
const PassphraseEnv = "WRIT_KEY_PASSPHRASE"

// ErrNotEd25519 is returned for keys of any other type.
var ErrNotEd25519 = errors.New("not an ed25519 key")

// ErrWeakKey marks an ed25519 public key that is no key: not a point of
// the curve, or one of small order, under which forged signatures verify
// for some messages.
var ErrWeakKey = errors.New("weak ed25519 public key")

// checkPoint refuses a public key that is not a point of the curve or has
// small order (its multiple by the cofactor, 8, is the identity).
func checkPoint(pub ed25519.PublicKey) error {
	p, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return fmt.Errorf("parse public key: %w: not a point of the curve", ErrWeakKey)
	}
	if new(edwards25519.Point).MultByCofactor(p).Equal(edwards25519.NewIdentityPoint()) == 1 {
		return fmt.Errorf("parse public key: %w: a point of small order", ErrWeakKey)
	}
	return nil
}

// Key is a private signing key with its public half and key ID.
type Key struct {
	Private ed25519.PrivateKey
	Public  ed25519.PublicKey
	// ID is the OpenSSH SHA256 fingerprint of Public.
	ID string
	// Comment is the comment of the public key line, often user@host.
	Comment string
}

// Generate makes a new random key.
func Generate(comment string) (*Key, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ed25519 key: %w", err)
	}
	return &Key{Private: priv, Public: pub, ID: ID(pub), Comment: comment}, nil
}

// FromSeed makes the key with the given 32-byte seed (for tests and vectors).
func FromSeed(seed []byte) *Key {
	priv := ed25519.NewKeyFromSeed(seed)
	pub := priv.Public().(ed25519.PublicKey)
	return &Key{Private: priv, Public: pub, ID: ID(pub)}
}

// Sign signs msg with the key.
func (k *Key) Sign(msg []byte) []byte { return ed25519.Sign(k.Private, msg) }

// AuthorizedKey returns the public key as an OpenSSH authorized_keys line.
func (k *Key) AuthorizedKey() string { return FormatPublic(k.Public, k.Comment) }

// ID returns the key ID of pub: its OpenSSH SHA256 fingerprint.
func ID(pub ed25519.PublicKey) string {
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		// ssh.NewPublicKey fails only for a key of the wrong length.
		return "invalid-key"
	}
	return ssh.FingerprintSHA256(sp)
}

// FormatPublic returns pub as an OpenSSH authorized_keys line with comment.
func FormatPublic(pub ed25519.PublicKey, comment string) string {
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		return ""
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp)))
	if comment != "" {
		line += " " + comment
	}
	return line
}

// ParsePublic parses an OpenSSH authorized_keys line or a PEM "PUBLIC KEY"
// block. It returns the key and the line's comment.
func ParsePublic(text string) (ed25519.PublicKey, string, error) {
	text = strings.TrimSpace(text)
	if strings.HasPrefix(text, "-----BEGIN") {
		block, _ := pem.Decode([]byte(text))
		if block == nil {
			return nil, "", errors.New("parse public key: bad PEM block")
		}
		k, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, "", fmt.Errorf("parse public key: %w", err)
		}
		pub, ok := k.(ed25519.PublicKey)
		if !ok {
			return nil, "", fmt.Errorf("parse public key: %w (got %T)", ErrNotEd25519, k)
		}
		if err := checkPoint(pub); err != nil {
			return nil, "", err
		}
		return pub, "", nil
	}
	sp, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(text))
	if err != nil {
		return nil, "", fmt.Errorf("parse public key: %w", err)
	}
	ck, ok := sp.(ssh.CryptoPublicKey)
	if !ok {
		return nil, "", fmt.Errorf("parse public key: %w (got %s)", ErrNotEd25519, sp.Type())
	}
	pub, ok := ck.CryptoPublicKey().(ed25519.PublicKey)
	if !ok {
		return nil, "", fmt.Errorf("parse public key: %w (got %s)", ErrNotEd25519, sp.Type())
	}
	if err := checkPoint(pub); err != nil {
		return nil, "", err
	}
	return pub, comment, nil
}

// Parse reads a private key in PKCS#8 PEM ("PRIVATE KEY") or OpenSSH
// ("OPENSSH PRIVATE KEY") form. A passphrase-protected OpenSSH key is unlocked
// with passphrase, which may be empty when the key has none.
func Parse(data []byte, passphrase []byte) (*Key, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("parse private key: no PEM block found (expected a writ or OpenSSH ed25519 private key)")
	}
	var raw any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		raw, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "OPENSSH PRIVATE KEY":
		if len(passphrase) > 0 {
			raw, err = ssh.ParseRawPrivateKeyWithPassphrase(data, passphrase)
		} else {
			raw, err = ssh.ParseRawPrivateKey(data)
			var missing *ssh.PassphraseMissingError
			if errors.As(err, &missing) {
				return nil, fmt.Errorf("parse private key: the key is protected by a passphrase; set %s", PassphraseEnv)
			}
		}
	default:
		return nil, fmt.Errorf("parse private key: unsupported PEM block %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	var priv ed25519.PrivateKey
	switch k := raw.(type) {
	case ed25519.PrivateKey:
		priv = k
	case *ed25519.PrivateKey:
		priv = *k
	default:
		return nil, fmt.Errorf("parse private key: %w (got %T)", ErrNotEd25519, raw)
	}
	pub := priv.Public().(ed25519.PublicKey)
	return &Key{Private: priv, Public: pub, ID: ID(pub)}, nil
}

// Load reads a private key file. The comment comes from a sibling ".pub" file
// when there is one. An OpenSSH key's passphrase comes from $WRIT_KEY_PASSPHRASE.
func Load(path string) (*Key, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	k, err := Parse(data, []byte(os.Getenv(PassphraseEnv)))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if pubText, err := os.ReadFile(path + ".pub"); err == nil {
		if pub, comment, err := ParsePublic(string(pubText)); err == nil && pub.Equal(k.Public) {
			k.Comment = comment
		}
	}
	return k, nil
}

// Marshal returns the private key as a PKCS#8 PEM block.
func (k *Key) Marshal() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k.Private)
	if err != nil {
		return nil, fmt.Errorf("marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// Save writes the private key to path (mode 0600) and the public key to
// path+".pub". It refuses to overwrite an existing key file.
func (k *Key) Save(path string) error {
	data, err := k.Marshal()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("save key: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("save key: %s already exists; refusing to overwrite a key", path)
		}
		return fmt.Errorf("save key: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("save key: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("save key: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save key: %w", err)
	}
	if err := os.WriteFile(path+".pub", []byte(k.AuthorizedKey()+"\n"), 0o644); err != nil {
		return fmt.Errorf("save public key: %w", err)
	}
	return nil
}

// DefaultPath returns the key a user signs with when none is named:
// ~/.config/writ/key if it exists, else ~/.ssh/id_ed25519 if that exists,
// else ~/.config/writ/key (which "writ key gen" creates).
func DefaultPath() string {
	home, err := os.UserHomeDir()
	if err != nil {
		return "writ.key"
	}
	writ := filepath.Join(home, ".config", "writ", "key")
	if _, err := os.Stat(writ); err == nil {
		return writ
	}
	sshKey := filepath.Join(home, ".ssh", "id_ed25519")
	if _, err := os.Stat(sshKey); err == nil {
		return sshKey
	}
	return writ
}
