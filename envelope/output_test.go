package envelope

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/keys"
)

func TestOutputProof(t *testing.T) {
	k, _ := keys.Generate("node")
	out := []byte(`{"b": [1, 2.50, "<x>"], "a": 12345678901234567890}`)
	sig, err := SignOutput(k.Private, "job1", out)
	if err != nil {
		t.Fatal(err)
	}
	// As coord passes it on: re-encoded inside a list, HTML escaped.
	list, _ := json.Marshal([]json.RawMessage{out})
	var back []json.RawMessage
	json.Unmarshal(list, &back)
	if !strings.Contains(string(back[0]), `\u003c`) {
		t.Fatalf("the re-encoded output is not escaped: %s", back[0])
	}
	if err := VerifyOutput(k.Public, "job1", back[0], sig); err != nil {
		t.Errorf("re-encoded output: %v", err)
	}
	for name, tc := range map[string]struct {
		job string
		out string
	}{
		"another job":     {"job2", string(out)},
		"another value":   {"job1", `{"a": 12345678901234567891, "b": [1, 2.50, "<x>"]}`},
		"a number's form": {"job1", `{"a": 1.2345678901234567890e19, "b": [1, 2.50, "<x>"]}`},
		"not JSON":        {"job1", `{"a":`},
		"two values":      {"job1", `1 2`},
	} {
		if err := VerifyOutput(k.Public, tc.job, []byte(tc.out), sig); err == nil {
			t.Errorf("%s: verified", name)
		}
	}
	// No output signs as null.
	sig, _ = SignOutput(k.Private, "job3", nil)
	if err := VerifyOutput(k.Public, "job3", []byte("null"), sig); err != nil {
		t.Errorf("empty output as null: %v", err)
	}
}
