package queue

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
)

// TestSiteFlows_Expand: a worker is handed a step task with the flow it
// names put back; one whose flow the site does not keep goes as it is
// (the runner refuses it, saying why); a kept envelope that is another
// flow's is not handed over.
func TestSiteFlows_Expand(t *testing.T) {
	r, err := Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	k, _ := keys.Generate("t")
	sign := func(name string) ([]byte, string) {
		fl := envelope.NewFlow(name, "s", time.Now())
		fl.Steps = []envelope.Step{{Name: "a", Script: "x := 1"}}
		env, err := fl.Sign(k)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := json.Marshal(env)
		return raw, env.ID()
	}
	raw, id := sign("one")
	other, otherID := sign("two")
	exp := time.Now().Add(time.Hour)
	if err := r.StoreSiteFlows(ctx, "s", map[string]SiteFlow{id: {Envelope: raw, Expires: exp}, strings.Repeat("e", 64): {Envelope: other, Expires: exp}}); err != nil {
		t.Fatal(err)
	}
	// Kept once: a second store leaves it as it is.
	if err := r.StoreSiteFlows(ctx, "s", map[string]SiteFlow{id: {Envelope: []byte("{}"), Expires: exp}}); err != nil {
		t.Fatal(err)
	}
	if ttl := r.rdb.TTL(ctx, siteFlowKey("s", id)).Val(); ttl < 90*time.Minute || ttl > 2*time.Hour {
		t.Errorf("the kept flow lives %s, want until its expiry and an hour", ttl)
	}
	cache := &flowCache{}
	task := func(ref string) []byte { return []byte(`{"flow_ref":"` + ref + `","step":"a","item":0,"attempt":1}`) }
	got, err := r.expandFlow(ctx, cache, "s", task(id))
	var m map[string]json.RawMessage
	if err != nil || json.Unmarshal(got, &m) != nil || string(m["flow"]) != string(raw) || m["flow_ref"] != nil || string(m["step"]) != `"a"` {
		t.Fatalf("expanded = %s, %v", got, err)
	}
	if cache.get(id) == nil {
		t.Error("the flow was not cached")
	}
	missing := task(strings.Repeat("0", 64))
	if got, err := r.expandFlow(ctx, cache, "s", missing); err != nil || string(got) != string(missing) {
		t.Errorf("a flow the site does not keep: %s, %v", got, err)
	}
	if _, err := r.expandFlow(ctx, cache, "s", task(strings.Repeat("e", 64))); err == nil {
		t.Errorf("another flow's envelope (%s) was handed over", otherID[:8])
	}
	for _, p := range []string{`{"payloadType":"x","payload":"","signatures":[]}`, `{"flow":{},"flow_ref":"x"}`, `not json`} {
		if got, err := r.expandFlow(ctx, cache, "s", []byte(p)); err != nil || string(got) != p {
			t.Errorf("%s changed: %s, %v", p, got, err)
		}
	}
}
