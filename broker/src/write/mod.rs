//! The write path: what turns accepted requests into log entries.
//!
//! - [`proposer`]: group commit — concurrent publishes, entity updates and consumer writes become
//!   one log entry; the caller waits for that entry's outcome.
//! - [`sweeper`]: the leader's timer that proposes TTL and retention sweeps; what a sweep removes
//!   is decided at apply ([`crate::state::ttl`]).
//!
//! Nothing here decides what a command does: that is [`crate::state`]'s job, the same on every
//! replica.

pub(crate) mod proposer;
pub(crate) mod sweeper;
