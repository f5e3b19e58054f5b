package network

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
)

func TestNames(t *testing.T) {
	seen := map[string]string{}
	for i := 0; i < 5000; i++ {
		key := fmt.Sprintf("network-with-a-rather-long-name-%d", i)
		n := BridgeName(key)
		if len(n) > maxIfName {
			t.Fatalf("BridgeName(%q) = %q, longer than %d", key, n, maxIfName)
		}
		if other, dup := seen[n]; dup {
			t.Fatalf("%q and %q both map to %q", key, other, n)
		}
		seen[n] = key
		if BridgeName(key) != n {
			t.Fatal("BridgeName is not deterministic")
		}
	}
	if TapName("vm1", 0) == TapName("vm1", 1) || len(TapName("a-very-long-vm-name-indeed", 3)) > maxIfName {
		t.Error("tap names collide or are too long")
	}
	m1, m2 := MAC("vm1", 0), MAC("vm1", 0)
	if m1.String() != m2.String() || m1[0]&0x02 == 0 || m1[0]&0x01 != 0 {
		t.Errorf("MAC = %s, want deterministic, locally administered, unicast", m1)
	}
	if MAC("vm1", 0).String() == MAC("vm2", 0).String() {
		t.Error("two workloads share a MAC")
	}
}

func TestIPAM_AllocateRelease(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net.json")
	a, err := NewIPAM(path, netip.MustParsePrefix("10.9.0.0/29"))
	if err != nil {
		t.Fatal(err)
	}
	if a.Gateway().String() != "10.9.0.1" {
		t.Errorf("Gateway = %s", a.Gateway())
	}
	// /29: .0 network, .1 gateway, .7 broadcast: .2-.6 are free (5).
	var got []string
	for i := 0; i < 5; i++ {
		ip, err := a.Allocate(fmt.Sprintf("vm%d", i))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ip.String())
	}
	if fmt.Sprint(got) != "[10.9.0.2 10.9.0.3 10.9.0.4 10.9.0.5 10.9.0.6]" {
		t.Errorf("allocations = %v", got)
	}
	if ip, _ := a.Allocate("vm2"); ip.String() != "10.9.0.4" {
		t.Errorf("second Allocate(vm2) = %s, want its own 10.9.0.4", ip)
	}
	if _, err := a.Allocate("vm9"); !errors.Is(err, ErrExhausted) {
		t.Errorf("Allocate on a full subnet = %v, want ErrExhausted", err)
	}
	// A restart (a new allocator on the same file) never repeats an address.
	b, _ := NewIPAM(path, netip.MustParsePrefix("10.9.0.0/29"))
	if err := b.Release("vm1"); err != nil {
		t.Fatal(err)
	}
	b.Release("vm1")
	if ip, err := b.Allocate("new"); err != nil || ip.String() != "10.9.0.3" {
		t.Errorf("Allocate after release = %s, %v; want the freed 10.9.0.3", ip, err)
	}
	if _, err := NewIPAM(path, netip.MustParsePrefix("10.8.0.0/29")); err != nil {
		t.Fatal(err)
	}
	c, _ := NewIPAM(path, netip.MustParsePrefix("10.8.0.0/29"))
	if _, err := c.Allocate("x"); err == nil {
		t.Error("state of another subnet was reused")
	}
}

// TestIPAM_Concurrent: allocators racing on one file never hand out an
// address twice.
func TestIPAM_Concurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net.json")
	var wg sync.WaitGroup
	addrs := make(chan string, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			a, _ := NewIPAM(path, netip.MustParsePrefix("10.1.0.0/24"))
			ip, err := a.Allocate(fmt.Sprintf("o%d", i))
			if err != nil {
				t.Error(err)
				return
			}
			addrs <- ip.String()
		}(i)
	}
	wg.Wait()
	close(addrs)
	seen := map[string]bool{}
	for a := range addrs {
		if seen[a] {
			t.Errorf("address %s handed out twice", a)
		}
		seen[a] = true
	}
}
