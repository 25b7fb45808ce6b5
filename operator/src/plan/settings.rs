//! The pipeline settings every service reads, rendered into the ConfigMap in the same file
//! format as `scripts/local-pipeline.yaml`, and where ingest reads each stream's records.

use sluice_core::settings::{
    AggregateSettings, PipelineSettings, RecordStore, RetrySettings, StoreKind, StreamSettings,
};

use super::names;
use crate::crd::{PipelineConfig, SqlSinkSpec};

/// The pipeline settings rendered from the resource.
pub fn settings(pc: &PipelineConfig) -> PipelineSettings {
    PipelineSettings {
        streams: pc
            .spec
            .streams
            .iter()
            .map(|s| {
                let mut out = StreamSettings::new(&s.name);
                out.topic = Some(names::topic(pc, s));
                out.partitions = s.topic.partitions;
                out.key = s.key.clone();
                out.schema = s.schema.clone();
                out.dimensions = s.dimensions.clone();
                // An `ack=sink` answer waits for every collector of the stream.
                out.ack_by = pc
                    .spec
                    .collectors
                    .iter()
                    .filter(|c| c.streams.contains(&s.name))
                    .map(|c| names::collector_group(pc, &c.name))
                    .collect();
                out.store = record_store(pc, &s.name).map(|(kind, sql)| RecordStore {
                    kind,
                    table: sql.table.clone(),
                });
                out
            })
            .collect(),
        retry: RetrySettings {
            max_attempts: u32::try_from(pc.spec.retry.max_attempts)
                .unwrap_or(1)
                .max(1),
            backoff: pc.spec.retry.backoff.clone(),
        },
        aggregates: AggregateSettings {
            minute_retention: pc.spec.aggregates.minute_retention.clone(),
            hour_retention: pc.spec.aggregates.hour_retention.clone(),
        },
    }
}

/// Where ingest reads a stream's records: Redis when a collector of the stream writes
/// there, else the table of its first PostgreSQL or MySQL collector, if any.
pub(super) fn record_store<'a>(
    pc: &'a PipelineConfig,
    stream: &str,
) -> Option<(StoreKind, &'a SqlSinkSpec)> {
    let collectors: Vec<_> = pc
        .spec
        .collectors
        .iter()
        .filter(|c| c.streams.iter().any(|s| s == stream))
        .collect();
    if collectors.iter().any(|c| c.sink.redis.is_some()) {
        return None;
    }
    collectors.iter().find_map(|c| {
        c.sink
            .postgres
            .as_ref()
            .map(|sql| (StoreKind::Postgres, sql))
            .or_else(|| c.sink.mysql.as_ref().map(|sql| (StoreKind::Mysql, sql)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;
    use serde_json::json;

    #[test]
    fn settings_are_the_services_file_format() {
        let s = settings(&pc(BASIC));
        let text = s.to_yaml();
        let back = PipelineSettings::from_yaml(&text).expect("the services accept it");
        assert_eq!(back.streams[0].partitions, 6);
        assert_eq!(back.streams[0].key.as_deref(), Some("/userId"));
        assert_eq!(back.streams[0].dimensions, ["/type"]);
        assert_eq!(
            back.streams[0].ack_by,
            ["prod.shop.to-redis", "prod.shop.archive", "prod.shop.db"],
            "ack=sink waits for every collector of the stream, by group"
        );
        assert_eq!(back.streams[1].ack_by, ["prod.shop.chat"]);
        assert_eq!(back.retry.max_attempts, 3);
        assert_eq!(back.retry.backoff, "2s");
        assert_eq!(back.aggregates.minute_ttl().as_secs(), 7200);
        assert_eq!(back.aggregates.hour_retention, "2160h", "the default");
    }

    #[test]
    fn a_stream_without_a_redis_collector_is_read_from_its_sql_table() {
        let store = pc(&BASIC.replace(
            "    - {name: messages, key: /touser}",
            "    - {name: messages, key: /touser}\n    - {name: records}",
        )
        .replace(
            "    - {name: db, streams: [visit], sink: {postgres: {secretName: pg}}}",
            "    - {name: db, streams: [visit], sink: {postgres: {secretName: pg}}}\n    - {name: kv, streams: [records], sink: {mysql: {secretName: my, table: kv_records}}}",
        ));
        let s = settings(&store);
        assert_eq!(s.streams[0].store, None, "visit has a Redis collector");
        assert_eq!(
            s.streams[2].store,
            Some(RecordStore {
                kind: StoreKind::Mysql,
                table: "kv_records".to_owned()
            })
        );
        let c = children(&store, &Images::default());
        assert_eq!(
            env_of(&c.ingest)["SLUICE_DATABASE_URL"]["secretKeyRef"],
            json!({"name": "my", "key": "url"})
        );
        let plain = children(&pc(BASIC), &Images::default());
        assert!(!env_of(&plain.ingest).contains_key("SLUICE_DATABASE_URL"));
    }
}
