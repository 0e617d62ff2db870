//! The message as the broker's own code sees it: what a publisher sent ([`NewMessage`]), what the
//! log carries ([`Command`]), and what the store keeps and subscribers receive ([`StoredMessage`]).
//!
//! These types are serialized into the replicated log, so every field order and type here is part
//! of the on-disk format. Headers are a `BTreeMap` so that the encoding of a message is the same on
//! every node.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::entity::{Change, EntityState, Stamp};

/// A validated message, as accepted at the edge and before the log assigns it an offset. Defaults
/// (content type, schema version, correlation id) are already filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Channel, valid per [`crate::channel::validate_channel`].
    pub channel: String,
    /// Body; one reference-counted copy from the gRPC decoder to the store.
    pub payload: Bytes,
    /// Media type, for example `application/json`.
    pub content_type: String,
    /// Semver of the payload's schema.
    pub schema_version: String,
    /// UUID grouping a conversation's messages.
    pub correlation_id: String,
    /// What caused this message; empty when nothing did.
    pub causation_id: String,
    /// Publisher's key for retries; empty when unset.
    pub idempotency_key: String,
    /// Time to live in ms; 0 means until retention removes it.
    pub ttl_ms: u64,
    /// Free-form headers (W3C trace context travels here).
    pub headers: BTreeMap<String, String>,
    /// Messages before this one in its causal chain, as the publisher counted them.
    pub hops: u32,
}

impl NewMessage {
    /// Bytes this message takes in a batch, for batch sizing: payload, strings and headers.
    pub fn approximate_size(&self) -> usize {
        self.channel.len()
            + self.payload.len()
            + self.content_type.len()
            + self.schema_version.len()
            + self.correlation_id.len()
            + self.causation_id.len()
            + self.idempotency_key.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 64
    }

    /// A message on `channel` with `payload` and every other field empty (no content type, no
    /// ids, no TTL, no headers); callers set what they need with struct update syntax.
    pub fn on_channel(channel: impl Into<String>, payload: Bytes) -> NewMessage {
        NewMessage {
            channel: channel.into(),
            payload,
            content_type: String::new(),
            schema_version: String::new(),
            correlation_id: String::new(),
            causation_id: String::new(),
            idempotency_key: String::new(),
            ttl_ms: 0,
            headers: BTreeMap::new(),
            hops: 0,
        }
    }

    /// A message the broker itself publishes (entity state changes, loop reports): JSON, schema
    /// 1.0.0.
    pub fn system(channel: String, payload: String) -> NewMessage {
        NewMessage {
            content_type: "application/json".to_owned(),
            schema_version: "1.0.0".to_owned(),
            ..NewMessage::on_channel(channel, Bytes::from(payload))
        }
    }
}

/// A message in the store: what was published plus what the log assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Position in the log; strictly increasing, starting at 1.
    pub offset: u64,
    /// Publish time stamped by the leader, in microseconds since the Unix epoch.
    pub publish_time_us: u64,
    /// What the publisher sent (with `hops` as the broker counted it).
    pub message: NewMessage,
    /// Channels of this message's causal ancestors (nearest last), when its cause is known: what
    /// loop detection compares a reaction's channel with. Empty for a message nobody caused.
    pub chain: Vec<String>,
}

impl StoredMessage {
    /// When the message expires, in µs since the epoch; `None` when it has no TTL.
    pub fn expires_at_us(&self) -> Option<u64> {
        (self.message.ttl_ms != 0).then(|| {
            self.publish_time_us
                .saturating_add(self.message.ttl_ms.saturating_mul(1000))
        })
    }

    /// Whether the message has expired at `now_us`: an expired message is never delivered.
    pub fn is_expired(&self, now_us: u64) -> bool {
        self.expires_at_us().is_some_and(|at| at <= now_us)
    }

    /// Whether the message has expired by now. Reads the clock only for a message with a TTL:
    /// a subscription checks every message it delivers, and most have none.
    pub fn is_expired_now(&self) -> bool {
        self.expires_at_us().is_some_and(|at| at <= now_us())
    }
}

/// The rules apply follows, decided by the leader's configuration and carried in every batch so
/// every replica (and every replay) decides the same way even if settings change between restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// A retry with the same channel and idempotency key within this window is a duplicate.
    pub dedup_window_us: u64,
    /// A cause older than this no longer counts for loop detection.
    pub loop_window_us: u64,
    /// The longest causal chain accepted.
    pub max_hops: u32,
    /// How far an entity write's timestamp may be ahead of the leader's clock.
    pub max_clock_skew_ms: u64,
}

/// One write of an entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityWrite {
    /// The entity's type (one channel segment).
    pub entity_type: String,
    /// The entity's id (one channel segment).
    pub id: String,
    /// What to do.
    pub change: Change,
    /// The writer's stamp.
    pub stamp: Stamp,
    /// Compare-and-set: the version the entity must have.
    pub expected_version: Option<u64>,
}

/// The principal a durable consumer belongs to: the one whose call created it, named by its
/// token's `iss` (empty when the token has none) and `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The token's `iss`.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
}

/// A durable consumer, as the broker keeps it.
///
/// Stored as bincode, which has no field names: `owner` is last, so a record written before
/// owners were recorded is the same bytes without it, and reads as owned by nobody
/// ([`crate::state::store::MessageStore::consumer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    /// The pattern it follows.
    pub pattern: String,
    /// Its flow policy, as the protobuf enum's number.
    pub policy: i32,
    /// Every delivery at or below this offset is acknowledged.
    pub acked_offset: u64,
    /// Redeliveries so far.
    pub redeliveries: u64,
    /// When it was created, µs since the epoch (leader's time).
    pub created_at_us: u64,
    /// Who created it; `None` when nobody authenticated did (a broker without authentication, or
    /// a consumer created before owners were recorded): then only an `admin` may manage it.
    pub owner: Option<Owner>,
}

/// A change to a durable consumer.
///
/// In the replicated log as bincode, which names a variant by its position: variants keep their
/// places, and new ones go last, so every log entry written by an earlier version still reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerWrite {
    /// [`ConsumerWrite::Open`] as versions before owners were recorded wrote it: read from their
    /// log entries (the consumer it creates has no owner), never proposed any more.
    OpenWithoutOwner {
        /// Its name.
        name: String,
        /// The pattern it follows.
        pattern: String,
        /// Its policy.
        policy: i32,
        /// A new consumer starts here (its acknowledged offset is one less).
        start_offset: u64,
    },
    /// Raises the acknowledged offset (never lowers it) and adds redeliveries.
    Ack {
        /// Its name.
        name: String,
        /// The new acknowledged offset.
        acked_offset: u64,
        /// Redeliveries since the last ack write.
        redeliveries: u64,
    },
    /// Removes the consumer.
    Delete {
        /// Its name.
        name: String,
    },
    /// Creates the consumer unless it exists; either way the outcome is its state (whose owner
    /// the edge checks against the caller).
    Open {
        /// Its name.
        name: String,
        /// The pattern it follows.
        pattern: String,
        /// Its policy.
        policy: i32,
        /// A new consumer starts here (its acknowledged offset is one less).
        start_offset: u64,
        /// Who creates it.
        owner: Option<Owner>,
    },
}

/// One thing a client asked for, inside a group-committed batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    /// Publish a message.
    Publish(NewMessage),
    /// Write an entity.
    Entity(EntityWrite),
    /// Open, acknowledge or delete a durable consumer.
    Consumer(ConsumerWrite),
    /// Register or remove a payload schema ([`crate::schema`]). Bincode names variants by
    /// position, so new ones go last and entries written before them still read.
    Schema(SchemaWrite),
    /// Define or drop a KPI view ([`crate::kpi`]).
    View(ViewWrite),
}

/// A change to the KPI views.
///
/// In the replicated log as bincode: variants keep their places, and new ones go last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewWrite {
    /// Defines a view (replacing one of the same name, whose cells are dropped: they were
    /// computed by another definition) and backfills it.
    Put {
        /// The definition as JSON, checked at the edge ([`crate::kpi::ViewDefinition`]); apply
        /// reads it again, and refuses it if it no longer reads (a newer edge's definition on an
        /// older broker).
        definition: String,
        /// Who defines it.
        defined_by: Option<Owner>,
        /// Retained messages the backfill reads at most (0: no backfill).
        backfill_limit: u64,
        /// Views the store may hold (a put of a new view past it is refused).
        max_views: u32,
    },
    /// Drops a view and its cells.
    Delete {
        /// Its name.
        name: String,
    },
}

/// How a registered schema treats a message that does not match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchemaPolicy {
    /// Refuse the message (`SCHEMA_MISMATCH`), and announce the drift.
    Enforce,
    /// Store the message, and announce the drift.
    Warn,
    /// Check nothing: the registration is kept (for `Check` and for a later policy change).
    Off,
}

/// A schema as the registry keeps it: the document, how it is enforced, and who put it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaRecord {
    /// The JSON Schema document (draft 2020-12 or draft 7), as the registrant sent it.
    pub document: String,
    /// How it is enforced.
    pub policy: SchemaPolicy,
    /// When it was registered, µs since the epoch (leader's time).
    pub registered_at_us: u64,
    /// Who registered it; `None` when nobody authenticated did.
    pub registered_by: Option<Owner>,
}

/// A change to the schema registry.
///
/// In the replicated log as bincode: variants keep their places, and new ones go last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchemaWrite {
    /// Registers `document` for `pattern` at `version`, replacing what that pair held.
    Put {
        /// The channel pattern it applies to.
        pattern: String,
        /// Its version, semver (`1.2.0`).
        version: String,
        /// The document, already compiled once at the edge (apply stores it as it is).
        document: String,
        /// How it is enforced.
        policy: SchemaPolicy,
        /// Who registers it.
        registered_by: Option<Owner>,
    },
    /// Removes the registration of `pattern` at `version`.
    Delete {
        /// The channel pattern.
        pattern: String,
        /// The version.
        version: String,
    },
}

impl Item {
    /// Whether the item is admitted even when the disk is nearly full
    /// ([`crate::write::admission`]): an entity or schema delete frees room, and durable consumer
    /// writes are small and keep subscriptions going.
    pub(crate) fn needs_no_room(&self) -> bool {
        match self {
            Item::Publish(_) => false,
            Item::Entity(w) => matches!(w.change, crate::entity::Change::Delete),
            Item::Consumer(_) => true,
            Item::Schema(w) => matches!(w, SchemaWrite::Delete { .. }),
            Item::View(w) => matches!(w, ViewWrite::Delete { .. }),
        }
    }

    /// Bytes this item takes in a batch, for batch sizing.
    pub fn approximate_size(&self) -> usize {
        match self {
            Item::Publish(m) => m.approximate_size(),
            Item::Entity(w) => {
                let fields = match &w.change {
                    Change::Update(values) => values.iter().map(|(k, v)| k.len() + v.len()).sum(),
                    Change::Delete => 0,
                };
                w.entity_type.len() + w.id.len() + w.stamp.writer.len() + fields + 64
            }
            Item::Consumer(_) => 128,
            Item::Schema(SchemaWrite::Put {
                pattern,
                version,
                document,
                ..
            }) => pattern.len() + version.len() + document.len() + 128,
            Item::Schema(SchemaWrite::Delete { pattern, version }) => {
                pattern.len() + version.len() + 64
            }
            Item::View(ViewWrite::Put { definition, .. }) => definition.len() + 128,
            Item::View(ViewWrite::Delete { name }) => name.len() + 64,
        }
    }
}

/// A command in the replicated log. Apply uses nothing but the command itself (and the state
/// before it), so every replica reaches the same state from the same log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A group-committed batch of publishes and entity writes.
    Batch {
        /// The leader's clock when it proposed the batch, µs since the epoch.
        stamped_at_us: u64,
        /// The rules in force.
        rules: Rules,
        /// The items, in the order they are decided (and get offsets).
        items: Vec<Item>,
    },
    /// Removes expired messages and applies retention limits, as of the leader's clock. The limits
    /// travel in the command so every replica removes exactly the same messages.
    Sweep {
        /// The leader's clock, µs since the epoch.
        now_us: u64,
        /// Messages published before `now_us - max_age_us` are removed.
        max_age_us: u64,
        /// The oldest messages are removed while stored bytes exceed this.
        max_bytes: u64,
        /// Idempotency records older than this are forgotten.
        dedup_window_us: u64,
    },
}

/// Why apply refused an item; nothing was stored for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The message's causal chain already passed through its channel, or is too long.
    Loop {
        /// What was found, for the client.
        detail: String,
    },
    /// No field of the entity write won.
    Stale {
        /// The entity's version.
        current_version: u64,
    },
    /// The expected version did not match.
    VersionConflict {
        /// The entity's version.
        current_version: u64,
        /// What the writer expected.
        expected_version: u64,
    },
    /// The write's timestamp is too far ahead of the leader's clock.
    ClockSkew {
        /// The entity's version.
        current_version: u64,
        /// How far ahead it was, ms.
        ahead_ms: u64,
        /// The limit, ms.
        max_skew_ms: u64,
    },
    /// A KPI view definition that does not read as one where it is applied.
    ViewInvalid {
        /// What is wrong, for the client.
        detail: String,
    },
    /// A new KPI view when the store holds as many as it may.
    ViewLimit {
        /// The limit.
        max_views: u32,
    },
}

/// What apply decided for one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ItemOutcome {
    /// The message was stored.
    Stored {
        /// Its offset.
        offset: u64,
        /// Its publish time, µs.
        publish_time_us: u64,
    },
    /// A retry of a message stored earlier: nothing new was stored.
    Duplicate {
        /// The original's offset.
        offset: u64,
        /// The original's publish time, µs.
        publish_time_us: u64,
        /// The original's correlation id.
        correlation_id: String,
    },
    /// The entity write was accepted; the entity's new state.
    Entity(Box<EntityState>),
    /// A consumer's state after the write (`None` once deleted, or when it never existed).
    Consumer(Option<ConsumerState>),
    /// Refused.
    Refused(Refusal),
    /// A schema write was applied: whether the registration existed before it.
    Schema {
        /// The pattern and version held a registration before this write.
        existed: bool,
        /// When it was applied (the registration's time, for a put), µs since the epoch.
        applied_at_us: u64,
    },
    /// A view write was applied.
    View {
        /// A view of that name existed before this write.
        existed: bool,
        /// When it was applied, µs since the epoch.
        applied_at_us: u64,
        /// For a put: what its backfill read.
        backfill: Option<crate::kpi::BackfillReport>,
    },
}

/// What applying a [`Command`] produced, returned to whoever proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CommandOutcome {
    /// One outcome per item, in order.
    Batch(Vec<ItemOutcome>),
    /// A sweep removed this many messages.
    Swept {
        /// Messages removed.
        removed: u64,
    },
    /// An entry with no command (a raft blank or membership entry).
    Nothing,
}

/// Microseconds since the Unix epoch by this node's clock. Only the edge, the proposer and readers
/// use it; apply never does (it uses the time stamped into the entry).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
