//! [`Client`]: the connection to a broker, URL handling, the entity writer id, and
//! [`Client::info`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::cluster_client::ClusterClient;
use switchboard_proto::v1::entities_client::EntitiesClient;
use switchboard_proto::v1::{InfoRequest, InfoResponse, WriteStamp};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::entity::StampClock;
use crate::error::{error_chain, Error};

/// The broker's default gRPC port, used when a bare host is given without one.
pub const DEFAULT_PORT: u16 = 7400;

/// The largest response the client accepts, so a full history page of large payloads fits
/// (1000 messages of 64 KiB, plus metadata).
const MAX_DECODING_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

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
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Some(Duration::from_secs(20)),
            keep_alive_timeout: Duration::from_secs(10),
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
    inner: BrokerClient<Channel>,
    entities: EntitiesClient<Channel>,
    cluster: ClusterClient<Channel>,
    url: Arc<str>,
    writer: Arc<str>,
    clock: Arc<Mutex<StampClock>>,
}

impl Client {
    /// Connects to the broker at `url`, with the default [`ConnectOptions`].
    ///
    /// `url` is `http://host:port` (for example `http://127.0.0.1:7400`); a bare `host:port` is
    /// taken as `http://host:port`, and a bare `host` as `http://host:7400` (see
    /// [`normalize_url`]). The first connection is made before this returns, so a broker that is
    /// not listening is reported at once rather than on the first call.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `url` is not a usable `http` URL; [`Error::Connect`] (naming
    /// the URL) when nothing answers within the connect timeout.
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
        let url = normalize_url(&url.into())?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| {
                Error::InvalidArgument(format!("invalid server URL {url}: {}", error_chain(&error)))
            })?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true);
        if let Some(interval) = options.keep_alive_interval {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(options.keep_alive_timeout)
                .keep_alive_while_idle(true);
        }
        let channel = match tokio::time::timeout(options.connect_timeout, endpoint.connect()).await
        {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => {
                return Err(Error::Connect {
                    url,
                    message: error_chain(&error),
                })
            }
            Err(_elapsed) => {
                return Err(Error::Connect {
                    url,
                    message: format!(
                        "timed out after {}",
                        humantime::format_duration(options.connect_timeout)
                    ),
                })
            }
        };
        Ok(Client::from_channel(channel, url))
    }

    /// Wraps a tonic `Channel` built by the caller (for example with TLS or a custom connector).
    /// `url` is only used in messages.
    pub fn from_channel(channel: Channel, url: impl Into<String>) -> Client {
        let url: String = url.into();
        Client {
            inner: BrokerClient::new(channel.clone())
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            cluster: ClusterClient::new(channel.clone()),
            entities: EntitiesClient::new(channel)
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            url: url.into(),
            writer: random_writer_id().into(),
            clock: Arc::default(),
        }
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

    /// A handle on the generated gRPC client (a cheap clone sharing the connection).
    pub(crate) fn grpc(&self) -> BrokerClient<Channel> {
        self.inner.clone()
    }

    /// A handle on the generated `Entities` client, on the same connection.
    pub(crate) fn entities_grpc(&self) -> EntitiesClient<Channel> {
        self.entities.clone()
    }

    /// A handle on the generated `Cluster` admin client, on the same connection.
    pub(crate) fn cluster_grpc(&self) -> ClusterClient<Channel> {
        self.cluster.clone()
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

/// `client-` and 32 random hex digits.
fn random_writer_id() -> String {
    format!("client-{:032x}", rand::random::<u128>())
}

/// Turns what a user typed into the URL the client connects to.
///
/// - `http://host:port` (any case for the scheme) is kept as is;
/// - a bare `host:port` (or `[v6]:port`) gets `http://` in front;
/// - a bare `host` gets `http://` in front and `:7400` ([`DEFAULT_PORT`]) behind.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty string, a scheme other than `http` (this client is
/// built without TLS), or something that does not parse as a URL with a host.
pub fn normalize_url(input: &str) -> Result<String, Error> {
    let input = input.trim();
    if input.is_empty() {
        return Err(Error::InvalidArgument("the server URL is empty".to_owned()));
    }
    let url = match input.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => input.to_owned(),
        Some((scheme, _)) => {
            return Err(Error::InvalidArgument(format!(
                "unsupported scheme {scheme:?} in server URL {input}: only http:// is supported"
            )))
        }
        None => {
            let url = format!("http://{input}");
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
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "",
            "   ",
            "https://broker:7400",
            "ftp://x",
            "http://",
            "host:port:x",
        ] {
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
