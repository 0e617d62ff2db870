//! The browser gateway's refusals: each its own documented reason and HTTP status, with the JSON
//! error body (docs/GATEWAY.md, docs/ERRORS.md).

use serde_json::{json, Value};
use switchboard_e2e::{http_request, BrokerProcess, HttpResponse, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn base(broker: &BrokerProcess) -> String {
    format!("http://{}", broker.addr)
}

fn body(response: &HttpResponse) -> Value {
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", response.body))
}

/// Asserts an error answer: its HTTP status, and the reason of its JSON body.
fn assert_error(response: &HttpResponse, status: u16, reason: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(body(response)["reason"], json!(reason), "{response:?}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_payload_too_large() {
    let f = fixture(&[]).await;
    // As curl sends a large body: the head with `Expect: 100-continue`, the body only once the
    // server asks for it. The broker answers from the declared length, without reading it.
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        f.broker.addr,
        10 * 1024 * 1024
    );
    let raw = tokio::time::timeout(DEADLINE, async {
        let mut stream = tokio::net::TcpStream::connect(f.broker.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    })
    .await
    .expect("an answer without the body being sent");
    let text = String::from_utf8(raw).unwrap();
    let (status_line, rest) = text.split_once("\r\n").unwrap();
    assert!(status_line.contains(" 413 "), "{text}");
    let error: Value = serde_json::from_str(rest.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(error["reason"], json!("PAYLOAD_TOO_LARGE"), "{text}");

    // A message over the payload limit is the same refusal, with the same status.
    let big = json!({ "channel": "web.big", "payload": "x".repeat(70 * 1024) });
    let response = http_request(
        "POST",
        &format!("{}/v1/publish", base(&f.broker)),
        &[],
        big.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_error(&response, 413, "PAYLOAD_TOO_LARGE");
}

async fn post(url: &str, body: &str) -> HttpResponse {
    http_request("POST", url, &[], body.as_bytes())
        .await
        .unwrap()
}

#[tokio::test]
async fn bodies_that_are_not_the_endpoints_json_get_their_own_reasons() {
    let f = fixture(&[]).await;
    let publish = format!("{}/v1/publish", base(&f.broker));
    let batch = format!("{}/v1/publish/batch", base(&f.broker));

    assert_error(&post(&publish, "not json").await, 400, "BODY_MALFORMED");
    assert_error(&post(&publish, "[1, 2]").await, 400, "BODY_MALFORMED");
    assert_error(
        &post(
            &publish,
            r#"{"channel":"web.x","payload":1,"colour":"red"}"#,
        )
        .await,
        400,
        "UNKNOWN_FIELD",
    );
    // A message needs a payload; `null` is one.
    assert_error(
        &post(&publish, r#"{"channel":"web.x"}"#).await,
        400,
        "BODY_MALFORMED",
    );
    let null = post(&publish, r#"{"channel":"web.x","payload":null}"#).await;
    assert_eq!(null.status, 200, "{null:?}");

    let too_many = format!(
        "[{}]",
        vec![r#"{"channel":"web.x","payload":1}"#; 501].join(",")
    );
    assert_error(&post(&batch, &too_many).await, 400, "BATCH_TOO_LARGE");
    assert_error(
        &post(&batch, r#"{"channel":"web.x"}"#).await,
        400,
        "BODY_MALFORMED",
    );
    let mixed = post(
        &batch,
        r#"[{"channel":"web.x","payload":1},{"channel":"web.x","payload":2,"extra":0},{"channel":"web.x"}]"#,
    )
    .await;
    assert_eq!(mixed.status, 200, "{mixed:?}");
    let answers = body(&mixed);
    assert!(answers[0]["ack"].is_object(), "{answers}");
    assert_eq!(
        answers[1]["error"]["reason"],
        json!("UNKNOWN_FIELD"),
        "{answers}"
    );
    assert_eq!(
        answers[2]["error"]["reason"],
        json!("BODY_MALFORMED"),
        "{answers}"
    );

    // Stored: the `null` payload and the batch's one acked message; nothing refused.
    let stored = f
        .client
        .history_all(switchboard_client::HistoryQuery::new("web.>"), usize::MAX)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
}

#[tokio::test]
async fn if_none_match_takes_a_list_weak_tags_and_a_star() {
    let f = fixture(&[]).await;
    let entity = format!("{}/v1/entities/contact/7", base(&f.broker));
    let written = http_request("PATCH", &entity, &[], br#"{"name":"Ada"}"#)
        .await
        .unwrap();
    assert_eq!(written.header("etag"), Some("\"v1\""), "{written:?}");

    for matching in [r#""v0", "v1""#, r#"W/"v1""#, r#""v9",W/"v1""#, "*"] {
        let read = http_request("GET", &entity, &[("If-None-Match", matching)], b"")
            .await
            .unwrap();
        assert_eq!(read.status, 304, "If-None-Match: {matching}: {read:?}");
        assert_eq!(read.header("etag"), Some("\"v1\""), "{matching}");
    }
    for other in [r#""v2""#, r#""v0", W/"v2""#] {
        let read = http_request("GET", &entity, &[("If-None-Match", other)], b"")
            .await
            .unwrap();
        assert_eq!(read.status, 200, "If-None-Match: {other}: {read:?}");
    }
    let missing = http_request(
        "GET",
        &format!("{}/v1/entities/contact/none", base(&f.broker)),
        &[("If-None-Match", "*")],
        b"",
    )
    .await
    .unwrap();
    assert_error(&missing, 404, "ENTITY_NOT_FOUND");
}
