//! Acknowledgements and durable consumers: the handlers behind `Ack`, `ListSubscriptions`,
//! `ListConsumers`, `GetConsumer` and `DeleteConsumer` (a `Subscribe` naming a consumer opens it:
//! [`super::subscribe`]).
//!
//! A durable consumer's record (pattern, policy, acknowledged offset) lives in the replicated
//! state, written through the proposer like a publish; which subscription currently serves it, and
//! what it has in flight, is this node's [`Registry`](crate::fanout::registry::Registry).

use std::sync::Arc;

use switchboard_proto::v1 as pb;

use super::{convert, Edge};
use crate::error::{BrokerError, Reason};
use crate::fanout::registry::Control;
use crate::message::{ConsumerState, ConsumerWrite, Item, ItemOutcome};
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
                .filter(|control| self.visible(caller, &control.pattern))
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

    /// A consumer's record, if `caller` may see it (else "not found", so names do not leak).
    fn visible_consumer(&self, name: &str, caller: &Caller) -> Result<ConsumerState, BrokerError> {
        check_name(name)?;
        match self.store.consumer(name)? {
            Some(state) if self.visible(caller, &state.pattern) => Ok(state),
            _ => Err(not_found(name)),
        }
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
            if self.visible(caller, &state.pattern) {
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
        let state = self.visible_consumer(name, caller)?;
        Ok(self.consumer_info(name.to_owned(), state))
    }

    /// Handles `DeleteConsumer`: removes the record and stops its live subscription.
    pub(super) async fn delete_consumer(
        &self,
        name: &str,
        caller: &Caller,
    ) -> Result<(), BrokerError> {
        self.visible_consumer(name, caller)?;
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
