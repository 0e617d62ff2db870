//! The `switchboard.v1.SchemaService`: the payload schema registry (docs/SCHEMAS.md).
//!
//! A put is checked whole here before it is proposed — the pattern, the version, the document
//! compiled, the registry's bound, the compatibility report — so apply only stores what the edge
//! accepted. Reads come from this node's store; the checks publishes meet come from its compiled
//! [`Registry`](crate::schema::SchemaRegistry).

use std::sync::Arc;

use switchboard_proto::v1 as pb;
use switchboard_proto::v1::schema_service_server::SchemaService as SchemaRpc;
use tonic::{Request, Response, Status};

use super::{convert, Edge};
use crate::error::{BrokerError, Reason};
use crate::message::{now_us, Item, ItemOutcome, SchemaPolicy, SchemaRecord, SchemaWrite};
use crate::schema::registry::{compile, Selection};
use crate::schema::{compat, Failure};
use crate::security::caller::Caller;

/// Longest schema version string, as for a message's.
const MAX_VERSION_LEN: usize = 64;

/// The `switchboard.v1.SchemaService`; cheap to clone.
#[derive(Clone)]
pub(crate) struct SchemasService {
    edge: Arc<Edge>,
}

impl SchemasService {
    pub(super) fn new(edge: Arc<Edge>) -> SchemasService {
        SchemasService { edge }
    }

    /// Validates a put and proposes it; the stored registration and the compatibility report.
    ///
    /// # Errors
    /// A refusal with its reason; nothing is written then.
    pub(crate) async fn put(
        &self,
        request: pb::PutSchemaRequest,
        caller: &Caller,
    ) -> Result<pb::PutSchemaResponse, BrokerError> {
        let edge = &self.edge;
        let limits = &edge.config.schemas;
        let pattern = edge.validator.pattern(&request.pattern)?;
        let version = version(&request.version)?;
        caller.check_schema(&format!("schema {} {}", pattern.as_str(), version))?;
        let policy = policy(request.policy)?;
        if request.document.len() > limits.max_document_bytes {
            return Err(BrokerError::invalid(
                Reason::SchemaInvalid,
                format!(
                    "the schema document is {} bytes; at most {} (schemas.max_document_bytes)",
                    request.document.len(),
                    limits.max_document_bytes
                ),
            ));
        }
        super::validate::check_json(request.document.as_bytes()).map_err(|e| {
            BrokerError::invalid(
                Reason::SchemaInvalid,
                format!("the schema document is not JSON: {e}"),
            )
        })?;
        let validator = compile(&request.document)?;
        let replacing = edge.store.schema(pattern.as_str(), &version.to_string())?;
        if replacing.is_none() {
            let count = edge.store.schemas().count();
            if count >= limits.max_registrations {
                return Err(BrokerError::Exhausted {
                    reason: Reason::SchemaLimit,
                    message: format!(
                        "the registry holds {count} schemas; at most {} \
                         (schemas.max_registrations): delete one first",
                        limits.max_registrations
                    ),
                });
            }
        }
        let report = {
            let store = edge.store.clone();
            let pattern = pattern.clone();
            let major = version.major;
            let sample = limits.compatibility_sample;
            tokio::task::spawn_blocking(move || {
                compat::check(&store, &pattern, major, &validator, sample, now_us())
            })
            .await
            .map_err(|e| BrokerError::Storage(format!("the compatibility check failed: {e}")))??
        };
        if request.require_compatible && report.failing > 0 {
            let first = report.examples.first().map_or(String::new(), |m| {
                let why = m.failures.first().map_or("", |f| f.message.as_str());
                format!(
                    "; the newest, offset {} on {}, fails: {why}",
                    m.offset, m.channel
                )
            });
            return Err(BrokerError::Precondition {
                reason: Reason::SchemaIncompatible,
                message: format!(
                    "{} of the {} newest retained messages it would judge fail this schema{first}",
                    report.failing, report.checked
                ),
            });
        }
        let registered_by = caller.owner();
        let write = SchemaWrite::Put {
            pattern: pattern.as_str().to_owned(),
            version: version.to_string(),
            document: request.document.clone(),
            policy,
            registered_by: registered_by.clone(),
        };
        let (replaced, registered_at_us) = match edge.proposer.propose(Item::Schema(write)).await? {
            ItemOutcome::Schema {
                existed,
                applied_at_us,
            } => (existed, applied_at_us),
            other => {
                return Err(BrokerError::Consensus(format!(
                    "a schema write was applied as {other:?}"
                )))
            }
        };
        let record = SchemaRecord {
            document: request.document,
            policy,
            registered_at_us,
            registered_by,
        };
        self.applied_here(pattern.as_str(), &version.to_string(), Some(&record))
            .await;
        Ok(pb::PutSchemaResponse {
            schema: Some(schema_message(
                pattern.as_str(),
                &version.to_string(),
                record,
                true,
            )),
            replaced,
            compatibility: Some(report_message(report)),
        })
    }

    /// Removes a registration.
    ///
    /// # Errors
    /// `SCHEMA_NOT_FOUND` when there was none; a refusal with its reason.
    pub(crate) async fn delete(
        &self,
        request: pb::DeleteSchemaRequest,
        caller: &Caller,
    ) -> Result<pb::DeleteSchemaResponse, BrokerError> {
        let edge = &self.edge;
        let pattern = edge.validator.pattern(&request.pattern)?;
        let version = version(&request.version)?;
        caller.check_schema(&format!("schema {} {}", pattern.as_str(), version))?;
        let write = SchemaWrite::Delete {
            pattern: pattern.as_str().to_owned(),
            version: version.to_string(),
        };
        match edge.proposer.propose(Item::Schema(write)).await? {
            ItemOutcome::Schema { existed: true, .. } => {
                self.applied_here(pattern.as_str(), &version.to_string(), None)
                    .await;
                Ok(pb::DeleteSchemaResponse {})
            }
            ItemOutcome::Schema { existed: false, .. } => {
                Err(not_found(pattern.as_str(), &version))
            }
            other => Err(BrokerError::Consensus(format!(
                "a schema write was applied as {other:?}"
            ))),
        }
    }

    /// Waits until this node's store holds `record` for `pattern` at `version` (`None`: no
    /// registration), so the caller's next publish here meets what it just registered
    /// ([`Edge::applied_here`]).
    async fn applied_here(&self, pattern: &str, version: &str, record: Option<&SchemaRecord>) {
        self.edge
            .applied_here(|| match self.edge.store.schema(pattern, version) {
                Ok(stored) => {
                    stored.as_ref().map(|s| (&s.document, s.policy))
                        == record.map(|r| (&r.document, r.policy))
                }
                Err(_) => false,
            })
            .await;
    }

    /// Reads one registration (the pattern's highest version when none is named).
    ///
    /// # Errors
    /// `SCHEMA_NOT_FOUND`, or a bad pattern or version.
    pub(crate) fn get(&self, request: pb::GetSchemaRequest) -> Result<pb::Schema, BrokerError> {
        let pattern = self.edge.validator.pattern(&request.pattern)?;
        if request.version.is_empty() {
            let newest = self
                .list(pattern.as_str(), true)?
                .into_iter()
                .next_back()
                .ok_or_else(|| BrokerError::NotFound {
                    reason: Reason::SchemaNotFound,
                    message: format!("no schema is registered for {:?}", pattern.as_str()),
                })?;
            return Ok(newest);
        }
        let version = version(&request.version)?;
        let record = self
            .edge
            .store
            .schema(pattern.as_str(), &version.to_string())?
            .ok_or_else(|| not_found(pattern.as_str(), &version))?;
        Ok(schema_message(
            pattern.as_str(),
            &version.to_string(),
            record,
            true,
        ))
    }

    /// Every registration (of `only` when not empty), most specific pattern first, lowest
    /// version first within a pattern.
    ///
    /// # Errors
    /// The store's error.
    pub(crate) fn list(&self, only: &str, documents: bool) -> Result<Vec<pb::Schema>, BrokerError> {
        let limits = crate::channel::ChannelLimits {
            max_len: usize::MAX,
            max_depth: usize::MAX,
        };
        let mut all = Vec::new();
        for entry in self.edge.store.schemas() {
            let (pattern, version, record) = entry?;
            if !only.is_empty() && pattern != only {
                continue;
            }
            let specificity = crate::channel::Pattern::parse(&pattern, &limits)
                .map(|p| p.specificity())
                .unwrap_or_default();
            let parsed = semver::Version::parse(&version).ok();
            all.push((specificity, parsed, pattern, version, record));
        }
        all.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| a.2.cmp(&b.2))
                .then_with(|| a.1.cmp(&b.1))
        });
        Ok(all
            .into_iter()
            .map(|(_, _, pattern, version, record)| {
                schema_message(&pattern, &version, record, documents)
            })
            .collect())
    }

    /// What a publish with the request's fields would meet.
    ///
    /// # Errors
    /// The refusal the publish would get before its schema check (a bad channel, a payload that
    /// is not JSON, …).
    pub(crate) fn check(
        &self,
        request: pb::CheckSchemaRequest,
    ) -> Result<pb::CheckSchemaResponse, BrokerError> {
        let edge = &self.edge;
        let message = edge.validator.publish(pb::PublishRequest {
            channel: request.channel,
            payload: request.payload,
            content_type: request.content_type,
            schema_version: request.schema_version,
            ..Default::default()
        })?;
        let mut answer = pb::CheckSchemaResponse {
            valid: true,
            ..Default::default()
        };
        let Ok(version) = semver::Version::parse(&message.schema_version) else {
            return Ok(answer);
        };
        match edge.schemas.selected(&message.channel, &version)? {
            Selection::None => {}
            Selection::Registered(registered) => {
                answer.pattern = registered.pattern.clone();
                answer.schema_version = registered.version.to_string();
                answer.policy = policy_message(registered.record.policy) as i32;
                let failures = registered.failures(&message.content_type, &message.payload);
                if !failures.is_empty() {
                    // Under `warn` the publish passes (and is announced as drift).
                    answer.valid = registered.record.policy != SchemaPolicy::Enforce;
                    answer.reason = Reason::SchemaMismatch.as_str().to_owned();
                    answer.failures = failures.into_iter().map(failure_message).collect();
                }
            }
            Selection::VersionUnknown { pattern } => {
                let newest = self.list(&pattern, false)?.into_iter().next_back();
                let policy = newest.map_or(pb::SchemaPolicy::Enforce as i32, |s| s.policy);
                answer.valid = policy != pb::SchemaPolicy::Enforce as i32;
                answer.pattern = pattern;
                answer.policy = policy;
                answer.reason = Reason::SchemaVersionUnknown.as_str().to_owned();
            }
        }
        Ok(answer)
    }
}

fn not_found(pattern: &str, version: &semver::Version) -> BrokerError {
    BrokerError::NotFound {
        reason: Reason::SchemaNotFound,
        message: format!("no schema is registered for {pattern:?} at version {version}"),
    }
}

/// A registration's version: semver, as a message's.
fn version(version: &str) -> Result<semver::Version, BrokerError> {
    if version.len() > MAX_VERSION_LEN {
        return Err(BrokerError::invalid(
            Reason::SchemaInvalid,
            format!("the version is longer than {MAX_VERSION_LEN} bytes"),
        ));
    }
    semver::Version::parse(version).map_err(|e| {
        BrokerError::invalid(
            Reason::SchemaInvalid,
            format!(
                "version {:?} is not semver like \"1.2.0\": {e}",
                crate::error::shorten(version)
            ),
        )
    })
}

/// A policy as the protobuf enum's number; unset is enforce.
///
/// # Errors
/// `SCHEMA_INVALID` for a number the enum does not name.
pub(crate) fn policy(policy: i32) -> Result<SchemaPolicy, BrokerError> {
    match pb::SchemaPolicy::try_from(policy) {
        Ok(pb::SchemaPolicy::Unspecified | pb::SchemaPolicy::Enforce) => Ok(SchemaPolicy::Enforce),
        Ok(pb::SchemaPolicy::Warn) => Ok(SchemaPolicy::Warn),
        Ok(pb::SchemaPolicy::Off) => Ok(SchemaPolicy::Off),
        Err(_) => Err(BrokerError::invalid(
            Reason::SchemaInvalid,
            format!("policy {policy} is not a SchemaPolicy"),
        )),
    }
}

/// A policy as the protobuf enum.
pub(crate) fn policy_message(policy: SchemaPolicy) -> pb::SchemaPolicy {
    match policy {
        SchemaPolicy::Enforce => pb::SchemaPolicy::Enforce,
        SchemaPolicy::Warn => pb::SchemaPolicy::Warn,
        SchemaPolicy::Off => pb::SchemaPolicy::Off,
    }
}

fn schema_message(
    pattern: &str,
    version: &str,
    record: SchemaRecord,
    document: bool,
) -> pb::Schema {
    pb::Schema {
        pattern: pattern.to_owned(),
        version: version.to_owned(),
        policy: policy_message(record.policy) as i32,
        registered_at: Some(convert::timestamp(record.registered_at_us)),
        registered_by: convert::owner_text(record.registered_by.as_ref()),
        document: if document {
            record.document
        } else {
            String::new()
        },
    }
}

pub(crate) fn failure_message(failure: Failure) -> pb::SchemaFailure {
    pb::SchemaFailure {
        instance_path: failure.instance_path,
        keyword: failure.keyword,
        message: failure.message,
    }
}

fn report_message(report: compat::Report) -> pb::CompatibilityReport {
    pb::CompatibilityReport {
        checked: report.checked,
        failing: report.failing,
        truncated: report.truncated,
        examples: report
            .examples
            .into_iter()
            .map(|m| pb::FailingMessage {
                offset: m.offset,
                channel: m.channel,
                schema_version: m.schema_version,
                failures: m.failures.into_iter().map(failure_message).collect(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl SchemaRpc for SchemasService {
    async fn put_schema(
        &self,
        request: Request<pb::PutSchemaRequest>,
    ) -> Result<Response<pb::PutSchemaResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(
            self.put(request.into_inner(), &caller).await?,
        ))
    }

    async fn get_schema(
        &self,
        request: Request<pb::GetSchemaRequest>,
    ) -> Result<Response<pb::GetSchemaResponse>, Status> {
        Caller::of(request.extensions())?;
        let schema = self.get(request.into_inner())?;
        Ok(Response::new(pb::GetSchemaResponse {
            schema: Some(schema),
        }))
    }

    async fn list_schemas(
        &self,
        request: Request<pb::ListSchemasRequest>,
    ) -> Result<Response<pb::ListSchemasResponse>, Status> {
        Caller::of(request.extensions())?;
        let request = request.into_inner();
        let schemas = self.list(&request.pattern, request.include_documents)?;
        Ok(Response::new(pb::ListSchemasResponse { schemas }))
    }

    async fn delete_schema(
        &self,
        request: Request<pb::DeleteSchemaRequest>,
    ) -> Result<Response<pb::DeleteSchemaResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(
            self.delete(request.into_inner(), &caller).await?,
        ))
    }

    async fn check_schema(
        &self,
        request: Request<pb::CheckSchemaRequest>,
    ) -> Result<Response<pb::CheckSchemaResponse>, Status> {
        Caller::of(request.extensions())?;
        Ok(Response::new(self.check(request.into_inner())?))
    }
}
