//! JSON documents re-laid out as text, without parsing their numbers: a payload's `1e400` or
//! `12345678901234567890123` stays as it was written (a round trip through `serde_json::Value`
//! would turn both into something else).
//!
//! Both functions take text that is already known to be one valid JSON document
//! ([`is_json`]); they only move whitespace.

/// Whether `bytes` are one valid JSON document (surrounding whitespace allowed).
pub fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// The document without whitespace between tokens: one line, as `serde_json::to_string` would
/// write it, numbers and strings exactly as they were.
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The document indented by two spaces per level, one member or element per line, with a space
/// after each `:`; empty objects and arrays stay `{}` and `[]`.
pub fn pretty(json: &str) -> String {
    let compact = compact(json);
    let mut out = String::with_capacity(compact.len() * 2);
    let mut depth = 0_usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = compact.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                if matches!(chars.peek(), Some('}' | ']')) {
                    // Empty: the closing bracket follows at once.
                    continue;
                }
                depth += 1;
                newline(&mut out, depth);
            }
            '}' | ']' => {
                if !matches!(out.chars().last(), Some('{' | '[')) {
                    depth = depth.saturating_sub(1);
                    newline(&mut out, depth);
                }
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_strings_and_numbers_as_written() {
        let json = " {\n  \"a b\" : [1 , 2.50, 1e400],\t\"s\": \"x \\\" { , y\",\n \"big\": 12345678901234567890123 }\n";
        assert!(is_json(json.as_bytes()));
        assert_eq!(
            compact(json),
            r#"{"a b":[1,2.50,1e400],"s":"x \" { , y","big":12345678901234567890123}"#
        );
        assert_eq!(compact("\"a\\\\\" "), "\"a\\\\\"");
    }

    #[test]
    fn pretty_indents_and_keeps_empty_containers() {
        assert_eq!(
            pretty(r#"{"id":42,"tags":["a","b,c"],"empty":{},"none":[],"n":{"x":null}}"#),
            "{\n  \"id\": 42,\n  \"tags\": [\n    \"a\",\n    \"b,c\"\n  ],\n  \"empty\": {},\n  \
             \"none\": [],\n  \"n\": {\n    \"x\": null\n  }\n}"
        );
        assert_eq!(pretty("7"), "7");
        assert_eq!(pretty(" \"a: b\" "), "\"a: b\"");
        // What pretty writes is the same document.
        let document = r#"{"a":[{"b":[]},{"c":"}"}],"d":-0.5e-3}"#;
        let back: serde_json::Value = serde_json::from_str(&pretty(document)).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(document).unwrap()
        );
    }

    #[test]
    fn only_valid_documents_are_json() {
        assert!(!is_json(b"{\"a\":1"));
        assert!(!is_json(b"1 2"));
        assert!(!is_json(b"hello"));
        assert!(is_json(b" \"hello\"\n"));
    }
}
