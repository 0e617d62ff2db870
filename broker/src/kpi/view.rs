//! A view's definition: which messages it reads, how it groups them, what it measures and over
//! which UTC windows — as a user writes it (JSON or TOML), checked before it enters the log.
//!
//! ```toml
//! name = "handle_time"
//! pattern = "telemetry.call.*.ended"
//! group_by = { segment = 2 }          # or { header = "queue" }, { json = "/queue" }
//! windows = ["1m", "15m", { length = "1d", keep = 30 }]
//! keep = 60                           # windows kept per length, unless the window says
//! max_groups = 100                    # past it, new groups go to the `other` bucket
//!
//! [[filters]]
//! field = { json = "/direction" }
//! equals = "inbound"
//!
//! [[measures]]
//! name = "duration_ms"
//! field = "/duration_ms"              # a JSON pointer to a number in the payload
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::channel::{ChannelLimits, Pattern};

/// Measures a view has at most.
pub(crate) const MAX_MEASURES: usize = 8;
/// Filters a view has at most.
pub(crate) const MAX_FILTERS: usize = 8;
/// Window lengths a view has at most.
pub(crate) const MAX_WINDOWS: usize = 6;
/// Groups a window keeps at most, whatever a view asks.
pub(crate) const MAX_GROUPS: u32 = 10_000;
/// Cells (window lengths × windows kept × groups, `other` included) a view may hold at most:
/// bounds its storage, the work of dropping it, and what a query reads.
pub(crate) const MAX_CELLS: u64 = 200_000;
/// Windows kept per length when neither the window nor the view says.
pub(crate) const DEFAULT_KEEP: u32 = 60;
/// Groups per window when the view does not say.
pub(crate) const DEFAULT_MAX_GROUPS: u32 = 100;

/// A view as defined by a user. See the module docs for its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ViewDefinition {
    /// Its name: 1–64 of `a-z`, `0-9`, `_`, `-`, `.`.
    pub(crate) name: String,
    /// The channels it reads.
    pub(crate) pattern: String,
    /// Messages count only when every filter holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) filters: Vec<Filter>,
    /// What splits its values into groups; none: one group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group_by: Option<Field>,
    /// Numbers it measures (besides counting messages, which every view does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) measures: Vec<Measure>,
    /// Its window lengths, each tumbling at UTC multiples of its length.
    pub(crate) windows: Vec<WindowSpec>,
    /// Windows kept per length unless the window says (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keep: Option<u32>,
    /// Groups per window (default 100); later groups go to `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_groups: Option<u32>,
}

/// Where a value comes from in a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Field {
    /// A header's value.
    Header(String),
    /// A channel segment, counted from 0 (`a.b.c`: 1 is `b`).
    Segment(u32),
    /// A JSON pointer into the payload (`/queue`, `/call/agent`): a string as it is, a number or
    /// a boolean as written in JSON.
    Json(String),
}

/// A condition on a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filter {
    /// What it looks at.
    pub(crate) field: Field,
    /// The value it must have (a missing field never equals anything).
    pub(crate) equals: String,
}

/// A number a view measures: count, sum, min, max and a quantile sketch of it per group and
/// window (average and quantiles are read from those).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Measure {
    /// Its name in answers: 1–64 of `a-z`, `0-9`, `_`, `-`, `.`.
    pub(crate) name: String,
    /// A JSON pointer to a number in the payload; a message where it is missing or not a number
    /// counts for the view but not for this measure.
    pub(crate) field: String,
}

/// A window length, with how many of its windows to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum WindowSpec {
    /// Just a length (`"5m"`), keeping the view's `keep`.
    Length(String),
    /// A length and its own number of windows kept.
    Kept {
        /// `"1m"`, `"1h"`, `"1d"`, ...
        length: String,
        /// Windows kept.
        keep: u32,
    },
}

/// A definition that cannot be a view, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ViewError {
    /// The text is not a definition at all (JSON or TOML syntax, unknown or missing fields).
    #[error("not a view definition: {0}")]
    Syntax(String),
    /// One of its values is out of bounds or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The definition's field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ViewError {
    ViewError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A checked view, ready to fold messages: the pattern parsed, the windows in seconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct View {
    /// The definition as checked.
    pub(crate) definition: ViewDefinition,
    /// Its pattern, parsed.
    pub(crate) pattern: Pattern,
    /// Its windows as (length in seconds, windows kept), in the order defined.
    pub(crate) windows: Vec<Window>,
    /// Groups per window.
    pub(crate) max_groups: u32,
    /// The top-level payload members its JSON fields read (pointer first segments, unescaped,
    /// each once): the fold reads a payload only as far as the matching views need.
    pub(crate) json_members: Vec<String>,
}

/// One window length of a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Length, seconds; divides a day, so windows start at UTC midnight and its multiples.
    pub(crate) length_s: u32,
    /// Windows of this length kept.
    pub(crate) keep: u32,
}

impl Window {
    /// The start (seconds since the epoch) of the window holding `time_s`.
    pub(crate) fn start_of(&self, time_s: u64) -> u64 {
        time_s - time_s % u64::from(self.length_s)
    }

    /// Windows starting before this are dropped once the window starting at `current` exists.
    pub(crate) fn oldest_kept(&self, current: u64) -> u64 {
        current.saturating_sub(u64::from(self.length_s) * u64::from(self.keep.saturating_sub(1)))
    }
}

impl ViewDefinition {
    /// Reads a definition from JSON (a text starting with `{`) or TOML, and checks it.
    ///
    /// # Errors
    /// [`ViewError`] saying what is wrong.
    pub(crate) fn parse(text: &str) -> Result<View, ViewError> {
        let definition: ViewDefinition = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| ViewError::Syntax(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| ViewError::Syntax(e.message().to_owned()))?
        };
        definition.check()
    }

    /// The definition as the log carries it (JSON; apply checks it again with [`Self::parse`]).
    pub(crate) fn to_json(&self) -> String {
        // A struct of strings, numbers and vectors always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks every bound, returning the view ready to fold.
    ///
    /// # Errors
    /// [`ViewError::Invalid`] naming the field.
    pub(crate) fn check(self) -> Result<View, ViewError> {
        check_name("name", &self.name)?;
        let pattern = Pattern::parse(&self.pattern, &ChannelLimits::default())
            .map_err(|e| invalid("pattern", e.to_string()))?;
        if !pattern.can_match() {
            return Err(invalid(
                "pattern",
                "matches no channel (a channel has at least two segments)",
            ));
        }
        if self.filters.len() > MAX_FILTERS {
            return Err(invalid("filters", format!("at most {MAX_FILTERS}")));
        }
        for filter in &self.filters {
            check_field("filters", &filter.field)?;
            // Values are cut to this length before they are compared (and grouped).
            if filter.equals.len() > super::fold::MAX_GROUP_BYTES {
                return Err(invalid("filters", "a value longer than 256 bytes"));
            }
        }
        if let Some(field) = &self.group_by {
            check_field("group_by", field)?;
        }
        if self.measures.len() > MAX_MEASURES {
            return Err(invalid("measures", format!("at most {MAX_MEASURES}")));
        }
        let mut names = BTreeMap::new();
        for measure in &self.measures {
            check_name("measures", &measure.name)?;
            check_pointer("measures", &measure.field)?;
            if names.insert(measure.name.as_str(), ()).is_some() {
                return Err(invalid(
                    "measures",
                    format!("`{}` named twice", measure.name),
                ));
            }
        }
        if self.windows.is_empty() || self.windows.len() > MAX_WINDOWS {
            return Err(invalid(
                "windows",
                format!("1 to {MAX_WINDOWS} window lengths"),
            ));
        }
        let default_keep = self.keep.unwrap_or(DEFAULT_KEEP);
        let mut windows = Vec::with_capacity(self.windows.len());
        for spec in &self.windows {
            let (length, keep) = match spec {
                WindowSpec::Length(length) => (length, default_keep),
                WindowSpec::Kept { length, keep } => (length, *keep),
            };
            let length_s = parse_length(length)?;
            if keep == 0 {
                return Err(invalid("windows", "keep at least one window"));
            }
            if windows.iter().any(|w: &Window| w.length_s == length_s) {
                return Err(invalid("windows", format!("`{length}` given twice")));
            }
            windows.push(Window { length_s, keep });
        }
        let max_groups = self.max_groups.unwrap_or(DEFAULT_MAX_GROUPS);
        if max_groups == 0 || max_groups > MAX_GROUPS {
            return Err(invalid("max_groups", format!("1 to {MAX_GROUPS}")));
        }
        // `other` and the missing group come on top of the named ones.
        let cells: u64 = windows
            .iter()
            .map(|w| u64::from(w.keep) * (u64::from(max_groups) + 2))
            .sum();
        if cells > MAX_CELLS {
            return Err(invalid(
                "windows",
                format!("keeps up to {cells} cells (windows × keep × groups); at most {MAX_CELLS}"),
            ));
        }
        let mut json_members: Vec<String> = Vec::new();
        let pointers = self
            .filters
            .iter()
            .map(|f| &f.field)
            .chain(&self.group_by)
            .filter_map(|field| match field {
                Field::Json(pointer) => Some(pointer.as_str()),
                Field::Header(_) | Field::Segment(_) => None,
            })
            .chain(self.measures.iter().map(|m| m.field.as_str()));
        for pointer in pointers {
            if let Some(member) = top_member(pointer) {
                if !json_members.contains(&member) {
                    json_members.push(member);
                }
            }
        }
        Ok(View {
            definition: self,
            pattern,
            windows,
            max_groups,
            json_members,
        })
    }
}

/// The top-level member a JSON pointer starts at (`/call/agent`: `call`), unescaped (`~1` is
/// `/`, `~0` is `~`); `None` for the pointer to the whole document (`""`).
pub(crate) fn top_member(pointer: &str) -> Option<String> {
    let rest = pointer.strip_prefix('/')?;
    let first = rest.split('/').next().unwrap_or(rest);
    Some(first.replace("~1", "/").replace("~0", "~"))
}

fn check_name(field: &'static str, name: &str) -> Result<(), ViewError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}`: 1–64 of a-z, 0-9, `_`, `-`, `.`"),
        ))
    }
}

fn check_field(field: &'static str, value: &Field) -> Result<(), ViewError> {
    match value {
        Field::Header(name) if name.is_empty() || name.len() > 256 => {
            Err(invalid(field, "a header name of 1–256 bytes"))
        }
        Field::Segment(index) if *index >= 16 => Err(invalid(field, "a segment index below 16")),
        Field::Json(pointer) => check_pointer(field, pointer),
        _ => Ok(()),
    }
}

fn check_pointer(field: &'static str, pointer: &str) -> Result<(), ViewError> {
    if pointer.is_empty() || !pointer.starts_with('/') || pointer.len() > 256 {
        return Err(invalid(
            field,
            format!("`{pointer}`: a JSON pointer such as `/queue` (1–256 bytes)"),
        ));
    }
    Ok(())
}

/// `"30s"`, `"1m"`, `"15m"`, `"1h"`, `"1d"`: a whole number of seconds, minutes, hours or days
/// that divides a day.
pub(crate) fn parse_length(text: &str) -> Result<u32, ViewError> {
    let bad = || {
        invalid(
            "windows",
            format!("`{text}`: a length such as 30s, 1m, 15m, 1h or 1d that divides a day"),
        )
    };
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let number: u32 = number.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let seconds = number.checked_mul(unit).ok_or_else(bad)?;
    if seconds == 0 || 86_400 % seconds != 0 {
        return Err(bad());
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
name = "handle_time"
pattern = "telemetry.call.*.ended"
group_by = { segment = 2 }
windows = ["1m", { length = "1d", keep = 30 }]
keep = 120

[[filters]]
field = { json = "/direction" }
equals = "inbound"

[[measures]]
name = "duration_ms"
field = "/duration_ms"
"#;

    #[test]
    fn a_toml_definition_reads_and_its_windows_are_in_seconds() {
        let view = ViewDefinition::parse(TOML).unwrap();
        assert_eq!(
            view.windows,
            vec![
                Window {
                    length_s: 60,
                    keep: 120
                },
                Window {
                    length_s: 86_400,
                    keep: 30
                }
            ]
        );
        assert_eq!(view.definition.group_by, Some(Field::Segment(2)));
        assert_eq!(view.max_groups, DEFAULT_MAX_GROUPS);
        // The JSON the log carries reads back to the same view.
        let again = ViewDefinition::parse(&view.definition.to_json()).unwrap();
        assert_eq!(again, view);
    }

    #[test]
    fn windows_start_at_utc_multiples_of_their_length() {
        let day = Window {
            length_s: 86_400,
            keep: 2,
        };
        // 2026-12-07T23:59:59Z and the next second.
        assert_eq!(day.start_of(1_796_687_999), 1_796_601_600);
        assert_eq!(day.start_of(1_796_688_000), 1_796_688_000);
        let minute = Window {
            length_s: 60,
            keep: 3,
        };
        assert_eq!(minute.start_of(125), 120);
        assert_eq!(minute.oldest_kept(600), 480);
        assert_eq!(minute.oldest_kept(60), 0);
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let field_of = |text: &str| match ViewDefinition::parse(text) {
            Err(ViewError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let base = r#"name = "v"
pattern = "a.b"
windows = ["1m"]
"#;
        assert!(ViewDefinition::parse(base).is_ok());
        assert_eq!(field_of(&base.replace("\"v\"", "\"V!\"")), "name");
        assert_eq!(field_of(&base.replace("a.b", "a..b")), "pattern");
        assert_eq!(field_of(&base.replace("a.b", "a")), "pattern");
        assert_eq!(
            field_of(&base.replace("1m", "7m")),
            "windows",
            "7m does not divide a day"
        );
        assert_eq!(field_of(&base.replace("1m", "0s")), "windows");
        assert_eq!(field_of(&base.replace("1m", "1w")), "windows");
        assert_eq!(field_of(&base.replace("[\"1m\"]", "[]")), "windows");
        assert_eq!(
            field_of(&base.replace("[\"1m\"]", "[\"1m\", \"60s\"]")),
            "windows"
        );
        assert_eq!(field_of(&format!("{base}max_groups = 0\n")), "max_groups");
        assert_eq!(
            field_of(&format!("{base}keep = 10000\nmax_groups = 10000\n")),
            "windows",
            "too many cells"
        );
        assert_eq!(
            field_of(&format!(
                "{base}[[measures]]\nname = \"x\"\nfield = \"x\"\n"
            )),
            "measures",
            "not a pointer"
        );
        assert!(matches!(
            ViewDefinition::parse(&format!("{base}colour = 1\n")),
            Err(ViewError::Syntax(_))
        ));
        assert!(matches!(
            ViewDefinition::parse("{\"name\": 1}"),
            Err(ViewError::Syntax(_))
        ));
    }
}
