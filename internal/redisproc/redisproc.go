// Package redisproc runs a redis-server child process: `writ dev` uses it
// for its embedded Redis and tests use it through internal/testenv.
//
// It shells out to redis-server because Redis is a separate server program;
// there is no library form of it.
package redisproc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// Config says where and how to run redis-server.
type Config struct {
	// Dir holds the data files (dump.rdb, appendonly). Required.
	Dir string
	// Port to listen on 127.0.0.1. Required.
	Port int
	// Log is the log file; empty means Dir/redis.log.
	Log string
	// Persist turns on append-only persistence (for `writ dev`, so a
	// restarted fleet keeps its jobs); tests leave it off.
	Persist bool
}

// Process is a running redis-server.
type Process struct {
	cmd  *exec.Cmd
	port int
	done chan struct{}
}

// Start launches redis-server and waits until it answers PING (up to 10 s).
func Start(cfg Config) (*Process, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errors.New("redis-server not found on PATH: install it (apt-get install redis-server) or pass --redis URL")
	}
	if cfg.Log == "" {
		cfg.Log = cfg.Dir + "/redis.log"
	}
	args := []string{
		"--bind", "127.0.0.1", "--port", strconv.Itoa(cfg.Port),
		"--dir", cfg.Dir, "--logfile", cfg.Log,
		"--daemonize", "no", "--protected-mode", "yes",
		"--save", "",
	}
	if cfg.Persist {
		args = append(args, "--appendonly", "yes", "--appendfsync", "everysec")
	} else {
		args = append(args, "--appendonly", "no")
	}
	cmd := exec.Command(bin, args...)
	// Die with the parent: a crashed `writ dev` or test binary must not
	// leave a redis-server behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	p := &Process{cmd: cmd, port: cfg.Port, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if p.ping() == nil {
			return p, nil
		}
		select {
		case <-p.done:
			log, _ := os.ReadFile(cfg.Log)
			return nil, fmt.Errorf("redis-server exited at start: %s", tail(string(log), 400))
		default:
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, errors.New("redis-server did not answer within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (p *Process) ping() error {
	conn, err := net.DialTimeout("tcp", p.Addr(), 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	buf := make([]byte, 7)
	n, err := conn.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != "+PONG\r\n" {
		return fmt.Errorf("unexpected reply %q", buf[:n])
	}
	return nil
}

// Addr returns host:port.
func (p *Process) Addr() string { return "127.0.0.1:" + strconv.Itoa(p.port) }

// URL returns the redis:// URL of the server.
func (p *Process) URL() string { return "redis://" + p.Addr() + "/0" }

// Stop terminates the server (SIGTERM, then SIGKILL after 5 s) and waits.
func (p *Process) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Wait blocks until the server exits or ctx ends.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return errors.New("redis-server exited")
	case <-ctx.Done():
		return nil
	}
}
