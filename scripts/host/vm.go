package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/scripts"
	"net/netip"
	"time"

	"github.com/d5/tengo/v2"

	"github.com/writ-fleet/writ/internal/size"
	"github.com/writ-fleet/writ/sal/vm"
)

// VMs is what the "vm" module needs from the node's VM layer;
// *vm.Machines satisfies it.
type VMs interface {
	Create(ctx context.Context, spec vm.Spec) (vm.Info, error)
	Start(ctx context.Context, name string) (vm.Info, error)
	Stop(ctx context.Context, name string, grace time.Duration) (vm.Info, error)
	Delete(ctx context.Context, name string) error
	Info(ctx context.Context, name string) (vm.Info, error)
	List(ctx context.Context) ([]vm.Info, error)
	Console(ctx context.Context, name string, max int) (string, error)
}

var _ VMs = (*vm.Machines)(nil)

// maxConsole bounds vm.console.
const maxConsole = 32 << 10

// vmSpec is a VM spec as scripts write it.
type vmSpec struct {
	Name     string `json:"name"`
	CPUs     int    `json:"cpus"`
	Memory   any    `json:"memory"` // "512M" or MiB as a number
	Kernel   string `json:"kernel"`
	Initrd   string `json:"initrd"`
	Cmdline  string `json:"cmdline"`
	Firmware string `json:"firmware"`
	Disks    []any  `json:"disks"` // paths, or {path, read_only}
	NICs     []struct {
		Tap     string `json:"tap"`
		MAC     string `json:"mac"`
		Address string `json:"address"` // "10.0.0.2/24", or an address with subnet beside it
		Subnet  string `json:"subnet"`
		Gateway string `json:"gateway"`
	} `json:"nics"`
	Hostname string   `json:"hostname"`
	SSHKeys  []string `json:"ssh_keys"`
	UserData string   `json:"user_data"`
}

// maxSpecBytes bounds a VM spec as JSON (user data included).
const maxSpecBytes = 256 << 10

// vmFiles are the paths a script's spec names for a VM's files, before
// confine resolves them into the pool (vm.File, which only the pool makes).
type vmFiles struct {
	kernel, initrd, firmware string
	disks                    []string // one per spec.Disks
}

// toSpec converts a script's spec map to a vm.Spec, naming what is wrong.
// The spec's files are left empty: they come back as paths, for confine.
func toSpec(o tengo.Object) (vm.Spec, vmFiles, error) {
	m, ok := o.(*tengo.Map)
	if !ok {
		return vm.Spec{}, vmFiles{}, errors.New("vm.create takes a map: {name, cpus, memory, kernel, initrd, cmdline, disks, nics, ssh_keys}")
	}
	raw, err := scripts.EncodeValue(m, maxSpecBytes) // bounded: a spec that contains itself must not recurse forever
	if err != nil {
		return vm.Spec{}, vmFiles{}, fmt.Errorf("vm spec: %w", err)
	}
	var s vmSpec
	if err := json.Unmarshal(raw, &s); err != nil {
		return vm.Spec{}, vmFiles{}, fmt.Errorf("vm spec: %w", err)
	}
	files := vmFiles{kernel: s.Kernel, initrd: s.Initrd, firmware: s.Firmware}
	spec := vm.Spec{Name: s.Name, CPUs: s.CPUs, Cmdline: s.Cmdline,
		CloudInit: vm.CloudInit{Hostname: s.Hostname, SSHKeys: s.SSHKeys, UserData: s.UserData}}
	switch mem := s.Memory.(type) {
	case nil:
	case float64:
		spec.MemoryMiB = int(mem)
	case string:
		b, err := size.Parse(mem)
		if err != nil {
			return vm.Spec{}, vmFiles{}, fmt.Errorf("memory: %w", err)
		}
		spec.MemoryMiB = int(b >> 20)
	default:
		return vm.Spec{}, vmFiles{}, fmt.Errorf("memory: want \"512M\" or a number of MiB")
	}
	for _, d := range s.Disks {
		switch x := d.(type) {
		case string:
			spec.Disks = append(spec.Disks, vm.Disk{})
			files.disks = append(files.disks, x)
		case map[string]any:
			p, _ := x["path"].(string)
			ro, _ := x["read_only"].(bool)
			spec.Disks = append(spec.Disks, vm.Disk{ReadOnly: ro})
			files.disks = append(files.disks, p)
		default:
			return vm.Spec{}, vmFiles{}, fmt.Errorf("disks: want paths or {path, read_only}")
		}
	}
	for i, n := range s.NICs {
		nic := vm.NIC{Tap: n.Tap, MAC: n.MAC}
		if n.Address != "" {
			if p, err := netip.ParsePrefix(n.Address); err == nil {
				nic.Address = p
			} else if a, err := netip.ParseAddr(n.Address); err == nil {
				sub, err := netip.ParsePrefix(n.Subnet)
				if err != nil {
					return vm.Spec{}, vmFiles{}, fmt.Errorf("nic %d: address %s needs a subnet", i, n.Address)
				}
				nic.Address = netip.PrefixFrom(a, sub.Bits())
			} else {
				return vm.Spec{}, vmFiles{}, fmt.Errorf("nic %d: address %q", i, n.Address)
			}
		}
		if n.Gateway != "" {
			if nic.Gateway, err = netip.ParseAddr(n.Gateway); err != nil {
				return vm.Spec{}, vmFiles{}, fmt.Errorf("nic %d: gateway %q", i, n.Gateway)
			}
		}
		spec.NICs = append(spec.NICs, nic)
	}
	return spec, files, nil
}

// VMModule returns the "vm" module over vms. With nil vms (a runner
// without the VM layer) every call returns an error value.
//
//	vm.create(spec)          record a VM (not started): spec is {name, cpus, memory, kernel, initrd,
//	                         cmdline, firmware, disks: [path...], nics: [net.attach(...)...],
//	                         hostname, ssh_keys, user_data} → info
//	vm.start(name)           → info {name, state, pid, restarts, last_error, ...}
//	vm.stop(name[, seconds]) power button, then kill after the grace
//	vm.delete(name)
//	vm.info(name), vm.list()
//	vm.console(name[, bytes]) the end of the serial console (up to 32 KiB)
//
// Failures come back as error values, for the script to check with
// is_error().
//
// Every file a VM is given (disks, kernel, initrd, firmware) must be a file
// of files, the node's storage pool: a volume or clone, or a cached image
// (storage.clone(...).disk, storage.image(...).path). The hypervisor runs
// as root, so a host path (/dev/sda, the node key) is refused.
func VMModule(layer VMs, storageLayer Storage) scripts.Module {
	return func(rc *scripts.Run) map[string]tengo.Object {
		var unavailable error
		if layer == nil {
			unavailable = errors.New("this runner has no VM layer (run it as root with a hypervisor, without --no-vm)")
		}
		vms := tenantVMs{rc: rc, v: layer}
		var files *tenantStorage
		if storageLayer != nil {
			files = &tenantStorage{rc: rc, s: storageLayer}
		}
		call := func(name string, minArgs, maxArgs int, fn func(ctx context.Context, args []tengo.Object) (any, error)) tengo.Object {
			return hostFunc(rc, "vm", name, minArgs, maxArgs, unavailable, fn)
		}
		return map[string]tengo.Object{
			"create": call("create", 1, 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				spec, paths, err := toSpec(a[0])
				if err != nil {
					return nil, err
				}
				if err := confine(&spec, paths, files); err != nil {
					return nil, err
				}
				return vms.Create(ctx, spec)
			}),
			"start": call("start", 1, 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				return vms.Start(ctx, str(a[0]))
			}),
			"stop": call("stop", 1, 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				var grace time.Duration
				if len(a) == 2 {
					secs, err := intArg(a[1])
					if err != nil {
						return nil, fmt.Errorf("seconds: %w", err)
					}
					grace = time.Duration(secs) * time.Second
				}
				return vms.Stop(ctx, str(a[0]), grace)
			}),
			"delete": call("delete", 1, 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				return true, vms.Delete(ctx, str(a[0]))
			}),
			"info": call("info", 1, 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				return vms.Info(ctx, str(a[0]))
			}),
			"list": call("list", 0, 0, func(ctx context.Context, _ []tengo.Object) (any, error) {
				return vms.List(ctx)
			}),
			"console": call("console", 1, 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				n := maxConsole
				if len(a) == 2 {
					v, err := intArg(a[1])
					if err != nil {
						return nil, fmt.Errorf("bytes: %w", err)
					}
					n = min(v, maxConsole)
				}
				return vms.Console(ctx, str(a[0]), n)
			}),
		}
	}
}

// confine resolves every file the script named to a file of the node's
// storage pool (a vm.File, which only the pool makes), or refuses it.
func confine(spec *vm.Spec, paths vmFiles, files *tenantStorage) error {
	resolve := func(what, p string) (vm.File, error) {
		if p == "" {
			return vm.File{}, nil
		}
		if files == nil {
			return vm.File{}, fmt.Errorf("vm %s %q: this runner has no storage pool, and a VM's files must come from it", what, p)
		}
		f, err := files.Holds(p)
		if err != nil {
			return vm.File{}, fmt.Errorf("vm %s: %w (use storage.clone(...).disk or storage.image(...).path)", what, err)
		}
		return f, nil
	}
	var err error
	if spec.Kernel, err = resolve("kernel", paths.kernel); err != nil {
		return err
	}
	if spec.Initrd, err = resolve("initrd", paths.initrd); err != nil {
		return err
	}
	if spec.Firmware, err = resolve("firmware", paths.firmware); err != nil {
		return err
	}
	for i, p := range paths.disks {
		if p == "" {
			return fmt.Errorf("vm disk %d: a disk needs a path", i)
		}
		if spec.Disks[i].Path, err = resolve(fmt.Sprintf("disk %d", i), p); err != nil {
			return err
		}
	}
	return nil
}
