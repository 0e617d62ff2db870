//! Entity reconciliation: merging one write into an entity's state, and the whole per-write cost
//! apply pays on top of the merge (the state document published on the entity's state channel).
//!
//! Run: `cargo bench -p switchboard-broker --bench entity`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchboard_broker::bench_api::EntityDoc;
use switchboard_broker::bench_api::{Change, EntityState, Stamp};

fn stamp(timestamp_ms: u64, writer: &str) -> Stamp {
    Stamp {
        timestamp_ms,
        version: 0,
        writer: writer.to_owned(),
    }
}

/// An update setting `n` fields (`f0`, `f1`, …) to small JSON values, like W4's updates.
fn update(n: usize) -> Change {
    Change::Update(
        (0..n)
            .map(|i| (format!("f{i}"), format!("\"value {i}\"")))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// An entity whose `fields` fields were all set by an older write.
fn entity(fields: usize) -> EntityState {
    let mut state = EntityState::default();
    state.merge(&update(fields), &stamp(1, "seed"));
    state.accept(&stamp(1, "seed"), 1_000);
    state
}

/// A newer write of 1 and of 4 fields into an entity of 10 fields (every field it sets wins), and
/// a stale write (every field loses), which apply refuses.
fn merge(c: &mut Criterion) {
    let mut group = c.benchmark_group("entity_merge");
    let base = entity(10);
    for n in [1usize, 4] {
        let change = update(n);
        let newer = stamp(2, "w");
        group.bench_with_input(BenchmarkId::new("winning", n), &change, |b, change| {
            b.iter_batched_ref(
                || base.clone(),
                |state| {
                    let changed = state.merge(black_box(change), &newer);
                    state.accept(&newer, 2_000);
                    changed
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    let stale_change = update(4);
    let older = stamp(0, "w");
    group.bench_function("stale/4", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |state| state.merge(black_box(&stale_change), &older),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("delete", |b| {
        let delete = stamp(2, "w");
        b.iter_batched_ref(
            || base.clone(),
            |state| state.merge(black_box(&Change::Delete), &delete),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// What apply does for an accepted write after the merge: the state document as JSON. `via_value`
/// is how it used to be made (fields printed, parsed into a `serde_json::Value`, printed again),
/// `direct` how apply makes it now; `watch_decode` is what one change costs the watches of it
/// (decoded once per message, whatever the number of watches).
fn state_document(c: &mut Criterion) {
    let state = entity(10);
    let mut group = c.benchmark_group("entity_state_document");
    group.bench_function("via_value/10_fields", |b| {
        b.iter(|| serde_json::to_string(&EntityDoc::new("contact", "c42", black_box(&state))))
    });
    group.bench_function("direct/10_fields", |b| {
        b.iter(|| EntityDoc::encode("contact", "c42", black_box(&state)))
    });
    let payload = EntityDoc::encode("contact", "c42", &state).unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("watch_decode/10_fields", |b| {
        b.iter(|| {
            switchboard_broker::bench_api::convert::entity_from_state_payload(black_box(
                payload.as_bytes(),
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, merge, state_document);
criterion_main!(benches);
