package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/pki"
)

// TestServiceTLS_Refusals: a service without a certificate (unless told
// --insecure-http), plain HTTP off loopback, a plain ledger URL under TLS,
// and a password in --redis are each refused, naming the way out.
func TestServiceTLS_Refusals(t *testing.T) {
	t.Setenv(envCA, "") // no --ca, and none from the environment
	if _, err := (&serviceTLS{}).load(true); err == nil || !strings.Contains(err.Error(), "--insecure-http") {
		t.Errorf("no TLS material = %v", err)
	}
	if _, err := (&serviceTLS{insecure: true, cert: "x.crt"}).load(true); err == nil {
		t.Error("--insecure-http with a certificate loaded")
	}
	plain, err := (&serviceTLS{insecure: true}).load(true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := plain.listen("0.0.0.0:0", "--listen"); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("plain HTTP on every address = %v, want refused", err)
	}
	ln, err := plain.listen("127.0.0.1:0", "--listen")
	if err != nil {
		t.Fatalf("plain HTTP on loopback: %v", err)
	}
	ln.Close()

	dir := t.TempDir()
	ca, _ := pki.InitCA(filepath.Join(dir, "ca"), "ca")
	ca.IssueFiles(pki.Request{Name: "coord"}, filepath.Join(dir, "coord.crt"), filepath.Join(dir, "coord.key"))
	withCA := caSource{file: filepath.Join(dir, "ca", pki.CACertFile)}
	if _, err := (&serviceTLS{ca: withCA}).load(true); err == nil || !strings.Contains(err.Error(), "--tls-cert") {
		t.Errorf("serving without a certificate = %v", err)
	}
	if _, err := (&serviceTLS{ca: withCA}).load(false); err != nil {
		t.Errorf("a client-only service (no listener) needs no certificate: %v", err)
	}
	s, err := (&serviceTLS{cert: filepath.Join(dir, "coord.crt"), key: filepath.Join(dir, "coord.key"), ca: withCA}).load(true)
	if err != nil || s.name() != "coord" {
		t.Fatalf("TLS service = %v, %v", s, err)
	}
	if err := s.checkURL("http://10.0.0.1:7701", "--ledger"); err == nil {
		t.Error("a TLS service accepted a plain ledger URL")
	}

	cmd := redisCommand() // any command to carry the flag
	rf := &redisFlags{}
	rf.add(cmd, "test")
	cmd.Flags().Set("redis", "redis://runner:hunter2@10.0.0.1:6379/0")
	if _, err := rf.connect(); err == nil || !strings.Contains(err.Error(), "--redis-password-file") || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("a password in --redis = %v", err)
	}
}

// TestRedisConf: writ redis conf makes a password file per role (0600),
// keeps it on a second run, and prints only the passwords' hashes.
func TestRedisConf(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir) // --dir is given relative to it
	ca, _ := pki.InitCA(filepath.Join(dir, "ca"), "ca")
	ca.IssueFiles(pki.Request{Name: "redis-lab"}, filepath.Join(dir, "r.crt"), filepath.Join(dir, "r.key"))
	pw := filepath.Join(dir, "pw")
	run := func(extra ...string) string {
		root := rootCommand()
		r, w, _ := os.Pipe()
		stdout := os.Stdout
		os.Stdout = w
		root.SetArgs(append([]string{"redis", "conf", "--ca", filepath.Join(dir, "ca", pki.CACertFile), "--site", "lab", "--passwords", pw,
			"--tls-cert", filepath.Join(dir, "r.crt"), "--tls-key", filepath.Join(dir, "r.key"), "--roles", "supervisor,runner", "--dir", "data"}, extra...))
		err := root.ExecuteContext(context.Background())
		w.Close()
		os.Stdout = stdout
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1<<16)
		n, _ := r.Read(b)
		return string(b[:n])
	}
	conf := run()
	// The data directory is written as an absolute path: a server started
	// from another working directory finds its jobs again.
	if abs := filepath.Join(dir, "data"); !strings.Contains(conf, "dir \""+abs+"\"") {
		t.Errorf("the configuration names no absolute dir %s:\n%s", abs, conf)
	}
	for _, role := range []string{"supervisor", "runner"} {
		fi, err := os.Stat(filepath.Join(pw, role))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("password file of %s: %v %v", role, fi, err)
		}
		p, _ := os.ReadFile(filepath.Join(pw, role))
		if strings.Contains(conf, strings.TrimSpace(string(p))) {
			t.Errorf("the configuration holds %s's password", role)
		}
		if !strings.Contains(conf, "user "+role+" on resetpass #") {
			t.Errorf("no user %s in:\n%s", role, conf)
		}
	}
	if !strings.Contains(conf, "user default on resetpass #") || !strings.Contains(conf, "port 0") || !strings.Contains(conf, "tls-port 6379") {
		t.Errorf("configuration:\n%s", conf)
	}
	if again := run(); again != conf {
		t.Error("a second run changed the passwords")
	}
	if strings.Contains(conf, "masteruser") || strings.Contains(conf, "sentinel") {
		t.Errorf("a lone primary's configuration names replication or Sentinel:\n%s", conf)
	}
	internal, _ := os.ReadFile(filepath.Join(pw, "internal"))
	replica := run("--replica-of", "10.0.1.1:6379")
	for _, want := range []string{"replicaof 10.0.1.1 6379", "masteruser writ-replica", "masterauth", "tls-replication yes", "user writ-replica on", "user writ-sentinel on"} {
		if !strings.Contains(replica, want) {
			t.Errorf("replica configuration lacks %q:\n%s", want, replica)
		}
	}
	if internal, _ = os.ReadFile(filepath.Join(pw, "internal")); len(internal) == 0 {
		t.Fatal("no internal password file made")
	}
	sentinel := run("--port", "26379", "--sentinel", "lab=10.0.1.1:6379")
	for _, want := range []string{"sentinel monitor lab 10.0.1.1 6379 2", "sentinel auth-user lab writ-sentinel", "sentinel sentinel-user writ-sentinel", "+sentinel|get-master-addr-by-name"} {
		if !strings.Contains(sentinel, want) {
			t.Errorf("sentinel configuration lacks %q:\n%s", want, sentinel)
		}
	}
	if strings.Contains(sentinel, "appendonly") || strings.Contains(sentinel, "replicaof") {
		t.Errorf("a sentinel's configuration holds a data server's lines:\n%s", sentinel)
	}
}
