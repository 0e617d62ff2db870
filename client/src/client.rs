//! [`Client`]: the connection to a broker (plain or TLS, with or without bearer tokens), URL
//! handling, the entity writer id, and [`Client::info`].

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::cluster_client::ClusterClient;
use switchboard_proto::v1::entities_client::EntitiesClient;
use switchboard_proto::v1::kpi_service_client::KpiServiceClient;
use switchboard_proto::v1::schema_service_client::SchemaServiceClient;
use switchboard_proto::v1::{
    InfoRequest, InfoResponse, IssueTokenRequest, IssueTokenResponse, WriteStamp,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::auth::{ClientCredentials, StaticToken, TokenCache, TokenProvider};
use crate::bearer::AuthChannel;
use crate::circuit::{CircuitBreaker, CircuitPolicy, CircuitState};
use crate::entity::StampClock;
use crate::error::{error_chain, Error};
use crate::failover::Failover;
use crate::retry::RetryPolicy;

/// The broker's default gRPC port, used when a bare host is given without one.
pub const DEFAULT_PORT: u16 = 7400;

/// The largest response the client accepts, so a full history page of large payloads fits
/// (1000 messages of 64 KiB, plus metadata).
pub(crate) const MAX_DECODING_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// How [`Client::connect_with`] connects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// How long to wait for the TCP (and HTTP/2) connection, both for the first connection and
    /// for every reconnection underneath. Default: 5 s.
    pub connect_timeout: Duration,
    /// The interval of HTTP/2 keep-alive pings, which detect a dead connection (and so let a
    /// [`Subscription`](crate::Subscription) resume) even when no message flows. `None` disables
    /// them. Default: 20 s.
    pub keep_alive_interval: Option<Duration>,
    /// How long to wait for a keep-alive ping's answer before declaring the connection dead.
    /// Default: 10 s.
    pub keep_alive_timeout: Duration,
    /// The CA certificate(s), in PEM, that the broker's certificate must chain to. Setting it (or
    /// any TLS option) makes a URL without a scheme `https://`; an `https://` URL needs it (this
    /// client trusts no system roots). Default: none.
    pub ca_certificate: Option<Vec<u8>>,
    /// The certificate chain and private key (PEM) this client presents, for a broker that asks
    /// for mutual TLS. Default: none.
    pub client_identity: Option<ClientIdentity>,
    /// The name the broker's certificate must carry, when it is not the URL's host (for example
    /// connecting to `https://10.0.0.5:7400` with a certificate for `broker.internal`).
    /// Default: the URL's host.
    pub tls_server_name: Option<String>,
    /// Where the bearer token of every call comes from; see [`ConnectOptions::bearer_token`],
    /// [`ConnectOptions::token_provider`] and [`ConnectOptions::client_credentials`]. Default:
    /// none (calls carry no `authorization`).
    pub credentials: Option<Credentials>,
    /// How publishes ([`Client::publish`], [`Client::publisher`], an [`Outbox`](crate::Outbox))
    /// are retried, and the first connection too. Default: [`RetryPolicy::none`], one attempt,
    /// so a refusal such as `UNAVAILABLE NO_LEADER` comes back at once; see
    /// `docs/CLIENT-RESILIENCE.md` for why, and [`RetryPolicy::within`] to turn retries on.
    pub retry: RetryPolicy,
    /// The circuit breaker of this client's broker endpoint, shared by every clone. `None` (the
    /// default): no breaker, every call is sent.
    pub circuit_breaker: Option<CircuitPolicy>,
    /// Whether a publish that fails because its node is unhealthy is sent to another known node
    /// of the cluster before the failure counts (for the retry policy and the circuit breaker).
    /// The nodes are learned from `Cluster/Status` when connecting (and
    /// [`Client::refresh_nodes`]), and from [`ConnectOptions::nodes`]. Under failover every
    /// message that is not ephemeral gets an idempotency key. Default: off.
    pub failover: bool,
    /// More nodes of the cluster (`host:port` or URLs) for failover, besides those learned from
    /// the cluster. Default: none.
    pub nodes: Vec<String>,
}

/// A client certificate chain and its private key, both PEM, for mutual TLS.
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate chain, leaf first.
    pub certificate: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

/// The key is a secret: only the size of the certificate shows.
impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificate_bytes", &self.certificate.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Where a client's bearer tokens come from.
#[derive(Clone)]
#[non_exhaustive]
pub enum Credentials {
    /// Tokens from this provider (a [`StaticToken`], or one of the caller's own).
    Provider(Arc<dyn TokenProvider>),
    /// Tokens from the broker's token endpoint, exchanged on the client's own connection for the
    /// id and secret in this request (with its subject, scope and lifetime, if any).
    ClientCredentials(IssueTokenRequest),
}

/// The secret and the tokens stay out of the output.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Provider(_) => f.write_str("Provider(..)"),
            Credentials::ClientCredentials(request) => f
                .debug_struct("ClientCredentials")
                .field("client_id", &request.client_id)
                .field("subject", &request.subject)
                .finish_non_exhaustive(),
        }
    }
}

impl ConnectOptions {
    /// Trusts the CA certificate(s) in `pem` for the broker's certificate (see
    /// [`ConnectOptions::ca_certificate`]).
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> ConnectOptions {
        self.ca_certificate = Some(pem.into());
        self
    }

    /// Presents this certificate chain and key (PEM) to a broker that asks for mutual TLS.
    pub fn client_identity(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> ConnectOptions {
        self.client_identity = Some(ClientIdentity {
            certificate: certificate_pem.into(),
            key: key_pem.into(),
        });
        self
    }

    /// Expects `name` in the broker's certificate instead of the URL's host.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> ConnectOptions {
        self.tls_server_name = Some(name.into());
        self
    }

    /// Sends this token with every call, for example one issued by an external identity
    /// provider. Nothing refreshes it: once it expires, calls fail with `UNAUTHENTICATED
    /// TOKEN_EXPIRED`.
    pub fn bearer_token(self, token: impl Into<String>) -> ConnectOptions {
        self.token_provider(StaticToken::new(token))
    }

    /// Sends a token from `provider` with every call, fetched again shortly before it expires
    /// (see [`TokenCache`]).
    pub fn token_provider(mut self, provider: impl TokenProvider) -> ConnectOptions {
        self.credentials = Some(Credentials::Provider(Arc::new(provider)));
        self
    }

    /// Exchanges this client id and secret at the broker's token endpoint for tokens, fetched
    /// again shortly before they expire (see [`ClientCredentials`] and [`TokenCache`]). Nothing
    /// is exchanged until the first call.
    pub fn client_credentials(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> ConnectOptions {
        self.credentials = Some(Credentials::ClientCredentials(IssueTokenRequest {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            ..IssueTokenRequest::default()
        }));
        self
    }

    /// Retries publishes (and the first connection) under `policy`; see
    /// [`ConnectOptions::retry`].
    pub fn retry(mut self, policy: RetryPolicy) -> ConnectOptions {
        self.retry = policy;
        self
    }

    /// Puts a circuit breaker with `policy` in front of this client's broker endpoint; see
    /// [`ConnectOptions::circuit_breaker`].
    pub fn circuit_breaker(mut self, policy: CircuitPolicy) -> ConnectOptions {
        self.circuit_breaker = Some(policy);
        self
    }

    /// Turns failover to other cluster nodes on or off; see [`ConnectOptions::failover`].
    pub fn failover(mut self, on: bool) -> ConnectOptions {
        self.failover = on;
        self
    }

    /// Adds cluster nodes to fail over to (and turns failover on); see [`ConnectOptions::nodes`].
    pub fn nodes<I, S>(mut self, nodes: I) -> ConnectOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes.extend(nodes.into_iter().map(Into::into));
        self.failover = true;
        self
    }

    /// Whether any TLS option is set.
    fn wants_tls(&self) -> bool {
        self.ca_certificate.is_some()
            || self.client_identity.is_some()
            || self.tls_server_name.is_some()
    }

    /// The TLS configuration for `url`, or `None` for a plain `http://` URL.
    fn tls_config(&self, url: &str) -> Result<Option<ClientTlsConfig>, Error> {
        let https = url
            .parse::<Uri>()
            .ok()
            .is_some_and(|uri| uri.scheme_str() == Some("https"));
        if !https {
            if self.wants_tls() {
                return Err(Error::InvalidArgument(format!(
                    "TLS options are set but the server URL {url} is plain http://: use https://"
                )));
            }
            return Ok(None);
        }
        let Some(ca) = &self.ca_certificate else {
            return Err(Error::InvalidArgument(format!(
                "{url} needs the CA certificate that signed the broker's certificate \
                 (ConnectOptions::ca_certificate, sb --ca FILE): this client trusts no system roots"
            )));
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(identity) = &self.client_identity {
            tls = tls.identity(Identity::from_pem(&identity.certificate, &identity.key));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(Some(tls))
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Some(Duration::from_secs(20)),
            keep_alive_timeout: Duration::from_secs(10),
            ca_certificate: None,
            client_identity: None,
            tls_server_name: None,
            credentials: None,
            retry: RetryPolicy::none(),
            circuit_breaker: None,
            failover: false,
            nodes: Vec::new(),
        }
    }
}

/// A connection to a Switchboard broker.
///
/// `Client` is cheap to clone: every clone shares one HTTP/2 connection (a tonic `Channel`), which
/// carries any number of concurrent calls and subscriptions (of both the `Broker` and the
/// `Entities` services) and reconnects by itself when the connection is lost. Its methods take
/// `&self` and can be called concurrently.
///
/// For entity writes, a client also has a *writer id* (see [`Client::writer_id`]) and a clock
/// that stamps the writes that do not carry a stamp of their own; clones share both.
#[derive(Clone, Debug)]
pub struct Client {
    inner: BrokerClient<AuthChannel>,
    entities: EntitiesClient<AuthChannel>,
    cluster: ClusterClient<AuthChannel>,
    schemas: SchemaServiceClient<AuthChannel>,
    kpis: KpiServiceClient<AuthChannel>,
    /// The connection without the token layer, for the token endpoint.
    channel: Channel,
    /// The cache in front of the token provider; `None` for a client without credentials.
    tokens: Option<Arc<TokenCache>>,
    url: Arc<str>,
    writer: Arc<str>,
    clock: Arc<Mutex<StampClock>>,
    /// How publishes are retried ([`ConnectOptions::retry`]).
    retry: RetryPolicy,
    /// The endpoint's circuit breaker, shared by the clones; `None` without one.
    breaker: Option<Arc<CircuitBreaker>>,
    /// The cluster's other nodes, for publishes; `None` without failover.
    failover: Option<Arc<Failover>>,
}

impl Client {
    /// Connects to the broker at `url`, with the default [`ConnectOptions`].
    ///
    /// `url` is `http://host:port` (for example `http://127.0.0.1:7400`) or `https://host:port`;
    /// a bare `host:port` is taken as `http://host:port` (`https://` when a TLS option is set),
    /// and a bare `host` as `http://host:7400` (see [`normalize_url`]). The first connection is made before this returns, so a broker that is
    /// not listening is reported at once rather than on the first call.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `url` is not a usable `http` or `https` URL, or the TLS
    /// options do not fit it (an `https://` URL without a CA certificate, TLS options with an
    /// `http://` URL, a certificate or key that is not PEM); [`Error::Connect`] (naming the URL)
    /// when nothing answers within the connect timeout, or the TLS handshake fails (for example
    /// a broker certificate that does not chain to the CA, or a name that does not match).
    ///
    /// # Example
    /// ```no_run
    /// # async fn run() -> Result<(), switchboard_client::Error> {
    /// let client = switchboard_client::Client::connect("127.0.0.1:7400").await?;
    /// let info = client.info().await?;
    /// println!("broker {} at offset {}", info.version, info.last_offset);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: impl Into<String>) -> Result<Client, Error> {
        Client::connect_with(url, ConnectOptions::default()).await
    }

    /// Connects to the broker at `url` with explicit [`ConnectOptions`]; see [`Client::connect`].
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(
        url: impl Into<String>,
        options: ConnectOptions,
    ) -> Result<Client, Error> {
        let default_scheme = if options.wants_tls() { "https" } else { "http" };
        let url = normalize_url_with(&url.into(), default_scheme)?;
        let endpoint = endpoint_for(&url, &options)?;
        let channel = connect_retrying(&endpoint, &url, &options).await?;
        let credentials = match &options.credentials {
            None => None,
            Some(Credentials::Provider(provider)) => Some(Arc::clone(provider)),
            Some(Credentials::ClientCredentials(request)) => Some(Arc::new(
                ClientCredentials::from_request(channel.clone(), request.clone()),
            )
                as Arc<dyn TokenProvider>),
        };
        let mut client =
            Client::build(channel, url.clone(), credentials).with_retry(options.retry.clone());
        if let Some(policy) = options.circuit_breaker.clone() {
            client = client.with_circuit_breaker(policy);
        }
        if options.failover {
            let seeds = options.nodes.clone();
            let failover =
                Failover::new(url, client.inner_channel(), options, client.tokens.clone());
            for seed in &seeds {
                failover.add(seed);
            }
            client.failover = Some(Arc::new(failover));
            // Best effort: a single node, or a token without the admin grant, still works with
            // the nodes it was given.
            if let Err(error) = client.refresh_nodes().await {
                tracing::debug!(%error, "failover: could not read the cluster's members");
            }
        }
        Ok(client)
    }

    /// Learns the cluster's members from `Cluster/Status` (asking the known nodes, the current
    /// one first) for failover, and returns the known node URLs. Connecting with
    /// [`ConnectOptions::failover`] does this once; call it again after the membership changed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the client was not connected with failover; the last
    /// node's error when none answered.
    pub async fn refresh_nodes(&self) -> Result<Vec<String>, Error> {
        match &self.failover {
            Some(failover) => failover.refresh().await,
            None => Err(Error::InvalidArgument(
                "failover is off: connect with ConnectOptions::failover(true)".to_owned(),
            )),
        }
    }

    /// The URLs of the cluster nodes this client knows for failover (its own first); just its own
    /// URL without failover.
    pub fn known_nodes(&self) -> Vec<String> {
        match &self.failover {
            Some(failover) => failover.urls(),
            None => vec![self.url.to_string()],
        }
    }

    /// The URL of the node publishes go to first: the client's own, until a failover moved them
    /// to another node.
    pub fn current_node(&self) -> String {
        match &self.failover {
            Some(failover) => failover.current(),
            None => self.url.to_string(),
        }
    }

    /// The failover state, for the publish path.
    pub(crate) fn failover(&self) -> Option<&Arc<Failover>> {
        self.failover.as_ref()
    }

    /// The authenticated channel of the client's own node.
    fn inner_channel(&self) -> AuthChannel {
        AuthChannel::new(self.channel.clone(), self.tokens.clone())
    }

    /// Wraps a tonic `Channel` built by the caller (for example with a custom connector). `url`
    /// is only used in messages. The calls carry no token; see [`Client::from_channel_with`].
    pub fn from_channel(channel: Channel, url: impl Into<String>) -> Client {
        Client::build(channel, url.into(), None)
    }

    /// As [`Client::from_channel`], with every call carrying a bearer token from `provider`
    /// (behind a [`TokenCache`]).
    pub fn from_channel_with(
        channel: Channel,
        url: impl Into<String>,
        provider: impl TokenProvider,
    ) -> Client {
        Client::build(channel, url.into(), Some(Arc::new(provider)))
    }

    fn build(channel: Channel, url: String, provider: Option<Arc<dyn TokenProvider>>) -> Client {
        let tokens = provider.map(|provider| Arc::new(TokenCache::from_arc(provider)));
        let authenticated = AuthChannel::new(channel.clone(), tokens.clone());
        Client {
            inner: BrokerClient::new(authenticated.clone())
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            cluster: ClusterClient::new(authenticated.clone()),
            schemas: SchemaServiceClient::new(authenticated.clone()),
            kpis: KpiServiceClient::new(authenticated.clone()),
            entities: EntitiesClient::new(authenticated)
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            channel,
            tokens,
            url: url.into(),
            writer: random_writer_id().into(),
            clock: Arc::default(),
            retry: RetryPolicy::none(),
            breaker: None,
            failover: None,
        }
    }

    /// This client (and the clones made from it from now on) with another retry policy for
    /// publishes; see [`ConnectOptions::retry`]. The connection is still shared.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Client {
        self.retry = policy;
        self
    }

    /// The retry policy of [`Client::publish`] (see [`ConnectOptions::retry`]).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// This client (and the clones made from it from now on) with a new circuit breaker in front
    /// of its endpoint, closed; see [`ConnectOptions::circuit_breaker`].
    pub fn with_circuit_breaker(mut self, policy: CircuitPolicy) -> Client {
        self.breaker = Some(Arc::new(CircuitBreaker::new(self.url.to_string(), policy)));
        self
    }

    /// The state of this client's circuit breaker, `None` when it has none. Its changes are also
    /// logged as tracing events (target `switchboard_client::circuit`, field `state`: a warning
    /// when it opens, info when it half-opens and closes).
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{CircuitPolicy, CircuitState, Client, ConnectOptions};
    ///
    /// # async fn run() -> Result<(), switchboard_client::Error> {
    /// let options = ConnectOptions::default().circuit_breaker(CircuitPolicy::default());
    /// let client = Client::connect_with("127.0.0.1:7400", options).await?;
    /// assert_eq!(client.circuit_state(), Some(CircuitState::Closed));
    /// # Ok(())
    /// # }
    /// ```
    pub fn circuit_state(&self) -> Option<CircuitState> {
        self.breaker.as_ref().map(|breaker| breaker.state())
    }

    /// The circuit breaker, for the publish paths.
    pub(crate) fn breaker(&self) -> Option<&Arc<CircuitBreaker>> {
        self.breaker.as_ref()
    }

    /// The URL this client connects to, as normalized by [`normalize_url`].
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The writer id this client stamps entity writes with, unless a write names its own (see
    /// [`EntityUpdate::writer`](crate::EntityUpdate::writer)).
    ///
    /// By default it is random and different for every connected `Client` (clones share it):
    /// `client-` followed by 32 hex digits, for example `client-5f0c6a2e9b1d4c8fa0e3b7d21c9e4f60`.
    /// It breaks ties between writes stamped in the same millisecond with the same version, so
    /// two writers must never share one; a process that wants a recognizable id sets it with
    /// [`Client::with_writer_id`].
    pub fn writer_id(&self) -> &str {
        &self.writer
    }

    /// This client with another writer id (see [`Client::writer_id`]): at most 128 bytes, not
    /// empty (the broker refuses the write otherwise), and unique to this writer, for example
    /// `panel-7` or `enricher@host-3`. The connection and the stamp clock are still shared with
    /// the other clones.
    ///
    /// # Example
    /// ```no_run
    /// # async fn run() -> Result<(), switchboard_client::Error> {
    /// let client = switchboard_client::Client::connect("127.0.0.1:7400")
    ///     .await?
    ///     .with_writer_id("enricher-1");
    /// assert_eq!(client.writer_id(), "enricher-1");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_writer_id(mut self, writer: impl Into<String>) -> Client {
        self.writer = writer.into().into();
        self
    }

    /// Describes the broker node this client is connected to: its version, node and leader ids,
    /// first and last offsets, storage sizes and raft progress.
    ///
    /// # Errors
    /// [`Error::Status`] when the call fails (for example `UNAVAILABLE` when the connection is
    /// lost).
    ///
    /// # Example
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> Result<(), switchboard_client::Error> {
    /// let info = client.info().await?;
    /// println!("node {} (leader {}), last offset {}", info.node_id, info.leader_id, info.last_offset);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn info(&self) -> Result<InfoResponse, Error> {
        let response = self.grpc().info(InfoRequest {}).await?;
        Ok(response.into_inner())
    }

    /// Exchanges a client id and secret at the broker's token endpoint
    /// (`switchboard.v1.Auth/IssueToken`) for a token, and returns the broker's whole answer:
    /// the token, when it expires, and the scope it grants. The call carries no token itself.
    ///
    /// # Errors
    /// As [`ClientCredentials::issue`].
    ///
    /// # Example
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> Result<(), switchboard_client::Error> {
    /// let request = switchboard_client::proto::IssueTokenRequest {
    ///     client_id: "crm-panel".to_owned(),
    ///     client_secret: std::env::var("CRM_PANEL_SECRET").unwrap_or_default(),
    ///     ..Default::default()
    /// };
    /// let issued = client.issue_token(request).await?;
    /// println!("token valid for {} s", issued.expires_in_seconds);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn issue_token(
        &self,
        request: IssueTokenRequest,
    ) -> Result<IssueTokenResponse, Error> {
        ClientCredentials::from_request(self.channel.clone(), request)
            .issue()
            .await
    }

    /// A handle on the generated gRPC client (a cheap clone sharing the connection).
    pub(crate) fn grpc(&self) -> BrokerClient<AuthChannel> {
        self.inner.clone()
    }

    /// A handle on the generated `Entities` client, on the same connection.
    pub(crate) fn entities_grpc(&self) -> EntitiesClient<AuthChannel> {
        self.entities.clone()
    }

    /// A handle on the generated `Cluster` admin client, on the same connection.
    pub(crate) fn cluster_grpc(&self) -> ClusterClient<AuthChannel> {
        self.cluster.clone()
    }

    /// A handle on the generated `SchemaService` client, on the same connection.
    pub(crate) fn schemas_grpc(&self) -> SchemaServiceClient<AuthChannel> {
        self.schemas.clone()
    }

    /// A handle on the generated `KpiService` client, on the same connection.
    pub(crate) fn kpis_grpc(&self) -> KpiServiceClient<AuthChannel> {
        self.kpis.clone()
    }

    /// The token cache, for a stream that learns its token was refused; `None` without
    /// credentials.
    pub(crate) fn tokens(&self) -> Option<Arc<TokenCache>> {
        self.tokens.clone()
    }

    /// The stamp of a write that has none of its own: this client's clock (see
    /// [`StampClock::next`]) and `writer`, or this client's writer id.
    pub(crate) fn next_stamp(&self, writer: Option<&str>) -> WriteStamp {
        let (timestamp_ms, version) = self
            .clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next(crate::entity::now_ms());
        WriteStamp {
            timestamp_ms,
            version,
            writer: writer.unwrap_or(&self.writer).to_owned(),
        }
    }
}

/// The endpoint of `url` with the connect timeout, keep-alive and TLS settings of `options`.
pub(crate) fn endpoint_for(url: &str, options: &ConnectOptions) -> Result<Endpoint, Error> {
    let invalid = |error: tonic::transport::Error| {
        Error::InvalidArgument(format!("invalid server URL {url}: {}", error_chain(&error)))
    };
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(invalid)?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = options.tls_config(url)? {
        endpoint = endpoint.tls_config(tls).map_err(|error| {
            Error::InvalidArgument(format!(
                "the TLS settings for {url} are not usable: {}",
                error_chain(&error)
            ))
        })?;
    }
    if let Some(interval) = options.keep_alive_interval {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(options.keep_alive_timeout)
            .keep_alive_while_idle(true);
    }
    Ok(endpoint)
}

/// Makes the first connection, again and again under `options.retry` while it fails (a broker
/// still starting, or restarting), with backoff and full jitter.
async fn connect_retrying(
    endpoint: &Endpoint,
    url: &str,
    options: &ConnectOptions,
) -> Result<Channel, Error> {
    let started = Instant::now();
    let mut backoff = options.retry.backoff_schedule();
    let mut attempts: u32 = 0;
    loop {
        attempts = attempts.saturating_add(1);
        let error = match tokio::time::timeout(options.connect_timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(error)) => Error::Connect {
                url: url.to_owned(),
                message: error_chain(&error),
            },
            Err(_elapsed) => Error::Connect {
                url: url.to_owned(),
                message: format!(
                    "timed out after {}",
                    humantime::format_duration(options.connect_timeout)
                ),
            },
        };
        let Some(delay) =
            crate::retry::next_wait(&options.retry, &mut backoff, attempts, started, &error)
        else {
            return Err(error);
        };
        tracing::debug!(%url, %error, attempts, delay_ms = delay.as_millis() as u64, "connect failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// `client-` and 32 random hex digits.
fn random_writer_id() -> String {
    format!("client-{:032x}", rand::random::<u128>())
}

/// Turns what a user typed into the URL the client connects to.
///
/// - `http://host:port` and `https://host:port` (any case for the scheme) are kept as they are;
/// - a bare `host:port` (or `[v6]:port`) gets `http://` in front;
/// - a bare `host` gets `http://` in front and `:7400` ([`DEFAULT_PORT`]) behind.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty string, a scheme other than `http` or `https`, or
/// something that does not parse as a URL with a host.
pub fn normalize_url(input: &str) -> Result<String, Error> {
    normalize_url_with(input, "http")
}

/// [`normalize_url`], with `default_scheme` for input without one.
fn normalize_url_with(input: &str, default_scheme: &str) -> Result<String, Error> {
    let input = input.trim();
    if input.is_empty() {
        return Err(Error::InvalidArgument("the server URL is empty".to_owned()));
    }
    let url = match input.split_once("://") {
        Some((scheme, _))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            input.to_owned()
        }
        Some((scheme, _)) => {
            return Err(Error::InvalidArgument(format!(
                "unsupported scheme {scheme:?} in server URL {input}: use http:// or https://"
            )))
        }
        None => {
            let url = format!("{default_scheme}://{input}");
            match url.parse::<Uri>() {
                Ok(uri) if uri.port().is_none() && uri.path() == "/" && !input.ends_with('/') => {
                    format!("{url}:{DEFAULT_PORT}")
                }
                _ => url,
            }
        }
    };
    match url.parse::<Uri>() {
        Ok(uri) if uri.host().is_some_and(|host| !host.is_empty()) => Ok(url),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "server URL {input} has no host"
        ))),
        Err(error) => Err(Error::InvalidArgument(format!(
            "invalid server URL {input}: {error}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        let ok = |input: &str| normalize_url(input).unwrap();
        assert_eq!(ok("http://127.0.0.1:7400"), "http://127.0.0.1:7400");
        assert_eq!(ok("HTTP://broker:9000"), "HTTP://broker:9000");
        assert_eq!(ok("127.0.0.1:7400"), "http://127.0.0.1:7400");
        assert_eq!(ok(" localhost:1234 "), "http://localhost:1234");
        assert_eq!(ok("broker"), "http://broker:7400");
        assert_eq!(ok("[::1]:7400"), "http://[::1]:7400");
        assert_eq!(ok("[::1]"), "http://[::1]:7400");
        assert_eq!(ok("https://broker:7400"), "https://broker:7400");
        assert_eq!(
            normalize_url_with("broker", "https").unwrap(),
            "https://broker:7400"
        );
        assert_eq!(
            normalize_url_with("http://broker:1", "https").unwrap(),
            "http://broker:1"
        );
    }

    #[test]
    fn tls_options_must_fit_the_url() {
        let plain = ConnectOptions::default();
        assert!(plain.tls_config("http://b:1").unwrap().is_none());
        let error = plain.tls_config("https://b:1").unwrap_err();
        assert!(
            error.to_string().contains("needs the CA certificate"),
            "{error}"
        );

        let with_ca = ConnectOptions::default().ca_certificate("pem");
        assert!(with_ca.tls_config("https://b:1").unwrap().is_some());
        let error = with_ca.tls_config("http://b:1").unwrap_err();
        assert!(error.to_string().contains("use https://"), "{error}");
        let named = ConnectOptions::default().tls_server_name("broker.internal");
        assert!(named.tls_config("http://b:1").is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let options = ConnectOptions::default()
            .client_identity("CERT", "PRIVATE KEY BYTES")
            .client_credentials("crm-panel", "s3cret");
        let debug = format!("{options:?}");
        assert!(debug.contains("crm-panel"), "{debug}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("PRIVATE KEY"),
            "{debug}"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in ["", "   ", "ftp://x", "http://", "host:port:x"] {
            let error = normalize_url(bad).unwrap_err();
            assert!(matches!(error, Error::InvalidArgument(_)), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn writer_ids_are_random_per_client_and_shared_by_clones() {
        let endpoint = Endpoint::from_static("http://127.0.0.1:1");
        let first = Client::from_channel(endpoint.connect_lazy(), "http://127.0.0.1:1");
        let second = Client::from_channel(endpoint.connect_lazy(), "http://127.0.0.1:1");
        assert!(first.writer_id().starts_with("client-"));
        assert_eq!(first.writer_id().len(), "client-".len() + 32);
        assert_ne!(first.writer_id(), second.writer_id());
        assert_eq!(first.clone().writer_id(), first.writer_id());

        let named = first.clone().with_writer_id("panel-7");
        assert_eq!(named.writer_id(), "panel-7");
        assert_eq!(named.next_stamp(None).writer, "panel-7");
        assert_eq!(named.next_stamp(Some("other")).writer, "other");

        // Clones share the clock, so their stamps keep increasing.
        let a = first.next_stamp(None);
        let b = named.next_stamp(None);
        assert!((b.timestamp_ms, b.version) > (a.timestamp_ms, a.version));
    }

    #[tokio::test]
    async fn connect_fails_fast_and_names_the_url() {
        // Bind then drop a listener, so the port is (almost certainly) closed.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("127.0.0.1:{port}");
        let started = std::time::Instant::now();
        let error = Client::connect(&url).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        match &error {
            Error::Connect { url: failed, .. } => {
                assert_eq!(failed, &format!("http://127.0.0.1:{port}"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(error
            .to_string()
            .starts_with(&format!("cannot connect to http://127.0.0.1:{port}: ")));
    }
}
