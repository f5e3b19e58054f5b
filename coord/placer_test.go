package coord

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// registerNodes registers nodes with the given CPUs on site lab of a real
// ledger; report says whether each has reported (is online).
func registerNodes(t *testing.T, l *testenv.Ledger, cpus []int, report []bool) []string {
	t.Helper()
	ctx := context.Background()
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	tok, err := admin.CreateTokenFor(ctx, "lab", ledger.CreateTokenRequest{Uses: 100})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i, c := range cpus {
		k, _ := keys.Generate("node")
		nc := ledger.NodeClient(l.URL, k, nil)
		n, err := nc.Register(ctx, ledger.RegisterRequest{Site: "lab", Token: tok.Secret, PublicKey: k.AuthorizedKey(), Capacity: ledger.Capacity{CPUs: c, MemoryMiB: 4096}})
		if err != nil {
			t.Fatal(err)
		}
		if report[i] {
			if _, err := nc.ReportUptime(ctx, n.ID, ledger.Uptime{BootID: "b", At: time.Now()}); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, n.ID)
	}
	return ids
}

func TestPlacer_Policies(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "lab", SupervisorURL: "http://127.0.0.1:1"})
	ids := registerNodes(t, l, []int{2, 4, 8}, []bool{true, true, false})
	ctx := context.Background()
	lc := &ledger.Client{BaseURL: l.URL}
	one := envelope.Resources{CPU: 1, MemoryMB: 256}

	spread := newPlacer(lc, PlaceSpread, time.Now)
	// The 8-CPU node never reported: it is offline and never chosen.
	var got []string
	for i := 0; i < 4; i++ {
		n, err := spread.place(ctx, "lab", "j"+itoa(i), one)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, n)
	}
	// Spread: 4-CPU node (4 free), then 4-CPU (3 free) vs 2 → still the
	// 4-CPU one until they tie at 2, then the lower ID among equals.
	if got[0] != ids[1] || got[1] != ids[1] {
		t.Errorf("spread placed on %v; want the 4-CPU node %s first", got, ids[1])
	}
	for _, n := range got {
		if n == ids[2] {
			t.Errorf("an offline node was chosen: %v", got)
		}
	}
	// Resubmitting a placed job keeps its placement.
	if n, _ := spread.place(ctx, "lab", "j0", one); n != got[0] {
		t.Errorf("resubmitted j0 placed on %s, was %s", n, got[0])
	}
	// Fill the site: 6 online CPUs, 4 reserved; 2 more fit, a third does not.
	spread.place(ctx, "lab", "x1", one)
	spread.place(ctx, "lab", "x2", one)
	_, err := spread.place(ctx, "lab", "x3", one)
	if err == nil || !strings.Contains(err.Error(), "free CPUs") || !strings.Contains(err.Error(), "offline") {
		t.Errorf("placing on a full site = %v, want a reason per node", err)
	}
	// A release frees room again.
	spread.release("x2")
	spread.release("x2")
	if _, err := spread.place(ctx, "lab", "x3", one); err != nil {
		t.Errorf("after a release: %v", err)
	}

	binpack := newPlacer(lc, PlaceBinpack, time.Now)
	first, _ := binpack.place(ctx, "lab", "b1", one)
	second, _ := binpack.place(ctx, "lab", "b2", one)
	if first != ids[0] || second != ids[0] {
		t.Errorf("binpack placed on %s, %s; want the smallest node %s twice", first, second, ids[0])
	}
	if third, _ := binpack.place(ctx, "lab", "b3", one); third != ids[1] {
		t.Errorf("binpack's third job on %s, want %s once the small node is full", third, ids[1])
	}
	if _, err := binpack.place(ctx, "nosuch", "z", one); err == nil || !strings.Contains(err.Error(), "no registered nodes") {
		t.Errorf("placing on a site without nodes = %v", err)
	}
}

func itoa(i int) string { return string(rune('0' + i)) }
