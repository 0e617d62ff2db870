//! The registry as this node checks messages against it: every registration in the state store,
//! compiled once, ordered for selection.
//!
//! The state store is the truth; this is a cache of it, reloaded when the store's schema
//! generation moves ([`MessageStore::registry_generation`]: an applied schema write, a snapshot
//! installed, a cleared store). A reload recompiles only the documents that changed. So the check
//! on every publish costs an atomic load, a read lock and a walk of a pattern trie as deep as the
//! channel; only a channel some pattern matches has its payload parsed and validated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;

use super::{Failure, Mismatch, MismatchKind, MAX_FAILURES};
use crate::channel::{ChannelLimits, Pattern, SubscriptionTrie};
use crate::edge::validate::is_json;
use crate::error::{BrokerError, Reason};
use crate::message::{NewMessage, SchemaPolicy, SchemaRecord};
use crate::state::store::MessageStore;

/// One registration, compiled.
pub(crate) struct Registered {
    /// Its pattern, as registered.
    pub pattern: String,
    /// Its version.
    pub version: semver::Version,
    /// What the store holds for it.
    pub record: SchemaRecord,
    validator: Arc<jsonschema::Validator>,
}

impl Registered {
    /// The failures of `payload` (with `content_type`) against this schema: empty when it
    /// matches; at most [`MAX_FAILURES`].
    pub(crate) fn failures(&self, content_type: &str, payload: &[u8]) -> Vec<Failure> {
        failures(&self.validator, content_type, payload)
    }
}

/// The failures of a payload against `validator`: a schema describes a JSON document, so a
/// payload of another content type, or one that does not parse, fails as a whole.
pub(crate) fn failures(
    validator: &jsonschema::Validator,
    content_type: &str,
    payload: &[u8],
) -> Vec<Failure> {
    if !is_json(content_type) {
        return vec![Failure::new(
            "",
            "contentType",
            format!(
                "content type {content_type:?} is not JSON; the schema describes JSON payloads"
            ),
        )];
    }
    let instance: Value = match serde_json::from_slice(payload) {
        Ok(instance) => instance,
        Err(e) => return vec![Failure::new("", "json", format!("not JSON: {e}"))],
    };
    validator
        .iter_errors(&instance)
        .take(MAX_FAILURES)
        .map(|error| {
            Failure::new(
                error.instance_path().as_str(),
                error.kind().keyword(),
                error.to_string(),
            )
        })
        .collect()
}

/// Compiles a schema document.
///
/// # Errors
/// `SCHEMA_INVALID` when it is not JSON or not a valid JSON Schema (draft 2020-12, or the draft
/// its `$schema` names), or refers to a document outside itself.
pub(crate) fn compile(document: &str) -> Result<jsonschema::Validator, BrokerError> {
    let schema: Value = serde_json::from_str(document).map_err(|e| {
        BrokerError::invalid(
            Reason::SchemaInvalid,
            format!("the schema document is not JSON: {e}"),
        )
    })?;
    // Formats are asserted (a `"format": "email"` is checked), as a registrant who writes one
    // expects; remote references cannot be fetched (the broker has no HTTP client for them).
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| {
            BrokerError::invalid(
                Reason::SchemaInvalid,
                format!(
                    "the document is not a usable JSON Schema: {}",
                    crate::error::shorten_to(&e.to_string(), 300)
                ),
            )
        })
}

/// A registered pattern and its versions.
struct PatternSchemas {
    pattern: Pattern,
    specificity: Vec<u8>,
    /// Lowest version first.
    versions: Vec<Arc<Registered>>,
}

impl PatternSchemas {
    /// The registration for a message of `version`: the highest with its major at or below it.
    fn select(&self, version: &semver::Version) -> Option<&Arc<Registered>> {
        self.versions
            .iter()
            .rev()
            .find(|r| r.version.major == version.major && r.version <= *version)
    }
}

/// The registry at one schema generation.
struct Compiled {
    generation: u64,
    /// Most specific first.
    patterns: Vec<PatternSchemas>,
    /// Each pattern's place in `patterns`: the matching patterns of a channel are found in time
    /// proportional to its depth, not to the number of registrations.
    trie: SubscriptionTrie<usize>,
}

impl Compiled {
    /// The most specific registered pattern matching `channel`: the first in `patterns` order.
    fn matching(&self, channel: &str) -> Option<&PatternSchemas> {
        if self.patterns.is_empty() {
            return None;
        }
        let mut first: Option<usize> = None;
        self.trie.for_each_match(channel, |&place| {
            first = Some(first.map_or(place, |f| f.min(place)));
        });
        first.and_then(|place| self.patterns.get(place))
    }
}

/// This node's compiled registry; cheap to share (`Arc`).
pub(crate) struct SchemaRegistry {
    store: MessageStore,
    current: RwLock<Arc<Compiled>>,
    /// Held while reloading, so two publishes that find it stale compile once.
    reloading: Mutex<()>,
}

impl SchemaRegistry {
    /// A registry over `store`, loaded at its first use.
    pub(crate) fn new(store: MessageStore) -> SchemaRegistry {
        SchemaRegistry {
            store,
            current: RwLock::new(Arc::new(Compiled {
                // No generation is ever this, so the first use loads.
                generation: u64::MAX,
                patterns: Vec::new(),
                trie: SubscriptionTrie::new(),
            })),
            reloading: Mutex::new(()),
        }
    }

    /// Checks `message` against the registration that applies to it.
    ///
    /// # Returns
    /// `None` when it matches (or no schema applies, or the policy is `off`); the mismatch when
    /// the policy is `warn`, for the caller to announce.
    ///
    /// # Errors
    /// [`BrokerError::Schema`] for a mismatch under `enforce`; a store error when the registry
    /// could not be reloaded.
    pub(crate) fn check(&self, message: &NewMessage) -> Result<Option<Mismatch>, BrokerError> {
        let compiled = self.compiled()?;
        let Some(schemas) = compiled.matching(&message.channel) else {
            return Ok(None);
        };
        // The edge has checked the version is semver; one that is not has no schema.
        let version = semver::Version::parse(&message.schema_version).ok();
        let selected = version.as_ref().and_then(|v| schemas.select(v));
        judge(
            schemas,
            selected,
            &message.channel,
            &message.schema_version,
            |registered| Ok(registered.failures(&message.content_type, &message.payload)),
        )
    }

    /// Checks an entity as a write would leave it, made by `document` (a JSON object of its
    /// fields; called only when a schema applies),
    /// against the schema registered for its state channel `$state.<type>.<id>`: the most
    /// specific matching pattern's highest version (an entity write carries no schema version).
    ///
    /// # Returns
    /// As [`SchemaRegistry::check`].
    ///
    /// # Errors
    /// As [`SchemaRegistry::check`].
    pub(crate) fn check_entity(
        &self,
        state_channel: &str,
        document: impl FnOnce() -> Result<Vec<u8>, BrokerError>,
    ) -> Result<Option<Mismatch>, BrokerError> {
        let compiled = self.compiled()?;
        let Some(schemas) = compiled.matching(state_channel) else {
            return Ok(None);
        };
        let newest = schemas.versions.last();
        let version = newest.map_or(String::new(), |r| r.version.to_string());
        judge(schemas, newest, state_channel, &version, |registered| {
            Ok(registered.failures("application/json", &document()?))
        })
    }

    /// The registration a message on `channel` with `version` would be checked against, or the
    /// pattern that applies when no version does.
    ///
    /// # Errors
    /// A store error when the registry could not be reloaded.
    pub(crate) fn selected(
        &self,
        channel: &str,
        version: &semver::Version,
    ) -> Result<Selection, BrokerError> {
        let compiled = self.compiled()?;
        Ok(match compiled.matching(channel) {
            None => Selection::None,
            Some(schemas) => match schemas.select(version) {
                Some(registered) => Selection::Registered(Arc::clone(registered)),
                None => Selection::VersionUnknown {
                    pattern: schemas.pattern.as_str().to_owned(),
                },
            },
        })
    }

    /// The registry as of the store now, reloaded if the store's schemas changed since.
    fn compiled(&self) -> Result<Arc<Compiled>, BrokerError> {
        let generation = self.store.registry_generation();
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.generation == generation {
                return Ok(Arc::clone(&current));
            }
        }
        let _reloading = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let previous = Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()));
        let generation = self.store.registry_generation();
        if previous.generation == generation {
            return Ok(previous);
        }
        let compiled = Arc::new(self.load(generation, &previous)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&compiled);
        Ok(compiled)
    }

    /// Reads every registration from the store, reusing what `previous` compiled for a document
    /// that did not change.
    fn load(&self, generation: u64, previous: &Compiled) -> Result<Compiled, BrokerError> {
        let mut known: HashMap<(&str, String), &Arc<Registered>> = HashMap::new();
        for p in &previous.patterns {
            for r in &p.versions {
                known.insert((r.pattern.as_str(), r.version.to_string()), r);
            }
        }
        let mut by_pattern: HashMap<String, Vec<Arc<Registered>>> = HashMap::new();
        for entry in self.store.schemas() {
            let (pattern, version_text, record) = entry?;
            let reused = known
                .get(&(pattern.as_str(), version_text.clone()))
                .filter(|r| r.record.document == record.document)
                .map(|r| Arc::clone(&r.validator));
            let validator = match reused {
                Some(validator) => validator,
                None => match compile(&record.document) {
                    Ok(validator) => Arc::new(validator),
                    Err(e) => {
                        // The edge compiled it before proposing it, so only a document written
                        // by another version of the broker gets here.
                        tracing::error!(%pattern, version = %version_text, error = %e,
                            "a registered schema does not compile here; it is not applied");
                        continue;
                    }
                },
            };
            let Ok(version) = semver::Version::parse(&version_text) else {
                tracing::error!(%pattern, version = %version_text,
                    "a registered schema's version is not semver; it is not applied");
                continue;
            };
            by_pattern
                .entry(pattern.clone())
                .or_default()
                .push(Arc::new(Registered {
                    pattern,
                    version,
                    record,
                    validator,
                }));
        }
        // Registered patterns were checked at the edge; the widest limits parse any of them.
        let limits = ChannelLimits {
            max_len: usize::MAX,
            max_depth: usize::MAX,
        };
        let mut patterns = Vec::with_capacity(by_pattern.len());
        for (pattern, mut versions) in by_pattern {
            let Ok(parsed) = Pattern::parse(&pattern, &limits) else {
                tracing::error!(%pattern, "a registered schema's pattern does not parse; it is not applied");
                continue;
            };
            versions.sort_by(|a, b| a.version.cmp(&b.version));
            patterns.push(PatternSchemas {
                specificity: parsed.specificity(),
                pattern: parsed,
                versions,
            });
        }
        // Most specific first; equal specificity (patterns that never match the same channel,
        // like `a.*` and `b.*`) by name, so the order is the same on every node.
        patterns.sort_by(|a, b| {
            b.specificity
                .cmp(&a.specificity)
                .then_with(|| a.pattern.as_str().cmp(b.pattern.as_str()))
        });
        let mut trie = SubscriptionTrie::new();
        for (place, schemas) in patterns.iter().enumerate() {
            trie.insert(&schemas.pattern, place);
        }
        Ok(Compiled {
            generation,
            patterns,
            trie,
        })
    }
}

/// The verdict on a message on `channel` (of `message_version`) that met `schemas`, with
/// `selected` its registration (`None`: no version applies); `failures` checks the payload, and
/// is called only when a policy other than `off` applies (so a payload made on demand, such as
/// an entity read from the store, is made only then).
fn judge(
    schemas: &PatternSchemas,
    selected: Option<&Arc<Registered>>,
    channel: &str,
    message_version: &str,
    failures: impl FnOnce(&Registered) -> Result<Vec<Failure>, BrokerError>,
) -> Result<Option<Mismatch>, BrokerError> {
    let (policy, kind) = match selected {
        Some(registered) => {
            if registered.record.policy == SchemaPolicy::Off {
                return Ok(None);
            }
            let failures = failures(registered)?;
            if failures.is_empty() {
                return Ok(None);
            }
            (
                registered.record.policy,
                MismatchKind::Payload {
                    schema_version: registered.version.to_string(),
                    failures,
                },
            )
        }
        None => {
            // The newest registration speaks for the pattern.
            let Some(newest) = schemas.versions.last() else {
                return Ok(None);
            };
            if newest.record.policy == SchemaPolicy::Off {
                return Ok(None);
            }
            let registered = schemas
                .versions
                .iter()
                .map(|r| r.version.to_string())
                .collect();
            (
                newest.record.policy,
                MismatchKind::VersionUnknown { registered },
            )
        }
    };
    let mismatch = Mismatch {
        channel: channel.to_owned(),
        pattern: schemas.pattern.as_str().to_owned(),
        message_version: message_version.to_owned(),
        policy,
        kind,
    };
    match policy {
        SchemaPolicy::Enforce => Err(BrokerError::Schema(Box::new(mismatch))),
        SchemaPolicy::Warn | SchemaPolicy::Off => Ok(Some(mismatch)),
    }
}

/// Which registration applies to a channel and version.
pub(crate) enum Selection {
    /// No registered pattern matches the channel.
    None,
    /// This one.
    Registered(Arc<Registered>),
    /// `pattern` matches, but none of its versions applies to the message's version.
    VersionUnknown {
        /// The pattern.
        pattern: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `message` passes with nothing to report.
    fn passes(registry: &SchemaRegistry, message: &NewMessage) -> bool {
        matches!(registry.check(message), Ok(None))
    }

    fn temp_store() -> (tempfile::TempDir, MessageStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let store = MessageStore::open(&db, &dir.path().join("batches")).unwrap();
        (dir, store)
    }

    fn put(
        store: &MessageStore,
        pattern: &str,
        version: &str,
        document: &str,
        policy: SchemaPolicy,
    ) {
        let mut batch = crate::state::store::WriteBatch::default();
        let record = SchemaRecord {
            document: document.into(),
            policy,
            registered_at_us: 1,
            registered_by: None,
        };
        MessageStore::put_schema(&mut batch, pattern, version, Some(&record)).unwrap();
        store.apply(batch).unwrap();
    }

    fn message(channel: &str, version: &str, payload: &str) -> NewMessage {
        NewMessage {
            content_type: "application/json".into(),
            schema_version: version.into(),
            ..NewMessage::on_channel(channel, payload.as_bytes().to_vec().into())
        }
    }

    const NEEDS_ID: &str = r#"{"type":"object","required":["id"]}"#;
    const NEEDS_NAME: &str = r#"{"type":"object","required":["name"]}"#;
    const ANYTHING: &str = "{}";

    #[test]
    fn the_most_specific_pattern_wins_then_the_highest_version_at_or_below() {
        let (_dir, store) = temp_store();
        let registry = SchemaRegistry::new(store.clone());
        put(&store, "crm.>", "1.0.0", NEEDS_ID, SchemaPolicy::Enforce);
        put(
            &store,
            "crm.contact.*",
            "1.0.0",
            NEEDS_NAME,
            SchemaPolicy::Enforce,
        );
        put(
            &store,
            "crm.contact.*",
            "1.2.0",
            ANYTHING,
            SchemaPolicy::Enforce,
        );
        put(
            &store,
            "crm.contact.*",
            "2.0.0",
            NEEDS_ID,
            SchemaPolicy::Enforce,
        );
        put(
            &store,
            "crm.*.updated",
            "1.0.0",
            ANYTHING,
            SchemaPolicy::Enforce,
        );

        // `crm.contact.*` beats `crm.*.updated` and `crm.>`: 1.1.0 selects 1.0.0 (needs a name).
        let refused = registry
            .check(&message("crm.contact.updated", "1.1.0", r#"{"id":1}"#))
            .unwrap_err();
        let BrokerError::Schema(mismatch) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(mismatch.pattern, "crm.contact.*");
        assert_eq!(mismatch.schema_version(), "1.0.0");
        assert_eq!(mismatch.keyword(), "required");
        // 1.5.3 selects 1.2.0 (anything goes); 2.1.0 selects 2.0.0 (needs an id).
        assert!(passes(
            &registry,
            &message("crm.contact.updated", "1.5.3", "{}")
        ));
        assert!(registry
            .check(&message("crm.contact.updated", "2.1.0", "{}"))
            .is_err());
        // No version with major 3, none at or below 0.9.0: unknown.
        for version in ["3.0.0", "0.9.0"] {
            let e = registry
                .check(&message("crm.contact.updated", version, "{}"))
                .unwrap_err();
            assert_eq!(e.reason(), Reason::SchemaVersionUnknown, "{version}");
        }
        // `crm.*.updated` beats `crm.>` on another entity type.
        assert!(passes(
            &registry,
            &message("crm.deal.updated", "1.0.0", "{}")
        ));
        // Only `crm.>` matches here.
        assert!(registry
            .check(&message("crm.deal.won", "1.0.0", "{}"))
            .is_err());
        // Nothing matches: nothing to check.
        assert!(passes(&registry, &message("billing.x", "9.0.0", "[")));
    }

    #[test]
    fn warn_stores_and_reports_off_checks_nothing_and_non_json_fails_whole() {
        let (_dir, store) = temp_store();
        let registry = SchemaRegistry::new(store.clone());
        put(&store, "a.b", "1.0.0", NEEDS_ID, SchemaPolicy::Warn);
        put(&store, "a.c", "1.0.0", NEEDS_ID, SchemaPolicy::Off);
        let warned = registry.check(&message("a.b", "1.0.0", "{}")).unwrap();
        assert_eq!(
            warned.map(|m| m.keyword().to_owned()),
            Some("required".into())
        );
        assert!(passes(&registry, &message("a.c", "1.0.0", "{}")));
        put(&store, "a.b", "1.0.0", NEEDS_ID, SchemaPolicy::Enforce);
        let text = NewMessage {
            content_type: "text/plain".into(),
            ..message("a.b", "1.0.0", "hello")
        };
        let Err(BrokerError::Schema(mismatch)) = registry.check(&text) else {
            panic!("a text payload passed a JSON schema")
        };
        assert_eq!(mismatch.keyword(), "contentType");
    }

    #[test]
    fn failures_name_the_pointer_and_keyword_and_are_bounded() {
        let document = r#"{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"integer"},
            "c":{"type":"integer"},"d":{"type":"integer"},"e":{"type":"integer"},"f":{"type":"integer"},
            "g":{"type":"integer"}}}"#;
        let validator = compile(document).unwrap();
        let payload = br#"{"a":"x","b":"x","c":"x","d":"x","e":"x","f":"x","g":"x"}"#;
        let failures = failures(&validator, "application/json", payload);
        assert_eq!(failures.len(), MAX_FAILURES);
        assert!(failures.iter().all(|f| f.keyword == "type"));
        assert!(
            failures.iter().any(|f| f.instance_path == "/a"),
            "{failures:?}"
        );
    }

    #[test]
    fn a_document_that_is_no_schema_is_refused_and_draft_7_is_accepted() {
        for bad in [
            "[",
            r#"{"type":"nonsense"}"#,
            r#"{"$ref":"https://example.com/x.json"}"#,
        ] {
            let e = compile(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} compiled"));
            assert_eq!(e.reason(), Reason::SchemaInvalid, "{bad}");
        }
        let draft7 = r#"{"$schema":"http://json-schema.org/draft-07/schema#","type":"object",
            "required":["id"],"properties":{"id":{"type":"integer"}}}"#;
        let validator = compile(draft7).unwrap();
        assert!(failures(&validator, "application/json", br#"{"id":1}"#).is_empty());
        assert!(!failures(&validator, "application/json", br#"{"id":"1"}"#).is_empty());
    }

    #[test]
    fn a_change_in_the_store_is_seen_at_the_next_check() {
        let (_dir, store) = temp_store();
        let registry = SchemaRegistry::new(store.clone());
        assert!(passes(&registry, &message("a.b", "1.0.0", "{}")));
        put(&store, "a.b", "1.0.0", NEEDS_ID, SchemaPolicy::Enforce);
        assert!(registry.check(&message("a.b", "1.0.0", "{}")).is_err());
        let mut batch = crate::state::store::WriteBatch::default();
        MessageStore::put_schema(&mut batch, "a.b", "1.0.0", None).unwrap();
        store.apply(batch).unwrap();
        assert!(passes(&registry, &message("a.b", "1.0.0", "{}")));
    }

    #[test]
    fn hostile_documents_neither_loop_nor_backtrack_for_ever() {
        // A registrant's mistake must not hang every publish: cyclic references end, and a
        // catastrophic pattern is bounded by the regex engine.
        let cyclic = [
            r##"{"$ref":"#"}"##,
            r##"{"$defs":{"a":{"$ref":"#/$defs/a"}},"$ref":"#/$defs/a"}"##,
            r##"{"$defs":{"a":{"allOf":[{"$ref":"#/$defs/b"}]},"b":{"anyOf":[{"$ref":"#/$defs/a"}]}},"$ref":"#/$defs/a"}"##,
        ];
        for document in cyclic {
            let validator = compile(document).unwrap();
            assert!(failures(&validator, "application/json", br#"{"a":1}"#).is_empty());
        }
        let redos = compile(r#"{"properties":{"a":{"pattern":"^(a+)+$"}}}"#).unwrap();
        let payload = format!(r#"{{"a":"{}b"}}"#, "a".repeat(5000));
        let found = failures(&redos, "application/json", payload.as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].keyword, "pattern");
    }
}
