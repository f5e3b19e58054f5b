package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/efi/nodeinit"
)

type initCmd struct{}

func initCommand() *cobra.Command {
	c := &initCmd{}
	cmd := &cobra.Command{
		Use:   "init",
		Short: "PID 1 of the writ node image (not for use on a running system)",
		Long: `writ init is the first process of the writ node image (writ image build
installs writ as /init). It mounts the basics, loads the image's kernel
modules, brings up networking with DHCP, turns an empty disk into the
node's btrfs pool (never a disk that holds data) and keeps the node key
there, then runs the node (registration, uptime, runner) with the site
configuration baked into the image or given on the kernel command line
(writ.ledger= writ.site= writ.token= writ.redis= writ.supervisor=). Ctrl-Alt-Del or SIGTERM
reboots cleanly; SIGUSR2 powers off.`,
		Args:   cobra.NoArgs,
		Hidden: true,
		RunE:   func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	return cmd
}

// Run runs the node image until asked to reboot or power off; as PID 1 it
// then does so (it never returns). nodeinit.Run is the PID 1 loop; this
// only wires the node in.
func (c *initCmd) Run(ctx context.Context, _ []string) error {
	return nodeinit.Run(ctx, os.Stdout, func(ctx context.Context, cfg nodeinit.Config, console io.Writer) error {
		n := &nodeCmd{ledger: cfg.Ledger, site: cfg.Site, token: cfg.Token, redis: redisFlags{url: cfg.Redis}, supervisor: cfg.Supervisor, concurrency: 4,
			stateDir: "/var/lib/writ/node", allowTmpfs: true, status: console, log: slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelWarn}))}
		n.vm.off = true // the image carries no hypervisor
		if cfg.CA != "" {
			if err := os.MkdirAll("/run/writ", 0o755); err != nil {
				return err
			}
			const caFile = "/run/writ/ca.crt"
			if err := os.WriteFile(caFile, []byte(cfg.CA), 0o644); err != nil {
				return err
			}
			n.tls.ca.file, n.redis.ca.file = caFile, caFile
		} else {
			fmt.Fprintln(console, "writ: no site CA in the image (writ image build --ca): talking plain HTTP")
			n.tls.insecure = true
		}
		if cfg.Disk != "" {
			n.pool.device, n.pool.mount = cfg.Disk, "/var/lib/writ/pool"
			n.stateDir, n.allowTmpfs = filepath.Join(n.pool.mount, "identity"), false
		}
		return n.Run(ctx, nil)
	})
}
