//! Server-Sent Events: `GET /v1/subscribe` and `GET /v1/entities/watch` (and the framing that
//! `GET /v1/kpis/{view}/watch` in [`super::kpis`] shares).
//!
//! A subscription's message events carry their offset as the event id. A browser's `EventSource`
//! sends the last id it saw as `Last-Event-ID` when it reconnects (a reloaded page can pass it as
//! `?last_event_id=`), and the stream then starts at the next offset: no gap, no duplicate. A gap
//! event carries the last skipped offset as its id, so a resume does not ask for it again.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_server::Broker as BrokerRpc;
use switchboard_proto::v1::entities_server::Entities as EntitiesRpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::error::HttpError;
use super::query::Query;
use super::{grpc_request, json, Gateway};
use crate::error::{BrokerError, Reason};

/// Frames buffered per stream before the task waits for the client to read.
const SSE_BUFFER: usize = 64;
/// How long a browser waits before reconnecting a dropped stream, in milliseconds.
const RECONNECT_MS: u32 = 2000;
/// The most messages the gateway's subscription takes in one event (`max_batch`): a batch
/// becomes that many SSE events written to the body at once, one write instead of one per
/// message when the browser is behind.
const SSE_MAX_BATCH: u32 = 64;

fn flow_policy(query: &Query) -> Result<i32, BrokerError> {
    let policy = match query.get("policy").unwrap_or("") {
        "" | "lossless" | "LOSSLESS" => pb::FlowPolicy::Lossless,
        "drop_oldest" | "DROP_OLDEST" => pb::FlowPolicy::DropOldest,
        "conflate" | "CONFLATE" => pb::FlowPolicy::Conflate,
        other => {
            return Err(BrokerError::invalid(
                Reason::PolicyInvalid,
                format!("policy must be lossless, drop_oldest or conflate, got {other:?}"),
            ))
        }
    };
    Ok(policy as i32)
}

/// One SSE frame. `data` is one line of JSON (serde_json writes no raw newlines).
pub(super) fn frame(event: Option<&str>, id: Option<u64>, data: &Value) -> Bytes {
    let mut out = String::new();
    if let Some(event) = event {
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    out.push_str("data: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
    Bytes::from(out)
}

/// A gap's reason as docs/FLOW.md spells it: `DROPPED`, `RETENTION` (the protobuf enum's names
/// without their `REASON_` prefix).
fn gap_reason(reason: i32) -> &'static str {
    let name = pb::gap::Reason::try_from(reason)
        .unwrap_or(pb::gap::Reason::Unspecified)
        .as_str_name();
    name.strip_prefix("REASON_").unwrap_or(name)
}

/// A message's SSE event. An ephemeral message has no offset to resume after: it sets no event
/// id, so a reconnecting `EventSource` still resumes after the last stored message.
fn message_frame(message: &pb::Message) -> Bytes {
    let id = (!message.ephemeral).then_some(message.offset);
    frame(None, id, &json::message(message))
}

fn subscribe_frame(event: pb::SubscribeEvent) -> Option<Bytes> {
    use pb::subscribe_event::Event;
    match event.event? {
        Event::Subscribed(s) => Some(frame(
            Some("subscribed"),
            None,
            &json!({ "next_offset": s.next_offset, "subscription_id": s.subscription_id }),
        )),
        Event::Message(message) => Some(message_frame(&message)),
        // One SSE event per message still, all in one chunk of the body.
        Event::Batch(batch) => {
            let mut frames = Vec::new();
            for message in &batch.messages {
                frames.extend_from_slice(&message_frame(message));
            }
            (!frames.is_empty()).then(|| Bytes::from(frames))
        }
        Event::Gap(gap) => {
            let reason = gap_reason(gap.reason);
            Some(frame(
                Some("gap"),
                Some(gap.to_offset),
                &json!({
                    "from_offset": gap.from_offset,
                    "to_offset": gap.to_offset,
                    "count": gap.count,
                    "reason": reason,
                }),
            ))
        }
    }
}

fn watch_frame(event: pb::EntityEvent) -> Option<Bytes> {
    use pb::entity_event::Event;
    match event.event? {
        Event::Snapshot(entity) => Some(frame(Some("snapshot"), None, &json::entity(&entity))),
        Event::SnapshotComplete(done) => Some(frame(
            Some("snapshot_complete"),
            None,
            &json!({ "entities": done.entities }),
        )),
        Event::Change(entity) => Some(frame(Some("change"), None, &json::entity(&entity))),
    }
}

/// Streams `events` as SSE, with a comment line every `heartbeat` while idle. A stream that ends
/// with an error (the token expired, shutdown) sends it as an `error` event first. The task ends
/// when the client goes away, which ends the subscription.
pub(super) fn event_stream<S, T>(
    events: S,
    to_frame: fn(T) -> Option<Bytes>,
    heartbeat: Duration,
) -> Response
where
    S: Stream<Item = Result<T, Status>> + Send + Unpin + 'static,
    T: Send + 'static,
{
    let (out, frames) = mpsc::channel::<Result<Bytes, Infallible>>(SSE_BUFFER);
    tokio::spawn(async move {
        let mut events = events;
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        if out
            .send(Ok(Bytes::from(format!("retry: {RECONNECT_MS}\n\n"))))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let bytes = tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => match to_frame(event) {
                        Some(bytes) => bytes,
                        None => continue,
                    },
                    Some(Err(status)) => {
                        let (_, body, _) = HttpError::from(status).parts();
                        let _ = out.send(Ok(frame(Some("error"), None, &body))).await;
                        return;
                    }
                    None => return,
                },
                _ = tick.tick() => Bytes::from_static(b": keep-alive\n\n"),
                _ = out.closed() => return,
            };
            if out.send(Ok(bytes)).await.is_err() {
                return;
            }
            tick.reset();
        }
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(frames)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `GET /v1/subscribe?pattern=&policy=&min_interval_ms=&window=&start=&last_event_id=`.
pub(super) async fn subscribe(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let query = Query::parse(parts.uri.query());
    let caller = gateway.caller(&parts, query.get("access_token"))?;
    // The header is what EventSource sends on its own reconnects, so it is the newest; the
    // parameter serves a reloaded page, which starts a fresh EventSource.
    let last_event_id = match parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        Some(header) => Some(header.parse::<u64>().map_err(|_| {
            BrokerError::invalid(
                Reason::StartInvalid,
                format!("Last-Event-ID must be an offset, got {header:?}"),
            )
        })?),
        None => query.number::<u64>("last_event_id", Reason::StartInvalid)?,
    };
    use pb::start_position::Position;
    let start = match (last_event_id, query.get("start").unwrap_or("")) {
        (Some(offset), _) => Some(Position::Offset(offset.saturating_add(1))),
        (None, "" | "latest") => None,
        (None, "earliest") => Some(Position::Earliest(pb::Earliest {})),
        (None, other) => Some(Position::Offset(other.parse().map_err(|_| {
            BrokerError::invalid(
                Reason::StartInvalid,
                format!("start must be latest, earliest or an offset, got {other:?}"),
            )
        })?)),
    };
    let subscribe = pb::SubscribeRequest {
        pattern: query.get("pattern").unwrap_or("").to_owned(),
        start: start.map(|position| pb::StartPosition {
            position: Some(position),
        }),
        policy: flow_policy(&query)?,
        window: query.number("window", Reason::PolicyInvalid)?.unwrap_or(0),
        min_interval_ms: query
            .number("min_interval_ms", Reason::PolicyInvalid)?
            .unwrap_or(0),
        max_batch: SSE_MAX_BATCH,
        ..Default::default()
    };
    let events = gateway
        .inner
        .broker
        .subscribe(grpc_request(&parts.headers, caller, subscribe))
        .await?
        .into_inner();
    Ok(event_stream(
        events,
        subscribe_frame,
        gateway.inner.heartbeat,
    ))
}

/// `GET /v1/entities/watch?pattern=&policy=&min_interval_ms=`: a snapshot of the matching
/// entities, then their changes.
pub(super) async fn watch(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let query = Query::parse(parts.uri.query());
    let caller = gateway.caller(&parts, query.get("access_token"))?;
    let watch = pb::WatchEntitiesRequest {
        pattern: query.get("pattern").unwrap_or("").to_owned(),
        policy: flow_policy(&query)?,
        min_interval_ms: query
            .number("min_interval_ms", Reason::PolicyInvalid)?
            .unwrap_or(0),
    };
    let events = gateway
        .inner
        .entities
        .watch_entities(grpc_request(&parts.headers, caller, watch))
        .await?
        .into_inner();
    Ok(event_stream(events, watch_frame, gateway.inner.heartbeat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_reasons_are_spelled_as_flow_md_says() {
        assert_eq!(gap_reason(pb::gap::Reason::Dropped as i32), "DROPPED");
        assert_eq!(gap_reason(pb::gap::Reason::Retention as i32), "RETENTION");
        assert_eq!(gap_reason(99), "UNSPECIFIED");
        let gap = pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Gap(pb::Gap {
                from_offset: 3,
                to_offset: 5,
                count: 2,
                reason: pb::gap::Reason::Dropped as i32,
            })),
        };
        let frame = subscribe_frame(gap).unwrap();
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(text.contains(r#""reason":"DROPPED""#), "{text}");
    }

    #[test]
    fn a_batch_is_one_chunk_of_one_event_per_message() {
        let message = |offset, ephemeral| pb::Message {
            offset,
            channel: "a.b".into(),
            ephemeral,
            ..Default::default()
        };
        let batch = pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Batch(pb::MessageBatch {
                messages: vec![message(7, false), message(0, true), message(8, false)],
            })),
        };
        let chunk = subscribe_frame(batch).unwrap();
        let expected: Vec<u8> = [message(7, false), message(0, true), message(8, false)]
            .iter()
            .flat_map(|m| message_frame(m).to_vec())
            .collect();
        assert_eq!(chunk.as_ref(), expected.as_slice());
        let text = std::str::from_utf8(&chunk).unwrap();
        assert_eq!(text.matches("data: ").count(), 3, "{text}");
        assert_eq!(text.matches("id: ").count(), 2, "{text}");
        assert!(text.find("id: 7\n").unwrap() < text.find("id: 8\n").unwrap());
    }
}
