//! The client's security against an in-process mock broker: bearer tokens on every call (from
//! client credentials exchanged at a mock `Auth/IssueToken`), a refused token fetched again, a
//! subscription that the broker ends for an expired token resuming with a new one, and TLS
//! (server verification, server name, mutual TLS) with certificates made by rcgen; and `sb` with
//! those options.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use switchboard_client::proto::{
    DeleteEntityRequest, EntityResponse, GetEntityRequest, GetEntityResponse, IssueTokenRequest,
    IssueTokenResponse, Message, Scope, SubscribeEvent, SubscribeRequest, Subscribed,
    UpdateEntityRequest, WatchEntitiesRequest,
};
use switchboard_client::{Client, ConnectOptions, Error, Start, SubscribeOptions};
use switchboard_proto::v1::auth_server::{Auth, AuthServer};
use switchboard_proto::v1::broker_server::{Broker, BrokerServer};
use switchboard_proto::v1::entities_server::{Entities, EntitiesServer};
use switchboard_proto::v1::{
    subscribe_event, AckRequest, AckResponse, ConsumerInfo, DeleteConsumerRequest,
    DeleteConsumerResponse, EntityEvent, GetConsumerRequest, HistoryRequest, HistoryResponse,
    InfoRequest, InfoResponse, ListConsumersRequest, ListConsumersResponse,
    ListSubscriptionsRequest, ListSubscriptionsResponse, PublishAck, PublishRequest,
    PublishStreamAck,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

const WAIT: Duration = Duration::from_secs(5);
const CLIENT_ID: &str = "crm-panel";
const CLIENT_SECRET: &str = "s3cret-of-the-panel";

/// One call as the mock saw it.
#[derive(Clone, Debug, PartialEq)]
struct Call {
    method: &'static str,
    authorization: Option<String>,
    /// How many certificates the client presented over TLS.
    client_certificates: usize,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// Tokens the mock refuses with `UNAUTHENTICATED TOKEN_EXPIRED`.
    expired: HashSet<String>,
    issued: usize,
    /// What each `Subscribe` call sends: these items, then the stream is held open.
    subscribe_plans: VecDeque<Vec<Result<SubscribeEvent, Status>>>,
    subscribe_requests: Vec<SubscribeRequest>,
}

#[derive(Clone, Default)]
struct Mock {
    state: Arc<Mutex<State>>,
}

impl Mock {
    /// Records the call; refuses a token marked expired.
    fn check<T>(&self, method: &'static str, request: &Request<T>) -> Result<(), Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_owned());
        let client_certificates = request.peer_certs().map_or(0, |certs| certs.len());
        let mut state = self.state.lock().unwrap();
        state.calls.push(Call {
            method,
            authorization: authorization.clone(),
            client_certificates,
        });
        let token = authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "));
        if token.is_some_and(|token| state.expired.contains(token)) {
            return Err(token_expired());
        }
        Ok(())
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    fn authorizations(&self, method: &str) -> Vec<Option<String>> {
        self.calls()
            .into_iter()
            .filter(|call| call.method == method)
            .map(|call| call.authorization)
            .collect()
    }

    fn issued(&self) -> usize {
        self.state.lock().unwrap().issued
    }

    fn expire(&self, token: &str) {
        self.state.lock().unwrap().expired.insert(token.to_owned());
    }
}

fn refused(code: Code, reason: &str, message: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, "switchboard", HashMap::new()),
    )
}

fn token_expired() -> Status {
    refused(
        Code::Unauthenticated,
        "TOKEN_EXPIRED",
        "the token expired at 2026-01-01T00:00:00Z",
    )
}

fn delivery(offset: u64) -> Result<SubscribeEvent, Status> {
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Message(Message {
            offset,
            channel: "crm.contact.updated".to_owned(),
            payload: format!("{offset}").into(),
            ..Message::default()
        })),
    })
}

fn subscribed(next_offset: u64) -> Result<SubscribeEvent, Status> {
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Subscribed(Subscribed {
            next_offset,
            subscription_id: 1,
            acked_offset: 0,
        })),
    })
}

#[tonic::async_trait]
impl Auth for Mock {
    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        self.check("IssueToken", &request)?;
        let request = request.into_inner();
        if request.client_id != CLIENT_ID || request.client_secret != CLIENT_SECRET {
            return Err(refused(
                Code::Unauthenticated,
                "INVALID_CLIENT",
                "unknown client or wrong secret",
            ));
        }
        let n = {
            let mut state = self.state.lock().unwrap();
            state.issued += 1;
            state.issued
        };
        let expires_at = SystemTime::now() + Duration::from_secs(900);
        Ok(Response::new(IssueTokenResponse {
            access_token: format!("token-{n}"),
            token_type: "Bearer".to_owned(),
            expires_at: Some(expires_at.into()),
            expires_in_seconds: 900,
            scope: Some(Scope {
                publish: vec!["crm.>".to_owned()],
                subscribe: vec!["crm.>".to_owned()],
                entity_read: vec!["contact".to_owned()],
                entity_update: vec![],
                admin: false,
            }),
        }))
    }
}

type EventStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl Broker for Mock {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishAck>, Status> {
        self.check("Publish", &request)?;
        Ok(Response::new(PublishAck {
            offset: 1,
            ..PublishAck::default()
        }))
    }

    type PublishStreamStream = EventStream<PublishStreamAck>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        self.check("PublishStream", &request)?;
        Err(Status::unimplemented("not in this mock"))
    }

    type SubscribeStream = EventStream<SubscribeEvent>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.check("Subscribe", &request)?;
        let plan = {
            let mut state = self.state.lock().unwrap();
            state.subscribe_requests.push(request.into_inner());
            state.subscribe_plans.pop_front().unwrap_or_default()
        };
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(async move {
            for item in plan {
                if sender.send(item).await.is_err() {
                    return;
                }
            }
            sender.closed().await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        self.check("History", &request)?;
        Ok(Response::new(HistoryResponse::default()))
    }

    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.check("Info", &request)?;
        Ok(Response::new(InfoResponse {
            version: "mock".to_owned(),
            node_id: 1,
            leader_id: 1,
            ..InfoResponse::default()
        }))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.check("Ack", &request)?;
        Ok(Response::new(AckResponse::default()))
    }

    async fn list_subscriptions(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        self.check("ListSubscriptions", &request)?;
        Ok(Response::new(ListSubscriptionsResponse::default()))
    }

    async fn list_consumers(
        &self,
        request: Request<ListConsumersRequest>,
    ) -> Result<Response<ListConsumersResponse>, Status> {
        self.check("ListConsumers", &request)?;
        Ok(Response::new(ListConsumersResponse::default()))
    }

    async fn get_consumer(
        &self,
        request: Request<GetConsumerRequest>,
    ) -> Result<Response<ConsumerInfo>, Status> {
        self.check("GetConsumer", &request)?;
        Err(refused(
            Code::NotFound,
            "CONSUMER_NOT_FOUND",
            "no such consumer",
        ))
    }

    async fn delete_consumer(
        &self,
        request: Request<DeleteConsumerRequest>,
    ) -> Result<Response<DeleteConsumerResponse>, Status> {
        self.check("DeleteConsumer", &request)?;
        Ok(Response::new(DeleteConsumerResponse::default()))
    }
}

#[tonic::async_trait]
impl Entities for Mock {
    async fn update_entity(
        &self,
        request: Request<UpdateEntityRequest>,
    ) -> Result<Response<EntityResponse>, Status> {
        self.check("UpdateEntity", &request)?;
        Err(Status::unimplemented("not in this mock"))
    }

    async fn delete_entity(
        &self,
        request: Request<DeleteEntityRequest>,
    ) -> Result<Response<EntityResponse>, Status> {
        self.check("DeleteEntity", &request)?;
        Err(Status::unimplemented("not in this mock"))
    }

    async fn get_entity(
        &self,
        request: Request<GetEntityRequest>,
    ) -> Result<Response<GetEntityResponse>, Status> {
        self.check("GetEntity", &request)?;
        Err(refused(
            Code::NotFound,
            "ENTITY_NOT_FOUND",
            "no such entity",
        ))
    }

    type WatchEntitiesStream = EventStream<EntityEvent>;

    async fn watch_entities(
        &self,
        request: Request<WatchEntitiesRequest>,
    ) -> Result<Response<Self::WatchEntitiesStream>, Status> {
        self.check("WatchEntities", &request)?;
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            let _ = sender.send(Err(token_expired())).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

async fn serve(mock: Mock, tls: Option<ServerTlsConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).unwrap();
    }
    tokio::spawn(
        server
            .add_service(BrokerServer::new(mock.clone()))
            .add_service(EntitiesServer::new(mock.clone()))
            .add_service(AuthServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

async fn with_credentials(address: SocketAddr, secret: &str) -> Client {
    let options = ConnectOptions::default().client_credentials(CLIENT_ID, secret);
    Client::connect_with(address.to_string(), options)
        .await
        .unwrap()
}

fn bearer(n: usize) -> Option<String> {
    Some(format!("Bearer token-{n}"))
}

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
    assert_eq!(error.reason(), Some("ENTITY_NOT_FOUND"));
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
    assert_eq!(error.reason(), Some("TOKEN_EXPIRED"));
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
        assert_eq!(error.reason(), Some("INVALID_CLIENT"));
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

/// A CA, a server certificate for `localhost` and a client certificate, all in PEM.
struct Pki {
    ca: String,
    server_certificate: String,
    server_key: String,
    client_certificate: String,
    client_key: String,
}

impl Pki {
    fn new() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchboard test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, CLIENT_ID);
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca).unwrap();

        Pki {
            ca: ca.pem(),
            server_certificate: server.pem(),
            server_key: server_key.serialize_pem(),
            client_certificate: client.pem(),
            client_key: client_key.serialize_pem(),
        }
    }

    /// TLS for the mock: this server certificate; client certificates from this CA accepted but
    /// not required.
    fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.server_certificate,
                &self.server_key,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }
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

/// Runs `sb` with these arguments (and no `SWITCHBOARD_*` from the environment); returns
/// (status, stdout, stderr).
async fn sb(args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sb"));
    command.args(args).env_remove("SB_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("SWITCHBOARD_") {
            command.env_remove(name);
        }
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_sends_the_token_given_as_flag_or_file() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let server = address.to_string();
    let (status, _, stderr) = sb(&["--server", &server, "--token", "eyJ.flag", "info"]).await;
    assert_eq!(status, 0, "{stderr}");

    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("token.jwt");
    std::fs::write(&file, "eyJ.file\n").unwrap();
    let file = file.to_str().unwrap();
    let (status, _, stderr) = sb(&["--server", &server, "--token-file", file, "info"]).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        mock.authorizations("Info"),
        [
            Some("Bearer eyJ.flag".to_owned()),
            Some("Bearer eyJ.file".to_owned())
        ]
    );

    let (status, _, stderr) = sb(&[
        "--server",
        &server,
        "--token",
        "a",
        "--token-file",
        file,
        "info",
    ])
    .await;
    assert_eq!(status, 1);
    assert!(
        stderr.contains("choose one way to authenticate"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_token_prints_the_token_and_its_scope_and_sb_uses_client_credentials() {
    let mock = Mock::default();
    let address = serve(mock.clone(), None).await;
    let server = address.to_string();
    let credentials = [
        "--server",
        &server,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
    ];
    let (status, stdout, stderr) =
        sb(&[&credentials[..], &["token", "--ttl", "5m"]].concat()).await;
    assert_eq!(status, 0, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["access_token"], "token-1");
    assert_eq!(line["token_type"], "Bearer");
    assert_eq!(line["expires_in_seconds"], 900);
    assert!(
        line["expires_at"].as_str().unwrap().ends_with('Z'),
        "{line}"
    );
    assert_eq!(line["scope"]["publish"], serde_json::json!(["crm.>"]));
    assert_eq!(line["scope"]["entity_read"], serde_json::json!(["contact"]));

    let (status, stdout, _) = sb(&[&credentials[..], &["token", "--raw"]].concat()).await;
    assert_eq!((status, stdout.as_str()), (0, "token-2\n"));

    let (status, _, stderr) = sb(&[&credentials[..], &["info"]].concat()).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(mock.authorizations("Info"), [bearer(3)]);
    assert_eq!(mock.authorizations("IssueToken"), [None, None, None]);

    let (status, _, stderr) = sb(&[
        "--server",
        &server,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        "wrong",
        "info",
    ])
    .await;
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with(
            "error: UNAUTHENTICATED INVALID_CLIENT: unknown client or wrong secret\n\
             hint: check --client-id and --client-secret"
        ),
        "{stderr}"
    );

    let (status, _, stderr) = sb(&["--server", &server, "token"]).await;
    assert_eq!(status, 1);
    assert!(stderr.contains("sb token needs --client-id"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_reports_an_expired_token_with_a_hint() {
    let mock = Mock::default();
    mock.expire("eyJ.old");
    let address = serve(mock.clone(), None).await;
    let (status, _, stderr) = sb(&[
        "--server",
        &address.to_string(),
        "--token",
        "eyJ.old",
        "info",
    ])
    .await;
    assert_eq!(status, 1);
    let mut lines = stderr.lines();
    assert_eq!(
        lines.next(),
        Some("error: UNAUTHENTICATED TOKEN_EXPIRED: the token expired at 2026-01-01T00:00:00Z")
    );
    assert!(lines
        .next()
        .unwrap()
        .starts_with("hint: the token has expired"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_connects_over_mutual_tls() {
    let pki = Pki::new();
    let mock = Mock::default();
    let address = serve(mock.clone(), Some(pki.server_tls())).await;
    let folder = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = folder.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca = write("ca.pem", &pki.ca);
    let cert = write("client.pem", &pki.client_certificate);
    let key = write("client.key", &pki.client_key);
    // A bare host:port with --ca is https.
    let server = format!("127.0.0.1:{}", address.port());
    let (status, stdout, stderr) = sb(&[
        "--server",
        &server,
        "--ca",
        &ca,
        "--tls-server-name",
        "localhost",
        "--cert",
        &cert,
        "--key",
        &key,
        "info",
    ])
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("\"mock\""), "{stdout}");
    assert_eq!(mock.calls()[0].client_certificates, 1);

    let (status, _, stderr) = sb(&["--server", &server, "--ca", &ca, "info"]).await;
    assert_eq!(status, 1);
    assert!(
        stderr.contains("certificate not valid for name \"127.0.0.1\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("\nhint: the broker's certificate was not accepted"),
        "{stderr}"
    );
}
