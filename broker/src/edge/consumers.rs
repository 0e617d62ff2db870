//! Subscriptions with flow control, acknowledgements and durable consumers: the handlers behind
//! `Subscribe`, `Ack`, `ListSubscriptions`, `ListConsumers`, `GetConsumer` and `DeleteConsumer`.
//!
//! A durable consumer's record (pattern, policy, acknowledged offset) lives in the replicated
//! state, written through the proposer like a publish; which subscription currently serves it, and
//! what it has in flight, is this node's [`Registry`](crate::subscription::registry::Registry).

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::v1 as pb;
use tokio::sync::mpsc;

use super::validate::Start;
use super::{convert, Edge, SUBSCRIBE_STREAM_BUFFER};
use crate::error::{BrokerError, Reason};
use crate::message::{ConsumerState, ConsumerWrite, Item, ItemOutcome};
use crate::security::caller::Caller;
use crate::subscription::outgoing::Outgoing;
use crate::subscription::registry::{Control, FlowPolicy, Opening};
use crate::subscription::{self, EventSender, SubscriptionSpec};

/// Longest durable consumer name.
const MAX_NAME_LEN: usize = 64;

fn policy(value: i32) -> Result<FlowPolicy, BrokerError> {
    match pb::FlowPolicy::try_from(value) {
        Ok(pb::FlowPolicy::Unspecified | pb::FlowPolicy::Lossless) => Ok(FlowPolicy::Lossless),
        Ok(pb::FlowPolicy::Conflate) => Ok(FlowPolicy::Conflate),
        Ok(pb::FlowPolicy::DropOldest) => Ok(FlowPolicy::DropOldest),
        Err(_) => Err(BrokerError::invalid(
            Reason::PolicyInvalid,
            format!("unknown flow policy {value}"),
        )),
    }
}

fn policy_number(policy: FlowPolicy) -> i32 {
    match policy {
        FlowPolicy::Lossless => pb::FlowPolicy::Lossless as i32,
        FlowPolicy::Conflate => pb::FlowPolicy::Conflate as i32,
        FlowPolicy::DropOldest => pb::FlowPolicy::DropOldest as i32,
    }
}

fn check_name(name: &str) -> Result<(), BrokerError> {
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

fn expect_consumer(outcome: ItemOutcome) -> Result<Option<ConsumerState>, BrokerError> {
    match outcome {
        ItemOutcome::Consumer(state) => Ok(state),
        other => Err(BrokerError::Consensus(format!(
            "a consumer write was applied as {other:?}"
        ))),
    }
}

impl Edge {
    /// Starts a subscription for a `Subscribe` call; returns the stream's receiving end.
    pub(super) async fn subscribe(
        &self,
        request: pb::SubscribeRequest,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<Result<Outgoing, tonic::Status>>, BrokerError> {
        let pattern = self.validator.pattern(&request.pattern)?;
        caller.check_subscribe(&pattern)?;
        let mut start = self.validator.start(request.start, Start::Latest, true)?;
        let policy = policy(request.policy)?;
        let settings = &self.config.subscriptions;
        let durable = (!request.durable_name.is_empty()).then_some(request.durable_name);
        let mut acked_floor = 0;
        if let Some(name) = &durable {
            check_name(name)?;
            let open = ConsumerWrite::Open {
                name: name.clone(),
                pattern: pattern.as_str().to_owned(),
                policy: policy_number(policy),
                start_offset: subscription::first_offset(
                    &self.store,
                    start,
                    self.progress.borrow().last_offset,
                )?,
            };
            let state = expect_consumer(self.proposer.propose(Item::Consumer(open)).await?)?
                .ok_or_else(|| BrokerError::Consensus("a consumer was not created".into()))?;
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

        let registered = self.registry.open(Opening {
            pattern: pattern.as_str().to_owned(),
            policy,
            durable,
            max_unacked,
            peer: caller.peer(),
            acked_floor,
        })?;
        let (out, events): (EventSender, _) = mpsc::channel(SUBSCRIBE_STREAM_BUFFER);
        self.spawn_subscription(
            registered,
            SubscriptionSpec {
                pattern,
                start,
                window,
                min_interval,
                ack_timeout,
            },
            out,
        )?;
        Ok(events)
    }

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
        policy: policy_number(control.policy),
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
