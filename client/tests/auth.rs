//! The client's security against an in-process mock broker: bearer tokens on every call (from
//! client credentials exchanged at a mock `Auth/IssueToken`), a refused token fetched again, a
//! subscription that the broker ends for an expired token resuming with a new one, and TLS
//! (server verification, server name, mutual TLS) with certificates made by rcgen. `sb` with those
//! options is tested in `cli/tests/sb_auth.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

include!("support/auth_mock.rs");

use switchboard_client::Reason;

#[tokio::test]
async fn every_call_carries_the_token_from_one_exchange() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, CLIENT_SECRET).await;
    assert_eq!(
        mock.issued(),
        0,
        "nothing is exchanged before the first call"
    );

    client.info().await.unwrap();
    client
        .publish(switchboard_client::Publish::new("crm.a", "{}"))
        .await
        .unwrap();
    let error = client.get_entity("contact", "42", None).await.unwrap_err();
    assert_eq!(error.reason(), Some(Reason::EntityNotFound));
    client.list_consumers().await.unwrap();
    mock.state
        .lock()
        .unwrap()
        .subscribe_plans
        .push_back(vec![subscribed(1)]);
    let _subscription = client.subscribe("crm.>", Start::Latest).await.unwrap();

    assert_eq!(mock.issued(), 1);
    assert_eq!(mock.authorizations("IssueToken"), [None]);
    for method in ["Info", "Publish", "GetEntity", "ListConsumers", "Subscribe"] {
        assert_eq!(mock.authorizations(method), [bearer(1)], "{method}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_first_calls_share_one_exchange() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, CLIENT_SECRET).await;
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.info().await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(mock.issued(), 1);
    let infos = mock.authorizations("Info");
    assert_eq!(infos.len(), 100);
    assert!(infos
        .iter()
        .all(|authorization| *authorization == bearer(1)));
}

#[tokio::test]
async fn a_refused_token_is_replaced_on_the_next_call() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, CLIENT_SECRET).await;
    client.info().await.unwrap();
    mock.expire("token-1");

    let error = client.info().await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    assert_eq!(error.reason(), Some(Reason::TokenExpired));
    assert!(error.is_token_expired());
    client.info().await.unwrap();
    client.info().await.unwrap();

    assert_eq!(mock.issued(), 2);
    assert_eq!(
        mock.authorizations("Info"),
        [bearer(1), bearer(1), bearer(2), bearer(2)]
    );
}

#[tokio::test]
async fn a_wrong_secret_fails_the_call_with_the_endpoint_reason() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, "wrong").await;
    for _ in 0..2 {
        let error = client.info().await.unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
        assert_eq!(error.reason(), Some(Reason::InvalidClient));
        assert_eq!(
            error.to_string(),
            "UNAUTHENTICATED INVALID_CLIENT: unknown client or wrong secret"
        );
    }
    // Each call tried the exchange again; the broker itself was never called.
    assert_eq!(mock.authorizations("IssueToken").len(), 2);
    assert!(mock.authorizations("Info").is_empty());
}

#[tokio::test]
async fn a_static_token_is_sent_as_is() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let options = ConnectOptions::default().bearer_token("eyJ.static.token");
    let client = Client::connect_with(address.to_string(), options)
        .await
        .unwrap();
    client.info().await.unwrap();
    assert_eq!(
        mock.authorizations("Info"),
        [Some("Bearer eyJ.static.token".to_owned())]
    );
    assert_eq!(mock.issued(), 0);
}

#[tokio::test]
async fn a_subscription_ended_for_an_expired_token_resumes_with_a_new_one() {
    let mock = Mock::default();
    mock.state.lock().unwrap().subscribe_plans.extend([
        vec![
            subscribed(1),
            delivery(1),
            delivery(2),
            Err(token_expired()),
        ],
        vec![subscribed(3), delivery(3)],
    ]);
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, CLIENT_SECRET).await;
    let options =
        SubscribeOptions::default().backoff(Duration::from_millis(1), Duration::from_millis(20));
    let mut subscription = client
        .subscribe_with("crm.>", Start::Earliest, options)
        .await
        .unwrap();
    for expected in 1..=3 {
        let message = tokio::time::timeout(WAIT, subscription.next())
            .await
            .expect("a delivery in time")
            .expect("the subscription goes on")
            .expect("a message, not an error");
        assert_eq!(message.offset, expected);
    }
    assert_eq!(mock.issued(), 2);
    assert_eq!(mock.authorizations("Subscribe"), [bearer(1), bearer(2)]);
    let requests = mock.state.lock().unwrap().subscribe_requests.clone();
    let resumed_at = requests[1].start.unwrap().position.unwrap();
    assert_eq!(
        resumed_at,
        switchboard_proto::v1::start_position::Position::Offset(3)
    );
}

#[tokio::test]
async fn a_subscribe_refused_for_an_expired_token_is_tried_again_with_a_new_one() {
    let mock = Mock::default();
    mock.state.lock().unwrap().subscribe_plans.extend([
        vec![subscribed(5), delivery(5)],
        // The broker ends the next stream at once, before confirming it.
        vec![Err(token_expired())],
        vec![subscribed(9), delivery(9)],
    ]);
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, CLIENT_SECRET).await;
    client.info().await.unwrap();
    // Refused in the response headers: the token layer drops it.
    mock.expire("token-1");
    let mut subscription = client.subscribe("crm.>", Start::Latest).await.unwrap();
    let first = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().offset, 5);
    // Refused as the first event of the stream (the plan): the subscription drops the token.
    let mut second = client.subscribe("crm.>", Start::Latest).await.unwrap();
    let first = tokio::time::timeout(WAIT, second.next()).await.unwrap();
    assert_eq!(first.unwrap().unwrap().offset, 9);
    assert_eq!(
        mock.authorizations("Subscribe"),
        [bearer(1), bearer(2), bearer(2), bearer(3)]
    );
}

#[tokio::test]
async fn a_subscription_whose_new_token_is_refused_too_ends_with_the_reason() {
    let mock = Mock::default();
    mock.state.lock().unwrap().subscribe_plans.extend([vec![
        subscribed(1),
        delivery(1),
        Err(token_expired()),
    ]]);
    let address = serve(mock.clone(), None).await;
    let options = ConnectOptions::default().bearer_token("static");
    let client = Client::connect_with(address.to_string(), options)
        .await
        .unwrap();
    let options =
        SubscribeOptions::default().backoff(Duration::from_millis(1), Duration::from_millis(20));
    let mut subscription = client
        .subscribe_with("crm.>", Start::Earliest, options)
        .await
        .unwrap();
    mock.expire("static");
    let first = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().offset, 1);
    let ended = tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("the subscription ends in time")
        .expect("with an error");
    let error: Error = ended.unwrap_err();
    assert!(error.is_token_expired(), "{error}");
    // The stream's end, then two resubscriptions refused (a second token would not help).
    assert_eq!(mock.authorizations("Subscribe").len(), 3);
}

#[tokio::test]
async fn an_entity_watch_ended_for_an_expired_token_lets_the_next_watch_refresh() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let client = with_credentials(address, CLIENT_SECRET).await;
    let mut watch = client.watch_entities("contact.*").await.unwrap();
    let error = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(error.is_token_expired(), "{error}");
    let _again = client.watch_entities("contact.*").await.unwrap();
    assert_eq!(mock.authorizations("WatchEntities"), [bearer(1), bearer(2)]);
}

#[tokio::test]
async fn tls_connects_with_the_ca_and_is_refused_without_it() {
    let pki = Pki::new();
    let mock = Mock::default();
    let address = serve(mock.clone(), Some(pki.server_tls())).await;
    let url = format!("https://127.0.0.1:{}", address.port());

    // The right CA, and the name the certificate carries.
    let options = ConnectOptions::default()
        .ca_certificate(pki.ca.clone())
        .tls_server_name("localhost");
    let client = Client::connect_with(&url, options).await.unwrap();
    client.info().await.unwrap();
    assert_eq!(mock.calls()[0].client_certificates, 0);

    // A bare host:port with a TLS option means https.
    let options = ConnectOptions::default()
        .ca_certificate(pki.ca.clone())
        .tls_server_name("localhost");
    let client = Client::connect_with(format!("127.0.0.1:{}", address.port()), options)
        .await
        .unwrap();
    assert!(client.url().starts_with("https://"));
    client.info().await.unwrap();

    // No CA at all: refused before connecting.
    let error = Client::connect(&url).await.unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
    assert!(error.to_string().contains("CA certificate"), "{error}");

    // Another CA: the handshake fails, and says why.
    let other = Pki::new();
    let options = ConnectOptions::default()
        .ca_certificate(other.ca)
        .tls_server_name("localhost");
    let error = Client::connect_with(&url, options).await.unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error}");
    assert!(error.to_string().contains("certificate"), "{error}");

    // The right CA but a name the certificate does not carry (127.0.0.1).
    let options = ConnectOptions::default().ca_certificate(pki.ca.clone());
    let error = Client::connect_with(&url, options).await.unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error}");
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate_and_tokens_ride_along() {
    let pki = Pki::new();
    let mock = Mock::default();
    let address = serve(mock.clone(), Some(pki.server_tls())).await;
    let options = ConnectOptions::default()
        .ca_certificate(pki.ca.clone())
        .tls_server_name("localhost")
        .client_identity(pki.client_certificate.clone(), pki.client_key.clone())
        .client_credentials(CLIENT_ID, CLIENT_SECRET);
    let client = Client::connect_with(format!("https://127.0.0.1:{}", address.port()), options)
        .await
        .unwrap();
    client.info().await.unwrap();
    let calls = mock.calls();
    assert_eq!(
        calls,
        [
            Call {
                method: "IssueToken",
                authorization: None,
                client_certificates: 1
            },
            Call {
                method: "Info",
                authorization: bearer(1),
                client_certificates: 1
            }
        ]
    );

    let options = ConnectOptions::default()
        .ca_certificate(pki.ca.clone())
        .client_identity("not a certificate", "not a key");
    let error = Client::connect_with(format!("https://127.0.0.1:{}", address.port()), options)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
}
