//! The Grafana dashboard, `deploy/grafana/switchboard.json`, against a live broker: every metric
//! its queries name is one the broker exports, so no panel stays empty because of a name that was
//! renamed or never existed.

use std::collections::BTreeSet;

use serde_json::Value;
use switchboard_client::{Publish, SchemaPut, Start};
use switchboard_e2e::{eventually, http_request};

use crate::common::*;
use crate::observability::scrape;

const DASHBOARD: &str = include_str!("../../deploy/grafana/switchboard.json");

/// Every PromQL expression of the dashboard: the panels' targets and the template variables'
/// queries.
fn queries(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            found.push(
                target["expr"]
                    .as_str()
                    .expect("a target has expr")
                    .to_owned(),
            );
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            found.push(query.to_owned());
        }
    }
    found
}

/// The metric names an expression uses: its identifiers that start with `switchboard_` or
/// `process_`, outside string literals (label values) and not Grafana variables (`$__…`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut in_string = false;
    let mut after_dollar = false;
    let mut previous = ' ';
    for c in expr.chars().chain(std::iter::once(' ')) {
        if in_string {
            in_string = !(c == '"' && previous != '\\');
        } else if c == '"' {
            in_string = true;
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            if word.is_empty() {
                after_dollar = previous == '$';
            }
            word.push(c);
        } else if !word.is_empty() {
            if !after_dollar && (word.starts_with("switchboard_") || word.starts_with("process_")) {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
        previous = c;
    }
    names
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metric_names(
            r#"sum by (le) (rate(switchboard_a_bucket{instance=~"$instance",x="switchboard_no"}[$__rate_interval])) / process_b"#
        ),
        ["process_b", "switchboard_a_bucket"]
            .map(str::to_owned)
            .into_iter()
            .collect()
    );
    assert!(metric_names(r#"label_values(up, instance)"#).is_empty());
}

#[test]
fn the_dashboard_is_well_formed_and_covers_what_operators_watch() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "switchboard");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{panel}");
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{}", panel["title"]);
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                assert!(!metric_names(expr).is_empty(), "no metric in {expr}");
                assert_eq!(
                    expr.matches('(').count(),
                    expr.matches(')').count(),
                    "{expr}"
                );
            }
        }
    }
    let used: BTreeSet<String> = queries(&dashboard)
        .iter()
        .flat_map(|expr| metric_names(expr))
        .collect();
    for wanted in [
        "switchboard_publishes_total",
        "switchboard_deliveries_total",
        "switchboard_live_publish_to_deliver_seconds_bucket",
        "switchboard_subscription_lag",
        "switchboard_access_refusals_total",
        "switchboard_entity_refusals_total",
        "switchboard_schema_drift_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not chart {wanted}"
        );
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let used: BTreeSet<String> = queries(&dashboard)
        .iter()
        .flat_map(|expr| metric_names(expr))
        .collect();
    assert!(used.len() >= 30, "{used:?}");

    let f = fixture(&[]).await;
    // The families that appear at their first event: a schema mismatch (drift) and a call from a
    // browser origin that is not allowed (an access refusal); and a live subscription, so that
    // the per-subscription gauges have a series.
    f.client
        .schema_put(SchemaPut::new(
            "crm.contact.*",
            "1.0.0",
            r#"{"type":"object","required":["id"]}"#,
        ))
        .await
        .unwrap();
    let refused = f
        .client
        .publish(Publish::new("crm.contact.updated", "{}"))
        .await;
    assert!(refused.is_err(), "the mismatch is refused");
    let origin = http_request(
        "POST",
        &format!("{}/v1/publish", f.broker.url()),
        &[("Origin", "http://elsewhere.example")],
        br#"{"channel":"a.b","payload":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(origin.status, 403, "{}", origin.body);
    let _subscription = f.client.subscribe("crm.>", Start::Earliest).await.unwrap();
    f.client
        .publish(Publish::new("crm.contact.updated", r#"{"id":1}"#))
        .await
        .unwrap();

    // Free disk space is measured on a timer: wait for it rather than for a fixed time.
    let missing = |exported: &BTreeSet<String>| -> Vec<String> {
        used.iter()
            .filter(|name| !exported.contains(*name))
            .cloned()
            .collect()
    };
    let found = eventually("every metric of the dashboard in the scrape", || async {
        missing(&scrape(&f.broker).await.exported_names())
            .is_empty()
            .then_some(())
    })
    .await;
    if let Err(e) = found {
        let missing = missing(&scrape(&f.broker).await.exported_names());
        panic!("{e}: the dashboard queries metrics the broker does not export: {missing:?}");
    }
}
