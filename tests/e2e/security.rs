//! Security end to end, through the raw gRPC contract: bearer tokens (every refusal reason),
//! per-call permissions, streams ended when their token expires, the token endpoint, TLS and
//! mutual TLS, browser origins, rate limits, and the connection and metadata limits.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use switchboard_e2e::{broker_binary, eventually, BrokerProcess, DEADLINE};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::auth_client::AuthClient;
use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::entities_client::EntitiesClient;
use tempfile::TempDir;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const SECRET: &str = "an hs256 secret that is long enough for the verifier";
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "switchboard";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A broker whose settings file holds `settings` (plus the HS256 key and accepted issuer and
/// audience when `with_key`).
struct Secured {
    broker: BrokerProcess,
    dir: TempDir,
}

fn start(settings: &str, with_key: bool) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    if with_key {
        let key = dir.path().join("hs256.secret");
        std::fs::write(&key, SECRET).unwrap();
        text.push_str(&format!(
            "[auth]\nhs256_secret_file = {:?}\nissuers = [{ISSUER:?}]\naudiences = [{AUDIENCE:?}]\n",
            key.display().to_string()
        ));
    }
    text.push_str(settings);
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, text).unwrap();
    let broker = BrokerProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .expect("broker starts");
    Secured { broker, dir }
}

/// A signed token: the standard claims for this test issuer, `extra` merged over them.
fn token_with(extra: Value, secret: &str) -> String {
    let mut claims = json!({
        "sub": "agent-17",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now_s() + 600,
    });
    if let (Some(claims), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        claims.extend(extra);
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(grant: Value) -> String {
    token_with(json!({ "sb": grant }), SECRET)
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

async fn channel(url: String) -> Channel {
    Channel::from_shared(url).unwrap().connect().await.unwrap()
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| format!("(no reason; {status:?})"))
}

fn assert_refused(status: Status, code: Code, expected: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected, "{status:?}");
}

fn publish(channel: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        channel: channel.into(),
        payload: bytes::Bytes::from_static(b"{}"),
        ..Default::default()
    }
}

fn entity_key(entity_type: &str, id: &str) -> Option<pb::EntityKey> {
    Some(pb::EntityKey {
        r#type: entity_type.into(),
        id: id.into(),
    })
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_reason() {
    let secured = start("", true);
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    let info = || pb::InfoRequest {};

    let missing = raw.info(info()).await.unwrap_err();
    assert_refused(missing, Code::Unauthenticated, "TOKEN_MISSING");
    let mut basic = Request::new(info());
    basic
        .metadata_mut()
        .insert("authorization", MetadataValue::from_static("Basic YTpi"));
    assert_refused(
        raw.info(basic).await.unwrap_err(),
        Code::Unauthenticated,
        "TOKEN_MALFORMED",
    );

    let cases = [
        (
            token_with(json!({ "exp": now_s() - 3600 }), SECRET),
            "TOKEN_EXPIRED",
        ),
        (
            token_with(json!({ "nbf": now_s() + 3600 }), SECRET),
            "TOKEN_NOT_YET_VALID",
        ),
        (
            token_with(json!({ "iss": "https://elsewhere.test" }), SECRET),
            "ISSUER_MISMATCH",
        ),
        (
            token_with(json!({ "aud": "another-service" }), SECRET),
            "AUDIENCE_MISMATCH",
        ),
        (
            token_with(json!({}), "a different secret of more than 32 bytes!!"),
            "TOKEN_INVALID",
        ),
        ("not.a.jwt".to_owned(), "TOKEN_MALFORMED"),
    ];
    for (token, expected) in cases {
        let status = raw.info(with_token(info(), &token)).await.unwrap_err();
        assert_refused(status, Code::Unauthenticated, expected);
    }

    // A good token passes, and health checks need none (balancers and probes have no token).
    raw.info(with_token(info(), &token(json!({}))))
        .await
        .expect("a valid token is accepted");
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(secured.broker.url()).await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
}

#[tokio::test]
async fn each_permission_is_checked_on_every_call() {
    let secured = start("", true);
    let grant = token(json!({
        "publish": ["crm.>"],
        "subscribe": ["crm.*.updated"],
        "entities": { "read": ["contact"], "update": ["contact"] },
    }));
    let other = token(json!({ "subscribe": ["telephony.>"] }));
    let url = secured.broker.url();
    let mut raw = BrokerClient::new(channel(url.clone()).await);
    let mut entities = EntitiesClient::new(channel(url).await);

    // Subscribe first (allowed), so the allowed publish below is seen delivered.
    let mut events = raw
        .subscribe(with_token(
            pb::SubscribeRequest {
                pattern: "crm.*.updated".into(),
                ..Default::default()
            },
            &grant,
        ))
        .await
        .expect("a covered pattern is allowed")
        .into_inner();
    let denied = raw
        .subscribe(with_token(
            pb::SubscribeRequest {
                pattern: "crm.>".into(),
                ..Default::default()
            },
            &grant,
        ))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "SUBSCRIBE_DENIED");
    // The audit line says who was refused (the token's subject) apart from what (the pattern).
    eventually("the audit line of the denied subscribe", || async {
        secured
            .broker
            .log()
            .lines()
            .find(|line| {
                line.contains("audit")
                    && line.contains("SUBSCRIBE_DENIED")
                    && line.contains(r#"principal="agent-17""#)
                    && line.contains(r#"target="crm.>""#)
            })
            .map(str::to_owned)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; the log:\n{}", secured.broker.log()));

    let ack = raw
        .publish(with_token(publish("crm.contact.updated"), &grant))
        .await
        .expect("an allowed publish")
        .into_inner();
    assert_refused(
        raw.publish(with_token(publish("telephony.call.started"), &grant))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "PUBLISH_DENIED",
    );
    assert_refused(
        raw.publish(with_token(publish("$state.contact.1"), &grant))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "CHANNEL_RESERVED",
    );
    let delivered = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.message().await.unwrap() {
                Some(pb::SubscribeEvent {
                    event: Some(pb::subscribe_event::Event::Message(m)),
                }) => return m,
                Some(_) => continue,
                None => panic!("subscription ended"),
            }
        }
    })
    .await
    .expect("the allowed publish is delivered");
    assert_eq!(delivered.offset, ack.offset);

    // A refused message in a publish stream is refused alone; the stream goes on.
    let stream = futures::stream::iter(vec![
        publish("telephony.call.started"),
        publish("crm.contact.updated"),
    ]);
    let mut acks = raw
        .publish_stream(with_token(stream, &grant))
        .await
        .unwrap()
        .into_inner();
    let first = acks.message().await.unwrap().unwrap();
    match first.result {
        Some(pb::publish_stream_ack::Result::Refusal(refusal)) => {
            assert_eq!(refusal.reason, "PUBLISH_DENIED");
            assert_eq!(refusal.code, Code::PermissionDenied as i32);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        acks.message().await.unwrap().unwrap().result,
        Some(pb::publish_stream_ack::Result::Ack(_))
    ));

    // History is subscription to the past.
    let history = |pattern: &str| pb::HistoryRequest {
        pattern: pattern.into(),
        ..Default::default()
    };
    let page = raw
        .history(with_token(history("crm.contact.updated"), &grant))
        .await
        .expect("covered history")
        .into_inner();
    assert_eq!(page.messages.len(), 2);
    assert_refused(
        raw.history(with_token(history(">"), &grant))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "SUBSCRIBE_DENIED",
    );

    // Entities: update and read are separate grants, per type.
    let update = |entity_type: &str| pb::UpdateEntityRequest {
        key: entity_key(entity_type, "c-1"),
        fields: bytes::Bytes::from_static(br#"{"name":"Ada"}"#),
        stamp: Some(pb::WriteStamp {
            timestamp_ms: now_s() * 1000,
            version: 1,
            writer: "crm-panel".into(),
        }),
        ..Default::default()
    };
    entities
        .update_entity(with_token(update("contact"), &grant))
        .await
        .expect("update of a granted type");
    assert_refused(
        entities
            .update_entity(with_token(update("ticket"), &grant))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "ENTITY_UPDATE_DENIED",
    );
    let get = |entity_type: &str| pb::GetEntityRequest {
        key: entity_key(entity_type, "c-1"),
        ..Default::default()
    };
    entities
        .get_entity(with_token(get("contact"), &grant))
        .await
        .expect("read of a granted type");
    assert_refused(
        entities
            .get_entity(with_token(get("contact"), &other))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "ENTITY_READ_DENIED",
    );
    let watch = |pattern: &str| pb::WatchEntitiesRequest {
        pattern: pattern.into(),
        ..Default::default()
    };
    entities
        .watch_entities(with_token(watch("contact.*"), &grant))
        .await
        .expect("a watch over a granted type");
    // Entity state is granted by `entities.read`, so reading it without is refused as such,
    // whether watched or subscribed to as `$state.…` (live or as history).
    assert_refused(
        entities
            .watch_entities(with_token(watch("*.*"), &grant))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "ENTITY_READ_DENIED",
    );
    for pattern in ["$state.order.>", "$state.*.*", "$state.>"] {
        let refused = raw
            .subscribe(with_token(
                pb::SubscribeRequest {
                    pattern: pattern.into(),
                    ..Default::default()
                },
                &grant,
            ))
            .await
            .unwrap_err();
        assert_refused(refused, Code::PermissionDenied, "ENTITY_READ_DENIED");
        let refused = raw
            .history(with_token(history(pattern), &grant))
            .await
            .unwrap_err();
        assert_refused(refused, Code::PermissionDenied, "ENTITY_READ_DENIED");
    }
    raw.subscribe(with_token(
        pb::SubscribeRequest {
            pattern: "$state.contact.>".into(),
            ..Default::default()
        },
        &grant,
    ))
    .await
    .expect("the state of a readable type");

    // Durable consumers are visible only to callers who could follow their pattern.
    let durable = raw
        .subscribe(with_token(
            pb::SubscribeRequest {
                pattern: "crm.*.updated".into(),
                durable_name: "crm-sync".into(),
                ..Default::default()
            },
            &grant,
        ))
        .await
        .expect("a durable consumer on a covered pattern");
    let listed = |token: &str| {
        let mut raw = raw.clone();
        let token = token.to_owned();
        async move {
            raw.list_consumers(with_token(pb::ListConsumersRequest {}, &token))
                .await
                .unwrap()
                .into_inner()
                .consumers
                .len()
        }
    };
    assert_eq!(listed(&grant).await, 1);
    assert_eq!(listed(&other).await, 0);
    let get_consumer = pb::GetConsumerRequest {
        name: "crm-sync".into(),
    };
    assert_refused(
        raw.get_consumer(with_token(get_consumer.clone(), &other))
            .await
            .unwrap_err(),
        Code::NotFound,
        "CONSUMER_NOT_FOUND",
    );
    assert_refused(
        raw.delete_consumer(with_token(
            pb::DeleteConsumerRequest {
                name: "crm-sync".into(),
            },
            &other,
        ))
        .await
        .unwrap_err(),
        Code::NotFound,
        "CONSUMER_NOT_FOUND",
    );
    raw.get_consumer(with_token(get_consumer, &grant))
        .await
        .expect("its own consumer");
    drop(durable);
}

/// The next event of a raw subscription, failing after the deadline.
async fn next_event(
    events: &mut tonic::Streaming<pb::SubscribeEvent>,
) -> Result<pb::subscribe_event::Event, Status> {
    tokio::time::timeout(DEADLINE, events.message())
        .await
        .expect("an event within the deadline")?
        .and_then(|event| event.event)
        .ok_or_else(|| Status::cancelled("the subscription ended"))
}

/// The next message's offset, skipping other events.
async fn next_offset(events: &mut tonic::Streaming<pb::SubscribeEvent>) -> u64 {
    loop {
        if let pb::subscribe_event::Event::Message(m) = next_event(events).await.unwrap() {
            return m.offset;
        }
    }
}

#[tokio::test]
async fn a_durable_consumer_belongs_to_the_principal_that_created_it() {
    let mut secured = start("", true);
    let grant = json!({ "publish": ["crm.>"], "subscribe": ["crm.>"] });
    let alice = token_with(json!({ "sub": "alice", "sb": grant }), SECRET);
    // Bob has exactly Alice's grant: only ownership tells them apart.
    let bob = token_with(json!({ "sub": "bob", "sb": grant }), SECRET);
    let ops = token_with(
        json!({ "sub": "ops", "sb": { "subscribe": ["crm.>"], "admin": true } }),
        SECRET,
    );
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    let durable = |token: &str| {
        with_token(
            pb::SubscribeRequest {
                pattern: "crm.>".into(),
                durable_name: "alice-sync".into(),
                max_unacked: 10,
                ..Default::default()
            },
            token,
        )
    };
    let consumer = || pb::GetConsumerRequest {
        name: "alice-sync".into(),
    };
    let delete = || pb::DeleteConsumerRequest {
        name: "alice-sync".into(),
    };
    let not_owned = |status: Status| {
        assert_refused(status, Code::PermissionDenied, "CONSUMER_NOT_OWNED");
    };

    let mut events = raw.subscribe(durable(&alice)).await.unwrap().into_inner();
    let subscription_id = match next_event(&mut events).await.unwrap() {
        pb::subscribe_event::Event::Subscribed(s) => s.subscription_id,
        other => panic!("expected Subscribed, got {other:?}"),
    };
    let first = raw
        .publish(with_token(publish("crm.deal.won"), &alice))
        .await
        .unwrap()
        .into_inner()
        .offset;
    assert_eq!(next_offset(&mut events).await, first);

    // Bob does not see it listed, and is refused reading, acknowledging for, taking over or
    // deleting it.
    let listed = |token: &str| {
        let mut raw = raw.clone();
        let token = token.to_owned();
        async move {
            let consumers = raw
                .list_consumers(with_token(pb::ListConsumersRequest {}, &token))
                .await
                .unwrap()
                .into_inner()
                .consumers;
            let subscriptions = raw
                .list_subscriptions(with_token(pb::ListSubscriptionsRequest {}, &token))
                .await
                .unwrap()
                .into_inner()
                .subscriptions;
            (consumers.len(), subscriptions.len())
        }
    };
    assert_eq!(listed(&alice).await, (1, 1));
    assert_eq!(listed(&bob).await, (0, 0));
    assert_eq!(listed(&ops).await, (1, 1), "an admin sees every consumer");
    not_owned(
        raw.get_consumer(with_token(consumer(), &bob))
            .await
            .unwrap_err(),
    );
    // Subscription ids are small numbers: an id that is not the caller's is as good as unknown.
    let ack = |token: &str| {
        with_token(
            pb::AckRequest {
                subscription_id,
                offsets: vec![first],
            },
            token,
        )
    };
    assert_refused(
        raw.ack(ack(&bob)).await.unwrap_err(),
        Code::NotFound,
        "SUBSCRIPTION_NOT_FOUND",
    );
    let info = raw
        .get_consumer(with_token(consumer(), &alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.acked_offset, info.pending), (first - 1, 1));
    not_owned(raw.subscribe(durable(&bob)).await.unwrap_err());
    not_owned(
        raw.delete_consumer(with_token(delete(), &bob))
            .await
            .unwrap_err(),
    );
    // Alice's stream was neither taken over nor ended: it goes on.
    let second = raw
        .publish(with_token(publish("crm.deal.lost"), &alice))
        .await
        .unwrap()
        .into_inner()
        .offset;
    assert_eq!(next_offset(&mut events).await, second);
    let acked = raw.ack(ack(&alice)).await.unwrap().into_inner();
    assert_eq!(acked.acked_offset, first);

    // An admin manages any consumer: deleting Alice's ends her stream.
    raw.get_consumer(with_token(consumer(), &ops))
        .await
        .expect("an admin reads any consumer");
    raw.delete_consumer(with_token(delete(), &ops))
        .await
        .expect("an admin deletes any consumer");
    let ended = loop {
        match next_event(&mut events).await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_refused(ended, Code::FailedPrecondition, "CONSUMER_TAKEN_OVER");
    // Once deleted, the name is free: whoever opens it next owns it.
    let mut bobs = raw.subscribe(durable(&bob)).await.unwrap().into_inner();
    assert!(matches!(
        next_event(&mut bobs).await,
        Ok(pb::subscribe_event::Event::Subscribed(_))
    ));
    not_owned(
        raw.get_consumer(with_token(consumer(), &alice))
            .await
            .unwrap_err(),
    );

    // The owner is part of the consumer's replicated record: it survives a restart.
    drop(bobs);
    let config = secured.dir.path().join("switchboard.toml");
    secured
        .broker
        .restart(&["--config", config.to_str().unwrap()])
        .unwrap();
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    raw.get_consumer(with_token(consumer(), &bob))
        .await
        .expect("its owner reads it after a restart");
    not_owned(
        raw.get_consumer(with_token(consumer(), &alice))
            .await
            .unwrap_err(),
    );
}

#[tokio::test]
async fn a_stream_ends_with_token_expired_when_its_token_does() {
    // No leeway, and a token that lives two seconds: the stream must end then, not run on.
    let secured = start("leeway = \"0s\"\n", true);
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    let short = token_with(
        json!({ "exp": now_s() + 2, "sb": { "subscribe": ["crm.>"] } }),
        SECRET,
    );
    let mut events = raw
        .subscribe(with_token(
            pb::SubscribeRequest {
                pattern: "crm.>".into(),
                ..Default::default()
            },
            &short,
        ))
        .await
        .expect("subscribes while the token is valid")
        .into_inner();
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends when the token expires");
    assert_refused(ended, Code::Unauthenticated, "TOKEN_EXPIRED");
}

/// `switchboard hash-secret --stdin`: the argon2id hash of `secret`.
fn hash_secret(secret: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(broker_binary())
        .args(["hash-secret", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{secret}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("secret_hash = "))
        .unwrap();
    line.trim_matches('"').to_owned()
}

/// Token-endpoint settings with one client, `crm-panel`, and `limits` (its rate-limit lines).
fn token_endpoint_settings(dir: &Path, limits: &str) -> String {
    let signing = dir.join("signing.key");
    std::fs::write(&signing, "a token-endpoint signing secret, 32+ bytes").unwrap();
    format!(
        r#"
[auth.token_endpoint]
signing_key_file = {signing:?}
{limits}

[[auth.token_endpoint.clients]]
id = "crm-panel"
secret_hash = "{hash}"
token_ttl = "10m"
scope = {{ publish = ["crm.>"], subscribe = ["crm.>"], kpi = ["crm.*"] }}
"#,
        signing = signing.display().to_string(),
        hash = hash_secret("crm-panel-secret-0123456789"),
    )
}

#[tokio::test]
async fn the_token_endpoint_mints_scoped_tokens_for_configured_clients() {
    let dir = tempfile::tempdir().unwrap();
    let settings = token_endpoint_settings(
        dir.path(),
        "failures_per_client_address = { per_second = 100.0, burst = 100 }\n\
         per_connection = { per_second = 100.0, burst = 100 }",
    );
    let secured = start(&settings, false);
    let url = secured.broker.url();
    let mut auth = AuthClient::new(channel(url.clone()).await);
    let mut raw = BrokerClient::new(channel(url).await);
    let issue = |secret: &str| pb::IssueTokenRequest {
        client_id: "crm-panel".into(),
        client_secret: secret.into(),
        ..Default::default()
    };

    assert_refused(
        auth.issue_token(issue("wrong-secret-0123456789"))
            .await
            .unwrap_err(),
        Code::Unauthenticated,
        "INVALID_CLIENT",
    );
    let mut unknown = issue("crm-panel-secret-0123456789");
    unknown.client_id = "nobody".into();
    assert_refused(
        auth.issue_token(unknown).await.unwrap_err(),
        Code::Unauthenticated,
        "INVALID_CLIENT",
    );
    let mut wider = issue("crm-panel-secret-0123456789");
    wider.scope = Some(pb::Scope {
        publish: vec![">".into()],
        ..Default::default()
    });
    assert_refused(
        auth.issue_token(wider).await.unwrap_err(),
        Code::PermissionDenied,
        "SCOPE_NOT_ALLOWED",
    );
    let mut all_views = issue("crm-panel-secret-0123456789");
    all_views.scope = Some(pb::Scope {
        kpi: vec!["*".into()],
        ..Default::default()
    });
    assert_refused(
        auth.issue_token(all_views).await.unwrap_err(),
        Code::PermissionDenied,
        "SCOPE_NOT_ALLOWED",
    );
    let mut one_view = issue("crm-panel-secret-0123456789");
    one_view.scope = Some(pb::Scope {
        kpi: vec!["crm.deals".into()],
        ..Default::default()
    });
    let narrowed = auth
        .issue_token(one_view)
        .await
        .expect("a narrower kpi scope");
    assert_eq!(narrowed.into_inner().scope.unwrap().kpi, ["crm.deals"]);
    let mut for_agent = issue("crm-panel-secret-0123456789");
    for_agent.subject = "agent-17".into();
    assert_refused(
        auth.issue_token(for_agent).await.unwrap_err(),
        Code::PermissionDenied,
        "ON_BEHALF_NOT_ALLOWED",
    );

    let issued = auth
        .issue_token(issue("crm-panel-secret-0123456789"))
        .await
        .expect("right credentials")
        .into_inner();
    assert_eq!(issued.token_type, "Bearer");
    assert!(
        (590..=600).contains(&issued.expires_in_seconds),
        "{issued:?}"
    );
    let scope = issued.scope.unwrap();
    assert_eq!(scope.publish, vec!["crm.>".to_owned()]);
    assert_eq!(scope.kpi, ["crm.*"]);
    raw.publish(with_token(publish("crm.note.added"), &issued.access_token))
        .await
        .expect("the minted token publishes within its scope");
    assert_refused(
        raw.publish(with_token(publish("telephony.x"), &issued.access_token))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "PUBLISH_DENIED",
    );
    assert_refused(
        raw.info(pb::InfoRequest {}).await.unwrap_err(),
        Code::Unauthenticated,
        "TOKEN_MISSING",
    );
}

#[tokio::test]
async fn token_requests_are_rate_limited_before_any_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let settings = token_endpoint_settings(
        dir.path(),
        "failures_per_client_address = { per_second = 0.01, burst = 2 }",
    );
    let secured = start(&settings, false);
    let mut auth = AuthClient::new(channel(secured.broker.url()).await);
    let request = pb::IssueTokenRequest {
        client_id: "crm-panel".into(),
        client_secret: "wrong-secret-0123456789".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let status = auth.issue_token(request.clone()).await.unwrap_err();
        assert_eq!(reason(&status), "INVALID_CLIENT");
    }
    let limited = auth.issue_token(request).await.unwrap_err();
    assert_refused(limited.clone(), Code::ResourceExhausted, "RATE_LIMITED");
    let hint = limited.get_details_error_info().unwrap().metadata["retry_after_ms"]
        .parse::<u64>()
        .unwrap();
    assert!(hint > 0, "a retry hint: {hint}");
    assert!(limited.get_details_retry_info().is_some());
}

/// A gRPC connection to `url` from the local address `from` (any 127.x.y.z reaches a broker on
/// 127.0.0.1, from an address of its own).
async fn channel_from(url: String, from: [u8; 4]) -> Channel {
    tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .local_address(Some(std::net::IpAddr::from(from)))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn failed_secrets_from_one_address_do_not_lock_the_client_out_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let settings = token_endpoint_settings(
        dir.path(),
        "failures_per_client_address = { per_second = 0.01, burst = 2 }\n\
         per_connection = { per_second = 100.0, burst = 100 }",
    );
    let secured = start(&settings, false);
    let url = secured.broker.url();
    let issue = |secret: &str| pb::IssueTokenRequest {
        client_id: "crm-panel".into(),
        client_secret: secret.into(),
        ..Default::default()
    };
    let right = issue("crm-panel-secret-0123456789");
    let wrong = issue("wrong-secret-0123456789");

    // The real client, at 127.0.0.2, before and after the attack: right secrets, more of them than
    // the failure burst, spend nothing.
    let mut client = AuthClient::new(channel_from(url.clone(), [127, 0, 0, 2]).await);
    for _ in 0..3 {
        client
            .issue_token(right.clone())
            .await
            .expect("right secrets take nothing from the failure budget");
    }

    // Someone at 127.0.0.1 guesses: its failures run out, on any connection from that address.
    let mut attacker = AuthClient::new(channel_from(url.clone(), [127, 0, 0, 1]).await);
    for _ in 0..2 {
        let status = attacker.issue_token(wrong.clone()).await.unwrap_err();
        assert_refused(status, Code::Unauthenticated, "INVALID_CLIENT");
    }
    let limited = attacker.issue_token(wrong.clone()).await.unwrap_err();
    assert_refused(limited, Code::ResourceExhausted, "RATE_LIMITED");
    let mut again = AuthClient::new(channel_from(url.clone(), [127, 0, 0, 1]).await);
    assert_refused(
        again.issue_token(wrong).await.unwrap_err(),
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );

    // The real client elsewhere is not refused for the failures at 127.0.0.1.
    for _ in 0..3 {
        let issued = client
            .issue_token(right.clone())
            .await
            .expect("a right secret from another address gets a token")
            .into_inner();
        assert_eq!(issued.token_type, "Bearer");
    }
}

#[tokio::test]
async fn without_clients_the_token_endpoint_is_off() {
    let secured = start("", true);
    let mut auth = AuthClient::new(channel(secured.broker.url()).await);
    let status = auth
        .issue_token(pb::IssueTokenRequest::default())
        .await
        .unwrap_err();
    assert_refused(status, Code::Unimplemented, "TOKEN_ENDPOINT_OFF");
}

#[tokio::test]
async fn calls_from_browsers_need_an_allowed_origin() {
    let secured = start(
        "[origins]\nallow = [\"https://*.example.com\", \"http://localhost:3000\"]\n",
        false,
    );
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    let from = |origin: &'static str| {
        let mut request = Request::new(pb::InfoRequest {});
        request
            .metadata_mut()
            .insert("origin", MetadataValue::from_static(origin));
        request
    };
    raw.info(Request::new(pb::InfoRequest {}))
        .await
        .expect("services send no Origin and pass");
    for allowed in ["https://crm.example.com", "http://localhost:3000"] {
        raw.info(from(allowed)).await.expect(allowed);
    }
    for refused in [
        "https://crm.example.com.evil.test",
        "http://crm.example.com",
        "https://example.com",
        "https://crm.example.com:8443",
        "null",
    ] {
        let status = raw.info(from(refused)).await.unwrap_err();
        assert_refused(status, Code::PermissionDenied, "ORIGIN_NOT_ALLOWED");
    }
}

#[tokio::test]
async fn a_connection_past_its_budget_is_told_when_to_retry() {
    let secured = start(
        "[rate_limits]\nper_connection = { per_second = 0.01, burst = 3 }\n",
        false,
    );
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    for _ in 0..3 {
        raw.info(pb::InfoRequest {})
            .await
            .expect("within the burst");
    }
    let limited = raw.info(pb::InfoRequest {}).await.unwrap_err();
    assert_refused(limited.clone(), Code::ResourceExhausted, "RATE_LIMITED");
    assert!(limited.get_details_retry_info().is_some());
    // Another connection has its own budget.
    let mut fresh = BrokerClient::new(channel(secured.broker.url()).await);
    fresh
        .info(pb::InfoRequest {})
        .await
        .expect("a new connection");
}

#[tokio::test]
async fn connections_and_metadata_are_bounded() {
    let secured = start("[limits]\nmax_connections = 2\n", false);
    let url = secured.broker.url();
    let mut first = BrokerClient::new(channel(url.clone()).await);
    let mut second = BrokerClient::new(channel(url.clone()).await);
    first.info(pb::InfoRequest {}).await.unwrap();
    second.info(pb::InfoRequest {}).await.unwrap();
    // The third connection is closed on arrival: its call fails at the transport (reset).
    let third = Channel::from_shared(url.clone()).unwrap().connect().await;
    if let Ok(third) = third {
        let refused = BrokerClient::new(third).info(pb::InfoRequest {}).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    // Metadata past limits.max_metadata_bytes (16 KiB by default) refuses that call only.
    let mut big = Request::new(pb::InfoRequest {});
    big.metadata_mut().insert(
        "x-padding",
        MetadataValue::try_from("x".repeat(32 * 1024)).unwrap(),
    );
    assert_refused(
        first.info(big).await.unwrap_err(),
        Code::InvalidArgument,
        "METADATA_TOO_LARGE",
    );
    first
        .info(pb::InfoRequest {})
        .await
        .expect("the connection goes on");
    drop(second);
    eventually("a connection accepted again once one closed", || {
        let url = url.clone();
        async move {
            let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
            BrokerClient::new(channel)
                .info(pb::InfoRequest {})
                .await
                .ok()
        }
    })
    .await
    .expect("a closed connection frees its place");
    drop(secured.dir);
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
pub(crate) struct Pki {
    pub(crate) ca: String,
    client_cert: String,
    client_key: String,
}

pub(crate) fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["crm-panel".to_owned()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        ca: ca.pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn tls_settings(dir: &Path, mutual: bool) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut text = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        path("server.pem"),
        path("server.key")
    );
    if mutual {
        text.push_str(&format!("client_ca_file = {:?}\n", path("ca.pem")));
    }
    text
}

async fn tls_info(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<(), String> {
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    BrokerClient::new(channel)
        .info(pb::InfoRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let secured = start(&tls_settings(pki_dir.path(), false), false);
    let addr = secured.broker.addr;
    let trusted = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    tls_info(addr, trusted)
        .await
        .expect("a client trusting the CA connects");
    // Plain text to a TLS listener fails, and so does a client that does not trust the CA.
    let mut plain = BrokerClient::new(channel(format!("http://{addr}")).await);
    assert!(plain.info(pb::InfoRequest {}).await.is_err());
    let untrusting = ClientTlsConfig::new().domain_name("localhost");
    assert!(tls_info(addr, untrusting).await.is_err());
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let secured = start(&tls_settings(pki_dir.path(), true), false);
    let addr = secured.broker.addr;
    let without = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    assert!(
        tls_info(addr, without).await.is_err(),
        "no client certificate"
    );
    let with = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(Identity::from_pem(&pki.client_cert, &pki.client_key))
        .domain_name("localhost");
    tls_info(addr, with)
        .await
        .expect("a client with a certificate from the CA connects");
}

#[tokio::test]
async fn the_client_and_sb_work_end_to_end_with_tls_and_client_credentials() {
    use futures::StreamExt;
    use switchboard_client::{Client, ConnectOptions, Publish, Start};

    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let mut settings = token_endpoint_settings(
        dir.path(),
        "failures_per_client_address = { per_second = 100.0, burst = 100 }\n\
         per_connection = { per_second = 100.0, burst = 100 }",
    );
    settings.push_str(&tls_settings(dir.path(), false));
    let secured = start(&settings, false);
    let url = format!("https://localhost:{}", secured.broker.addr.port());
    let options = || {
        ConnectOptions::default()
            .ca_certificate(pki.ca.clone())
            .client_credentials("crm-panel", "crm-panel-secret-0123456789")
    };

    // The Rust client: a token fetched on the first call, TLS verified against the CA.
    let client = Client::connect_with(url.clone(), options()).await.unwrap();
    let mut subscription = client.subscribe("crm.>", Start::Latest).await.unwrap();
    let ack = client
        .publish(Publish::new("crm.contact.updated", "{}"))
        .await
        .expect("a publish within the client's scope");
    let delivered = tokio::time::timeout(DEADLINE, subscription.next())
        .await
        .expect("delivered in time")
        .expect("the subscription goes on")
        .expect("a message");
    assert_eq!(delivered.offset, ack.offset);
    let refused = client
        .publish(Publish::new("telephony.call.started", "{}"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.reason(),
        Some(switchboard_client::Reason::PublishDenied),
        "{refused}"
    );

    // sb, with the same credentials from the environment and the CA from a flag.
    let ca = dir.path().join("ca.pem").display().to_string();
    let sb = |args: &[&str]| {
        std::process::Command::new(switchboard_e2e::sb_binary())
            .args(["--server", &url, "--ca", &ca])
            .args(args)
            .env("SWITCHBOARD_CLIENT_ID", "crm-panel")
            .env("SWITCHBOARD_CLIENT_SECRET", "crm-panel-secret-0123456789")
            .output()
            .unwrap()
    };
    let published = sb(&["publish", "crm.note.added", "{\"by\":\"sb\"}"]);
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let token = sb(&["token"]);
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token: Value = serde_json::from_slice(&token.stdout).unwrap();
    assert_eq!(token["token_type"], "Bearer");
    let denied = sb(&["publish", "telephony.x.y", "{}"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("PERMISSION_DENIED PUBLISH_DENIED"),
        "{stderr}"
    );
}

#[tokio::test]
async fn membership_changes_need_the_admin_grant() {
    use switchboard_proto::v1::cluster_client::ClusterClient;
    let secured = start("", true);
    let mut cluster = ClusterClient::new(channel(secured.broker.url()).await);
    let add = || pb::AddLearnerRequest {
        id: 9,
        raft_address: "127.0.0.1:1".into(),
        public_address: String::new(),
    };
    let plain = token(json!({ "publish": ["crm.>"] }));
    assert_refused(
        cluster
            .add_learner(with_token(add(), &plain))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "ADMIN_DENIED",
    );
    assert_refused(
        cluster
            .remove(with_token(pb::RemoveRequest { id: 1 }, &plain))
            .await
            .unwrap_err(),
        Code::PermissionDenied,
        "ADMIN_DENIED",
    );
    // Status needs only a valid token; without one, nothing.
    cluster
        .status(with_token(pb::ClusterStatusRequest {}, &plain))
        .await
        .expect("status with any valid token");
    assert_refused(
        cluster
            .status(pb::ClusterStatusRequest {})
            .await
            .unwrap_err(),
        Code::Unauthenticated,
        "TOKEN_MISSING",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_nodes_talk_over_mutual_tls_and_refuse_peers_without_a_certificate() {
    use switchboard_client::{Client, HistoryQuery, Publish, Start};
    use switchboard_proto::internal::v1::raft_client::RaftClient;
    use switchboard_proto::internal::v1::Frame;

    let dir = tempfile::tempdir().unwrap();
    // One certificate for every node (it names 127.0.0.1, the host each peer dials), from the CA.
    let pki = make_pki(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    let env = [
        ("SWITCHBOARD_CLUSTER_TLS_CERT_FILE", cert.as_str()),
        ("SWITCHBOARD_CLUSTER_TLS_KEY_FILE", key.as_str()),
        ("SWITCHBOARD_CLUSTER_TLS_CA_FILE", ca.as_str()),
    ];
    let nodes = switchboard_e2e::start_cluster(&dir.path().join("nodes"), 3, &env)
        .expect("three nodes start");
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect(node.url()).await.unwrap());
    }
    // A leader is elected and writes through every node replicate: the nodes reach each other.
    eventually("a leader elected over TLS", || async {
        let status = clients[0].cluster_status().await.ok()?;
        (status.leader_id != 0).then_some(())
    })
    .await
    .expect("a leader");
    for (i, client) in clients.iter().enumerate() {
        eventually("a publish accepted", || async {
            client
                .publish(Publish::new(
                    "orders.eu.created",
                    format!("{{\"via\":{i}}}"),
                ))
                .await
                .ok()
        })
        .await
        .expect("each node accepts (followers forward over TLS)");
    }
    for client in &clients {
        eventually("every node holding the three messages", || async {
            let page = client
                .history_all(HistoryQuery::new(">").from(Start::Earliest), 100)
                .await
                .ok()?;
            (page.len() == 3).then_some(())
        })
        .await
        .expect("replicated to every node");
    }

    // The raft listener refuses plain text, and TLS without a certificate from the cluster CA.
    let raft_addr = nodes[0].raft_addr.clone();
    let vote = || Frame {
        data: Vec::new().into(),
    };
    if let Ok(channel) = Channel::from_shared(format!("http://{raft_addr}"))
        .unwrap()
        .connect()
        .await
    {
        assert!(RaftClient::new(channel).vote(vote()).await.is_err());
    }
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("127.0.0.1");
    let refused = async {
        let channel = Channel::from_shared(format!("https://{raft_addr}"))
            .unwrap()
            .tls_config(anonymous)
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        RaftClient::new(channel)
            .vote(vote())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(refused.is_err(), "a peer without a certificate got through");
}

#[tokio::test]
async fn an_ephemeral_publish_needs_the_same_grant_as_a_stored_one() {
    let secured = start("", true);
    let grant = token(json!({ "publish": ["crm.>"] }));
    let mut raw = BrokerClient::new(channel(secured.broker.url()).await);
    let ephemeral = |channel: &str| pb::PublishRequest {
        ephemeral: true,
        ..publish(channel)
    };
    let ack = raw
        .publish(with_token(ephemeral("crm.cursor.moved"), &grant))
        .await
        .expect("a granted channel is allowed")
        .into_inner();
    assert_eq!(ack.offset, 0);
    let denied = raw
        .publish(with_token(ephemeral("telephony.cursor.moved"), &grant))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "PUBLISH_DENIED");
    let anonymous = raw
        .publish(Request::new(ephemeral("crm.cursor.moved")))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
}

#[tokio::test]
async fn changing_the_schema_registry_needs_the_schema_grant_and_reading_it_does_not() {
    use switchboard_proto::v1::schema_service_client::SchemaServiceClient;

    let secured = start("", true);
    let publisher = token(json!({ "publish": ["crm.>"] }));
    let registrar = token(json!({ "schema": true }));
    let admin = token(json!({ "admin": true }));
    let mut schemas = SchemaServiceClient::new(channel(secured.broker.url()).await);
    let put = |version: &str| pb::PutSchemaRequest {
        pattern: "crm.contact.*".into(),
        version: version.into(),
        document: r#"{"required":["id"]}"#.into(),
        ..Default::default()
    };

    let denied = schemas
        .put_schema(with_token(put("1.0.0"), &publisher))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "SCHEMA_DENIED");
    let unauthenticated = schemas.put_schema(put("1.0.0")).await.unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    schemas
        .put_schema(with_token(put("1.0.0"), &registrar))
        .await
        .expect("the schema grant registers");
    schemas
        .put_schema(with_token(put("1.1.0"), &admin))
        .await
        .expect("admin implies the schema grant");
    let delete = || pb::DeleteSchemaRequest {
        pattern: "crm.contact.*".into(),
        version: "1.1.0".into(),
    };
    let denied = schemas
        .delete_schema(with_token(delete(), &publisher))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "SCHEMA_DENIED");

    // Reading the registry needs only an accepted token; the registrant is recorded.
    let listed = schemas
        .list_schemas(with_token(pb::ListSchemasRequest::default(), &publisher))
        .await
        .unwrap()
        .into_inner()
        .schemas;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].registered_by, format!("{ISSUER} agent-17"));

    // The check a publish meets comes after its grant: a publisher learns nothing of the
    // schemas of channels it may not publish to, and meets the schema where it may.
    let mut broker = BrokerClient::new(channel(secured.broker.url()).await);
    let outside = pb::PublishRequest {
        channel: "ops.contact.x".into(),
        payload: bytes::Bytes::from_static(b"{}"),
        ..Default::default()
    };
    let denied = broker
        .publish(with_token(outside, &publisher))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "PUBLISH_DENIED");
    let mismatch = broker
        .publish(with_token(publish("crm.contact.updated"), &publisher))
        .await
        .unwrap_err();
    assert_refused(mismatch, Code::InvalidArgument, "SCHEMA_MISMATCH");
    schemas
        .delete_schema(with_token(delete(), &registrar))
        .await
        .expect("the schema grant deletes");
}

#[tokio::test]
async fn reading_a_kpi_view_needs_a_kpi_grant_matching_its_name_over_grpc_and_http() {
    use switchboard_e2e::{http_request, SseStream};
    use switchboard_proto::v1::kpi_service_client::KpiServiceClient;

    let good = "https://good.example.com";
    let secured = start(&format!("[origins]\nallow = [{good:?}]\n"), true);
    let admin = token(json!({ "admin": true, "publish": ["calls.>"] }));
    let reader = token(json!({ "kpi": ["sales.*"] }));
    let mut kpis = KpiServiceClient::new(channel(secured.broker.url()).await);
    let definition = |name: &str| pb::DefineViewRequest {
        definition: format!("name = {name:?}\npattern = \"calls.>\"\nwindows = [\"1h\"]\n"),
    };

    // Defining needs `admin`; a `kpi` grant only reads.
    let denied = kpis
        .define_view(with_token(definition("sales.calls"), &reader))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "ADMIN_DENIED");
    for name in ["sales.calls", "support.calls"] {
        kpis.define_view(with_token(definition(name), &admin))
            .await
            .expect("admin defines");
    }
    let mut broker = BrokerClient::new(channel(secured.broker.url()).await);
    broker
        .publish(with_token(publish("calls.q1.ended"), &admin))
        .await
        .unwrap();

    let get = |view: &str| pb::GetKpisRequest {
        view: view.into(),
        windows: 1,
        ..Default::default()
    };
    let sales = kpis
        .get_kpis(with_token(get("sales.calls"), &reader))
        .await
        .expect("the grant reads sales.*")
        .into_inner();
    assert_eq!(sales.windows.last().unwrap().groups[0].messages, 1);
    kpis.get_kpis(with_token(get("support.calls"), &admin))
        .await
        .expect("admin reads every view");
    // Refused before the view is looked up: a view that does not exist is refused alike.
    for view in ["support.calls", "support.none"] {
        let denied = kpis
            .get_kpis(with_token(get(view), &reader))
            .await
            .unwrap_err();
        assert_refused(denied, Code::PermissionDenied, "KPI_DENIED");
        let denied = kpis
            .get_view(with_token(
                pb::GetViewRequest { name: view.into() },
                &reader,
            ))
            .await
            .unwrap_err();
        assert_refused(denied, Code::PermissionDenied, "KPI_DENIED");
    }
    let denied = kpis
        .watch_kpis(with_token(
            pb::WatchKpisRequest {
                view: "support.calls".into(),
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_refused(denied, Code::PermissionDenied, "KPI_DENIED");
    let listed: Vec<String> = kpis
        .list_views(with_token(pb::ListViewsRequest {}, &reader))
        .await
        .unwrap()
        .into_inner()
        .views
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(listed, ["sales.calls"]);

    // The same over HTTP, where the answer is the gRPC one.
    let base = format!("http://{}", secured.broker.addr);
    let bearer = format!("Bearer {reader}");
    let ok = http_request(
        "GET",
        &format!("{base}/v1/kpis/sales.calls"),
        &[("Authorization", &bearer), ("Origin", good)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    let etag = format!("\"{}\"", sales.etag);
    assert_eq!(ok.header("etag"), Some(etag.as_str()));
    assert_eq!(ok.header("access-control-allow-origin"), Some(good));
    assert!(
        ok.header("access-control-expose-headers")
            .unwrap()
            .contains("etag"),
        "{ok:?}"
    );
    let body = |response: &switchboard_e2e::HttpResponse| -> Value {
        serde_json::from_str(&response.body).unwrap()
    };
    let denied = http_request(
        "GET",
        &format!("{base}/v1/kpis/support.calls"),
        &[("Authorization", &bearer)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(body(&denied)["reason"], json!("KPI_DENIED"));
    assert_eq!(body(&denied)["code"], json!("PERMISSION_DENIED"));
    let denied_watch = http_request(
        "GET",
        &format!("{base}/v1/kpis/support.calls/watch?access_token={reader}"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(denied_watch.status, 403);
    assert_eq!(body(&denied_watch)["reason"], json!("KPI_DENIED"));
    let anonymous = http_request("GET", &format!("{base}/v1/kpis/sales.calls"), &[], b"")
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401);
    let list = http_request(
        "GET",
        &format!("{base}/v1/kpis"),
        &[("Authorization", &bearer)],
        b"",
    )
    .await
    .unwrap();
    let names: Vec<Value> = body(&list)["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [json!("sales.calls")]);
    let mut watch = SseStream::open(
        &format!("{base}/v1/kpis/sales.calls/watch?access_token={reader}"),
        &[("Origin", good)],
    )
    .await
    .unwrap();
    assert_eq!(watch.status, 200);
    let first = watch.next_event().await.unwrap();
    assert_eq!(first.event, None, "a plain message event: {first:?}");

    // A browser may send If-None-Match; a refused origin gets nothing, not even the error.
    let preflight = http_request(
        "OPTIONS",
        &format!("{base}/v1/kpis/sales.calls"),
        &[
            ("Origin", good),
            ("Access-Control-Request-Method", "GET"),
            (
                "Access-Control-Request-Headers",
                "authorization, if-none-match",
            ),
        ],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204);
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("if-none-match"));
    for path in [
        "/v1/kpis",
        "/v1/kpis/sales.calls",
        "/v1/kpis/sales.calls/watch",
    ] {
        let refused = http_request(
            "GET",
            &format!("{base}{path}?access_token={reader}"),
            &[("Origin", "https://evil.test")],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(refused.status, 403, "{path}");
        assert_eq!(refused.header("access-control-allow-origin"), None);
        assert_eq!(body(&refused)["reason"], json!("ORIGIN_NOT_ALLOWED"));
    }
}
