//! `sluice-operator`: reconciles `PipelineConfig` resources.
//!
//! - [`crd`]: the resource's types, from which the CRD is generated (`crdgen`);
//! - [`plan`]: what should exist for a resource, as a pure function (children, topics);
//! - [`reconcile`]: the controller: observe, apply the plan, report the status;
//! - [`status`]: the status and its conditions from what a reconcile observed (pure);
//! - [`leader`]: leader election, and a leader that gives up when its controller is stuck;
//! - [`kafka`]: the operator's shared Kafka clients and consumer lag;
//! - [`external`]: the `external.metrics.k8s.io` API the autoscalers read lag from;
//! - [`front_proxy`]: who may call it: the apiserver's front proxy, for users RBAC allows;
//! - [`certificate`]: its certificate kept in a Secret, and the APIService's `caBundle`;
//! - [`tls_reload`]: its certificate and the front-proxy CA followed while running;
//! - [`metrics`]: the operator's own Prometheus metrics and health endpoints.

pub mod certificate;
pub mod crd;
pub mod external;
pub mod front_proxy;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod status;
pub mod tls_reload;

use kube::CustomResourceExt;

/// The CRD as YAML, as `crdgen` prints it for `manifests/crd.yaml` and the chart's `crds/`.
pub fn crd_yaml() -> String {
    let crd = crd::PipelineConfig::crd();
    format!(
        "# Generated from operator/src/crd.rs by scripts/generate; do not edit.\n{}",
        serde_yaml_ng::to_string(&crd).unwrap_or_default()
    )
}
