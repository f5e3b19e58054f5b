package storage

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// attachLoop binds file to a free loop device and returns the device path.
// The device has autoclear set: the kernel detaches it once nothing holds it
// (the caller's mount, or the file handle this returns), so a crash never
// leaves it behind. Close the returned file after mounting.
func attachLoop(file string) (string, *os.File, error) {
	backing, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		return "", nil, fmt.Errorf("open pool file: %w", err)
	}
	defer backing.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", nil, fmt.Errorf("open /dev/loop-control: %w", err)
	}
	defer ctl.Close()
	// Another process may take the free device between asking and binding:
	// ask again on EBUSY.
	for try := 0; try < 20; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", nil, fmt.Errorf("find a free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		loop, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			return "", nil, fmt.Errorf("open %s: %w", dev, err)
		}
		if err := unix.IoctlSetInt(int(loop.Fd()), unix.LOOP_SET_FD, int(backing.Fd())); err != nil {
			loop.Close()
			if errors.Is(err, unix.EBUSY) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return "", nil, fmt.Errorf("bind %s to %s: %w", file, dev, err)
		}
		info := unix.LoopInfo64{Flags: unix.LO_FLAGS_AUTOCLEAR}
		copy(info.File_name[:], file)
		if err := unix.IoctlLoopSetStatus64(int(loop.Fd()), &info); err != nil {
			unix.IoctlSetInt(int(loop.Fd()), unix.LOOP_CLR_FD, 0)
			loop.Close()
			return "", nil, fmt.Errorf("configure %s: %w", dev, err)
		}
		return dev, loop, nil
	}
	return "", nil, errors.New("no free loop device after 20 tries")
}
