//! Views through apply: definitions and messages go in as committed commands, cells come out
//! through [`super::read`], as every replica would compute them.

use std::collections::BTreeMap;

use super::cell::{Cell, Group};
use super::read::{read, ReadRequest, WindowReading};
use super::sketch::RELATIVE_ACCURACY;
use super::ViewDefinition;
use crate::message::{
    Command, CommandOutcome, Item, ItemOutcome, NewMessage, Refusal, Rules, ViewWrite,
};
use crate::state::apply::apply_command;
use crate::state::position::{self, Position};
use crate::state::store::{MessageStore, WriteBatch};

const RULES: Rules = Rules {
    dedup_window_us: 120_000_000,
    loop_window_us: 300_000_000,
    max_hops: 16,
    max_clock_skew_ms: 60_000,
};

/// 2026-12-07T00:00:00Z, seconds.
const DAY: u64 = 1_796_601_600;

struct Broker {
    _dir: tempfile::TempDir,
    store: MessageStore,
    meta: Position,
}

impl Broker {
    fn new() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = MessageStore::open(&db, &dir.path().join("batches")).unwrap();
        let meta = position::load(&store).unwrap().1;
        Broker {
            _dir: dir,
            store,
            meta,
        }
    }

    /// Applies one committed batch stamped at `time_s` (plus `micros`).
    fn apply(&mut self, time_s: u64, micros: u64, items: Vec<Item>) -> Vec<ItemOutcome> {
        let command = Command::Batch {
            stamped_at_us: time_s * 1_000_000 + micros,
            rules: RULES,
            items,
        };
        let mut batch = WriteBatch::default();
        let (outcome, _) =
            apply_command(&self.store, &mut self.meta, &command, &mut batch).unwrap();
        self.meta.write(&Default::default(), &mut batch).unwrap();
        self.store.apply(batch).unwrap();
        match outcome {
            CommandOutcome::Batch(outcomes) => outcomes,
            other => panic!("{other:?}"),
        }
    }

    fn define(&mut self, time_s: u64, toml: &str) -> ItemOutcome {
        self.define_with(time_s, toml, 100_000, 64)
    }

    fn define_with(
        &mut self,
        time_s: u64,
        toml: &str,
        backfill_limit: u64,
        max_views: u32,
    ) -> ItemOutcome {
        let view = ViewDefinition::parse(toml).unwrap();
        self.apply(
            time_s,
            0,
            vec![define_item(&view.definition, backfill_limit, max_views)],
        )
        .remove(0)
    }

    fn read(&self, name: &str, length_s: u32, windows: u32, now_s: u64) -> Vec<WindowReading> {
        let record = self.store.view(name).unwrap().expect("the view exists");
        let view = ViewDefinition::parse(&record.definition).unwrap();
        read(
            &self.store,
            &view,
            ReadRequest {
                length_s,
                windows,
                group: None,
                now_s,
            },
        )
        .unwrap()
        .expect("a window of that length")
    }

    /// Every cell of every view, as stored: what two replicas must agree on.
    fn all_cells(&self, name: &str, length_s: u32) -> Vec<(u64, Group, Vec<u8>)> {
        self.store
            .kpi_cells(name, length_s, 0, u64::MAX - 1)
            .unwrap()
            .into_iter()
            .map(|(start, group, cell)| (start, group, cell.encode().unwrap()))
            .collect()
    }
}

fn define_item(definition: &ViewDefinition, backfill_limit: u64, max_views: u32) -> Item {
    Item::View(ViewWrite::Put {
        definition: definition.to_json(),
        defined_by: None,
        backfill_limit,
        max_views,
    })
}

fn publish(channel: &str, payload: &str) -> Item {
    publish_with(channel, payload, &[])
}

fn publish_with(channel: &str, payload: &str, headers: &[(&str, &str)]) -> Item {
    Item::Publish(NewMessage {
        channel: channel.into(),
        payload: bytes::Bytes::from(payload.to_owned()),
        content_type: "application/json".into(),
        schema_version: "1.0.0".into(),
        correlation_id: "00000000-0000-4000-8000-000000000000".into(),
        causation_id: String::new(),
        idempotency_key: String::new(),
        ttl_ms: 0,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        hops: 0,
    })
}

fn group<'a>(window: &'a WindowReading, group: &Group) -> Option<&'a Cell> {
    window
        .groups
        .iter()
        .find(|(g, _)| g == group)
        .map(|(_, c)| c)
}

fn named(name: &str) -> Group {
    Group::Named(name.into())
}

const HANDLE_TIME: &str = r#"
name = "handle_time"
pattern = "calls.*.ended"
group_by = { segment = 1 }
windows = ["1m", "1d"]

[[measures]]
name = "seconds"
field = "/seconds"
"#;

#[test]
fn counts_sums_averages_minima_and_maxima_are_exact_per_group_and_window() {
    let mut b = Broker::new();
    b.define(DAY, HANDLE_TIME);
    // Minute 0: sales 10, 20, 30; support 5. Minute 1: sales 100.
    b.apply(
        DAY + 1,
        0,
        vec![
            publish("calls.sales.ended", r#"{"seconds": 10}"#),
            publish("calls.sales.ended", r#"{"seconds": 20}"#),
            publish("calls.support.ended", r#"{"seconds": 5}"#),
            // Another channel, and a message without the number: counted, not measured.
            publish("calls.sales.started", r#"{"seconds": 999}"#),
            publish("calls.sales.ended", r#"{"note": "no number"}"#),
        ],
    );
    b.apply(
        DAY + 59,
        999_999,
        vec![publish("calls.sales.ended", r#"{"seconds": 30}"#)],
    );
    b.apply(
        DAY + 60,
        0,
        vec![publish("calls.sales.ended", r#"{"seconds": 100.5}"#)],
    );

    let minutes = b.read("handle_time", 60, 2, DAY + 60);
    assert_eq!(
        minutes.iter().map(|w| w.start_s).collect::<Vec<_>>(),
        [DAY, DAY + 60]
    );
    let sales = group(&minutes[0], &named("sales")).unwrap();
    assert_eq!(sales.messages, 4, "three numbers and one message without");
    let seconds = &sales.measures[0];
    assert_eq!(
        (seconds.count, seconds.sum, seconds.min, seconds.max),
        (3, 60.0, 10.0, 30.0)
    );
    assert_eq!(seconds.avg(), Some(20.0));
    let support = group(&minutes[0], &named("support")).unwrap();
    assert_eq!((support.messages, support.measures[0].sum), (1, 5.0));
    let next = group(&minutes[1], &named("sales")).unwrap();
    assert_eq!((next.messages, next.measures[0].max), (1, 100.5));
    // The day holds both minutes.
    let day = b.read("handle_time", 86_400, 1, DAY + 60);
    let sales_day = group(&day[0], &named("sales")).unwrap();
    assert_eq!((sales_day.messages, sales_day.measures[0].count), (5, 4));
    assert_eq!(sales_day.measures[0].sum, 160.5);
}

#[test]
fn quantiles_are_within_the_sketchs_stated_error() {
    let mut b = Broker::new();
    b.define(DAY, HANDLE_TIME);
    // 1..=1000 seconds, in batches of 100.
    for chunk in 0..10 {
        let items = (1..=100)
            .map(|i| {
                let value = chunk * 100 + i;
                publish("calls.sales.ended", &format!(r#"{{"seconds": {value}}}"#))
            })
            .collect();
        b.apply(DAY + 10, chunk, items);
    }
    let minute = b.read("handle_time", 60, 1, DAY + 10);
    let seconds = &group(&minute[0], &named("sales")).unwrap().measures[0];
    assert_eq!(seconds.count, 1000);
    for (q, truth) in [(0.5, 500.0), (0.9, 900.0), (0.95, 950.0), (0.99, 990.0)] {
        let estimate = seconds.quantile(q).unwrap();
        assert!(
            ((estimate - truth) / truth).abs() <= RELATIVE_ACCURACY,
            "p{q}: {estimate} vs {truth}"
        );
    }
}

#[test]
fn windows_roll_over_at_utc_boundaries_and_old_ones_are_dropped() {
    let mut b = Broker::new();
    b.define(
        DAY - 10,
        r#"
name = "clicks"
pattern = "ui.>"
windows = [{ length = "1d", keep = 2 }, { length = "1m", keep = 2 }]
"#,
    );
    // The last microsecond of 2026-12-06 and the first of 2026-12-07 (UTC).
    b.apply(DAY - 1, 999_999, vec![publish("ui.button.click", "{}")]);
    b.apply(DAY, 0, vec![publish("ui.button.click", "{}")]);
    let days = b.read("clicks", 86_400, 2, DAY);
    assert_eq!(days[0].start_s, DAY - 86_400);
    assert_eq!(group(&days[0], &Group::Missing).unwrap().messages, 1);
    assert_eq!(group(&days[1], &Group::Missing).unwrap().messages, 1);
    // Minutes: keep 2. A message three minutes later pushes the first two minutes out.
    assert_eq!(b.all_cells("clicks", 60).len(), 2);
    b.apply(DAY + 180, 0, vec![publish("ui.button.click", "{}")]);
    let kept: Vec<u64> = b.all_cells("clicks", 60).iter().map(|c| c.0).collect();
    assert_eq!(
        kept,
        [DAY + 180],
        "windows before the kept span are removed"
    );
    // A reading asks for at most what is kept, empty windows included.
    let minutes = b.read("clicks", 60, 10, DAY + 180);
    assert_eq!(minutes.len(), 2);
    assert!(minutes[0].groups.is_empty());
}

#[test]
fn groups_past_the_cap_go_to_other_and_known_groups_keep_counting() {
    let mut b = Broker::new();
    b.define(
        DAY,
        r#"
name = "by_queue"
pattern = "calls.>"
group_by = { json = "/queue" }
windows = ["1m"]
max_groups = 2
"#,
    );
    b.apply(
        DAY + 1,
        0,
        vec![
            publish("calls.x.y", r#"{"queue": "a"}"#),
            publish("calls.x.y", r#"{"queue": 7}"#),
            publish("calls.x.y", r#"{"queue": "c"}"#),
            publish("calls.x.y", r#"{"other": 1}"#),
        ],
    );
    b.apply(
        DAY + 2,
        0,
        vec![
            publish("calls.x.y", r#"{"queue": "d"}"#),
            publish("calls.x.y", r#"{"queue": "a"}"#),
        ],
    );
    let minute = &b.read("by_queue", 60, 1, DAY + 2)[0];
    assert_eq!(group(minute, &named("a")).unwrap().messages, 2);
    assert_eq!(
        group(minute, &named("7")).unwrap().messages,
        1,
        "a number as written"
    );
    assert_eq!(group(minute, &Group::Other).unwrap().messages, 2, "c and d");
    assert_eq!(group(minute, &Group::Missing).unwrap().messages, 1);
    assert!(group(minute, &named("c")).is_none());
}

#[test]
fn filters_on_headers_segments_and_payload_fields_must_all_hold() {
    let mut b = Broker::new();
    b.define(
        DAY,
        r#"
name = "inbound"
pattern = "calls.*.ended"
windows = ["1m"]

[[filters]]
field = { json = "/direction" }
equals = "inbound"

[[filters]]
field = { header = "site" }
equals = "paris"

[[filters]]
field = { segment = 1 }
equals = "sales"
"#,
    );
    let site = [("site", "paris")];
    b.apply(
        DAY + 1,
        0,
        vec![
            publish_with("calls.sales.ended", r#"{"direction": "inbound"}"#, &site),
            publish_with("calls.sales.ended", r#"{"direction": "outbound"}"#, &site),
            publish_with("calls.support.ended", r#"{"direction": "inbound"}"#, &site),
            publish("calls.sales.ended", r#"{"direction": "inbound"}"#),
            publish_with("calls.sales.ended", "not json", &site),
        ],
    );
    let minute = &b.read("inbound", 60, 1, DAY + 1)[0];
    assert_eq!(group(minute, &Group::Missing).unwrap().messages, 1);
}

#[test]
fn a_new_view_is_backfilled_from_retained_messages_within_its_span_and_limit() {
    let mut b = Broker::new();
    // Two hours ago (outside a 1m × 60 span), then within it.
    b.apply(
        DAY - 7200,
        0,
        vec![publish("calls.sales.ended", r#"{"seconds": 1}"#)],
    );
    b.apply(
        DAY - 30,
        0,
        vec![
            publish("calls.sales.ended", r#"{"seconds": 2}"#),
            publish("calls.sales.started", "{}"),
            publish("calls.sales.ended", r#"{"seconds": 3}"#),
        ],
    );
    let minutes_only = HANDLE_TIME.replace("[\"1m\", \"1d\"]", "[\"1m\"]");
    let outcome = b.define(DAY, &minutes_only);
    let ItemOutcome::View {
        existed: false,
        backfill: Some(report),
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!((report.messages_read, report.messages_counted), (3, 2));
    assert_eq!((report.first_offset, report.last_offset), (2, 4));
    assert!(!report.truncated);
    let minute = &b.read("handle_time", 60, 1, DAY - 30)[0];
    assert_eq!(group(minute, &named("sales")).unwrap().measures[0].sum, 5.0);

    // Defined again with a limit of 2: the old cells go, the newest message is not read.
    let outcome = b.define_with(DAY, &minutes_only, 2, 64);
    let ItemOutcome::View {
        existed: true,
        backfill: Some(report),
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert!(report.truncated);
    assert_eq!(report.messages_read, 2);
    let minute = &b.read("handle_time", 60, 1, DAY - 30)[0];
    assert_eq!(group(minute, &named("sales")).unwrap().measures[0].sum, 2.0);
}

#[test]
fn a_view_defined_amid_a_batch_counts_the_messages_around_it_once() {
    let mut b = Broker::new();
    let view = ViewDefinition::parse(HANDLE_TIME).unwrap();
    b.apply(
        DAY,
        0,
        vec![
            publish("calls.sales.ended", r#"{"seconds": 1}"#),
            define_item(&view.definition, 100, 64),
            publish("calls.sales.ended", r#"{"seconds": 2}"#),
        ],
    );
    let minute = &b.read("handle_time", 60, 1, DAY)[0];
    let seconds = &group(minute, &named("sales")).unwrap().measures[0];
    assert_eq!(
        (seconds.count, seconds.sum),
        (2, 3.0),
        "one by backfill, one by the fold"
    );
}

#[test]
fn dropping_a_view_removes_its_cells_and_it_counts_no_more() {
    let mut b = Broker::new();
    b.define(DAY, HANDLE_TIME);
    b.apply(
        DAY + 1,
        0,
        vec![publish("calls.sales.ended", r#"{"seconds": 1}"#)],
    );
    assert!(!b.all_cells("handle_time", 60).is_empty());
    let outcomes = b.apply(
        DAY + 2,
        0,
        vec![
            Item::View(ViewWrite::Delete {
                name: "handle_time".into(),
            }),
            publish("calls.sales.ended", r#"{"seconds": 1}"#),
            Item::View(ViewWrite::Delete {
                name: "handle_time".into(),
            }),
        ],
    );
    assert!(matches!(
        outcomes[0],
        ItemOutcome::View { existed: true, .. }
    ));
    assert!(matches!(
        outcomes[2],
        ItemOutcome::View { existed: false, .. }
    ));
    assert!(b.store.view("handle_time").unwrap().is_none());
    assert!(b.all_cells("handle_time", 60).is_empty());
    assert!(b.all_cells("handle_time", 86_400).is_empty());
}

#[test]
fn a_definition_that_does_not_read_and_one_past_the_limit_are_refused() {
    let mut b = Broker::new();
    let outcomes = b.apply(
        DAY,
        0,
        vec![Item::View(ViewWrite::Put {
            definition: r#"{"name": "x", "pattern": "a.b", "windows": ["7m"]}"#.into(),
            defined_by: None,
            backfill_limit: 0,
            max_views: 64,
        })],
    );
    assert!(
        matches!(&outcomes[0], ItemOutcome::Refused(Refusal::ViewInvalid { detail }) if detail.contains("7m"))
    );
    assert!(matches!(
        b.define_with(DAY, HANDLE_TIME, 0, 1),
        ItemOutcome::View { .. }
    ));
    let second = HANDLE_TIME.replace("handle_time", "other_view");
    assert_eq!(
        b.define_with(DAY, &second, 0, 1),
        ItemOutcome::Refused(Refusal::ViewLimit { max_views: 1 })
    );
    // Defining an existing view again is not a new one.
    assert!(matches!(
        b.define_with(DAY, HANDLE_TIME, 0, 1),
        ItemOutcome::View { existed: true, .. }
    ));
}

#[test]
fn two_replicas_applying_the_same_log_hold_the_same_cells() {
    let mut replicas = [Broker::new(), Broker::new()];
    for b in &mut replicas {
        b.define(DAY, HANDLE_TIME);
        for i in 0..50u64 {
            let value = (i * 7919) % 1000;
            b.apply(
                DAY + i * 3,
                i,
                vec![publish(
                    if i % 3 == 0 {
                        "calls.support.ended"
                    } else {
                        "calls.sales.ended"
                    },
                    &format!(r#"{{"seconds": {value}.25}}"#),
                )],
            );
        }
    }
    for length in [60, 86_400] {
        let [a, b] = &replicas;
        assert_eq!(
            a.all_cells("handle_time", length),
            b.all_cells("handle_time", length)
        );
    }
}

#[test]
fn pointers_reach_nested_members_escaped_names_and_escaped_strings() {
    let mut b = Broker::new();
    b.define(
        DAY,
        r#"
name = "nested"
pattern = "calls.>"
group_by = { json = "/call/queue" }
windows = ["1m"]

[[filters]]
field = { json = "/a~1b" }
equals = "yes"

[[measures]]
name = "ms"
field = "/call/ms"
"#,
    );
    b.apply(
        DAY + 1,
        0,
        vec![
            publish(
                "calls.x.y",
                r#"{"a/b": "yes", "call": {"queue": "s\u00e9 \"1\"", "ms": 7}}"#,
            ),
            publish(
                "calls.x.y",
                r#"{"a/b": "yes", "call": {"queue": "s\u00e9 \"1\"", "ms": "8"}}"#,
            ),
            publish(
                "calls.x.y",
                r#"{"a/b": "no", "call": {"queue": "q", "ms": 9}}"#,
            ),
            publish("calls.x.y", r#"["not", "an", "object"]"#),
        ],
    );
    let minute = &b.read("nested", 60, 1, DAY + 1)[0];
    let cell = group(minute, &named("sé \"1\"")).expect("the unescaped group");
    assert_eq!(cell.messages, 2);
    assert_eq!(
        (cell.measures[0].count, cell.measures[0].sum),
        (1, 7.0),
        "a number as a string is not a number"
    );
    assert_eq!(minute.groups.len(), 1, "the filter left the others out");
}

/// `publish` with another content type.
fn publish_typed(channel: &str, payload: &str, content_type: &str) -> Item {
    let mut item = publish(channel, payload);
    if let Item::Publish(message) = &mut item {
        message.content_type = content_type.into();
    }
    item
}

#[test]
fn a_payload_is_read_as_far_as_the_views_need_and_the_first_of_twin_members_counts() {
    let mut b = Broker::new();
    b.define(
        DAY,
        r#"
name = "queues"
pattern = "calls.>"
group_by = { json = "/q" }
windows = ["1m"]

[[measures]]
name = "ms"
field = "/ms"
"#,
    );
    b.apply(
        DAY + 1,
        0,
        vec![
            // A member named twice: the first counts.
            publish(
                "calls.a",
                r#"{"q": "first", "ms": 5, "q": "second", "ms": 6}"#,
            ),
            // A JSON payload (checked at the edge) is not read past the members wanted: the
            // fold stops at "ms" and never meets what follows.
            publish("calls.a", r#"{"ms": 7, "q": "first", "pad": "#),
            // Any other content type is read to its end first: this one is not JSON, so its
            // group and measure are missing.
            publish_typed(
                "calls.a",
                r#"{"q": "first", "ms": 8, "pad": "#,
                "text/plain",
            ),
            // ... and this one is, so it counts.
            publish_typed("calls.a", r#"{"q": "first", "ms": 9}"#, "text/plain"),
            // Members no view reads are skipped, whatever they hold.
            publish(
                "calls.a",
                r#"{"blob": {"deep": [1, 2, {"x": "\u00e9"}]}, "q": "first", "ms": 10}"#,
            ),
        ],
    );
    let minute = &b.read("queues", 60, 1, DAY + 1)[0];
    let first = group(minute, &named("first")).expect("the first group");
    assert_eq!(first.messages, 4);
    assert_eq!(
        (first.measures[0].count, first.measures[0].sum),
        (4, 5.0 + 7.0 + 9.0 + 10.0)
    );
    assert!(group(minute, &named("second")).is_none());
    let missing = group(minute, &Group::Missing).expect("the text that is not JSON");
    assert_eq!((missing.messages, missing.measures[0].count), (1, 0));
}
