package testenv

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/secure-systems-lab/go-securesystemslib/dsse"
	"github.com/secure-systems-lab/go-securesystemslib/signerverifier"

	"github.com/writ-fleet/writ/keys"
)

// SSLibKeyIDDefault asks SSLibSign for the keyid go-securesystemslib
// computes for the key itself.
const SSLibKeyIDDefault = "\x00default"

// SSLibSign signs payload with k through go-securesystemslib's DSSE
// implementation, one independent of writ's, and returns the envelope's
// JSON. keyID is the signature's keyid ("" for none, SSLibKeyIDDefault for
// securesystemslib's own).
func SSLibSign(t testing.TB, k *keys.Key, payloadType string, payload []byte, keyID string) []byte {
	t.Helper()
	pemBytes, err := k.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	sk, err := signerverifier.LoadKey(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	if keyID != SSLibKeyIDDefault {
		sk.KeyID = keyID
	} else if sk.KeyID == "" || sk.KeyID == k.ID {
		t.Fatalf("securesystemslib's keyid %q is not its own", sk.KeyID)
	}
	sv, err := signerverifier.NewED25519SignerVerifierFromSSLibKey(sk)
	if err != nil {
		t.Fatal(err)
	}
	es, err := dsse.NewEnvelopeSigner(sv)
	if err != nil {
		t.Fatal(err)
	}
	env, err := es.SignPayload(context.Background(), payloadType, payload)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}
