# m3o-operator developer entry points. See the README and hack/env.sh.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
# Arguments of `cargo test` under `make test`; override e.g.
#   make test TEST_ARGS='-p m3o-controllers -- --test-threads=2 customer'
TEST_ARGS ?= --workspace --no-fail-fast -- --test-threads=4

.PHONY: help deps tools toolchain build test demo env lint fmt crds bench bench-gateway bench-usage argocd-health alert-rules install image dockerfile-check test-image

help:
	@echo 'make deps    install missing Debian packages (postgresql, redis, protoc, openssl)'
	@echo 'make tools   build kube-apiserver/etcd/kubectl/helm once (prints their dir)'
	@echo 'make build   cargo build (debug, all targets)'
	@echo 'make test    deps + tools + build, then the whole suite inside hack/env.sh'
	@echo 'make argocd-health  the Argo CD health checks (Lua) against their test cases'
	@echo 'make alert-rules  promtool test rules of the chart alerts (hack/alert-rules-test)'
	@echo 'make demo    run the operator in the local environment and apply examples/'
	@echo 'make env     bring the local environment up in the foreground (Ctrl-C stops)'
	@echo 'make lint    cargo fmt --check and clippy -D warnings'
	@echo 'make crds    regenerate charts/m3o-operator/crds/crds.yaml'
	@echo 'make bench   N of each kind from apply to all Ready, with the raw rate (BENCH_N=1000)'
	@echo 'make bench-gateway  gateway checks/s, latency, revocation latency, index memory'
	@echo 'make bench-usage  one usage rollup of 10,000 customers beside the raw Redis and Postgres work'
	@echo 'make install m3o-operator and the kubectl plugin kubectl-m3o into $$(PREFIX)/bin (PREFIX=~/.local)'
	@echo 'make image   the OCI image (no daemon): target/image/layout and its oci-archive; prints the digest'
	@echo 'make test-image  the image tests alone: the image run under runc with the chart'"'"'s Pod settings'

deps:
	hack/install-deps.sh

toolchain:
	@command -v $(CARGO) >/dev/null || { echo 'cargo not found: install Rust with rustup (https://rustup.rs)' >&2; exit 1; }
	@command -v go >/dev/null || [[ -n "$${KUBEBUILDER_ASSETS:-}" ]] || { echo 'go not found: it builds kube-apiserver/etcd (or set KUBEBUILDER_ASSETS)' >&2; exit 1; }

tools: toolchain
	hack/build-tools.sh

build: toolchain
	$(CARGO) build --workspace --all-targets

# Build before any server starts, so the environment only lives while tests run.
test: deps tools argocd-health alert-rules
	$(CARGO) build --workspace --tests --bins
	hack/image/check-dockerfile.sh --bin-dir target/debug
	hack/env.sh run -- $(CARGO) test $(TEST_ARGS)

# The image (README, "Install on a cluster"), without a container engine (hack/image/build.sh):
# an OCI layout in target/image/layout, tagged $(IMAGE_TAG), and target/image/*.oci.tar.
# IMAGE_PROFILE=dev packages the debug binaries instead (what the image test does).
IMAGE_PROFILE ?= release
IMAGE_REPOSITORY ?= m3o-operator
IMAGE_TAG ?=
image: deps
	@command -v $(CARGO) >/dev/null || { echo 'cargo not found: install Rust with rustup (https://rustup.rs)' >&2; exit 1; }
	$(CARGO) build --locked --profile $(IMAGE_PROFILE) -p m3o-operator --bin m3o-operator -p m3o-gateway --bin m3o-gateway-auth
	hack/image/build.sh --bin-dir target/$(if $(filter dev,$(IMAGE_PROFILE)),debug,$(IMAGE_PROFILE)) \
	  --out target/image --repository $(IMAGE_REPOSITORY) $(if $(IMAGE_TAG),--tag $(IMAGE_TAG)) \
	  $(if $(filter release,$(IMAGE_PROFILE)),--max-mb 40)

# Only the image tests (part of `make test`): the image from the debug binaries, run
# under runc with the chart's Pod settings (operator/tests/integration/image).
test-image: deps tools
	$(CARGO) build --workspace --tests --bins
	hack/image/check-dockerfile.sh --bin-dir target/debug
	hack/env.sh run -- $(CARGO) test -p m3o-operator --test integration -- image::

# The Dockerfile copies every input of the build and states the image's configuration
# (hack/image/check-dockerfile.sh; part of `make test`). Reads the dep-info of a
# debug build of the binaries (make build or make test makes one).
dockerfile-check: deps
	hack/image/check-dockerfile.sh --bin-dir target/debug

# Argo CD's health checks of the three kinds, run in gopher-lua the way Argo CD runs
# them (charts/m3o-operator/argocd; see hack/argocd-health-test/main.go).
argocd-health:
	@command -v go >/dev/null || { echo 'go not found: it runs the Argo CD health check tests' >&2; exit 1; }
	cd hack/argocd-health-test && GOTOOLCHAIN=local go run . ../../charts/m3o-operator/argocd

# The chart's PrometheusRule alerts, each tested with `promtool test rules` (promtool is
# built by hack/build-tools.sh like the other tools).
alert-rules: tools
	hack/alert-rules-test/run.sh

demo: deps tools
	$(CARGO) build -p m3o-operator -p m3o-gateway --bins --examples
	hack/env.sh run -- hack/demo.sh

# Figures, not a pass/fail: N of each kind from apply to all Ready beside the raw
# API-server rate, RSS, idle CPU, resync cost, block latency (release build).
BENCH_N ?= 1000
bench: deps tools
	$(CARGO) build --release -p m3o-operator --bins --examples
	BENCH_N=$(BENCH_N) M3O_PG_STATEMENTS=1 hack/env.sh run -- target/release/examples/bench_fleet

# Figures, not a pass/fail: m3o-gateway-auth checks/s and p50/p99 with 10,000 keys
# (with and without the Redis limit), revocation latency through nginx, index memory.
bench-gateway: deps tools
	$(CARGO) run --release -q -p m3o-gateway --example index_memory -- 10000
	$(CARGO) build --release -p m3o-operator --features bench --tests --bins
	hack/env.sh run -- $(CARGO) test --release -p m3o-operator --features bench --test integration -- \
	  --nocapture --test-threads=1 bench_gateway

# Figures, not a pass/fail: one usage rollup of 10,000 customers beside the raw Redis and
# Postgres work (README "Usage and quota").
bench-usage: deps tools
	$(CARGO) build --release -p m3o-operator --features bench --tests --bins
	hack/env.sh run -- $(CARGO) test --release -p m3o-operator --features bench --test integration -- \
	  --nocapture --test-threads=1 bench_usage

env: deps tools
	hack/env.sh up

lint: deps toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: toolchain
	$(CARGO) fmt --all

crds: toolchain
	mkdir -p charts/m3o-operator/crds
	$(CARGO) run -q -p m3o-operator -- crds > charts/m3o-operator/crds/crds.yaml.tmp
	mv charts/m3o-operator/crds/crds.yaml.tmp charts/m3o-operator/crds/crds.yaml

# The binary and its kubectl plugin name (`kubectl m3o inspect ...`): kubectl runs any
# kubectl-<name> on PATH, and m3o-operator reads its arguments the same either way.
PREFIX ?= $(HOME)/.local
install:
	$(CARGO) install --locked --path operator --root $(PREFIX)
	ln -sf m3o-operator $(PREFIX)/bin/kubectl-m3o
