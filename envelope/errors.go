package envelope

import "errors"

// Reason classifies why a job was refused. Reasons are stable strings: they
// appear in job states, API errors and metric labels.
type Reason string

// The reasons a job can be refused.
const (
	ReasonMalformed       Reason = "malformed"        // not valid JSON / base64 / job schema
	ReasonTooLarge        Reason = "too_large"        // over a size limit
	ReasonPayloadType     Reason = "payload_type"     // not a writ job envelope
	ReasonInvalidJob      Reason = "invalid_job"      // a field is missing or out of range
	ReasonExpired         Reason = "expired"          // past its expires time
	ReasonNotYetValid     Reason = "not_yet_valid"    // before its not_before time
	ReasonNoSignature     Reason = "no_signature"     // no signatures at all
	ReasonBadSignature    Reason = "bad_signature"    // a signature does not verify
	ReasonUnknownKey      Reason = "unknown_key"      // signed by a key the ledger does not know
	ReasonRevokedKey      Reason = "revoked_key"      // signed by a revoked key
	ReasonRoleNotAllowed  Reason = "role_not_allowed" // signer's role may not sign for the site
	ReasonBelowThreshold  Reason = "below_threshold"  // fewer valid signers than the site requires
	ReasonWrongSite       Reason = "wrong_site"       // job names another site, or an unknown one
	ReasonWrongNode       Reason = "wrong_node"       // job is pinned to another node
	ReasonIDMismatch      Reason = "id_mismatch"      // the carrier's job ID is not the envelope's (swapped in transit)
	ReasonReplayed        Reason = "replayed"         // nonce already used by another job
	ReasonScriptInvalid   Reason = "script_invalid"   // script does not compile
	ReasonForbiddenImport Reason = "forbidden_import" // script imports a module outside the sandbox
	ReasonTooComplex      Reason = "too_complex"      // script passes a compile limit (nesting, globals)
	ReasonNoCapacity      Reason = "no_capacity"      // no node of the site has the resources the job needs
	ReasonBadInput        Reason = "bad_input"        // a flow step's input is not what a node of its site signed
)

// Error is a refusal with a machine-readable reason and a message a person can
// act on.
type Error struct {
	Reason Reason
	Msg    string
}

func (e *Error) Error() string { return string(e.Reason) + ": " + e.Msg }

// Is lets errors.Is match on the reason: errors.Is(err, &Error{Reason: R}).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Reason == e.Reason && (t.Msg == "" || t.Msg == e.Msg)
}

// ReasonOf returns the reason of err, or "" when err is not a refusal.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

// Refuse returns an *Error.
func Refuse(r Reason, msg string) error { return &Error{Reason: r, Msg: msg} }
