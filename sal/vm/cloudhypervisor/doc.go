// Package cloudhypervisor is the cloud-hypervisor backend of sal/vm: one
// `cloud-hypervisor --api-socket` process per VM, driven over its REST API
// with a client generated from the project's OpenAPI spec (api.gen.go).
//
// A launch starts the process in its own session, waits for the API
// socket, creates the VM with its full configuration (a cold VmConfig:
// CPUs, memory, kernel/initramfs/cmdline or firmware, raw disks and the
// NoCloud seed, taps with MACs, the serial console to a file) and boots it.
// A guest power-off ends the process, which Machines counts as a death (the
// VM should run) or a stop. Shutdown presses the ACPI power button.
package cloudhypervisor

//go:generate sh gen.sh
