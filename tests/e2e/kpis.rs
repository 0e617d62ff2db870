//! KPI views over gRPC: defined through the log, values exact on known input, ETags that change
//! only with the values, watches, refusals with reasons, restarts and a cluster's agreement.

use std::time::{Duration, Instant};

use futures::StreamExt;
use switchboard_client::{Client, Publish};
use switchboard_e2e::{eventually, start_cluster, DEADLINE};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::kpi_service_client::KpiServiceClient;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::*;

const HANDLE_TIME: &str = r#"
name = "handle_time"
pattern = "calls.*.ended"
group_by = { segment = 1 }
windows = ["1m", "1h"]

[[measures]]
name = "seconds"
field = "/seconds"
"#;

async fn kpis(url: String) -> KpiServiceClient<Channel> {
    KpiServiceClient::new(Channel::from_shared(url).unwrap().connect().await.unwrap())
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

async fn define(client: &mut KpiServiceClient<Channel>, definition: &str) -> pb::View {
    client
        .define_view(pb::DefineViewRequest {
            definition: definition.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .view
        .unwrap()
}

fn get(view: &str, window: &str) -> pb::GetKpisRequest {
    pb::GetKpisRequest {
        view: view.into(),
        window: window.into(),
        windows: 1,
        ..Default::default()
    }
}

/// The named group of the newest window.
fn group<'a>(values: &'a pb::GetKpisResponse, name: &str) -> Option<&'a pb::KpiGroup> {
    values
        .windows
        .last()?
        .groups
        .iter()
        .find(|g| g.name == name)
}

/// Waits out the last seconds of the current UTC hour, if it is in them: the tests read the
/// hour's window and expect everything they publish in one window.
async fn away_from_an_hour_boundary() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 3600 - now % 3600;
    if left < 30 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

async fn call_ended(client: &Client, queue: &str, seconds: f64) {
    client
        .publish(Publish::new(
            format!("calls.{queue}.ended"),
            format!(r#"{{"seconds": {seconds}}}"#),
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_view_counts_and_measures_exactly_and_its_etag_moves_only_with_its_values() {
    away_from_an_hour_boundary().await;
    let f = fixture(&[]).await;
    let mut kpi = kpis(f.broker.url()).await;
    // Published before the view: the backfill counts it.
    call_ended(&f.client, "sales", 10.0).await;
    let view = define(&mut kpi, HANDLE_TIME).await;
    assert_eq!(view.name, "handle_time");
    let backfill = view.backfill.unwrap();
    assert_eq!((backfill.messages_read, backfill.messages_counted), (1, 1));
    for seconds in [20.0, 30.0] {
        call_ended(&f.client, "sales", seconds).await;
    }
    call_ended(&f.client, "support", 4.0).await;

    // The hour holds everything whatever minute it is now.
    let values = kpi
        .get_kpis(get("handle_time", "1h"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(values.window, "1h");
    let sales = group(&values, "sales").expect("a sales group");
    assert_eq!(sales.kind, pb::KpiGroupKind::Named as i32);
    assert_eq!(sales.messages, 3);
    let seconds = &sales.measures[0];
    assert_eq!(seconds.name, "seconds");
    assert_eq!((seconds.count, seconds.sum), (3, 60.0));
    assert_eq!(
        (seconds.avg, seconds.min, seconds.max),
        (Some(20.0), Some(10.0), Some(30.0))
    );
    let p50 = seconds.p50.unwrap();
    assert!((p50 - 20.0).abs() <= 0.2, "p50 {p50} within 1% of 20");
    assert_eq!(group(&values, "support").unwrap().messages, 1);

    // Not modified while nothing changes; modified once something does.
    let again = kpi
        .get_kpis(pb::GetKpisRequest {
            if_none_match: values.etag.clone(),
            ..get("handle_time", "1h")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.not_modified);
    assert_eq!(again.etag, values.etag);
    assert!(again.windows.is_empty());
    // A message the view does not count leaves the ETag alone.
    f.client
        .publish(Publish::new("calls.sales.started", "{}"))
        .await
        .unwrap();
    let unchanged = kpi
        .get_kpis(get("handle_time", "1h"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.etag, values.etag);
    call_ended(&f.client, "sales", 1.0).await;
    let changed = kpi
        .get_kpis(pb::GetKpisRequest {
            if_none_match: values.etag.clone(),
            ..get("handle_time", "1h")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.not_modified);
    assert_ne!(changed.etag, values.etag);
    assert_eq!(group(&changed, "sales").unwrap().messages, 4);

    // The view is listed, and survives a restart with its values.
    let listed = kpi
        .list_views(pb::ListViewsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.views.len(), 1);
    let mut broker = f.broker;
    broker.restart(&[]).unwrap();
    let mut kpi = kpis(broker.url()).await;
    let after = kpi
        .get_kpis(get("handle_time", "1h"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.etag, changed.etag, "the same values after a restart");
}

#[tokio::test]
async fn bad_definitions_and_unknown_views_are_refused_with_reasons_and_change_nothing() {
    let f = fixture(&[]).await;
    let mut kpi = kpis(f.broker.url()).await;
    let bad = kpi
        .define_view(pb::DefineViewRequest {
            definition: HANDLE_TIME.replace("\"1m\"", "\"7m\""),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(reason(&bad), "VIEW_INVALID");
    assert!(bad.message().contains("windows"), "{}", bad.message());
    let syntax = kpi
        .define_view(pb::DefineViewRequest {
            definition: "name = ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&syntax), "VIEW_INVALID");
    let listed = kpi
        .list_views(pb::ListViewsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.views.is_empty(), "nothing was defined");

    let missing = kpi.get_kpis(get("nope", "")).await.unwrap_err();
    assert_eq!(
        (missing.code(), reason(&missing).as_str()),
        (Code::NotFound, "VIEW_NOT_FOUND")
    );
    let missing = kpi
        .delete_view(pb::DeleteViewRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&missing), "VIEW_NOT_FOUND");
    define(&mut kpi, HANDLE_TIME).await;
    let window = kpi.get_kpis(get("handle_time", "5m")).await.unwrap_err();
    assert_eq!(reason(&window), "VIEW_INVALID");
    assert!(window.message().contains("1m, 1h"), "{}", window.message());
    kpi.delete_view(pb::DeleteViewRequest {
        name: "handle_time".into(),
    })
    .await
    .unwrap();
    let gone = kpi.get_kpis(get("handle_time", "")).await.unwrap_err();
    assert_eq!(reason(&gone), "VIEW_NOT_FOUND");
}

#[tokio::test]
async fn a_watch_sends_the_values_then_each_change_no_faster_than_its_interval() {
    away_from_an_hour_boundary().await;
    let f = fixture(&[]).await;
    let mut kpi = kpis(f.broker.url()).await;
    define(&mut kpi, HANDLE_TIME).await;
    let interval = Duration::from_secs(1);
    let mut watch = kpi
        .watch_kpis(pb::WatchKpisRequest {
            view: "handle_time".into(),
            window: "1h".into(),
            windows: 1,
            min_interval: Some(interval.try_into().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap().values.unwrap();
    assert!(group(&first, "sales").is_none());
    let started = Instant::now();
    // Publish steadily while reading updates, until one shows 50 sales calls.
    let publisher = {
        let client = f.client.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                call_ended(&client, "sales", f64::from(i)).await;
            }
        })
    };
    let mut updates = 0u32;
    let last = tokio::time::timeout(DEADLINE, async {
        loop {
            let values = watch.next().await.unwrap().unwrap().values.unwrap();
            updates += 1;
            if group(&values, "sales").is_some_and(|g| g.messages == 50) {
                return values;
            }
        }
    })
    .await
    .expect("an update with every call, in time");
    publisher.await.unwrap();
    assert_eq!(group(&last, "sales").unwrap().measures[0].count, 50);
    // At most one update per interval (an upper bound: a slow machine only sends fewer).
    let allowed = started.elapsed().as_secs_f64() / interval.as_secs_f64() + 1.0;
    assert!(
        f64::from(updates) <= allowed,
        "{updates} updates in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn every_node_of_a_cluster_holds_the_same_values() {
    away_from_an_hour_boundary().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path(), 3, &[]).expect("three nodes start");
    let client = Client::connect(nodes[0].url()).await.unwrap();
    eventually("a leader", || async {
        let status = client.cluster_status().await.ok()?;
        (status.leader_id != 0).then_some(())
    })
    .await
    .unwrap();
    let mut kpi = kpis(nodes[1].url()).await;
    define(&mut kpi, HANDLE_TIME).await;
    for (i, queue) in ["sales", "support", "sales", "billing"].iter().enumerate() {
        call_ended(&client, queue, 1.5 * i as f64).await;
    }
    // Every node reaches the same values (and so the same ETag) once it applied the log.
    let reference = kpi
        .get_kpis(get("handle_time", "1h"))
        .await
        .unwrap()
        .into_inner();
    let reference = if group(&reference, "billing").is_some() {
        reference
    } else {
        eventually("node 2 applied every call", || {
            let mut kpi = kpi.clone();
            async move {
                let values = kpi
                    .get_kpis(get("handle_time", "1h"))
                    .await
                    .ok()?
                    .into_inner();
                group(&values, "billing").is_some().then_some(values)
            }
        })
        .await
        .unwrap()
    };
    for node in &nodes {
        let kpi = kpis(node.url()).await;
        let etag = reference.etag.clone();
        eventually(&format!("node {} agrees", node.id), || {
            let mut kpi = kpi.clone();
            let etag = etag.clone();
            async move {
                let values = kpi
                    .get_kpis(get("handle_time", "1h"))
                    .await
                    .ok()?
                    .into_inner();
                (values.etag == etag).then_some(())
            }
        })
        .await
        .unwrap();
    }
}

/// A broker whose settings file holds `settings`, and a client connected to it.
async fn fixture_with(settings: &str) -> (Fixture, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, settings).unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;
    (f, dir)
}

fn json_body(response: &switchboard_e2e::HttpResponse) -> serde_json::Value {
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", response.body))
}

/// The named group of the newest window of an HTTP answer.
fn json_group<'a>(values: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    values["windows"].as_array()?.last()?["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)
}

#[tokio::test]
async fn over_http_values_carry_the_grpc_etag_answer_304_and_stream_changes() {
    use serde_json::json;
    use switchboard_e2e::{http_request, SseStream};

    away_from_an_hour_boundary().await;
    let (f, _config) = fixture_with(
        "[gateway]\nheartbeat = \"1s\"\n[kpis]\nhttp_max_age = \"7s\"\nhttp_stale_while_revalidate = \"40s\"\n",
    )
    .await;
    let mut kpi = kpis(f.broker.url()).await;
    define(&mut kpi, HANDLE_TIME).await;
    for seconds in [10.0, 20.0] {
        call_ended(&f.client, "sales", seconds).await;
    }
    call_ended(&f.client, "support", 4.5).await;
    let url = format!(
        "http://{}/v1/kpis/handle_time?window=1h&windows=2",
        f.broker.addr
    );

    // The gateway's answer is the gRPC one: same ETag, same numbers, as JSON numbers.
    let grpc = kpi
        .get_kpis(pb::GetKpisRequest {
            windows: 2,
            ..get("handle_time", "1h")
        })
        .await
        .unwrap()
        .into_inner();
    let answer = http_request("GET", &url, &[], b"").await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let quoted = format!("\"{}\"", grpc.etag);
    assert_eq!(answer.header("etag"), Some(quoted.as_str()));
    assert_eq!(
        answer.header("cache-control"),
        Some("max-age=7, stale-while-revalidate=40")
    );
    assert_eq!(answer.header("vary"), Some("authorization"));
    let values = json_body(&answer);
    assert_eq!(values["etag"], json!(grpc.etag));
    assert_eq!(values["view"], json!("handle_time"));
    assert_eq!(values["window"], json!("1h"));
    let windows = values["windows"].as_array().unwrap();
    assert_eq!(windows.len(), grpc.windows.len());
    for (json_window, grpc_window) in windows.iter().zip(&grpc.windows) {
        let start = grpc_window.start.as_ref().unwrap();
        assert_eq!(json_window["start"], json!(start.to_string()));
        assert!(
            json_window["start"].as_str().unwrap().ends_with(":00:00Z"),
            "an hour's window starts on the hour, in UTC: {json_window}"
        );
        assert_eq!(
            json_window["groups"].as_array().unwrap().len(),
            grpc_window.groups.len()
        );
    }
    let sales = json_group(&values, "sales").expect("a sales group");
    assert_eq!(sales["kind"], json!("NAMED"));
    assert_eq!(sales["messages"], json!(2));
    let seconds = &sales["measures"][0];
    assert_eq!(seconds["name"], json!("seconds"));
    assert_eq!(
        (seconds["count"].clone(), seconds["sum"].clone()),
        (json!(2), json!(30.0))
    );
    assert_eq!(
        (
            seconds["min"].clone(),
            seconds["max"].clone(),
            seconds["avg"].clone()
        ),
        (json!(10.0), json!(20.0), json!(15.0))
    );
    let grpc_sales = group(&grpc, "sales").unwrap();
    assert_eq!(seconds["p95"].as_f64(), grpc_sales.measures[0].p95);
    assert_eq!(
        json_group(&values, "support").unwrap()["measures"][0]["sum"],
        json!(4.5)
    );

    // A matching If-None-Match: 304, no body, the ETag and the caching terms again.
    let unchanged = http_request("GET", &url, &[("If-None-Match", &quoted)], b"")
        .await
        .unwrap();
    assert_eq!(unchanged.status, 304, "{unchanged:?}");
    assert!(unchanged.body.is_empty());
    assert_eq!(unchanged.header("etag"), Some(quoted.as_str()));
    assert_eq!(
        unchanged.header("cache-control"),
        Some("max-age=7, stale-while-revalidate=40")
    );
    let stale = http_request(
        "GET",
        &url,
        &[("If-None-Match", "\"0000000000000000\"")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(stale.status, 200);

    // The list, and a view that is not there.
    let list = http_request(
        "GET",
        &format!("http://{}/v1/kpis", f.broker.addr),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(list.status, 200, "{list:?}");
    let listed = json_body(&list);
    assert_eq!(listed["views"][0]["name"], json!("handle_time"));
    assert_eq!(
        listed["views"][0]["definition"]["pattern"],
        json!("calls.*.ended")
    );
    let missing = http_request(
        "GET",
        &format!("http://{}/v1/kpis/nothing_here", f.broker.addr),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(json_body(&missing)["reason"], json!("VIEW_NOT_FOUND"));

    // The watch: the values now, then the change a publish makes, then keep-alives.
    let mut watch = SseStream::open(
        &format!(
            "http://{}/v1/kpis/handle_time/watch?window=1h&windows=2",
            f.broker.addr
        ),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("content-type"), Some("text/event-stream"));
    let first = watch.next_event().await.unwrap();
    assert_eq!(first.event, None, "a plain message event: {first:?}");
    let first: serde_json::Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(first["etag"], json!(grpc.etag));
    assert_eq!(first["windows"].as_array().unwrap().len(), 2);
    assert_eq!(json_group(&first, "sales").unwrap()["messages"], json!(2));
    call_ended(&f.client, "sales", 30.0).await;
    let next = watch.next_event().await.unwrap();
    assert_eq!(next.event, None);
    let next: serde_json::Value = serde_json::from_str(&next.data).unwrap();
    assert_ne!(next["etag"], first["etag"]);
    let sales = json_group(&next, "sales").unwrap();
    assert_eq!(sales["messages"], json!(3));
    assert_eq!(sales["measures"][0]["sum"], json!(60.0));
    // The HTTP reading agrees with the stream's.
    let now = http_request("GET", &url, &[], b"").await.unwrap();
    assert_eq!(json_body(&now)["etag"], next["etag"]);
    watch.next_comment().await.unwrap();
    // A dropped view ends the watch with an error event naming why.
    kpi.delete_view(pb::DeleteViewRequest {
        name: "handle_time".into(),
    })
    .await
    .unwrap();
    let end = watch.next_event().await.unwrap();
    assert_eq!(end.event.as_deref(), Some("error"), "{end:?}");
    let end: serde_json::Value = serde_json::from_str(&end.data).unwrap();
    assert_eq!(end["reason"], json!("VIEW_NOT_FOUND"));
}

/// The Rust client's `kpi_*` methods: define, read with an ETag (and `not_modified` for the
/// current one), watch a change arrive, list, refusals with their reasons, delete.
#[tokio::test]
async fn the_rust_client_defines_reads_watches_and_deletes_views() {
    use switchboard_client::{KpiQuery, Reason};

    let f = fixture(&[]).await;
    let client = &f.client;
    let defined = client.kpi_define(HANDLE_TIME).await.unwrap();
    assert!(!defined.replaced);
    assert_eq!(defined.view.unwrap().name, "handle_time");

    let query = KpiQuery::new("handle_time").window("1h").windows(2);
    let mut watch = client
        .kpi_watch(query.clone(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (first.view.as_str(), first.window.as_str()),
        ("handle_time", "1h")
    );
    assert_eq!(first.windows.len(), 2);

    client
        .publish(Publish::new("calls.support.ended", r#"{"seconds":42}"#))
        .await
        .unwrap();
    let support = |reading: &pb::GetKpisResponse| -> u64 {
        reading
            .windows
            .iter()
            .flat_map(|w| &w.groups)
            .filter(|g| g.name == "support")
            .map(|g| g.messages)
            .sum()
    };
    // The next reading counts the call (one before it could only be a new hour starting).
    let changed = tokio::time::timeout(DEADLINE, async {
        loop {
            let reading = watch.next().await.unwrap().unwrap();
            if support(&reading) > 0 {
                return reading;
            }
        }
    })
    .await
    .expect("a reading with the call");
    assert_ne!(changed.etag, first.etag);
    assert_eq!(support(&changed), 1);

    let read = client.kpi_values(query.clone()).await.unwrap();
    assert!(!read.not_modified);
    assert_eq!(read.etag, changed.etag);
    let again = client
        .kpi_values(query.if_none_match(read.etag.clone()))
        .await
        .unwrap();
    assert!(again.not_modified);
    assert!(again.windows.is_empty());

    let listed = client.kpi_list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        client.kpi_get_view("handle_time").await.unwrap().name,
        "handle_time"
    );

    let invalid = client.kpi_define("name = \"x\"").await.unwrap_err();
    assert_eq!(invalid.reason(), Some(Reason::ViewInvalid), "{invalid}");
    client.kpi_delete("handle_time").await.unwrap();
    let missing = client.kpi_get_view("handle_time").await.unwrap_err();
    assert_eq!(missing.reason(), Some(Reason::ViewNotFound), "{missing}");
    let gone = client.kpi_delete("handle_time").await.unwrap_err();
    assert_eq!(gone.reason(), Some(Reason::ViewNotFound), "{gone}");
}

/// Windows are UTC whatever the broker's time zone: a broker in Chatham time (UTC+12:45 or
/// +13:45, whose local hours start at a quarter past the UTC hour) still starts its hour windows
/// on the UTC hour, and its day windows at 00:00 UTC.
#[tokio::test]
async fn windows_start_at_utc_boundaries_in_any_time_zone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = switchboard_e2e::BrokerProcess::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[],
        &[("TZ", "Pacific/Chatham")],
    )
    .unwrap();
    let mut kpi = kpis(broker.url()).await;
    define(
        &mut kpi,
        &HANDLE_TIME.replace("[\"1m\", \"1h\"]", "[\"1h\", \"1d\"]"),
    )
    .await;
    for (window, length) in [("1h", 3600), ("1d", 86_400)] {
        let values = kpi
            .get_kpis(pb::GetKpisRequest {
                windows: 3,
                ..get("handle_time", window)
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(values.windows.len(), 3);
        for w in &values.windows {
            let start = w.start.as_ref().unwrap();
            let end = w.end.as_ref().unwrap();
            assert_eq!(
                start.seconds % length,
                0,
                "{window} starts on a UTC boundary"
            );
            assert_eq!(end.seconds - start.seconds, length);
        }
    }
}
