//! Client credentials for a token endpoint (OAuth 2.0 client-credentials style): checking a client
//! id and secret against a stored hash, and minting short-lived, scoped tokens that
//! [`super::token::TokenVerifier`] accepts.
//!
//! Why these choices:
//! - Secrets are stored only as argon2id PHC strings (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`):
//!   a salted, memory-hard hash, so a leaked configuration does not leak usable secrets. The
//!   comparison of hash outputs is constant-time (the `password-hash` crate's `Output`), and an
//!   unknown client id is checked against a dummy hash of the same cost, so timing tells apart
//!   neither a wrong secret from a right one nor a known id from an unknown one; both are the same
//!   [`CredentialError::InvalidClient`].
//! - The cost parameters of configured hashes are bounded when loaded, because each check runs
//!   them: a hash with a gigabyte of memory would make every login a denial of service. Checks are
//!   CPU-bound and block; the edge runs them off the async runtime, a bounded number at a time.
//! - A minted token can grant no more than its client's configured scope ([`Permissions::is_within`]),
//!   lives at most the client's TTL, and names the client (`client_id`, and `act.sub` when it is
//!   minted on behalf of another subject — only for clients allowed to).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, Params, PasswordHash, ARGON2ID_IDENT};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use switchboard_proto::Reason;

use super::permissions::{PermissionError, PermissionSpec, Permissions};
use super::token::{VerificationKey, MAX_SUBJECT_LEN, PERMISSIONS_CLAIM};
use crate::channel::ChannelLimits;

/// Lifetime of a minted token when neither the client nor the request says otherwise.
pub(crate) const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest lifetime a minted token can have.
pub(crate) const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Shortest client secret accepted for hashing, in bytes.
pub(crate) const MIN_CLIENT_SECRET_LEN: usize = 16;
/// Longest client secret accepted, in bytes (longer ones are refused before hashing).
pub(crate) const MAX_CLIENT_SECRET_LEN: usize = 1024;
/// Longest client id, in bytes.
pub(crate) const MAX_CLIENT_ID_LEN: usize = 128;
/// Random bytes in a secret from [`generate_client_secret`].
const GENERATED_SECRET_BYTES: usize = 32;

/// The cost of an argon2id hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HashCost {
    /// Memory, in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl HashCost {
    /// OWASP's first recommended argon2id setting: 19 MiB, 2 passes, 1 lane.
    pub(crate) const DEFAULT: HashCost = HashCost {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// The most a configured hash may cost per check: 256 MiB, 10 passes, 8 lanes.
    pub(crate) const MAX: HashCost = HashCost {
        memory_kib: 256 * 1024,
        iterations: 10,
        parallelism: 8,
    };

    fn params(self) -> Result<Params, CredentialError> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| CredentialError::Hashing(e.to_string()))
    }
}

/// Why a credential check, a mint, or loading the client configuration failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Unknown client, or wrong secret (deliberately not told apart).
    #[error("invalid client credentials")]
    InvalidClient,
    /// A configured client id that is not 1 to 128 of `[A-Za-z0-9._-]`.
    #[error("client id {0:?} must be 1 to {MAX_CLIENT_ID_LEN} characters of [A-Za-z0-9._-]")]
    InvalidClientId(String),
    /// Two clients with the same id.
    #[error("client id {0:?} is configured twice")]
    DuplicateClient(String),
    /// A configured secret hash that is not an argon2id PHC string within [`HashCost::MAX`].
    #[error("client {id:?}: secret_hash {detail}")]
    InvalidSecretHash {
        /// The client.
        id: String,
        /// What is wrong.
        detail: String,
    },
    /// A secret to hash outside [`MIN_CLIENT_SECRET_LEN`]..=[`MAX_CLIENT_SECRET_LEN`] bytes.
    #[error(
        "a client secret must be {MIN_CLIENT_SECRET_LEN} to {MAX_CLIENT_SECRET_LEN} bytes, got {0}"
    )]
    SecretLength(usize),
    /// A scope (configured or requested) that does not parse.
    #[error("invalid scope: {0}")]
    InvalidScope(PermissionError),
    /// A requested scope wider than the client's.
    #[error("the requested scope is not within the client's scope")]
    ScopeNotAllowed,
    /// A token for another subject, from a client not allowed to mint on behalf of others.
    #[error("client {0:?} may not mint tokens on behalf of other subjects")]
    OnBehalfNotAllowed(String),
    /// A subject that is not 1 to 256 bytes without control characters.
    #[error("the subject must be 1 to {MAX_SUBJECT_LEN} bytes without control characters")]
    InvalidSubject,
    /// A zero TTL, or a configured TTL over [`MAX_TOKEN_TTL`].
    #[error("a token lifetime must be from 1 s to {max} s, got {0:?}", max = MAX_TOKEN_TTL.as_secs())]
    InvalidTtl(Duration),
    /// A signing key that cannot sign.
    #[error("signing key: {0}")]
    SigningKey(String),
    /// Hashing failed (bad cost parameters, or no randomness).
    #[error("hashing a client secret failed: {0}")]
    Hashing(String),
    /// Signing failed.
    #[error("signing a token failed: {0}")]
    Signing(String),
}

impl CredentialError {
    /// The stable reason for refusals at the token endpoint (`INVALID_CLIENT` is
    /// `UNAUTHENTICATED`; the scope and subject ones `PERMISSION_DENIED` or `INVALID_ARGUMENT`);
    /// configuration and internal failures are `INTERNAL`. The broker's one table for this
    /// mapping: `BrokerError::reason` calls it.
    pub fn reason(&self) -> Reason {
        match self {
            CredentialError::InvalidClient => Reason::InvalidClient,
            CredentialError::InvalidScope(_) => Reason::ScopeInvalid,
            CredentialError::ScopeNotAllowed => Reason::ScopeNotAllowed,
            CredentialError::OnBehalfNotAllowed(_) => Reason::OnBehalfNotAllowed,
            CredentialError::InvalidSubject => Reason::SubjectInvalid,
            CredentialError::InvalidTtl(_) => Reason::TtlInvalid,
            // A broken client configuration or signing failure is the operator's, not the caller's.
            CredentialError::InvalidClientId(_)
            | CredentialError::DuplicateClient(_)
            | CredentialError::InvalidSecretHash { .. }
            | CredentialError::SecretLength(_)
            | CredentialError::SigningKey(_)
            | CredentialError::Hashing(_)
            | CredentialError::Signing(_) => Reason::CredentialsMisconfigured,
        }
    }
}

/// A fresh random client secret: 32 bytes from the operating system, base64url (43 characters).
pub fn generate_client_secret() -> Result<String, CredentialError> {
    let mut bytes = [0u8; GENERATED_SECRET_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| CredentialError::Hashing(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Hashes a client secret for the configuration, with [`HashCost::DEFAULT`] and a random salt.
pub fn hash_client_secret(secret: &str) -> Result<String, CredentialError> {
    hash_client_secret_with(secret, HashCost::DEFAULT)
}

/// Hashes a client secret with the given cost and a random salt, as an argon2id PHC string.
pub(crate) fn hash_client_secret_with(
    secret: &str,
    cost: HashCost,
) -> Result<String, CredentialError> {
    if !(MIN_CLIENT_SECRET_LEN..=MAX_CLIENT_SECRET_LEN).contains(&secret.len()) {
        return Err(CredentialError::SecretLength(secret.len()));
    }
    let argon2 = Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        cost.params()?,
    );
    argon2
        .hash_password(secret.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| CredentialError::Hashing(e.to_string()))
}

/// Parses a stored hash and checks it is argon2id within [`HashCost::MAX`].
fn parse_hash(id: &str, phc: &str) -> Result<PasswordHash, CredentialError> {
    let invalid = |detail: String| CredentialError::InvalidSecretHash {
        id: id.to_owned(),
        detail,
    };
    let hash = PasswordHash::new(phc).map_err(|e| {
        invalid(format!(
            "is not a PHC string ({e}); make one with hash_client_secret"
        ))
    })?;
    if hash.algorithm.as_str() != ARGON2ID_IDENT.as_str() {
        return Err(invalid(format!(
            "uses {}, not argon2id",
            hash.algorithm.as_str()
        )));
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(invalid("has no salt or no hash output".into()));
    }
    let params =
        Params::try_from(&hash).map_err(|e| invalid(format!("has bad parameters ({e})")))?;
    let max = HashCost::MAX;
    if params.m_cost() > max.memory_kib
        || params.t_cost() > max.iterations
        || params.p_cost() > max.parallelism
    {
        return Err(invalid(format!(
            "costs more than m={},t={},p={} per check",
            max.memory_kib, max.iterations, max.parallelism
        )));
    }
    Ok(hash)
}

/// Whether `secret` matches `hash` (constant-time comparison of the outputs).
fn verify_secret(secret: &str, hash: &PasswordHash) -> bool {
    Argon2::default()
        .verify_password(secret.as_bytes(), hash)
        .is_ok()
}

/// A client as written in the configuration.
///
/// ```toml
/// [[auth.token_endpoint.clients]]
/// id = "crm-panel"
/// secret_hash = "$argon2id$v=19$m=19456,t=2,p=1$…$…"
/// on_behalf_of = true          # may mint tokens whose `sub` is an agent
/// token_ttl = "15m"
/// scope = { publish = ["crm.>"], subscribe = ["crm.>"], entities = { read = ["contact"], update = ["contact"] } }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client id.
    pub id: String,
    /// The argon2id PHC string of the client's secret.
    pub secret_hash: String,
    /// The most a token minted for this client may grant.
    #[serde(default)]
    pub scope: PermissionSpec,
    /// Whether the client may mint tokens for another subject (an agent it acts for).
    #[serde(default)]
    pub on_behalf_of: bool,
    /// Lifetime of its tokens (at most [`MAX_TOKEN_TTL`]); [`DEFAULT_TOKEN_TTL`] when left out.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub token_ttl: Option<Duration>,
}

/// A configured client, ready to authenticate.
#[derive(Clone)]
pub(crate) struct Client {
    id: String,
    hash: PasswordHash,
    scope: Permissions,
    on_behalf_of: bool,
    token_ttl: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("scope", &self.scope.to_spec())
            .field("on_behalf_of", &self.on_behalf_of)
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The client id.
    #[cfg(test)]
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The most its tokens may grant.
    #[cfg(test)]
    pub(crate) fn scope(&self) -> &Permissions {
        &self.scope
    }

    /// Whether it may mint tokens for other subjects.
    #[cfg(test)]
    pub(crate) fn on_behalf_of(&self) -> bool {
        self.on_behalf_of
    }

    /// The lifetime of its tokens.
    #[cfg(test)]
    pub(crate) fn token_ttl(&self) -> Duration {
        self.token_ttl
    }
}

fn is_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn is_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.len() <= MAX_SUBJECT_LEN
        && !subject.chars().any(char::is_control)
}

/// The configured clients.
#[derive(Debug, Clone)]
pub(crate) struct ClientRegistry {
    clients: HashMap<String, Client>,
    /// Checked when the client id is unknown, so that costs what a real check costs.
    dummy: PasswordHash,
    /// Limits requested scopes are parsed with.
    limits: ChannelLimits,
}

impl ClientRegistry {
    /// Loads and validates the clients; scopes are parsed with `limits`. Costs one hash (the dummy
    /// for unknown ids, at the first client's cost).
    pub(crate) fn new(
        configs: &[ClientConfig],
        limits: &ChannelLimits,
    ) -> Result<ClientRegistry, CredentialError> {
        let mut clients = HashMap::new();
        let mut dummy_cost = HashCost::DEFAULT;
        for (index, config) in configs.iter().enumerate() {
            if !is_client_id(&config.id) {
                return Err(CredentialError::InvalidClientId(config.id.clone()));
            }
            let hash = parse_hash(&config.id, &config.secret_hash)?;
            if index == 0 {
                let params =
                    Params::try_from(&hash).map_err(|e| CredentialError::Hashing(e.to_string()))?;
                dummy_cost = HashCost {
                    memory_kib: params.m_cost(),
                    iterations: params.t_cost(),
                    parallelism: params.p_cost(),
                };
            }
            let scope = Permissions::from_spec(&config.scope, limits)
                .map_err(CredentialError::InvalidScope)?;
            let token_ttl = config.token_ttl.unwrap_or(DEFAULT_TOKEN_TTL);
            if token_ttl.is_zero() || token_ttl > MAX_TOKEN_TTL {
                return Err(CredentialError::InvalidTtl(token_ttl));
            }
            let client = Client {
                id: config.id.clone(),
                hash,
                scope,
                on_behalf_of: config.on_behalf_of,
                token_ttl,
            };
            if clients.insert(config.id.clone(), client).is_some() {
                return Err(CredentialError::DuplicateClient(config.id.clone()));
            }
        }
        let dummy_secret = generate_client_secret()?;
        let dummy = hash_client_secret_with(&dummy_secret, dummy_cost)?;
        let dummy = parse_hash("(dummy)", &dummy)?;
        Ok(ClientRegistry {
            clients,
            dummy,
            limits: *limits,
        })
    }

    /// Checks a client id and secret. An unknown id and a wrong secret are the same error, found
    /// in about the same time.
    pub(crate) fn authenticate(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<&Client, CredentialError> {
        let secret = if secret.len() > MAX_CLIENT_SECRET_LEN {
            // Still spend the time of a check, on something that cannot match.
            ""
        } else {
            secret
        };
        match self.clients.get(client_id) {
            Some(client) if verify_secret(secret, &client.hash) && !secret.is_empty() => Ok(client),
            Some(_) => Err(CredentialError::InvalidClient),
            None => {
                let _ = verify_secret(secret, &self.dummy);
                Err(CredentialError::InvalidClient)
            }
        }
    }

    /// The client with this id.
    #[cfg(test)]
    pub(crate) fn get(&self, client_id: &str) -> Option<&Client> {
        self.clients.get(client_id)
    }

    /// How many clients are configured.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is configured.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Parses a requested scope with the registry's limits.
    pub(crate) fn parse_scope(
        &self,
        spec: &PermissionSpec,
    ) -> Result<Permissions, CredentialError> {
        Permissions::from_spec(spec, &self.limits).map_err(CredentialError::InvalidScope)
    }
}

/// What minted tokens say about who issued them and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MinterSettings {
    /// The `iss` of minted tokens (list it in the verifier's accepted issuers).
    pub issuer: String,
    /// The `aud` of minted tokens (list it in the verifier's accepted audiences).
    pub audience: String,
}

/// A token asked for by an authenticated client.
#[derive(Debug, Clone, Default)]
pub(crate) struct MintRequest {
    /// The subject to mint for, when not the client itself (needs [`Client::on_behalf_of`]).
    pub subject: Option<String>,
    /// A narrower grant than the client's scope; the whole scope when `None`.
    pub scope: Option<Permissions>,
    /// A shorter lifetime than the client's; longer requests are cut to it.
    pub ttl: Option<Duration>,
}

/// A minted token.
#[derive(Debug, Clone)]
pub(crate) struct MintedToken {
    /// The JWT.
    pub token: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
    /// Its lifetime from the mint time, in whole seconds (OAuth's `expires_in`).
    pub expires_in: Duration,
    /// What it grants.
    pub scope: PermissionSpec,
}

/// Signs tokens for authenticated clients.
#[derive(Clone)]
pub(crate) struct TokenMinter {
    key: EncodingKey,
    algorithm: Algorithm,
    kid: Option<String>,
    /// The verification key for the minted tokens.
    verification: VerificationKey,
    /// The public JWK (EdDSA only), for publishing.
    // Checked by the tests; nothing serves a JWKS from it yet.
    #[cfg_attr(not(test), allow(dead_code))]
    public_jwk: Option<Jwk>,
    settings: MinterSettings,
}

impl fmt::Debug for TokenMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenMinter")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TokenMinter {
    /// A minter signing with an HS256 secret (at least 32 bytes), shared with the verifier.
    pub(crate) fn hs256(
        secret: &[u8],
        kid: Option<String>,
        settings: MinterSettings,
    ) -> Result<TokenMinter, CredentialError> {
        // Also refuses secrets shorter than the verifier accepts.
        let verification = VerificationKey::hs256(secret, kid.clone())
            .map_err(|e| CredentialError::SigningKey(e.to_string()))?;
        Ok(TokenMinter {
            key: EncodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
            kid,
            verification,
            public_jwk: None,
            settings,
        })
    }

    /// A minter signing with an Ed25519 private key in PKCS#8 PEM; its public key verifies.
    pub(crate) fn eddsa_pem(
        private_pem: &[u8],
        kid: Option<String>,
        settings: MinterSettings,
    ) -> Result<TokenMinter, CredentialError> {
        let signing = |e: jsonwebtoken::errors::Error| CredentialError::SigningKey(e.to_string());
        let key = EncodingKey::from_ed_pem(private_pem).map_err(signing)?;
        // The public half, as a JWK: what verifies the minted tokens, and what a JWKS publishes.
        let mut public_jwk = Jwk::from_encoding_key(&key, Algorithm::EdDSA).map_err(signing)?;
        public_jwk.common.key_id = kid.clone();
        let verification = VerificationKey::from_jwks(
            &serde_json::to_vec(&json!({ "keys": [public_jwk] }))
                .map_err(|e| CredentialError::SigningKey(e.to_string()))?,
        )
        .ok()
        .and_then(|keys| keys.into_iter().next())
        .ok_or_else(|| CredentialError::SigningKey("no usable Ed25519 public key".into()))?;
        Ok(TokenMinter {
            key,
            algorithm: Algorithm::EdDSA,
            kid,
            verification,
            public_jwk: Some(public_jwk),
            settings,
        })
    }

    /// The key that verifies this minter's tokens, for the broker's own verifier.
    pub(crate) fn verification_key(&self) -> &VerificationKey {
        &self.verification
    }

    /// The public key as a JWK (EdDSA only), for a JWKS other services can fetch.
    #[cfg(test)]
    pub(crate) fn public_jwk(&self) -> Option<&Jwk> {
        self.public_jwk.as_ref()
    }

    /// Mints a token for `client` (already authenticated) at `now`.
    pub(crate) fn mint(
        &self,
        client: &Client,
        request: &MintRequest,
        now: SystemTime,
    ) -> Result<MintedToken, CredentialError> {
        let subject = match &request.subject {
            None => client.id.clone(),
            Some(subject) if !is_subject(subject) => return Err(CredentialError::InvalidSubject),
            Some(subject) if *subject != client.id && !client.on_behalf_of => {
                return Err(CredentialError::OnBehalfNotAllowed(client.id.clone()))
            }
            Some(subject) => subject.clone(),
        };
        let scope = match &request.scope {
            None => client.scope.to_spec(),
            Some(scope) if scope.is_within(&client.scope) => scope.to_spec(),
            Some(_) => return Err(CredentialError::ScopeNotAllowed),
        };
        let ttl = match request.ttl {
            Some(ttl) if ttl.as_secs() == 0 => return Err(CredentialError::InvalidTtl(ttl)),
            Some(ttl) => ttl.min(client.token_ttl),
            None => client.token_ttl,
        };
        let issued_at = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let expires_in = Duration::from_secs(ttl.as_secs());
        let exp = issued_at.saturating_add(expires_in.as_secs());
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.settings.issuer));
        claims.insert("aud".into(), json!(self.settings.audience));
        claims.insert("sub".into(), json!(subject));
        claims.insert("iat".into(), json!(issued_at));
        claims.insert("nbf".into(), json!(issued_at));
        claims.insert("exp".into(), json!(exp));
        claims.insert("jti".into(), json!(uuid::Uuid::new_v4().to_string()));
        claims.insert("client_id".into(), json!(client.id));
        if subject != client.id {
            claims.insert("act".into(), json!({ "sub": client.id }));
        }
        let scope_value =
            serde_json::to_value(&scope).map_err(|e| CredentialError::Signing(e.to_string()))?;
        claims.insert(PERMISSIONS_CLAIM.into(), scope_value);
        let mut header = Header::new(self.algorithm);
        header.kid = self.kid.clone();
        let token = jsonwebtoken::encode(&header, &Value::Object(claims), &self.key)
            .map_err(|e| CredentialError::Signing(e.to_string()))?;
        Ok(MintedToken {
            token,
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
            expires_in,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Pattern;
    use crate::security::test_keys;
    use crate::security::token::{TokenError, TokenVerifier, VerifierSettings};
    use std::sync::OnceLock;

    /// Cheap enough for a debug-build test; real hashes use [`HashCost::DEFAULT`].
    const TEST_COST: HashCost = HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    const SECRET: &str = "crm-panel-secret-for-tests-only";
    const SIGNING_SECRET: &[u8] = b"minting-secret-minting-secret-minting-secret";

    fn hash(secret: &str) -> String {
        hash_client_secret_with(secret, TEST_COST).unwrap_or_else(|e| panic!("{e}"))
    }

    fn spec_json(json: Value) -> PermissionSpec {
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn config(id: &str, on_behalf_of: bool) -> ClientConfig {
        ClientConfig {
            id: id.into(),
            secret_hash: hash(SECRET),
            scope: spec_json(json!({
                "publish": ["crm.>"],
                "subscribe": ["crm.>"],
                "entities": {"read": ["contact", "deal"], "update": ["contact"]}
            })),
            on_behalf_of,
            token_ttl: Some(Duration::from_secs(600)),
        }
    }

    fn registry() -> &'static ClientRegistry {
        static REGISTRY: OnceLock<ClientRegistry> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            ClientRegistry::new(
                &[config("crm-panel", true), config("telephony", false)],
                &ChannelLimits::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        })
    }

    fn settings() -> MinterSettings {
        MinterSettings {
            issuer: "switchboard".into(),
            audience: "switchboard".into(),
        }
    }

    fn verifier_for(minter: &TokenMinter) -> TokenVerifier {
        TokenVerifier::new(
            vec![minter.verification_key().clone()],
            VerifierSettings {
                issuers: vec!["switchboard".into()],
                audiences: vec!["switchboard".into()],
                ..VerifierSettings::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn client(id: &str) -> &'static Client {
        registry()
            .authenticate(id, SECRET)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn hashes_are_salted_argon2id_and_verify() {
        let a = hash(SECRET);
        let b = hash(SECRET);
        assert!(a.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        let parsed = parse_hash("x", &a).unwrap_or_else(|e| panic!("{e}"));
        assert!(verify_secret(SECRET, &parsed));
        assert!(!verify_secret("crm-panel-secret-for-tests-onlx", &parsed));
        assert!(!verify_secret("", &parsed));
        assert!(matches!(
            hash_client_secret_with("short", TEST_COST),
            Err(CredentialError::SecretLength(5))
        ));
        assert!(matches!(
            hash_client_secret_with(&"x".repeat(MAX_CLIENT_SECRET_LEN + 1), TEST_COST),
            Err(CredentialError::SecretLength(_))
        ));
        let generated = generate_client_secret().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(generated.len(), 43);
        assert_ne!(generated, generate_client_secret().unwrap_or_default());
    }

    #[test]
    fn default_cost_hash_verifies() {
        let phc = hash_client_secret(SECRET).unwrap_or_else(|e| panic!("{e}"));
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let parsed = parse_hash("x", &phc).unwrap_or_else(|e| panic!("{e}"));
        assert!(verify_secret(SECRET, &parsed));
    }

    #[test]
    fn authenticate_accepts_only_the_right_secret() {
        let r = registry();
        assert_eq!(r.len(), 2);
        assert!(!r.is_empty());
        let c = client("crm-panel");
        assert_eq!(c.id(), "crm-panel");
        assert!(c.on_behalf_of());
        assert_eq!(c.token_ttl(), Duration::from_secs(600));
        assert!(c.scope().may_publish("crm.contact.updated"));
        for (id, secret) in [
            ("crm-panel", "wrong-secret-wrong-secret"),
            ("crm-panel", ""),
            ("crm-panel", &SECRET[..SECRET.len() - 1]),
            ("nobody", SECRET),
            ("", SECRET),
            ("CRM-PANEL", SECRET),
        ] {
            assert_eq!(
                r.authenticate(id, secret).err(),
                Some(CredentialError::InvalidClient),
                "{id} / {secret}"
            );
        }
        let long = "x".repeat(MAX_CLIENT_SECRET_LEN + 1);
        assert_eq!(
            r.authenticate("crm-panel", &long).err(),
            Some(CredentialError::InvalidClient)
        );
        assert_eq!(
            CredentialError::InvalidClient.reason(),
            Reason::InvalidClient
        );
        assert!(r.get("telephony").is_some() && r.get("nobody").is_none());
        // Debug output shows no hash.
        assert!(!format!("{c:?}").contains("argon2"), "{c:?}");
    }

    #[test]
    fn unknown_ids_are_checked_against_a_dummy_of_the_same_cost() {
        let r = registry();
        let p = Params::try_from(&r.dummy).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.m_cost(), p.t_cost(), p.p_cost()), (64, 1, 1));
        // The dummy matches no secret anyone knows.
        assert!(!verify_secret(SECRET, &r.dummy));
        assert!(!verify_secret("", &r.dummy));
    }

    #[test]
    fn refuses_bad_client_configuration() {
        let limits = ChannelLimits::default();
        let new = |configs: &[ClientConfig]| ClientRegistry::new(configs, &limits).err();
        let mut bad_id = config("crm panel", false);
        assert!(matches!(
            new(&[bad_id.clone()]),
            Some(CredentialError::InvalidClientId(_))
        ));
        bad_id.id = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        assert!(matches!(
            new(&[bad_id]),
            Some(CredentialError::InvalidClientId(_))
        ));
        assert!(matches!(
            new(&[config("a", false), config("a", true)]),
            Some(CredentialError::DuplicateClient(_))
        ));
        for (phc, needle) in [
            ("plaintext-secret", "PHC"),
            (
                "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "argon2id",
            ),
            (
                "$argon2id$v=19$m=1048576,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "costs more",
            ),
            ("$argon2id$v=19$m=64,t=1,p=1", "no salt"),
        ] {
            let mut c = config("a", false);
            c.secret_hash = phc.into();
            let e = new(&[c]).map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(needle), "{phc}: {e}");
        }
        let mut wide = config("a", false);
        wide.scope.publish = vec!["$sys.>".into()];
        assert!(matches!(
            new(&[wide]),
            Some(CredentialError::InvalidScope(_))
        ));
        let mut ttl = config("a", false);
        ttl.token_ttl = Some(MAX_TOKEN_TTL + Duration::from_secs(1));
        assert!(matches!(
            new(&[ttl.clone()]),
            Some(CredentialError::InvalidTtl(_))
        ));
        ttl.token_ttl = Some(Duration::ZERO);
        assert!(matches!(new(&[ttl]), Some(CredentialError::InvalidTtl(_))));
        // No clients at all is fine (the endpoint then refuses everyone).
        let empty = ClientRegistry::new(&[], &limits).unwrap_or_else(|e| panic!("{e}"));
        assert!(empty.is_empty());
    }

    #[test]
    fn client_config_from_toml() {
        let phc = hash(SECRET);
        let text = format!(
            r#"
            id = "crm-panel"
            secret_hash = "{phc}"
            on_behalf_of = true
            token_ttl = "5m"
            scope = {{ publish = ["crm.>"], entities = {{ read = ["contact"] }} }}
            "#
        );
        let parsed: ClientConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.token_ttl, Some(Duration::from_secs(300)));
        assert_eq!(parsed.scope.entities.read, vec!["contact"]);
        assert!(
            toml::from_str::<ClientConfig>("id = \"a\"\nsecret_hash = \"x\"\nsecret = \"y\"")
                .is_err()
        );
    }

    #[test]
    fn minted_hs256_tokens_verify_with_the_clients_scope() {
        let minter = TokenMinter::hs256(SIGNING_SECRET, Some("m1".into()), settings())
            .unwrap_or_else(|e| panic!("{e}"));
        let minted = minter
            .mint(client("telephony"), &MintRequest::default(), now())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(minted.expires_in, Duration::from_secs(600));
        assert_eq!(minted.expires_at, now() + Duration::from_secs(600));
        let p = verifier_for(&minter)
            .verify_at(&minted.token, now())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.subject, "telephony");
        assert_eq!(p.client_id.as_deref(), Some("telephony"));
        assert_eq!(p.actor, None);
        assert_eq!(p.expires_at, minted.expires_at);
        assert!(p.permissions.may_publish("crm.contact.updated"));
        assert!(!p.permissions.may_publish("orders.placed"));
        assert!(p.permissions.may_read_entity("deal") && !p.permissions.may_update_entity("deal"));
        // Short-lived: refused once expired (beyond the verifier's leeway).
        let later = now() + Duration::from_secs(600) + VerifierSettings::default().leeway;
        assert_eq!(
            verifier_for(&minter).verify_at(&minted.token, later).err(),
            Some(TokenError::Expired { exp: 1_800_000_600 })
        );
        // Another secret does not verify it.
        let other = TokenMinter::hs256(b"other-secret-other-secret-other-secret", None, settings())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            verifier_for(&other).verify_at(&minted.token, now()).err(),
            Some(TokenError::Invalid)
        );
        assert!(matches!(
            TokenMinter::hs256(b"short", None, settings()),
            Err(CredentialError::SigningKey(_))
        ));
    }

    #[test]
    fn minted_eddsa_tokens_on_behalf_of_an_agent() {
        let minter = TokenMinter::eddsa_pem(
            test_keys::ED25519_PRIVATE.as_bytes(),
            Some("ed-1".into()),
            settings(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let jwk = minter.public_jwk().map(|j| serde_json::to_value(j).ok());
        let jwk = jwk.flatten().unwrap_or_default();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["kid"], "ed-1");
        assert!(jwk.get("d").is_none(), "no private part: {jwk}");
        // The published public key is the test key's.
        let expected = VerificationKey::eddsa_pem(test_keys::ED25519_PUBLIC.as_bytes(), None);
        assert!(expected.is_ok());

        let request = MintRequest {
            subject: Some("agent-17".into()),
            scope: Some(
                registry()
                    .parse_scope(&spec_json(json!({
                        "subscribe": ["crm.*.updated"],
                        "entities": {"read": ["contact"]}
                    })))
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            ttl: Some(Duration::from_secs(60)),
        };
        let minted = minter
            .mint(client("crm-panel"), &request, now())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(minted.expires_in, Duration::from_secs(60));
        let p = verifier_for(&minter)
            .verify_at(&minted.token, now())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.subject, "agent-17");
        assert_eq!(p.actor.as_deref(), Some("crm-panel"));
        let limits = ChannelLimits::default();
        let pattern = |s: &str| Pattern::parse(s, &limits).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.permissions.may_subscribe(&pattern("crm.contact.updated")));
        assert!(!p.permissions.may_subscribe(&pattern("crm.>")));
        assert!(!p.permissions.may_publish("crm.contact.updated"));
        assert!(p.permissions.may_subscribe(&pattern("$state.contact.>")));

        // The other Ed25519 key does not verify it.
        let other = TokenMinter::eddsa_pem(
            test_keys::ED25519_OTHER_PRIVATE.as_bytes(),
            Some("ed-1".into()),
            settings(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            verifier_for(&other).verify_at(&minted.token, now()).err(),
            Some(TokenError::Invalid)
        );
        let other_public = VerificationKey::eddsa_pem(
            test_keys::ED25519_OTHER_PUBLIC.as_bytes(),
            Some("ed-1".into()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let v = TokenVerifier::new(vec![other_public], VerifierSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(v.verify_at(&minted.token, now()).is_err());
        assert!(matches!(
            TokenMinter::eddsa_pem(test_keys::P256_PRIVATE.as_bytes(), None, settings()),
            Err(CredentialError::SigningKey(_))
        ));
    }

    #[test]
    fn mint_refusals() {
        let minter =
            TokenMinter::hs256(SIGNING_SECRET, None, settings()).unwrap_or_else(|e| panic!("{e}"));
        let mint = |id: &str, request: MintRequest| minter.mint(client(id), &request, now()).err();
        // On behalf of someone else only when allowed; naming oneself is fine.
        assert_eq!(
            mint(
                "telephony",
                MintRequest {
                    subject: Some("agent-17".into()),
                    ..MintRequest::default()
                }
            ),
            Some(CredentialError::OnBehalfNotAllowed("telephony".into()))
        );
        assert_eq!(
            mint(
                "telephony",
                MintRequest {
                    subject: Some("telephony".into()),
                    ..MintRequest::default()
                }
            ),
            None
        );
        for subject in ["", "a\u{7}b", &"x".repeat(MAX_SUBJECT_LEN + 1)] {
            assert_eq!(
                mint(
                    "crm-panel",
                    MintRequest {
                        subject: Some(subject.into()),
                        ..MintRequest::default()
                    }
                ),
                Some(CredentialError::InvalidSubject)
            );
        }
        // No wider than the client's scope.
        for wider in [
            json!({"publish": ["orders.>"]}),
            json!({"subscribe": [">"]}),
            json!({"entities": {"read": ["ticket"]}}),
            json!({"entities": {"update": ["deal"]}}),
            json!({"entities": {"read": ["*"]}}),
        ] {
            let scope = registry().parse_scope(&spec_json(wider.clone()));
            let scope = scope.unwrap_or_else(|e| panic!("{e}"));
            let e = mint(
                "crm-panel",
                MintRequest {
                    scope: Some(scope),
                    ..MintRequest::default()
                },
            );
            assert_eq!(e, Some(CredentialError::ScopeNotAllowed), "{wider}");
            assert_eq!(
                CredentialError::ScopeNotAllowed.reason(),
                Reason::ScopeNotAllowed
            );
        }
        assert!(matches!(
            registry().parse_scope(&spec_json(json!({"publish": ["a..b"]}))),
            Err(CredentialError::InvalidScope(_))
        ));
        // A longer lifetime is cut to the client's; zero is refused.
        let long = minter
            .mint(
                client("crm-panel"),
                &MintRequest {
                    ttl: Some(Duration::from_secs(86_400)),
                    ..MintRequest::default()
                },
                now(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(long.expires_in, Duration::from_secs(600));
        assert!(matches!(
            mint(
                "crm-panel",
                MintRequest {
                    ttl: Some(Duration::from_millis(500)),
                    ..MintRequest::default()
                }
            ),
            Some(CredentialError::InvalidTtl(_))
        ));
    }

    #[test]
    fn minted_tokens_are_unique() {
        let minter =
            TokenMinter::hs256(SIGNING_SECRET, None, settings()).unwrap_or_else(|e| panic!("{e}"));
        let a = minter.mint(client("telephony"), &MintRequest::default(), now());
        let b = minter.mint(client("telephony"), &MintRequest::default(), now());
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("{e}")),
            b.unwrap_or_else(|e| panic!("{e}")),
        );
        assert_ne!(a.token, b.token, "each token has its own jti");
    }
}
