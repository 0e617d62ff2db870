//! Entity state: field-level reconciliation of records edited by many writers.
//!
//! An entity is a set of fields. Each field keeps the [`Stamp`] of the write that set it, and a
//! write sets a field only when its stamp is greater — a last-writer-wins register per field,
//! with a total order on stamps: `(timestamp_ms, version, writer)`. A delete is a tombstone: it
//! removes every field with a smaller stamp and raises the entity's floor, so an older write that
//! arrives later cannot resurrect what was deleted.
//!
//! Why this converges: every field's final state is decided by the greatest stamp among the writes
//! and deletes that touched it, whatever order they arrive in; merging the same write twice
//! changes nothing. The property tests below check exactly that. Entity *versions* count accepted
//! changes, so they follow the log order — which every replica shares.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Who wrote, and when. Ordered by timestamp, then version, then writer (bytewise).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// The writer's clock, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The writer's counter.
    pub version: u64,
    /// The writer's id.
    pub writer: String,
}

/// One field: its value as JSON text, and the stamp that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Canonical JSON text of the value.
    pub value: String,
    /// The stamp of the write that set it.
    pub stamp: Stamp,
}

/// What a write asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Set these fields (name → canonical JSON text).
    Update(BTreeMap<String, String>),
    /// Delete the entity (every field with a smaller stamp).
    Delete,
}

/// An entity's merged state, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityState {
    /// Live fields.
    pub fields: BTreeMap<String, Field>,
    /// The greatest delete stamp so far: no write with a smaller stamp sets a field.
    pub tombstone: Option<Stamp>,
    /// Accepted changes so far (0 for an entity never written).
    pub version: u64,
    /// When the broker applied the last accepted change, µs since the epoch (leader's stamp).
    pub updated_at_us: u64,
    /// The stamp of the last accepted change.
    pub last_stamp: Option<Stamp>,
}

impl EntityState {
    /// Merges `change` stamped `stamp` into the fields; returns whether anything changed (a change
    /// that changes nothing is stale). Does not touch `version` or the other bookkeeping: the
    /// caller decides whether to accept (see [`EntityState::accept`]).
    pub fn merge(&mut self, change: &Change, stamp: &Stamp) -> bool {
        match change {
            Change::Update(values) => {
                let floor = self.tombstone.as_ref();
                let mut changed = false;
                for (name, value) in values {
                    let wins = match self.fields.get(name) {
                        Some(field) => stamp > &field.stamp,
                        None => floor.is_none_or(|t| stamp > t),
                    };
                    if wins {
                        self.fields.insert(
                            name.clone(),
                            Field {
                                value: value.clone(),
                                stamp: stamp.clone(),
                            },
                        );
                        changed = true;
                    }
                }
                changed
            }
            Change::Delete => {
                // A delete wins when it raises the floor: it removes every older field, and no
                // later-arriving older write can set one again. Raising the floor counts as a
                // change even when no field was left to remove, or replicas that saw the delete
                // before or after other writes would disagree about which older writes to refuse.
                if self.tombstone.as_ref().is_some_and(|t| t >= stamp) {
                    return false;
                }
                self.fields.retain(|_, field| field.stamp > *stamp);
                self.tombstone = Some(stamp.clone());
                true
            }
        }
    }

    /// Records an accepted change: a new version, its time and stamp.
    pub fn accept(&mut self, stamp: &Stamp, applied_at_us: u64) {
        self.version += 1;
        self.updated_at_us = applied_at_us;
        self.last_stamp = Some(stamp.clone());
    }

    /// The stamp of a write the broker stamps (one sent with timestamp 0, as the browser gateway
    /// sends every write), applied at `now_ms` (the leader's time in the log entry): `now_ms`, or,
    /// when the entity already holds a stamp at or after it (a writer whose clock is ahead, or an
    /// earlier write in the same millisecond), that stamp's time with the next counter. So it is
    /// greater than every stamp the entity holds, and a write stamped by the broker is never stale:
    /// a hybrid logical clock per entity. Every replica applies the same log to the same state,
    /// so every replica gives the write the same stamp.
    pub fn broker_stamp(&self, now_ms: u64, writer: String) -> Stamp {
        let newest = self
            .fields
            .values()
            .map(|field| &field.stamp)
            .chain(&self.tombstone)
            .chain(&self.last_stamp)
            .max();
        let (timestamp_ms, version) = match newest {
            Some(newest) if newest.timestamp_ms >= now_ms => match newest.version.checked_add(1) {
                Some(next) => (newest.timestamp_ms, next),
                None => (newest.timestamp_ms.saturating_add(1), 0),
            },
            _ => (now_ms, 0),
        };
        Stamp {
            timestamp_ms,
            version,
            writer,
        }
    }

    /// True when a delete won and no later write set a field since.
    pub fn is_deleted(&self) -> bool {
        self.fields.is_empty() && self.tombstone.is_some()
    }

    /// The live fields as one JSON object (text).
    pub fn fields_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (name, field)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // A field name is a Rust string; its JSON form cannot fail to encode.
            out.push_str(&serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into()));
            out.push(':');
            out.push_str(&field.value);
        }
        out.push('}');
        out
    }

    /// The ETag of the current version.
    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(ts: u64, v: u64, w: &str) -> Stamp {
        Stamp {
            timestamp_ms: ts,
            version: v,
            writer: w.into(),
        }
    }

    fn update(pairs: &[(&str, &str)]) -> Change {
        Change::Update(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn concurrent_edits_to_different_fields_both_survive() {
        let mut e = EntityState::default();
        assert!(e.merge(&update(&[("name", "\"Ada\"")]), &stamp(10, 0, "crm")));
        assert!(e.merge(&update(&[("phone", "\"555\"")]), &stamp(9, 0, "tel")));
        assert_eq!(e.fields_json(), r#"{"name":"Ada","phone":"555"}"#);
    }

    #[test]
    fn the_greater_stamp_wins_and_an_older_write_is_stale() {
        let mut e = EntityState::default();
        assert!(e.merge(&update(&[("name", "\"B\"")]), &stamp(10, 0, "b")));
        assert!(
            !e.merge(&update(&[("name", "\"A\"")]), &stamp(10, 0, "a")),
            "writer a < b"
        );
        assert!(
            !e.merge(&update(&[("name", "\"B\"")]), &stamp(10, 0, "b")),
            "a replay is stale"
        );
        assert!(
            e.merge(&update(&[("name", "\"C\"")]), &stamp(10, 1, "a")),
            "version breaks the tie"
        );
        assert_eq!(e.fields_json(), r#"{"name":"C"}"#);
    }

    #[test]
    fn a_delete_removes_older_fields_and_refuses_older_writes() {
        let mut e = EntityState::default();
        e.merge(&update(&[("a", "1"), ("b", "2")]), &stamp(5, 0, "w"));
        e.merge(&update(&[("c", "3")]), &stamp(20, 0, "w"));
        assert!(e.merge(&Change::Delete, &stamp(10, 0, "w")));
        assert_eq!(e.fields_json(), r#"{"c":3}"#);
        assert!(
            !e.merge(&update(&[("a", "9")]), &stamp(8, 0, "w")),
            "older than the tombstone"
        );
        assert!(e.merge(&update(&[("a", "9")]), &stamp(11, 0, "w")));
        assert!(!e.is_deleted());
        assert!(
            !e.merge(&Change::Delete, &stamp(10, 0, "w")),
            "the same delete again"
        );
    }

    #[test]
    fn a_delete_of_a_new_entity_is_kept_as_a_floor() {
        let mut e = EntityState::default();
        assert!(e.merge(&Change::Delete, &stamp(10, 0, "w")));
        assert!(e.is_deleted());
        assert!(!e.merge(&update(&[("a", "1")]), &stamp(9, 0, "w")));
        assert_eq!(e.fields_json(), "{}");
    }

    fn arb_write() -> impl Strategy<Value = (Change, Stamp)> {
        let stamp = (0u64..6, 0u64..3, prop::sample::select(vec!["a", "b", "c"]))
            .prop_map(|(t, v, w)| stamp(t, v, w));
        let change = prop_oneof![
            4 => prop::collection::btree_map(
                prop::sample::select(vec!["x", "y", "z"]).prop_map(String::from),
                (0u32..5).prop_map(|n| n.to_string()),
                1..3,
            )
            .prop_map(Change::Update),
            1 => Just(Change::Delete),
        ];
        (change, stamp)
    }

    fn merged(writes: &[(Change, Stamp)]) -> EntityState {
        let mut e = EntityState::default();
        for (change, stamp) in writes {
            e.merge(change, stamp);
        }
        e
    }

    proptest! {
        /// Any set of writes, in any order, gives the same fields and floor.
        #[test]
        fn random_writes_in_random_orders_converge(
            writes in prop::collection::vec(arb_write(), 0..12),
            seed in any::<u64>(),
        ) {
            // Distinct stamps per write: two different writes with one stamp are one writer
            // contradicting itself, which no order can reconcile.
            let mut seen = std::collections::HashSet::new();
            let writes: Vec<_> = writes.into_iter().filter(|(_, s)| seen.insert(s.clone())).collect();
            let a = merged(&writes);
            let mut shuffled = writes.clone();
            let mut rng = seed;
            for i in (1..shuffled.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let b = merged(&shuffled);
            prop_assert_eq!(&a.fields, &b.fields);
            prop_assert_eq!(&a.tombstone, &b.tombstone);
        }

        /// Merging a write twice changes nothing the second time.
        #[test]
        fn merging_twice_is_idempotent(writes in prop::collection::vec(arb_write(), 1..10)) {
            let mut e = merged(&writes);
            let before = e.clone();
            let (change, stamp) = writes.last().unwrap();
            prop_assert!(!e.merge(change, stamp));
            prop_assert_eq!(e, before);
        }
    }
}
