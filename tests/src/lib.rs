//! Helpers for tests against the real stack that `scripts/stack up` starts.
//!
//! Tests read the stack's addresses from the `SLUICE_*` environment variables, make their
//! own topics, consumer groups and Redis key prefixes (so they run in parallel and leave
//! nothing shared behind), and await conditions with a deadline instead of sleeping.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_core::kafka::{KafkaArgs, TopicSpec, ensure_topics};
use sluice_core::{PipelineSettings, StreamSettings};

/// Addresses of the running stack.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// Redis primary.
    pub redis_url: String,
    /// Redis replica.
    pub redis_replica_url: String,
    /// PostgreSQL.
    pub database_url: String,
    /// MariaDB, for the MySQL sink.
    pub mysql_url: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the stack with `eval \"$(scripts/stack up)\"`, or run `make test`")
    })
}

impl Stack {
    /// The stack named by the environment; panics with instructions when it is not set.
    pub fn from_env() -> Self {
        Self {
            kafka_brokers: var("SLUICE_KAFKA_BROKERS"),
            redis_url: var("SLUICE_REDIS_URL"),
            redis_replica_url: var("SLUICE_REDIS_REPLICA_URL"),
            database_url: var("SLUICE_DATABASE_URL"),
            mysql_url: var("SLUICE_MYSQL_URL"),
        }
    }

    /// Kafka client settings for the stack.
    pub fn kafka(&self) -> KafkaArgs {
        KafkaArgs::new(&self.kafka_brokers)
    }

    /// A Redis connection to the primary.
    pub async fn redis(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        // Tests send large pipelines; the client's default half-second answer timeout is
        // too short on a loaded machine.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        Ok(redis::Client::open(self.redis_url.as_str())?
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }
}

/// A name no other test uses: `<prefix>-<uuid>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A pipeline of fresh streams for one test: settings, their topics in Kafka, a settings
/// file on disk, and a Redis key prefix of its own.
pub struct Pipeline {
    /// The settings.
    pub settings: PipelineSettings,
    /// Where the settings file is.
    pub settings_path: PathBuf,
    /// The Redis key prefix of this test.
    pub key_prefix: String,
    _dir: tempfile::TempDir,
}

impl Pipeline {
    /// Creates the streams' topics (with their `.retry` and `.dlq` topics) and writes the
    /// settings file.
    pub async fn create(stack: &Stack, streams: Vec<StreamSettings>) -> anyhow::Result<Self> {
        Self::create_with(
            stack,
            PipelineSettings {
                streams,
                retry: Default::default(),
                aggregates: Default::default(),
            },
        )
        .await
    }

    /// Like [`Pipeline::create`], with whole settings (for a retry policy).
    pub async fn create_with(stack: &Stack, settings: PipelineSettings) -> anyhow::Result<Self> {
        let mut topics = Vec::new();
        for s in &settings.streams {
            topics.push(TopicSpec {
                name: s.topic().to_owned(),
                partitions: s.partitions,
            });
            for name in [s.retry_topic(), s.dead_letter_topic()] {
                topics.push(TopicSpec {
                    name,
                    partitions: s.partitions,
                });
            }
        }
        ensure_topics(&stack.kafka(), &topics).await?;
        Self::without_topics(settings)
    }

    /// The settings file and key prefix of a pipeline whose topics are not created.
    pub fn without_topics(settings: PipelineSettings) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let settings_path = dir.path().join("pipeline.yaml");
        std::fs::write(&settings_path, settings.to_yaml())?;
        Ok(Self {
            settings,
            settings_path,
            key_prefix: unique("t"),
            _dir: dir,
        })
    }
}

/// Calls `check` until it returns `Some`, or fails after `limit` saying what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {limit:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {limit:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of `topic` from the beginning up to its current end, read with a fresh
/// consumer group. The end is taken first, so the call returns as soon as all are read.
pub async fn read_topic(stack: &Stack, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: StreamConsumer = stack.kafka().consumer_config(&unique("reader")).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        remaining += high - low;
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut out = Vec::new();
    while (out.len() as i64) < remaining {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "reading {topic}: {} of {remaining} records after 30 s",
                    out.len()
                )
            })??;
        out.push(m.detach());
    }
    Ok(out)
}

/// Partitions of `topic`, or `None` when it does not exist.
pub fn partitions(stack: &Stack, topic: &str) -> anyhow::Result<Option<usize>> {
    let consumer: StreamConsumer = stack.kafka().consumer_config(&unique("meta")).create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len()))
}

/// A configuration value of `topic`, as the broker reports it.
pub async fn topic_config(stack: &Stack, topic: &str, key: &str) -> anyhow::Result<Option<String>> {
    use rdkafka::admin::{AdminOptions, ResourceSpecifier};
    let admin = stack.kafka().admin()?;
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await?;
    for r in described {
        let r = r.map_err(|code| anyhow::anyhow!("describe {topic}: {code}"))?;
        if let Some(e) = r.entries.into_iter().find(|e| e.name == key) {
            return Ok(e.value);
        }
    }
    Ok(None)
}

/// The number of records in `topic` (sum over partitions of end − start).
pub fn topic_len(stack: &Stack, topic: &str) -> anyhow::Result<i64> {
    let consumer: StreamConsumer = stack.kafka().consumer_config(&unique("len")).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut total = 0;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            total += high - low;
        }
    }
    Ok(total)
}

/// Whether consumer group `group` has committed every partition of `topic` up to its end.
pub fn committed_to_end(stack: &Stack, group: &str, topic: &str) -> anyhow::Result<bool> {
    let consumer: StreamConsumer = stack.kafka().consumer_config(group).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut partitions = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            partitions.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    for element in committed.elements() {
        let (_, high) =
            consumer.fetch_watermarks(topic, element.partition(), Duration::from_secs(10))?;
        let at = match element.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        if at < high {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Commits consumer group `group`'s offsets at the end of every partition of `topic`, as a
/// collector that drained it would; returns how many partitions were committed.
pub fn commit_to_end(stack: &Stack, group: &str, topic: &str) -> anyhow::Result<usize> {
    let consumer: StreamConsumer = stack.kafka().consumer_config(group).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut offsets = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            offsets.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
        }
    }
    consumer.commit(&offsets, rdkafka::consumer::CommitMode::Sync)?;
    Ok(offsets.count())
}

/// The number of members of consumer group `group` that have partitions, once it is stable
/// (0 while it is rebalancing or empty).
pub fn stable_members(stack: &Stack, group: &str) -> anyhow::Result<usize> {
    Ok(stable_group(stack, group)?.1)
}

/// The members of consumer group `group` once it is stable, and how many of them have
/// partitions ((0, 0) while it is rebalancing or empty).
pub fn stable_group(stack: &Stack, group: &str) -> anyhow::Result<(usize, usize)> {
    let consumer: StreamConsumer = stack.kafka().consumer_config(&unique("probe")).create()?;
    let groups = consumer.fetch_group_list(Some(group), Duration::from_secs(10))?;
    let stable = groups
        .groups()
        .iter()
        .filter(|g| g.name() == group && g.state() == "Stable");
    Ok(stable.fold((0, 0), |(all, assigned), g| {
        let members = g.members();
        let with = members
            .iter()
            .filter(|m| m.assignment().is_some_and(|a| !a.is_empty()))
            .count();
        (all + members.len(), assigned + with)
    }))
}

/// The payload of a Kafka record as JSON.
pub fn json_of(m: &OwnedMessage) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(
        m.payload().context("record without value")?,
    )?)
}

/// Path of a binary of this workspace, built next to the test executable.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("unexpected test executable location")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} does not exist: build the binaries first with `cargo build --workspace --bins --release` (make test does), in the profile the tests run in",
            path.display()
        );
    }
    Ok(path)
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Starts a workspace binary with `args` and `envs`; its output goes to the test's.
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start(name, args, envs, Stdio::inherit, Stdio::inherit)
    }

    /// Like [`Process::spawn`], with its output (stdout and stderr) written to `log`.
    pub fn spawn_logged(
        name: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let copy = file.try_clone()?;
        Self::start(name, args, envs, || file.into(), || copy.into())
    }

    fn start(
        name: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        stdout: impl FnOnce() -> Stdio,
        stderr: impl FnOnce() -> Stdio,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary(name)?);
        cmd.args(args)
            .env("SLUICE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout())
            .stderr(stderr());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Asks the process to stop (SIGTERM) and waits up to `limit` for it to exit; returns
    /// whether it exited successfully.
    pub async fn terminate(mut self, limit: Duration) -> anyhow::Result<bool> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("cannot send SIGTERM to {}", self.name);
        }
        let name = self.name.clone();
        let exit = wait_for(&format!("{name} to exit"), limit, || {
            let r = self.child.try_wait();
            async move { Ok(r?) }
        })
        .await?;
        Ok(exit.success())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Free addresses for an ingest process: its API (`--listen`) and its metrics and health
/// port (`--metrics-listen`).
pub struct IngestPorts {
    /// `--listen`.
    pub api: String,
    /// `--metrics-listen`.
    pub metrics: String,
}

impl IngestPorts {
    /// Two free ports on 127.0.0.1.
    pub fn free() -> anyhow::Result<Self> {
        Ok(Self {
            api: format!("127.0.0.1:{}", free_port()?),
            metrics: format!("127.0.0.1:{}", free_port()?),
        })
    }

    /// The flags that give ingest these addresses.
    pub fn flags(&self) -> [&str; 4] {
        ["--listen", &self.api, "--metrics-listen", &self.metrics]
    }

    /// Base URL of the API.
    pub fn base(&self) -> String {
        format!("http://{}", self.api)
    }

    /// Base URL of `/metrics`, `/healthz` and `/readyz`.
    pub fn metrics_base(&self) -> String {
        format!("http://{}", self.metrics)
    }

    /// Waits until ingest answers `/healthz`.
    pub async fn healthy(&self, limit: Duration) -> anyhow::Result<()> {
        healthy(&self.metrics_base(), limit).await
    }
}

/// Waits until the HTTP server at `base` answers `GET /healthz` with a success.
pub async fn healthy(base: &str, limit: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    wait_for(&format!("{base} to answer /healthz"), limit, || {
        let request = client.get(format!("{base}/healthz")).send();
        async move {
            Ok(request
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        }
    })
    .await
}

/// Publishes `events` to `topic` with an idempotent `acks=all` producer, as ingest does,
/// and returns once Kafka acknowledged all of them.
pub async fn produce(
    stack: &Stack,
    topic: &str,
    events: &[sluice_core::Envelope],
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = stack.kafka().producer_config().create()?;
    let mut pending = Vec::new();
    for e in events {
        let value = e.encode_value();
        let mut record = FutureRecord::to(topic)
            .payload(&value)
            .headers(e.kafka_headers());
        if let Some(k) = &e.key {
            record = record.key(k.as_str());
        }
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Publishes raw bytes (for records that are not events).
pub async fn produce_raw(
    stack: &Stack,
    topic: &str,
    key: &str,
    value: &[u8],
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = stack.kafka().producer_config().create()?;
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(value),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A TCP proxy on 127.0.0.1 in front of a server, to cut it off and bring it back as an
/// outage would, without touching the server that other tests share.
pub struct Proxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let target = target.to_owned();
        let (flag, gen_tx) = (up.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut = gen_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            up,
            generation,
            task,
        })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A Kafka broker of a test's own, started with `scripts/stack kafka-up` on free ports in a
/// temporary directory, for tests that stop and restart a broker. Stopped when dropped.
pub struct OwnBroker {
    dir: tempfile::TempDir,
    port: u16,
    controller_port: u16,
}

impl OwnBroker {
    /// Starts a new broker and waits until it answers metadata requests.
    pub async fn start() -> anyhow::Result<Self> {
        let broker = Self {
            dir: tempfile::tempdir()?,
            port: free_port()?,
            controller_port: free_port()?,
        };
        broker.up().await?;
        Ok(broker)
    }

    /// Starts the broker again (same data) and waits until it answers.
    pub async fn up(&self) -> anyhow::Result<()> {
        let this = (self.dir.path().to_owned(), self.port, self.controller_port);
        tokio::task::spawn_blocking(move || Self::run_script(&this.0, this.1, this.2, "kafka-up"))
            .await?
    }

    /// Stops the broker and waits until its process is gone.
    pub async fn down(&self) -> anyhow::Result<()> {
        let this = (self.dir.path().to_owned(), self.port, self.controller_port);
        tokio::task::spawn_blocking(move || Self::run_script(&this.0, this.1, this.2, "kafka-down"))
            .await?
    }

    fn run_script(
        dir: &std::path::Path,
        port: u16,
        controller_port: u16,
        command: &str,
    ) -> anyhow::Result<()> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack");
        let status = Command::new(script)
            .arg(command)
            .env("SLUICE_STACK_DIR", dir)
            .env("SLUICE_STACK_KAFKA_PORT", port.to_string())
            .env(
                "SLUICE_STACK_KAFKA_CONTROLLER_PORT",
                controller_port.to_string(),
            )
            .env("SLUICE_STACK_KAFKA_SASL_PORT", "off")
            // The stack's own broker has the listener for pods.
            .env_remove("SLUICE_STACK_KAFKA_POD_LISTENER")
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "scripts/stack {command} failed");
        Ok(())
    }

    /// Its bootstrap address.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Self::run_script(
            self.dir.path(),
            self.port,
            self.controller_port,
            "kafka-down",
        );
    }
}
