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

/// Events buffered per `Subscribe` stream before the subscription task waits for the client.
const STREAM_BUFFER: usize = 64;

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
        let (out, events): (EventSender, _) = mpsc::channel(STREAM_BUFFER);
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
}
