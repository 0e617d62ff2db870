//! Parsers for `sb`'s argument values: start and end positions, headers and flow policies; the
//! default entity writer id; and a payload read from stdin.

use std::time::SystemTime;

use switchboard_client::{FlowPolicy, Start};

/// The upper bound of a history read (`--to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Stop after this offset (inclusive).
    Offset(u64),
    /// Stop after messages published at this time (inclusive).
    Time(SystemTime),
}

const POSITION_HELP: &str = "an offset or an RFC 3339 time such as 2024-05-01T12:00:00Z";

/// `--from` of `subscribe`: `earliest`, `latest`, an offset, or an RFC 3339 time.
pub fn parse_start(text: &str) -> Result<Start, String> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("earliest") {
        return Ok(Start::Earliest);
    }
    if trimmed.eq_ignore_ascii_case("latest") {
        return Ok(Start::Latest);
    }
    match parse_position(trimmed) {
        Some(End::Offset(offset)) => Ok(Start::Offset(offset)),
        Some(End::Time(time)) => Ok(Start::Time(time)),
        None => Err(format!(
            "expected earliest, latest, {POSITION_HELP}; got {text:?}"
        )),
    }
}

/// `--from` of `history`: as [`parse_start`], but `latest` is refused (history reads what is
/// already stored).
pub fn parse_history_start(text: &str) -> Result<Start, String> {
    match parse_start(text)? {
        Start::Latest => Err(
            "history cannot start at latest (it reads stored messages); use earliest, an offset or a time"
                .to_owned(),
        ),
        start => Ok(start),
    }
}

/// `--to` of `history`: an offset or an RFC 3339 time.
pub fn parse_end(text: &str) -> Result<End, String> {
    parse_position(text.trim()).ok_or_else(|| format!("expected {POSITION_HELP}; got {text:?}"))
}

fn parse_position(text: &str) -> Option<End> {
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        return text.parse().ok().map(End::Offset);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| End::Time(time.into()))
}

/// `--header K=V`: split at the first `=`; the name must not be empty, the value may be.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some(("", _)) => Err(format!("header {text:?} has an empty name")),
        Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
        None => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

/// `--policy` of `subscribe`: `lossless`, `conflate` or `drop-oldest`.
pub fn parse_policy(text: &str) -> Result<FlowPolicy, String> {
    text.parse()
        .map_err(|_| format!("expected lossless, conflate or drop-oldest; got {text:?}"))
}

/// The writer id of `sb entity update` and `delete` when neither `--writer` nor `SB_WRITER` is
/// given: `sb-USER@HOST`, `sb-USER` or `sb-HOST` with whichever of the two is known (the user from
/// `$USER` or `$USERNAME`, the host from `$HOSTNAME` or the kernel's host name), else `sb`.
pub fn default_writer() -> String {
    let user = non_empty_env("USER").or_else(|| non_empty_env("USERNAME"));
    let host = non_empty_env("HOSTNAME").or_else(|| {
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
    });
    writer_id(user.as_deref(), host.as_deref())
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// `sb-USER@HOST` from the parts that are known, at most 128 bytes (the broker's limit).
fn writer_id(user: Option<&str>, host: Option<&str>) -> String {
    let mut writer = match (user, host) {
        (Some(user), Some(host)) => format!("sb-{user}@{host}"),
        (Some(name), None) | (None, Some(name)) => format!("sb-{name}"),
        (None, None) => "sb".to_owned(),
    };
    if writer.len() > 128 {
        let mut end = 128;
        while !writer.is_char_boundary(end) {
            end -= 1;
        }
        writer.truncate(end);
    }
    writer
}

/// A payload read from stdin, without the one newline (`\n` or `\r\n`) that ends it unless
/// `keep_newline`: `echo '{"id":1}' | sb publish ...` sends `{"id":1}`, as the same payload given
/// as an argument would be.
pub fn stdin_payload(mut bytes: Vec<u8>, keep_newline: bool) -> Vec<u8> {
    if !keep_newline && bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: u64, millis: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_millis(millis)
    }

    #[test]
    fn start_keywords_offsets_and_times() {
        assert_eq!(parse_start("earliest"), Ok(Start::Earliest));
        assert_eq!(parse_start("LATEST"), Ok(Start::Latest));
        assert_eq!(parse_start("0"), Ok(Start::Offset(0)));
        assert_eq!(parse_start("42"), Ok(Start::Offset(42)));
        assert_eq!(
            parse_start("18446744073709551615"),
            Ok(Start::Offset(u64::MAX))
        );
        assert_eq!(
            parse_start("2024-05-01T12:00:00Z"),
            Ok(Start::Time(at(1_714_564_800, 0)))
        );
        assert_eq!(
            parse_start("2024-05-01T14:00:00.250+02:00"),
            Ok(Start::Time(at(1_714_564_800, 250)))
        );
    }

    #[test]
    fn start_rejects_garbage() {
        for bad in [
            "",
            "-1",
            "1.5",
            "18446744073709551616",
            "yesterday",
            "2024-05-01",
            "2024-05-01T12:00:00",
        ] {
            assert!(parse_start(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn history_start_refuses_latest() {
        assert!(parse_history_start("latest").is_err());
        assert_eq!(parse_history_start("earliest"), Ok(Start::Earliest));
        assert_eq!(parse_history_start("7"), Ok(Start::Offset(7)));
    }

    #[test]
    fn end_offsets_and_times() {
        assert_eq!(parse_end("99"), Ok(End::Offset(99)));
        assert_eq!(
            parse_end("1970-01-01T00:00:01.5Z"),
            Ok(End::Time(at(1, 500)))
        );
        assert!(parse_end("earliest").is_err());
        assert!(parse_end("latest").is_err());
        assert!(parse_end("").is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("traceparent=00-abc-def-01"),
            Ok(("traceparent".to_owned(), "00-abc-def-01".to_owned()))
        );
        assert_eq!(
            parse_header("k=a=b"),
            Ok(("k".to_owned(), "a=b".to_owned()))
        );
        assert_eq!(parse_header("k="), Ok(("k".to_owned(), String::new())));
        assert!(parse_header("=v").is_err());
        assert!(parse_header("novalue").is_err());
    }

    #[test]
    fn policies() {
        assert_eq!(parse_policy("lossless"), Ok(FlowPolicy::Lossless));
        assert_eq!(parse_policy("Conflate"), Ok(FlowPolicy::Conflate));
        assert_eq!(parse_policy("drop-oldest"), Ok(FlowPolicy::DropOldest));
        assert!(parse_policy("newest").is_err());
        assert!(parse_policy("").is_err());
    }

    #[test]
    fn writer_ids() {
        assert_eq!(writer_id(Some("ada"), Some("box")), "sb-ada@box");
        assert_eq!(writer_id(Some("ada"), None), "sb-ada");
        assert_eq!(writer_id(None, Some("box")), "sb-box");
        assert_eq!(writer_id(None, None), "sb");
        let long = "é".repeat(100);
        let writer = writer_id(Some(&long), None);
        assert!(writer.len() <= 128 && writer.starts_with("sb-é"));
        assert!(!default_writer().is_empty());
    }

    #[test]
    fn one_final_newline_is_left_out_of_stdin_payloads() {
        assert_eq!(stdin_payload(b"{}\n".to_vec(), false), b"{}");
        assert_eq!(stdin_payload(b"{}\r\n".to_vec(), false), b"{}");
        assert_eq!(stdin_payload(b"a\n\n".to_vec(), false), b"a\n");
        assert_eq!(stdin_payload(b"a\r".to_vec(), false), b"a\r");
        assert_eq!(stdin_payload(b"\n".to_vec(), false), b"");
        assert_eq!(stdin_payload(b"{}\n".to_vec(), true), b"{}\n");
        assert_eq!(stdin_payload(Vec::new(), false), b"");
    }
}
