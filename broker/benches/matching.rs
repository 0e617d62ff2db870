//! Subscription matching: the segment trie against a linear scan over every pattern, and how the
//! trie's cost changes (or does not) as the number of subscriptions grows.
//!
//! Run: `cargo bench -p switchboard-broker --bench matching`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchboard_broker::bench_api::{ChannelLimits, Pattern, SubscriptionTrie};

/// Patterns every subscription set contains: a few broad, cross-tenant subscriptions.
const GLOBAL_PATTERNS: &[&str] = &[
    "*.contact.updated",
    "*.*.deleted",
    "audit.>",
    "*.invoice.>",
    "$state.>",
];

/// A channel that several subscriptions match (the tenant's exact, `*` and `>` subscriptions, and
/// the global `*.contact.updated`).
const MATCHING: &str = "tenant7.contact.updated";

/// A channel no subscription matches: the tenant does not exist and no global pattern fits.
const NOT_MATCHING: &str = "tenant99999999.contact.created";

/// A realistic mix of `n` subscription patterns: the global ones, then per tenant an exact
/// channel, a `*` pattern, a `>` pattern and a deeper exact channel.
fn patterns(n: usize) -> Vec<Pattern> {
    let limits = ChannelLimits::default();
    let mut raw: Vec<String> = GLOBAL_PATTERNS.iter().map(|p| (*p).to_owned()).collect();
    let mut i = 0;
    while raw.len() < n {
        let tenant = i / 4;
        raw.push(match i % 4 {
            0 => format!("tenant{tenant}.contact.updated"),
            1 => format!("tenant{tenant}.*.updated"),
            2 => format!("tenant{tenant}.>"),
            _ => format!("tenant{tenant}.order.{i}.created"),
        });
        i += 1;
    }
    raw.truncate(n);
    raw.iter()
        .map(|p| Pattern::parse(p, &limits).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect()
}

fn trie(patterns: &[Pattern]) -> SubscriptionTrie<usize> {
    let mut trie = SubscriptionTrie::new();
    for (i, p) in patterns.iter().enumerate() {
        trie.insert(p, i);
    }
    trie
}

fn count_trie(trie: &SubscriptionTrie<usize>, channel: &str) -> usize {
    let mut count = 0;
    trie.for_each_match(channel, |v| {
        black_box(v);
        count += 1;
    });
    count
}

fn count_linear(patterns: &[Pattern], channel: &str) -> usize {
    patterns.iter().filter(|p| p.matches(channel)).count()
}

/// The trie and a linear scan over the same 10,000 subscriptions.
fn trie_vs_linear(c: &mut Criterion) {
    let patterns = patterns(10_000);
    let trie = trie(&patterns);
    for channel in [MATCHING, NOT_MATCHING] {
        assert_eq!(
            count_trie(&trie, channel),
            count_linear(&patterns, channel),
            "trie and scan disagree on {channel}"
        );
    }

    let mut group = c.benchmark_group("match_10k");
    for (name, channel) in [("matching", MATCHING), ("not_matching", NOT_MATCHING)] {
        group.bench_with_input(BenchmarkId::new("trie", name), channel, |b, ch| {
            b.iter(|| count_trie(&trie, black_box(ch)))
        });
        group.bench_with_input(BenchmarkId::new("linear", name), channel, |b, ch| {
            b.iter(|| count_linear(&patterns, black_box(ch)))
        });
    }
    group.finish();
}

/// Trie matching at 100, 1,000 and 10,000 subscriptions (with the linear scan for contrast).
fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("scaling_matching_channel");
    for n in [100, 1_000, 10_000] {
        let patterns = patterns(n);
        let trie = trie(&patterns);
        group.bench_with_input(BenchmarkId::new("trie", n), &trie, |b, trie| {
            b.iter(|| count_trie(trie, black_box(MATCHING)))
        });
        group.bench_with_input(BenchmarkId::new("linear", n), &patterns, |b, patterns| {
            b.iter(|| count_linear(patterns, black_box(MATCHING)))
        });
    }
    group.finish();
}

criterion_group!(benches, trie_vs_linear, scaling);
criterion_main!(benches);
