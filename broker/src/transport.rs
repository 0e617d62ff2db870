//! The public listener's transport: TLS from the settings, and the bound on open connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::Context as _;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{Cluster, Tls};
use crate::observability::metrics;
use crate::send_buffers::{Connections, Ledger};

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

/// Accepted connections, at most `max` open at once: a connection past the bound is closed as soon
/// as it is accepted (its client sees the connection reset), so a flood of
/// connections cannot exhaust file descriptors or memory.
pub(crate) struct LimitedIncoming {
    inner: TcpIncoming,
    open: Arc<Semaphore>,
    connections: Connections,
}

impl LimitedIncoming {
    /// Bounds `inner` to `max` open connections, each with its ledger in `connections`.
    pub(crate) fn new(inner: TcpIncoming, max: usize, connections: Connections) -> LimitedIncoming {
        LimitedIncoming {
            inner,
            open: Arc::new(Semaphore::new(max)),
            connections,
        }
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
            match Arc::clone(&self.open).try_acquire_owned() {
                Ok(permit) => {
                    let ledger = stream
                        .peer_addr()
                        .ok()
                        .map(|peer| self.connections.open(peer));
                    return Poll::Ready(Some(Ok(LimitedStream {
                        stream,
                        ledger,
                        connections: self.connections.clone(),
                        _open: permit,
                    })));
                }
                Err(_) => {
                    metrics::connection_refused();
                    tracing::debug!(peer = ?stream.peer_addr().ok(), "connection limit reached; closing a new connection");
                    drop(stream);
                }
            }
        }
    }
}

/// An accepted connection holding its place under the bound until it closes. It counts what its
/// socket accepts in its ledger, and fails every read and write once the ledger is closed (a
/// client that stopped reading while send buffers are over their bound: [`crate::send_buffers`]).
pub(crate) struct LimitedStream {
    stream: TcpStream,
    ledger: Option<Arc<Ledger>>,
    connections: Connections,
    _open: OwnedSemaphorePermit,
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
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        if let Some(ledger) = &self.ledger {
            self.connections.close(ledger);
        }
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
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
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
