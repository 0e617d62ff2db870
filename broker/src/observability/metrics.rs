//! Prometheus metrics. Call sites use these functions, never raw metric names, so every name is
//! defined (and documented) once, here and in docs/OBSERVABILITY.md.
//!
//! Two kinds of metric:
//! - **Events** (counters and histograms) are recorded where they happen, through the functions
//!   below, into the process-wide `metrics` recorder that [`install`] sets up. Before it is
//!   installed (unit tests, tools) recording is a no-op.
//! - **State** (store size, offsets, raft, per-subscription lag and queues) is read when
//!   `/metrics` is scraped and written straight into the response by [`render`], so a
//!   subscription's series disappear with the subscription instead of lingering at their last value.

use std::fmt::Write as _;
use std::sync::{LazyLock, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{counter, describe_counter, describe_histogram, histogram, Counter, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::histogram::{FixedHistogram, Tally};
use crate::error::Reason;

/// Publishes by result and reason.
pub(crate) const PUBLISHES: &str = "switchboard_publishes_total";
/// Deliveries by flow policy.
pub(crate) const DELIVERIES: &str = "switchboard_deliveries_total";
/// Publish time to delivery, seconds.
pub(crate) const PUBLISH_TO_DELIVER: &str = "switchboard_publish_to_deliver_seconds";
/// Publish time to delivery of messages published after their subscription started (no
/// replays), seconds.
pub(crate) const LIVE_PUBLISH_TO_DELIVER: &str = "switchboard_live_publish_to_deliver_seconds";
/// Subscriptions switched from memory to the store.
pub(crate) const SLOW_CONSUMER_SWITCHES: &str = "switchboard_slow_consumer_switches_total";
/// Client connections closed because they stopped reading while send buffers were over their bound.
pub(crate) const STALLED_CONNECTIONS_CLOSED: &str = "switchboard_stalled_connections_closed_total";
/// Ephemeral messages, by outcome.
pub(crate) const EPHEMERAL: &str = "switchboard_ephemeral_messages_total";
/// Messages that did not match their channel's schema, by pattern, version, keyword and outcome.
pub(crate) const SCHEMA_DRIFT: &str = "switchboard_schema_drift_total";
/// Messages conflated away.
pub(crate) const CONFLATED: &str = "switchboard_conflated_messages_total";
/// Gaps announced to subscribers, by reason.
pub(crate) const GAPS: &str = "switchboard_gaps_total";
/// Messages covered by gaps, by reason.
pub(crate) const GAP_MESSAGES: &str = "switchboard_gap_messages_total";
/// Redeliveries to durable consumers.
pub(crate) const REDELIVERIES: &str = "switchboard_redeliveries_total";
/// Refused entity writes, by reason.
pub(crate) const ENTITY_REFUSALS: &str = "switchboard_entity_refusals_total";
/// Calls refused by authentication, authorization, origin checks and rate limits, by reason.
pub(crate) const ACCESS_REFUSALS: &str = "switchboard_access_refusals_total";
/// Connections closed on arrival at a connection limit, by limit.
pub(crate) const CONNECTIONS_REFUSED: &str = "switchboard_connections_refused_total";
/// Connections closed because their opening did not arrive within `limits.handshake_timeout`.
pub(crate) const HANDSHAKE_TIMEOUTS: &str = "switchboard_handshake_timeouts_total";
/// Accepts that failed for want of file descriptors or socket memory, by listener.
pub(crate) const ACCEPT_ERRORS: &str = "switchboard_accept_errors_total";
/// Proposal to applied outcome of one log entry, seconds.
pub(crate) const COMMIT_SECONDS: &str = "switchboard_commit_seconds";
/// Stages of a publish's way not covered by the histograms beside it, by `stage`: `queued` (the
/// edge's submit to the proposer taking it into a log entry) and `fanout` (applied to handed to a
/// live subscriber's stream).
pub(crate) const PUBLISH_STAGE_SECONDS: &str = "switchboard_publish_stage_seconds";
/// Items in one committed log entry.
pub(crate) const COMMIT_BATCH_ITEMS: &str = "switchboard_commit_batch_items";
/// One sync round of the raft log (the fdatasync of what was appended since the last), seconds.
pub(crate) const LOG_SYNC_SECONDS: &str = "switchboard_log_sync_seconds";
/// Applying committed log entries to the state (one call of openraft's apply), seconds.
pub(crate) const APPLY_SECONDS: &str = "switchboard_apply_seconds";
/// Retention sweeps committed.
pub(crate) const SWEEPS: &str = "switchboard_sweeps_total";
/// Messages removed by sweeps.
pub(crate) const SWEPT_MESSAGES: &str = "switchboard_swept_messages_total";
/// Audit lines dropped by the audit log's rate limit.
pub(crate) const AUDIT_SUPPRESSED: &str = "switchboard_audit_lines_suppressed_total";

/// Buckets of [`PUBLISH_TO_DELIVER`]: sub-millisecond live delivery up to replays of old messages.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Buckets of [`COMMIT_SECONDS`]: an fdatasync is 0.1–20 ms on most disks.
const COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Buckets of [`COMMIT_BATCH_ITEMS`]: powers of two up to the largest batch allowed.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder and describes every metric; later calls return
/// the same handle. `None` if another recorder was installed first (events are then recorded there
/// and `/metrics` shows only the state read at scrape time).
pub(crate) fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = build().and_then(|b| b.install_recorder());
            match handle {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics shows only broker state");
                    None
                }
            }
        })
        .as_ref()
}

/// The process-wide handle, if [`install`] succeeded.
pub(crate) fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get().and_then(Option::as_ref)
}

fn build() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(COMMIT_SECONDS.into()), COMMIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(LOG_SYNC_SECONDS.into()), COMMIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(APPLY_SECONDS.into()), COMMIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(COMMIT_BATCH_ITEMS.into()), BATCH_BUCKETS)
}

fn describe() {
    describe_counter!(
        PUBLISHES,
        "Publishes by result (accepted, duplicate, refused) and, when refused, the stable reason"
    );
    describe_counter!(
        DELIVERIES,
        "Messages delivered to subscribers, by the subscription's flow policy"
    );
    describe_counter!(
        SLOW_CONSUMER_SWITCHES,
        "Subscriptions switched from their in-memory queue to reading the store because they fell behind"
    );
    describe_counter!(
        STALLED_CONNECTIONS_CLOSED,
        "Client connections closed because they stopped reading while the send buffers of all connections were over limits.max_send_buffer_bytes"
    );
    describe_counter!(
        EPHEMERAL,
        "Ephemeral messages (never stored) by outcome: published (accepted on this node), delivered (handed to a subscriber's stream), dropped (a subscriber or a peer node too far behind), forwarded (sent to a peer node)"
    );
    describe_counter!(
        SCHEMA_DRIFT,
        "Messages that did not match the schema registered for their channel, by pattern, schema version (unknown: no version applied), the first failing keyword, and outcome (refused under enforce, warned under warn)"
    );
    describe_counter!(
        CONFLATED,
        "Messages not delivered because a later message of the same channel was (conflate policy and throttle)"
    );
    describe_counter!(GAPS, "Gaps announced to subscribers, by reason");
    describe_counter!(
        GAP_MESSAGES,
        "Messages covered by the gaps announced to subscribers, by reason"
    );
    describe_counter!(
        REDELIVERIES,
        "Deliveries sent again to durable consumers after the acknowledgement timeout"
    );
    describe_counter!(
        ENTITY_REFUSALS,
        "Entity writes refused after ordering (STALE_UPDATE, VERSION_CONFLICT, CLOCK_SKEW), by reason"
    );
    describe_counter!(
        ACCESS_REFUSALS,
        "Calls and messages refused by authentication, permissions, origin checks or rate limits, by reason"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed on arrival because limits.max_connections (limit=total) or limits.max_connections_per_address (limit=per_address) were open"
    );
    describe_counter!(
        HANDSHAKE_TIMEOUTS,
        "Connections closed because the client did not send its opening (HTTP/2 preface and SETTINGS, TLS handshake, HTTP/1.1 request head) within limits.handshake_timeout"
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Accepts that failed for want of file descriptors or socket memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), each followed by a pause, by listener"
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "From proposing a log entry to its applied outcome (includes the fdatasync)"
    );
    describe_histogram!(
        COMMIT_BATCH_ITEMS,
        Unit::Count,
        "Items (publishes and entity writes) carried by one committed log entry"
    );
    describe_histogram!(
        LOG_SYNC_SECONDS,
        Unit::Seconds,
        "One sync round of the raft log: the fdatasync of every entry appended since the last one"
    );
    describe_histogram!(
        APPLY_SECONDS,
        Unit::Seconds,
        "Applying committed log entries to the state store and handing their messages to the hub"
    );
    describe_counter!(SWEEPS, "Retention sweeps committed by this node as leader");
    describe_counter!(
        SWEPT_MESSAGES,
        "Messages removed from disk by retention sweeps (TTL, max_age, max_bytes)"
    );
    describe_counter!(
        AUDIT_SUPPRESSED,
        "Audit log lines dropped by the audit rate limit"
    );
    // Series without labels start at 0, so rate() works from the first scrape.
    for name in [
        SLOW_CONSUMER_SWITCHES,
        STALLED_CONNECTIONS_CLOSED,
        CONFLATED,
        REDELIVERIES,
        SWEEPS,
        SWEPT_MESSAGES,
        AUDIT_SUPPRESSED,
        HANDSHAKE_TIMEOUTS,
    ] {
        counter!(name).absolute(0);
    }
    for limit in [ConnectionLimit::Total, ConnectionLimit::PerAddress] {
        counter!(CONNECTIONS_REFUSED, "limit" => limit.as_str()).absolute(0);
    }
    counter!(ACCEPT_ERRORS, "listener" => "public").absolute(0);
    for result in ["accepted", "duplicate"] {
        counter!(PUBLISHES, "result" => result).absolute(0);
    }
    start_at_zero();
}

/// Registers, at 0, the series whose labels are known in advance and the histograms, so that
/// every documented family is in the first scrape and `rate()` and `histogram_quantile()` have a
/// starting point (an exported histogram with no observation shows zero buckets). Families
/// whose labels come from the traffic (refusal reasons, schema patterns) appear at their first
/// event; docs/OBSERVABILITY.md says which.
fn start_at_zero() {
    for policy in ["lossless", "conflate", "drop_oldest"] {
        counter!(DELIVERIES, "policy" => policy).absolute(0);
    }
    for outcome in ["published", "delivered", "dropped", "forwarded"] {
        counter!(EPHEMERAL, "outcome" => outcome).absolute(0);
    }
    for reason in ["retention", "dropped"] {
        counter!(GAPS, "reason" => reason).absolute(0);
        counter!(GAP_MESSAGES, "reason" => reason).absolute(0);
    }
    for reason in [
        Reason::StaleUpdate,
        Reason::VersionConflict,
        Reason::ClockSkew,
    ] {
        counter!(ENTITY_REFUSALS, "reason" => reason.as_str()).absolute(0);
    }
    for name in [
        COMMIT_SECONDS,
        COMMIT_BATCH_ITEMS,
        LOG_SYNC_SECONDS,
        APPLY_SECONDS,
    ] {
        // Registering the handle is enough for the exporter to render the family.
        let _ = histogram!(name);
    }
}

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishResult {
    /// Stored.
    Accepted,
    /// A retry of a stored message.
    Duplicate,
    /// Refused (with a reason).
    Refused,
}

impl PublishResult {
    /// The `result` label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            PublishResult::Accepted => "accepted",
            PublishResult::Duplicate => "duplicate",
            PublishResult::Refused => "refused",
        }
    }
}

/// Counts a publish by result and reason (`reason` is `None` unless refused).
///
/// Accepted publishes, the common case, go through handles looked up once: building a labelled
/// key and finding it in the registry for every publish showed in the profile.
pub(crate) fn publish(result: PublishResult, reason: Option<Reason>) {
    static ACCEPTED: OnceLock<Counter> = OnceLock::new();
    match (result, reason) {
        (_, Some(reason)) => {
            counter!(PUBLISHES, "result" => result.as_str(), "reason" => reason.as_str())
                .increment(1);
        }
        // The handle is only cached once the recorder is installed, so one taken earlier (a
        // tool, a test) cannot stay a no-op for the life of the process.
        (PublishResult::Accepted, None) if handle().is_some() => ACCEPTED
            .get_or_init(|| counter!(PUBLISHES, "result" => result.as_str()))
            .increment(1),
        (_, None) => counter!(PUBLISHES, "result" => result.as_str()).increment(1),
    }
}

/// One subscription's delivery metrics, looked up once when it starts rather than per delivery.
pub(crate) struct DeliveryMetrics {
    deliveries: Counter,
    latency: Tally,
    live_latency: Tally,
    /// The `fanout` stage of [`PUBLISH_STAGE_SECONDS`].
    fanout: Tally,
}

impl DeliveryMetrics {
    /// The handles for deliveries under flow policy `policy`.
    pub(crate) fn new(policy: &'static str) -> DeliveryMetrics {
        DeliveryMetrics {
            deliveries: counter!(DELIVERIES, "policy" => policy),
            latency: DELIVERY_LATENCY.tally(),
            live_latency: LIVE_DELIVERY_LATENCY.tally(),
            fanout: STAGE_FANOUT.tally(),
        }
    }

    /// Records the `fanout` stage of a live delivery: `waited` since the hub had the message.
    pub(crate) fn fanout(&mut self, waited: std::time::Duration) {
        self.fanout.record(waited.as_secs_f64());
    }

    /// Counts a delivery to the subscriber and records publish→deliver latency, in the live
    /// histogram too when `live` (the message was published after the subscription started,
    /// so it is not a replay of history).
    pub(crate) fn delivered(&mut self, publish_time_us: u64, live: bool) {
        self.deliveries.increment(1);
        let seconds = seconds_since(publish_time_us, now_us());
        self.latency.record(seconds);
        if live {
            self.live_latency.record(seconds);
        }
    }

    /// Makes the latencies recorded so far visible in `/metrics` (the task calls it after each
    /// batch; see [`super::histogram`]).
    pub(crate) fn flush(&mut self) {
        self.latency.flush();
        self.live_latency.flush();
        self.fanout.flush();
    }
}

/// The delivery-path histograms ([`super::histogram`]): recorded per delivery, so kept out of
/// the exporter and rendered by [`render`].
static DELIVERY_LATENCY: LazyLock<FixedHistogram> =
    LazyLock::new(|| FixedHistogram::new(LATENCY_BUCKETS));
static LIVE_DELIVERY_LATENCY: LazyLock<FixedHistogram> =
    LazyLock::new(|| FixedHistogram::new(LATENCY_BUCKETS));
static STAGE_QUEUED: LazyLock<FixedHistogram> =
    LazyLock::new(|| FixedHistogram::new(COMMIT_BUCKETS));
static STAGE_FANOUT: LazyLock<FixedHistogram> =
    LazyLock::new(|| FixedHistogram::new(COMMIT_BUCKETS));

/// Writes the delivery-path histograms, families and samples.
fn render_delivery_histograms(out: &mut String) {
    family(
        out,
        PUBLISH_TO_DELIVER,
        "histogram",
        "From a message's publish time to its delivery to a subscriber (replays included)",
    );
    DELIVERY_LATENCY.render(out, PUBLISH_TO_DELIVER, "");
    family(
        out,
        LIVE_PUBLISH_TO_DELIVER,
        "histogram",
        "From a message's publish time to its delivery to a subscriber, for messages published after the subscription started (no replays)",
    );
    LIVE_DELIVERY_LATENCY.render(out, LIVE_PUBLISH_TO_DELIVER, "");
    family(
        out,
        PUBLISH_STAGE_SECONDS,
        "histogram",
        "Stages of a publish by stage: queued (the edge's submit to the proposer taking it into a log entry), fanout (applied to handed to a live subscriber's stream)",
    );
    STAGE_QUEUED.render(out, PUBLISH_STAGE_SECONDS, "stage=\"queued\"");
    STAGE_FANOUT.render(out, PUBLISH_STAGE_SECONDS, "stage=\"fanout\"");
}

/// Seconds from `then_us` to `now_us` (µs since the epoch); 0 when the clock says `then` is later.
fn seconds_since(then_us: u64, now_us: u64) -> f64 {
    now_us.saturating_sub(then_us) as f64 / 1e6
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Counts a subscription switched from memory to the store.
pub(crate) fn slow_consumer_switch() {
    counter!(SLOW_CONSUMER_SWITCHES).increment(1);
}

/// Counts client connections closed because they stopped reading while the send buffers of all
/// connections were over `limits.max_send_buffer_bytes`.
pub(crate) fn stalled_connections_closed(count: u64) {
    counter!(STALLED_CONNECTIONS_CLOSED).increment(count);
}

/// Counts a message that did not match its channel's schema.
pub(crate) fn schema_drift(pattern: &str, version: &str, keyword: &str, outcome: &'static str) {
    counter!(
        SCHEMA_DRIFT,
        "pattern" => pattern.to_owned(),
        "version" => version.to_owned(),
        "keyword" => keyword.to_owned(),
        "outcome" => outcome
    )
    .increment(1);
}

/// Counts ephemeral messages by `outcome` (`published`, `delivered`, `dropped`, `forwarded`).
pub(crate) fn ephemeral(outcome: &'static str, count: u64) {
    counter!(EPHEMERAL, "outcome" => outcome).increment(count);
}

/// Counts messages conflated away (not delivered because a later one of their channel was).
pub(crate) fn conflated(skipped: u64) {
    counter!(CONFLATED).increment(skipped);
}

/// Counts a gap announced to a subscriber and the messages it covers.
pub(crate) fn gap(reason: &'static str, count: u64) {
    counter!(GAPS, "reason" => reason).increment(1);
    counter!(GAP_MESSAGES, "reason" => reason).increment(count);
}

/// Counts a redelivery to a durable consumer.
pub(crate) fn redelivery() {
    counter!(REDELIVERIES).increment(1);
}

/// Counts a refused entity write by reason (stale, conflict, clock skew).
pub(crate) fn entity_refused(reason: Reason) {
    counter!(ENTITY_REFUSALS, "reason" => reason.as_str()).increment(1);
}

/// Counts a call or message refused for who made it (token, permission, origin, rate limit).
pub(crate) fn access_refused(reason: Reason) {
    counter!(ACCESS_REFUSALS, "reason" => reason.as_str()).increment(1);
}

/// The connection limit that refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectionLimit {
    /// `limits.max_connections`.
    Total,
    /// `limits.max_connections_per_address`.
    PerAddress,
}

impl ConnectionLimit {
    /// The `limit` label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            ConnectionLimit::Total => "total",
            ConnectionLimit::PerAddress => "per_address",
        }
    }
}

/// Counts a connection closed on arrival at a connection limit.
pub(crate) fn connection_refused(limit: ConnectionLimit) {
    counter!(CONNECTIONS_REFUSED, "limit" => limit.as_str()).increment(1);
}

/// Counts a connection closed for not sending its opening in time.
pub(crate) fn handshake_timeout() {
    counter!(HANDSHAKE_TIMEOUTS).increment(1);
}

/// Counts an accept that failed for want of resources on the listener named `listener`.
pub(crate) fn accept_error(listener: &'static str) {
    counter!(ACCEPT_ERRORS, "listener" => listener).increment(1);
}

/// Records one committed log entry: how many items it carried and how long from proposal to
/// applied outcome.
pub(crate) fn commit(items: usize, seconds: f64) {
    histogram!(COMMIT_SECONDS).record(seconds);
    histogram!(COMMIT_BATCH_ITEMS).record(items as f64);
}

/// Records how long a publish waited in the `queued` stage (see [`PUBLISH_STAGE_SECONDS`]).
pub(crate) fn publish_queued(seconds: f64) {
    STAGE_QUEUED.record(seconds);
}

/// Records one sync round of the raft log.
pub(crate) fn log_sync(seconds: f64) {
    histogram!(LOG_SYNC_SECONDS).record(seconds);
}

/// Records one apply of committed entries to the state.
pub(crate) fn apply(seconds: f64) {
    histogram!(APPLY_SECONDS).record(seconds);
}

/// Records a committed retention sweep and the messages it removed.
pub(crate) fn sweep(removed: u64) {
    counter!(SWEEPS).increment(1);
    counter!(SWEPT_MESSAGES).increment(removed);
}

/// Counts audit lines dropped by the audit log's rate limit.
pub(crate) fn audit_suppressed(lines: u64) {
    counter!(AUDIT_SUPPRESSED).increment(lines);
}

/// The broker's state, read when `/metrics` is scraped.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scrape {
    /// This node's raft id.
    pub node_id: u64,
    /// Highest offset given (0 when none).
    pub last_offset: u64,
    /// Encoded bytes of the stored message batches.
    pub stored_bytes: u64,
    /// Bytes of every file under the data folder.
    pub disk_bytes: u64,
    /// Free bytes on the data folder's file system at the last measurement.
    pub disk_free_bytes: Option<u64>,
    /// Whether writes are refused because free space is below `store.min_free_bytes`.
    pub storage_full: bool,
    /// Publishes refused as loops since the store was created.
    pub loops_detected: u64,
    /// The raft term this node is in.
    pub raft_term: u64,
    /// The leader this node knows of.
    pub raft_leader: Option<u64>,
    /// Highest log index known committed (on a follower: the applied index, a lower bound).
    pub raft_committed_index: u64,
    /// Highest log index applied to the store.
    pub raft_applied_index: u64,
    /// The live subscriptions of this node.
    pub subscriptions: Vec<SubscriptionScrape>,
    /// Bytes of responses waiting for the sockets of all client connections.
    pub send_buffered_bytes: u64,
    /// Bytes of messages read from the store and held for subscriptions that fell behind.
    pub catch_up_held_bytes: u64,
    /// The process's CPU, memory and file descriptors (`None` where `/proc` cannot be read).
    pub process: Option<super::process::ProcessStats>,
}

/// One live subscription's state at scrape time.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubscriptionScrape {
    /// Its id on this node.
    pub id: u64,
    /// Its pattern.
    pub pattern: String,
    /// The next offset it has yet to pass (0 until its task has started): the next it may
    /// deliver, or, when it waits with nothing queued, the one after the last dispatched.
    pub next_offset: u64,
    /// Messages waiting in its in-memory queue.
    pub queue_messages: usize,
    /// Bytes waiting in its in-memory queue.
    pub queue_bytes: usize,
}

impl SubscriptionScrape {
    /// Offsets given that it has not passed yet: `last_offset - next_offset + 1`, at least 0 (0
    /// before its task has started).
    pub(crate) fn lag(&self, last_offset: u64) -> u64 {
        if self.next_offset == 0 {
            return 0;
        }
        (last_offset + 1).saturating_sub(self.next_offset)
    }
}

/// The text served at `/metrics`: every recorded event metric, then the state in `scrape`, in the
/// Prometheus text exposition format 0.0.4.
pub(crate) fn render(scrape: &Scrape) -> String {
    let mut out = handle().map(PrometheusHandle::render).unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    render_delivery_histograms(&mut out);
    render_state(&mut out, scrape);
    if let Some(process) = &scrape.process {
        process.render(&mut out);
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value for the text format: backslash, double quote and newline.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    let mut escaped = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

fn render_state(out: &mut String, s: &Scrape) {
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        family(out, name, "gauge", help);
        sample(out, name, &[], value);
    };
    family(
        out,
        "switchboard_build_info",
        "gauge",
        "Always 1; the labels say which broker version this node runs",
    );
    sample(
        out,
        "switchboard_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("node_id", &s.node_id.to_string()),
        ],
        1,
    );
    gauge(
        out,
        "switchboard_store_bytes",
        "Encoded bytes of the stored messages (what retention.max_bytes limits)",
        s.stored_bytes,
    );
    gauge(
        out,
        "switchboard_disk_bytes",
        "Bytes of every file under the data folder (log, state, snapshots)",
        s.disk_bytes,
    );
    if let Some(free) = s.disk_free_bytes {
        gauge(
            out,
            "switchboard_disk_free_bytes",
            "Free bytes on the data folder's file system (what store.min_free_bytes guards)",
            free,
        );
    }
    gauge(
        out,
        "switchboard_send_buffered_bytes",
        "Bytes of responses handed to client connections and not yet taken by their sockets (bounded by limits.max_send_buffer_bytes)",
        s.send_buffered_bytes,
    );
    gauge(
        out,
        "switchboard_catch_up_held_bytes",
        "Bytes of messages read from the store and held for subscriptions that fell behind (bounded by subscriptions.catch_up_bytes plus one message per subscription)",
        s.catch_up_held_bytes,
    );
    gauge(
        out,
        "switchboard_storage_full",
        "1 while writes are refused (STORAGE_FULL) because free space is below store.min_free_bytes",
        u64::from(s.storage_full),
    );
    gauge(
        out,
        "switchboard_last_offset",
        "The highest offset given to a message (0 when none)",
        s.last_offset,
    );
    family(
        out,
        "switchboard_loops_detected_total",
        "counter",
        "Publishes refused as loops (LOOP_DETECTED) since the store was created",
    );
    sample(
        out,
        "switchboard_loops_detected_total",
        &[],
        s.loops_detected,
    );
    gauge(
        out,
        "switchboard_raft_term",
        "The raft term this node is in",
        s.raft_term,
    );
    gauge(
        out,
        "switchboard_raft_leader_id",
        "The id of the leader this node knows of (0 when it knows none)",
        s.raft_leader.unwrap_or(0),
    );
    gauge(
        out,
        "switchboard_raft_is_leader",
        "1 when this node is the leader, else 0",
        u64::from(s.raft_leader == Some(s.node_id)),
    );
    gauge(
        out,
        "switchboard_raft_committed_index",
        "The highest log index known committed (on a follower, its applied index)",
        s.raft_committed_index,
    );
    gauge(
        out,
        "switchboard_raft_applied_index",
        "The highest log index applied to the store",
        s.raft_applied_index,
    );
    gauge(
        out,
        "switchboard_subscriptions",
        "Live subscriptions on this node (Subscribe streams and entity watches)",
        s.subscriptions.len() as u64,
    );
    // The text format groups samples by family, so each per-subscription gauge is one pass over
    // the subscriptions: (name, help, whether it carries the pattern label, value).
    type Value = fn(&SubscriptionScrape, u64) -> u64;
    let per_subscription: [(&str, &str, bool, Value); 3] = [
        (
            "switchboard_subscription_lag",
            "Offsets (of every channel) between a subscription's position and the log's end; 0 when it has handled everything dispatched",
            true,
            |sub, last_offset| sub.lag(last_offset),
        ),
        (
            "switchboard_subscription_queue_messages",
            "Messages waiting in a subscription's in-memory queue",
            false,
            |sub, _| sub.queue_messages as u64,
        ),
        (
            "switchboard_subscription_queue_bytes",
            "Bytes waiting in a subscription's in-memory queue",
            false,
            |sub, _| sub.queue_bytes as u64,
        ),
    ];
    for (name, help, with_pattern, value) in per_subscription {
        family(out, name, "gauge", help);
        for sub in &s.subscriptions {
            let id = sub.id.to_string();
            let labels = [
                ("subscription", id.as_str()),
                ("pattern", sub.pattern.as_str()),
            ];
            let labels = if with_pattern {
                &labels[..]
            } else {
                &labels[..1]
            };
            sample(out, name, labels, value(sub, s.last_offset));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observability_lag_is_what_remains_and_never_negative() {
        let sub = |next_offset| SubscriptionScrape {
            next_offset,
            ..SubscriptionScrape::default()
        };
        assert_eq!(sub(11).lag(10), 0, "caught up");
        assert_eq!(sub(8).lag(10), 3, "offsets 8, 9 and 10 to go");
        assert_eq!(
            sub(20).lag(10),
            0,
            "ahead (a replay that ended past the end)"
        );
        assert_eq!(sub(0).lag(10), 0, "not started");
    }

    #[test]
    fn observability_state_renders_as_text_format() {
        let scrape = Scrape {
            node_id: 1,
            last_offset: 10,
            raft_leader: Some(1),
            subscriptions: vec![SubscriptionScrape {
                id: 7,
                pattern: "crm.\"x\\.>".into(),
                next_offset: 9,
                queue_messages: 2,
                queue_bytes: 300,
            }],
            ..Scrape::default()
        };
        let mut out = String::new();
        render_state(&mut out, &scrape);
        assert!(out.contains("switchboard_raft_is_leader 1\n"), "{out}");
        assert!(out.contains("switchboard_last_offset 10\n"), "{out}");
        assert!(
            out.contains(
                "switchboard_subscription_lag{subscription=\"7\",pattern=\"crm.\\\"x\\\\.>\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("switchboard_subscription_queue_bytes{subscription=\"7\"} 300\n"),
            "{out}"
        );
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn observability_latency_is_clamped_at_zero() {
        assert_eq!(seconds_since(2_000_000, 1_000_000), 0.0);
        assert_eq!(seconds_since(1_000_000, 3_500_000), 2.5);
    }
}
