//! The external metrics API's TLS settings followed while running: a renewed certificate
//! (files a Secret mount keeps current) and a changed front-proxy CA of the apiserver
//! replace what is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::front_proxy::{self, FrontProxy};
use crate::metrics::Metrics;

/// Reads a certificate and key (PEM).
pub fn read_pair(cert: &Path, key: &Path) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    Ok((std::fs::read(cert)?, std::fs::read(key)?))
}

/// Where the external metrics API's TLS settings come from.
pub struct TlsSource {
    /// The certificate and key files, when given (else the self-signed pair stays).
    pub files: Option<(PathBuf, PathBuf)>,
    /// The certificate and key served now.
    pub served: (Vec<u8>, Vec<u8>),
    /// Reads the apiserver's front-proxy settings.
    pub client: Client,
}

/// Follows renewed TLS settings without a restart: the certificate files (cert-manager
/// rotates the Secret; the kubelet updates the mounted files) and the apiserver's
/// front-proxy CA, read `every` so often (every 5 s at most while the front proxy is not
/// known yet); the server's settings are replaced when either
/// changed. What cannot be loaded keeps what is served; each attempt is counted in
/// `sluice_operator_certificate_reloads_total{result}`.
pub async fn reload_tls(
    mut source: TlsSource,
    tls: axum_server::tls_rustls::RustlsConfig,
    front_proxy: Arc<RwLock<Option<FrontProxy>>>,
    every: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut failed: Option<(Vec<u8>, Vec<u8>, Option<FrontProxy>)> = None;
    loop {
        // While every client is refused for want of the front proxy, it is looked for sooner.
        let unknown = front_proxy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        let wait = if unknown {
            every.min(Duration::from_secs(5))
        } else {
            every
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let pair = match &source.files {
            Some((cert, key)) => match read_pair(cert, key) {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            None => source.served.clone(),
        };
        let proxy = match FrontProxy::read(&source.client).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the apiserver's front-proxy settings; keeping the ones in use");
                front_proxy
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            }
        };
        let current = front_proxy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let candidate = (pair.0.clone(), pair.1.clone(), proxy.clone());
        // A set that failed is tried again only once something changes.
        if (pair == source.served && proxy == current) || failed.as_ref() == Some(&candidate) {
            continue;
        }
        match front_proxy::server_config(&pair.0, &pair.1, proxy.as_ref()) {
            Ok(config) => {
                tls.reload_from_config(config);
                if pair != source.served {
                    tracing::info!("serving the renewed certificate");
                }
                if proxy != current {
                    tracing::info!("following the apiserver's front-proxy settings");
                }
                source.served = pair;
                *front_proxy.write().unwrap_or_else(PoisonError::into_inner) = proxy;
                metrics.certificate_reload("ok");
                failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the renewed TLS settings; keeping the old ones");
                metrics.certificate_reload("error");
                failed = Some(candidate);
            }
        }
    }
}
