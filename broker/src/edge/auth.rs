//! The gate every public call passes before its handler runs: the browser-origin check, bearer
//! token authentication, and the call budgets. It turns the pure decisions of
//! [`crate::security`] into a [`Caller`] (a security concept, defined there) that handlers consult
//! for permissions, and bounds streams by the caller's token ([`TokenBound`]).
//!
//! The gate runs as a tonic interceptor, on the request's metadata alone, so a call without an
//! acceptable token is refused before its body is read. Health checks and server reflection are
//! not gated: load balancers and `grpcurl` need them, and they reveal nothing but the schema.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::{Future, Stream};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::Config;
use crate::error::BrokerError;
use crate::observability::{audit, metrics};
use crate::security::caller::Caller;
use crate::security::origin::OriginPolicy;
use crate::security::ratelimit::{RateKey, RateLimit, RateLimiter, DEFAULT_SHARDS};
use crate::security::token::{
    bearer_token, KeyConfig, TokenError, TokenVerifier, VerificationKey, VerifierSettings,
};

impl<S> TokenBound<S> {
    /// Ends `stream` with UNAUTHENTICATED `TOKEN_EXPIRED` once `caller`'s token expires (plus
    /// the leeway), so a long subscription cannot outlive its credentials; the client refreshes
    /// its token and resumes. Without a token, `stream` runs to its own end.
    pub(crate) fn new<T>(caller: &Caller, stream: S) -> TokenBound<S>
    where
        S: Stream<Item = Result<T, Status>> + Unpin,
    {
        let expiry =
            caller
                .stream_deadline()
                .zip(caller.principal())
                .map(|(deadline, principal)| {
                    let left = deadline
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    let exp = principal
                        .expires_at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    (Box::pin(tokio::time::sleep(left)), exp)
                });
        TokenBound {
            inner: stream,
            expiry,
            done: false,
        }
    }
}

/// A response stream that ends when its caller's token does (see [`TokenBound::new`]).
pub(crate) struct TokenBound<S> {
    inner: S,
    /// The timer, and the token's `exp` for the refusal.
    expiry: Option<(Pin<Box<tokio::time::Sleep>>, u64)>,
    done: bool,
}

impl<S, T> Stream for TokenBound<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some((timer, exp)) = &mut self.expiry {
            if timer.as_mut().poll(cx).is_ready() {
                let exp = *exp;
                self.done = true;
                let error = BrokerError::Unauthenticated(TokenError::Expired { exp });
                metrics::access_refused(error.reason());
                return Poll::Ready(Some(Err(error.into())));
            }
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(None) = next {
            self.done = true;
        }
        next
    }
}

/// The origin allow-list, the token verifier and the call budgets, built from the settings.
pub(crate) struct Gate {
    /// `None`: authentication is off.
    verifier: Option<TokenVerifier>,
    origins: OriginPolicy,
    per_principal: Option<RateLimiter<RateKey>>,
    per_connection: Option<RateLimiter<RateKey>>,
    leeway: Duration,
}

fn limiter(
    limit: RateLimit,
    max_tracked: usize,
    setting: &str,
) -> anyhow::Result<Option<RateLimiter<RateKey>>> {
    if limit.per_second == 0.0 {
        return Ok(None);
    }
    RateLimiter::new(limit, max_tracked, DEFAULT_SHARDS)
        .map(Some)
        .with_context(|| format!("invalid setting `{setting}`"))
}

impl Gate {
    /// Builds the gate, reading key files. `minted` is the token endpoint's own verification key
    /// and its issuer and audience, which are accepted beside the configured ones.
    ///
    /// # Errors
    /// A key file cannot be read or holds no usable key, or an origin entry does not parse.
    pub(crate) fn from_config(
        config: &Config,
        minted: Option<(VerificationKey, String, String)>,
    ) -> anyhow::Result<Gate> {
        let auth = &config.auth;
        let verifier = if auth.enabled() {
            let mut keys = Vec::new();
            if !auth.hs256_secret_file.as_os_str().is_empty() {
                let secret = KeyConfig::Hs256 {
                    kid: None,
                    secret: None,
                    secret_file: Some(auth.hs256_secret_file.clone()),
                };
                keys.extend(
                    secret
                        .load()
                        .context("invalid setting `auth.hs256_secret_file`")?,
                );
            }
            for (i, key) in auth.keys.iter().enumerate() {
                keys.extend(
                    key.load()
                        .with_context(|| format!("invalid setting `auth.keys[{i}]`"))?,
                );
            }
            let mut issuers = auth.issuers.clone();
            let mut audiences = auth.audiences.clone();
            if let Some((key, issuer, audience)) = minted {
                keys.push(key);
                if !issuers.is_empty() && !issuers.contains(&issuer) {
                    issuers.push(issuer);
                }
                if !audiences.contains(&audience) {
                    audiences.push(audience);
                }
            }
            let settings = VerifierSettings {
                issuers,
                audiences,
                leeway: auth.leeway,
                channel_limits: crate::channel::ChannelLimits {
                    max_len: config.limits.max_channel_len,
                    max_depth: config.limits.max_channel_depth,
                },
            };
            Some(TokenVerifier::new(keys, settings).context("invalid setting `auth.keys`")?)
        } else {
            None
        };
        let origins = OriginPolicy::parse(&config.origins.allow)
            .context("invalid setting `origins.allow`")?;
        let rates = &config.rate_limits;
        Ok(Gate {
            verifier,
            origins,
            per_principal: limiter(
                rates.per_principal,
                rates.max_tracked,
                "rate_limits.per_principal",
            )?,
            per_connection: limiter(
                rates.per_connection,
                rates.max_tracked,
                "rate_limits.per_connection",
            )?,
            leeway: auth.leeway,
        })
    }

    /// Establishes who makes `request`: a browser's `Origin` must be allowed, and with
    /// authentication on, the bearer token must verify. Spends one unit of the call budgets.
    ///
    /// # Errors
    /// PERMISSION_DENIED `ORIGIN_NOT_ALLOWED`, UNAUTHENTICATED with the token's reason, or
    /// RESOURCE_EXHAUSTED `RATE_LIMITED`.
    pub(crate) fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, BrokerError> {
        self.authenticate_headers(request.metadata().as_ref(), request.remote_addr())
    }

    /// [`Gate::authenticate`] for the headers of any HTTP request (the gateway's too), so gRPC
    /// and HTTP callers pass one and the same gate.
    ///
    /// # Errors
    /// As [`Gate::authenticate`].
    pub(crate) fn authenticate_headers(
        &self,
        headers: &http::HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, BrokerError> {
        self.check_origin_header(headers.get("origin"))?;
        let caller = match &self.verifier {
            None => Caller::anonymous(peer),
            Some(verifier) => {
                let header = match headers.get("authorization") {
                    None => return Err(BrokerError::Unauthenticated(TokenError::Missing)),
                    Some(value) => value.to_str().map_err(|_| {
                        BrokerError::Unauthenticated(TokenError::Malformed(
                            "the authorization value is not visible ASCII".into(),
                        ))
                    })?,
                };
                let token = bearer_token(header).map_err(BrokerError::Unauthenticated)?;
                let principal = verifier
                    .verify(token)
                    .map_err(BrokerError::Unauthenticated)?;
                let stream_deadline = principal.expires_at.checked_add(self.leeway);
                Caller::authenticated(principal, peer, stream_deadline)
            }
        };
        self.admit(&caller)?;
        Ok(caller)
    }

    /// A call from a browser (it carries `Origin`) must come from an allowed origin; calls from
    /// services carry none and pass.
    ///
    /// # Errors
    /// PERMISSION_DENIED `ORIGIN_NOT_ALLOWED`.
    pub(crate) fn check_origin<T>(&self, request: &Request<T>) -> Result<(), BrokerError> {
        self.check_origin_header(request.metadata().as_ref().get("origin"))
    }

    /// [`Gate::check_origin`] for the `Origin` header's value, if there is one.
    ///
    /// # Errors
    /// PERMISSION_DENIED `ORIGIN_NOT_ALLOWED`.
    pub(crate) fn check_origin_header(
        &self,
        origin: Option<&http::HeaderValue>,
    ) -> Result<(), BrokerError> {
        match origin {
            None => Ok(()),
            Some(origin) => {
                let origin = origin.to_str().unwrap_or("");
                if self.origins.allows(origin) {
                    Ok(())
                } else {
                    Err(BrokerError::OriginNotAllowed {
                        origin: crate::error::shorten(origin),
                    })
                }
            }
        }
    }

    /// Spends one unit of `caller`'s budgets: its principal's and its connection's.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED `RATE_LIMITED`, with the wait after which a retry succeeds.
    pub(crate) fn admit(&self, caller: &Caller) -> Result<(), BrokerError> {
        let now = Instant::now();
        if let (Some(limiter), Some(peer)) = (&self.per_connection, caller.peer()) {
            limiter
                .check(&RateKey::Connection(peer), now)
                .map_err(BrokerError::RateLimited)?;
        }
        if let (Some(limiter), Some(subject)) = (&self.per_principal, caller.subject()) {
            limiter
                .check(&RateKey::Principal(subject.to_owned()), now)
                .map_err(BrokerError::RateLimited)?;
        }
        Ok(())
    }

    /// Forgets the buckets that have refilled, so idle principals and closed connections cost
    /// nothing. Called periodically.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        for limiter in [&self.per_principal, &self.per_connection]
            .into_iter()
            .flatten()
        {
            limiter.sweep(now);
        }
    }
}

/// The gate as a tonic interceptor: refuses the call, or hands the handler its [`Caller`].
#[derive(Clone)]
pub(crate) struct GateInterceptor(pub Arc<Gate>);

impl Interceptor for GateInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.0.authenticate(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(error) => {
                metrics::access_refused(error.reason());
                // Refused before a principal was established or the call named anything.
                audit::refused(request.remote_addr(), None, None, &error);
                Err(error.into())
            }
        }
    }
}
