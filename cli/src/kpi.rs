//! `sb kpi`: define, list, read, watch and drop KPI views (docs/KPIS.md). Values print as one
//! JSON line per reading, or (`--output text`) as a table per reading: a row per window and
//! group, with the messages counted and, per measure, count, avg, p50, p95, p99 and max.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use switchboard_client::proto::{
    DefineViewResponse, GetKpisResponse, KpiGroup, KpiGroupKind, KpiMeasure, View,
};
use switchboard_client::{Client, KpiQuery};
use tokio::time::Instant;

use crate::{output, print};

const VIEW_OUTPUT: &str = "\
A view is printed as one line:
{\"name\":\"clicks\",\"defined_at\":\"2024-05-01T12:00:00.250Z\",\"defined_by\":\"ISSUER SUBJECT\",
\"definition\":{...}} (defined_by left out without authentication; the definition as JSON with
its defaults filled in).";

const VALUES_OUTPUT: &str = "\
Values are printed as one line per reading:
{\"etag\":\"...\",\"view\":\"clicks\",\"window\":\"1m\",\"windows\":[{\"start\":\"2024-05-01T12:00:00.000Z\",
\"end\":\"2024-05-01T12:01:00.000Z\",\"groups\":[{\"kind\":\"named\"|\"missing\"|\"other\",\"name\":\"...\",
\"messages\":N,\"measures\":[{\"name\":\"...\",\"count\":N,\"sum\":X,\"avg\":X,\"min\":X,\"max\":X,
\"p50\":X,\"p90\":X,\"p95\":X,\"p99\":X}]}]}]}
windows oldest first, the newest holding the broker's clock; a measure without values has only
name and count. With --output text, a table per reading: a row per window and group (a window
with nothing in it shows one row of 0), START in UTC, GROUP (`(none)` for messages without a
group value, `(other)` past the view's max_groups), MESSAGES, then count, avg, p50, p95, p99 and
max of each measure.";

/// `sb kpi …`.
#[derive(Debug, Subcommand)]
pub(crate) enum KpiCommand {
    /// Define (or replace) a view from a TOML or JSON file and print it with its backfill.
    #[command(after_help = format!("{VIEW_OUTPUT}

The line also has \"replaced\" (a view of that name was replaced: its values are computed again)
and \"backfill\": {{\"messages_read\":N,\"messages_counted\":N,\"first_offset\":N,\"last_offset\":N,
\"truncated\":false}}, what it read of the retained messages. A definition that does not read or
breaks a bound is INVALID_ARGUMENT VIEW_INVALID, naming the field (exit status 1). Needs the
`admin` grant.

Examples:
  sb kpi define web/demo/kpis/widget_events.toml
  sb kpi define - < view.json"))]
    Define(DefineArgs),

    /// Print every view, one line each, by name.
    #[command(after_help = VIEW_OUTPUT)]
    List,

    /// Print a view's values over its newest windows.
    #[command(after_help = format!("{VALUES_OUTPUT}

--view-only prints the view's definition instead (as `sb kpi list` does). An unknown view is
NOT_FOUND VIEW_NOT_FOUND; a window length the view does not have is INVALID_ARGUMENT VIEW_INVALID.

Examples:
  sb kpi get widget_events
  sb kpi get handle_time --window 15m --windows 4 --output text
  sb kpi get handle_time --group support"))]
    Get(GetArgs),

    /// Print a view's values now, then each time they change.
    #[command(after_help = format!("{VALUES_OUTPUT}

Exits with status 0 after --count readings or when --timeout has passed, and runs until
interrupted otherwise. A dropped view ends the watch with NOT_FOUND VIEW_NOT_FOUND.

Examples:
  sb kpi watch widget_events --windows 10 --output text
  sb kpi watch handle_time --window 1m --interval 5s --count 3"))]
    Watch(WatchArgs),

    /// Drop a view and its values; prints {"deleted":"NAME"}.
    #[command(after_help = "\
An unknown view is NOT_FOUND VIEW_NOT_FOUND (exit status 1). Needs the `admin` grant.")]
    Delete(NameArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DefineArgs {
    /// A file holding the definition (TOML, or JSON starting with `{`), or `-` for stdin.
    file: String,
}

#[derive(Debug, Args)]
pub(crate) struct NameArgs {
    /// The view's name.
    view: String,
}

#[derive(Debug, Args)]
pub(crate) struct ValuesArgs {
    /// The view's name.
    view: String,
    /// The window length, as the view names it (`1m`, `5m`, `1d`, ...); the view's first when
    /// left out.
    #[arg(long, value_name = "LENGTH")]
    window: Option<String>,
    /// How many windows, ending with the current one.
    #[arg(long, value_name = "N", default_value_t = 1)]
    windows: u32,
    /// Only this group.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
}

impl ValuesArgs {
    fn query(&self) -> KpiQuery {
        KpiQuery::new(self.view.as_str())
            .window(self.window.clone().unwrap_or_default())
            .windows(self.windows)
            .group(self.group.clone().unwrap_or_default())
    }
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    values: ValuesArgs,
    /// Print the view's definition rather than its values.
    #[arg(long)]
    view_only: bool,
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    values: ValuesArgs,
    /// At most one reading per this interval (the broker's kpis.watch_min_interval, 1s, is the
    /// floor), for example `5s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Exit (status 0) after this many readings (the first, current one counts).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Exit (status 0) once this long has passed since `sb` started, for example `30s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

/// Runs one `sb kpi` command.
pub(crate) async fn run(
    client: &Client,
    command: KpiCommand,
    started: Instant,
) -> anyhow::Result<()> {
    match command {
        KpiCommand::Define(args) => {
            let text = if args.file == "-" {
                crate::read_stdin("the view definition").await?
            } else {
                tokio::fs::read(&args.file)
                    .await
                    .with_context(|| format!("reading the view definition {}", args.file))?
            };
            let text = String::from_utf8(text).context("the view definition is not UTF-8 text")?;
            let defined = client.kpi_define(text).await?;
            print::record(&define_line(&defined)?)
        }
        KpiCommand::List => {
            for view in client.kpi_list().await? {
                print::record(&view_line(&view)?)?;
            }
            Ok(())
        }
        KpiCommand::Get(args) if args.view_only => {
            let view = client.kpi_get_view(&args.values.view).await?;
            print::record(&view_line(&view)?)
        }
        KpiCommand::Get(args) => {
            let values = client.kpi_values(args.values.query()).await?;
            print_values(&values)
        }
        KpiCommand::Watch(args) => watch(client, args, started).await,
        KpiCommand::Delete(args) => {
            client.kpi_delete(&args.view).await?;
            print::record(&output::deleted_line(&args.view)?)
        }
    }
}

async fn watch(client: &Client, args: WatchArgs, started: Instant) -> anyhow::Result<()> {
    let deadline = args.timeout.map(|timeout| started + timeout);
    if args.count == Some(0) {
        return Ok(());
    }
    let opening = client.kpi_watch(args.values.query(), args.interval);
    let Some(opened) = crate::until(deadline, opening).await else {
        return Ok(());
    };
    let mut watch = opened?;
    let mut readings: u64 = 0;
    loop {
        let Some(next) = crate::until(deadline, watch.next()).await else {
            return Ok(());
        };
        match next {
            Some(Ok(values)) => print_values(&values)?,
            Some(Err(error)) => return Err(error.into()),
            None => anyhow::bail!("the KPI watch ended unexpectedly"),
        }
        readings += 1;
        if args.count.is_some_and(|count| readings >= count) {
            return Ok(());
        }
    }
}

fn print_values(values: &GetKpisResponse) -> anyhow::Result<()> {
    print::record_with_text(&values_line(values)?, || values_table(values))
}

#[derive(Serialize)]
struct ViewLine<'a> {
    name: &'a str,
    defined_at: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    defined_by: &'a str,
    definition: &'a RawValue,
}

#[derive(Serialize)]
struct DefineLine<'a> {
    #[serde(flatten)]
    view: ViewLine<'a>,
    replaced: bool,
    backfill: BackfillLine,
}

#[derive(Serialize)]
struct BackfillLine {
    messages_read: u64,
    messages_counted: u64,
    first_offset: u64,
    last_offset: u64,
    truncated: bool,
}

fn view_fields(view: &View) -> anyhow::Result<ViewLine<'_>> {
    let definition: &RawValue = serde_json::from_str(&view.definition).with_context(|| {
        format!(
            "the broker sent view {} with a definition that is not JSON",
            view.name
        )
    })?;
    Ok(ViewLine {
        name: &view.name,
        defined_at: view.defined_at.as_ref().and_then(output::format_timestamp),
        defined_by: &view.defined_by,
        definition,
    })
}

/// `{"name":...,"defined_at":...,"defined_by":...,"definition":{...}}`.
fn view_line(view: &View) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&view_fields(view)?)?)
}

fn define_line(defined: &DefineViewResponse) -> anyhow::Result<String> {
    let view = defined.view.clone().unwrap_or_default();
    let backfill = view.backfill.unwrap_or_default();
    Ok(serde_json::to_string(&DefineLine {
        view: view_fields(&view)?,
        replaced: defined.replaced,
        backfill: BackfillLine {
            messages_read: backfill.messages_read,
            messages_counted: backfill.messages_counted,
            first_offset: backfill.first_offset,
            last_offset: backfill.last_offset,
            truncated: backfill.truncated,
        },
    })?)
}

#[derive(Serialize)]
struct ValuesLine<'a> {
    etag: &'a str,
    view: &'a str,
    window: &'a str,
    windows: Vec<WindowLine<'a>>,
}

#[derive(Serialize)]
struct WindowLine<'a> {
    start: Option<String>,
    end: Option<String>,
    groups: Vec<GroupLine<'a>>,
}

#[derive(Serialize)]
struct GroupLine<'a> {
    kind: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    messages: u64,
    measures: Vec<MeasureLine<'a>>,
}

#[derive(Serialize)]
struct MeasureLine<'a> {
    name: &'a str,
    count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p90: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p95: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99: Option<f64>,
}

fn kind_name(group: &KpiGroup) -> &'static str {
    match KpiGroupKind::try_from(group.kind) {
        Ok(KpiGroupKind::Named) => "named",
        Ok(KpiGroupKind::Missing) => "missing",
        Ok(KpiGroupKind::Other) => "other",
        Ok(KpiGroupKind::Unspecified) | Err(_) => "unknown",
    }
}

fn measure_line(measure: &KpiMeasure) -> MeasureLine<'_> {
    let finite = |value: Option<f64>| value.filter(|v| v.is_finite());
    MeasureLine {
        name: &measure.name,
        count: measure.count,
        sum: (measure.count > 0)
            .then_some(measure.sum)
            .filter(|v| v.is_finite()),
        avg: finite(measure.avg),
        min: finite(measure.min),
        max: finite(measure.max),
        p50: finite(measure.p50),
        p90: finite(measure.p90),
        p95: finite(measure.p95),
        p99: finite(measure.p99),
    }
}

/// One reading as its JSON line (the shape of `GetKpisResponse`, times in RFC 3339 UTC, group
/// kinds in lower case).
fn values_line(values: &GetKpisResponse) -> anyhow::Result<String> {
    let windows = values
        .windows
        .iter()
        .map(|window| WindowLine {
            start: window.start.as_ref().and_then(output::format_timestamp),
            end: window.end.as_ref().and_then(output::format_timestamp),
            groups: window
                .groups
                .iter()
                .map(|group| GroupLine {
                    kind: kind_name(group),
                    name: &group.name,
                    messages: group.messages,
                    measures: group.measures.iter().map(measure_line).collect(),
                })
                .collect(),
        })
        .collect();
    Ok(serde_json::to_string(&ValuesLine {
        etag: &values.etag,
        view: &values.view,
        window: &values.window,
        windows,
    })?)
}

/// The quantities of a measure the table shows, in its column order.
const MEASURE_COLUMNS: [&str; 6] = ["count", "avg", "p50", "p95", "p99", "max"];

/// A number for the table: integers as they are, others to three decimals without trailing
/// zeros; `-` for none.
fn number(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(value) if value.fract() == 0.0 && value.abs() < 1e15 => format!("{value:.0}"),
        Some(value) => {
            let text = format!("{value:.3}");
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
    }
}

/// A window start as `2024-05-01 12:00:00` (UTC).
fn start_text(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| {
            chrono::DateTime::<chrono::Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
        })
        .map(|time| time.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// One reading as a table: a heading line, then a row per window and group.
fn values_table(values: &GetKpisResponse) -> String {
    // The measure names, from the first group that has them (every group has the view's).
    let measures: Vec<&str> = values
        .windows
        .iter()
        .flat_map(|window| window.groups.iter())
        .find(|group| !group.measures.is_empty())
        .map(|group| group.measures.iter().map(|m| m.name.as_str()).collect())
        .unwrap_or_default();
    let mut header = vec![
        "START (UTC)".to_owned(),
        "GROUP".to_owned(),
        "MESSAGES".to_owned(),
    ];
    for measure in &measures {
        for column in MEASURE_COLUMNS {
            header.push(format!("{measure}.{column}"));
        }
    }
    let mut rows = vec![header];
    for window in &values.windows {
        let start = start_text(window.start.as_ref());
        if window.groups.is_empty() {
            let mut row = vec![start.clone(), "-".to_owned(), "0".to_owned()];
            for _ in &measures {
                row.push("0".to_owned());
                row.extend(std::iter::repeat_n(
                    "-".to_owned(),
                    MEASURE_COLUMNS.len() - 1,
                ));
            }
            rows.push(row);
        }
        for group in &window.groups {
            let name = match KpiGroupKind::try_from(group.kind) {
                Ok(KpiGroupKind::Named) => group.name.clone(),
                Ok(KpiGroupKind::Other) => "(other)".to_owned(),
                _ => "(none)".to_owned(),
            };
            let mut row = vec![start.clone(), name, group.messages.to_string()];
            for measure_name in &measures {
                match group.measures.iter().find(|m| m.name == *measure_name) {
                    Some(m) => row.extend([
                        m.count.to_string(),
                        number(m.avg),
                        number(m.p50),
                        number(m.p95),
                        number(m.p99),
                        number(m.max),
                    ]),
                    None => row.extend(std::iter::repeat_n("-".to_owned(), MEASURE_COLUMNS.len())),
                }
            }
            rows.push(row);
        }
    }
    let mut widths = vec![0usize; rows[0].len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = format!(
        "view {}  window {}  etag {}\n",
        values.view, values.window, values.etag
    );
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                // Names left, numbers right.
                if column < 2 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_client::proto::KpiWindow;

    fn reading() -> GetKpisResponse {
        GetKpisResponse {
            not_modified: false,
            etag: "\"abc\"".to_owned(),
            view: "clicks".to_owned(),
            window: "1m".to_owned(),
            windows: vec![
                KpiWindow {
                    start: Some(prost_types::Timestamp {
                        seconds: 1_714_564_800,
                        nanos: 0,
                    }),
                    end: Some(prost_types::Timestamp {
                        seconds: 1_714_564_860,
                        nanos: 0,
                    }),
                    groups: vec![],
                },
                KpiWindow {
                    start: Some(prost_types::Timestamp {
                        seconds: 1_714_564_860,
                        nanos: 0,
                    }),
                    end: Some(prost_types::Timestamp {
                        seconds: 1_714_564_920,
                        nanos: 0,
                    }),
                    groups: vec![KpiGroup {
                        kind: KpiGroupKind::Named as i32,
                        name: "dialer".to_owned(),
                        messages: 3,
                        measures: vec![KpiMeasure {
                            name: "ms".to_owned(),
                            count: 2,
                            sum: 3.5,
                            avg: Some(1.75),
                            min: Some(1.0),
                            max: Some(2.5),
                            p50: Some(1.0),
                            p90: Some(2.5),
                            p95: Some(2.5),
                            p99: Some(2.5),
                        }],
                    }],
                },
            ],
        }
    }

    #[test]
    fn table_rows_per_window_and_group() {
        let table = values_table(&reading());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "view clicks  window 1m  etag \"abc\"");
        assert!(lines[1].starts_with("START (UTC)"), "{table}");
        assert!(
            lines[1].contains("ms.count") && lines[1].ends_with("ms.max"),
            "{table}"
        );
        assert!(lines[2].starts_with("2024-05-01 12:00:00  -"), "{table}");
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "2024-05-01",
                "12:01:00",
                "dialer",
                "3",
                "2",
                "1.75",
                "1",
                "2.5",
                "2.5",
                "2.5"
            ]
        );
    }

    #[test]
    fn json_line_has_the_values_shape() -> anyhow::Result<()> {
        let line: serde_json::Value = serde_json::from_str(&values_line(&reading())?)?;
        assert_eq!(line["windows"][0]["start"], "2024-05-01T12:00:00.000Z");
        assert_eq!(line["windows"][1]["groups"][0]["kind"], "named");
        assert_eq!(line["windows"][1]["groups"][0]["messages"], 3);
        assert_eq!(line["windows"][1]["groups"][0]["measures"][0]["p95"], 2.5);
        Ok(())
    }

    #[test]
    fn numbers() {
        assert_eq!(number(None), "-");
        assert_eq!(number(Some(12.0)), "12");
        assert_eq!(number(Some(0.1 + 0.2)), "0.3");
        assert_eq!(number(Some(1.23456)), "1.235");
    }
}
