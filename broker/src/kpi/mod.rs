//! KPIs: continuous aggregates of the messages on the bus, computed where they are stored.
//!
//! A **view** ([`view`]) reads the channels of a pattern, keeps the messages its filters accept,
//! splits them into groups and, per UTC tumbling window of each of its lengths, counts them and
//! measures numbers in their payloads: count, sum, min, max, and quantiles from a mergeable
//! sketch with a stated relative error ([`sketch`]). What a view holds for one group in one
//! window is a **cell** ([`cell`]).
//!
//! Views are defined through the replicated log and folded into the state by apply ([`fold`]),
//! from the leader-stamped publish times, so every node of a cluster computes the same cells from
//! the same log, a restart finds them where they were, and a snapshot carries them (they are
//! records of the store like any other). Folding a message costs O(1) per matching view (found
//! through the channel trie): its cells for the batch are read once, updated in memory, and
//! written once at the end of the batch.
//!
//! A new view is **backfilled** from the messages still retained, within the windows it keeps,
//! bounded by the limit its write carries; [`BackfillReport`] says what was read.
//!
//! Served by `edge::kpis` (the `switchboard.v1.KpiService`).

pub(crate) mod cell;
pub(crate) mod fold;
pub(crate) mod read;
pub(crate) mod sketch;
pub(crate) mod view;

use serde::{Deserialize, Serialize};

use crate::channel::SubscriptionTrie;
use crate::message::Owner;
pub(crate) use view::{View, ViewDefinition};

/// A view as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ViewRecord {
    /// The definition, as JSON ([`ViewDefinition::to_json`]).
    pub(crate) definition: String,
    /// When it was defined, µs since the epoch (leader's time).
    pub(crate) defined_at_us: u64,
    /// Who defined it; `None` when nobody authenticated did.
    pub(crate) defined_by: Option<Owner>,
    /// What its backfill read.
    pub(crate) backfill: BackfillReport,
}

/// What a new view's backfill read from the retained messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BackfillReport {
    /// Messages read (from the first one within the view's longest kept span).
    pub(crate) messages_read: u64,
    /// Of those, the ones the view counted.
    pub(crate) messages_counted: u64,
    /// The first and last offsets read (0 when none).
    pub(crate) first_offset: u64,
    /// See `first_offset`.
    pub(crate) last_offset: u64,
    /// Whether it stopped at the limit before the newest message (the newest ones are then not
    /// counted: the view starts from its definition on).
    pub(crate) truncated: bool,
}

/// The views of the store, compiled for apply: matched to a channel through a trie.
#[derive(Debug, Default)]
pub(crate) struct CompiledViews {
    views: Vec<View>,
    trie: SubscriptionTrie<usize>,
}

impl CompiledViews {
    /// Compiles `views`.
    pub(crate) fn new(views: Vec<View>) -> CompiledViews {
        let mut trie = SubscriptionTrie::new();
        for (place, view) in views.iter().enumerate() {
            trie.insert(&view.pattern, place);
        }
        CompiledViews { views, trie }
    }

    /// No views at all (apply then skips folding).
    pub(crate) fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// The views, in name order.
    pub(crate) fn views(&self) -> &[View] {
        &self.views
    }

    /// Calls `f` with the place of every view matching `channel`, in ascending place.
    fn matching(&self, channel: &str, places: &mut Vec<usize>) {
        places.clear();
        self.trie
            .for_each_match(channel, |&place| places.push(place));
        // The trie's order follows its shape; fold views in one order everywhere.
        places.sort_unstable();
    }
}

#[cfg(test)]
mod tests;
