package deptest

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/writ-fleet/writ"

type pkg struct {
	ImportPath string
	Doc        string
	Imports    []string
	Deps       []string
	Name       string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	out, err := exec.Command("go", "list", "-json", module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	var pkgs []pkg
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// rules: a package (prefix) must not depend on these (prefixes), directly or
// through others.
// A rule's pkg covers its subpackages unless it ends in "=" (that package
// alone).
var rules = []struct {
	pkg    string
	banned []string
	why    string
}{
	{"scripts=", []string{module + "/sal/", module + "/scripts/host", module + "/scripts/sandbox"}, "the engine compiles and runs Tengo; what a script may do on a node is scripts/host's, the processes scripts/sandbox's"},
	{"sal/", []string{module + "/queue", module + "/coord", module + "/supervisor", module + "/runner"}, "host layers know nothing of queues or services"},
	{"scripts", []string{module + "/ledger", module + "/queue", module + "/coord", module + "/supervisor", module + "/runner"}, "the sandbox knows nothing of trust or transport"},
	{"envelope", []string{module + "/ledger", module + "/queue", module + "/coord", module + "/supervisor", module + "/runner", module + "/scripts"}, "the envelope is a leaf every side shares (with job's reasons)"},
	{"keys", []string{module + "/"}, "keys is a leaf"},
	{"httpsig", []string{module + "/ledger", module + "/queue", module + "/coord"}, "request signing is a leaf"},
	{"ledger", []string{module + "/queue", module + "/coord", module + "/supervisor", module + "/runner"}, "the ledger does not depend on the job path"},
	// No service imports another: what they share (job states, events,
	// verdicts, the one verification) lives in job and verify.
	{"coord", []string{module + "/supervisor", module + "/runner", module + "/identity", module + "/scripts", module + "/sal/"}, "no service imports another service, and coord runs no scripts"},
	{"supervisor", []string{module + "/coord", module + "/runner", module + "/identity"}, "no service imports another service"},
	{"supervisor", []string{module + "/sal/", module + "/scripts/host", module + "/scripts/sandbox"}, "the supervisor only compiles scripts: it links no host layer"},
	{"runner", []string{module + "/coord", module + "/supervisor", module + "/identity"}, "no service imports another service"},
	{"identity", []string{module + "/coord", module + "/supervisor", module + "/runner"}, "no service imports another service"},
	{"job", []string{module + "/envelope", module + "/keys", module + "/ledger", module + "/queue", module + "/coord", module + "/supervisor", module + "/runner", module + "/scripts", module + "/sal/"}, "job is data every side shares, and the one list of reasons: a leaf"},
	{"flow", []string{module + "/ledger", module + "/queue", module + "/coord", module + "/supervisor", module + "/runner", module + "/scripts", module + "/sal/", module + "/verify"}, "a flow's document and progress are data: coord drives them, nothing in them reaches out"},
	{"verify", []string{module + "/queue", module + "/coord", module + "/supervisor", module + "/runner", module + "/scripts", module + "/sal/"}, "the one verification needs only the envelope and the ledger's trust"},
}

// hostLibraries are the modules of the node's host layers.
var hostLibraries = []string{"github.com/google/nftables", "github.com/vishvananda/netlink", "github.com/containerd/btrfs", "github.com/diskfs/go-diskfs"}

// light are the services that must not link the host layers' libraries:
// coord routes and records jobs and runs no script (a coord that imported
// the supervisor once pulled all of these in); the supervisor compiles
// scripts but runs none on a node.
var light = map[string][]string{
	"coord":      append([]string{"github.com/d5/tengo"}, hostLibraries...),
	"supervisor": hostLibraries,
}

func TestServicesAreLight(t *testing.T) {
	found := 0
	for _, p := range listPackages(t) {
		rel := strings.TrimPrefix(p.ImportPath, module+"/")
		banned, ok := light[rel]
		if !ok {
			continue
		}
		found++
		for _, d := range p.Deps {
			for _, h := range banned {
				if strings.HasPrefix(d, h) {
					t.Errorf("%s depends on %s", rel, d)
				}
			}
		}
	}
	if found != len(light) {
		t.Fatalf("found %d of the %d light packages", found, len(light))
	}
}

func TestLayering(t *testing.T) {
	for _, p := range listPackages(t) {
		rel := strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/")
		for _, r := range rules {
			name, exact := strings.CutSuffix(strings.TrimSuffix(r.pkg, "/"), "=")
			if rel != name && (exact || !strings.HasPrefix(rel, name+"/")) {
				continue
			}
			for _, d := range p.Deps {
				for _, b := range r.banned {
					if (d == strings.TrimSuffix(b, "/") || strings.HasPrefix(d, b)) && d != p.ImportPath {
						t.Errorf("%s depends on %s: %s", rel, d, r.why)
					}
				}
			}
		}
	}
}

// TestOnlyQueueTouchesRedis: asynq and go-redis are imported by queue
// alone (sal/* may use Redis too, but none does yet).
func TestOnlyQueueTouchesRedis(t *testing.T) {
	for _, p := range listPackages(t) {
		rel := strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/")
		// The benchmark's baseline is raw asynq by definition.
		if rel == "queue" || strings.HasPrefix(rel, "sal/") || rel == "cmd/writ-bench" {
			continue
		}
		for _, imp := range p.Imports {
			if strings.HasPrefix(imp, "github.com/hibiken/asynq") || strings.HasPrefix(imp, "github.com/redis/go-redis") {
				t.Errorf("%s imports %s; only queue may", rel, imp)
			}
		}
	}
}

func TestPackagesHaveDocs(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.Doc == "" {
			t.Errorf("package %s has no doc comment", p.ImportPath)
		}
	}
}

// TestArchitectureTable: docs/ARCHITECTURE.md's package table names every
// package go list finds, and nothing that is not one.
func TestArchitectureTable(t *testing.T) {
	doc, err := os.ReadFile("../../docs/ARCHITECTURE.md")
	if err != nil {
		t.Fatal(err)
	}
	named := map[string]bool{}
	for _, line := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		first := strings.SplitN(line, "|", 3)[1] // the row's first cell
		for _, part := range strings.Split(first, "`") {
			if p := strings.TrimSpace(part); p != "" && !strings.ContainsAny(p, " ,") && p != "and" {
				named[p] = true
			}
		}
	}
	pkgs := map[string]bool{}
	for _, p := range listPackages(t) {
		rel := strings.TrimPrefix(p.ImportPath, module+"/")
		pkgs[rel] = true
		if !named[rel] {
			t.Errorf("docs/ARCHITECTURE.md's package table does not name %s", rel)
		}
	}
	for n := range named {
		if !pkgs[n] {
			t.Errorf("docs/ARCHITECTURE.md's package table names %s, which is no package", n)
		}
	}
}
