// Package nodeinit is `writ init`: PID 1 of the writ node image. It mounts
// the basic filesystems, loads the image's kernel modules, brings up the
// network with DHCP (insomniacslk/dhcp), finds the node's disk, reads the
// site configuration (baked in, overridden on the kernel command line),
// reaps orphans, and hands over to the node (identity agent and runner);
// it prints a status a person at the console can act on, and powers off or
// reboots cleanly when asked.
package nodeinit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/efi"
	"github.com/writ-fleet/writ/internal/reaper"
)

// PoolLabel marks a disk writ formatted as the node's pool.
const PoolLabel = "writ-pool"

// Config is the node's configuration after the kernel command line.
type Config struct {
	efi.NodeConfig
	// Disk is the block device for the node's pool ("" when none: the node
	// keeps its key in memory and says so).
	Disk string
}

// Setup does everything PID 1 does before the node runs; it returns the
// configuration. out is the console.
func Setup(ctx context.Context, out io.Writer) (Config, error) {
	say := func(format string, a ...any) { fmt.Fprintf(out, "writ init: "+format+"\n", a...) }
	if err := mountBasics(); err != nil {
		return Config{}, err
	}
	// Ctrl-Alt-Del becomes SIGINT to PID 1 (a clean reboot), not an
	// immediate reset.
	unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	// The modules registration needs first; the rest load meanwhile.
	loaded, failed := loadModules("/etc/writ/modules.boot", "/lib/modules")
	say("loaded %d boot modules (%d failed)", loaded, len(failed))
	for _, f := range failed {
		say("  module %s", f)
	}
	go func() {
		loaded, failed := loadModules("/etc/writ/modules.order", "/lib/modules")
		say("loaded %d more modules (%d failed)", loaded, len(failed))
		for _, f := range failed {
			say("  module %s", f)
		}
	}()
	cfg, err := readConfig(efi.ConfigPath, "/proc/cmdline")
	if err != nil {
		return Config{}, err
	}
	// No credential on the console: the Redis password (if the URL holds
	// one) is hidden and the token never printed.
	say("site %q, ledger %s, redis %s, token given: %v", cfg.Site, cfg.Ledger, efi.RedactURL(cfg.Redis), cfg.Token != "")
	if err := bringUpNetwork(ctx, say); err != nil {
		say("NETWORK DOWN: %v", err)
	}
	cfg.Disk = findDisk(say)
	return cfg, nil
}

func mountBasics() error {
	for _, m := range []struct{ src, dst, fstype string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/run", "tmpfs"}, {"tmpfs", "/tmp", "tmpfs"}, {"tmpfs", "/var/lib/writ", "tmpfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	os.MkdirAll("/sys/fs/cgroup", 0o755)
	unix.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, "")
	return nil
}

// loadModules loads the modules listed (dependencies first) in order.
func loadModules(order, dir string) (int, []string) {
	data, err := os.ReadFile(order)
	if err != nil {
		return 0, []string{"no " + order}
	}
	n := 0
	var failed []string
	for _, name := range strings.Fields(string(data)) {
		f, err := os.Open(filepath.Join(dir, name))
		if err == nil {
			err = unix.FinitModule(int(f.Fd()), "", 0)
			f.Close()
		}
		switch {
		case err == nil:
			n++
		case errors.Is(err, unix.EEXIST):
		default:
			failed = append(failed, name+": "+err.Error())
		}
	}
	return n, failed
}

// readConfig reads the baked-in configuration and applies writ.KEY=VALUE
// from the kernel command line.
func readConfig(path, cmdline string) (Config, error) {
	var cfg Config
	if data, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(data, &cfg.NodeConfig); err != nil {
			return cfg, fmt.Errorf("%s: %w", path, err)
		}
	}
	line, _ := os.ReadFile(cmdline)
	applyCmdline(&cfg.NodeConfig, string(line))
	return cfg, nil
}

func applyCmdline(c *efi.NodeConfig, line string) {
	for _, f := range strings.Fields(line) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		switch k {
		case "writ.ledger":
			c.Ledger = v
		case "writ.site":
			c.Site = v
		case "writ.token":
			c.Token = v
		case "writ.redis":
			c.Redis = v
		case "writ.supervisor":
			c.Supervisor = v
		}
	}
}

// bringUpNetwork brings up lo and configures the first interface that
// gets a DHCP lease.
func bringUpNetwork(ctx context.Context, say func(string, ...any)) error {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		netlink.LinkSetUp(lo)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	var tried []string
	for _, l := range links {
		if l.Type() != "device" || l.Attrs().Name == "lo" || len(l.Attrs().HardwareAddr) == 0 {
			continue
		}
		name := l.Attrs().Name
		tried = append(tried, name)
		if err := netlink.LinkSetUp(l); err != nil {
			continue
		}
		lease, err := dhcp(ctx, name)
		if err != nil {
			say("%s: no DHCP lease: %v", name, err)
			continue
		}
		ack := lease.ACK
		ones, _ := ack.SubnetMask().Size()
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: ack.YourIPAddr, Mask: net.CIDRMask(ones, 32)}}
		if err := netlink.AddrReplace(l, addr); err != nil {
			return fmt.Errorf("%s: address: %w", name, err)
		}
		if r := ack.Router(); len(r) > 0 {
			netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: r[0]})
		}
		say("network: %s %s via %v", name, addr.IPNet, ack.Router())
		return nil
	}
	return fmt.Errorf("no interface got a lease (tried %v)", tried)
}

func dhcp(ctx context.Context, iface string) (*nclient4.Lease, error) {
	c, err := nclient4.New(iface, nclient4.WithTimeout(2*time.Second), nclient4.WithRetry(3))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	return c.Request(ctx)
}

// findDisk returns the block device for the pool: one writ formatted
// before (label writ-pool), else an empty one (its first MiB all zero), else
// "". A disk that holds anything else is never chosen.
func findDisk(say func(string, ...any)) string {
	// Give slow controllers a moment to show their disks.
	var names []string
	for i := 0; i < 20; i++ {
		entries, _ := os.ReadDir("/sys/block")
		names = names[:0]
		for _, e := range entries {
			n := e.Name()
			if strings.HasPrefix(n, "loop") || strings.HasPrefix(n, "ram") || strings.HasPrefix(n, "sr") {
				continue
			}
			names = append(names, n)
		}
		if len(names) > 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	sort.Strings(names)
	var empty string
	for _, n := range names {
		dev := "/dev/" + n
		head := make([]byte, 1<<20)
		f, err := os.Open(dev)
		if err != nil {
			continue
		}
		k, _ := io.ReadFull(f, head)
		f.Close()
		head = head[:k]
		// A btrfs superblock sits at 64 KiB: magic at +0x40, label at +0x12b.
		if len(head) > 0x10000+0x12b+len(PoolLabel) && string(head[0x10040:0x10048]) == "_BHRfS_M" &&
			string(head[0x1012b:0x1012b+len(PoolLabel)]) == PoolLabel {
			say("disk %s: the node's pool", dev)
			return dev
		}
		if empty == "" && len(head) == 1<<20 && bytes.Count(head, []byte{0}) == len(head) {
			empty = dev
		}
	}
	if empty != "" {
		say("disk %s: empty; it becomes the node's pool", empty)
		return empty
	}
	say("NO DISK for a pool (disks: %v): the node key lives in memory and the node gets a new identity at every boot", names)
	return ""
}

// Node runs the node (registration, uptime, runner) with the image's
// configuration; console is the machine's console. Run starts it again
// when it stops on an error.
type Node func(ctx context.Context, cfg Config, console io.Writer) error

// restartDelay is how long Run waits before starting a stopped node again:
// long enough for a person at the console to read why.
const restartDelay = 5 * time.Second

// Run is PID 1 of the node image: it sets the machine up (Setup), runs
// node, starting it again whenever it stops while the machine is up, reaps
// orphans (PID 1's duty: every process whose parent dies becomes PID 1's
// child), and on Ctrl-Alt-Del or SIGTERM reboots, on SIGUSR2 powers off.
// It never returns, but to refuse to run anywhere but as PID 1: it mounts
// over /run, /tmp and /var/lib/writ and reboots the machine.
func Run(ctx context.Context, stdout io.Writer, node Node) error {
	if os.Getpid() != 1 {
		return errors.New("writ init is the node image's PID 1; it does not run on a live system")
	}
	os.Setenv("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
	reboot := make(chan bool, 1)
	sig := make(chan os.Signal, 4)
	// SIGINT is Ctrl-Alt-Del once Setup turns the key combination over to
	// PID 1.
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR2)
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		s := <-sig
		reboot <- s != syscall.SIGUSR2
		cancel()
	}()
	go reaper.Run(ctx, reaper.DefaultInterval)
	console := Console(stdout)
	cfg, err := Setup(ctx, console)
	if err != nil {
		fmt.Fprintf(console, "writ init: %v\n", err)
	} else {
		if cfg.Disk == "" {
			fmt.Fprintln(console, "writ init: WARNING: no disk; the node key is in memory: this node gets a new identity at every boot")
		}
		for {
			err := node(ctx, cfg, console)
			if ctx.Err() != nil {
				break
			}
			fmt.Fprintf(console, "writ init: the node stopped: %v; starting it again in %s\n", err, restartDelay)
			select {
			case <-ctx.Done():
			case <-time.After(restartDelay):
			}
		}
	}
	if ctx.Err() == nil {
		fmt.Fprintln(console, "writ init: waiting; Ctrl-Alt-Del reboots")
	}
	r := <-reboot // sent before ctx is cancelled
	fmt.Fprintf(console, "writ init: %s\n", map[bool]string{true: "rebooting", false: "powering off"}[r])
	Halt(r)
	select {}
}

// Halt syncs, unmounts what it can and powers off (or reboots).
func Halt(reboot bool) {
	unix.Sync()
	unix.Unmount("/var/lib/writ/pool", 0)
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	unix.Reboot(cmd)
}

// Console returns a writer that prefixes each line written to w with the
// time since the kernel started, as the kernel's own messages are, so a
// console shows how long each step took after boot.
func Console(w io.Writer) io.Writer { return &consoleWriter{w: w, start: true} }

type consoleWriter struct {
	mu    sync.Mutex
	w     io.Writer
	start bool // at the start of a line; guarded by mu
}

func (c *consoleWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []byte
	for _, b := range p {
		if c.start {
			out = append(out, fmt.Sprintf("[%12.6f] ", uptime())...)
			c.start = false
		}
		out = append(out, b)
		if b == '\n' {
			c.start = true
		}
	}
	if _, err := c.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// uptime is the seconds since the kernel started (CLOCK_BOOTTIME).
func uptime() float64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}
