package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver
)

var (
	pgOnce sync.Once
	pgDir  string // the cluster's data and socket directory
	pgErr  error
)

// pgBin finds Debian's PostgreSQL binaries (/usr/lib/postgresql/N/bin).
func pgBin(name string) (string, error) {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(matches) == 0 {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
		return "", fmt.Errorf("%s not found: run `make test` (it installs postgresql) or apt-get install postgresql", name)
	}
	return matches[len(matches)-1], nil
}

// Postgres returns the URL of a fresh, empty database for the test, on a
// throwaway PostgreSQL cluster this test binary starts once (unix socket
// only, durability off for speed) and that dies with the binary. The
// database is dropped when the test ends. It fails (not skips) when
// PostgreSQL is missing: `make test` installs it.
func Postgres(tb testing.TB) string {
	tb.Helper()
	pgOnce.Do(func() { pgErr = startPostgres() })
	if pgErr != nil {
		tb.Fatalf("start PostgreSQL: %v", pgErr)
	}
	var b [6]byte
	rand.Read(b[:])
	name := "writ_test_" + hex.EncodeToString(b[:])
	admin, err := sql.Open("pgx", pgURL("postgres"))
	if err != nil {
		tb.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec("CREATE DATABASE " + name); err != nil {
		tb.Fatalf("create database: %v", err)
	}
	tb.Cleanup(func() {
		db, err := sql.Open("pgx", pgURL("postgres"))
		if err == nil {
			db.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)")
			db.Close()
		}
	})
	return pgURL(name)
}

// PostgresDurable, set before the first Postgres or PostgresDB call, keeps
// PostgreSQL's durability on (fsync, synchronous commit): for benchmarks.
var PostgresDurable bool

// PostgresDB is Postgres for programs (benchmarks): the URL of a new
// database called name on the throwaway cluster, which dies with the
// process.
func PostgresDB(name string) (string, error) {
	pgOnce.Do(func() { pgErr = startPostgres() })
	if pgErr != nil {
		return "", pgErr
	}
	admin, err := sql.Open("pgx", pgURL("postgres"))
	if err != nil {
		return "", err
	}
	defer admin.Close()
	if _, err := admin.Exec("CREATE DATABASE " + name); err != nil {
		return "", fmt.Errorf("create database: %w", err)
	}
	return pgURL(name), nil
}

func pgURL(db string) string {
	return "postgres://postgres@/" + db + "?host=" + pgDir + "&sslmode=disable"
}

// startPostgres makes and starts the cluster. initdb refuses to run as
// root, so as root the cluster belongs to the postgres user.
func startPostgres() error {
	initdb, err := pgBin("initdb")
	if err != nil {
		return err
	}
	postgres, err := pgBin("postgres")
	if err != nil {
		return err
	}
	removeStaleClusters()
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return fmt.Errorf("user postgres: %w (apt-get install postgresql makes it)", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	if pgDir, err = os.MkdirTemp("", "writ-pg-"); err != nil {
		return err
	}
	// The directory names the test binary, so a later run can tell a
	// cluster whose binary died.
	if err := os.WriteFile(filepath.Join(pgDir, "owner.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return err
	}
	data := filepath.Join(pgDir, "data")
	if cred != nil {
		if err := os.Chown(pgDir, int(cred.Uid), int(cred.Gid)); err != nil {
			return err
		}
	}
	cmd := exec.Command(initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %v\n%s", err, out)
	}
	started := make(chan error, 1)
	// Start the server from a thread that never exits: Pdeathsig fires
	// when the starting thread ends, and this way that is when the test
	// binary ends.
	go func() {
		runtime.LockOSThread()
		args := []string{"-D", data, "-k", pgDir, "-c", "listen_addresses=", "-c", "max_connections=200"}
		if !PostgresDurable {
			args = append(args, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
		}
		cmd := exec.Command(postgres, args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL}
		log, _ := os.Create(filepath.Join(pgDir, "postgres.log"))
		cmd.Stdout, cmd.Stderr = log, log
		started <- cmd.Start()
		if cmd.Process != nil {
			cmd.Wait()
		}
		select {} // keep this thread
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		db, err := sql.Open("pgx", pgURL("postgres"))
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err = db.PingContext(ctx)
			cancel()
			db.Close()
		}
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			logData, _ := os.ReadFile(filepath.Join(pgDir, "postgres.log"))
			return fmt.Errorf("postgres did not come up: %v\n%s", err, logData)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// removeStaleClusters deletes the directories of clusters whose test
// binary is gone (their server died with it).
func removeStaleClusters() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "writ-pg-*"))
	for _, d := range dirs {
		data, err := os.ReadFile(filepath.Join(d, "owner.pid"))
		if err != nil {
			continue
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
		if pid > 0 && syscall.Kill(pid, 0) == nil {
			continue
		}
		os.RemoveAll(d)
	}
}

// StopPostgres stops the cluster (if this binary started one) and removes
// its directory. Call it from TestMain after m.Run; a binary that dies
// first takes the server with it, and the next run removes the directory.
func StopPostgres() {
	if pgDir == "" {
		return
	}
	data, err := os.ReadFile(filepath.Join(pgDir, "data", "postmaster.pid"))
	if err == nil {
		if pid, err := strconv.Atoi(strings.SplitN(string(data), "\n", 2)[0]); err == nil {
			syscall.Kill(pid, syscall.SIGQUIT) // immediate shutdown
			for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	os.RemoveAll(pgDir)
}
