//! The client against an in-process mock broker (no real broker needed): errors through the wire,
//! publishing, history paging, entities (with a mock `Entities` service), flow control (options,
//! acknowledgements, gaps, consumers), and above all the subscription's resume logic, including a
//! real connection cut through a TCP proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

include!("support/mock_broker.rs");

use switchboard_client::Reason;

#[tokio::test]
async fn resumes_after_errors_and_closes_without_gaps_or_duplicates() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            delivery(2),
            delivery(3),
            Err(Status::unavailable("leader lost")),
        ],
        false,
    );
    // The broker repeats offset 3 (the guard drops it), then closes the stream cleanly.
    mock.plan(
        vec![
            subscribed(4),
            delivery(3),
            delivery(4),
            delivery(5),
            delivery(6),
        ],
        false,
    );
    // The first attempt after that fails transiently.
    mock.plan(vec![Err(Status::internal("hiccup"))], false);
    mock.plan(
        vec![
            subscribed(7),
            delivery(7),
            delivery(8),
            delivery(9),
            delivery(10),
        ],
        true,
    );

    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    assert_eq!(subscription.next_offset(), Some(1));
    let mut offsets = Vec::new();
    for _ in 0..10 {
        offsets.push(next_offset(&mut subscription).await);
    }
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        mock.starts(),
        [
            Some(Position::Earliest(Default::default())),
            Some(Position::Offset(4)),
            Some(Position::Offset(7)),
            Some(Position::Offset(7)),
        ]
    );
}

#[tokio::test]
async fn resumes_from_the_confirmed_offset_when_nothing_was_delivered() {
    let (mock, client) = start().await;
    mock.plan(
        vec![subscribed(42), Err(Status::unavailable("going away"))],
        false,
    );
    mock.plan(vec![subscribed(42), delivery(42)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Latest, fast())
        .await
        .unwrap();
    assert_eq!(next_offset(&mut subscription).await, 42);
    assert_eq!(
        mock.starts(),
        [
            Some(Position::Latest(Default::default())),
            Some(Position::Offset(42)),
        ]
    );
}

#[tokio::test]
async fn a_non_transient_error_ends_the_subscription() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            Err(refused(
                Code::PermissionDenied,
                "CHANNEL_FORBIDDEN",
                "no access",
            )),
        ],
        false,
    );
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    assert_eq!(next_offset(&mut subscription).await, 1);
    let error = subscription.next().await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "PERMISSION_DENIED CHANNEL_FORBIDDEN: no access"
    );
    assert!(subscription.next().await.is_none());
    assert_eq!(mock.starts().len(), 1);
}

#[tokio::test]
async fn gives_up_after_max_reconnect_attempts() {
    let (mock, client) = start().await;
    mock.plan(vec![subscribed(1), Err(Status::unavailable("down"))], false);
    for _ in 0..5 {
        mock.plan(vec![Err(Status::unavailable("still down"))], false);
    }
    let mut subscription = client
        .subscribe_with(
            "a.>",
            Start::Earliest,
            fast().max_reconnect_attempts(Some(3)),
        )
        .await
        .unwrap();
    let error = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(error.to_string(), "UNAVAILABLE: still down");
    assert!(subscription.next().await.is_none());
    assert_eq!(mock.starts().len(), 4);
}

#[tokio::test]
async fn the_first_subscribe_error_is_returned_with_its_reason() {
    let (_mock, client) = start().await;
    let error = client
        .subscribe("a b", Start::Latest)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "INVALID_ARGUMENT PATTERN_INVALID: pattern has a space"
    );
    assert_eq!(error.reason(), Some(Reason::PatternInvalid));
}

#[tokio::test]
async fn resumes_after_the_connection_is_cut() {
    let mock = Mock::default();
    let proxy = Proxy::start(serve(mock.clone()).await).await;
    let client = Client::connect(proxy.address.to_string()).await.unwrap();
    mock.plan(vec![subscribed(1), delivery(1), delivery(2)], true);
    mock.plan(vec![subscribed(3), delivery(3)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    assert_eq!(next_offset(&mut subscription).await, 1);
    assert_eq!(next_offset(&mut subscription).await, 2);
    proxy.cut();
    assert_eq!(next_offset(&mut subscription).await, 3);
    assert_eq!(mock.starts()[1], Some(Position::Offset(3)));
}

#[tokio::test]
async fn dropping_the_subscription_cancels_the_call() {
    let (mock, client) = start().await;
    let subscription = client.subscribe("a.>", Start::Latest).await.unwrap();
    assert_eq!(mock.cancelled(), 0);
    drop(subscription);
    let deadline = tokio::time::Instant::now() + WAIT;
    while mock.cancelled() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn publish_and_refusal() {
    let (mock, client) = start().await;
    let ack = client
        .publish(
            Publish::new("a.b", "{}")
                .header("k", "v")
                .ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(ack.offset, 1);
    assert_eq!(ack.correlation_id, "generated");
    let stored = mock.state.lock().unwrap().published[0].clone();
    assert_eq!((stored.ttl_ms, stored.headers["k"].as_str()), (1000, "v"));

    let error = client.publish(Publish::new("a.", "{}")).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty"
    );
    assert!(matches!(error, Error::Status { .. }));
}

#[tokio::test]
async fn publish_stream_acks_in_order_with_refusals() {
    let (_mock, client) = start().await;
    let messages = futures::stream::iter(
        ["a.b", "a.", "a.c"]
            .into_iter()
            .map(|channel| Publish::new(channel, "{}")),
    );
    let acks: Vec<_> = client
        .publish_stream(messages)
        .await
        .unwrap()
        .map(|ack| split_stream_ack(ack.unwrap()))
        .collect()
        .await;
    assert_eq!(acks.len(), 3);
    assert_eq!(acks[0].0, 0);
    assert_eq!(acks[0].1.as_ref().unwrap().offset, 1);
    assert_eq!(
        acks[1].1.as_ref().unwrap_err().reason(),
        Some(Reason::ChannelInvalid)
    );
    assert_eq!(acks[2].1.as_ref().unwrap().offset, 2);
}

#[tokio::test]
async fn publisher_handle_sends_before_acks_are_read() {
    let (mock, client) = start().await;
    let (publisher, acks) = client.publisher(4);
    for i in 0..10 {
        tokio::time::timeout(WAIT, publisher.send(Publish::new("a.b", format!("{i}"))))
            .await
            .unwrap()
            .unwrap();
    }
    drop(publisher);
    let acks: Vec<_> = tokio::time::timeout(WAIT, acks.collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(acks.len(), 10);
    assert_eq!(mock.state.lock().unwrap().published.len(), 10);
}

#[tokio::test]
async fn history_pages_through_everything() {
    let (mock, client) = start().await;
    mock.state.lock().unwrap().history_len = 2500;
    let all = client
        .history_all(HistoryQuery::new("a.>"), usize::MAX)
        .await
        .unwrap();
    assert_eq!(all.len(), 2500);
    assert!(all
        .windows(2)
        .all(|pair| pair[1].offset == pair[0].offset + 1));

    let some = client
        .history_all(
            HistoryQuery::new("a.>").from(Start::Offset(10)).limit(7),
            20,
        )
        .await
        .unwrap();
    assert_eq!(
        some.iter().map(|m| m.offset).collect::<Vec<_>>(),
        (10..30).collect::<Vec<_>>()
    );

    let page = client
        .history(HistoryQuery::new("a.>").to_offset(3))
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 3);
    assert_eq!(page.next_offset, None);

    let latest = client
        .history(HistoryQuery::new("a.>").from(Start::Latest))
        .await
        .unwrap_err();
    assert!(matches!(latest, Error::InvalidArgument(_)));
}

#[tokio::test]
async fn info_round_trip() {
    let (_mock, client) = start().await;
    let info = client.info().await.unwrap();
    assert_eq!((info.version.as_str(), info.node_id), ("mock", 1));
}

#[tokio::test]
async fn publish_carries_causation_and_reports_duplicates() {
    let (mock, client) = start().await;
    let cause = Message {
        offset: 7,
        channel: "a.b".to_owned(),
        correlation_id: "3f2b9a1e-0000-4000-8000-000000000000".to_owned(),
        hops: 2,
        ..Message::default()
    };
    let first = client
        .publish(
            Publish::new("a.c", "{}")
                .caused_by(&cause)
                .idempotency_key("k"),
        )
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = client
        .publish(Publish::new("a.c", "{}").idempotency_key("k"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.offset, first.offset);
    let stored = mock.state.lock().unwrap().published[0].clone();
    assert_eq!(stored.correlation_id, cause.correlation_id);
    assert_eq!((stored.causation_id.as_str(), stored.hops), ("7", 3));
}

#[tokio::test]
async fn entity_update_get_and_delete() {
    let (mock, client) = start().await;
    let client = client.with_writer_id("panel-7");
    let entity = client
        .update_entity(EntityUpdate::new(
            "contact",
            "42",
            serde_json::json!({"name": "Ada"}),
        ))
        .await
        .unwrap();
    assert_eq!(
        (entity.entity_type(), entity.entity_id()),
        ("contact", "42")
    );
    assert_eq!(entity.version, 1);
    assert_eq!(
        entity.fields_json().unwrap(),
        serde_json::json!({"name": "Ada"})
    );
    assert_eq!(entity.last_stamp.as_ref().unwrap().writer, "panel-7");

    let entity = client
        .update_entity(
            EntityUpdate::new("contact", "42", serde_json::json!({"vip": true})).expect_version(1),
        )
        .await
        .unwrap();
    assert_eq!(entity.version, 2);
    assert_eq!(
        entity.fields_json().unwrap(),
        serde_json::json!({"name": "Ada", "vip": true})
    );
    {
        // Two writes in a row from one client: stamps strictly increase, the expected version is
        // sent only when set.
        let state = mock.state.lock().unwrap();
        let (a, b) = (&state.entity_updates[0], &state.entity_updates[1]);
        let (sa, sb) = (a.stamp.clone().unwrap(), b.stamp.clone().unwrap());
        assert!((sb.timestamp_ms, sb.version) > (sa.timestamp_ms, sa.version));
        assert_eq!((a.expected_version, b.expected_version), (None, Some(1)));
    }

    let read = client.get_entity("contact", "42", None).await.unwrap();
    let EntityRead::Modified(read) = read else {
        panic!("expected the entity, got {read:?}")
    };
    assert_eq!(read, entity);

    let not_modified = client
        .get_entity("contact", "42", Some(&entity.etag))
        .await
        .unwrap();
    assert_eq!(not_modified, EntityRead::NotModified);
    let stale_etag = client
        .get_entity("contact", "42", Some("\"1\""))
        .await
        .unwrap();
    assert!(matches!(stale_etag, EntityRead::Modified(_)));

    let deleted = client
        .delete_entity(EntityDelete::new("contact", "42").stamp(u64::MAX, 0, "janitor"))
        .await
        .unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.fields_json().unwrap(), serde_json::json!({}));
    assert_eq!(deleted.version, 3);
    assert_eq!(
        mock.state.lock().unwrap().entity_deletes[0].expected_version,
        None
    );

    let missing = client.get_entity("contact", "404", None).await.unwrap_err();
    assert_eq!(
        missing.to_string(),
        "NOT_FOUND ENTITY_NOT_FOUND: no entity contact.404"
    );
    assert_eq!(missing.reason(), Some(Reason::EntityNotFound));
}

#[tokio::test]
async fn entity_refusals_carry_the_current_version() {
    let (_mock, client) = start().await;
    client
        .update_entity(EntityUpdate::new(
            "contact",
            "42",
            serde_json::json!({"a": 1}),
        ))
        .await
        .unwrap();
    let conflict = client
        .update_entity(
            EntityUpdate::new("contact", "42", serde_json::json!({"a": 2})).expect_version(0),
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflict.to_string(),
        "ABORTED VERSION_CONFLICT: expected version 0, the entity is at 1"
    );
    assert_eq!(conflict.code(), Code::Aborted);
    assert_eq!(conflict.reason(), Some(Reason::VersionConflict));
    assert_eq!(conflict.current_version(), Some(1));
    assert!(!conflict.is_transient());
    match &conflict {
        Error::Status { metadata, .. } => assert_eq!(metadata["current_version"], "1"),
        other => panic!("unexpected {other:?}"),
    }

    let stale = client
        .update_entity(
            EntityUpdate::new("contact", "42", serde_json::json!({"a": 3})).stamp(1, 0, "old"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        stale.to_string(),
        "FAILED_PRECONDITION STALE_UPDATE: no field wins"
    );
    assert_eq!(stale.current_version(), Some(1));

    let not_an_object = client
        .update_entity(EntityUpdate::new("contact", "42", serde_json::json!([1])))
        .await
        .unwrap_err();
    assert!(matches!(not_an_object, Error::InvalidArgument(_)));
}

async fn next_event(
    watch: &mut switchboard_client::EntityWatch,
) -> Option<Result<EntityEvent, Error>> {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("an event in time")
}

#[tokio::test]
async fn watch_entities_snapshot_then_changes() {
    let (mock, client) = start().await;
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
            Ok(switchboard_client::proto::EntityEvent { event: None }),
            entity_event(entity_event::Event::Change(sample_entity(
                "2",
                1,
                r#"{"name":"Bob"}"#,
            ))),
            Err(refused(
                Code::Unavailable,
                "SHUTTING_DOWN",
                "the broker is stopping",
            )),
        ],
        hold: false,
    });
    let mut watch = client.watch_entities("contact.*").await.unwrap();
    assert_eq!(watch.pattern(), "contact.*");
    assert!(!watch.is_live());

    let Some(Ok(EntityEvent::Snapshot(first))) = next_event(&mut watch).await else {
        panic!("expected a snapshot")
    };
    assert_eq!((first.entity_id(), first.version), ("1", 4));
    assert!(matches!(
        next_event(&mut watch).await,
        Some(Ok(EntityEvent::SnapshotComplete(1)))
    ));
    let Some(Ok(EntityEvent::Change(change))) = next_event(&mut watch).await else {
        panic!("expected a change (an unknown event is skipped)")
    };
    assert_eq!(
        change.fields_json().unwrap(),
        serde_json::json!({"name": "Bob"})
    );
    let error = next_event(&mut watch).await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "UNAVAILABLE SHUTTING_DOWN: the broker is stopping"
    );
    assert!(next_event(&mut watch).await.is_none());
    assert!(watch.is_live());

    // A stream the broker closes cleanly ends with an UNAVAILABLE error.
    mock.state.lock().unwrap().watch_plans.push_back(WatchPlan {
        items: vec![entity_event(entity_event::Event::SnapshotComplete(
            SnapshotComplete { entities: 0 },
        ))],
        hold: false,
    });
    let mut watch = client.watch_entities(">").await.unwrap();
    assert!(matches!(
        watch.next().await,
        Some(Ok(EntityEvent::SnapshotComplete(0)))
    ));
    let closed = watch.next().await.unwrap().unwrap_err();
    assert_eq!(closed.code(), Code::Unavailable);
    assert!(closed.is_transient());
    assert!(watch.next().await.is_none());

    let invalid = client.watch_entities("a b").await.unwrap_err();
    assert_eq!(
        invalid.to_string(),
        "INVALID_ARGUMENT PATTERN_INVALID: pattern has a space"
    );
    let empty = client.watch_entities("").await.unwrap_err();
    assert!(matches!(empty, Error::InvalidArgument(_)));
}

async fn next_subscription_event(
    subscription: &mut switchboard_client::Subscription,
) -> Result<SubscriptionEvent, Error> {
    tokio::time::timeout(WAIT, subscription.next_event())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
}

fn flow_options() -> SubscribeOptions {
    fast()
        .policy(FlowPolicy::DropOldest)
        .window(100)
        .throttle(Duration::from_millis(250))
        .max_unacked(8)
        .durable("billing")
        .ack_timeout(Duration::from_secs(30))
}

#[tokio::test]
async fn flow_options_are_sent_with_every_subscribe() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed_as(1, 11),
            delivery(1),
            delivery(2),
            Err(Status::unavailable("leader lost")),
        ],
        false,
    );
    // A durable consumer resumes after its acknowledged offset: 2 was not acknowledged, so it
    // comes again, and is not dropped as a duplicate.
    mock.plan(vec![subscribed_as(2, 12), delivery(2), delivery(3)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, flow_options())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(next_offset(&mut subscription).await);
    }
    assert_eq!(offsets, [1, 2, 2, 3]);
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.pattern, "a.>");
        assert_eq!(
            request.policy,
            switchboard_client::proto::FlowPolicy::DropOldest as i32
        );
        assert_eq!(request.window, 100);
        assert_eq!(request.min_interval_ms, 250);
        assert_eq!(request.max_unacked, 8);
        assert_eq!(request.durable_name, "billing");
        assert_eq!(request.ack_timeout_ms, 30_000);
    }
    // Throttled, so it resumes from the confirmed offset (and the broker resumes a durable
    // consumer after its acknowledged offset whatever the start).
    assert_eq!(
        mock.starts(),
        [
            Some(Position::Earliest(Default::default())),
            Some(Position::Offset(1)),
        ]
    );

    // The defaults send nothing but the pattern and the start.
    let _plain = client.subscribe("b.>", Start::Latest).await.unwrap();
    let request = mock.requests().pop().unwrap();
    assert_eq!(
        (
            request.policy,
            request.window,
            request.min_interval_ms,
            request.max_unacked,
            request.durable_name.as_str(),
            request.ack_timeout_ms
        ),
        (0, 0, 0, 0, "", 0)
    );

    let empty = client
        .subscribe_with(
            "a.>",
            Start::Latest,
            SubscribeOptions::default().durable(""),
        )
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(empty, Error::InvalidArgument(_)));
}

#[tokio::test]
async fn redeliveries_and_throttled_deliveries_are_not_dropped() {
    let (mock, client) = start().await;
    // Not durable: a plain repeat is dropped, a redelivery is not.
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            delivery(2),
            delivery(1),
            redelivery(1, 1),
            delivery(3),
        ],
        true,
    );
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(next_offset(&mut subscription).await);
    }
    assert_eq!(offsets, [1, 2, 1, 3]);

    // Throttled: a trailing-edge delivery overtaken by another channel's comes out of order.
    mock.plan(
        vec![subscribed(5), delivery(7), delivery(5), delivery(8)],
        true,
    );
    let mut throttled = client
        .subscribe_with(
            "a.>",
            Start::Latest,
            fast().throttle(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..3 {
        offsets.push(next_offset(&mut throttled).await);
    }
    assert_eq!(offsets, [7, 5, 8]);
}

#[tokio::test]
async fn a_throttled_subscription_resumes_from_what_has_settled() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed(5),
            delivery(7),
            delivery(5),
            Err(Status::unavailable("leader lost")),
        ],
        false,
    );
    mock.plan(vec![subscribed(5), delivery(6), delivery(7)], true);
    let mut subscription = client
        .subscribe_with(
            "a.>",
            Start::Latest,
            fast().throttle(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(next_offset(&mut subscription).await);
    }
    // Nothing settled (the deliveries were too recent): from the confirmed offset, and the
    // repeat of 7 is kept.
    assert_eq!(offsets, [7, 5, 6, 7]);
    assert_eq!(mock.starts()[1], Some(Position::Offset(5)));
}

#[tokio::test]
async fn a_gap_is_an_event_and_the_message_stream_skips_it() {
    let (mock, client) = start().await;
    let items = vec![
        subscribed(1),
        delivery(1),
        gap(2, 9, 5),
        delivery(10),
        delivery(11),
    ];
    mock.plan(items.clone(), true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    let SubscriptionEvent::Message(first) =
        next_subscription_event(&mut subscription).await.unwrap()
    else {
        panic!("expected a message")
    };
    assert_eq!(first.offset, 1);
    let SubscriptionEvent::Gap(skipped) = next_subscription_event(&mut subscription).await.unwrap()
    else {
        panic!("expected a gap")
    };
    assert_eq!(
        (skipped.from_offset, skipped.to_offset, skipped.count),
        (2, 9, 5)
    );
    assert_eq!(skipped.reason(), GapReason::Dropped);
    {
        let mut events = subscription.events();
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(&event, SubscriptionEvent::Message(message) if message.offset == 10),
            "{event:?}"
        );
    }
    assert_eq!(next_offset(&mut subscription).await, 11);

    // As a stream of messages, the gap is skipped.
    mock.plan(items, true);
    let mut messages = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..3 {
        offsets.push(next_offset(&mut messages).await);
    }
    assert_eq!(offsets, [1, 10, 11]);
}

#[tokio::test]
async fn acks_go_out_with_the_current_subscription_id() {
    let mock = Mock::default();
    let proxy = Proxy::start(serve(mock.clone()).await).await;
    let client = Client::connect(proxy.address.to_string()).await.unwrap();
    mock.plan(vec![subscribed_as(1, 11), delivery(1), delivery(2)], true);
    mock.plan(vec![subscribed_as(3, 12), delivery(3)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast().max_unacked(2))
        .await
        .unwrap();
    assert_eq!(subscription.id(), Some(11));
    let acker = subscription.acker();
    assert_eq!(acker.subscription_id(), Some(11));

    assert_eq!(next_offset(&mut subscription).await, 1);
    let answer = subscription.ack(1).await.unwrap();
    assert_eq!(answer.acked_offset, 1);
    // From another task, while the subscription is being read.
    let acking = tokio::spawn({
        let acker = acker.clone();
        async move { acker.ack_many(&[2]).await }
    });
    assert_eq!(next_offset(&mut subscription).await, 2);
    assert_eq!(acking.await.unwrap().unwrap().acked_offset, 2);

    proxy.cut();
    assert_eq!(next_offset(&mut subscription).await, 3);
    assert_eq!(subscription.id(), Some(12));
    assert_eq!(acker.subscription_id(), Some(12));
    acker.ack(3).await.unwrap();
    assert_eq!(mock.acks(), [(11, vec![1]), (11, vec![2]), (12, vec![3])]);

    // Once the subscription is gone, there is nothing to acknowledge with.
    drop(subscription);
    let ended = acker.ack(4).await.unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert_eq!(acker.subscription_id(), None);
}

#[tokio::test]
async fn an_unknown_subscription_id_is_reported() {
    let (mock, client) = start().await;
    mock.plan(vec![subscribed_as(1, 404), delivery(1)], true);
    let mut subscription = client.subscribe("a.>", Start::Earliest).await.unwrap();
    assert_eq!(next_offset(&mut subscription).await, 1);
    let error = subscription.ack(1).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "NOT_FOUND SUBSCRIPTION_NOT_FOUND: no subscription 404"
    );
}

#[tokio::test]
async fn subscriptions_and_consumers_round_trip() {
    let (mock, client) = start().await;
    {
        let mut state = mock.state.lock().unwrap();
        state.subscriptions.push(SubscriptionInfo {
            subscription_id: 3,
            pattern: "a.>".to_owned(),
            durable_name: "billing".to_owned(),
            lagging: true,
            ..SubscriptionInfo::default()
        });
        state.consumers.push(consumer_info("billing"));
        state.consumers.push(consumer_info("audit"));
    }
    let subscriptions = client.list_subscriptions().await.unwrap();
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(
        (subscriptions[0].subscription_id, subscriptions[0].lagging),
        (3, true)
    );

    let names: Vec<String> = client
        .list_consumers()
        .await
        .unwrap()
        .into_iter()
        .map(|consumer| consumer.name)
        .collect();
    assert_eq!(names, ["billing", "audit"]);
    let billing = client.consumer("billing").await.unwrap();
    assert_eq!(billing.acked_offset, 41);
    assert_eq!(
        FlowPolicy::from_proto(billing.policy),
        Some(FlowPolicy::Conflate)
    );

    client.delete_consumer("billing").await.unwrap();
    let missing = client.consumer("billing").await.unwrap_err();
    assert_eq!(
        missing.to_string(),
        "NOT_FOUND CONSUMER_NOT_FOUND: no durable consumer \"billing\""
    );
    assert_eq!(
        client
            .delete_consumer("billing")
            .await
            .unwrap_err()
            .reason(),
        Some(Reason::ConsumerNotFound)
    );
    assert!(matches!(
        client.consumer("").await.unwrap_err(),
        Error::InvalidArgument(_)
    ));
}
