// Package e2e tests a writ fleet end to end: the real writ binary, started
// as separate processes (ledger, supervisor, coord, runners), over real HTTP,
// on a real redis-server. It has tests only.
package e2e
