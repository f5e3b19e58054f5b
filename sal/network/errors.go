package network

import "errors"

// Errors callers can test for with errors.Is.
var (
	// ErrExhausted: the network's subnet has no free address left.
	ErrExhausted = errors.New("no free address")
	// ErrInvalidName: a network name outside [a-z0-9][a-z0-9_.-]{0,62}.
	ErrInvalidName = errors.New("invalid name")
	// ErrInvalid: a bad subnet, port, protocol or address.
	ErrInvalid = errors.New("invalid")
	// ErrNotFound: no writ network of that name on this host.
	ErrNotFound = errors.New("no such network")
	// ErrConflict: the request contradicts what exists (another subnet for
	// the same name, overlapping subnets, a host port already forwarded).
	ErrConflict = errors.New("conflict")
	// ErrInUse: the network still has interfaces attached.
	ErrInUse = errors.New("in use")
)
