// Package verify is the one check of a signed job. coord runs it before it
// routes a job, the supervisor before it enqueues one, and the runner again
// before it runs one (neither coord, Redis nor the network is trusted to
// carry a job unaltered), so the three cannot disagree about a job.
//
// Job decodes the envelope strictly, checks it is for the site (and node)
// doing the check and inside its validity window, and authorizes its
// signatures against the site's keys and policy from the ledger. Every
// outcome has one rule:
//
//   - accepted: a *Checked with the job and the users who signed it;
//   - refused: an *envelope.Error whose reason says why (malformed,
//     wrong_site, expired, unknown_key, below_threshold, …). Refusals are
//     final: the same bytes are refused again, anywhere. A site the ledger
//     does not know (HTTP 404) is refused as wrong_site;
//   - not judged: an error wrapping ErrUnavailable (the ledger could not be
//     reached and no usable snapshot was at hand). Try again later.
package verify

import (
	"context"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/ledger"
)

// ErrUnavailable marks a check that could not be finished for a passing
// reason; the job was not judged.
var ErrUnavailable = errors.New("ledger unavailable")

// TrustSource gives a site's trust snapshot; *ledger.TrustCache is one.
// keyIDs are the signatures' key IDs, so a key the snapshot does not know
// yet can refresh it. A site the ledger does not know is an error for which
// ledger.NotFound is true.
type TrustSource interface {
	Get(ctx context.Context, site string, keyIDs ...string) (*ledger.Trust, error)
}

var _ TrustSource = (*ledger.TrustCache)(nil)

// Target is who is checking: the job must be theirs to take.
type Target struct {
	// Site is the site the checker serves (coord: the site it routes to).
	// A job for another site is refused unless it allows any site.
	Site string
	// Node, when set, is the node that would run the job: a job pinned to
	// another node is refused.
	Node string
	// ID, when set, is the job ID the carrier claims (a queue task's ID):
	// an envelope with another ID was swapped in transit.
	ID string
	// Nodes, when set, has a flow step's inputs checked against the
	// signatures of the nodes that made them (a runner sets it; the
	// supervisor, which runs nothing, does not).
	Nodes NodeSource
	// UnsignedInputs accepts an input that no node signed (a runner of a
	// fleet whose runners have no node keys); a signature carried is still
	// checked.
	UnsignedInputs bool
}

// NodeSource looks up a registered node (*ledger.NodeCache).
type NodeSource interface {
	Node(ctx context.Context, id string) (*ledger.Node, error)
}

// Checked is an accepted job.
type Checked struct {
	ID       string
	Envelope *envelope.Envelope
	Job      *envelope.Job
	// Signers are the distinct users whose signatures counted, in the
	// order of their first such signature.
	Signers []string
	// Owner is the job's tenant: the user of the first signature that
	// counted (the author; later signatures approve). What the job makes
	// on a node is Owner's.
	Owner string
	// Admin: Owner is an admin of the site, so the job may see every
	// tenant's resources and act for another owner by naming it.
	Admin bool
	// ScriptMemory is the site's cap on what the job's script may hold
	// (ledger.Site.ScriptMemory; 0: the runner's own).
	ScriptMemory int64
}

// Job checks raw against t at time now (see the package doc for the
// outcomes). The returned ID is the envelope's job ID whenever raw is a
// DSSE envelope at all, also when the job is refused, so refusals can be
// recorded against it; it is "" otherwise.
func Job(ctx context.Context, trust TrustSource, raw []byte, t Target, now time.Time) (id string, c *Checked, err error) {
	env, err := envelope.Decode(raw)
	if err != nil {
		return "", nil, err
	}
	id = env.ID()
	c, err = check(ctx, trust, env, t, now)
	return id, c, err
}

// Envelope is Job for an envelope already decoded, and spec its job as
// env.Job returned it (nil: Envelope decodes it).
func Envelope(ctx context.Context, trust TrustSource, env *envelope.Envelope, spec *envelope.Job, t Target, now time.Time) (*Checked, error) {
	if spec == nil {
		var err error
		if spec, err = env.Job(); err != nil {
			return nil, err
		}
	}
	return checkJob(ctx, trust, env, spec, t, now)
}

func check(ctx context.Context, trust TrustSource, env *envelope.Envelope, t Target, now time.Time) (*Checked, error) {
	spec, err := env.Job()
	if err != nil {
		return nil, err
	}
	return checkJob(ctx, trust, env, spec, t, now)
}

func checkJob(ctx context.Context, trust TrustSource, env *envelope.Envelope, spec *envelope.Job, t Target, now time.Time) (*Checked, error) {
	id := env.ID()
	if len(env.Signatures) == 0 {
		return nil, envelope.Refuse(job.ReasonNoSignature, "envelope carries no signatures")
	}
	if t.ID != "" && t.ID != id {
		return nil, envelope.Refuse(job.ReasonIDMismatch, fmt.Sprintf("the carrier says job %s but the envelope is job %s: it was altered or swapped in transit", t.ID, id))
	}
	switch {
	case spec.AnySite:
		// Any site whose policy the signers satisfy: the policy check
		// below decides.
	case spec.Site == "":
		return nil, envelope.Refuse(job.ReasonWrongSite, fmt.Sprintf("job names no site (it pins node %s); name the node's site too", spec.Node))
	case spec.Site != t.Site:
		return nil, envelope.Refuse(job.ReasonWrongSite, fmt.Sprintf("job is for site %q, not %q", spec.Site, t.Site))
	}
	if t.Node != "" && spec.Node != "" && spec.Node != t.Node {
		return nil, envelope.Refuse(job.ReasonWrongNode, fmt.Sprintf("job is pinned to node %q, not %q", spec.Node, t.Node))
	}
	if err := spec.CheckTime(now); err != nil {
		return nil, err
	}
	keyIDs := make([]string, len(env.Signatures))
	for i, s := range env.Signatures {
		keyIDs[i] = s.KeyID
	}
	c, err := authorize(ctx, trust, env, spec, t.Site, keyIDs)
	if err != nil {
		return nil, err
	}
	c.ID = id
	return c, nil
}

// authorize checks env's signatures against site's keys and policy.
func authorize(ctx context.Context, trust TrustSource, env *envelope.Envelope, spec *envelope.Job, site string, keyIDs []string) (*Checked, error) {
	snap, err := trust.Get(ctx, site, keyIDs...)
	if ledger.NotFound(err) {
		return nil, envelope.Refuse(job.ReasonWrongSite, "site "+site+" is not registered in the ledger")
	}
	if err != nil {
		// Anything else (unreachable, a 5xx, a cancelled request) says
		// nothing about the job.
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	signers, err := snap.Authorize(env)
	if err != nil {
		return nil, err
	}
	return &Checked{Envelope: env, Job: spec, Signers: signers, Owner: signers[0], Admin: snap.RoleOf(signers[0]) == ledger.RoleAdmin, ScriptMemory: snap.Site.ScriptMemory}, nil
}

// Reason is the reason of a Job error: the refusal's reason, or
// job.ReasonLedgerUnavailable.
func Reason(err error) job.Reason {
	if errors.Is(err, ErrUnavailable) {
		return job.ReasonLedgerUnavailable
	}
	return envelope.ReasonOf(err)
}

// Retry reports whether a Job error means "not judged, try again later".
func Retry(err error) bool { return errors.Is(err, ErrUnavailable) }

// CheckedFlow is an accepted flow.
type CheckedFlow struct {
	ID   string
	Flow *envelope.Flow
	// Signers are the distinct users whose signatures counted at the
	// flow's first site, in the order of their first such signature.
	Signers []string
}

// Flow is the one check of a submitted flow (coord's, before anything of
// it runs; each step is judged again by StepJob at its site): a flow
// envelope with signatures, within its validity window, whose signatures
// satisfy the policy of every site its steps run on. fl is env's flow as
// env.Flow returned it (nil: Flow decodes it). A site the ledger does not
// know is wrong_site, as for a job; a ledger that cannot be reached
// returns an error wrapping ErrUnavailable.
func Flow(ctx context.Context, trust TrustSource, env *envelope.Envelope, fl *envelope.Flow, now time.Time) (*CheckedFlow, error) {
	if fl == nil {
		var err error
		if fl, err = env.Flow(); err != nil {
			return nil, err
		}
	}
	if len(env.Signatures) == 0 {
		return nil, envelope.Refuse(job.ReasonNoSignature, "envelope carries no signatures")
	}
	if err := fl.CheckTime(now); err != nil {
		return nil, err
	}
	keyIDs := make([]string, len(env.Signatures))
	for i, s := range env.Signatures {
		keyIDs[i] = s.KeyID
	}
	out := &CheckedFlow{ID: env.ID(), Flow: fl}
	for _, site := range fl.Sites() {
		snap, err := trust.Get(ctx, site, keyIDs...)
		if ledger.NotFound(err) {
			return nil, envelope.Refuse(job.ReasonWrongSite, "site "+site+" is not registered in the ledger")
		}
		if err != nil {
			return nil, fmt.Errorf("%w: site %s: %v", ErrUnavailable, site, err)
		}
		signers, err := snap.Authorize(env)
		if err != nil {
			return nil, fmt.Errorf("site %s: %w", site, err)
		}
		if out.Signers == nil {
			out.Signers = signers
		}
	}
	return out, nil
}
