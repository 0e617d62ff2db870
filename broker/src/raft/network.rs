//! Node-to-node RPC for raft: a client of the peers' internal `switchboard.internal.v1.Raft`
//! service (served by [`crate::cluster::internal`] on `cluster.listen`).
//!
//! Each peer gets one lazily connected tonic [`Channel`], shared by raft replication, votes,
//! snapshot chunks and forwarded writes, and kept for the life of the process (HTTP/2 multiplexes
//! the calls; tonic reconnects after a failure). Connecting is bounded by [`CONNECT_TIMEOUT`] and
//! every call by the deadline openraft gives it.
//!
//! Failure mapping matters to openraft: a peer that cannot be reached at all is `Unreachable`, and
//! openraft backs off before trying it again; any other transport failure is a `NetworkError`, retried
//! on the next heartbeat; an error raft itself raised on the peer comes back as a `RemoteError`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use switchboard_proto::internal::v1::raft_client::RaftClient;
use switchboard_proto::internal::v1::Frame;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{Member, TypeConfig};

/// Longest wait for a TCP connection to a peer.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Most log entries in one AppendEntries call. Each entry is one proposer batch of up to
/// `proposer.max_batch_bytes`, so this bounds a replication message to about this many batches.
pub(crate) const MAX_ENTRIES_PER_APPEND: u64 = 16;

/// Largest raft frame accepted or sent: [`MAX_ENTRIES_PER_APPEND`] batches of `max_batch_bytes`,
/// plus room for entry framing.
pub(crate) fn max_frame_bytes(max_batch_bytes: usize) -> usize {
    let entries = usize::try_from(MAX_ENTRIES_PER_APPEND).unwrap_or(16);
    entries.saturating_mul(max_batch_bytes.saturating_add(64 * 1024))
}

/// Encodes a value carried in a [`Frame`] (bincode: compact, and both ends run the same build).
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Frame, String> {
    bincode::serialize(value)
        .map(|data| Frame {
            data: Bytes::from(data),
        })
        .map_err(|e| format!("cannot encode a raft frame: {e}"))
}

/// Decodes a value carried in a [`Frame`].
pub(crate) fn decode<T: DeserializeOwned>(frame: &Frame) -> Result<T, String> {
    bincode::deserialize(&frame.data).map_err(|e| format!("cannot decode a raft frame: {e}"))
}

/// One channel per peer address, shared by everything that talks to peers. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    max_frame: usize,
    /// Mutual TLS to the peers, when the cluster runs it.
    tls: Option<ClientTlsConfig>,
}

impl Peers {
    /// No connections yet; frames up to `max_frame` bytes; over mutual TLS when `tls` is given.
    pub(crate) fn new(max_frame: usize, tls: Option<ClientTlsConfig>) -> Peers {
        Peers {
            channels: Arc::default(),
            max_frame,
            tls,
        }
    }

    /// A client of the raft service at `addr` (`host:port`), on the peer's shared channel.
    ///
    /// # Errors
    /// `addr` is not a usable address.
    pub(crate) fn client(&self, addr: &str) -> Result<RaftClient<Channel>, String> {
        let channel = {
            let mut channels = self
                .channels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match channels.get(addr) {
                Some(channel) => channel.clone(),
                None => {
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?;
                    if let Some(tls) = &self.tls {
                        endpoint = endpoint
                            .tls_config(tls.clone())
                            .map_err(|e| format!("TLS to peer {addr:?}: {e}"))?;
                    }
                    let endpoint = endpoint
                        .connect_timeout(CONNECT_TIMEOUT)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(5));
                    let channel = endpoint.connect_lazy();
                    channels.insert(addr.to_owned(), channel.clone());
                    channel
                }
            }
        };
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(self.max_frame)
            .max_encoding_message_size(self.max_frame))
    }
}

/// The network factory openraft asks for a connection to each peer.
pub(crate) struct Network {
    peers: Peers,
}

impl Network {
    /// A factory over the shared peer channels.
    pub(crate) fn new(peers: Peers) -> Network {
        Network { peers }
    }
}

/// A connection to one peer.
pub(crate) struct PeerConnection {
    target: u64,
    node: Member,
    client: Result<RaftClient<Channel>, String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        PeerConnection {
            target,
            node: node.clone(),
            client: self.peers.client(&node.raft_addr),
        }
    }
}

/// Why a call did not produce an answer from the peer's raft.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportFailure(String);

/// How a failed call is reported to openraft.
fn transport_error<E: std::error::Error>(status: &tonic::Status) -> RPCError<u64, Member, E> {
    let failure = TransportFailure(format!("{}: {}", status.code(), status.message()));
    match status.code() {
        // Connection refused, reset or timed out: openraft backs off before trying again.
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&failure))
        }
        _ => RPCError::Network(NetworkError::new(&failure)),
    }
}

impl PeerConnection {
    /// Sends `request` with `call`, within `timeout`, and unpacks the peer's raft answer.
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        request: &Req,
        timeout: Duration,
        call: F,
    ) -> Result<Resp, RPCError<u64, Member, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<Frame>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Frame>, tonic::Status>>,
    {
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportFailure(
                    e.clone(),
                ))))
            }
        };
        let frame = encode(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportFailure(e))))?;
        let mut request = tonic::Request::new(frame);
        request.set_timeout(timeout);
        // grpc-timeout is enforced by the server; this bounds the wait here as well.
        let answer = match tokio::time::timeout(timeout, call(client, request)).await {
            Ok(answer) => answer.map_err(|status| transport_error(&status))?,
            Err(_) => {
                return Err(transport_error(&tonic::Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))))
            }
        };
        let result: Result<Resp, E> = decode(answer.get_ref())
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportFailure(e))))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(&rpc, option.hard_ttl(), |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(&rpc, option.hard_ttl(), |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(&rpc, option.hard_ttl(), |mut c, r| async move {
            c.vote(r).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::error::{Fatal, RaftError};
    use openraft::raft::VoteResponse;
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    /// Raft answers cross the wire as `Result<answer, RaftError>` in bincode, which cannot decode
    /// self-describing serde shapes: both arms must survive the trip.
    #[test]
    fn raft_answers_and_errors_round_trip_through_a_frame() {
        let ok: Result<VoteResponse<u64>, RaftError<u64>> = Ok(VoteResponse {
            vote: Vote::new(3, 2),
            vote_granted: true,
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 2), 41)),
        });
        let back: Result<VoteResponse<u64>, RaftError<u64>> =
            decode(&encode(&ok).unwrap()).unwrap();
        assert_eq!(back, ok);
        let failed: Result<VoteResponse<u64>, RaftError<u64>> =
            Err(RaftError::Fatal(Fatal::Stopped));
        let back: Result<VoteResponse<u64>, RaftError<u64>> =
            decode(&encode(&failed).unwrap()).unwrap();
        assert!(matches!(back, Err(RaftError::Fatal(Fatal::Stopped))));
        assert!(decode::<VoteResponse<u64>>(&Frame {
            data: Bytes::from_static(b"\x01")
        })
        .is_err());
    }

    #[test]
    fn a_frame_holds_the_largest_append() {
        assert!(max_frame_bytes(4 << 20) >= 16 * (4 << 20));
    }
}
