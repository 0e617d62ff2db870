//! Reading `strace` output, to prove from the system calls themselves that an acknowledgement
//! left the broker only after the log entry it covers was made durable.
//!
//! The trace is expected from `strace -f -tt -yy -xx -s N -o FILE`: every line starts with a pid
//! and a time, file descriptors carry their target (`12<\x2f...>` for a file, hex-encoded with
//! `-xx`; `7<TCP:[127.0.0.1:7400->127.0.0.1:51234]>` for a socket), and every buffer is printed
//! as `\xHH` escapes. A call interrupted by another thread's is split into `... <unfinished ...>`
//! and `<... name resumed> ...`; [`parse`] joins the halves.
//!
//! The order of the lines is the order in which strace (one tracer, handling one stop at a time)
//! saw the calls enter and leave the kernel, so "line a before line b" is a happens-before fact.
//! A call's `start` is the line where it entered (the buffer of a write is printed there), its
//! `end` the line where it returned.

use std::fmt;

/// One system call, joined from its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Thread id.
    pub pid: u32,
    /// The call's name, e.g. `fdatasync`.
    pub name: String,
    /// The first argument's target, decoded: a path, or `TCP:[local->peer]`.
    pub target: Option<String>,
    /// Every quoted buffer among the arguments, decoded and concatenated.
    pub bytes: Vec<u8>,
    /// The return value, when it is a number.
    pub ret: Option<i64>,
    /// Index of the line where the call entered.
    pub start: usize,
    /// Index of the line where it returned.
    pub end: usize,
    /// The time strace printed on its first line.
    pub time: String,
}

/// Parses a whole trace into calls, in order of their `end`.
pub fn parse(text: &str) -> Vec<Call> {
    // Unfinished calls per thread: (name, args so far, start line, time).
    let mut pending: std::collections::HashMap<u32, (String, String, usize, String)> =
        std::collections::HashMap::new();
    let mut calls = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        let (time, body) = rest.split_once(' ').unwrap_or(("", rest));
        if body.starts_with("+++") || body.starts_with("---") {
            continue;
        }
        if let Some(resumed) = body.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((pending_name, head, start, first_time)) = pending.remove(&pid) else {
                continue;
            };
            if pending_name != name {
                continue;
            }
            calls.push(finish(
                pid,
                name,
                &format!("{head}{tail}"),
                start,
                index,
                first_time,
            ));
            continue;
        }
        let Some((name, args)) = body.split_once('(') else {
            continue;
        };
        if let Some(head) = args.strip_suffix(" <unfinished ...>") {
            pending.insert(
                pid,
                (name.to_owned(), head.to_owned(), index, time.to_owned()),
            );
            continue;
        }
        calls.push(finish(pid, name, args, index, index, time.to_owned()));
    }
    calls
}

/// Builds a call from its arguments text (everything after the opening parenthesis).
fn finish(pid: u32, name: &str, args: &str, start: usize, end: usize, time: String) -> Call {
    let (args, ret) = match args.rfind(") = ") {
        Some(at) => (&args[..at], args[at + 4..].split_whitespace().next()),
        None => (args, None),
    };
    Call {
        pid,
        name: name.to_owned(),
        target: fd_target(args),
        bytes: quoted_bytes(args),
        ret: ret.and_then(|r| r.parse().ok()),
        start,
        end,
        time,
    }
}

/// The `<...>` annotation of a leading file descriptor argument, decoded.
fn fd_target(args: &str) -> Option<String> {
    let digits = args.bytes().take_while(u8::is_ascii_digit).count();
    let annotated = args.get(digits..)?.strip_prefix('<')?;
    // The annotation ends at a '>' followed by an argument separator; a socket's own "->" does not.
    let bytes = annotated.as_bytes();
    let end = (0..bytes.len()).find(|&i| {
        bytes[i] == b'>' && matches!(bytes.get(i + 1), None | Some(b',' | b')' | b' '))
    })?;
    Some(String::from_utf8_lossy(&unescape(&annotated[..end])).into_owned())
}

/// Every `"..."` among the arguments, unescaped and concatenated (a writev's buffers in order).
fn quoted_bytes(args: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(open) = rest.find('"') {
        let after = &rest[open + 1..];
        let mut close = None;
        let bytes = after.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    close = Some(i);
                    break;
                }
                _ => i += 1,
            }
        }
        let Some(close) = close else { break };
        out.extend(unescape(&after[..close]));
        rest = &after[close + 1..];
    }
    out
}

/// Decodes strace's C-like escapes (`\xHH`, `\n`, `\\`, ...).
fn unescape(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' || i + 1 >= bytes.len() {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            b'x' => {
                let hex = text
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 4;
                    continue;
                }
                out.push(b'x');
            }
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'f' => out.push(0x0c),
            other => out.push(other),
        }
        i += 2;
    }
    out
}

const READS: &[&str] = &["read", "readv", "recvfrom", "recvmsg"];
const WRITES: &[&str] = &["write", "writev", "sendto", "sendmsg"];
const SYNCS: &[&str] = &["fdatasync", "fsync"];
const FILE_WRITES: &[&str] = &["pwrite64", "pwritev", "pwritev2", "write", "writev"];

/// Whether `bytes` (one write to an HTTP/2 connection) is nothing but frames that cannot carry a
/// response: SETTINGS, PING and WINDOW_UPDATE. Anything else, including bytes that do not parse
/// as whole frames, might be an acknowledgement; treating it as one only makes the check stricter.
pub fn is_http2_control_only(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        if rest.len() < 9 {
            return false;
        }
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        let kind = rest[3];
        if !matches!(kind, 0x4 | 0x6 | 0x8) || rest.len() < 9 + len {
            return false;
        }
        rest = &rest[9 + len..];
    }
    true
}

/// What the trace shows for one acknowledged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The request's marker.
    pub marker: String,
    /// Line where the request's bytes were read from the client's socket.
    pub request_read: usize,
    /// Line where the log file was written after that (the entry's append).
    pub append: usize,
    /// Line where a sync of the log file, begun after the append, returned 0.
    pub synced: usize,
    /// Line where the first possible answer was written to the client's socket.
    pub answer_written: usize,
}

/// Why one request's acknowledgement is not proven to follow a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The request's marker.
    pub marker: String,
    /// What is missing, with line numbers.
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.marker, self.reason)
    }
}

/// For each request (named by a `marker` that occurs in its bytes, sent one at a time, each after
/// the previous one's acknowledgement), checks that between reading the request and writing the
/// first thing that could be its answer to the client's socket, the broker wrote a log file and
/// then completed a sync of that same file.
///
/// - `server_port`: the broker's public port; the client's socket is the one whose local address
///   ends with it.
/// - `log_file_suffix`: how the log store's data files end, e.g. `.seg` for its segments.
pub fn check_sync_before_answer(
    calls: &[Call],
    server_port: u16,
    log_file_suffix: &str,
    markers: &[String],
) -> Vec<Result<Proof, Violation>> {
    let local = format!(":{server_port}->");
    let on_client_socket = |c: &Call| {
        c.target
            .as_deref()
            .is_some_and(|t| t.starts_with("TCP") && t.contains(&local))
    };
    let on_log_file = |c: &Call| {
        c.target
            .as_deref()
            .is_some_and(|t| t.ends_with(log_file_suffix))
    };
    markers
        .iter()
        .map(|marker| {
            let violation = |reason: String| Violation {
                marker: marker.clone(),
                reason,
            };
            let request = calls
                .iter()
                .filter(|c| READS.contains(&c.name.as_str()) && on_client_socket(c))
                .find(|c| contains(&c.bytes, marker.as_bytes()))
                .ok_or_else(|| violation("no read of the client's socket holds it".into()))?;
            let answer = calls
                .iter()
                .filter(|c| WRITES.contains(&c.name.as_str()) && on_client_socket(c))
                .filter(|c| c.start > request.end && c.ret.is_some_and(|r| r > 0))
                .filter(|c| !is_http2_control_only(&c.bytes))
                .min_by_key(|c| c.start)
                .ok_or_else(|| {
                    violation(format!(
                        "nothing written to the client after the request (line {})",
                        request.end + 1
                    ))
                })?;
            let appends = calls.iter().filter(|c| {
                FILE_WRITES.contains(&c.name.as_str())
                    && on_log_file(c)
                    && c.start > request.end
                    && c.end < answer.start
                    && c.ret.is_some_and(|r| r > 0)
            });
            let mut best: Option<Proof> = None;
            for append in appends {
                let synced = calls.iter().find(|c| {
                    SYNCS.contains(&c.name.as_str())
                        && c.target == append.target
                        && c.start > append.end
                        && c.end < answer.start
                        && c.ret == Some(0)
                });
                if let Some(sync) = synced {
                    best = Some(Proof {
                        marker: marker.clone(),
                        request_read: request.end,
                        append: append.end,
                        synced: sync.end,
                        answer_written: answer.start,
                    });
                    break;
                }
            }
            best.ok_or_else(|| {
                violation(format!(
                    "request read at line {} ({}), answer written at line {} ({}), and no write \
                     of the log file followed by a completed sync of it in between",
                    request.end + 1,
                    request.time,
                    answer.start + 1,
                    answer.time
                ))
            })
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` as strace -xx prints a buffer.
    fn hex(text: &[u8]) -> String {
        text.iter().map(|b| format!("\\x{b:02x}")).collect()
    }

    const SOCK: &str = "9<TCP:[127.0.0.1:7400->127.0.0.1:50000]>";
    const OTHER_SOCK: &str = "10<TCP:[127.0.0.1:7401->127.0.0.1:50001]>";

    fn log_fd() -> String {
        format!("12<{}>", hex(b"/tmp/x/log/db"))
    }

    fn state_fd() -> String {
        format!("13<{}>", hex(b"/tmp/x/state/db"))
    }

    /// A DATA frame on stream 1 (what carries an answer).
    fn data_frame() -> String {
        hex(&[0, 0, 2, 0, 0, 0, 0, 0, 1, 0xaa, 0xbb])
    }

    /// A WINDOW_UPDATE frame on stream 0.
    fn window_update() -> String {
        hex(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    }

    fn good_trace() -> String {
        let log = log_fd();
        [
            format!(
                "100 10:00:00.000001 recvfrom({SOCK}, \"{}\", 8192, 0, NULL, NULL) = 20",
                hex(b"..req-one..")
            ),
            format!(
                "100 10:00:00.000002 writev({SOCK}, [{{iov_base=\"{}\", iov_len=13}}], 1) = 13",
                window_update()
            ),
            format!(
                "101 10:00:00.000003 pwrite64({log}, \"{}\", 4, 100) = 4",
                hex(b"abcd")
            ),
            format!("101 10:00:00.000004 fdatasync({log} <unfinished ...>"),
            format!(
                "100 10:00:00.000005 write({OTHER_SOCK}, \"{}\", 11) = 11",
                data_frame()
            ),
            "101 10:00:00.000006 <... fdatasync resumed>) = 0".to_owned(),
            format!(
                "100 10:00:00.000007 writev({SOCK}, [{{iov_base=\"{}\", iov_len=11}}], 1) = 11",
                data_frame()
            ),
            "100 10:00:00.000008 +++ exited with 0 +++".to_owned(),
        ]
        .join("\n")
    }

    #[test]
    fn parses_split_calls_targets_and_buffers() {
        let calls = parse(&good_trace());
        let sync = calls.iter().find(|c| c.name == "fdatasync").unwrap();
        assert_eq!(sync.target.as_deref(), Some("/tmp/x/log/db"));
        assert_eq!((sync.start, sync.end, sync.ret), (3, 5, Some(0)));
        let read = &calls[0];
        assert_eq!(
            read.target.as_deref(),
            Some("TCP:[127.0.0.1:7400->127.0.0.1:50000]")
        );
        assert_eq!(read.bytes, b"..req-one..");
        assert_eq!(read.ret, Some(20));
        assert!(is_http2_control_only(&calls[1].bytes));
        assert!(!is_http2_control_only(&calls.last().unwrap().bytes));
    }

    #[test]
    fn an_answer_after_append_and_sync_is_proven() {
        let verdict =
            check_sync_before_answer(&parse(&good_trace()), 7400, "/log/db", &["req-one".into()]);
        assert_eq!(
            verdict,
            vec![Ok(Proof {
                marker: "req-one".into(),
                request_read: 0,
                append: 2,
                synced: 5,
                answer_written: 6
            })]
        );
    }

    #[test]
    fn an_answer_before_the_sync_returns_is_a_violation() {
        // The sync is under way but has not returned when the answer goes out.
        let trace = good_trace().replace(
            "101 10:00:00.000006 <... fdatasync resumed>) = 0\n100 10:00:00.000007 writev",
            "100 10:00:00.000007 writev",
        ) + "\n101 10:00:00.000009 <... fdatasync resumed>) = 0";
        let verdict =
            check_sync_before_answer(&parse(&trace), 7400, "/log/db", &["req-one".into()]);
        assert!(verdict[0].is_err(), "{verdict:?}");
    }

    #[test]
    fn a_sync_of_another_file_or_a_failed_sync_does_not_count() {
        let other = good_trace().replace(
            &format!("fdatasync({}", log_fd()),
            &format!("fdatasync({}", state_fd()),
        );
        assert!(
            check_sync_before_answer(&parse(&other), 7400, "/log/db", &["req-one".into()])[0]
                .is_err()
        );
        let same_segment =
            good_trace().replace(&log_fd(), &format!("12<{}>", hex(b"/tmp/x/log/1.seg")));
        assert!(
            check_sync_before_answer(&parse(&same_segment), 7400, ".seg", &["req-one".into()])[0]
                .is_ok()
        );
        // Another file of the log (another segment) is not the one written.
        let other_segment = good_trace().replace(
            &format!("fdatasync({}", log_fd()),
            &format!("fdatasync(14<{}>", hex(b"/tmp/x/log/2.seg")),
        );
        let segment_trace =
            other_segment.replace(&log_fd(), &format!("12<{}>", hex(b"/tmp/x/log/1.seg")));
        assert!(check_sync_before_answer(
            &parse(&segment_trace),
            7400,
            ".seg",
            &["req-one".into()]
        )[0]
        .is_err());
        let failed = good_trace().replace(
            "<... fdatasync resumed>) = 0",
            "<... fdatasync resumed>) = -1 EIO (Input/output error)",
        );
        assert!(
            check_sync_before_answer(&parse(&failed), 7400, "/log/db", &["req-one".into()])[0]
                .is_err()
        );
    }

    #[test]
    fn a_sync_before_the_append_does_not_cover_it() {
        let log = log_fd();
        let trace = [
            format!(
                "100 10:00:00.000001 read({SOCK}, \"{}\", 8192) = 20",
                hex(b"req-two")
            ),
            format!("101 10:00:00.000002 fdatasync({log}) = 0"),
            format!(
                "101 10:00:00.000003 pwrite64({log}, \"{}\", 4, 100) = 4",
                hex(b"abcd")
            ),
            format!(
                "100 10:00:00.000004 write({SOCK}, \"{}\", 11) = 11",
                data_frame()
            ),
        ]
        .join("\n");
        let verdict =
            check_sync_before_answer(&parse(&trace), 7400, "/log/db", &["req-two".into()]);
        assert!(
            verdict[0]
                .as_ref()
                .is_err_and(|v| v.reason.contains("no write of the log file")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_request_never_read_is_a_violation() {
        let verdict = check_sync_before_answer(
            &parse(&good_trace()),
            7400,
            "/log/db",
            &["req-absent".into()],
        );
        assert!(verdict[0].is_err());
    }

    #[test]
    fn unparseable_bytes_count_as_a_possible_answer() {
        assert!(!is_http2_control_only(b"\x00\x00"));
        assert!(!is_http2_control_only(b""));
        assert!(is_http2_control_only(&[0, 0, 0, 4, 1, 0, 0, 0, 0]));
    }
}
