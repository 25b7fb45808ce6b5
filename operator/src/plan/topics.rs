//! What to do with each topic of a pipeline: create it, leave it, grow its partitions, or
//! report that a change is not supported (partitions never shrink; the replication factor
//! is fixed once the topic exists).

use std::collections::{BTreeMap, BTreeSet};

use super::settings;
use crate::crd::{PipelineConfig, TopicSpec};

/// What to do with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicAction {
    /// Create it.
    Create {
        /// Topic.
        name: String,
        /// Partitions.
        partitions: i32,
        /// Replication factor.
        replication_factor: i32,
        /// Topic configuration.
        config: BTreeMap<String, String>,
    },
    /// Add partitions.
    Grow {
        /// Topic.
        name: String,
        /// Partitions now.
        from: i32,
        /// Partitions wanted.
        to: i32,
    },
    /// It exists as wanted (adopted when it was made by someone else).
    Keep {
        /// Topic.
        name: String,
        /// Partitions.
        partitions: i32,
    },
    /// It exists, was not created by the operator for this resource and is not named in
    /// the spec: left alone.
    NotOurs {
        /// Topic.
        name: String,
        /// Why, in words, and what to do.
        reason: String,
    },
    /// The change asked for cannot be made.
    NotSupported {
        /// Topic.
        name: String,
        /// Why, in words.
        reason: String,
    },
}

/// A topic as observed in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedTopic {
    /// Partitions.
    pub partitions: i32,
    /// Replication factor (of partition 0).
    pub replication_factor: i32,
}

/// The replication factor of a stream's topics: the spec's, else 3, or the number of
/// brokers when the cluster has fewer.
pub fn replication_factor(spec: &TopicSpec, brokers: i32) -> i32 {
    spec.replication_factor
        .unwrap_or_else(|| brokers.clamp(1, 3))
}

/// `config` with `min.insync.replicas: 2` added for 3 or more replicas, unless it is set.
fn in_sync(
    mut config: BTreeMap<String, String>,
    replication_factor: i32,
) -> BTreeMap<String, String> {
    if replication_factor >= 3 && !config.contains_key("min.insync.replicas") {
        config.insert("min.insync.replicas".to_owned(), "2".to_owned());
    }
    config
}

/// What to do with every topic of the resource: the streams' topics and their retry,
/// dead-letter and read topics. `observed` maps topic names to what exists; `brokers` is
/// the size of the cluster; `created` lists the topics the operator created for this
/// resource. Topics made with 3 or more replicas get `min.insync.replicas: 2` unless the
/// spec's config sets it. An existing topic the operator did not create is used only when
/// the stream names it in `topic.name`; otherwise it is left alone and reported.
pub fn topics(
    pc: &PipelineConfig,
    observed: &BTreeMap<String, ObservedTopic>,
    brokers: i32,
    created: &BTreeSet<String>,
) -> Vec<TopicAction> {
    let mut out = Vec::new();
    for (s, names) in pc.spec.streams.iter().zip(settings(pc).streams) {
        let replication_factor = replication_factor(&s.topic, brokers);
        let wanted = [
            (
                names.topic().to_owned(),
                in_sync(s.topic.config.clone(), replication_factor),
            ),
            (
                names.retry_topic(),
                in_sync(BTreeMap::new(), replication_factor),
            ),
            (
                names.dead_letter_topic(),
                in_sync(BTreeMap::new(), replication_factor),
            ),
            (
                names.read_topic(),
                in_sync(BTreeMap::new(), replication_factor),
            ),
        ];
        let adopt = s.topic.name.is_some();
        for (name, config) in wanted {
            let partitions = s.topic.partitions;
            out.push(match observed.get(&name) {
                Some(_) if !adopt && !created.contains(&name) => TopicAction::NotOurs {
                    reason: format!(
                        "topic {name} exists and was not created for this pipeline; to use it, name it in streams[{}].topic.name, else rename the pipeline or delete the topic",
                        s.name
                    ),
                    name,
                },
                None => TopicAction::Create {
                    name,
                    partitions,
                    replication_factor,
                    config,
                },
                Some(o) if o.partitions > partitions => TopicAction::NotSupported {
                    reason: format!(
                        "topic {name} has {} partitions and the spec asks for {partitions}; Kafka cannot remove partitions, so keep {} or more",
                        o.partitions, o.partitions
                    ),
                    name,
                },
                Some(o)
                    if s.topic.replication_factor.is_some()
                        && o.replication_factor != replication_factor =>
                {
                    TopicAction::NotSupported {
                    reason: format!(
                        "topic {name} has replication factor {} and the spec asks for {replication_factor}; the operator does not change it",
                        o.replication_factor
                    ),
                    name,
                }
                }
                Some(o) if o.partitions < partitions => TopicAction::Grow {
                    name,
                    from: o.partitions,
                    to: partitions,
                },
                Some(o) => TopicAction::Keep {
                    name,
                    partitions: o.partitions,
                },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;

    #[test]
    fn topics_are_created_grown_kept_or_refused() {
        let resource = pc(BASIC);
        let none = BTreeMap::new();
        let mine = BTreeSet::new();
        let plan = topics(&resource, &none, 1, &mine);
        assert_eq!(
            plan.len(),
            8,
            "topic, retry, dlq and reads for each of two streams"
        );
        assert_eq!(
            plan[0],
            TopicAction::Create {
                name: "prod.shop.visit".into(),
                partitions: 6,
                replication_factor: 1,
                config: BTreeMap::from([("retention.ms".to_owned(), "1000".to_owned())]),
            }
        );
        let names: Vec<&str> = plan
            .iter()
            .map(|a| match a {
                TopicAction::Create { name, .. } => name.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names[1..4],
            [
                "prod.shop.visit.retry",
                "prod.shop.visit.dlq",
                "prod.shop.visit.reads"
            ]
        );
        // Unset, the replication is 3 where the cluster has the brokers, with two in sync.
        let planned = topics(&resource, &none, 5, &mine);
        let TopicAction::Create {
            replication_factor,
            config,
            ..
        } = &planned[1]
        else {
            panic!("a topic to create: {:?}", planned[1])
        };
        assert_eq!(*replication_factor, 3);
        assert_eq!(config["min.insync.replicas"], "2");
        let seen = |p: i32, rf: i32| ObservedTopic {
            partitions: p,
            replication_factor: rf,
        };
        let observed = BTreeMap::from([
            ("prod.shop.visit".to_owned(), seen(3, 1)),
            ("prod.shop.visit.retry".to_owned(), seen(6, 1)),
            ("prod.shop.visit.dlq".to_owned(), seen(8, 1)),
            ("prod.shop.visit.reads".to_owned(), seen(6, 3)),
        ]);
        let created: BTreeSet<String> = observed.keys().cloned().collect();
        let mut explicit = pc(BASIC);
        explicit.spec.streams[0].topic.replication_factor = Some(1);
        let plan = topics(&explicit, &observed, 1, &created);
        assert_eq!(
            plan[0],
            TopicAction::Grow {
                name: "prod.shop.visit".into(),
                from: 3,
                to: 6
            }
        );
        assert_eq!(
            plan[1],
            TopicAction::Keep {
                name: "prod.shop.visit.retry".into(),
                partitions: 6
            }
        );
        let TopicAction::NotSupported { reason, .. } = &plan[2] else {
            panic!("{:?}", plan[2])
        };
        assert!(reason.contains("cannot remove partitions"), "{reason}");
        let TopicAction::NotSupported { reason, .. } = &plan[3] else {
            panic!("{:?}", plan[3])
        };
        assert!(reason.contains("replication factor 3"), "{reason}");
    }

    #[test]
    fn names_are_scoped_by_namespace_and_pipeline_and_others_topics_are_left_alone() {
        let here = pc(BASIC);
        let there = pc(&BASIC.replace("namespace: prod", "namespace: staging"));
        let groups = |p: &PipelineConfig| names::collector_group(p, "to-redis");
        assert_eq!(groups(&here), "prod.shop.to-redis");
        assert_ne!(groups(&here), groups(&there), "one name in two namespaces");
        let settings_here = settings(&here);
        assert_eq!(settings_here.streams[0].topic(), "prod.shop.visit");
        assert_eq!(
            settings_here.streams[0].dead_letter_topic(),
            "prod.shop.visit.dlq"
        );
        assert_ne!(
            settings_here.streams[0].topic(),
            settings(&there).streams[0].topic()
        );

        // A topic of that name that the operator did not create is not used...
        let observed = BTreeMap::from([(
            "prod.shop.visit".to_owned(),
            ObservedTopic {
                partitions: 6,
                replication_factor: 1,
            },
        )]);
        let plan = topics(&here, &observed, 1, &BTreeSet::new());
        let TopicAction::NotOurs { name, reason } = &plan[0] else {
            panic!("{:?}", plan[0])
        };
        assert_eq!(name, "prod.shop.visit");
        assert!(reason.contains("streams[visit].topic.name"), "{reason}");
        assert!(matches!(plan[1], TopicAction::Create { .. }));
        // ...unless the spec names it.
        let mut named = here.clone();
        named.spec.streams[0].topic.name = Some("prod.shop.visit".to_owned());
        let plan = topics(&named, &observed, 1, &BTreeSet::new());
        assert_eq!(
            plan[0],
            TopicAction::Keep {
                name: "prod.shop.visit".into(),
                partitions: 6
            }
        );
    }
}
