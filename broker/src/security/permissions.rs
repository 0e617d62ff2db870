//! What a principal may do: the channels it may publish to, the patterns it may subscribe to, and
//! the entity types it may read or update, the KPI views it may read.
//!
//! Why coverage and not matching: a publish names one channel, so "is it matched by an allowed
//! pattern" decides it. A subscription names a *pattern*, and allowing it because it matches, or
//! overlaps, an allowed pattern would hand out more than was granted (`crm.>` overlaps `crm.contact.>`
//! but sees `crm.deal.won` too). A subscription is allowed only when every channel it could ever
//! match is matched by some allowed pattern — [`patterns_cover`], decided exactly over the `*`/`>`
//! grammar of [`crate::channel`] and checked against brute force in the property tests below.
//!
//! Reserved `$` channels: clients never publish there, whatever they were granted. Entity state
//! (`$state.<type>.<id>`) is read through entity permissions: subscribing to `$state.contact.>` (or
//! watching `contact.*`) needs read permission on `contact`, and a subscribe grant may not name
//! `$state.` itself, so there is one way to grant reads, not two. Other reserved namespaces
//! (`$sys.…`) need an explicit subscribe grant naming them, because a leading wildcard never
//! matches a `$` segment (`>` does not see `$sys.loop.detected`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::channel::{is_reserved, ChannelError, ChannelLimits, Pattern, SubscriptionTrie};

/// Most entries in any one list of a grant (publish, subscribe, entity read, entity update): checks
/// cost time proportional to the grant, and a grant is carried in every token.
pub(crate) const MAX_GRANTS: usize = 256;
/// The entity type that stands for every type in an entity grant.
pub(crate) const ALL_ENTITY_TYPES: &str = "*";
/// Longest entity type, as the entity service enforces.
const MAX_ENTITY_TYPE_LEN: usize = 64;
/// The KPI view pattern that stands for every view.
pub(crate) const ALL_VIEWS: &str = "*";
/// Longest KPI view name, as view definitions enforce (docs/KPIS.md).
const MAX_VIEW_NAME_LEN: usize = 64;
/// Fewest segments of a channel (as in [`crate::channel`]).
const MIN_CHANNEL_SEGMENTS: usize = 2;
/// First segment of the channels that carry entity state.
const STATE_NAMESPACE: &str = "$state";

/// The permissions as written in a token's claims (under `sb`) or a client's configured scope:
/// `{"publish":[..],"subscribe":[..],"entities":{"read":[..],"update":[..]}}`. Every list may be
/// left out, meaning nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionSpec {
    /// Channel patterns the holder may publish to (`crm.>`). Never `$…`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Patterns the holder may subscribe within (`crm.*.updated`, `$sys.>`). Never `$state.…`:
    /// entity state is granted by [`EntitySpec::read`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
    /// Entity types the holder may read and update.
    #[serde(default, skip_serializing_if = "EntitySpec::is_empty")]
    pub entities: EntitySpec,
    /// Whether the holder may change the cluster's membership (add, promote, remove nodes), and
    /// everything `schema` allows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// Whether the holder may change the payload schema registry (docs/SCHEMAS.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub schema: bool,
    /// KPI views the holder may read (docs/KPIS.md): exact names, `*` for every view, or a
    /// prefix ending in `*` (`sales.*`). `admin` reads every view.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kpi: Vec<String>,
}

/// Entity types a grant covers; `*` means every type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySpec {
    /// Types the holder may get and watch (and whose `$state.<type>.…` channels it may subscribe to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read: Vec<String>,
    /// Types the holder may update and delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub update: Vec<String>,
}

impl EntitySpec {
    /// Whether neither list has an entry.
    pub fn is_empty(&self) -> bool {
        self.read.is_empty() && self.update.is_empty()
    }
}

/// Why a [`PermissionSpec`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionError {
    /// A pattern breaks the channel grammar.
    #[error("{list} pattern {pattern:?}: {source}")]
    InvalidPattern {
        /// `publish` or `subscribe`.
        list: &'static str,
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        source: ChannelError,
    },
    /// A publish grant names a reserved `$` channel.
    #[error(
        "publish pattern {pattern:?} is in the reserved `$` namespace; clients never publish there"
    )]
    ReservedPublish {
        /// The pattern as written.
        pattern: String,
    },
    /// A subscribe grant names `$state.…`.
    #[error(
        "subscribe pattern {pattern:?} names entity state; grant `entities.read` for the types instead"
    )]
    StateSubscribe {
        /// The pattern as written.
        pattern: String,
    },
    /// An entity type that is neither `*` nor 1–64 characters of `[A-Za-z0-9_-]`.
    #[error("entity type {entity_type:?} must be `*` or 1 to 64 characters of [A-Za-z0-9_-]")]
    InvalidEntityType {
        /// The type as written.
        entity_type: String,
    },
    /// A KPI view pattern that is neither `*`, a view name, nor a view name prefix ending in `*`.
    #[error(
        "KPI view pattern {pattern:?} must be `*`, a view name (1 to 64 of a-z, 0-9, `_`, `-`, \
         `.`) or such a prefix followed by `*` (`sales.*`)"
    )]
    InvalidKpiPattern {
        /// The pattern as written.
        pattern: String,
    },
    /// A list longer than [`MAX_GRANTS`].
    #[error("the {list} list has {len} entries, over the limit of {MAX_GRANTS}")]
    TooManyGrants {
        /// Which list.
        list: &'static str,
        /// How many entries it has.
        len: usize,
    },
}

/// A refused operation, with the reason the edge reports (as `PERMISSION_DENIED`, except a publish
/// to a reserved channel, which the edge already refuses as `INVALID_ARGUMENT CHANNEL_RESERVED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionDenied {
    /// A publish to a `$` channel.
    #[error(
        "channel {channel:?} is reserved for the broker; clients cannot publish to `$` channels"
    )]
    ReservedChannel {
        /// The channel.
        channel: String,
    },
    /// A publish to a channel no publish grant matches.
    #[error("not allowed to publish to {channel:?}")]
    Publish {
        /// The channel.
        channel: String,
    },
    /// A subscription some of whose channels no grant covers.
    #[error(
        "not allowed to subscribe to {pattern:?}: some channels it matches are outside the grant"
    )]
    Subscribe {
        /// The pattern.
        pattern: String,
    },
    /// Reading an entity type not granted.
    #[error("not allowed to read entities of type {entity_type:?}")]
    EntityRead {
        /// The entity type.
        entity_type: String,
    },
    /// A subscription to entity state (`$state.…`, or a watch) reaching types not all granted.
    #[error(
        "not allowed to read the entity state {pattern:?} covers: `entities.read` does not grant \
         every type it reaches"
    )]
    EntityStateRead {
        /// The `$state.…` pattern.
        pattern: String,
    },
    /// Changing cluster membership without the `admin` grant.
    #[error("not allowed to change the cluster's membership (the grant has no `admin`)")]
    Admin,
    /// Changing the schema registry without the `schema` (or `admin`) grant.
    #[error(
        "not allowed to change the schema registry (the grant has neither `schema` nor `admin`)"
    )]
    Schema,
    /// Managing a durable consumer another principal created, without the `admin` grant.
    #[error(
        "durable consumer {name:?} belongs to another principal; only it (or an `admin`) may \
         open, acknowledge for or delete it"
    )]
    ConsumerNotOwned {
        /// The consumer's name.
        name: String,
    },
    /// Updating an entity type not granted.
    #[error("not allowed to update entities of type {entity_type:?}")]
    EntityUpdate {
        /// The entity type.
        entity_type: String,
    },
    /// Reading a KPI view no `kpi` pattern of the grant names.
    #[error("not allowed to read KPI view {view:?} (no `kpi` pattern of the grant matches it)")]
    Kpi {
        /// The view's name.
        view: String,
    },
}

impl PermissionDenied {
    /// The stable reason string for the status details.
    pub fn reason(&self) -> &'static str {
        match self {
            PermissionDenied::ReservedChannel { .. } => "CHANNEL_RESERVED",
            PermissionDenied::Publish { .. } => "PUBLISH_DENIED",
            PermissionDenied::Subscribe { .. } => "SUBSCRIBE_DENIED",
            PermissionDenied::EntityRead { .. } | PermissionDenied::EntityStateRead { .. } => {
                "ENTITY_READ_DENIED"
            }
            PermissionDenied::EntityUpdate { .. } => "ENTITY_UPDATE_DENIED",
            PermissionDenied::Admin => "ADMIN_DENIED",
            PermissionDenied::Schema => "SCHEMA_DENIED",
            PermissionDenied::ConsumerNotOwned { .. } => "CONSUMER_NOT_OWNED",
            PermissionDenied::Kpi { .. } => "KPI_DENIED",
        }
    }
}

/// A set of entity types, or all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct EntityGrant {
    /// `*` was granted.
    all: bool,
    /// The types granted by name.
    types: BTreeSet<String>,
}

impl EntityGrant {
    fn parse(list: &'static str, types: &[String]) -> Result<EntityGrant, PermissionError> {
        check_len(list, types.len())?;
        let mut grant = EntityGrant::default();
        for entity_type in types {
            if entity_type == ALL_ENTITY_TYPES {
                grant.all = true;
            } else if is_entity_type(entity_type) {
                grant.types.insert(entity_type.clone());
            } else {
                return Err(PermissionError::InvalidEntityType {
                    entity_type: entity_type.clone(),
                });
            }
        }
        Ok(grant)
    }

    fn allows(&self, entity_type: &str) -> bool {
        self.all || self.types.contains(entity_type)
    }

    fn is_within(&self, other: &EntityGrant) -> bool {
        other.all || (!self.all && self.types.iter().all(|t| other.types.contains(t)))
    }

    fn to_list(&self) -> Vec<String> {
        let mut list: Vec<String> = self
            .all
            .then(|| ALL_ENTITY_TYPES.to_owned())
            .into_iter()
            .collect();
        list.extend(self.types.iter().cloned());
        list
    }
}

/// KPI views a grant lets its holder read: every view, views by name, views by name prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KpiGrant {
    /// `*` was granted.
    all: bool,
    /// Names granted exactly.
    names: BTreeSet<String>,
    /// Prefixes granted (`sales.` for `sales.*`), without their `*`.
    prefixes: BTreeSet<String>,
}

impl KpiGrant {
    fn parse(patterns: &[String]) -> Result<KpiGrant, PermissionError> {
        check_len("kpi", patterns.len())?;
        let mut grant = KpiGrant::default();
        for pattern in patterns {
            let invalid = || PermissionError::InvalidKpiPattern {
                pattern: pattern.clone(),
            };
            if pattern == ALL_VIEWS {
                grant.all = true;
            } else if let Some(prefix) = pattern.strip_suffix('*') {
                // A prefix is shorter than the longest name, so that it can match one.
                if prefix.len() >= MAX_VIEW_NAME_LEN || !is_view_name(prefix) {
                    return Err(invalid());
                }
                grant.prefixes.insert(prefix.to_owned());
            } else if is_view_name(pattern) {
                grant.names.insert(pattern.clone());
            } else {
                return Err(invalid());
            }
        }
        Ok(grant)
    }

    fn allows(&self, view: &str) -> bool {
        self.all
            || self.names.contains(view)
            || self
                .prefixes
                .iter()
                .any(|prefix| view.starts_with(prefix.as_str()))
    }

    /// Whether every view this grant allows, `other` allows too.
    fn is_within(&self, other: &KpiGrant) -> bool {
        if other.all {
            return true;
        }
        let prefix_covered = |prefix: &String| {
            other
                .prefixes
                .iter()
                .any(|theirs| prefix.starts_with(theirs.as_str()))
        };
        !self.all
            && self.names.iter().all(|name| other.allows(name))
            && self.prefixes.iter().all(prefix_covered)
    }

    fn to_list(&self) -> Vec<String> {
        let mut list: Vec<String> = self.all.then(|| ALL_VIEWS.to_owned()).into_iter().collect();
        list.extend(self.names.iter().cloned());
        list.extend(self.prefixes.iter().map(|prefix| format!("{prefix}*")));
        list
    }
}

/// Whether `s` is 1–64 characters of a KPI view name (docs/KPIS.md).
fn is_view_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_VIEW_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
}

/// Whether `s` is a valid entity type name.
fn is_entity_type(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ENTITY_TYPE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_len(list: &'static str, len: usize) -> Result<(), PermissionError> {
    if len > MAX_GRANTS {
        return Err(PermissionError::TooManyGrants { list, len });
    }
    Ok(())
}

/// What a principal may do, parsed from a [`PermissionSpec`] and ready for the per-call checks.
#[derive(Debug, Clone)]
pub(crate) struct Permissions {
    /// Everything is allowed except publishing to `$` channels (no authentication configured).
    unrestricted: bool,
    /// The publish grant as parsed, in order.
    publish: Vec<Pattern>,
    /// The publish grant, for matching a channel in time independent of the grant's size.
    publish_trie: SubscriptionTrie<()>,
    /// The subscribe grant as written.
    subscribe: Vec<Pattern>,
    /// The subscribe grant plus `$state.<type>.>` for every readable type: what subscriptions are
    /// checked against.
    subscribe_effective: Vec<Pattern>,
    /// Entity types that may be read.
    read: EntityGrant,
    /// Entity types that may be updated.
    update: EntityGrant,
    /// Cluster membership may be changed.
    admin: bool,
    /// The schema registry may be changed.
    schema: bool,
    /// KPI views that may be read (besides every view, for `admin`).
    kpi: KpiGrant,
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions::none()
    }
}

impl Permissions {
    /// Nothing is allowed.
    pub(crate) fn none() -> Permissions {
        Permissions {
            unrestricted: false,
            publish: Vec::new(),
            publish_trie: SubscriptionTrie::new(),
            subscribe: Vec::new(),
            subscribe_effective: Vec::new(),
            read: EntityGrant::default(),
            update: EntityGrant::default(),
            admin: false,
            schema: false,
            kpi: KpiGrant::default(),
        }
    }

    /// Everything is allowed except publishing to reserved `$` channels: the permissions of every
    /// caller when the broker runs without authentication (loopback only).
    pub(crate) fn unrestricted() -> Permissions {
        Permissions {
            unrestricted: true,
            admin: true,
            schema: true,
            ..Permissions::none()
        }
    }

    /// Parses and validates a grant; patterns are checked against `limits`.
    pub(crate) fn from_spec(
        spec: &PermissionSpec,
        limits: &ChannelLimits,
    ) -> Result<Permissions, PermissionError> {
        check_len("publish", spec.publish.len())?;
        check_len("subscribe", spec.subscribe.len())?;
        let parse = |list: &'static str, pattern: &String| {
            Pattern::parse(pattern, limits).map_err(|source| PermissionError::InvalidPattern {
                list,
                pattern: pattern.clone(),
                source,
            })
        };
        let mut permissions = Permissions::none();
        for pattern in &spec.publish {
            let parsed = parse("publish", pattern)?;
            if is_reserved(pattern) {
                return Err(PermissionError::ReservedPublish {
                    pattern: pattern.clone(),
                });
            }
            permissions.publish_trie.insert(&parsed, ());
            permissions.publish.push(parsed);
        }
        for pattern in &spec.subscribe {
            let parsed = parse("subscribe", pattern)?;
            if pattern.split('.').next() == Some(STATE_NAMESPACE) {
                return Err(PermissionError::StateSubscribe {
                    pattern: pattern.clone(),
                });
            }
            permissions.subscribe.push(parsed);
        }
        permissions.read = EntityGrant::parse("entities.read", &spec.entities.read)?;
        permissions.update = EntityGrant::parse("entities.update", &spec.entities.update)?;
        permissions.kpi = KpiGrant::parse(&spec.kpi)?;
        permissions.admin = spec.admin;
        permissions.schema = spec.schema || spec.admin;
        permissions.subscribe_effective = permissions.subscribe.clone();
        // The state channels of readable types; entity types are short, so these always parse.
        let state_limits = ChannelLimits::default();
        let state_patterns: Vec<String> = if permissions.read.all {
            vec![format!("{STATE_NAMESPACE}.>")]
        } else {
            let types = permissions.read.types.iter();
            types.map(|t| format!("{STATE_NAMESPACE}.{t}.>")).collect()
        };
        for pattern in state_patterns {
            let parsed = Pattern::parse(&pattern, &state_limits).map_err(|_| {
                PermissionError::InvalidEntityType {
                    entity_type: pattern.clone(),
                }
            })?;
            permissions.subscribe_effective.push(parsed);
        }
        Ok(permissions)
    }

    /// The grant as a [`PermissionSpec`] (for minting a token that carries it). Empty for
    /// [`Permissions::unrestricted`], which no token can carry.
    pub(crate) fn to_spec(&self) -> PermissionSpec {
        PermissionSpec {
            publish: self.publish.iter().map(|p| p.as_str().to_owned()).collect(),
            subscribe: self
                .subscribe
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            entities: EntitySpec {
                read: self.read.to_list(),
                update: self.update.to_list(),
            },
            admin: self.admin && !self.unrestricted,
            schema: self.schema && !self.admin && !self.unrestricted,
            kpi: self.kpi.to_list(),
        }
    }

    /// Whether this is [`Permissions::unrestricted`].
    #[cfg(test)]
    pub(crate) fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// Whether the principal may publish to `channel` (a channel the edge has validated).
    #[cfg(test)]
    pub(crate) fn may_publish(&self, channel: &str) -> bool {
        self.check_publish(channel).is_ok()
    }

    /// [`Permissions::may_publish`], with the reason when refused.
    pub(crate) fn check_publish(&self, channel: &str) -> Result<(), PermissionDenied> {
        if is_reserved(channel) {
            return Err(PermissionDenied::ReservedChannel {
                channel: channel.to_owned(),
            });
        }
        let mut matched = self.unrestricted;
        if !matched {
            self.publish_trie
                .for_each_match(channel, |()| matched = true);
        }
        if matched {
            Ok(())
        } else {
            Err(PermissionDenied::Publish {
                channel: channel.to_owned(),
            })
        }
    }

    /// Whether the principal may subscribe to `pattern`: every channel it could match is matched by
    /// some subscribe grant, or is the `$state` channel of a readable entity type.
    pub(crate) fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.unrestricted || patterns_cover(&self.subscribe_effective, pattern)
    }

    /// [`Permissions::may_subscribe`], with the reason when refused: entity state is granted
    /// by `entities.read` alone (a subscribe grant may not name `$state.`), so a `$state.…`
    /// pattern is refused for want of a read grant, as a watch is.
    pub(crate) fn check_subscribe(&self, pattern: &Pattern) -> Result<(), PermissionDenied> {
        if self.may_subscribe(pattern) {
            return Ok(());
        }
        let pattern = pattern.as_str().to_owned();
        if pattern.split('.').next() == Some(STATE_NAMESPACE) {
            Err(PermissionDenied::EntityStateRead { pattern })
        } else {
            Err(PermissionDenied::Subscribe { pattern })
        }
    }

    /// Whether the principal may get or watch entities of `entity_type`.
    pub(crate) fn may_read_entity(&self, entity_type: &str) -> bool {
        self.unrestricted || self.read.allows(entity_type)
    }

    /// [`Permissions::may_read_entity`], with the reason when refused.
    pub(crate) fn check_read_entity(&self, entity_type: &str) -> Result<(), PermissionDenied> {
        if self.may_read_entity(entity_type) {
            Ok(())
        } else {
            Err(PermissionDenied::EntityRead {
                entity_type: entity_type.to_owned(),
            })
        }
    }

    /// Whether the principal may update or delete entities of `entity_type`.
    pub(crate) fn may_update_entity(&self, entity_type: &str) -> bool {
        self.unrestricted || self.update.allows(entity_type)
    }

    /// [`Permissions::may_update_entity`], with the reason when refused.
    pub(crate) fn check_update_entity(&self, entity_type: &str) -> Result<(), PermissionDenied> {
        if self.may_update_entity(entity_type) {
            Ok(())
        } else {
            Err(PermissionDenied::EntityUpdate {
                entity_type: entity_type.to_owned(),
            })
        }
    }

    /// Whether everything this grant allows, `other` allows too: the check that a scoped token
    /// asks for no more than its client was given.
    pub(crate) fn is_within(&self, other: &Permissions) -> bool {
        if other.unrestricted {
            return true;
        }
        !self.unrestricted
            && self
                .publish
                .iter()
                .all(|p| patterns_cover(&other.publish, p))
            && self
                .subscribe
                .iter()
                .all(|p| patterns_cover(&other.subscribe_effective, p))
            && self.read.is_within(&other.read)
            && self.update.is_within(&other.update)
            && (!self.admin || other.admin)
            && (!self.schema || other.schema)
            && (other.admin || self.kpi.is_within(&other.kpi))
    }

    /// Whether the principal may change cluster membership.
    ///
    /// # Errors
    /// [`PermissionDenied::Admin`].
    pub(crate) fn check_admin(&self) -> Result<(), PermissionDenied> {
        if self.admin {
            Ok(())
        } else {
            Err(PermissionDenied::Admin)
        }
    }

    /// Whether the principal may read KPI view `view` (a `kpi` pattern matches it, or `admin`).
    pub(crate) fn may_read_kpi(&self, view: &str) -> bool {
        self.unrestricted || self.admin || self.kpi.allows(view)
    }

    /// [`Permissions::may_read_kpi`], with the reason when refused.
    pub(crate) fn check_read_kpi(&self, view: &str) -> Result<(), PermissionDenied> {
        if self.may_read_kpi(view) {
            Ok(())
        } else {
            Err(PermissionDenied::Kpi {
                view: view.to_owned(),
            })
        }
    }

    /// Whether the principal may change the schema registry (`schema` or `admin`).
    ///
    /// # Errors
    /// [`PermissionDenied::Schema`].
    pub(crate) fn check_schema(&self) -> Result<(), PermissionDenied> {
        if self.schema {
            Ok(())
        } else {
            Err(PermissionDenied::Schema)
        }
    }
}

/// Whether every channel `requested` could match is matched by `allowed`.
#[cfg(test)]
pub(crate) fn pattern_covers(allowed: &Pattern, requested: &Pattern) -> bool {
    patterns_cover(std::slice::from_ref(allowed), requested)
}

/// Whether every channel `requested` could match is matched by at least one of `allowed` (not
/// necessarily the same one for every channel: `a.*` and `a.*.>` together cover `a.>`).
///
/// Channels have at least two segments, so `*.>` covers `>`, and a one-segment pattern without
/// `>` (such as `a`), which matches no channel, is covered by anything. The depth and length
/// limits of channels are ignored, which can only make the answer more conservative.
pub(crate) fn patterns_cover(allowed: &[Pattern], requested: &Pattern) -> bool {
    let allowed: Vec<Vec<&str>> = allowed.iter().map(|p| segments(p)).collect();
    let candidates: Vec<&[&str]> = allowed.iter().map(Vec::as_slice).collect();
    covers(candidates, &segments(requested), 0)
}

fn segments(pattern: &Pattern) -> Vec<&str> {
    pattern.as_str().split('.').collect()
}

/// The coverage decision, one requested segment at a time.
///
/// `candidates` are the suffixes of the allowed patterns that matched every channel prefix the
/// requested prefix so far can produce; `depth` is how many channel segments that prefix has (at
/// depth 0 wildcards do not see `$` segments).
///
/// Why looking at one "fresh" segment suffices for a requested wildcard: an allowed pattern that
/// matches a segment no pattern names must have a wildcard there, and so matches any segment.
/// The candidates for a fresh segment are therefore a subset of those for every named segment,
/// and the rest of the channel is the same — if the fresh case is covered, every case is; if it
/// is not, the channel with the fresh segment is a witness.
fn covers(candidates: Vec<&[&str]>, requested: &[&str], depth: usize) -> bool {
    let Some((&segment, rest)) = requested.split_first() else {
        // A sequence too short to be a channel is not one: nothing to cover.
        return depth < MIN_CHANNEL_SEGMENTS || candidates.iter().any(|c| c.is_empty());
    };
    let first = depth == 0;
    // A requested `$x` in first position is a segment wildcards do not match; a requested `*` or
    // `>` in first position produces no `$` segment, so allowed wildcards match all it produces.
    let hidden = first && is_reserved(segment);
    if !hidden && candidates.iter().any(|c| c.first() == Some(&">")) {
        return true;
    }
    match segment {
        ">" => {
            // Every tail of k fresh segments must be matched, for every k >= 1 that makes a channel
            // long enough. No candidate has `>` here (that returned above); a candidate matches
            // such a tail only if it is all `*` of length k, or m >= 1 `*` then `>`, matching every
            // k > m.
            let shortest = MIN_CHANNEL_SEGMENTS.saturating_sub(depth).max(1);
            let mut star_lengths = BTreeSet::new();
            let mut shortest_tail: Option<usize> = None;
            for candidate in candidates {
                let stars = candidate.iter().take_while(|s| **s == "*").count();
                match candidate.get(stars) {
                    None => {
                        star_lengths.insert(stars);
                    }
                    Some(&">") => {
                        shortest_tail = Some(shortest_tail.map_or(stars, |m| m.min(stars)));
                    }
                    Some(_) => {}
                }
            }
            shortest_tail.is_some_and(|m| (shortest..=m).all(|k| star_lengths.contains(&k)))
        }
        "*" => {
            let next = candidates
                .into_iter()
                .filter(|c| c.first() == Some(&"*"))
                .map(|c| &c[1..])
                .collect();
            covers(next, rest, depth + 1)
        }
        literal => {
            let next = candidates
                .into_iter()
                .filter(|c| match c.first() {
                    Some(&"*") => !hidden,
                    Some(s) => *s == literal,
                    None => false,
                })
                .map(|c| &c[1..])
                .collect();
            covers(next, rest, depth + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn limits() -> ChannelLimits {
        ChannelLimits::default()
    }

    fn pattern(s: &str) -> Pattern {
        Pattern::parse(s, &limits()).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn spec(
        publish: &[&str],
        subscribe: &[&str],
        read: &[&str],
        update: &[&str],
    ) -> PermissionSpec {
        let own = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect();
        PermissionSpec {
            publish: own(publish),
            subscribe: own(subscribe),
            entities: EntitySpec {
                read: own(read),
                update: own(update),
            },
            admin: false,
            schema: false,
            kpi: Vec::new(),
        }
    }

    fn kpi_perms(kpi: &[&str], admin: bool) -> Permissions {
        let spec = PermissionSpec {
            kpi: kpi.iter().map(|s| (*s).to_owned()).collect(),
            admin,
            ..PermissionSpec::default()
        };
        Permissions::from_spec(&spec, &limits()).unwrap_or_else(|e| panic!("should parse: {e}"))
    }

    #[test]
    fn kpi_views_are_read_by_name_prefix_or_all() {
        let p = kpi_perms(&["sales.*", "handle_time"], false);
        for ok in ["sales.calls", "sales.", "sales.a.b", "handle_time"] {
            assert!(p.may_read_kpi(ok), "{ok}");
        }
        for refused in ["support.calls", "sales", "handle_time2", "handle", "salesx"] {
            assert_eq!(
                p.check_read_kpi(refused).map_err(|e| e.reason()),
                Err("KPI_DENIED"),
                "{refused}"
            );
        }
        assert!(kpi_perms(&["*"], false).may_read_kpi("anything"));
        assert!(
            kpi_perms(&[], true).may_read_kpi("anything"),
            "admin reads every view"
        );
        assert!(!Permissions::none().may_read_kpi("sales.calls"));
        assert!(Permissions::unrestricted().may_read_kpi("sales.calls"));
        assert_eq!(
            p.to_spec().kpi,
            vec!["handle_time".to_owned(), "sales.*".to_owned()]
        );

        let err = |kpi: &[&str]| {
            let spec = PermissionSpec {
                kpi: kpi.iter().map(|s| (*s).to_owned()).collect(),
                ..PermissionSpec::default()
            };
            Permissions::from_spec(&spec, &limits()).err()
        };
        let long_name = "x".repeat(65);
        let long_prefix = format!("{}*", "x".repeat(64));
        for bad in [
            "",
            "Sales.*",
            "sales.*.x",
            "a b",
            "*x",
            "**",
            &long_name,
            &long_prefix,
        ] {
            assert!(
                matches!(err(&[bad]), Some(PermissionError::InvalidKpiPattern { .. })),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_GRANTS).map(|i| format!("v{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            err(&many),
            Some(PermissionError::TooManyGrants { list: "kpi", .. })
        ));
    }

    #[test]
    fn kpi_grants_narrow_only_within() {
        let client = kpi_perms(&["sales.*", "ops.load"], false);
        assert!(kpi_perms(&["sales.eu.*", "sales.calls", "ops.load"], false).is_within(&client));
        assert!(!kpi_perms(&["sales*"], false).is_within(&client));
        assert!(!kpi_perms(&["ops.*"], false).is_within(&client));
        assert!(!kpi_perms(&["*"], false).is_within(&client));
        assert!(kpi_perms(&["*"], false).is_within(&kpi_perms(&[], true)));
        assert!(kpi_perms(&["anything"], false).is_within(&kpi_perms(&["*"], false)));
    }

    #[test]
    fn membership_changes_need_the_admin_grant() {
        let plain =
            Permissions::from_spec(&spec(&["a.>"], &["a.>"], &["*"], &["*"]), &limits()).unwrap();
        assert_eq!(plain.check_admin(), Err(PermissionDenied::Admin));
        let admin_spec = PermissionSpec {
            admin: true,
            ..PermissionSpec::default()
        };
        let admin = Permissions::from_spec(&admin_spec, &limits()).unwrap();
        assert_eq!(admin.check_admin(), Ok(()));
        assert!(admin.to_spec().admin);
        // A scope may not add `admin` to a client that lacks it; without auth, everyone is admin.
        assert!(!admin.is_within(&plain));
        assert!(plain.is_within(&plain));
        assert_eq!(Permissions::unrestricted().check_admin(), Ok(()));
    }

    #[test]
    fn the_schema_registry_needs_the_schema_or_admin_grant() {
        let plain =
            Permissions::from_spec(&spec(&["a.>"], &["a.>"], &["*"], &["*"]), &limits()).unwrap();
        assert_eq!(plain.check_schema(), Err(PermissionDenied::Schema));
        let schema_spec = PermissionSpec {
            schema: true,
            ..PermissionSpec::default()
        };
        let schema = Permissions::from_spec(&schema_spec, &limits()).unwrap();
        assert_eq!(schema.check_schema(), Ok(()));
        assert_eq!(schema.check_admin(), Err(PermissionDenied::Admin));
        assert!(schema.to_spec().schema);
        assert!(!schema.is_within(&plain));
        let admin_spec = PermissionSpec {
            admin: true,
            ..PermissionSpec::default()
        };
        let admin = Permissions::from_spec(&admin_spec, &limits()).unwrap();
        assert_eq!(admin.check_schema(), Ok(()));
        assert!(schema.is_within(&admin));
        assert_eq!(Permissions::unrestricted().check_schema(), Ok(()));
    }

    fn perms(publish: &[&str], subscribe: &[&str], read: &[&str], update: &[&str]) -> Permissions {
        Permissions::from_spec(&spec(publish, subscribe, read, update), &limits())
            .unwrap_or_else(|e| panic!("should parse: {e}"))
    }

    fn covers_str(allowed: &str, requested: &str) -> bool {
        pattern_covers(&pattern(allowed), &pattern(requested))
    }

    #[test]
    fn pattern_covers_table() {
        for (allowed, requested, expected) in [
            ("crm.>", "crm.>", true),
            ("crm.>", "crm.contact.updated", true),
            ("crm.>", "crm.*.updated", true),
            ("crm.>", "crm.*", true),
            ("crm.>", "crm.*.>", true),
            ("crm.>", ">", false),
            ("crm.>", "*.contact", false),
            ("crm.*", "crm.contact", true),
            ("crm.*", "crm.*", true),
            ("crm.*", "crm.>", false),
            ("crm.*", "crm.a.b", false),
            ("crm.*.updated", "crm.contact.updated", true),
            ("crm.*.updated", "crm.*.updated", true),
            ("crm.*.updated", "crm.*.*", false),
            ("crm.*.updated", "crm.>", false),
            ("crm.contact.>", "crm.>", false),
            ("crm.contact.>", "crm.*.x", false),
            (">", "a.b", true),
            (">", ">", true),
            (">", "*.>", true),
            (">", "$sys.x", false),
            ("a.>", "$sys.>", false),
            (">", "$sys.>", false),
            ("*.>", ">", true),
            ("*.*.>", ">", false),
            ("*.*", ">", false),
            ("*.*.>", "*.>", false),
            ("*.*", "*.*", true),
            ("*.*", "a.b", true),
            ("*.*", "a.>", false),
            ("$sys.>", "$sys.loop.detected", true),
            ("$sys.>", "$sys.*", true),
            ("$sys.>", "$other.x", false),
            ("$sys.loop.detected", "$sys.loop.detected", true),
            ("$sys.loop.detected", "$sys.loop.*", false),
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.b", false),
            ("*.*", "$a.b", false),
            ("*.>", "$s.a", false),
            ("*.>", "$s.>", false),
            ("$a.*", "$a.b", true),
            // One-segment patterns without `>` match no channel, so anything covers them.
            ("crm.>", "crm", true),
            ("a.b", "*", true),
            ("$a.b", "$a", true),
        ] {
            assert_eq!(
                covers_str(allowed, requested),
                expected,
                "{allowed} covers {requested}?"
            );
        }
    }

    #[test]
    fn union_coverage() {
        let allowed = [pattern("a.*"), pattern("a.*.>")];
        assert!(patterns_cover(&allowed, &pattern("a.>")));
        assert!(!pattern_covers(&allowed[0], &pattern("a.>")));
        assert!(!pattern_covers(&allowed[1], &pattern("a.>")));
        // Missing the two-segment tail length: `a.x` is uncovered.
        let gap = [pattern("a.*.*"), pattern("a.*.*.>")];
        assert!(!patterns_cover(&gap, &pattern("a.>")));
        assert!(patterns_cover(&gap, &pattern("a.*.>")));
        // A literal branch plus a wildcard branch cover the wildcard only through the wildcard.
        let split = [pattern("a.x.>"), pattern("a.*.y")];
        assert!(!patterns_cover(&split, &pattern("a.*.>")));
        assert!(patterns_cover(&split, &pattern("a.x.>")));
        assert!(patterns_cover(&split, &pattern("a.*.y")));
        assert!(!patterns_cover(&[], &pattern("a.b")));
        assert!(patterns_cover(&[], &pattern("a")));
        // Channels have two segments at least: `*` and `*.*.>` together cover `*.>`.
        let two = [pattern("*.*"), pattern("*.*.>")];
        assert!(patterns_cover(&two, &pattern(">")));
        assert!(!patterns_cover(
            &[pattern("*.*.*"), pattern("*.*.*.>")],
            &pattern(">")
        ));
    }

    #[test]
    fn publish_rules() {
        let p = perms(&["crm.>", "orders.placed"], &[], &[], &[]);
        assert!(p.may_publish("crm.contact.updated"));
        assert!(p.may_publish("crm.a"));
        assert!(p.may_publish("orders.placed"));
        assert!(!p.may_publish("orders.placed.x"));
        assert!(!p.may_publish("orders.cancelled"));
        assert!(!p.may_publish("telemetry.cpu"));
        assert_eq!(
            p.check_publish("telemetry.cpu").map_err(|e| e.reason()),
            Err("PUBLISH_DENIED")
        );
        // Reserved channels are refused whatever the grant, even unrestricted.
        for perms in [
            p.clone(),
            perms(&[">"], &[], &[], &[]),
            Permissions::unrestricted(),
        ] {
            let refused = perms.check_publish("$state.contact.42");
            assert_eq!(refused.map_err(|e| e.reason()), Err("CHANNEL_RESERVED"));
            assert!(!perms.may_publish("$sys.loop.detected"));
        }
        assert!(Permissions::unrestricted().may_publish("any.thing"));
        assert!(!Permissions::none().may_publish("any.thing"));
    }

    #[test]
    fn subscribe_rules() {
        let p = perms(&[], &["crm.>", "telemetry.*.cpu", "$sys.>"], &[], &[]);
        for ok in [
            "crm.>",
            "crm.contact.>",
            "crm.*.updated",
            "crm.contact.updated",
            "telemetry.*.cpu",
            "telemetry.node1.cpu",
            "$sys.>",
            "$sys.loop.detected",
        ] {
            assert!(p.may_subscribe(&pattern(ok)), "{ok} should be allowed");
        }
        for refused in [
            ">",
            "*.>",
            "*.contact.updated",
            "telemetry.>",
            "telemetry.*.*",
            "telemetry.node1.mem",
            "$other.>",
        ] {
            let denied = p.check_subscribe(&pattern(refused));
            assert_eq!(
                denied.map_err(|e| e.reason()),
                Err("SUBSCRIBE_DENIED"),
                "{refused} should be refused"
            );
        }
        // Entity state is refused for want of the read grant.
        assert_eq!(
            p.check_subscribe(&pattern("$state.contact.>"))
                .map_err(|e| e.reason()),
            Err("ENTITY_READ_DENIED")
        );
    }

    #[test]
    fn state_subscriptions_need_entity_read() {
        let p = perms(&[], &[">"], &["contact"], &["deal"]);
        assert!(p.may_subscribe(&pattern("$state.contact.>")));
        assert!(p.may_subscribe(&pattern("$state.contact.42")));
        assert!(p.may_subscribe(&pattern("$state.contact.*")));
        assert!(!p.may_subscribe(&pattern("$state.contact")));
        assert!(
            !p.may_subscribe(&pattern("$state.deal.>")),
            "update is not read"
        );
        assert!(!p.may_subscribe(&pattern("$state.>")));
        assert!(!p.may_subscribe(&pattern("$state.*.42")));
        // Refused for want of a read grant, not a subscribe grant (which cannot name `$state`).
        for refused in ["$state.deal.>", "$state.>", "$state.*.42"] {
            assert_eq!(
                p.check_subscribe(&pattern(refused)).map_err(|e| e.reason()),
                Err("ENTITY_READ_DENIED"),
                "{refused}"
            );
        }
        // `>` does not reach into `$state`.
        assert!(!perms(&[], &[">"], &[], &[]).may_subscribe(&pattern("$state.contact.>")));

        let all = perms(&[], &[], &["*"], &[]);
        for ok in ["$state.>", "$state.*.42", "$state.deal.>", "$state.*.*"] {
            assert!(all.may_subscribe(&pattern(ok)), "{ok}");
        }
        assert!(!all.may_subscribe(&pattern("crm.>")));
        assert!(!all.may_subscribe(&pattern("$sys.>")));
    }

    #[test]
    fn entity_rules() {
        let p = perms(&[], &[], &["contact", "deal"], &["contact"]);
        assert!(p.may_read_entity("contact"));
        assert!(p.may_read_entity("deal"));
        assert!(!p.may_read_entity("ticket"));
        assert!(p.may_update_entity("contact"));
        assert!(!p.may_update_entity("deal"));
        assert_eq!(
            p.check_read_entity("ticket").map_err(|e| e.reason()),
            Err("ENTITY_READ_DENIED")
        );
        assert_eq!(
            p.check_update_entity("deal").map_err(|e| e.reason()),
            Err("ENTITY_UPDATE_DENIED")
        );
        assert_eq!(p.check_read_entity("contact"), Ok(()));
        assert_eq!(p.check_update_entity("contact"), Ok(()));
        let all = perms(&[], &[], &["*"], &["*"]);
        assert!(all.may_read_entity("anything") && all.may_update_entity("anything"));
        let none = Permissions::none();
        assert!(!none.may_read_entity("contact") && !none.may_update_entity("contact"));
        let open = Permissions::unrestricted();
        assert!(open.may_read_entity("contact") && open.may_update_entity("contact"));
        assert!(open.may_subscribe(&pattern("$sys.>")) && open.may_subscribe(&pattern(">")));
        assert!(open.is_unrestricted() && !p.is_unrestricted());
    }

    #[test]
    fn refuses_bad_specs() {
        let err = |s: PermissionSpec| Permissions::from_spec(&s, &limits()).err();
        assert!(matches!(
            err(spec(&["crm..x"], &[], &[], &[])),
            Some(PermissionError::InvalidPattern {
                list: "publish",
                ..
            })
        ));
        assert!(matches!(
            err(spec(&[], &["a.>.b"], &[], &[])),
            Some(PermissionError::InvalidPattern {
                list: "subscribe",
                ..
            })
        ));
        assert!(matches!(
            err(spec(&["$sys.>"], &[], &[], &[])),
            Some(PermissionError::ReservedPublish { .. })
        ));
        assert!(matches!(
            err(spec(&[], &["$state.>"], &[], &[])),
            Some(PermissionError::StateSubscribe { .. })
        ));
        assert!(matches!(
            err(spec(&[], &["$state.contact.42"], &[], &[])),
            Some(PermissionError::StateSubscribe { .. })
        ));
        for bad in ["", "a.b", "a b", "contact*", &"x".repeat(65)] {
            assert!(
                matches!(
                    err(spec(&[], &[], &[bad], &[])),
                    Some(PermissionError::InvalidEntityType { .. })
                ),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_GRANTS).map(|i| format!("a.b{i}")).collect();
        let too_many = PermissionSpec {
            publish: many,
            ..PermissionSpec::default()
        };
        assert!(matches!(
            err(too_many),
            Some(PermissionError::TooManyGrants {
                list: "publish",
                len: 257
            })
        ));
    }

    #[test]
    fn spec_round_trips_through_json() {
        let json = r#"{"publish":["crm.>"],"subscribe":["crm.*.updated","$sys.>"],
                       "entities":{"read":["contact","*"],"update":["contact"]}}"#;
        let parsed: PermissionSpec = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        let p = Permissions::from_spec(&parsed, &limits()).unwrap_or_else(|e| panic!("{e}"));
        let again = p.to_spec();
        assert_eq!(again.publish, vec!["crm.>"]);
        assert_eq!(again.subscribe, vec!["crm.*.updated", "$sys.>"]);
        assert_eq!(again.entities.read, vec!["*", "contact"]);
        assert_eq!(again.entities.update, vec!["contact"]);
        let empty: PermissionSpec = serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(empty, PermissionSpec::default());
        assert_eq!(serde_json::to_string(&empty).ok().as_deref(), Some("{}"));
        assert!(serde_json::from_str::<PermissionSpec>(r#"{"subcribe":[]}"#).is_err());
    }

    #[test]
    fn is_within() {
        let client = perms(
            &["crm.>"],
            &["crm.>", "$sys.>"],
            &["contact", "deal"],
            &["contact"],
        );
        let narrower = perms(&["crm.contact.*"], &["crm.*.updated"], &["contact"], &[]);
        assert!(narrower.is_within(&client));
        assert!(!client.is_within(&narrower));
        assert!(client.is_within(&client));
        assert!(Permissions::none().is_within(&client));
        assert!(!perms(&["orders.>"], &[], &[], &[]).is_within(&client));
        assert!(!perms(&[], &[">"], &[], &[]).is_within(&client));
        assert!(!perms(&[], &[], &["*"], &[]).is_within(&client));
        assert!(!perms(&[], &[], &[], &["deal"]).is_within(&client));
        assert!(client.is_within(&Permissions::unrestricted()));
        assert!(!Permissions::unrestricted().is_within(&client));
        let reads_all = perms(&[], &[], &["*"], &["*"]);
        assert!(perms(&[], &[], &["x"], &["y"]).is_within(&reads_all));
    }

    // ---- property tests: coverage against brute force ----

    /// Names the strategies use, plus `z`, which no pattern names: the "fresh" segment.
    const SEGMENTS: [&str; 4] = ["a", "b", "c", "z"];
    const RESERVED: [&str; 2] = ["$s", "$t"];
    /// Longest generated pattern; sequences one longer than this are enough to tell coverage.
    const MAX_PATTERN_LEN: usize = 4;

    /// Every channel of 2 to MAX_PATTERN_LEN + 1 segments over the alphabet, a reserved name
    /// allowed first.
    fn all_sequences() -> &'static [String] {
        static ALL: OnceLock<Vec<String>> = OnceLock::new();
        ALL.get_or_init(|| {
            let firsts: Vec<&str> = SEGMENTS.iter().chain(RESERVED.iter()).copied().collect();
            let mut level: Vec<String> = firsts.iter().map(|s| (*s).to_owned()).collect();
            let mut all = Vec::new();
            for _ in 1..=MAX_PATTERN_LEN {
                level = level
                    .iter()
                    .flat_map(|prefix| SEGMENTS.iter().map(move |s| format!("{prefix}.{s}")))
                    .collect();
                all.extend(level.iter().cloned());
            }
            all
        })
    }

    fn brute_force_covers(allowed: &[Pattern], requested: &Pattern) -> bool {
        all_sequences()
            .iter()
            .filter(|c| requested.matches(c))
            .all(|c| allowed.iter().any(|a| a.matches(c)))
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let first = prop_oneof![
            5 => prop::sample::select(vec!["a", "b", "c", "*", ">"]),
            1 => prop::sample::select(RESERVED.to_vec()),
        ];
        let rest = prop::collection::vec(
            prop::sample::select(vec!["a", "b", "*"]),
            0..MAX_PATTERN_LEN,
        );
        (first, rest, any::<bool>()).prop_map(|(first, rest, tail)| {
            if first == ">" {
                return ">".to_owned();
            }
            let mut parts = vec![first];
            parts.extend(rest);
            if tail && parts.len() < MAX_PATTERN_LEN {
                parts.push(">");
            }
            parts.join(".")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn pattern_covers_matches_brute_force(
            allowed in pattern_strategy(),
            requested in pattern_strategy(),
        ) {
            let allowed = pattern(&allowed);
            let requested = pattern(&requested);
            prop_assert_eq!(
                pattern_covers(&allowed, &requested),
                brute_force_covers(std::slice::from_ref(&allowed), &requested),
                "{} covers {}?", allowed, requested
            );
            // Every pattern covers itself.
            prop_assert!(pattern_covers(&requested, &requested));
        }

        #[test]
        fn patterns_cover_matches_brute_force(
            allowed in prop::collection::vec(pattern_strategy(), 0..4),
            requested in pattern_strategy(),
        ) {
            let allowed: Vec<Pattern> = allowed.iter().map(|p| pattern(p)).collect();
            let requested = pattern(&requested);
            prop_assert_eq!(
                patterns_cover(&allowed, &requested),
                brute_force_covers(&allowed, &requested),
                "{:?} cover {}?", allowed.iter().map(Pattern::as_str).collect::<Vec<_>>(), requested
            );
        }

        #[test]
        fn may_publish_agrees_with_matching(
            grant in prop::collection::vec(pattern_strategy(), 0..4),
            channel in prop::sample::select(all_sequences().to_vec()),
        ) {
            let grant: Vec<String> = grant.into_iter().filter(|p| !is_reserved(p)).collect();
            let p = Permissions::from_spec(
                &PermissionSpec { publish: grant.clone(), ..PermissionSpec::default() },
                &limits(),
            ).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let expected = !is_reserved(&channel) && grant.iter().any(|g| pattern(g).matches(&channel));
            prop_assert_eq!(p.may_publish(&channel), expected, "{:?} publish {}", grant, channel);
        }
    }
}
