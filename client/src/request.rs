//! Request/reply over ephemeral messages (docs/FLOW.md#request-and-reply).
//!
//! A convention, not a broker feature: the requester subscribes to a fresh inbox channel of its
//! own (`_inbox.<uuid>`), then publishes the request as an ephemeral message with a
//! [`REPLY_TO`] header naming that inbox and a correlation id; a responder, subscribed to the
//! request's channel, publishes its answer as an ephemeral message to the inbox with the same
//! correlation id ([`reply_to`]). Nothing is stored, so it carries what ephemeral messages
//! promise: at most once, to subscriptions live at that moment. A request nobody answered in time
//! is [`Error::NoReply`], whether no responder was subscribed, the request or the reply was
//! dropped, or the responder was slow; every responder subscribed receives the request, and the
//! first reply wins.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use switchboard_proto::v1::Message;

use crate::{Client, Error, Publish, Start, SubscribeOptions};

/// The header naming the channel a request's reply goes to.
pub const REPLY_TO: &str = "reply-to";
/// The first segment of inbox channels. [`reply_to`] answers only to channels under it, so that
/// a request cannot make a responder publish, with the responder's grants, wherever it likes.
pub const INBOX_PREFIX: &str = "_inbox";

impl Client {
    /// Sends `request` as an ephemeral message with a [`REPLY_TO`] header naming a fresh inbox
    /// channel, subscribed to first, and returns the first reply with the request's correlation
    /// id (one is generated when it has none) within `timeout`.
    ///
    /// The inbox subscription lives for this call only: one stream per request, which suits
    /// occasional requests (a command line, a health probe) rather than thousands a second.
    ///
    /// # Errors
    /// [`Error::NoReply`] when no reply came within `timeout`; the subscribe or publish error
    /// (for example `PERMISSION_DENIED` without a grant to subscribe to `_inbox.>`, or a refused
    /// request).
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use switchboard_client::{Client, Publish};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let reply = client
    ///     .request(Publish::new("crm.lookup.contact", r#"{"phone":"555-0100"}"#), Duration::from_secs(2))
    ///     .await?;
    /// println!("{}", String::from_utf8_lossy(&reply.payload));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn request(&self, request: Publish, timeout: Duration) -> Result<Message, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let inbox = format!("{INBOX_PREFIX}.{}", uuid::Uuid::new_v4().simple());
        let no_reply = || Error::NoReply {
            channel: request.channel().to_owned(),
            timeout,
        };
        let options = SubscribeOptions::default().exclude_ephemeral(false);
        let mut replies = tokio::time::timeout_at(
            deadline,
            self.subscribe_with(inbox.as_str(), Start::Latest, options),
        )
        .await
        .map_err(|_| no_reply())??;

        let mut message = request.clone().ephemeral().into_request();
        message.headers.insert(REPLY_TO.to_owned(), inbox);
        if message.correlation_id.is_empty() {
            message.correlation_id = uuid::Uuid::new_v4().to_string();
        }
        let correlation_id = message.correlation_id.clone();
        tokio::time::timeout_at(deadline, self.publish(message))
            .await
            .map_err(|_| no_reply())??;

        loop {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(Ok(reply))) if reply.correlation_id == correlation_id => return Ok(reply),
                // Something else published to the inbox: not the answer.
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => return Err(error),
                Ok(None) | Err(_) => return Err(no_reply()),
            }
        }
    }
}

/// The reply to `request` with `payload`: an ephemeral message to its [`REPLY_TO`] channel with
/// its correlation id and one hop more (so the broker's loop limit applies to chains of
/// requests). `None` when the message asks for no reply, or names a channel outside
/// `_inbox.…`. Set its content type as for any message (JSON unless said otherwise).
pub fn reply_to(request: &Message, payload: impl Into<Bytes>) -> Option<Publish> {
    let channel = request.headers.get(REPLY_TO)?;
    let inbox = channel
        .strip_prefix(INBOX_PREFIX)
        .is_some_and(|rest| rest.starts_with('.'));
    inbox.then(|| {
        Publish::new(channel.clone(), payload)
            .ephemeral()
            .correlation_id(request.correlation_id.clone())
            .hops(request.hops.saturating_add(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(reply_to: Option<&str>) -> Message {
        let mut message = Message {
            channel: "svc.echo".into(),
            correlation_id: "c-1".into(),
            hops: 2,
            ..Message::default()
        };
        if let Some(channel) = reply_to {
            message.headers.insert(REPLY_TO.into(), channel.into());
        }
        message
    }

    #[test]
    fn a_reply_goes_to_the_inbox_with_the_correlation_id_and_one_more_hop() {
        let reply = reply_to(&request(Some("_inbox.abc")), "ok")
            .map(Publish::into_request)
            .unwrap_or_default();
        assert_eq!(reply.channel, "_inbox.abc");
        assert_eq!(reply.correlation_id, "c-1");
        assert_eq!(reply.hops, 3);
        assert!(reply.ephemeral);
    }

    #[test]
    fn no_reply_is_made_outside_the_inboxes_or_when_none_is_asked() {
        assert!(reply_to(&request(None), "x").is_none());
        assert!(reply_to(&request(Some("crm.contact.deleted")), "x").is_none());
        assert!(reply_to(&request(Some("_inboxes.x")), "x").is_none());
    }
}
