//! Rust client for Switchboard, the gRPC event bus broker.
//!
//! A [`Client`] wraps one HTTP/2 connection (a tonic `Channel`); it is cheap to clone, and every
//! clone, publish and subscription shares that connection. The contract it speaks is
//! `proto/switchboard/v1/broker.proto` and `entity.proto` (crate `switchboard_proto`); their
//! messages are re-exported here as [`proto`].
//!
//! # Layout
//! - `lib.rs`: this overview and the re-exports;
//! - `client.rs`: [`Client`], [`ConnectOptions`] (TLS: [`ClientIdentity`]; tokens:
//!   [`Credentials`]), URL handling, the entity writer id ([`Client::writer_id`]),
//!   [`Client::info`] and [`Client::issue_token`];
//! - `auth.rs`: bearer tokens: [`Token`], the [`TokenProvider`] trait, [`StaticToken`],
//!   [`ClientCredentials`] (the broker's token endpoint) and the single-flight [`TokenCache`];
//! - `bearer.rs`: the tower service under the generated clients that puts the token on every
//!   call;
//! - `error.rs`: [`Error`] (built from a gRPC status and its `google.rpc.ErrorInfo` reason, a
//!   [`Reason`] shared with the broker through `switchboard_proto`);
//! - `publish.rs`: the [`Publish`] builder (with [`Publish::caused_by`] for reactions),
//!   [`Client::publish`], [`Client::publish_stream`], the [`Publisher`] handle and
//!   [`PublishErrorKind`] ([`Error::publish_kind`]);
//! - `retry.rs`: [`RetryPolicy`] and the one table of retryable publish failures;
//!   `publish_resume.rs`: the task behind a [`Publisher`] that resumes broken streams under it;
//! - `circuit.rs`: the circuit breaker of the endpoint ([`CircuitPolicy`], [`CircuitState`]);
//! - `outbox.rs`: the bounded in-memory [`Outbox`] ([`OutboxOptions`], [`OutboxReceipt`]);
//!   all three described in `docs/CLIENT-RESILIENCE.md`;
//! - `backoff.rs`: [`Backoff`] and its [`Jitter`], for every loop that tries again;
//! - `subscription.rs`: [`Start`], [`SubscribeOptions`] (with the flow settings), the
//!   resuming [`Subscription`] ([`Client::subscribe`]) and its [`SubscriptionEvent`]s (messages
//!   and [`Gap`]s, through [`Subscription::events`]);
//! - `flow.rs`: per-consumer flow control: [`FlowPolicy`], the [`Acker`] that acknowledges
//!   deliveries, and [`Client::list_subscriptions`], [`Client::list_consumers`],
//!   [`Client::consumer`] and [`Client::delete_consumer`];
//! - `history.rs`: [`HistoryQuery`], [`HistoryPage`], [`Client::history`] and
//!   [`Client::history_all`];
//! - `trace.rs`: W3C trace context: what every publish injects ([`current_context`]), and what
//!   a delivery carries ([`trace_context`], [`delivery_span`]) so a subscriber joins the
//!   publisher's trace;
//! - `entity.rs`: shared entity state: [`EntityUpdate`], [`EntityDelete`], [`EntityRead`],
//!   [`EntityWatch`] and [`EntityEvent`], [`EntityExt`], and [`Client::update_entity`],
//!   [`Client::delete_entity`], [`Client::get_entity`], [`Client::watch_entities`];
//! - `schema.rs`: payload schemas ([`SchemaPut`], [`Client::schema_put`] and the rest);
//! - `kpi.rs`: KPI views ([`Client::kpi_define`], [`Client::kpi_get_view`], [`Client::kpi_list`],
//!   [`Client::kpi_delete`]) and their values ([`KpiQuery`], [`Client::kpi_values`], and
//!   [`Client::kpi_watch`] with its [`KpiWatch`] stream).
//!
//! The `sb` command line is built on this crate in its own crate, `switchboard-cli` (`cli/`), so
//! that users of the library do not compile its argument parsing and log formatting.
//!
//! # Example
//! ```no_run
//! use futures::StreamExt;
//! use switchboard_client::{Client, Publish, Start};
//!
//! # async fn run() -> Result<(), switchboard_client::Error> {
//! let client = Client::connect("http://127.0.0.1:7400").await?;
//! let mut subscription = client.subscribe("crm.*.updated", Start::Latest).await?;
//! let ack = client
//!     .publish(Publish::new("crm.contact.updated", r#"{"id":42}"#))
//!     .await?;
//! println!("published at offset {}", ack.offset);
//! if let Some(message) = subscription.next().await {
//!     println!("received offset {}", message?.offset);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod auth;
mod backoff;
mod bearer;
mod circuit;
mod client;
mod cluster;
mod entity;
mod error;
mod failover;
mod flow;
mod history;
mod kpi;
mod outbox;
mod outbox_file;
mod publish;
mod publish_resume;
mod request;
mod retry;
mod schema;
mod subscription;
mod trace;

pub use auth::{ClientCredentials, StaticToken, Token, TokenCache, TokenFuture, TokenProvider};
pub use backoff::{Backoff, Jitter};
pub use circuit::{CircuitPolicy, CircuitState};
pub use client::{
    normalize_url, Client, ClientIdentity, ConnectOptions, Credentials, DEFAULT_PORT,
};
pub use entity::{EntityDelete, EntityEvent, EntityExt, EntityRead, EntityUpdate, EntityWatch};
pub use error::Error;
pub use flow::{Acker, FlowPolicy};
pub use history::{HistoryPage, HistoryQuery};
pub use kpi::{KpiQuery, KpiWatch};
pub use outbox::{Outbox, OutboxOptions, OutboxReceipt};
pub use publish::{split_stream_ack, Publish, PublishAcks, PublishErrorKind, Publisher};
pub use request::{reply_to, INBOX_PREFIX, REPLY_TO};
pub use retry::RetryPolicy;
pub use schema::SchemaPut;
pub use subscription::{
    Events, Start, SubscribeOptions, Subscription, SubscriptionEvent, DEFAULT_MAX_BATCH,
};
pub use switchboard_proto::{code_name, Reason};
pub use trace::{current_context, delivery_span, trace_context, TRACEPARENT, TRACESTATE};

/// The generated messages of package `switchboard.v1` (re-exported from `switchboard_proto`).
pub mod proto {
    pub use switchboard_proto::v1::{
        gap, AckRequest, AckResponse, ConsumerInfo, DeleteConsumerRequest, DeleteConsumerResponse,
        DeleteEntityRequest, Entity, EntityEvent, EntityKey, EntityResponse, FlowPolicy, Gap,
        GetConsumerRequest, GetEntityRequest, GetEntityResponse, HistoryRequest, HistoryResponse,
        InfoResponse, IssueTokenRequest, IssueTokenResponse, ListConsumersRequest,
        ListConsumersResponse, ListSubscriptionsRequest, ListSubscriptionsResponse, Message,
        PublishAck, PublishRequest, PublishStreamAck, Refusal, Scope, SnapshotComplete,
        StartPosition, SubscribeEvent, SubscribeRequest, Subscribed, SubscriptionInfo,
        UpdateEntityRequest, WatchEntitiesRequest, WriteStamp,
    };
    pub use switchboard_proto::v1::{
        Backfill, DefineViewResponse, GetKpisResponse, KpiGroup, KpiGroupKind, KpiMeasure,
        KpiWindow, View,
    };
    pub use switchboard_proto::v1::{
        CheckSchemaRequest, CheckSchemaResponse, CompatibilityReport, FailingMessage,
        PutSchemaRequest, PutSchemaResponse, Schema, SchemaFailure, SchemaPolicy,
    };
    pub use switchboard_proto::ERROR_DOMAIN;
}

pub use switchboard_proto::v1::gap::Reason as GapReason;
pub use switchboard_proto::v1::{
    AckResponse, ClusterNode, ClusterStatus, ConsumerInfo, Entity, EntityKey, Gap, InfoResponse,
    Message, PublishAck, PublishStreamAck, Refusal, SubscriptionInfo, WriteStamp,
};
