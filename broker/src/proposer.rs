//! The proposer: group commit. Concurrent publishes wait in one bounded queue; a single task takes
//! everything waiting (up to a size limit) and proposes it as one log entry, so one fdatasync and one
//! consensus round carry many messages.
//!
//! The task first waits for a free in-flight slot and only then drains the queue: while earlier
//! entries are being synced, new publishes accumulate, and the next entry carries all of them. It
//! submits entries to raft in queue order (`client_write_ff` from this one task), so the offsets of
//! one publisher's messages increase in the order it sent them.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config;
use crate::error::BrokerError;
use crate::message::{now_us, Command, CommandOutcome, NewMessage};
use crate::raft::Raft;

/// Where a proposal's messages landed: offsets `first_offset..first_offset + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Offset of the proposal's first message.
    pub first_offset: u64,
    /// Publish time of every message in it, µs since the epoch.
    pub publish_time_us: u64,
}

/// The answer to one proposal, once committed and applied.
pub type Pending = oneshot::Receiver<Result<Published, BrokerError>>;

struct Proposal {
    messages: Vec<NewMessage>,
    reply: oneshot::Sender<Result<Published, BrokerError>>,
    /// The proposal's share of the queue's byte budget, returned when it leaves the queue.
    _budget: OwnedSemaphorePermit,
}

/// The queue's byte budget is counted in KiB, so it fits a semaphore's permit count.
const BUDGET_UNIT: usize = 1024;

/// Handle to the proposer task; cheap to clone. The task ends when every handle is dropped.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Proposal>,
    /// Bounds the bytes waiting in the queue, not only their count.
    budget: Arc<Semaphore>,
    budget_units: u32,
}

impl Proposer {
    /// Starts the proposer task for `raft`.
    pub fn start(raft: Raft, settings: &config::Proposer) -> Proposer {
        let (queue, waiting) = mpsc::channel(settings.queue);
        tokio::spawn(run(raft, waiting, settings.clone()));
        let budget_units = u32::try_from(settings.queue_bytes / BUDGET_UNIT).unwrap_or(u32::MAX);
        Proposer {
            queue,
            budget: Arc::new(Semaphore::new(budget_units as usize)),
            budget_units,
        }
    }

    /// Queues `messages` to be proposed together (waiting for queue space, which is backpressure
    /// on the publisher); returns the receiver of their outcome. Calling this in order from one
    /// task keeps that task's messages in order.
    ///
    /// # Errors
    /// [`BrokerError::ShuttingDown`] when the proposer has stopped.
    pub async fn submit(&self, messages: Vec<NewMessage>) -> Result<Pending, BrokerError> {
        let (reply, pending) = oneshot::channel();
        let bytes: usize = messages.iter().map(NewMessage::approximate_size).sum();
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget_units);
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(units)
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        self.queue
            .send(Proposal {
                messages,
                reply,
                _budget: budget,
            })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        Ok(pending)
    }

    /// Proposes `messages` and waits until they are committed, durable and applied.
    ///
    /// # Errors
    /// Whatever kept them from being committed; nothing was stored then.
    pub async fn propose(&self, messages: Vec<NewMessage>) -> Result<Published, BrokerError> {
        outcome(self.submit(messages).await?).await
    }
}

/// Waits for a submitted proposal's outcome.
///
/// # Errors
/// Whatever kept it from being committed.
pub async fn outcome(pending: Pending) -> Result<Published, BrokerError> {
    pending.await.unwrap_or(Err(BrokerError::ShuttingDown))
}

/// Maps a failed write to what the client is told.
pub fn write_error(e: RaftError<u64, ClientWriteError<u64, openraft::BasicNode>>) -> BrokerError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => BrokerError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            BrokerError::Consensus(e.to_string())
        }
        RaftError::Fatal(openraft::error::Fatal::Stopped) => BrokerError::ShuttingDown,
        RaftError::Fatal(e) => BrokerError::Consensus(e.to_string()),
    }
}

fn batch_bytes(proposal: &Proposal) -> usize {
    proposal
        .messages
        .iter()
        .map(NewMessage::approximate_size)
        .sum()
}

async fn run(raft: Raft, mut waiting: mpsc::Receiver<Proposal>, settings: config::Proposer) {
    let in_flight = Arc::new(Semaphore::new(settings.max_in_flight));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match waiting.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };

        let mut messages = Vec::new();
        let mut replies = Vec::new();
        let mut bytes = batch_bytes(&first);
        replies.push((first.messages.len() as u64, first.reply));
        messages.extend(first.messages);
        // Each proposal's budget is released as it is taken into the entry: from here on its bytes
        // belong to the entry, which the in-flight limit bounds.
        while messages.len() < settings.max_batch_messages {
            let Ok(next) = waiting.try_recv() else { break };
            let size = batch_bytes(&next);
            if messages.len() + next.messages.len() > settings.max_batch_messages
                || bytes + size > settings.max_batch_bytes
            {
                carried = Some(next);
                break;
            }
            bytes += size;
            replies.push((next.messages.len() as u64, next.reply));
            messages.extend(next.messages);
        }

        let command = Command::Publish {
            stamped_at_us: now_us(),
            messages,
        };
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
        tokio::spawn(async move {
            let result = match response.await {
                Ok(Ok(written)) => match written.data {
                    CommandOutcome::Published {
                        first_offset,
                        publish_time_us,
                    } => Ok((first_offset, publish_time_us)),
                    other => Err(BrokerError::Consensus(format!(
                        "a publish was applied as {other:?}"
                    ))),
                },
                Ok(Err(e)) => Err(write_error(RaftError::APIError(e))),
                Err(_) => Err(BrokerError::ShuttingDown),
            };
            drop(permit);
            let mut offset = result.as_ref().map(|(first, _)| *first).unwrap_or(0);
            for (count, reply) in replies {
                let answer = match &result {
                    Ok((_, publish_time_us)) => Ok(Published {
                        first_offset: offset,
                        publish_time_us: *publish_time_us,
                    }),
                    Err(e) => Err(e.clone()),
                };
                offset += count;
                let _ = reply.send(answer);
            }
        });
    }
}
