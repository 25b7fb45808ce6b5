//! `sluice-operator` binary: watches `PipelineConfig` resources and reconciles them until
//! SIGINT or SIGTERM.
//!
//! Every replica serves `/metrics`, `/healthz` and `/readyz` (`--metrics-listen`) and the
//! external metrics API over HTTPS (`--external-metrics-listen`, to the apiserver's front
//! proxy only); only the replica holding
//! the Lease (`--lease-name`) runs the controller, so two or more replicas are safe. A
//! replica that stops releases the Lease, and another takes over at once; one that dies
//! is replaced when the Lease expires (`--lease-duration`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::{Api, Client};
use sluice_operator::certificate;
use sluice_operator::crd::PipelineConfig;
use sluice_operator::external::{self, ExternalMetrics};
use sluice_operator::front_proxy::{self, Authorizer, FrontProxy};
use sluice_operator::leader::{self, LeaseSettings};
use sluice_operator::metrics::Metrics;
use sluice_operator::plan::Images;
use sluice_operator::reconcile::{Context, DEFAULT_CONCURRENCY, run};
use sluice_operator::tls_reload::{TlsSource, read_pair, reload_tls};
use tokio_util::sync::CancellationToken;

/// Command line of `sluice-operator`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Sluice operator for PipelineConfig resources"
)]
struct Args {
    /// Watch only this namespace; every namespace when unset.
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Image of sluice-ingest.
    #[arg(long, env = "SLUICE_INGEST_IMAGE", default_value_t = Images::default().ingest)]
    ingest_image: String,
    /// Image of sluice-collector.
    #[arg(long, env = "SLUICE_COLLECTOR_IMAGE", default_value_t = Images::default().collector)]
    collector_image: String,
    /// Image of the managed Redis.
    #[arg(long, env = "SLUICE_REDIS_IMAGE", default_value_t = Images::default().redis)]
    redis_image: String,
    /// OTLP endpoint the pipelines' ingest and collector pods export traces to.
    #[arg(long, env = "SLUICE_PIPELINE_OTLP_ENDPOINT")]
    pipeline_otlp_endpoint: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz` (plain HTTP).
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Address of the external metrics API (HTTPS) the autoscalers read lag from.
    #[arg(
        long,
        env = "SLUICE_EXTERNAL_METRICS_LISTEN",
        default_value = "0.0.0.0:6443"
    )]
    external_metrics_listen: SocketAddr,
    /// Certificate (PEM) of the external metrics API; a self-signed one for `--tls-name`
    /// is made when unset.
    #[arg(
        long,
        env = "SLUICE_TLS_CERT_FILE",
        requires = "tls_key_file",
        conflicts_with = "tls_secret"
    )]
    tls_cert_file: Option<PathBuf>,
    /// Keep the external metrics API's certificate in this Secret of the operator's
    /// namespace (`--lease-namespace`): made once (self-signed for `--tls-name`), then
    /// served by every replica.
    #[arg(long, env = "SLUICE_TLS_SECRET")]
    tls_secret: Option<String>,
    /// Keep this APIService's `caBundle` equal to the served certificate (with
    /// `--tls-secret`), for example `v1beta1.external.metrics.k8s.io`.
    #[arg(long, env = "SLUICE_APISERVICE", requires = "tls_secret")]
    apiservice: Option<String>,
    /// Private key (PEM) of the external metrics API.
    #[arg(long, env = "SLUICE_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Seconds between checks of `--tls-cert-file` and `--tls-key-file` for a renewed
    /// certificate, and of the apiserver's front-proxy CA.
    #[arg(long, env = "SLUICE_TLS_RELOAD_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    tls_reload_seconds: u64,
    /// Names in the self-signed certificate, comma separated.
    #[arg(
        long,
        env = "SLUICE_TLS_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    tls_name: Vec<String>,
    /// Elect a leader through a Lease; only the leader reconciles.
    #[arg(long, env = "SLUICE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-operator")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, env = "SLUICE_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration: u64,
    /// This replica's name in the Lease; the pod name by default.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds one reconcile may run before the leader counts its controller as stuck,
    /// gives up the Lease and exits.
    #[arg(long, env = "SLUICE_STALL_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..=3600))]
    stall_seconds: u64,
    /// Pipelines reconciled at once.
    #[arg(long, env = "SLUICE_RECONCILE_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Log filter.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = sluice_core::telemetry::init("sluice-operator", &args.log_level);
    let shutdown = sluice_core::shutdown::on_signal();
    let result = operate(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "sluice-operator stopped");
    }
    telemetry.shutdown();
    result
}

async fn operate(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());

    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    let router = metrics.clone().router();
    let stop = shutdown.clone();
    let metrics_server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });

    // The server's certificate: the files given, the Secret's, or a self-signed one made now.
    let own = match (&args.tls_cert_file, &args.tls_key_file, &args.tls_secret) {
        (Some(cert), Some(key), _) => read_pair(cert, key)
            .with_context(|| format!("cannot read {} and {}", cert.display(), key.display()))?,
        (_, _, Some(secret)) => {
            let pair = certificate::from_secret(
                &client,
                &args.lease_namespace,
                secret,
                args.tls_name.clone(),
            )
            .await?;
            if let Some(apiservice) = &args.apiservice {
                tokio::spawn(certificate::keep_ca_bundle(
                    client.clone(),
                    apiservice.clone(),
                    pair.0.clone(),
                    Duration::from_secs(args.tls_reload_seconds),
                    shutdown.clone(),
                ));
            }
            pair
        }
        _ => {
            let own = external::self_signed(args.tls_name.clone())
                .context("cannot make a self-signed certificate")?;
            (own.cert_pem.into_bytes(), own.key_pem.into_bytes())
        }
    };
    // Clients: the apiserver's front proxy only; refused by all until its CA is known.
    let proxy = match FrontProxy::read(&client).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(error = %e, "the external metrics API refuses every client until the front proxy is known");
            None
        }
    };
    let config = front_proxy::server_config(&own.0, &own.1, proxy.as_ref())
        .map_err(anyhow::Error::msg)
        .context("cannot use the external metrics API's certificate")?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(config);
    let front_proxy = Arc::new(RwLock::new(proxy));
    tokio::spawn(reload_tls(
        TlsSource {
            files: args.tls_cert_file.clone().zip(args.tls_key_file.clone()),
            served: own,
            client: client.clone(),
        },
        tls.clone(),
        front_proxy.clone(),
        Duration::from_secs(args.tls_reload_seconds),
        metrics.clone(),
        shutdown.clone(),
    ));
    let std_listener = std::net::TcpListener::bind(args.external_metrics_listen)
        .with_context(|| format!("cannot listen on {}", args.external_metrics_listen))?;
    std_listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Images {
                ingest: args.ingest_image.clone(),
                collector: args.collector_image.clone(),
                redis: args.redis_image.clone(),
                otlp_endpoint: args.pipeline_otlp_endpoint.clone(),
            },
        )
        .with_metrics(metrics.clone()),
    );
    let api_router = external::router(ExternalMetrics {
        client: client.clone(),
        // One lag reader for the status and the autoscalers: the same clients.
        lag: ctx.lag.clone(),
        metrics: metrics.clone(),
        front_proxy,
        authorizer: Authorizer::new(client.clone()),
    });
    let server = axum_server::from_tcp_rustls(std_listener, tls)?.handle(handle.clone());
    let external_server =
        tokio::spawn(async move { server.serve(api_router.into_make_service()).await });
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        handle.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    metrics.set_ready();
    tracing::info!(
        metrics = %args.metrics_listen,
        external_metrics = %args.external_metrics_listen,
        namespace = ?args.namespace,
        "sluice-operator started"
    );

    let api: Api<PipelineConfig> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    if args.leader_election {
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map_or_else(
                || format!("sluice-operator-{}", std::process::id()),
                |name| format!("{name}-{}", std::process::id()),
            );
        let settings = LeaseSettings {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity,
            duration_seconds: args.lease_duration,
            stall_after: Duration::from_secs(args.stall_seconds),
        };
        let concurrency = args.concurrency;
        let controller = |stop| run(api.clone(), ctx.clone(), concurrency, stop);
        leader::lead(
            &settings,
            client,
            &metrics,
            &ctx.progress,
            &shutdown,
            controller,
        )
        .await?;
    } else {
        metrics.set_leader(true);
        run(api, ctx, args.concurrency, shutdown.clone()).await;
    }
    let _ = metrics_server.await;
    let _ = external_server.await;
    Ok(())
}
