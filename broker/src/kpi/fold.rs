//! Folding stored messages into the cells of the views that match them, inside apply.
//!
//! Uses only the message (its channel, headers, payload and leader-stamped publish time) and the
//! cells already stored, so every replica folds the same log into the same cells. A batch's cells
//! are read once, updated in memory and written once by [`Fold::write`]; windows that fell out of
//! a view's `keep` are removed then too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::cell::{Cell, Group};
use super::view::{Field, View};
use super::CompiledViews;
use crate::error::BrokerError;
use crate::message::StoredMessage;
use crate::state::store::{MessageStore, WriteBatch};

/// Group names are cut to this many bytes (at a character boundary).
pub(crate) const MAX_GROUP_BYTES: usize = 256;

/// The cells a batch of messages touches, before they are written.
pub(crate) struct Fold<'a> {
    store: &'a MessageStore,
    /// The views as of this point of the batch (a view write in it replaces them).
    views: Arc<CompiledViews>,
    /// Views defined again or dropped earlier in this batch: their stored cells are removed (in
    /// the batch, not yet in the store), so the store's are not read for them.
    cleared: HashSet<String>,
    /// Cells by key, as read from the store and updated.
    cells: BTreeMap<Vec<u8>, Cell>,
    /// Named groups per window (by the window's key prefix), once counted.
    named_groups: HashMap<Vec<u8>, u32>,
    /// The newest window start folded, per (view name, window length).
    newest: BTreeMap<(String, u32), u64>,
    /// Reused for the views matching a message.
    places: Vec<usize>,
}

impl<'a> Fold<'a> {
    /// A fold into `views`, over the cells in `store`.
    pub(crate) fn new(store: &'a MessageStore, views: Arc<CompiledViews>) -> Fold<'a> {
        Fold {
            store,
            views,
            cleared: HashSet::new(),
            cells: BTreeMap::new(),
            named_groups: HashMap::new(),
            newest: BTreeMap::new(),
            places: Vec::new(),
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
        let mut payload = Payload::Unread;
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

    fn fold_into(
        &mut self,
        view: &View,
        message: &StoredMessage,
        payload: &mut Payload,
    ) -> Result<bool, BrokerError> {
        let definition = &view.definition;
        for filter in &definition.filters {
            if value_of(&filter.field, message, payload).as_deref() != Some(&filter.equals) {
                return Ok(false);
            }
        }
        let group = match &definition.group_by {
            None => Group::Missing,
            Some(field) => match value_of(field, message, payload) {
                Some(mut name) => {
                    truncate(&mut name, MAX_GROUP_BYTES);
                    Group::Named(name)
                }
                None => Group::Missing,
            },
        };
        let values: Vec<Option<f64>> = definition
            .measures
            .iter()
            .map(|m| number_at(&m.field, message, payload))
            .collect();
        let time_s = message.publish_time_us / 1_000_000;
        for window in &view.windows {
            let start = window.start_of(time_s);
            let newest = self
                .newest
                .entry((definition.name.clone(), window.length_s))
                .or_insert(start);
            *newest = (*newest).max(start);
            let prefix = MessageStore::kpi_window_prefix(&definition.name, window.length_s, start);
            let key = self.cell_key(&prefix, &group, view)?;
            let cell = match self.cells.entry(key) {
                std::collections::btree_map::Entry::Occupied(cell) => cell.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let stored = if self.cleared.contains(&definition.name) {
                        None
                    } else {
                        self.store.kpi_cell(slot.key())?
                    };
                    slot.insert(stored.unwrap_or_else(|| Cell::new(values.len())))
                }
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
        Ok(true)
    }

    /// The key of `group`'s cell in the window at `prefix`: a named group the window has no
    /// room for goes to [`Group::Other`].
    fn cell_key(
        &mut self,
        prefix: &[u8],
        group: &Group,
        view: &View,
    ) -> Result<Vec<u8>, BrokerError> {
        let mut key = prefix.to_vec();
        group.to_key(&mut key);
        if !matches!(group, Group::Named(_)) || self.cells.contains_key(&key) {
            return Ok(key);
        }
        let cleared = self.cleared.contains(&view.definition.name);
        if !cleared && self.store.kpi_cell(&key)?.is_some() {
            return Ok(key);
        }
        // A new named group in this window.
        let max_groups = view.max_groups;
        let named = match self.named_groups.get_mut(prefix) {
            Some(named) => named,
            None => {
                let counted = if cleared {
                    // Its stored cells are gone with this batch; the ones folded since are in
                    // `cells`, counted as they came.
                    0
                } else {
                    self.store.kpi_named_groups(prefix, max_groups)?
                };
                self.named_groups.entry(prefix.to_vec()).or_insert(counted)
            }
        };
        if *named >= max_groups {
            let mut other = prefix.to_vec();
            Group::Other.to_key(&mut other);
            return Ok(other);
        }
        *named += 1;
        Ok(key)
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
        self.newest.retain(|(view, _), _| view != name);
        self.cleared.insert(name.to_owned());
        Ok(())
    }

    /// Adds the cells to `batch`, and the removal of the windows the newest ones pushed out of
    /// their view's `keep`.
    ///
    /// # Errors
    /// The store's error, or a cell that cannot be encoded.
    pub(crate) fn write(self, batch: &mut WriteBatch) -> Result<(), BrokerError> {
        for ((name, length_s), newest) in &self.newest {
            let window = self
                .views
                .views()
                .iter()
                .find(|v| &v.definition.name == name)
                .and_then(|v| v.windows.iter().find(|w| w.length_s == *length_s));
            if let Some(window) = window {
                self.store.remove_kpi_windows_before(
                    batch,
                    name,
                    *length_s,
                    window.oldest_kept(*newest),
                )?;
            }
        }
        for (key, cell) in &self.cells {
            MessageStore::put_kpi_cell(batch, key, cell)?;
        }
        Ok(())
    }
}

/// A message's payload as JSON, parsed at most once, and only when a view needs it.
enum Payload {
    Unread,
    Json(serde_json::Value),
    NotJson,
}

impl Payload {
    fn json(&mut self, message: &StoredMessage) -> Option<&serde_json::Value> {
        if let Payload::Unread = self {
            *self = match serde_json::from_slice(&message.message.payload) {
                Ok(value) => Payload::Json(value),
                Err(_) => Payload::NotJson,
            };
        }
        match self {
            Payload::Json(value) => Some(value),
            _ => None,
        }
    }
}

/// A field's value in `message` as text: a header or a channel segment as it is; from the JSON
/// payload a string as it is, a number or a boolean as written in JSON, anything else missing.
fn value_of(field: &Field, message: &StoredMessage, payload: &mut Payload) -> Option<String> {
    match field {
        Field::Header(name) => message.message.headers.get(name).cloned(),
        Field::Segment(index) => message
            .message
            .channel
            .split('.')
            .nth(*index as usize)
            .map(str::to_owned),
        Field::Json(pointer) => match payload.json(message)?.pointer(pointer)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        },
    }
}

/// The number at `pointer` in the JSON payload; `None` when it is missing or not a number.
fn number_at(pointer: &str, message: &StoredMessage, payload: &mut Payload) -> Option<f64> {
    payload.json(message)?.pointer(pointer)?.as_f64()
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
