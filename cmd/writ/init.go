package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

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
(writ.ledger= writ.site= writ.token= writ.redis=). Ctrl-Alt-Del or SIGTERM
reboots cleanly; SIGUSR2 powers off.`,
		Args:   cobra.NoArgs,
		Hidden: true,
		RunE:   func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	return cmd
}

// Run runs the node image until asked to reboot or power off; as PID 1 it
// then does so (it never returns).
func (c *initCmd) Run(ctx context.Context, _ []string) error {
	// It mounts over /run, /tmp and /var/lib/writ and may reboot: never on
	// a live system.
	if os.Getpid() != 1 {
		return errors.New("writ init is the node image's PID 1; it does not run on a live system")
	}
	os.Setenv("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
	reboot := make(chan bool, 1)
	sig := make(chan os.Signal, 4)
	// SIGINT is Ctrl-Alt-Del once Setup turns the key combination over to
	// PID 1.
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR2)
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		s := <-sig
		reboot <- s != syscall.SIGUSR2
		cancel()
	}()
	go nodeinit.Reaper(ctx)
	console := nodeinit.Console(os.Stdout)
	cfg, err := nodeinit.Setup(ctx, console)
	if err != nil {
		fmt.Fprintf(console, "writ init: %v\n", err)
	} else {
		n := &nodeCmd{ledger: cfg.Ledger, site: cfg.Site, token: cfg.Token, redis: cfg.Redis, concurrency: 4,
			stateDir: "/var/lib/writ/node", allowTmpfs: true, status: console, log: slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelWarn}))}
		n.vm.off = true // the image carries no hypervisor
		if cfg.Disk != "" {
			n.pool.device, n.pool.mount = cfg.Disk, "/var/lib/writ/pool"
			n.stateDir, n.allowTmpfs = filepath.Join(n.pool.mount, "identity"), false
		} else {
			fmt.Fprintln(console, "writ init: WARNING: no disk; the node key is in memory: this node gets a new identity at every boot")
		}
		// A node that stops on an error (a layer that could not start) is
		// started again: a person at the console reads why meanwhile.
		for {
			err := n.Run(ctx, nil)
			if ctx.Err() != nil {
				break
			}
			fmt.Fprintf(console, "writ init: the node stopped: %v; starting it again in 5 s\n", err)
			select {
			case <-ctx.Done():
			case <-time.After(5 * time.Second):
			}
		}
	}
	if ctx.Err() == nil {
		fmt.Fprintln(console, "writ init: waiting; Ctrl-Alt-Del reboots")
	}
	r := <-reboot // sent before ctx is cancelled
	fmt.Fprintf(console, "writ init: %s\n", map[bool]string{true: "rebooting", false: "powering off"}[r])
	nodeinit.Halt(r)
	select {}
}
