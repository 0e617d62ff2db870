//! The audit log of refusals: one line per refused request (who, what, code, reason), rate-limited
//! so a flood of bad input cannot flood the log.
//!
//! Who and what are separate fields, each with one meaning: `peer` and `principal` say who was
//! refused (the connection, and the token's subject when one was verified); `target` says what
//! was refused (a channel, a pattern, `type.id`, a client id). docs/OBSERVABILITY.md lists them.
//!
//! Lines are `tracing` events at WARN with target `audit`, so they follow the log format (text or
//! JSON) and can be filtered on their own (`--log-level info,audit=off` silences them). At most
//! [`LINES_PER_SECOND`] lines are written per second, over all clients; the rest are counted, and
//! the count is logged ("N audit lines suppressed") with the first line of a later second, and
//! exported as `switchboard_audit_lines_suppressed_total`.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_proto::code_name;

use crate::error::{shorten, BrokerError};

/// Audit lines written per second at most, over all clients.
pub(crate) const LINES_PER_SECOND: u32 = 20;

const WINDOW: Duration = Duration::from_secs(1);

static LIMITER: Mutex<Limiter> = Mutex::new(Limiter::new(LINES_PER_SECOND));

/// Logs that a request was refused: from `peer`, made by `principal` (the verified token's
/// subject; `None` without authentication, and for refusals at the gate or the token endpoint),
/// about `target` (what was refused; `None` when the request was refused before it named
/// anything).
pub(crate) fn refused(
    peer: Option<SocketAddr>,
    principal: Option<&str>,
    target: Option<&str>,
    error: &BrokerError,
) {
    let admitted = LIMITER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(Instant::now());
    if admitted.suppressed > 0 {
        tracing::warn!(
            target: "audit",
            suppressed = admitted.suppressed,
            "{} audit lines suppressed (more than {LINES_PER_SECOND} refusals a second)",
            admitted.suppressed
        );
        super::metrics::audit_suppressed(admitted.suppressed);
    }
    if !admitted.write {
        return;
    }
    let line = Line::new(peer, principal, target, error);
    tracing::warn!(
        target: "audit",
        peer = %line.peer,
        principal = line.principal,
        target = line.target,
        code = line.code,
        reason = line.reason,
        detail = %error,
        "refused"
    );
}

/// The fields of one audit line, as written (client strings cut by [`shorten`]).
#[derive(Debug, PartialEq, Eq)]
struct Line {
    peer: String,
    principal: Option<String>,
    target: Option<String>,
    code: &'static str,
    reason: &'static str,
}

impl Line {
    fn new(
        peer: Option<SocketAddr>,
        principal: Option<&str>,
        target: Option<&str>,
        error: &BrokerError,
    ) -> Line {
        Line {
            peer: match peer {
                Some(peer) => peer.to_string(),
                None => "unknown".to_owned(),
            },
            principal: principal.map(shorten),
            target: target.map(shorten),
            code: code_name(error.code()),
            reason: error.reason().as_str(),
        }
    }
}

/// A fixed one-second window: the first `limit` lines of a window are written, the rest counted.
#[derive(Debug)]
struct Limiter {
    limit: u32,
    window_start: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// What the limiter says about one line.
#[derive(Debug, PartialEq, Eq)]
struct Admitted {
    /// Write this line.
    write: bool,
    /// Lines suppressed in earlier windows, to report now (0: nothing to report).
    suppressed: u64,
}

impl Limiter {
    const fn new(limit: u32) -> Limiter {
        Limiter {
            limit,
            window_start: None,
            written: 0,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Admitted {
        let mut report = 0;
        let rolled = match self.window_start {
            Some(start) => now.saturating_duration_since(start) >= WINDOW,
            None => true,
        };
        if rolled {
            report = std::mem::take(&mut self.suppressed);
            self.window_start = Some(now);
            self.written = 0;
        }
        if self.written < self.limit {
            self.written += 1;
            Admitted {
                write: true,
                suppressed: report,
            }
        } else {
            self.suppressed += 1;
            Admitted {
                write: false,
                suppressed: report,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use crate::security::permissions::PermissionDenied;
    use crate::security::token::TokenError;

    #[test]
    fn observability_audit_limiter_writes_the_first_n_per_second_and_reports_the_rest() {
        let mut limiter = Limiter::new(3);
        let t0 = Instant::now();
        let written: Vec<bool> = (0..10)
            .map(|i| limiter.admit(t0 + Duration::from_millis(i * 10)).write)
            .collect();
        assert_eq!(
            written,
            [true, true, true, false, false, false, false, false, false, false]
        );
        // Still inside the first second: suppressed, nothing reported yet.
        assert_eq!(
            limiter.admit(t0 + Duration::from_millis(999)),
            Admitted {
                write: false,
                suppressed: 0
            }
        );
        // The window rolls over: the 8 suppressed lines are reported with the next written line.
        assert_eq!(
            limiter.admit(t0 + Duration::from_millis(1000)),
            Admitted {
                write: true,
                suppressed: 8
            }
        );
        // The count was reported once only.
        assert_eq!(
            limiter.admit(t0 + Duration::from_millis(1001)),
            Admitted {
                write: true,
                suppressed: 0
            }
        );
        // A quiet window after a quiet window reports nothing.
        assert_eq!(
            limiter.admit(t0 + Duration::from_secs(5)),
            Admitted {
                write: true,
                suppressed: 0
            }
        );
    }

    #[test]
    fn observability_audit_limiter_reports_suppressed_lines_even_when_the_next_window_is_full() {
        let mut limiter = Limiter::new(1);
        let t0 = Instant::now();
        assert!(limiter.admit(t0).write);
        assert!(!limiter.admit(t0).write);
        assert!(!limiter.admit(t0).write);
        let next = limiter.admit(t0 + Duration::from_secs(2));
        assert_eq!(
            next,
            Admitted {
                write: true,
                suppressed: 2
            }
        );
    }

    #[test]
    fn observability_audit_line_names_the_code() {
        let error = BrokerError::invalid(Reason::ChannelInvalid, "segment 1 is empty");
        assert_eq!(code_name(error.code()), "INVALID_ARGUMENT");
        // Logging with no subscriber installed must not panic.
        refused(None, None, Some("crm..x"), &error);
    }

    #[test]
    fn observability_audit_line_separates_who_from_what() {
        let peer: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        let denied = BrokerError::Denied(PermissionDenied::Subscribe {
            pattern: "billing.>".into(),
        });
        assert_eq!(
            Line::new(Some(peer), Some("alice"), Some("billing.>"), &denied),
            Line {
                peer: "10.0.0.7:5000".into(),
                principal: Some("alice".into()),
                target: Some("billing.>".into()),
                code: "PERMISSION_DENIED",
                reason: "SUBSCRIBE_DENIED",
            }
        );
        // Refused at the gate: no principal was established, nothing was named yet.
        let missing = BrokerError::Unauthenticated(TokenError::Missing);
        let line = Line::new(None, None, None, &missing);
        assert_eq!(line.peer, "unknown");
        assert_eq!((line.principal, line.target), (None, None));
        assert_eq!(line.code, "UNAUTHENTICATED");
        // Client strings are cut like every echo.
        let long = "a".repeat(300);
        let line = Line::new(None, Some(&long), Some(&long), &missing);
        assert_eq!(line.principal, Some(shorten(&long)));
        assert_eq!(line.target, Some(shorten(&long)));
    }
}
