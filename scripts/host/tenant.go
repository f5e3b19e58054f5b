package host

import (
	"context"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/scripts"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/sal/network"
	"github.com/writ-fleet/writ/sal/storage"
	"github.com/writ-fleet/writ/sal/vm"
)

// # Tenants
//
// Every volume (with its snapshots), clone, network (with its addresses
// and forwards) and VM a job makes belongs to the job's owner (scripts.Input.Owner:
// the user of the first signature that counted, see verify.Checked). Names
// are the owner's own: alice's "data" and bob's "data" are two volumes. On
// the host a resource's name carries its owner, as the length of the
// owner's name, the name, a dot and the resource's name ("5alice.data"),
// which no two (owner, name) pairs share. A job sees and changes only its
// owner's resources; a site admin's job sees every tenant's, as
// "owner/name" (and resources made before tenants as "/name"), and acts for
// another owner by naming it so.
//
// The wrappers below apply this to the host layers: the modules are built
// over them, one per run context, reading the owner of the run in progress.

// maxHostName bounds a host-layer name (the layers' own limit).
const maxHostName = 63

// errNoOwner: a run without an owner may not touch a host layer.
var errNoOwner = errors.New("this job has no owner, so it may not use the node's storage, networks or VMs")

// tenant is whom a run acts for.
type tenant struct {
	owner string
	admin bool
}

func tenantOf(rc *scripts.Run) (tenant, error) {
	in := rc.Input()
	if in.Owner == "" {
		return tenant{}, errNoOwner
	}
	return tenant{owner: in.Owner, admin: in.Admin}, nil
}

// hostName is the host layers' name of a script's name: "name" is the
// tenant's own; "owner/name" (an admin, or the owner itself) is owner's.
func (t tenant) hostName(name string) (string, error) {
	owner := t.owner
	if i := strings.IndexByte(name, '/'); i >= 0 {
		owner, name = name[:i], name[i+1:]
		if owner != "" && !envelope.ValidUser(owner) {
			return "", fmt.Errorf("invalid name %q: an owner's resource is owner/name, and %q is not a user name", owner+"/"+name, owner)
		}
		if owner != t.owner && !t.admin {
			return "", fmt.Errorf("%q belongs to %s: only a site admin may act for another owner", name, ownerText(owner))
		}
	}
	if !storage.ValidName(name) {
		return "", fmt.Errorf("invalid name %q: want [a-z0-9][a-z0-9_.-]*", name)
	}
	if owner == "" {
		return name, nil // made before tenants: an admin's to manage
	}
	host := strconv.Itoa(len(owner)) + owner + "." + name
	if room := maxHostName - len(host) + len(name); room < 1 {
		return "", fmt.Errorf("user name %q is too long to own resources on a node", owner)
	}
	if len(host) > maxHostName {
		return "", fmt.Errorf("name %q is too long: with its owner %q it may have at most %d characters", name, owner, maxHostName-len(host)+len(name))
	}
	return host, nil
}

func ownerText(owner string) string {
	if owner == "" {
		return "no owner (it was made before tenants)"
	}
	return "user " + owner
}

// splitHost parses a host name: its owner ("" for one made before
// tenants) and the owner's name for it.
func splitHost(host string) (owner, name string) {
	n := 0
	i := 0
	for i < len(host) && i < 2 && host[i] >= '0' && host[i] <= '9' {
		n = n*10 + int(host[i]-'0')
		i++
	}
	if i == 0 || n == 0 || i+n >= len(host) || host[i+n] != '.' {
		return "", host
	}
	return host[i : i+n], host[i+n+1:]
}

// visible says whether the tenant may see a host name, and how it shows:
// its own by name, others' (admins only) as owner/name.
func (t tenant) visible(host string) (shown string, ok bool) {
	owner, name := splitHost(host)
	switch {
	case owner == t.owner:
		return name, true
	case t.admin:
		return owner + "/" + name, true
	}
	return "", false
}

// shown is how the tenant sees a host name it may see.
func (t tenant) shown(host string) string {
	s, _ := t.visible(host)
	return s
}

// ownerOf is the owner of a host name, for the "owner" field of listings.
func ownerOf(host string) string { o, _ := splitHost(host); return o }

// ownedVolume is a volume as a tenant sees it.
type ownedVolume struct {
	storage.Volume
	Owner string `json:"owner"`
}

// tenantStorage is the storage pool as one run's tenant sees it.
type tenantStorage struct {
	rc *scripts.Run
	s  Storage
}

func (w tenantStorage) name(n string) (tenant, string, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return t, "", err
	}
	h, err := t.hostName(n)
	return t, h, err
}

func (w tenantStorage) vol(t tenant, v storage.Volume, err error) (ownedVolume, error) {
	if err != nil {
		return ownedVolume{}, err
	}
	owner := ownerOf(v.Name)
	v.Name = t.shown(v.Name)
	return ownedVolume{Volume: v, Owner: owner}, nil
}

func (w tenantStorage) EnsureVolume(ctx context.Context, name string, limit int64) (ownedVolume, error) {
	t, h, err := w.name(name)
	if err != nil {
		return ownedVolume{}, err
	}
	v, err := w.s.EnsureVolume(ctx, h, limit)
	return w.vol(t, v, err)
}

func (w tenantStorage) ResizeVolume(ctx context.Context, name string, limit int64) (ownedVolume, error) {
	t, h, err := w.name(name)
	if err != nil {
		return ownedVolume{}, err
	}
	v, err := w.s.ResizeVolume(ctx, h, limit)
	return w.vol(t, v, err)
}

func (w tenantStorage) DeleteVolume(ctx context.Context, name string) error {
	_, h, err := w.name(name)
	if err != nil {
		return err
	}
	return w.s.DeleteVolume(ctx, h)
}

func (w tenantStorage) Volumes(ctx context.Context) ([]ownedVolume, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return nil, err
	}
	all, err := w.s.Volumes(ctx)
	if err != nil {
		return nil, err
	}
	out := []ownedVolume{}
	for _, v := range all {
		if _, ok := t.visible(v.Name); ok {
			o, _ := w.vol(t, v, nil)
			out = append(out, o)
		}
	}
	return out, nil
}

func (w tenantStorage) WriteFile(vol, rel string, data []byte) error {
	_, h, err := w.name(vol)
	if err != nil {
		return err
	}
	return w.s.WriteFile(h, rel, data)
}

func (w tenantStorage) ReadFile(vol, rel string, max int64) ([]byte, error) {
	_, h, err := w.name(vol)
	if err != nil {
		return nil, err
	}
	return w.s.ReadFile(h, rel, max)
}

func (w tenantStorage) Snapshot(ctx context.Context, vol, snap string) (string, error) {
	_, h, err := w.name(vol)
	if err != nil {
		return "", err
	}
	return w.s.Snapshot(ctx, h, snap)
}

func (w tenantStorage) Snapshots(vol string) ([]string, error) {
	_, h, err := w.name(vol)
	if err != nil {
		return nil, err
	}
	return w.s.Snapshots(h)
}

func (w tenantStorage) DeleteSnapshot(ctx context.Context, vol, snap string) error {
	_, h, err := w.name(vol)
	if err != nil {
		return err
	}
	return w.s.DeleteSnapshot(ctx, h, snap)
}

func (w tenantStorage) Restore(ctx context.Context, vol, snap string) (ownedVolume, error) {
	t, h, err := w.name(vol)
	if err != nil {
		return ownedVolume{}, err
	}
	v, err := w.s.Restore(ctx, h, snap)
	return w.vol(t, v, err)
}

func (w tenantStorage) Usage() (storage.Usage, error) { return w.s.Usage() }

func (w tenantStorage) EnsureImage(ctx context.Context, url, sha string) (storage.Image, error) {
	if _, err := tenantOf(w.rc); err != nil {
		return storage.Image{}, err
	}
	return w.s.EnsureImage(ctx, url, sha)
}

func (w tenantStorage) EnsureClone(ctx context.Context, sha, name string, limit int64) (ownedVolume, error) {
	t, h, err := w.name(name)
	if err != nil {
		return ownedVolume{}, err
	}
	v, err := w.s.EnsureClone(ctx, sha, h, limit)
	return w.vol(t, v, err)
}

// Holds is the pool's Holds, but a file of a volume only when the tenant
// may see the volume. Cached images are everyone's: they are named by
// their content.
func (w tenantStorage) Holds(path string) (storage.File, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return storage.File{}, err
	}
	f, vol, err := w.s.Holds(path)
	if err != nil {
		return storage.File{}, err
	}
	if vol != "" {
		if _, ok := t.visible(vol); !ok {
			return storage.File{}, fmt.Errorf("%q is not in one of your volumes: %w", path, storage.ErrNotInPool)
		}
	}
	return f, nil
}

// ownedNetwork is a network as a tenant sees it.
type ownedNetwork struct {
	network.Network
	Owner string `json:"owner"`
}

// tenantNetwork is the network layer as one run's tenant sees it.
type tenantNetwork struct {
	rc *scripts.Run
	n  Network
}

func (w tenantNetwork) name(n string) (tenant, string, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return t, "", err
	}
	h, err := t.hostName(n)
	return t, h, err
}

func (w tenantNetwork) net(t tenant, n network.Network, err error) (ownedNetwork, error) {
	if err != nil {
		return ownedNetwork{}, err
	}
	owner := ownerOf(n.Name)
	n.Name = t.shown(n.Name)
	return ownedNetwork{Network: n, Owner: owner}, nil
}

func (w tenantNetwork) EnsureNetwork(ctx context.Context, spec network.Spec) (ownedNetwork, error) {
	t, h, err := w.name(spec.Name)
	if err != nil {
		return ownedNetwork{}, err
	}
	spec.Name = h
	n, err := w.n.EnsureNetwork(ctx, spec)
	return w.net(t, n, err)
}

func (w tenantNetwork) DeleteNetwork(ctx context.Context, name string) error {
	_, h, err := w.name(name)
	if err != nil {
		return err
	}
	return w.n.DeleteNetwork(ctx, h)
}

func (w tenantNetwork) Networks(ctx context.Context) ([]ownedNetwork, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return nil, err
	}
	all, err := w.n.Networks(ctx)
	if err != nil {
		return nil, err
	}
	out := []ownedNetwork{}
	for _, n := range all {
		if _, ok := t.visible(n.Name); ok {
			o, _ := w.net(t, n, nil)
			out = append(out, o)
		}
	}
	return out, nil
}

func (w tenantNetwork) Allocate(ctx context.Context, netName, owner string) (netip.Addr, error) {
	_, h, err := w.name(netName)
	if err != nil {
		return netip.Addr{}, err
	}
	return w.n.Allocate(ctx, h, owner)
}

func (w tenantNetwork) Release(ctx context.Context, netName, owner string) error {
	_, h, err := w.name(netName)
	if err != nil {
		return err
	}
	return w.n.Release(ctx, h, owner)
}

func (w tenantNetwork) AddForward(ctx context.Context, netName string, f network.Forward) (ownedNetwork, error) {
	t, h, err := w.name(netName)
	if err != nil {
		return ownedNetwork{}, err
	}
	n, err := w.n.AddForward(ctx, h, f)
	return w.net(t, n, err)
}

func (w tenantNetwork) RemoveForward(ctx context.Context, netName, proto string, hostPort uint16) error {
	_, h, err := w.name(netName)
	if err != nil {
		return err
	}
	return w.n.RemoveForward(ctx, h, proto, hostPort)
}

func (w tenantNetwork) Attach(ctx context.Context, netName, vmName string, nic int) (network.NIC, error) {
	t, h, err := w.name(netName)
	if err != nil {
		return network.NIC{}, err
	}
	hv, err := t.hostName(vmName)
	if err != nil {
		return network.NIC{}, err
	}
	n, err := w.n.Attach(ctx, h, hv, nic)
	n.Network = t.shown(n.Network)
	return n, err
}

func (w tenantNetwork) Detach(ctx context.Context, netName, vmName string, nic int) error {
	t, h, err := w.name(netName)
	if err != nil {
		return err
	}
	hv, err := t.hostName(vmName)
	if err != nil {
		return err
	}
	return w.n.Detach(ctx, h, hv, nic)
}

// WaitTCP probes only addresses inside the tenant's networks.
func (w tenantNetwork) WaitTCP(ctx context.Context, addr netip.Addr, port uint16, timeout time.Duration) error {
	nets, err := w.Networks(ctx)
	if err != nil {
		return err
	}
	for _, n := range nets {
		if n.Subnet.Contains(addr) || (n.Prefix6.IsValid() && n.Prefix6.Contains(addr)) {
			return w.n.WaitTCP(ctx, addr, port, timeout)
		}
	}
	return fmt.Errorf("%s is not in one of your networks: wait_tcp only reaches your own guests", addr)
}

// ownedVM is a VM as a tenant sees it.
type ownedVM struct {
	vm.Info
	Owner string `json:"owner"`
}

// maxNICs bounds the NICs a VM may have (and so the taps checked).
const maxNICs = 16

// tenantVMs is the VM layer as one run's tenant sees it.
type tenantVMs struct {
	rc *scripts.Run
	v  VMs
}

func (w tenantVMs) name(n string) (tenant, string, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return t, "", err
	}
	h, err := t.hostName(n)
	return t, h, err
}

func (w tenantVMs) info(t tenant, i vm.Info, err error) (ownedVM, error) {
	if err != nil {
		return ownedVM{}, err
	}
	owner := ownerOf(i.Name)
	i.Name = t.shown(i.Name)
	i.Spec.Name = i.Name
	return ownedVM{Info: i, Owner: owner}, nil
}

// Create records the VM under the tenant's name. Its NICs must be taps
// net.attach made for this VM (of the tenant's networks): a tap's name is
// derived from the VM's host name and NIC number, which only its owner
// (or an admin acting for it) can attach.
func (w tenantVMs) Create(ctx context.Context, spec vm.Spec) (ownedVM, error) {
	t, h, err := w.name(spec.Name)
	if err != nil {
		return ownedVM{}, err
	}
	if len(spec.NICs) > maxNICs {
		return ownedVM{}, fmt.Errorf("vm %s has %d NICs, the limit is %d", spec.Name, len(spec.NICs), maxNICs)
	}
	for i, n := range spec.NICs {
		if !tapOf(h, n.Tap) {
			return ownedVM{}, fmt.Errorf("nic %d: tap %q was not attached for vm %s (use net.attach(network, %q, nic))", i, n.Tap, spec.Name, spec.Name)
		}
	}
	spec.Name = h
	info, err := w.v.Create(ctx, spec)
	return w.info(t, info, err)
}

func tapOf(vmHost, tap string) bool {
	for i := 0; i < maxNICs; i++ {
		if network.TapName(vmHost, i) == tap {
			return true
		}
	}
	return false
}

func (w tenantVMs) Start(ctx context.Context, name string) (ownedVM, error) {
	t, h, err := w.name(name)
	if err != nil {
		return ownedVM{}, err
	}
	i, err := w.v.Start(ctx, h)
	return w.info(t, i, err)
}

func (w tenantVMs) Stop(ctx context.Context, name string, grace time.Duration) (ownedVM, error) {
	t, h, err := w.name(name)
	if err != nil {
		return ownedVM{}, err
	}
	i, err := w.v.Stop(ctx, h, grace)
	return w.info(t, i, err)
}

func (w tenantVMs) Delete(ctx context.Context, name string) error {
	_, h, err := w.name(name)
	if err != nil {
		return err
	}
	return w.v.Delete(ctx, h)
}

func (w tenantVMs) Info(ctx context.Context, name string) (ownedVM, error) {
	t, h, err := w.name(name)
	if err != nil {
		return ownedVM{}, err
	}
	i, err := w.v.Info(ctx, h)
	return w.info(t, i, err)
}

func (w tenantVMs) List(ctx context.Context) ([]ownedVM, error) {
	t, err := tenantOf(w.rc)
	if err != nil {
		return nil, err
	}
	all, err := w.v.List(ctx)
	if err != nil {
		return nil, err
	}
	out := []ownedVM{}
	for _, i := range all {
		if _, ok := t.visible(i.Name); ok {
			o, _ := w.info(t, i, nil)
			out = append(out, o)
		}
	}
	return out, nil
}

func (w tenantVMs) Console(ctx context.Context, name string, max int) (string, error) {
	_, h, err := w.name(name)
	if err != nil {
		return "", err
	}
	return w.v.Console(ctx, h, max)
}
