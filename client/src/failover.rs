//! Failing over to another node of a cluster: a client that was given one node's URL learns the
//! others' public addresses (from `Cluster/Status`, and from [`ConnectOptions::nodes`]), and a
//! publish that fails because the node it talks to is unhealthy (a lost connection, `NO_LEADER`,
//! ...: an endpoint failure, see `retry::is_endpoint_failure`) is sent to the next known node
//! before the failure counts for the circuit breaker. Any node takes a publish: a follower
//! forwards it to the leader.
//!
//! Why this cannot duplicate: a message sent under failover always carries an idempotency key
//! (the caller's, or a UUID given before the first send), the same on every node, and the nodes
//! share one dedup table (it is replicated state), so a message the failed node had in fact stored
//! is answered `duplicate` by the next. Ephemeral messages have no key and are at most once: they
//! go to the current node only.
//!
//! Visible: [`Client::current_node`](crate::Client::current_node),
//! [`Client::known_nodes`](crate::Client::known_nodes), and tracing events (target
//! `switchboard_client::failover`): a warning for each node given up on, with the next one tried,
//! and an info event when the client settles on another node.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::cluster_client::ClusterClient;
use switchboard_proto::v1::{ClusterStatusRequest, PublishAck, PublishRequest};

use crate::auth::TokenCache;
use crate::bearer::AuthChannel;
use crate::client::{endpoint_for, ConnectOptions, MAX_DECODING_MESSAGE_BYTES};
use crate::error::Error;
use crate::retry::is_endpoint_failure;
use crate::trace;

/// One known node: its URL and a (lazily connected) channel to it.
#[derive(Clone, Debug)]
struct Node {
    url: String,
    channel: AuthChannel,
}

#[derive(Debug)]
struct Nodes {
    list: Vec<Node>,
    /// The node publishes go to first.
    current: usize,
}

/// The known nodes of a client's cluster, shared by its clones.
#[derive(Debug)]
pub(crate) struct Failover {
    /// For connecting to the nodes learned later, with the client's TLS and timeouts.
    options: ConnectOptions,
    tokens: Option<Arc<TokenCache>>,
    nodes: Mutex<Nodes>,
}

impl Failover {
    /// Failover starting with the client's own node (`url`, on `channel`).
    pub(crate) fn new(
        url: String,
        channel: AuthChannel,
        options: ConnectOptions,
        tokens: Option<Arc<TokenCache>>,
    ) -> Failover {
        Failover {
            options,
            tokens,
            nodes: Mutex::new(Nodes {
                list: vec![Node { url, channel }],
                current: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds the node at `address` (`host:port` or a URL; the scheme of the client's own URL when
    /// it has none) unless it is known. A node that cannot be addressed is skipped with a warning:
    /// the others still serve.
    pub(crate) fn add(&self, address: &str) {
        let address = address.trim();
        if address.is_empty() {
            return;
        }
        let scheme = {
            let nodes = self.lock();
            if nodes.list[0].url.starts_with("https://") {
                "https"
            } else {
                "http"
            }
        };
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("{scheme}://{address}")
        };
        if self.lock().list.iter().any(|node| node.url == url) {
            return;
        }
        let channel = match endpoint_for(&url, &self.options) {
            Ok(endpoint) => endpoint.connect_lazy(),
            Err(error) => {
                tracing::warn!(%url, %error, "failover: a cluster node cannot be addressed; skipped");
                return;
            }
        };
        let mut nodes = self.lock();
        if !nodes.list.iter().any(|node| node.url == url) {
            tracing::debug!(%url, "failover: learned a cluster node");
            nodes.list.push(Node {
                url,
                channel: AuthChannel::new(channel, self.tokens.clone()),
            });
        }
    }

    /// The URLs of the known nodes, the client's own first.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.lock()
            .list
            .iter()
            .map(|node| node.url.clone())
            .collect()
    }

    /// The URL of the node publishes go to first.
    pub(crate) fn current(&self) -> String {
        let nodes = self.lock();
        nodes.list[nodes.current].url.clone()
    }

    /// Asks the known nodes, the current one first, for the cluster's members, and adds the public
    /// address of each. Returns the known URLs.
    ///
    /// # Errors
    /// The last node's error when none answered.
    pub(crate) async fn refresh(&self) -> Result<Vec<String>, Error> {
        let (list, current) = {
            let nodes = self.lock();
            (nodes.list.clone(), nodes.current)
        };
        let mut last = None;
        for step in 0..list.len() {
            let node = &list[(current + step) % list.len()];
            match ClusterClient::new(node.channel.clone())
                .status(ClusterStatusRequest {})
                .await
            {
                Ok(status) => {
                    for member in status.into_inner().nodes {
                        self.add(&member.public_address);
                    }
                    return Ok(self.urls());
                }
                Err(status) => last = Some(Error::from(status)),
            }
        }
        Err(last.unwrap_or(Error::Closed))
    }

    /// Sends `message` to the current node and, on an endpoint failure, to the next known node,
    /// each at most once; the first node that answers becomes the current one.
    pub(crate) async fn publish(
        &self,
        message: PublishRequest,
        context: &opentelemetry::Context,
    ) -> Result<PublishAck, Error> {
        let (list, current) = {
            let nodes = self.lock();
            (nodes.list.clone(), nodes.current)
        };
        let tries = if message.ephemeral { 1 } else { list.len() };
        let mut step = 0;
        loop {
            let index = (current + step) % list.len();
            let node = &list[index];
            let outcome = send(node, message.clone(), context).await;
            match outcome {
                Err(error) if is_endpoint_failure(&error) && step + 1 < tries => {
                    let next = &list[(index + 1) % list.len()];
                    tracing::warn!(
                        from = %node.url,
                        to = %next.url,
                        %error,
                        "failover: the node did not take the publish, trying another"
                    );
                    step += 1;
                }
                outcome => {
                    if step > 0 && !matches!(&outcome, Err(e) if is_endpoint_failure(e)) {
                        self.settle(current, index);
                    }
                    return outcome;
                }
            }
        }
    }

    /// The current node, for a publish stream: its index and a `Broker` client on its channel.
    pub(crate) fn stream_node(&self) -> (usize, BrokerClient<AuthChannel>) {
        let nodes = self.lock();
        let node = &nodes.list[nodes.current];
        let grpc = BrokerClient::new(node.channel.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
        (nodes.current, grpc)
    }

    /// A publish stream on node `index` broke with an endpoint failure: the next one goes to the
    /// next known node (unless another publish moved the current node meanwhile).
    pub(crate) fn stream_failed(&self, index: usize, error: &Error) {
        let mut nodes = self.lock();
        if nodes.current != index || nodes.list.len() < 2 {
            return;
        }
        let next = (index + 1) % nodes.list.len();
        tracing::warn!(
            from = %nodes.list[index].url,
            to = %nodes.list[next].url,
            %error,
            "failover: a publish stream broke on this node, the next one goes to another"
        );
        nodes.current = next;
    }

    /// Makes `index` the current node, unless another publish moved it since `was`.
    fn settle(&self, was: usize, index: usize) {
        let mut nodes = self.lock();
        if nodes.current == was && index < nodes.list.len() {
            nodes.current = index;
            tracing::info!(
                node = %nodes.list[index].url,
                "failover: publishing through another cluster node"
            );
        }
    }
}

async fn send(
    node: &Node,
    message: PublishRequest,
    context: &opentelemetry::Context,
) -> Result<PublishAck, Error> {
    let mut request = tonic::Request::new(message);
    trace::inject_metadata(context, request.metadata_mut());
    BrokerClient::new(node.channel.clone())
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
        .publish(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(Error::from)
}
