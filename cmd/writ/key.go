package main

import (
	"context"
	"fmt"
	"os"
	"os/user"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/keys"
)

func keyCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Create and show ed25519 signing keys",
		Long: `writ signs with ed25519 keys: its own (writ key gen) or an existing OpenSSH
one such as ~/.ssh/id_ed25519. A key's ID is its OpenSSH SHA256 fingerprint,
the same string ssh-keygen -l prints.`,
	}
	cmd.AddCommand(keyGenCommand(), keyShowCommand())
	return cmd
}

type keyGenCmd struct{ out, comment string }

func keyGenCommand() *cobra.Command {
	c := &keyGenCmd{}
	cmd := &cobra.Command{
		Use:   "gen",
		Short: "Generate a key pair: FILE (private, mode 0600) and FILE.pub",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	cmd.Flags().StringVarP(&c.out, "output", "o", "", "private key file (default ~/.config/writ/key)")
	cmd.Flags().StringVar(&c.comment, "comment", "", "comment on the public key (default user@host)")
	return cmd
}

// Run generates and saves a key.
func (c *keyGenCmd) Run(_ context.Context, _ []string) error {
	out := c.out
	if out == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return fmt.Errorf("no home directory; pass -o FILE")
		}
		out = home + "/.config/writ/key"
	}
	comment := c.comment
	if comment == "" {
		comment = "writ"
		if u, err := user.Current(); err == nil {
			host, _ := os.Hostname()
			comment = u.Username + "@" + host
		}
	}
	k, err := keys.Generate(comment)
	if err != nil {
		return err
	}
	if err := k.Save(out); err != nil {
		return err
	}
	fmt.Printf("private key: %s\npublic key:  %s.pub\nkey id:      %s\n", out, out, k.ID)
	return nil
}

type keyShowCmd struct{}

func keyShowCommand() *cobra.Command {
	c := &keyShowCmd{}
	return &cobra.Command{
		Use:   "show [FILE]",
		Short: "Print a key's public key line and key ID (FILE: private or .pub; default $WRIT_KEY)",
		Args:  cobra.MaximumNArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
}

// Run prints the public key and ID.
func (c *keyShowCmd) Run(_ context.Context, args []string) error {
	path := ""
	if len(args) == 1 {
		path = args[0]
	}
	if path != "" {
		if data, err := os.ReadFile(path); err == nil {
			if pub, comment, err := keys.ParsePublic(string(data)); err == nil {
				fmt.Printf("%s\nkey id: %s\n", keys.FormatPublic(pub, comment), keys.ID(pub))
				return nil
			}
		}
	}
	k, err := loadKey(path)
	if err != nil {
		return err
	}
	fmt.Printf("%s\nkey id: %s\n", k.AuthorizedKey(), k.ID)
	return nil
}
