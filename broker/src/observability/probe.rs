//! `switchboard --healthcheck`: the container health probe.
//!
//! A `FROM scratch` image has no shell, curl or wget, so the broker binary probes itself: it asks
//! the admin listener's `/healthz` (200 while the node knows a raft leader) over a plain TCP
//! connection and turns the answer into an exit status. Blocking std I/O with timeouts is enough
//! here and keeps the probe free of a runtime.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Why a probe failed; the text is what `--healthcheck` prints.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The admin listener is configured `off`: there is nothing to ask.
    #[error("the admin listener is off: nothing to probe (set admin_listen)")]
    AdminOff,
    /// Connecting, writing or reading failed (or timed out).
    #[error("cannot reach {addr}: {source}")]
    Io {
        /// The address probed.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The listener answered, but not `200`.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
}

/// The address to dial for a listener bound to `bound`: a wildcard bind (`0.0.0.0`, `::`) is
/// reached on loopback, which is where the probe runs (inside the node's own container).
pub(crate) fn dial_addr(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

/// GETs `/healthz` from the admin listener bound at `admin` (`None`: the listener is off).
///
/// # Errors
/// [`ProbeError`] when the listener is off, unreachable within `timeout`, or answers other than 200.
pub fn probe(admin: Option<SocketAddr>, timeout: Duration) -> Result<(), ProbeError> {
    let addr = dial_addr(admin.ok_or(ProbeError::AdminOff)?);
    let io = |source| ProbeError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    // The answer is a few dozen bytes; cap what is read so a wrong listener cannot make the probe
    // buffer without bound.
    let mut answer = Vec::new();
    stream.take(4096).read_to_end(&mut answer).map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/") => Ok(()),
        _ => {
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
            Err(ProbeError::Unhealthy(format!("{status_line}: {body}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `answer`, after reading the request head.
    fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            assert!(seen.starts_with(b"GET /healthz HTTP/1.1\r\n"));
            conn.write_all(answer.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn healthy_when_the_listener_answers_200() {
        let addr = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
        probe(Some(addr), Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn unhealthy_on_503_with_the_reason() {
        let addr = serve_once(
            "HTTP/1.1 503 Service Unavailable\r\n\r\nno leader: this node cannot accept writes\n",
        );
        let err = probe(Some(addr), Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&err, ProbeError::Unhealthy(text) if text.contains("503") && text.contains("no leader")),
            "{err}"
        );
    }

    #[test]
    fn unreachable_and_off_are_failures() {
        // Bind then drop: the port is (very likely) closed now.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            probe(Some(addr), Duration::from_secs(5)),
            Err(ProbeError::Io { .. })
        ));
        assert!(matches!(
            probe(None, Duration::from_secs(5)),
            Err(ProbeError::AdminOff)
        ));
    }

    #[test]
    fn a_wildcard_bind_is_dialled_on_loopback() {
        assert_eq!(
            dial_addr("0.0.0.0:7401".parse().unwrap()),
            "127.0.0.1:7401".parse().unwrap()
        );
        assert_eq!(
            dial_addr("[::]:7401".parse().unwrap()),
            "[::1]:7401".parse().unwrap()
        );
        assert_eq!(
            dial_addr("10.0.0.5:7401".parse().unwrap()),
            "10.0.0.5:7401".parse().unwrap()
        );
    }
}
