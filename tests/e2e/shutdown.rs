//! Graceful shutdown: SIGTERM ends streams with UNAVAILABLE, keeps what was acknowledged, exits 0.

use futures::StreamExt;
use switchboard_client::{Client, HistoryQuery, Publish, Start, SubscribeOptions};
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn sigterm_ends_streams_keeps_acknowledged_messages_and_exits_zero() {
    let mut f = fixture(&[]).await;
    let options = SubscribeOptions::default().max_reconnect_attempts(Some(0));
    let mut sub = f
        .client
        .subscribe_with("bye.>", Start::Latest, options)
        .await
        .unwrap();
    let ack = f
        .client
        .publish(Publish::new("bye.now.please", "{}"))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut sub, 1).await), vec![ack.offset]);

    let status = f.broker.terminate().unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        f.broker.log()
    );

    // The stream ends with the broker's UNAVAILABLE (it does not just hang).
    match tokio::time::timeout(switchboard_e2e::DEADLINE, sub.next()).await {
        Ok(Some(Err(e))) => assert_eq!(e.code(), Code::Unavailable, "{e}"),
        Ok(None) => {}
        other => panic!("expected the stream to end, got {other:?}"),
    }

    f.broker.restart(&[]).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();
    let page = client.history(HistoryQuery::new("bye.>")).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![ack.offset]);
}
