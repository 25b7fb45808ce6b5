//! The aggregates API: counts per minute or hour of a stream over a time range, with the
//! top values of its dimensions, read from the hashes the Redis sink keeps
//! (`sluice_core::store::minute_aggregate_key` and `hour_aggregate_key`).
//!
//! A range is cut into buckets of the resolution asked for (`minute`, `hour`, or chosen:
//! minutes up to a day, hours beyond); one query reads at most [`MAX_BUCKETS`] hashes, in
//! one round trip, so a long range costs what its hourly roll-ups cost.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use jiff::{SignedDuration, Timestamp};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sluice_core::store;
use utoipa::{IntoParams, ToSchema};

use crate::App;
use crate::error::{ApiError, Problem};

/// The most buckets one query reads.
pub const MAX_BUCKETS: i64 = 1_500;
/// Ranges up to this long are answered per minute when no resolution is asked for.
const MINUTES_UP_TO: SignedDuration = SignedDuration::from_hours(24);

/// Bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// One bucket per minute.
    Minute,
    /// One bucket per hour (the roll-ups).
    Hour,
}

impl Resolution {
    fn seconds(self) -> i64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3600,
        }
    }
}

/// The query string.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AggregatesQuery {
    /// Start of the range, RFC 3339 (`2026-12-01T10:00:00Z`); an hour before `to` when absent.
    #[param(format = DateTime)]
    pub from: Option<String>,
    /// End of the range (exclusive), RFC 3339; now when absent.
    #[param(format = DateTime)]
    pub to: Option<String>,
    /// `minute` or `hour`; minutes for ranges up to a day, hours beyond, when absent.
    pub resolution: Option<Resolution>,
    /// Only this dimension (a JSON pointer of the stream's `dimensions`); all when absent.
    pub dimension: Option<String>,
    /// How many top values per dimension (1 to 100, 10 when absent).
    #[param(minimum = 1, maximum = 100)]
    pub top: Option<usize>,
}

/// One bucket of the series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Bucket {
    /// Start of the bucket, RFC 3339.
    pub time: String,
    /// Events stored with an event time in the bucket.
    pub count: u64,
}

/// A value of a dimension and how many events had it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TopValue {
    /// The value, as text.
    pub value: String,
    /// Events with that value in the range.
    pub count: u64,
}

/// What the range holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Aggregates {
    /// The stream.
    pub stream: String,
    /// Start of the first bucket, RFC 3339.
    pub from: String,
    /// End of the last bucket (exclusive), RFC 3339.
    pub to: String,
    /// Bucket size.
    pub resolution: Resolution,
    /// Events in the range.
    pub total: u64,
    /// Every bucket of the range in order, empty ones included.
    pub series: Vec<Bucket>,
    /// Per dimension (JSON pointer), its most frequent values, most first.
    pub dimensions: BTreeMap<String, Vec<TopValue>>,
}

/// The buckets a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Bucket size.
    pub resolution: Resolution,
    /// Start of each bucket, in seconds since the epoch.
    pub starts: Vec<i64>,
}

impl Buckets {
    /// Cuts `[from, to)` into buckets of `resolution` (chosen from the length when absent):
    /// the first starts at `from` rounded down to the bucket size.
    pub fn plan(
        from: Timestamp,
        to: Timestamp,
        resolution: Option<Resolution>,
    ) -> Result<Self, String> {
        if from >= to {
            return Err(format!("from ({from}) must be before to ({to})"));
        }
        let resolution = resolution.unwrap_or(if to.duration_since(from) <= MINUTES_UP_TO {
            Resolution::Minute
        } else {
            Resolution::Hour
        });
        let size = resolution.seconds();
        let first = from.as_second().div_euclid(size) * size;
        let end = to.as_second();
        let count = (end - first + size - 1).div_euclid(size);
        if count > MAX_BUCKETS {
            let unit = match resolution {
                Resolution::Minute => "minutes",
                Resolution::Hour => "hours",
            };
            return Err(format!(
                "the range spans {count} {unit}; one query reads at most {MAX_BUCKETS}: shorten it{}",
                if resolution == Resolution::Minute {
                    " or ask for resolution=hour"
                } else {
                    ""
                }
            ));
        }
        Ok(Self {
            resolution,
            starts: (0..count).map(|i| first + i * size).collect(),
        })
    }
}

/// Adds up the hashes read for `buckets` (one per bucket, in order, empty when absent):
/// the series, the total and the `top` values of each of `dimensions`.
pub fn summarize(
    stream: &str,
    buckets: &Buckets,
    hashes: &[HashMap<String, u64>],
    dimensions: &[String],
    top: usize,
) -> Aggregates {
    let time = |s: i64| Timestamp::from_second(s).map_or_else(|_| s.to_string(), |t| t.to_string());
    let mut series = Vec::with_capacity(buckets.starts.len());
    let mut values: BTreeMap<&str, HashMap<&str, u64>> = dimensions
        .iter()
        .map(|d| (d.as_str(), HashMap::new()))
        .collect();
    for (start, hash) in buckets.starts.iter().zip(hashes) {
        series.push(Bucket {
            time: time(*start),
            count: hash.get("count").copied().unwrap_or(0),
        });
        for (field, n) in hash {
            let Some((pointer, value)) = field.split_once('=') else {
                continue;
            };
            if let Some(counts) = values.get_mut(pointer) {
                *counts.entry(value).or_default() += n;
            }
        }
    }
    let dimensions = values
        .into_iter()
        .map(|(pointer, counts)| {
            let mut ranked: Vec<TopValue> = counts
                .into_iter()
                .map(|(value, count)| TopValue {
                    value: value.to_owned(),
                    count,
                })
                .collect();
            ranked.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.value.cmp(&b.value)));
            ranked.truncate(top);
            (pointer.to_owned(), ranked)
        })
        .collect();
    let size = buckets.resolution.seconds();
    Aggregates {
        stream: stream.to_owned(),
        from: time(buckets.starts.first().copied().unwrap_or_default()),
        to: time(buckets.starts.last().map_or(0, |s| s + size)),
        resolution: buckets.resolution,
        total: series.iter().map(|b| b.count).sum(),
        series,
        dimensions,
    }
}

fn timestamp(name: &str, text: &str) -> Result<Timestamp, ApiError> {
    text.parse().map_err(|e| {
        ApiError::Query(format!(
            "{name} {text:?} is not an RFC 3339 time such as 2026-12-01T10:00:00Z: {e}"
        ))
    })
}

async fn read_hashes(
    conn: &mut ConnectionManager,
    keys: &[String],
) -> redis::RedisResult<Vec<HashMap<String, u64>>> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.hgetall(key);
    }
    pipe.query_async(conn).await
}

/// Counts of a stream over a time range.
///
/// Events per minute or hour (by event time) over `[from, to)`, the total, and the most
/// frequent values of the stream's dimensions, from the aggregates the Redis sink keeps
/// (minutes and hours, each for the pipeline's `aggregates` retention). Read from the Redis
/// replica, or the primary when the replica cannot answer.
#[utoipa::path(
    get,
    path = "/v1/streams/{stream}/aggregates",
    params(("stream" = String, Path, description = "Stream name"), AggregatesQuery),
    responses(
        (status = 200, description = "The counts", body = Aggregates),
        (status = 400, description = "Invalid parameters: a time that is not RFC 3339, `from` not before `to`, a range of more than 1500 buckets, or a dimension the stream does not count", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The record store is unreachable; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn aggregates(
    State(app): State<App>,
    Path(stream): Path<String>,
    query: Result<Query<AggregatesQuery>, QueryRejection>,
) -> Result<Json<Aggregates>, ApiError> {
    let stream = app.inner.streams.get(&stream)?.settings.clone();
    let Query(q) = query.map_err(|e| ApiError::Query(e.body_text()))?;
    let to = match &q.to {
        Some(t) => timestamp("to", t)?,
        None => Timestamp::now(),
    };
    let from = match &q.from {
        Some(f) => timestamp("from", f)?,
        None => to - SignedDuration::from_hours(1),
    };
    let top = q.top.unwrap_or(10);
    if !(1..=100).contains(&top) {
        return Err(ApiError::Query(format!(
            "top must be from 1 to 100, not {top}"
        )));
    }
    let dimensions = match &q.dimension {
        Some(d) if stream.dimensions.contains(d) => vec![d.clone()],
        Some(d) => {
            return Err(ApiError::Query(format!(
                "stream {:?} has no dimension {d:?}; its dimensions: {}",
                stream.name,
                if stream.dimensions.is_empty() {
                    "none".to_owned()
                } else {
                    stream.dimensions.join(", ")
                }
            )));
        }
        None => stream.dimensions.clone(),
    };
    let buckets = Buckets::plan(from, to, q.resolution).map_err(ApiError::Query)?;
    let prefix = &app.inner.key_prefix;
    let keys: Vec<String> = buckets
        .starts
        .iter()
        .map(|s| match buckets.resolution {
            Resolution::Minute => store::minute_aggregate_key(prefix, &stream.name, *s),
            Resolution::Hour => store::hour_aggregate_key(prefix, &stream.name, *s),
        })
        .collect();
    let mut hashes = None;
    if let Some(replica) = &app.inner.replica {
        match read_hashes(&mut replica.clone(), &keys).await {
            Ok(h) => hashes = Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "redis replica read failed; asking the primary");
            }
        }
    }
    let hashes = match hashes {
        Some(h) => h,
        None => read_hashes(&mut app.inner.redis.clone(), &keys)
            .await
            .map_err(ApiError::Store)?,
    };
    Ok(Json(summarize(
        &stream.name,
        &buckets,
        &hashes,
        &dimensions,
        top,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn ranges_are_cut_into_minutes_up_to_a_day_and_hours_beyond() {
        let b = Buckets::plan(t("2026-12-01T10:00:30Z"), t("2026-12-01T10:03:00Z"), None)
            .expect("plan");
        assert_eq!(b.resolution, Resolution::Minute);
        let first = t("2026-12-01T10:00:00Z").as_second();
        assert_eq!(b.starts, [first, first + 60, first + 120]);
        let day = Buckets::plan(t("2026-12-01T00:00:00Z"), t("2026-12-02T00:00:00Z"), None)
            .expect("plan");
        assert_eq!(
            (day.resolution, day.starts.len()),
            (Resolution::Minute, 1440)
        );
        let week = Buckets::plan(t("2026-12-01T00:00:00Z"), t("2026-12-08T00:00:00Z"), None)
            .expect("plan");
        assert_eq!(
            (week.resolution, week.starts.len()),
            (Resolution::Hour, 168)
        );
    }

    #[test]
    fn a_range_too_long_or_backwards_is_refused_with_what_to_do() {
        let long = Buckets::plan(
            t("2026-12-01T00:00:00Z"),
            t("2026-12-03T00:00:00Z"),
            Some(Resolution::Minute),
        )
        .expect_err("too long");
        assert!(
            long.contains("2880 minutes") && long.contains("resolution=hour"),
            "{long}"
        );
        let back = Buckets::plan(t("2026-12-02T00:00:00Z"), t("2026-12-01T00:00:00Z"), None)
            .expect_err("backwards");
        assert!(back.contains("must be before"), "{back}");
    }

    #[test]
    fn counts_add_up_per_bucket_and_dimension_values_are_ranked() {
        let b = Buckets::plan(t("2026-12-01T10:00:00Z"), t("2026-12-01T10:03:00Z"), None)
            .expect("plan");
        let hash = |pairs: &[(&str, u64)]| -> HashMap<String, u64> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
        };
        let hashes = [
            hash(&[
                ("count", 3),
                ("/page=/a", 2),
                ("/page=/b", 1),
                ("/type=x", 3),
            ]),
            hash(&[]),
            hash(&[("count", 4), ("/page=/b", 4), ("/type=x", 4)]),
        ];
        let a = summarize("visit", &b, &hashes, &["/page".to_owned()], 10);
        assert_eq!(a.total, 7);
        let counts: Vec<u64> = a.series.iter().map(|b| b.count).collect();
        assert_eq!(counts, [3, 0, 4]);
        assert_eq!(a.series[1].time, "2026-12-01T10:01:00Z");
        assert_eq!(
            (a.from.as_str(), a.to.as_str()),
            ("2026-12-01T10:00:00Z", "2026-12-01T10:03:00Z")
        );
        assert_eq!(
            a.dimensions["/page"],
            [
                TopValue {
                    value: "/b".into(),
                    count: 5
                },
                TopValue {
                    value: "/a".into(),
                    count: 2
                }
            ]
        );
        assert!(
            !a.dimensions.contains_key("/type"),
            "only the dimensions asked for"
        );
        let one = summarize("visit", &b, &hashes, &["/page".to_owned()], 1);
        assert_eq!(one.dimensions["/page"].len(), 1);
    }
}
