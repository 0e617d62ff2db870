//! The `hint:` line `sb` prints under an error: what to do about the mistakes people make most
//! (the wrong port, a pattern the shell or the grammar cut short, a missing or refused token).
//!
//! Token and TLS hints live with the security options ([`crate::security::hint`]); this module
//! asks them first, then looks at the rest.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use switchboard_client::{Error, Reason};
use tonic::Code;

/// How long the probe of a server that did not speak gRPC may take, per step (connect, write,
/// read): it runs after the command failed, so it only delays the error line.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the admin listener's "not found" answer is in a probe's reply (see
/// `broker/src/observability/admin.rs`): it names the paths that listener serves.
const ADMIN_SIGNATURE: &str = "this listener serves /metrics";

/// The hint for `error`, if there is one; `server` is the `--server` value, probed when the
/// answer was not gRPC at all.
pub fn hint(error: &anyhow::Error, server: &str) -> Option<String> {
    if let Some(hint) = crate::security::hint(error) {
        return Some(hint.to_owned());
    }
    let error = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Error>())?;
    if is_not_grpc(error) {
        return Some(not_grpc_hint(server));
    }
    match error.reason()? {
        Reason::PatternInvalid => Some(
            "patterns have two or more dot-separated segments: `orders.>` (everything under \
             orders), `crm.*.updated`, or `>` (everything); entity watches match `type.id` \
             (`contact.*`). Quote them in a shell, where `>` redirects and `*` expands file names"
                .to_owned(),
        ),
        Reason::ChannelInvalid => Some(
            "a channel is two or more dot-separated segments of A-Z a-z 0-9 _ -, such as \
             `orders.created` or `crm.contact.updated`; wildcards belong in patterns (sb \
             subscribe, sb history), not in the channel of a publish"
                .to_owned(),
        ),
        _ => None,
    }
}

/// `UNKNOWN: transport error` with no reason: the connection was made, but what answered did not
/// speak gRPC (HTTP/2) — typically the admin listener, which is HTTP/1 only.
fn is_not_grpc(error: &Error) -> bool {
    matches!(
        error,
        Error::Status { code: Code::Unknown, reason: None, message, .. }
            if message.contains("transport error")
    )
}

fn not_grpc_hint(server: &str) -> String {
    let address = plain_http_authority(server);
    match address.as_deref().map(probe_http1) {
        Some(Http1::Admin) => format!(
            "{} is a Switchboard admin listener (HTTP/1: /metrics, /healthz, /console); sb talks \
             gRPC to the broker's `listen` address (127.0.0.1:7400 unless configured), not to \
             its `admin_listen` (127.0.0.1:7401)",
            address.unwrap_or_default()
        ),
        Some(Http1::Other) => format!(
            "{} answers HTTP/1, not gRPC: --server must be a Switchboard broker's `listen` \
             address (127.0.0.1:7400 unless configured), reached directly or through a proxy \
             that passes HTTP/2",
            address.unwrap_or_default()
        ),
        // Also what a broker that stopped in the middle of the call leaves behind.
        Some(Http1::No) | None => "the call failed below gRPC: unless the broker just stopped, \
             check that --server is a Switchboard broker's `listen` address (127.0.0.1:7400 \
             unless configured), not its admin listener (`admin_listen`, 127.0.0.1:7401) or \
             another service"
            .to_owned(),
    }
}

/// `host:port` of a plain `http://` server URL; `None` for `https://` (a probe would need TLS)
/// or a URL that does not parse.
fn plain_http_authority(server: &str) -> Option<String> {
    let url = switchboard_client::normalize_url(server).ok()?;
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    Some(authority.to_owned())
}

/// What a plain HTTP/1.1 request to the server got back.
#[derive(Debug, PartialEq, Eq)]
enum Http1 {
    /// An HTTP/1 answer naming the admin listener's paths.
    Admin,
    /// Some other HTTP/1 answer.
    Other,
    /// No HTTP/1 answer (nothing, or not HTTP).
    No,
}

/// Asks `authority` for `/` over HTTP/1.1 (blocking, bounded by [`PROBE_TIMEOUT`] per step): the
/// broker has failed by then, and nothing else runs.
fn probe_http1(authority: &str) -> Http1 {
    let answer = || -> std::io::Result<String> {
        let addr = authority
            .to_socket_addrs()?
            .next()
            .ok_or(std::io::ErrorKind::NotFound)?;
        let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
        // One write: a request written in pieces may be closed on half read, and a server that
        // closes with unread bytes resets the connection, losing its answer.
        let request = format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        // An answer's head and a short body fit; a server that sends more is not read further.
        let mut bytes = Vec::new();
        stream.take(4096).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match answer() {
        Ok(text) if text.starts_with("HTTP/1.") && text.contains(ADMIN_SIGNATURE) => Http1::Admin,
        Ok(text) if text.starts_with("HTTP/1.") => Http1::Other,
        _ => Http1::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::TcpListener;

    fn status(code: Code, reason: Option<&str>, message: &str) -> anyhow::Error {
        Error::Status {
            code,
            reason: reason.map(str::to_owned),
            message: message.to_owned(),
            metadata: BTreeMap::new(),
        }
        .into()
    }

    /// Answers one connection with `answer` after reading the request head.
    fn serve_once(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // The whole head, so closing leaves nothing unread (which would reset the answer).
            let mut head = Vec::new();
            let mut byte = [0_u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            stream.write_all(answer.as_bytes()).unwrap();
        });
        addr.to_string()
    }

    #[test]
    fn an_admin_listener_is_named() {
        let server = serve_once(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 66\r\n\r\n\
             not found: this listener serves /metrics, /healthz and /console\n",
        );
        let hint = hint(&status(Code::Unknown, None, "transport error"), &server).unwrap();
        assert!(hint.contains("admin listener"), "{hint}");
        assert!(hint.starts_with(&server), "{hint}");
    }

    #[test]
    fn another_http1_server_is_told_apart() {
        let server = serve_once("HTTP/1.0 200 OK\r\n\r\nhello");
        let hint = hint(&status(Code::Unknown, None, "transport error"), &server).unwrap();
        assert!(hint.contains("answers HTTP/1, not gRPC"), "{hint}");
    }

    #[test]
    fn without_an_http1_answer_the_hint_stays_general() {
        let server = serve_once("SSH-2.0-OpenSSH\r\n");
        let hint = hint(&status(Code::Unknown, None, "transport error"), &server).unwrap();
        assert!(hint.starts_with("the call failed below gRPC"), "{hint}");
        // An https URL is not probed.
        assert!(plain_http_authority("https://broker:7400").is_none());
        assert_eq!(
            plain_http_authority("127.0.0.1:7401").as_deref(),
            Some("127.0.0.1:7401")
        );
    }

    #[test]
    fn patterns_and_channels_get_hints_and_other_errors_none() {
        let pattern = hint(
            &status(
                Code::InvalidArgument,
                Some("PATTERN_INVALID"),
                "one segment",
            ),
            "127.0.0.1:1",
        )
        .unwrap();
        assert!(pattern.contains("`orders.>`"), "{pattern}");
        assert!(pattern.contains("Quote them"), "{pattern}");
        let channel = hint(
            &status(Code::InvalidArgument, Some("CHANNEL_INVALID"), "1 segment"),
            "127.0.0.1:1",
        )
        .unwrap();
        assert!(channel.contains("two or more"), "{channel}");
        assert!(hint(
            &status(Code::InvalidArgument, Some("PAYLOAD_TOO_LARGE"), "big"),
            "127.0.0.1:1"
        )
        .is_none());
        // A broker's UNKNOWN with a reason is its answer, not a wrong port.
        assert!(hint(
            &status(Code::Unknown, Some("INTERNAL"), "transport error"),
            "127.0.0.1:1"
        )
        .is_none());
    }
}
