#!/bin/sh
# Regenerates api.gen.go, the cloud-hypervisor API client, from the reference
# copy of cloud-hypervisor's OpenAPI spec (shared/reference/cloud-hypervisor,
# beside the repository) with oapi-codegen. Without the spec at hand it keeps
# the committed client. Run by `go generate` (make generate).
set -eu
spec="${CH_SPEC:-../../../../shared/reference/cloud-hypervisor/cloud-hypervisor.yaml}"
commit=ae44c2971c83dd2b1bd704fa81102ec0dec4e7d4
want=a0772f45ccd007f18a431d303d19a1d31f515f254d55f500509d4d7c25515f10
if [ ! -f "$spec" ]; then
	echo "gen.sh: $spec not found; keeping the committed api.gen.go" >&2
	exit 0
fi
got=$(sha256sum "$spec" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
	echo "gen.sh: $spec has sha256 $got, not $want: update commit= and want= here for a new spec" >&2
	exit 1
fi
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
go tool oapi-codegen -config oapi-codegen.yaml "$spec" > "$tmp"
{
	grep '^// Code generated .* DO NOT EDIT\.$' "$tmp"
	echo "//"
	echo "// Client for the cloud-hypervisor REST API, generated from"
	echo "// vmm/src/api/openapi/cloud-hypervisor.yaml of cloud-hypervisor"
	echo "// (https://github.com/cloud-hypervisor/cloud-hypervisor),"
	echo "// commit $commit,"
	echo "// spec sha256 $want."
	echo "// The spec is licensed under the Apache License 2.0, and so is this file,"
	echo "// which is derived from it. Regenerate with gen.sh (go generate)."
	echo
	sed -n '/^package /,$p' "$tmp"
} > api.gen.go
