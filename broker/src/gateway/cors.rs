//! CORS from the origin allow-list. A request whose `Origin` the gate refuses is answered 403
//! before any handler runs (a `text/plain` POST needs no preflight, so the check cannot rely on
//! one), with no `Access-Control-Allow-Origin`: the page can read nothing, not even the error.
//! An allowed origin is echoed exactly, never `*`.
//!
//! The check also wraps the gRPC routes, for gRPC-Web: a refused gRPC call is left to the gate's
//! interceptor, so its client gets a gRPC status (still without CORS headers).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::HttpError;
use super::Gateway;
use crate::observability::{audit, metrics};

/// The request headers a page may send (the preflight's answer).
const ALLOWED_HEADERS: &str = "authorization, content-type, if-match, if-none-match, \
    last-event-id, traceparent, x-switchboard-writer, x-grpc-web, x-user-agent, grpc-timeout";
/// What a page may call.
const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, OPTIONS";
/// The response headers a page may read besides the simple ones.
const EXPOSED_HEADERS: &str =
    "etag, retry-after, grpc-status, grpc-message, grpc-status-details-bin";
/// How long a browser may reuse a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The origin check and CORS headers around every gateway route.
pub(super) async fn check(
    State(gateway): State<Gateway>,
    request: Request,
    next: Next,
) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"));
    if let Err(error) = gateway.gate().check_origin_header(origin.as_ref()) {
        if grpc {
            return next.run(request).await;
        }
        metrics::access_refused(error.reason());
        audit::refused(
            super::peer(request.extensions()),
            None,
            Some(request.uri().path()),
            &error,
        );
        return HttpError::from(error).into_response();
    }
    let Some(origin) = origin else {
        // Not a browser (or a same-origin GET): no CORS headers are needed.
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOWED_HEADERS),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE),
        );
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED_HEADERS),
    );
    // Caches must not serve one origin's answer (with its CORS header) to another.
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    response
}
