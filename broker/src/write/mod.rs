//! The write path: what turns accepted requests into log entries.
//!
//! - [`admission`]: what must hold before a write is proposed — room on the disk
//!   (`STORAGE_FULL`), and a raft that has not stopped.
//! - [`proposer`]: group commit — concurrent publishes, entity updates and consumer writes become
//!   one log entry; the caller waits for that entry's outcome.
//! - [`sweeper`]: the leader's timer that proposes TTL and retention sweeps; what a sweep removes
//!   is decided at apply ([`crate::state::ttl`]).
//!
//! Nothing here decides what a command does: that is [`crate::state`]'s job, the same on every
//! replica.

pub(crate) mod admission;
pub(crate) mod proposer;
pub(crate) mod sweeper;
