//! The `switchboard.v1.Auth` service: client credentials in, a short-lived scoped token out.
//!
//! Checking a secret is an argon2id hash, slow on purpose, so the endpoint guards the broker from
//! its own cost: calls are rate-limited per connection before any hashing, at most
//! `max_concurrent_checks` hashes run at once (on blocking threads, never on the runtime's), and at
//! most `max_waiting_checks` calls queue for one; beyond that the call is refused at once.
//!
//! Guessing is limited by failures, per client id and source address
//! (`failures_per_client_address`): a failure is taken from the budget before the hash (so
//! concurrent guesses cannot overdraw it) and given back when the secret was right. A budget per
//! client id alone, charged whatever the outcome, let anyone who knows a client id keep the real
//! client locked out with one wrong secret a second; now failures at one address refuse that
//! client id at that address only, and the real client never spends its budget.

use std::net::{IpAddr, SocketAddr};
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
use crate::security::credentials::{
    ClientRegistry, MintRequest, MinterSettings, TokenMinter, MAX_CLIENT_ID_LEN,
};
use crate::security::permissions::{EntitySpec, PermissionSpec};
use crate::security::ratelimit::{RateLimit, RateLimiter, DEFAULT_SHARDS};
use crate::security::token::VerificationKey;

/// Budgets tracked at once, per kind (client id at an address, connection).
const MAX_TRACKED: usize = 10_000;

/// Whose failures a failure budget counts: one client id, tried from one source address (`None`
/// when the transport has no address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientAt {
    client_id: String,
    address: Option<IpAddr>,
}

impl ClientAt {
    fn new(client_id: &str, peer: Option<SocketAddr>) -> ClientAt {
        // Every configured id is at most MAX_CLIENT_ID_LEN bytes: longer ones are all unknown, and
        // share a budget by their first bytes rather than each holding a key as long as a request.
        let mut end = client_id.len().min(MAX_CLIENT_ID_LEN + 1);
        while !client_id.is_char_boundary(end) {
            end -= 1;
        }
        ClientAt {
            client_id: client_id[..end].to_owned(),
            // An IPv4 client of a dual-stack listener is one address whichever way it is written.
            address: peer.map(|peer| peer.ip().to_canonical()),
        }
    }
}

/// The configured clients, the signing key and the guards around the hashing.
struct Endpoint {
    clients: Arc<ClientRegistry>,
    minter: TokenMinter,
    checks: Arc<Semaphore>,
    /// Calls hashing or waiting to; at most `max_pending`.
    pending: AtomicUsize,
    max_pending: usize,
    /// Failed secret checks per client id and source address; `None` when off.
    failures: Option<RateLimiter<ClientAt>>,
    /// Token requests per connection, whatever their outcome; `None` when off.
    per_connection: Option<RateLimiter<SocketAddr>>,
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
        let failures = limiter(
            settings.failures_per_client_address,
            "auth.token_endpoint.failures_per_client_address",
        )?;
        let per_connection = limiter(
            settings.per_connection,
            "auth.token_endpoint.per_connection",
        )?;
        let endpoint = Endpoint {
            clients: Arc::new(clients),
            minter,
            checks: Arc::new(Semaphore::new(settings.max_concurrent_checks)),
            pending: AtomicUsize::new(0),
            max_pending: settings.max_concurrent_checks + settings.max_waiting_checks,
            failures,
            per_connection,
        };
        Ok((PreparedEndpoint(Some(Arc::new(endpoint))), Some(minted)))
    }
}

/// A limiter of `limit`, or `None` when its rate is 0 (off).
fn limiter<K: std::hash::Hash + Eq + Clone>(
    limit: RateLimit,
    setting: &str,
) -> anyhow::Result<Option<RateLimiter<K>>> {
    if limit.per_second == 0.0 {
        return Ok(None);
    }
    RateLimiter::new(limit, MAX_TRACKED, DEFAULT_SHARDS)
        .map(Some)
        .with_context(|| format!("invalid setting `{setting}`"))
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
        schema: scope.schema,
        kpi: scope.kpi,
    }
}

fn scope_message(spec: PermissionSpec) -> pb::Scope {
    pb::Scope {
        publish: spec.publish,
        subscribe: spec.subscribe,
        entity_read: spec.entities.read,
        entity_update: spec.entities.update,
        admin: spec.admin,
        schema: spec.schema,
        kpi: spec.kpi,
    }
}

impl Endpoint {
    /// Gives back the failure charged for `attempt`: its secret was right, or was not checked.
    fn not_a_failure(&self, attempt: &ClientAt) {
        if let Some(failures) = &self.failures {
            failures.refund(attempt);
        }
    }

    async fn issue(
        &self,
        request: pb::IssueTokenRequest,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<pb::IssueTokenResponse, BrokerError> {
        let now = Instant::now();
        if let (Some(per_connection), Some(peer)) = (&self.per_connection, peer) {
            per_connection
                .check(&peer, now)
                .map_err(BrokerError::RateLimited)?;
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

        // A failure is charged now, before the hash, and given back below if the secret was right
        // (or was never checked).
        let attempt = ClientAt::new(&request.client_id, peer);
        if let Some(failures) = &self.failures {
            failures
                .check(&attempt, now)
                .map_err(BrokerError::RateLimited)?;
        }
        let pending = Pending(&self.pending);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.not_a_failure(&attempt);
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
        // A wrong secret (or unknown id) keeps its charge. So does a call whose client went away
        // during the hash: its outcome was never seen, and hanging up must not undo a guess.
        .map_err(BrokerError::Credential)?;
        self.not_a_failure(&attempt);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(address: [u8; 4], port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from((address, port)))
    }

    /// The failure budgets as `issue` uses them, without the hashing: failures at one address
    /// spend that address's budget only, on any connection from it; right secrets spend nothing.
    #[test]
    fn failures_are_counted_per_client_and_address() {
        let failures: RateLimiter<ClientAt> = limiter(
            RateLimit {
                per_second: 0.01,
                burst: 2,
            },
            "test",
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("on"));
        let now = Instant::now();
        let attacker = ClientAt::new("crm-panel", peer([10, 0, 0, 9], 40_000));
        for _ in 0..2 {
            assert!(
                failures.check(&attacker, now).is_ok(),
                "a wrong secret, checked"
            );
        }
        assert!(
            failures.check(&attacker, now).is_err(),
            "refused before hashing"
        );
        let other_port = ClientAt::new("crm-panel", peer([10, 0, 0, 9], 40_001));
        assert_eq!(
            other_port, attacker,
            "a new connection from the address shares it"
        );
        assert!(failures.check(&other_port, now).is_err());

        let client = ClientAt::new("crm-panel", peer([10, 0, 0, 7], 50_000));
        for _ in 0..10 {
            assert!(
                failures.check(&client, now).is_ok(),
                "not refused for 10.0.0.9"
            );
            failures.refund(&client);
        }
        let other_client = ClientAt::new("billing", peer([10, 0, 0, 9], 40_000));
        assert!(
            failures.check(&other_client, now).is_ok(),
            "another id at the address"
        );
    }

    #[test]
    fn budget_keys_are_canonical_and_bounded() {
        let v4 = ClientAt::new(
            "a",
            Some("10.0.0.9:1".parse().unwrap_or_else(|e| panic!("{e}"))),
        );
        let mapped = ClientAt::new(
            "a",
            Some(
                "[::ffff:10.0.0.9]:2"
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
        );
        assert_eq!(v4, mapped);
        let long = "é".repeat(10_000);
        let key = ClientAt::new(&long, None);
        assert!(key.client_id.len() <= MAX_CLIENT_ID_LEN + 1);
        assert!(long.starts_with(&key.client_id));
    }
}
