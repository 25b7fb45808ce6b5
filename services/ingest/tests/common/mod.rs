//! Helpers shared by ingest's integration tests.

use clap::Parser;
use sluice_ingest::Args;
use sluice_testkit::{Pipeline, Stack, unique};
use tokio_util::sync::CancellationToken;

/// Ingest's arguments for `pipeline` on the stack's Kafka and Redis, under the pipeline's
/// key prefix.
pub fn args(stack: &Stack, pipeline: &Pipeline) -> Args {
    let mut args = Args::new(
        pipeline.settings_path.clone(),
        stack.kafka(),
        stack.redis_url.clone(),
    );
    args.redis.key_prefix = pipeline.key_prefix.clone();
    args
}

/// Starts an in-process collector writing `pipeline`'s streams to the stack's Redis, in a
/// group of its own, until `stop` is cancelled.
pub fn spawn_collector(stack: &Stack, pipeline: &Pipeline, stop: &CancellationToken) {
    let args = sluice_collector::Args::parse_from([
        "sluice-collector",
        "--settings",
        pipeline.settings_path.to_str().expect("path"),
        "--kafka-brokers",
        &stack.kafka_brokers,
        "--redis-url",
        &stack.redis_url,
        "--key-prefix",
        &pipeline.key_prefix,
        "--group",
        &unique("group"),
    ]);
    tokio::spawn(sluice_collector::run(args, stop.clone()));
}
