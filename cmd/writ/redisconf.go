package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/queue"
)

func redisCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "redis", Short: "Configure the Redis servers of a fleet (ACL users, TLS)"}
	cmd.AddCommand(redisConfCommand())
	return cmd
}

func redisConfCommand() *cobra.Command {
	var site, passwords, cert, key, bind string
	var roles []string
	var port int
	cmd := &cobra.Command{
		Use:   "conf",
		Short: "Print a redis.conf for writ: TLS, and one ACL user per role with only the keys it needs",
		Long: `Print a redis-server configuration for a writ Redis: TLS only (--tls-cert,
--tls-key and the CA of --ca), the default user off, and one ACL user per
role (coord; or a site's supervisor and runner), each allowed only the keys
and commands it needs (queue.ACLRules). The passwords live in files of
--passwords (DIR/ROLE, mode 0600, made when missing); the configuration
holds only their SHA-256. Give each service its file's content in
$WRIT_REDIS_PASSWORD or as --redis-password-file.`,
		Example: `  writ redis conf --site lab --roles supervisor,runner --passwords /etc/writ/redis-lab \
      --tls-cert redis-lab.crt --tls-key redis-lab.key --bind 10.0.1.1 > /etc/redis/writ.conf`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if passwords == "" {
				return errors.New("--passwords DIR is required: where each role's password file lives")
			}
			if cert == "" || key == "" || caFile == "" {
				return errors.New("TLS needs --tls-cert, --tls-key (writ ca issue redis-SITE) and --ca")
			}
			if err := os.MkdirAll(passwords, 0o700); err != nil {
				return err
			}
			var lines []string
			for _, role := range roles {
				if queue.ACLRules(role, site) == "-@all" {
					return fmt.Errorf("--roles: %q is not one of %s, %s, %s", role, queue.ACLCoord, queue.ACLSupervisor, queue.ACLRunner)
				}
				if role != queue.ACLCoord && site == "" {
					return fmt.Errorf("role %s needs --site", role)
				}
				pw, err := rolePassword(filepath.Join(passwords, role))
				if err != nil {
					return err
				}
				sum := sha256.Sum256([]byte(pw))
				lines = append(lines, fmt.Sprintf("user %s on resetpass #%s resetkeys resetchannels %s", role, hex.EncodeToString(sum[:]), queue.ACLRules(role, site)))
			}
			abs := func(p string) string { a, _ := filepath.Abs(p); return a }
			fmt.Printf(`# writ Redis (written by writ redis conf)
bind %s
port 0
tls-port %d
tls-cert-file %q
tls-key-file %q
tls-ca-cert-file %q
tls-auth-clients no
protected-mode yes
appendonly yes
appendfsync always
user default off resetpass resetkeys -@all
%s
`, bind, port, abs(cert), abs(key), abs(caFile), strings.Join(lines, "\n"))
			return nil
		},
	}
	cmd.Flags().StringVar(&site, "site", "", "the site whose Redis this is (for the supervisor and runner roles)")
	cmd.Flags().StringSliceVar(&roles, "roles", []string{queue.ACLSupervisor, queue.ACLRunner}, "the users: coord, supervisor, runner")
	cmd.Flags().StringVar(&passwords, "passwords", "", "directory of the roles' password files (DIR/ROLE, made when missing)")
	cmd.Flags().StringVar(&cert, "tls-cert", "", "the Redis server's certificate (writ ca issue redis-SITE)")
	cmd.Flags().StringVar(&key, "tls-key", "", "its key")
	cmd.Flags().StringVar(&bind, "bind", "127.0.0.1", "addresses to listen on")
	cmd.Flags().IntVar(&port, "port", 6379, "TLS port")
	return cmd
}

// rolePassword reads a role's password file, making it first.
func rolePassword(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil {
		if pw := strings.TrimSpace(string(b)); pw != "" {
			return pw, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	pw := randomSecret()
	if err := os.WriteFile(path, []byte(pw+"\n"), 0o600); err != nil {
		return "", err
	}
	return pw, nil
}
