package vm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
)

// CloudInit is what a VM's NoCloud seed says: its identity, SSH keys, any
// user-data of the script's, and the network configuration of its NICs.
type CloudInit struct {
	// Hostname defaults to the VM's name.
	Hostname string `json:"hostname,omitempty"`
	// SSHKeys are authorized for the default user.
	SSHKeys []string `json:"ssh_keys,omitempty"`
	// UserData replaces the generated #cloud-config when set.
	UserData string `json:"user_data,omitempty"`
}

// seedFiles renders the NoCloud files for spec: meta-data, user-data and
// network-config (version 2, each NIC matched by MAC). Every value is
// YAML-quoted, so no script-supplied string can change the structure.
func seedFiles(spec Spec) map[string]string {
	ci := spec.CloudInit
	host := ci.Hostname
	if host == "" {
		host = spec.Name
	}
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", quote("writ-"+spec.Name), quote(host))
	user := ci.UserData
	if user == "" {
		var b strings.Builder
		b.WriteString("#cloud-config\n")
		fmt.Fprintf(&b, "hostname: %s\n", quote(host))
		if len(ci.SSHKeys) > 0 {
			b.WriteString("ssh_authorized_keys:\n")
			for _, k := range ci.SSHKeys {
				fmt.Fprintf(&b, "  - %s\n", quote(k))
			}
		}
		user = b.String()
	}
	var netcfg strings.Builder
	netcfg.WriteString("version: 2\nethernets:\n")
	for i, n := range spec.NICs {
		fmt.Fprintf(&netcfg, "  eth%d:\n    match:\n      macaddress: %s\n    set-name: %s\n", i, quote(n.MAC), quote(fmt.Sprintf("eth%d", i)))
		if n.Address.IsValid() {
			fmt.Fprintf(&netcfg, "    addresses:\n      - %s\n", quote(n.Address.String()))
		}
		if n.Gateway.IsValid() {
			fmt.Fprintf(&netcfg, "    routes:\n      - to: \"0.0.0.0/0\"\n        via: %s\n", quote(n.Gateway.String()))
		}
	}
	return map[string]string{"meta-data": meta, "user-data": user, "network-config": netcfg.String()}
}

func quote(s string) string { return strconv.Quote(s) }

// WriteSeed builds the NoCloud seed image (ISO 9660 with Rock Ridge,
// volume label "cidata") at path, replacing any earlier one.
func WriteSeed(path string, spec Spec) error {
	files := seedFiles(spec)
	size := int64(1 << 20)
	for _, c := range files {
		size += int64(len(c))
	}
	tmp := path + ".tmp"
	os.Remove(tmp)
	work, err := os.MkdirTemp(filepath.Dir(path), ".seed-work")
	if err != nil {
		return fmt.Errorf("vm: seed: %w", err)
	}
	defer os.RemoveAll(work)
	d, err := diskfs.Create(tmp, size, diskfs.SectorSizeDefault)
	if err != nil {
		return fmt.Errorf("vm: seed: %w", err)
	}
	d.LogicalBlocksize = 2048
	fs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 0, FSType: filesystem.TypeISO9660, VolumeLabel: "cidata", WorkDir: work, Reproducible: true})
	if err != nil {
		d.Close()
		return fmt.Errorf("vm: seed: %w", err)
	}
	for _, name := range []string{"meta-data", "user-data", "network-config"} {
		f, err := fs.OpenFile("/"+name, os.O_CREATE|os.O_RDWR)
		if err == nil {
			_, err = f.Write([]byte(files[name]))
		}
		if err != nil {
			d.Close()
			return fmt.Errorf("vm: seed %s: %w", name, err)
		}
	}
	iso, ok := fs.(*iso9660.FileSystem)
	if !ok {
		d.Close()
		return errors.New("vm: seed: not an ISO 9660 filesystem")
	}
	if err := iso.Finalize(iso9660.FinalizeOptions{RockRidge: true, VolumeIdentifier: "cidata"}); err != nil {
		d.Close()
		return fmt.Errorf("vm: seed: %w", err)
	}
	if err := d.Close(); err != nil {
		return fmt.Errorf("vm: seed: %w", err)
	}
	return os.Rename(tmp, path)
}
