package host

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/writ-fleet/writ/scripts"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/sal/storage"
)

// TestStorageModule_VolumeScript runs scripts/lib/volume.tengo against the
// in-memory storage fake.
func TestStorageModule_VolumeScript(t *testing.T) {
	src, err := os.ReadFile("../lib/volume.tengo")
	if err != nil {
		t.Fatal(err)
	}
	fake := storage.NewFake(1 << 30)
	fake.ImageAllow = storage.ImagePolicy{Ranges: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	e := scripts.New(scripts.Config{}, Modules(Layers{Storage: fake}))
	run := func(args string) (scripts.Output, error) {
		return e.Run(context.Background(), string(src), scripts.Input{JobID: "j", Owner: "alice", Args: []byte(args)})
	}
	out, err := run(`{"name":"data","size":"64M","content":"hi there"}`)
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		Volume    string                `json:"volume"`
		Limit     int64                 `json:"limit"`
		Used      int64                 `json:"used"`
		ReadBack  string                `json:"read_back"`
		Snapshots []string              `json:"snapshots"`
		Pool      struct{ Total int64 } `json:"pool"`
	}
	if err := json.Unmarshal(out.Result, &res); err != nil {
		t.Fatalf("result %s: %v", out.Result, err)
	}
	if res.Volume != "data" || res.Limit != 64<<20 || res.ReadBack != "hi there" || res.Used != 8 || len(res.Snapshots) != 1 || res.Pool.Total != 1<<30 {
		t.Errorf("result = %+v", res)
	}
	// Bad input fails the job with a message that says what is wrong.
	for _, tc := range []struct{ args, want string }{
		{`{}`, "args.name is required"},
		{`{"name":"../x"}`, "invalid name"},
		{`{"name":"tiny","size":"1K","content":"` + strings.Repeat("x", 2000) + `"}`, "volume size limit reached"},
	} {
		_, err := run(tc.args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("volume.tengo %s = %v, want an error mentioning %q", tc.args, err, tc.want)
		}
	}
}

func TestStorageModule_NoPool(t *testing.T) {
	// A runner without the layer cannot run the job at all: the run stops
	// with scripts.ErrTransient, so the job is retried (elsewhere, or later).
	e := scripts.New(scripts.Config{}, Modules(Layers{}))
	_, err := e.Run(context.Background(), `storage := import("storage"); job := import("job"); v := storage.volume("x", "1G"); job.result("went on")`, scripts.Input{})
	if !errors.Is(err, scripts.ErrTransient) || !strings.Contains(err.Error(), "no storage pool") {
		t.Fatalf("scripts.Run = %v, want scripts.ErrTransient naming the missing layer", err)
	}
}

// TestModules_Names: the host modules are registered under exactly
// scripts.HostModuleNames, the names a checking engine (the supervisor's,
// scripts.CheckModules) lets scripts import.
func TestModules_Names(t *testing.T) {
	var got []string
	for name := range Modules(Layers{}) {
		got = append(got, name)
	}
	sort.Strings(got)
	want := append([]string(nil), scripts.HostModuleNames...)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("Modules() names = %v, want scripts.HostModuleNames %v", got, want)
	}
}
