package envelope

import (
	"errors"

	"github.com/writ-fleet/writ/job"
)

// Error is a refusal with a machine-readable reason and a message a person can
// act on.
type Error struct {
	Reason job.Reason
	Msg    string
}

func (e *Error) Error() string { return string(e.Reason) + ": " + e.Msg }

// Is lets errors.Is match on the reason: errors.Is(err, &Error{Reason: R}).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Reason == e.Reason && (t.Msg == "" || t.Msg == e.Msg)
}

// ReasonOf returns the reason of err, or "" when err is not a refusal.
func ReasonOf(err error) job.Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

// Refuse returns an *Error.
func Refuse(r job.Reason, msg string) error { return &Error{Reason: r, Msg: msg} }
