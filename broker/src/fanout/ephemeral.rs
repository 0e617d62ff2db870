//! Ephemeral messages: published, delivered at once to the live subscriptions that match on every
//! node, and never stored.
//!
//! ```text
//!   edge (validated, authorised) ─▶ Broadcaster ─┬─▶ this node's hub ─▶ mailboxes (ephemeral queue)
//!                                                └─▶ outbox ─▶ one task per peer ─▶ peer's hub
//! ```
//! Typing indicators, cursor positions and presence pings are worth something only now; putting
//! them through the log would cost them an fsync and a raft round trip, and storing them would
//! only fill retention. So they bypass the log: a node hands them to its own hub and, in a
//! cluster, sends them to every other member directly (the internal `Ephemeral` RPC), which hands
//! them to its hub and sends them nowhere else.
//!
//! What that gives, stated plainly (docs/FLOW.md): at most once, and only to subscriptions live at
//! that moment; no offset, History, replay or redelivery; order kept per publisher and node pair
//! only as far as one queue keeps it. Every queue is bounded and drops rather than waits: the
//! outbox, each peer's queue, each subscription's ephemeral queue, and its stream (a full one
//! misses the message). Every drop is counted (`switchboard_ephemeral_messages_total`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;

use crate::fanout::hub::Hub;
use crate::message::StoredMessage;
use crate::observability::metrics;
use crate::raft::network::{encode, Peers};
use crate::raft::Raft;
use crate::shutdown::ShutdownSignal;

/// Ephemeral messages waiting to be sent to the peers, in all.
const OUTBOX: usize = 4096;
/// Batches waiting for one peer; past it, that peer misses them.
const PEER_QUEUE: usize = 64;
/// Most messages sent to a peer in one call.
const PEER_BATCH: usize = 512;
/// How long one call to a peer may take; a peer slower than that misses the batch.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// A batch of ephemeral messages on its way to the peers.
type Batch = Arc<Vec<Arc<StoredMessage>>>;

/// Hands ephemeral messages to this node's subscribers and, in a cluster, to the other nodes';
/// cheap to clone.
#[derive(Clone)]
pub(crate) struct Broadcaster {
    hub: Hub,
    outbox: Option<mpsc::Sender<Arc<StoredMessage>>>,
}

impl Broadcaster {
    /// A broadcaster for a lone node: only this node's subscribers.
    pub(crate) fn local(hub: Hub) -> Broadcaster {
        Broadcaster { hub, outbox: None }
    }

    /// A broadcaster for a cluster member `me`: its peers are the other members of `raft`'s
    /// membership, reached through `peers`, until `shutdown`.
    pub(crate) fn clustered(
        hub: Hub,
        raft: Raft,
        me: u64,
        peers: Peers,
        shutdown: ShutdownSignal,
    ) -> Broadcaster {
        let (outbox, pending) = mpsc::channel(OUTBOX);
        tokio::spawn(fan_out_to_peers(pending, raft, me, peers, shutdown));
        Broadcaster {
            hub,
            outbox: Some(outbox),
        }
    }

    /// Delivers `message` (offset 0: never stored) to this node's subscribers and sends it to the
    /// peers.
    pub(crate) fn publish(&self, message: StoredMessage) {
        let message = Arc::new(message);
        metrics::ephemeral("published", 1);
        self.hub.dispatch_ephemeral(&message);
        if let Some(outbox) = &self.outbox {
            if outbox.try_send(message).is_err() {
                metrics::ephemeral("dropped", 1);
            }
        }
    }
}

/// Hands ephemeral messages that came from a peer to this node's subscribers (never onwards).
pub(crate) fn received(hub: &Hub, messages: Vec<StoredMessage>) {
    for message in messages {
        hub.dispatch_ephemeral(&Arc::new(message));
    }
}

/// Takes what the outbox holds, in batches, and queues each batch for every current peer.
async fn fan_out_to_peers(
    mut pending: mpsc::Receiver<Arc<StoredMessage>>,
    raft: Raft,
    me: u64,
    peers: Peers,
    mut shutdown: ShutdownSignal,
) {
    let mut queues: HashMap<String, mpsc::Sender<Batch>> = HashMap::new();
    loop {
        let first = tokio::select! {
            first = pending.recv() => match first {
                Some(first) => first,
                None => return,
            },
            _ = shutdown.wait() => return,
        };
        let mut batch = vec![first];
        while batch.len() < PEER_BATCH {
            match pending.recv().now_or_never() {
                Some(Some(message)) => batch.push(message),
                _ => break,
            }
        }
        let batch: Batch = Arc::new(batch);
        let addresses: Vec<String> = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != me)
                .map(|(_, member)| member.raft_addr.clone())
                .collect()
        };
        // A member that left has its queue closed, which ends its task.
        queues.retain(|addr, _| addresses.contains(addr));
        for addr in addresses {
            let queue = queues.entry(addr.clone()).or_insert_with(|| {
                let (queue, batches) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(send_to_peer(addr, batches, peers.clone()));
                queue
            });
            if queue.try_send(Arc::clone(&batch)).is_err() {
                metrics::ephemeral("dropped", batch.len() as u64);
            }
        }
    }
}

/// Sends the batches queued for the peer at `addr`, one call at a time, until its queue closes.
async fn send_to_peer(addr: String, mut batches: mpsc::Receiver<Batch>, peers: Peers) {
    // Said once per run of failures, not per batch.
    let mut warned = false;
    while let Some(batch) = batches.recv().await {
        let messages: Vec<&StoredMessage> = batch.iter().map(|m| m.as_ref()).collect();
        let sent = async {
            let frame = encode(&messages)?;
            let mut client = peers.client(&addr)?;
            let mut request = tonic::Request::new(frame);
            request.set_timeout(PEER_TIMEOUT);
            tokio::time::timeout(PEER_TIMEOUT, client.ephemeral(request))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|status| status.message().to_owned())?;
            Ok::<(), String>(())
        }
        .await;
        match sent {
            Ok(()) => {
                metrics::ephemeral("forwarded", batch.len() as u64);
                warned = false;
            }
            Err(e) => {
                metrics::ephemeral("dropped", batch.len() as u64);
                if !warned {
                    tracing::warn!(peer = %addr, error = %e, "ephemeral messages not sent to a peer");
                    warned = true;
                }
            }
        }
    }
}
