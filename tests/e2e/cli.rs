//! The `sb` command line against a real broker: the README's tour, and its error form.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use switchboard_e2e::sb_binary;

use crate::common::*;

fn sb(url: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(sb_binary())
        .args(args)
        .env("SWITCHBOARD_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sb runs (built by `cargo test --workspace`)");
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn json_lines(output: &Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "sb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// A delivery line's JSON payload (a JSON payload is printed as the JSON itself).
fn payload(line: &Value) -> Value {
    assert_eq!(line["payload_encoding"], "json", "{line}");
    line["payload"].clone()
}

#[tokio::test]
async fn the_readme_tour_works_with_sb() {
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let url = url.as_str();

    let ack = &json_lines(&sb(
        url,
        &[
            "publish",
            "crm.contact.updated",
            r#"{"id":42,"name":"Ada"}"#,
            "--header",
            "source=tour",
        ],
        None,
    ))[0];
    assert_eq!(ack["offset"], 1);
    assert!(ack["publish_time"].as_str().unwrap().ends_with('Z'));
    assert!(ack["correlation_id"].as_str().unwrap().len() == 36);

    // As `echo '{"deal":7}' | sb publish ...`: the newline echo adds is not sent.
    let ack = &json_lines(&sb(
        url,
        &["publish", "crm.deal.updated", "-", "--ttl", "1h"],
        Some(b"{\"deal\":7}\n"),
    ))[0];
    assert_eq!(ack["offset"], 2);

    let got = json_lines(&sb(
        url,
        &[
            "subscribe",
            "crm.*.updated",
            "--from",
            "earliest",
            "--count",
            "2",
        ],
        None,
    ));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["offset"], 1);
    assert_eq!(got[0]["channel"], "crm.contact.updated");
    assert_eq!(
        payload(&got[0]),
        serde_json::json!({"id": 42, "name": "Ada"})
    );
    assert_eq!(got[0]["headers"]["source"], "tour");
    assert_eq!(got[1]["ttl_ms"], 3_600_000);

    // Payloads only, byte for byte, a newline after each; and a form for people.
    let raw = sb(url, &["history", "crm.*.updated", "--output", "raw"], None);
    assert!(raw.status.success());
    assert_eq!(raw.stdout, b"{\"id\":42,\"name\":\"Ada\"}\n{\"deal\":7}\n");
    let text = sb(
        url,
        &[
            "--output",
            "text",
            "history",
            "crm.*.updated",
            "--limit",
            "1",
        ],
        None,
    );
    let text = String::from_utf8(text.stdout).unwrap();
    let heading = text.lines().next().unwrap();
    assert!(
        heading.starts_with("[1] crm.contact.updated  20") && heading.ends_with('Z'),
        "{text}"
    );
    assert!(
        text.ends_with("source: tour\n{\n  \"id\": 42,\n  \"name\": \"Ada\"\n}\n\n"),
        "{text}"
    );

    let got = json_lines(&sb(url, &["history", "crm.>", "--from", "2"], None));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["offset"], 2);

    // Binary payloads are shown as base64.
    let out = sb(
        url,
        &[
            "publish",
            "files.blob.added",
            "-",
            "--content-type",
            "application/octet-stream",
        ],
        Some(&[0xff, 0x00, 0x01]),
    );
    json_lines(&out);
    let got = json_lines(&sb(url, &["history", "files.>"], None));
    assert_eq!(got[0]["payload"], "/wAB");
    assert_eq!(got[0]["payload_encoding"], "base64");

    let info = &json_lines(&sb(url, &["info"], None))[0];
    assert_eq!(info["last_offset"], 3);
    assert_eq!(info["node_id"], 1);
    let info = sb(url, &["info", "--output", "text"], None);
    let info = String::from_utf8(info.stdout).unwrap();
    assert!(info.contains("\nlast_offset     3\n"), "{info}");

    // Errors: non-zero exit, and stderr names the code and the reason.
    let out = sb(url, &["publish", "crm..updated", "{}"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT CHANNEL_INVALID: "),
        "{stderr}"
    );
}

/// The README's flow-control lines, as written: what they read is published first, so each one
/// ends by itself.
#[tokio::test]
async fn the_readme_flow_control_lines_publish_what_they_read() {
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let url = url.as_str();

    for i in 1..=3 {
        json_lines(&sb(
            url,
            &[
                "publish",
                "telemetry.cpu.load",
                &format!(r#"{{"load":{i}}}"#),
            ],
            None,
        ));
    }
    // Conflated from the store: only the latest, with how many it left out.
    let got = json_lines(&sb(
        url,
        &[
            "subscribe",
            "telemetry.>",
            "--policy",
            "conflate",
            "--from",
            "earliest",
            "--timeout",
            "1s",
        ],
        None,
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(payload(&got[0])["load"], 3);
    assert_eq!(got[0]["skipped"], 2);

    for i in 1..=3 {
        json_lines(&sb(
            url,
            &["publish", "ui.cursor.moved", &format!(r#"{{"x":{i}}}"#)],
            None,
        ));
    }
    // Throttled from the store: the first at once, then the latest of the rest. (The README
    // says 100ms; a whole second here, so that a busy machine cannot space the three replayed
    // messages by more than the interval.)
    let got = json_lines(&sb(
        url,
        &[
            "subscribe",
            "ui.>",
            "--throttle",
            "1s",
            "--from",
            "earliest",
            "--count",
            "2",
        ],
        None,
    ));
    let shown: Vec<(Value, Value)> = got
        .iter()
        .map(|line| (payload(line)["x"].clone(), line["skipped"].clone()))
        .collect();
    assert_eq!(
        shown,
        [(1.into(), Value::Null), (3.into(), 1.into())],
        "{got:?}"
    );

    for i in 1..=5 {
        json_lines(&sb(
            url,
            &[
                "publish",
                "widget.panel.clicked",
                &format!(r#"{{"n":{i}}}"#),
            ],
            None,
        ));
    }
    let durable = |extra: &[&str]| {
        let mut args = vec!["subscribe", "widget.>", "--durable", "panel-1", "--ack"];
        args.extend_from_slice(extra);
        json_lines(&sb(url, &args, None))
            .iter()
            .map(|line| payload(line)["n"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(durable(&["--count", "3", "--from", "earliest"]), [1, 2, 3]);
    assert_eq!(
        durable(&["--count", "2"]),
        [4, 5],
        "resumes after the last ack"
    );

    let consumers = json_lines(&sb(url, &["consumer", "list"], None));
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["name"], "panel-1");
    let info = &json_lines(&sb(url, &["consumer", "info", "panel-1"], None))[0];
    assert_eq!(info["acked_offset"], 11);
    assert_eq!(info["pending"], 0);
}

/// The common mistakes get a `hint:` line: the admin port, a one-segment pattern or channel.
#[tokio::test]
async fn sb_hints_at_the_admin_port_and_at_one_segment_names() {
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let admin = f.broker.admin_url();
    let admin_address = admin.trim_start_matches("http://");

    for args in [&["info"][..], &["publish", "crm.contact.updated", "{}"]] {
        let out = sb(&admin, args, None);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("error: UNKNOWN: transport error"),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "hint: {admin_address} is a Switchboard admin listener"
            )),
            "{stderr}"
        );
    }

    let out = sb(&url, &["subscribe", "orders", "--count", "1"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PATTERN_INVALID"), "{stderr}");
    assert!(
        stderr.contains("hint: patterns have two or more"),
        "{stderr}"
    );

    let out = sb(&url, &["publish", "orders", "{}"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CHANNEL_INVALID"), "{stderr}");
    assert!(
        stderr.contains("hint: a channel is two or more"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sb_schema_puts_lists_checks_gets_and_deletes() {
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let url = url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("contact.schema.json");
    std::fs::write(
        &file,
        r#"{"type":"object","required":["id"],"properties":{"id":{"type":"integer"}}}"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();

    json_lines(&sb(
        url,
        &["publish", "crm.contact.updated", r#"{"id":"x"}"#],
        None,
    ));
    let put = &json_lines(&sb(
        url,
        &[
            "schema",
            "put",
            "crm.contact.*",
            "1.0.0",
            file,
            "--policy",
            "warn",
        ],
        None,
    ))[0];
    assert_eq!(put["pattern"], "crm.contact.*");
    assert_eq!(put["policy"], "warn");
    assert_eq!(put["replaced"], false);
    assert_eq!(put["document"]["required"][0], "id");
    assert_eq!(put["compatibility"]["checked"], 1);
    assert_eq!(put["compatibility"]["failing"], 1);
    assert_eq!(
        put["compatibility"]["examples"][0]["failures"][0]["instance_path"],
        "/id"
    );

    // The same document from stdin, compatible required: the retained message fails it.
    let document = std::fs::read(file).unwrap();
    let refused = sb(
        url,
        &[
            "schema",
            "put",
            "crm.contact.*",
            "1.1.0",
            "-",
            "--require-compatible",
        ],
        Some(&document),
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("SCHEMA_INCOMPATIBLE"), "{stderr}");

    let listed = json_lines(&sb(url, &["schema", "list"], None));
    assert_eq!(listed.len(), 1);
    assert!(listed[0].get("document").is_none());
    let got = &json_lines(&sb(url, &["schema", "get", "crm.contact.*"], None))[0];
    assert_eq!(got["version"], "1.0.0");

    let good = &json_lines(&sb(
        url,
        &["schema", "check", "crm.contact.updated", r#"{"id":1}"#],
        None,
    ))[0];
    assert_eq!(good["valid"], true);
    assert!(good.get("reason").is_none(), "{good}");
    // Under warn a mismatch still passes; the failures are named.
    let warned = &json_lines(&sb(
        url,
        &["schema", "check", "crm.contact.updated", "-"],
        Some(br#"{"id":"x"}"#),
    ))[0];
    assert_eq!(warned["valid"], true);
    assert_eq!(warned["reason"], "SCHEMA_MISMATCH");
    assert_eq!(warned["failures"][0]["keyword"], "type");

    json_lines(&sb(
        url,
        &["schema", "put", "crm.contact.*", "1.0.0", file],
        None,
    ));
    let failed = sb(url, &["schema", "check", "crm.contact.updated", "{}"], None);
    assert_eq!(
        failed.status.code(),
        Some(2),
        "an enforced mismatch exits 2"
    );

    let deleted = &json_lines(&sb(
        url,
        &["schema", "delete", "crm.contact.*", "1.0.0"],
        None,
    ))[0];
    assert_eq!(deleted["deleted"], "crm.contact.* 1.0.0");
    let missing = sb(url, &["schema", "get", "crm.contact.*"], None);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("SCHEMA_NOT_FOUND"));
}

/// `sb bench` against a real broker, small counts: it stops by itself, every subscriber received
/// every message exactly once, the broker stored exactly what was published, the latency
/// percentiles are ordered; pipelined (`--stream`) and paced (`--rate`) runs in the text form
/// complete too.
#[tokio::test]
async fn sb_bench_completes_with_every_subscriber_receiving_every_message() {
    const MESSAGES: u64 = 300;
    const SIZE: u64 = 64;
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let args = [
        "bench",
        "bench.load",
        "--pub",
        "2",
        "--sub",
        "2",
        "--msgs",
        "300",
        "--size",
        "64",
        "--timeout",
        "60s",
    ];
    let lines = json_lines(&sb(&url, &args, None));
    assert_eq!(lines.len(), 1, "one record: {lines:?}");
    let report = &lines[0];
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["publish"]["messages"], MESSAGES, "{report}");
    assert_eq!(report["publish"]["bytes"], MESSAGES * SIZE, "{report}");
    assert_eq!(report["subscribe"]["messages"], 2 * MESSAGES, "{report}");
    let each = report["each_subscriber"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(each.len(), 2, "{report}");
    for subscriber in &each {
        assert_eq!(subscriber["received"], MESSAGES, "{report}");
        assert_eq!(subscriber["missing"], 0, "{report}");
        assert_eq!(subscriber["duplicates"], 0, "{report}");
    }
    let each_publisher = report["each_publisher"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let shares: Vec<u64> = each_publisher
        .iter()
        .filter_map(|p| p["messages"].as_u64())
        .collect();
    assert_eq!(shares, [150, 150], "{report}");
    let latency = &report["latency_ms"];
    assert_eq!(latency["count"], 2 * MESSAGES, "{report}");
    let ordered: Vec<f64> = ["p50", "p90", "p99", "max"]
        .iter()
        .filter_map(|p| latency[p].as_f64())
        .collect();
    assert_eq!(ordered.len(), 4, "{report}");
    assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{report}");
    assert_eq!(report["publish_ack_ms"]["count"], MESSAGES, "{report}");
    // Stored like any other messages: the broker has exactly the run's.
    let stored = json_lines(&sb(
        &url,
        &[
            "history",
            "bench.load",
            "--from",
            "earliest",
            "--limit",
            "0",
        ],
        None,
    ));
    assert_eq!(stored.len() as u64, MESSAGES);

    // Pipelined, and paced, printed for people: the bench ignores the earlier run's messages.
    for extra in [&["--stream"][..], &["--rate", "400"][..]] {
        let mut args = vec![
            "bench",
            "bench.load",
            "--sub",
            "1",
            "--msgs",
            "200",
            "--output",
            "text",
        ];
        args.extend_from_slice(extra);
        let output = sb(&url, &args, None);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let row = |name: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_owned)
        };
        assert_eq!(
            row("complete").as_deref(),
            Some("true"),
            "{extra:?}: {text}"
        );
        assert_eq!(
            row("subscribe.messages").as_deref(),
            Some("200"),
            "{extra:?}: {text}"
        );
    }
}

/// `sb request` and `sb reply` against a real broker: the reply of `sb reply --exec` comes back
/// to `sb request` (a JSON reply printed as JSON), the responder saw the request with its
/// reply-to inbox and stops after `--count`; with no responder `sb request` fails after its
/// `--timeout`; nothing of either is stored.
#[tokio::test]
async fn sb_request_gets_the_reply_of_sb_reply_and_nothing_is_stored() {
    use std::io::{BufRead, BufReader};

    let f = fixture(&[]).await;
    let url = f.broker.url();
    let mut responder = Command::new(sb_binary())
        .args(["reply", "svc.upper", "--exec", "tr a-z A-Z", "--count", "1"])
        .args(["--timeout", "120s"])
        .env("SWITCHBOARD_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sb runs");
    // Ready once it says so (the broker confirmed its subscription).
    let stderr = responder.stderr.take().unwrap();
    let ready = tokio::time::timeout(
        switchboard_e2e::DEADLINE,
        tokio::task::spawn_blocking(move || BufReader::new(stderr).lines().next()),
    )
    .await
    .expect("sb reply is ready in time")
    .unwrap()
    .unwrap()
    .unwrap();
    assert!(ready.starts_with("sb: replying on svc.upper"), "{ready}");

    let lines = json_lines(&sb(
        &url,
        &[
            "request",
            "svc.upper",
            r#"{"name":"ada"}"#,
            "--timeout",
            "30s",
        ],
        None,
    ));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let reply = &lines[0];
    assert_eq!(payload(reply), serde_json::json!({"NAME": "ADA"}));
    let inbox = reply["channel"].as_str().unwrap_or_default().to_owned();
    assert!(inbox.starts_with("_inbox."), "{reply}");

    let handled = tokio::task::spawn_blocking(move || responder.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(handled.status.success(), "{handled:?}");
    let requests = json_lines(&handled);
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["headers"]["reply-to"], inbox.as_str());
    assert_eq!(requests[0]["correlation_id"], reply["correlation_id"]);

    let unanswered = sb(
        &url,
        &["request", "svc.nobody", "{}", "--timeout", "300ms"],
        None,
    );
    assert!(!unanswered.status.success());
    let error = String::from_utf8_lossy(&unanswered.stderr);
    assert!(
        error.contains("no reply to a request on svc.nobody within 300ms"),
        "{error}"
    );

    for pattern in ["svc.>", "_inbox.>"] {
        let stored = json_lines(&sb(&url, &["history", pattern, "--from", "earliest"], None));
        assert!(stored.is_empty(), "{pattern}: {stored:?}");
    }
}

/// The rows of `sb --output text kpi get`'s table for one group, split on spaces:
/// `[date, time, group, messages, ms.count, ms.avg, ms.p50, ms.p95, ms.p99, ms.max]`.
fn kpi_rows<'a>(table: &'a str, group: &str) -> Vec<Vec<&'a str>> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.get(2) == Some(&group))
        .collect()
}

#[tokio::test]
async fn sb_kpi_defines_reads_lists_watches_and_deletes_a_view() {
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let url = url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clicks.toml");
    // One-day windows and two of them read, so a run across midnight UTC still sums exactly.
    std::fs::write(
        &file,
        r#"
name = "clicks"
pattern = "telemetry.widget.*"
group_by = { segment = 2 }
windows = ["1d"]

[[measures]]
name = "ms"
field = "/ms"
"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let defined = &json_lines(&sb(url, &["kpi", "define", file], None))[0];
    assert_eq!(defined["name"], "clicks");
    assert_eq!(defined["replaced"], false);
    assert_eq!(defined["definition"]["pattern"], "telemetry.widget.*");
    assert_eq!(defined["backfill"]["messages_read"], 0);

    for (channel, payload) in [
        ("telemetry.widget.dialer", r#"{"ms":10}"#),
        ("telemetry.widget.dialer", r#"{"ms":20}"#),
        ("telemetry.widget.dialer", r#"{"ms":30}"#),
        ("telemetry.widget.notes", r#"{"kind":"open"}"#),
        ("crm.contact.updated", r#"{"ms":99}"#),
    ] {
        json_lines(&sb(url, &["publish", channel, payload], None));
    }

    let read = &json_lines(&sb(
        url,
        &["kpi", "get", "clicks", "--window", "1d", "--windows", "2"],
        None,
    ))[0];
    assert_eq!(read["view"], "clicks");
    assert_eq!(read["window"], "1d");
    assert!(read["etag"].as_str().is_some_and(|etag| !etag.is_empty()));
    let windows = read["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 2);
    assert!(windows[1]["start"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00.000Z"));
    let groups: Vec<&Value> = windows
        .iter()
        .flat_map(|w| w["groups"].as_array().unwrap())
        .collect();
    let messages = |name: &str| -> u64 {
        groups
            .iter()
            .filter(|g| g["name"] == name)
            .map(|g| g["messages"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(messages("dialer"), 3);
    assert_eq!(messages("notes"), 1);
    assert!(groups.iter().all(|g| g["kind"] == "named"), "{read}");
    if let Some(dialer) = groups
        .iter()
        .find(|g| g["name"] == "dialer" && g["messages"] == 3)
    {
        assert_eq!(dialer["measures"][0]["count"], 3);
        assert_eq!(dialer["measures"][0]["avg"], 20.0);
        assert_eq!(dialer["measures"][0]["max"], 30.0);
    }
    // A group without a numeric value: counted by the view, not by the measure.
    let notes = groups.iter().find(|g| g["name"] == "notes").unwrap();
    assert_eq!(notes["measures"][0]["count"], 0);
    assert!(notes["measures"][0].get("avg").is_none(), "{notes}");

    let text = sb(
        url,
        &["--output", "text", "kpi", "get", "clicks", "--windows", "2"],
        None,
    );
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let table = String::from_utf8(text.stdout).unwrap();
    assert!(
        table.starts_with("view clicks  window 1d  etag "),
        "{table}"
    );
    assert!(
        table.contains("START (UTC)") && table.contains("ms.p95"),
        "{table}"
    );
    let dialer_rows = kpi_rows(&table, "dialer");
    let counted: u64 = dialer_rows
        .iter()
        .map(|row| row[3].parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 3, "{table}");
    if let [row] = dialer_rows.as_slice() {
        // count, avg and max exact; p50, p95 and p99 of 10, 20, 30 are the value at rank
        // floor(q·2) = 1, 20, within the sketch's 1%.
        assert_eq!([row[4], row[5], row[9]], ["3", "20", "30"], "{table}");
        for quantile in &row[6..9] {
            let value: f64 = quantile.parse().unwrap();
            assert!((value - 20.0).abs() <= 0.2, "{table}");
        }
    }

    let watched = json_lines(&sb(
        url,
        &["kpi", "watch", "clicks", "--count", "1", "--timeout", "30s"],
        None,
    ));
    assert_eq!(watched.len(), 1);
    assert_eq!(watched[0]["view"], "clicks");

    let listed = json_lines(&sb(url, &["kpi", "list"], None));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "clicks");
    let only = &json_lines(&sb(url, &["kpi", "get", "clicks", "--view-only"], None))[0];
    assert_eq!(only["definition"]["measures"][0]["name"], "ms");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"Not A Name!\"\npattern = \"telemetry.>\"\n").unwrap();
    let refused = sb(url, &["kpi", "define", bad.to_str().unwrap()], None);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("INVALID_ARGUMENT VIEW_INVALID"), "{stderr}");

    let deleted = &json_lines(&sb(url, &["kpi", "delete", "clicks"], None))[0];
    assert_eq!(deleted["deleted"], "clicks");
    assert!(json_lines(&sb(url, &["kpi", "list"], None)).is_empty());
    let missing = sb(url, &["kpi", "get", "clicks"], None);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("VIEW_NOT_FOUND"));
}
