//! Acknowledgements and durable consumers: the handlers behind `Ack`, `ListSubscriptions`,
//! `ListConsumers`, `GetConsumer` and `DeleteConsumer` (a `Subscribe` naming a consumer opens it:
//! [`super::subscribe`]).
//!
//! A durable consumer's record (pattern, policy, acknowledged offset, owner) lives in the
//! replicated state, written through the proposer like a publish; which subscription currently
//! serves it, and what it has in flight, is this node's
//! [`Registry`](crate::fanout::registry::Registry).
//!
//! Ownership: a durable consumer belongs to the principal that created it, and a subscription to
//! the one that opened it. Only that principal, or one with the `admin` grant, sees them listed,
//! reads, acknowledges for, takes over or deletes them; another is refused `CONSUMER_NOT_OWNED`,
//! or, for a subscription id (a small number anyone could guess), told the id is not live. A
//! caller who could not even follow a consumer's pattern is told it does not exist, so names do
//! not leak. Without authentication every caller is the same anonymous `admin`, as before.

use std::sync::Arc;

use switchboard_proto::v1 as pb;

use super::{convert, Edge};
use crate::error::{BrokerError, Reason};
use crate::fanout::registry::Control;
use crate::message::{ConsumerState, ConsumerWrite, Item, ItemOutcome, Owner};
use crate::security::caller::Caller;

/// Longest durable consumer name.
const MAX_NAME_LEN: usize = 64;

pub(super) fn check_name(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::invalid(
            Reason::ConsumerInvalid,
            format!(
                "consumer name must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9_-], got {:?}",
                crate::error::shorten(name)
            ),
        ))
    }
}

pub(super) fn expect_consumer(outcome: ItemOutcome) -> Result<Option<ConsumerState>, BrokerError> {
    match outcome {
        ItemOutcome::Consumer(state) => Ok(state),
        other => Err(BrokerError::Consensus(format!(
            "a consumer write was applied as {other:?}"
        ))),
    }
}

impl Edge {
    /// Handles `Ack`.
    pub(super) async fn ack(
        &self,
        request: pb::AckRequest,
        caller: &Caller,
    ) -> Result<pb::AckResponse, BrokerError> {
        let control = self
            .registry
            .get(request.subscription_id)
            // Another principal's subscription is as good as unknown: ids are guessable.
            .filter(|control| caller.may_manage(control.owner.as_ref()))
            .ok_or_else(|| BrokerError::NotFound {
                reason: Reason::SubscriptionNotFound,
                message: format!(
                    "no live subscription {} on this node (it ended, or was opened on another node)",
                    request.subscription_id
                ),
            })?;
        // Acknowledging moves a consumer on: only a caller who could have opened it may.
        caller.check_subscribe(&self.validator.pattern(&control.pattern)?)?;
        let (pending, floor) = control.ack(&request.offsets);
        let mut acked_offset = 0;
        if let Some(name) = &control.durable {
            let redeliveries = std::mem::take(&mut control.flight().unsaved_redeliveries);
            let write = ConsumerWrite::Ack {
                name: name.clone(),
                acked_offset: floor,
                redeliveries,
            };
            acked_offset = expect_consumer(self.proposer.propose(Item::Consumer(write)).await?)?
                .map(|s| s.acked_offset)
                .unwrap_or(floor);
        }
        Ok(pb::AckResponse {
            pending: pending as u64,
            acked_offset,
        })
    }

    /// Handles `ListSubscriptions`.
    pub(super) fn list_subscriptions(&self, caller: &Caller) -> pb::ListSubscriptionsResponse {
        pb::ListSubscriptionsResponse {
            subscriptions: self
                .registry
                .list()
                .iter()
                .filter(|control| self.listed(caller, control.owner.as_ref(), &control.pattern))
                .map(subscription_info)
                .collect(),
        }
    }

    /// Whether `caller` may see a subscription or consumer following `pattern`: only if it could
    /// subscribe to that pattern itself.
    fn visible(&self, caller: &Caller, pattern: &str) -> bool {
        self.validator
            .pattern(pattern)
            .is_ok_and(|pattern| caller.may_subscribe(&pattern))
    }

    /// Whether `caller` sees a subscription or consumer listed: an `admin` sees every one; anyone
    /// else those it owns and whose pattern it could still follow.
    fn listed(&self, caller: &Caller, owner: Option<&Owner>, pattern: &str) -> bool {
        caller.is_admin() || (caller.may_manage(owner) && self.visible(caller, pattern))
    }

    /// A consumer's record, if `caller` may manage it: an `admin` any; anyone else only one it
    /// owns. One whose pattern the caller could not follow is "not found", so names do not leak.
    ///
    /// # Errors
    /// NOT_FOUND `CONSUMER_NOT_FOUND`, or PERMISSION_DENIED `CONSUMER_NOT_OWNED`.
    fn owned_consumer(&self, name: &str, caller: &Caller) -> Result<ConsumerState, BrokerError> {
        check_name(name)?;
        let state = match self.store.consumer(name)? {
            Some(state) if caller.is_admin() || self.visible(caller, &state.pattern) => state,
            _ => return Err(not_found(name)),
        };
        caller.check_consumer_owner(name, state.owner.as_ref())?;
        Ok(state)
    }

    fn consumer_info(&self, name: String, state: ConsumerState) -> pb::ConsumerInfo {
        let live = self.registry.durable(&name);
        let (pending, unsaved) = live
            .as_ref()
            .map(|c| {
                let flight = c.flight();
                (flight.pending.len() as u64, flight.unsaved_redeliveries)
            })
            .unwrap_or((0, 0));
        pb::ConsumerInfo {
            name,
            pattern: state.pattern,
            policy: state.policy,
            acked_offset: state.acked_offset,
            pending,
            redeliveries: state.redeliveries + unsaved,
            connected: live.is_some(),
            created_at: Some(convert::timestamp(state.created_at_us)),
        }
    }

    /// Handles `ListConsumers`.
    pub(super) fn list_consumers(
        &self,
        caller: &Caller,
    ) -> Result<pb::ListConsumersResponse, BrokerError> {
        let mut consumers = Vec::new();
        for item in self.store.consumers() {
            let (name, state) = item?;
            if self.listed(caller, state.owner.as_ref(), &state.pattern) {
                consumers.push(self.consumer_info(name, state));
            }
        }
        Ok(pb::ListConsumersResponse { consumers })
    }

    /// Handles `GetConsumer`.
    pub(super) fn get_consumer(
        &self,
        name: &str,
        caller: &Caller,
    ) -> Result<pb::ConsumerInfo, BrokerError> {
        let state = self.owned_consumer(name, caller)?;
        Ok(self.consumer_info(name.to_owned(), state))
    }

    /// Handles `DeleteConsumer`: removes the record and stops its live subscription.
    pub(super) async fn delete_consumer(
        &self,
        name: &str,
        caller: &Caller,
    ) -> Result<(), BrokerError> {
        self.owned_consumer(name, caller)?;
        let write = ConsumerWrite::Delete {
            name: name.to_owned(),
        };
        expect_consumer(self.proposer.propose(Item::Consumer(write)).await?)?;
        if let Some(live) = self.registry.durable(name) {
            live.stop();
        }
        Ok(())
    }
}

fn not_found(name: &str) -> BrokerError {
    BrokerError::NotFound {
        reason: Reason::ConsumerNotFound,
        message: format!("no durable consumer named {name:?}"),
    }
}

fn subscription_info(control: &Arc<Control>) -> pb::SubscriptionInfo {
    let stats = control.mailbox_stats();
    let flight = control.flight();
    pb::SubscriptionInfo {
        subscription_id: control.id,
        pattern: control.pattern.clone(),
        policy: convert::policy_number(control.policy),
        durable_name: control.durable.clone().unwrap_or_default(),
        next_offset: flight.next_offset,
        lagging: stats.lagging,
        buffered_messages: stats.messages as u64,
        buffered_bytes: stats.bytes as u64,
        peak_buffered_bytes: stats.peak_bytes as u64,
        buffered_bytes_limit: stats.capacity_bytes as u64,
        pending: flight.pending.len() as u64,
        delivered: flight.delivered,
        slow_switches: stats.slow_switches,
        waiting_for_credit: flight.waiting_for_credit,
    }
}
