//! `sb`: the Switchboard command line. Publishes, subscribes (with flow control and durable
//! consumers), reads history, describes the broker, its live subscriptions and durable consumers,
//! and reads, writes and watches shared entities, printing one JSON object per line on stdout
//! (or, with `--output`, a form for people or payloads only).
//!
//! It is its own crate (`switchboard-cli`, binary `sb`) on top of `switchboard-client`, so that
//! library users of the client do not compile clap, chrono and tracing-subscriber.
//!
//! # Layout
//! - `main.rs`: the argument definitions and the commands;
//! - `args.rs`: parses argument values (`--from`, `--to`, `--header`, `--policy`) and picks the
//!   default entity writer id;
//! - `output.rs`: formats the JSON lines;
//! - `print.rs`: `--output json|text|raw`, the form everything on stdout takes;
//! - `json_text.rs`: JSON payloads laid out on one line or indented, numbers untouched;
//! - `completions.rs`: `sb completions SHELL`;
//! - `kpi.rs`: `sb kpi`, KPI views and their values as JSON lines or tables;
//! - `bench.rs`: `sb bench`, throughput and latency against any broker;
//! - `request.rs`: `sb request` and `sb reply`, request/reply over ephemeral messages;
//! - `security.rs`: the TLS and token options, `sb token` and the hints under authentication
//!   errors;
//! - `hints.rs`: the `hint:` line under an error (those of `security.rs`, then the wrong port, an
//!   invalid pattern or channel).

mod args;
mod bench;
mod completions;
mod hints;
mod json_text;
mod kpi;
mod output;
mod print;
mod request;
mod security;
mod trace;

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use switchboard_client::{
    Client, ClusterStatus, EntityDelete, EntityEvent, EntityUpdate, Error, FlowPolicy,
    HistoryQuery, Publish, RetryPolicy, Start, SubscribeOptions, Subscription, SubscriptionEvent,
};
use tokio::time::Instant;

use crate::args::End;

const EXAMPLES: &str = "\
Examples:
  sb publish crm.contact.updated '{\"id\":42}'
  echo '{\"id\":42}' | sb publish crm.contact.updated --ttl 30s --header traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
  sb subscribe 'crm.*.updated' --from earliest --count 10
  sb subscribe 'telemetry.>' --from 2024-05-01T12:00:00Z --timeout 30s
  sb subscribe 'telemetry.>' --policy conflate --throttle 250ms
  sb subscribe 'orders.>' --durable billing --max-unacked 100 --ack
  sb consumer list
  sb subscriptions
  sb history 'crm.>' --from 100 --to 200 --limit 50
  SWITCHBOARD_URL=http://10.0.0.5:7400 sb info
  sb entity update contact 42 '{\"name\":\"Ada\",\"vip\":true}' --writer panel-7
  sb entity get contact 42 --if-none-match '\"v3\"'
  sb entity delete contact 42 --expect-version 3
  sb entity watch 'contact.*' --count 1 --timeout 30s
  sb kpi define web/demo/kpis/widget_events.toml
  sb --output text kpi get widget_events --windows 5
  sb --ca ca.pem --server broker.example.com:7400 --token-file token.jwt info
  SWITCHBOARD_CLIENT_ID=crm-panel SWITCHBOARD_CLIENT_SECRET=... sb --ca ca.pem token
  sb --output text subscribe 'crm.>'
  sb history 'files.>' --output raw > payloads
  source <(sb completions bash)

Output is one JSON object per line on stdout; --output (or SB_OUTPUT) picks another form:
  json   one JSON object per line (the default); a JSON payload is the JSON itself
  text   for people: a delivery as `[OFFSET] CHANNEL  TIME`, its headers and its payload (JSON
         indented), anything else as `name  value` rows, a blank line between records
  raw    subscribe and history: each payload's bytes followed by a newline, nothing else (gaps go
         to stderr); the other commands print JSON lines
Errors go to stderr as `error: CODE REASON: message` (for example
`error: INVALID_ARGUMENT CHANNEL_INVALID: channel \"crm..updated\": segment 1 is empty (...)`);
the exit status is 1 for errors and 2 for usage errors. A broker with authentication refuses a
call without a valid token with UNAUTHENTICATED and a reason (TOKEN_MISSING, TOKEN_EXPIRED, ...),
and one its token does not allow with PERMISSION_DENIED (PUBLISH_DENIED, SUBSCRIBE_DENIED, ...);
sb then prints a `hint:` line on what to do, as it does when --server answers but not with gRPC
(the admin port, for one) and under an invalid pattern or channel.

Set SB_LOG (for example SB_LOG=debug) to see the client's logs on stderr; by default only warnings
(such as a subscription resuming after a lost connection) are shown.";

/// Publish to, subscribe to, and read from a Switchboard broker; list its live subscriptions and
/// durable consumers; read, write and watch its shared entities.
///
/// Channels are dot-separated names such as `crm.contact.updated`; patterns may use `*` for one
/// segment and, as the last segment, `>` for one or more (`crm.*.updated`, `telemetry.>`).
#[derive(Debug, Parser)]
#[command(name = "sb", version, after_help = EXAMPLES)]
struct Cli {
    /// The broker's gRPC URL; a bare `host:port` means `http://host:port` (`https://host:port`
    /// with --ca).
    // Every `env` argument of sb sets hide_env_values: without it clap's help prints
    // `[env: SWITCHBOARD_URL=]` while the variable is unset, and its value (a secret, for some)
    // while it is set.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_URL",
        hide_env_values = true,
        default_value = "127.0.0.1:7400",
        value_name = "URL"
    )]
    server: String,

    /// How answers are printed: json (one object per line), text (for people), or raw
    /// (subscribe and history: each payload's bytes and a newline, nothing else).
    #[arg(
        long,
        global = true,
        env = "SB_OUTPUT",
        hide_env_values = true,
        value_enum,
        default_value_t = print::OutputMode::Json,
        value_name = "FORM"
    )]
    output: print::OutputMode,

    #[command(flatten)]
    security: security::SecurityArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one message and print its ack.
    #[command(after_help = "\
Prints the ack as one line: {\"offset\":N,\"publish_time\":\"2024-05-01T12:00:00.250Z\",\"correlation_id\":\"...\"}
followed by \"duplicate\":true when the broker already stored this message (same channel and
--idempotency-key within its dedup window): nothing new was stored, and offset and publish_time
are the original's.

--causation-id and --hops describe the causal chain when publishing a reaction to a delivery:
the delivery's offset and its hops + 1 (and its correlation id as --correlation-id). The broker
refuses a chain that re-enters a channel, or with more hops than its limit, with
FAILED_PRECONDITION LOOP_DETECTED.

The payload is sent byte for byte, except that one newline (`\n` or `\r\n`) ending what is read
from stdin is left out, as `echo` adds it; --keep-newline keeps it. Unless --content-type says
otherwise it is JSON and must parse as JSON.

--retry DURATION keeps trying for up to that long while the broker cannot take the message
(not reachable yet, restarting, no leader, rate limited), with backoff and jitter, under one
idempotency key (a generated UUID unless --idempotency-key is given), so the message is stored
once: an ack with \"duplicate\":true means an earlier attempt had stored it. A refusal of the
message itself (invalid, denied, schema) is never retried. See docs/CLIENT-RESILIENCE.md.

Examples:
  sb publish crm.contact.updated '{\"id\":42}' --idempotency-key contact-42-v7
  sb publish crm.contact.updated '{\"id\":42}' --retry 30s
  sb publish telemetry.widget.click - --ttl 500ms < event.json
  printf 'raw' | sb publish files.blob.stored --content-type application/octet-stream")]
    Publish(PublishArgs),

    /// Follow the messages matching a pattern, one JSON line per delivery.
    #[command(after_help = "\
Prints one line per delivered message: offset, channel, publish_time (RFC 3339, UTC, millis),
correlation_id, causation_id and idempotency_key (left out when empty), hops, skipped (earlier
messages of the channel left out by conflation or the throttle) and redelivery (how many times it
was delivered before without an acknowledgement), each left out when 0, content_type,
schema_version, ttl_ms, expires_at (left out when there is no TTL), headers (an object), payload
and payload_encoding (\"json\": a payload of a JSON content type that parses, as the JSON itself,
on one line; \"utf8\": the payload as a string; \"base64\": standard base64 of the bytes).
Messages that will not be delivered are announced by a line
  {\"gap\":{\"from_offset\":N,\"to_offset\":N,\"count\":N,\"reason\":\"dropped\"|\"retention\"}}
(dropped: --policy drop-oldest and more than --window behind; retention: removed before they were
read). Each line is flushed as it is written.

Once the broker confirms the subscription, `sb: subscribed to PATTERN (next offset N, subscription
S)` is written to stderr: anything published after that line is delivered. A lost connection is
resumed where it left off, with no gap and no duplicate. A durable consumer (--durable) resumes
after its last acknowledgement instead, and what was delivered but not acknowledged comes again;
a throttled one (--throttle) resumes a little early and may repeat a channel's latest message.

Flow control (see docs/FLOW.md), sent again on every resume:
  --policy lossless      every message, however far behind (the default)
  --policy conflate      when behind, only the latest message of each channel
  --policy drop-oldest   when more than --window messages behind, skip the oldest (with a gap line)
  --throttle DURATION    at most one delivery per channel per DURATION, the latest
  --max-unacked N        at most N deliveries waiting for an acknowledgement (use with --ack, or
                         the broker stops after N)
  --durable NAME         the durable consumer NAME: the broker keeps its acknowledged offset and
                         redelivers what is not acknowledged within --ack-timeout
  --ack                  acknowledge each delivery after printing it

--from takes `earliest`, `latest`, an offset (a message's `offset` field, 1 and up), or an RFC 3339
time such as 2024-05-01T12:00:00Z or 2024-05-01T14:00:00.250+02:00. An existing durable consumer
ignores it and resumes after its acknowledged offset.

Exits with status 0 after --count deliveries (gap lines do not count) or when --timeout has passed
(whichever comes first), and runs until interrupted otherwise.

Examples:
  sb subscribe 'crm.*.updated'
  sb subscribe 'telemetry.>' --from earliest --count 100 --timeout 10s
  sb subscribe orders.created --from 2024-05-01T12:00:00Z
  sb subscribe 'telemetry.>' --policy drop-oldest --window 1000
  sb subscribe 'orders.>' --durable billing --from earliest --ack --ack-timeout 30s")]
    Subscribe(SubscribeArgs),

    /// Read stored messages matching a pattern, one JSON line per message.
    #[command(after_help = "\
Prints stored, unexpired messages in offset order, in the same line format as `sb subscribe`,
paging through the broker's results until --limit messages were printed or the range ends.

--from takes `earliest`, an offset or an RFC 3339 time (2024-05-01T12:00:00Z); --to takes an
offset or a time; both bounds are inclusive.

Examples:
  sb history 'crm.>'
  sb history 'crm.>' --from 100 --to 200
  sb history 'telemetry.>' --from 2024-05-01T12:00:00Z --to 2024-05-01T13:00:00Z --limit 0")]
    History(HistoryArgs),

    /// Describe the broker node: version, node and leader ids, offsets, sizes, raft term.
    #[command(after_help = "\
Prints one line: {\"version\":\"0.1.0\",\"node_id\":1,\"last_offset\":N,\"first_offset\":N,
\"stored_bytes\":N,\"disk_bytes\":N,\"leader_id\":1,\"term\":N,\"applied_index\":N,\"loops_detected\":N}")]
    Info,

    /// List the subscriptions live on the broker node, one JSON line each.
    #[command(after_help = "\
Prints one line per live subscription of the node sb is connected to:
{\"subscription_id\":N,\"pattern\":\"...\",\"policy\":\"lossless\"|\"conflate\"|\"drop-oldest\",
\"durable_name\":\"...\",\"next_offset\":N,\"lagging\":false,\"buffered_messages\":N,\"buffered_bytes\":N,
\"peak_buffered_bytes\":N,\"buffered_bytes_limit\":N,\"pending\":N,\"delivered\":N,\"slow_switches\":N}
durable_name is empty unless the subscription is a durable consumer; lagging is true while it is
served from the store because it fell behind; pending counts deliveries waiting for an
acknowledgement.")]
    Subscriptions,

    /// List, describe and delete durable consumers.
    #[command(subcommand)]
    Consumer(ConsumerCommand),

    /// Read, write and watch shared entities (records such as a contact, merged field by field).
    #[command(subcommand)]
    Entity(EntityCommand),

    /// Register, read, check and remove payload schemas (JSON Schema per channel pattern and
    /// version, checked on every publish; see docs/SCHEMAS.md).
    #[command(subcommand)]
    Schema(SchemaCommand),

    /// Define, list, read, watch and drop KPI views (counts and quantiles of the messages, per
    /// UTC window and group, computed in the broker; see docs/KPIS.md).
    #[command(subcommand)]
    Kpi(kpi::KpiCommand),

    /// Show and change the raft cluster's membership (run on the leader wherever sent): voters, and
    /// read replicas that carry subscriptions and reads without counting toward the quorum.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Exchange --client-id and --client-secret at the broker's token endpoint for a token, and
    /// print it with its expiry and scope.
    #[command(after_help = "\
Prints one line:
  {\"access_token\":\"eyJ...\",\"token_type\":\"Bearer\",\"expires_at\":\"2026-01-01T12:15:00.000Z\",
   \"expires_in_seconds\":900,\"scope\":{\"publish\":[...],\"subscribe\":[...],\"entity_read\":[...],\"entity_update\":[...]}}
or, with --raw, only the token. The token works until expires_at with any client, for example
`sb --token-file FILE`; `sb --client-id ... --client-secret ...` fetches and renews tokens by itself.

The broker refuses an unknown client or a wrong secret with UNAUTHENTICATED INVALID_CLIENT (the
two are not told apart), a --subject the client may not act for with PERMISSION_DENIED
ON_BEHALF_NOT_ALLOWED, and a broker without configured clients with UNIMPLEMENTED
TOKEN_ENDPOINT_OFF.

Examples:
  SWITCHBOARD_CLIENT_ID=crm-panel SWITCHBOARD_CLIENT_SECRET=... sb --ca ca.pem token
  sb token --subject agent-17 --ttl 5m --raw > token.jwt")]
    Token(security::TokenArgs),

    /// Print the completion script for a shell.
    #[command(after_help = "\
Examples:
  sb completions bash > ~/.local/share/bash-completion/completions/sb
  sb completions zsh > \"${fpath[1]}/_sb\"
  sb completions fish > ~/.config/fish/completions/sb.fish")]
    Completions(completions::CompletionsArgs),

    /// Measure publish and subscribe throughput and publish→receive latency (like `nats bench`).
    #[command(after_help = bench::HELP)]
    Bench(bench::BenchArgs),

    /// Send a request (an ephemeral message with a reply-to inbox) and print the first reply.
    #[command(after_help = request::REQUEST_HELP)]
    Request(request::RequestArgs),

    /// Answer the requests sent to a pattern, with fixed data or a command's output.
    #[command(after_help = request::REPLY_HELP)]
    Reply(request::ReplyArgs),
}

const CONSUMER_OUTPUT: &str = "\
A consumer is printed as one line:
{\"name\":\"billing\",\"pattern\":\"orders.>\",\"policy\":\"lossless\",\"acked_offset\":N,\"pending\":N,
\"redeliveries\":N,\"connected\":true,\"created_at\":\"2024-05-01T12:00:00.250Z\"}
where every delivery at or below acked_offset is acknowledged, and pending counts deliveries
waiting for an acknowledgement (0 when not connected to this node).";

const CLUSTER_OUTPUT: &str = "\
Prints the cluster as the leader sees it, one line:
{\"leader_id\":N,\"term\":N,\"applied_index\":N,\"nodes\":[{\"id\":N,\"role\":\"leader\"|\"voter\"|\"replica\",
\"raft_address\":\"host:port\",\"public_address\":\"host:port\",\"matched_index\":N},...]}
where matched_index is the highest log index known to be on that node (left out when unknown),
and a replica is a raft learner (the API's role \"learner\"): it receives the log and serves
subscriptions, history and reads, forwards writes, and never votes or counts toward the quorum.
UNAVAILABLE NO_LEADER or LEADER_UNREACHABLE when no leader can be reached; membership changes
that cannot be made are FAILED_PRECONDITION MEMBERSHIP_INVALID. See docs/CLUSTER.md.";

const SCHEMA_OUTPUT: &str = "\
A schema is printed as one line:
{\"pattern\":\"crm.contact.*\",\"version\":\"1.2.0\",\"policy\":\"enforce\"|\"warn\"|\"off\",
\"registered_at\":\"2024-05-01T12:00:00.250Z\",\"registered_by\":\"ISSUER SUBJECT\",\"document\":{...}}
(registered_by left out without authentication; document left out of `list` unless --documents).";

#[derive(Debug, Subcommand)]
enum SchemaCommand {
    /// Register a JSON Schema for the channels matching PATTERN at semver VERSION (replacing what
    /// that pair held) and print it with how the newest retained messages fare against it.
    #[command(after_help = format!("{SCHEMA_OUTPUT}

The line also has \"replaced\" (whether the pattern and version held a schema already) and
\"compatibility\": {{\"checked\":N,\"failing\":N,\"examples\":[{{\"offset\":N,\"channel\":\"...\",
\"schema_version\":\"...\",\"failures\":[...]}}],\"truncated\":false}}: the newest retained messages
on matching channels with the same major version (up to schemas.compatibility_sample), checked
against the new document. With --require-compatible, any failing one refuses the registration
(FAILED_PRECONDITION SCHEMA_INCOMPATIBLE, nothing written).

A message selects the highest registered version with its major at or below its own
schema_version, on the most specific matching pattern. Policies: enforce refuses what does not
match (INVALID_ARGUMENT SCHEMA_MISMATCH), warn stores it, both announce it on $sys.schema.drift;
off checks nothing. Needs the `schema` (or `admin`) grant.

Examples:
  sb schema put 'crm.contact.*' 1.0.0 contact.schema.json
  sb schema put 'telemetry.widget.>' 2.1.0 - --policy warn < click.schema.json
  sb schema put 'crm.contact.*' 1.1.0 contact-1.1.json --require-compatible"))]
    Put(SchemaPutArgs),

    /// Print one registration (the pattern's highest version when VERSION is left out), with its
    /// document.
    #[command(after_help = format!("{SCHEMA_OUTPUT}

An unknown pattern or version is NOT_FOUND SCHEMA_NOT_FOUND (exit status 1).

Examples:
  sb schema get 'crm.contact.*'
  sb schema get 'crm.contact.*' 1.0.0"))]
    Get(SchemaGetArgs),

    /// Print every registration, one JSON line each, most specific pattern first.
    #[command(after_help = SCHEMA_OUTPUT)]
    List(SchemaListArgs),

    /// Check a payload against the schema a publish on CHANNEL would meet, without publishing.
    #[command(after_help = "\
Prints one line: {\"valid\":true|false,\"pattern\":\"...\",\"schema_version\":\"...\",\"policy\":\"...\",
\"reason\":\"SCHEMA_MISMATCH\"|\"SCHEMA_VERSION_UNKNOWN\",\"failures\":[{\"instance_path\":\"/id\",
\"keyword\":\"type\",\"message\":\"...\"}]} (pattern, schema_version, reason and failures left out
when empty). valid says whether a publish would pass: under warn a mismatch passes (and is
announced). Exits with status 2 when it would not.

Examples:
  sb schema check crm.contact.updated '{\"id\":42,\"name\":\"Ada\"}'
  sb schema check telemetry.widget.click - --schema-version 2.0.0 < event.json")]
    Check(SchemaCheckArgs),

    /// Remove one registration; prints {"deleted":"PATTERN VERSION"}.
    #[command(after_help = "\
An unknown pattern or version is NOT_FOUND SCHEMA_NOT_FOUND (exit status 1). Needs the `schema`
(or `admin`) grant.")]
    Delete(SchemaNameArgs),
}

#[derive(Debug, Args)]
struct SchemaPutArgs {
    /// The channel pattern it applies to, e.g. `crm.contact.*` or `telemetry.widget.>`.
    pattern: String,
    /// Its version, semver (e.g. 1.2.0).
    version: String,
    /// A file holding the JSON Schema document, or `-` for stdin.
    file: String,
    /// What a message that does not match meets.
    #[arg(long, value_enum, default_value_t = SchemaPolicyArg::Enforce)]
    policy: SchemaPolicyArg,
    /// Refuse the registration when a retained message it would judge fails it.
    #[arg(long)]
    require_compatible: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SchemaPolicyArg {
    /// Refuse the message (INVALID_ARGUMENT SCHEMA_MISMATCH).
    Enforce,
    /// Store it, and announce the drift on $sys.schema.drift.
    Warn,
    /// Check nothing.
    Off,
}

#[derive(Debug, Args)]
struct SchemaGetArgs {
    /// The pattern, as registered.
    pattern: String,
    /// The version; the highest when left out.
    version: Option<String>,
}

#[derive(Debug, Args)]
struct SchemaListArgs {
    /// Only this pattern's registrations.
    #[arg(long)]
    pattern: Option<String>,
    /// Print each registration's document too.
    #[arg(long)]
    documents: bool,
}

#[derive(Debug, Args)]
struct SchemaNameArgs {
    /// The pattern, as registered.
    pattern: String,
    /// The version.
    version: String,
}

#[derive(Debug, Args)]
struct SchemaCheckArgs {
    /// The channel the message would be published on.
    channel: String,
    /// The payload; `-` or left out: read from stdin.
    data: Option<String>,
    /// The message's schema version (semver); 1.0.0 when left out, as for a publish.
    #[arg(long)]
    schema_version: Option<String>,
    /// The payload's media type (application/json when left out).
    #[arg(long)]
    content_type: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Print the members, their roles, the leader, the term and each node's replication.
    #[command(after_help = CLUSTER_OUTPUT)]
    Status,

    /// Add a node as a read replica (a raft learner: it receives the log and serves reads but does
    /// not vote); waits until it caught up.
    #[command(after_help = format!("{CLUSTER_OUTPUT}

The new node is started first with cluster.listen set and no cluster.members. It stays a replica
until `sb cluster promote` makes it a voter: nothing promotes it by itself. With --replica, adding
a node that already is a replica at the same raft address succeeds too (prints the status), so a
deployment can run the command at every start.
Examples:
  sb cluster add 4 sb4:7402 --public sb4:7400               # then `sb cluster promote 4`, or not
  sb cluster add --replica 5 sb5:7402 --public sb5:7400     # a read replica for good"))]
    Add(ClusterAddArgs),

    /// Make a replica (learner) a voter.
    #[command(after_help = CLUSTER_OUTPUT)]
    Promote(ClusterIdArgs),

    /// Remove a node (voter or replica) from the cluster.
    #[command(after_help = CLUSTER_OUTPUT)]
    Remove(ClusterIdArgs),
}

#[derive(Debug, Args)]
struct ClusterAddArgs {
    /// The node's id (its node_id setting).
    id: u64,
    /// Where the other nodes reach its raft listener, host:port (its cluster.advertise).
    raft_address: String,
    /// Where clients reach it, host:port (its cluster.public_advertise), used in leader hints.
    #[arg(long, value_name = "HOST:PORT", default_value = "")]
    public: String,
    /// Meant to stay a read replica: also succeed when it already is one at this raft address.
    #[arg(long)]
    replica: bool,
}

#[derive(Debug, Args)]
struct ClusterIdArgs {
    /// The node's id.
    id: u64,
}

#[derive(Debug, Subcommand)]
enum ConsumerCommand {
    /// Print every durable consumer, one JSON line each.
    #[command(after_help = CONSUMER_OUTPUT)]
    List,

    /// Print one durable consumer.
    #[command(after_help = format!("{CONSUMER_OUTPUT}

An unknown name is NOT_FOUND CONSUMER_NOT_FOUND (exit status 1)."))]
    Info(ConsumerNameArgs),

    /// Delete a durable consumer and its acknowledged offset; prints {"deleted":"NAME"}.
    #[command(after_help = "\
A subscription connected with that name ends. An unknown name is NOT_FOUND CONSUMER_NOT_FOUND
(exit status 1).")]
    Delete(ConsumerNameArgs),
}

#[derive(Debug, Args)]
struct ConsumerNameArgs {
    /// The consumer's name, for example `billing`.
    name: String,
}

const ENTITY_OUTPUT: &str = "\
Prints the entity after the change as one line:
{\"type\":\"contact\",\"id\":\"42\",\"version\":N,\"etag\":\"...\",\"deleted\":false,
\"updated_at\":\"2024-05-01T12:00:00.250Z\",\"fields\":{...},
\"last_stamp\":{\"timestamp_ms\":N,\"version\":N,\"writer\":\"...\"}}
where fields is the merged JSON object itself and updated_at is RFC 3339, UTC, millis.

Every write is stamped (timestamp_ms, version, writer), compared in that order; each field keeps
the value of the write with the greatest stamp. --timestamp defaults to now, --version to 0, and
--writer to $SB_WRITER, else `sb-USER@HOST` (from $USER and the host name), else `sb`. Two writes
of one field from the same writer in the same millisecond need distinct --version values.

Refusals (printed as `error: CODE REASON: message`, exit status 1):
  FAILED_PRECONDITION STALE_UPDATE   no field wins: each was set by a write with a greater stamp
  FAILED_PRECONDITION CLOCK_SKEW     --timestamp is too far ahead of the broker's clock
  ABORTED VERSION_CONFLICT           --expect-version does not match the entity's version
  INVALID_ARGUMENT ENTITY_KEY_INVALID, ENTITY_FIELDS_INVALID, WRITE_STAMP_INVALID
The error's metadata carries the entity's current version (the library's
Error::current_version); `sb` prints only the line above.";

#[derive(Debug, Subcommand)]
enum EntityCommand {
    /// Merge fields into an entity (creating it when new) and print the entity.
    #[command(after_help = format!("{ENTITY_OUTPUT}

Examples:
  sb entity update contact 42 '{{\"name\":\"Ada\",\"phone\":null}}'
  sb entity update contact 42 - --writer panel-7 < fields.json
  sb entity update contact 42 '{{\"vip\":true}}' --expect-version 3
  sb entity update contact 43 '{{\"name\":\"Bob\"}}' --expect-version 0   # only if new"))]
    Update(EntityUpdateArgs),

    /// Print an entity, or {"not_modified":true} when --if-none-match is its current ETag.
    #[command(after_help = "\
Prints the entity as `sb entity update` does (a deleted entity has \"deleted\":true), or
{\"not_modified\":true} when --if-none-match is still its current etag. An entity that never
existed is NOT_FOUND ENTITY_NOT_FOUND (exit status 1).

Examples:
  sb entity get contact 42
  sb entity get contact 42 --if-none-match '\"v3\"'")]
    Get(EntityGetArgs),

    /// Delete an entity (a stamped tombstone removing every older field) and print the entity.
    #[command(after_help = format!("{ENTITY_OUTPUT}

Examples:
  sb entity delete contact 42
  sb entity delete contact 42 --expect-version 7"))]
    Delete(EntityDeleteArgs),

    /// Print the entities matching a pattern (a snapshot), then every change, one JSON line each.
    #[command(after_help = "\
Prints one line per event, each flushed as it is written:
  {\"event\":\"snapshot\",\"type\":...}                every matching entity's current state
  {\"event\":\"snapshot_complete\",\"entities\":N}     once, after the snapshot
  {\"event\":\"change\",\"type\":...}                  every change after that
where the entity's fields follow \"event\" as `sb entity get` prints them. Once the snapshot is
complete, `sb: watching PATTERN` is written to stderr.

The pattern is over `type.id`: contact.42, 'contact.*', '>'.

--count counts change events only (--count 0 prints the snapshot and exits). Exits with status 0
after --count changes or when --timeout has passed, and runs until interrupted otherwise. A watch
does not resume: if the connection is lost it exits with status 1; watching again starts over
with a fresh snapshot.

Examples:
  sb entity watch 'contact.*'
  sb entity watch '>' --count 0
  sb entity watch contact.42 --count 1 --timeout 30s")]
    Watch(EntityWatchArgs),
}

/// How an entity write is stamped, and its compare-and-set condition.
#[derive(Debug, Args)]
struct StampArgs {
    /// The write's time, Unix milliseconds; now by default.
    #[arg(long, value_name = "MS")]
    timestamp: Option<u64>,

    /// The writer's counter, breaking ties between its writes in the same millisecond.
    #[arg(long = "version", value_name = "N", default_value_t = 0)]
    stamp_version: u64,

    /// The writer id; `sb-USER@HOST` by default.
    #[arg(long, env = "SB_WRITER", hide_env_values = true, value_name = "ID")]
    writer: Option<String>,

    /// Apply only if the entity's current version is N (0: only if it does not exist yet).
    #[arg(long, value_name = "N")]
    expect_version: Option<u64>,
}

#[derive(Debug, Args)]
struct EntityUpdateArgs {
    /// The entity's type, for example `contact`.
    #[arg(value_name = "TYPE")]
    entity_type: String,

    /// The entity's id, for example `42`.
    id: String,

    /// The fields to write, a JSON object; `-` reads it from stdin.
    #[arg(value_name = "JSON|-")]
    json: String,

    #[command(flatten)]
    stamp: StampArgs,
}

#[derive(Debug, Args)]
struct EntityGetArgs {
    /// The entity's type, for example `contact`.
    #[arg(value_name = "TYPE")]
    entity_type: String,

    /// The entity's id, for example `42`.
    id: String,

    /// The etag of an earlier read: prints {"not_modified":true} if it is still current.
    #[arg(long, value_name = "ETAG")]
    if_none_match: Option<String>,
}

#[derive(Debug, Args)]
struct EntityDeleteArgs {
    /// The entity's type, for example `contact`.
    #[arg(value_name = "TYPE")]
    entity_type: String,

    /// The entity's id, for example `42`.
    id: String,

    #[command(flatten)]
    stamp: StampArgs,
}

#[derive(Debug, Args)]
struct EntityWatchArgs {
    /// A pattern over `type.id`, for example `contact.*` or `>`.
    pattern: String,

    /// Exit (status 0) after this many change events (snapshot events do not count).
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Exit (status 0) once this long has passed since `sb` started, for example `10s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The channel, for example `crm.contact.updated`.
    channel: String,

    /// The payload, as a string; `-` or nothing reads it from stdin to its end.
    #[arg(value_name = "DATA|-")]
    data: Option<String>,

    /// Keep a newline that ends the payload read from stdin (left out by default).
    #[arg(long)]
    keep_newline: bool,

    /// Time to live, for example `30s`, `500ms`, `2h 30m`; none by default.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,

    /// Correlation id (a UUID); the broker generates one when absent.
    #[arg(long, value_name = "UUID")]
    correlation_id: Option<String>,

    /// The id of the message that caused this one.
    #[arg(long, value_name = "ID")]
    causation_id: Option<String>,

    /// A key identifying this logical message across retries.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,

    /// A header, `NAME=VALUE`; repeat for several (a repeated name keeps the last value).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = args::parse_header)]
    headers: Vec<(String, String)>,

    /// The payload's media type; `application/json` by default.
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,

    /// The payload's schema version (semver); `1.0.0` by default.
    #[arg(long, value_name = "SEMVER")]
    schema_version: Option<String>,

    /// How many messages precede this one in its causal chain (the cause's hops + 1); 0 by
    /// default.
    #[arg(long, value_name = "N")]
    hops: Option<u32>,

    /// Deliver at once to live subscribers on every node and never store it (offset 0, no
    /// history, no replay, at most once): typing indicators, cursors, presence.
    #[arg(long)]
    ephemeral: bool,

    /// Keep trying for up to this long (for example `30s`) while the broker cannot take the
    /// message: not reachable, restarting, no leader, rate limited. Off by default (one attempt).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    retry: Option<Duration>,
}

impl PublishArgs {
    /// The retry policy `--retry` asks for; one attempt without it.
    fn retry_policy(&self) -> RetryPolicy {
        self.retry
            .map_or_else(RetryPolicy::none, RetryPolicy::within)
    }
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    /// The channel pattern, for example `crm.*.updated` or `telemetry.>`.
    pattern: String,

    /// Where to start: earliest, latest, an offset, or an RFC 3339 time.
    #[arg(long, value_name = "POSITION", default_value = "latest", value_parser = args::parse_start)]
    from: Start,

    /// Exit (status 0) after this many deliveries (gaps do not count).
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Exit (status 0) once this long has passed since `sb` started, for example `10s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,

    /// What the broker does when sb falls behind: lossless (the default), conflate or
    /// drop-oldest.
    #[arg(long, value_name = "POLICY", value_parser = args::parse_policy)]
    policy: Option<FlowPolicy>,

    /// drop-oldest: how many messages behind before the oldest are skipped; the broker's default
    /// when absent.
    #[arg(long, value_name = "N")]
    window: Option<u32>,

    /// At most one delivery per channel per this interval, the latest, for example `250ms`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    throttle: Option<Duration>,

    /// At most this many deliveries waiting for an acknowledgement (see --ack).
    #[arg(long, value_name = "N")]
    max_unacked: Option<u32>,

    /// Subscribe as the durable consumer of this name (1 to 64 of A-Z a-z 0-9 _ -).
    #[arg(long, value_name = "NAME")]
    durable: Option<String>,

    /// Durable consumers: redeliver what is not acknowledged within this long, for example `30s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ack_timeout: Option<Duration>,

    /// Acknowledge each delivery after printing it.
    #[arg(long)]
    ack: bool,
}

impl SubscribeArgs {
    /// The subscription options the flags ask for.
    fn options(&self) -> SubscribeOptions {
        let mut options = SubscribeOptions::default();
        if let Some(policy) = self.policy {
            options = options.policy(policy);
        }
        if let Some(window) = self.window {
            options = options.window(window);
        }
        if let Some(interval) = self.throttle {
            options = options.throttle(interval);
        }
        if let Some(credits) = self.max_unacked {
            options = options.max_unacked(credits);
        }
        if let Some(name) = &self.durable {
            options = options.durable(name.as_str());
        }
        if let Some(timeout) = self.ack_timeout {
            options = options.ack_timeout(timeout);
        }
        options
    }
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// The channel pattern, for example `crm.>`.
    pattern: String,

    /// The first position to read (inclusive): earliest, an offset, or an RFC 3339 time.
    #[arg(long, value_name = "POSITION", default_value = "earliest", value_parser = args::parse_history_start)]
    from: Start,

    /// The last position to read (inclusive): an offset or an RFC 3339 time.
    #[arg(long, value_name = "POSITION", value_parser = args::parse_end)]
    to: Option<End>,

    /// The most messages to print; 0 for no limit.
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    print::set_mode(cli.output);
    let server = cli.server.clone();
    let outcome = run(cli).await;
    trace::shutdown().await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`sb subscribe ... | head -1`): not an error of ours.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if let Some(hint) = hints::hint(&error, &server) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let filter = tracing_subscriber::EnvFilter::try_from_env("SB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(trace::layer())
        .try_init();
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Command::Completions(args) = &cli.command {
        // Needs no broker: before connecting.
        return completions::print(args.shell, &mut <Cli as clap::CommandFactory>::command());
    }
    let mut options = cli.security.connect_options()?;
    if let Command::Publish(args) = &cli.command {
        // `sb publish --retry` also waits for a broker that is not reachable yet.
        options = options.retry(args.retry_policy());
    }
    let client = Client::connect_with(cli.server, options).await?;
    match cli.command {
        Command::Token(args) => security::token(&client, &cli.security, args).await,
        Command::Completions(args) => {
            completions::print(args.shell, &mut <Cli as clap::CommandFactory>::command())
        }
        Command::Publish(args) => trace::traced(publish(&client, args)).await,
        Command::Bench(args) => bench::run(&client, &cli.security, args).await,
        Command::Request(args) => request::request(&client, args).await,
        Command::Reply(args) => request::reply(&client, args, started).await,
        Command::Subscribe(args) => subscribe(&client, args, started).await,
        Command::History(args) => history(&client, args).await,
        Command::Info => {
            let info = client.info().await?;
            emit(&output::info_line(&info)?)
        }
        Command::Subscriptions => {
            for info in client.list_subscriptions().await? {
                emit(&output::subscription_line(&info)?)?;
            }
            Ok(())
        }
        Command::Consumer(command) => consumer(&client, command).await,
        Command::Entity(command) => entity(&client, command, started).await,
        Command::Schema(command) => schema(&client, command).await,
        Command::Kpi(command) => kpi::run(&client, command, started).await,
        Command::Cluster(command) => {
            let status = match command {
                ClusterCommand::Status => client.cluster_status().await?,
                ClusterCommand::Add(args) => cluster_add(&client, args).await?,
                ClusterCommand::Promote(args) => client.cluster_promote(args.id).await?,
                ClusterCommand::Remove(args) => client.cluster_remove(args.id).await?,
            };
            emit(&output::cluster_line(&status)?)
        }
    }
}

/// `sb schema …`.
async fn schema(client: &Client, command: SchemaCommand) -> anyhow::Result<()> {
    use switchboard_client::proto::{CheckSchemaRequest, SchemaPolicy};
    use switchboard_client::SchemaPut;

    match command {
        SchemaCommand::Put(args) => {
            let document = if args.file == "-" {
                read_stdin("the schema document").await?
            } else {
                tokio::fs::read(&args.file)
                    .await
                    .with_context(|| format!("reading the schema document {}", args.file))?
            };
            let document =
                String::from_utf8(document).context("the schema document is not UTF-8 text")?;
            let policy = match args.policy {
                SchemaPolicyArg::Enforce => SchemaPolicy::Enforce,
                SchemaPolicyArg::Warn => SchemaPolicy::Warn,
                SchemaPolicyArg::Off => SchemaPolicy::Off,
            };
            let mut put = SchemaPut::new(args.pattern, args.version, document).policy(policy);
            if args.require_compatible {
                put = put.require_compatible();
            }
            emit(&output::schema_put_line(&client.schema_put(put).await?)?)
        }
        SchemaCommand::Get(args) => {
            let version = args.version.unwrap_or_default();
            let schema = client.schema_get(&args.pattern, &version).await?;
            emit(&output::schema_line(&schema)?)
        }
        SchemaCommand::List(args) => {
            let pattern = args.pattern.unwrap_or_default();
            for schema in client.schema_list(&pattern, args.documents).await? {
                emit(&output::schema_line(&schema)?)?;
            }
            Ok(())
        }
        SchemaCommand::Delete(args) => {
            client.schema_delete(&args.pattern, &args.version).await?;
            emit(&output::deleted_line(&format!(
                "{} {}",
                args.pattern, args.version
            ))?)
        }
        SchemaCommand::Check(args) => {
            let payload = match args.data {
                Some(data) if data != "-" => data.into_bytes(),
                _ => read_stdin("the payload").await?,
            };
            let answer = client
                .schema_check(CheckSchemaRequest {
                    channel: args.channel,
                    payload: payload.into(),
                    content_type: args.content_type.unwrap_or_default(),
                    schema_version: args.schema_version.unwrap_or_default(),
                })
                .await?;
            emit(&output::schema_check_line(&answer)?)?;
            if answer.valid {
                Ok(())
            } else {
                // A failed check is an answer, not an error of the command: its own status, so a
                // script can tell it from a broker that could not be reached.
                std::process::exit(2)
            }
        }
    }
}

/// `sb cluster add`: adds a learner. With `--replica`, a node that already is a learner at the same
/// raft address counts as added, so the command can run at every start of a deployment (the
/// compose file's replica profile does).
async fn cluster_add(client: &Client, args: ClusterAddArgs) -> anyhow::Result<ClusterStatus> {
    let added = client
        .cluster_add_learner(args.id, args.raft_address.clone(), args.public)
        .await;
    match added {
        Ok(status) => Ok(status),
        // Adding a member with other addresses (here: another public address, or none) is
        // refused MEMBERSHIP_INVALID; whether it is the same replica, the status says.
        Err(refused)
            if args.replica
                && refused.reason() == Some(switchboard_client::Reason::MembershipInvalid) =>
        {
            let status = client.cluster_status().await?;
            let already = status.nodes.iter().any(|n| {
                n.id == args.id && n.role == "learner" && n.raft_address == args.raft_address
            });
            if already {
                Ok(status)
            } else {
                Err(refused.into())
            }
        }
        Err(refused) => Err(refused.into()),
    }
}

/// Prints one answer, given as its JSON line, in the `--output` form, flushed so that a reader on
/// a pipe sees it at once.
fn emit(line: &str) -> anyhow::Result<()> {
    print::record(line)
}

/// Reads stdin to its end; `what` names it in errors.
async fn read_stdin(what: &'static str) -> anyhow::Result<Vec<u8>> {
    let read = tokio::task::spawn_blocking(|| {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .map(|_| bytes)
    });
    let bytes = read
        .await
        .with_context(|| format!("reading {what} from stdin"))?
        .with_context(|| format!("reading {what} from stdin"))?;
    Ok(bytes)
}

async fn publish(client: &Client, args: PublishArgs) -> anyhow::Result<()> {
    let policy = args.retry_policy();
    let payload = match args.data {
        Some(data) if data != "-" => data.into_bytes(),
        _ => args::stdin_payload(read_stdin("the payload").await?, args.keep_newline),
    };
    let mut message = Publish::new(args.channel, payload).headers(args.headers);
    if args.ephemeral {
        message = message.ephemeral();
    }
    if let Some(ttl) = args.ttl {
        message = message.ttl(ttl);
    }
    if let Some(correlation_id) = args.correlation_id {
        message = message.correlation_id(correlation_id);
    }
    if let Some(causation_id) = args.causation_id {
        message = message.causation_id(causation_id);
    }
    if let Some(idempotency_key) = args.idempotency_key {
        message = message.idempotency_key(idempotency_key);
    }
    if let Some(content_type) = args.content_type {
        message = message.content_type(content_type);
    }
    if let Some(schema_version) = args.schema_version {
        message = message.schema_version(schema_version);
    }
    if let Some(hops) = args.hops {
        message = message.hops(hops);
    }
    let ack = client.publish_with(message, &policy).await?;
    emit(&output::ack_line(&ack)?)
}

async fn subscribe(client: &Client, args: SubscribeArgs, started: Instant) -> anyhow::Result<()> {
    let deadline = args.timeout.map(|timeout| started + timeout);
    let subscribing = client.subscribe_with(args.pattern.as_str(), args.from, args.options());
    let Some(subscribed) = until(deadline, subscribing).await else {
        return Ok(());
    };
    let mut subscription = subscribed?;
    eprintln!("{}", ready_line(&subscription));
    let mut delivered: u64 = 0;
    while args.count.is_none_or(|count| delivered < count) {
        let Some(next) = until(deadline, subscription.next_event()).await else {
            return Ok(());
        };
        match next {
            Some(Ok(SubscriptionEvent::Message(message))) => {
                print::message(&message)?;
                if args.ack {
                    let Some(acked) = until(deadline, subscription.ack(message.offset)).await
                    else {
                        return Ok(());
                    };
                    match acked {
                        Ok(_) => {}
                        // Lost with the connection: the resumed subscription has fresh credits,
                        // and a durable consumer's broker delivers the message again.
                        Err(error) if error.is_transient() => tracing::warn!(
                            offset = message.offset,
                            %error,
                            "acknowledgement lost, going on"
                        ),
                        Err(error) => return Err(error.into()),
                    }
                }
                delivered += 1;
            }
            Some(Ok(SubscriptionEvent::Gap(gap))) => print::gap(&gap)?,
            Some(Ok(other)) => tracing::debug!(?other, "skipping an event sb does not know"),
            Some(Err(error)) => return Err(error.into()),
            None => anyhow::bail!("the subscription ended unexpectedly"),
        }
    }
    Ok(())
}

/// `sb: subscribed to PATTERN (next offset N, subscription S)`, leaving out what the broker did
/// not say.
fn ready_line(subscription: &Subscription) -> String {
    let mut details = Vec::new();
    if let Some(next) = subscription.next_offset() {
        details.push(format!("next offset {next}"));
    }
    if let Some(id) = subscription.id() {
        details.push(format!("subscription {id}"));
    }
    if details.is_empty() {
        format!("sb: subscribed to {}", subscription.pattern())
    } else {
        format!(
            "sb: subscribed to {} ({})",
            subscription.pattern(),
            details.join(", ")
        )
    }
}

async fn consumer(client: &Client, command: ConsumerCommand) -> anyhow::Result<()> {
    match command {
        ConsumerCommand::List => {
            for consumer in client.list_consumers().await? {
                emit(&output::consumer_line(&consumer)?)?;
            }
            Ok(())
        }
        ConsumerCommand::Info(args) => {
            let consumer = client.consumer(args.name).await?;
            emit(&output::consumer_line(&consumer)?)
        }
        ConsumerCommand::Delete(args) => {
            client.delete_consumer(args.name.as_str()).await?;
            emit(&output::deleted_line(&args.name)?)
        }
    }
}

async fn entity(client: &Client, command: EntityCommand, started: Instant) -> anyhow::Result<()> {
    match command {
        EntityCommand::Update(args) => {
            let json = match args.json.as_str() {
                "-" => read_stdin("the fields").await?,
                json => json.as_bytes().to_vec(),
            };
            let fields: serde_json::Value = serde_json::from_slice(&json).map_err(|error| {
                Error::InvalidArgument(format!("the fields are not valid JSON: {error}"))
            })?;
            let (timestamp_ms, version, writer) = stamp(&args.stamp);
            let mut update = EntityUpdate::new(args.entity_type, args.id, fields).stamp(
                timestamp_ms,
                version,
                writer,
            );
            if let Some(expected) = args.stamp.expect_version {
                update = update.expect_version(expected);
            }
            let entity = client.update_entity(update).await?;
            emit(&output::entity_line(&entity)?)
        }
        EntityCommand::Get(args) => {
            let read = client
                .get_entity(args.entity_type, args.id, args.if_none_match.as_deref())
                .await?;
            emit(&output::entity_read_line(&read)?)
        }
        EntityCommand::Delete(args) => {
            let (timestamp_ms, version, writer) = stamp(&args.stamp);
            let mut delete =
                EntityDelete::new(args.entity_type, args.id).stamp(timestamp_ms, version, writer);
            if let Some(expected) = args.stamp.expect_version {
                delete = delete.expect_version(expected);
            }
            let entity = client.delete_entity(delete).await?;
            emit(&output::entity_line(&entity)?)
        }
        EntityCommand::Watch(args) => entity_watch(client, args, started).await,
    }
}

/// The stamp of an entity write: the flags, or now, version 0 and the default writer id.
fn stamp(args: &StampArgs) -> (u64, u64, String) {
    let timestamp_ms = args.timestamp.unwrap_or_else(|| {
        u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or_default()
    });
    let writer = args.writer.clone().unwrap_or_else(args::default_writer);
    (timestamp_ms, args.stamp_version, writer)
}

async fn entity_watch(
    client: &Client,
    args: EntityWatchArgs,
    started: Instant,
) -> anyhow::Result<()> {
    let deadline = args.timeout.map(|timeout| started + timeout);
    let Some(watching) = until(deadline, client.watch_entities(args.pattern.as_str())).await else {
        return Ok(());
    };
    let mut watch = watching?;
    let mut changes: u64 = 0;
    loop {
        let Some(next) = until(deadline, watch.next()).await else {
            return Ok(());
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(error)) => return Err(error.into()),
            None => anyhow::bail!("the entity watch ended unexpectedly"),
        };
        emit(&output::entity_event_line(&event)?)?;
        match event {
            EntityEvent::Snapshot(_) => {}
            EntityEvent::SnapshotComplete(_) => {
                eprintln!("sb: watching {}", watch.pattern());
                if args.count == Some(0) {
                    return Ok(());
                }
            }
            EntityEvent::Change(_) => {
                changes += 1;
                if args.count.is_some_and(|count| changes >= count) {
                    return Ok(());
                }
            }
        }
    }
}

/// Runs `future` to completion, or until `deadline` (then `None`).
async fn until<F: std::future::Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

async fn history(client: &Client, args: HistoryArgs) -> anyhow::Result<()> {
    let mut query = HistoryQuery::new(args.pattern).from(args.from);
    match args.to {
        Some(End::Offset(offset)) => query = query.to_offset(offset),
        Some(End::Time(time)) => query = query.to_time(time),
        None => {}
    }
    let mut remaining = if args.limit == 0 {
        u64::MAX
    } else {
        args.limit
    };
    let mut next = Some(query);
    while let Some(query) = next.take() {
        if remaining == 0 {
            break;
        }
        let query = query.limit(u32::try_from(remaining.min(1000)).unwrap_or(1000));
        let page = client.history(query.clone()).await?;
        for message in &page.messages {
            if remaining == 0 {
                break;
            }
            print::message(message)?;
            remaining -= 1;
        }
        next = page.next_query(&query);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every help page names its environment variables without a value: no `[env: NAME=]` while
    /// the variable is unset, and no value (a token, a secret) while it is set.
    #[test]
    fn help_shows_no_environment_values() {
        fn check(command: &mut clap::Command, path: &str, env_args: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if let Some(name) = arg.get_env() {
                    assert!(
                        arg.is_hide_env_values_set(),
                        "`{path}`: --{} shows the value of {name:?}",
                        arg.get_id()
                    );
                    env_args.push(name.to_string_lossy().into_owned());
                }
            }
            let help = command.render_long_help().to_string();
            assert!(!help.contains("=]"), "`{path} --help`:\n{help}");
            for sub in command.get_subcommands_mut() {
                let path = format!("{path} {}", sub.get_name());
                check(sub, &path, env_args);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut env_args = Vec::new();
        check(&mut command, "sb", &mut env_args);
        // The walk reached the arguments that read the environment, global and per command.
        for name in ["SWITCHBOARD_URL", "SWITCHBOARD_CLIENT_SECRET", "SB_WRITER"] {
            assert!(env_args.iter().any(|seen| seen == name), "{env_args:?}");
        }
    }

    #[test]
    fn publish_arguments() {
        let cli = Cli::try_parse_from([
            "sb",
            "--server",
            "broker:7400",
            "publish",
            "a.b",
            "{}",
            "--ttl",
            "500ms",
            "--header",
            "k=v",
            "--header",
            "x=y=z",
            "--idempotency-key",
            "key",
        ])
        .unwrap();
        assert_eq!(cli.server, "broker:7400");
        let Command::Publish(args) = cli.command else {
            panic!("not publish")
        };
        assert_eq!(args.channel, "a.b");
        assert_eq!(args.data.as_deref(), Some("{}"));
        assert_eq!(args.ttl, Some(Duration::from_millis(500)));
        assert_eq!(
            args.headers,
            [
                ("k".to_owned(), "v".to_owned()),
                ("x".to_owned(), "y=z".to_owned())
            ]
        );
        assert_eq!(args.idempotency_key.as_deref(), Some("key"));
        assert!(args.retry_policy().is_none());
    }

    #[test]
    fn publish_retry_is_a_deadline() {
        let cli = Cli::try_parse_from(["sb", "publish", "a.b", "{}", "--retry", "30s"]).unwrap();
        let Command::Publish(args) = cli.command else {
            panic!("not publish")
        };
        assert_eq!(
            args.retry_policy(),
            RetryPolicy::within(Duration::from_secs(30))
        );
        assert!(Cli::try_parse_from(["sb", "publish", "a.b", "{}", "--retry", "soon"]).is_err());
    }

    #[test]
    fn subscribe_and_history_defaults() {
        let cli = Cli::try_parse_from(["sb", "subscribe", "a.>"]).unwrap();
        let Command::Subscribe(args) = cli.command else {
            panic!("not subscribe")
        };
        assert_eq!(args.from, Start::Latest);
        assert_eq!((args.count, args.timeout), (None, None));

        let cli = Cli::try_parse_from(["sb", "history", "a.>", "--to", "9"]).unwrap();
        let Command::History(args) = cli.command else {
            panic!("not history")
        };
        assert_eq!(args.from, Start::Earliest);
        assert_eq!(args.to, Some(End::Offset(9)));
        assert_eq!(args.limit, 100);
    }

    #[test]
    fn subscribe_flow_arguments() {
        let cli = Cli::try_parse_from([
            "sb",
            "subscribe",
            "a.>",
            "--policy",
            "drop-oldest",
            "--window",
            "100",
            "--throttle",
            "250ms",
            "--max-unacked",
            "8",
            "--durable",
            "billing",
            "--ack-timeout",
            "30s",
            "--ack",
        ])
        .unwrap();
        let Command::Subscribe(args) = cli.command else {
            panic!("not subscribe")
        };
        assert!(args.ack);
        let options = args.options();
        assert_eq!(options.policy, Some(FlowPolicy::DropOldest));
        assert_eq!(options.window, Some(100));
        assert_eq!(options.min_interval, Some(Duration::from_millis(250)));
        assert_eq!(options.max_unacked, Some(8));
        assert_eq!(options.durable_name.as_deref(), Some("billing"));
        assert_eq!(options.ack_timeout, Some(Duration::from_secs(30)));

        let cli = Cli::try_parse_from(["sb", "subscribe", "a.>"]).unwrap();
        let Command::Subscribe(args) = cli.command else {
            panic!("not subscribe")
        };
        assert!(!args.ack);
        let options = args.options();
        assert_eq!(
            (options.policy, options.min_interval, options.durable_name),
            (None, None, None)
        );
    }

    #[test]
    fn consumer_and_subscriptions_arguments() {
        let cli = Cli::try_parse_from(["sb", "consumer", "info", "billing"]).unwrap();
        let Command::Consumer(ConsumerCommand::Info(args)) = cli.command else {
            panic!("not consumer info")
        };
        assert_eq!(args.name, "billing");
        let cli = Cli::try_parse_from(["sb", "consumer", "delete", "billing"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Consumer(ConsumerCommand::Delete(_))
        ));
        let cli = Cli::try_parse_from(["sb", "consumer", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Consumer(ConsumerCommand::List)
        ));
        let cli = Cli::try_parse_from(["sb", "subscriptions"]).unwrap();
        assert!(matches!(cli.command, Command::Subscriptions));
    }

    #[test]
    fn publish_hops() {
        let cli = Cli::try_parse_from(["sb", "publish", "a.b", "{}", "--hops", "3"]).unwrap();
        let Command::Publish(args) = cli.command else {
            panic!("not publish")
        };
        assert_eq!(args.hops, Some(3));
    }

    #[test]
    fn entity_arguments() {
        let cli = Cli::try_parse_from([
            "sb",
            "entity",
            "update",
            "contact",
            "42",
            "-",
            "--timestamp",
            "1000",
            "--version",
            "2",
            "--writer",
            "panel-7",
            "--expect-version",
            "0",
        ])
        .unwrap();
        let Command::Entity(EntityCommand::Update(args)) = cli.command else {
            panic!("not entity update")
        };
        assert_eq!(
            (args.entity_type.as_str(), args.id.as_str()),
            ("contact", "42")
        );
        assert_eq!(args.json, "-");
        assert_eq!(stamp(&args.stamp), (1000, 2, "panel-7".to_owned()));
        assert_eq!(args.stamp.expect_version, Some(0));

        let cli = Cli::try_parse_from(["sb", "entity", "delete", "contact", "42"]).unwrap();
        let Command::Entity(EntityCommand::Delete(args)) = cli.command else {
            panic!("not entity delete")
        };
        assert_eq!(
            (
                args.stamp.timestamp,
                args.stamp.stamp_version,
                args.stamp.expect_version
            ),
            (None, 0, None)
        );
        let before = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap();
        let (timestamp_ms, version, writer) = stamp(&args.stamp);
        assert!(timestamp_ms >= before);
        assert_eq!(version, 0);
        assert!(!writer.is_empty());

        let cli = Cli::try_parse_from([
            "sb",
            "entity",
            "get",
            "contact",
            "42",
            "--if-none-match",
            "\"3\"",
        ])
        .unwrap();
        let Command::Entity(EntityCommand::Get(args)) = cli.command else {
            panic!("not entity get")
        };
        assert_eq!(args.if_none_match.as_deref(), Some("\"3\""));

        let cli = Cli::try_parse_from([
            "sb",
            "entity",
            "watch",
            "contact.*",
            "--count",
            "2",
            "--timeout",
            "1s",
        ])
        .unwrap();
        let Command::Entity(EntityCommand::Watch(args)) = cli.command else {
            panic!("not entity watch")
        };
        assert_eq!(args.pattern, "contact.*");
        assert_eq!(
            (args.count, args.timeout),
            (Some(2), Some(Duration::from_secs(1)))
        );
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["sb", "history", "a.>", "--from", "latest"][..],
            &["sb", "subscribe", "a.>", "--from", "soon"],
            &["sb", "publish", "a.b", "x", "--header", "novalue"],
            &["sb", "publish", "a.b", "x", "--ttl", "forever"],
            &["sb", "subscribe"],
            &["sb", "publish", "a.b", "x", "--hops", "-1"],
            &["sb", "entity", "update", "contact", "42"],
            &[
                "sb",
                "entity",
                "update",
                "contact",
                "42",
                "{}",
                "--version",
                "x",
            ],
            &["sb", "entity", "get", "contact"],
            &["sb", "entity", "watch"],
            &["sb", "entity"],
            &["sb", "subscribe", "a.>", "--policy", "newest"],
            &["sb", "subscribe", "a.>", "--window", "-1"],
            &["sb", "subscribe", "a.>", "--throttle", "often"],
            &["sb", "subscribe", "a.>", "--ack", "yes"],
            &["sb", "consumer", "info"],
            &["sb", "consumer"],
        ] {
            let error = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }
}
