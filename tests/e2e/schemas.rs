//! Payload schemas: registered per pattern and version, checked on every publish route, drift
//! announced, checked against retained traffic, kept across restarts and on every node.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use switchboard_client::proto::{CheckSchemaRequest, SchemaPolicy};
use switchboard_client::{Client, HistoryQuery, Publish, Reason, SchemaPut, Start};
use switchboard_e2e::{eventually, http_get, http_request, start_cluster, BrokerProcess};
use tonic::Code;

use crate::common::*;

/// A contact: an integer id and a name, nothing else.
const CONTACT_V1: &str = r#"{
  "type": "object",
  "required": ["id", "name"],
  "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
  "additionalProperties": false
}"#;

/// 1.1: a stage may come too.
const CONTACT_V1_1: &str = r#"{
  "type": "object",
  "required": ["id", "name"],
  "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                 "stage": {"enum": ["lead", "won"]}},
  "additionalProperties": false
}"#;

/// Every stored payload on `pattern`, oldest first.
async fn stored(client: &Client, pattern: &str) -> Vec<String> {
    client
        .history_all(HistoryQuery::new(pattern).from(Start::Earliest), 10_000)
        .await
        .expect("history")
        .iter()
        .map(payload_text)
        .collect()
}

fn contact(payload: &str, version: &str) -> Publish {
    Publish::new("crm.contact.updated", payload.to_owned()).schema_version(version)
}

#[tokio::test]
async fn an_enforced_schema_refuses_what_does_not_match_on_every_route_and_stores_nothing() {
    let f = fixture(&[]).await;
    let put = f
        .client
        .schema_put(SchemaPut::new("crm.contact.*", "1.0.0", CONTACT_V1))
        .await
        .unwrap();
    assert!(!put.replaced);
    let schema = put.schema.unwrap();
    assert_eq!(
        (schema.pattern.as_str(), schema.version.as_str()),
        ("crm.contact.*", "1.0.0")
    );
    assert_eq!(schema.policy, SchemaPolicy::Enforce as i32);

    f.client
        .publish(contact(r#"{"id":1,"name":"Ada"}"#, "1.0.0"))
        .await
        .expect("a matching payload is stored");
    let refused = f
        .client
        .publish(contact(r#"{"id":"2","name":"Bob"}"#, "1.0.0"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    assert_eq!(refused.reason(), Some(Reason::SchemaMismatch), "{refused}");
    assert_eq!(refused.metadata("schema_pattern"), Some("crm.contact.*"));
    assert_eq!(refused.metadata("schema_version"), Some("1.0.0"));
    assert_eq!(refused.metadata("instance_path"), Some("/id"));
    assert_eq!(refused.metadata("keyword"), Some("type"));
    let failures: Value = serde_json::from_str(refused.metadata("failures").unwrap()).unwrap();
    assert_eq!(failures[0]["instance_path"], "/id");

    // An unknown major, and a version below every registered one, under enforce.
    for version in ["2.0.0", "0.9.0"] {
        let unknown = f
            .client
            .publish(contact(r#"{"id":3,"name":"Cy"}"#, version))
            .await
            .unwrap_err();
        assert_eq!(
            unknown.reason(),
            Some(Reason::SchemaVersionUnknown),
            "{version}: {unknown}"
        );
    }
    // A text payload on a channel whose schema describes JSON.
    let text = f
        .client
        .publish(contact("Ada", "1.0.0").content_type("text/plain"))
        .await
        .unwrap_err();
    assert_eq!(text.metadata("keyword"), Some("contentType"), "{text}");

    // In a publish stream only the bad message is refused, with the same metadata.
    let answers = publish_stream_answers(
        &f.client,
        vec![
            contact(r#"{"id":4,"name":"Dee"}"#, "1.0.0"),
            contact(r#"{"id":5}"#, "1.0.0"),
            contact(r#"{"id":6,"name":"Eve"}"#, "1.0.0"),
        ],
    )
    .await;
    assert!(answers[0].1.is_ok() && answers[2].1.is_ok(), "{answers:?}");
    let stream_refusal = answers[1].1.as_ref().unwrap_err();
    assert_eq!(stream_refusal.reason(), Some(Reason::SchemaMismatch));
    assert_eq!(stream_refusal.metadata("keyword"), Some("required"));
    assert_eq!(stream_refusal.metadata("instance_path"), Some(""));

    // Through the HTTP gateway: 400 with the reason.
    let body = json!({"channel": "crm.contact.updated", "payload": {"id": 7}}).to_string();
    let http = http_request(
        "POST",
        &format!("{}/v1/publish", f.broker.url()),
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(http.status, 400, "{}", http.body);
    let error: Value = serde_json::from_str(&http.body).unwrap();
    assert_eq!(error["reason"], "SCHEMA_MISMATCH", "{}", http.body);

    // Other channels are not checked.
    f.client
        .publish(Publish::new("crm.deal.won", "[1,2]"))
        .await
        .unwrap();
    assert_eq!(
        stored(&f.client, "crm.contact.*").await,
        [
            r#"{"id":1,"name":"Ada"}"#,
            r#"{"id":4,"name":"Dee"}"#,
            r#"{"id":6,"name":"Eve"}"#
        ],
        "nothing refused was stored"
    );
}

#[tokio::test]
async fn versions_select_by_semver_and_the_most_specific_pattern_wins() {
    let f = fixture(&[]).await;
    let puts = [
        ("crm.>", "1.0.0", r#"{"required":["id"]}"#),
        ("crm.contact.*", "1.0.0", CONTACT_V1),
        ("crm.contact.*", "1.1.0", CONTACT_V1_1),
        ("crm.contact.*", "2.0.0", r#"{"required":["contact_id"]}"#),
    ];
    for (pattern, version, document) in puts {
        f.client
            .schema_put(SchemaPut::new(pattern, version, document))
            .await
            .unwrap();
    }
    let with_stage = r#"{"id":1,"name":"Ada","stage":"won"}"#;
    // 1.0.x selects 1.0.0, which has no stage; 1.1.x and 1.7.2 select 1.1.0, which does.
    assert!(f
        .client
        .publish(contact(with_stage, "1.0.5"))
        .await
        .is_err());
    for version in ["1.1.0", "1.7.2"] {
        f.client
            .publish(contact(with_stage, version))
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"));
    }
    // Major 2 has its own document.
    f.client
        .publish(contact(r#"{"contact_id":9}"#, "2.3.0"))
        .await
        .unwrap();
    // `crm.>` applies where `crm.contact.*` does not.
    let deal = f
        .client
        .publish(Publish::new("crm.deal.won", "{}"))
        .await
        .unwrap_err();
    assert_eq!(deal.metadata("schema_pattern"), Some("crm.>"), "{deal}");

    // CheckSchema answers the same without storing anything.
    let check = |channel: &str, payload: &str, version: &str| CheckSchemaRequest {
        channel: channel.into(),
        payload: payload.as_bytes().to_vec().into(),
        content_type: String::new(),
        schema_version: version.into(),
    };
    let answer = f
        .client
        .schema_check(check("crm.contact.updated", with_stage, "1.0.5"))
        .await
        .unwrap();
    assert!(!answer.valid);
    assert_eq!(
        (answer.pattern.as_str(), answer.schema_version.as_str()),
        ("crm.contact.*", "1.0.0")
    );
    assert_eq!(answer.reason, "SCHEMA_MISMATCH");
    assert_eq!(answer.failures[0].keyword, "additionalProperties");
    let answer = f
        .client
        .schema_check(check("billing.invoice.paid", "{}", "1.0.0"))
        .await
        .unwrap();
    assert!(answer.valid && answer.pattern.is_empty(), "{answer:?}");
    let answer = f
        .client
        .schema_check(check("crm.contact.updated", "{}", "3.0.0"))
        .await
        .unwrap();
    assert_eq!(answer.reason, "SCHEMA_VERSION_UNKNOWN");

    // Listed most specific pattern first, lowest version first.
    let listed: Vec<(String, String)> = f
        .client
        .schema_list("", false)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.pattern, s.version))
        .collect();
    let expected = [
        ("crm.contact.*", "1.0.0"),
        ("crm.contact.*", "1.1.0"),
        ("crm.contact.*", "2.0.0"),
        ("crm.>", "1.0.0"),
    ];
    assert_eq!(listed, expected.map(|(p, v)| (p.to_owned(), v.to_owned())));
    // Without a version, Get answers the highest.
    let newest = f.client.schema_get("crm.contact.*", "").await.unwrap();
    assert_eq!(newest.version, "2.0.0");
    assert!(newest.document.contains("contact_id"));
}

/// The drift events on `$sys.schema.drift`, as JSON.
async fn drift_events(subscription: &mut switchboard_client::Subscription, n: usize) -> Vec<Value> {
    take(subscription, n)
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
}

#[tokio::test]
async fn warn_stores_and_announces_drift_off_checks_nothing_and_the_metric_counts_both() {
    let f = fixture(&[]).await;
    let mut drift = f
        .client
        .subscribe("$sys.schema.drift", Start::Latest)
        .await
        .unwrap();
    for (pattern, policy) in [
        ("crm.contact.*", SchemaPolicy::Warn),
        ("crm.deal.*", SchemaPolicy::Off),
        ("crm.case.*", SchemaPolicy::Enforce),
    ] {
        f.client
            .schema_put(SchemaPut::new(pattern, "1.0.0", CONTACT_V1).policy(policy))
            .await
            .unwrap();
    }
    let warned = f
        .client
        .publish(contact(r#"{"id":1}"#, "1.0.0"))
        .await
        .expect("warn stores the message");
    f.client
        .publish(Publish::new("crm.deal.won", r#"{"anything":true}"#))
        .await
        .expect("off checks nothing");
    f.client
        .publish(Publish::new(
            "crm.case.opened",
            r#"{"id":"x","name":"Ada"}"#,
        ))
        .await
        .unwrap_err();

    let events = drift_events(&mut drift, 2).await;
    let warned_event = &events[0];
    assert_eq!(warned_event["channel"], "crm.contact.updated");
    assert_eq!(warned_event["pattern"], "crm.contact.*");
    assert_eq!(warned_event["outcome"], "warned");
    assert_eq!(warned_event["policy"], "warn");
    assert_eq!(warned_event["failures"][0]["keyword"], "required");
    assert_eq!(events[1]["outcome"], "refused");
    assert_eq!(events[1]["channel"], "crm.case.opened");
    assert_eq!(events[1]["reason"], "SCHEMA_MISMATCH");
    assert!(
        stored(&f.client, "crm.contact.*").await == [r#"{"id":1}"#],
        "the warned message is stored (offset {})",
        warned.offset
    );

    let metrics = http_get(&format!("{}/metrics", f.broker.admin_url()))
        .await
        .unwrap()
        .body;
    for line in [
        r#"switchboard_schema_drift_total{pattern="crm.contact.*",version="1.0.0",keyword="required",outcome="warned"} 1"#,
        r#"switchboard_schema_drift_total{pattern="crm.case.*",version="1.0.0",keyword="type",outcome="refused"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert!(
        !metrics.contains(r#"pattern="crm.deal.*""#),
        "off counted drift"
    );

    // The console lists the registrations with their drift.
    let console = http_get(&format!("{}/console/api/state", f.broker.admin_url()))
        .await
        .unwrap();
    let console: Value = serde_json::from_str(&console.body).unwrap();
    let row = |pattern: &str| {
        console["schemas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["pattern"] == pattern)
            .cloned()
            .unwrap_or_else(|| panic!("{pattern} not in {console}"))
    };
    let contact = row("crm.contact.*");
    assert_eq!(
        (contact["policy"].as_str(), contact["warned"].as_f64()),
        (Some("warn"), Some(1.0))
    );
    assert_eq!(row("crm.case.*")["refused"], 1.0);
    assert_eq!(row("crm.deal.*")["warned"], 0.0);
}

#[tokio::test]
async fn drift_announcements_are_rate_limited_and_the_rest_are_summed() {
    let f = fixture(&[]).await;
    let mut drift = f
        .client
        .subscribe("$sys.schema.drift", Start::Latest)
        .await
        .unwrap();
    f.client
        .schema_put(
            SchemaPut::new("telemetry.>", "1.0.0", r#"{"required":["widget"]}"#)
                .policy(SchemaPolicy::Warn),
        )
        .await
        .unwrap();
    // 60 mismatches at once: at most 10 are announced in their second.
    let publishes: Vec<Publish> = (0..60)
        .map(|i| Publish::new("telemetry.click", format!(r#"{{"n":{i}}}"#)))
        .collect();
    for (_, answer) in publish_stream_answers(&f.client, publishes).await {
        answer.unwrap();
    }
    let first = drift_events(&mut drift, 10).await;
    assert!(first.iter().all(|e| e["outcome"] == "warned"));
    // A mismatch in a later second is announced with how many were not: the queue holds all 60,
    // so at least 50 were held back by the rate alone.
    let deadline = tokio::time::Instant::now() + switchboard_e2e::DEADLINE;
    let event = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no drift event said what it held back"
        );
        f.client
            .publish(Publish::new("telemetry.click", "{}"))
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_millis(200), drift.next()).await;
        if let Ok(Some(Ok(message))) = next {
            let event: Value = serde_json::from_slice(&message.payload).unwrap();
            if event["suppressed_before"].as_u64() > Some(0) {
                break event;
            }
        }
    };
    let suppressed = event["suppressed_before"].as_u64().unwrap();
    assert!(suppressed >= 50, "{event}");
}

#[tokio::test]
async fn a_new_version_is_checked_against_retained_messages_and_may_be_required_compatible() {
    let f = fixture(&[]).await;
    for payload in [
        r#"{"id":1,"name":"Ada"}"#,
        r#"{"id":2,"name":"Bob","stage":"won"}"#,
        r#"{"id":3}"#,
    ] {
        f.client.publish(contact(payload, "1.0.0")).await.unwrap();
    }
    // Another major and another channel are not the new version's to judge.
    f.client
        .publish(contact(r#"{"whatever":1}"#, "2.0.0"))
        .await
        .unwrap();
    f.client
        .publish(Publish::new("crm.deal.won", "{}"))
        .await
        .unwrap();

    let strict = SchemaPut::new("crm.contact.*", "1.2.0", CONTACT_V1).require_compatible();
    let refused = f.client.schema_put(strict).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert_eq!(refused.reason(), Some(Reason::SchemaIncompatible));
    assert!(
        f.client.schema_list("", false).await.unwrap().is_empty(),
        "a refused registration writes nothing"
    );

    let put = f
        .client
        .schema_put(SchemaPut::new("crm.contact.*", "1.2.0", CONTACT_V1))
        .await
        .unwrap();
    let report = put.compatibility.unwrap();
    assert_eq!((report.checked, report.failing), (3, 2), "{report:?}");
    // Newest first: the id-only contact, then the one with a stage.
    assert_eq!(report.examples[0].failures[0].keyword, "required");
    assert_eq!(
        report.examples[1].failures[0].keyword,
        "additionalProperties"
    );
    assert!(report.examples[0].offset > report.examples[1].offset);
}

#[tokio::test]
async fn bad_registrations_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        "[schemas]\nmax_registrations = 2\nmax_document_bytes = 1024\n",
    )
    .unwrap();
    let broker = BrokerProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let cases = [
        ("crm.contact.*", "1.0.0", "[", Reason::SchemaInvalid),
        (
            "crm.contact.*",
            "1.0.0",
            r#"{"type":"nope"}"#,
            Reason::SchemaInvalid,
        ),
        (
            "crm.contact.*",
            "1.0.0",
            r#"{"$ref":"https://example.com/s.json"}"#,
            Reason::SchemaInvalid,
        ),
        ("crm.contact.*", "1.0", "{}", Reason::SchemaInvalid),
        ("crm..x", "1.0.0", "{}", Reason::PatternInvalid),
    ];
    for (pattern, version, document, reason) in cases {
        let e = client
            .schema_put(SchemaPut::new(pattern, version, document))
            .await
            .unwrap_err();
        assert_eq!(
            e.reason(),
            Some(reason),
            "{pattern} {version} {document}: {e}"
        );
    }
    let large = format!(r#"{{"description":"{}"}}"#, "x".repeat(2000));
    let e = client
        .schema_put(SchemaPut::new("a.b", "1.0.0", large))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::SchemaInvalid), "{e}");

    client
        .schema_put(SchemaPut::new("a.b", "1.0.0", "{}"))
        .await
        .unwrap();
    client
        .schema_put(SchemaPut::new("a.c", "1.0.0", "{}"))
        .await
        .unwrap();
    let full = client
        .schema_put(SchemaPut::new("a.d", "1.0.0", "{}"))
        .await
        .unwrap_err();
    assert_eq!(full.reason(), Some(Reason::SchemaLimit), "{full}");
    // Replacing one is no new registration.
    let replaced = client
        .schema_put(SchemaPut::new("a.c", "1.0.0", r#"{"type":"object"}"#))
        .await
        .unwrap();
    assert!(replaced.replaced);

    for (pattern, version) in [("a.b", "9.9.9"), ("x.y", "1.0.0")] {
        let e = client.schema_delete(pattern, version).await.unwrap_err();
        assert_eq!(e.reason(), Some(Reason::SchemaNotFound), "{e}");
        let e = client.schema_get(pattern, version).await.unwrap_err();
        assert_eq!(e.reason(), Some(Reason::SchemaNotFound), "{e}");
    }
    client.schema_delete("a.b", "1.0.0").await.unwrap();
    assert_eq!(client.schema_list("", false).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_registry_survives_a_restart() {
    let mut f = fixture(&[]).await;
    f.client
        .schema_put(SchemaPut::new("crm.contact.*", "1.0.0", CONTACT_V1))
        .await
        .unwrap();
    f.broker.restart(&[]).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();
    let refused = client
        .publish(contact(r#"{"id":1}"#, "1.0.0"))
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), Some(Reason::SchemaMismatch), "{refused}");
    assert_eq!(
        client
            .schema_get("crm.contact.*", "1.0.0")
            .await
            .unwrap()
            .document,
        CONTACT_V1
    );
}

#[tokio::test]
async fn the_http_gateway_manages_and_checks_schemas() {
    let f = fixture(&[]).await;
    let base = format!("{}/v1/schemas", f.broker.url());
    let json_header = [("content-type", "application/json")];
    let body = json!({"document": {"required": ["widget"]}, "policy": "warn"}).to_string();
    let put = http_request(
        "PUT",
        &format!("{base}/telemetry.%3E/1.0.0"),
        &json_header,
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(put.status, 201, "{}", put.body);
    let put: Value = serde_json::from_str(&put.body).unwrap();
    assert_eq!(put["pattern"], "telemetry.>");
    assert_eq!(put["policy"], "warn");
    assert_eq!(put["document"]["required"][0], "widget");
    assert_eq!(put["compatibility"]["checked"], 0);

    let list: Value = serde_json::from_str(&http_get(&base).await.unwrap().body).unwrap();
    assert_eq!(list["schemas"][0]["pattern"], "telemetry.>");
    assert!(list["schemas"][0].get("document").is_none());
    let one = http_get(&format!("{base}/telemetry.%3E")).await.unwrap();
    assert_eq!(one.status, 200, "{}", one.body);

    let check = json!({"channel": "telemetry.click", "payload": {"x": 1}}).to_string();
    let checked = http_request(
        "POST",
        &format!("{base}/check"),
        &json_header,
        check.as_bytes(),
    )
    .await
    .unwrap();
    let checked: Value = serde_json::from_str(&checked.body).unwrap();
    // Under warn a mismatch is still published: valid, with its failures named.
    assert_eq!(checked["valid"], true, "{checked}");
    assert_eq!(checked["reason"], "SCHEMA_MISMATCH");
    assert_eq!(checked["failures"][0]["keyword"], "required");

    let bad = http_request(
        "PUT",
        &format!("{base}/telemetry.%3E/1.0.0"),
        &json_header,
        br#"{"document":{},"policy":"sometimes"}"#,
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let deleted = http_request("DELETE", &format!("{base}/telemetry.%3E/1.0.0"), &[], b"")
        .await
        .unwrap();
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let gone = http_get(&format!("{base}/telemetry.%3E/1.0.0"))
        .await
        .unwrap();
    assert_eq!(gone.status, 404, "{}", gone.body);
}

#[tokio::test]
async fn a_registration_reaches_every_node_of_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path(), 3, &[]).expect("three nodes start");
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect(node.url()).await.unwrap());
    }
    // Through a follower: the put is answered once that node applied it too, so the next publish
    // there meets the schema at once; the other nodes apply it as they apply the log.
    let leader = eventually("a leader", || async {
        let status = clients[0].cluster_status().await.ok()?;
        (status.leader_id != 0).then_some(status.leader_id)
    })
    .await
    .unwrap();
    let follower = &clients[usize::try_from(if leader == 1 { 2 } else { 1 }).unwrap() - 1];
    follower
        .schema_put(SchemaPut::new("crm.contact.*", "1.0.0", CONTACT_V1))
        .await
        .unwrap();
    let at_once = follower
        .publish(contact(r#"{"id":1}"#, "1.0.0"))
        .await
        .unwrap_err();
    assert_eq!(at_once.reason(), Some(Reason::SchemaMismatch), "{at_once}");
    for (i, client) in clients.iter().enumerate() {
        eventually(&format!("node {i} enforces the schema"), || async {
            let e = client
                .publish(contact(r#"{"id":1}"#, "1.0.0"))
                .await
                .err()?;
            (e.reason() == Some(Reason::SchemaMismatch)).then_some(())
        })
        .await
        .unwrap();
        client
            .publish(contact(r#"{"id":1,"name":"Ada"}"#, "1.0.0"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn entity_updates_meet_the_schema_of_their_state_channel_as_the_merge_would_leave_them() {
    use switchboard_client::{EntityExt as _, EntityUpdate};

    let f = fixture(&[]).await;
    let contact = r#"{"type":"object","required":["name"],
        "properties":{"name":{"type":"string"},"phone":{"type":"string","pattern":"^[0-9-]+$"}}}"#;
    f.client
        .schema_put(SchemaPut::new("$state.contact.*", "1.0.0", contact))
        .await
        .unwrap();
    let update = |id: &str, fields: Value| EntityUpdate::new("contact", id, fields);

    f.client
        .update_entity(update("42", json!({"name": "Ada"})))
        .await
        .expect("a valid first write");
    // A partial update is judged merged with the fields already there: no name needed again.
    f.client
        .update_entity(update("42", json!({"phone": "555-0100"})))
        .await
        .expect("the merged entity has its name");
    let refused = f
        .client
        .update_entity(update("42", json!({"phone": "call me"})))
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), Some(Reason::SchemaMismatch), "{refused}");
    assert_eq!(refused.metadata("instance_path"), Some("/phone"));
    assert_eq!(refused.metadata("keyword"), Some("pattern"));
    let new_without_name = f
        .client
        .update_entity(update("43", json!({"phone": "555"})))
        .await
        .unwrap_err();
    assert_eq!(new_without_name.metadata("keyword"), Some("required"));

    let after = f
        .client
        .update_entity(update("42", json!({"name": "Ada L."})))
        .await
        .unwrap();
    assert_eq!(after.version, 3, "the refused write was not applied");
    assert_eq!(after.fields_json().unwrap()["phone"], "555-0100");
    let missing = f
        .client
        .get_entity("contact", "43", None)
        .await
        .unwrap_err();
    assert_eq!(missing.reason(), Some(Reason::EntityNotFound));
    // Other entity types are not checked.
    f.client
        .update_entity(EntityUpdate::new("case", "1", json!({"anything": 1})))
        .await
        .unwrap();
}
