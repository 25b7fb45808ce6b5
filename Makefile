# Sluice task runner. Each target does its own set-up on a fresh machine.
#
#   make run     the pipeline locally: stack, ingest, collector, a few events, a load demo
#   make test    the whole test suite against the real stack (started and stopped here)
#   make lint    rustfmt and clippy, as the test command runs them
#   make stack-up / stack-down / stack-status

.PHONY: run test lint build setup stack-up stack-down stack-status clean

run:
	scripts/run

test:
	scripts/test

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

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

clean:
	scripts/stack clean
	cargo clean
