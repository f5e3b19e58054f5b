// Command writ is the single binary of a writ fleet: the services (ledger,
// coord, supervisor, runner, or all of them at once with `writ dev`) and the
// client commands (key, job, run, user, site).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/scripts/sandbox"
)

// version is stamped by the Makefile with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if sandbox.IsChild() {
		// A runner started this process to run scripts (sandbox.Pool):
		// no flags, no commands, only the protocol on stdin and stdout.
		os.Exit(sandboxMain())
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if os.Getpid() == 1 {
		// The node image runs writ as /init: whatever the kernel passed,
		// PID 1 is writ init.
		os.Args = []string{os.Args[0], "init"}
	}
	root := rootCommand()
	root.SetContext(ctx)
	if err := root.ExecuteContext(ctx); err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "writ:", err)
		os.Exit(1)
	}
}

// sandboxMain is a sandbox process's body; its memory cap comes in its
// environment.
func sandboxMain() int {
	n, err := strconv.ParseInt(os.Getenv(sandbox.Env), 10, 64)
	if err == nil {
		err = sandbox.Main(os.Stdin, os.Stdout, n)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "writ sandbox:", err)
		return 2
	}
	return 0
}

// exitError ends the program with a code after the command printed its own
// message.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "writ",
		Short: "writ runs signed Tengo scripts on a fleet of nodes",
		Long: `writ is a job-queue worker fleet driven by signed scripts.

A user writes a short Tengo script, signs it with an ed25519 key and submits
it to coord, which routes it to the supervisor of the job's site. The
supervisor verifies the signatures against the ledger and enqueues the job in
Redis; a runner on a node verifies it again and runs it in a sandbox.

Start a whole fleet on this machine:   writ dev --dir .dev
Then, in another shell:                 . .dev/env && writ run scripts/lib/hello.tengo --arg who=you

Client commands read their defaults from the environment: WRIT_COORD (coord
URL), WRIT_KEY (signing key file), WRIT_SITE (default site), WRIT_LEDGER
(ledger URL) and WRIT_CA (the site CA's certificate, which servers are
verified against). Services take WRIT_TLS_CERT and WRIT_TLS_KEY (their
certificate), WRIT_REDIS and WRIT_REDIS_PASSWORD.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	root.PersistentFlags().String("log-level", "info", "log level of services: debug, info, warn or error")
	root.PersistentFlags().String("ca", os.Getenv(envCA), "the site CA's certificate (PEM): servers are verified against it, and services verify clients' certificates (default $WRIT_CA)")
	root.AddCommand(
		ledgerCommand(),
		coordCommand(),
		supervisorCommand(),
		runnerCommand(),
		devCommand(),
		keyCommand(),
		jobCommand(),
		flowCommand(),
		runCommand(),
		vmCommand(),
		nodeCommand(),
		imageCommand(),
		initCommand(),
		userCommand(),
		siteCommand(),
		caCommand(),
		redisCommand(),
	)
	return root
}
