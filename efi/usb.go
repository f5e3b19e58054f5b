package efi

import (
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/partition/gpt"
)

// ESPBootPath is where UEFI firmware looks for a removable disk's loader.
const ESPBootPath = "/EFI/BOOT/BOOTX64.EFI"

// WriteUSBImage writes a bootable disk image to path: a GPT with one EFI
// system partition (FAT32) holding efiFile as EFI/BOOT/BOOTX64.EFI. The
// image is sized to fit, with room to spare; dd it onto a USB stick.
func WriteUSBImage(path, efiFile string) error {
	st, err := os.Stat(efiFile)
	if err != nil {
		return err
	}
	const mib = 1 << 20
	partSize := (st.Size()/mib + 64) * mib // the loader plus FAT and slack
	if partSize < 64*mib {
		partSize = 64 * mib // FAT32 wants room for its clusters
	}
	const start = mib // first partition at 1 MiB
	size := start + partSize + mib
	os.Remove(path)
	d, err := diskfs.Create(path, size, diskfs.SectorSizeDefault)
	if err != nil {
		return fmt.Errorf("efi: usb image: %w", err)
	}
	defer d.Close()
	table := &gpt.Table{
		LogicalSectorSize:  512,
		PhysicalSectorSize: 512,
		ProtectiveMBR:      true,
		GUID:               "6A98D5D2-0000-4000-8000-000000000001", // fixed: reproducible images
		Partitions: []*gpt.Partition{{
			Index: 1, Start: uint64(start / 512), End: uint64((start+partSize)/512 - 1),
			Type: gpt.EFISystemPartition, Name: "EFI System", GUID: "6A98D5D2-0000-4000-8000-000000000002",
		}},
	}
	if err := d.Partition(table); err != nil {
		return fmt.Errorf("efi: usb image: partition: %w", err)
	}
	fs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 1, FSType: filesystem.TypeFat32, VolumeLabel: "WRIT-EFI"})
	if err != nil {
		return fmt.Errorf("efi: usb image: fat32: %w", err)
	}
	for _, dir := range []string{"/EFI", "/EFI/BOOT"} {
		if err := fs.Mkdir(dir); err != nil {
			return fmt.Errorf("efi: usb image: %w", err)
		}
	}
	src, err := os.Open(efiFile)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := fs.OpenFile(ESPBootPath, os.O_CREATE|os.O_RDWR)
	if err != nil {
		return fmt.Errorf("efi: usb image: %w", err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		return fmt.Errorf("efi: usb image: write loader: %w", err)
	}
	return nil
}

// ListUSBImage describes a USB image for golden listings: its partitions
// and the files of its EFI system partition.
func ListUSBImage(image string) ([]string, error) {
	d, err := diskfs.Open(image, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		return nil, err
	}
	defer d.Close()
	pt, err := d.GetPartitionTable()
	if err != nil {
		return nil, err
	}
	var out []string
	table, ok := pt.(*gpt.Table)
	if !ok {
		return nil, fmt.Errorf("efi: %s has no GPT", image)
	}
	for i, p := range table.Partitions {
		out = append(out, fmt.Sprintf("partition %d: type %s name %q start %d end %d", i+1, strings.ToUpper(string(p.Type)), p.Name, p.Start, p.End))
	}
	fs, err := d.GetFilesystem(1)
	if err != nil {
		return nil, err
	}
	var walk func(dir string) error
	walk = func(dir string) error {
		entries, err := fs.ReadDir(dir)
		if err != nil {
			return err
		}
		sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
		for _, e := range entries {
			p := path.Join(dir, e.Name())
			if e.IsDir() {
				out = append(out, "dir  /"+p)
				if err := walk(p); err != nil {
					return err
				}
				continue
			}
			info, _ := e.Info()
			out = append(out, fmt.Sprintf("file /%s %d", p, info.Size()))
		}
		return nil
	}
	return out, walk(".")
}
