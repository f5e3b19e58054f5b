// Package vm runs the node's virtual machines: their lifecycle, once, in
// Machines, over a hypervisor Backend (sal/vm/qemu, sal/vm/cloudhypervisor).
// Its users declare the few methods they call (scripts/host.VMs). Every
// lifecycle method is idempotent: creating an existing VM with the same
// spec, starting a running one, stopping a stopped one and deleting a
// missing one all succeed without doing anything.
//
// # Records
//
// Every VM has a directory under the state root holding vm.json (its spec,
// backend, desired state, pid, restarts, recent deaths, last error), its
// NoCloud seed image, its serial console log and its hypervisor's sockets.
// The record is replaced atomically, so a crash never leaves a torn one.
//
// # Recovery
//
// A VM counts as alive only if its recorded pid is a live, non-zombie
// process whose command line names the VM's directory: a recycled pid is
// never mistaken for it. A restarted runner calls Recover, which
// re-attaches to live VMs (never starting a second copy) and starts the ones
// that should run but died. While running, Machines.Run watches every VM
// that should run: a dead one is restarted with bounded exponential
// backoff, and one that dies MaxDeaths times within DeathWindow is kept in
// the failed state with its last console lines. Nothing is ever deleted
// except by Delete.
package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"github.com/writ-fleet/writ/sal/internal/poolfile"
)

// File is a file of the node's storage pool: a VM's disks, kernel,
// initrd and firmware are Files, which outside sal/ only
// storage.Pool.Holds makes (after resolving the path to a regular file of
// a volume or a cached image), so no caller can hand the hypervisor, which
// runs as root, a host path such as /dev/sda.
type File = poolfile.File

// Errors callers can test for with errors.Is.
var (
	ErrNotFound = errors.New("no such VM")
	ErrInvalid  = errors.New("invalid VM spec")
	ErrConflict = errors.New("conflict")
)

// State is a VM's lifecycle state.
type State int

// States of a VM.
const (
	StateStopped    State = iota // not running, and not meant to
	StateRunning                 // its process is alive
	StateRestarting              // died; restarting after a backoff
	StateFailed                  // died too often; kept for inspection
)

var stateNames = []string{"stopped", "running", "restarting", "failed"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// MarshalText writes the state's name.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a state's name.
func (s *State) UnmarshalText(b []byte) error {
	for i, n := range stateNames {
		if n == string(b) {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("vm: unknown state %q", b)
}

// Disk is a raw disk image attached to the VM, in order (the first is the
// guest's vda).
type Disk struct {
	Path     File `json:"path"`
	ReadOnly bool `json:"read_only,omitempty"`
}

// NIC is a network interface: a tap made by the network layer, the
// guest's MAC, and the address the seed's network-config gives it.
type NIC struct {
	Tap     string       `json:"tap"`
	MAC     string       `json:"mac"`
	Address netip.Prefix `json:"address"`
	Gateway netip.Addr   `json:"gateway"`
}

// Spec describes a VM.
type Spec struct {
	// Name is [a-z0-9][a-z0-9_.-]{0,62}.
	Name string `json:"name"`
	// CPUs defaults to 1; MemoryMiB to 256.
	CPUs      int `json:"cpus"`
	MemoryMiB int `json:"memory_mib"`
	// Direct kernel boot: Kernel (and optionally Initrd and Cmdline).
	Kernel  File   `json:"kernel,omitzero"`
	Initrd  File   `json:"initrd,omitzero"`
	Cmdline string `json:"cmdline,omitempty"`
	// Firmware boot (an EFI or BIOS image) when Kernel is empty.
	Firmware  File      `json:"firmware,omitzero"`
	Disks     []Disk    `json:"disks"`
	NICs      []NIC     `json:"nics"`
	CloudInit CloudInit `json:"cloud_init"`
}

// Limits on a spec.
const (
	DefaultCPUs      = 1
	DefaultMemoryMiB = 256
	MaxCPUs          = 64
	MinMemoryMiB     = 32
)

var nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

// tapRe is the name of a tap writ's network layer attaches
// (network.TapName: "wt" and 12 hex digits). A NIC may name nothing else:
// not another host interface (lo, eth0), and nothing that would reach a
// hypervisor's option string as more options.
var tapRe = regexp.MustCompile(`^wt[0-9a-f]{12}$`)

// ValidMAC reports whether mac is a unicast Ethernet address written as
// six colon-separated hex octets, the only form that reaches a hypervisor
// (a MAC is pasted into QEMU's -device option, where "…,romfile=/etc/shadow"
// would be one more option).
func ValidMAC(mac string) bool {
	hw, err := net.ParseMAC(mac)
	return err == nil && len(hw) == 6 && hw[0]&1 == 0 && strings.EqualFold(hw.String(), mac)
}

// ValidName reports whether s is a valid VM name.
func ValidName(s string) bool { return nameRe.MatchString(s) }

func (s Spec) withDefaults() Spec {
	if s.CPUs == 0 {
		s.CPUs = DefaultCPUs
	}
	if s.MemoryMiB == 0 {
		s.MemoryMiB = DefaultMemoryMiB
	}
	if s.Disks == nil {
		s.Disks = []Disk{}
	}
	if s.NICs == nil {
		s.NICs = []NIC{}
	}
	return s
}

// validate names the first thing wrong with the spec.
func (s Spec) validate() error {
	switch {
	case !ValidName(s.Name):
		return fmt.Errorf("%w: name %q must match %s", ErrInvalid, s.Name, nameRe)
	case s.CPUs < 1 || s.CPUs > MaxCPUs:
		return fmt.Errorf("%w: cpus %d must be 1 to %d", ErrInvalid, s.CPUs, MaxCPUs)
	case s.MemoryMiB < MinMemoryMiB:
		return fmt.Errorf("%w: memory %d MiB is below %d MiB", ErrInvalid, s.MemoryMiB, MinMemoryMiB)
	case s.Kernel.IsZero() && s.Firmware.IsZero():
		return fmt.Errorf("%w: give a kernel (direct boot) or a firmware image", ErrInvalid)
	}
	for _, f := range []File{s.Kernel, s.Initrd, s.Firmware} {
		if !f.IsZero() && !fileExists(f.Path()) {
			return fmt.Errorf("%w: %s does not exist", ErrInvalid, f)
		}
	}
	for _, d := range s.Disks {
		if !fileExists(d.Path.Path()) {
			return fmt.Errorf("%w: disk %s does not exist", ErrInvalid, d.Path)
		}
	}
	for i, n := range s.NICs {
		switch {
		case n.Tap == "" || n.MAC == "":
			return fmt.Errorf("%w: NIC %d needs a tap and a MAC", ErrInvalid, i)
		case !tapRe.MatchString(n.Tap):
			return fmt.Errorf("%w: NIC %d: %q is not a tap writ attached (net.attach gives one)", ErrInvalid, i, n.Tap)
		case !ValidMAC(n.MAC):
			return fmt.Errorf("%w: NIC %d: MAC %q is not a unicast address of six hex octets (aa:bb:cc:dd:ee:ff)", ErrInvalid, i, n.MAC)
		}
	}
	return nil
}

func (s Spec) equal(o Spec) bool {
	a, _ := json.Marshal(s)
	b, _ := json.Marshal(o)
	return string(a) == string(b)
}

// Info is a VM as the node sees it.
type Info struct {
	Name    string `json:"name"`
	Backend string `json:"backend"`
	State   State  `json:"state"`
	// Run says whether the VM should be running.
	Run       bool      `json:"run"`
	Pid       int       `json:"pid,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	Restarts  int       `json:"restarts"`
	LastError string    `json:"last_error,omitempty"`
	Console   string    `json:"console"`
	Spec      Spec      `json:"spec"`
}
