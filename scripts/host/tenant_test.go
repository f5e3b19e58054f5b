package host

import (
	"context"
	"encoding/json"
	"github.com/writ-fleet/writ/scripts"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/sal/storage"
)

func TestTenant_HostName(t *testing.T) {
	alice := tenant{owner: "alice"}
	admin := tenant{owner: "root", admin: true}
	for _, tc := range []struct {
		t      tenant
		name   string
		want   string
		errMsg string
	}{
		{alice, "data", "5alice.data", ""},
		{alice, "alice/data", "5alice.data", ""},
		{alice, "bob/data", "", "only a site admin"},
		{alice, "/data", "", "only a site admin"},
		{alice, "../x", "", "not a user name"},
		{alice, "Bad", "", "invalid name"},
		{alice, strings.Repeat("x", 56), "5alice." + strings.Repeat("x", 56), ""},
		{alice, strings.Repeat("x", 57), "", "at most 56 characters"},
		{admin, "bob/data", "3bob.data", ""},
		{admin, "/legacy", "legacy", ""},
		{tenant{owner: strings.Repeat("u", 64)}, "x", "", "too long to own"},
	} {
		got, err := tc.t.hostName(tc.name)
		if tc.errMsg != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errMsg) {
				t.Errorf("%s: hostName(%q) = %q, %v; want an error mentioning %q", tc.t.owner, tc.name, got, err, tc.errMsg)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s: hostName(%q) = %q, %v; want %q", tc.t.owner, tc.name, got, err, tc.want)
		}
		// Every host name parses back to its owner and name.
		owner, name := splitHost(got)
		wantOwner, wantName := tc.t.owner, tc.name
		if i := strings.IndexByte(tc.name, '/'); i >= 0 {
			wantOwner, wantName = tc.name[:i], tc.name[i+1:]
		}
		if owner != wantOwner || name != wantName {
			t.Errorf("splitHost(%q) = %q, %q; want %q, %q", got, owner, name, wantOwner, wantName)
		}
	}
	// Owners whose names are prefixes of each other's, with dots, do not
	// meet: (a.b, c) and (a, b.c) are two names.
	x, _ := tenant{owner: "a.b"}.hostName("c")
	y, _ := tenant{owner: "a"}.hostName("b.c")
	if x == y {
		t.Errorf("(a.b, c) and (a, b.c) share host name %q", x)
	}
}

// TestTenant_Storage: two deployers with the same names each see and
// change only their own; an admin sees both and acts for one by name.
func TestTenant_Storage(t *testing.T) {
	fake := storage.NewFake(1 << 30)
	e := scripts.New(scripts.Config{}, Modules(Layers{Storage: fake}))
	run := func(owner string, admin bool, script string) string {
		t.Helper()
		out, err := e.Run(context.Background(), `storage := import("storage"); job := import("job")
`+script, scripts.Input{JobID: "j", Owner: owner, Admin: admin})
		if err != nil {
			t.Fatalf("%s: scripts.Run = %v", owner, err)
		}
		return string(out.Result)
	}
	run("alice", false, `storage.volume("data", "1G"); storage.write("data", "f", "alice's")`)
	run("bob", false, `storage.volume("data", "1G"); storage.write("data", "f", "bob's")`)
	if got := run("alice", false, `job.result(storage.read("data", "f"))`); got != `"alice's"` {
		t.Errorf("alice reads %s", got)
	}
	names := func(owner string, admin bool) []string {
		var vols []struct{ Name, Owner string }
		if err := json.Unmarshal([]byte(run(owner, admin, `job.result(storage.volumes())`)), &vols); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, v := range vols {
			out = append(out, v.Name+"@"+v.Owner)
		}
		return out
	}
	if got := names("bob", false); len(got) != 1 || got[0] != "data@bob" {
		t.Errorf("bob sees %v, want only his data", got)
	}
	if got := strings.Join(names("root", true), " "); got != "alice/data@alice bob/data@bob" && got != "bob/data@bob alice/data@alice" {
		t.Errorf("admin sees %v, want both", got)
	}
	// Bob cannot reach alice's volume, by name or by path.
	for _, script := range []string{
		`job.result(string(storage.read("alice/data", "f").value))`,
		`job.result(string(storage.delete_volume("alice/data").value))`,
	} {
		if got := run("bob", false, script); !strings.Contains(got, "only a site admin") {
			t.Errorf("bob: %s = %s, want refused", script, got)
		}
	}
	// The admin acts for alice by naming her.
	if got := run("root", true, `job.result(storage.read("alice/data", "f"))`); got != `"alice's"` {
		t.Errorf("admin reads alice/data: %s", got)
	}
	if _, err := fake.Volume(context.Background(), "5alice.data"); err != nil {
		t.Errorf("alice's volume is not 5alice.data on the host: %v", err)
	}
}
