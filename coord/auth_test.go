package coord

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

// TestCoord_WhoReadsWhat: every call is signed by a known user; a user
// reads the jobs it signed, a site's viewers read the site's, nobody else
// reads anything (another's job is 404, as if it did not exist); a
// stranger's envelope leaves no record; a copy with a bad signature sent
// first does not make the real job look refused; streams are bounded per
// user.
func TestCoord_WhoReadsWhat(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fs := &fakeSupervisor{judge: func(j *envelope.Job) job.Verdict { return job.Verdict{State: job.VerdictQueued} }}
	sup := httptest.NewServer(fs)
	defer sup.Close()
	l := testenv.NewLedger(t, ledger.Site{Name: "s", SupervisorURL: sup.URL})
	admc := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	if err := admc.PutSite(ctx, ledger.Site{Name: "t", SupervisorURL: sup.URL, Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
		t.Fatal(err)
	}
	user := func(name string, roles map[string]string) *keys.Key {
		k, _ := keys.Generate(name)
		if _, err := admc.CreateUser(ctx, ledger.CreateUserRequest{Name: name, Roles: roles, PublicKeys: []string{k.AuthorizedKey()}}); err != nil {
			t.Fatal(err)
		}
		return k
	}
	alice := user("alice", map[string]string{"s": "deployer"})
	bob := user("bob", map[string]string{"s": "deployer"})
	viewer := user("vera", map[string]string{"s": "viewer"})
	other := user("otto", map[string]string{"t": "viewer"})
	stranger, _ := keys.Generate("stranger")

	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	lc := &ledger.Client{BaseURL: l.URL}
	c, err := New(Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), StreamsPerUser: 2})
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan struct{})
	go func() { c.Run(ctx); close(runDone) }()
	defer func() { cancel(); <-runDone }()
	hs := httptest.NewServer(c.Handler())
	defer hs.Close()
	as := func(k *keys.Key) *Client { return &Client{BaseURL: hs.URL, Key: k} }

	sign := func(k *keys.Key, name string) []byte {
		j := envelope.NewJob(name, "x := 1", "s", time.Now())
		env, _ := j.Sign(k)
		raw, _ := json.Marshal(env)
		return raw
	}
	// Unsigned: refused, reads and submissions alike.
	for _, path := range []string{"/v1/jobs", "/v1/jobs/x", "/v1/jobs/x/events"} {
		resp, err := http.Get(hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("unsigned GET %s = %d, want 401", path, resp.StatusCode)
		}
	}
	if _, err := (&Client{BaseURL: hs.URL}).Submit(ctx, sign(alice, "unsigned")); err == nil || !strings.Contains(err.Error(), "unauthenticated") {
		t.Errorf("unsigned submit = %v, want unauthenticated", err)
	}
	// A key the ledger does not know signs nothing coord answers.
	if _, err := as(stranger).Jobs(ctx, queue.ListFilter{}); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("stranger's list = %v, want 401", err)
	}

	rep, err := as(alice).Submit(ctx, sign(alice, "alices"))
	if err != nil {
		t.Fatal(err)
	}
	id := rep.ID
	if _, err := as(alice).Job(ctx, id, 0); err != nil {
		t.Errorf("alice reads her job: %v", err)
	}
	if _, err := as(viewer).Job(ctx, id, 0); err != nil {
		t.Errorf("a viewer of site s reads its job: %v", err)
	}
	if _, err := as(l.Admin).Job(ctx, id, 0); err != nil {
		t.Errorf("an admin reads every job: %v", err)
	}
	for name, k := range map[string]*keys.Key{"bob (deployer, not a signer)": bob, "otto (another site's viewer)": other} {
		// bob is a deployer of the site too: site roles decide, and a
		// deployer reads the site's jobs. otto is nobody on site s.
		_, err := as(k).Job(ctx, id, 0)
		if k == bob {
			if err != nil {
				t.Errorf("%s reads the site's job: %v", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), "404") {
			t.Errorf("%s reads alice's job: %v, want 404", name, err)
		}
		lst, err := as(k).Jobs(ctx, queue.ListFilter{})
		if err != nil || len(lst.Jobs) != 0 {
			t.Errorf("%s lists %d jobs (%v), want none", name, len(lst.Jobs), err)
		}
		if err := as(k).Watch(ctx, id, func(job.Event) bool { return true }); err == nil {
			t.Errorf("%s watches alice's job", name)
		}
	}
	if lst, err := as(viewer).Jobs(ctx, queue.ListFilter{}); err != nil || len(lst.Jobs) != 1 {
		t.Errorf("viewer lists %+v, %v; want alice's job", lst.Jobs, err)
	}

	// A stranger's envelope, and a copy of a real job with its signature
	// forged, leave no record; the real job then runs.
	strangerJob := sign(stranger, "strangers")
	var re *RejectedError
	if _, err := as(bob).Submit(ctx, strangerJob); !errors.As(err, &re) || re.Reply.Reason != job.ReasonUnknownKey {
		t.Fatalf("stranger's envelope = %v", err)
	}
	if _, err := as(l.Admin).Job(ctx, re.Reply.ID, 0); err == nil {
		t.Errorf("coord kept a record of a stranger's envelope")
	}
	real := sign(alice, "real")
	var env envelope.Envelope
	json.Unmarshal(real, &env)
	forged := env
	forged.Signatures = append([]envelope.Signature(nil), env.Signatures...)
	forged.Signatures[0].Sig = make([]byte, 64)
	forgedRaw, _ := json.Marshal(forged)
	if _, err := as(bob).Submit(ctx, forgedRaw); !errors.As(err, &re) {
		t.Fatalf("forged copy = %v, want rejected", err)
	}
	if rep, err := as(alice).Submit(ctx, real); err != nil || rep.State != "queued" {
		t.Errorf("the real job after a forged copy = %+v, %v; want queued", rep, err)
	}

	// Streams are bounded per user: two waits open (the job stays queued:
	// no runner), the third is refused.
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	started := make(chan struct{}, 2)
	for range 2 {
		go func() {
			started <- struct{}{}
			as(alice).Job(wctx, id, time.Minute)
		}()
	}
	<-started
	<-started
	testenv.WaitFor(t, 10*time.Second, "alice's two waits", func() bool {
		c.auth.mu.Lock()
		defer c.auth.mu.Unlock()
		return c.auth.streams["alice"] == 2
	})
	if _, err := as(alice).Job(ctx, id, time.Minute); err == nil || !strings.Contains(err.Error(), "429") {
		t.Errorf("a third wait = %v, want 429", err)
	}
	if err := as(alice).Watch(ctx, id, func(job.Event) bool { return true }); err == nil || !strings.Contains(err.Error(), "429") {
		t.Errorf("a stream past the limit = %v, want 429", err)
	}
	if _, err := as(bob).Job(ctx, id, 0); err != nil {
		t.Errorf("another user is not limited by alice's streams: %v", err)
	}

	// A request signed for another server is refused: a coord that knows
	// its own names (its certificate's) takes none addressed elsewhere.
	named, err := New(Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Authorities: []string{"coord.example.net"}})
	if err != nil {
		t.Fatal(err)
	}
	hn := httptest.NewServer(named.Handler())
	defer hn.Close()
	if _, err := (&Client{BaseURL: hn.URL, Key: alice}).Jobs(ctx, queue.ListFilter{}); err == nil || !strings.Contains(err.Error(), "not this server") {
		t.Errorf("a request addressed to %s at a coord named coord.example.net = %v, want refused", hn.URL, err)
	}
}

// TestAuth_LedgerAway: while the ledger cannot be reached, a key coord
// already knows keeps working for the stale grace (as trust snapshots do),
// and a key it does not know is answered 503, to be tried again, not 401.
func TestAuth_LedgerAway(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "s", SupervisorURL: "https://127.0.0.1:1"})
	admc := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	other, _ := keys.Generate("other")
	if _, err := admc.CreateUser(context.Background(), ledger.CreateUserRequest{Name: "other", Roles: map[string]string{"s": "viewer"}, PublicKeys: []string{other.AuthorizedKey()}}); err != nil {
		t.Fatal(err)
	}
	clock := testenv.NewClock()
	a := newAuth(&ledger.Client{BaseURL: l.URL}, clock.Now, 0, nil)
	h := a.middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(principalOf(r.Context()).user))
	}))
	get := func(k *keys.Key) (int, string) {
		r := httptest.NewRequest(http.MethodGet, "http://coord/v1/jobs", nil)
		if err := httpsig.Sign(r, nil, k.ID, k.Private, clock.Now()); err != nil {
			t.Fatal(err)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w.Code, w.Body.String()
	}
	if code, body := get(l.Admin); code != http.StatusOK || body != "root" {
		t.Fatalf("with the ledger up: %d %s", code, body)
	}
	l.Server.Close()
	clock.Add(principalTTL + time.Second)
	if code, body := get(l.Admin); code != http.StatusOK || body != "root" {
		t.Errorf("a known key with the ledger away = %d %s, want 200", code, body)
	}
	if code, body := get(other); code != http.StatusServiceUnavailable || !strings.Contains(body, "ledger_unreachable") {
		t.Errorf("an unknown key with the ledger away = %d %s, want 503 ledger_unreachable", code, body)
	}
	clock.Add(ledger.DefaultStaleGrace)
	if code, _ := get(l.Admin); code != http.StatusServiceUnavailable {
		t.Errorf("a known key past the stale grace = %d, want 503", code)
	}
}
