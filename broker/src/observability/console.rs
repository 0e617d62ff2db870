//! The operator console on the admin listener: `GET /console` is one static page (embedded in
//! the binary, with its script and style) that polls `GET /console/api/state`, a read-only JSON
//! view of this node, and `GET /console/api/history` for its charts ([`super::history`]). The
//! state is built from what `/metrics` already gathers ([`Sources::scrape`], the recorded refusal
//! counters) plus the durable consumers and the channels of the most recent messages in the store.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::admin::Sources;
use super::metrics::{self, Scrape};
use crate::channel::{ChannelLimits, Pattern};
use crate::fanout::registry::FlowPolicy;
use crate::message::now_us;

/// The console page.
pub(crate) const PAGE: &str = include_str!("console.html");
/// Its script, served from the same origin so that the policy below needs no inline script.
pub(crate) const SCRIPT: &str = include_str!("console.js");
/// Its style sheet, likewise.
pub(crate) const STYLE: &str = include_str!("console.css");
/// The page loads only its own script and style and fetches only its own JSON: nothing inline,
/// nothing from elsewhere, no frames, no forms.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// How many of the latest messages the channel table looks at: enough to show what is busy now,
/// bounded so that a refresh reads at most this many from the store.
const RECENT_MESSAGES: u64 = 2_000;
/// The window the channel rates are computed over.
const RATE_WINDOW_US: u64 = 60_000_000;
/// How many of the latest offsets the durable consumers' `behind` counts look through: one pass
/// over at most this many messages per refresh, however many consumers there are.
const BEHIND_WINDOW: u64 = 10_000;

/// Everything the console shows, as JSON.
pub(crate) async fn state(sources: &Sources) -> Value {
    let scrape = sources.scrape().await;
    let subscriptions = subscriptions(sources, &scrape);
    let store = sources.store.clone();
    let last_offset = scrape.last_offset;
    let (channels, consumers, schemas) = tokio::task::spawn_blocking(move || {
        (
            recent_channels(&store, last_offset),
            durable_consumers(&store, last_offset),
            schemas(&store),
        )
    })
    .await
    .unwrap_or_default();
    json!({
        "node_id": scrape.node_id,
        "now_us": now_us(),
        "last_offset": scrape.last_offset,
        "stored_bytes": scrape.stored_bytes,
        "disk_bytes": scrape.disk_bytes,
        "channels": channels,
        "subscriptions": subscriptions,
        "consumers": consumers,
        "refusals": refusals(),
        "schemas": schemas,
        "cluster": cluster(sources, &scrape),
    })
}

fn policy_name(policy: FlowPolicy) -> &'static str {
    match policy {
        FlowPolicy::Lossless => "lossless",
        FlowPolicy::Conflate => "conflate",
        FlowPolicy::DropOldest => "drop_oldest",
    }
}

/// The live subscriptions of this node with their lag (the same numbers as `/metrics`).
fn subscriptions(sources: &Sources, scrape: &Scrape) -> Vec<Value> {
    let controls = sources.registry.list();
    scrape
        .subscriptions
        .iter()
        .map(|s| {
            let control = controls.iter().find(|c| c.id == s.id);
            json!({
                "id": s.id,
                "pattern": s.pattern,
                "policy": control.map(|c| policy_name(c.policy)),
                "durable": control.and_then(|c| c.durable.clone()),
                "next_offset": s.next_offset,
                "lag": s.lag(scrape.last_offset),
                "queued_messages": s.queue_messages,
                "queued_bytes": s.queue_bytes,
            })
        })
        .collect()
}

/// Channels of the latest [`RECENT_MESSAGES`] messages: how many, the last offset, and the rate
/// per second over the last minute.
fn recent_channels(store: &crate::state::store::MessageStore, last_offset: u64) -> Vec<Value> {
    #[derive(Default)]
    struct Channel {
        messages: u64,
        in_window: u64,
        last_offset: u64,
        last_publish_us: u64,
    }
    let now = now_us();
    let from = last_offset.saturating_sub(RECENT_MESSAGES - 1);
    let mut channels: BTreeMap<String, Channel> = BTreeMap::new();
    let messages = store
        .batches_from(from)
        .map_while(Result::ok)
        .flat_map(|batch| batch.messages)
        .filter(|m| m.offset >= from)
        .take(RECENT_MESSAGES as usize);
    for m in messages {
        let channel = channels.entry(m.message.channel.clone()).or_default();
        channel.messages += 1;
        if now.saturating_sub(m.publish_time_us) <= RATE_WINDOW_US {
            channel.in_window += 1;
        }
        channel.last_offset = m.offset;
        channel.last_publish_us = m.publish_time_us;
    }
    channels
        .into_iter()
        .map(|(name, c)| {
            json!({
                "channel": name,
                "recent_messages": c.messages,
                "rate_per_s": c.in_window as f64 / (RATE_WINDOW_US as f64 / 1e6),
                "last_offset": c.last_offset,
                "last_publish_us": c.last_publish_us,
            })
        })
        .collect()
}

/// The durable consumers stored in the log, with how many messages each has yet to
/// acknowledge (`behind`): messages after its acknowledged offset that match its pattern and
/// have not expired. Offsets of other channels are not counted, so a consumer that acknowledged
/// everything it was sent is 0 behind however busy the rest of the log is (issue 25).
///
/// All consumers are counted in one pass over the latest [`BEHIND_WINDOW`] offsets; for one
/// acknowledged further back, `behind` is what the window holds and `behind_exact` is false (at
/// least that many). `behind` is null for a pattern that does not parse (a damaged record).
fn durable_consumers(store: &crate::state::store::MessageStore, last_offset: u64) -> Vec<Value> {
    let consumers: Vec<_> = store.consumers().map_while(Result::ok).collect();
    if consumers.is_empty() {
        return Vec::new();
    }
    // Stored patterns were checked when their consumers were created; the widest limits parse
    // any of them.
    let limits = ChannelLimits {
        max_len: usize::MAX,
        max_depth: usize::MAX,
    };
    let mut counts: Vec<(Option<Pattern>, u64)> = consumers
        .iter()
        .map(|(_, state)| (Pattern::parse(&state.pattern, &limits).ok(), 0))
        .collect();
    let window_start = last_offset.saturating_sub(BEHIND_WINDOW - 1).max(1);
    let from = consumers
        .iter()
        .map(|(_, state)| state.acked_offset + 1)
        .min()
        .unwrap_or(window_start)
        .max(window_start);
    let now = now_us();
    let messages = store
        .batches_from(from)
        .map_while(Result::ok)
        .flat_map(|batch| batch.messages)
        .skip_while(|m| m.offset < from)
        .take_while(|m| m.offset <= last_offset);
    for m in messages.filter(|m| !m.is_expired(now)) {
        for ((_, state), (pattern, count)) in consumers.iter().zip(counts.iter_mut()) {
            let matches = pattern
                .as_ref()
                .is_some_and(|p| p.matches(&m.message.channel));
            if m.offset > state.acked_offset && matches {
                *count += 1;
            }
        }
    }
    consumers
        .into_iter()
        .zip(counts)
        .map(|((name, state), (pattern, behind))| {
            json!({
                "name": name,
                "pattern": state.pattern,
                "acked_offset": state.acked_offset,
                "behind": pattern.map(|_| behind),
                "behind_exact": state.acked_offset + 1 >= window_start,
                "redeliveries": state.redeliveries,
            })
        })
        .collect()
}

/// Every labelled series of the counters named `names`, as (name, labels, value), read from the
/// same recorder `/metrics` renders.
fn counters(names: &[&str]) -> Vec<(String, String, f64)> {
    let Some(handle) = metrics::handle() else {
        return Vec::new();
    };
    handle
        .render()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{')?;
            if !names.contains(&name) {
                return None;
            }
            Some((name.to_owned(), labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The refusal counters since this process started, by metric and reason (the page turns them
/// into recent counts by difference).
fn refusals() -> Vec<Value> {
    let counted = [
        metrics::ACCESS_REFUSALS,
        metrics::ENTITY_REFUSALS,
        metrics::PUBLISHES,
    ];
    counters(&counted)
        .into_iter()
        .filter_map(|(name, labels, count)| {
            let reason = label(&labels, "reason")?;
            Some(json!({ "metric": name, "reason": reason, "count": count }))
        })
        .collect()
}

/// The registered payload schemas, each with the drift this node counted against it since it
/// started (refused and warned; docs/SCHEMAS.md).
fn schemas(store: &crate::state::store::MessageStore) -> Vec<Value> {
    let mut drift: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for (_, labels, count) in counters(&[metrics::SCHEMA_DRIFT]) {
        let (Some(pattern), Some(version), Some(outcome)) = (
            label(&labels, "pattern"),
            label(&labels, "version"),
            label(&labels, "outcome"),
        ) else {
            continue;
        };
        *drift
            .entry((pattern.to_owned(), version.to_owned(), outcome.to_owned()))
            .or_default() += count;
    }
    let count = |pattern: &str, version: &str, outcome: &str| {
        drift
            .get(&(pattern.to_owned(), version.to_owned(), outcome.to_owned()))
            .copied()
            .unwrap_or(0.0)
    };
    store
        .schemas()
        .map_while(Result::ok)
        .map(|(pattern, version, record)| {
            json!({
                "refused": count(&pattern, &version, "refused"),
                "warned": count(&pattern, &version, "warned"),
                "pattern": pattern,
                "version": version,
                "policy": record.policy.as_str(),
            })
        })
        .collect()
}

/// The value of `name="…"` in a Prometheus label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// A node's role as the console shows it: a raft learner is a read replica (docs/CLUSTER.md).
fn console_role(leads: bool, votes: bool) -> &'static str {
    match (leads, votes) {
        (true, _) => "leader",
        (false, true) => "voter",
        (false, false) => "replica",
    }
}

/// Nodes with their roles (leader, voter, replica), the leader and, on the leader, how far each
/// other node's log is behind.
fn cluster(sources: &Sources, scrape: &Scrape) -> Value {
    let raft = sources.raft.metrics();
    let raft = raft.borrow();
    let last_log = raft.last_log_index.unwrap_or(0);
    let membership = raft.membership_config.membership();
    let nodes: Vec<Value> = membership
        .nodes()
        .map(|(id, member)| {
            let matched = raft
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned())
                .map(|log_id| log_id.map_or(0, |l| l.index));
            json!({
                "id": id,
                "raft_addr": member.raft_addr,
                "public_addr": member.public_addr,
                "leader": raft.current_leader == Some(*id),
                "role": console_role(raft.current_leader == Some(*id), membership.voter_ids().any(|v| v == *id)),
                "this_node": *id == sources.node_id,
                "replication_lag": matched.map(|m| last_log.saturating_sub(m)),
            })
        })
        .collect();
    json!({
        "term": scrape.raft_term,
        "leader": scrape.raft_leader,
        "committed_index": scrape.raft_committed_index,
        "applied_index": scrape.raft_applied_index,
        "nodes": nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::label;

    #[test]
    fn label_values_are_read_by_name() {
        let labels = r#"result="refused",reason="ORIGIN_NOT_ALLOWED"}"#;
        assert_eq!(label(labels, "reason"), Some("ORIGIN_NOT_ALLOWED"));
        assert_eq!(label(labels, "result"), Some("refused"));
        assert_eq!(label(labels, "missing"), None);
    }
}
