//! Who may call the external metrics API: the kube-apiserver's front proxy, on behalf of a
//! user RBAC lets read the metric. This is how aggregated API servers authenticate.
//!
//! - **Authentication**: the TLS server asks every client for a certificate and accepts
//!   only one signed by the front-proxy CA the apiserver publishes in the ConfigMap
//!   `kube-system/extension-apiserver-authentication` (`requestheader-client-ca-file`),
//!   whose common name is one of `requestheader-allowed-names` (any, when the list is
//!   empty). Anything else fails the handshake: a direct call to the operator's port is
//!   refused before a request is read. The ConfigMap is read at start and again on every
//!   certificate reload, so a rotated front-proxy CA is followed without a restart; until it
//!   can be read, every client is refused.
//! - **Authorization**: the request names its user and groups in the headers the ConfigMap
//!   lists (`X-Remote-User`, `X-Remote-Group`), which only the authenticated front proxy
//!   can have set. The operator asks the apiserver with a SubjectAccessReview whether that
//!   user may `list` the metric (resource `<metric>` of `external.metrics.k8s.io`) in the
//!   namespace asked about, as the HPA controller's role allows; the answer is cached for a
//!   few seconds. No user is `401`, a refusal `403`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

use crate::external::GROUP_VERSION;

/// Namespace and name of the ConfigMap the apiserver publishes its request-header settings
/// in.
pub const AUTHENTICATION_CONFIG_MAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");

/// The apiserver's front proxy, as its ConfigMap describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontProxy {
    /// The CA that signs the front proxy's client certificates (PEM).
    pub ca_pem: String,
    /// Common names a front-proxy certificate may have; any when empty.
    pub allowed_names: Vec<String>,
    /// Headers naming the user, first non-empty one wins.
    pub username_headers: Vec<String>,
    /// Headers naming the user's groups, every value of each.
    pub group_headers: Vec<String>,
}

/// The user a request is made for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct User {
    /// The user name.
    pub name: String,
    /// Its groups.
    pub groups: Vec<String>,
}

fn json_list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key).map(String::as_str) {
        None | Some("") => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("{key} is not a JSON list of strings: {e}")),
    }
}

impl FrontProxy {
    /// Reads the settings from the ConfigMap's data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|c| !c.trim().is_empty())
            .cloned()
            .ok_or_else(|| {
                "the apiserver publishes no front-proxy CA (requestheader-client-ca-file): \
                 start kube-apiserver with --requestheader-client-ca-file, \
                 --proxy-client-cert-file and --proxy-client-key-file"
                    .to_owned()
            })?;
        let username_headers = json_list(data, "requestheader-username-headers")?;
        if username_headers.is_empty() {
            return Err(
                "the apiserver names no user header (requestheader-username-headers)".into(),
            );
        }
        Ok(Self {
            ca_pem,
            allowed_names: json_list(data, "requestheader-allowed-names")?,
            username_headers,
            group_headers: json_list(data, "requestheader-group-headers")?,
        })
    }

    /// Reads the apiserver's ConfigMap.
    pub async fn read(client: &Client) -> Result<Self, String> {
        let (namespace, name) = AUTHENTICATION_CONFIG_MAP;
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let map = api
            .get(name)
            .await
            .map_err(|e| format!("cannot read ConfigMap {namespace}/{name}: {e}"))?;
        Self::from_data(&map.data.unwrap_or_default())
    }

    /// The user the front proxy names in `headers`.
    pub fn user(&self, headers: &HeaderMap) -> Option<User> {
        let name = self.username_headers.iter().find_map(|h| {
            headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
        })?;
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()).iter())
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        Some(User {
            name: name.to_owned(),
            groups,
        })
    }
}

/// Accepts client certificates of the front proxy only: signed by its CA and, when the
/// apiserver lists allowed names, with one of them as common name. Without a known front
/// proxy it refuses every client.
#[derive(Debug)]
struct FrontProxyVerifier {
    chain: Option<Arc<dyn ClientCertVerifier>>,
    allowed_names: Vec<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

impl ClientCertVerifier for FrontProxyVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.as_ref().map_or(&[], |c| c.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Err(rustls::Error::General(
                "the apiserver's front-proxy CA is not known yet".into(),
            ));
        };
        let verified = chain.verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed_names.is_empty() {
            return Ok(verified);
        }
        match common_name(end_entity) {
            Some(cn) if self.allowed_names.contains(&cn) => Ok(verified),
            cn => Err(rustls::Error::General(format!(
                "client certificate {cn:?} is not one of the front proxy's names {:?}",
                self.allowed_names
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS settings of the external metrics API: its certificate and key (PEM), and client
/// certificates of `proxy` only (none accepted without it).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    proxy: Option<&FrontProxy>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e}"))?;
    let chain = match proxy {
        None => None,
        Some(proxy) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(proxy.ca_pem.as_bytes()) {
                let ca = ca.map_err(|e| format!("front-proxy CA: {e}"))?;
                roots.add(ca).map_err(|e| format!("front-proxy CA: {e}"))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("front-proxy CA: {e}"))?;
            Some(verifier)
        }
    };
    let verifier = FrontProxyVerifier {
        chain,
        allowed_names: proxy.map(|p| p.allowed_names.clone()).unwrap_or_default(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How long a SubjectAccessReview's answer is reused.
const DECISION_TTL: Duration = Duration::from_secs(10);
/// Most answers kept; the cache starts afresh beyond it.
const DECISIONS_MAX: usize = 4096;

type DecisionKey = (User, String, String);

/// Asks the apiserver whether a user may read a metric, remembering the answers briefly.
#[derive(Clone)]
pub struct Authorizer {
    client: Client,
    decisions: Arc<Mutex<HashMap<DecisionKey, (bool, Instant)>>>,
}

impl Authorizer {
    /// An authorizer asking through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            decisions: Arc::default(),
        }
    }

    /// Whether `user` may list `metric` in `namespace`.
    pub async fn allowed(
        &self,
        user: &User,
        namespace: &str,
        metric: &str,
    ) -> Result<bool, kube::Error> {
        let key = (user.clone(), namespace.to_owned(), metric.to_owned());
        let now = Instant::now();
        if let Some((allowed, at)) = self
            .decisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            && now.duration_since(*at) < DECISION_TTL
        {
            return Ok(*allowed);
        }
        let (group, version) = GROUP_VERSION.split_once('/').unwrap_or((GROUP_VERSION, ""));
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_owned()),
                    version: Some(version.to_owned()),
                    resource: Some(metric.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    verb: Some("list".to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let mut decisions = self
            .decisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if decisions.len() >= DECISIONS_MAX {
            decisions.clear();
        }
        decisions.insert(key, (allowed, now));
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_config_map_names_the_ca_the_names_and_the_headers() {
        let proxy = FrontProxy::from_data(&data(&[
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
        ]))
        .expect("front proxy");
        assert_eq!(proxy.allowed_names, ["front-proxy-client"]);
        let mut headers = HeaderMap::new();
        assert_eq!(proxy.user(&headers), None, "no user header");
        headers.insert("x-remote-user", "alice".parse().expect("value"));
        headers.append("x-remote-group", "team-a".parse().expect("value"));
        headers.append(
            "x-remote-group",
            "system:authenticated".parse().expect("value"),
        );
        assert_eq!(
            proxy.user(&headers),
            Some(User {
                name: "alice".into(),
                groups: vec!["team-a".into(), "system:authenticated".into()],
            })
        );

        let err = FrontProxy::from_data(&data(&[("client-ca-file", "PEM")])).expect_err("no CA");
        assert!(err.contains("--requestheader-client-ca-file"), "{err}");
        let err = FrontProxy::from_data(&data(&[
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-username-headers", "X-Remote-User"),
        ]))
        .expect_err("not JSON");
        assert!(err.contains("requestheader-username-headers"), "{err}");
    }
}
