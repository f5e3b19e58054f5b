package main

import (
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/pki"
)

func caCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Make a site CA and issue service certificates (TLS between writ's services)",
		Long: `Every writ listener serves HTTPS with a certificate from the fleet's CA, and
services identify each other by the name in their certificates (mutual
TLS): the supervisor takes batches and serves events only to "coord",
trust snapshots are signed by "ledger". Clients verify servers against the
CA's certificate (--ca or $WRIT_CA).

Keep ca.key offline or on the admin's machine; copy ca.crt, and each
service its own NAME.crt and NAME.key, to the hosts.`,
	}
	cmd.AddCommand(caInitCommand(), caIssueCommand())
	return cmd
}

func caInitCommand() *cobra.Command {
	var dir, name string
	cmd := &cobra.Command{
		Use:     "init",
		Short:   "Make a new CA in DIR (ca.crt, ca.key)",
		Example: `  writ ca init --dir /etc/writ/ca`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := pki.InitCA(dir, name)
			if err != nil {
				return err
			}
			fmt.Printf("CA %q made in %s (valid until %s)\nexport %s=%s\n", name, dir,
				ca.Cert.NotAfter.UTC().Format(time.DateOnly), envCA, filepath.Join(dir, pki.CACertFile))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "writ-ca", "directory for the CA's certificate and key")
	cmd.Flags().StringVar(&name, "name", "writ-ca", "the CA's name")
	return cmd
}

func caIssueCommand() *cobra.Command {
	var dir, out string
	var dns []string
	var ips []net.IP
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "issue NAME",
		Short: "Issue a certificate for service NAME (NAME.crt, NAME.key)",
		Long: `Issue a certificate and key for the service NAME, for serving and for
calling other services. NAME is the identity the others check: coord's
must be "coord" and the ledger's "ledger" unless they are told otherwise
(--coord-name, --ledger-name). Give every DNS name and IP address clients
reach the service by.`,
		Example: `  writ ca issue ledger --dns ledger.example.net --ip 10.0.0.1
  writ ca issue coord --ip 10.0.0.1
  writ ca issue supervisor-lab --ip 10.0.1.1
  writ ca issue redis-lab --ip 10.0.1.1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := pki.LoadCA(dir)
			if err != nil {
				return err
			}
			if out == "" {
				out = dir
			}
			name := args[0]
			certFile, keyFile := filepath.Join(out, name+".crt"), filepath.Join(out, name+".key")
			if err := ca.IssueFiles(pki.Request{Name: name, DNS: dns, IPs: ips, Validity: validity}, certFile, keyFile); err != nil {
				return err
			}
			fmt.Printf("issued %s: %s, %s\n", name, certFile, keyFile)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "writ-ca", "the CA's directory (writ ca init)")
	cmd.Flags().StringVar(&out, "out", "", "directory for NAME.crt and NAME.key (default: the CA's directory)")
	cmd.Flags().StringSliceVar(&dns, "dns", nil, "DNS names of the service (repeatable); NAME is always one")
	cmd.Flags().IPSliceVar(&ips, "ip", nil, "IP addresses of the service (repeatable)")
	cmd.Flags().DurationVar(&validity, "validity", pki.CertValidity, "how long the certificate is valid")
	return cmd
}
