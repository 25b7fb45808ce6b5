//! The monitoring the chart ships (charts/sluice/monitoring): the alert rules and the
//! Grafana dashboard, checked with promtool (built from the Go module proxy by
//! scripts/promtool) and against the metrics the three services really export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// Families the dashboard leaves out on purpose, and why.
const NOT_CHARTED: [(&str, &str); 4] = [
    (
        "sluice_ingest_http_requests_in_flight",
        "the request rate and latency say more",
    ),
    (
        "sluice_ingest_draining",
        "a pod drains for seconds while it stops",
    ),
    (
        "sluice_collector_sink_unavailable_since_seconds",
        "a timestamp: the sink-available panel shows the outage",
    ),
    (
        "sluice_operator_certificate_reloads",
        "a renewal every few weeks; the operator logs each",
    ),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn monitoring(file: &str) -> PathBuf {
    repo().join("charts/sluice/monitoring").join(file)
}

/// promtool, built once by scripts/promtool.
fn promtool() -> PathBuf {
    let out = Command::new(repo().join("scripts/promtool"))
        .output()
        .expect("scripts/promtool runs");
    assert!(
        out.status.success(),
        "scripts/promtool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn run_promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every family the services export once each thing they count has happened, from their
/// own registries: the series names Prometheus stores for it (`_total` for counters,
/// `_bucket`, `_sum` and `_count` for histograms), by family.
fn exported() -> Vec<(String, Vec<String>)> {
    let second = Duration::from_secs(1);
    let ingest = sluice_ingest::metrics::Metrics::new();
    let route = ingest.route("/v1/streams/{stream}/events");
    route.started();
    route.finished("POST", 202, second);
    ingest.produced("visit", 1);
    ingest.rejected("visit", "schema");
    ingest.delivery_failed("visit");
    ingest.connection_opened("tcp");
    ingest.sink_ack("visit", "written");
    ingest.unauthorized("tcp-write");
    ingest.api_key_reload("ok");
    let collector = sluice_collector::metrics::Metrics::new();
    collector.sink_available("redis", None);
    collector.sink_error("redis", "unavailable");
    collector.consumed("visit", 1);
    collector.written("redis", "visit", 1, second);
    collector.retried("visit", 1);
    collector.dead_lettered("visit", 1);
    collector.lag("visit", 0, 1);
    collector.confirmations("sent", 1);
    let operator = sluice_operator::metrics::Metrics::new();
    operator.reconciled(0.1, Some("kube"));
    operator.set_leader(true);
    operator.lag_query("ok");
    operator.certificate_reload("ok");
    let texts = [
        ingest.encode(0, true, false),
        collector.encode(),
        operator.encode(),
    ];
    let mut families = Vec::new();
    for text in texts {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("# TYPE <name> <kind>");
            let series = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            };
            families.push((name.to_owned(), series));
        }
    }
    assert!(
        families.len() >= 20,
        "the services register their metrics: {families:?}"
    );
    families
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("sluice_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.insert(word);
    }
    names
}

fn rules() -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(monitoring("rules.yaml")).expect("rules.yaml"))
        .expect("rules.yaml is YAML")
}

/// The rules' expressions, by alert name.
fn alerts() -> Vec<(String, String)> {
    rules()["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .map(|r| {
            (
                r["alert"].as_str().expect("alert rules only").to_owned(),
                r["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

/// Every query of the dashboard, with Grafana's variables put in as a user's choice would:
/// the panels' targets, and the selectors of the variables' `label_values` queries.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring("dashboard.json")).expect("dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("list") {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"].as_str().expect("query");
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector.to_owned())
            .unwrap_or_else(|| panic!("a label_values query: {query}"));
        queries.push(inner);
    }
    queries
        .into_iter()
        .map(|q| {
            let q = q
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*")
                .replace("$pipeline", ".*");
            assert!(!q.contains('$'), "a variable the test does not know: {q}");
            q
        })
        .collect()
}

#[test]
fn the_alert_rules_pass_promtools_checks_and_their_unit_tests() {
    let checked = run_promtool(
        &[
            "check",
            "rules",
            monitoring("rules.yaml").to_str().expect("path"),
        ],
        &repo(),
    );
    println!("{checked}");
    let tested = run_promtool(
        &["test", "rules", "rules.test.yaml"],
        &repo().join("tests/prometheus"),
    );
    println!("{tested}");

    // Each alert is shown to fire at least once.
    let tests: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("tests/prometheus/rules.test.yaml"))
            .expect("rules.test.yaml"),
    )
    .expect("YAML");
    let fired: BTreeSet<&str> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .filter(|a| a["exp_alerts"].as_sequence().is_some_and(|e| !e.is_empty()))
        .map(|a| a["alertname"].as_str().expect("alertname"))
        .collect();
    for (alert, _) in alerts() {
        assert!(
            fired.contains(alert.as_str()),
            "{alert} has no test in which it fires"
        );
    }
}

#[test]
fn the_dashboards_queries_are_valid_promql() {
    // promtool parses them as it parses any rule: each query becomes a recording rule.
    let queries = dashboard_queries();
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(
            |(i, expr)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}),
        )
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(
        &path,
        serde_yaml_ng::to_string(&file).expect("YAML of the queries"),
    )
    .expect("write");
    let out = run_promtool(
        &["check", "rules", path.to_str().expect("path")],
        dir.path(),
    );
    assert!(
        out.contains(&format!("{} rules found", queries.len())),
        "{out}"
    );
}

#[test]
fn every_metric_the_dashboard_and_the_rules_read_is_exported_and_every_export_is_charted() {
    let families = exported();
    let series: BTreeSet<&str> = families
        .iter()
        .flat_map(|(_, s)| s.iter().map(String::as_str))
        .collect();
    let dashboard = dashboard_queries();
    let mut read: Vec<(String, String)> = dashboard
        .iter()
        .map(|q| ("the dashboard".to_owned(), q.clone()))
        .collect();
    read.extend(alerts().into_iter().map(|(a, e)| (format!("alert {a}"), e)));
    for (who, expr) in &read {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{who} reads no Sluice metric: {expr}");
        for name in names {
            assert!(
                series.contains(name.as_str()),
                "{who} reads {name}, which no Sluice service exports (exported: {series:?})"
            );
        }
    }

    // And the other way: the dashboard shows every family but the few left out on purpose.
    let charted: BTreeSet<String> = dashboard.iter().flat_map(|q| metric_names(q)).collect();
    for (family, names) in &families {
        if NOT_CHARTED.iter().any(|(n, _)| n == family) {
            continue;
        }
        assert!(
            names.iter().any(|n| charted.contains(n)),
            "{family} is exported but not on the dashboard: chart it or list it in NOT_CHARTED"
        );
    }
    for (family, _) in NOT_CHARTED {
        assert!(
            families.iter().any(|(f, _)| f == family),
            "{family} is listed as not charted but is not exported"
        );
    }
}
