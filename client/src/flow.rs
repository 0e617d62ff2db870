//! Per-consumer flow control: [`FlowPolicy`], acknowledgements ([`Acker`]), and the calls that
//! describe live subscriptions and durable consumers ([`Client::list_subscriptions`],
//! [`Client::list_consumers`], [`Client::consumer`], [`Client::delete_consumer`]).
//!
//! See `FlowPolicy`, `SubscribeRequest` and the `Ack` call in `proto/switchboard/v1/broker.proto`
//! for what the broker does with each setting.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::{
    AckRequest, AckResponse, ConsumerInfo, DeleteConsumerRequest, GetConsumerRequest,
    ListConsumersRequest, ListSubscriptionsRequest, SubscriptionInfo,
};
use switchboard_proto::Reason;
use tokio::sync::watch;
use tracing::Instrument;

use crate::bearer::AuthChannel;
use crate::client::Client;
use crate::error::Error;

/// What a subscription does when its consumer falls behind (`FlowPolicy` in the contract).
///
/// Its text form ([`FlowPolicy::name`], `Display` and `FromStr`) is `lossless`, `conflate` or
/// `drop-oldest`.
///
/// ```
/// use switchboard_client::FlowPolicy;
///
/// let policy: FlowPolicy = "drop-oldest".parse()?;
/// assert_eq!(policy, FlowPolicy::DropOldest);
/// assert_eq!(policy.to_string(), "drop-oldest");
/// # Ok::<(), switchboard_client::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlowPolicy {
    /// Every matching message, in offset order, however slow the consumer (the broker serves a
    /// consumer that fell behind from its store). The default.
    #[default]
    Lossless,
    /// When behind, only the latest message of each channel is delivered;
    /// [`Message::skipped`](crate::Message::skipped) says how many earlier ones were left out.
    Conflate,
    /// A consumer further behind than its window skips the oldest messages, and every skip is
    /// announced by a [`Gap`](crate::Gap) (see [`Subscription::events`](crate::Subscription::events)).
    DropOldest,
}

impl FlowPolicy {
    /// The policy's text form: `lossless`, `conflate` or `drop-oldest`.
    pub fn name(self) -> &'static str {
        match self {
            FlowPolicy::Lossless => "lossless",
            FlowPolicy::Conflate => "conflate",
            FlowPolicy::DropOldest => "drop-oldest",
        }
    }

    /// The policy of a `FlowPolicy` field as the broker sent it (for example
    /// [`ConsumerInfo::policy`](crate::ConsumerInfo)): `UNSPECIFIED` is [`FlowPolicy::Lossless`],
    /// as the contract says; `None` for a value this client does not know.
    pub fn from_proto(value: i32) -> Option<FlowPolicy> {
        use switchboard_proto::v1::FlowPolicy as Proto;
        match Proto::try_from(value).ok()? {
            Proto::Unspecified | Proto::Lossless => Some(FlowPolicy::Lossless),
            Proto::Conflate => Some(FlowPolicy::Conflate),
            Proto::DropOldest => Some(FlowPolicy::DropOldest),
        }
    }
}

impl From<FlowPolicy> for switchboard_proto::v1::FlowPolicy {
    fn from(policy: FlowPolicy) -> Self {
        match policy {
            FlowPolicy::Lossless => switchboard_proto::v1::FlowPolicy::Lossless,
            FlowPolicy::Conflate => switchboard_proto::v1::FlowPolicy::Conflate,
            FlowPolicy::DropOldest => switchboard_proto::v1::FlowPolicy::DropOldest,
        }
    }
}

impl fmt::Display for FlowPolicy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for FlowPolicy {
    type Err = Error;

    /// `lossless`, `conflate` or `drop-oldest` (also `drop_oldest`), in any case.
    fn from_str(text: &str) -> Result<FlowPolicy, Error> {
        match text.trim().to_ascii_lowercase().as_str() {
            "lossless" => Ok(FlowPolicy::Lossless),
            "conflate" => Ok(FlowPolicy::Conflate),
            "drop-oldest" | "drop_oldest" => Ok(FlowPolicy::DropOldest),
            _ => Err(Error::InvalidArgument(format!(
                "expected lossless, conflate or drop-oldest; got {text:?}"
            ))),
        }
    }
}

/// Where a subscription's `Subscribe` call stands, shared by its task and its [`Acker`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    /// Live, with the `subscription_id` of its `Subscribed` event (0 when the broker gave none).
    Live(u64),
    /// The stream broke; the subscription is subscribing again.
    Resuming,
    /// The subscription ended, or was dropped.
    Ended,
}

/// Acknowledges the deliveries of one [`Subscription`](crate::Subscription), from anywhere: a
/// cheap clone, usable while the subscription is being read (from
/// [`Subscription::acker`](crate::Subscription::acker)).
///
/// Acknowledgements go out with the subscription's *current* id, which changes when it resumes
/// after a lost connection; while it is resuming, an acknowledgement waits until it is live
/// again. They return credits (`max_unacked`) and, for a durable consumer, advance its
/// acknowledged offset. A durable consumer's broker redelivers what is not acknowledged within
/// the ack timeout, so an acknowledgement lost with a connection is not fatal: the delivery comes
/// again (with a non-zero [`Message::redelivery`](crate::Message::redelivery)).
#[derive(Clone, Debug)]
pub struct Acker {
    grpc: BrokerClient<AuthChannel>,
    link: watch::Receiver<Link>,
    /// The subscription's pattern, named by the acknowledgements' spans.
    pattern: Arc<str>,
    /// The durable consumer's name, if any, for the same spans.
    durable: Option<Arc<str>>,
}

impl Acker {
    pub(crate) fn new(grpc: BrokerClient<AuthChannel>, link: watch::Receiver<Link>) -> Acker {
        Acker {
            grpc,
            link,
            pattern: Arc::from(""),
            durable: None,
        }
    }

    /// The subscription's pattern and durable name, for the spans of its acknowledgements.
    pub(crate) fn described(mut self, pattern: &str, durable: Option<&str>) -> Acker {
        self.pattern = Arc::from(pattern);
        self.durable = durable.map(Arc::from);
        self
    }

    /// The subscription's current id (from its latest `Subscribed` event): `None` while it is
    /// resuming, after it ended, or when the broker gave none.
    pub fn subscription_id(&self) -> Option<u64> {
        match *self.link.borrow() {
            Link::Live(id) if id > 0 => Some(id),
            _ => None,
        }
    }

    /// Acknowledges the delivery at `offset`; see [`Acker::ack_many`].
    ///
    /// # Errors
    /// As [`Acker::ack_many`].
    ///
    /// # Example
    /// ```no_run
    /// use futures::StreamExt;
    /// use switchboard_client::{Client, Start, SubscribeOptions};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let options = SubscribeOptions::default().durable("billing").max_unacked(100);
    /// let mut subscription = client.subscribe_with("orders.>", Start::Earliest, options).await?;
    /// let acker = subscription.acker();
    /// while let Some(message) = subscription.next().await {
    ///     let message = message?;
    ///     let acker = acker.clone();
    ///     tokio::spawn(async move {
    ///         // ... handle the message, then:
    ///         let _ = acker.ack(message.offset).await;
    ///     });
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ack(&self, offset: u64) -> Result<AckResponse, Error> {
        self.ack_many(&[offset]).await
    }

    /// Acknowledges the deliveries at `offsets` with the subscription's current id, waiting first
    /// if it is resuming, and returns the broker's answer: the deliveries still pending and, for
    /// a durable consumer, its acknowledged offset now.
    ///
    /// If the broker no longer knows the id because the subscription resumed meanwhile
    /// (`NOT_FOUND SUBSCRIPTION_NOT_FOUND`), the acknowledgement is sent again once with the new
    /// id.
    ///
    /// # Errors
    /// [`Error::Status`] `FAILED_PRECONDITION` (not transient) when the subscription has ended or
    /// the broker gave it no id; otherwise the `Ack` call's error (for example `NOT_FOUND
    /// SUBSCRIPTION_NOT_FOUND`, or `UNAVAILABLE` when the connection is lost).
    pub async fn ack_many(&self, offsets: &[u64]) -> Result<AckResponse, Error> {
        let span = crate::trace::settle_span(&self.pattern, self.durable.as_deref(), offsets);
        let outcome = self.send_acks(offsets).instrument(span.clone()).await;
        if let Err(error) = &outcome {
            crate::trace::failed(&span, error);
        }
        outcome
    }

    /// The `Ack` calls of [`Acker::ack_many`], under its span.
    async fn send_acks(&self, offsets: &[u64]) -> Result<AckResponse, Error> {
        let mut retried = false;
        loop {
            let subscription_id = self.live_id().await?;
            let request = AckRequest {
                subscription_id,
                offsets: offsets.to_vec(),
            };
            match self.grpc.clone().ack(request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => {
                    let error = Error::from(status);
                    let moved_on = *self.link.borrow() != Link::Live(subscription_id);
                    if retried || !moved_on || error.reason() != Some(Reason::SubscriptionNotFound)
                    {
                        return Err(error);
                    }
                    retried = true;
                }
            }
        }
    }

    /// The id of the live subscription, waiting while it resumes.
    async fn live_id(&self) -> Result<u64, Error> {
        let mut link = self.link.clone();
        loop {
            let current = *link.borrow_and_update();
            match current {
                Link::Ended => return Err(not_acknowledgeable("the subscription has ended")),
                Link::Live(0) => {
                    return Err(not_acknowledgeable(
                        "the broker gave this subscription no id to acknowledge with",
                    ))
                }
                Link::Live(id) => return Ok(id),
                Link::Resuming => {}
            }
            if link.changed().await.is_err() {
                return Err(not_acknowledgeable("the subscription has ended"));
            }
        }
    }
}

fn not_acknowledgeable(message: &str) -> Error {
    Error::Status {
        code: tonic::Code::FailedPrecondition,
        reason: None,
        message: format!("cannot acknowledge: {message}"),
        metadata: Default::default(),
    }
}

/// `name` unless it is empty; `what` names it in the error.
fn non_empty(name: String, what: &str) -> Result<String, Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("the {what} is empty")));
    }
    Ok(name)
}

impl Client {
    /// Lists the subscriptions live on the broker node this client is connected to, with their
    /// flow state and buffer accounting (every field of `SubscriptionInfo`).
    ///
    /// # Errors
    /// [`Error::Status`] when the call fails.
    ///
    /// # Example
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> Result<(), switchboard_client::Error> {
    /// for info in client.list_subscriptions().await? {
    ///     println!("{} {} lagging={} pending={}", info.subscription_id, info.pattern, info.lagging, info.pending);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_subscriptions(&self) -> Result<Vec<SubscriptionInfo>, Error> {
        let response = self
            .grpc()
            .list_subscriptions(ListSubscriptionsRequest {})
            .await?;
        Ok(response.into_inner().subscriptions)
    }

    /// Lists the broker's durable consumers.
    ///
    /// # Errors
    /// [`Error::Status`] when the call fails.
    ///
    /// # Example
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> Result<(), switchboard_client::Error> {
    /// for consumer in client.list_consumers().await? {
    ///     println!("{} acked up to {}", consumer.name, consumer.acked_offset);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_consumers(&self) -> Result<Vec<ConsumerInfo>, Error> {
        let response = self.grpc().list_consumers(ListConsumersRequest {}).await?;
        Ok(response.into_inner().consumers)
    }

    /// Describes the durable consumer `name`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty name; [`Error::Status`] when the broker refuses
    /// (for example `NOT_FOUND CONSUMER_NOT_FOUND`) or the call fails.
    ///
    /// # Example
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> Result<(), switchboard_client::Error> {
    /// let consumer = client.consumer("billing").await?;
    /// println!("{} pending, connected: {}", consumer.pending, consumer.connected);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn consumer(&self, name: impl Into<String>) -> Result<ConsumerInfo, Error> {
        let name = non_empty(name.into(), "consumer name")?;
        let response = self
            .grpc()
            .get_consumer(GetConsumerRequest { name })
            .await?;
        Ok(response.into_inner())
    }

    /// Deletes the durable consumer `name` and its acknowledged offset; a subscription connected
    /// with that name ends.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty name; [`Error::Status`] when the broker refuses
    /// (for example `NOT_FOUND CONSUMER_NOT_FOUND`) or the call fails.
    ///
    /// # Example
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> Result<(), switchboard_client::Error> {
    /// client.delete_consumer("billing").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_consumer(&self, name: impl Into<String>) -> Result<(), Error> {
        let name = non_empty(name.into(), "consumer name")?;
        self.grpc()
            .delete_consumer(DeleteConsumerRequest { name })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::v1::FlowPolicy as Proto;

    #[test]
    fn policies_parse_print_and_convert() {
        for policy in [
            FlowPolicy::Lossless,
            FlowPolicy::Conflate,
            FlowPolicy::DropOldest,
        ] {
            assert_eq!(policy.name().parse::<FlowPolicy>().unwrap(), policy);
            assert_eq!(
                FlowPolicy::from_proto(Proto::from(policy) as i32),
                Some(policy)
            );
        }
        assert_eq!(
            "DROP_OLDEST".parse::<FlowPolicy>().unwrap(),
            FlowPolicy::DropOldest
        );
        assert!(matches!(
            "fast".parse::<FlowPolicy>(),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(FlowPolicy::from_proto(0), Some(FlowPolicy::Lossless));
        assert_eq!(FlowPolicy::from_proto(42), None);
        assert_eq!(FlowPolicy::default(), FlowPolicy::Lossless);
    }

    #[tokio::test]
    async fn acker_waits_while_resuming_and_fails_once_ended() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let (sender, link) = watch::channel(Link::Live(7));
        let acker = Acker::new(BrokerClient::new(AuthChannel::new(channel, None)), link);
        assert_eq!(acker.subscription_id(), Some(7));
        assert_eq!(acker.live_id().await.unwrap(), 7);

        sender.send_replace(Link::Resuming);
        assert_eq!(acker.subscription_id(), None);
        let waiting = {
            let acker = acker.clone();
            tokio::spawn(async move { acker.live_id().await })
        };
        tokio::task::yield_now().await;
        sender.send_replace(Link::Live(8));
        assert_eq!(waiting.await.unwrap().unwrap(), 8);

        sender.send_replace(Link::Live(0));
        let none = acker.live_id().await.unwrap_err();
        assert_eq!(none.code(), tonic::Code::FailedPrecondition);
        assert!(!none.is_transient());

        sender.send_replace(Link::Resuming);
        let waiting = {
            let acker = acker.clone();
            tokio::spawn(async move { acker.live_id().await })
        };
        tokio::task::yield_now().await;
        sender.send_replace(Link::Ended);
        let ended = waiting.await.unwrap().unwrap_err();
        assert_eq!(
            ended.to_string(),
            "FAILED_PRECONDITION: cannot acknowledge: the subscription has ended"
        );
        assert_eq!(acker.subscription_id(), None);
    }
}
