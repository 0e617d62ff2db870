//! The listeners' transport: TLS from the settings, the bounds on open connections and on how long
//! a new one may take to open, accept loops that pause rather than spin when out of descriptors,
//! and the broker-wide bound on what connections hold for clients that stop reading
//! ([`send_buffers`]).

mod accept;
mod handshake;
mod nofile;
pub(crate) mod send_buffers;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{Cluster, Tls};
use crate::observability::metrics;
pub(crate) use accept::{is_resource_exhaustion, AcceptPacing, PacedIncoming};
use handshake::Opening;
pub use nofile::raise_open_file_limit;
use send_buffers::{Connections, OpenLedger};

/// The listener's TLS settings, or `None` when TLS is off. Reads the PEM files now, so a missing
/// file stops the start with its name rather than failing every handshake later.
///
/// # Errors
/// A certificate, key or CA file cannot be read.
pub(crate) fn server_tls(tls: &Tls) -> anyhow::Result<Option<ServerTlsConfig>> {
    if !tls.enabled() {
        return Ok(None);
    }
    let read = |path: &std::path::Path, setting: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {setting} {}", path.display()))
    };
    let cert = read(&tls.cert_file, "tls.cert_file")?;
    let key = read(&tls.key_file, "tls.key_file")?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if !tls.client_ca_file.as_os_str().is_empty() {
        let ca = read(&tls.client_ca_file, "tls.client_ca_file")?;
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(Some(config))
}

/// Mutual TLS between the nodes, or `None` when it is off: what the raft listener serves with
/// (peers must present a certificate from the cluster CA), and what this node dials its peers with
/// (their certificate checked against that CA, its own presented).
///
/// # Errors
/// A certificate, key or CA file cannot be read.
pub(crate) fn cluster_tls(
    cluster: &Cluster,
) -> anyhow::Result<Option<(ServerTlsConfig, ClientTlsConfig)>> {
    if !cluster.tls_enabled() {
        return Ok(None);
    }
    let read = |path: &std::path::Path, setting: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {setting} {}", path.display()))
    };
    let cert = read(&cluster.tls_cert_file, "cluster.tls_cert_file")?;
    let key = read(&cluster.tls_key_file, "cluster.tls_key_file")?;
    let ca = read(&cluster.tls_ca_file, "cluster.tls_ca_file")?;
    let identity = Identity::from_pem(cert, key);
    let server = ServerTlsConfig::new()
        .identity(identity.clone())
        .client_ca_root(Certificate::from_pem(&ca));
    let client = ClientTlsConfig::new()
        .identity(identity)
        .ca_certificate(Certificate::from_pem(ca));
    Ok(Some((server, client)))
}

/// What bounds the public listener's connections (`limits.*`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Open connections in all (`limits.max_connections`).
    pub(crate) max: usize,
    /// Open connections from one source address (`limits.max_connections_per_address`).
    pub(crate) max_per_address: usize,
    /// How long a new connection has to send its opening (`limits.handshake_timeout`).
    pub(crate) handshake_timeout: Duration,
}

/// Accepted connections, within [`ConnectionLimits`]: a connection past `max` open, or past
/// `max_per_address` open from its source address, is closed as soon as it is accepted (its
/// client sees the connection reset), so a flood of connections cannot exhaust file descriptors
/// or memory, nor one address take every place. Each connection then has `handshake_timeout` to
/// send its opening (see [`handshake`]), and is closed if it has not: a socket that never sends a
/// byte does not hold its place for ever. Accepting pauses while the process is out of file
/// descriptors (see [`accept`]).
///
/// The gRPC services, gRPC-Web and the HTTP gateway share this listener, so all of them are
/// covered.
pub(crate) struct LimitedIncoming {
    inner: PacedIncoming<TcpIncoming>,
    open: Arc<Semaphore>,
    per_address: Arc<OpenPerAddress>,
    limits: ConnectionLimits,
    connections: Connections,
}

impl LimitedIncoming {
    /// Bounds `inner` to `limits`; each connection keeps its ledger in `connections`.
    pub(crate) fn new(
        inner: TcpIncoming,
        limits: ConnectionLimits,
        connections: Connections,
    ) -> LimitedIncoming {
        LimitedIncoming {
            inner: PacedIncoming::new(inner, "public"),
            open: Arc::new(Semaphore::new(limits.max)),
            per_address: Arc::new(OpenPerAddress::default()),
            limits,
            connections,
        }
    }

    /// A place for a connection from `peer` under both bounds, or the bound that refuses it.
    fn admit(&self, peer: Option<SocketAddr>) -> Result<Places, metrics::ConnectionLimit> {
        let open = Arc::clone(&self.open)
            .try_acquire_owned()
            .map_err(|_| metrics::ConnectionLimit::Total)?;
        // Without a peer address (the socket is already gone) only the total bound applies.
        let address = match peer {
            Some(peer) => Some(
                OpenPerAddress::enter(&self.per_address, peer.ip(), self.limits.max_per_address)
                    .ok_or(metrics::ConnectionLimit::PerAddress)?,
            ),
            None => None,
        };
        Ok(Places {
            _open: open,
            _address: address,
        })
    }
}

impl Stream for LimitedIncoming {
    type Item = io::Result<LimitedStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let stream = match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(stream)) => stream,
            };
            let peer = stream.peer_addr().ok();
            match self.admit(peer) {
                Ok(places) => {
                    let ledger = peer.map(|peer| self.connections.open(peer));
                    return Poll::Ready(Some(Ok(LimitedStream {
                        stream,
                        _places: places,
                        ledger,
                        handshake: Some(Handshake {
                            opening: Opening::new(),
                            deadline: Box::pin(tokio::time::sleep(self.limits.handshake_timeout)),
                            expired: false,
                        }),
                    })));
                }
                Err(limit) => {
                    metrics::connection_refused(limit);
                    tracing::debug!(peer = ?peer, limit = limit.as_str(), "connection limit reached; closing a new connection");
                    drop(stream);
                }
            }
        }
    }
}

/// Open connections per source address. Only addresses with a connection open have an entry, so
/// it holds at most `limits.max_connections` of them.
#[derive(Debug, Default)]
struct OpenPerAddress(Mutex<HashMap<IpAddr, usize>>);

impl OpenPerAddress {
    /// Takes a place for a connection from `address`, unless `max` are open from it.
    fn enter(this: &Arc<OpenPerAddress>, address: IpAddr, max: usize) -> Option<AddressPlace> {
        // An IPv4 client of a dual-stack listener is one address whichever way it is written.
        let address = address.to_canonical();
        let mut open = this.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.get(&address).copied().unwrap_or(0);
        if count >= max {
            return None;
        }
        open.insert(address, count + 1);
        Some(AddressPlace {
            open: Arc::clone(this),
            address,
        })
    }
}

/// A connection's place among those of its source address, given back when it closes.
#[derive(Debug)]
struct AddressPlace {
    open: Arc<OpenPerAddress>,
    address: IpAddr,
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// A connection's places under the bounds, held until it closes.
struct Places {
    _open: OwnedSemaphorePermit,
    _address: Option<AddressPlace>,
}

/// A new connection's opening and the deadline for it; dropped once the opening is complete.
struct Handshake {
    opening: Opening,
    deadline: Pin<Box<Sleep>>,
    /// The deadline passed (counted once; every later read fails too).
    expired: bool,
}

/// An accepted connection holding its place under the bounds until it closes. Until the client
/// has sent its opening, a read fails (`TimedOut`) once the handshake deadline has passed, which
/// ends the connection — whether hyper or the TLS handshake is reading.
///
/// It also counts what its socket accepts in its ledger, and fails every read and write once the
/// ledger is closed: a client that stopped reading while the send buffers of all connections
/// were over their bound ([`send_buffers`]).
pub(crate) struct LimitedStream {
    stream: TcpStream,
    _places: Places,
    handshake: Option<Handshake>,
    ledger: Option<OpenLedger>,
}

impl LimitedStream {
    /// An error once the connection is being closed for its send buffers.
    fn closed(&self) -> Option<io::Error> {
        self.ledger.as_ref().filter(|l| l.is_closing()).map(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed: the client stopped reading while send buffers were over their bound",
            )
        })
    }

    /// Counts a write's outcome in the ledger; a write that waits is woken if the connection is
    /// closed meanwhile.
    fn count_written(&self, cx: &Context<'_>, written: &Poll<io::Result<usize>>) {
        let Some(ledger) = &self.ledger else { return };
        match written {
            Poll::Ready(Ok(n)) => ledger.written(*n),
            Poll::Pending => ledger.wake_writer_on_close(cx),
            Poll::Ready(Err(_)) => {}
        }
    }

    /// Reads, holding the connection to its handshake deadline until its opening is complete.
    fn read_within_handshake(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(handshake) = &mut self.handshake else {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        };
        // Polled first, so the deadline wakes the reader even while no byte arrives, and a client
        // trickling bytes is closed at the deadline too.
        if handshake.deadline.as_mut().poll(cx).is_ready() {
            if !handshake.expired {
                handshake.expired = true;
                metrics::handshake_timeout();
                tracing::debug!(peer = ?self.stream.peer_addr().ok(), "no complete opening within limits.handshake_timeout; closing the connection");
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not send its opening within limits.handshake_timeout",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if handshake.opening.feed(&buf.filled()[before..]) {
            // Established: from here on the connection may stay idle as long as it likes.
            self.handshake = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    /// The TCP addresses, as tonic records them for a plain `TcpStream`, so
    /// `Request::remote_addr` works the same behind the bound (and behind TLS).
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.closed() {
            return Poll::Ready(Err(e));
        }
        let read = self.read_within_handshake(cx, buf);
        if let (Poll::Pending, Some(ledger)) = (&read, &self.ledger) {
            ledger.wake_reader_on_close(cx);
        }
        read
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.closed() {
            return Poll::Ready(Err(e));
        }
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.count_written(cx, &written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.closed() {
            return Poll::Ready(Err(e));
        }
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.count_written(cx, &written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_per_address_are_bounded_and_given_back() {
        let open = Arc::new(OpenPerAddress::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = OpenPerAddress::enter(&open, a, 2);
        let second = OpenPerAddress::enter(&open, a, 2);
        assert!(first.is_some() && second.is_some());
        assert!(
            OpenPerAddress::enter(&open, a, 2).is_none(),
            "a third from a"
        );
        // The same address written as IPv4-mapped IPv6 is the same address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(OpenPerAddress::enter(&open, mapped, 2).is_none());
        let other = OpenPerAddress::enter(&open, b, 2);
        assert!(other.is_some(), "another address has its own places");
        drop(first);
        let again = OpenPerAddress::enter(&open, a, 2);
        assert!(again.is_some(), "a closed connection gives its place back");
        drop((second, again, other));
        let entries = open.0.lock().unwrap_or_else(PoisonError::into_inner).len();
        assert_eq!(entries, 0, "no entry for an address with nothing open");
    }
}
