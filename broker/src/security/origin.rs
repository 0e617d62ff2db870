//! The allow-list of browser origins that may call the broker (gRPC-Web and HTTP from widgets).
//!
//! Why parse instead of compare strings: the classic hole in origin checks is a substring or
//! suffix test on the raw header, which lets `https://evil.example.com.attacker.net` (or
//! `https://attackerexample.com`) through an allow-list entry for `example.com`. Here both the
//! entries and the `Origin` header are parsed into scheme, host and port (RFC 6454), normalised
//! (lowercase scheme and host, the scheme's default port made explicit, one trailing dot dropped,
//! IPv6 literals in canonical form), and compared component by component. A wildcard entry
//! `https://*.example.com` matches a host only when `example.com` is a whole-label suffix of it
//! with at least one label in front — any depth of subdomain, never the bare domain — and only
//! with the same scheme and port.
//!
//! What counts as malformed, and so is never allowed: anything but `http`/`https`, userinfo, a
//! path (even `/`), a query or fragment, percent-escapes, whitespace, a port of 0 or with leading
//! zeros or out of range, an empty label, non-ASCII hosts (browsers send IDNs in punycode, so
//! write `xn--…` in the allow-list), and hosts ending in a number that are not a dotted-quad IPv4
//! address. The literal origin `null` (sandboxed frames, `file:` pages) is never allowed.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest origin accepted, in bytes: a 253-byte host, the scheme, a bracketed IPv6 literal and
/// the port all fit comfortably.
const MAX_ORIGIN_LEN: usize = 320;
/// Longest DNS name, without the trailing dot (RFC 1035).
const MAX_HOST_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// How much of a refused input an error repeats.
const MAX_ECHO_LEN: usize = 120;

/// A URL scheme an origin may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scheme {
    /// `http`, default port 80.
    Http,
    /// `https`, default port 443.
    Https,
}

impl Scheme {
    /// The port implied when an origin names none.
    pub(crate) fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// The scheme as written in an origin.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The host of an origin, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Host {
    /// A DNS name: lowercase ASCII labels of `[a-z0-9_-]`, without a trailing dot.
    Domain(String),
    /// A dotted-quad IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address, written in brackets in an origin.
    Ipv6(Ipv6Addr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(domain) => f.write_str(domain),
            Host::Ipv4(addr) => write!(f, "{addr}"),
            Host::Ipv6(addr) => write!(f, "[{addr}]"),
        }
    }
}

/// A parsed, normalised origin: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    /// The scheme.
    pub scheme: Scheme,
    /// The host.
    pub host: Host,
    /// The port; the scheme's default when the origin names none.
    pub port: u16,
}

impl Origin {
    /// Parses an origin such as `https://crm.example.com` or `http://[::1]:3000`.
    pub(crate) fn parse(input: &str) -> Result<Origin, OriginError> {
        match parse_origin(input, false)? {
            Parsed::Exact(origin) => Ok(origin),
            // Unreachable with wildcards refused, but refusing is the safe answer.
            Parsed::Wildcard(_) => Err(OriginError::new(input, OriginProblem::MisplacedWildcard)),
        }
    }
}

impl fmt::Display for Origin {
    /// The canonical serialisation: the default port is left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.host)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// A wildcard-subdomain entry such as `https://*.example.com`: any host with at least one more
/// label in front of `example.com`, with the same scheme and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct WildcardOrigin {
    /// The scheme an origin must have.
    pub scheme: Scheme,
    /// The domain an origin's host must be a proper subdomain of (`example.com`).
    pub base: String,
    /// The port an origin must have.
    pub port: u16,
}

impl WildcardOrigin {
    /// Whether `origin` has this scheme and port and a host that is a proper subdomain of `base`.
    pub(crate) fn matches(&self, origin: &Origin) -> bool {
        if origin.scheme != self.scheme || origin.port != self.port {
            return false;
        }
        let Host::Domain(domain) = &origin.host else {
            return false;
        };
        // Both are normalised label sequences, so a byte suffix preceded by a `.` is a suffix of
        // whole labels, and the `.` guarantees at least one label in front.
        domain.len() > self.base.len()
            && domain.ends_with(&self.base)
            && domain.as_bytes()[domain.len() - self.base.len() - 1] == b'.'
    }
}

impl fmt::Display for WildcardOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://*.{}", self.scheme.as_str(), self.base)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// What is wrong with an origin or allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OriginProblem {
    /// Nothing was given.
    #[error("it is empty")]
    Empty,
    /// Longer than any real origin.
    #[error("it is {len} bytes long, over the limit of {max}")]
    TooLong {
        /// Length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `null`: the opaque origin of sandboxed frames and `file:` pages.
    #[error("the opaque origin `null` cannot be allowed")]
    Null,
    /// A lone `*`.
    #[error("`*` (any origin) is not supported; list the origins, or use `https://*.example.com`")]
    AnyOrigin,
    /// Non-ASCII characters, e.g. an IDN in Unicode form.
    #[error("it contains non-ASCII characters; write internationalised hosts in punycode (xn--…)")]
    NonAscii,
    /// Whitespace, a control character, `\`, `%` or another character no origin contains.
    #[error("it contains the character {0:?}, which no origin contains")]
    InvalidCharacter(char),
    /// No `scheme://`.
    #[error("it has no `scheme://`")]
    MissingScheme,
    /// A scheme other than `http` or `https`.
    #[error("the scheme {0:?} is not supported; only http and https are")]
    UnsupportedScheme(String),
    /// `user@` before the host.
    #[error("it contains userinfo (`@`); an origin is only scheme://host[:port]")]
    Userinfo,
    /// A path, even a bare `/`.
    #[error("it has a path; an origin is only scheme://host[:port], without a trailing `/`")]
    Path,
    /// A `?query`.
    #[error("it has a query (`?`); an origin is only scheme://host[:port]")]
    Query,
    /// A `#fragment`.
    #[error("it has a fragment (`#`); an origin is only scheme://host[:port]")]
    Fragment,
    /// No host after `scheme://`.
    #[error("the host is empty")]
    EmptyHost,
    /// An empty label (`a..b`, a leading dot, or more than one trailing dot).
    #[error("the host has an empty label")]
    EmptyLabel,
    /// A label longer than 63 bytes.
    #[error("the host has a label longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong,
    /// A host longer than 253 bytes.
    #[error("the host is longer than {MAX_HOST_LEN} bytes")]
    HostTooLong,
    /// A host that ends in a number but is not a dotted-quad IPv4 address.
    #[error("the host ends in a number but is not a dotted-quad IPv4 address")]
    InvalidIpv4,
    /// A bracketed literal that is not an IPv6 address (zone ids are not allowed either).
    #[error("the bracketed host is not an IPv6 address")]
    InvalidIpv6,
    /// A port that is not 1–65535 written in plain digits without leading zeros.
    #[error("the port {0:?} is not a number from 1 to 65535 without leading zeros")]
    InvalidPort(String),
    /// A `*` anywhere but as the whole first label of a host, or in a header.
    #[error("`*` may only stand as the whole first label of an allow-list host (`https://*.example.com`)")]
    MisplacedWildcard,
    /// A wildcard over a single-label domain such as `*.com`.
    #[error("a wildcard needs at least two labels after `*.` (`*.example.com`), or `*.localhost`")]
    WildcardTooBroad,
    /// A wildcard over an IP address.
    #[error("a wildcard cannot stand in front of an IP address")]
    WildcardOnAddress,
}

/// An origin or allow-list entry that could not be parsed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid origin {input:?}: {problem}")]
pub(crate) struct OriginError {
    /// The refused input (cut to 120 bytes).
    pub input: String,
    /// What is wrong with it.
    pub problem: OriginProblem,
}

impl OriginError {
    fn new(input: &str, problem: OriginProblem) -> Self {
        let mut end = input.len().min(MAX_ECHO_LEN);
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        OriginError {
            input: input[..end].to_owned(),
            problem,
        }
    }
}

/// The browser origins allowed to call the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OriginPolicy {
    /// Entries naming one origin.
    exact: HashSet<Origin>,
    /// Wildcard-subdomain entries.
    wildcards: Vec<WildcardOrigin>,
}

impl OriginPolicy {
    /// Parses allow-list entries: exact origins (`https://crm.example.com`,
    /// `http://localhost:3000`) and wildcard-subdomain origins (`https://*.example.com`). The first
    /// malformed entry is the error.
    pub(crate) fn parse<I, S>(entries: I) -> Result<OriginPolicy, OriginError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut policy = OriginPolicy::default();
        for entry in entries {
            match parse_origin(entry.as_ref(), true)? {
                Parsed::Exact(origin) => {
                    policy.exact.insert(origin);
                }
                Parsed::Wildcard(wildcard) => {
                    if !policy.wildcards.contains(&wildcard) {
                        policy.wildcards.push(wildcard);
                    }
                }
            }
        }
        Ok(policy)
    }

    /// Whether the value of an `Origin` header is allowed. A malformed header is not.
    pub(crate) fn allows(&self, origin_header: &str) -> bool {
        Origin::parse(origin_header).is_ok_and(|origin| self.allows_origin(&origin))
    }

    /// Whether a parsed origin is allowed.
    pub(crate) fn allows_origin(&self, origin: &Origin) -> bool {
        self.exact.contains(origin) || self.wildcards.iter().any(|w| w.matches(origin))
    }

    /// Whether the allow-list is empty, so no browser origin is allowed.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty()
    }

    /// The entries in canonical form, exact ones sorted first, for logs and `--print-config`.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> Vec<String> {
        let mut exact: Vec<String> = self.exact.iter().map(Origin::to_string).collect();
        exact.sort();
        exact.extend(self.wildcards.iter().map(WildcardOrigin::to_string));
        exact
    }
}

/// What [`parse_origin`] found.
enum Parsed {
    Exact(Origin),
    Wildcard(WildcardOrigin),
}

/// Parses `input` as an origin, or as a wildcard entry when `allow_wildcard`.
fn parse_origin(input: &str, allow_wildcard: bool) -> Result<Parsed, OriginError> {
    let fail = |problem| OriginError::new(input, problem);
    if input.is_empty() {
        return Err(fail(OriginProblem::Empty));
    }
    if input.len() > MAX_ORIGIN_LEN {
        return Err(fail(OriginProblem::TooLong {
            len: input.len(),
            max: MAX_ORIGIN_LEN,
        }));
    }
    if !input.is_ascii() {
        return Err(fail(OriginProblem::NonAscii));
    }
    if input.eq_ignore_ascii_case("null") {
        return Err(fail(OriginProblem::Null));
    }
    if input == "*" {
        return Err(fail(OriginProblem::AnyOrigin));
    }
    if let Some(ch) = input
        .chars()
        .find(|&ch| ch.is_ascii_control() || ch == ' ' || ch == '\\' || ch == '%')
    {
        return Err(fail(OriginProblem::InvalidCharacter(ch)));
    }
    let Some((scheme, rest)) = input.split_once("://") else {
        return Err(fail(OriginProblem::MissingScheme));
    };
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        Scheme::Http
    } else if scheme.eq_ignore_ascii_case("https") {
        Scheme::Https
    } else {
        return Err(fail(OriginProblem::UnsupportedScheme(scheme.to_owned())));
    };
    // The first of these delimiters decides the problem: `a.com/x?y` has a path.
    if let Some(index) = rest.find(['/', '?', '#', '@']) {
        return Err(fail(match rest.as_bytes()[index] {
            b'/' => OriginProblem::Path,
            b'?' => OriginProblem::Query,
            b'#' => OriginProblem::Fragment,
            _ => OriginProblem::Userinfo,
        }));
    }
    if let Some(ch) = rest
        .chars()
        .find(|&ch| !(ch.is_ascii_alphanumeric() || "-_.:[]*".contains(ch)))
    {
        return Err(fail(OriginProblem::InvalidCharacter(ch)));
    }
    let (host, port) = split_host_port(rest).map_err(fail)?;
    let port = match port {
        None => scheme.default_port(),
        Some(port) => parse_port(port).map_err(fail)?,
    };
    match parse_host(host, allow_wildcard).map_err(fail)? {
        ParsedHost::Exact(host) => Ok(Parsed::Exact(Origin { scheme, host, port })),
        ParsedHost::Wildcard(base) => Ok(Parsed::Wildcard(WildcardOrigin { scheme, base, port })),
    }
}

/// Splits `host[:port]` or `[v6][:port]`; the host keeps its brackets.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), OriginProblem> {
    if authority.starts_with('[') {
        let Some(close) = authority.find(']') else {
            return Err(OriginProblem::InvalidIpv6);
        };
        let (host, after) = authority.split_at(close + 1);
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(OriginProblem::InvalidIpv6),
            },
        };
    }
    if authority.contains(['[', ']']) {
        return Err(OriginProblem::InvalidIpv6);
    }
    match authority.split_once(':') {
        None => Ok((authority, None)),
        Some((host, port)) if !port.contains(':') => Ok((host, Some(port))),
        // More than one `:` outside brackets: an unbracketed IPv6 address or garbage.
        Some(_) => Err(OriginProblem::InvalidIpv6),
    }
}

/// Parses a port: 1–65535 in plain digits, no leading zeros, not empty.
fn parse_port(port: &str) -> Result<u16, OriginProblem> {
    let invalid = || OriginProblem::InvalidPort(port.to_owned());
    if port.is_empty()
        || port.len() > 5
        || port.starts_with('0')
        || !port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid()),
        Ok(port) => Ok(port),
    }
}

/// What [`parse_host`] found.
enum ParsedHost {
    Exact(Host),
    /// The domain after `*.`.
    Wildcard(String),
}

/// Parses and normalises a host: a bracketed IPv6 literal, a dotted-quad IPv4 address, or a DNS
/// name (lowercased, one trailing dot dropped); with `allow_wildcard`, `*.` may lead a DNS name.
fn parse_host(host: &str, allow_wildcard: bool) -> Result<ParsedHost, OriginProblem> {
    if host.is_empty() {
        return Err(OriginProblem::EmptyHost);
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(OriginProblem::InvalidIpv6)?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|addr| ParsedHost::Exact(Host::Ipv6(addr)))
            .map_err(|_| OriginProblem::InvalidIpv6);
    }
    // A fully qualified name's one trailing dot names the same host.
    let host = host.strip_suffix('.').unwrap_or(host);
    let host = host.to_ascii_lowercase();
    if host.len() > MAX_HOST_LEN {
        return Err(OriginProblem::HostTooLong);
    }
    let labels: Vec<&str> = host.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err(OriginProblem::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(OriginProblem::LabelTooLong);
        }
    }
    let wildcard = labels.first() == Some(&"*");
    if labels
        .iter()
        .skip(usize::from(wildcard))
        .any(|l| l.contains('*'))
    {
        return Err(OriginProblem::MisplacedWildcard);
    }
    if wildcard && !allow_wildcard {
        return Err(OriginProblem::MisplacedWildcard);
    }
    let last = labels.last().copied().unwrap_or_default();
    // As in the WHATWG URL parser, a host whose last label is a number is an IPv4 address.
    let numeric = last.bytes().all(|b| b.is_ascii_digit());
    if wildcard {
        let base = labels[1..].join(".");
        if labels.len() > 1 && numeric {
            return Err(OriginProblem::WildcardOnAddress);
        }
        if labels.len() < 3 && base != "localhost" {
            return Err(OriginProblem::WildcardTooBroad);
        }
        return Ok(ParsedHost::Wildcard(base));
    }
    if numeric {
        return match host.parse::<Ipv4Addr>() {
            // Only the canonical dotted quad: `127.1` or `010.0.0.1` are not what a browser sends.
            Ok(addr) if addr.to_string() == host => Ok(ParsedHost::Exact(Host::Ipv4(addr))),
            _ => Err(OriginProblem::InvalidIpv4),
        };
    }
    Ok(ParsedHost::Exact(Host::Domain(host)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        OriginPolicy::parse(entries).unwrap_or_else(|e| panic!("{entries:?} should parse: {e}"))
    }

    fn problem(input: &str) -> OriginProblem {
        match Origin::parse(input) {
            Ok(o) => panic!("{input:?} should be refused, parsed as {o:?}"),
            Err(e) => e.problem,
        }
    }

    fn entry_problem(entry: &str) -> OriginProblem {
        match OriginPolicy::parse([entry]) {
            Ok(p) => panic!("{entry:?} should be refused, parsed as {p:?}"),
            Err(e) => e.problem,
        }
    }

    #[test]
    fn parses_and_normalises() {
        let o = Origin::parse("HTTPS://CRM.Example.COM").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.scheme, Scheme::Https);
        assert_eq!(o.host, Host::Domain("crm.example.com".into()));
        assert_eq!(o.port, 443);
        assert_eq!(o.to_string(), "https://crm.example.com");

        let o = Origin::parse("http://localhost:3000").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.port, 3000);
        assert_eq!(o.to_string(), "http://localhost:3000");

        for (a, b) in [
            ("https://a.example.com:443", "https://a.example.com"),
            ("http://a.example.com:80", "http://a.example.com"),
            ("https://a.example.com.", "https://a.example.com"),
            ("https://a.example.com.:443", "https://a.example.com"),
            ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
            ("http://[::FFFF:7f00:1]", "http://[::ffff:127.0.0.1]"),
        ] {
            assert_eq!(Origin::parse(a), Origin::parse(b), "{a} vs {b}");
            assert!(Origin::parse(a).is_ok(), "{a}");
        }
        assert_ne!(
            Origin::parse("http://a.example.com"),
            Origin::parse("https://a.example.com")
        );
        assert_ne!(
            Origin::parse("https://a.example.com:8443"),
            Origin::parse("https://a.example.com")
        );

        let v6 = Origin::parse("http://[::1]:3000").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v6.host, Host::Ipv6(Ipv6Addr::LOCALHOST));
        assert_eq!(v6.to_string(), "http://[::1]:3000");
        let v4 = Origin::parse("http://127.0.0.1:8080").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v4.host, Host::Ipv4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn refuses_malformed_origins() {
        use OriginProblem::*;
        let cases: &[(&str, OriginProblem)] = &[
            ("", Empty),
            ("null", Null),
            ("NULL", Null),
            ("*", AnyOrigin),
            ("crm.example.com", MissingScheme),
            ("//crm.example.com", MissingScheme),
            ("ftp://example.com", UnsupportedScheme("ftp".into())),
            (
                "chrome-extension://abc",
                UnsupportedScheme("chrome-extension".into()),
            ),
            ("https:/example.com", MissingScheme),
            ("https://user@example.com", Userinfo),
            ("https://user:pw@example.com", Userinfo),
            ("https://example.com@evil.net", Userinfo),
            ("https://example.com/", Path),
            ("https://example.com/path", Path),
            ("https://example.com?x=1", Query),
            ("https://example.com#frag", Fragment),
            ("https://example.com/x?y#z", Path),
            ("https://", EmptyHost),
            ("https://:443", EmptyHost),
            ("https://example..com", EmptyLabel),
            ("https://.example.com", EmptyLabel),
            ("https://example.com..", EmptyLabel),
            ("https://.", EmptyLabel),
            ("https://example.com:", InvalidPort(String::new())),
            ("https://example.com:0", InvalidPort("0".into())),
            ("https://example.com:0443", InvalidPort("0443".into())),
            ("https://example.com:65536", InvalidPort("65536".into())),
            ("https://example.com:123456", InvalidPort("123456".into())),
            ("https://example.com:+443", InvalidCharacter('+')),
            ("https://example.com:44a", InvalidPort("44a".into())),
            ("https://example.com:1:2", InvalidIpv6),
            ("http://::1", InvalidIpv6),
            ("http://[::1", InvalidIpv6),
            ("http://[::1]x", InvalidIpv6),
            ("http://[fe80::1%25eth0]", InvalidCharacter('%')),
            ("http://[example.com]", InvalidIpv6),
            ("http://a[::1]", InvalidIpv6),
            ("https://exa mple.com", InvalidCharacter(' ')),
            (" https://example.com", InvalidCharacter(' ')),
            ("https://example.com\t", InvalidCharacter('\t')),
            ("https://example.com\r\nX: y", InvalidCharacter('\r')),
            ("https://example.com\\@evil.net", InvalidCharacter('\\')),
            ("https://ex%61mple.com", InvalidCharacter('%')),
            ("https://a.com, https://b.com", InvalidCharacter(' ')),
            ("https://a.com,https://b.com", Path),
            ("https://a.com,b.com", InvalidCharacter(',')),
            ("https://bücher.example", NonAscii),
            ("https://exаmple.com", NonAscii), // Cyrillic а
            ("https://*.example.com", MisplacedWildcard),
            ("https://127.1", InvalidIpv4),
            ("https://010.0.0.1", InvalidIpv4),
            ("https://256.0.0.1", InvalidIpv4),
            ("https://example.123", InvalidIpv4),
            ("https://0x7f.0.0.1", InvalidIpv4),
        ];
        for (input, expected) in cases {
            assert_eq!(&problem(input), expected, "{input:?}");
        }
        let long_label = format!("https://{}.com", "a".repeat(64));
        assert_eq!(problem(&long_label), LabelTooLong);
        let long_host = format!("https://{}com", "abcdefghi.".repeat(26));
        assert_eq!(problem(&long_host), HostTooLong);
        let huge = format!("https://{}", "a".repeat(1000));
        assert!(matches!(problem(&huge), TooLong { .. }));
    }

    #[test]
    fn errors_name_the_input_and_the_problem() {
        let e = Origin::parse("https://example.com/").err();
        let message = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("https://example.com/"), "{message}");
        assert!(message.contains("path"), "{message}");
        let long = format!("https://{}", "é".repeat(400));
        let e = Origin::parse(&long).err().map(|e| e.input.len());
        assert!(e.is_some_and(|len| len <= MAX_ECHO_LEN), "{e:?}");
    }

    #[test]
    fn exact_entries_match_exactly() {
        let p = policy(&["https://crm.example.com", "http://localhost:3000"]);
        for ok in [
            "https://crm.example.com",
            "https://crm.example.com:443",
            "HTTPS://CRM.EXAMPLE.COM",
            "https://crm.example.com.",
            "http://localhost:3000",
        ] {
            assert!(p.allows(ok), "{ok} should be allowed");
        }
        for refused in [
            "http://crm.example.com",
            "https://crm.example.com:8443",
            "https://x.crm.example.com",
            "https://example.com",
            "https://crm.example.co",
            "https://crm.example.com.attacker.net",
            "https://evilcrm.example.com",
            "http://localhost",
            "http://localhost:3001",
            "https://localhost:3000",
            "http://127.0.0.1:3000",
            "http://[::1]:3000",
            "https://crm.example.com/",
            "https://crm.example.com@attacker.net",
            "null",
            "",
        ] {
            assert!(!p.allows(refused), "{refused} should be refused");
        }
    }

    #[test]
    fn wildcard_entries_match_subdomains_by_components() {
        let p = policy(&["https://*.example.com"]);
        for ok in [
            "https://x.example.com",
            "https://a.b.c.example.com",
            "https://X.EXAMPLE.COM",
            "https://x.example.com:443",
            "https://x.example.com.",
            "https://x-y_z.example.com",
        ] {
            assert!(p.allows(ok), "{ok} should be allowed");
        }
        for refused in [
            "https://example.com",
            "https://example.com.",
            "http://x.example.com",
            "https://x.example.com:8443",
            "https://evil.example.com.attacker.net",
            "https://attackerexample.com",
            "https://x.attackerexample.com",
            "https://example.com.evil.net",
            "https://x.example.co",
            "https://x.example.comm",
            "https://xexample.com",
            "https://x.example.com/",
            "https://x.example.com@attacker.net",
            "https://attacker.net#.example.com",
            "https://attacker.net?.example.com",
            "https://attacker.net/.example.com",
            "https://attacker.net\\.example.com",
            "https://x.example.com%2eattacker.net",
            "https://*.example.com",
            "https://x..example.com",
            "https://.example.com",
        ] {
            assert!(!p.allows(refused), "{refused} should be refused");
        }
    }

    #[test]
    fn wildcard_ports_and_schemes_are_exact() {
        let p = policy(&[
            "http://*.example.com:8080",
            "https://*.dev.example.com:8443",
        ]);
        assert!(p.allows("http://a.example.com:8080"));
        assert!(!p.allows("http://a.example.com"));
        assert!(!p.allows("https://a.example.com:8080"));
        assert!(p.allows("https://x.dev.example.com:8443"));
        assert!(!p.allows("https://x.dev.example.com"));
        // `*.example.com:8080` is http only; the https entry covers dev.example.com's subdomains.
        assert!(!p.allows("https://dev.example.com:8443"));
    }

    #[test]
    fn punycode_hosts_match_only_in_punycode() {
        let p = policy(&[
            "https://xn--bcher-kva.example",
            "https://*.xn--mnchen-3ya.de",
        ]);
        assert!(p.allows("https://xn--bcher-kva.example"));
        assert!(p.allows("https://XN--BCHER-KVA.EXAMPLE"));
        assert!(!p.allows("https://bücher.example"));
        assert!(p.allows("https://shop.xn--mnchen-3ya.de"));
        assert!(!p.allows("https://shop.münchen.de"));
        assert_eq!(
            entry_problem("https://bücher.example"),
            OriginProblem::NonAscii
        );
    }

    #[test]
    fn address_entries() {
        let p = policy(&["http://127.0.0.1:8080", "http://[::1]:3000"]);
        assert!(p.allows("http://127.0.0.1:8080"));
        assert!(!p.allows("http://127.0.0.1"));
        assert!(!p.allows("http://127.1:8080"));
        assert!(!p.allows("http://127.0.0.1.nip.io:8080"));
        assert!(p.allows("http://[::1]:3000"));
        assert!(p.allows("http://[0::1]:3000"));
        assert!(!p.allows("http://[::2]:3000"));
        assert!(!p.allows("http://::1:3000"));
    }

    #[test]
    fn refuses_bad_entries() {
        use OriginProblem::*;
        for (entry, expected) in [
            ("https://*.com", WildcardTooBroad),
            ("https://*.", WildcardTooBroad),
            ("https://*", WildcardTooBroad),
            ("https://*.*.example.com", MisplacedWildcard),
            ("https://a.*.example.com", MisplacedWildcard),
            ("https://*example.com", MisplacedWildcard),
            ("https://ex*ample.com", MisplacedWildcard),
            ("https://*.0.0.1", WildcardOnAddress),
            ("https://*.example.com/", Path),
            ("https://*.example.com:0", InvalidPort("0".into())),
            ("https://*.example.com:*", InvalidPort("*".into())),
            ("*://example.com", UnsupportedScheme("*".into())),
            ("*", AnyOrigin),
            ("null", Null),
            ("example.com", MissingScheme),
        ] {
            assert_eq!(entry_problem(entry), expected, "{entry:?}");
        }
        // A single-label base is allowed for localhost only.
        let p = policy(&["http://*.localhost:3000"]);
        assert!(p.allows("http://app.localhost:3000"));
        assert!(!p.allows("http://localhost:3000"));
        // The error names the offending entry, not the first one.
        let e = OriginPolicy::parse(["https://ok.example.com", "https://bad.example.com/"]).err();
        assert_eq!(
            e.map(|e| e.input),
            Some("https://bad.example.com/".to_owned())
        );
    }

    #[test]
    fn empty_policy_allows_nothing_and_entries_round_trip() {
        let empty = policy(&[]);
        assert!(empty.is_empty());
        assert!(!empty.allows("https://example.com"));

        let p = policy(&[
            "https://*.example.com",
            "HTTPS://b.example.org:443",
            "http://a.example.org:8080",
            "https://*.example.com",
        ]);
        assert!(!p.is_empty());
        let entries = p.entries();
        assert_eq!(
            entries,
            vec![
                "http://a.example.org:8080",
                "https://b.example.org",
                "https://*.example.com",
            ]
        );
        assert_eq!(OriginPolicy::parse(&entries), Ok(p));
    }

    // ---- property tests ----

    /// Reference: a wildcard matches when the host's labels end with the base's labels and there
    /// is at least one more, compared as label lists.
    fn reference_wildcard(base: &[String], host: &[String]) -> bool {
        host.len() > base.len() && host[host.len() - base.len()..] == *base
    }

    fn label() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "ab", "example", "com", "x-1", "b_"])
            .prop_map(str::to_owned)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_and_malformed_is_refused(input in any::<String>()) {
            let p = policy(&["https://*.example.com", "http://localhost:3000"]);
            let allowed = p.allows(&input);
            if allowed {
                prop_assert!(Origin::parse(&input).is_ok());
            }
        }

        #[test]
        fn never_panics_on_origin_shaped_input(
            input in "(https?|HTTP|ftp)?(://)?[a-z0-9.*:@/?#\\[\\]%-]{0,40}"
        ) {
            let p = policy(&["https://*.example.com", "http://[::1]:3000"]);
            let _ = p.allows(&input);
            let _ = OriginPolicy::parse([input.as_str()]);
        }

        #[test]
        fn canonical_form_round_trips(
            labels in prop::collection::vec(label(), 1..5),
            https in any::<bool>(),
            port in prop::option::of(1u16..),
            upper in any::<bool>(),
            trailing_dot in any::<bool>(),
        ) {
            let scheme = if https { "https" } else { "http" };
            let mut host = labels.join(".");
            if upper {
                host = host.to_ascii_uppercase();
            }
            if trailing_dot {
                host.push('.');
            }
            let input = match port {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            };
            let origin = Origin::parse(&input).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let again = Origin::parse(&origin.to_string())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&again, &origin);
            prop_assert!(policy(&[input.as_str()]).allows(&origin.to_string()));
        }

        #[test]
        fn wildcard_matches_like_label_suffix(
            base in prop::collection::vec(label(), 2..4),
            host in prop::collection::vec(label(), 1..6),
            same_scheme in any::<bool>(),
            same_port in any::<bool>(),
        ) {
            let entry = format!("https://*.{}", base.join("."));
            let p = policy(&[entry.as_str()]);
            let scheme = if same_scheme { "https" } else { "http" };
            let port = if same_port { "" } else { ":8443" };
            let header = format!("{scheme}://{}{port}", host.join("."));
            let expected = same_scheme && same_port && reference_wildcard(&base, &host);
            prop_assert_eq!(p.allows(&header), expected, "{} vs {}", entry, header);
            // Whatever follows the base, nothing past it is ever matched.
            let smuggled = format!("https://{}.{}.attacker.net", host.join("."), base.join("."));
            prop_assert!(!p.allows(&smuggled));
        }
    }
}
