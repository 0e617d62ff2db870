//! Observability of a running broker: Prometheus metrics and health on the admin listener, gRPC
//! health and reflection on the public listener, audit lines for refusals.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use switchboard_client::{Client, Publish, Reason, Start, SubscribeOptions};
use switchboard_e2e::{eventually, http_get, BrokerProcess};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::common::*;

/// One sample of a scrape: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug)]
pub(crate) struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    /// The sum of the samples called `name` whose labels include every pair of `labels` (0 when
    /// there is none: a counter not incremented yet is absent).
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Every series name a query can select from this scrape: the names of its samples, and of
    /// every family it declares (`TYPE`), a histogram as its `_bucket`, `_sum` and `_count` (a
    /// family with no series yet, such as a subscription gauge with no subscription, still counts).
    pub(crate) fn exported_names(&self) -> std::collections::BTreeSet<String> {
        let mut names: std::collections::BTreeSet<String> =
            self.samples.iter().map(|s| s.name.clone()).collect();
        for (family, kind) in &self.types {
            match kind.as_str() {
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{family}{suffix}"));
                    }
                }
                "summary" => {
                    names.insert(family.clone());
                    for suffix in ["_sum", "_count"] {
                        names.insert(format!("{family}{suffix}"));
                    }
                }
                _ => {
                    names.insert(family.clone());
                }
            }
        }
        names
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{k="v",...}` (after the name); returns the labels and the rest of the line.
fn parse_labels(line: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = line
        .strip_prefix('{')
        .ok_or_else(|| format!("expected '{{' in {line:?}"))?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("label without '=' in {line:?}"))?;
        let name = name.trim();
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?} in {line:?}"));
        }
        let mut chars = after
            .strip_prefix('"')
            .ok_or_else(|| format!("label value not quoted in {line:?}"))?
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in {line:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {line:?}")),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name:?} repeated in {line:?}"));
        }
        rest = &after[1 + end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text
            .parse()
            .map_err(|_| format!("bad sample value {text:?}")),
    }
}

/// Parses the Prometheus text exposition format (0.0.4), strictly enough to catch what a scraper
/// would reject: every sample line is `name[{labels}] value [timestamp]` with a float value, `TYPE`
/// comes at most once per family and before its samples, and a family's samples are not split.
fn parse_prometheus(text: &str) -> Result<Scrape, String> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut types = BTreeMap::new();
    let mut finished_families: Vec<String> = Vec::new();
    let mut current_family: Option<String> = None;
    let family_of = |name: &str, types: &BTreeMap<String, String>| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if matches!(
                    types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                ) {
                    return base.to_owned();
                }
            }
        }
        name.to_owned()
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().ok_or(format!("TYPE without name: {line:?}"))?;
                    let kind = words.next().ok_or(format!("TYPE without type: {line:?}"))?;
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(format!("unknown type in {line:?}"));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(format!("TYPE repeated for {name}"));
                    }
                    if samples.iter().any(|s| family_of(&s.name, &types) == name) {
                        return Err(format!("TYPE for {name} after its samples"));
                    }
                }
                Some("HELP") => {
                    let name = words.next().ok_or(format!("HELP without name: {line:?}"))?;
                    if !is_metric_name(name) {
                        return Err(format!("bad metric name in {line:?}"));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("bad metric name {name:?} in {line:?}"));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or(format!("no value in {line:?}"))?)?;
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<i64>()
                .map_err(|_| format!("bad timestamp in {line:?}"))?;
        }
        if fields.next().is_some() {
            return Err(format!("trailing text in {line:?}"));
        }
        let family = family_of(name, &types);
        if current_family.as_deref() != Some(family.as_str()) {
            if finished_families.contains(&family) {
                return Err(format!("samples of {family} are not together"));
            }
            if let Some(previous) = current_family.replace(family.clone()) {
                finished_families.push(previous);
            }
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(Scrape { samples, types })
}

pub(crate) async fn scrape(broker: &BrokerProcess) -> Scrape {
    let response = http_get(&format!("{}/metrics", broker.admin_url()))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse_prometheus(&response.body)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{}", response.body))
}

#[test]
fn the_parser_rejects_what_a_scraper_would() {
    let good = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\nb 1e3 1700000000\n";
    let parsed = parse_prometheus(good).unwrap();
    assert_eq!(parsed.sum("a_total", &[("y", "q\"\\")]), 3.0);
    assert_eq!(parsed.sum("b", &[]), 1000.0);
    for bad in [
        "a 1 2 3\n",
        "a{x=1} 1\n",
        "a{x=\"1\" 1\n",
        "1a 1\n",
        "a one\n",
        "# TYPE a counter\n# TYPE a counter\na 1\n",
        "a 1\nb 1\na 2\n",
        "a 1\n# TYPE a counter\n",
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let f = fixture(&[]).await;
    let before = scrape(&f.broker).await;
    for (name, kind) in [
        ("switchboard_publishes_total", "counter"),
        ("switchboard_deliveries_total", "counter"),
        ("switchboard_publish_to_deliver_seconds", "histogram"),
        ("switchboard_commit_seconds", "histogram"),
        ("switchboard_commit_batch_items", "histogram"),
        ("switchboard_log_sync_seconds", "histogram"),
        ("switchboard_apply_seconds", "histogram"),
        ("switchboard_store_bytes", "gauge"),
        ("switchboard_disk_bytes", "gauge"),
        ("switchboard_storage_full", "gauge"),
        ("switchboard_last_offset", "gauge"),
        ("switchboard_loops_detected_total", "counter"),
        ("switchboard_raft_term", "gauge"),
        ("switchboard_raft_leader_id", "gauge"),
        ("switchboard_raft_is_leader", "gauge"),
        ("switchboard_raft_committed_index", "gauge"),
        ("switchboard_raft_applied_index", "gauge"),
        ("switchboard_subscription_lag", "gauge"),
        ("switchboard_subscription_queue_messages", "gauge"),
        ("switchboard_subscription_queue_bytes", "gauge"),
    ] {
        // Every family is declared from the first scrape, histograms too (issue 25).
        assert_eq!(
            before.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
    }
    assert_eq!(before.sum("switchboard_raft_is_leader", &[]), 1.0);
    assert_eq!(before.sum("switchboard_raft_leader_id", &[]), 1.0);
    assert!(before.sum("switchboard_raft_term", &[]) >= 1.0);
    assert!(before.has("switchboard_disk_bytes"));

    let mut subscription = f.client.subscribe("obs.>", Start::Latest).await.unwrap();
    const ACCEPTED: usize = 5;
    const REFUSED: usize = 3;
    for i in 0..ACCEPTED {
        f.client
            .publish(Publish::new("obs.metrics.moved", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    for _ in 0..REFUSED {
        let err = f
            .client
            .publish(Publish::new("obs..bad", "{}"))
            .await
            .expect_err("a bad channel is refused");
        assert_eq!(err.reason(), Some(Reason::ChannelInvalid));
    }
    let delivered = take(&mut subscription, ACCEPTED).await;
    assert_eq!(delivered.len(), ACCEPTED);
    let last_offset = delivered.last().map(|m| m.offset).unwrap_or_default();

    let accepted = [("result", "accepted")];
    let refused = [("result", "refused"), ("reason", "CHANNEL_INVALID")];
    let moved = eventually("the counters to move", || async {
        let now = scrape(&f.broker).await;
        let moved = now.sum("switchboard_publishes_total", &accepted)
            - before.sum("switchboard_publishes_total", &accepted)
            == ACCEPTED as f64
            && now.sum("switchboard_publishes_total", &refused)
                - before.sum("switchboard_publishes_total", &refused)
                == REFUSED as f64
            && now.sum("switchboard_deliveries_total", &[])
                - before.sum("switchboard_deliveries_total", &[])
                >= ACCEPTED as f64
            && now.sum("switchboard_publish_to_deliver_seconds_count", &[])
                - before.sum("switchboard_publish_to_deliver_seconds_count", &[])
                >= ACCEPTED as f64
            && now.sum("switchboard_last_offset", &[]) == last_offset as f64;
        moved.then_some(now)
    })
    .await;
    let after = match moved {
        Ok(after) => after,
        Err(e) => {
            let now = http_get(&format!("{}/metrics", f.broker.admin_url())).await;
            panic!(
                "{e}; the last scrape:\n{}",
                now.map(|r| r.body).unwrap_or_default()
            )
        }
    };

    // Each accepted publish went through a committed log entry.
    assert!(after.sum("switchboard_commit_seconds_count", &[]) >= 1.0);
    assert!(
        after.sum("switchboard_commit_batch_items_sum", &[])
            - before.sum("switchboard_commit_batch_items_sum", &[])
            >= ACCEPTED as f64
    );
    // ... made durable by a sync round of the log (the fixture syncs before every ack) and
    // applied.
    for stage in [
        "switchboard_log_sync_seconds_count",
        "switchboard_apply_seconds_count",
    ] {
        assert!(
            after.sum(stage, &[]) - before.sum(stage, &[]) >= 1.0,
            "{stage} did not move"
        );
    }
    assert!(after.sum("switchboard_store_bytes", &[]) > 0.0);
    assert!(after.sum("switchboard_disk_bytes", &[]) > 0.0);
    assert!(after.sum("switchboard_disk_free_bytes", &[]) > 0.0);
    assert_eq!(after.sum("switchboard_storage_full", &[]), 0.0);
    let applied = after.sum("switchboard_raft_applied_index", &[]);
    assert!(applied >= 1.0);
    assert!(after.sum("switchboard_raft_committed_index", &[]) >= applied);
    // The live subscription is listed, caught up, with an empty queue.
    let subscription_samples: Vec<&Sample> = after
        .samples
        .iter()
        .filter(|s| {
            s.name == "switchboard_subscription_lag"
                && s.labels.get("pattern").map(String::as_str) == Some("obs.>")
        })
        .collect();
    assert_eq!(subscription_samples.len(), 1, "{subscription_samples:?}");
    let id = subscription_samples[0].labels["subscription"].clone();
    eventually("the subscription to be caught up", || async {
        let now = scrape(&f.broker).await;
        (now.sum("switchboard_subscription_lag", &[("subscription", &id)]) == 0.0
            && now.sum(
                "switchboard_subscription_queue_messages",
                &[("subscription", &id)],
            ) == 0.0)
            .then_some(())
    })
    .await
    .unwrap();

    // Its series go away with it.
    drop(subscription);
    eventually("the subscription's series to go", || async {
        let now = scrape(&f.broker).await;
        (!now
            .samples
            .iter()
            .any(|s| s.labels.get("subscription") == Some(&id)))
        .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn healthz_is_ok_on_a_leader_and_other_paths_are_not_found() {
    let f = fixture(&[]).await;
    let health = http_get(&format!("{}/healthz", f.broker.admin_url()))
        .await
        .unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body.trim(), "ok");
    let missing = http_get(&format!("{}/nothing-here", f.broker.admin_url()))
        .await
        .unwrap();
    assert_eq!(missing.status, 404, "{missing:?}");
}

#[tokio::test]
async fn the_admin_listener_can_be_turned_off() {
    let f = fixture(&["--admin-listen", "off"]).await;
    assert_eq!(f.broker.admin_addr, None);
    // The broker itself serves as usual.
    f.client
        .publish(Publish::new("obs.admin.off", "{}"))
        .await
        .unwrap();
}

async fn channel(broker: &BrokerProcess) -> Channel {
    Channel::from_shared(broker.url())
        .unwrap()
        .connect()
        .await
        .expect("connects")
}

#[tokio::test]
async fn grpc_health_is_serving_for_the_server_and_each_service() {
    let f = fixture(&[]).await;
    let mut health = HealthClient::new(channel(&f.broker).await);
    for service in ["", "switchboard.v1.Broker", "switchboard.v1.Entities"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("check {service:?}: {e}"))
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "switchboard.v1.Nothing".to_owned(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

async fn reflect(
    client: &mut ServerReflectionClient<Channel>,
    request: MessageRequest,
) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    responses
        .next()
        .await
        .expect("one response")
        .expect("a response, not an error")
        .message_response
        .expect("a message")
}

const OBSERVABILITY_MD: &str = include_str!("../../docs/OBSERVABILITY.md");

/// A row of the metric tables of docs/OBSERVABILITY.md.
#[derive(Debug)]
struct DocumentedMetric {
    name: String,
    kind: String,
    /// One series per live subscription: with none, only the family's `TYPE` line.
    per_subscription: bool,
    /// The row says the family appears at its first event, so it may be absent before traffic.
    from_first_event: bool,
}

/// The rows of every table under `## Metrics` whose first cell is a `name`.
fn documented_metrics() -> Vec<DocumentedMetric> {
    let section = OBSERVABILITY_MD
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("OBSERVABILITY.md has a `## Metrics` section");
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let (kind, labels) = (cells.get(2)?, cells.get(3)?);
            let meaning = cells[4..].join("|");
            Some(DocumentedMetric {
                name: name.to_owned(),
                kind: (*kind).to_owned(),
                per_subscription: labels.contains("`subscription`"),
                from_first_event: meaning.contains("Appears at its first event"),
            })
        })
        .collect()
}

/// What is wrong between the documented metrics and one scrape: a documented family missing (or
/// of another type), or a family in the scrape that the page does not document.
fn undocumented_or_missing(scrape: &Scrape, documented: &[DocumentedMetric]) -> Vec<String> {
    let mut wrong = Vec::new();
    for metric in documented {
        let name = metric.name.as_str();
        let declared = scrape.types.get(name).map(String::as_str);
        let present = if metric.kind == "histogram" {
            scrape.has(&format!("{name}_count"))
        } else if metric.per_subscription {
            declared.is_some()
        } else {
            scrape.has(name)
        };
        if !present && !metric.from_first_event {
            wrong.push(format!("{name} is documented but not in the scrape"));
        }
        if present && declared != Some(metric.kind.as_str()) {
            wrong.push(format!(
                "{name} is a {declared:?}, documented as {}",
                metric.kind
            ));
        }
    }
    for family in scrape.types.keys() {
        if !documented.iter().any(|m| &m.name == family) {
            wrong.push(format!("{family} is in the scrape but not documented"));
        }
    }
    wrong
}

#[tokio::test]
async fn every_documented_metric_is_in_the_first_scrape() {
    let documented = documented_metrics();
    assert!(
        documented.len() >= 40,
        "the tables of OBSERVABILITY.md were not read: {documented:?}"
    );
    let f = fixture(&[]).await;
    // No traffic at all: only what the broker exports from its start. Free disk space is
    // measured on a timer, so the first scrapes may come before it.
    let found = eventually("every documented metric in the scrape", || async {
        undocumented_or_missing(&scrape(&f.broker).await, &documented)
            .is_empty()
            .then_some(())
    })
    .await;
    if let Err(e) = found {
        let wrong = undocumented_or_missing(&scrape(&f.broker).await, &documented);
        panic!("{e}: {wrong:#?}");
    }
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn process_metrics_are_plausible_and_read_at_each_scrape() {
    let f = fixture(&[]).await;
    let before = scrape(&f.broker).await;
    let value = |scrape: &Scrape, name: &str| {
        assert!(scrape.has(name), "{name} missing");
        scrape.sum(name, &[])
    };
    let start = value(&before, "process_start_time_seconds");
    let now = now_seconds();
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "started at {start}, now is {now}"
    );
    let resident = value(&before, "process_resident_memory_bytes");
    assert!(resident > 0.0);
    assert!(value(&before, "process_virtual_memory_bytes") >= resident);
    assert!(value(&before, "process_cpu_seconds_total") >= 0.0);
    let open = value(&before, "process_open_fds");
    assert!(open > 0.0);
    assert!(value(&before, "process_max_fds") >= open);

    // Five more client connections are five more sockets in the next scrape.
    let mut clients = Vec::new();
    for i in 0..5 {
        let client = Client::connect(f.broker.url()).await.unwrap();
        client
            .publish(Publish::new("obs.process.fds", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
        clients.push(client);
    }
    let after = scrape(&f.broker).await;
    assert!(
        value(&after, "process_open_fds") >= open + 5.0,
        "open fds {open} → {}",
        value(&after, "process_open_fds")
    );
    assert!(
        value(&after, "process_cpu_seconds_total") >= value(&before, "process_cpu_seconds_total")
    );
    assert_eq!(value(&after, "process_start_time_seconds"), start);
}

#[tokio::test]
async fn the_live_latency_histogram_leaves_replays_out() {
    let f = fixture(&[]).await;
    const OLD: usize = 5;
    const NEW: usize = 3;
    for i in 0..OLD {
        f.client
            .publish(Publish::new("obs.replay.old", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    let all = "switchboard_publish_to_deliver_seconds_count";
    let live = "switchboard_live_publish_to_deliver_seconds_count";
    let before = scrape(&f.broker).await;
    assert_eq!(before.sum(live, &[]), 0.0, "nothing delivered yet");

    // A replay of history: counted with replays, not as live. A delivery is recorded before it is
    // sent, so once received it is in the next scrape.
    let mut subscription = f
        .client
        .subscribe("obs.replay.>", Start::Earliest)
        .await
        .unwrap();
    assert_eq!(take(&mut subscription, OLD).await.len(), OLD);
    let replayed = scrape(&f.broker).await;
    assert_eq!(replayed.sum(all, &[]) - before.sum(all, &[]), OLD as f64);
    assert_eq!(
        replayed.sum(live, &[]),
        0.0,
        "a replay moved the live histogram"
    );

    // Messages published while it follows are live.
    for i in 0..NEW {
        f.client
            .publish(Publish::new("obs.replay.new", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    assert_eq!(take(&mut subscription, NEW).await.len(), NEW);
    let followed = scrape(&f.broker).await;
    assert_eq!(followed.sum(live, &[]), NEW as f64);
    assert_eq!(followed.sum(all, &[]) - replayed.sum(all, &[]), NEW as f64);
}

async fn console_state(broker: &BrokerProcess) -> serde_json::Value {
    let response = http_get(&format!("{}/console/api/state", broker.admin_url()))
        .await
        .expect("GET /console/api/state");
    assert_eq!(response.status, 200, "{}", response.body);
    serde_json::from_str(&response.body).expect("the console state is JSON")
}

#[tokio::test]
async fn a_consumer_that_handled_everything_it_matched_is_not_behind() {
    let f = fixture(&[]).await;
    // The case of issue 25: a durable consumer acknowledges all it is sent, then other channels
    // get 9 messages. It used to show "behind 9", and its subscription a lag of 9.
    let options = SubscribeOptions::default().durable("lag-panel");
    let mut subscription = f
        .client
        .subscribe_with("obs.lag.mine.>", Start::Earliest, options)
        .await
        .unwrap();
    for i in 0..3 {
        f.client
            .publish(Publish::new("obs.lag.mine.a", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    let mine = offsets(&take(&mut subscription, 3).await);
    subscription.acker().ack_many(&mine).await.unwrap();
    for i in 0..9 {
        f.client
            .publish(Publish::new("obs.lag.other.b", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    let consumer = |state: &serde_json::Value| {
        state["consumers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "lag-panel"))
            .cloned()
            .unwrap_or_default()
    };
    let lag = |scrape: &Scrape| {
        scrape.sum(
            "switchboard_subscription_lag",
            &[("pattern", "obs.lag.mine.>")],
        )
    };
    let last = mine[2] + 9;
    let settled = eventually("the other channel's messages applied", || async {
        let state = console_state(&f.broker).await;
        let metrics = scrape(&f.broker).await;
        (state["last_offset"] == last && metrics.sum("switchboard_last_offset", &[]) == last as f64)
            .then_some((consumer(&state), lag(&metrics)))
    })
    .await
    .unwrap();
    let (row, subscription_lag) = settled;
    assert_eq!(row["acked_offset"], mine[2], "{row}");
    assert_eq!(row["behind"], 0, "{row}");
    assert_eq!(row["behind_exact"], true, "{row}");
    // Its subscription waits on an empty mailbox: it has passed the other channel's offsets.
    eventually("the subscription to lag by 0", || async {
        (lag(&scrape(&f.broker).await) == 0.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; it lagged by {subscription_lag} first"));

    // Two of its own, delivered and not acknowledged: two behind, connected or not.
    for i in 0..2 {
        f.client
            .publish(Publish::new("obs.lag.mine.a", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    assert_eq!(take(&mut subscription, 2).await.len(), 2);
    let row = consumer(&console_state(&f.broker).await);
    assert_eq!(row["behind"], 2, "{row}");
    drop(subscription);
    f.client
        .publish(Publish::new("obs.lag.other.b", "{}"))
        .await
        .unwrap();
    let row = eventually("the last publish in the console", || async {
        let state = console_state(&f.broker).await;
        (state["last_offset"] == last + 3).then(|| consumer(&state))
    })
    .await
    .unwrap();
    assert_eq!(row["behind"], 2, "{row}");
}

/// The services docs/OBSERVABILITY.md shows under `grpcurl -plaintext 127.0.0.1:7400 list`: the
/// `# name` lines that follow it, sorted.
fn documented_grpcurl_list() -> Vec<&'static str> {
    let mut names: Vec<&str> = OBSERVABILITY_MD
        .lines()
        .skip_while(|line| *line != "grpcurl -plaintext 127.0.0.1:7400 list")
        .skip(1)
        .map_while(|line| line.strip_prefix("# "))
        .collect();
    assert!(
        !names.is_empty(),
        "OBSERVABILITY.md has no `grpcurl list` block"
    );
    names.sort_unstable();
    names
}

#[tokio::test]
async fn reflection_lists_and_describes_the_switchboard_services() {
    let f = fixture(&[]).await;
    let mut client = ServerReflectionClient::new(channel(&f.broker).await);
    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut client, MessageRequest::ListServices(String::new())).await
    else {
        panic!("ListServices answered with something else");
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    // Exactly what docs/OBSERVABILITY.md shows `grpcurl list` printing, so the page cannot drift.
    assert_eq!(names, documented_grpcurl_list());
    // What grpcurl `describe` needs: the file defining a service, as descriptors.
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &mut client,
        MessageRequest::FileContainingSymbol("switchboard.v1.Broker".to_owned()),
    )
    .await
    else {
        panic!("FileContainingSymbol answered with something else");
    };
    let mentions = |needle: &[u8]| {
        files
            .file_descriptor_proto
            .iter()
            .any(|file| file.windows(needle.len()).any(|w| w == needle))
    };
    assert!(mentions(b"switchboard/v1/broker.proto"));
    assert!(mentions(b"Publish"));

    // The error details every refusal carries, so grpcurl can decode them (issue 20).
    for symbol in [
        "google.rpc.ErrorInfo",
        "google.rpc.RetryInfo",
        "google.rpc.Status",
    ] {
        let MessageResponse::FileDescriptorResponse(files) = reflect(
            &mut client,
            MessageRequest::FileContainingSymbol(symbol.to_owned()),
        )
        .await
        else {
            panic!("FileContainingSymbol({symbol}) answered with something else");
        };
        let name = symbol.rsplit('.').next().unwrap().as_bytes();
        assert!(
            files
                .file_descriptor_proto
                .iter()
                .any(|file| file.windows(name.len()).any(|w| w == name)),
            "{symbol}"
        );
    }
}

#[tokio::test]
async fn a_refused_publish_is_an_audit_line() {
    let f = fixture(&[]).await;
    let err = f
        .client
        .publish(Publish::new("audit..channel", "{}"))
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), Some(Reason::ChannelInvalid));
    eventually("the audit line", || async {
        let log = f.broker.log();
        log.lines()
            .find(|line| {
                line.contains("audit")
                    && line.contains(r#"target="audit..channel""#)
                    && line.contains("INVALID_ARGUMENT")
                    && line.contains("CHANNEL_INVALID")
                    && line.contains("peer=127.0.0.1:")
                    // Without authentication there is no principal to name.
                    && !line.contains("principal=")
            })
            .map(str::to_owned)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; the log:\n{}", f.broker.log()));
}

#[tokio::test]
async fn the_publish_timeline_records_the_queued_and_fanout_stages() {
    let f = fixture(&[]).await;
    let before = scrape(&f.broker).await;
    let stage_count = |scrape: &Scrape, stage: &str| {
        scrape.sum(
            "switchboard_publish_stage_seconds_count",
            &[("stage", stage)],
        )
    };
    assert_eq!(stage_count(&before, "queued"), 0.0);
    assert_eq!(stage_count(&before, "fanout"), 0.0);
    let mut live = f
        .client
        .subscribe("timeline.>", Start::Latest)
        .await
        .unwrap();
    for i in 0..3 {
        f.client
            .publish(Publish::new("timeline.step", format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
    take(&mut live, 3).await;
    let after = scrape(&f.broker).await;
    assert!(stage_count(&after, "queued") >= 3.0, "{after:?}");
    assert_eq!(stage_count(&after, "fanout"), 3.0, "one per live delivery");
}
