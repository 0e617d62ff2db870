//! `GET /v1/entities/{type}/{id}` with `ETag` and `If-None-Match` (→ 304 when any tag matches,
//! or `*`), and `PATCH` or `PUT`
//! with a JSON object of fields and `If-Match` (→ 412 when the entity has moved on). Both merge
//! the given fields; neither removes the others.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::entities_server::Entities as EntitiesRpc;

use super::error::HttpError;
use super::query::Query;
use super::{grpc_request, json, read_body, Gateway};
use crate::edge::entities::if_none_match;
use crate::error::{BrokerError, Reason};

/// Names the writer of an update in its stamp; the token's subject, else `http`, when absent.
const WRITER_HEADER: &str = "x-switchboard-writer";

fn entity_response(status: StatusCode, entity: &pb::Entity) -> Response {
    let mut response = json::response(status, &json::entity(entity));
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&entity.etag) {
        headers.insert(header::ETAG, etag);
    }
    // A browser must revalidate (If-None-Match) rather than reuse a stored copy unasked.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The first tag of an `If-Match` list, weak marker removed.
fn first_tag(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?;
    let tag = value.split(',').next()?.trim();
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    (!tag.is_empty()).then(|| tag.to_owned())
}

/// The version an `If-Match` names: the entity's ETag (`"v3"`) or the bare version (`3`, `"3"`).
/// `*` asks for no particular version.
fn expected_version(headers: &HeaderMap) -> Result<Option<u64>, BrokerError> {
    let Some(tag) = first_tag(headers, header::IF_MATCH) else {
        return Ok(None);
    };
    if tag == "*" {
        return Ok(None);
    }
    let bare = tag.trim_matches('"');
    let bare = bare.strip_prefix('v').unwrap_or(bare);
    bare.parse().map(Some).map_err(|_| {
        BrokerError::invalid(
            Reason::EntityFieldsInvalid,
            format!("If-Match must be the entity's ETag or version, got {tag:?}"),
        )
    })
}

/// `GET /v1/entities/{type}/{id}[?stale_ok=true]`.
pub(super) async fn get(
    State(gateway): State<Gateway>,
    Path((entity_type, id)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let query = Query::parse(parts.uri.query());
    // The entity is read whole and the condition checked here, so a 304 can name the ETag
    // that matched (the gRPC answer to a matching `if_none_match` carries no entity).
    let get = pb::GetEntityRequest {
        key: Some(pb::EntityKey {
            r#type: entity_type,
            id,
        }),
        if_none_match: String::new(),
        stale_ok: matches!(query.get("stale_ok"), Some("true" | "1")),
    };
    let answer = gateway
        .inner
        .entities
        .get_entity(grpc_request(&parts.headers, caller, get))
        .await?
        .into_inner();
    let entity = answer
        .entity
        .ok_or_else(|| BrokerError::Consensus("an entity read returned nothing".into()))?;
    let condition = parts
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    if if_none_match(&condition, &entity.etag) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        if let Ok(etag) = HeaderValue::from_str(&entity.etag) {
            response.headers_mut().insert(header::ETAG, etag);
        }
        // As on the 200 it stands for: a browser revalidates every time.
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }
    Ok(entity_response(StatusCode::OK, &entity))
}

/// `PATCH` or `PUT /v1/entities/{type}/{id}`: merges the body's fields; `If-Match` makes it a
/// compare-and-set on the version.
pub(super) async fn update(
    State(gateway): State<Gateway>,
    Path((entity_type, id)): Path<(String, String)>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let expected_version = expected_version(&parts.headers)?;
    let fields = read_body(&gateway, &parts.headers, body).await?;
    let writer = parts
        .headers
        .get(WRITER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| caller.subject().map(str::to_owned))
        .unwrap_or_else(|| "http".to_owned());
    let update = pb::UpdateEntityRequest {
        key: Some(pb::EntityKey {
            r#type: entity_type,
            id,
        }),
        fields,
        // Timestamp 0: the broker stamps the write as it applies it, after every stamp the
        // entity holds, so a write sent after another was acknowledged is never stale (an HTTP
        // client has no clock of its own to order its writes with).
        stamp: Some(pb::WriteStamp {
            timestamp_ms: 0,
            version: 0,
            writer,
        }),
        expected_version,
    };
    let answer = gateway
        .inner
        .entities
        .update_entity(grpc_request(&parts.headers, caller, update))
        .await?
        .into_inner();
    let entity = answer
        .entity
        .ok_or_else(|| BrokerError::Consensus("an entity write returned nothing".into()))?;
    Ok(entity_response(StatusCode::OK, &entity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_takes_an_etag_or_a_version() {
        let mut headers = HeaderMap::new();
        assert_eq!(expected_version(&headers).unwrap(), None);
        for (value, version) in [("\"v3\"", 3), ("W/\"v4\"", 4), ("5", 5), ("\"6\"", 6)] {
            headers.insert(header::IF_MATCH, HeaderValue::from_static(value));
            assert_eq!(
                expected_version(&headers).unwrap(),
                Some(version),
                "{value}"
            );
        }
        headers.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(expected_version(&headers).unwrap(), None);
        headers.insert(header::IF_MATCH, HeaderValue::from_static("\"abc\""));
        assert!(expected_version(&headers).is_err());
    }
}
