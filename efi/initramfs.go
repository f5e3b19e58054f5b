package efi

import (
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
)

// BootModules are the kernel modules a node needs before it can register:
// virtio and common NICs, NVMe/AHCI/SCSI disks and btrfs. writ init loads
// them first, in this order (each after its dependencies); a module the
// kernel has built in, or lacks, is skipped.
var BootModules = []string{
	"crc32c_generic", "crc32c_intel", // libcrc32c needs a crc32c first (a soft dependency)
	"virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "e1000", "e1000e", "igb", "ixgbe", "r8169",
	"nvme", "ahci", "sd_mod", "btrfs",
}

// NodeModules are the rest a node loads while it registers: USB storage
// and the networking its SALs need (tun, bridge, veth, nf_tables and the
// nft expressions writ's rules use). Loading modules under emulation is
// slow, so these stay off the path to registration.
var NodeModules = []string{
	"usb_storage", "uas", "xhci_pci",
	"tun", "bridge", "veth", "nf_tables", "nft_nat", "nft_masq", "nft_ct", "nft_fib_inet", "nf_nat",
}

// NodeConfig is the site configuration baked into the image
// (/etc/writ/node.json); the kernel command line overrides it.
type NodeConfig struct {
	Ledger string `json:"ledger"`
	Site   string `json:"site"`
	Token  string `json:"token,omitempty"`
	Redis  string `json:"redis"`
	// CA is the site CA's certificate (PEM): the node talks TLS to the
	// ledger and Redis, verified against it. Without one the node talks
	// plain HTTP.
	CA string `json:"ca,omitempty"`
	// Supervisor, when set, is the site's dispatcher: the node takes its
	// work there (writ node --supervisor) and needs no Redis.
	Supervisor string `json:"supervisor,omitempty"`
}

// Public is the configuration without its secrets (the enrollment token,
// a password in the Redis URL): what a netboot initramfs, which anyone on
// the boot network can fetch, may carry.
func (c NodeConfig) Public() NodeConfig {
	c.Token = ""
	if u, err := url.Parse(c.Redis); err == nil && u.User != nil {
		u.User = url.User(u.User.Username())
		c.Redis = u.String()
	}
	return c
}

// RedactURL hides a URL's password.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "xxx")
	}
	return u.String()
}

// ConfigPath is where the initramfs holds the node's configuration.
const ConfigPath = "etc/writ/node.json"

// Initramfs describes a node initramfs.
type Initramfs struct {
	// Init is the static writ binary, installed as /init.
	Init string
	// Modules is the kernel's lib/modules/VERSION directory; Boot and Want
	// name the modules to include (BootModules and NodeModules by default).
	Modules    string
	Boot, Want []string
	// Config is baked into /etc/writ/node.json.
	Config NodeConfig
	// Extra files to add: archive path → host path (such as mkfs.btrfs and
	// the libraries it needs).
	Extra map[string]string
}

// Write writes the initramfs (gzip-compressed newc cpio) to w. The archive
// is reproducible: same inputs, same bytes.
func (in Initramfs) Write(w io.Writer) error {
	bootWant, want := in.Boot, in.Want
	if bootWant == nil {
		bootWant = BootModules
	}
	if want == nil {
		want = NodeModules
	}
	boot, err := ResolveAvailable(in.Modules, bootWant)
	if err != nil {
		return err
	}
	every, err := ResolveAvailable(in.Modules, append(append([]string(nil), bootWant...), want...))
	if err != nil {
		return err
	}
	inBoot := map[string]bool{}
	for _, m := range boot {
		inBoot[m] = true
	}
	var rest []string
	for _, m := range every {
		if !inBoot[m] {
			rest = append(rest, m)
		}
	}
	var records []cpio.Record
	dirs := map[string]bool{}
	dir := func(p string) {
		for d := filepath.Dir(p); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	add := func(path string, data []byte, perm uint64) {
		dir(path)
		records = append(records, cpio.StaticFile(path, string(data), perm))
	}
	initBin, err := os.ReadFile(in.Init)
	if err != nil {
		return fmt.Errorf("efi: init binary: %w", err)
	}
	add("init", initBin, 0o755)
	for _, list := range []struct {
		file string
		mods []string
	}{{"etc/writ/modules.boot", boot}, {"etc/writ/modules.order", rest}} {
		var order []string
		for _, m := range list.mods {
			data, err := os.ReadFile(filepath.Join(in.Modules, m))
			if err != nil {
				return err
			}
			add("lib/modules/"+filepath.Base(m), data, 0o644)
			order = append(order, filepath.Base(m))
		}
		add(list.file, []byte(strings.Join(order, "\n")+"\n"), 0o644)
	}
	cfg, _ := json.MarshalIndent(in.Config, "", "  ")
	add(ConfigPath, cfg, 0o600)
	extra := make([]string, 0, len(in.Extra))
	for p := range in.Extra {
		extra = append(extra, p)
	}
	sort.Strings(extra)
	for _, p := range extra {
		data, err := os.ReadFile(in.Extra[p])
		if err != nil {
			return err
		}
		add(p, data, 0o755)
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "var/lib/writ"} {
		dir(d + "/x")
	}
	// Directories first, each explicitly 0755 (the library's own helper
	// would make them 0777), then the files.
	names := make([]string, 0, len(dirs))
	for d := range dirs {
		names = append(names, d)
	}
	sort.Strings(names)
	all := make([]cpio.Record, 0, len(names)+len(records)+1)
	for _, d := range names {
		all = append(all, cpio.Directory(d, 0o755))
	}
	all = append(all, cpio.CharDev("dev/console", 0o600, 5, 1))
	all = append(all, records...)
	cpio.MakeAllReproducible(all)
	gz := gzip.NewWriter(w)
	cw := cpio.Newc.Writer(gz)
	if err := cpio.WriteRecords(cw, all); err != nil {
		return fmt.Errorf("efi: initramfs: %w", err)
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return err
	}
	return gz.Close()
}

// ResolveAvailable is ResolveModules for the wanted modules the kernel has
// as modules (built-in ones and ones it lacks are skipped).
func ResolveAvailable(modDir string, want []string) ([]string, error) {
	var have []string
	for _, m := range want {
		if _, err := ResolveModules(modDir, []string{m}); err == nil {
			have = append(have, m)
		}
	}
	return ResolveModules(modDir, have)
}

// List returns the entries of an initramfs (gzip newc cpio) as lines
// "MODE PATH" (and SIZE for files), for golden listings.
func List(r io.ReaderAt) ([]string, error) {
	rr := cpio.Newc.Reader(r)
	recs, err := cpio.ReadAllRecords(rr)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rec := range recs {
		out = append(out, fmt.Sprintf("%06o %s %d", rec.Mode, rec.Name, rec.FileSize))
	}
	return out, nil
}
