//! Loop detection: a publish made while handling a delivery names its cause (`causation_id`, the
//! cause's offset); apply follows the cause, when the broker still holds it and it is recent,
//! to the chain of channels that led here. A publish that would enter a channel already on its
//! chain, or that has gone more hops than allowed, is refused (`LOOP_DETECTED`) and reported on
//! [`LOOP_CHANNEL`]. Deterministic: it uses only the log (the cause's stored chain and the
//! leader's stamp), so every replica refuses the same publishes.

use crate::message::{NewMessage, Rules, StoredMessage};

/// The reserved channel on which the broker reports refused publish loops.
pub(crate) const LOOP_CHANNEL: &str = "$sys.loop.detected";

/// A publish that would loop: why, and the report to publish on [`LOOP_CHANNEL`].
pub(crate) struct Detected {
    /// What the refusal says.
    pub detail: String,
    /// The message reporting it.
    pub report: NewMessage,
}

/// The causal chain `message` extends — the channels its cause passed through, then the cause's
/// own — raising its hop count past its cause's; or the loop it would make. `cause` counts only
/// while it is within the loop window of `now_us`.
///
/// # Errors
/// [`Detected`] when the message would re-enter a channel on its chain or exceed the hop limit.
pub(crate) fn chain(
    message: &mut NewMessage,
    cause: Option<&StoredMessage>,
    now_us: u64,
    rules: &Rules,
) -> Result<Vec<String>, Box<Detected>> {
    let mut chain = Vec::new();
    if let Some(cause) =
        cause.filter(|c| now_us.saturating_sub(c.publish_time_us) <= rules.loop_window_us)
    {
        chain = cause.chain.clone();
        chain.push(cause.message.channel.clone());
        message.hops = message.hops.max(cause.message.hops.saturating_add(1));
    }
    let reentry = chain.contains(&message.channel);
    if !reentry && message.hops <= rules.max_hops {
        return Ok(chain);
    }
    let detail = if reentry {
        format!(
            "the causal chain already passed through {:?} (chain: {})",
            message.channel,
            chain.join(" -> ")
        )
    } else {
        format!(
            "{} hops exceed the limit of {}",
            message.hops, rules.max_hops
        )
    };
    let report = serde_json::json!({
        "channel": message.channel,
        "correlation_id": message.correlation_id,
        "causation_id": message.causation_id,
        "hops": message.hops,
        "chain": chain,
        "detail": detail,
    });
    Err(Box::new(Detected {
        report: NewMessage::system(LOOP_CHANNEL.to_owned(), report.to_string()),
        detail,
    }))
}
