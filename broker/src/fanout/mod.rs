//! Fan-out: applied messages to this node's subscribers.
//!
//! - [`hub`]: per-node dispatch of applied messages to the subscriptions whose pattern they
//!   match, into bounded mailboxes.
//! - [`subscription`]: one subscriber's task — replay from the store, then live from the hub,
//!   catching up from the store whenever it falls behind.
//! - [`registry`]: every open subscription and durable consumer of this node (limits, listing).
//! - [`outgoing`]: what a subscription sends, in the broker's terms; a message's wire form is kept
//!   once for all its subscribers (the edge makes it: [`crate::edge::delivery`]).
//! - [`ephemeral`]: messages delivered at once to live subscribers on every node and never stored.
//! - [`catch_up_budget`]: the broker-wide bound on messages read from the store and held for
//!   subscriptions that fell behind.
//! - `throttle`: at most one delivery per channel per interval, latest last.
//!
//! The state hands applied messages here through [`crate::state::Announce`], which the hub
//! implements; `server.rs` passes the hub to the state when it opens it.

pub(crate) mod catch_up_budget;
pub(crate) mod ephemeral;
pub(crate) mod hub;
pub(crate) mod outgoing;
pub(crate) mod registry;
pub(crate) mod subscription;
mod throttle;
