//! The HTTP/JSON and Server-Sent-Events gateway for browser widgets, served on the public listener
//! beside gRPC (docs/GATEWAY.md).
//!
//! Every endpoint calls the gRPC handlers themselves with the caller the gate established, so
//! validation, permissions, metrics and the audit log are the gRPC ones; only the framing differs.
//!
//! - [`cors`]: the origin check before every route, preflights and the CORS response headers.
//! - [`error`]: errors as JSON, with the HTTP status derived from the gRPC one.
//! - [`publish`]: `POST /v1/publish` and `POST /v1/publish/batch`.
//! - [`entities`]: `GET`, `PATCH` and `PUT /v1/entities/{type}/{id}` with ETags.
//! - [`schemas`]: the schema registry, `/v1/schemas…`.
//! - [`kpis`]: KPI views and their values, `/v1/kpis…`, with ETags and an SSE watch.
//! - [`sse`]: `GET /v1/subscribe` and `GET /v1/entities/watch` as event streams.

mod cors;
mod entities;
mod error;
mod json;
mod kpis;
mod publish;
mod query;
mod schemas;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use axum::Router;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpConnectInfo;

use crate::config::Config;
use crate::edge::auth::Gate;
use crate::edge::entities::EntitiesService;
use crate::edge::kpis::KpisService;
use crate::edge::schemas::SchemasService;
use crate::edge::BrokerService;
use crate::error::{BrokerError, Reason};
use crate::observability::{audit, metrics};
use crate::security::caller::Caller;
use error::HttpError;

/// What the gateway's handlers share; cheap to clone.
#[derive(Clone)]
pub(crate) struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    gate: Arc<Gate>,
    broker: BrokerService,
    entities: EntitiesService,
    schemas: SchemasService,
    kpis: KpisService,
    /// `Cache-Control` of a KPI reading: `max-age=N, stale-while-revalidate=M` from `[kpis]`.
    kpi_cache_control: HeaderValue,
    /// The largest request body read: a batch of messages at the payload limit, plus framing.
    max_body: usize,
    max_batch: usize,
    heartbeat: Duration,
}

impl Gateway {
    /// The gateway over the broker's gRPC services and its gate.
    pub(crate) fn new(config: &Config, gate: Arc<Gate>, broker: BrokerService) -> Gateway {
        let entities = broker.entities();
        let schemas = broker.schemas();
        let kpis = broker.kpis();
        let kpi_cache_control = HeaderValue::from_str(&format!(
            "max-age={}, stale-while-revalidate={}",
            config.kpis.http_max_age.as_secs(),
            config.kpis.http_stale_while_revalidate.as_secs()
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("no-cache"));
        let max_batch = config.gateway.max_batch;
        // JSON can spell a payload byte as up to six characters (`\u0000`); one message at the
        // limit must still fit, and a batch gets room for its messages' framing.
        let max_body = (config.limits.max_payload_bytes + config.limits.max_header_bytes) * 6
            + max_batch * 1024;
        Gateway {
            inner: Arc::new(Inner {
                gate,
                broker,
                entities,
                schemas,
                kpis,
                kpi_cache_control,
                max_body,
                max_batch,
                heartbeat: config.gateway.heartbeat,
            }),
        }
    }

    /// `grpc` (the gRPC services' routes) with the gateway's routes beside them, and the origin
    /// check and CORS around both: a gRPC-Web call from a browser needs CORS as a fetch does.
    pub(crate) fn around(self, grpc: Router) -> Router {
        grpc.merge(self.clone().routes())
            .layer(axum::middleware::from_fn_with_state(self, cors::check))
    }

    fn routes(self) -> Router {
        Router::new()
            .route("/v1/publish", post(publish::single))
            .route("/v1/publish/batch", post(publish::batch))
            .route("/v1/subscribe", get(sse::subscribe))
            .route("/v1/entities/watch", get(sse::watch))
            .route(
                "/v1/entities/{type}/{id}",
                get(entities::get)
                    .patch(entities::update)
                    .put(entities::update),
            )
            .route("/v1/schemas", get(schemas::list))
            .route("/v1/schemas/check", post(schemas::check))
            .route("/v1/schemas/{pattern}", get(schemas::newest))
            .route(
                "/v1/schemas/{pattern}/{version}",
                get(schemas::get).put(schemas::put).delete(schemas::delete),
            )
            .route("/v1/kpis", get(kpis::list))
            .route("/v1/kpis/{view}", get(kpis::get))
            .route("/v1/kpis/{view}/watch", get(kpis::watch))
            // Without this, an unknown /v1/ path would reach the gRPC fallback, whose answer
            // (HTTP 200 with grpc-status 12) a browser would take for success.
            .route("/v1/{*rest}", axum::routing::any(not_found))
            // A known path asked with another method: a JSON error like every other.
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(self)
    }

    fn gate(&self) -> &Gate {
        &self.inner.gate
    }

    /// Passes the request through the gate. A browser's `EventSource` cannot set headers, so a
    /// token may also come as the `access_token` query parameter when there is no
    /// `Authorization` header.
    fn caller(&self, parts: &Parts, query_token: Option<&str>) -> Result<Caller, HttpError> {
        let peer = peer(&parts.extensions);
        let mut headers = None;
        if let (Some(token), false) = (query_token, parts.headers.contains_key("authorization")) {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                BrokerError::Unauthenticated(crate::security::token::TokenError::Malformed(
                    "the access_token parameter is not visible ASCII".into(),
                ))
            })?;
            let mut with_token = parts.headers.clone();
            with_token.insert("authorization", value);
            headers = Some(with_token);
        }
        let headers = headers.as_ref().unwrap_or(&parts.headers);
        self.gate()
            .authenticate_headers(headers, peer)
            .map_err(|error| {
                metrics::access_refused(error.reason());
                audit::refused(peer, None, Some(parts.uri.path()), &error);
                HttpError::from(error)
            })
    }
}

/// Any other path under `/v1/`.
async fn not_found(request: axum::extract::Request) -> HttpError {
    HttpError::from(BrokerError::NotFound {
        reason: Reason::EndpointNotFound,
        message: format!(
            "no gateway endpoint at {} (see docs/GATEWAY.md)",
            crate::error::shorten(request.uri().path())
        ),
    })
}

/// A known path asked with a method it does not take.
async fn method_not_allowed(request: axum::extract::Request) -> HttpError {
    HttpError::from(BrokerError::Unsupported {
        reason: Reason::MethodNotAllowed,
        message: format!(
            "{} does not take {} (see docs/GATEWAY.md)",
            crate::error::shorten(request.uri().path()),
            crate::error::shorten(request.method().as_str()),
        ),
    })
}

/// The connection's remote address, as the tonic server recorded it (plain TCP or TLS).
fn peer(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// A gRPC request carrying the HTTP request's headers (trace context among them) and the caller,
/// as the gate's interceptor would have left it.
fn grpc_request<T>(headers: &HeaderMap, caller: Caller, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = MetadataMap::from_headers(headers.clone());
    request.extensions_mut().insert(caller);
    request
}

/// Reads a request body of at most `max_body` bytes. A body declared larger (`Content-Length`) is
/// refused before any of it is read, so a client that waits for `100 Continue` sends nothing.
async fn read_body(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<bytes::Bytes, HttpError> {
    let max = gateway.inner.max_body;
    let too_large = || {
        HttpError::from(BrokerError::invalid(
            Reason::PayloadTooLarge,
            format!("the request body is larger than {max} bytes"),
        ))
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        if is_length_limit(&e) {
            too_large()
        } else {
            HttpError::from(BrokerError::invalid(
                Reason::BodyMalformed,
                format!("the request body could not be read: {e}"),
            ))
        }
    })
}

/// Whether reading a body failed on its length limit (rather than on the connection).
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}
