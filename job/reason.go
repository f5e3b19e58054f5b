package job

import "net/http"

// Reason says why a job was refused, failed or is tried again: one closed
// list for every service (coord, the supervisor, the runner, the CLI),
// stable strings that appear in job records, events, API errors and metric
// labels. If you add a value, add it to reasons below, which says its HTTP
// status and whether it is final.
type Reason string

// Why a job was refused before it ran (the supervisor's or coord's
// verdict, or the runner's own check of what it was given).
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
	ReasonSecretInvalid   Reason = "secret_invalid"   // a sealed secret does not open for this job
)

// How a run ended when it failed.
const (
	ReasonScriptError    Reason = "script_error"     // the script failed (a runtime error, job.fail)
	ReasonTimeout        Reason = "timeout"          // the run passed the job's timeout
	ReasonAllocLimit     Reason = "alloc_limit"      // too many objects, or one value too large
	ReasonMemoryLimit    Reason = "memory_limit"     // the run held more memory than allowed
	ReasonStackOverflow  Reason = "stack_overflow"   // a value that contains itself, or nesting too deep
	ReasonCycle          Reason = "cycle"            // job.result was given a value that contains itself
	ReasonResultTooLarge Reason = "result_too_large" // job.result over its limit
	ReasonResultInvalid  Reason = "result_invalid"   // job.result not JSON
	ReasonSandboxFailed  Reason = "sandbox_failed"   // the sandbox process died some other way
	ReasonPanic          Reason = "panic"            // the runner's own code panicked on the job
	ReasonCancelled      Reason = "cancelled"        // cancelled by its owner or an admin
	ReasonRunnerLost     Reason = "runner_lost"      // its runner stopped mid-run and no retries were left
)

// Why a job could not be judged or run now, and is tried again.
const (
	ReasonLedgerUnavailable Reason = "ledger_unavailable" // the ledger could not be reached
	ReasonRedisUnavailable  Reason = "redis_unavailable"  // the site's or coord's Redis could not be reached
	ReasonTransient         Reason = "transient"          // a host layer this node lacks, or a passing failure
	ReasonShutdown          Reason = "shutdown"           // the runner stopped during the run
	ReasonNodeRevoked       Reason = "node_revoked"       // the node was revoked: another node runs it
	ReasonSecretSealed      Reason = "secret_sealed"      // sealed to other nodes: one of them runs it
)

// reasonInfo is what each reason means to whoever answers with it.
type reasonInfo struct {
	status int  // the HTTP status of a refusal with this reason
	retry  bool // not final: the same job may be judged or run again later
}

// reasons is the closed list: every Reason constant above, once.
var reasons = map[Reason]reasonInfo{
	ReasonMalformed:       {http.StatusBadRequest, false},
	ReasonTooLarge:        {http.StatusRequestEntityTooLarge, false},
	ReasonPayloadType:     {http.StatusBadRequest, false},
	ReasonInvalidJob:      {http.StatusBadRequest, false},
	ReasonExpired:         {http.StatusUnprocessableEntity, false},
	ReasonNotYetValid:     {http.StatusUnprocessableEntity, false},
	ReasonNoSignature:     {http.StatusForbidden, false},
	ReasonBadSignature:    {http.StatusForbidden, false},
	ReasonUnknownKey:      {http.StatusForbidden, false},
	ReasonRevokedKey:      {http.StatusForbidden, false},
	ReasonRoleNotAllowed:  {http.StatusForbidden, false},
	ReasonBelowThreshold:  {http.StatusForbidden, false},
	ReasonWrongSite:       {http.StatusUnprocessableEntity, false},
	ReasonWrongNode:       {http.StatusUnprocessableEntity, false},
	ReasonIDMismatch:      {http.StatusForbidden, false},
	ReasonReplayed:        {http.StatusConflict, false},
	ReasonScriptInvalid:   {http.StatusUnprocessableEntity, false},
	ReasonForbiddenImport: {http.StatusUnprocessableEntity, false},
	ReasonTooComplex:      {http.StatusUnprocessableEntity, false},
	ReasonNoCapacity:      {http.StatusForbidden, false},
	ReasonBadInput:        {http.StatusForbidden, false},
	ReasonSecretInvalid:   {http.StatusForbidden, false},

	ReasonScriptError:    {http.StatusUnprocessableEntity, false},
	ReasonTimeout:        {http.StatusUnprocessableEntity, false},
	ReasonAllocLimit:     {http.StatusUnprocessableEntity, false},
	ReasonMemoryLimit:    {http.StatusUnprocessableEntity, false},
	ReasonStackOverflow:  {http.StatusUnprocessableEntity, false},
	ReasonCycle:          {http.StatusUnprocessableEntity, false},
	ReasonResultTooLarge: {http.StatusUnprocessableEntity, false},
	ReasonResultInvalid:  {http.StatusUnprocessableEntity, false},
	ReasonSandboxFailed:  {http.StatusInternalServerError, false},
	ReasonPanic:          {http.StatusInternalServerError, false},
	ReasonCancelled:      {http.StatusConflict, false},
	ReasonRunnerLost:     {http.StatusInternalServerError, false},

	ReasonLedgerUnavailable: {http.StatusServiceUnavailable, true},
	ReasonRedisUnavailable:  {http.StatusServiceUnavailable, true},
	ReasonTransient:         {http.StatusServiceUnavailable, true},
	ReasonShutdown:          {http.StatusServiceUnavailable, true},
	ReasonNodeRevoked:       {http.StatusServiceUnavailable, true},
	ReasonSecretSealed:      {http.StatusServiceUnavailable, true},
}

// String is the reason's stable name.
func (r Reason) String() string { return string(r) }

// Known reports whether r is one of the list.
func (r Reason) Known() bool { _, ok := reasons[r]; return ok }

// Status is the HTTP status of a refusal with reason r: the one place it
// is decided. An unknown reason is 403 (refused, for a reason this build
// does not name).
func (r Reason) Status() int {
	if i, ok := reasons[r]; ok {
		return i.status
	}
	return http.StatusForbidden
}

// Retry reports whether r is passing: the job may be judged or run again.
func (r Reason) Retry() bool { return reasons[r].retry }

// Reasons returns every reason of the list (for documentation and tests).
func Reasons() []Reason {
	out := make([]Reason, 0, len(reasons))
	for r := range reasons {
		out = append(out, r)
	}
	return out
}
