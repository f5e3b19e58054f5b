package seal

import (
	"errors"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/keys"
)

func TestSeal_OnlyRecipientsOpen(t *testing.T) {
	a, _ := keys.Generate("node-a")
	b, _ := keys.Generate("node-b")
	c, _ := keys.Generate("node-c")
	sealed, err := Seal([]byte("hunter2-password"), []string{a.AuthorizedKey(), b.AuthorizedKey()})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(sealed, "hunter2") || !strings.HasPrefix(sealed, "-----BEGIN AGE ENCRYPTED FILE-----") {
		t.Fatalf("sealed = %q", sealed)
	}
	for _, k := range []*keys.Key{a, b} {
		o, err := NewOpener(k)
		if err != nil {
			t.Fatal(err)
		}
		got, err := o.Open(sealed)
		if err != nil || string(got) != "hunter2-password" {
			t.Errorf("%s opens %q, %v", k.Comment, got, err)
		}
	}
	o, _ := NewOpener(c)
	if _, err := o.Open(sealed); !errors.Is(err, ErrNotRecipient) {
		t.Errorf("a third node opens: %v, want ErrNotRecipient", err)
	}
	var none *Opener
	if _, err := none.Open(sealed); err == nil {
		t.Error("no key opens")
	}
	if _, err := o.Open("-----BEGIN AGE ENCRYPTED FILE-----\ngarbage\n-----END AGE ENCRYPTED FILE-----\n"); err == nil || errors.Is(err, ErrNotRecipient) {
		t.Errorf("garbage = %v, want a plain error", err)
	}
	if _, err := Seal(make([]byte, MaxValue+1), []string{a.AuthorizedKey()}); err == nil {
		t.Error("an oversized value sealed")
	}
	if _, err := Seal([]byte("x"), nil); err == nil {
		t.Error("sealed to nobody")
	}
}

func TestRedact(t *testing.T) {
	plain := map[string]string{"db": `pa"ss\word`, "short": "ab"}
	for in, want := range map[string]string{
		`the password is pa"ss\word!`:     `the password is [secret db]!`,
		`{"leak":"pa\"ss\\word"}`:         `{"leak":"[secret db]"}`,
		`ab stays: too short to hide, ab`: `ab stays: too short to hide, ab`,
		`nothing here`:                    `nothing here`,
	} {
		if got := Redact(in, plain); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
}
