//! Channel names, subscription patterns and the subscription trie that matches one against the
//! other.
//!
//! A *channel* is a dot-separated name such as `crm.contact.updated`: at least two segments, each
//! non-empty and made of `[A-Za-z0-9_-]`. The first segment may start with a single `$`, which marks
//! the broker's reserved namespace (`$state.contact.42`).
//!
//! A *pattern* is a channel in which any segment may be `*` (exactly one segment) and the last
//! segment may be `>` (one or more trailing segments). A pattern needs only one segment, so `>`
//! alone means "every channel". As in NATS, a wildcard in the first position never matches a
//! `$`-prefixed first segment: `>` and `*.x` do not see `$state.x`, but `$state.>` does.
//!
//! [`SubscriptionTrie`] stores values under patterns and finds every value whose pattern matches a
//! channel in time proportional to the channel's depth and the number of matches, independent of
//! the number of stored patterns.

use std::collections::HashMap;
use std::fmt;
use std::str::Split;

/// Separator between the segments of a channel or pattern.
const SEPARATOR: char = '.';
/// Marks the reserved broker namespace when it starts the first segment.
const RESERVED_PREFIX: char = '$';
/// Pattern segment matching exactly one channel segment.
const SINGLE_WILDCARD: &str = "*";
/// Pattern segment (last only) matching one or more trailing channel segments.
const TAIL_WILDCARD: &str = ">";
/// Minimum number of segments of a channel.
const MIN_CHANNEL_SEGMENTS: usize = 2;
/// Minimum number of segments of a pattern.
const MIN_PATTERN_SEGMENTS: usize = 1;

/// Size limits applied when validating channels and parsing patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimits {
    /// Maximum total length in bytes, separators included.
    pub max_len: usize,
    /// Maximum number of segments.
    pub max_depth: usize,
}

impl Default for ChannelLimits {
    /// 255 bytes and 16 segments.
    fn default() -> Self {
        Self {
            max_len: 255,
            max_depth: 16,
        }
    }
}

/// Why a channel name or subscription pattern was refused. Segment indices are zero-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The string is empty.
    #[error("channel or pattern is empty")]
    Empty,
    /// The string is longer than [`ChannelLimits::max_len`].
    #[error("channel or pattern is {len} bytes long, over the limit of {max} bytes")]
    TooLong {
        /// Length of the refused string in bytes.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The string has more segments than [`ChannelLimits::max_depth`].
    #[error("channel or pattern has {depth} segments, over the limit of {max}")]
    TooDeep {
        /// Number of segments of the refused string.
        depth: usize,
        /// The limit in force.
        max: usize,
    },
    /// The string has fewer segments than required (2 for a channel, 1 for a pattern).
    #[error("has {depth} segment(s) but needs at least {min} (segments are separated by `.`)")]
    TooFewSegments {
        /// Number of segments of the refused string.
        depth: usize,
        /// The minimum required.
        min: usize,
    },
    /// A segment is empty: a leading, trailing or doubled `.`.
    #[error("segment {index} is empty (leading, trailing or doubled `.`)")]
    EmptySegment {
        /// Index of the empty segment.
        index: usize,
    },
    /// A segment contains a character outside `[A-Za-z0-9_-]`.
    #[error(
        "segment {index} contains the invalid character {ch:?}; \
         allowed are A-Z, a-z, 0-9, `_` and `-`"
    )]
    InvalidCharacter {
        /// Index of the offending segment.
        index: usize,
        /// The offending character.
        ch: char,
    },
    /// The first segment is a `$` with nothing after it.
    #[error(
        "segment 0 is a bare `$`; the reserved prefix must be followed by at least one of \
         A-Z, a-z, 0-9, `_` or `-`"
    )]
    BareReservedPrefix,
    /// A segment other than the first starts with `$`.
    #[error("segment {index} starts with `$`, which may only start the first segment")]
    ReservedPrefixNotFirst {
        /// Index of the offending segment.
        index: usize,
    },
    /// A channel (as opposed to a pattern) contains `*` or `>`.
    #[error(
        "segment {index} contains a wildcard (`*` or `>`); wildcards are allowed in \
         subscription patterns, not in channels"
    )]
    WildcardNotAllowed {
        /// Index of the offending segment.
        index: usize,
    },
    /// A pattern has `>` before its last segment, or `*`/`>` mixed with other characters.
    #[error(
        "segment {index} misuses a wildcard: `*` and `>` must each be a whole segment, \
         and `>` may only be the last segment"
    )]
    MisplacedWildcard {
        /// Index of the offending segment.
        index: usize,
    },
}

/// Checks that `channel` is a valid channel name (no wildcards) within `limits`.
pub(crate) fn validate_channel(channel: &str, limits: &ChannelLimits) -> Result<(), ChannelError> {
    check(channel, limits, Grammar::Channel, |_| {})
}

/// Whether `channel` (or pattern) lies in the broker's reserved namespace, i.e. starts with `$`.
pub(crate) fn is_reserved(channel: &str) -> bool {
    channel.starts_with(RESERVED_PREFIX)
}

/// Which grammar [`check`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grammar {
    Channel,
    Pattern,
}

/// One parsed pattern segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    /// Matches exactly this channel segment.
    Literal(Box<str>),
    /// `*`: matches any one segment.
    Single,
    /// `>`: matches one or more trailing segments; always last.
    Tail,
}

/// Validates `s` against `grammar` and `limits`, calling `on_segment` for each segment in order.
fn check(
    s: &str,
    limits: &ChannelLimits,
    grammar: Grammar,
    mut on_segment: impl FnMut(SegmentKind<'_>),
) -> Result<(), ChannelError> {
    if s.is_empty() {
        return Err(ChannelError::Empty);
    }
    if s.len() > limits.max_len {
        return Err(ChannelError::TooLong {
            len: s.len(),
            max: limits.max_len,
        });
    }
    let depth = s.bytes().filter(|&b| b == SEPARATOR as u8).count() + 1;
    if depth > limits.max_depth {
        return Err(ChannelError::TooDeep {
            depth,
            max: limits.max_depth,
        });
    }
    let min = match grammar {
        Grammar::Channel => MIN_CHANNEL_SEGMENTS,
        Grammar::Pattern => MIN_PATTERN_SEGMENTS,
    };
    if depth < min {
        return Err(ChannelError::TooFewSegments { depth, min });
    }
    for (index, segment) in s.split(SEPARATOR).enumerate() {
        let kind = check_segment(segment, index, index + 1 == depth, grammar)?;
        on_segment(kind);
    }
    Ok(())
}

/// A validated segment, borrowed from the string being checked.
enum SegmentKind<'a> {
    Literal(&'a str),
    Single,
    Tail,
}

/// Whether `ch` may appear in a segment (after the optional leading `$` of the first one).
fn is_grammar_char(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || ch == '_' || ch == '-'
}

/// Validates one segment at position `index`.
fn check_segment(
    segment: &str,
    index: usize,
    is_last: bool,
    grammar: Grammar,
) -> Result<SegmentKind<'_>, ChannelError> {
    if segment.is_empty() {
        return Err(ChannelError::EmptySegment { index });
    }
    let wildcard_error = match grammar {
        Grammar::Channel => ChannelError::WildcardNotAllowed { index },
        Grammar::Pattern => ChannelError::MisplacedWildcard { index },
    };
    if segment == SINGLE_WILDCARD || segment == TAIL_WILDCARD {
        return match grammar {
            Grammar::Channel => Err(wildcard_error),
            Grammar::Pattern if segment == SINGLE_WILDCARD => Ok(SegmentKind::Single),
            Grammar::Pattern if is_last => Ok(SegmentKind::Tail),
            Grammar::Pattern => Err(wildcard_error),
        };
    }
    let body = match segment.strip_prefix(RESERVED_PREFIX) {
        Some("") if index == 0 => return Err(ChannelError::BareReservedPrefix),
        Some(rest) if index == 0 => rest,
        Some(_) => return Err(ChannelError::ReservedPrefixNotFirst { index }),
        None => segment,
    };
    match body.chars().find(|&ch| !is_grammar_char(ch)) {
        None => Ok(SegmentKind::Literal(segment)),
        Some('*' | '>') => Err(wildcard_error),
        Some(ch) => Err(ChannelError::InvalidCharacter { index, ch }),
    }
}

/// A parsed subscription pattern such as `crm.*.updated` or `$state.>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    /// The pattern as given.
    raw: Box<str>,
    /// The parsed segments; a [`Segment::Tail`] can only be last.
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses and validates `pattern` within `limits`.
    pub fn parse(pattern: &str, limits: &ChannelLimits) -> Result<Pattern, ChannelError> {
        let mut segments = Vec::new();
        check(pattern, limits, Grammar::Pattern, |kind| {
            segments.push(match kind {
                SegmentKind::Literal(s) => Segment::Literal(s.into()),
                SegmentKind::Single => Segment::Single,
                SegmentKind::Tail => Segment::Tail,
            });
        })?;
        Ok(Pattern {
            raw: pattern.into(),
            segments,
        })
    }

    /// The pattern as it was given to [`Pattern::parse`].
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether this pattern matches `channel`, which is assumed to be a valid channel.
    pub fn matches(&self, channel: &str) -> bool {
        let mut parts = channel.split(SEPARATOR);
        for (index, segment) in self.segments.iter().enumerate() {
            let Some(part) = parts.next() else {
                return false;
            };
            let hidden = index == 0 && is_reserved(part);
            match segment {
                Segment::Literal(literal) => {
                    if **literal != *part {
                        return false;
                    }
                }
                Segment::Single => {
                    if hidden {
                        return false;
                    }
                }
                // `part` is the first of the one-or-more segments `>` needs.
                Segment::Tail => return !hidden,
            }
        }
        parts.next().is_none()
    }

    /// How specific the pattern is, as a key that sorts the more specific pattern higher: its
    /// segments from the left, a literal above `*` above `>`, a longer pattern above its own
    /// prefix. Of two patterns matching the same channel, the one naming a segment literally where
    /// the other has a wildcard wins (`crm.contact.*` over `crm.*.updated` over `crm.>` over `>`).
    pub fn specificity(&self) -> Vec<u8> {
        self.segments
            .iter()
            .map(|segment| match segment {
                Segment::Literal(_) => 2,
                Segment::Single => 1,
                Segment::Tail => 0,
            })
            .collect()
    }

    /// Whether some channel can match it. Channels have at least two segments, so a pattern of
    /// one segment matches nothing unless it is `>` (every channel). The grammar accepts such a
    /// pattern (a grant naming one is harmless); a subscription refuses it rather than wait
    /// forever for nothing.
    pub fn can_match(&self) -> bool {
        self.segments.len() >= MIN_CHANNEL_SEGMENTS || self.segments == [Segment::Tail]
    }

    /// Whether the pattern has no wildcards, so it matches exactly one channel.
    pub fn is_exact(&self) -> bool {
        self.segments
            .iter()
            .all(|segment| matches!(segment, Segment::Literal(_)))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// One level of a [`SubscriptionTrie`]: everything below a given prefix of pattern segments.
#[derive(Debug, Clone)]
struct Node<T> {
    /// Children for literal segments.
    literals: HashMap<Box<str>, Node<T>>,
    /// Child for a `*` segment.
    single: Option<Box<Node<T>>>,
    /// Values of patterns that end with `>` right after this node's prefix.
    tail: Vec<T>,
    /// Values of patterns that end exactly at this node's prefix.
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            literals: HashMap::new(),
            single: None,
            tail: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    /// Whether the node holds nothing, so it can be pruned.
    fn is_empty(&self) -> bool {
        self.literals.is_empty()
            && self.single.is_none()
            && self.tail.is_empty()
            && self.values.is_empty()
    }

    /// Calls `f` on every value below this node whose pattern matches the remaining channel
    /// segments in `rest`; `first` says whether the next segment is the channel's first.
    fn visit<F: FnMut(&T)>(&self, mut rest: Split<'_, char>, first: bool, f: &mut F) {
        let Some(part) = rest.next() else {
            self.values.iter().for_each(&mut *f);
            return;
        };
        // Wildcards in the first position do not see the reserved namespace.
        let hidden = first && is_reserved(part);
        if !hidden {
            self.tail.iter().for_each(&mut *f);
        }
        if !self.literals.is_empty() {
            if let Some(child) = self.literals.get(part) {
                child.visit(rest.clone(), false, f);
            }
        }
        if !hidden {
            if let Some(child) = self.single.as_deref() {
                child.visit(rest, false, f);
            }
        }
    }
}

impl<T: PartialEq> Node<T> {
    /// Removes one occurrence of `value` stored under `segments` below this node, pruning children
    /// left empty. Returns whether a value was removed.
    fn remove(&mut self, segments: &[Segment], value: &T) -> bool {
        let Some((segment, rest)) = segments.split_first() else {
            return remove_one(&mut self.values, value);
        };
        match segment {
            Segment::Tail => remove_one(&mut self.tail, value),
            Segment::Single => {
                let Some(child) = self.single.as_deref_mut() else {
                    return false;
                };
                let removed = child.remove(rest, value);
                if child.is_empty() {
                    self.single = None;
                }
                removed
            }
            Segment::Literal(literal) => {
                let Some(child) = self.literals.get_mut(&**literal) else {
                    return false;
                };
                let removed = child.remove(rest, value);
                if child.is_empty() {
                    self.literals.remove(&**literal);
                }
                removed
            }
        }
    }
}

/// Removes the first element equal to `value` from `values`; returns whether there was one.
fn remove_one<T: PartialEq>(values: &mut Vec<T>, value: &T) -> bool {
    match values.iter().position(|v| v == value) {
        Some(position) => {
            values.remove(position);
            true
        }
        None => false,
    }
}

/// Maps patterns to values and finds every value whose pattern matches a channel in time
/// proportional to the channel's depth and the number of matches, not the number of patterns.
///
/// It is a trie over pattern segments, like NATS's sublist: each node has a child per literal
/// segment, an optional child for `*`, the values of patterns ending in `>` there, and the values
/// of patterns ending exactly there. The same value may be inserted several times, even under the
/// same pattern; each insertion is reported and removed separately.
#[derive(Debug, Clone)]
pub struct SubscriptionTrie<T> {
    /// The node for the empty prefix.
    root: Node<T>,
    /// Number of stored values.
    len: usize,
}

impl<T: PartialEq> SubscriptionTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }

    /// Stores `value` under `pattern`.
    pub fn insert(&mut self, pattern: &Pattern, value: T) {
        let mut node = &mut self.root;
        for segment in &pattern.segments {
            node = match segment {
                Segment::Literal(literal) => node.literals.entry(literal.clone()).or_default(),
                Segment::Single => node.single.get_or_insert_with(Box::default),
                Segment::Tail => {
                    node.tail.push(value);
                    self.len += 1;
                    return;
                }
            };
        }
        node.values.push(value);
        self.len += 1;
    }

    /// Removes one insertion of `value` under `pattern`, pruning nodes left empty. Returns whether
    /// such an insertion existed.
    pub fn remove(&mut self, pattern: &Pattern, value: &T) -> bool {
        let removed = self.root.remove(&pattern.segments, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` once per insertion whose pattern matches `channel` (assumed to be a valid
    /// channel). Does not allocate; recursion depth is bounded by the channel's depth.
    pub fn for_each_match(&self, channel: &str, mut f: impl FnMut(&T)) {
        self.root.visit(channel.split(SEPARATOR), true, &mut f);
    }

    /// Number of stored insertions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the trie holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: PartialEq> Default for SubscriptionTrie<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> ChannelLimits {
        ChannelLimits::default()
    }

    fn channel(s: &str) -> Result<(), ChannelError> {
        validate_channel(s, &limits())
    }

    fn pattern(s: &str) -> Pattern {
        Pattern::parse(s, &limits()).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn pattern_err(s: &str) -> ChannelError {
        match Pattern::parse(s, &limits()) {
            Ok(p) => panic!("{s:?} should be refused, parsed as {p:?}"),
            Err(e) => e,
        }
    }

    // ---- channel grammar ----

    #[test]
    fn accepts_valid_channels() {
        for ok in [
            "crm.contact.updated",
            "a.b",
            "A-Z_09.x",
            "$state.contact.42",
            "$s.x",
            "$_.-",
            "tenant-1.order_line.created",
        ] {
            assert_eq!(channel(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_empty_and_single_segment_channels() {
        assert_eq!(channel(""), Err(ChannelError::Empty));
        assert_eq!(
            channel("crm"),
            Err(ChannelError::TooFewSegments { depth: 1, min: 2 })
        );
        assert_eq!(
            channel("$state"),
            Err(ChannelError::TooFewSegments { depth: 1, min: 2 })
        );
    }

    #[test]
    fn refuses_empty_segments() {
        assert_eq!(channel(".a"), Err(ChannelError::EmptySegment { index: 0 }));
        assert_eq!(channel("a."), Err(ChannelError::EmptySegment { index: 1 }));
        assert_eq!(
            channel("a..b"),
            Err(ChannelError::EmptySegment { index: 1 })
        );
        assert_eq!(channel("."), Err(ChannelError::EmptySegment { index: 0 }));
    }

    #[test]
    fn refuses_invalid_characters() {
        assert_eq!(
            channel("a.b c"),
            Err(ChannelError::InvalidCharacter { index: 1, ch: ' ' })
        );
        assert_eq!(
            channel("a/b.c"),
            Err(ChannelError::InvalidCharacter { index: 0, ch: '/' })
        );
        assert_eq!(
            channel("a.é"),
            Err(ChannelError::InvalidCharacter { index: 1, ch: 'é' })
        );
        assert_eq!(
            channel("a.b$"),
            Err(ChannelError::InvalidCharacter { index: 1, ch: '$' })
        );
    }

    #[test]
    fn reserved_prefix_rules() {
        assert!(is_reserved("$state.x"));
        assert!(!is_reserved("state.x"));
        assert_eq!(channel("$.x"), Err(ChannelError::BareReservedPrefix));
        assert_eq!(
            channel("$$a.x"),
            Err(ChannelError::InvalidCharacter { index: 0, ch: '$' })
        );
        assert_eq!(
            channel("a.$b"),
            Err(ChannelError::ReservedPrefixNotFirst { index: 1 })
        );
        assert_eq!(
            channel("a$.b"),
            Err(ChannelError::InvalidCharacter { index: 0, ch: '$' })
        );
    }

    #[test]
    fn refuses_wildcards_in_channels() {
        assert_eq!(
            channel("a.*"),
            Err(ChannelError::WildcardNotAllowed { index: 1 })
        );
        assert_eq!(
            channel("a.>"),
            Err(ChannelError::WildcardNotAllowed { index: 1 })
        );
        assert_eq!(
            channel("a*.b"),
            Err(ChannelError::WildcardNotAllowed { index: 0 })
        );
        assert_eq!(
            channel("$*.b"),
            Err(ChannelError::WildcardNotAllowed { index: 0 })
        );
    }

    #[test]
    fn enforces_length_and_depth_limits() {
        let max_len = "a.".repeat(127) + "b"; // 255 bytes, 128 segments
        let tight = ChannelLimits {
            max_len: 255,
            max_depth: 200,
        };
        assert_eq!(validate_channel(&max_len, &tight), Ok(()));
        let too_long = max_len.clone() + "c";
        assert_eq!(
            validate_channel(&too_long, &tight),
            Err(ChannelError::TooLong { len: 256, max: 255 })
        );
        assert_eq!(
            channel(&max_len),
            Err(ChannelError::TooDeep {
                depth: 128,
                max: 16
            })
        );
        let sixteen = vec!["s"; 16].join(".");
        assert_eq!(channel(&sixteen), Ok(()));
        let seventeen = vec!["s"; 17].join(".");
        assert_eq!(
            channel(&seventeen),
            Err(ChannelError::TooDeep { depth: 17, max: 16 })
        );
        assert_eq!(
            Pattern::parse(&seventeen.replace('s', "*"), &limits()),
            Err(ChannelError::TooDeep { depth: 17, max: 16 })
        );
        let small = ChannelLimits {
            max_len: 4,
            max_depth: 2,
        };
        assert_eq!(
            Pattern::parse("ab.cd", &small),
            Err(ChannelError::TooLong { len: 5, max: 4 })
        );
        assert_eq!(
            Pattern::parse(
                "a.b.c",
                &ChannelLimits {
                    max_len: 10,
                    ..small
                }
            ),
            Err(ChannelError::TooDeep { depth: 3, max: 2 })
        );
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = ChannelError::InvalidCharacter { index: 2, ch: '#' };
        assert!(e.to_string().contains("segment 2"), "{e}");
        assert!(e.to_string().contains("'#'"), "{e}");
        let e = ChannelError::TooLong { len: 300, max: 255 };
        assert!(
            e.to_string().contains("300") && e.to_string().contains("255"),
            "{e}"
        );
        let e = ChannelError::MisplacedWildcard { index: 1 };
        assert!(e.to_string().contains("segment 1"), "{e}");
    }

    // ---- pattern grammar ----

    #[test]
    fn accepts_valid_patterns() {
        for ok in [
            ">",
            "*",
            "a",
            "a.>",
            "*.>",
            "a.*.c",
            "$state.>",
            "$state.*",
            "*.*.*",
            "crm.contact.42",
        ] {
            let p = pattern(ok);
            assert_eq!(p.as_str(), ok);
            assert_eq!(p.to_string(), ok);
        }
    }

    #[test]
    fn a_pattern_of_one_segment_other_than_the_tail_wildcard_can_match_nothing() {
        for some in [">", "a.>", "*.*", "$state.>", "a.b"] {
            assert!(pattern(some).can_match(), "{some}");
        }
        for none in ["*", "a", "$state"] {
            let p = pattern(none);
            assert!(!p.can_match(), "{none}");
            for channel in ["a.b", "a.b.c", "$state.x"] {
                assert!(!p.matches(channel), "{none} matched {channel}");
            }
        }
    }

    #[test]
    fn refuses_invalid_patterns() {
        assert_eq!(pattern_err(""), ChannelError::Empty);
        assert_eq!(
            pattern_err("a.>.b"),
            ChannelError::MisplacedWildcard { index: 1 }
        );
        assert_eq!(
            pattern_err(">.a"),
            ChannelError::MisplacedWildcard { index: 0 }
        );
        assert_eq!(
            pattern_err("a*.b"),
            ChannelError::MisplacedWildcard { index: 0 }
        );
        assert_eq!(
            pattern_err("a.b>"),
            ChannelError::MisplacedWildcard { index: 1 }
        );
        assert_eq!(
            pattern_err("a.**"),
            ChannelError::MisplacedWildcard { index: 1 }
        );
        assert_eq!(
            pattern_err("$*.a"),
            ChannelError::MisplacedWildcard { index: 0 }
        );
        assert_eq!(
            pattern_err("$>"),
            ChannelError::MisplacedWildcard { index: 0 }
        );
        assert_eq!(pattern_err("a..>"), ChannelError::EmptySegment { index: 1 });
        // The first offending segment is reported.
        assert_eq!(
            pattern_err("a.>."),
            ChannelError::MisplacedWildcard { index: 1 }
        );
        assert_eq!(pattern_err("a.*."), ChannelError::EmptySegment { index: 2 });
        assert_eq!(pattern_err("$"), ChannelError::BareReservedPrefix);
        assert_eq!(
            pattern_err("a.$b"),
            ChannelError::ReservedPrefixNotFirst { index: 1 }
        );
        assert_eq!(
            pattern_err("a.b!"),
            ChannelError::InvalidCharacter { index: 1, ch: '!' }
        );
    }

    #[test]
    fn is_exact_only_without_wildcards() {
        assert!(pattern("a.b").is_exact());
        assert!(pattern("$state.x").is_exact());
        assert!(!pattern("a.*").is_exact());
        assert!(!pattern("a.>").is_exact());
        assert!(!pattern(">").is_exact());
    }

    // ---- matching ----

    #[test]
    fn tail_wildcard_needs_at_least_one_segment() {
        let p = pattern("telemetry.>");
        assert!(!p.matches("telemetry"));
        assert!(p.matches("telemetry.a"));
        assert!(p.matches("telemetry.a.b"));
        assert!(!p.matches("telemetryx.a"));
        assert!(!p.matches("other.telemetry.a"));
    }

    #[test]
    fn single_wildcard_matches_exactly_one_segment() {
        let p = pattern("a.*.c");
        assert!(p.matches("a.b.c"));
        assert!(p.matches("a.x.c"));
        assert!(!p.matches("a.c"));
        assert!(!p.matches("a.b.b.c"));
        assert!(!p.matches("a.b.c.d"));
        assert!(pattern("*.*").matches("x.y"));
        assert!(!pattern("*.*").matches("x.y.z"));
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        let p = pattern("crm.contact.updated");
        assert!(p.matches("crm.contact.updated"));
        assert!(!p.matches("crm.contact"));
        assert!(!p.matches("crm.contact.updated.x"));
        assert!(!p.matches("crm.contact.created"));
    }

    #[test]
    fn leading_wildcards_do_not_see_reserved_channels() {
        assert!(pattern(">").matches("a.b"));
        assert!(!pattern(">").matches("$state.x"));
        assert!(!pattern("*.x").matches("$state.x"));
        assert!(!pattern("*.>").matches("$state.x"));
        assert!(pattern("$state.>").matches("$state.x"));
        assert!(pattern("$state.*").matches("$state.x"));
        assert!(pattern("$state.x").matches("$state.x"));
        assert!(!pattern("$state.>").matches("state.x"));

        let mut trie = SubscriptionTrie::new();
        for (i, p) in [">", "*.x", "*.>", "$state.>", "$state.*", "$state.x"]
            .into_iter()
            .enumerate()
        {
            trie.insert(&pattern(p), i);
        }
        let mut seen = Vec::new();
        trie.for_each_match("$state.x", |v| seen.push(*v));
        seen.sort_unstable();
        assert_eq!(seen, vec![3, 4, 5]);
        seen.clear();
        trie.for_each_match("state.x", |v| seen.push(*v));
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn trie_basics() {
        let mut trie = SubscriptionTrie::default();
        assert!(trie.is_empty());
        let tel = pattern("telemetry.>");
        trie.insert(&tel, "t");
        trie.insert(&pattern("telemetry.*"), "s");
        trie.insert(&pattern("telemetry.cpu"), "e");
        trie.insert(&tel, "t"); // second insertion, reported twice
        assert_eq!(trie.len(), 4);

        let collect = |trie: &SubscriptionTrie<&'static str>, ch: &str| -> Vec<&'static str> {
            let mut v = Vec::new();
            trie.for_each_match(ch, |x| v.push(*x));
            v.sort_unstable();
            v
        };
        assert_eq!(collect(&trie, "telemetry.cpu"), vec!["e", "s", "t", "t"]);
        assert_eq!(collect(&trie, "telemetry.cpu.0"), vec!["t", "t"]);
        assert_eq!(collect(&trie, "other.cpu"), Vec::<&str>::new());

        assert!(trie.remove(&tel, &"t"));
        assert_eq!(collect(&trie, "telemetry.cpu.0"), vec!["t"]);
        assert!(trie.remove(&tel, &"t"));
        assert!(!trie.remove(&tel, &"t"));
        assert!(!trie.remove(&pattern("nothing.here"), &"t"));
        assert!(!trie.remove(&pattern("telemetry.cpu"), &"x"));
        assert!(trie.remove(&pattern("telemetry.*"), &"s"));
        assert!(trie.remove(&pattern("telemetry.cpu"), &"e"));
        assert!(trie.is_empty());
        assert!(trie.root.is_empty(), "all nodes pruned: {:?}", trie.root);
    }

    // ---- property tests ----

    /// Reference matcher, written over segment slices independently of `Pattern::matches`.
    fn reference_matches(pattern: &[&str], channel: &[&str]) -> bool {
        fn go(p: &[&str], c: &[&str], first: bool) -> bool {
            match (p.split_first(), c.split_first()) {
                (None, None) => true,
                (Some((&">", _)), Some((&cs, _))) => !(first && cs.starts_with('$')),
                (Some((&"*", pr)), Some((&cs, cr))) => {
                    !(first && cs.starts_with('$')) && go(pr, cr, false)
                }
                (Some((&pw, pr)), Some((&cs, cr))) => pw == cs && go(pr, cr, false),
                _ => false,
            }
        }
        go(pattern, channel, true)
    }

    fn split(s: &str) -> Vec<&str> {
        s.split('.').collect()
    }

    fn channel_strategy() -> impl Strategy<Value = String> {
        let first = prop_oneof![
            4 => prop::sample::select(vec!["a", "b", "c"]),
            1 => prop::sample::select(vec!["$sys", "$a"]),
        ];
        let rest = prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=5);
        (first, rest).prop_map(|(f, r)| {
            let mut parts = vec![f];
            parts.extend(r);
            parts.join(".")
        })
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let first = prop_oneof![
            5 => prop::sample::select(vec!["a", "b", "c", "*"]),
            1 => prop::sample::select(vec!["$sys", "$a"]),
        ];
        let rest = prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "*"]), 0..=4);
        (first, rest, any::<bool>(), any::<bool>()).prop_map(|(f, r, tail, bare)| {
            if bare {
                // Sometimes a lone `>` or a pattern ending in `>` after one segment.
                return if tail {
                    ">".to_owned()
                } else {
                    format!("{f}.>")
                };
            }
            let mut parts = vec![f];
            parts.extend(r);
            if tail {
                parts.push(">");
            }
            parts.join(".")
        })
    }

    fn sorted_matches(trie: &SubscriptionTrie<usize>, channel: &str) -> Vec<usize> {
        let mut seen = Vec::new();
        trie.for_each_match(channel, |v| seen.push(*v));
        seen.sort_unstable();
        seen
    }

    /// Every node other than the root holds something, i.e. removal pruned properly.
    fn fully_pruned<T>(node: &Node<T>) -> bool {
        node.literals
            .values()
            .chain(node.single.as_deref())
            .all(|child| !child.is_empty() && fully_pruned(child))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, usize),
        Remove(usize, usize),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn trie_and_matches_agree_with_reference(
            patterns in prop::collection::vec(pattern_strategy(), 0..40),
            channels in prop::collection::vec(channel_strategy(), 1..20),
        ) {
            let parsed: Vec<Pattern> = patterns
                .iter()
                .map(|p| Pattern::parse(p, &limits()))
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut trie = SubscriptionTrie::new();
            for (i, p) in parsed.iter().enumerate() {
                trie.insert(p, i);
            }
            prop_assert_eq!(trie.len(), parsed.len());
            for ch in &channels {
                prop_assert_eq!(validate_channel(ch, &limits()), Ok(()));
                let expected: Vec<usize> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| reference_matches(&split(p), &split(ch)))
                    .map(|(i, _)| i)
                    .collect();
                for (i, p) in parsed.iter().enumerate() {
                    prop_assert_eq!(
                        p.matches(ch),
                        expected.contains(&i),
                        "pattern {} vs channel {}", p, ch
                    );
                }
                prop_assert_eq!(sorted_matches(&trie, ch), expected, "channel {}", ch);
            }
        }

        #[test]
        fn insert_remove_sequences_match_vec_reference(
            pool in prop::collection::vec(pattern_strategy(), 1..8),
            ops in prop::collection::vec(
                prop_oneof![
                    (0usize..8, 0usize..4).prop_map(|(p, v)| Op::Insert(p, v)),
                    (0usize..8, 0usize..4).prop_map(|(p, v)| Op::Remove(p, v)),
                ],
                0..60,
            ),
            channels in prop::collection::vec(channel_strategy(), 1..10),
        ) {
            let pool: Vec<Pattern> = pool.iter().map(|p| pattern(p)).collect();
            let mut trie = SubscriptionTrie::new();
            let mut reference: Vec<(usize, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(p, v) => {
                        let p = p % pool.len();
                        trie.insert(&pool[p], v);
                        reference.push((p, v));
                    }
                    Op::Remove(p, v) => {
                        let p = p % pool.len();
                        // Equal pattern strings are the same trie key, so compare by string.
                        let found = reference
                            .iter()
                            .position(|&(q, w)| w == v && pool[q] == pool[p]);
                        if let Some(i) = found {
                            reference.remove(i);
                        }
                        prop_assert_eq!(trie.remove(&pool[p], &v), found.is_some());
                    }
                }
                prop_assert_eq!(trie.len(), reference.len());
                prop_assert_eq!(trie.is_empty(), reference.is_empty());
                prop_assert!(fully_pruned(&trie.root));
            }
            for ch in &channels {
                let mut expected: Vec<usize> = reference
                    .iter()
                    .filter(|&&(p, _)| reference_matches(&split(pool[p].as_str()), &split(ch)))
                    .map(|&(_, v)| v)
                    .collect();
                expected.sort_unstable();
                prop_assert_eq!(sorted_matches(&trie, ch), expected, "channel {}", ch);
            }
            for (p, v) in reference.drain(..) {
                prop_assert!(trie.remove(&pool[p], &v));
            }
            prop_assert!(trie.is_empty());
            prop_assert!(trie.root.is_empty());
        }
    }
}
