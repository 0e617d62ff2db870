//! Rust client for Switchboard, the gRPC event bus broker.
//!
//! A [`Client`] wraps one HTTP/2 connection (a tonic `Channel`); it is cheap to clone, and every
//! clone, publish and subscription shares that connection. The contract it speaks is
//! `proto/switchboard/v1/broker.proto` (crate `switchboard_proto`); its messages are re-exported
//! here as [`proto`].
//!
//! # Layout
//! - `lib.rs`: this overview and the re-exports;
//! - `client.rs`: [`Client`], [`ConnectOptions`], URL handling and [`Client::info`];
//! - `error.rs`: [`Error`] (built from a gRPC status and its `google.rpc.ErrorInfo` reason);
//! - `publish.rs`: the [`Publish`] builder, [`Client::publish`], [`Client::publish_stream`] and the
//!   [`Publisher`] handle;
//! - `subscription.rs`: [`Start`], [`SubscribeOptions`], [`Backoff`] and the resuming
//!   [`Subscription`] ([`Client::subscribe`]);
//! - `history.rs`: [`HistoryQuery`], [`HistoryPage`], [`Client::history`] and
//!   [`Client::history_all`];
//! - `bin/sb.rs` (with `bin/sb/`): the `sb` command line.
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

mod client;
mod error;
mod history;
mod publish;
mod subscription;

pub use client::{normalize_url, Client, ConnectOptions, DEFAULT_PORT};
pub use error::{code_name, Error};
pub use history::{HistoryPage, HistoryQuery};
pub use publish::{split_stream_ack, Publish, PublishAcks, Publisher};
pub use subscription::{Backoff, Start, SubscribeOptions, Subscription};

/// The generated messages of package `switchboard.v1` (re-exported from `switchboard_proto`).
pub mod proto {
    pub use switchboard_proto::v1::{
        HistoryRequest, HistoryResponse, InfoResponse, Message, PublishAck, PublishRequest,
        PublishStreamAck, Refusal, StartPosition, SubscribeEvent, SubscribeRequest, Subscribed,
    };
    pub use switchboard_proto::ERROR_DOMAIN;
}

pub use switchboard_proto::v1::{InfoResponse, Message, PublishAck, PublishStreamAck, Refusal};
