//! The external metrics API's certificate when the operator keeps it itself
//! (`--tls-secret`): a self-signed certificate for `--tls-name` made once and kept in a
//! Secret of the operator's namespace, which every replica serves, and the APIService's
//! `caBundle` (`--apiservice`) kept equal to it, so that the apiserver verifies the
//! operator without `insecureSkipTLSVerify` and without a certificate made by the
//! installer.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Why the certificate Secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The apiserver refused a read or a write.
    #[error("the certificate Secret {0}: {1}")]
    Kube(String, #[source] kube::Error),
    /// The certificate could not be made.
    #[error("cannot make a certificate: {0}")]
    Make(#[from] rcgen::Error),
    /// The Secret exists without a certificate and key.
    #[error("the Secret {0} has no tls.crt and tls.key")]
    Incomplete(String),
}

/// The certificate and key (PEM) in the Secret `name` of `namespace`; when it does not
/// exist, a self-signed certificate for `names` is made and stored there first (when
/// another replica stored one at the same time, that one is used).
pub async fn from_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    names: Vec<String>,
) -> Result<(Vec<u8>, Vec<u8>), CertificateError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube_error = |e| CertificateError::Kube(format!("{namespace}/{name}"), e);
    let existing = match api.get_opt(name).await.map_err(kube_error)? {
        Some(s) => s,
        None => {
            let own = crate::external::self_signed(names)?;
            let (cert, key) = (own.cert_pem.into_bytes(), own.key_pem.into_bytes());
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "sluice-operator".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".to_owned()),
                data: Some(BTreeMap::from([
                    // Self-signed: the certificate is its own CA.
                    ("ca.crt".to_owned(), ByteString(cert.clone())),
                    ("tls.crt".to_owned(), ByteString(cert)),
                    ("tls.key".to_owned(), ByteString(key)),
                ])),
                ..Secret::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(s) => {
                    tracing::info!(secret = %name, "made the external metrics API's certificate");
                    s
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    api.get(name).await.map_err(kube_error)?
                }
                Err(e) => return Err(kube_error(e)),
            }
        }
    };
    let data = existing.data.unwrap_or_default();
    match (data.get("tls.crt"), data.get("tls.key")) {
        (Some(c), Some(k)) => Ok((c.0.clone(), k.0.clone())),
        _ => Err(CertificateError::Incomplete(format!("{namespace}/{name}"))),
    }
}

/// Sets the `caBundle` of the APIService `name` to `ca` when it differs; whether it did.
pub async fn set_ca_bundle(client: &Client, name: &str, ca: &[u8]) -> Result<bool, kube::Error> {
    let api: Api<APIService> = Api::all(client.clone());
    let current = api.get(name).await?;
    if current
        .spec
        .and_then(|s| s.ca_bundle)
        .map(|b| b.0)
        .as_deref()
        == Some(ca)
    {
        return Ok(false);
    }
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"caBundle": ByteString(ca.to_vec())}})),
    )
    .await?;
    Ok(true)
}

/// Keeps the APIService's `caBundle` equal to `ca`: at once, then every `every` (every 5 s
/// while it cannot be set, for example before the APIService exists), so a re-applied
/// manifest without it is corrected.
pub async fn keep_ca_bundle(
    client: Client,
    name: String,
    ca: Vec<u8>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let wait = match set_ca_bundle(&client, &name, &ca).await {
            Ok(changed) => {
                if changed {
                    tracing::info!(apiservice = %name, "set the APIService's caBundle to the served certificate");
                }
                every
            }
            Err(e) => {
                tracing::warn!(apiservice = %name, error = %e, "cannot set the APIService's caBundle; trying again");
                every.min(Duration::from_secs(5))
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
