//! Reading a view: the windows of one length, newest last, with each group's cell.

use super::cell::{Cell, Group};
use super::view::{View, Window};
use crate::error::BrokerError;
use crate::state::store::MessageStore;

/// One window of a reading.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WindowReading {
    /// Its start, seconds since the epoch (UTC).
    pub(crate) start_s: u64,
    /// Its groups' cells, in group order (missing, other, then named by name). Empty when no
    /// message fell in it.
    pub(crate) groups: Vec<(Group, Cell)>,
}

/// What [`read`] is asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadRequest<'a> {
    /// The window length, seconds (one of the view's).
    pub(crate) length_s: u32,
    /// How many windows, ending with the one holding `now_s`; at most the view keeps.
    pub(crate) windows: u32,
    /// Only this group (by name), when given.
    pub(crate) group: Option<&'a str>,
    /// The time whose window is the newest, seconds since the epoch. Readers pass the state's
    /// latest publish time, so every node that applied the same log answers the same.
    pub(crate) now_s: u64,
}

/// The windows asked for, oldest first, each present (empty when nothing fell in it); `None`
/// when the view has no window of that length.
///
/// # Errors
/// The store's error, or a damaged cell.
pub(crate) fn read(
    store: &MessageStore,
    view: &View,
    request: ReadRequest<'_>,
) -> Result<Option<Vec<WindowReading>>, BrokerError> {
    let Some(window) = view
        .windows
        .iter()
        .find(|w| w.length_s == request.length_s)
        .copied()
    else {
        return Ok(None);
    };
    let newest = window.start_of(request.now_s);
    let count = request.windows.clamp(1, window.keep);
    let oldest = newest.saturating_sub(u64::from(window.length_s) * u64::from(count - 1));
    let mut readings: Vec<WindowReading> = starts(window, oldest, newest)
        .map(|start_s| WindowReading {
            start_s,
            groups: Vec::new(),
        })
        .collect();
    for (start_s, group, cell) in
        store.kpi_cells(&view.definition.name, window.length_s, oldest, newest)?
    {
        if let Some(name) = request.group {
            if group != Group::Named(name.to_owned()) {
                continue;
            }
        }
        let place = ((start_s - oldest) / u64::from(window.length_s)) as usize;
        if let Some(reading) = readings.get_mut(place) {
            reading.groups.push((group, cell));
        }
    }
    Ok(Some(readings))
}

fn starts(window: Window, oldest: u64, newest: u64) -> impl Iterator<Item = u64> {
    (oldest..=newest).step_by(window.length_s as usize)
}
