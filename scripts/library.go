package scripts

import (
	"embed"
	"fmt"
)

// library holds scripts/lib: the ready-made scripts, in the binary too, so
// the CLI's own jobs (writ vm ls, …) are Tengo files a reader can find.
//
//go:embed lib/*.tengo
var library embed.FS

// Library returns the source of scripts/lib/NAME (e.g. "vm_list.tengo").
func Library(name string) (string, error) {
	b, err := library.ReadFile("lib/" + name)
	if err != nil {
		return "", fmt.Errorf("scripts: no library script %q", name)
	}
	return string(b), nil
}
