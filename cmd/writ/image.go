package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/efi"
)

func imageCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Build the writ node image and serve it to netbooting nodes"}
	cmd.AddCommand(imageBuildCommand(), imageServeCommand())
	return cmd
}

type imageBuildCmd struct {
	kernel, modules, kernelPackage, cache, out, writ, cmdline, baseURL string
	caFile                                                             string
	cfg                                                                efi.NodeConfig
	ca                                                                 caSource // --ca: the default of --site-ca
}

func imageBuildCommand() *cobra.Command {
	c := &imageBuildCmd{}
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Build the node image: initramfs, unified kernel image, USB image and iPXE script",
		Long: `Build the writ node image into --out: vmlinuz and initrd.img (writ as
/init, the kernel modules a node needs, the site configuration), the unified
kernel image writ-node.efi, usb.img (GPT + EFI system partition; dd it to a
USB stick) and boot.ipxe (for writ image serve). The kernel is --kernel with
--modules, or the Debian package --kernel-package fetched with apt-get.
The site configuration baked in can be overridden on the kernel command
line: writ.ledger=URL writ.site=NAME writ.token=SECRET writ.redis=URL.`,
		Example: `  make static      # bin/writ-static: writ linked statically, as /init must be
  writ image build --writ bin/writ-static --out image --site-ca ca.crt \
      --ledger https://10.0.0.1:7701 --site lab --token writ-enroll-… --supervisor https://10.0.1.1:7703`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.ca.cmd = cmd
	fl := cmd.Flags()
	fl.StringVar(&c.kernel, "kernel", "", "kernel image (vmlinuz); with --modules")
	fl.StringVar(&c.modules, "modules", "", "the kernel's lib/modules/VERSION directory")
	fl.StringVar(&c.kernelPackage, "kernel-package", "linux-image-amd64", "Debian kernel package to fetch when --kernel is not given")
	fl.StringVar(&c.cache, "cache", efi.DefaultCacheDir(), "where fetched kernel packages are kept")
	fl.StringVar(&c.out, "out", "image", "output directory")
	fl.StringVar(&c.writ, "writ", "", "the static writ binary for /init (default: this binary, if static)")
	fl.StringVar(&c.cmdline, "cmdline", efi.DefaultCmdline, "kernel command line")
	fl.StringVar(&c.baseURL, "base-url", "", "the URL writ image serve will serve --out at, for boot.ipxe (default http://${next-server}:7780)")
	fl.StringVar(&c.cfg.Ledger, "ledger", "", "ledger URL the node registers with")
	fl.StringVar(&c.cfg.Site, "site", "", "the node's site")
	fl.StringVar(&c.cfg.Token, "token", "", "the site's enrollment token")
	fl.StringVar(&c.cfg.Redis, "redis", "", "the site's Redis (for a site without a dispatcher)")
	fl.StringVar(&c.cfg.Supervisor, "supervisor", "", "the site's dispatcher (writ supervisor --dispatch): nodes take their work there and need no Redis")
	fl.StringVar(&c.caFile, "site-ca", "", "the site CA's certificate (PEM) to bake in: the node talks TLS to the ledger and Redis (default: --ca)")
	return cmd
}

// Run builds the image and prints what it made.
func (c *imageBuildCmd) Run(ctx context.Context, _ []string) error {
	writ := c.writ
	if writ == "" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		writ = self
	}
	if static, err := efi.IsStatic(writ); err != nil {
		return fmt.Errorf("--writ %s: %w", writ, err)
	} else if !static {
		return fmt.Errorf("--writ %s is dynamically linked; /init must be static: make static (bin/writ-static)", writ)
	}
	if c.caFile == "" {
		c.caFile = c.ca.path()
	}
	if c.caFile != "" {
		pem, err := os.ReadFile(c.caFile)
		if err != nil {
			return fmt.Errorf("--site-ca: %w", err)
		}
		c.cfg.CA = string(pem)
	}
	b := efi.Build{Kernel: c.kernel, Modules: c.modules, Writ: writ, Config: c.cfg, Cmdline: c.cmdline, BaseURL: c.baseURL}
	if b.Kernel == "" {
		k, err := efi.FetchKernel(ctx, c.kernelPackage, c.cache)
		if err != nil {
			return err
		}
		b.Kernel, b.Modules = k.Vmlinuz, k.Modules
	} else if b.Modules == "" {
		return errors.New("--kernel needs --modules (the kernel's lib/modules/VERSION)")
	}
	extra, missing, err := efi.Tools(efi.NodeTools)
	if err != nil {
		return err
	}
	for _, tool := range missing {
		fmt.Fprintf(os.Stderr, "warning: %s not found (apt-get install btrfs-progs): nodes will lack it\n", tool)
	}
	b.Extra = extra
	arts, err := b.Make(ctx, c.out)
	if err != nil {
		return err
	}
	for _, a := range arts {
		fmt.Printf("%-14s %10d bytes  %s\n", a.Name, a.Size, a.Path)
	}
	return nil
}

type imageServeCmd struct {
	dir, listen string
	tls         serviceTLS
	log         *slog.Logger
}

func imageServeCommand() *cobra.Command {
	c := &imageServeCmd{}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve a built image to nodes that netboot with iPXE",
		Long: `Serve DIR (from writ image build) over HTTP: boot.ipxe, vmlinuz,
initrd.img, writ-node.efi and usb.img. Point DHCP's boot file at
http://HOST:PORT/boot.ipxe?mac=${net0/mac}; a file DIR/mac/aa-bb-cc-dd-ee-ff.ipxe
overrides the script for that machine. Every request is logged.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.dir, "dir", "image", "the image directory")
	cmd.Flags().StringVar(&c.listen, "listen", ":7780", "address to serve on")
	c.tls.ca.cmd = cmd
	cmd.Flags().StringVar(&c.tls.cert, "tls-cert", os.Getenv(envTLSCert), "serve HTTPS with this certificate (writ ca issue), for firmware that trusts the site CA")
	cmd.Flags().StringVar(&c.tls.key, "tls-key", os.Getenv(envTLSKey), "the certificate's key")
	return cmd
}

// Run serves until ctx ends.
func (c *imageServeCmd) Run(ctx context.Context, _ []string) error {
	if _, err := os.Stat(filepath.Join(c.dir, efi.IPXEFile)); err != nil {
		return fmt.Errorf("%s: %w (build it with writ image build --out %s)", c.dir, err, c.dir)
	}
	// Netboot firmware (iPXE as shipped) speaks plain HTTP to a server it
	// cannot authenticate, so plain HTTP stays the default here, on any
	// address; with --tls-cert it serves HTTPS.
	s := &sec{}
	if c.tls.cert != "" {
		var err error
		if s, err = c.tls.load(true); err != nil {
			return err
		}
	}
	ln, err := listen(c.listen, "--listen")
	if err != nil {
		return err
	}
	ln = s.wrap(ln)
	c.log.Info("serving the node image", "dir", c.dir, "addr", ln.Addr().String(), "tls", s.tls())
	return serve(ctx, ln, &efi.Server{Dir: c.dir, Log: c.log.With("svc", "image")})
}
