//! The payload schema registry (the `switchboard.v1.SchemaService`; docs/SCHEMAS.md).

use switchboard_proto::v1::{
    CheckSchemaRequest, CheckSchemaResponse, DeleteSchemaRequest, GetSchemaRequest,
    ListSchemasRequest, PutSchemaRequest, PutSchemaResponse, Schema, SchemaPolicy,
};

use crate::{Client, Error};

/// A schema to register: [`SchemaPut::new`] with the pattern, version and document, then the
/// options.
#[derive(Debug, Clone)]
pub struct SchemaPut {
    request: PutSchemaRequest,
}

impl SchemaPut {
    /// Registers `document` (a JSON Schema, draft 2020-12 or the draft its `$schema` names) for
    /// channels matching `pattern` at semver `version`, enforced.
    pub fn new(
        pattern: impl Into<String>,
        version: impl Into<String>,
        document: impl Into<String>,
    ) -> SchemaPut {
        SchemaPut {
            request: PutSchemaRequest {
                pattern: pattern.into(),
                version: version.into(),
                document: document.into(),
                policy: SchemaPolicy::Enforce as i32,
                require_compatible: false,
            },
        }
    }

    /// How the schema treats a message that does not match it (enforce by default).
    pub fn policy(mut self, policy: SchemaPolicy) -> SchemaPut {
        self.request.policy = policy as i32;
        self
    }

    /// Refuse the registration (`SCHEMA_INCOMPATIBLE`) when a retained message it would judge
    /// fails it.
    pub fn require_compatible(mut self) -> SchemaPut {
        self.request.require_compatible = true;
        self
    }
}

impl Client {
    /// Registers a schema; the answer carries the compatibility report.
    ///
    /// # Errors
    /// `SCHEMA_INVALID`, `SCHEMA_INCOMPATIBLE`, `SCHEMA_LIMIT`, `SCHEMA_DENIED`, or the call's.
    pub async fn schema_put(&self, put: SchemaPut) -> Result<PutSchemaResponse, Error> {
        Ok(self
            .schemas_grpc()
            .put_schema(put.request)
            .await?
            .into_inner())
    }

    /// One registration; `version` empty for the pattern's highest.
    ///
    /// # Errors
    /// `SCHEMA_NOT_FOUND`, or the call's.
    pub async fn schema_get(&self, pattern: &str, version: &str) -> Result<Schema, Error> {
        let request = GetSchemaRequest {
            pattern: pattern.to_owned(),
            version: version.to_owned(),
        };
        let answer = self.schemas_grpc().get_schema(request).await?.into_inner();
        // A broker always answers with the schema; an empty one stands in for a broken answer.
        Ok(answer.schema.unwrap_or_default())
    }

    /// The registrations (of `pattern` when not empty), most specific pattern first.
    ///
    /// # Errors
    /// The call's.
    pub async fn schema_list(
        &self,
        pattern: &str,
        include_documents: bool,
    ) -> Result<Vec<Schema>, Error> {
        let request = ListSchemasRequest {
            pattern: pattern.to_owned(),
            include_documents,
        };
        Ok(self
            .schemas_grpc()
            .list_schemas(request)
            .await?
            .into_inner()
            .schemas)
    }

    /// Removes a registration.
    ///
    /// # Errors
    /// `SCHEMA_NOT_FOUND`, `SCHEMA_DENIED`, or the call's.
    pub async fn schema_delete(&self, pattern: &str, version: &str) -> Result<(), Error> {
        let request = DeleteSchemaRequest {
            pattern: pattern.to_owned(),
            version: version.to_owned(),
        };
        self.schemas_grpc().delete_schema(request).await?;
        Ok(())
    }

    /// Checks a payload against the schema a publish would meet, without publishing.
    ///
    /// # Errors
    /// The refusal the publish would get before its schema check, or the call's.
    pub async fn schema_check(
        &self,
        request: CheckSchemaRequest,
    ) -> Result<CheckSchemaResponse, Error> {
        Ok(self
            .schemas_grpc()
            .check_schema(request)
            .await?
            .into_inner())
    }
}
