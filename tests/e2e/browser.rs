//! The demo pages in headless Chromium (`web/demo`, docs/GATEWAY.md): two panels on two origins
//! stay in sync, a reloaded page resumes its stream exactly, and a page on an origin that is not
//! allowed receives nothing. Skipped with a message when Chromium or chromedriver is missing,
//! failed instead under `SWITCHBOARD_BROWSER_TESTS=1` (CI).

use std::net::SocketAddr;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use switchboard_e2e::web::{
    browser_tests_required, chromium_missing, demo_dir, serve_dir, Browser,
};
use switchboard_e2e::{eventually, http_request, BrokerProcess, SseStream};

/// `true` when the test may run; `false` (after saying why) when it is skipped.
fn browser_available(test: &str) -> bool {
    match chromium_missing() {
        None => true,
        Some(reason) if browser_tests_required() => {
            panic!("{test}: SWITCHBOARD_BROWSER_TESTS=1 but {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}; set SWITCHBOARD_BROWSER_TESTS=1 to fail instead");
            false
        }
    }
}

/// A broker allowing exactly the origins of `allowed` (demo servers on 127.0.0.1).
fn broker_for(data: &std::path::Path, allowed: &[SocketAddr]) -> Result<BrokerProcess> {
    let origins: Vec<String> = allowed.iter().map(|a| format!("http://{a}")).collect();
    BrokerProcess::start_with_env(
        data,
        "127.0.0.1:0",
        &[],
        &[("SWITCHBOARD_ORIGINS_ALLOW", &origins.join(","))],
    )
}

fn page(origin: SocketAddr, panel: &str, broker: &BrokerProcess, query: &str) -> String {
    format!(
        "http://{origin}/{panel}.html?broker={}{query}",
        broker.url()
    )
}

/// Publishes `seqs` on `channel` as one batch (no Origin: a service), returning their offsets.
async fn publish_seqs(
    broker: &BrokerProcess,
    channel: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> Result<Vec<u64>> {
    let batch: Vec<Value> = seqs
        .map(|seq| json!({"channel": channel, "payload": {"seq": seq}}))
        .collect();
    let body = serde_json::to_vec(&batch)?;
    let response = http_request(
        "POST",
        &format!("{}/v1/publish/batch", broker.url()),
        &[],
        &body,
    )
    .await?;
    ensure!(response.status == 200, "batch refused: {}", response.body);
    let acks: Vec<Value> = serde_json::from_str(&response.body)?;
    acks.iter()
        .map(|a| {
            a["ack"]["offset"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no ack in {a}"))
        })
        .collect()
}

const LIVE: &str = "return window.demo && window.demo.status === 'live'";

/// Fills the panel's own fields and submits its form; returns the page clock at submit (ms).
async fn edit(browser: &Browser, fields: Value) -> Result<f64> {
    let script = "const fields = arguments[0];
        for (const [id, value] of Object.entries(fields)) document.getElementById(id).value = value;
        const at = Date.now();
        document.getElementById('form').requestSubmit();
        return at;";
    let at = browser.eval(script, json!([fields])).await?;
    Ok(at.as_f64().unwrap_or_default())
}

#[tokio::test]
async fn an_edit_in_one_panel_appears_merged_in_the_other_panel_on_another_origin() -> Result<()> {
    if !browser_available("panels_sync") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let crm_origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let telephony_origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let broker = broker_for(dir.path(), &[crm_origin, telephony_origin])?;
    let (crm, telephony) = (Browser::start().await?, Browser::start().await?);
    crm.goto(&page(crm_origin, "crm", &broker, "&contact=7"))
        .await?;
    telephony
        .goto(&page(telephony_origin, "telephony", &broker, "&contact=7"))
        .await?;
    crm.wait_for("CRM panel live", LIVE).await?;
    telephony.wait_for("telephony panel live", LIVE).await?;

    let sent = edit(
        &crm,
        json!({"name": "Ada Lovelace", "email": "ada@example.com", "company": ""}),
    )
    .await?;
    let seen = telephony
        .wait_for(
            "the CRM edit in the telephony panel",
            "const c = window.demo.contact; return c && c.name === 'Ada Lovelace' ? window.demo.changedAt : null",
        )
        .await?;
    let latency_ms = seen.as_f64().unwrap_or_default() - sent;
    println!("panel sync latency: CRM save -> telephony panel shows it: {latency_ms:.0} ms");

    // The telephony panel writes its own fields on top of the version it shows (If-Match): the
    // CRM panel then shows both panels' fields merged.
    edit(
        &telephony,
        json!({"phone": "+33 1 23 45 67 89", "call_status": "ringing", "last_call": ""}),
    )
    .await?;
    let merged = crm
        .wait_for(
            "both panels' fields in the CRM panel",
            "const c = window.demo.contact; return c && c.phone ? c : null",
        )
        .await?;
    assert_eq!(merged["name"], "Ada Lovelace", "{merged}");
    assert_eq!(merged["email"], "ada@example.com", "{merged}");
    assert_eq!(merged["phone"], "+33 1 23 45 67 89", "{merged}");
    assert_eq!(merged["call_status"], "ringing", "{merged}");
    // Saved, not refused: the telephony edit was based on the current version.
    telephony
        .wait_for(
            "the telephony edit saved",
            "return window.demo.status === 'saved'",
        )
        .await?;

    // An unchanged entity read again with its ETag is a 304; an edit based on a version that
    // moved on is refused (412) and the panel says so, writing nothing.
    let entity_url = format!("{}/v1/entities/contact/7", broker.url());
    let revalidated = crm
        .eval(
            "return fetch(arguments[0]).then(r => {
                 const etag = r.headers.get('ETag');
                 return fetch(arguments[0], {headers: {'If-None-Match': etag}})
                     .then(again => [etag, again.status]);
             })",
            json!([entity_url]),
        )
        .await?;
    assert_eq!(revalidated, json!(["\"v2\"", 304]));
    crm.eval("window.demo.version = 1", json!([])).await?;
    edit(&crm, json!({"name": "Stale"})).await?;
    crm.wait_for(
        "the conflict reported",
        "return window.demo.status.startsWith('conflict')",
    )
    .await?;

    let stored = http_request(
        "GET",
        &format!("{}/v1/entities/contact/7", broker.url()),
        &[],
        b"",
    )
    .await?;
    let stored: Value = serde_json::from_str(&stored.body)?;
    assert_eq!(
        stored["fields"], merged,
        "the panel shows what the broker stores"
    );
    assert_eq!(stored["last_stamp"]["writer"], "telephony");

    if std::env::var_os("SWITCHBOARD_SCREENSHOTS").is_some() {
        let docs = demo_dir().join("../../docs");
        std::fs::write(docs.join("demo-crm.png"), crm.screenshot().await?)?;
        std::fs::write(
            docs.join("demo-telephony.png"),
            telephony.screenshot().await?,
        )?;
    }
    Ok(())
}

#[tokio::test]
async fn a_reloaded_panel_resumes_its_stream_from_the_last_event_id_with_no_gap_or_duplicate(
) -> Result<()> {
    if !browser_available("reload_resume") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let broker = broker_for(dir.path(), &[origin])?;
    let browser = Browser::start().await?;
    let url = page(origin, "telephony", &broker, "");
    browser.goto(&url).await?;
    browser.wait_for("panel live", LIVE).await?;
    // The feed starts at the latest offset once subscribed; wait for that before publishing.
    browser
        .wait_for("feed subscribed", "return window.demo.feedReady === true")
        .await?;

    let first = publish_seqs(&broker, "telephony.call", 1..=20).await?;
    let shown = browser
        .wait_for(
            "20 messages shown",
            "const f = window.demo.feed; return f.length >= 20 ? f.map(m => m.payload.seq) : null",
        )
        .await?;
    assert_eq!(shown, json!((1..=20).collect::<Vec<u64>>()));

    browser
        .eval("window.demo.telemetry.record('test.leaving')", json!([]))
        .await?;
    // Leave for another page of the same origin (the stream closes), publish while away, come back.
    browser.goto(&format!("http://{origin}/style.css")).await?;
    let saved = browser
        .eval(
            "return localStorage.getItem('switchboard.demo.lastEventId.telephony.>')",
            json!([]),
        )
        .await?;
    assert_eq!(
        saved,
        json!(first[19].to_string()),
        "the page kept the id of the last event it showed"
    );
    // An event queued just before the page goes away still arrives: sendBeacon on pagehide
    // (or the periodic fetch, if its timer fired first).
    let mut telemetry = SseStream::open(
        &format!(
            "{}/v1/subscribe?pattern=web.telemetry&start=earliest",
            broker.url()
        ),
        &[],
    )
    .await?;
    loop {
        let event = telemetry.next_event().await?;
        if event.event.is_none() && event.data.contains("\"test.leaving\"") {
            break;
        }
    }
    let second = publish_seqs(&broker, "telephony.call", 21..=30).await?;
    browser.goto(&url).await?;
    let resumed = browser
        .wait_for(
            "10 messages after the reload",
            "const f = window.demo.feed; return f.length >= 10 ? f : null",
        )
        .await?;
    // Then live messages continue the same sequence.
    publish_seqs(&broker, "telephony.call", 31..=32).await?;
    let after = browser
        .wait_for(
            "live messages after the reload",
            "const f = window.demo.feed; return f.length >= 12 ? f.map(m => m.payload.seq) : null",
        )
        .await?;
    assert_eq!(
        after,
        json!((21..=32).collect::<Vec<u64>>()),
        "no gap and no duplicate across the reload"
    );
    // Other channels (the pages' telemetry) share the offset sequence: the stream resumed at the
    // first offset of its pattern after the saved id.
    assert_eq!(resumed[0]["offset"], json!(second[0]));
    let from = browser
        .eval("return window.demo.resumedFrom", json!([]))
        .await?;
    assert_eq!(from, saved);

    // A reload while messages keep coming: whatever the old page showed last (the id it saved),
    // the new page continues right after it, through to the last message.
    let publishing = async {
        let mut offsets = Vec::new();
        for seq in 33..=80 {
            offsets.push((
                seq,
                publish_seqs(&broker, "telephony.call", seq..=seq).await?[0],
            ));
        }
        anyhow::Ok(offsets)
    };
    let (offsets, reloaded) = tokio::join!(publishing, browser.goto(&url));
    let (offsets, ()) = (offsets?, reloaded?);
    let after = browser
        .wait_for(
            "the last message after a reload under load",
            "const f = window.demo.feed;
             return f.length && f[f.length - 1].payload.seq === 80
                 ? [window.demo.resumedFrom, f.map(m => m.payload.seq)] : null",
        )
        .await?;
    let resumed_from: u64 = after[0].as_str().unwrap_or_default().parse()?;
    let expected: Vec<u64> = offsets
        .iter()
        .filter(|(_, offset)| *offset > resumed_from)
        .map(|(seq, _)| *seq)
        .collect();
    println!(
        "reload under load: the old page showed up to offset {resumed_from}; the new page \
         resumed with seq {:?}",
        expected.first()
    );
    assert!(resumed_from >= second[9], "the old page had shown seq 30");
    assert_eq!(
        after[1],
        json!(expected),
        "no gap and no duplicate across the reload"
    );
    Ok(())
}

/// A page that saved an id from a broker whose data has since been wiped asks to resume beyond the
/// end of the log: refused (`START_BEYOND_END`), it forgets the id and follows from now on.
#[tokio::test]
async fn a_panel_whose_saved_id_is_beyond_the_log_follows_from_now_on() -> Result<()> {
    if !browser_available("stale_id") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let broker = broker_for(dir.path(), &[origin])?;
    let browser = Browser::start().await?;
    // Any page of the origin reaches its storage.
    browser.goto(&format!("http://{origin}/style.css")).await?;
    browser
        .eval(
            "localStorage.setItem('switchboard.demo.lastEventId.telephony.>', '1000000')",
            json!([]),
        )
        .await?;
    browser
        .goto(&page(origin, "telephony", &broker, ""))
        .await?;
    browser
        .wait_for(
            "the feed subscribed without the stale id",
            "return window.demo.feedReady === true",
        )
        .await?;
    publish_seqs(&broker, "telephony.call", 1..=2).await?;
    let shown = browser
        .wait_for(
            "2 messages shown",
            "const f = window.demo.feed; return f.length >= 2 ? f.map(m => m.payload.seq) : null",
        )
        .await?;
    assert_eq!(shown, json!([1, 2]));
    Ok(())
}

#[tokio::test]
async fn a_page_on_an_origin_that_is_not_allowed_receives_nothing() -> Result<()> {
    if !browser_available("origin_refused") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let allowed = serve_dir(demo_dir(), "127.0.0.1:0")?;
    // No DNS names can be added here, so the refused origins differ from the allowed one the ways
    // a look-alike can: another host (127.0.0.2 is loopback too, but not the allowed host), the
    // same host on another port, and a look-alike name ending in another domain, which Chromium
    // resolves to loopback through --host-resolver-rules (no hosts file involved).
    let other_port = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let other_host = serve_dir(demo_dir(), "127.0.0.2:0")?;
    let broker = broker_for(dir.path(), &[allowed])?;
    let lookalike = format!("good.example.com.evil.test:{}", allowed.port());
    let refused = [other_port.to_string(), other_host.to_string(), lookalike];
    let browser = Browser::start_with(&["--host-resolver-rules=MAP *.evil.test 127.0.0.1"]).await?;

    for origin in &refused {
        browser
            .goto(&format!(
                "http://{origin}/crm.html?broker={}&contact=9",
                broker.url()
            ))
            .await?;
        // Both streams end for good: the broker answered 403 without CORS headers.
        browser
            .wait_for(
                &format!("streams closed on {origin}"),
                "return window.demo.sources.length === 2 && window.demo.sources.every(s => s.readyState === 2)",
            )
            .await?;
        // A script cannot read the entity either, nor write one.
        let read = browser
            .eval(
                "return fetch(arguments[0]).then(() => 'read', () => 'refused')",
                json!([format!("{}/v1/entities/contact/9", broker.url())]),
            )
            .await?;
        assert_eq!(read, "refused", "{origin}");
        let published = publish_seqs(&broker, "crm.note", 1..=1).await?;
        let write = browser
            .eval(
                "return fetch(arguments[0], {method: 'PATCH', body: '{\"name\":\"Mallory\"}'}).then(r => r.status, () => 'refused')",
                json!([format!("{}/v1/entities/contact/9", broker.url())]),
            )
            .await?;
        assert_eq!(write, "refused", "{origin}");
        let state = browser
            .eval(
                "return [window.demo.contact, window.demo.feed.length]",
                json!([]),
            )
            .await?;
        assert_eq!(
            state,
            json!([null, 0]),
            "{origin} saw data (message at {published:?})"
        );
    }
    let entity = http_request(
        "GET",
        &format!("{}/v1/entities/contact/9", broker.url()),
        &[],
        b"",
    )
    .await?;
    assert_eq!(entity.status, 404, "nothing was written: {}", entity.body);
    // The refusals are counted by reason, and the console lists them.
    let state_url = format!("{}/console/api/state", broker.admin_url());
    let refusals = eventually("origin refusals in the console state", || async {
        let state = switchboard_e2e::http_get(&state_url).await.ok()?;
        let state: Value = serde_json::from_str(&state.body).ok()?;
        state["refusals"]
            .as_array()?
            .iter()
            .find(|r| r["reason"] == "ORIGIN_NOT_ALLOWED")
            .cloned()
    })
    .await?;
    assert!(refusals["count"].as_f64() >= Some(3.0), "{refusals}");
    Ok(())
}

#[tokio::test]
async fn the_console_shows_the_channels_and_subscriptions_the_test_created() -> Result<()> {
    if !browser_available("console") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let broker = broker_for(dir.path(), &[origin])?;
    let (panel, console) = (Browser::start().await?, Browser::start().await?);
    panel
        .goto(&page(origin, "telephony", &broker, "&contact=5"))
        .await?;
    panel.wait_for("panel live", LIVE).await?;
    panel
        .wait_for("feed subscribed", "return window.demo.feedReady === true")
        .await?;
    let published = publish_seqs(&broker, "telephony.call.started", 1..=3).await?;
    panel
        .wait_for("3 messages shown", "return window.demo.feed.length >= 3")
        .await?;

    console
        .goto(&format!("{}/console", broker.admin_url()))
        .await?;
    // What the page shows, not only what its JSON says: the rendered tables' text.
    let shown = console
        .wait_for(
            "the channel and the subscription in the console",
            "const text = ['channels', 'subscriptions']
                .map(id => document.getElementById(id).textContent);
             return text[0].includes('telephony.call.started') && text[1].includes('telephony.>')
                ? window.consoleState : null",
        )
        .await?;
    let channel = shown["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["channel"] == "telephony.call.started"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(channel["recent_messages"], 3, "{shown}");
    let subscription = shown["subscriptions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["pattern"] == "telephony.>"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(subscription["policy"], "lossless", "{shown}");
    // Lag counts offsets of every channel behind the log's end; the feed has passed its own.
    assert!(
        subscription["next_offset"].as_u64() > Some(published[2]),
        "the panel has read its messages: {shown}"
    );
    assert_eq!(shown["cluster"]["leader"], shown["node_id"], "{shown}");
    Ok(())
}

/// The path and the zero line's height of the first line of chart `id` on the console, once the
/// page has drawn it from at least two points; `null` before.
fn chart_line(id: &str) -> String {
    format!(
        "const h = window.consoleHistory;
         const svg = document.querySelector('#{id} svg');
         const path = svg && svg.querySelector('path.line');
         if (!h || h.times_us.length < 2 || !path) return null;
         return {{ d: path.getAttribute('d'), zero: Number(svg.querySelector('line.grid').getAttribute('y1')) }};"
    )
}

/// Whether a chart line (from [`chart_line`]) has a point above its zero line: the y values of
/// its `M`/`L` commands, smaller is higher.
fn rises(line: &Value) -> bool {
    let (Some(d), Some(zero)) = (line["d"].as_str(), line["zero"].as_f64()) else {
        return false;
    };
    d.split(['M', 'L'])
        .filter_map(|point| point.split(['h', ' ']).nth(1)?.parse::<f64>().ok())
        .any(|y| y < zero - 0.5)
}

/// Publishes `count` messages on `orders.*` as fast as acks come, then `refused` that are refused.
async fn order_load(
    client: &switchboard_client::Client,
    count: usize,
    refused: usize,
) -> Result<()> {
    use switchboard_client::Publish;
    for i in 0..count {
        client
            .publish(Publish::new(
                format!("orders.o{}", i % 7),
                format!("{{\"i\":{i}}}"),
            ))
            .await?;
    }
    for _ in 0..refused {
        ensure!(
            client
                .publish(Publish::new("orders..bad", "{}"))
                .await
                .is_err(),
            "an empty segment is refused"
        );
    }
    Ok(())
}

/// The console's charts move when load runs: before any publish the publish chart's line lies on
/// its zero line; after a burst its SVG path changes and rises above it, and the lag chart draws
/// a line for the subscription, with nothing refused by the page's content security policy. With
/// `SWITCHBOARD_SCREENSHOTS` set it then runs two minutes of varying load with a slow subscriber
/// and writes docs/console.png.
#[tokio::test]
async fn the_console_charts_move_when_load_runs() -> Result<()> {
    use futures::StreamExt;
    use switchboard_client::{Client, Start, SubscribeOptions};

    if !browser_available("console charts") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start(&dir.path().join("data"), &[])?;
    let client = Client::connect(broker.url()).await?;
    let mut follower = client.subscribe("orders.>", Start::Latest).await?;
    let console = Browser::start().await?;
    console
        .goto(&format!("{}/console", broker.admin_url()))
        .await?;
    let before = console
        .wait_for("the publish chart drawn", &chart_line("chart-publish_rate"))
        .await?;
    ensure!(!rises(&before), "nothing published yet: {before}");

    const BURST: usize = 100;
    order_load(&client, BURST, 0).await?;
    for _ in 0..BURST {
        follower.next().await.transpose()?;
    }
    let line = chart_line("chart-publish_rate");
    let after = eventually("the publish chart rises", || async {
        let now = console.eval(&line, json!([])).await.ok()?;
        (now["d"] != before["d"] && rises(&now)).then_some(now)
    })
    .await?;
    ensure!(after["d"] != before["d"], "{before} -> {after}");
    let lag_series = console
        .wait_for(
            "a lag line for the subscription",
            "const paths = [...document.querySelectorAll('#chart-lag path.line')];
             const names = paths.map(p => p.getAttribute('data-series'));
             return names.some(n => n.endsWith(' orders.>')) ? names : null",
        )
        .await?;
    ensure!(
        lag_series.as_array().is_some_and(|n| n.len() == 1),
        "{lag_series}"
    );
    // Drawn under the page's strict content security policy, which refused nothing.
    let violations = console
        .eval("return window.consoleViolations", json!([]))
        .await?;
    ensure!(violations == json!([]), "CSP violations: {violations}");

    if std::env::var_os("SWITCHBOARD_SCREENSHOTS").is_some() {
        // A subscriber that acknowledges slowly, under credits, so that its lag shows, and
        // load in waves.
        let slow_options = SubscribeOptions::default().max_unacked(20);
        let mut slow = client
            .subscribe_with("orders.>", Start::Latest, slow_options)
            .await?;
        let started = std::time::Instant::now();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = slow.next().await {
                // Slow for a minute, so it falls behind, then as fast as it can: it catches up.
                if started.elapsed() < std::time::Duration::from_secs(60) {
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                if slow.ack(message.offset).await.is_err() {
                    break;
                }
            }
        });
        let draining = tokio::spawn(async move { while follower.next().await.is_some() {} });
        let mut wave = 0;
        while started.elapsed() < std::time::Duration::from_secs(120) {
            wave += 1;
            order_load(&client, 40 + 30 * (wave % 5), wave % 3).await?;
            // Load shaping (not synchronisation): quiet spells between the waves.
            tokio::time::sleep(std::time::Duration::from_millis(150 * (wave % 4) as u64)).await;
        }
        console
            .wait_for(
                "the lag chart with two lines",
                "return document.querySelectorAll('#chart-lag path.line').length >= 2",
            )
            .await?;
        let docs = demo_dir().join("../../docs");
        std::fs::write(docs.join("console.png"), console.screenshot().await?)?;
        reader.abort();
        draining.abort();
    }
    Ok(())
}

/// A broker allowing `origin`, on `listen`, with its data in `data`: started again on the same
/// address, the page's broker URL stays valid (`BrokerProcess::restart` would drop the origins).
fn telemetry_broker(
    data: &std::path::Path,
    listen: &str,
    origin: SocketAddr,
) -> Result<BrokerProcess> {
    BrokerProcess::start_with_env(
        data,
        listen,
        &[],
        &[("SWITCHBOARD_ORIGINS_ALLOW", &format!("http://{origin}"))],
    )
}

/// The payloads stored on `web.telemetry` so far, read from the start of the log up to a marker
/// the test publishes last (so the whole log before it has been read).
async fn stored_telemetry(broker: &BrokerProcess) -> Result<Vec<Value>> {
    let marker = json!([{"channel": "web.telemetry", "payload": {"marker": true}}]);
    let response = http_request(
        "POST",
        &format!("{}/v1/publish/batch", broker.url()),
        &[],
        &serde_json::to_vec(&marker)?,
    )
    .await?;
    ensure!(response.status == 200, "marker refused: {}", response.body);
    let mut stream = SseStream::open(
        &format!(
            "{}/v1/subscribe?pattern=web.telemetry&start=earliest",
            broker.url()
        ),
        &[],
    )
    .await?;
    let mut payloads = Vec::new();
    loop {
        let event = stream.next_event().await?;
        if event.event.is_some() {
            continue; // subscribed, gap
        }
        let message: Value = serde_json::from_str(&event.data)?;
        if message["payload"]["marker"] == true {
            return Ok(payloads);
        }
        payloads.push(message["payload"].clone());
    }
}

/// The `seq` of each stored event of the page `page`, in stored order.
fn seqs_of(payloads: &[Value], page: &Value) -> Vec<u64> {
    payloads
        .iter()
        .filter(|p| &p["page"] == page)
        .filter_map(|p| p["seq"].as_u64())
        .collect()
}

/// The page's telemetry through a `kill -9` and a restart of its broker: the page keeps recording
/// events (every 10 ms) all along; the sends that fail are retried with backoff, and in the end
/// every event is stored, exactly once — a batch stored whose answer was lost is answered
/// `duplicate` when sent again, thanks to each event's idempotency key.
#[tokio::test]
async fn telemetry_recorded_through_a_broker_restart_is_stored_exactly_once() -> Result<()> {
    if !browser_available("telemetry_restart") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("broker");
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let mut broker = telemetry_broker(&data, "127.0.0.1:0", origin)?;
    let listen = broker.addr.to_string();
    let browser = Browser::start().await?;
    browser
        .goto(&page(
            origin,
            "telephony",
            &broker,
            "&telemetry_every_ms=100&telemetry_max_backoff_ms=1000",
        ))
        .await?;
    browser.wait_for("panel live", LIVE).await?;
    browser
        .eval(
            "window.ticker = setInterval(() => window.demo.telemetry.record('test.tick'), 10)",
            json!([]),
        )
        .await?;
    browser
        .wait_for(
            "ticks stored before the kill",
            "const s = window.demo.telemetry.stats(); return s.stored >= 20 ? s : null",
        )
        .await?;
    // A batch stored whose answer is lost on the way back (as when the connection drops just
    // after the commit): sent again under the same keys, it is answered `duplicate`.
    browser
        .eval(
            "const send = window.fetch;
             let lost = false;
             window.fetch = async (...args) => {
                 const response = await send(...args);
                 if (!lost) { lost = true; throw new TypeError('the answer was lost'); }
                 return response;
             };",
            json!([]),
        )
        .await?;
    let retried = browser
        .wait_for(
            "the batch whose answer was lost answered duplicate",
            "const s = window.demo.telemetry.stats(); return s.duplicates >= 1 ? s : null",
        )
        .await?;
    println!("answer lost once: {retried}");

    broker.kill9();
    let down = browser
        .wait_for(
            "sends failing while the broker is down",
            "const s = window.demo.telemetry.stats(); return s.failures >= 3 ? s : null",
        )
        .await?;
    println!("broker down: {down}");
    let broker = telemetry_broker(&data, &listen, origin)?;
    // Events recorded while the broker was down get stored once it is back.
    let recorded_while_down = down["recorded"].as_u64().unwrap_or_default();
    browser
        .wait_for(
            "events from the outage stored",
            &format!(
                "const s = window.demo.telemetry.stats(); return s.stored > {recorded_while_down}"
            ),
        )
        .await?;
    let done = browser
        .wait_for(
            "everything recorded sent",
            "clearInterval(window.ticker);
             const s = window.demo.telemetry.stats();
             return s.queued === 0 && s.inFlight === 0 ? s : null",
        )
        .await?;
    println!("after the restart: {done}");
    let recorded = done["recorded"].as_u64().unwrap_or_default();
    assert_eq!(
        done["stored"],
        json!(recorded),
        "every event acked once: {done}"
    );
    assert_eq!(done["dropped"], 0, "{done}");
    assert_eq!(done["refused"], 0, "{done}");
    assert!(done["duplicates"].as_u64() >= Some(1), "{done}");

    let stored = seqs_of(&stored_telemetry(&broker).await?, &done["page"]);
    let mut sorted = stored.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        stored.len(),
        "an event stored twice: {stored:?}"
    );
    assert_eq!(
        sorted,
        (1..=recorded).collect::<Vec<u64>>(),
        "every event stored (none lost)"
    );
    Ok(())
}

/// The queue's bound: while the broker is down, a page over `maxEvents` drops its oldest events
/// and says how many in its widget; the newest are stored once the broker is back. A message the
/// broker refuses for good (an invalid channel) is not sent again, and does not hold up the rest.
#[tokio::test]
async fn telemetry_drops_its_oldest_events_over_its_bound_and_never_retries_a_refusal() -> Result<()>
{
    if !browser_available("telemetry_bound") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("broker");
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let mut broker = telemetry_broker(&data, "127.0.0.1:0", origin)?;
    let listen = broker.addr.to_string();
    let browser = Browser::start().await?;
    browser
        .goto(&page(
            origin,
            "telephony",
            &broker,
            "&telemetry_every_ms=100&telemetry_max_events=10&telemetry_max_backoff_ms=1000",
        ))
        .await?;
    browser.wait_for("panel live", LIVE).await?;

    // One refused message between two good ones: refused once, the others stored.
    browser
        .eval(
            "const t = window.demo.telemetry;
             t.record('test.before');
             t.record('test.refused', {}, {channel: 'not a channel'});
             t.record('test.after');",
            json!([]),
        )
        .await?;
    let settled = browser
        .wait_for(
            "the refusal settled",
            "const s = window.demo.telemetry.stats();
             return s.queued === 0 && s.inFlight === 0 && s.refused === 1 ? s : null",
        )
        .await?;
    assert_eq!(
        settled["failures"], 0,
        "a refusal is not a failure to retry: {settled}"
    );

    broker.kill9();
    let burst = browser
        .eval(
            "const t = window.demo.telemetry;
             const first = t.stats().recorded + 1;
             for (let i = 0; i < 25; i++) t.record('test.burst');
             return [first, t.stats()]",
            json!([]),
        )
        .await?;
    let first = burst[0].as_u64().unwrap_or_default();
    assert_eq!(
        burst[1]["dropped"], 15,
        "25 events in a queue of 10: {burst}"
    );
    assert_eq!(burst[1]["queued"], 10, "{burst}");
    let widget = browser
        .eval(
            "return document.getElementById('telemetry').textContent",
            json!([]),
        )
        .await?;
    assert!(
        widget.as_str().unwrap_or_default().contains("15 dropped"),
        "the widget shows the drops: {widget}"
    );
    browser
        .wait_for(
            "a failed send",
            "return window.demo.telemetry.stats().failures >= 1",
        )
        .await?;

    let broker = telemetry_broker(&data, &listen, origin)?;
    let done = browser
        .wait_for(
            "the queue sent",
            "const s = window.demo.telemetry.stats();
             return s.queued === 0 && s.inFlight === 0 ? s : null",
        )
        .await?;
    assert_eq!(done["refused"], 1, "the refusal was not sent again: {done}");
    let payloads = stored_telemetry(&broker).await?;
    let stored = seqs_of(&payloads, &done["page"]);
    // page.view (1), before (2), after (4): the refused one (3) is not stored; then the 10 newest
    // of the burst.
    let mut expected = vec![1, 2, 4];
    expected.extend(first + 15..first + 25);
    assert_eq!(
        stored, expected,
        "the oldest of the burst dropped, the rest once, in order"
    );
    Ok(())
}

/// Two readings in the shape of `GetKpisResponse` as JSON: three one-minute windows of
/// `widget_events` (2, 0 and 5 messages; the newest 3 from crm and 2 from telephony) and of
/// `save_latency` (no saves, then a p95 of 120.5 ms, then 80 ms).
fn kpi_fixture() -> (Value, Value) {
    let window = |minute: u32, groups: Value| {
        json!({
            "start": format!("2026-12-07T12:0{minute}:00Z"),
            "end": format!("2026-12-07T12:0{}:00Z", minute + 1),
            "groups": groups,
        })
    };
    let events = json!({
        "etag": "\"e1\"", "view": "widget_events", "window": "1m",
        "windows": [
            window(0, json!([{"kind": "named", "name": "crm", "messages": 2, "measures": []}])),
            window(1, json!([])),
            window(2, json!([
                {"kind": "named", "name": "crm", "messages": 3, "measures": []},
                {"kind": "named", "name": "telephony", "messages": 2, "measures": []},
            ])),
        ],
    });
    let saves = |count: u64, p95: Option<f64>| {
        let mut measure = json!({"name": "ms", "count": count, "sum": 0.0});
        if let Some(p95) = p95 {
            measure["p95"] = json!(p95);
            measure["avg"] = json!(p95);
        }
        json!([{"kind": "missing", "messages": count, "measures": [measure]}])
    };
    let latency = json!({
        "etag": "\"s1\"", "view": "save_latency", "window": "1m",
        "windows": [
            window(0, json!([])),
            window(1, saves(4, Some(120.5))),
            window(2, saves(2, Some(80.0))),
        ],
    });
    (events, latency)
}

/// The KPI page (web/demo/kpi.html) draws its tiles and sparklines from readings, under its
/// strict CSP. The readings are handed to the page as its feed would (`kpiDemo.show`, what the
/// SSE watch, the polling and an embedding page's postMessage all call).
#[tokio::test]
async fn the_kpi_page_draws_tiles_and_sparklines_from_readings() -> Result<()> {
    if !browser_available("kpi tiles") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let broker = broker_for(dir.path(), &[origin])?;
    let browser = Browser::start().await?;
    browser
        .goto(&format!(
            "http://{origin}/kpi.html?broker={}&window=1m&windows=3",
            broker.url()
        ))
        .await?;
    browser
        .wait_for("the KPI page loaded", "return window.kpiDemo ? true : null")
        .await?;
    let (events, latency) = kpi_fixture();
    for reading in [&events, &latency] {
        let shown = browser
            .eval("return window.kpiDemo.show(arguments[0])", json!([reading]))
            .await?;
        ensure!(shown == json!(true), "{reading}");
    }
    let tiles = browser
        .eval(
            "return [...document.querySelectorAll('.tile')].map(t => ({
               view: t.dataset.view, stat: t.dataset.stat,
               value: t.querySelector('.value') && t.querySelector('.value').textContent,
               groups: [...t.querySelectorAll('li')].map(li => li.dataset.group + '=' + li.dataset.messages),
               spark: t.querySelector('svg.spark').dataset.values,
               points: t.querySelector('svg.spark polyline').getAttribute('points').split(' ').length,
             }))",
            json!([]),
        )
        .await?;
    ensure!(
        tiles
            == json!([
                {"view": "widget_events", "stat": "messages", "value": "5", "groups": [],
                 "spark": "2,0,5", "points": 3},
                {"view": "widget_events", "stat": "groups", "value": null,
                 "groups": ["crm=3", "telephony=2"], "spark": "2,0,5", "points": 3},
                {"view": "save_latency", "stat": "ms.p95", "value": "80 ms", "groups": [],
                 "spark": ",120.5,80", "points": 3},
            ]),
        "{tiles}"
    );
    // A newer reading moves the tile.
    let mut newer = events.clone();
    newer["windows"][2]["groups"][1]["messages"] = json!(7);
    browser
        .eval("return window.kpiDemo.show(arguments[0])", json!([newer]))
        .await?;
    let value = browser
        .eval(
            "return document.querySelector('.tile[data-stat=messages] .value').textContent",
            json!([]),
        )
        .await?;
    ensure!(value == json!("10"), "{value}");
    let violations = browser
        .eval("return window.kpiDemo.violations", json!([]))
        .await?;
    ensure!(violations == json!([]), "CSP violations: {violations}");
    // And the policy holds: an inline script is refused (and reported), not run.
    browser
        .eval(
            "const s = document.createElement('script');
             s.textContent = 'window.inlineRan = true';
             document.body.appendChild(s);",
            json!([]),
        )
        .await?;
    let refused = browser
        .wait_for(
            "the inline script refused",
            "return window.kpiDemo.violations.length ? window.kpiDemo.violations : null",
        )
        .await?;
    let ran = browser
        .eval("return window.inlineRan === true", json!([]))
        .await?;
    ensure!(ran == json!(false), "an inline script ran: {refused}");
    ensure!(
        refused[0]
            .as_str()
            .is_some_and(|v| v.starts_with("script-src")),
        "{refused}"
    );
    Ok(())
}

/// The KPI page embedded as documented (docs/KPIS.md): in an `<iframe sandbox="allow-scripts">`
/// of a host page (web/demo/kpi-embed.html), its script runs under its CSP in an opaque origin,
/// names its views to the host, and shows what the host posts in (and only that).
#[tokio::test]
async fn the_kpi_page_runs_in_a_sandboxed_frame_fed_by_its_host_page() -> Result<()> {
    if !browser_available("kpi embedded") {
        return Ok(());
    }
    let origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{origin}/kpi-embed.html?feed=none"))
        .await?;
    let views = browser
        .wait_for(
            "the frame named its views",
            "const v = window.embedDemo && [...window.embedDemo.followed]; return v && v.length ? v : null",
        )
        .await?;
    ensure!(views == json!(["widget_events", "save_latency"]), "{views}");
    let (events, _) = kpi_fixture();
    browser
        .eval("window.embedDemo.post(arguments[0])", json!([events]))
        .await?;
    let shown = browser
        .wait_for(
            "the frame showed the reading",
            "return window.embedDemo.shown.length ? window.embedDemo.shown : null",
        )
        .await?;
    ensure!(
        shown == json!([{"view": "widget_events", "etag": "\"e1\""}]),
        "{shown}"
    );
    // The frame is sandboxed: the host cannot reach into its document.
    let reachable = browser
        .eval(
            "try { return !!document.getElementById('kpis').contentWindow.document; } catch (e) { return false; }",
            json!([]),
        )
        .await?;
    ensure!(
        reachable == json!(false),
        "the sandboxed frame's document was reachable"
    );
    Ok(())
}

/// End to end: the demo's KPI views defined as the demo does, the KPI page on its own origin fed
/// by the gateway's SSE watch, and telemetry recorded by the CRM panel on another origin: the
/// page's event tile moves, and its feed says it is live (not polling, not fed by hand).
#[tokio::test]
async fn telemetry_sent_by_a_panel_moves_a_tile_on_the_kpi_page() -> Result<()> {
    if !browser_available("kpi end to end") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let crm_origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let kpi_origin = serve_dir(demo_dir(), "127.0.0.1:0")?;
    let broker = broker_for(dir.path(), &[crm_origin, kpi_origin])?;
    let client = switchboard_client::Client::connect(broker.url()).await?;
    for view in ["widget_events", "save_latency"] {
        let definition =
            std::fs::read_to_string(demo_dir().join("kpis").join(format!("{view}.toml")))?;
        client.kpi_define(definition).await?;
    }
    let (kpi, crm) = (Browser::start().await?, Browser::start().await?);
    kpi.goto(&format!(
        "http://{kpi_origin}/kpi.html?broker={}&window=1m&windows=3",
        broker.url()
    ))
    .await?;
    let tile = "const t = document.querySelector('.tile[data-stat=messages] .value');
        return t && t.textContent !== '' ? Number(t.textContent) : null";
    let before = kpi
        .wait_for("the event tile shows a first reading", tile)
        .await?;
    let before = before.as_f64().unwrap_or_default();
    crm.goto(&page(
        crm_origin,
        "crm",
        &broker,
        "&contact=9&telemetry_every_ms=200",
    ))
    .await?;
    crm.wait_for("CRM panel live", LIVE).await?;
    edit(
        &crm,
        json!({"name": "Grace Hopper", "email": "", "company": ""}),
    )
    .await?;
    let moved = kpi
        .wait_for(
            "the event tile counts the panel's telemetry",
            &format!(
                "const t = document.querySelector('.tile[data-stat=messages] .value');
                 const n = t ? Number(t.textContent) : NaN;
                 return n > {before} ? n : null"
            ),
        )
        .await?;
    ensure!(moved.as_f64().unwrap_or_default() > before, "{moved}");
    let feed = kpi
        .eval(
            "return document.getElementById('feed-status').textContent",
            json!([]),
        )
        .await?;
    ensure!(
        feed.as_str()
            .is_some_and(|f| f.contains("widget_events: live")),
        "fed by the SSE watch: {feed}"
    );
    let violations = kpi
        .eval("return window.kpiDemo.violations", json!([]))
        .await?;
    ensure!(violations == json!([]), "CSP violations: {violations}");

    if std::env::var_os("SWITCHBOARD_SCREENSHOTS").is_some() {
        // A few more saves, so that the latency tile has values too, then docs/kpi.png.
        for name in ["Ada", "Alan", "Barbara", "Edsger"] {
            edit(&crm, json!({"name": name, "email": "", "company": ""})).await?;
            crm.wait_for(
                "the save answered",
                &format!(
                    "const c = window.demo.contact; return c && c.name === '{name}' ? true : null"
                ),
            )
            .await?;
        }
        kpi.wait_for(
            "the latency tile has a value",
            "const t = document.querySelector('.tile[data-view=save_latency] .value');
             return t && /ms/.test(t.textContent) ? t.textContent : null",
        )
        .await?;
        let docs = demo_dir().join("../../docs");
        std::fs::write(docs.join("kpi.png"), kpi.screenshot().await?)?;
    }
    Ok(())
}
