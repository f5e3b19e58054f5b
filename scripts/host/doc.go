// Package host is what a script may do on a node: the "storage", "net"
// and "vm" modules (Modules), thin adapters over sal/storage, sal/network
// and sal/vm, seen through the job's tenant.
//
// Every resource a job makes belongs to its owner (scripts.Input.Owner):
// names are per owner on the host (tenant.go), a deployer's job sees only
// its own, and a site admin's job sees all and acts for another owner by
// naming it ("alice/data"). A module takes names of owned resources, never
// host paths; what reaches the hypervisor is resolved inside the pool after
// the owner is checked.
//
// In a sandbox process the same modules stand in for the runner's: their
// functions send each call back to the runner (scripts.Run.CallHost),
// which runs it against its layers, as the job.
package host
