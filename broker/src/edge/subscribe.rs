//! `Subscribe`: validate the request, check the caller's grant, open (or resume) the durable
//! consumer it names, register the subscription on this node and start the task that feeds its
//! stream. Both ways of serving `Subscribe` (the shared-bytes routes of [`super::subscribe_codec`]
//! and the decoded stream) come here through [`super::BrokerService::subscribe_outgoing`].

use std::time::Duration;

use switchboard_proto::v1 as pb;
use tokio::sync::mpsc;

use super::consumers::{check_name, expect_consumer};
use super::validate::Start;
use super::{convert, Edge};
use crate::error::{BrokerError, Reason};
use crate::fanout::outgoing::Outgoing;
use crate::fanout::registry::Opening;
use crate::fanout::subscription::{self, EventSender, SubscriptionSpec};
use crate::message::{ConsumerWrite, Item};
use crate::security::caller::Caller;
use crate::state::machine::AppliedProgress;

/// Events buffered per `Subscribe` stream before the subscription task waits for the client.
const STREAM_BUFFER: usize = 64;
/// The same for a subscription that asked for batches: an event is then up to
/// [`subscription::MAX_BATCH`] messages, so a client that stops reading leaves at most 128
/// deliveries (and about two batches' bytes) buffered, not 64 batches' worth. Two are enough to
/// keep the stream busy: the task packs the next while the last is written.
const BATCHED_STREAM_BUFFER: usize = 2;

impl Edge {
    /// Starts a subscription for a `Subscribe` call; returns the stream's receiving end.
    pub(super) async fn subscribe(
        &self,
        request: pb::SubscribeRequest,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<Result<Outgoing, BrokerError>>, BrokerError> {
        let pattern = self.validator.pattern(&request.pattern)?;
        caller.check_subscribe(&pattern)?;
        let mut start = self.validator.start(request.start, Start::Latest, true)?;
        self.check_start_exists(start).await?;
        let policy = convert::policy(request.policy)?;
        let settings = &self.config.subscriptions;
        let durable = (!request.durable_name.is_empty()).then_some(request.durable_name);
        let mut acked_floor = 0;
        if let Some(name) = &durable {
            check_name(name)?;
            let open = ConsumerWrite::Open {
                name: name.clone(),
                pattern: pattern.as_str().to_owned(),
                policy: convert::policy_number(policy),
                start_offset: subscription::first_offset(
                    &self.store,
                    start,
                    self.progress.borrow().last_offset,
                )?,
                owner: caller.owner(),
            };
            let state = expect_consumer(self.proposer.propose(Item::Consumer(open)).await?)?
                .ok_or_else(|| BrokerError::Consensus("a consumer was not created".into()))?;
            // An existing consumer is taken over only by its owner (or an admin); the check is on
            // the state the log returned, so two principals racing to create a name cannot both
            // get it.
            caller.check_consumer_owner(name, state.owner.as_ref())?;
            if state.pattern != pattern.as_str() {
                return Err(BrokerError::Precondition {
                    reason: Reason::ConsumerInvalid,
                    message: format!(
                        "durable consumer {name:?} follows {:?}, not {:?}; delete it to change its pattern",
                        state.pattern,
                        pattern.as_str()
                    ),
                });
            }
            acked_floor = state.acked_offset;
            start = Start::Offset(state.acked_offset + 1);
        }
        let max_unacked = match (request.max_unacked, &durable) {
            (0, None) => None,
            (0, Some(_)) => Some(settings.default_max_unacked),
            (n, _) => Some(n),
        };
        let ack_timeout = durable.as_ref().map(|_| match request.ack_timeout_ms {
            0 => settings.ack_timeout,
            ms => Duration::from_millis(u64::from(ms)),
        });
        let window = match request.window {
            0 => settings.queue_depth as u64,
            n => u64::from(n),
        };
        let min_interval = (request.min_interval_ms > 0)
            .then(|| Duration::from_millis(u64::from(request.min_interval_ms)));
        // A durable consumer acknowledges what it receives by offset; an ephemeral message has
        // none, and cannot be redelivered.
        let ephemeral = !request.exclude_ephemeral && durable.is_none();

        let registered = self.registry.open(Opening {
            pattern: pattern.as_str().to_owned(),
            policy,
            durable,
            owner: caller.owner(),
            max_unacked,
            peer: caller.peer(),
            acked_floor,
        })?;
        // 0 (a client that does not know batches) and 1 both mean one message per event.
        let max_batch = (request.max_batch as usize).clamp(1, subscription::MAX_BATCH);
        let buffer = if max_batch > 1 {
            BATCHED_STREAM_BUFFER
        } else {
            STREAM_BUFFER
        };
        let (out, events): (EventSender, _) = mpsc::channel(buffer);
        self.spawn_subscription(
            registered,
            SubscriptionSpec {
                pattern,
                start,
                window,
                min_interval,
                ack_timeout,
                ephemeral,
                max_batch,
            },
            out,
        )?;
        Ok(events)
    }

    /// Refuses a start offset beyond the next offset: it names a message that does not exist, so
    /// the subscription would wait for nothing (a durable consumer created there would count
    /// messages never sent as acknowledged). The next offset itself is the live tail, and waits.
    ///
    /// Every offset a client can have been told of (a publish's ack, a delivery, `Subscribed`) is
    /// in the leader's log, but this node may not have applied it yet: a follower behind its
    /// leader, or a leader with entries still to apply. So a leader decides once it has applied
    /// what its log holds now, and any other node waits for its state to reach the offset, at most
    /// `cluster.forward_timeout` (the bound a follower already gives the leader), before refusing.
    ///
    /// # Errors
    /// OUT_OF_RANGE `START_BEYOND_END`, with the next offset this node has.
    async fn check_start_exists(&self, start: Start) -> Result<(), BrokerError> {
        let Start::Offset(offset) = start else {
            return Ok(());
        };
        let exists = |p: &AppliedProgress| offset <= p.last_offset.saturating_add(1);
        if exists(&self.progress.borrow()) {
            return Ok(());
        }
        let leader_log = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.current_leader == Some(metrics.id))
                .then(|| metrics.last_log_index.unwrap_or(0))
        };
        let decided = |p: &AppliedProgress| {
            exists(p) || leader_log.is_some_and(|last| p.applied_index >= last)
        };
        let mut progress = self.progress.clone();
        // Timing out, or the state machine going away, leaves the answer to the check below.
        let _ = tokio::time::timeout(
            self.config.cluster.forward_timeout,
            progress.wait_for(decided),
        )
        .await;
        let now = *self.progress.borrow();
        if exists(&now) {
            Ok(())
        } else {
            Err(BrokerError::StartBeyondEnd {
                start: offset,
                next_offset: now.last_offset.saturating_add(1),
            })
        }
    }
}
