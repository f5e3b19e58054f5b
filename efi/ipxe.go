package efi

import (
	"fmt"
	"strings"
)

// Artifact names in an image directory (writ image build writes them,
// writ image serve serves them).
const (
	KernelFile = "vmlinuz"
	InitrdFile = "initrd.img"
	UKIFile    = "writ-node.efi"
	USBFile    = "usb.img"
	IPXEFile   = "boot.ipxe"
)

// DefaultCmdline is the node's kernel command line.
const DefaultCmdline = "console=tty0 console=ttyS0 panic=10" // the last console is /dev/console: the serial one

// IPXEScript returns the iPXE script that loads the kernel and initramfs
// from base (the image server's URL) and boots them with cmdline. Overrides
// of the baked-in site configuration (writ.ledger=… and so on) go on the
// command line.
func IPXEScript(base, cmdline string) string {
	base = strings.TrimRight(base, "/")
	return fmt.Sprintf(`#!ipxe
echo writ node image from %[1]s
kernel %[1]s/%[2]s initrd=%[3]s %[4]s
initrd %[1]s/%[3]s
boot
`, base, KernelFile, InitrdFile, cmdline)
}
