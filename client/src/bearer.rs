//! [`AuthChannel`]: tonic's `Channel` with the bearer token put on every call.
//!
//! The generated clients (`BrokerClient`, `EntitiesClient`) run over this service instead of the
//! bare channel. For each call it awaits a token from the client's [`TokenCache`] (so a call
//! may wait for the one fetch under way), sets `authorization: Bearer <token>`, and passes the
//! request on. The token used is kept in the response's extensions ([`TokenUsed`]) so that a
//! stream the broker later ends with `UNAUTHENTICATED TOKEN_EXPIRED` can report exactly that
//! token as refused; a call refused at once with `UNAUTHENTICATED` (the status in the response
//! headers) drops its token right here, so the next call fetches a new one.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::header::{HeaderValue, AUTHORIZATION};
use tonic::body::Body;
use tonic::transport::Channel;
use tower::Service;

use crate::auth::TokenCache;
use crate::error::Error;

/// The error type of [`AuthChannel`]: a transport error, or the [`tonic::Status`] of a token that
/// could not be had (tonic finds it in the box and hands it to the caller as is).
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The `grpc-status` value of `UNAUTHENTICATED`.
const GRPC_UNAUTHENTICATED: &[u8] = b"16";

/// A tonic `Channel` that authenticates every call with a token from a [`TokenCache`], or passes
/// calls through untouched when the client has no credentials.
#[derive(Clone, Debug)]
pub(crate) struct AuthChannel {
    channel: Channel,
    tokens: Option<Arc<TokenCache>>,
}

/// The token a call was sent with, in the extensions of its response.
#[derive(Clone)]
pub(crate) struct TokenUsed(pub(crate) Arc<str>);

/// The token is a credential: it stays out of debug output.
impl std::fmt::Debug for TokenUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenUsed(<redacted>)")
    }
}

impl AuthChannel {
    pub(crate) fn new(channel: Channel, tokens: Option<Arc<TokenCache>>) -> AuthChannel {
        AuthChannel { channel, tokens }
    }
}

impl Service<http::Request<Body>> for AuthChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The channel that was polled ready carries this call; a fresh clone (not ready yet)
        // stays behind for the next one.
        let fresh = self.channel.clone();
        let mut channel = std::mem::replace(&mut self.channel, fresh);
        let tokens = self.tokens.clone();
        Box::pin(async move {
            let Some(tokens) = tokens else {
                return channel.call(request).await.map_err(Into::into);
            };
            let token = tokens
                .get(false)
                .await
                .map_err(|error| Box::new(error.to_status()) as BoxError)?;
            let mut value =
                HeaderValue::try_from(format!("Bearer {}", token.value)).map_err(|_| {
                    Box::new(
                        Error::InvalidArgument(
                            "the bearer token has characters that cannot go in a header".to_owned(),
                        )
                        .to_status(),
                    ) as BoxError
                })?;
            value.set_sensitive(true);
            request.headers_mut().insert(AUTHORIZATION, value);
            let mut response = channel.call(request).await?;
            let refused = response
                .headers()
                .get("grpc-status")
                .is_some_and(|status| status.as_bytes() == GRPC_UNAUTHENTICATED);
            if refused {
                tokens.refused(&token.value);
            }
            response
                .extensions_mut()
                .insert(TokenUsed(token.value.into()));
            Ok(response)
        })
    }
}
