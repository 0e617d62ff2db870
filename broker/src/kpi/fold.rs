//! Folding stored messages into the cells of the views that match them, inside apply.
//!
//! Uses only the message (its channel, headers, payload and leader-stamped publish time) and the
//! cells already stored, so every replica folds the same log into the same cells. A batch's cells
//! are read once, updated in memory and written once by [`Fold::write`]; windows that fell out of
//! a view's `keep` are removed then too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::RawValue;

use super::cell::{Cell, Group};
use super::view::{Field, View};
use super::CompiledViews;
use crate::error::BrokerError;
use crate::message::StoredMessage;
use crate::state::store::{MessageStore, WriteBatch};

/// Values (group names, and what filters compare) are cut to this many bytes (at a character
/// boundary).
pub(crate) const MAX_GROUP_BYTES: usize = 256;

/// The cells a batch of messages touches, before they are written.
pub(crate) struct Fold<'a> {
    store: &'a MessageStore,
    /// The views as of this point of the batch (a view write in it replaces them).
    views: Arc<CompiledViews>,
    /// Views defined again or dropped earlier in this batch: their stored cells are removed (in
    /// the batch, not yet in the store), so the store's are not read for them.
    cleared: HashSet<String>,
    /// Cells by key, as read from the store and updated. Hashed: every message looks up a cell
    /// per window, and in a B-tree each lookup compared long keys that share their view and
    /// window prefix several times (the top of W1k's profile). Sorted when written.
    cells: HashMap<Vec<u8>, Cell, foldhash::fast::RandomState>,
    /// Named groups per window (by the window's key prefix), once counted.
    named_groups: HashMap<Vec<u8>, u32>,
    /// The newest window start folded, per view name and window length.
    newest: BTreeMap<String, BTreeMap<u32, u64>>,
    /// Reused for the views matching a message.
    places: Vec<usize>,
    /// Reused for a cell's key.
    key: Vec<u8>,
    /// Reused for a message's measured values.
    values: Vec<Option<f64>>,
}

impl<'a> Fold<'a> {
    /// A fold into `views`, over the cells in `store`.
    pub(crate) fn new(store: &'a MessageStore, views: Arc<CompiledViews>) -> Fold<'a> {
        Fold {
            store,
            views,
            cleared: HashSet::new(),
            cells: HashMap::default(),
            named_groups: HashMap::new(),
            newest: BTreeMap::new(),
            places: Vec::new(),
            key: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Folds `message` into every view that matches it (or, with `only`, into that view alone).
    /// Returns whether some view counted it.
    ///
    /// # Errors
    /// The store's error, or a damaged cell.
    pub(crate) fn add(
        &mut self,
        message: &StoredMessage,
        only: Option<&str>,
    ) -> Result<bool, BrokerError> {
        if self.views.is_empty() {
            return Ok(false);
        }
        let views = Arc::clone(&self.views);
        let mut places = std::mem::take(&mut self.places);
        views.matching(&message.message.channel, &mut places);
        // The members the views folding this message read, each once.
        let mut wanted: Vec<&str> = Vec::new();
        for &place in &places {
            let view = &views.views[place];
            if only.is_some_and(|name| name != view.definition.name) {
                continue;
            }
            for member in &view.json_members {
                if !wanted.contains(&member.as_str()) {
                    wanted.push(member);
                }
            }
        }
        let mut payload = Payload::new(&wanted);
        let mut counted = false;
        for &place in &places {
            let view = &views.views[place];
            if only.is_some_and(|name| name != view.definition.name) {
                continue;
            }
            if self.fold_into(view, message, &mut payload)? {
                counted = true;
            }
        }
        self.places = places;
        Ok(counted)
    }

    fn fold_into<'m>(
        &mut self,
        view: &View,
        message: &'m StoredMessage,
        payload: &mut Payload<'m, '_>,
    ) -> Result<bool, BrokerError> {
        let definition = &view.definition;
        for filter in &definition.filters {
            if value_of(&filter.field, message, payload).as_deref() != Some(&filter.equals) {
                return Ok(false);
            }
        }
        let group = match &definition.group_by {
            None => None,
            Some(field) => value_of(field, message, payload),
        };
        let mut values = std::mem::take(&mut self.values);
        values.clear();
        values.extend(
            definition
                .measures
                .iter()
                .map(|m| number_at(&m.field, message, payload)),
        );
        let time_s = message.publish_time_us / 1_000_000;
        let mut key = std::mem::take(&mut self.key);
        for window in &view.windows {
            let start = window.start_of(time_s);
            match self.newest.get_mut(definition.name.as_str()) {
                Some(lengths) => {
                    let newest = lengths.entry(window.length_s).or_insert(start);
                    *newest = (*newest).max(start);
                }
                None => {
                    self.newest.insert(
                        definition.name.clone(),
                        BTreeMap::from([(window.length_s, start)]),
                    );
                }
            }
            key.clear();
            MessageStore::kpi_window_prefix_into(
                &mut key,
                &definition.name,
                window.length_s,
                start,
            );
            let prefix_len = key.len();
            push_group(&mut key, group.as_deref());
            if !self.cells.contains_key(key.as_slice()) {
                self.load_cell(&mut key, prefix_len, group.is_some(), view, values.len())?;
            }
            let Some(cell) = self.cells.get_mut(key.as_slice()) else {
                continue;
            };
            if cell.measures.len() < values.len() {
                cell.measures.resize(values.len(), Default::default());
            }
            cell.messages += 1;
            for (stats, value) in cell.measures.iter_mut().zip(&values) {
                if let Some(value) = value {
                    stats.add(*value);
                }
            }
        }
        self.key = key;
        self.values = values;
        Ok(true)
    }

    /// The cell the store holds under `key`: as the last entry left it in the cache, or read.
    fn stored_cell(&self, key: &[u8]) -> Result<Option<Cell>, BrokerError> {
        match self.store.take_cached_kpi_cell(key) {
            Some(cell) => Ok(Some(cell)),
            None => self.store.kpi_cell(key),
        }
    }

    /// Brings the cell at `key` (a window prefix of `prefix_len` bytes and a group) into the
    /// fold: the stored one, or a new one — unless it is a new named group the window has no
    /// room for, when `key` is turned into the window's [`Group::Other`] key (and that cell
    /// loaded).
    fn load_cell(
        &mut self,
        key: &mut Vec<u8>,
        prefix_len: usize,
        named: bool,
        view: &View,
        measures: usize,
    ) -> Result<(), BrokerError> {
        let cleared = self.cleared.contains(&view.definition.name);
        let stored = if cleared {
            None
        } else {
            self.stored_cell(key)?
        };
        if let Some(cell) = stored {
            self.cells.insert(key.clone(), cell);
            return Ok(());
        }
        if named {
            // A new named group in this window.
            let prefix = &key[..prefix_len];
            let count = match self.named_groups.get_mut(prefix) {
                Some(count) => count,
                None => {
                    let counted = if cleared {
                        // Its stored cells are gone with this batch; the ones folded since are
                        // in `cells`, counted as they came.
                        0
                    } else {
                        self.store.kpi_named_groups(prefix, view.max_groups)?
                    };
                    self.named_groups.entry(prefix.to_vec()).or_insert(counted)
                }
            };
            if *count >= view.max_groups {
                key.truncate(prefix_len);
                Group::Other.to_key(key);
                if !self.cells.contains_key(key.as_slice()) {
                    let other = if cleared {
                        None
                    } else {
                        self.stored_cell(key)?
                    };
                    self.cells
                        .insert(key.clone(), other.unwrap_or_else(|| Cell::new(measures)));
                }
                return Ok(());
            }
            *count += 1;
        }
        self.cells.insert(key.clone(), Cell::new(measures));
        Ok(())
    }

    /// Whether a view named `name` exists at this point of the batch.
    pub(crate) fn has_view(&self, name: &str) -> bool {
        self.views.views().iter().any(|v| v.definition.name == name)
    }

    /// Views at this point of the batch.
    pub(crate) fn view_count(&self) -> usize {
        self.views.views().len()
    }

    /// Defines view `name` as `view` (`None`: drops it) from this point of the batch: the cells
    /// it had, stored or folded so far, are removed (they were computed by another definition).
    ///
    /// # Errors
    /// The store's error.
    pub(crate) fn replace_view(
        &mut self,
        name: &str,
        view: Option<View>,
        batch: &mut WriteBatch,
    ) -> Result<(), BrokerError> {
        self.store.remove_kpi_cells(batch, name)?;
        let prefix = MessageStore::kpi_view_prefix(name);
        self.cells.retain(|key, _| !key.starts_with(&prefix));
        self.named_groups.retain(|key, _| !key.starts_with(&prefix));
        let mut views: Vec<View> = self
            .views
            .views()
            .iter()
            .filter(|v| v.definition.name != name)
            .cloned()
            .collect();
        views.extend(view);
        views.sort_by(|a, b| a.definition.name.cmp(&b.definition.name));
        self.views = Arc::new(CompiledViews::new(views));
        self.newest.remove(name);
        self.cleared.insert(name.to_owned());
        Ok(())
    }

    /// Adds the cells to `batch`, and the removal of the windows the newest ones pushed out of
    /// their view's `keep`.
    ///
    /// # Errors
    /// The store's error, or a cell that cannot be encoded.
    pub(crate) fn write(self, batch: &mut WriteBatch) -> Result<(), BrokerError> {
        for (name, lengths) in &self.newest {
            let Some(view) = self
                .views
                .views()
                .iter()
                .find(|v| &v.definition.name == name)
            else {
                continue;
            };
            for (length_s, newest) in lengths {
                if let Some(window) = view.windows.iter().find(|w| w.length_s == *length_s) {
                    self.store.remove_kpi_windows_before(
                        batch,
                        name,
                        *length_s,
                        window.oldest_kept(*newest),
                    )?;
                }
            }
        }
        // In key order, so every node writes the same batch whatever its hasher's seed.
        let mut cells: Vec<(Vec<u8>, Cell)> = self.cells.into_iter().collect();
        cells.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, cell) in cells {
            MessageStore::put_kpi_cell(batch, key, cell)?;
        }
        Ok(())
    }
}

/// A message's payload as JSON, read at most once and only when a view needs it, and only as far
/// as it needs: the members the matching views read ([`View::json_members`]) are kept as raw
/// text borrowed from the payload, every other member is skipped without being checked or
/// copied, and once all are found the rest of the payload is not read at all (a body's padding,
/// a blob, a context object no view looks at). The payload of a message with a JSON content type
/// was checked at the edge ([`crate::edge::validate::check_json`]), so stopping early cannot
/// take a damaged text for JSON; any other payload is read to its end first. When a member name
/// appears twice, the first counts.
struct Payload<'m, 'w> {
    /// The top-level members wanted.
    wanted: &'w [&'w str],
    read: Read<'m>,
}

enum Read<'m> {
    Unread,
    /// An object: the raw value of each wanted member, in `wanted`'s order.
    Object(Vec<Option<&'m RawValue>>),
    /// A payload that is JSON but not an object (pointers other than `""` then find nothing
    /// at the top, as `serde_json::Value::pointer` would not either, except into arrays).
    Other(serde_json::Value),
    NotJson,
}

impl<'m, 'w> Payload<'m, 'w> {
    fn new(wanted: &'w [&'w str]) -> Payload<'m, 'w> {
        Payload {
            wanted,
            read: Read::Unread,
        }
    }

    /// The raw JSON at `pointer` (RFC 6901), if there is one.
    fn at(&mut self, message: &'m StoredMessage, pointer: &str) -> Option<Located<'m>> {
        if let Read::Unread = self.read {
            self.read = read(message, self.wanted);
        }
        match &self.read {
            Read::Object(found) => {
                let rest = pointer.strip_prefix('/')?;
                let (first, deeper) = match rest.find('/') {
                    Some(at) => (&rest[..at], Some(&rest[at..])),
                    None => (rest, None),
                };
                let first = unescape(first);
                let place = self.wanted.iter().position(|w| *w == first)?;
                let raw = (*found.get(place)?)?;
                match deeper {
                    None => Some(Located::Raw(raw)),
                    Some(deeper) => {
                        let inner: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
                        inner.pointer(deeper).cloned().map(Located::Value)
                    }
                }
            }
            Read::Other(value) => value.pointer(pointer).cloned().map(Located::Value),
            Read::Unread | Read::NotJson => None,
        }
    }
}

/// Reads `message`'s payload for the members in `wanted`.
fn read<'m>(message: &'m StoredMessage, wanted: &[&str]) -> Read<'m> {
    let bytes: &'m [u8] = &message.message.payload;
    let mut scan = Scan {
        wanted,
        found: vec![None; wanted.len()],
        missing: wanted.len(),
        stop_early: crate::edge::validate::is_json(&message.message.content_type),
        stopped: false,
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let scanned = serde::Deserializer::deserialize_map(&mut deserializer, &mut scan)
        .and_then(|()| deserializer.end());
    if scanned.is_ok() || scan.stopped {
        return Read::Object(scan.found);
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(value) => Read::Other(value),
        Err(_) => Read::NotJson,
    }
}

/// Scans an object for the members in `wanted`.
struct Scan<'w, 'm> {
    wanted: &'w [&'w str],
    found: Vec<Option<&'m RawValue>>,
    /// Wanted members not found yet.
    missing: usize,
    /// Whether the scan may stop once none is missing (the payload is known to be JSON).
    stop_early: bool,
    /// Whether it did.
    stopped: bool,
}

/// The error a scan stops with once it has every member it wants (never seen outside [`read`]).
const SCAN_DONE: &str = "every wanted member found";

impl<'de> serde::de::Visitor<'de> for &mut Scan<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.stop_early && self.missing == 0 {
            self.stopped = true;
            return Err(serde::de::Error::custom(SCAN_DONE));
        }
        while let Some(name) = map.next_key::<Name<'de>>()? {
            match self.wanted.iter().position(|w| *w == name.0) {
                Some(place) if self.found[place].is_none() => {
                    self.found[place] = Some(map.next_value::<&'de RawValue>()?);
                    self.missing -= 1;
                    if self.stop_early && self.missing == 0 {
                        self.stopped = true;
                        return Err(serde::de::Error::custom(SCAN_DONE));
                    }
                }
                // Skipped unread when the payload is known to be JSON; otherwise checked (UTF-8
                // and all) as a member read would be, so a text that is not JSON stays missing.
                _ if self.stop_early => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                _ => {
                    map.next_value::<&'de RawValue>()?;
                }
            }
        }
        Ok(())
    }
}

/// A member name: borrowed when the payload holds it without escapes.
struct Name<'m>(std::borrow::Cow<'m, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(Name(name.into()))
            }
            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(Name(name.to_owned().into()))
            }
            fn visit_string<E>(self, name: String) -> Result<Self::Value, E> {
                Ok(Name(name.into()))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// A JSON value found in a payload: raw text, or (below the top level) parsed.
enum Located<'m> {
    Raw(&'m RawValue),
    Value(serde_json::Value),
}

/// A JSON pointer's segment as a member name (`~1` is `/`, `~0` is `~`).
fn unescape(segment: &str) -> std::borrow::Cow<'_, str> {
    if segment.as_bytes().contains(&b'~') {
        segment.replace("~1", "/").replace("~0", "~").into()
    } else {
        segment.into()
    }
}

/// A field's value in `message` as text: a header or a channel segment as it is; from the JSON
/// payload a string as it is, a number or a boolean as written in JSON, anything else missing.
/// Cut to [`MAX_GROUP_BYTES`].
fn value_of<'m>(
    field: &Field,
    message: &'m StoredMessage,
    payload: &mut Payload<'m, '_>,
) -> Option<std::borrow::Cow<'m, str>> {
    let mut text: std::borrow::Cow<'m, str> = match field {
        Field::Header(name) => message.message.headers.get(name)?.as_str().into(),
        Field::Segment(index) => message
            .message
            .channel
            .split('.')
            .nth(*index as usize)?
            .into(),
        Field::Json(pointer) => match payload.at(message, pointer)? {
            Located::Raw(raw) => match serde_json::from_str::<&'m str>(raw.get()) {
                // A string without escapes, borrowed.
                Ok(text) => text.into(),
                Err(_) => text_of(&serde_json::from_str(raw.get()).ok()?)?.into(),
            },
            Located::Value(value) => text_of(&value)?.into(),
        },
    };
    if text.len() > MAX_GROUP_BYTES {
        let mut owned = text.into_owned();
        truncate(&mut owned, MAX_GROUP_BYTES);
        text = owned.into();
    }
    Some(text)
}

fn text_of(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The number at `pointer` in the JSON payload; `None` when it is missing or not a number.
fn number_at<'m>(
    pointer: &str,
    message: &'m StoredMessage,
    payload: &mut Payload<'m, '_>,
) -> Option<f64> {
    match payload.at(message, pointer)? {
        Located::Raw(raw) => match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
            serde_json::Value::Number(n) => n.as_f64(),
            _ => None,
        },
        Located::Value(value) => value.as_f64(),
    }
}

/// A group's key bytes ([`Group::to_key`]) without making a [`Group`].
fn push_group(key: &mut Vec<u8>, group: Option<&str>) {
    match group {
        None => Group::Missing.to_key(key),
        Some(name) => {
            key.push(Group::named_tag());
            key.extend_from_slice(name.as_bytes());
        }
    }
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}
