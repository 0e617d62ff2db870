//! The browser gateway (HTTP/JSON and Server-Sent Events on the gRPC port): publish seen by gRPC
//! subscribers, SSE resume by `Last-Event-ID`, ETags, origins and CORS, and JSON errors.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use switchboard_client::Start;
use switchboard_e2e::{http_request, BrokerProcess, HttpResponse, SseEvent, SseStream};
use tempfile::TempDir;

use crate::common::*;

const SECRET: &str = "an hs256 secret that is long enough for the verifier";

fn base(broker: &BrokerProcess) -> String {
    format!("http://{}", broker.addr)
}

fn body(response: &HttpResponse) -> Value {
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", response.body))
}

async fn post(url: &str, headers: &[(&str, &str)], value: &Value) -> HttpResponse {
    http_request("POST", url, headers, value.to_string().as_bytes())
        .await
        .unwrap()
}

/// A broker whose settings file holds `settings`.
fn start_with(settings: &str) -> (BrokerProcess, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, settings).unwrap();
    let broker = BrokerProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .expect("broker starts");
    (broker, dir)
}

/// The offset a message event carries as its SSE id, checked against its JSON.
fn message_offset(event: &SseEvent) -> u64 {
    assert_eq!(event.event, None, "not a message event: {event:?}");
    let id: u64 = event.id.as_deref().unwrap().parse().unwrap();
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["offset"], json!(id));
    id
}

async fn next_message(stream: &mut SseStream) -> (u64, Value) {
    loop {
        let event = stream.next_event().await.unwrap();
        if event.event.is_none() {
            let offset = message_offset(&event);
            return (offset, serde_json::from_str(&event.data).unwrap());
        }
    }
}

#[tokio::test]
async fn http_publishes_reach_grpc_subscribers_and_batches_ack_each_message() {
    let f = fixture(&[]).await;
    let url = base(&f.broker);
    let mut subscription = f.client.subscribe("web.>", Start::Latest).await.unwrap();

    // sendBeacon posts text/plain: it is parsed as JSON all the same.
    let single = post(
        &format!("{url}/v1/publish"),
        &[("Content-Type", "text/plain;charset=UTF-8")],
        &json!({ "channel": "web.click", "payload": { "button": "save" }, "headers": { "tab": "1" } }),
    )
    .await;
    assert_eq!(single.status, 200, "{single:?}");
    let ack = body(&single);
    assert_eq!(ack["duplicate"], json!(false));

    let batch = post(
        &format!("{url}/v1/publish/batch"),
        &[("Content-Type", "application/json")],
        &json!([
            { "channel": "web.view", "payload": 1 },
            { "channel": "$reserved", "payload": 2 },
            { "channel": "web.view", "payload": 3, "idempotency_key": "k-3" },
        ]),
    )
    .await;
    assert_eq!(batch.status, 200, "{batch:?}");
    let answers = body(&batch);
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 3);
    let first = answers[0]["ack"]["offset"].as_u64().unwrap();
    assert_eq!(answers[1]["error"]["code"], json!("INVALID_ARGUMENT"));
    assert!(answers[1]["error"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("CHANNEL"));
    let third = answers[2]["ack"]["offset"].as_u64().unwrap();
    assert!(first < third, "batch order kept: {first} < {third}");

    let got = take(&mut subscription, 3).await;
    assert_eq!(
        offsets(&got),
        vec![ack["offset"].as_u64().unwrap(), first, third]
    );
    let payload: Value = serde_json::from_slice(&got[0].payload).unwrap();
    assert_eq!(payload, json!({ "button": "save" }));
    assert_eq!(got[0].headers.get("tab").map(String::as_str), Some("1"));
    assert_eq!(payload_text(&got[2]), "3");

    // Bad input: a precise JSON error, nothing written.
    let bad = http_request("POST", &format!("{url}/v1/publish"), &[], b"{not json")
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(body(&bad)["reason"], json!("BODY_MALFORMED"));
    let marker = post(
        &format!("{url}/v1/publish"),
        &[],
        &json!({ "channel": "web.marker", "payload": null }),
    )
    .await;
    assert_eq!(marker.status, 200);
    let next = take(&mut subscription, 1).await;
    assert_eq!(
        next[0].channel, "web.marker",
        "the bad request stored nothing"
    );
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_with_no_gap_and_no_duplicate() {
    let f = fixture(&[]).await;
    let url = base(&f.broker);
    let publish = |i: u32| {
        let url = url.clone();
        async move {
            let r = post(
                &format!("{url}/v1/publish"),
                &[],
                &json!({ "channel": format!("room.r{}", i % 2), "payload": { "i": i } }),
            )
            .await;
            assert_eq!(r.status, 200, "{r:?}");
            body(&r)["offset"].as_u64().unwrap()
        }
    };
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(publish(i).await);
    }

    let stream_url = format!("{url}/v1/subscribe?pattern=room.%3E&start=earliest");
    let mut first = SseStream::open(&stream_url, &[]).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), Some("text/event-stream"));
    let subscribed = first.next_event().await.unwrap();
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_message(&mut first).await.0);
    }
    // The page goes away mid-stream; more is published while it is gone.
    drop(first);
    for i in 5..8 {
        published.push(publish(i).await);
    }

    // EventSource's reconnect: the header names the last id it received.
    let last = seen.last().unwrap().to_string();
    let mut again = SseStream::open(&stream_url, &[("Last-Event-ID", &last)])
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    for _ in 0..5 {
        seen.push(next_message(&mut again).await.0);
    }
    assert_eq!(seen, published, "every message once, in order");

    // A reloaded page passes the id as a parameter instead.
    let reload_url = format!(
        "{url}/v1/subscribe?pattern=room.%3E&last_event_id={}",
        published[5]
    );
    let mut reloaded = SseStream::open(&reload_url, &[]).await.unwrap();
    let (offset, message) = next_message(&mut reloaded).await;
    assert_eq!(offset, published[6]);
    assert_eq!(message["payload"], json!({ "i": 6 }));
    assert_eq!(message["channel"], json!("room.r0"));

    // A bad parameter is refused before any stream starts.
    let bad = http_request(
        "GET",
        &format!("{url}/v1/subscribe?pattern=room.%3E&policy=sometimes"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(body(&bad)["reason"], json!("POLICY_INVALID"));
}

#[tokio::test]
async fn entities_answer_304_when_unchanged_and_412_on_a_stale_if_match() {
    let f = fixture(&[]).await;
    let entity = format!("{}/v1/entities/contact/42", base(&f.broker));

    let created = http_request("PATCH", &entity, &[], br#"{"name":"Ada"}"#)
        .await
        .unwrap();
    assert_eq!(created.status, 200, "{created:?}");
    let etag = created.header("etag").unwrap().to_owned();
    assert_eq!(etag, "\"v1\"");

    let read = http_request("GET", &entity, &[], b"").await.unwrap();
    assert_eq!(read.status, 200);
    assert_eq!(read.header("etag"), Some(etag.as_str()));
    assert_eq!(body(&read)["fields"], json!({ "name": "Ada" }));

    let unchanged = http_request("GET", &entity, &[("If-None-Match", &etag)], b"")
        .await
        .unwrap();
    assert_eq!(unchanged.status, 304);
    assert!(unchanged.body.is_empty());

    let updated = http_request(
        "PUT",
        &entity,
        &[("If-Match", &etag), ("X-Switchboard-Writer", "telephony")],
        br#"{"phone":"+33 1 23"}"#,
    )
    .await
    .unwrap();
    assert_eq!(updated.status, 200, "{updated:?}");
    let now = body(&updated);
    assert_eq!(now["version"], json!(2));
    assert_eq!(now["fields"], json!({ "name": "Ada", "phone": "+33 1 23" }));
    assert_eq!(now["last_stamp"]["writer"], json!("telephony"));

    // The old ETag no longer matches: a changed entity is sent again, a stale write refused.
    let changed = http_request("GET", &entity, &[("If-None-Match", &etag)], b"")
        .await
        .unwrap();
    assert_eq!(changed.status, 200);
    let stale = http_request(
        "PATCH",
        &entity,
        &[("If-Match", &etag)],
        br#"{"name":"Bob"}"#,
    )
    .await
    .unwrap();
    assert_eq!(stale.status, 412, "{stale:?}");
    let error = body(&stale);
    assert_eq!(error["reason"], json!("VERSION_CONFLICT"));
    assert_eq!(error["metadata"]["current_version"], json!("2"));
    let after = http_request("GET", &entity, &[], b"").await.unwrap();
    assert_eq!(
        body(&after)["fields"]["name"],
        json!("Ada"),
        "nothing written"
    );

    let missing = http_request(
        "GET",
        &format!("{}/v1/entities/contact/nope", base(&f.broker)),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(body(&missing)["reason"], json!("ENTITY_NOT_FOUND"));
    let nowhere = http_request(
        "GET",
        &format!("{}/v1/nowhere/at/all", base(&f.broker)),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(nowhere.status, 404, "{nowhere:?}");
    assert_eq!(body(&nowhere)["reason"], json!("ENDPOINT_NOT_FOUND"));
    // A known path with another method: 405, with a JSON body (it used to be empty).
    let wrong_method = http_request(
        "DELETE",
        &format!("{}/v1/publish", base(&f.broker)),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(wrong_method.status, 405, "{wrong_method:?}");
    assert_eq!(body(&wrong_method)["reason"], json!("METHOD_NOT_ALLOWED"));
}

#[tokio::test]
async fn only_allowed_origins_get_cors_headers_and_data() {
    let (broker, _dir) = start_with("[origins]\nallow = [\"https://good.example.com\"]\n");
    let url = base(&broker);
    let good = "https://good.example.com";

    let preflight = http_request(
        "OPTIONS",
        &format!("{url}/v1/publish"),
        &[("Origin", good), ("Access-Control-Request-Method", "POST")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert_eq!(preflight.header("access-control-allow-origin"), Some(good));
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));

    let allowed = post(
        &format!("{url}/v1/publish"),
        &[("Origin", good)],
        &json!({ "channel": "web.ok", "payload": 1 }),
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.header("access-control-allow-origin"), Some(good));

    for evil in [
        "https://good.example.com.evil.test",
        "https://evil.test",
        "http://good.example.com",
        "null",
    ] {
        let preflight = http_request(
            "OPTIONS",
            &format!("{url}/v1/publish"),
            &[("Origin", evil), ("Access-Control-Request-Method", "POST")],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(preflight.status, 403, "{evil}: {preflight:?}");
        assert_eq!(preflight.header("access-control-allow-origin"), None);

        // A text/plain POST needs no preflight: it must be refused on its own.
        let publish = post(
            &format!("{url}/v1/publish"),
            &[("Origin", evil), ("Content-Type", "text/plain")],
            &json!({ "channel": "web.evil", "payload": 1 }),
        )
        .await;
        assert_eq!(publish.status, 403, "{evil}");
        assert_eq!(publish.header("access-control-allow-origin"), None);
        assert_eq!(body(&publish)["reason"], json!("ORIGIN_NOT_ALLOWED"));

        let stream = SseStream::open(
            &format!("{url}/v1/subscribe?pattern=web.%3E&start=earliest"),
            &[("Origin", evil)],
        )
        .await
        .unwrap();
        assert_eq!(stream.status, 403, "{evil}");
        assert_eq!(stream.header("access-control-allow-origin"), None);
        assert_ne!(stream.header("content-type"), Some("text/event-stream"));
    }

    // Nothing from the refused origins was stored: the log holds the one allowed message.
    let mut all = SseStream::open(
        &format!("{url}/v1/subscribe?pattern=web.%3E&start=earliest"),
        &[("Origin", good)],
    )
    .await
    .unwrap();
    assert_eq!(all.header("access-control-allow-origin"), Some(good));
    let (_, first) = next_message(&mut all).await;
    assert_eq!(first["channel"], json!("web.ok"));
    let marker = post(
        &format!("{url}/v1/publish"),
        &[],
        &json!({ "channel": "web.marker", "payload": 2 }),
    )
    .await;
    assert_eq!(marker.status, 200);
    let (_, next) = next_message(&mut all).await;
    assert_eq!(next["channel"], json!("web.marker"));
}

/// A broker with authentication on (plus `settings`), and a token for `widget-1` that may publish
/// and subscribe on `web.>`.
fn secured(settings: &str) -> (BrokerProcess, [TempDir; 2], String) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hs256.secret");
    std::fs::write(&key, SECRET).unwrap();
    let (broker, config_dir) = start_with(&format!(
        "[auth]\nhs256_secret_file = {:?}\naudiences = [\"switchboard\"]\n{settings}",
        key.display().to_string()
    ));
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({
            "sub": "widget-1", "aud": "switchboard", "exp": exp,
            "sb": { "publish": ["web.>"], "subscribe": ["web.>"] },
        }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    (broker, [dir, config_dir], token)
}

#[tokio::test]
async fn with_authentication_on_the_gateway_needs_a_token_and_checks_its_permissions() {
    let (broker, _dir, token) = secured("");
    let url = base(&broker);
    let bearer = format!("Bearer {token}");
    let message = json!({ "channel": "web.ok", "payload": 1 });

    let anonymous = post(&format!("{url}/v1/publish"), &[], &message).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let error = body(&anonymous);
    assert_eq!(error["code"], json!("UNAUTHENTICATED"));
    assert_eq!(error["reason"], json!("TOKEN_MISSING"));

    let forged = post(
        &format!("{url}/v1/publish"),
        &[("Authorization", "Bearer not.a.token")],
        &message,
    )
    .await;
    assert_eq!(forged.status, 401);

    let denied = post(
        &format!("{url}/v1/publish"),
        &[("Authorization", &bearer)],
        &json!({ "channel": "crm.contact", "payload": 1 }),
    )
    .await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(body(&denied)["reason"], json!("PUBLISH_DENIED"));

    let ok = post(
        &format!("{url}/v1/publish"),
        &[("Authorization", &bearer)],
        &message,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");

    // EventSource cannot set headers: the token may come as a parameter.
    let mut stream = SseStream::open(
        &format!("{url}/v1/subscribe?pattern=web.%3E&start=earliest&access_token={token}"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(stream.status, 200);
    let (_, first) = next_message(&mut stream).await;
    assert_eq!(first["channel"], json!("web.ok"));
    let refused = http_request(
        "GET",
        &format!("{url}/v1/subscribe?pattern=crm.%3E&access_token={token}"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(body(&refused)["reason"], json!("SUBSCRIBE_DENIED"));
}

/// One gRPC-Web message frame (flag 0, big-endian length, the protobuf bytes), base64 for the
/// `-text` encoding browsers use without binary streams.
fn grpc_web_text(message: &impl prost::Message) -> String {
    use base64::Engine as _;
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&body);
    base64::engine::general_purpose::STANDARD.encode(frame)
}

/// The frames of a `-text` gRPC-Web response body: (flag, bytes).
fn grpc_web_frames(body: &str) -> Vec<(u8, Vec<u8>)> {
    try_grpc_web_frames(body).unwrap_or_else(|| panic!("not gRPC-Web text frames: {body:?}"))
}

/// [`grpc_web_frames`], or `None` while `body` is not yet whole frames.
fn try_grpc_web_frames(body: &str) -> Option<Vec<(u8, Vec<u8>)>> {
    use base64::Engine as _;
    // Each frame is base64-encoded on its own: a run of `=` padding ends one, and unpadded
    // encodings concatenate cleanly with what follows.
    let mut bytes = Vec::new();
    let mut part = String::new();
    let mut chars = body.trim().chars().peekable();
    while let Some(c) = chars.next() {
        part.push(c);
        if c == '=' && chars.peek() != Some(&'=') || chars.peek().is_none() {
            bytes.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(&part)
                    .ok()?,
            );
            part.clear();
        }
    }
    let mut frames = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
        frames.push((rest[0], rest.get(5..5 + len)?.to_vec()));
        rest = &rest[5 + len..];
    }
    Some(frames)
}

#[tokio::test]
async fn grpc_web_calls_share_the_port_and_the_origin_policy() {
    use prost::Message as _;
    use switchboard_proto::v1 as pb;

    let (broker, _dir) = start_with("[origins]\nallow = [\"https://*.example.com\"]\n");
    let url = format!("{}/switchboard.v1.Broker/Publish", base(&broker));
    let good = "https://crm.example.com";
    let request = grpc_web_text(&pb::PublishRequest {
        channel: "web.grpcweb".into(),
        payload: bytes::Bytes::from_static(b"{\"via\":\"grpc-web\"}"),
        ..Default::default()
    });
    let headers = |origin: &'static str| {
        [
            ("Origin", origin),
            ("Content-Type", "application/grpc-web-text"),
            ("Accept", "application/grpc-web-text"),
            ("X-Grpc-Web", "1"),
        ]
    };

    let preflight = http_request(
        "OPTIONS",
        &url,
        &[
            ("Origin", good),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type,x-grpc-web"),
        ],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert_eq!(preflight.header("access-control-allow-origin"), Some(good));
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("x-grpc-web"));

    let answer = http_request("POST", &url, &headers(good), request.as_bytes())
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("access-control-allow-origin"), Some(good));
    let frames = grpc_web_frames(&answer.body);
    let (_, data) = frames
        .iter()
        .find(|(flag, _)| *flag == 0)
        .expect("a message");
    let ack = pb::PublishAck::decode(data.as_slice()).unwrap();
    assert!(ack.offset > 0);
    let (_, trailers) = frames
        .iter()
        .find(|(flag, _)| *flag == 0x80)
        .expect("trailers");
    assert!(String::from_utf8_lossy(trailers).contains("grpc-status:0"));

    // A look-alike origin: refused by the gate as a gRPC status, with no CORS header.
    let refused = http_request(
        "POST",
        &url,
        &headers("https://crm.example.com.evil.test"),
        request.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(refused.header("access-control-allow-origin"), None);
    // A status known before any message comes as a header (trailers-only); else in trailers.
    let status = match refused.header("grpc-status") {
        Some(code) => code.to_owned(),
        None => grpc_web_frames(&refused.body)
            .into_iter()
            .find(|(flag, _)| *flag == 0x80)
            .map(|(_, t)| String::from_utf8_lossy(&t).into_owned())
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("grpc-status:").map(|c| c.trim().to_owned()))
            })
            .expect("a grpc-status"),
    };
    assert_eq!(status, "7", "PERMISSION_DENIED: {refused:?}");

    // The gateway still answers HTTP/1.1 beside it, and the one accepted message is stored.
    let mut all = SseStream::open(
        &format!(
            "{}/v1/subscribe?pattern=web.%3E&start=earliest",
            base(&broker)
        ),
        &[("Origin", good)],
    )
    .await
    .unwrap();
    let (offset, message) = next_message(&mut all).await;
    assert_eq!(offset, ack.offset);
    assert_eq!(message["payload"], json!({ "via": "grpc-web" }));
}

#[tokio::test]
async fn a_rate_limited_principal_gets_429_with_retry_after() {
    let (broker, _dir, token) =
        secured("[rate_limits]\nper_principal = { per_second = 0.01, burst = 2 }\n");
    let url = format!("{}/v1/publish", base(&broker));
    let bearer = format!("Bearer {token}");
    let message = json!({ "channel": "web.rate", "payload": 1 });
    for _ in 0..2 {
        let ok = post(&url, &[("Authorization", &bearer)], &message).await;
        assert_eq!(ok.status, 200, "{ok:?}");
    }
    let limited = post(&url, &[("Authorization", &bearer)], &message).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    let seconds: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!(seconds >= 1, "{seconds}");
    let error = body(&limited);
    assert_eq!(error["code"], json!("RESOURCE_EXHAUSTED"));
    assert_eq!(error["reason"], json!("RATE_LIMITED"));
}

#[tokio::test]
async fn entity_watches_stream_a_snapshot_then_changes_with_keep_alives() {
    let (broker, _dir) = start_with("[gateway]\nheartbeat = \"1s\"\n");
    let url = base(&broker);
    let entity = |id: &str| format!("{url}/v1/entities/contact/{id}");
    let first = http_request("PATCH", &entity("1"), &[], br#"{"name":"Ada"}"#)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    let other = http_request(
        "PATCH",
        &format!("{url}/v1/entities/deal/9"),
        &[],
        br#"{"v":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(other.status, 200);

    let mut watch = SseStream::open(&format!("{url}/v1/entities/watch?pattern=contact.*"), &[])
        .await
        .unwrap();
    assert_eq!(watch.status, 200);
    let snapshot = watch.next_event().await.unwrap();
    assert_eq!(snapshot.event.as_deref(), Some("snapshot"));
    let data: Value = serde_json::from_str(&snapshot.data).unwrap();
    assert_eq!(
        (data["type"].clone(), data["id"].clone()),
        (json!("contact"), json!("1"))
    );
    let done = watch.next_event().await.unwrap();
    assert_eq!(done.event.as_deref(), Some("snapshot_complete"));
    assert_eq!(
        serde_json::from_str::<Value>(&done.data).unwrap()["entities"],
        json!(1)
    );

    let second = http_request("PATCH", &entity("1"), &[], br#"{"phone":"1"}"#)
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    let change = watch.next_event().await.unwrap();
    assert_eq!(change.event.as_deref(), Some("change"));
    let data: Value = serde_json::from_str(&change.data).unwrap();
    assert_eq!(data["version"], json!(2));
    assert_eq!(data["fields"], json!({ "name": "Ada", "phone": "1" }));

    // Idle now: a keep-alive comment arrives (every second here), and the stream still carries
    // the next change after it.
    watch.next_comment().await.unwrap();
    let third = http_request("PATCH", &entity("1"), &[], br#"{"name":"Eve"}"#)
        .await
        .unwrap();
    assert_eq!(third.status, 200);
    let change = watch.next_event().await.unwrap();
    assert_eq!(change.event.as_deref(), Some("change"));
    assert_eq!(
        serde_json::from_str::<Value>(&change.data).unwrap()["version"],
        json!(3)
    );
}

#[tokio::test]
async fn sse_subscriptions_take_the_throttle_and_deliver_the_latest() {
    let f = fixture(&[]).await;
    let url = base(&f.broker);
    let mut stream = SseStream::open(
        &format!("{url}/v1/subscribe?pattern=agent.%3E&min_interval_ms=2000"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.next_event().await.unwrap().event.as_deref(),
        Some("subscribed")
    );
    // One batch: twenty presence updates of one channel, committed together, well inside one
    // throttle interval.
    let updates: Vec<Value> = (0..20)
        .map(|i| json!({ "channel": "agent.presence", "payload": { "n": i } }))
        .collect();
    let batch = post(
        &format!("{url}/v1/publish/batch"),
        &[],
        &Value::Array(updates),
    )
    .await;
    assert_eq!(batch.status, 200);
    let answers = body(&batch);
    let last = answers[19]["ack"]["offset"].as_u64().unwrap();
    let mut delivered = Vec::new();
    loop {
        let (offset, message) = next_message(&mut stream).await;
        delivered.push(offset);
        if offset == last {
            assert_eq!(message["payload"], json!({ "n": 19 }));
            break;
        }
    }
    assert!(
        delivered.len() <= 2,
        "coalesced to the latest, got {delivered:?}"
    );
}

#[tokio::test]
async fn with_the_gateway_off_the_port_serves_grpc_only() {
    let (broker, _dir) = start_with("[gateway]\nenabled = false\n");
    let answer = http_request(
        "POST",
        &format!("{}/v1/publish", base(&broker)),
        &[],
        br#"{"channel":"web.off","payload":1}"#,
    )
    .await;
    // HTTP/1.1 is not spoken at all: the connection is refused an answer, or an error comes back.
    if let Ok(response) = &answer {
        assert_ne!(response.status, 200, "{response:?}");
    }
    let client = switchboard_client::Client::connect(broker.url())
        .await
        .unwrap();
    let ack = client
        .publish(switchboard_client::Publish::new("web.on", "1"))
        .await
        .unwrap();
    // The refused HTTP request stored nothing: the first message in the log is the gRPC one.
    let mut all = client.subscribe("web.>", Start::Earliest).await.unwrap();
    let first = take(&mut all, 1).await;
    assert_eq!(
        (first[0].channel.as_str(), first[0].offset),
        ("web.on", ack.offset)
    );
}

#[tokio::test]
async fn grpc_web_streams_a_subscription() {
    use prost::Message as _;
    use switchboard_proto::v1 as pb;

    let f = fixture(&[]).await;
    let ack = f
        .client
        .publish(switchboard_client::Publish::new(
            "web.streamed",
            "{\"n\":1}",
        ))
        .await
        .unwrap();
    let request = grpc_web_text(&pb::SubscribeRequest {
        pattern: "web.>".into(),
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Earliest(pb::Earliest {})),
        }),
        ..Default::default()
    });
    // SseStream reads any streamed body; the request goes out as a POST here.
    let mut stream = switchboard_e2e::SseStream::open_with(
        "POST",
        &format!("{}/switchboard.v1.Broker/Subscribe", base(&f.broker)),
        &[
            ("Content-Type", "application/grpc-web-text"),
            ("Accept", "application/grpc-web-text"),
            ("X-Grpc-Web", "1"),
        ],
        request.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(stream.status, 200);
    let events = |text: &str| -> Vec<pb::SubscribeEvent> {
        try_grpc_web_frames(text)
            .unwrap_or_default()
            .into_iter()
            .filter(|(flag, _)| *flag == 0)
            .map(|(_, bytes)| pb::SubscribeEvent::decode(bytes.as_slice()).unwrap())
            .collect()
    };
    let is_message =
        |e: &pb::SubscribeEvent| matches!(e.event, Some(pb::subscribe_event::Event::Message(_)));
    let text = stream
        .body_until(|text| events(text).iter().any(is_message))
        .await
        .unwrap();
    let message = events(&text)
        .into_iter()
        .find_map(|e| match e.event {
            Some(pb::subscribe_event::Event::Message(m)) => Some(m),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (message.offset, message.channel.as_str()),
        (ack.offset, "web.streamed")
    );
}

/// The gateway stamps writes for HTTP clients: a write sent after another was acknowledged is
/// never stale, even in the same millisecond, and concurrent writers are ordered, not refused.
#[tokio::test]
async fn gateway_writes_are_never_stale_sequential_or_concurrent() {
    let f = fixture(&[]).await;
    let entity = format!("{}/v1/entities/counter/1", base(&f.broker));
    for i in 0..100 {
        let written = http_request("PATCH", &entity, &[], format!(r#"{{"n":{i}}}"#).as_bytes())
            .await
            .unwrap();
        assert_eq!(written.status, 200, "write {i}: {written:?}");
        assert_eq!(body(&written)["fields"]["n"], json!(i));
    }

    let writers = (0..3).map(|writer| {
        let entity = entity.clone();
        async move {
            for i in 0..40 {
                let fields = format!(r#"{{"n":{i},"by":{writer}}}"#);
                let written = http_request("PATCH", &entity, &[], fields.as_bytes())
                    .await
                    .unwrap();
                assert_eq!(
                    written.status, 200,
                    "writer {writer}, write {i}: {written:?}"
                );
            }
        }
    });
    futures::future::join_all(writers).await;
    let read = http_request("GET", &entity, &[], b"").await.unwrap();
    assert_eq!(body(&read)["version"], json!(100 + 3 * 40));
}

#[tokio::test]
async fn an_ephemeral_http_publish_reaches_sse_without_an_event_id() {
    let f = fixture(&[]).await;
    let url = base(&f.broker);
    let stream_url = format!("{url}/v1/subscribe?pattern=presence.%3E");
    let mut stream = SseStream::open(&stream_url, &[]).await.unwrap();
    let subscribed = stream.next_event().await.unwrap();
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));

    let r = post(
        &format!("{url}/v1/publish"),
        &[],
        &json!({ "channel": "presence.agent17", "payload": { "online": true }, "ephemeral": true }),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(body(&r)["offset"], json!(0));
    let event = stream.next_event().await.unwrap();
    // No id: a reconnecting EventSource must resume after the last stored message, not at 0.
    assert_eq!(
        (event.event.as_deref(), event.id.as_deref()),
        (None, None),
        "{event:?}"
    );
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["ephemeral"], json!(true));
    assert_eq!(data["payload"], json!({ "online": true }));

    // A stored message after it still carries its offset as its id.
    let r = post(
        &format!("{url}/v1/publish"),
        &[],
        &json!({ "channel": "presence.agent17", "payload": { "online": false } }),
    )
    .await;
    let offset = body(&r)["offset"].as_u64().unwrap();
    assert_eq!(next_message(&mut stream).await.0, offset);
}
