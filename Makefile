# Sluice task runner. Each target does its own set-up on a fresh machine.
#
#   make run     the pipeline locally: stack, ingest, collector, a few events, a load demo
#   make test    the whole test suite against the real stack (started and stopped here)
#   make lint    rustfmt and clippy, as the test command runs them
#   make fuzz    the input parsers under cargo fuzz, 60 s per target (FUZZ_SECONDS=...)
#   make stack-up / stack-down / stack-status
#   make kind-up / kind-down   Sluice on a local kind cluster (needs Docker, kind, kubectl, helm)
#   make cluster-up / cluster-down   Sluice on a real node on this machine, without Docker (root)
#   make images                the container images (needs Docker)
#   make generate              the CRD and the rendered chart, from the code

.PHONY: run test lint fuzz build setup stack-up stack-down stack-status clean kind-up kind-down cluster-up cluster-down images generate

run:
	scripts/run

test:
	scripts/test

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked --release -- -D warnings

FUZZ_SECONDS ?= 60
fuzz: setup
	scripts/fuzz $(FUZZ_SECONDS)

build: setup
	cargo build --workspace --bins --locked

setup:
	scripts/setup

stack-up: setup
	scripts/stack up

stack-down:
	scripts/stack down

stack-status:
	scripts/stack status

kind-up:
	scripts/kind up

kind-down:
	scripts/kind down

cluster-up: setup
	scripts/realnode install

cluster-down:
	scripts/realnode down
	scripts/stack down

images:
	scripts/kind images

generate:
	scripts/generate

clean:
	scripts/stack clean
	cargo clean
