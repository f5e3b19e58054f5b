// Package efi builds the writ node image and serves it to netbooting
// nodes.
//
// From a Linux kernel (a path, or a Debian kernel package fetched with
// apt) and the static writ binary it makes:
//
//   - an initramfs (newc cpio, written with u-root's pkg/cpio) holding writ
//     as /init, the kernel modules a node needs with their dependencies
//     (read from each module's .modinfo), and the site configuration;
//   - a unified kernel image (kernel + initramfs + command line behind the
//     systemd EFI stub), booted directly by UEFI firmware;
//   - a USB disk image (GPT with an EFI system partition holding
//     EFI/BOOT/BOOTX64.EFI, made with go-diskfs), ready for dd;
//   - an iPXE script that loads the kernel and initramfs over HTTP.
//
// Site configuration baked in at build time can be overridden on the
// kernel command line (writ.ledger=, writ.site=, writ.token=, writ.redis=),
// so one image serves many sites when netbooted.
package efi
