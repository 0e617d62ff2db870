//! The process's open-file limit (`RLIMIT_NOFILE`), which every connection counts against.
//!
//! Many systems start services with a soft limit of 1024 and a much higher hard limit; the soft
//! one is raised to the hard one at start (an unprivileged process may), and a warning says when
//! even that is below `limits.max_connections` plus what the broker keeps open besides.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors the broker keeps open besides client connections: the log's segments, the state
/// store, batch files, admin connections (at most 64), raft peers, the runtime's own.
pub(crate) const OTHER_FILES: u64 = 256;

/// The open-file limit after [`raise_open_file_limit`], and what it was before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenFileLimit {
    /// The soft limit at start; `None` is unlimited.
    pub(crate) before: Option<u64>,
    /// The soft limit in force now.
    pub(crate) now: Option<u64>,
}

/// Raises the soft open-file limit to the hard one, and warns (once, here) when the result cannot
/// hold `max_connections` connections plus [`OTHER_FILES`]: accepts would then fail, and pause
/// (see [`super::accept`]), before `limits.max_connections` is reached.
pub fn raise_open_file_limit(max_connections: usize) {
    let limit = raise();
    if limit.now != limit.before {
        tracing::info!(
            from = limit.before,
            to = limit.now,
            "raised the open-file limit (nofile) to its hard limit"
        );
    }
    if let Some(shortfall) = shortfall(limit.now, max_connections) {
        tracing::warn!(
            nofile = limit.now,
            max_connections,
            other_files = OTHER_FILES,
            shortfall,
            "the open-file limit (nofile) is below limits.max_connections plus the broker's own \
             files: new connections will wait before the connection limit is reached (raise the \
             hard nofile limit, e.g. LimitNOFILE= or ulimit -Hn, or lower limits.max_connections)"
        );
    }
}

/// Sets the soft limit to the hard one; on failure leaves it as it was.
fn raise() -> OpenFileLimit {
    let current = getrlimit(Resource::Nofile);
    let before = current.current;
    if current.current == current.maximum {
        return OpenFileLimit {
            before,
            now: before,
        };
    }
    let raised = Rlimit {
        current: current.maximum,
        maximum: current.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => OpenFileLimit {
            before,
            now: current.maximum,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit (nofile) to its hard limit");
            OpenFileLimit {
                before,
                now: before,
            }
        }
    }
}

/// How many descriptors short `nofile` (`None`: unlimited) is of `max_connections` plus
/// [`OTHER_FILES`], if it is.
fn shortfall(nofile: Option<u64>, max_connections: usize) -> Option<u64> {
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(OTHER_FILES);
    let nofile = nofile?;
    (nofile < needed).then(|| needed - nofile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_the_connections_and_files_is_short() {
        assert_eq!(
            shortfall(Some(1024), 10_000),
            Some(10_000 + OTHER_FILES - 1024)
        );
        assert_eq!(shortfall(Some(10_000 + OTHER_FILES), 10_000), None);
        assert_eq!(shortfall(Some(1_048_576), 10_000), None);
        assert_eq!(shortfall(None, usize::MAX), None);
        assert_eq!(shortfall(Some(64), usize::MAX), Some(u64::MAX - 64));
    }

    #[test]
    fn raising_ends_at_the_hard_limit() {
        let limit = raise();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(limit.now, now.current);
        assert_eq!(now.current, now.maximum);
    }
}
