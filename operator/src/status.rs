//! The status of a PipelineConfig from what one reconcile observed: a pure function, so
//! that every condition and reason is tested without a cluster.
//!
//! Conditions, each `True` or `False` with a reason:
//! - `TopicsReady`: the topic step's own reason (`TopicsReady`, `KafkaUnreachable`,
//!   `KafkaSecretInvalid`, `TopicError`, `TopicNotOurs`, `NotSupported`);
//! - `ChildrenApplied`: `Applied`, or `ApplyFailed` with the apiserver's refusals;
//! - `RedisReady`, `IngestReady`, `CollectorsReady`: ready, or `Progressing` with what is
//!   waited for;
//! - `Ready` (first): `Ready`, or the reason of the first condition above that is not
//!   true, with its type and message;
//! - `Replicated` (when the pipeline has topics): `Replicated`, or `SingleCopy` naming the
//!   topics with one replica. Reported, not part of `Ready`.
//!
//! A condition keeps its `lastTransitionTime` while its status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{CollectorStatus, PipelineConfigStatus, TopicStatus};

/// What the topic step found and did.
#[derive(Debug, Clone, Default)]
pub struct TopicsObserved {
    /// Every topic exists as the spec asks.
    pub ready: bool,
    /// The `TopicsReady` reason.
    pub reason: &'static str,
    /// The `TopicsReady` message.
    pub message: String,
    /// The pipeline's topics.
    pub topics: Vec<TopicStatus>,
    /// Topics with a single replica.
    pub single_copy: Vec<String>,
    /// Every topic the operator created for the pipeline.
    pub created: Vec<String>,
}

/// A collector as observed: its status, and whether it has all it wants.
#[derive(Debug, Clone)]
pub struct CollectorObserved {
    /// What the status says of it.
    pub status: CollectorStatus,
    /// Every replica it asks for is ready (or it was scaled to zero on purpose).
    pub ready: bool,
}

/// What one reconcile observed.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The generation of the spec reconciled.
    pub generation: Option<i64>,
    /// Streams in the spec.
    pub streams: usize,
    /// The topic step.
    pub topics: TopicsObserved,
    /// Children the apiserver refused, each as a line a user can act on.
    pub refusals: Vec<String>,
    /// The managed Redis is ready (true without one).
    pub redis_ready: bool,
    /// Every ingest replica is ready.
    pub ingest_ready: bool,
    /// The collectors, in the spec's order.
    pub collectors: Vec<CollectorObserved>,
}

/// The status for `observed`, given the `old` one (for transition times) and `now`.
pub fn status(
    observed: Observed,
    old: Option<&PipelineConfigStatus>,
    now: jiff::Timestamp,
) -> PipelineConfigStatus {
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = observed.generation;
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = old_conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        Condition {
            type_: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: since,
            observed_generation: generation,
        }
    };
    let waiting = |what: &str| format!("waiting for {what} to become ready");
    let topics = &observed.topics;
    let pending: Vec<&str> = observed
        .collectors
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.status.name.as_str())
        .collect();
    let mut conditions = vec![
        condition(
            "TopicsReady",
            topics.ready,
            topics.reason,
            topics.message.clone(),
        ),
        if observed.refusals.is_empty() {
            condition(
                "ChildrenApplied",
                true,
                "Applied",
                "every child object is applied".to_owned(),
            )
        } else {
            condition(
                "ChildrenApplied",
                false,
                "ApplyFailed",
                format!("the apiserver refused: {}", observed.refusals.join("; ")),
            )
        },
        if observed.redis_ready {
            condition(
                "RedisReady",
                true,
                "RedisReady",
                "Redis is ready".to_owned(),
            )
        } else {
            condition(
                "RedisReady",
                false,
                "Progressing",
                waiting("the managed Redis"),
            )
        },
        if observed.ingest_ready {
            condition(
                "IngestReady",
                true,
                "IngestReady",
                "every ingest replica is ready".to_owned(),
            )
        } else {
            condition("IngestReady", false, "Progressing", waiting("ingest"))
        },
        if pending.is_empty() {
            condition(
                "CollectorsReady",
                true,
                "CollectorsReady",
                "every collector is ready".to_owned(),
            )
        } else {
            condition(
                "CollectorsReady",
                false,
                "Progressing",
                waiting(&format!("collectors {}", pending.join(", "))),
            )
        },
    ];
    let first_problem = conditions.iter().find(|c| c.status != "True").cloned();
    if !topics.topics.is_empty() {
        conditions.push(if topics.single_copy.is_empty() {
            condition(
                "Replicated",
                true,
                "Replicated",
                "every topic has more than one replica".to_owned(),
            )
        } else {
            condition(
                "Replicated",
                false,
                "SingleCopy",
                format!(
                    "{} topics have a single replica ({}): losing that broker's disk loses acknowledged events; set topic.replicationFactor to 3 (min.insync.replicas 2) on a cluster of 3 or more brokers",
                    topics.single_copy.len(),
                    topics.single_copy.join(", ")
                ),
            )
        });
    }
    conditions.insert(
        0,
        match first_problem {
            None => condition("Ready", true, "Ready", "the pipeline is ready".to_owned()),
            Some(c) => condition(
                "Ready",
                false,
                &c.reason,
                format!("{}: {}", c.type_, c.message),
            ),
        },
    );
    PipelineConfigStatus {
        observed_generation: generation,
        conditions,
        streams: Some(observed.streams as i32),
        ready_collectors: Some(observed.collectors.iter().filter(|c| c.ready).count() as i32),
        topics: observed.topics.topics,
        created_topics: observed.topics.created,
        collectors: observed.collectors.into_iter().map(|c| c.status).collect(),
    }
}

/// Whether `new` reports single-copy topics that `old` did not (worth a Warning Event
/// once, not at every reconcile).
pub fn newly_single_copy(old: Option<&PipelineConfigStatus>, new: &PipelineConfigStatus) -> bool {
    let single = |s: &PipelineConfigStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Replicated" && c.status == "False")
    };
    single(new) && !old.is_some_and(single)
}

/// A condition of `status` by type.
pub fn condition<'a>(status: &'a PipelineConfigStatus, kind: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector(name: &str, ready: bool) -> CollectorObserved {
        CollectorObserved {
            status: CollectorStatus {
                name: name.to_owned(),
                replicas: i32::from(ready),
                desired_replicas: Some(1),
                lag: Some(0),
                idle_since: None,
            },
            ready,
        }
    }

    fn healthy() -> Observed {
        Observed {
            generation: Some(3),
            streams: 1,
            topics: TopicsObserved {
                ready: true,
                reason: "TopicsReady",
                message: "4 topics exist with the partitions the spec asks for".to_owned(),
                topics: vec![TopicStatus {
                    name: "shop.visit".to_owned(),
                    partitions: 6,
                }],
                single_copy: Vec::new(),
                created: vec!["shop.visit".to_owned()],
            },
            refusals: Vec::new(),
            redis_ready: true,
            ingest_ready: true,
            collectors: vec![collector("store", true), collector("files", true)],
        }
    }

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + seconds).expect("time")
    }

    /// (status, reason, message) of a condition.
    fn cond(s: &PipelineConfigStatus, kind: &str) -> (String, String, String) {
        let c = condition(s, kind).unwrap_or_else(|| panic!("no {kind}"));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn a_healthy_pipeline_is_ready_with_every_condition_true() {
        let s = status(healthy(), None, at(0));
        let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            [
                "Ready",
                "TopicsReady",
                "ChildrenApplied",
                "RedisReady",
                "IngestReady",
                "CollectorsReady",
                "Replicated"
            ]
        );
        assert!(s.conditions.iter().all(|c| c.status == "True"));
        assert_eq!(cond(&s, "Ready").1, "Ready");
        assert_eq!(cond(&s, "ChildrenApplied").1, "Applied");
        assert_eq!(cond(&s, "Replicated").1, "Replicated");
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.ready_collectors, Some(2));
        assert_eq!(s.streams, Some(1));
        assert_eq!(s.created_topics, ["shop.visit"]);
    }

    #[test]
    fn topic_problems_keep_their_reason_and_make_ready_false() {
        for reason in [
            "KafkaUnreachable",
            "KafkaSecretInvalid",
            "TopicError",
            "TopicNotOurs",
            "NotSupported",
        ] {
            let mut o = healthy();
            o.topics.ready = false;
            o.topics.reason = reason;
            o.topics.message = format!("what {reason} says");
            let s = status(o, None, at(0));
            assert_eq!(
                cond(&s, "TopicsReady"),
                ("False".into(), reason.into(), format!("what {reason} says"))
            );
            assert_eq!(
                cond(&s, "Ready"),
                (
                    "False".into(),
                    reason.into(),
                    format!("TopicsReady: what {reason} says")
                )
            );
        }
    }

    #[test]
    fn refused_children_are_listed_in_apply_failed() {
        let mut o = healthy();
        o.refusals = vec![
            "Deployment shop-ingest: exceeded quota".to_owned(),
            "Service shop-ingest: forbidden".to_owned(),
        ];
        let s = status(o, None, at(0));
        let (st, reason, message) = cond(&s, "ChildrenApplied");
        assert_eq!((st.as_str(), reason.as_str()), ("False", "ApplyFailed"));
        assert_eq!(
            message,
            "the apiserver refused: Deployment shop-ingest: exceeded quota; Service shop-ingest: forbidden"
        );
        assert_eq!(cond(&s, "Ready").1, "ApplyFailed");
    }

    #[test]
    fn workloads_not_ready_are_progressing_and_the_first_one_names_ready() {
        let mut o = healthy();
        o.redis_ready = false;
        o.ingest_ready = false;
        o.collectors = vec![collector("store", false), collector("files", true)];
        let s = status(o, None, at(0));
        assert_eq!(
            cond(&s, "RedisReady"),
            (
                "False".into(),
                "Progressing".into(),
                "waiting for the managed Redis to become ready".into()
            )
        );
        assert_eq!(
            cond(&s, "IngestReady"),
            (
                "False".into(),
                "Progressing".into(),
                "waiting for ingest to become ready".into()
            )
        );
        assert_eq!(
            cond(&s, "CollectorsReady"),
            (
                "False".into(),
                "Progressing".into(),
                "waiting for collectors store to become ready".into()
            )
        );
        assert_eq!(
            cond(&s, "Ready"),
            (
                "False".into(),
                "Progressing".into(),
                "RedisReady: waiting for the managed Redis to become ready".into()
            ),
            "the first condition that is not true"
        );
        assert_eq!(s.ready_collectors, Some(1));
    }

    #[test]
    fn single_copy_topics_are_reported_but_do_not_make_ready_false() {
        let mut o = healthy();
        o.topics.single_copy = vec!["shop.visit".to_owned(), "shop.visit.dlq".to_owned()];
        let s = status(o, None, at(0));
        let (st, reason, message) = cond(&s, "Replicated");
        assert_eq!((st.as_str(), reason.as_str()), ("False", "SingleCopy"));
        assert!(
            message.starts_with("2 topics have a single replica (shop.visit, shop.visit.dlq)"),
            "{message}"
        );
        assert_eq!(cond(&s, "Ready").0, "True");
        assert!(newly_single_copy(None, &s));
        assert!(!newly_single_copy(Some(&s), &s), "said once");
        assert!(!newly_single_copy(None, &status(healthy(), None, at(0))));
    }

    #[test]
    fn a_pipeline_without_topics_has_no_replicated_condition() {
        let mut o = healthy();
        o.topics.topics.clear();
        o.topics.ready = false;
        o.topics.reason = "KafkaUnreachable";
        let s = status(o, None, at(0));
        assert!(condition(&s, "Replicated").is_none());
    }

    #[test]
    fn transition_times_change_only_with_the_status() {
        let first = status(healthy(), None, at(0));
        assert_eq!(
            condition(&first, "Ready")
                .expect("ready")
                .last_transition_time,
            Time(at(0))
        );
        // Nothing changed: the same status, times included (so it is not written again).
        let again = status(healthy(), Some(&first), at(60));
        assert_eq!(again, first);
        // Ingest goes down: its condition and Ready move, the others keep their time.
        let mut o = healthy();
        o.ingest_ready = false;
        let down = status(o, Some(&again), at(120));
        let time = |s: &PipelineConfigStatus, kind| {
            condition(s, kind)
                .expect("condition")
                .last_transition_time
                .clone()
        };
        assert_eq!(time(&down, "IngestReady"), Time(at(120)));
        assert_eq!(time(&down, "Ready"), Time(at(120)));
        assert_eq!(time(&down, "TopicsReady"), Time(at(0)));
        // A message change alone is no transition.
        let mut o = healthy();
        o.ingest_ready = false;
        o.redis_ready = false;
        let later = status(o, Some(&down), at(180));
        assert_eq!(time(&later, "Ready"), Time(at(120)));
        assert_ne!(cond(&later, "Ready").2, cond(&down, "Ready").2);
    }
}
