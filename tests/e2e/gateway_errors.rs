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
