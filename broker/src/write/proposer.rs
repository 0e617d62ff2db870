//! The proposer: group commit. Concurrent publishes and entity writes wait in one bounded queue; a
//! single task takes everything waiting (up to a size limit) and proposes it as one log entry, so
//! one fdatasync and one consensus round carry many items.
//!
//! The task first waits for a free in-flight slot and only then drains the queue: while earlier
//! entries are being synced, new items accumulate, and the next entry carries all of them. It
//! submits entries to raft in queue order (`client_write_ff` from this one task), so the offsets of
//! one publisher's messages increase in the order it sent them.
//!
//! On a follower, the batch is handed whole to the leader (`cluster::Leader::propose`), so group
//! commit holds cluster-wide. Forwarded batches go one at a time, in queue order: while one is on
//! its way, the next batch fills, and one publisher's messages keep their order.
//!
//! The queue is bounded twice: in proposals (`proposer.queue`) and in bytes
//! (`proposer.queue_bytes`), so a burst of large messages makes publishers wait rather than the
//! broker's memory grow.
//!
//! In a cluster every write is due `cluster.forward_timeout` after it arrives, wherever it waits:
//! in the queue behind an entry that no majority confirms, for a forwarded batch ahead of it, or
//! for its own entry to commit. Past that it is refused with its reason (`NO_QUORUM`,
//! `LEADER_UNREACHABLE`, `NO_LEADER`), so writes queued behind a stuck one do not each wait a
//! whole timeout more (issue 19: refusals came after 8 s and more where 5 s were documented).

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::admission::Admission;
use crate::cluster::Leader;
use crate::config;
use crate::error::BrokerError;
use crate::message::{now_us, Command, CommandOutcome, Item, ItemOutcome, Rules};
use crate::observability::metrics;
use crate::raft::Raft;

/// The answer to one proposal, once committed and applied: one outcome per item.
pub(crate) type Pending = oneshot::Receiver<Result<Vec<ItemOutcome>, BrokerError>>;

/// Where one proposal's outcomes go.
type Reply = oneshot::Sender<Result<Vec<ItemOutcome>, BrokerError>>;

struct Proposal {
    items: Vec<Item>,
    reply: Reply,
    /// The proposal's share of the queue's byte budget, returned when it leaves the queue.
    _budget: OwnedSemaphorePermit,
    /// When it must be answered, committed or not (a cluster's `forward_timeout` after it
    /// arrived); `None` on a single node, whose writes wait for nobody.
    due: Option<Instant>,
    /// When it was submitted: its wait for a log entry is the `queued` stage.
    submitted: std::time::Instant,
}

/// The queue's byte budget is counted in KiB, so it fits a semaphore's permit count.
const BUDGET_UNIT: usize = 1024;

/// Handle to the proposer task; cheap to clone. The task ends when every handle is dropped.
#[derive(Clone)]
pub(crate) struct Proposer {
    queue: mpsc::Sender<Proposal>,
    /// Bounds the bytes waiting in the queue, not only their count.
    budget: Arc<Semaphore>,
    budget_units: u32,
    leader: Leader,
    admission: Admission,
}

impl Proposer {
    /// Starts the proposer task for `raft`; every batch carries `rules`. Batches go to the
    /// leader through `leader` when this node does not lead.
    /// Writes are admitted by `admission` first.
    pub(crate) fn start(
        raft: Raft,
        leader: Leader,
        settings: &config::Proposer,
        rules: Rules,
        admission: Admission,
    ) -> Proposer {
        let (queue, waiting) = mpsc::channel(settings.queue);
        tokio::spawn(run(
            raft,
            leader.clone(),
            waiting,
            settings.clone(),
            rules,
            admission.clone(),
        ));
        let budget_units = u32::try_from(settings.queue_bytes / BUDGET_UNIT)
            .unwrap_or(u32::MAX)
            .max(1);
        Proposer {
            queue,
            budget: Arc::new(Semaphore::new(budget_units as usize)),
            budget_units,
            leader,
            admission,
        }
    }

    /// Leader-only work (reads that must be linearizable, membership) from this node.
    pub(crate) fn leader(&self) -> &Leader {
        &self.leader
    }

    /// Queues `items` to be proposed together (waiting for queue space, which is backpressure on
    /// the caller); returns the receiver of their outcomes. Calling this in order from one task
    /// keeps that task's items in order.
    ///
    /// # Errors
    /// [`BrokerError::ShuttingDown`] when the proposer has stopped; the refusal of
    /// [`Admission::admit`] (the disk is nearly full, or raft stopped).
    pub(crate) async fn submit(&self, items: Vec<Item>) -> Result<Pending, BrokerError> {
        self.admission.admit(&items)?;
        let due = self.leader.commit_timeout().map(|t| Instant::now() + t);
        let (reply, pending) = oneshot::channel();
        let bytes: usize = items.iter().map(Item::approximate_size).sum();
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT))
            .unwrap_or(u32::MAX)
            .min(self.budget_units)
            .max(1);
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(units)
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        self.queue
            .send(Proposal {
                items,
                reply,
                _budget: budget,
                due,
                submitted: std::time::Instant::now(),
            })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        Ok(pending)
    }

    /// Proposes one item and waits until it is committed, durable and applied.
    ///
    /// # Errors
    /// Whatever kept it from being committed; nothing was stored then.
    pub(crate) async fn propose(&self, item: Item) -> Result<ItemOutcome, BrokerError> {
        single(outcome(self.submit(vec![item]).await?).await?)
    }
}

/// Waits for a submitted proposal's outcomes.
///
/// # Errors
/// Whatever kept it from being committed.
pub(crate) async fn outcome(pending: Pending) -> Result<Vec<ItemOutcome>, BrokerError> {
    pending.await.unwrap_or(Err(BrokerError::ShuttingDown))
}

/// The one outcome of a one-item proposal.
///
/// # Errors
/// [`BrokerError::Consensus`] if apply answered with another number of outcomes.
pub(crate) fn single(outcomes: Vec<ItemOutcome>) -> Result<ItemOutcome, BrokerError> {
    let mut outcomes = outcomes.into_iter();
    match (outcomes.next(), outcomes.next()) {
        (Some(outcome), None) => Ok(outcome),
        _ => Err(BrokerError::Consensus(
            "apply answered a one-item proposal with another number of outcomes".into(),
        )),
    }
}

/// Maps a failed write to what the client is told.
pub(crate) fn write_error(
    e: RaftError<u64, ClientWriteError<u64, crate::raft::Member>>,
) -> BrokerError {
    match e {
        // Leadership moved while the batch was being proposed here; nothing was written. The
        // new leader's public address, when raft knows it, goes back as a hint.
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            match (
                f.leader_id,
                f.leader_node.filter(|n| !n.public_addr.is_empty()),
            ) {
                (Some(leader), Some(node)) => BrokerError::LeaderUnavailable {
                    reason: crate::error::Reason::NotLeader,
                    message: format!(
                        "this node stopped leading while proposing the write; node {leader} leads \
                         now (nothing was written: retry)"
                    ),
                    leader: Some(leader),
                    leader_address: Some(node.public_addr),
                },
                (leader, _) => BrokerError::NotLeader { leader },
            }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            BrokerError::Consensus(e.to_string())
        }
        RaftError::Fatal(openraft::error::Fatal::Stopped) => BrokerError::ShuttingDown,
        RaftError::Fatal(e) => BrokerError::Consensus(e.to_string()),
    }
}

fn proposal_bytes(proposal: &Proposal) -> usize {
    proposal.items.iter().map(Item::approximate_size).sum()
}

/// Small log entries allowed in flight at once; larger ones may use every `proposer.max_in_flight`
/// slot.
///
/// An entry costs about the same to append, sync, replicate and apply whatever it carries, until
/// its bytes take over. With few concurrent writers, each waiting for its answer before writing
/// again (W4: 64 entity writers), the proposer used to propose whatever was queued as soon as a
/// slot was free: up to eight entries of a few items each were in flight, and W4 spent ~200 µs of
/// broker CPU per update, mostly on per-entry work. A small entry is therefore held back while
/// another small one is in flight, gathering what arrives meanwhile; a lone write, with nothing in
/// flight, still goes out at once.
const SMALL_IN_FLIGHT: usize = 1;

/// Below this size an entry counts as small (see [`SMALL_IN_FLIGHT`]). Larger entries may use
/// every `proposer.max_in_flight` slot (1 by default: with the segment log, the batch files and
/// a stream's messages proposed in groups, fewer and larger entries are the faster way for W1 too;
/// docs/BENCHMARKS.md). W4's entries stay well below it (an update is a few hundred bytes).
const SMALL_ENTRY_BYTES: usize = 16 * 1024;

/// The log entry being gathered: its items and where their outcomes go.
struct Entry {
    items: Vec<Item>,
    replies: Vec<(usize, Reply)>,
    bytes: usize,
    /// When its earliest write is due.
    due: Option<Instant>,
}

impl Entry {
    fn new(first: Proposal) -> Entry {
        let mut entry = Entry {
            items: Vec::new(),
            replies: Vec::new(),
            bytes: 0,
            due: first.due,
        };
        entry.take(first);
        entry
    }

    fn take(&mut self, proposal: Proposal) {
        metrics::publish_queued(proposal.submitted.elapsed().as_secs_f64());
        self.due = match (self.due, proposal.due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.bytes += proposal_bytes(&proposal);
        self.replies.push((proposal.items.len(), proposal.reply));
        self.items.extend(proposal.items);
    }

    /// Adds `proposal` if the entry has room for it; gives it back otherwise.
    fn add(&mut self, proposal: Proposal, settings: &config::Proposer) -> Result<(), Proposal> {
        if self.items.len() + proposal.items.len() > settings.max_batch_messages
            || self.bytes + proposal_bytes(&proposal) > settings.max_batch_bytes
        {
            return Err(proposal);
        }
        self.take(proposal);
        Ok(())
    }

    fn is_full(&self, settings: &config::Proposer) -> bool {
        self.items.len() >= settings.max_batch_messages
    }

    /// Small enough to be worth holding back for more (and not already at the batch limits).
    fn is_small(&self, settings: &config::Proposer) -> bool {
        !self.is_full(settings) && self.bytes < SMALL_ENTRY_BYTES.min(settings.max_batch_bytes)
    }
}

/// A forwarded batch without a due time (a node that is not clustered never forwards; this only
/// bounds the impossible case).
const FORWARD_WITHOUT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// `wait`'s output, or `None` once `due` has passed; without a due time it waits as long as it
/// takes.
async fn by<F: std::future::Future>(due: Option<Instant>, wait: F) -> Option<F::Output> {
    match due {
        Some(due) => tokio::time::timeout_at(due, wait).await.ok(),
        None => Some(wait.await),
    }
}

/// Hands each proposal its share of a batch's outcomes (or the batch's error).
fn deliver(replies: Vec<(usize, Reply)>, result: Result<Vec<ItemOutcome>, BrokerError>) {
    match result {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for (count, reply) in replies {
                let _ = reply.send(Ok(outcomes.by_ref().take(count).collect()));
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// A batch's outcomes from what apply answered.
fn batch_outcomes(
    outcome: CommandOutcome,
    item_count: usize,
    proposed_at: std::time::Instant,
) -> Result<Vec<ItemOutcome>, BrokerError> {
    match outcome {
        CommandOutcome::Batch(outcomes) => {
            metrics::commit(item_count, proposed_at.elapsed().as_secs_f64());
            Ok(outcomes)
        }
        other => Err(BrokerError::Consensus(format!(
            "a batch was applied as {other:?}"
        ))),
    }
}

async fn run(
    raft: Raft,
    leader: Leader,
    mut waiting: mpsc::Receiver<Proposal>,
    settings: config::Proposer,
    rules: Rules,
    admission: Admission,
) {
    let in_flight = Arc::new(Semaphore::new(settings.max_in_flight));
    let small = Arc::new(Semaphore::new(SMALL_IN_FLIGHT));
    // One forwarded batch at a time keeps a follower's batches in queue order on the leader.
    let forwarding = Arc::new(Semaphore::new(1));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match waiting.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let in_flight_turn = match by(first.due, Arc::clone(&in_flight).acquire_owned()).await {
            Some(Ok(turn)) => turn,
            Some(Err(_)) => break,
            // Earlier entries held every slot until this write was due.
            None => {
                let _ = first.reply.send(Err(leader.overdue()));
                continue;
            }
        };

        // Each proposal's budget is released as it is taken into the entry: from here on its bytes
        // belong to the entry, which the in-flight limit bounds.
        let mut entry = Entry::new(first);
        while !entry.is_full(&settings) {
            let Ok(next) = waiting.try_recv() else { break };
            if let Err(next) = entry.add(next, &settings) {
                carried = Some(next);
                break;
            }
        }
        // A small entry goes out only when no other small entry is in flight; until then it keeps
        // taking what arrives (see `SMALL_IN_FLIGHT`).
        let small_turn = if !entry.is_small(&settings) || carried.is_some() {
            None
        } else {
            let acquire = Arc::clone(&small).acquire_owned();
            tokio::pin!(acquire);
            loop {
                tokio::select! {
                    biased;
                    turn = &mut acquire => break turn.ok(),
                    next = waiting.recv() => match next {
                        Some(next) => {
                            if let Err(next) = entry.add(next, &settings) {
                                carried = Some(next);
                            }
                            if carried.is_some() || !entry.is_small(&settings) {
                                break None;
                            }
                        }
                        // Every handle is gone: propose what is here, then stop.
                        None => break None,
                    },
                }
            }
        };
        let permit = (in_flight_turn, small_turn);
        let Entry {
            items,
            replies,
            bytes: _,
            due,
        } = entry;

        // Raft stopped while these waited: refuse them all at once rather than one entry at a
        // time through openraft's stopped core.
        if let Err(e) = admission.check_alive() {
            deliver(replies, Err(e));
            continue;
        }
        let item_count = items.len();
        let command = Command::Batch {
            stamped_at_us: now_us(),
            rules,
            items,
        };
        let proposed_at = std::time::Instant::now();
        if !leader.is_me() {
            let forward_turn = match by(due, Arc::clone(&forwarding).acquire_owned()).await {
                Some(Ok(turn)) => turn,
                Some(Err(_)) => break,
                // The batch ahead of it was still on its way when it was due.
                None => {
                    deliver(replies, Err(leader.overdue()));
                    continue;
                }
            };
            let leader = leader.clone();
            let deadline = due.unwrap_or_else(|| Instant::now() + FORWARD_WITHOUT_DEADLINE);
            tokio::spawn(async move {
                let result = leader
                    .propose(command, deadline)
                    .await
                    .and_then(|outcome| batch_outcomes(outcome, item_count, proposed_at));
                drop(forward_turn);
                drop(permit);
                deliver(replies, result);
            });
            continue;
        }
        let response = match raft.client_write_ff(command).await {
            Ok(response) => response,
            Err(e) => {
                let error = write_error(RaftError::Fatal(e));
                for (_, reply) in replies {
                    let _ = reply.send(Err(error.clone()));
                }
                continue;
            }
        };
        let overdue = leader.no_quorum();
        tokio::spawn(async move {
            let response = match due {
                Some(due) => match tokio::time::timeout_at(due, response).await {
                    Ok(response) => response,
                    Err(_) => {
                        tracing::debug!("no majority confirmed a batch in time");
                        drop(permit);
                        deliver(replies, Err(overdue));
                        return;
                    }
                },
                None => response.await,
            };
            let result = match response {
                Ok(Ok(written)) => batch_outcomes(written.data, item_count, proposed_at),
                Ok(Err(e)) => Err(write_error(RaftError::APIError(e))),
                Err(_) => Err(BrokerError::ShuttingDown),
            };
            drop(permit);
            deliver(replies, result);
        });
    }
}

#[cfg(test)]
mod tests {
    use openraft::error::ForwardToLeader;

    use super::*;
    use crate::error::Reason;
    use crate::raft::Member;

    fn forward(leader_id: Option<u64>, public_addr: &str) -> BrokerError {
        write_error(RaftError::APIError(ClientWriteError::ForwardToLeader(
            ForwardToLeader {
                leader_id,
                leader_node: leader_id.map(|_| Member {
                    raft_addr: "10.0.0.2:7402".into(),
                    public_addr: public_addr.into(),
                }),
            },
        )))
    }

    fn proposal(bytes: usize) -> (Proposal, Pending) {
        let (reply, pending) = oneshot::channel();
        let message =
            crate::message::NewMessage::on_channel("a.b", bytes::Bytes::from(vec![b'x'; bytes]));
        let budget = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let proposal = Proposal {
            items: vec![Item::Publish(message)],
            reply,
            _budget: budget,
            due: None,
            submitted: std::time::Instant::now(),
        };
        (proposal, pending)
    }

    #[test]
    fn an_entry_is_small_until_it_reaches_the_size_worth_its_own_sync_or_a_limit() {
        let settings = config::Proposer {
            max_batch_messages: 4,
            max_batch_bytes: 64 * 1024,
            max_in_flight: 8,
            queue: 16,
            queue_bytes: 1 << 20,
        };
        // Entity-sized items: the entry stays small until the message limit.
        let mut entry = Entry::new(proposal(200).0);
        assert!(entry.is_small(&settings));
        for _ in 0..3 {
            assert!(entry.add(proposal(200).0, &settings).is_ok());
        }
        assert!(entry.is_full(&settings) && !entry.is_small(&settings));
        assert!(
            entry.add(proposal(200).0, &settings).is_err(),
            "over the limit"
        );
        // Large items: not small once past SMALL_ENTRY_BYTES.
        let mut entry = Entry::new(proposal(SMALL_ENTRY_BYTES / 2).0);
        assert!(entry.is_small(&settings));
        assert!(entry
            .add(proposal(SMALL_ENTRY_BYTES / 2).0, &settings)
            .is_ok());
        assert!(!entry.is_small(&settings));
        // A byte limit below SMALL_ENTRY_BYTES: the entry is small only below the limit.
        let tight = config::Proposer {
            max_batch_bytes: 1024,
            ..settings
        };
        let entry = Entry::new(proposal(2000).0);
        assert!(!entry.is_small(&tight));
        assert_eq!((entry.items.len(), entry.replies.len()), (1, 1));
    }

    #[test]
    fn a_lost_leadership_names_the_new_leader_when_raft_knows_it() {
        match forward(Some(2), "10.0.0.2:7400") {
            BrokerError::LeaderUnavailable {
                reason,
                leader,
                leader_address,
                ..
            } => {
                assert_eq!(reason, Reason::NotLeader);
                assert_eq!(leader, Some(2));
                assert_eq!(leader_address.as_deref(), Some("10.0.0.2:7400"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // No public address known (yet): the id alone.
        assert!(matches!(
            forward(Some(2), ""),
            BrokerError::NotLeader { leader: Some(2) }
        ));
        assert!(matches!(
            forward(None, ""),
            BrokerError::NotLeader { leader: None }
        ));
    }
}
