//! Ephemeral messages: delivered at once to live subscribers, on every node, and never stored.

use std::time::Duration;

use futures::StreamExt;
use switchboard_client::{Client, HistoryQuery, Publish, Reason, Start, SubscribeOptions};
use switchboard_e2e::{start_cluster, DEADLINE};

use crate::common::*;

/// Every stored message's offset, from History.
async fn stored_offsets(client: &Client) -> Vec<u64> {
    client
        .history_all(HistoryQuery::new(">").from(Start::Earliest), 10_000)
        .await
        .expect("history")
        .iter()
        .map(|m| m.offset)
        .collect()
}

#[tokio::test]
async fn an_ephemeral_message_reaches_live_subscribers_once_and_is_never_stored() {
    let f = fixture(&[]).await;
    let mut live = f.client.subscribe("typing.>", Start::Latest).await.unwrap();
    let mut excluding = f
        .client
        .subscribe_with(
            "typing.>",
            Start::Latest,
            SubscribeOptions::default().exclude_ephemeral(true),
        )
        .await
        .unwrap();
    let mut durable = f
        .client
        .subscribe_with(
            "typing.>",
            Start::Latest,
            SubscribeOptions::default().durable("typing-log"),
        )
        .await
        .unwrap();

    let first = f
        .client
        .publish(Publish::new("typing.room1", r#"{"stored":1}"#))
        .await
        .unwrap();
    let ephemeral = f
        .client
        .publish(
            Publish::new("typing.room1", r#"{"agent":"a-17","typing":true}"#)
                .ephemeral()
                .idempotency_key("ignored")
                .ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(ephemeral.offset, 0, "an ephemeral message takes no offset");
    assert!(!ephemeral.duplicate);
    let second = f
        .client
        .publish(Publish::new("typing.room1", r#"{"stored":2}"#))
        .await
        .unwrap();
    assert_eq!(second.offset, first.offset + 1, "nor does it use one up");

    // The live subscriber gets all three; the ephemeral one marked, with offset 0. (It may
    // overtake the stored message before it: it waits for no sync.)
    let got = take(&mut live, 3).await;
    let (ephemerals, stored): (Vec<_>, Vec<_>) = got.iter().partition(|m| m.ephemeral);
    assert_eq!(ephemerals.len(), 1);
    assert_eq!(ephemerals[0].offset, 0);
    assert_eq!(
        payload_text(ephemerals[0]),
        r#"{"agent":"a-17","typing":true}"#
    );
    assert!(ephemerals[0].idempotency_key.is_empty() && ephemerals[0].ttl_ms == 0);
    assert_eq!(
        stored.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![first.offset, second.offset]
    );

    // The subscriber that left them out, and the durable consumer, get the stored ones only:
    // a third stored message marks the end of what they may receive.
    let third = f
        .client
        .publish(Publish::new("typing.room1", r#"{"stored":3}"#))
        .await
        .unwrap();
    for subscription in [&mut excluding, &mut durable] {
        let got = take(subscription, 3).await;
        assert_eq!(
            offsets(&got),
            vec![first.offset, second.offset, third.offset]
        );
        assert!(got.iter().all(|m| !m.ephemeral));
    }

    // Nothing of it was stored: not in History, not replayed to a subscriber from the start.
    assert_eq!(
        stored_offsets(&f.client).await,
        vec![first.offset, second.offset, third.offset]
    );
    let mut replay = f
        .client
        .subscribe("typing.>", Start::Earliest)
        .await
        .unwrap();
    let got = take(&mut replay, 3).await;
    assert_eq!(
        offsets(&got),
        vec![first.offset, second.offset, third.offset]
    );
    let marker = f
        .client
        .publish(Publish::new("typing.room1", r#"{"stored":4}"#))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut replay, 1).await), vec![marker.offset]);
}

#[tokio::test]
async fn an_ephemeral_publish_is_checked_like_any_other() {
    let f = fixture(&[]).await;
    let refused = f
        .client
        .publish(Publish::new("typing.room1", "{not json").ephemeral())
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), Some(Reason::PayloadNotJson), "{refused}");
    let refused = f
        .client
        .publish(Publish::new("$sys.x", "{}").ephemeral())
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), Some(Reason::ChannelReserved), "{refused}");
    let refused = f
        .client
        .publish(Publish::new("typing.room1", "{}").ephemeral().hops(1000))
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), Some(Reason::LoopDetected), "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ephemeral_message_published_on_one_node_reaches_subscribers_on_every_other() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path(), 3, &[]).expect("three nodes start");
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect(node.url()).await.expect("client connects"));
    }
    // Every node must be serving (a leader known) before its subscription counts as live.
    let stored = clients[0]
        .publish(Publish::new("cursor.ready", "{}"))
        .await
        .unwrap();
    let mut subscriptions = Vec::new();
    for client in &clients {
        let mut subscription = client.subscribe("cursor.>", Start::Earliest).await.unwrap();
        assert_eq!(
            offsets(&take(&mut subscription, 1).await),
            vec![stored.offset]
        );
        subscriptions.push(subscription);
    }
    for (i, client) in clients.iter().enumerate() {
        let ack = client
            .publish(Publish::new("cursor.doc7", format!(r#"{{"from":{i}}}"#)).ephemeral())
            .await
            .unwrap();
        assert_eq!(ack.offset, 0);
    }
    // Every node's subscriber gets the three, whichever node they were published on.
    for subscription in &mut subscriptions {
        let mut from: Vec<String> = take(subscription, 3)
            .await
            .iter()
            .inspect(|m| assert!(m.ephemeral && m.offset == 0))
            .map(payload_text)
            .collect();
        from.sort();
        assert_eq!(from, [r#"{"from":0}"#, r#"{"from":1}"#, r#"{"from":2}"#]);
    }
    // And none of them was stored on any node.
    for client in &clients {
        assert_eq!(stored_offsets(client).await, vec![stored.offset]);
    }
}

/// Request/reply over ephemeral messages (docs/FLOW.md#request-and-reply), across nodes: a
/// responder on one node answers with `reply_to`, the requester on another gets that answer with
/// its correlation id, among two responders the first answer is taken, with none the request
/// fails with `NoReply` after its timeout, and nothing of it is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_gets_its_reply_across_nodes_and_nothing_is_stored() {
    use switchboard_client::{reply_to, Error, REPLY_TO};

    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path(), 3, &[]).expect("three nodes start");
    let requester = Client::connect(nodes[0].url()).await.unwrap();
    // Serving (a leader known) before the responders' subscriptions count as live.
    let ready = requester
        .publish(Publish::new("svc.ready", "{}"))
        .await
        .unwrap();
    let mut responders = Vec::new();
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let client = Client::connect(node.url()).await.unwrap();
        let mut requests = client.subscribe("svc.sum", Start::Latest).await.unwrap();
        responders.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            while let Some(Ok(request)) = requests.next().await {
                let numbers: Vec<i64> = serde_json::from_slice(&request.payload).unwrap();
                let body = format!(r#"{{"sum":{},"by":{i}}}"#, numbers.iter().sum::<i64>());
                let Some(reply) = reply_to(&request, body) else {
                    continue;
                };
                client.publish(reply).await.unwrap();
                answered.push(request);
                if answered.len() == 1 {
                    return answered;
                }
            }
            answered
        }));
    }

    let reply = requester
        .request(
            Publish::new("svc.sum", "[1,2,3]")
                .correlation_id("7d444840-9dc0-11d1-b245-5ffdce74fad2"),
            DEADLINE,
        )
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["sum"], 6, "{body}");
    assert!(body["by"] == 1 || body["by"] == 2, "{body}");
    assert_eq!(reply.correlation_id, "7d444840-9dc0-11d1-b245-5ffdce74fad2");
    assert!(reply.ephemeral && reply.offset == 0);
    assert!(reply.channel.starts_with("_inbox."), "{}", reply.channel);
    // Both responders received the request (no queue groups); each answered once.
    for responder in responders {
        let answered = tokio::time::timeout(DEADLINE, responder)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answered.len(), 1);
        assert_eq!(answered[0].headers.get(REPLY_TO), Some(&reply.channel));
        assert_eq!(answered[0].hops + 1, reply.hops);
    }

    // Nobody subscribed: no reply, after the timeout.
    let started = std::time::Instant::now();
    let error = requester
        .request(Publish::new("svc.nobody", "{}"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NoReply { .. }), "{error}");
    assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
    assert!(started.elapsed() >= Duration::from_millis(300));

    for node in &nodes {
        let client = Client::connect(node.url()).await.unwrap();
        assert_eq!(stored_offsets(&client).await, vec![ready.offset]);
    }
}
