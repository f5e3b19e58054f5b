package e2e

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/writ-fleet/writ/efi"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/sal/vm/qemu"
)

// nodeImage builds the writ node image for the fleet (a static writ as
// /init, Debian's linux-image-amd64) with the fleet's addresses as the
// QEMU guest sees the host (10.0.2.2, user networking).
func nodeImage(t *testing.T, f *fleet, token string) string {
	t.Helper()
	dir := t.TempDir()
	static := staticWrit(t)
	k, err := efi.FetchKernel(context.Background(), "linux-image-amd64", efi.DefaultCacheDir())
	if err != nil {
		t.Fatalf("fetch the kernel: %v", err)
	}
	host := func(u string) string { return strings.Replace(u, "127.0.0.1", "10.0.2.2", 1) }
	out := filepath.Join(dir, "image")
	cmd := exec.Command(writBin, "image", "build", "--writ", static, "--kernel", k.Vmlinuz, "--modules", k.Modules, "--out", out,
		"--ledger", host(f.ledger), "--site", "local", "--token", token, "--redis", host(f.redis))
	res, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("writ image build: %v\n%s", err, res)
	}
	t.Logf("writ image build:\n%s", res)
	return out
}

var (
	staticOnce sync.Once
	staticPath string
	staticErr  error
)

// staticWrit builds writ statically once per test binary: /init must be
// static. cgo stays on (the btrfs ioctls need it), with the pure-Go
// resolver and user lookups.
func staticWrit(t *testing.T) string {
	t.Helper()
	staticOnce.Do(func() {
		staticPath = filepath.Join(filepath.Dir(writBin), "writ-static")
		build := exec.Command("go", "build", "-tags", "netgo,osusergo", "-ldflags", `-s -w -linkmode external -extldflags "-static"`, "-o", staticPath, "github.com/writ-fleet/writ/cmd/writ")
		if out, err := build.CombinedOutput(); err != nil {
			staticErr = fmt.Errorf("build a static writ: %v\n%s", err, out)
		}
	})
	if staticErr != nil {
		t.Fatal(staticErr)
	}
	return staticPath
}

// TestImage_BootUSB boots the node image from usb.img in QEMU (OVMF, TCG,
// an empty virtio disk, user networking) against a fleet on the host: the
// node registers, reports uptime, runs a signed job pinned to it, and after
// a reboot comes back with the same node ID (its key is on its disk).
func TestImage_BootUSB(t *testing.T) {
	slow(t)
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, qemu.DefaultBinary)
	for _, p := range []string{efi.DefaultStub, "/usr/share/OVMF/OVMF_CODE_4M.fd"} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s missing: make test installs systemd-boot-efi and ovmf", p)
		}
	}
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	token := f.enrollSite(5)
	image := nodeImage(t, f, token)
	imageServesNoSecret(t, f, image, token)
	dir := t.TempDir()
	vars := ovmfVars(t)
	disk := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(disk, nil, 0o644); err != nil || os.Truncate(disk, 2<<30) != nil {
		t.Fatal("make the node's empty disk")
	}
	console := filepath.Join(dir, "console.log")
	qmpSock := filepath.Join(dir, "qmp.sock")
	vmCmd := exec.Command(qemu.DefaultBinary, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
		"-nodefaults", "-display", "none", "-serial", "file:"+console, "-qmp", "unix:"+qmpSock+",server=on,wait=off",
		"-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd", "-drive", "if=pflash,format=raw,file="+vars,
		"-device", "qemu-xhci", "-drive", "if=none,id=stick,format=raw,file="+filepath.Join(image, efi.USBFile), "-device", "usb-storage,drive=stick,bootindex=0",
		"-drive", "if=virtio,format=raw,file="+disk,
		"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0")
	vmCmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := vmCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vmCmd.Process.Kill(); vmCmd.Wait() })
	consoleTail := func() string { b, _ := os.ReadFile(console); return tail(string(b), 3000) }

	var node ledger.Node
	waitNode := func(what string, cond func(n ledger.Node) bool) {
		t.Helper()
		deadline := time.Now().Add(4 * time.Minute)
		for time.Now().Before(deadline) {
			if list, err := f.lc.Nodes(ctx, "local"); err == nil && len(list) > 0 {
				if len(list) > 1 {
					t.Fatalf("more than one node registered: %+v", list)
				}
				if cond(list[0]) {
					node = list[0]
					return
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("timed out waiting for %s; console:\n%s", what, consoleTail())
	}
	waitNode("the node to register and report", func(n ledger.Node) bool { return n.Liveness == ledger.LivenessOnline })
	t.Logf("power-on to registered and reporting: %s (TCG)", time.Since(start).Round(time.Millisecond))
	if initAt, regAt, ok := bootTimes(console); ok {
		t.Logf("after the kernel started: /init at %.2f s, registered at %.2f s (%.2f× the kernel's boot-to-init)", initAt, regAt, regAt/initAt)
	}
	if b, err := os.ReadFile(console); err == nil {
		var steps []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "writ ") {
				steps = append(steps, l)
			}
		}
		t.Logf("the node's console:\n%s", strings.Join(steps, "\n"))
	}
	first := node
	if first.Facts.Kernel == "" || first.Capacity.CPUs != 2 {
		t.Errorf("node facts = %+v", first)
	}

	// A signed job pinned to the node runs there and returns its result.
	j := envelope.NewJob("on-the-node", `job := import("job"); storage := import("storage"); u := storage.usage(); job.result({node: job.node, pool: is_error(u) ? string(u.value) : u.total})`, "local", time.Now())
	j.Node = first.ID
	rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
	if err != nil {
		t.Fatal(err)
	}
	res := f.waitJob(rep.ID, 2*time.Minute)
	var out struct {
		Node string `json:"node"`
		Pool any    `json:"pool"`
	}
	json.Unmarshal(res.Result, &out)
	if res.State != job.StateSucceeded || out.Node != first.ID {
		t.Fatalf("pinned job = %s %s (%s); console:\n%s", res.State, res.Result, res.Error, consoleTail())
	}
	if total, ok := out.Pool.(float64); !ok || total < 1<<30 {
		t.Errorf("the node's pool = %v, want the 2 GiB disk formatted as its pool", out.Pool)
	}

	// Reboot (Ctrl-Alt-Del: a clean reboot by writ init): same node ID, a
	// new boot.
	keys := []map[string]string{{"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "delete"}}
	if _, err := qemu.CommandArgs(qmpSock, "send-key", map[string]any{"keys": keys}); err != nil {
		t.Fatal(err)
	}
	waitNode("the node to come back after a reboot", func(n ledger.Node) bool { return n.Boots >= 2 && n.Liveness == ledger.LivenessOnline })
	if node.ID != first.ID {
		t.Errorf("after a reboot the node is %s, was %s", node.ID, first.ID)
	}
}

// TestImage_NetbootIPXE netboots the node image over iPXE from writ image
// serve: OVMF's iPXE (the NIC's option ROM) gets the script's URL from
// DHCP, the server answers this machine's MAC with its own script (which
// passes the enrollment token on the kernel command line), and the node
// registers. It has no disk, so its key lives in memory.
func TestImage_NetbootIPXE(t *testing.T) {
	slow(t)
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, qemu.DefaultBinary)
	if _, err := os.Stat("/usr/lib/ipxe/qemu/efi-virtio.rom"); err != nil {
		t.Fatalf("QEMU's iPXE ROM is missing: make test installs ipxe-qemu")
	}
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	token := f.enrollSite(5)
	image := nodeImage(t, f, "") // no token baked in: the per-MAC script brings it
	port := testenv.FreePort(t)
	base := fmt.Sprintf("http://10.0.2.2:%d", port)
	const mac = "52:54:00:12:34:56"
	os.MkdirAll(filepath.Join(image, "mac"), 0o755)
	script := efi.IPXEScript(base, efi.DefaultCmdline+" writ.token="+token)
	if err := os.WriteFile(filepath.Join(image, "mac", "52-54-00-12-34-56.ipxe"), []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := f.start("image", "image", "serve", "--dir", image, "--listen", testenv.Addr(port))

	dir := t.TempDir()
	vars := ovmfVars(t)
	console := filepath.Join(dir, "console.log")
	vmCmd := exec.Command(qemu.DefaultBinary, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "1024",
		"-nodefaults", "-display", "none", "-serial", "file:"+console,
		"-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd", "-drive", "if=pflash,format=raw,file="+vars,
		"-netdev", "user,id=n0,bootfile="+base+"/boot.ipxe?mac="+mac,
		"-device", "virtio-net-pci,netdev=n0,mac="+mac+",bootindex=0")
	vmCmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := vmCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vmCmd.Process.Kill(); vmCmd.Wait() })
	deadline := time.Now().Add(4 * time.Minute)
	for {
		if list, err := f.lc.Nodes(ctx, "local"); err == nil && len(list) == 1 && list[0].Liveness == ledger.LivenessOnline {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(console)
			t.Fatalf("the netbooted node did not register; console:\n%s", tail(string(b), 3000))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("power-on to registered over iPXE: %s (TCG)", time.Since(start).Round(time.Millisecond))
	log := srv.log.String()
	for _, want := range []string{`"path":"/boot.ipxe","mac":"` + mac, `"path":"/vmlinuz"`, `"path":"/initrd.img"`} {
		if !strings.Contains(log, want) {
			t.Errorf("the image server's access log lacks %s:\n%s", want, tail(log, 2000))
		}
	}
}

var (
	initRe = regexp.MustCompile(`\[\s*([0-9.]+)\] Run /init as init process`)
	regRe  = regexp.MustCompile(`\[\s*([0-9.]+)\] writ node n[0-9a-f]+: registered with site`)
)

// bootTimes reads from a node's console when the kernel started /init and
// when the node was registered, in seconds after the kernel started.
func bootTimes(console string) (initAt, regAt float64, ok bool) {
	b, _ := os.ReadFile(console)
	mi, mr := initRe.FindSubmatch(b), regRe.FindSubmatch(b)
	if mi == nil || mr == nil {
		return 0, 0, false
	}
	initAt, _ = strconv.ParseFloat(string(mi[1]), 64)
	regAt, _ = strconv.ParseFloat(string(mr[1]), 64)
	return initAt, regAt, initAt > 0
}

// ovmfVars is a private copy of OVMF's variable store for one VM.
func ovmfVars(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
	if err != nil {
		t.Fatalf("OVMF: %v (make test installs ovmf)", err)
	}
	vars := filepath.Join(t.TempDir(), "OVMF_VARS.fd")
	if err := os.WriteFile(vars, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return vars
}

// imageServesNoSecret: writ image serve, asked by a stranger for
// everything it might serve, hands out no token: the netboot initramfs
// holds none (the USB stick's own does), and the UKI and USB image, which
// do, are not served at all.
func imageServesNoSecret(t *testing.T, f *fleet, image, token string) {
	t.Helper()
	// The USB stick's image does hold the token, compressed inside its
	// UKI: that it is not served at all is what is checked for it.
	port := testenv.FreePort(t)
	srv := f.start("image-check", "image", "serve", "--dir", image, "--listen", testenv.Addr(port))
	defer f.stop(srv, syscall.SIGTERM)
	base := "http://" + testenv.Addr(port)
	testenv.WaitFor(t, 10*time.Second, "the image server", func() bool {
		resp, err := http.Get(base + "/boot.ipxe")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
	for _, path := range []string{"/boot.ipxe", "/boot.ipxe?mac=52:54:00:00:00:01", "/vmlinuz", "/initrd.img", "/writ-node.efi", "/usb.img", "/../node.json"} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if path == "/initrd.img" {
			zr, err := gzip.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatalf("initrd.img: %v", err)
			}
			if body, err = io.ReadAll(zr); err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(body, []byte(`"site": "local"`)) {
				t.Errorf("the netboot initramfs lacks the site configuration")
			}
		}
		if bytes.Contains(body, []byte(token)) {
			t.Errorf("writ image serve hands out the enrollment token at %s", path)
		}
		if (path == "/writ-node.efi" || path == "/usb.img") && resp.StatusCode != http.StatusNotFound {
			t.Errorf("writ image serve serves %s (%d): it holds the token", path, resp.StatusCode)
		}
	}
}
