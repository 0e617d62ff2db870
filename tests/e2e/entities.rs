//! Entity state end to end: merges, refusals with their codes, ETags, watches, restarts.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{json, Value};
use switchboard_client::Reason;
use switchboard_client::{
    Client, EntityDelete, EntityEvent, EntityRead, EntityUpdate, Error, Publish, Start,
};
use switchboard_proto::v1::Entity;
use tonic::Code;

use crate::common::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn fields(entity: &Entity) -> Value {
    serde_json::from_slice(&entity.fields).unwrap()
}

fn metadata<'a>(error: &'a Error, key: &str) -> Option<&'a str> {
    match error {
        Error::Status { metadata, .. } => metadata.get(key).map(String::as_str),
        _ => None,
    }
}

async fn next_event(watch: &mut switchboard_client::EntityWatch) -> EntityEvent {
    match tokio::time::timeout(switchboard_e2e::DEADLINE, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

#[tokio::test]
async fn two_writers_merge_and_a_watcher_sees_the_snapshot_then_every_change_in_order() {
    let f = fixture(&[]).await;
    let t = now_ms();
    let created = f
        .client
        .update_entity(EntityUpdate::new("contact", "7", json!({"name": "Ada"})).stamp(t, 1, "crm"))
        .await
        .unwrap();
    assert_eq!(created.version, 1);

    let mut watch = f.client.watch_entities("contact.*").await.unwrap();
    match next_event(&mut watch).await {
        EntityEvent::Snapshot(e) => {
            assert_eq!((e.version, fields(&e)), (1, json!({"name": "Ada"})))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next_event(&mut watch).await,
        EntityEvent::SnapshotComplete(1)
    );

    // Two panels edit different fields of the same contact at the same moment.
    let crm = f.client.clone();
    let tel = f.client.clone();
    let (a, b) = tokio::join!(
        crm.update_entity(
            EntityUpdate::new("contact", "7", json!({"name": "Ada L."})).stamp(t + 1, 2, "crm")
        ),
        tel.update_entity(
            EntityUpdate::new("contact", "7", json!({"phone": "555-0100"})).stamp(
                t + 1,
                1,
                "telephony"
            )
        ),
    );
    a.unwrap();
    b.unwrap();

    let first = next_event(&mut watch).await;
    let second = next_event(&mut watch).await;
    let (EntityEvent::Change(first), EntityEvent::Change(second)) = (first, second) else {
        panic!("expected two changes");
    };
    assert_eq!(
        (first.version, second.version),
        (2, 3),
        "changes arrive in version order"
    );
    assert_eq!(
        fields(&second),
        json!({"name": "Ada L.", "phone": "555-0100"}),
        "both edits survive"
    );

    // Reads: the merged state, and "not modified" for the current ETag.
    let read = f
        .client
        .get_entity("contact", "7", None)
        .await
        .unwrap()
        .into_entity()
        .unwrap();
    assert_eq!(fields(&read), fields(&second));
    let etag = read.etag.clone();
    assert_eq!(
        f.client
            .get_entity("contact", "7", Some(&etag))
            .await
            .unwrap(),
        EntityRead::NotModified
    );
    f.client
        .update_entity(
            EntityUpdate::new("contact", "7", json!({"vip": true})).stamp(t + 2, 3, "crm"),
        )
        .await
        .unwrap();
    assert!(matches!(
        f.client.get_entity("contact", "7", Some(&etag)).await.unwrap(),
        EntityRead::Modified(e) if e.version == 4
    ));

    // Plain subscribers follow state on the reserved channel too.
    let mut states = f
        .client
        .subscribe("$state.contact.7", Start::Earliest)
        .await
        .unwrap();
    let got = take(&mut states, 4).await;
    let versions: Vec<u64> = got
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(&m.payload).unwrap()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn stale_conflicting_skewed_and_malformed_writes_are_refused_with_their_reasons() {
    let f = fixture(&[]).await;
    let t = now_ms();
    f.client
        .update_entity(EntityUpdate::new("case", "1", json!({"status": "open"})).stamp(t, 5, "w"))
        .await
        .unwrap();

    let stale = f
        .client
        .update_entity(
            EntityUpdate::new("case", "1", json!({"status": "closed"})).stamp(t - 1000, 9, "w"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (stale.code(), stale.reason()),
        (Code::FailedPrecondition, Some(Reason::StaleUpdate))
    );
    assert_eq!(metadata(&stale, "current_version"), Some("1"));

    let conflict = f
        .client
        .update_entity(
            EntityUpdate::new("case", "1", json!({"status": "closed"}))
                .stamp(t + 1, 6, "w")
                .expect_version(7),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (conflict.code(), conflict.reason()),
        (Code::Aborted, Some(Reason::VersionConflict))
    );
    assert_eq!(metadata(&conflict, "current_version"), Some("1"));

    let skew = f
        .client
        .update_entity(
            EntityUpdate::new("case", "1", json!({"status": "x"})).stamp(t + 600_000, 1, "w"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (skew.code(), skew.reason()),
        (Code::FailedPrecondition, Some(Reason::ClockSkew))
    );

    let missing = f.client.get_entity("case", "404", None).await.unwrap_err();
    assert_eq!(
        (missing.code(), missing.reason()),
        (Code::NotFound, Some(Reason::EntityNotFound))
    );
    let bad_key = f
        .client
        .update_entity(EntityUpdate::new("ca.se", "1", json!({"a": 1})).stamp(t, 1, "w"))
        .await
        .unwrap_err();
    assert_eq!(bad_key.reason(), Some(Reason::EntityKeyInvalid));

    // Compare-and-set that matches, then a delete that beats older writes.
    let ok = f
        .client
        .update_entity(
            EntityUpdate::new("case", "1", json!({"status": "closed"}))
                .stamp(t + 1, 6, "w")
                .expect_version(1),
        )
        .await
        .unwrap();
    assert_eq!(ok.version, 2);
    let deleted = f
        .client
        .delete_entity(EntityDelete::new("case", "1").stamp(t + 2, 7, "w"))
        .await
        .unwrap();
    assert!(deleted.deleted);
    assert_eq!(fields(&deleted), json!({}));
    let late = f
        .client
        .update_entity(
            EntityUpdate::new("case", "1", json!({"status": "open"})).stamp(t + 1, 8, "w"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        late.reason(),
        Some(Reason::StaleUpdate),
        "an older write cannot resurrect a deleted entity"
    );
    assert_eq!(
        f.client
            .get_entity("case", "1", None)
            .await
            .unwrap()
            .into_entity()
            .unwrap()
            .version,
        3
    );
}

#[tokio::test]
async fn a_restart_keeps_entities_versions_and_the_dedup_and_loop_windows() {
    let mut f = fixture(&[]).await;
    let t = now_ms();
    f.client
        .update_entity(EntityUpdate::new("conv", "9", json!({"topic": "billing"})).stamp(t, 1, "w"))
        .await
        .unwrap();
    let original = f
        .client
        .publish(Publish::new("orders.placed", "{}").idempotency_key("order-1"))
        .await
        .unwrap();
    let a = f.client.publish(Publish::new("svc.a", "{}")).await.unwrap();
    let mut history = f
        .client
        .subscribe("svc.a", Start::Offset(a.offset))
        .await
        .unwrap();
    let a_message = take(&mut history, 1).await.remove(0);
    let b = f
        .client
        .publish(Publish::new("svc.b", "{}").caused_by(&a_message))
        .await
        .unwrap();
    let mut b_sub = f
        .client
        .subscribe("svc.b", Start::Offset(b.offset))
        .await
        .unwrap();
    let b_message = take(&mut b_sub, 1).await.remove(0);

    f.broker.kill9();
    f.broker.restart(&[]).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();

    let entity = client
        .get_entity("conv", "9", None)
        .await
        .unwrap()
        .into_entity()
        .unwrap();
    assert_eq!(
        (entity.version, fields(&entity)),
        (1, json!({"topic": "billing"}))
    );
    let retry = client
        .publish(Publish::new("orders.placed", "{}").idempotency_key("order-1"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.offset, original.offset);
    let looped = client
        .publish(Publish::new("svc.a", "{}").caused_by(&b_message))
        .await
        .unwrap_err();
    assert_eq!(looped.reason(), Some(Reason::LoopDetected));
}

#[tokio::test]
async fn a_throttled_watch_ends_on_the_latest_version_of_each_entity() {
    let f = fixture(&[]).await;
    let mut watch = f
        .client
        .watch_entities_with(
            "gauge.*",
            switchboard_client::FlowPolicy::Conflate,
            Some(std::time::Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        EntityEvent::SnapshotComplete(0)
    );
    let t = now_ms();
    for i in 1..=10u64 {
        f.client
            .update_entity(
                EntityUpdate::new("gauge", "queue", json!({"waiting": i})).stamp(t, i, "acd"),
            )
            .await
            .unwrap();
    }
    let mut versions = Vec::new();
    loop {
        let EntityEvent::Change(e) = next_event(&mut watch).await else {
            panic!("a change")
        };
        assert!(
            versions.last().is_none_or(|v| *v < e.version),
            "versions increase"
        );
        versions.push(e.version);
        if e.version == 10 {
            assert_eq!(fields(&e), json!({"waiting": 10}));
            break;
        }
    }
    assert!(versions.len() < 10, "changes were coalesced: {versions:?}");
}

#[tokio::test]
async fn every_watcher_gets_the_same_merged_state_the_writer_was_answered() {
    // Watches share one decoded copy of each change; each must still see exactly the entity the
    // update returned, in the order the updates were applied.
    let f = fixture(&[]).await;
    let t = now_ms();
    let mut watches = Vec::new();
    for _ in 0..3 {
        let mut watch = f.client.watch_entities("contact.*").await.unwrap();
        assert_eq!(
            next_event(&mut watch).await,
            EntityEvent::SnapshotComplete(0)
        );
        watches.push(watch);
    }
    let updates = [
        ("1", json!({"name": "Ada", "n": 1})),
        ("2", json!({"name": "Bob \"B\" \u{e9}"})),
        ("1", json!({"n": 2.5, "tags": ["a", {"b": null}]})),
    ];
    let mut answered = Vec::new();
    for (i, (id, values)) in updates.into_iter().enumerate() {
        let update = EntityUpdate::new("contact", id, values).stamp(t + i as u64, 0, "crm");
        answered.push(f.client.update_entity(update).await.unwrap());
    }
    assert_eq!(
        fields(&answered[2]),
        json!({"name": "Ada", "n": 2.5, "tags": ["a", {"b": null}]})
    );
    for watch in &mut watches {
        let mut seen = Vec::new();
        for _ in 0..answered.len() {
            match next_event(watch).await {
                EntityEvent::Change(entity) => seen.push(entity),
                other => panic!("expected a change, got {other:?}"),
            }
        }
        assert_eq!(seen, answered);
    }
}
