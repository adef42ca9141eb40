//! The chart's Grafana dashboard and PrometheusRule query only series that a real
//! running operator exports on /metrics.

use std::collections::BTreeSet;
use std::time::Duration;

use m3o_events::consumer::ensure_group;
use serde_json::{Value, json};

use crate::chart::{chart, chart_dir, documents, helm, kind_name, render};
use crate::support::{TestEnv, eventually};

/// Metric names in a Prometheus text exposition (histograms as their `_bucket`,
/// `_sum` and `_count` series).
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `m3o_...` identifier in a PromQL expression.
fn series_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("m3o_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` of the dashboard's panels, with the panel title.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut out = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr").to_owned();
            out.push((title.clone(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_and_alerts_name_only_exported_series() {
    let env = TestEnv::new("monitoring").await;
    let op = env.start_operator().await;
    env.apply_customer("alice", json!({"email": "alice@example.com"}))
        .await;
    env.wait_ready("alice").await;
    // A downstream consumer group, so that the per-group lag series exist.
    let redis = redis::Client::open(env.redis_url.as_str()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let stream = m3o_events::stream_key(&env.stream_prefix, m3o_events::customers::TOPIC);
    ensure_group(&mut conn, &stream, "billing")
        .await
        .expect("group");
    let names = eventually(
        "the consumer group's lag exported",
        Duration::from_secs(30),
        || async {
            let names = exported(&op.metrics().await);
            names
                .contains("m3o_operator_stream_consumer_group_lag")
                .then_some(names)
        },
    )
    .await;
    assert!(names.contains("m3o_operator_reconciles_total"), "{names:?}");

    // The dashboard as the chart ships it: a ConfigMap for the Grafana sidecar.
    let file = std::fs::read_to_string(chart_dir().join("dashboards/m3o-operator.json"))
        .expect("dashboard file");
    let rendered = render("t", "mon", &["metrics.dashboard.enabled=true"]).await;
    let configmap = documents(&rendered)
        .into_iter()
        .find(|d| kind_name(d) == ("ConfigMap".into(), "t-m3o-operator-dashboard".into()))
        .expect("dashboard ConfigMap");
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped = configmap["data"]["m3o-operator.json"]
        .as_str()
        .expect("json");
    let dashboard: Value = serde_json::from_str(shipped).expect("dashboard JSON");
    assert_eq!(
        dashboard,
        serde_json::from_str::<Value>(&file).expect("file JSON")
    );
    let mut queries = dashboard_exprs(&dashboard);

    // The alerts as the chart ships them.
    let rendered = render("t", "mon", &["metrics.prometheusRule.enabled=true"]).await;
    let rule = documents(&rendered)
        .into_iter()
        .find(|d| kind_name(d).0 == "PrometheusRule")
        .expect("PrometheusRule");
    for group in rule["spec"]["groups"].as_sequence().expect("groups") {
        for r in group["rules"].as_sequence().expect("rules") {
            let alert = r["alert"].as_str().expect("alert").to_owned();
            queries.push((alert, r["expr"].as_str().expect("expr").to_owned()));
        }
    }

    let mut unknown = Vec::new();
    let mut checked = 0;
    for (owner, expr) in &queries {
        let series = series_in(expr);
        assert!(
            !series.is_empty(),
            "{owner}: {expr} queries no operator series"
        );
        for s in &series {
            checked += 1;
            if !names.contains(s) {
                unknown.push(format!("{owner}: {s}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "series the operator does not export:\n{}",
        unknown.join("\n")
    );
    assert!(checked >= 20, "{checked} series checked");

    // Both off by default, and lint-clean when on.
    let defaults = render("t", "mon", &[]).await;
    assert!(!defaults.contains("PrometheusRule") && !defaults.contains("grafana_dashboard"));
    let chart = chart();
    let lint = helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "metrics.dashboard.enabled=true,metrics.prometheusRule.enabled=true",
    ])
    .await;
    assert!(
        !lint.contains("[WARNING]") && lint.contains("0 chart(s) failed"),
        "{lint}"
    );
}
