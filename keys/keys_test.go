package keys

import (
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestID_MatchesOpenSSHFingerprint checks key IDs against the fingerprints
// recorded with the DSSE reference keys.
func TestID_MatchesOpenSSHFingerprint(t *testing.T) {
	for _, name := range []string{"key-a", "key-b", "key-c"} {
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("..", "envelope", "testdata", "keys", name+".json"))
			if err != nil {
				t.Fatal(err)
			}
			var ref struct {
				Seed        string `json:"private_seed_hex"`
				OpenSSH     string `json:"public_openssh"`
				Fingerprint string `json:"ssh_sha256_fingerprint"`
			}
			if err := json.Unmarshal(data, &ref); err != nil {
				t.Fatal(err)
			}
			seed, _ := hex.DecodeString(ref.Seed)
			k := FromSeed(seed)
			if k.ID != ref.Fingerprint {
				t.Errorf("ID = %s, want %s", k.ID, ref.Fingerprint)
			}
			pub, _, err := ParsePublic(ref.OpenSSH)
			if err != nil {
				t.Fatal(err)
			}
			if !pub.Equal(k.Public) {
				t.Errorf("ParsePublic(%q) does not match the seed's public key", ref.OpenSSH)
			}
		})
	}
}

func TestKey_SaveLoad(t *testing.T) {
	dir := t.TempDir()
	k, err := Generate("alice@test")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sub", "key")
	if err := k.Save(path); err != nil {
		t.Fatal(err)
	}
	if err := k.Save(path); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("second Save = %v, want refusal to overwrite", err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode = %v, want 0600", st.Mode().Perm())
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != k.ID || got.Comment != "alice@test" {
		t.Errorf("Load = %s %q, want %s %q", got.ID, got.Comment, k.ID, "alice@test")
	}
	pubText, _ := os.ReadFile(path + ".pub")
	pub, comment, err := ParsePublic(string(pubText))
	if err != nil || !pub.Equal(k.Public) || comment != "alice@test" {
		t.Errorf("ParsePublic(.pub) = %v %q %v", pub, comment, err)
	}
}

func TestParse_OpenSSHKey(t *testing.T) {
	sshKeygen, err := exec.LookPath("ssh-keygen")
	if err != nil {
		t.Skip("ssh-keygen not installed (package openssh-client)")
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		name, passphrase string
	}{
		{"plain", ""},
		{"passphrase", "s3cret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name)
			out, err := exec.Command(sshKeygen, "-q", "-t", "ed25519", "-N", tc.passphrase, "-C", "bob@host", "-f", path).CombinedOutput()
			if err != nil {
				t.Fatalf("ssh-keygen: %v: %s", err, out)
			}
			fp, err := exec.Command(sshKeygen, "-l", "-E", "sha256", "-f", path+".pub").Output()
			if err != nil {
				t.Fatal(err)
			}
			t.Setenv(PassphraseEnv, tc.passphrase)
			k, err := Load(path)
			if err != nil {
				t.Fatal(err)
			}
			if fields := strings.Fields(string(fp)); len(fields) < 2 || fields[1] != k.ID {
				t.Errorf("ID = %s, ssh-keygen says %s", k.ID, fp)
			}
			if k.Comment != "bob@host" {
				t.Errorf("Comment = %q, want bob@host", k.Comment)
			}
			if tc.passphrase != "" {
				t.Setenv(PassphraseEnv, "")
				if _, err := Load(path); err == nil || !strings.Contains(err.Error(), PassphraseEnv) {
					t.Errorf("Load without passphrase = %v, want an error naming %s", err, PassphraseEnv)
				}
			}
		})
	}
}

func TestParse_Rejects(t *testing.T) {
	for _, tc := range []struct {
		name, data, want string
	}{
		{"empty", "", "no PEM block"},
		{"garbage", "hello", "no PEM block"},
		{"wrong block", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "unsupported PEM block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.data), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse(%q) = %v, want error containing %q", tc.data, err, tc.want)
			}
		})
	}
}

// TestParsePublic_WeakKeys: a public key of small order (under which a
// forged signature verifies for some messages) or not on the curve is
// refused, in OpenSSH and PEM form; a real key is not.
func TestParsePublic_WeakKeys(t *testing.T) {
	identity := make(ed25519.PublicKey, ed25519.PublicKeySize)
	identity[0] = 1 // the neutral element: order 1
	order2 := make(ed25519.PublicKey, ed25519.PublicKeySize)
	for i := range order2 {
		order2[i] = 0xff
	}
	order2[0], order2[31] = 0xec, 0x7f // -1 (y = p-1): order 2
	notOnCurve := make(ed25519.PublicKey, ed25519.PublicKeySize)
	notOnCurve[0] = 2
	k, _ := Generate("good")
	for _, tc := range []struct {
		name string
		pub  ed25519.PublicKey
		weak bool
	}{{"identity", identity, true}, {"order 2", order2, true}, {"off the curve", notOnCurve, true}, {"a real key", k.Public, false}} {
		_, _, err := ParsePublic(FormatPublic(tc.pub, tc.name))
		if tc.weak != errors.Is(err, ErrWeakKey) || !tc.weak && err != nil {
			t.Errorf("ParsePublic(%s) = %v, want weak: %v", tc.name, err, tc.weak)
		}
	}
}
