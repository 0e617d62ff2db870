//! KPI views over HTTP (docs/KPIS.md#over-http): the `KpiService` reads as JSON and SSE.
//!
//! - `GET /v1/kpis`: the views the caller may read.
//! - `GET /v1/kpis/{view}?window=5m&windows=15&group=X`: the values, with `ETag` (the gRPC
//!   `etag`, quoted) and `Cache-Control: max-age, stale-while-revalidate` from `[kpis]`; a
//!   matching `If-None-Match` answers 304 with no body.
//! - `GET /v1/kpis/{view}/watch?…&min_interval_ms=`: the values now, then each change, as plain
//!   message events, throttled as `WatchKpis` is.
//!
//! Defining and dropping views stays on gRPC (`sb kpi`): a browser widget only reads.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use switchboard_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

use super::error::HttpError;
use super::query::Query;
use super::{json, sse, Gateway};
use crate::edge::auth::TokenBound;
use crate::edge::entities::if_none_match;
use crate::edge::kpis::KpiQuery;
use crate::error::{BrokerError, Reason};

/// A view's definition and backfill report.
fn view_json(view: &pb::View) -> Value {
    let backfill = view.backfill.unwrap_or_default();
    json!({
        "name": view.name,
        // Stored as JSON with its defaults filled in: shown as the JSON it is.
        "definition": serde_json::from_str::<Value>(&view.definition)
            .unwrap_or_else(|_| Value::String(view.definition.clone())),
        "defined_at": json::time(view.defined_at.as_ref()),
        "defined_by": view.defined_by,
        "backfill": {
            "messages_read": backfill.messages_read,
            "messages_counted": backfill.messages_counted,
            "first_offset": backfill.first_offset,
            "last_offset": backfill.last_offset,
            "truncated": backfill.truncated,
        },
    })
}

/// A group kind as the protobuf enum names it, without its prefix: `NAMED`, `MISSING`, `OTHER`.
fn kind_name(kind: i32) -> &'static str {
    let name = pb::KpiGroupKind::try_from(kind)
        .unwrap_or(pb::KpiGroupKind::Unspecified)
        .as_str_name();
    name.strip_prefix("KPI_GROUP_KIND_").unwrap_or(name)
}

fn measure_json(measure: &pb::KpiMeasure) -> Value {
    json!({
        "name": measure.name,
        "count": measure.count,
        "sum": measure.sum,
        "avg": measure.avg,
        "min": measure.min,
        "max": measure.max,
        "p50": measure.p50,
        "p90": measure.p90,
        "p95": measure.p95,
        "p99": measure.p99,
    })
}

/// The values as JSON, field for field as `GetKpisResponse` has them.
pub(super) fn values_json(values: &pb::GetKpisResponse) -> Value {
    let windows: Vec<Value> = values
        .windows
        .iter()
        .map(|window| {
            let groups: Vec<Value> = window
                .groups
                .iter()
                .map(|group| {
                    json!({
                        "kind": kind_name(group.kind),
                        "name": group.name,
                        "messages": group.messages,
                        "measures": group.measures.iter().map(measure_json).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "start": json::time(window.start.as_ref()),
                "end": json::time(window.end.as_ref()),
                "groups": groups,
            })
        })
        .collect();
    json!({
        "view": values.view,
        "window": values.window,
        "etag": values.etag,
        "windows": windows,
    })
}

/// What to read, from the path and the query string.
fn kpi_query(view: String, query: &Query) -> Result<KpiQuery, BrokerError> {
    Ok(KpiQuery {
        view,
        window: query.get("window").unwrap_or("").to_owned(),
        windows: query.number("windows", Reason::ViewInvalid)?.unwrap_or(0),
        group: query.get("group").unwrap_or("").to_owned(),
    })
}

/// The `ETag` header for a values' `etag`: the same opaque tag, quoted as HTTP wants it.
fn etag_header(etag: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("\"{etag}\"")).ok()
}

/// Whether the request's `If-None-Match` names `etag` (quoted, or bare as a lenient client may
/// send it), or is `*`.
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    let condition = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    !condition.is_empty()
        && (if_none_match(&condition, &format!("\"{etag}\"")) || if_none_match(&condition, etag))
}

/// `GET /v1/kpis`.
pub(super) async fn list(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let views = gateway.inner.kpis.list(&caller)?;
    let body: Vec<Value> = views.iter().map(view_json).collect();
    Ok(json::response(StatusCode::OK, &json!({ "views": body })))
}

/// `GET /v1/kpis/{view}`.
pub(super) async fn get(
    State(gateway): State<Gateway>,
    Path(view): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let query = kpi_query(view, &Query::parse(parts.uri.query()))?;
    let values = gateway.inner.kpis.read(&query, &caller).await?;
    let cache_control = gateway.inner.kpi_cache_control.clone();
    // Both answers carry the ETag and the caching terms, as RFC 9110 wants of a 304.
    let mut response = if not_modified(&parts.headers, &values.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json::response(StatusCode::OK, &values_json(&values))
    };
    let headers = response.headers_mut();
    if let Some(etag) = etag_header(&values.etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(header::CACHE_CONTROL, cache_control);
    // Whether a caller may read the view depends on its token: a browser that changes tokens
    // must not be served an answer its new token would be refused.
    headers.append(header::VARY, HeaderValue::from_static("authorization"));
    Ok(response)
}

/// A reading as a plain message event, so that `EventSource.onmessage` gets it; no id, since a
/// reconnecting watch starts from the values then, not from where it left off.
fn values_frame(event: pb::GetKpisResponse) -> Option<Bytes> {
    Some(sse::frame(None, None, &values_json(&event)))
}

/// `GET /v1/kpis/{view}/watch?window=&windows=&group=&min_interval_ms=`.
pub(super) async fn watch(
    State(gateway): State<Gateway>,
    Path(view): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, _) = request.into_parts();
    let query = Query::parse(parts.uri.query());
    let caller = gateway.caller(&parts, query.get("access_token"))?;
    let min_interval = query
        .number::<u64>("min_interval_ms", Reason::PolicyInvalid)?
        .map(std::time::Duration::from_millis);
    let kpi_query = kpi_query(view, &query)?;
    let receiver = gateway
        .inner
        .kpis
        .watch(kpi_query, min_interval, &caller)
        .await?;
    let events = ReceiverStream::new(receiver).map(|item| item.map_err(Status::from));
    // As on gRPC, the stream ends (TOKEN_EXPIRED) when the caller's token does.
    let events = TokenBound::new(&caller, Box::pin(events));
    Ok(sse::event_stream(
        events,
        values_frame,
        gateway.inner.heartbeat,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_match_the_quoted_tag_the_bare_one_or_any() {
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, "00ab"));
        for (condition, expected) in [
            ("\"00ab\"", true),
            ("W/\"00ab\"", true),
            ("00ab", true),
            ("\"x\", \"00ab\"", true),
            ("*", true),
            ("\"00ac\"", false),
            ("\"\"", false),
        ] {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static(condition));
            assert_eq!(not_modified(&headers, "00ab"), expected, "{condition}");
        }
    }

    #[test]
    fn values_keep_the_shape_of_the_response() {
        let values = pb::GetKpisResponse {
            not_modified: false,
            etag: "00ab".into(),
            view: "sales.calls".into(),
            window: "1m".into(),
            windows: vec![pb::KpiWindow {
                start: Some(prost_types::Timestamp {
                    seconds: 1_767_225_600,
                    nanos: 0,
                }),
                end: Some(prost_types::Timestamp {
                    seconds: 1_767_225_660,
                    nanos: 0,
                }),
                groups: vec![pb::KpiGroup {
                    kind: pb::KpiGroupKind::Named as i32,
                    name: "eu".into(),
                    messages: 2,
                    measures: vec![pb::KpiMeasure {
                        name: "seconds".into(),
                        count: 2,
                        sum: 3.5,
                        avg: Some(1.75),
                        min: Some(1.5),
                        max: Some(2.0),
                        ..Default::default()
                    }],
                }],
            }],
        };
        let json = values_json(&values);
        assert_eq!(json["etag"], json!("00ab"));
        let window = &json["windows"][0];
        assert_eq!(window["start"], json!("2026-01-01T00:00:00Z"));
        assert_eq!(window["end"], json!("2026-01-01T00:01:00Z"));
        let group = &window["groups"][0];
        assert_eq!(group["kind"], json!("NAMED"));
        assert_eq!(group["messages"], json!(2));
        let measure = &group["measures"][0];
        assert_eq!(measure["sum"], json!(3.5));
        assert_eq!(measure["avg"], json!(1.75));
        assert_eq!(measure["p50"], Value::Null);
    }
}
