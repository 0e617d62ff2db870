//! The schema registry over HTTP (docs/SCHEMAS.md): the `SchemaService` calls with JSON bodies.
//!
//! - `GET /v1/schemas[?pattern=P&documents=true]`: the registrations.
//! - `GET /v1/schemas/{pattern}`: the pattern's highest version; `GET /v1/schemas/{pattern}/{version}`.
//! - `PUT /v1/schemas/{pattern}/{version}` with `{"document": {...}, "policy": "warn",
//!   "require_compatible": true}`: registers it; the answer carries the compatibility report.
//! - `DELETE /v1/schemas/{pattern}/{version}`.
//! - `POST /v1/schemas/check` with `{"channel": …, "payload": …, "schema_version": …}`.
//!
//! A pattern's `>` is written `%3E` in a path (`telemetry.widget.%3E`).

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use switchboard_proto::v1 as pb;

use super::error::HttpError;
use super::query::Query;
use super::{json, read_body, Gateway};
use crate::edge::schemas;
use crate::message::SchemaPolicy;
use crate::schema::parse_policy;

/// A put's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    /// The JSON Schema document, as a JSON value (kept as sent).
    document: Box<RawValue>,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    require_compatible: bool,
}

/// A check's body: the fields of a publish that matter to its schema.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    channel: String,
    payload: Box<RawValue>,
    #[serde(default)]
    schema_version: String,
}

/// A policy number from the registry's answers as its name; the registry only answers known ones.
fn policy_name(policy: i32) -> &'static str {
    schemas::policy(policy).map_or("enforce", SchemaPolicy::as_str)
}

fn policy_number(name: &str) -> Result<i32, HttpError> {
    Ok(schemas::policy_message(parse_policy(name)?) as i32)
}

fn schema_json(schema: &pb::Schema) -> Value {
    let mut value = json!({
        "pattern": schema.pattern,
        "version": schema.version,
        "policy": policy_name(schema.policy),
        "registered_at": json::time(schema.registered_at.as_ref()),
        "registered_by": schema.registered_by,
    });
    if !schema.document.is_empty() {
        // Stored as sent, and checked as JSON before it was: shown as the JSON it is.
        value["document"] = serde_json::from_str(&schema.document)
            .unwrap_or_else(|_| Value::String(schema.document.clone()));
    }
    value
}

fn failures_json(failures: &[pb::SchemaFailure]) -> Value {
    failures
        .iter()
        .map(|f| {
            json!({
                "instance_path": f.instance_path,
                "keyword": f.keyword,
                "message": f.message,
            })
        })
        .collect()
}

fn report_json(report: &pb::CompatibilityReport) -> Value {
    json!({
        "checked": report.checked,
        "failing": report.failing,
        "truncated": report.truncated,
        "examples": report.examples.iter().map(|m| json!({
            "offset": m.offset,
            "channel": m.channel,
            "schema_version": m.schema_version,
            "failures": failures_json(&m.failures),
        })).collect::<Vec<_>>(),
    })
}

/// `GET /v1/schemas`.
pub(super) async fn list(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    gateway.caller(&parts, None)?;
    let query = Query::parse(parts.uri.query());
    let documents = matches!(query.get("documents"), Some("true" | "1"));
    let schemas = gateway
        .inner
        .schemas
        .list(query.get("pattern").unwrap_or(""), documents)?;
    let body: Vec<Value> = schemas.iter().map(schema_json).collect();
    Ok(json::response(StatusCode::OK, &json!({ "schemas": body })))
}

/// `GET /v1/schemas/{pattern}`: the highest version.
pub(super) async fn newest(
    State(gateway): State<Gateway>,
    Path(pattern): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    get_one(gateway, pattern, String::new(), request)
}

/// `GET /v1/schemas/{pattern}/{version}`.
pub(super) async fn get(
    State(gateway): State<Gateway>,
    Path((pattern, version)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    get_one(gateway, pattern, version, request)
}

fn get_one(
    gateway: Gateway,
    pattern: String,
    version: String,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    gateway.caller(&parts, None)?;
    let schema = gateway
        .inner
        .schemas
        .get(pb::GetSchemaRequest { pattern, version })?;
    Ok(json::response(StatusCode::OK, &schema_json(&schema)))
}

/// `PUT /v1/schemas/{pattern}/{version}`.
pub(super) async fn put(
    State(gateway): State<Gateway>,
    Path((pattern, version)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let body = read_body(&gateway, &parts.headers, body).await?;
    let body = json::parse::<PutBody>(&body)?;
    let document: Box<str> = body.document.into();
    let put = pb::PutSchemaRequest {
        pattern,
        version,
        document: document.into(),
        policy: policy_number(&body.policy)?,
        require_compatible: body.require_compatible,
    };
    let answer = gateway.inner.schemas.put(put, &caller).await?;
    let mut value = answer.schema.as_ref().map(schema_json).unwrap_or_default();
    value["replaced"] = Value::Bool(answer.replaced);
    if let Some(report) = &answer.compatibility {
        value["compatibility"] = report_json(report);
    }
    let status = if answer.replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json::response(status, &value))
}

/// `DELETE /v1/schemas/{pattern}/{version}`.
pub(super) async fn delete(
    State(gateway): State<Gateway>,
    Path((pattern, version)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    gateway
        .inner
        .schemas
        .delete(pb::DeleteSchemaRequest { pattern, version }, &caller)
        .await?;
    Ok(json::response(StatusCode::OK, &json!({ "deleted": true })))
}

/// `POST /v1/schemas/check`.
pub(super) async fn check(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    gateway.caller(&parts, None)?;
    let body = read_body(&gateway, &parts.headers, body).await?;
    let body = json::parse::<CheckBody>(&body)?;
    let payload: Box<str> = body.payload.into();
    let answer = gateway.inner.schemas.check(pb::CheckSchemaRequest {
        channel: body.channel,
        payload: String::from(payload).into_bytes().into(),
        content_type: "application/json".into(),
        schema_version: body.schema_version,
    })?;
    Ok(json::response(
        StatusCode::OK,
        &json!({
            "valid": answer.valid,
            "pattern": answer.pattern,
            "schema_version": answer.schema_version,
            "policy": policy_name(answer.policy),
            "reason": answer.reason,
            "failures": failures_json(&answer.failures),
        }),
    ))
}
