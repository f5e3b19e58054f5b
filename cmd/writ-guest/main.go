// Command writ-guest builds the demo VM guest (Debian's cloud kernel and a
// busybox initramfs that serves HTTP; see internal/guest) into a directory
// that `writ dev` serves over HTTP, writes the deploy command's arguments
// into DIR/guest.json (for `writ run --args-file`), and prints the command.
//
//	go run ./cmd/writ-guest --dir .dev/files --base-url http://127.0.0.1:7706
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/writ-fleet/writ/internal/guest"
)

// ArgsFile is the name, in --dir, of the JSON object of the deploy
// command's arguments (image, kernel and initrd URLs and sums, cmdline).
const ArgsFile = "guest.json"

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
	// The deploy command's arguments, as a file writ run --args-file reads,
	// so the README's walkthrough runs as written (no sums to copy).
	args, err := json.MarshalIndent(map[string]string{
		"image_url": base + "/disk.img", "image_sha256": sums["disk.img"],
		"kernel_url": base + "/vmlinuz", "kernel_sha256": sums["vmlinuz"],
		"initrd_url": base + "/initrd.img", "initrd_sha256": sums["initrd.img"],
		"cmdline": guest.Cmdline,
	}, "", "  ")
	if err != nil {
		return err
	}
	argsFile := filepath.Join(dir, ArgsFile)
	if err := os.WriteFile(argsFile, append(args, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf(`Demo guest ready in %s; its deploy arguments are in %s. Deploy it (with writ dev running, as root):
  . .dev/env && bin/writ run scripts/lib/deploy_vm.tengo --timeout 5m \
    --args-file %s --arg name=demo --arg forwards=8080:80
Then: curl http://NODE-ADDRESS:8080/   (an address of this machine other than 127.0.0.1)
Remove it: bin/writ run scripts/lib/destroy_vm.tengo --arg name=demo
`, dir, argsFile, argsFile)
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
