package main

import (
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/internal/fleet"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/queue"
)

func redisCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "redis", Short: "Configure the Redis servers of a fleet (ACL users, TLS)"}
	cmd.AddCommand(redisConfCommand())
	return cmd
}

func redisConfCommand() *cobra.Command {
	var site, passwords, cert, key, bind, replicaOf, sentinel, dataDir, logFile string
	var roles []string
	var port, quorum int
	cmd := &cobra.Command{
		Use:   "conf",
		Short: "Print a redis.conf for writ: TLS, and one ACL user per role with only the keys it needs",
		Long: `Print a redis-server configuration for a writ Redis: TLS only (--tls-cert,
--tls-key and the CA of --ca), the default user off, and one ACL user per
role (coord; or a site's supervisor and runner), each allowed only the keys
and commands it needs (queue.ACLRules). The passwords live in files of
--passwords (DIR/ROLE, mode 0600, made when missing); the configuration
holds only their SHA-256. Give each service its file's content in
$WRIT_REDIS_PASSWORD or as --redis-password-file. The data (the
append-only file every accepted job is in) lives in --dir, written into
the configuration as an absolute path, so a server started from any
working directory finds it again; --logfile names a log file (default:
standard output, for systemd's journal).

For a highly available Redis (Sentinel), print one configuration per
server and per sentinel, all from the same --passwords directory: the
primary's as above, each replica's with --replica-of, and each sentinel's
with --sentinel NAME=PRIMARY:PORT (run it as redis-server FILE --sentinel;
Sentinel rewrites the file, so give it its own). Replication and Sentinel
log in as internal users whose password is DIR/internal. Clients then use
rediss+sentinel://USER@SENTINEL1:26379/0?master_name=NAME&addr=SENTINEL2:26379&addr=SENTINEL3:26379.`,
		Example: `  writ redis conf --site lab --roles supervisor --passwords /etc/writ/redis-lab --dir /var/lib/writ/redis-lab \
      --ca ca.crt --tls-cert redis-lab.crt --tls-key redis-lab.key --bind 10.0.1.1 > /etc/redis/writ.conf
  writ redis conf … --bind 10.0.1.2 --replica-of 10.0.1.1:6379 > /etc/redis/writ.conf
  writ redis conf … --bind 10.0.1.1 --port 26379 --sentinel lab=10.0.1.1:6379 > /etc/redis/sentinel.conf`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if passwords == "" {
				return errors.New("--passwords DIR is required: where each role's password file lives")
			}
			caFile := caSource{cmd: cmd}.path()
			if cert == "" || key == "" || caFile == "" {
				return errors.New("TLS needs --tls-cert, --tls-key (writ ca issue redis-SITE) and --ca")
			}
			if err := os.MkdirAll(passwords, 0o700); err != nil {
				return err
			}
			if dataDir == "" {
				return errors.New("--dir is required: where this Redis keeps its data (every accepted job is there)")
			}
			abs := func(p string) string { a, _ := filepath.Abs(p); return a }
			if err := os.MkdirAll(dataDir, 0o700); err != nil {
				return fmt.Errorf("--dir: %w", err)
			}
			if logFile != "" {
				logFile = abs(logFile)
			}
			cfg := redisproc.Config{
				Dir: abs(dataDir), Log: logFile,
				Bind: bind, Port: port, Persist: true, Fsync: "always", ReplicaOf: replicaOf,
				TLS: &redisproc.TLS{Cert: abs(cert), Key: abs(key), CA: abs(caFile)},
			}
			// Checked before any password file is made.
			if err := fleet.CheckRoles(site, roles...); err != nil {
				return fmt.Errorf("--roles: %w", err)
			}
			pass := map[string]string{}
			for _, role := range roles {
				pw, err := rolePassword(filepath.Join(passwords, role))
				if err != nil {
					return err
				}
				pass[role] = pw
			}
			users, err := fleet.RedisUsers(site, pass, roles...)
			if err != nil {
				return err
			}
			cfg.Users = users
			if replicaOf != "" || sentinel != "" {
				pw, err := rolePassword(filepath.Join(passwords, "internal"))
				if err != nil {
					return err
				}
				cfg.Internal = pw
			}
			if sentinel != "" {
				name, primary, ok := strings.Cut(sentinel, "=")
				if !ok || replicaOf != "" {
					return errors.New("--sentinel is NAME=PRIMARY:PORT, and a sentinel replicates nothing (no --replica-of)")
				}
				cfg.Sentinel = &redisproc.Sentinel{Master: name, Primary: primary, Quorum: quorum, DownAfter: 5 * time.Second}
			}
			lines, err := redisproc.Conf(cfg)
			if err != nil {
				return err
			}
			fmt.Printf("# writ Redis (written by writ redis conf)\n%s\n", strings.Join(lines, "\n"))
			return nil
		},
	}
	cmd.Flags().StringVar(&site, "site", "", "the site whose Redis this is (for the supervisor and runner roles)")
	cmd.Flags().StringSliceVar(&roles, "roles", []string{queue.ACLSupervisor}, "the users: coord; or a site's supervisor, and runner only for a site without a dispatcher (its nodes then log in to Redis)")
	cmd.Flags().StringVar(&passwords, "passwords", "", "directory of the roles' password files (DIR/ROLE, made when missing)")
	cmd.Flags().StringVar(&cert, "tls-cert", "", "the Redis server's certificate (writ ca issue redis-SITE)")
	cmd.Flags().StringVar(&key, "tls-key", "", "its key")
	cmd.Flags().StringVar(&dataDir, "dir", "", "the server's data directory (made when missing, mode 0700): its append-only file holds every accepted job (required)")
	cmd.Flags().StringVar(&logFile, "logfile", "", "the server's log file (default: standard output)")
	cmd.Flags().StringVar(&bind, "bind", "127.0.0.1", "addresses to listen on")
	cmd.Flags().IntVar(&port, "port", 6379, "TLS port")
	cmd.Flags().StringVar(&replicaOf, "replica-of", "", "HOST:PORT: this server is a replica of that primary")
	cmd.Flags().StringVar(&sentinel, "sentinel", "", "NAME=HOST:PORT: print a sentinel's configuration, watching that primary under NAME (the master_name clients give)")
	cmd.Flags().IntVar(&quorum, "quorum", 2, "with --sentinel: how many sentinels must agree the primary is down")
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
	pw := fleet.Secret()
	if err := os.WriteFile(path, []byte(pw+"\n"), 0o600); err != nil {
		return "", err
	}
	return pw, nil
}
