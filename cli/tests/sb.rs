//! `sb` against the client's in-process mock broker (no real broker needed): what it prints for
//! publishes, subscriptions (with flow control, acks and gaps), history, info, entities, consumers
//! and subscriptions, and how it reports refusals and unreachable brokers.
// The mock is written for the client's tests, and these use only part of it.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

include!("../../client/tests/support/mock_broker.rs");

/// Runs the `sb` binary against `address` and returns (status, stdout, stderr).
async fn sb(
    address: SocketAddr,
    args: &[&str],
    stdin: Option<&'static [u8]>,
) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sb"));
    command
        .arg("--server")
        .arg(address.to_string())
        .args(args)
        .env_remove("SB_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_prints_the_ack_and_reports_refusals() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let (status, stdout, stderr) = sb(
        address,
        &[
            "publish",
            "a.b",
            r#"{"x":1}"#,
            "--ttl",
            "30s",
            "--header",
            "k=v=w",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout,
        "{\"offset\":1,\"publish_time\":\"1970-01-01T00:00:01.000Z\",\"correlation_id\":\"generated\"}\n"
    );
    // From stdin: the newline `echo` adds is left out, unless --keep-newline.
    for args in [
        &["publish", "a.b", "-"][..],
        &["publish", "a.b", "--keep-newline"],
    ] {
        let (status, _, stderr) = sb(address, args, Some(b"{\"from\":\"stdin\"}\n")).await;
        assert_eq!(status, 0, "{stderr}");
    }
    {
        let state = mock.state.lock().unwrap();
        assert_eq!(state.published[0].ttl_ms, 30_000);
        assert_eq!(state.published[0].headers["k"], "v=w");
        assert_eq!(&state.published[1].payload[..], b"{\"from\":\"stdin\"}");
        assert_eq!(&state.published[2].payload[..], b"{\"from\":\"stdin\"}\n");
    }

    let (status, stdout, stderr) = sb(address, &["publish", "a.", "{}"], None).await;
    assert_eq!(status, 1);
    assert_eq!(stdout, "");
    let (error, hint) = stderr.split_once('\n').unwrap();
    assert_eq!(
        error,
        "error: INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty"
    );
    assert!(hint.starts_with("hint: a channel is two or more"), "{hint}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_subscribe_prints_deliveries_and_stops() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let mut binary = message(2);
    binary.payload = vec![0xff, 0x00].into();
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            Ok(SubscribeEvent {
                event: Some(subscribe_event::Event::Message(binary)),
            }),
            delivery(3),
            delivery(4),
        ],
        true,
    );
    let (status, stdout, stderr) = sb(
        address,
        &["subscribe", "a.>", "--from", "earliest", "--count", "3"],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stderr,
        "sb: subscribed to a.> (next offset 1, subscription 1)\n"
    );
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 3);
    // An empty content type is JSON, and "1" is a JSON document.
    assert_eq!(lines[0]["payload"], 1);
    assert_eq!(lines[0]["payload_encoding"], "json");
    assert_eq!(lines[1]["payload"], "/wA=");
    assert_eq!(lines[1]["payload_encoding"], "base64");
    assert_eq!(lines[2]["offset"], 3);

    let started = std::time::Instant::now();
    let (status, stdout, _) = sb(address, &["subscribe", "a.>", "--timeout", "300ms"], None).await;
    assert_eq!((status, stdout.as_str()), (0, ""));
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (status, _, stderr) = sb(address, &["subscribe", "a b"], None).await;
    assert_eq!(status, 1);
    let (error, hint) = stderr.split_once('\n').unwrap();
    assert_eq!(
        error,
        "error: INVALID_ARGUMENT PATTERN_INVALID: pattern has a space"
    );
    assert!(
        hint.starts_with("hint: patterns have two or more"),
        "{hint}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_history_and_info() {
    let mock = Mock::default();
    mock.state.lock().unwrap().history_len = 30;
    let address = serve(mock.clone()).await;
    let (status, stdout, stderr) = sb(
        address,
        &["history", "a.>", "--from", "5", "--limit", "12"],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    let offsets: Vec<u64> = json_lines(&stdout)
        .iter()
        .map(|line| line["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (5..17).collect::<Vec<_>>());

    let (status, stdout, _) = sb(address, &["history", "a.>", "--limit", "0"], None).await;
    assert_eq!((status, stdout.lines().count()), (0, 30));

    let (status, stdout, _) = sb(address, &["info"], None).await;
    assert_eq!(status, 0);
    let info = json_lines(&stdout);
    assert_eq!(info.len(), 1);
    assert_eq!(info[0]["version"], "mock");
    assert_eq!(info[0]["applied_index"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_names_the_url_it_cannot_reach() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, stdout, stderr) = sb(address, &["info"], None).await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert!(
        stderr.starts_with(&format!(
            "error: cannot connect to http://127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_hops_and_duplicates() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let args = [
        "publish",
        "a.b",
        "{}",
        "--idempotency-key",
        "k",
        "--hops",
        "2",
        "--causation-id",
        "5",
    ];
    let (status, first, stderr) = sb(address, &args, None).await;
    assert_eq!(status, 0, "{stderr}");
    assert!(!first.contains("duplicate"), "{first}");
    let (status, again, _) = sb(address, &args, None).await;
    assert_eq!(status, 0);
    assert_eq!(
        again,
        "{\"offset\":1,\"publish_time\":\"1970-01-01T00:00:01.000Z\",\"correlation_id\":\"generated\",\"duplicate\":true}\n"
    );
    let stored = mock.state.lock().unwrap().published[0].clone();
    assert_eq!((stored.hops, stored.causation_id.as_str()), (2, "5"));

    let mut reaction = message(3);
    reaction.hops = 2;
    mock.plan(
        vec![
            subscribed(1),
            Ok(SubscribeEvent {
                event: Some(subscribe_event::Event::Message(reaction)),
            }),
            delivery(4),
        ],
        true,
    );
    let (status, stdout, stderr) = sb(address, &["subscribe", "a.>", "--count", "2"], None).await;
    assert_eq!(status, 0, "{stderr}");
    let lines = json_lines(&stdout);
    assert_eq!(lines[0]["hops"], 2);
    assert!(lines[1].get("hops").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_entity_update_get_delete() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "update",
            "contact",
            "42",
            r#"{"name":"Ada","tags":["a"]}"#,
            "--timestamp",
            "1714564800100",
            "--version",
            "2",
            "--writer",
            "panel-7",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout,
        concat!(
            r#"{"type":"contact","id":"42","version":1,"etag":"\"1\"","deleted":false,"#,
            r#""updated_at":"2024-05-01T12:00:00.250Z","fields":{"name":"Ada","tags":["a"]},"#,
            r#""last_stamp":{"timestamp_ms":1714564800100,"version":2,"writer":"panel-7"}}"#,
            "\n"
        )
    );

    // From stdin, with the default stamp: now, version 0, the default writer.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "update",
            "contact",
            "42",
            "-",
            "--expect-version",
            "1",
        ],
        Some(br#"{"vip":true}"#),
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    let line = &json_lines(&stdout)[0];
    assert_eq!(line["version"], 2);
    assert_eq!(
        line["fields"],
        serde_json::json!({"name": "Ada", "tags": ["a"], "vip": true})
    );
    {
        let state = mock.state.lock().unwrap();
        let request = &state.entity_updates[1];
        let stamp = request.stamp.clone().unwrap();
        assert!(stamp.timestamp_ms >= before, "{stamp:?}");
        assert_eq!(stamp.version, 0);
        assert!(stamp.writer.starts_with("sb"), "{stamp:?}");
        assert_eq!(request.expected_version, Some(1));
    }

    let (status, stdout, _) = sb(address, &["entity", "get", "contact", "42"], None).await;
    assert_eq!(status, 0);
    let etag = json_lines(&stdout)[0]["etag"].as_str().unwrap().to_owned();
    assert_eq!(etag, "\"2\"");
    let (status, stdout, _) = sb(
        address,
        &["entity", "get", "contact", "42", "--if-none-match", &etag],
        None,
    )
    .await;
    assert_eq!((status, stdout.as_str()), (0, "{\"not_modified\":true}\n"));

    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "update",
            "contact",
            "42",
            r#"{"a":1}"#,
            "--expect-version",
            "7",
        ],
        None,
    )
    .await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        "error: ABORTED VERSION_CONFLICT: expected version 7, the entity is at 2\n"
    );

    let (status, _, stderr) =
        sb(address, &["entity", "update", "contact", "42", "[1]"], None).await;
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with(
            "error: invalid argument: the fields of entity contact.42 must be a JSON object"
        ),
        "{stderr}"
    );
    let (status, _, stderr) = sb(
        address,
        &["entity", "update", "contact", "42", "{nope"],
        None,
    )
    .await;
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with("error: invalid argument: the fields are not valid JSON: "),
        "{stderr}"
    );

    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "delete",
            "contact",
            "42",
            "--timestamp",
            "99999999999999",
            "--writer",
            "janitor",
            "--expect-version",
            "2",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    let line = &json_lines(&stdout)[0];
    assert_eq!(
        (line["deleted"].clone(), line["version"].clone()),
        (true.into(), 3.into())
    );
    assert_eq!(line["fields"], serde_json::json!({}));
    assert_eq!(line["last_stamp"]["writer"], "janitor");

    let (status, stdout, stderr) = sb(address, &["entity", "get", "contact", "404"], None).await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        "error: NOT_FOUND ENTITY_NOT_FOUND: no entity contact.404\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_entity_watch_prints_snapshot_and_changes() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    mock.state.lock().unwrap().watch_plans.push_back(WatchPlan {
        items: vec![
            entity_event(entity_event::Event::Snapshot(sample_entity(
                "1",
                4,
                r#"{"name":"Ada"}"#,
            ))),
            entity_event(entity_event::Event::SnapshotComplete(SnapshotComplete {
                entities: 1,
            })),
            entity_event(entity_event::Event::Change(sample_entity(
                "1",
                5,
                r#"{"name":"Ada L."}"#,
            ))),
            entity_event(entity_event::Event::Change(sample_entity(
                "2",
                1,
                r#"{"name":"Bob"}"#,
            ))),
            entity_event(entity_event::Event::Change(sample_entity(
                "3",
                1,
                r#"{"name":"Cy"}"#,
            ))),
        ],
        hold: true,
    });
    let (status, stdout, stderr) = sb(
        address,
        &["entity", "watch", "contact.*", "--count", "2"],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stderr, "sb: watching contact.*\n");
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0]["event"], "snapshot");
    assert_eq!(lines[0]["fields"], serde_json::json!({"name": "Ada"}));
    assert_eq!(lines[0]["updated_at"], "2024-05-01T12:00:00.250Z");
    assert_eq!(
        stdout.lines().nth(1),
        Some(r#"{"event":"snapshot_complete","entities":1}"#)
    );
    assert_eq!(lines[2]["event"], "change");
    assert_eq!(
        (lines[2]["id"].clone(), lines[2]["version"].clone()),
        ("1".into(), 5.into())
    );
    assert_eq!(lines[3]["id"], "2");
    assert!(stdout.starts_with(r#"{"event":"snapshot","type":"contact","id":"1","#));

    // --count 0: the snapshot only (the default plan: the mock's entities, none here).
    let (status, stdout, stderr) =
        sb(address, &["entity", "watch", ">", "--count", "0"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout, "{\"event\":\"snapshot_complete\",\"entities\":0}\n");

    // --timeout with nothing happening.
    let (status, stdout, _) = sb(
        address,
        &["entity", "watch", ">", "--timeout", "300ms"],
        None,
    )
    .await;
    assert_eq!((status, stdout.lines().count()), (0, 1));

    let (status, _, stderr) = sb(address, &["entity", "watch", "a b"], None).await;
    assert_eq!(status, 1);
    let (error, hint) = stderr.split_once('\n').unwrap();
    assert_eq!(
        error,
        "error: INVALID_ARGUMENT PATTERN_INVALID: pattern has a space"
    );
    assert!(
        hint.starts_with("hint: patterns have two or more"),
        "{hint}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_subscribe_acks_and_prints_gaps() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let mut conflated = message(3);
    conflated.skipped = 4;
    conflated.redelivery = 1;
    mock.plan(
        vec![
            subscribed_as(1, 5),
            delivery(1),
            gap(2, 2, 1),
            Ok(SubscribeEvent {
                event: Some(subscribe_event::Event::Message(conflated)),
            }),
            delivery(4),
            delivery(5),
        ],
        true,
    );
    let (status, stdout, stderr) = sb(
        address,
        &[
            "subscribe",
            "a.>",
            "--from",
            "earliest",
            "--count",
            "3",
            "--ack",
            "--durable",
            "billing",
            "--max-unacked",
            "2",
            "--policy",
            "conflate",
            "--throttle",
            "250ms",
            "--ack-timeout",
            "30s",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stderr,
        "sb: subscribed to a.> (next offset 1, subscription 5)\n"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(
        lines[1],
        r#"{"gap":{"from_offset":2,"to_offset":2,"count":1,"reason":"dropped"}}"#
    );
    let conflated = &json_lines(&stdout)[2];
    assert_eq!(
        (
            conflated["offset"].clone(),
            conflated["skipped"].clone(),
            conflated["redelivery"].clone()
        ),
        (3.into(), 4.into(), 1.into())
    );
    assert!(json_lines(&stdout)[0].get("skipped").is_none());
    assert_eq!(mock.acks(), [(5, vec![1]), (5, vec![3]), (5, vec![4])]);
    let request = mock.requests().pop().unwrap();
    assert_eq!(
        (
            request.durable_name.as_str(),
            request.max_unacked,
            request.policy,
            request.min_interval_ms,
            request.ack_timeout_ms
        ),
        (
            "billing",
            2,
            switchboard_client::proto::FlowPolicy::Conflate as i32,
            250,
            30_000
        )
    );

    // Without --ack nothing is acknowledged.
    mock.plan(vec![subscribed_as(1, 6), delivery(1)], true);
    let (status, _, stderr) = sb(address, &["subscribe", "a.>", "--count", "1"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(mock.acks().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_consumers_and_subscriptions() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    {
        let mut state = mock.state.lock().unwrap();
        state.consumers.push(consumer_info("billing"));
        state.consumers.push(consumer_info("audit"));
        state.subscriptions.push(SubscriptionInfo {
            subscription_id: 3,
            pattern: "a.>".to_owned(),
            policy: switchboard_client::proto::FlowPolicy::DropOldest as i32,
            next_offset: 11,
            delivered: 10,
            ..SubscriptionInfo::default()
        });
    }
    let (status, stdout, stderr) = sb(address, &["consumer", "list"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout.lines().next(),
        Some(concat!(
            r#"{"name":"billing","pattern":"orders.>","policy":"conflate","acked_offset":41,"#,
            r#""pending":2,"redeliveries":1,"connected":true,"#,
            r#""created_at":"2024-05-01T12:00:00.250Z"}"#
        ))
    );
    assert_eq!(json_lines(&stdout)[1]["name"], "audit");

    let (status, stdout, _) = sb(address, &["consumer", "info", "audit"], None).await;
    assert_eq!(status, 0);
    assert_eq!(json_lines(&stdout)[0]["name"], "audit");

    let (status, stdout, _) = sb(address, &["consumer", "delete", "audit"], None).await;
    assert_eq!((status, stdout.as_str()), (0, "{\"deleted\":\"audit\"}\n"));
    let (status, stdout, stderr) = sb(address, &["consumer", "info", "audit"], None).await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        "error: NOT_FOUND CONSUMER_NOT_FOUND: no durable consumer \"audit\"\n"
    );

    let (status, stdout, stderr) = sb(address, &["subscriptions"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        json_lines(&stdout),
        [serde_json::json!({
            "subscription_id": 3, "pattern": "a.>", "policy": "drop-oldest", "durable_name": "",
            "next_offset": 11, "lagging": false, "buffered_messages": 0, "buffered_bytes": 0,
            "peak_buffered_bytes": 0, "buffered_bytes_limit": 0, "pending": 0, "delivered": 10,
            "slow_switches": 0, "waiting_for_credit": false,
        })]
    );
}

/// The deliveries of [`output_modes`]: JSON with a header, text, binary, a gap, JSON again.
fn mixed_deliveries() -> Vec<Result<SubscribeEvent, Status>> {
    let with = |offset: u64, payload: &'static [u8], content_type: &str| {
        let mut message = message(offset);
        message.payload = payload.to_vec().into();
        message.content_type = content_type.to_owned();
        message.publish_time = Some(prost_types::Timestamp {
            seconds: 1_714_564_800,
            nanos: 0,
        });
        message
    };
    let mut json = with(1, br#"{"id":42,"tags":["a"]}"#, "application/json");
    json.headers.insert("source".to_owned(), "tour".to_owned());
    let event = |message| {
        Ok(SubscribeEvent {
            event: Some(subscribe_event::Event::Message(message)),
        })
    };
    vec![
        subscribed(1),
        event(json),
        event(with(2, b"plain words", "text/plain")),
        event(with(3, &[0xff, 0x00, 0x01], "application/octet-stream")),
        gap(4, 5, 2),
        event(with(6, b"[1, 2]", "")),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_output_modes() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let subscribe = ["subscribe", "a.>", "--from", "earliest", "--count", "4"];

    // json: one object per line; JSON payloads as JSON, others as strings or base64.
    mock.plan(mixed_deliveries(), true);
    let (status, stdout, stderr) = sb(address, &subscribe, None).await;
    assert_eq!(status, 0, "{stderr}");
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(
        lines[0]["payload"],
        serde_json::json!({"id": 42, "tags": ["a"]})
    );
    assert_eq!(lines[0]["payload_encoding"], "json");
    assert!(stdout.starts_with("{\"offset\":1,"), "{stdout}");
    assert_eq!(
        (
            lines[1]["payload"].as_str(),
            lines[1]["payload_encoding"].as_str()
        ),
        (Some("plain words"), Some("utf8"))
    );
    assert_eq!(
        (
            lines[2]["payload"].as_str(),
            lines[2]["payload_encoding"].as_str()
        ),
        (Some("/wAB"), Some("base64"))
    );
    assert_eq!(lines[3]["gap"]["count"], 2);
    assert_eq!(lines[4]["payload"], serde_json::json!([1, 2]));

    // The same through --output json given explicitly, and through SB_OUTPUT's default.
    mock.plan(mixed_deliveries(), true);
    let mut explicit = vec!["--output", "json"];
    explicit.extend_from_slice(&subscribe);
    let (_, json_again, _) = sb(address, &explicit, None).await;
    assert_eq!(json_again, stdout);

    // text: for people.
    mock.plan(mixed_deliveries(), true);
    let mut text = vec!["--output", "text"];
    text.extend_from_slice(&subscribe);
    let (status, stdout, stderr) = sb(address, &text, None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout,
        "[1] a.b  2024-05-01T12:00:00.000Z\n\
         source: tour\n\
         {\n  \"id\": 42,\n  \"tags\": [\n    \"a\"\n  ]\n}\n\n\
         [2] a.b  2024-05-01T12:00:00.000Z  (text/plain)\n\
         plain words\n\n\
         [3] a.b  2024-05-01T12:00:00.000Z  (application/octet-stream)\n\
         <3 bytes, base64: /wAB>\n\n\
         [gap] offsets 4..5: 2 message(s) dropped (drop-oldest, too far behind)\n\n\
         [6] a.b  2024-05-01T12:00:00.000Z\n\
         [\n  1,\n  2\n]\n\n"
    );

    // raw: the payloads' bytes, a newline after each; the gap on stderr.
    mock.plan(mixed_deliveries(), true);
    let mut raw = vec!["subscribe", "--output", "raw"];
    raw.extend_from_slice(&subscribe[1..]);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sb"))
            .arg("--server")
            .arg(address.to_string())
            .args(&raw)
            .env_remove("SB_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success());
    assert_eq!(
        output.stdout,
        b"{\"id\":42,\"tags\":[\"a\"]}\nplain words\n\xff\x00\x01\n[1, 2]\n"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.ends_with(
            "sb: [gap] offsets 4..5: 2 message(s) dropped (drop-oldest, too far behind)\n"
        ),
        "{stderr}"
    );

    // Records other than deliveries: aligned rows in text, JSON lines in raw.
    let (status, stdout, _) = sb(address, &["--output", "text", "info"], None).await;
    assert_eq!(status, 0);
    let first = stdout.lines().next().unwrap();
    assert_eq!(first, "version         mock");
    assert!(
        stdout
            .lines()
            .all(|line| line.len() > 16 && &line[14..16] == "  "),
        "{stdout}"
    );
    let (_, stdout, _) = sb(address, &["info", "--output", "raw"], None).await;
    assert_eq!(json_lines(&stdout)[0]["version"], "mock");

    let (status, _, stderr) = sb(address, &["--output", "yaml", "info"], None).await;
    assert_eq!(status, 2, "{stderr}");
}

/// `sb completions SHELL` needs no broker, and the scripts know sb's commands and flags; the bash
/// one, sourced, completes a command, `--output`'s values and a subcommand's flag.
#[tokio::test(flavor = "multi_thread")]
async fn sb_completions_for_bash_zsh_and_fish() {
    // Nothing listens here.
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (shell, marker, flags) in [
        ("bash", "complete -F _sb", ["--output", "--keep-newline"]),
        ("zsh", "#compdef sb", ["--output", "--keep-newline"]),
        ("fish", "complete -c sb", ["-l output", "-l keep-newline"]),
    ] {
        let (status, stdout, stderr) = sb(nowhere, &["completions", shell], None).await;
        assert_eq!(status, 0, "{shell}: {stderr}");
        assert!(stdout.contains(marker), "{shell}: {stdout}");
        for word in ["subscribe", "history", "entity"].iter().chain(&flags) {
            assert!(stdout.contains(word), "{shell} completes {word}");
        }
    }
    let (status, _, _) = sb(nowhere, &["completions", "tcsh"], None).await;
    assert_eq!(status, 2);

    let (_, script, _) = sb(nowhere, &["completions", "bash"], None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sb.bash");
    std::fs::write(&path, script).unwrap();
    // `_sb COMMAND WORD PREVIOUS` with COMP_WORDS and COMP_CWORD set, as bash calls it.
    let complete = |words: &str, previous: &str| {
        let program = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _sb sb \"${{COMP_WORDS[COMP_CWORD]}}\" {previous}; echo \"${{COMPREPLY[@]}}\"",
            path.display()
        );
        let output = std::process::Command::new("bash")
            .args(["-c", &program])
            .output()
            .expect("bash runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(complete("sb sub", "sb"), "subscribe subscriptions");
    assert_eq!(complete("sb --output ''", "--output"), "json text raw");
    assert_eq!(complete("sb publish a.b --keep", "a.b"), "--keep-newline");
}
