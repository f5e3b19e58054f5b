package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/scripts"

	"github.com/d5/tengo/v2"

	"github.com/writ-fleet/writ/internal/size"
	"github.com/writ-fleet/writ/sal/network"
	"github.com/writ-fleet/writ/sal/storage"
	"github.com/writ-fleet/writ/sal/vm"
)

// Storage is what the "storage" module needs from the node's pool;
// *storage.Pool satisfies it.
type Storage interface {
	EnsureVolume(ctx context.Context, name string, limit int64) (storage.Volume, error)
	ResizeVolume(ctx context.Context, name string, limit int64) (storage.Volume, error)
	DeleteVolume(ctx context.Context, name string) error
	Volume(ctx context.Context, name string) (storage.Volume, error)
	Volumes(ctx context.Context) ([]storage.Volume, error)
	WriteFile(vol, rel string, data []byte) error
	ReadFile(vol, rel string, max int64) ([]byte, error)
	Snapshot(ctx context.Context, vol, snap string) (string, error)
	Snapshots(vol string) ([]string, error)
	DeleteSnapshot(ctx context.Context, vol, snap string) error
	Restore(ctx context.Context, vol, snap string) (storage.Volume, error)
	Usage() (storage.Usage, error)
	EnsureImage(ctx context.Context, url, sha string) (storage.Image, error)
	EnsureClone(ctx context.Context, sha, name string, limit int64) (storage.Volume, error)
	// Holds resolves a path to a file of the pool's volumes (and names
	// the volume) or images, or fails with storage.ErrNotInPool (see
	// storage.Pool.Holds).
	Holds(path string) (file storage.File, volume string, err error)
}

var _ Storage = (*storage.Pool)(nil)

// maxRead bounds storage.read.
const maxRead = 1 << 20

// StorageModule returns the "storage" module over pool. With a nil pool
// (a runner started without one) every call returns an error saying so.
//
//	storage.volume(name, size)        ensure a volume ("10G"; 0 or "" for no limit) → {name, path, limit, used}
//	storage.resize(name, size)        change its limit
//	storage.delete_volume(name)
//	storage.volumes()                 → [{name, path, limit, used}, ...]
//	storage.write(vol, path, data)    write a file inside a volume
//	storage.read(vol, path)           → string (up to 1 MiB)
//	storage.snapshot(vol, name)       read-only snapshot → path
//	storage.snapshots(vol)            → [name, ...]
//	storage.restore(vol, name)        → {name, path, limit, used}
//	storage.delete_snapshot(vol, name)
//	storage.usage()                   → {total, used, free} of the pool
//	storage.image(url, sha256)        download once, verify → {sha256, path, size}
//	storage.clone(sha256, name, size) writable snapshot of an image → volume
//
// Failures come back as error values, for the script to check with
// is_error(); a script that wants its job to fail calls job.fail.
func StorageModule(layer Storage) scripts.Module {
	return func(rc *scripts.Run) map[string]tengo.Object {
		var unavailable error
		if layer == nil {
			unavailable = errors.New("this runner has no storage pool (start it with --pool or --pool-file)")
		}
		pool := tenantStorage{rc: rc, s: layer}
		call := func(name string, n int, fn func(ctx context.Context, args []tengo.Object) (any, error)) tengo.Object {
			return hostFunc(rc, "storage", name, n, n, unavailable, fn)
		}
		size := func(o tengo.Object) (int64, error) {
			if i, ok := o.(*tengo.Int); ok {
				return i.Value, nil
			}
			return size.Parse(str(o))
		}
		return map[string]tengo.Object{
			"volume": call("volume", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				limit, err := size(a[1])
				if err != nil {
					return nil, err
				}
				return pool.EnsureVolume(ctx, str(a[0]), limit)
			}),
			"resize": call("resize", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				limit, err := size(a[1])
				if err != nil {
					return nil, err
				}
				return pool.ResizeVolume(ctx, str(a[0]), limit)
			}),
			"delete_volume": call("delete_volume", 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				return true, pool.DeleteVolume(ctx, str(a[0]))
			}),
			"volumes": call("volumes", 0, func(ctx context.Context, _ []tengo.Object) (any, error) {
				return pool.Volumes(ctx)
			}),
			"write": call("write", 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				var data []byte
				if b, ok := a[2].(*tengo.Bytes); ok {
					data = b.Value
				} else {
					data = []byte(str(a[2]))
				}
				return len(data), pool.WriteFile(str(a[0]), str(a[1]), data)
			}),
			"read": call("read", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				b, err := pool.ReadFile(str(a[0]), str(a[1]), maxRead)
				return string(b), err
			}),
			"snapshot": call("snapshot", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				return pool.Snapshot(ctx, str(a[0]), str(a[1]))
			}),
			"snapshots": call("snapshots", 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				snaps, err := pool.Snapshots(str(a[0]))
				if snaps == nil {
					snaps = []string{}
				}
				return snaps, err
			}),
			"restore": call("restore", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				return pool.Restore(ctx, str(a[0]), str(a[1]))
			}),
			"delete_snapshot": call("delete_snapshot", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				return true, pool.DeleteSnapshot(ctx, str(a[0]), str(a[1]))
			}),
			"usage": call("usage", 0, func(ctx context.Context, _ []tengo.Object) (any, error) {
				return pool.Usage()
			}),
			"image": call("image", 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				return pool.EnsureImage(ctx, str(a[0]), str(a[1]))
			}),
			"clone": call("clone", 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				limit, err := size(a[2])
				if err != nil {
					return nil, err
				}
				return pool.EnsureClone(ctx, str(a[0]), str(a[1]), limit)
			}),
		}
	}
}

func errValue(err error) tengo.Object {
	return &tengo.Error{Value: &tengo.String{Value: err.Error()}}
}

// toObject converts a Go result (a struct with JSON tags, a slice, a
// string...) to a Tengo value through its JSON form.
func toObject(v any) (tengo.Object, error) {
	switch x := v.(type) {
	case string:
		return &tengo.String{Value: x}, nil
	case bool:
		if x {
			return tengo.TrueValue, nil
		}
		return tengo.FalseValue, nil
	case int:
		return &tengo.Int{Value: int64(x)}, nil
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return scripts.ValueOf(raw)
}

// hostFunc is a module function over a host layer: it checks the number
// of arguments (a script bug, so a run error), reports fn's failure as an
// error value the script can check with is_error, and converts fn's result
// to Tengo. A runner without the layer (unavailable) stops the run with an
// error wrapping scripts.ErrTransient: the node cannot do this job, another run
// (on another node of the site, or this one once it has the layer) may, so
// the runner retries it up to the job's max_retries.
func hostFunc(rc *scripts.Run, module, name string, minArgs, maxArgs int, unavailable error, fn func(ctx context.Context, args []tengo.Object) (any, error)) tengo.Object {
	return scripts.Func(name, func(args ...tengo.Object) (tengo.Object, error) {
		if len(args) < minArgs || len(args) > maxArgs {
			want := fmt.Sprint(minArgs)
			if maxArgs > minArgs {
				want = fmt.Sprintf("%d to %d", minArgs, maxArgs)
			}
			return nil, fmt.Errorf("%s.%s takes %s arguments, got %d", module, name, want, len(args))
		}
		if obj, handled, err := rc.CallHost(module, name, args); handled {
			return obj, err
		}
		if unavailable != nil {
			return nil, rc.Fail(fmt.Errorf("%w: %s.%s: %v", scripts.ErrTransient, module, name, unavailable))
		}
		v, err := fn(rc.Context(), args)
		if err != nil {
			return errValue(err), nil
		}
		return toObject(v)
	})
}

func str(o tengo.Object) string { s, _ := tengo.ToString(o); return s }

// Layers are the node's host layers the script modules act on. A nil
// field means the node lacks that layer: its module is still importable
// (so scripts compile, at the supervisor too) and every call returns an
// error value saying why.
type Layers struct {
	Storage Storage
	Network Network
	VMs     VMs
}

// Modules returns the modules of the node's host layers, under
// scripts.HostModuleNames.
func Modules(l Layers) map[string]scripts.Module {
	if p, ok := l.Storage.(*storage.Pool); ok && p == nil {
		l.Storage = nil
	}
	if h, ok := l.Network.(*network.Host); ok && h == nil {
		l.Network = nil
	}
	if m, ok := l.VMs.(*vm.Machines); ok && m == nil {
		l.VMs = nil
	}
	return map[string]scripts.Module{"storage": StorageModule(l.Storage), "net": NetworkModule(l.Network), "vm": VMModule(l.VMs, l.Storage)}
}
