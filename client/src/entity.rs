//! Shared entity state: [`EntityUpdate`] and [`EntityDelete`] (with [`Client::update_entity`] and
//! [`Client::delete_entity`]), [`Client::get_entity`] and its [`EntityRead`], the
//! [`EntityWatch`] of [`Client::watch_entities`] with its [`EntityEvent`]s, and [`EntityExt`] to
//! read an [`Entity`]'s fields as JSON.
//!
//! An entity (a contact, a conversation's context, ...) is a JSON object whose fields many writers
//! edit. Every write carries a *stamp*, `(timestamp_ms, version, writer)`, compared in that order;
//! the broker keeps, field by field, the value of the write with the greatest stamp, so concurrent
//! edits of different fields both survive and every node converges on the same fields whatever
//! the order the writes arrive in. The contract is `proto/switchboard/v1/entity.proto`.
//!
//! A write without a stamp of its own is stamped by the [`Client`]: the current time in
//! milliseconds, version 0 (or one more than the previous stamp when this client already stamped
//! a write in the same millisecond, or its clock went back), and the client's
//! [writer id](Client::writer_id).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use switchboard_proto::v1::{
    entity_event, DeleteEntityRequest, Entity, EntityKey, GetEntityRequest, UpdateEntityRequest,
    WatchEntitiesRequest, WriteStamp,
};
use tonic::codec::Streaming;

use crate::auth::TokenCache;
use crate::bearer::TokenUsed;
use crate::client::Client;
use crate::error::Error;

/// The current time as Unix milliseconds (0 before 1970, saturating far in the future).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The clock a [`Client`] stamps writes with: `(timestamp_ms, version)` pairs that strictly
/// increase, even for writes in the same millisecond or when the system clock goes back.
#[derive(Debug, Default)]
pub(crate) struct StampClock {
    last: Option<(u64, u64)>,
}

impl StampClock {
    /// The next stamp at time `now_ms`: `(now_ms, 0)` when the time moved past the last stamp,
    /// else the last stamp's time with its version + 1.
    pub(crate) fn next(&mut self, now_ms: u64) -> (u64, u64) {
        let next = match self.last {
            Some((last_ms, version)) if now_ms <= last_ms => (last_ms, version.saturating_add(1)),
            _ => (now_ms, 0),
        };
        self.last = Some(next);
        next
    }
}

/// The stamp options shared by [`EntityUpdate`] and [`EntityDelete`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct StampOptions {
    /// `(timestamp_ms, version)`; `None` for the client's clock.
    time: Option<(u64, u64)>,
    /// `None` for the client's writer id.
    writer: Option<String>,
    expected_version: Option<u64>,
}

impl StampOptions {
    fn stamp(&self, client: &Client) -> WriteStamp {
        match self.time {
            Some((timestamp_ms, version)) => WriteStamp {
                timestamp_ms,
                version,
                writer: self
                    .writer
                    .clone()
                    .unwrap_or_else(|| client.writer_id().to_owned()),
            },
            None => client.next_stamp(self.writer.as_deref()),
        }
    }
}

fn key(entity_type: impl Into<String>, id: impl Into<String>) -> EntityKey {
    EntityKey {
        r#type: entity_type.into(),
        id: id.into(),
    }
}

/// A write of some of an entity's fields, for [`Client::update_entity`].
///
/// Only the fields named are written; a field set to JSON `null` is kept, with the value `null`.
///
/// Every write carries a *stamp*, `(timestamp_ms, version, writer)`, compared in that order (the
/// writer id as bytes); the broker keeps, field by field, the value of the write with the greatest
/// stamp. Without [`EntityUpdate::stamp`], the [`Client`] stamps the write: the current time in
/// Unix milliseconds, version 0 (or one more than its previous stamp when it already stamped a
/// write in the same millisecond, or its clock went back, so one client's writes always
/// increase), and [`EntityUpdate::writer`] or else the client's [`Client::writer_id`].
///
/// ```
/// use serde_json::json;
/// use switchboard_client::EntityUpdate;
///
/// let update = EntityUpdate::new("contact", "42", json!({"name": "Ada", "phone": null}))
///     .writer("panel-7")
///     .expect_version(3);
/// assert_eq!((update.entity_type(), update.id()), ("contact", "42"));
/// assert_eq!(update.fields()["name"], "Ada");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct EntityUpdate {
    key: EntityKey,
    fields: serde_json::Value,
    options: StampOptions,
}

impl EntityUpdate {
    /// Writes `fields`, which must be a JSON object with at least one field (field name → new
    /// value), into the entity `entity_type`/`id` (for example `contact`/`42`; each one channel
    /// segment, `[A-Za-z0-9_-]`, at most 64 bytes). The entity is created when new.
    pub fn new(
        entity_type: impl Into<String>,
        id: impl Into<String>,
        fields: serde_json::Value,
    ) -> EntityUpdate {
        EntityUpdate {
            key: key(entity_type, id),
            fields,
            options: StampOptions::default(),
        }
    }

    /// Stamps the write explicitly: the writer's clock in Unix milliseconds (at most
    /// `entities.max_clock_skew`, 60 s by default, ahead of the broker's clock), the writer's own
    /// counter breaking ties within a millisecond, and the writer id (not empty, at most 128
    /// bytes). Without it, the client stamps the write.
    pub fn stamp(mut self, timestamp_ms: u64, version: u64, writer: impl Into<String>) -> Self {
        self.options.time = Some((timestamp_ms, version));
        self.options.writer = Some(writer.into());
        self
    }

    /// Sets only the writer id of the stamp, leaving the time and version to the client's clock
    /// (or to an earlier [`EntityUpdate::stamp`]). Default: the client's
    /// [`Client::writer_id`].
    pub fn writer(mut self, writer: impl Into<String>) -> Self {
        self.options.writer = Some(writer.into());
        self
    }

    /// Applies the write only if the entity's current version is `version` (compare-and-set); 0
    /// means "only if the entity does not exist yet". Otherwise the broker refuses it with
    /// `ABORTED VERSION_CONFLICT` (see [`Error::current_version`]).
    pub fn expect_version(mut self, version: u64) -> Self {
        self.options.expected_version = Some(version);
        self
    }

    /// The entity's type.
    pub fn entity_type(&self) -> &str {
        &self.key.r#type
    }

    /// The entity's id.
    pub fn id(&self) -> &str {
        &self.key.id
    }

    /// The fields written.
    pub fn fields(&self) -> &serde_json::Value {
        &self.fields
    }

    /// The version set with [`EntityUpdate::expect_version`].
    pub fn expected_version(&self) -> Option<u64> {
        self.options.expected_version
    }

    /// The request this write is sent as, stamped by `client` unless it carries its own stamp.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the fields are not a JSON object.
    pub fn to_request(&self, client: &Client) -> Result<UpdateEntityRequest, Error> {
        if !self.fields.is_object() {
            return Err(Error::InvalidArgument(format!(
                "the fields of entity {}.{} must be a JSON object, not {}",
                self.key.r#type,
                self.key.id,
                json_kind(&self.fields)
            )));
        }
        let fields = serde_json::to_vec(&self.fields).map_err(|error| {
            Error::InvalidArgument(format!("cannot encode the entity's fields: {error}"))
        })?;
        Ok(UpdateEntityRequest {
            key: Some(self.key.clone()),
            fields: fields.into(),
            stamp: Some(self.options.stamp(client)),
            expected_version: self.options.expected_version,
        })
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A delete of an entity, for [`Client::delete_entity`]: a tombstone stamped like an update, which
/// removes every field whose stamp is smaller.
///
/// ```
/// use switchboard_client::EntityDelete;
///
/// let delete = EntityDelete::new("contact", "42").stamp(1_714_564_800_000, 0, "panel-7");
/// assert_eq!((delete.entity_type(), delete.id()), ("contact", "42"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityDelete {
    key: EntityKey,
    options: StampOptions,
}

impl EntityDelete {
    /// Deletes the entity `entity_type`/`id`.
    pub fn new(entity_type: impl Into<String>, id: impl Into<String>) -> EntityDelete {
        EntityDelete {
            key: key(entity_type, id),
            options: StampOptions::default(),
        }
    }

    /// Stamps the delete explicitly; as [`EntityUpdate::stamp`].
    pub fn stamp(mut self, timestamp_ms: u64, version: u64, writer: impl Into<String>) -> Self {
        self.options.time = Some((timestamp_ms, version));
        self.options.writer = Some(writer.into());
        self
    }

    /// Sets only the writer id of the stamp; as [`EntityUpdate::writer`].
    pub fn writer(mut self, writer: impl Into<String>) -> Self {
        self.options.writer = Some(writer.into());
        self
    }

    /// Deletes only if the entity's current version is `version`; as
    /// [`EntityUpdate::expect_version`].
    pub fn expect_version(mut self, version: u64) -> Self {
        self.options.expected_version = Some(version);
        self
    }

    /// The entity's type.
    pub fn entity_type(&self) -> &str {
        &self.key.r#type
    }

    /// The entity's id.
    pub fn id(&self) -> &str {
        &self.key.id
    }

    /// The version set with [`EntityDelete::expect_version`].
    pub fn expected_version(&self) -> Option<u64> {
        self.options.expected_version
    }

    /// The request this delete is sent as, stamped by `client` unless it carries its own stamp.
    pub fn to_request(&self, client: &Client) -> DeleteEntityRequest {
        DeleteEntityRequest {
            key: Some(self.key.clone()),
            stamp: Some(self.options.stamp(client)),
            expected_version: self.options.expected_version,
        }
    }
}

/// The answer of [`Client::get_entity`].
#[derive(Clone, Debug, PartialEq)]
pub enum EntityRead {
    /// The entity's current state (with a new ETag, when an `if_none_match` was given).
    Modified(Entity),
    /// The `if_none_match` ETag is still current: the entity has not changed since.
    NotModified,
}

impl EntityRead {
    /// The entity read, or `None` when it was not modified.
    pub fn into_entity(self) -> Option<Entity> {
        match self {
            EntityRead::Modified(entity) => Some(entity),
            EntityRead::NotModified => None,
        }
    }
}

/// One event of an [`EntityWatch`].
#[derive(Clone, Debug, PartialEq)]
pub enum EntityEvent {
    /// The current state of one matching entity, during the snapshot that starts every watch.
    Snapshot(Entity),
    /// The snapshot is over, after this many entities: the events that follow are changes.
    SnapshotComplete(u64),
    /// A merged change of a matching entity, in version order per entity.
    Change(Entity),
}

impl EntityEvent {
    /// The entity of a snapshot or change event; `None` for [`EntityEvent::SnapshotComplete`].
    pub fn entity(&self) -> Option<&Entity> {
        match self {
            EntityEvent::Snapshot(entity) | EntityEvent::Change(entity) => Some(entity),
            EntityEvent::SnapshotComplete(_) => None,
        }
    }
}

/// A live watch of the entities matching a pattern: a [`Stream`] of [`EntityEvent`]s, opened
/// with [`Client::watch_entities`].
///
/// It first yields a [`EntityEvent::Snapshot`] of every matching entity, then one
/// [`EntityEvent::SnapshotComplete`], then [`EntityEvent::Change`]s. It does not resume: when
/// the call fails or the broker closes it, it yields that error (a closed stream is
/// `UNAVAILABLE`) and ends. Watch again to go on; the new watch starts over with a fresh
/// snapshot, which holds every entity's current state, so nothing is missed (changes made in
/// between are folded into it). Dropping the watch cancels the call.
#[derive(Debug)]
pub struct EntityWatch {
    events: Box<Streaming<switchboard_proto::v1::EntityEvent>>,
    pattern: String,
    live: bool,
    done: bool,
    /// The client's token cache and the token this watch was opened with, so that the broker
    /// ending the watch for an expired token drops that token and watching again gets a new one.
    tokens: Option<(Arc<TokenCache>, TokenUsed)>,
}

impl EntityWatch {
    /// The pattern this watch follows.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the snapshot is complete, so the events that follow are changes.
    pub fn is_live(&self) -> bool {
        self.live
    }
}

impl Stream for EntityWatch {
    type Item = Result<EntityEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let event = match ready!(self.events.poll_next_unpin(cx)) {
                Some(Ok(event)) => event.event,
                Some(Err(status)) => {
                    self.done = true;
                    let error = Error::from(status);
                    if let Some((tokens, token)) = &self.tokens {
                        if error.is_token_expired() {
                            tokens.refused(&token.0);
                        }
                    }
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Status {
                        code: tonic::Code::Unavailable,
                        reason: None,
                        message: "the broker closed the entity watch".to_owned(),
                        metadata: Default::default(),
                    })));
                }
            };
            let event = match event {
                Some(entity_event::Event::Snapshot(entity)) => EntityEvent::Snapshot(entity),
                Some(entity_event::Event::SnapshotComplete(complete)) => {
                    self.live = true;
                    EntityEvent::SnapshotComplete(complete.entities)
                }
                Some(entity_event::Event::Change(entity)) => EntityEvent::Change(entity),
                // An event kind this client does not know (from a newer broker): skipped.
                None => continue,
            };
            return Poll::Ready(Some(Ok(event)));
        }
    }
}

/// Convenience accessors on an [`Entity`].
pub trait EntityExt {
    /// The entity's merged fields as a JSON object (deleted fields are absent; an entity without
    /// fields gives `{}`).
    ///
    /// # Errors
    /// [`Error::Status`] with `INTERNAL` when the broker sent fields that are not valid JSON.
    fn fields_json(&self) -> Result<serde_json::Value, Error>;

    /// The entity's type, for example `contact` (empty when the broker sent no key).
    fn entity_type(&self) -> &str;

    /// The entity's id within its type, for example `42` (empty when the broker sent no key).
    fn entity_id(&self) -> &str;
}

impl EntityExt for Entity {
    fn fields_json(&self) -> Result<serde_json::Value, Error> {
        if self.fields.is_empty() {
            return Ok(serde_json::Value::Object(serde_json::Map::new()));
        }
        serde_json::from_slice(&self.fields).map_err(|error| Error::Status {
            code: tonic::Code::Internal,
            reason: None,
            message: format!(
                "the fields of entity {}.{} are not valid JSON: {error}",
                self.entity_type(),
                self.entity_id()
            ),
            metadata: Default::default(),
        })
    }

    fn entity_type(&self) -> &str {
        self.key.as_ref().map_or("", |key| key.r#type.as_str())
    }

    fn entity_id(&self) -> &str {
        self.key.as_ref().map_or("", |key| key.id.as_str())
    }
}

/// An answer without the entity the contract promises.
fn missing_entity(call: &str) -> Error {
    Error::Status {
        code: tonic::Code::Internal,
        reason: None,
        message: format!("the broker answered {call} without an entity"),
        metadata: Default::default(),
    }
}

impl Client {
    /// Merges fields into an entity, creating it when new, and returns the entity after the
    /// change. Each field is set only when this write's stamp is greater than the stamp of the
    /// write that last set it; see [`EntityUpdate`] for how writes are stamped.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the fields are not a JSON object. [`Error::Status`] when
    /// the broker refuses the write: `FAILED_PRECONDITION STALE_UPDATE` when no field wins (every
    /// field was set by a write with a greater or equal stamp), `FAILED_PRECONDITION CLOCK_SKEW`
    /// when the stamp's time is too far ahead of the broker's clock, `ABORTED VERSION_CONFLICT`
    /// when [`EntityUpdate::expect_version`] does not match; the three carry the entity's current
    /// version ([`Error::current_version`]). `INVALID_ARGUMENT` with `ENTITY_KEY_INVALID`,
    /// `ENTITY_FIELDS_INVALID` (for example no field at all) or `WRITE_STAMP_INVALID` (an empty
    /// or too long writer). Also when the call fails (`UNAVAILABLE`).
    ///
    /// # Example
    /// ```no_run
    /// use serde_json::json;
    /// use switchboard_client::{Client, EntityExt, EntityUpdate, Reason};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let entity = client
    ///     .update_entity(EntityUpdate::new("contact", "42", json!({"name": "Ada"})))
    ///     .await?;
    /// println!("version {}: {}", entity.version, entity.fields_json()?);
    ///
    /// // Compare-and-set: only if nobody changed it since.
    /// let update = EntityUpdate::new("contact", "42", json!({"vip": true}))
    ///     .expect_version(entity.version);
    /// match client.update_entity(update).await {
    ///     Ok(entity) => println!("now at version {}", entity.version),
    ///     Err(error) if error.reason() == Some(Reason::VersionConflict) => {
    ///         println!("changed meanwhile, now at {:?}", error.current_version())
    ///     }
    ///     Err(error) => return Err(error),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_entity(&self, update: EntityUpdate) -> Result<Entity, Error> {
        let request = update.to_request(self)?;
        let response = self.entities_grpc().update_entity(request).await?;
        response
            .into_inner()
            .entity
            .ok_or_else(|| missing_entity("UpdateEntity"))
    }

    /// Deletes an entity: a tombstone stamped like an update, which removes every field whose
    /// stamp is smaller. Returns the entity after the change (`deleted` is true when no field
    /// is left that a later write set).
    ///
    /// # Errors
    /// As [`Client::update_entity`] (except the fields' own).
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, EntityDelete};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let entity = client.delete_entity(EntityDelete::new("contact", "42")).await?;
    /// assert!(entity.deleted);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_entity(&self, delete: EntityDelete) -> Result<Entity, Error> {
        let request = delete.to_request(self);
        let response = self.entities_grpc().delete_entity(request).await?;
        response
            .into_inner()
            .entity
            .ok_or_else(|| missing_entity("DeleteEntity"))
    }

    /// Reads an entity. With `if_none_match` set to the ETag of an earlier read that is still
    /// current, answers [`EntityRead::NotModified`] without sending the entity again.
    ///
    /// A deleted entity is still read, with `deleted` set.
    ///
    /// # Errors
    /// [`Error::Status`]: `NOT_FOUND ENTITY_NOT_FOUND` when the entity was never written,
    /// `INVALID_ARGUMENT ENTITY_KEY_INVALID` for a bad key, or the call failed (`UNAVAILABLE`).
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, EntityRead};
    ///
    /// # async fn run(client: Client, etag: String) -> Result<(), switchboard_client::Error> {
    /// match client.get_entity("contact", "42", Some(&etag)).await? {
    ///     EntityRead::Modified(entity) => println!("new version {}", entity.version),
    ///     EntityRead::NotModified => println!("unchanged"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_entity(
        &self,
        entity_type: impl Into<String>,
        id: impl Into<String>,
        if_none_match: Option<&str>,
    ) -> Result<EntityRead, Error> {
        self.get_entity_consistency(entity_type, id, if_none_match, false)
            .await
    }

    /// [`get_entity`](Self::get_entity), choosing the consistency: with `stale_ok` false (what
    /// `get_entity` does) the answer reflects every write acknowledged before the call, on any
    /// node of a cluster; with `stale_ok` true the node answers from its own applied state at
    /// once, possibly behind the leader, and without needing a leader.
    ///
    /// # Errors
    /// As `get_entity`; UNAVAILABLE when a linearizable read finds no leader.
    pub async fn get_entity_consistency(
        &self,
        entity_type: impl Into<String>,
        id: impl Into<String>,
        if_none_match: Option<&str>,
        stale_ok: bool,
    ) -> Result<EntityRead, Error> {
        let request = GetEntityRequest {
            key: Some(key(entity_type, id)),
            if_none_match: if_none_match.unwrap_or_default().to_owned(),
            stale_ok,
        };
        let response = self.entities_grpc().get_entity(request).await?.into_inner();
        if response.not_modified {
            return Ok(EntityRead::NotModified);
        }
        response
            .entity
            .map(EntityRead::Modified)
            .ok_or_else(|| missing_entity("GetEntity"))
    }

    /// Watches the entities matching `pattern`, a pattern over `type.id` (`contact.42`,
    /// `contact.*`, `>`): a snapshot of every matching entity's current state, then every merged
    /// change. See [`EntityWatch`]; a watch does not resume, and watching again starts with a
    /// fresh snapshot. When the broker ends a watch because its bearer token expired
    /// (`UNAUTHENTICATED TOKEN_EXPIRED`, see [`Error::is_token_expired`]), the client drops that
    /// token, so watching again carries a new one.
    ///
    /// This returns once the broker has accepted the call; the snapshot follows on the stream.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty pattern; [`Error::Status`] when the broker refuses
    /// the pattern (`INVALID_ARGUMENT PATTERN_INVALID`) or the call fails.
    ///
    /// # Example
    /// ```no_run
    /// use futures::StreamExt;
    /// use switchboard_client::{Client, EntityEvent, EntityExt};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let mut watch = client.watch_entities("contact.*").await?;
    /// while let Some(event) = watch.next().await {
    ///     match event? {
    ///         EntityEvent::Snapshot(entity) | EntityEvent::Change(entity) => {
    ///             println!("{} v{}: {}", entity.entity_id(), entity.version, entity.fields_json()?)
    ///         }
    ///         EntityEvent::SnapshotComplete(count) => println!("{count} entities; now live"),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn watch_entities(&self, pattern: impl Into<String>) -> Result<EntityWatch, Error> {
        self.watch_entities_with(pattern, crate::FlowPolicy::Lossless, None)
            .await
    }

    /// [`Client::watch_entities`] with a flow policy and an optional throttle: with
    /// [`FlowPolicy::Conflate`](crate::FlowPolicy::Conflate) a watcher that falls behind receives
    /// only the latest version of each entity; with a throttle, at most one change per entity per
    /// interval, the latest arriving at the end of the interval.
    ///
    /// # Errors
    /// As [`Client::watch_entities`].
    pub async fn watch_entities_with(
        &self,
        pattern: impl Into<String>,
        policy: crate::FlowPolicy,
        throttle: Option<std::time::Duration>,
    ) -> Result<EntityWatch, Error> {
        let pattern = pattern.into();
        if pattern.is_empty() {
            return Err(Error::InvalidArgument(
                "the entity watch pattern is empty".to_owned(),
            ));
        }
        let min_interval_ms = throttle
            .map(|t| u32::try_from(t.as_millis().max(1)).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let request = WatchEntitiesRequest {
            pattern: pattern.clone(),
            policy: switchboard_proto::v1::FlowPolicy::from(policy) as i32,
            min_interval_ms,
        };
        let events = self.entities_grpc().watch_entities(request).await?;
        let token = events.extensions().get::<TokenUsed>().cloned();
        Ok(EntityWatch {
            events: Box::new(events.into_inner()),
            pattern,
            live: false,
            done: false,
            tokens: self.tokens().zip(token),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tonic::transport::Endpoint;

    fn client() -> Client {
        let endpoint = Endpoint::from_static("http://127.0.0.1:1");
        Client::from_channel(endpoint.connect_lazy(), "http://127.0.0.1:1").with_writer_id("me")
    }

    #[test]
    fn the_clock_strictly_increases() {
        let mut clock = StampClock::default();
        assert_eq!(clock.next(100), (100, 0));
        assert_eq!(clock.next(100), (100, 1));
        assert_eq!(clock.next(100), (100, 2));
        assert_eq!(clock.next(101), (101, 0));
        // The system clock went back: stay at the last time and count on.
        assert_eq!(clock.next(50), (101, 1));
        assert_eq!(clock.next(102), (102, 0));
    }

    #[tokio::test]
    async fn an_update_without_a_stamp_is_stamped_by_the_client() {
        let client = client();
        let before = now_ms();
        let update = EntityUpdate::new("contact", "42", json!({"name": "Ada", "phone": null}));
        let first = update.to_request(&client).unwrap();
        let second = update.to_request(&client).unwrap();
        let key = first.key.clone().unwrap();
        assert_eq!((key.r#type.as_str(), key.id.as_str()), ("contact", "42"));
        let fields: serde_json::Value = serde_json::from_slice(&first.fields).unwrap();
        assert_eq!(fields, json!({"name": "Ada", "phone": null}));
        assert_eq!(first.expected_version, None);
        let (a, b) = (first.stamp.unwrap(), second.stamp.unwrap());
        assert!(a.timestamp_ms >= before && a.timestamp_ms <= now_ms());
        assert_eq!((a.writer.as_str(), b.writer.as_str()), ("me", "me"));
        assert!((b.timestamp_ms, b.version) > (a.timestamp_ms, a.version));

        let other = EntityUpdate::new("contact", "42", json!({"x": 1}))
            .writer("panel-7")
            .to_request(&client)
            .unwrap();
        assert_eq!(other.stamp.unwrap().writer, "panel-7");
    }

    #[tokio::test]
    async fn explicit_stamps_and_expected_versions_are_sent() {
        let client = client();
        let request = EntityUpdate::new("contact", "42", json!({"x": 1}))
            .stamp(1_000, 3, "panel-7")
            .expect_version(0)
            .to_request(&client)
            .unwrap();
        assert_eq!(
            request.stamp,
            Some(WriteStamp {
                timestamp_ms: 1_000,
                version: 3,
                writer: "panel-7".to_owned()
            })
        );
        assert_eq!(request.expected_version, Some(0));

        // A writer set after the stamp replaces the stamp's writer only.
        let request = EntityDelete::new("contact", "42")
            .stamp(1_000, 3, "panel-7")
            .writer("panel-8")
            .expect_version(5)
            .to_request(&client);
        let stamp = request.stamp.unwrap();
        assert_eq!(
            (stamp.timestamp_ms, stamp.version, stamp.writer.as_str()),
            (1_000, 3, "panel-8")
        );
        assert_eq!(request.expected_version, Some(5));

        let stamped_by_client = EntityDelete::new("contact", "42").to_request(&client);
        assert_eq!(stamped_by_client.stamp.unwrap().writer, "me");
    }

    #[tokio::test]
    async fn fields_must_be_an_object() {
        let client = client();
        for fields in [json!(null), json!([1]), json!("x"), json!(1), json!(true)] {
            let error = EntityUpdate::new("contact", "42", fields.clone())
                .to_request(&client)
                .unwrap_err();
            assert!(matches!(error, Error::InvalidArgument(_)), "{fields}");
            assert!(
                error.to_string().contains("must be a JSON object"),
                "{error}"
            );
        }
    }

    #[test]
    fn fields_are_read_as_json() {
        let mut entity = Entity {
            key: Some(key("contact", "42")),
            fields: br#"{"name":"Ada","n":[1,2]}"#.to_vec().into(),
            ..Entity::default()
        };
        assert_eq!(
            entity.fields_json().unwrap(),
            json!({"name": "Ada", "n": [1, 2]})
        );
        assert_eq!(
            (entity.entity_type(), entity.entity_id()),
            ("contact", "42")
        );

        entity.fields = bytes::Bytes::new();
        assert_eq!(entity.fields_json().unwrap(), json!({}));

        entity.fields = bytes::Bytes::from_static(b"{nope");
        let error = entity.fields_json().unwrap_err();
        assert_eq!(error.code(), tonic::Code::Internal);
        assert!(error.to_string().contains("contact.42"), "{error}");

        let keyless = Entity::default();
        assert_eq!((keyless.entity_type(), keyless.entity_id()), ("", ""));
    }

    #[test]
    fn reads_and_events_expose_their_entity() {
        let entity = Entity {
            version: 2,
            ..Entity::default()
        };
        assert_eq!(
            EntityRead::Modified(entity.clone()).into_entity(),
            Some(entity.clone())
        );
        assert_eq!(EntityRead::NotModified.into_entity(), None);
        assert_eq!(EntityEvent::Change(entity.clone()).entity(), Some(&entity));
        assert_eq!(EntityEvent::SnapshotComplete(3).entity(), None);
    }
}
