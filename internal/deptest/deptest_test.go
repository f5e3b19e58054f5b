package deptest

import (
	"encoding/json"
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
var rules = []struct {
	pkg    string
	banned []string
	why    string
}{
	{"sal/", []string{module + "/queue", module + "/coord", module + "/supervisor", module + "/runner"}, "host layers know nothing of queues or services"},
	{"scripts", []string{module + "/ledger", module + "/queue", module + "/coord", module + "/supervisor", module + "/runner"}, "the sandbox knows nothing of trust or transport"},
	{"envelope", []string{module + "/ledger", module + "/queue", module + "/coord", module + "/supervisor", module + "/runner", module + "/scripts"}, "the envelope is a leaf every side shares"},
	{"keys", []string{module + "/"}, "keys is a leaf"},
	{"httpsig", []string{module + "/ledger", module + "/queue", module + "/coord"}, "request signing is a leaf"},
	{"ledger", []string{module + "/queue", module + "/coord", module + "/supervisor", module + "/runner"}, "the ledger does not depend on the job path"},
}

func TestLayering(t *testing.T) {
	for _, p := range listPackages(t) {
		rel := strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/")
		for _, r := range rules {
			name := strings.TrimSuffix(r.pkg, "/")
			if rel != name && !strings.HasPrefix(rel, name+"/") {
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
