//! The `switchboard.v1.Auth` service: client credentials in, a short-lived scoped token out.
//!
//! Checking a secret is an argon2id hash, slow on purpose, so the endpoint guards the broker from
//! its own cost: calls are rate-limited per client id and per connection before any hashing, at
//! most `max_concurrent_checks` hashes run at once (on blocking threads, never on the runtime's),
//! and at most `max_waiting_checks` calls queue for one; beyond that the call is refused at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::auth_server::Auth as AuthRpc;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use super::auth::Gate;
use super::convert;
use crate::config::{Config, SigningKind};
use crate::error::{BrokerError, Reason};
use crate::observability::{audit, metrics};
use crate::security::credentials::{ClientRegistry, MintRequest, MinterSettings, TokenMinter};
use crate::security::permissions::{EntitySpec, PermissionSpec};
use crate::security::ratelimit::{RateKey, RateLimiter, DEFAULT_SHARDS};
use crate::security::token::VerificationKey;

/// Client ids and connections whose request budgets are tracked at once.
const MAX_TRACKED: usize = 10_000;

/// The configured clients, the signing key and the guards around the hashing.
struct Endpoint {
    clients: Arc<ClientRegistry>,
    minter: TokenMinter,
    checks: Arc<Semaphore>,
    /// Calls hashing or waiting to; at most `max_pending`.
    pending: AtomicUsize,
    max_pending: usize,
    budgets: Option<RateLimiter<RateKey>>,
}

/// The `switchboard.v1.Auth` service; cheap to clone.
#[derive(Clone)]
pub(crate) struct AuthService {
    /// `None`: no clients are configured and every call is UNIMPLEMENTED.
    endpoint: Option<Arc<Endpoint>>,
    gate: Arc<Gate>,
}

/// The key minted tokens verify with, and their issuer and audience, for the gate.
pub(crate) type MintedTokens = (VerificationKey, String, String);

impl AuthService {
    /// Builds the endpoint from the settings (reading the signing key, checking the clients), and
    /// returns what the gate must accept of its tokens. The `gate` is only for origin checks and
    /// can be built after this; see [`PreparedEndpoint::with_gate`].
    ///
    /// # Errors
    /// The signing key cannot be read or used, or a client's configuration is invalid.
    pub(crate) fn prepare(
        config: &Config,
    ) -> anyhow::Result<(PreparedEndpoint, Option<MintedTokens>)> {
        let settings = &config.auth.token_endpoint;
        if settings.clients.is_empty() {
            return Ok((PreparedEndpoint(None), None));
        }
        let limits = crate::channel::ChannelLimits {
            max_len: config.limits.max_channel_len,
            max_depth: config.limits.max_channel_depth,
        };
        let clients = ClientRegistry::new(&settings.clients, &limits)
            .context("invalid setting `auth.token_endpoint.clients`")?;
        let key = std::fs::read(&settings.signing_key_file).with_context(|| {
            format!(
                "cannot read auth.token_endpoint.signing_key_file {}",
                settings.signing_key_file.display()
            )
        })?;
        let minter_settings = MinterSettings {
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        };
        let minter = match settings.signing_key {
            SigningKind::Hs256 => TokenMinter::hs256(key.trim_ascii(), None, minter_settings),
            SigningKind::Eddsa => TokenMinter::eddsa_pem(&key, None, minter_settings),
        }
        .context("invalid setting `auth.token_endpoint.signing_key_file`")?;
        let minted = (
            minter.verification_key().clone(),
            settings.issuer.clone(),
            settings.audience.clone(),
        );
        let budgets = if settings.per_client.per_second == 0.0 {
            None
        } else {
            Some(
                RateLimiter::new(settings.per_client, MAX_TRACKED, DEFAULT_SHARDS)
                    .context("invalid setting `auth.token_endpoint.per_client`")?,
            )
        };
        let endpoint = Endpoint {
            clients: Arc::new(clients),
            minter,
            checks: Arc::new(Semaphore::new(settings.max_concurrent_checks)),
            pending: AtomicUsize::new(0),
            max_pending: settings.max_concurrent_checks + settings.max_waiting_checks,
            budgets,
        };
        Ok((PreparedEndpoint(Some(Arc::new(endpoint))), Some(minted)))
    }
}

/// A token endpoint built before the gate that must trust its tokens.
pub(crate) struct PreparedEndpoint(Option<Arc<Endpoint>>);

impl PreparedEndpoint {
    /// The service, with the gate whose origin checks it applies.
    pub(crate) fn with_gate(self, gate: Arc<Gate>) -> AuthService {
        AuthService {
            endpoint: self.0,
            gate,
        }
    }
}

/// Counts a call as pending until it returns or is dropped.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn scope_spec(scope: pb::Scope) -> PermissionSpec {
    PermissionSpec {
        publish: scope.publish,
        subscribe: scope.subscribe,
        entities: EntitySpec {
            read: scope.entity_read,
            update: scope.entity_update,
        },
        admin: scope.admin,
    }
}

fn scope_message(spec: PermissionSpec) -> pb::Scope {
    pb::Scope {
        publish: spec.publish,
        subscribe: spec.subscribe,
        entity_read: spec.entities.read,
        entity_update: spec.entities.update,
        admin: spec.admin,
    }
}

impl Endpoint {
    async fn issue(
        &self,
        request: pb::IssueTokenRequest,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<pb::IssueTokenResponse, BrokerError> {
        if let Some(budgets) = &self.budgets {
            let now = Instant::now();
            budgets
                .check(&RateKey::Principal(request.client_id.clone()), now)
                .map_err(BrokerError::RateLimited)?;
            if let Some(peer) = peer {
                budgets
                    .check(&RateKey::Connection(peer), now)
                    .map_err(BrokerError::RateLimited)?;
            }
        }
        // Parsed before the hash: a malformed request costs no hashing.
        let scope = request
            .scope
            .map(|scope| self.clients.parse_scope(&scope_spec(scope)))
            .transpose()
            .map_err(BrokerError::Credential)?;
        let mint = MintRequest {
            subject: (!request.subject.is_empty()).then_some(request.subject),
            scope,
            ttl: (request.ttl_seconds > 0)
                .then(|| Duration::from_secs(u64::from(request.ttl_seconds))),
        };

        let pending = Pending(&self.pending);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            return Err(BrokerError::Exhausted {
                reason: Reason::CredentialChecksBusy,
                message: "too many credential checks are waiting; retry shortly".into(),
            });
        }
        let permit = Arc::clone(&self.checks)
            .acquire_owned()
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        let clients = Arc::clone(&self.clients);
        let (id, secret) = (request.client_id, request.client_secret);
        let client = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            clients.authenticate(&id, &secret).cloned()
        })
        .await
        .map_err(|e| BrokerError::Consensus(format!("a credential check failed: {e}")))?
        .map_err(BrokerError::Credential)?;

        drop(pending);
        let minted = self
            .minter
            .mint(&client, &mint, SystemTime::now())
            .map_err(BrokerError::Credential)?;
        Ok(pb::IssueTokenResponse {
            access_token: minted.token,
            token_type: "Bearer".into(),
            expires_at: Some(convert::timestamp(
                minted
                    .expires_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
            )),
            expires_in_seconds: u32::try_from(minted.expires_in.as_secs()).unwrap_or(u32::MAX),
            scope: Some(scope_message(minted.scope)),
        })
    }
}

#[tonic::async_trait]
impl AuthRpc for AuthService {
    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let peer = request.remote_addr();
        // No principal here (the caller is after a token); what was refused is the client's.
        let refused = |error: BrokerError, client_id: &str| {
            metrics::access_refused(error.reason());
            audit::refused(peer, None, Some(client_id), &error);
            Status::from(error)
        };
        if let Err(error) = self.gate.check_origin(&request) {
            return Err(refused(error, &request.get_ref().client_id));
        }
        let Some(endpoint) = &self.endpoint else {
            return Err(Status::from(BrokerError::TokenEndpointOff));
        };
        let request = request.into_inner();
        let client_id = crate::error::shorten(&request.client_id);
        match endpoint.issue(request, peer).await {
            Ok(response) => {
                tracing::info!(client_id = %client_id, expires_in_s = response.expires_in_seconds, "token issued");
                Ok(Response::new(response))
            }
            Err(error) => Err(refused(error, &client_id)),
        }
    }
}
