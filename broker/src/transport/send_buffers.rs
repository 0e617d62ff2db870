//! What the public listener's connections hold in memory for their clients, and the broker-wide
//! bound on it.
//!
//! A response's data waits in the HTTP layer until the connection's socket takes it: h2 buffers up
//! to about 400 KiB per stream when a client advertises a large flow-control window and then stops
//! reading, hyper's HTTP/1 writer about as much per connection, and tonic does not let us lower
//! either. Per stream that is bounded; over thousands of streams that never read it is not (issue
//! 20: 10,240 stalled subscriptions took the broker to 7 GiB). So every connection keeps a
//! [`Ledger`]: bytes of response data the HTTP layer took from a response body
//! ([`CountingLayer`]) minus bytes its socket accepted (counted by the connection's stream,
//! [`super::LimitedStream`]).
//!
//! Two rules keep the sum near `limits.max_send_buffer_bytes`:
//!
//! - **The gate** ([`CountedBody`]): while the sum is over the bound, a connection that already
//!   holds more than [`CONNECTION_FLOOR`] gets no more response data until its socket takes some.
//!   Its response bodies are simply not polled, so nothing more is encoded for it; its
//!   subscriptions' tasks then block, their mailboxes overflow, and they are served from the store
//!   once the client reads again — as a single lagging subscription already was. A connection that
//!   holds less than the floor (one whose client reads) always gets data, so a client that keeps up
//!   is not slowed by those that do not. The sum is thereby at most the bound plus, per
//!   connection, the floor and one chunk of a response.
//! - **The watcher** ([`watch`]): while the sum is over three quarters of the bound, it closes the
//!   *stalled* connections — holding bytes their socket has not taken for
//!   `limits.stalled_connection_timeout` — those holding the most first. Closing a connection frees
//!   everything buffered for it; its client sees the connection drop, and a subscription resumes
//!   from its next offset without a gap. A client that reads, however slowly, keeps making
//!   progress and is never closed for this.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::observability::metrics;
use crate::shutdown::ShutdownSignal;

/// How often the watcher looks at the ledgers.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// What a connection may always hold, whatever the sum: a client that reads keeps getting data
/// while others fill the bound. Larger than what a reading connection holds between two socket
/// writes (a few chunks of at most 32 KiB each, plus a message).
pub(crate) const CONNECTION_FLOOR: usize = 256 * 1024;

/// The open connections of the public listener, by peer address; cheap to clone.
#[derive(Clone)]
pub(crate) struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    open: Mutex<HashMap<SocketAddr, Arc<Ledger>>>,
    sum: Arc<Sum>,
}

/// The bytes waiting for every socket, and the bound on them.
struct Sum {
    waiting: AtomicUsize,
    limit: usize,
}

impl Sum {
    fn over(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > self.limit
    }
}

/// One connection's account of the bytes waiting for its socket.
pub(crate) struct Ledger {
    peer: SocketAddr,
    sum: Arc<Sum>,
    /// Response data taken from bodies and not yet accepted by the socket. Socket writes also
    /// carry frame headers and control frames, so it is kept from going below zero rather than
    /// computed as a difference: bytes written while nothing waits give no credit later.
    waiting: AtomicUsize,
    /// When the socket last took bytes, or when bytes started waiting after none did: ms since
    /// `epoch`. A connection holding bytes with no progress since is stalled.
    progress_ms: AtomicU64,
    epoch: Instant,
    closing: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    /// Response bodies held back by the gate, woken when the socket takes bytes, when the sum is
    /// back under the bound, or when the connection closes. At most one per open stream.
    held: Mutex<Vec<Waker>>,
    /// Whether `held` may be non-empty: socket writes check it without taking the lock.
    any_held: AtomicBool,
}

impl Connections {
    /// No connections yet; their send buffers together are bounded by `limit` bytes.
    pub(crate) fn new(limit: usize) -> Connections {
        Connections {
            shared: Arc::new(Shared {
                open: Mutex::new(HashMap::new()),
                sum: Arc::new(Sum {
                    waiting: AtomicUsize::new(0),
                    limit,
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Ledger>>> {
        self.shared.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the ledger of a connection just accepted from `peer`; it is forgotten when the
    /// returned guard is dropped (the connection closed).
    pub(crate) fn open(&self, peer: SocketAddr) -> OpenLedger {
        let ledger = Arc::new(Ledger {
            peer,
            sum: Arc::clone(&self.shared.sum),
            waiting: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            closing: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
            held: Mutex::new(Vec::new()),
            any_held: AtomicBool::new(false),
        });
        self.lock().insert(peer, Arc::clone(&ledger));
        OpenLedger {
            ledger,
            connections: self.clone(),
        }
    }

    /// Forgets a closed connection's ledger.
    fn close(&self, ledger: &Ledger) {
        let mut open = self.lock();
        // A new connection from the same address may already have taken the entry.
        if open
            .get(&ledger.peer)
            .is_some_and(|l| std::ptr::eq(Arc::as_ptr(l), ledger))
        {
            open.remove(&ledger.peer);
        }
    }

    fn ledger(&self, peer: &SocketAddr) -> Option<Arc<Ledger>> {
        self.lock().get(peer).cloned()
    }

    /// Bytes waiting for the sockets of all open connections.
    pub(crate) fn waiting_bytes(&self) -> usize {
        self.shared.sum.waiting.load(Ordering::Relaxed)
    }

    /// Lets the gate's held-back bodies go on, once the sum is back under the bound. (A held
    /// connection is woken by its own socket's progress too; this covers one whose socket has
    /// nothing it may send until the others drain.)
    fn release_held(&self) {
        if self.shared.sum.over() {
            return;
        }
        let ledgers: Vec<Arc<Ledger>> = self.lock().values().cloned().collect();
        for ledger in ledgers {
            ledger.wake_held();
        }
    }

    /// Closes stalled connections, those holding the most first, until the bytes waiting for
    /// every socket are at most `limit`; returns how many it closed.
    fn enforce(&self, limit: usize, stalled_after: Duration) -> usize {
        let ledgers: Vec<Arc<Ledger>> = self.lock().values().cloned().collect();
        let mut total: usize = ledgers.iter().map(|l| l.waiting()).sum();
        if total <= limit {
            return 0;
        }
        let mut stalled: Vec<(usize, &Arc<Ledger>)> = ledgers
            .iter()
            .filter(|l| !l.closing.load(Ordering::Relaxed) && l.stalled_for() >= stalled_after)
            .map(|l| (l.waiting(), l))
            .collect();
        stalled.sort_unstable_by_key(|(waiting, _)| std::cmp::Reverse(*waiting));
        let mut closed = 0;
        for (waiting, ledger) in stalled {
            if total <= limit {
                break;
            }
            tracing::warn!(
                peer = %ledger.peer,
                waiting_bytes = waiting,
                "closing a connection whose client stopped reading: the connections' send \
                 buffers are over limits.max_send_buffer_bytes"
            );
            ledger.shut();
            total -= waiting;
            closed += 1;
        }
        closed
    }
}

/// An open connection's ledger; dropping it (the connection closed) forgets the ledger.
pub(crate) struct OpenLedger {
    ledger: Arc<Ledger>,
    connections: Connections,
}

impl std::ops::Deref for OpenLedger {
    type Target = Ledger;

    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

impl Drop for OpenLedger {
    fn drop(&mut self) {
        self.connections.close(&self.ledger);
    }
}

impl Ledger {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn stalled_for(&self) -> Duration {
        if self.waiting() == 0 {
            return Duration::ZERO;
        }
        let since = self.progress_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    /// The HTTP layer took `bytes` of response data for this connection.
    fn handed(&self, bytes: usize) {
        self.sum.waiting.fetch_add(bytes, Ordering::Relaxed);
        if self.waiting.fetch_add(bytes, Ordering::Relaxed) == 0 {
            self.progress_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The socket accepted `bytes`.
    pub(crate) fn written(&self, bytes: usize) {
        self.take_back(bytes);
        self.progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// `bytes` no longer wait (written, or discarded with their stream); never below zero.
    fn take_back(&self, bytes: usize) {
        let before = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_sub(bytes))
            })
            .unwrap_or_else(|w| w);
        let taken = before.min(bytes);
        if taken > 0 {
            self.sum.waiting.fetch_sub(taken, Ordering::Relaxed);
        }
        self.wake_held();
    }

    /// Whether the gate holds back this connection's response data: it holds more than
    /// [`CONNECTION_FLOOR`] while the sum is over the bound.
    fn gated(&self) -> bool {
        self.waiting() > CONNECTION_FLOOR && self.sum.over() && !self.is_closing()
    }

    /// Whether a body of this connection must wait before handing more data; if so, it is woken
    /// when that may change.
    fn must_wait(&self, cx: &Context<'_>) -> bool {
        if !self.gated() {
            return false;
        }
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if !held.iter().any(|w| w.will_wake(cx.waker())) {
                held.push(cx.waker().clone());
            }
            self.any_held.store(true, Ordering::Release);
        }
        // The socket may have taken bytes between the check and the registration.
        self.gated()
    }

    fn wake_held(&self) {
        if !self.any_held.swap(false, Ordering::AcqRel) {
            return;
        }
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in held {
            waker.wake();
        }
    }

    /// Whether the connection is being closed; its stream then fails every read and write.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Remembers who to wake when the connection is closed while a read waits.
    pub(crate) fn wake_reader_on_close(&self, cx: &Context<'_>) {
        self.register(&self.read_waker, cx);
    }

    /// Remembers who to wake when the connection is closed while a write waits.
    pub(crate) fn wake_writer_on_close(&self, cx: &Context<'_>) {
        self.register(&self.write_waker, cx);
    }

    fn register(&self, waker: &AtomicWaker, cx: &Context<'_>) {
        waker.register(cx.waker());
        // Closed between the caller's check and the registration: that wake-up was missed.
        if self.is_closing() {
            cx.waker().wake_by_ref();
        }
    }

    fn shut(&self) {
        self.closing.store(true, Ordering::Release);
        self.read_waker.wake();
        self.write_waker.wake();
        self.wake_held();
    }
}

/// Every [`WATCH_INTERVAL`], closes stalled connections while the sum is over three quarters of
/// the bound and releases the gate's held bodies once it is under the bound (see the module docs),
/// until `shutdown`. When what clients hold — these send buffers plus `held_elsewhere` (the
/// broker's estimate of the rest: catch-up reads, subscriptions) — has drained from a large peak,
/// the freed memory is handed back to the system.
pub(crate) async fn watch(
    connections: Connections,
    stalled_after: Duration,
    held_elsewhere: impl Fn() -> usize,
    mut shutdown: ShutdownSignal,
) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trim_at: Option<Instant> = None;
    let mut drain = Drain::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        if trim_at.is_some_and(|at| Instant::now() >= at) {
            trim_at = None;
            tokio::task::spawn_blocking(return_free_memory);
        }
        let closed = connections.enforce(connections.shared.sum.limit / 4 * 3, stalled_after);
        connections.release_held();
        if closed > 0 {
            metrics::stalled_connections_closed(closed as u64);
        }
        let drained = drain.drained(connections.waiting_bytes() + held_elsewhere());
        if (closed > 0 || drained) && trim_at.is_none() {
            // Once the tasks have dropped what they held, give it back to the system.
            trim_at = Some(Instant::now() + TRIM_DELAY);
        }
    }
}

/// How long after buffers drained (or connections were closed) the freed memory is handed back
/// to the system.
const TRIM_DELAY: Duration = Duration::from_secs(1);

/// Below this peak, what drained is not worth a trim.
const TRIM_PEAK: usize = 32 * 1024 * 1024;

/// Tells when what clients hold has drained from a peak worth handing back.
#[derive(Default)]
struct Drain {
    peak: usize,
}

impl Drain {
    /// Given what is held now: whether it fell to a quarter of a peak of at least [`TRIM_PEAK`]
    /// since the last time this said so.
    fn drained(&mut self, held: usize) -> bool {
        self.peak = self.peak.max(held);
        if self.peak >= TRIM_PEAK && held <= self.peak / 4 {
            self.peak = held;
            return true;
        }
        false
    }
}

/// Hands the memory the allocator keeps free back to the system. glibc's malloc keeps what its
/// arenas freed: after thousands of stalled streams were closed, RSS stayed at its peak
/// (6.7 GiB in the memory benchmark) until `malloc_trim` returned it (30 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_free_memory() {
    // SAFETY: malloc_trim takes a padding size and only releases free memory from glibc's
    // arenas; it is thread-safe and touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_free_memory() {}

/// Counts the response data the HTTP layer takes, in the ledger of the request's connection.
#[derive(Clone)]
pub(crate) struct CountingLayer {
    connections: Connections,
}

impl CountingLayer {
    /// Counts into the ledgers of `connections`.
    pub(crate) fn new(connections: Connections) -> CountingLayer {
        CountingLayer { connections }
    }
}

impl<S> tower::Layer<S> for CountingLayer {
    type Service = Counting<S>;

    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            connections: self.connections.clone(),
        }
    }
}

/// The service [`CountingLayer`] makes.
#[derive(Clone)]
pub(crate) struct Counting<S> {
    inner: S,
    connections: Connections,
}

/// The peer address tonic records for a plain or a TLS connection.
fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Counting<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let ledger = peer_of(&request).and_then(|peer| self.connections.ledger(&peer));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| CountedBody {
                inner,
                ledger,
                handed: 0,
            }))
        })
    }
}

/// A response body whose data is counted in its connection's ledger as the HTTP layer takes it.
///
/// When the body goes (its stream ended, or the client reset it), what it handed is taken back
/// from the ledger: HTTP/2 discards the unsent data of a reset stream, and those bytes would
/// otherwise count as waiting for ever, until an idle connection looked stalled. Data of a stream
/// that ended normally and is still being written is then counted low for a moment (the
/// ledger's writes stop at zero), never high.
pub(crate) struct CountedBody<B> {
    inner: B,
    ledger: Option<Arc<Ledger>>,
    /// Data this body handed to the HTTP layer.
    handed: usize,
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some(ledger) = &self.ledger {
            ledger.take_back(self.handed);
        }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        // Checked before the inner body is polled, so that nothing is encoded for a connection
        // the gate holds back.
        if self.ledger.as_ref().is_some_and(|l| l.must_wait(cx)) {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let data_len = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.data_ref().map_or(0, Bytes::len),
            _ => 0,
        };
        if let (Some(ledger), true) = (&self.ledger, data_len > 0) {
            ledger.handed(data_len);
            self.handed += data_len;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn writes_take_back_what_was_handed_and_never_go_below_zero() {
        let connections = Connections::new(usize::MAX);
        let ledger = connections.open(peer(1));
        ledger.written(500);
        ledger.handed(300);
        assert_eq!(connections.waiting_bytes(), 300);
        ledger.written(1000);
        assert_eq!(connections.waiting_bytes(), 0);
        drop(ledger);
        assert_eq!(
            connections.lock().len(),
            0,
            "a closed connection is forgotten"
        );
    }

    #[test]
    fn over_the_limit_only_stalled_connections_are_closed_the_largest_first() {
        let connections = Connections::new(usize::MAX);
        let small = connections.open(peer(1));
        let large = connections.open(peer(2));
        let reading = connections.open(peer(3));
        small.handed(100);
        large.handed(1000);
        reading.handed(5000);
        // Under the limit nothing is closed, stalled or not.
        assert_eq!(connections.enforce(10_000, Duration::ZERO), 0);
        // Bytes started waiting just now: with a grace of an hour nobody counts as stalled yet.
        assert_eq!(connections.enforce(1_000, Duration::from_secs(3600)), 0);
        // Without grace everyone holding bytes is stalled: the largest go first, and closing
        // stops once the rest fit (5000 + 1000 + 100 > 1000: `reading`, then `large`).
        assert_eq!(connections.enforce(1_000, Duration::ZERO), 2);
        assert!(reading.is_closing());
        assert!(large.is_closing());
        assert!(!small.is_closing());
    }

    #[test]
    fn a_body_that_goes_takes_back_what_it_handed() {
        let connections = Connections::new(usize::MAX);
        let ledger = connections.open(peer(1));
        ledger.handed(100);
        let mut body = CountedBody {
            inner: http_body_util::Full::new(Bytes::from_static(b"0123456789")),
            ledger: connections.ledger(&peer(1)),
            handed: 0,
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert_eq!(connections.waiting_bytes(), 110);
        // Its stream was reset: HTTP/2 drops the 10 bytes it had not sent.
        drop(body);
        assert_eq!(connections.waiting_bytes(), 100);
    }

    #[test]
    fn memory_is_handed_back_once_a_large_peak_drained_to_a_quarter() {
        let mut drain = Drain::default();
        assert!(!drain.drained(TRIM_PEAK - 1));
        assert!(!drain.drained(0), "a small peak is not worth a trim");
        assert!(!drain.drained(4 * TRIM_PEAK));
        assert!(!drain.drained(2 * TRIM_PEAK));
        assert!(drain.drained(TRIM_PEAK));
        assert!(!drain.drained(TRIM_PEAK / 2), "once per drain");
    }

    #[test]
    fn a_reused_address_keeps_the_newer_connections_ledger() {
        let connections = Connections::new(usize::MAX);
        let old = connections.open(peer(1));
        let new = connections.open(peer(1));
        drop(old);
        new.handed(7);
        assert_eq!(connections.waiting_bytes(), 7);
    }

    /// A body whose inner body counts how often it was polled.
    struct Polled {
        polls: Arc<AtomicUsize>,
    }

    impl Body for Polled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[0; 1000])))))
        }
    }

    #[test]
    fn over_the_bound_a_connection_past_its_floor_gets_no_data_until_its_socket_takes_some() {
        let limit = 2 * CONNECTION_FLOOR;
        let connections = Connections::new(limit);
        let stalled = connections.open(peer(1));
        let reading = connections.open(peer(2));
        let other = connections.open(peer(3));
        let polls = Arc::new(AtomicUsize::new(0));
        let mut body = CountedBody {
            inner: Polled {
                polls: Arc::clone(&polls),
            },
            ledger: connections.ledger(&peer(1)),
            handed: 0,
        };
        let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = waker_setting(&woken);
        let mut cx = Context::from_waker(&waker);
        // Under the bound, past the floor: data flows.
        stalled.handed(CONNECTION_FLOOR + 1);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_ready());
        // Over the bound, with a connection under its floor: that one is not held back...
        other.handed(limit);
        reading.handed(100);
        assert!(!reading.gated());
        // ...but the one past its floor is, without its inner body being polled.
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        assert!(!woken.load(Ordering::Relaxed));
        // Its socket takes a little: the body is woken and tries again (still held back).
        stalled.written(10);
        assert!(woken.swap(false, Ordering::Relaxed));
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        // The others drain: the watcher releases it.
        other.written(limit);
        connections.release_held();
        assert!(woken.load(Ordering::Relaxed));
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_closing_connection_is_not_held_back() {
        let connections = Connections::new(CONNECTION_FLOOR);
        let ledger = connections.open(peer(1));
        ledger.handed(2 * CONNECTION_FLOOR);
        assert!(ledger.gated());
        ledger.shut();
        assert!(
            !ledger.gated(),
            "its bodies must run to see the connection go"
        );
    }

    /// A waker that sets `flag`.
    fn waker_setting(flag: &Arc<std::sync::atomic::AtomicBool>) -> Waker {
        struct SetFlag(Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for SetFlag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        Waker::from(Arc::new(SetFlag(Arc::clone(flag))))
    }
}
