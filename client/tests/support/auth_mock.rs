// The in-process mock `Auth`, `Broker` and `Entities` services that check bearer tokens, and the
// test PKI made with rcgen: shared by the client's security tests (`client/tests/auth.rs`) and
// sb's (`cli/tests/sb_auth.rs`), which `include!` this file.

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
                schema: false,
                kpi: vec![],
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
