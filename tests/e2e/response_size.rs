//! Every response the broker sends fits what stock gRPC clients accept by default: 4 MiB.

use bytes::Bytes;
use prost::Message as _;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

use crate::common::*;

/// The default max receive size of the gRPC clients of Python, Go, Java and C++.
const STOCK_CLIENT_MAX_RECEIVE: usize = 4 * 1024 * 1024;

#[tokio::test]
async fn history_pages_fit_a_stock_clients_4_mib() {
    let f = fixture(&[]).await;
    let channel = Channel::from_shared(f.broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut broker = BrokerClient::new(channel).max_decoding_message_size(STOCK_CLIENT_MAX_RECEIVE);
    // 80 messages of 65,000 bytes: 5.2 MB, more than one page can carry.
    for i in 0..80u8 {
        broker
            .publish(pb::PublishRequest {
                channel: "big.blob".into(),
                payload: Bytes::from(vec![i; 65_000]),
                content_type: "application/octet-stream".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let mut read = Vec::new();
    let mut from = 1;
    let mut pages = 0;
    loop {
        let page = broker
            .history(pb::HistoryRequest {
                pattern: "big.>".into(),
                from: Some(pb::StartPosition {
                    position: Some(pb::start_position::Position::Offset(from)),
                }),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("page {pages}: {status:?}"))
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= STOCK_CLIENT_MAX_RECEIVE);
        assert!(!page.messages.is_empty(), "page {pages} is empty");
        read.extend(page.messages.iter().map(|m| m.payload[0]));
        if page.next_offset == 0 {
            break;
        }
        from = page.next_offset;
    }
    assert_eq!(
        read,
        (0..80u8).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(pages >= 2, "{pages} pages");
}
