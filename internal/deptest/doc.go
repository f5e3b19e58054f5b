// Package deptest holds the tests that keep writ's layering honest: who may
// import whom (docs/ARCHITECTURE.md), and that every package has a doc
// comment. It has no code of its own.
package deptest
