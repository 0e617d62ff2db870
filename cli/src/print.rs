//! Where `sb`'s answers go and in which form, chosen once by `--output`:
//!
//! - `json` (the default): one JSON object per line, as [`crate::output`] writes them;
//! - `text`: for people — a delivery as a heading, its headers and its payload (JSON indented),
//!   anything else as aligned `name  value` rows, records apart by a blank line;
//! - `raw`: a delivery's payload bytes and a newline, nothing else (as `nats sub --raw`); gaps go
//!   to stderr, and commands that print no payloads print their JSON lines.
//!
//! The mode is process-wide (set once in `main`, read here) rather than passed to every command:
//! `sb` prints from many places and runs one command per process.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::Value;
use switchboard_client::{Gap, GapReason, Message};

use crate::json_text;
use crate::output;

/// The forms `--output` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputMode {
    /// One JSON object per line; JSON payloads as JSON, not as strings.
    #[default]
    Json,
    /// A readable form for people.
    Text,
    /// Payload bytes only (subscribe, history), one newline after each.
    Raw,
}

static MODE: OnceLock<OutputMode> = OnceLock::new();

/// Whether a text record was printed already (the next one is set apart by a blank line).
static PRINTED: AtomicBool = AtomicBool::new(false);

/// Chooses the form of everything printed after it; the first call wins.
pub fn set_mode(mode: OutputMode) {
    let _ = MODE.set(mode);
}

fn mode() -> OutputMode {
    MODE.get().copied().unwrap_or_default()
}

/// Writes `bytes` to stdout as they are, whatever the mode (a completion script).
pub fn raw_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    write_stdout(bytes)
}

/// Writes `bytes` to stdout and flushes, so a reader on a pipe sees them at once.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()?;
    Ok(())
}

/// A record other than a delivery or a gap (an ack, info, an entity, a consumer, ...), given as
/// its JSON line.
pub fn record(json_line: &str) -> anyhow::Result<()> {
    match mode() {
        OutputMode::Json | OutputMode::Raw => write_stdout(format!("{json_line}\n").as_bytes()),
        OutputMode::Text => {
            let value: Node = serde_json::from_str(json_line)?;
            let separator = if PRINTED.swap(true, Ordering::Relaxed) {
                "\n"
            } else {
                ""
            };
            write_stdout(format!("{separator}{}", text_record(&value)).as_bytes())
        }
    }
}

/// A record with a form of its own for people (a KPI table): `json_line` in the json and raw
/// modes, `text` (ending with a newline) in the text mode, set apart like any text record.
pub fn record_with_text(json_line: &str, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    match mode() {
        OutputMode::Json | OutputMode::Raw => write_stdout(format!("{json_line}\n").as_bytes()),
        OutputMode::Text => {
            let separator = if PRINTED.swap(true, Ordering::Relaxed) {
                "\n"
            } else {
                ""
            };
            write_stdout(format!("{separator}{}", visible(&text())).as_bytes())
        }
    }
}

/// A delivered or stored message.
pub fn message(message: &Message) -> anyhow::Result<()> {
    match mode() {
        OutputMode::Json => {
            write_stdout(format!("{}\n", output::message_line(message)?).as_bytes())
        }
        OutputMode::Text => write_stdout(text_message(message).as_bytes()),
        OutputMode::Raw => {
            let mut bytes = Vec::with_capacity(message.payload.len() + 1);
            bytes.extend_from_slice(&message.payload);
            bytes.push(b'\n');
            write_stdout(&bytes)
        }
    }
}

/// A gap in a subscription: a JSON line, a text line, or (raw) a line on stderr, so that stdout
/// holds payloads only.
pub fn gap(gap: &Gap) -> anyhow::Result<()> {
    match mode() {
        OutputMode::Json => write_stdout(format!("{}\n", output::gap_line(gap)?).as_bytes()),
        OutputMode::Text => write_stdout(format!("{}\n\n", text_gap(gap)).as_bytes()),
        OutputMode::Raw => {
            eprintln!("sb: {}", text_gap(gap));
            Ok(())
        }
    }
}

fn text_gap(gap: &Gap) -> String {
    let why = match GapReason::try_from(gap.reason) {
        Ok(GapReason::Dropped) => "dropped (drop-oldest, too far behind)",
        Ok(GapReason::Retention) => "removed by retention before they were read",
        Ok(GapReason::Unspecified) | Err(_) => "not delivered",
    };
    format!(
        "[gap] offsets {}..{}: {} message(s) {why}",
        gap.from_offset, gap.to_offset, gap.count
    )
}

/// `[OFFSET] CHANNEL  TIME  (details)`, then `name: value` per header, then the payload (JSON
/// indented, other text as is, binary as base64), then a blank line.
fn text_message(message: &Message) -> String {
    let time = message
        .publish_time
        .as_ref()
        .and_then(output::format_timestamp)
        .unwrap_or_default();
    let mut details = Vec::new();
    if message.skipped > 0 {
        details.push(format!("skipped {}", message.skipped));
    }
    if message.redelivery > 0 {
        details.push(format!("redelivery {}", message.redelivery));
    }
    if message.hops > 0 {
        details.push(format!("hops {}", message.hops));
    }
    if let Some(expires) = message
        .expires_at
        .as_ref()
        .and_then(output::format_timestamp)
    {
        details.push(format!("expires {expires}"));
    }
    if message.ephemeral {
        details.push("ephemeral".to_owned());
    }
    if !output::is_json_content_type(&message.content_type) {
        details.push(message.content_type.clone());
    }
    let mut text = format!("[{}] {}  {time}", message.offset, message.channel);
    if !details.is_empty() {
        text.push_str(&format!("  ({})", details.join(", ")));
    }
    text.push('\n');
    for (name, value) in &message.headers {
        text.push_str(&format!("{name}: {value}\n"));
    }
    let payload = match std::str::from_utf8(&message.payload) {
        Ok(json)
            if output::is_json_content_type(&message.content_type)
                && json_text::is_json(json.as_bytes()) =>
        {
            json_text::pretty(json)
        }
        Ok(text) => text.trim_end_matches('\n').to_owned(),
        Err(_) => format!(
            "<{} bytes, base64: {}>",
            message.payload.len(),
            base64::engine::general_purpose::STANDARD.encode(&message.payload)
        ),
    };
    text.push_str(&payload);
    text.push_str("\n\n");
    visible(&text)
}

/// A JSON value with its objects' members in the order they were written (`serde_json::Value`
/// sorts them by name unless the crate is built with `preserve_order`).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    /// A number or a boolean, as JSON text.
    Scalar(String),
    String(String),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Scalar(Value::from(v).to_string()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::String(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Node>()? {
                    members.push(member);
                }
                Ok(Node::Object(members))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Node {
    fn is_compound(&self) -> bool {
        matches!(self, Node::Array(_) | Node::Object(_))
    }

    /// Compact JSON.
    fn json(&self) -> String {
        match self {
            Node::Null => "null".to_owned(),
            Node::Scalar(text) => text.clone(),
            Node::String(text) => Value::from(text.as_str()).to_string(),
            Node::Array(items) => format!(
                "[{}]",
                items.iter().map(Node::json).collect::<Vec<_>>().join(",")
            ),
            Node::Object(members) => format!(
                "{{{}}}",
                members
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v.json()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// On one line: strings without quotes, `-` for null or an empty string, an array of scalars joined by `, `,
    /// anything deeper as compact JSON.
    fn inline(&self) -> String {
        match self {
            Node::Null => "-".to_owned(),
            Node::String(text) if text.is_empty() => "-".to_owned(),
            Node::Scalar(text) | Node::String(text) => text.clone(),
            Node::Array(items) if !items.iter().any(Node::is_compound) => items
                .iter()
                .map(Node::inline)
                .collect::<Vec<_>>()
                .join(", "),
            other => other.json(),
        }
    }

    /// An object's members as `key=value` pairs on one line.
    fn inline_fields(&self) -> String {
        match self {
            Node::Object(members) => members
                .iter()
                .map(|(key, value)| format!("{key}={}", value.inline()))
                .collect::<Vec<_>>()
                .join(" "),
            other => other.inline(),
        }
    }
}

/// A JSON object as aligned rows: `name  value` for each member; a nested object's members as
/// `name.member  value`; an array of objects as one row per element (`name[i]  k=v k=v`).
fn text_record(value: &Node) -> String {
    let Node::Object(members) = value else {
        return format!("{}\n", visible(&value.inline()));
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for (name, member) in members {
        match member {
            Node::Object(inner) if !inner.is_empty() => {
                for (key, value) in inner {
                    rows.push((format!("{name}.{key}"), value.inline()));
                }
            }
            Node::Array(items) if items.iter().any(|i| matches!(i, Node::Object(_))) => {
                for (i, item) in items.iter().enumerate() {
                    rows.push((format!("{name}[{i}]"), item.inline_fields()));
                }
            }
            other => rows.push((name.clone(), other.inline())),
        }
    }
    let width = rows
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (name, value) in rows {
        text.push_str(&format!("{name:<width$}  {value}\n"));
    }
    visible(&text)
}

/// `text` with control characters other than newline and tab shown as `\u{..}`, so that what
/// others published cannot move the cursor or recolour the terminal.
fn visible(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(payload: &'static [u8], content_type: &str) -> Message {
        Message {
            offset: 7,
            channel: "crm.contact.updated".to_owned(),
            publish_time: Some(prost_types::Timestamp {
                seconds: 1_714_564_800,
                nanos: 0,
            }),
            payload: Bytes::from_static(payload),
            content_type: content_type.to_owned(),
            schema_version: "1.0.0".to_owned(),
            correlation_id: "c-1".to_owned(),
            headers: [("source".to_owned(), "tour".to_owned())]
                .into_iter()
                .collect(),
            ..Message::default()
        }
    }

    #[test]
    fn a_json_delivery_as_text() {
        let mut conflated = message(br#"{"id":42,"tags":["a"]}"#, "application/json");
        conflated.skipped = 2;
        assert_eq!(
            text_message(&conflated),
            "[7] crm.contact.updated  2024-05-01T12:00:00.000Z  (skipped 2)\n\
             source: tour\n\
             {\n  \"id\": 42,\n  \"tags\": [\n    \"a\"\n  ]\n}\n\n"
        );
    }

    #[test]
    fn text_and_binary_deliveries_as_text() {
        let plain = text_message(&message(b"hello\x1b[31m\n", "text/plain"));
        assert_eq!(
            plain,
            "[7] crm.contact.updated  2024-05-01T12:00:00.000Z  (text/plain)\n\
             source: tour\n\
             hello\\u{1b}[31m\n\n"
        );
        let binary = text_message(&message(&[0xff, 0x00, 0x01], "application/octet-stream"));
        assert!(binary.ends_with("<3 bytes, base64: /wAB>\n\n"), "{binary}");
    }

    fn node(json: &str) -> Node {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn records_as_aligned_rows_in_their_order() {
        let entity = node(
            r#"{"type":"contact","id":"42","version":2,"deleted":false,
                "fields":{"name":"Ada","tags":["a","b"]},"updated_at":null}"#,
        );
        assert_eq!(
            text_record(&entity),
            "type         contact\n\
             id           42\n\
             version      2\n\
             deleted      false\n\
             fields.name  Ada\n\
             fields.tags  a, b\n\
             updated_at   -\n"
        );
        let cluster =
            node(r#"{"leader_id":1,"nodes":[{"id":1,"role":"leader"},{"id":2,"role":"voter"}]}"#);
        assert_eq!(
            text_record(&cluster),
            "leader_id  1\nnodes[0]   id=1 role=leader\nnodes[1]   id=2 role=voter\n"
        );
        assert_eq!(text_record(&node(r#"{"fields":{}}"#)), "fields  {}\n");
        let deep = node(r#"{"document":{"properties":{"id":{"type":"integer"}},"x":1.5}}"#);
        assert_eq!(
            text_record(&deep),
            "document.properties  {\"id\":{\"type\":\"integer\"}}\ndocument.x           1.5\n"
        );
    }

    #[test]
    fn gaps_as_text() {
        let gap = Gap {
            from_offset: 10,
            to_offset: 19,
            count: 7,
            reason: GapReason::Dropped as i32,
        };
        assert_eq!(
            text_gap(&gap),
            "[gap] offsets 10..19: 7 message(s) dropped (drop-oldest, too far behind)"
        );
    }
}
