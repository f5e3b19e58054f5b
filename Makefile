# writ — run `make help` for the targets.

SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN := bin/writ
DEV_DIR ?= .dev
# System packages the tests and `writ dev` need.
# qemu-system-x86 runs VMs; busybox-static and apt's kernel package make the
# test and demo guest (internal/guest); the ledger tests run on PostgreSQL too;
# ovmf, systemd-boot-efi, binutils (objcopy) and ipxe-qemu build and boot the node image (efi).
APT_PACKAGES := redis-server curl openssh-client btrfs-progs qemu-system-x86 busybox-static postgresql ovmf systemd-boot-efi binutils ipxe-qemu gcc libc6-dev

.PHONY: help build static image test test-short dev bench bench-scale bench-image bench-vm bench-ledger bench-ledger-pg chaos guest fuzz lint generate tidy deps check-clean clean

# FUZZ_EXECS is how many executions make fuzz gives each target.
FUZZ_EXECS ?= 1000000

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install missing system packages (apt; as root), or print the command
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "missing system packages:$$missing"; \
		echo "run:  sudo apt-get update && sudo apt-get install -y$$missing"; exit 1; \
	fi

build: ## build bin/writ with the version stamped
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/writ

test: deps ## run every test with -race (privileged and slow ones included), then check generate/tidy leave no diff
	$(GO) test -race -count=1 -timeout 30m ./...
	@$(MAKE) --no-print-directory check-clean

test-short: deps ## quick loop: skip the slow tests
	$(GO) test -race -short -count=1 ./...

dev: deps build ## run a whole fleet on this machine and a sample signed job (Ctrl-C stops it)
	$(BIN) dev --dir $(DEV_DIR) --sample scripts/lib/hello.tengo

bench: deps ## end-to-end signed-job throughput and latency next to raw asynq (see BENCHMARKS.md)
	$(GO) run ./cmd/writ-bench

static: ## build bin/writ-static, linked statically (the node image's /init)
	$(GO) build -tags netgo,osusergo -ldflags '$(LDFLAGS) -s -w -linkmode external -extldflags "-static"' -o bin/writ-static ./cmd/writ

image: deps static build ## build the node image into image/ (set LEDGER, SITE, TOKEN, REDIS to bake in a site)
	$(BIN) image build --writ bin/writ-static --out image --ledger "$(LEDGER)" --site "$(SITE)" --token "$(TOKEN)" --redis "$(REDIS)"

bench-image: deps ## boot the node image from USB under TCG, alone, and print boot-to-registered (root; see BENCHMARKS.md)
	$(GO) test -count=1 -run 'TestImage_BootUSB' -v ./e2e | grep -E 'power-on|kernel started|bytes'

bench-vm: deps ## VM deploy: writ against the same QEMU guest launched by hand (root; see BENCHMARKS.md)
	$(GO) test -run '^$$' -bench Deploy -benchtime 3x ./sal/vm/qemu/

bench-scale: deps ## 1,000 simulated nodes on one dispatched site: idle Redis cost and CPU per node, pickup latency, throughput (see BENCHMARKS.md)
	$(GO) run ./cmd/writ-bench-scale -nodes 1000

bench-ledger: ## 100,000 simulated nodes register and report uptime once a minute to a SQLite ledger (see BENCHMARKS.md)
	$(GO) run ./cmd/writ-ledger-bench -nodes 100000 -interval 1m -for 1m

bench-ledger-pg: deps ## the same on PostgreSQL (a durable throwaway local cluster; root runs it as the postgres user), after the store's own uptime benchmark
	$(GO) test -run '^$$' -bench ReportUptime_Postgres -benchtime 5000x -count 2 ./ledger/store/sqlstore
	$(GO) run ./cmd/writ-ledger-bench -store postgres -nodes 100000 -interval 1m -for 1m

# CHAOS_JOBS is how many jobs make chaos runs; CHAOS_OUTAGE how long its ledger is down.
CHAOS_JOBS ?= 5000
CHAOS_OUTAGE ?= 5m

chaos: deps ## the chaos suite: CHAOS_JOBS signed jobs through kill -9 of every component, a Sentinel failover, two partitions and a ledger outage (root; see RELIABILITY.md)
	set -o pipefail; WRIT_CHAOS_JOBS=$(CHAOS_JOBS) WRIT_CHAOS_LEDGER_OUTAGE=$(CHAOS_OUTAGE) $(GO) test -count=1 -timeout 60m -run '^TestChaos$$' -v ./e2e | grep --line-buffered -E '^(chaos:|---|FAIL|ok|PASS)|chaos_test.go'

fuzz: ## fuzz the script engine (compile, and run in the sandbox) and the envelope scanner, FUZZ_EXECS each; crashers land in testdata/fuzz
	$(GO) test -run '^$$' -fuzz '^FuzzCheck$$' -fuzztime $(FUZZ_EXECS)x ./scripts
	$(GO) test -run '^$$' -fuzz '^FuzzRun$$' -fuzztime $(FUZZ_EXECS)x ./scripts/sandbox
	$(GO) test -run '^$$' -fuzz '^FuzzMembers$$' -fuzztime $(FUZZ_EXECS)x ./envelope

guest: deps build ## build the demo VM guest into .dev/files (served by make dev) and print the deploy command
	$(GO) run ./cmd/writ-guest --dir $(DEV_DIR)/files

lint: ## go vet, gofmt, and staticcheck when installed
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	@if command -v staticcheck >/dev/null; then staticcheck ./...; else echo "staticcheck not installed (go install honnef.co/go/tools/cmd/staticcheck@latest)"; fi

generate: ## run go generate
	$(GO) generate ./...

tidy: ## go mod tidy
	$(GO) mod tidy

check-clean: ## fail when go generate or go mod tidy change any file
	@before=$$(git status --porcelain; git diff | sha256sum); \
	$(GO) generate ./... && $(GO) mod tidy || exit 1; \
	after=$$(git status --porcelain; git diff | sha256sum); \
	if [ "$$before" != "$$after" ]; then echo "go generate / go mod tidy changed files:"; git status --porcelain; exit 1; fi

clean: ## remove build output and the dev data directory
	rm -rf bin $(DEV_DIR)
