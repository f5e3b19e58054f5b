// Command writ-guest builds the demo VM guest (Debian's cloud kernel and a
// busybox initramfs that serves HTTP; see internal/guest) into a directory
// that `writ dev` serves over HTTP, and prints the `writ run` command that
// deploys it.
//
//	go run ./cmd/writ-guest --dir .dev/files --base-url http://127.0.0.1:7706
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/writ-fleet/writ/internal/guest"
)

func main() {
	dir := flag.String("dir", ".dev/files", "where to put disk.img, vmlinuz and initrd.img")
	base := flag.String("base-url", "http://127.0.0.1:7706", "the URL the directory is served at (writ dev serves DIR/files on BASE+6)")
	page := flag.String("page", "hello from a writ guest\n", "what the guest serves")
	flag.Parse()
	if err := run(*dir, *base, *page); err != nil {
		fmt.Fprintln(os.Stderr, "writ-guest:", err)
		os.Exit(1)
	}
}

func run(dir, base, page string) error {
	art, err := guest.Build(context.Background(), guest.DefaultCacheDir())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := copyFile(art.Kernel, filepath.Join(dir, "vmlinuz")); err != nil {
		return err
	}
	if err := copyFile(art.Initrd, filepath.Join(dir, "initrd.img")); err != nil {
		return err
	}
	if err := guest.WriteDisk(filepath.Join(dir, "disk.img"), page, 256<<20); err != nil {
		return err
	}
	sums := map[string]string{}
	for _, f := range []string{"disk.img", "vmlinuz", "initrd.img"} {
		s, err := fileSHA256(filepath.Join(dir, f))
		if err != nil {
			return err
		}
		sums[f] = s
	}
	fmt.Printf(`Demo guest ready in %s. Deploy it (with writ dev running, as root):

  . .dev/env && bin/writ run scripts/lib/deploy_vm.tengo --timeout 5m \
    --arg name=demo --arg forwards=8080:80 \
    --arg image_url=%s/disk.img --arg image_sha256=%s \
    --arg kernel_url=%s/vmlinuz --arg kernel_sha256=%s \
    --arg initrd_url=%s/initrd.img --arg initrd_sha256=%s \
    --arg cmdline='%s'

Then: curl http://NODE-ADDRESS:8080/   (an address of this machine other than 127.0.0.1)
Remove it: bin/writ run scripts/lib/destroy_vm.tengo --arg name=demo
`, dir, base, sums["disk.img"], base, sums["vmlinuz"], base, sums["initrd.img"], guest.Cmdline)
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
