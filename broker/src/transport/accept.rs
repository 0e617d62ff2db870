//! Pacing an accept loop that cannot accept for want of resources.
//!
//! When the process is out of file descriptors (EMFILE), the system is (ENFILE), or the kernel is
//! out of memory for sockets (ENOBUFS, ENOMEM), the waiting connection stays in the listen backlog
//! and the listener stays readable: retrying at once fails the same way, for ever, at a full core.
//! A paced loop pauses instead — 10 ms after the first failure, doubling up to 1 s while failures
//! go on, back to 10 ms after an accept succeeds — counts each failure
//! (`switchboard_accept_errors_total`) and warns at most once every 10 s, with the number of
//! failures since the last warning.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use rustix::io::Errno;
use tokio::time::Sleep;

use crate::observability::metrics;

/// The pause after the first failure in a row.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause: how late a freed descriptor is used at worst.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one warning per this interval (per listener).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether a failed accept means the process or the system is out of a resource, so that retrying
/// at once cannot succeed.
pub(crate) fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(error),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    )
}

/// One listener's pause schedule and warning budget.
#[derive(Debug)]
pub(crate) struct AcceptPacing {
    /// The listener's name in logs and in the metric's `listener` label.
    listener: &'static str,
    /// The pause after the next failure.
    next_pause: Duration,
    last_warning: Option<Instant>,
    /// Failures since the last warning.
    unreported: u64,
}

impl AcceptPacing {
    /// A schedule for the listener named `listener`.
    pub(crate) fn new(listener: &'static str) -> AcceptPacing {
        AcceptPacing {
            listener,
            next_pause: FIRST_PAUSE,
            last_warning: None,
            unreported: 0,
        }
    }

    /// Records an accept that failed for want of resources at `now`; returns how long to pause
    /// before accepting again.
    pub(crate) fn failed(&mut self, error: &io::Error, now: Instant) -> Duration {
        metrics::accept_error(self.listener);
        self.unreported += 1;
        let due = self
            .last_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= WARN_EVERY);
        if due {
            tracing::warn!(
                listener = self.listener,
                failures = self.unreported,
                error = %error,
                "cannot accept connections: out of file descriptors or socket memory; pausing \
                 accepts (raise the nofile limit, or lower limits.max_connections)"
            );
            self.last_warning = Some(now);
            self.unreported = 0;
        }
        let pause = self.next_pause;
        self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
        pause
    }

    /// Records a successful accept: the next failure pauses briefly again.
    pub(crate) fn accepted(&mut self) {
        self.next_pause = FIRST_PAUSE;
    }
}

/// A stream of accepted connections that pauses, rather than yields an error, when accepting
/// fails for want of resources (see the module documentation). Other errors pass through.
pub(crate) struct PacedIncoming<S> {
    inner: S,
    pacing: AcceptPacing,
    pause: Option<Pin<Box<Sleep>>>,
}

impl<S> PacedIncoming<S> {
    /// Paces `inner`, the listener named `listener`.
    pub(crate) fn new(inner: S, listener: &'static str) -> PacedIncoming<S> {
        PacedIncoming {
            inner,
            pacing: AcceptPacing::new(listener),
            pause: None,
        }
    }
}

impl<S, T> Stream for PacedIncoming<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Err(e)) if is_resource_exhaustion(&e) => {
                    let pause = this.pacing.failed(&e, Instant::now());
                    this.pause = Some(Box::pin(tokio::time::sleep(pause)));
                }
                Some(Ok(accepted)) => {
                    this.pacing.accepted();
                    return Poll::Ready(Some(Ok(accepted)));
                }
                other => return Poll::Ready(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    #[test]
    fn resource_exhaustion_is_recognised_and_nothing_else() {
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            assert!(is_resource_exhaustion(&error(errno)), "{errno:?}");
        }
        for errno in [Errno::CONNABORTED, Errno::INTR, Errno::AGAIN, Errno::INVAL] {
            assert!(!is_resource_exhaustion(&error(errno)), "{errno:?}");
        }
        assert!(!is_resource_exhaustion(&io::Error::other(
            "not an OS error"
        )));
    }

    #[test]
    fn pauses_grow_to_a_second_and_reset_after_an_accept() {
        let mut pacing = AcceptPacing::new("test");
        let e = error(Errno::MFILE);
        let now = Instant::now();
        let pauses: Vec<u128> = (0..10)
            .map(|_| pacing.failed(&e, now).as_millis())
            .collect();
        assert_eq!(
            pauses,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000],
            "{pauses:?}"
        );
        pacing.accepted();
        assert_eq!(pacing.failed(&e, now), FIRST_PAUSE);
    }

    #[test]
    fn warns_at_most_once_per_interval_with_the_count() {
        let mut pacing = AcceptPacing::new("test");
        let e = error(Errno::MFILE);
        let t0 = Instant::now();
        pacing.failed(&e, t0);
        assert_eq!((pacing.last_warning, pacing.unreported), (Some(t0), 0));
        for i in 1..=5 {
            pacing.failed(&e, t0 + Duration::from_secs(i));
        }
        assert_eq!((pacing.last_warning, pacing.unreported), (Some(t0), 5));
        let later = t0 + WARN_EVERY;
        pacing.failed(&e, later);
        assert_eq!((pacing.last_warning, pacing.unreported), (Some(later), 0));
    }

    #[tokio::test]
    async fn a_paced_stream_pauses_on_exhaustion_and_passes_the_rest() {
        use futures::StreamExt;
        let items: Vec<io::Result<u32>> = vec![
            Err(error(Errno::MFILE)),
            Err(error(Errno::MFILE)),
            Ok(1),
            Err(error(Errno::CONNABORTED)),
            Ok(2),
        ];
        let mut paced = PacedIncoming::new(futures::stream::iter(items), "test");
        // The two failures are absorbed (after pauses of 10 and 20 ms), not yielded.
        assert_eq!(paced.next().await.map(|r| r.ok()), Some(Some(1)));
        assert_eq!(paced.pacing.next_pause, FIRST_PAUSE, "reset by the accept");
        let passed = paced.next().await;
        assert!(matches!(passed, Some(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted));
        assert_eq!(paced.next().await.map(|r| r.ok()), Some(Some(2)));
        assert!(paced.next().await.is_none());
    }
}
