//! Ingest against the real Kafka and Redis of the stack, in one test binary: the HTTP API
//! in process, every door of a running server, and the TCP doors. The trace test has a
//! binary of its own, as it installs the process's global tracer.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod doors;
mod tcp;
