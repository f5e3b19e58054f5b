package scripts

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/sal/storage"
)

// TestStorageModule_VolumeScript runs scripts/lib/volume.tengo against the
// in-memory storage fake.
func TestStorageModule_VolumeScript(t *testing.T) {
	src, err := os.ReadFile("lib/volume.tengo")
	if err != nil {
		t.Fatal(err)
	}
	fake := storage.NewFake(1 << 30)
	fake.ImageAllow = storage.ImagePolicy{Ranges: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	e := New(Config{}, HostModules(Layers{Storage: fake}))
	run := func(args string) (Output, error) {
		return e.Run(context.Background(), string(src), Input{JobID: "j", Owner: "alice", Args: []byte(args)})
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
	// with ErrTransient, so the job is retried (elsewhere, or later).
	e := New(Config{}, HostModules(Layers{}))
	_, err := e.Run(context.Background(), `storage := import("storage"); job := import("job"); v := storage.volume("x", "1G"); job.result("went on")`, Input{})
	if !errors.Is(err, ErrTransient) || !strings.Contains(err.Error(), "no storage pool") {
		t.Fatalf("Run = %v, want ErrTransient naming the missing layer", err)
	}
}
