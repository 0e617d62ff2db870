//! Bearer-token authentication: verifying a JWT against the configured keys and turning its claims
//! into a [`Principal`] — who is calling, what they may do, and until when.
//!
//! Why these choices:
//! - Each configured key is bound to one algorithm, and a token is checked only against keys of the
//!   algorithm its header names. That closes algorithm confusion (an RS256 public key used as an
//!   HS256 secret) and `alg: none`, and keys embedded in the token (`jwk`, `jku`, `x5c`) are never
//!   used. A token's `kid` picks the key with that id; keys without an id are tried otherwise.
//! - Signatures, `iss` and `aud` are checked by `jsonwebtoken`; `exp` and `nbf` are checked here
//!   against a caller-supplied clock (with the configured leeway), so every rule is tested exactly
//!   and the edge can tell when a long subscription's token runs out. `exp` is required: a token
//!   that never expires is refused.
//! - Every refusal is one [`TokenError`] variant with a stable reason (`TOKEN_EXPIRED`,
//!   `ISSUER_MISMATCH`, …), all `UNAUTHENTICATED` at the edge. Expiry, issuer and audience are
//!   only reported once the signature verified, so unsigned input learns nothing.
//!
//! The claims Switchboard reads (others are ignored):
//! ```json
//! {"sub": "agent-17", "exp": 1767225600, "nbf": 1767222000, "iss": "https://idp.example.com",
//!  "aud": "switchboard", "act": {"sub": "crm-panel"}, "client_id": "crm-panel",
//!  "sb": {"publish": ["crm.>"], "subscribe": ["crm.*.updated", "$sys.>"],
//!         "entities": {"read": ["contact"], "update": ["contact"]}}}
//! ```
//! A token without `sb` authenticates its subject but grants nothing.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::permissions::{PermissionSpec, Permissions};
use crate::channel::ChannelLimits;

/// Clock skew tolerated on `exp` and `nbf` when nothing else is configured.
pub(crate) const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Longest token accepted, in bytes; longer ones are refused before any parsing.
pub(crate) const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Shortest HS256 secret accepted, in bytes: the hash's output size (RFC 7518 §3.2).
pub(crate) const MIN_HMAC_SECRET_LEN: usize = 32;
/// Longest `sub` accepted, in bytes.
pub(crate) const MAX_SUBJECT_LEN: usize = 256;
/// The claim that carries Switchboard permissions.
pub(crate) const PERMISSIONS_CLAIM: &str = "sb";
/// Most verification keys one verifier holds (each token is tried against a few at most).
pub(crate) const MAX_KEYS: usize = 64;
/// Size of an Ed25519 public key.
const ED25519_KEY_LEN: usize = 32;
/// Smallest RSA modulus accepted from a JWKS, in bytes (2048 bits).
const MIN_RSA_MODULUS_LEN: usize = 256;

/// Why a token was refused. All are `UNAUTHENTICATED` at the edge; [`TokenError::reason`] is the
/// stable reason in the status details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was presented.
    #[error("no bearer token was presented")]
    Missing,
    /// Not a JWT: not three base64url parts, a header or claims that are not JSON objects, no
    /// `alg`, critical header extensions, or longer than [`MAX_TOKEN_LEN`].
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header's `alg` is not the algorithm of any configured key (including `none`).
    #[error("the token's algorithm {0:?} is not accepted")]
    AlgorithmUnsupported(String),
    /// The header's `kid` names no configured key, and no key without an id has its algorithm.
    #[error("the token's key id {0:?} is not configured")]
    KeyUnknown(String),
    /// The signature does not verify with any candidate key.
    #[error("the token's signature does not verify")]
    Invalid,
    /// `exp` (plus the leeway) has passed.
    #[error("the token expired at {exp} (Unix seconds)")]
    Expired {
        /// The token's `exp`, in Unix seconds.
        exp: u64,
    },
    /// `nbf` (minus the leeway) is still to come.
    #[error("the token is not valid before {nbf} (Unix seconds)")]
    NotYetValid {
        /// The token's `nbf`, in Unix seconds.
        nbf: u64,
    },
    /// `iss` is missing or not an accepted issuer.
    #[error("issuer mismatch: {0}")]
    IssuerMismatch(String),
    /// `aud` is missing or names no accepted audience (or is present when none is configured).
    #[error("audience mismatch: {0}")]
    AudienceMismatch(String),
    /// A signed token whose claims are unusable: no `exp`, a bad `sub`, or a bad permission grant.
    #[error("invalid claims: {0}")]
    ClaimsInvalid(String),
}

impl TokenError {
    /// The stable reason string for the status details.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "TOKEN_MISSING",
            TokenError::Malformed(_) => "TOKEN_MALFORMED",
            TokenError::AlgorithmUnsupported(_) => "TOKEN_ALGORITHM_UNSUPPORTED",
            TokenError::KeyUnknown(_) => "TOKEN_KEY_UNKNOWN",
            TokenError::Invalid => "TOKEN_INVALID",
            TokenError::Expired { .. } => "TOKEN_EXPIRED",
            TokenError::NotYetValid { .. } => "TOKEN_NOT_YET_VALID",
            TokenError::IssuerMismatch(_) => "ISSUER_MISMATCH",
            TokenError::AudienceMismatch(_) => "AUDIENCE_MISMATCH",
            TokenError::ClaimsInvalid(_) => "TOKEN_CLAIMS_INVALID",
        }
    }
}

/// Why a key could not be loaded or a verifier built.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An HS256 secret shorter than [`MIN_HMAC_SECRET_LEN`].
    #[error("the HS256 secret is {len} bytes; at least {MIN_HMAC_SECRET_LEN} are needed")]
    SecretTooShort {
        /// The secret's length.
        len: usize,
    },
    /// An `hs256` key with neither or both of `secret` and `secret_file`.
    #[error("an hs256 key needs exactly one of `secret` and `secret_file`")]
    SecretSource,
    /// A PEM or JWK that is not a usable public key for its algorithm.
    #[error("{what}: {detail}")]
    InvalidKey {
        /// Which key.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A JWKS that does not parse.
    #[error("the JWKS does not parse: {0}")]
    InvalidJwks(String),
    /// A JWKS without a single key usable for verifying signatures.
    #[error("the JWKS has no usable signature-verification key")]
    NoUsableKeys,
    /// A verifier without keys.
    #[error("no token verification key is configured")]
    NoKeys,
    /// More keys than [`MAX_KEYS`].
    #[error("{0} token verification keys are configured; at most {MAX_KEYS} are supported")]
    TooManyKeys(usize),
}

/// One key a token may be verified with, bound to one algorithm.
#[derive(Clone)]
pub struct VerificationKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// An HS256 shared secret (at least [`MIN_HMAC_SECRET_LEN`] bytes).
    pub fn hs256(secret: &[u8], kid: Option<String>) -> Result<VerificationKey, KeyError> {
        if secret.len() < MIN_HMAC_SECRET_LEN {
            return Err(KeyError::SecretTooShort { len: secret.len() });
        }
        Self::checked(
            kid,
            Algorithm::HS256,
            DecodingKey::from_secret(secret),
            "HS256 secret",
        )
    }

    /// An RS256 public key in PEM (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
    pub fn rs256_pem(pem: &[u8], kid: Option<String>) -> Result<VerificationKey, KeyError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| invalid("RS256 public key", e))?;
        Self::checked(kid, Algorithm::RS256, key, "RS256 public key")
    }

    /// An ES256 (P-256) public key in PEM.
    pub fn es256_pem(pem: &[u8], kid: Option<String>) -> Result<VerificationKey, KeyError> {
        let key = DecodingKey::from_ec_pem(pem).map_err(|e| invalid("ES256 public key", e))?;
        Self::checked(kid, Algorithm::ES256, key, "ES256 public key")
    }

    /// An EdDSA (Ed25519) public key in PEM.
    pub fn eddsa_pem(pem: &[u8], kid: Option<String>) -> Result<VerificationKey, KeyError> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|e| invalid("EdDSA public key", e))?;
        Self::checked(kid, Algorithm::EdDSA, key, "EdDSA public key")
    }

    /// The signature-verification keys of a JWKS document. Keys for encryption (`"use":"enc"`, or
    /// `key_ops` without `verify`), of unsupported types or curves, RSA keys under 2048 bits,
    /// symmetric keys without an `alg`, and keys whose `alg` does not fit their type are skipped;
    /// a JWKS with no key left is an error.
    pub fn from_jwks(json: &[u8]) -> Result<Vec<VerificationKey>, KeyError> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| KeyError::InvalidJwks(e.to_string()))?;
        let keys: Vec<VerificationKey> = set.keys.iter().filter_map(jwk_key).collect();
        if keys.is_empty() {
            return Err(KeyError::NoUsableKeys);
        }
        Ok(keys)
    }

    /// The key's id, matched against a token's `kid`.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Builds the key after checking it can verify at all, so a bad key fails at start rather than
    /// refusing every token (and an Ed25519 key of the wrong size never reaches the crypto code).
    fn checked(
        kid: Option<String>,
        algorithm: Algorithm,
        key: DecodingKey,
        what: &str,
    ) -> Result<VerificationKey, KeyError> {
        if algorithm == Algorithm::EdDSA {
            let len = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
            if len != ED25519_KEY_LEN {
                return Err(KeyError::InvalidKey {
                    what: what.to_owned(),
                    detail: format!("an Ed25519 public key is {ED25519_KEY_LEN} bytes, not {len}"),
                });
            }
        }
        // A dummy signature: a usable key answers "does not verify", a broken one with an error.
        jsonwebtoken::crypto::verify("AAAA", b"", &key, algorithm).map_err(|e| invalid(what, e))?;
        Ok(VerificationKey {
            kid,
            algorithm,
            key,
        })
    }
}

fn invalid(what: &str, error: jsonwebtoken::errors::Error) -> KeyError {
    KeyError::InvalidKey {
        what: what.to_owned(),
        detail: error.to_string(),
    }
}

/// The verification key a JWK describes, if it is one this verifier can use.
fn jwk_key(jwk: &Jwk) -> Option<VerificationKey> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return None;
        }
    }
    let declared = match jwk.common.key_algorithm {
        Some(alg) => Some(Algorithm::try_from(alg).ok()?),
        None => None,
    };
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let modulus = URL_SAFE_NO_PAD.decode(&rsa.n).ok()?;
            let significant = modulus.iter().skip_while(|b| **b == 0).count();
            if significant < MIN_RSA_MODULUS_LEN {
                return None;
            }
            declared.unwrap_or(Algorithm::RS256)
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let implied = match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return None,
            };
            if declared.is_some_and(|d| d != implied) {
                return None;
            }
            implied
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            if okp.curve != EllipticCurve::Ed25519 {
                return None;
            }
            declared.unwrap_or(Algorithm::EdDSA)
        }
        // A symmetric key must say which HMAC it is for.
        AlgorithmParameters::OctetKey(_) => declared?,
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    if key.family() != algorithm.family() {
        return None;
    }
    if key.family() == AlgorithmFamily::Hmac
        && key.try_get_as_bytes().map_or(0, <[u8]>::len) < MIN_HMAC_SECRET_LEN
    {
        return None;
    }
    let kid = jwk.common.key_id.clone();
    VerificationKey::checked(kid, algorithm, key, "JWK").ok()
}

/// A verification key as written in the configuration: the key material lives in files (or, for
/// HS256, optionally inline).
///
/// ```toml
/// [[auth.keys]]
/// kind = "eddsa"                 # hs256 | rs256 | es256 | eddsa | jwks
/// kid = "2026-01"                # optional; matched against the token header's `kid`
/// public_key_file = "/etc/switchboard/idp-ed25519.pub.pem"
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum KeyConfig {
    /// A shared HS256 secret: its bytes as written, or a file's contents with surrounding
    /// whitespace trimmed.
    Hs256 {
        /// Key id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kid: Option<String>,
        /// The secret itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
        /// A file holding the secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret_file: Option<PathBuf>,
    },
    /// An RS256 public key in a PEM file.
    Rs256 {
        /// Key id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kid: Option<String>,
        /// The PEM file.
        public_key_file: PathBuf,
    },
    /// An ES256 public key in a PEM file.
    Es256 {
        /// Key id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kid: Option<String>,
        /// The PEM file.
        public_key_file: PathBuf,
    },
    /// An EdDSA (Ed25519) public key in a PEM file.
    EdDsa {
        /// Key id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kid: Option<String>,
        /// The PEM file.
        public_key_file: PathBuf,
    },
    /// A JWKS document in a file; each key's `kid` and `alg` come from the document.
    Jwks {
        /// The JSON file.
        file: PathBuf,
    },
}

impl fmt::Debug for KeyConfig {
    /// Never prints an inline secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyConfig::Hs256 {
                kid,
                secret,
                secret_file,
            } => f
                .debug_struct("Hs256")
                .field("kid", kid)
                .field("secret", &secret.as_ref().map(|_| "[redacted]"))
                .field("secret_file", secret_file)
                .finish(),
            KeyConfig::Rs256 {
                kid,
                public_key_file,
            } => f
                .debug_struct("Rs256")
                .field("kid", kid)
                .field("public_key_file", public_key_file)
                .finish(),
            KeyConfig::Es256 {
                kid,
                public_key_file,
            } => f
                .debug_struct("Es256")
                .field("kid", kid)
                .field("public_key_file", public_key_file)
                .finish(),
            KeyConfig::EdDsa {
                kid,
                public_key_file,
            } => f
                .debug_struct("EdDsa")
                .field("kid", kid)
                .field("public_key_file", public_key_file)
                .finish(),
            KeyConfig::Jwks { file } => f.debug_struct("Jwks").field("file", file).finish(),
        }
    }
}

impl KeyConfig {
    /// Reads the key material and builds the verification keys (one, or a JWKS's usable keys).
    pub fn load(&self) -> Result<Vec<VerificationKey>, KeyError> {
        match self {
            KeyConfig::Hs256 {
                kid,
                secret,
                secret_file,
            } => {
                let secret = match (secret, secret_file) {
                    (Some(secret), None) => secret.as_bytes().to_vec(),
                    (None, Some(path)) => read(path)?.trim_ascii().to_vec(),
                    _ => return Err(KeyError::SecretSource),
                };
                Ok(vec![VerificationKey::hs256(&secret, kid.clone())?])
            }
            KeyConfig::Rs256 {
                kid,
                public_key_file,
            } => Ok(vec![VerificationKey::rs256_pem(
                &read(public_key_file)?,
                kid.clone(),
            )?]),
            KeyConfig::Es256 {
                kid,
                public_key_file,
            } => Ok(vec![VerificationKey::es256_pem(
                &read(public_key_file)?,
                kid.clone(),
            )?]),
            KeyConfig::EdDsa {
                kid,
                public_key_file,
            } => Ok(vec![VerificationKey::eddsa_pem(
                &read(public_key_file)?,
                kid.clone(),
            )?]),
            KeyConfig::Jwks { file } => VerificationKey::from_jwks(&read(file)?),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// What a verifier accepts besides the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VerifierSettings {
    /// Accepted `iss` values; when not empty, a token must have one of them.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; when not empty, a token's `aud` must name one of them. When empty, a
    /// token with any `aud` is refused (RFC 7519 §4.1.3: it is meant for someone else).
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Limits the permission patterns in the claims are parsed with.
    pub channel_limits: ChannelLimits,
}

impl Default for VerifierSettings {
    fn default() -> Self {
        VerifierSettings {
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            channel_limits: ChannelLimits::default(),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// The token's `sub`: the user or service the calls are made for.
    pub subject: String,
    /// The token's `iss`, when it has one: with the subject, whom a durable consumer belongs to.
    pub issuer: Option<String>,
    /// `act.sub`: who acts on the subject's behalf (a client minting for an agent), if anyone.
    // This and the next are verified claims kept with the principal; no decision reads them yet
    // (the tests check them).
    #[cfg_attr(not(test), allow(dead_code))]
    pub actor: Option<String>,
    /// The token's `client_id`, when it has one.
    #[cfg_attr(not(test), allow(dead_code))]
    pub client_id: Option<String>,
    /// What the caller may do.
    pub permissions: Permissions,
    /// The token's `exp`. The edge ends a stream whose principal has expired (plus the leeway).
    pub expires_at: SystemTime,
}

impl Principal {
    /// Time left until `expires_at`, zero once past.
    #[cfg(test)]
    pub(crate) fn expires_in(&self, now: SystemTime) -> Duration {
        self.expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// Takes the token out of an `authorization` metadata value: `Bearer <token>` (the scheme in any
/// case).
pub(crate) fn bearer_token(authorization: &str) -> Result<&str, TokenError> {
    let value = authorization.trim();
    if value.is_empty() {
        return Err(TokenError::Missing);
    }
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed(
            "the authorization value is not `Bearer <token>`".into(),
        ));
    }
    match token.trim() {
        "" => Err(TokenError::Missing),
        token => Ok(token),
    }
}

/// A configured key with the `jsonwebtoken` validation for it.
#[derive(Debug, Clone)]
struct KeyEntry {
    key: VerificationKey,
    validation: Validation,
}

/// Verifies bearer tokens against a fixed set of keys.
#[derive(Debug, Clone)]
pub(crate) struct TokenVerifier {
    keys: Vec<KeyEntry>,
    settings: VerifierSettings,
}

impl TokenVerifier {
    /// A verifier for `keys` (1 to [`MAX_KEYS`]) with `settings`.
    pub(crate) fn new(
        keys: Vec<VerificationKey>,
        settings: VerifierSettings,
    ) -> Result<TokenVerifier, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::TooManyKeys(keys.len()));
        }
        let keys = keys
            .into_iter()
            .map(|key| {
                let mut validation = Validation::new(key.algorithm);
                // Time is checked in `principal`, against the caller's clock.
                validation.validate_exp = false;
                validation.validate_nbf = false;
                validation.leeway = 0;
                validation.required_spec_claims = HashSet::new();
                if !settings.issuers.is_empty() {
                    validation.set_issuer(&settings.issuers);
                    validation.required_spec_claims.insert("iss".to_owned());
                }
                if !settings.audiences.is_empty() {
                    validation.set_audience(&settings.audiences);
                    validation.required_spec_claims.insert("aud".to_owned());
                }
                validation.validate_aud = true;
                KeyEntry { key, validation }
            })
            .collect();
        Ok(TokenVerifier { keys, settings })
    }

    /// Verifies `token` now.
    pub(crate) fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        self.verify_at(token, SystemTime::now())
    }

    /// Verifies `token` as of `now`.
    pub(crate) fn verify_at(&self, token: &str, now: SystemTime) -> Result<Principal, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "{} bytes long, over the limit of {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        let header = parse_header(token)?;
        let same_algorithm: Vec<&KeyEntry> = self
            .keys
            .iter()
            .filter(|entry| entry.key.algorithm == header.alg)
            .collect();
        if same_algorithm.is_empty() {
            return Err(TokenError::AlgorithmUnsupported(format!(
                "{:?}",
                header.alg
            )));
        }
        let candidates: Vec<&KeyEntry> = match &header.kid {
            None => same_algorithm,
            Some(kid) => {
                let named: Vec<&KeyEntry> = same_algorithm
                    .iter()
                    .copied()
                    .filter(|entry| entry.key.kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    let anonymous: Vec<&KeyEntry> = same_algorithm
                        .into_iter()
                        .filter(|entry| entry.key.kid.is_none())
                        .collect();
                    if anonymous.is_empty() {
                        return Err(TokenError::KeyUnknown(kid.clone()));
                    }
                    anonymous
                } else {
                    named
                }
            }
        };
        for entry in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(
                token,
                &entry.key.key,
                &entry.validation,
            ) {
                Ok(data) => return self.principal(data.claims, now),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(map_error(e)),
            }
        }
        Err(TokenError::Invalid)
    }

    /// Turns verified claims into a principal, checking the time window and the claims' shape.
    fn principal(
        &self,
        mut claims: Map<String, Value>,
        now: SystemTime,
    ) -> Result<Principal, TokenError> {
        let leeway = self.settings.leeway;
        let exp = match claims.remove("exp") {
            None => {
                return Err(TokenError::ClaimsInvalid(
                    "no `exp`: tokens must expire".into(),
                ))
            }
            Some(value) => numeric_date("exp", &value)?,
        };
        let nbf = claims
            .remove("nbf")
            .map(|value| numeric_date("nbf", &value))
            .transpose()?;
        let now_since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        if now_since_epoch >= exp.saturating_add(leeway) {
            return Err(TokenError::Expired { exp: exp.as_secs() });
        }
        if let Some(nbf) = nbf {
            if now_since_epoch.saturating_add(leeway) < nbf {
                return Err(TokenError::NotYetValid { nbf: nbf.as_secs() });
            }
        }
        let subject = match claims.remove("sub") {
            Some(Value::String(sub)) => check_subject("sub", sub)?,
            Some(_) => return Err(TokenError::ClaimsInvalid("`sub` is not a string".into())),
            None => return Err(TokenError::ClaimsInvalid("no `sub`".into())),
        };
        let actor = match claims.remove("act") {
            None => None,
            Some(Value::Object(act)) => match act.get("sub") {
                Some(Value::String(sub)) => Some(check_subject("act.sub", sub.clone())?),
                _ => {
                    return Err(TokenError::ClaimsInvalid(
                        "`act` has no string `sub`".into(),
                    ))
                }
            },
            Some(_) => return Err(TokenError::ClaimsInvalid("`act` is not an object".into())),
        };
        let permissions = match claims.remove(PERMISSIONS_CLAIM) {
            None => Permissions::none(),
            Some(value @ Value::Object(_)) => {
                let spec: PermissionSpec = serde_json::from_value(value).map_err(|e| {
                    TokenError::ClaimsInvalid(format!("`{PERMISSIONS_CLAIM}`: {e}"))
                })?;
                Permissions::from_spec(&spec, &self.settings.channel_limits)
                    .map_err(|e| TokenError::ClaimsInvalid(format!("`{PERMISSIONS_CLAIM}`: {e}")))?
            }
            Some(_) => {
                return Err(TokenError::ClaimsInvalid(format!(
                    "`{PERMISSIONS_CLAIM}` is not an object"
                )))
            }
        };
        Ok(Principal {
            subject,
            issuer: claims
                .remove("iss")
                .and_then(|v| v.as_str().map(str::to_owned)),
            actor,
            client_id: claims
                .remove("client_id")
                .and_then(|v| v.as_str().map(str::to_owned)),
            permissions,
            expires_at: UNIX_EPOCH + exp,
        })
    }
}

/// A header's algorithm and key id.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

fn parse_header(token: &str) -> Result<TokenHeader, TokenError> {
    let malformed = |what: &str| TokenError::Malformed(what.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three `.`-separated parts"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("the header is not base64url"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| malformed("the header is not a JSON object"))?;
    if header.contains_key("crit") {
        return Err(malformed(
            "the header has critical extensions (`crit`), which are not supported",
        ));
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg,
        _ => return Err(malformed("the header has no string `alg`")),
    };
    let alg = alg
        .parse::<Algorithm>()
        .map_err(|_| TokenError::AlgorithmUnsupported(alg.clone()))?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(malformed("the header's `kid` is not a string")),
    };
    Ok(TokenHeader { alg, kid })
}

/// A NumericDate (RFC 7519 §2): non-negative seconds since the epoch, integer or fractional.
fn numeric_date(claim: &str, value: &Value) -> Result<Duration, TokenError> {
    let invalid = || TokenError::ClaimsInvalid(format!("`{claim}` is not a non-negative number"));
    let Value::Number(number) = value else {
        return Err(invalid());
    };
    // A date past what the clock can hold (2^63 seconds overflowed `SystemTime` and panicked
    // the request, issue 20) is no date a token needs.
    let too_late = || TokenError::ClaimsInvalid(format!("`{claim}` is after the year 9999"));
    let date = match number.as_u64() {
        Some(seconds) => Duration::from_secs(seconds),
        None => {
            let seconds = number
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .ok_or_else(invalid)?;
            // A finite, non-negative number fails only for being too large.
            Duration::try_from_secs_f64(seconds).map_err(|_| too_late())?
        }
    };
    if date > MAX_NUMERIC_DATE {
        return Err(too_late());
    }
    Ok(date)
}

/// The latest NumericDate a claim may hold: 9999-12-31T23:59:59Z.
const MAX_NUMERIC_DATE: Duration = Duration::from_secs(253_402_300_799);

/// A subject: 1 to [`MAX_SUBJECT_LEN`] bytes without control characters.
fn check_subject(claim: &str, subject: String) -> Result<String, TokenError> {
    if subject.is_empty()
        || subject.len() > MAX_SUBJECT_LEN
        || subject.chars().any(char::is_control)
    {
        return Err(TokenError::ClaimsInvalid(format!(
            "`{claim}` must be 1 to {MAX_SUBJECT_LEN} bytes without control characters"
        )));
    }
    Ok(subject)
}

/// Maps a `jsonwebtoken` failure (other than a bad signature, which tries the next key).
fn map_error(error: jsonwebtoken::errors::Error) -> TokenError {
    match error.kind() {
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed(error.to_string())
        }
        ErrorKind::Json(_) => TokenError::Malformed("the claims are not a JSON object".into()),
        ErrorKind::InvalidIssuer => {
            TokenError::IssuerMismatch("`iss` is not an accepted issuer".into())
        }
        ErrorKind::InvalidAudience => {
            TokenError::AudienceMismatch("`aud` names no accepted audience".into())
        }
        ErrorKind::MissingRequiredClaim(claim) if claim.as_str() == "iss" => {
            TokenError::IssuerMismatch("the token has no `iss`".into())
        }
        ErrorKind::MissingRequiredClaim(claim) if claim.as_str() == "aud" => {
            TokenError::AudienceMismatch("the token has no `aud`".into())
        }
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
            TokenError::ClaimsInvalid(format!("`{claim}` is missing or malformed"))
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => TokenError::AlgorithmUnsupported(error.to_string()),
        _ => TokenError::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Pattern;
    use crate::security::test_keys;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";
    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn settings() -> VerifierSettings {
        VerifierSettings {
            issuers: vec!["https://idp.example.com".into()],
            audiences: vec!["switchboard".into()],
            leeway: Duration::from_secs(30),
            channel_limits: ChannelLimits::default(),
        }
    }

    fn hs_verifier() -> TokenVerifier {
        let key = VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}"));
        TokenVerifier::new(vec![key], settings()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn claims() -> Value {
        json!({
            "sub": "agent-17",
            "iss": "https://idp.example.com",
            "aud": "switchboard",
            "exp": NOW + 600,
            "nbf": NOW - 10,
            "sb": {
                "publish": ["crm.>"],
                "subscribe": ["crm.*.updated"],
                "entities": {"read": ["contact"], "update": ["contact"]}
            }
        })
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        if let Some(object) = claims.as_object_mut() {
            if value.is_null() {
                object.remove(key);
            } else {
                object.insert(key.to_owned(), value);
            }
        }
        claims
    }

    fn sign(header: &Header, claims: &Value, key: &EncodingKey) -> String {
        encode(header, claims, key).unwrap_or_else(|e| panic!("signing: {e}"))
    }

    fn hs(claims: &Value) -> String {
        sign(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
    }

    fn reason(result: Result<Principal, TokenError>) -> &'static str {
        match result {
            Ok(p) => panic!("should be refused, got {p:?}"),
            Err(e) => e.reason(),
        }
    }

    fn ok(result: Result<Principal, TokenError>) -> Principal {
        result.unwrap_or_else(|e| panic!("should verify: {e} ({})", e.reason()))
    }

    fn b64(json: &Value) -> String {
        URL_SAFE_NO_PAD.encode(json.to_string())
    }

    #[test]
    fn valid_token_becomes_a_principal() {
        let p = ok(hs_verifier().verify_at(&hs(&claims()), now()));
        assert_eq!(p.subject, "agent-17");
        assert_eq!(p.issuer.as_deref(), Some("https://idp.example.com"));
        assert_eq!(p.actor, None);
        assert_eq!(p.expires_at, UNIX_EPOCH + Duration::from_secs(NOW + 600));
        assert_eq!(p.expires_in(now()), Duration::from_secs(600));
        assert_eq!(
            p.expires_in(now() + Duration::from_secs(9999)),
            Duration::ZERO
        );
        assert!(p.permissions.may_publish("crm.contact.updated"));
        assert!(!p.permissions.may_publish("orders.placed"));
        let limits = ChannelLimits::default();
        let pattern = |s: &str| Pattern::parse(s, &limits).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.permissions.may_subscribe(&pattern("crm.contact.updated")));
        assert!(!p.permissions.may_subscribe(&pattern("crm.>")));
        assert!(p.permissions.may_subscribe(&pattern("$state.contact.>")));
        assert!(p.permissions.may_read_entity("contact"));
        assert!(p.permissions.may_update_entity("contact"));
        assert!(!p.permissions.may_read_entity("deal"));
    }

    #[test]
    fn expiry_with_leeway() {
        let v = hs_verifier();
        let at = |exp: u64| v.verify_at(&hs(&with(claims(), "exp", json!(exp))), now());
        assert_eq!(reason(at(NOW - 31)), "TOKEN_EXPIRED");
        assert_eq!(reason(at(NOW - 30)), "TOKEN_EXPIRED");
        ok(at(NOW - 29));
        ok(at(NOW + 1));
        assert_eq!(
            at(NOW - 100).err(),
            Some(TokenError::Expired { exp: NOW - 100 })
        );
        // The same token, verified later.
        let token = hs(&claims());
        ok(v.verify_at(&token, now() + Duration::from_secs(629)));
        assert_eq!(
            reason(v.verify_at(&token, now() + Duration::from_secs(630))),
            "TOKEN_EXPIRED"
        );
        // Fractional NumericDates are allowed.
        ok(v.verify_at(&hs(&with(claims(), "exp", json!(NOW as f64 + 0.5))), now()));
    }

    #[test]
    fn not_before_with_leeway() {
        let v = hs_verifier();
        let at = |nbf: u64| v.verify_at(&hs(&with(claims(), "nbf", json!(nbf))), now());
        assert_eq!(reason(at(NOW + 31)), "TOKEN_NOT_YET_VALID");
        assert_eq!(
            at(NOW + 60).err(),
            Some(TokenError::NotYetValid { nbf: NOW + 60 })
        );
        ok(at(NOW + 30));
        ok(at(NOW));
        ok(v.verify_at(&hs(&with(claims(), "nbf", Value::Null)), now()));
    }

    #[test]
    fn issuer_rules() {
        let v = hs_verifier();
        let token = |iss: Value| hs(&with(claims(), "iss", iss));
        assert_eq!(
            reason(v.verify_at(&token(json!("https://evil.example.com")), now())),
            "ISSUER_MISMATCH"
        );
        assert_eq!(
            reason(v.verify_at(&token(json!("https://idp.example.com/")), now())),
            "ISSUER_MISMATCH"
        );
        assert_eq!(
            reason(v.verify_at(&token(Value::Null), now())),
            "ISSUER_MISMATCH"
        );
        // Without configured issuers, any (or no) issuer is accepted.
        let open = TokenVerifier::new(
            vec![VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}"))],
            VerifierSettings {
                issuers: Vec::new(),
                ..settings()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        ok(open.verify_at(&token(json!("https://anyone.example.com")), now()));
        ok(open.verify_at(&token(Value::Null), now()));
    }

    #[test]
    fn audience_rules() {
        let v = hs_verifier();
        let token = |aud: Value| hs(&with(claims(), "aud", aud));
        ok(v.verify_at(&token(json!(["other", "switchboard"])), now()));
        assert_eq!(
            reason(v.verify_at(&token(json!("other")), now())),
            "AUDIENCE_MISMATCH"
        );
        assert_eq!(
            reason(v.verify_at(&token(json!(["a", "b"])), now())),
            "AUDIENCE_MISMATCH"
        );
        assert_eq!(
            reason(v.verify_at(&token(Value::Null), now())),
            "AUDIENCE_MISMATCH"
        );
        // Without configured audiences, a token meant for someone is refused; one without is not.
        let open = TokenVerifier::new(
            vec![VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}"))],
            VerifierSettings {
                audiences: Vec::new(),
                ..settings()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            reason(open.verify_at(&token(json!("switchboard")), now())),
            "AUDIENCE_MISMATCH"
        );
        ok(open.verify_at(&token(Value::Null), now()));
    }

    #[test]
    fn bad_signatures_are_refused() {
        let v = hs_verifier();
        let other = sign(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        );
        assert_eq!(reason(v.verify_at(&other, now())), "TOKEN_INVALID");
        // A payload swapped under a valid header and signature.
        let token = hs(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = with(claims(), "sub", json!("admin"));
        let forged = format!("{}.{}.{}", parts[0], b64(&forged_claims), parts[2]);
        assert_eq!(reason(v.verify_at(&forged, now())), "TOKEN_INVALID");
        // A truncated signature.
        let truncated = &token[..token.len() - 3];
        assert_eq!(reason(v.verify_at(truncated, now())), "TOKEN_INVALID");
        // Expired *and* badly signed: the signature is judged first, so nothing leaks.
        let expired_forgery = sign(
            &Header::new(Algorithm::HS256),
            &with(claims(), "exp", json!(1)),
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        );
        assert_eq!(
            reason(v.verify_at(&expired_forgery, now())),
            "TOKEN_INVALID"
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let v = hs_verifier();
        let header = b64(&json!({"alg": "HS256", "typ": "JWT"}));
        let body = b64(&claims());
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "TOKEN_MISSING"),
            ("abc".into(), "TOKEN_MALFORMED"),
            ("a.b".into(), "TOKEN_MALFORMED"),
            ("a.b.c.d".into(), "TOKEN_MALFORMED"),
            ("!!!.b.c".into(), "TOKEN_MALFORMED"),
            (
                format!("{}.{body}.sig", URL_SAFE_NO_PAD.encode("not json")),
                "TOKEN_MALFORMED",
            ),
            (
                format!("{}.{body}.sig", b64(&json!({"typ": "JWT"}))),
                "TOKEN_MALFORMED",
            ),
            (
                format!("{}.{body}.sig", b64(&json!({"alg": 256}))),
                "TOKEN_MALFORMED",
            ),
            (
                format!("{}.{body}.sig", b64(&json!(["HS256"]))),
                "TOKEN_MALFORMED",
            ),
            (
                format!("{}.{body}.sig", b64(&json!({"alg": "HS256", "kid": 1}))),
                "TOKEN_MALFORMED",
            ),
            (format!("{header}.{body}.!!"), "TOKEN_MALFORMED"),
            (
                format!(
                    "{}.{body}.sig",
                    b64(&json!({"alg": "HS256", "crit": ["exp"]}))
                ),
                "TOKEN_MALFORMED",
            ),
        ];
        for (token, expected) in &cases {
            assert_eq!(reason(v.verify_at(token, now())), *expected, "{token:?}");
        }
        let huge = format!("{header}.{}.sig", "A".repeat(MAX_TOKEN_LEN));
        assert_eq!(reason(v.verify_at(&huge, now())), "TOKEN_MALFORMED");
        // A validly signed payload that is not a JSON object.
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode("[1,2]"));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            reason(v.verify_at(&format!("{message}.{signature}"), now())),
            "TOKEN_MALFORMED"
        );
    }

    #[test]
    fn unaccepted_algorithms_are_refused() {
        let v = hs_verifier();
        let body = b64(&claims());
        for alg in ["none", "None", "HS257", "RS256", "ES256", "EdDSA", "HS512"] {
            let token = format!("{}.{body}.", b64(&json!({"alg": alg})));
            assert_eq!(
                reason(v.verify_at(&token, now())),
                "TOKEN_ALGORITHM_UNSUPPORTED",
                "{alg}"
            );
        }
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        // An HS256 token whose "secret" is the ES256 public key, against a verifier that holds
        // that public key (and, in the second case, an HS256 secret as well).
        let forged = sign(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(test_keys::P256_PUBLIC.as_bytes()),
        );
        let es = VerificationKey::es256_pem(test_keys::P256_PUBLIC.as_bytes(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let only_es =
            TokenVerifier::new(vec![es.clone()], settings()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            reason(only_es.verify_at(&forged, now())),
            "TOKEN_ALGORITHM_UNSUPPORTED"
        );
        let hs = VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}"));
        let both = TokenVerifier::new(vec![es, hs], settings()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reason(both.verify_at(&forged, now())), "TOKEN_INVALID");
        // A key embedded in the header is never used.
        let mut header = Header::new(Algorithm::HS256);
        header.jwk =
            serde_json::from_value(json!({"kty": "oct", "k": "YXR0YWNrZXI", "alg": "HS256"})).ok();
        let embedded = sign(&header, &claims(), &EncodingKey::from_secret(b"attacker"));
        assert_eq!(reason(both.verify_at(&embedded, now())), "TOKEN_INVALID");
    }

    #[test]
    fn es256_eddsa_and_rs256_keys() {
        let cases = [
            (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(test_keys::P256_PRIVATE.as_bytes()),
                VerificationKey::es256_pem(test_keys::P256_PUBLIC.as_bytes(), None),
            ),
            (
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(test_keys::ED25519_PRIVATE.as_bytes()),
                VerificationKey::eddsa_pem(test_keys::ED25519_PUBLIC.as_bytes(), None),
            ),
            (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(test_keys::RSA_PRIVATE.as_bytes()),
                VerificationKey::rs256_pem(test_keys::RSA_PUBLIC.as_bytes(), None),
            ),
        ];
        for (alg, signing, verifying) in cases {
            let signing = signing.unwrap_or_else(|e| panic!("{alg:?} private key: {e}"));
            let verifying = verifying.unwrap_or_else(|e| panic!("{alg:?} public key: {e}"));
            assert_eq!(verifying.algorithm(), alg);
            let v =
                TokenVerifier::new(vec![verifying], settings()).unwrap_or_else(|e| panic!("{e}"));
            let token = sign(&Header::new(alg), &claims(), &signing);
            assert_eq!(
                ok(v.verify_at(&token, now())).subject,
                "agent-17",
                "{alg:?}"
            );
            let expired = sign(
                &Header::new(alg),
                &with(claims(), "exp", json!(NOW - 60)),
                &signing,
            );
            assert_eq!(
                reason(v.verify_at(&expired, now())),
                "TOKEN_EXPIRED",
                "{alg:?}"
            );
            // Tampering breaks every algorithm.
            let parts: Vec<&str> = token.split('.').collect();
            let forged = format!(
                "{}.{}.{}",
                parts[0],
                b64(&with(claims(), "sub", json!("admin"))),
                parts[2]
            );
            assert_eq!(
                reason(v.verify_at(&forged, now())),
                "TOKEN_INVALID",
                "{alg:?}"
            );
        }
        // An EdDSA token signed by another key.
        let other = EncodingKey::from_ed_pem(test_keys::ED25519_OTHER_PRIVATE.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let ed = VerificationKey::eddsa_pem(test_keys::ED25519_PUBLIC.as_bytes(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let v = TokenVerifier::new(vec![ed], settings()).unwrap_or_else(|e| panic!("{e}"));
        let token = sign(&Header::new(Algorithm::EdDSA), &claims(), &other);
        assert_eq!(reason(v.verify_at(&token, now())), "TOKEN_INVALID");
    }

    #[test]
    fn key_ids_pick_the_key() {
        let k1 = VerificationKey::hs256(
            b"k1-secret-k1-secret-k1-secret-k1-secret",
            Some("k1".into()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let k2 = VerificationKey::hs256(
            b"k2-secret-k2-secret-k2-secret-k2-secret",
            Some("k2".into()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let v = TokenVerifier::new(vec![k1, k2], settings()).unwrap_or_else(|e| panic!("{e}"));
        let signed = |kid: Option<&str>, secret: &[u8]| {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = kid.map(str::to_owned);
            sign(&header, &claims(), &EncodingKey::from_secret(secret))
        };
        let k2_secret = b"k2-secret-k2-secret-k2-secret-k2-secret";
        ok(v.verify_at(&signed(Some("k2"), k2_secret), now()));
        ok(v.verify_at(&signed(None, k2_secret), now()));
        assert_eq!(
            reason(v.verify_at(&signed(Some("k1"), k2_secret), now())),
            "TOKEN_INVALID"
        );
        assert_eq!(
            reason(v.verify_at(&signed(Some("k3"), k2_secret), now())),
            "TOKEN_KEY_UNKNOWN"
        );
        // A key without an id is tried for an unknown kid.
        let anonymous = VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}"));
        let v = TokenVerifier::new(vec![anonymous], settings()).unwrap_or_else(|e| panic!("{e}"));
        ok(v.verify_at(&signed(Some("whatever"), SECRET), now()));
    }

    #[test]
    fn claim_shapes() {
        let v = hs_verifier();
        let check = |claims: Value| v.verify_at(&hs(&claims), now());
        assert_eq!(
            reason(check(with(claims(), "exp", Value::Null))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "exp", json!("soon")))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "exp", json!(-5)))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "nbf", json!("now")))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "sub", Value::Null))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "sub", json!(42)))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "sub", json!("")))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "sub", json!("a\nb")))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(
                claims(),
                "sub",
                json!("x".repeat(MAX_SUBJECT_LEN + 1))
            ))),
            "TOKEN_CLAIMS_INVALID"
        );
        for bad in [
            json!({"publish": ["$state.>"]}),
            json!({"publish": ["crm..x"]}),
            json!({"subscribe": ["$state.>"]}),
            json!({"entities": {"read": ["a b"]}}),
            json!({"publsh": ["crm.>"]}),
            json!([["crm.>"]]),
            json!("crm.>"),
        ] {
            let e = check(with(claims(), "sb", bad.clone())).err();
            assert_eq!(
                e.as_ref().map(TokenError::reason),
                Some("TOKEN_CLAIMS_INVALID"),
                "{bad}"
            );
            assert!(e.is_some_and(|e| e.to_string().contains("`sb`")));
        }
        // No `sb`: authenticated, allowed nothing.
        let p = ok(check(with(claims(), "sb", Value::Null)));
        assert!(!p.permissions.may_publish("crm.a") && !p.permissions.may_read_entity("contact"));
        // Acting on behalf of a subject.
        let p = ok(check(with(
            with(claims(), "act", json!({"sub": "crm-panel"})),
            "client_id",
            json!("crm-panel"),
        )));
        assert_eq!(p.actor.as_deref(), Some("crm-panel"));
        assert_eq!(p.client_id.as_deref(), Some("crm-panel"));
        assert_eq!(
            reason(check(with(claims(), "act", json!("crm-panel")))),
            "TOKEN_CLAIMS_INVALID"
        );
        assert_eq!(
            reason(check(with(claims(), "act", json!({"iss": "x"})))),
            "TOKEN_CLAIMS_INVALID"
        );
        // Unknown claims are ignored.
        ok(check(with(claims(), "scope", json!("openid profile"))));
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer_token("Bearer abc.def.ghi"), Ok("abc.def.ghi"));
        assert_eq!(bearer_token("bearer   abc "), Ok("abc"));
        assert_eq!(bearer_token("BEARER abc"), Ok("abc"));
        assert_eq!(bearer_token(""), Err(TokenError::Missing));
        assert_eq!(bearer_token("Bearer"), Err(TokenError::Missing));
        assert_eq!(bearer_token("Bearer "), Err(TokenError::Missing));
        assert_eq!(
            bearer_token("Basic dXNlcjpwdw==").map_err(|e| e.reason()),
            Err("TOKEN_MALFORMED")
        );
        assert_eq!(
            bearer_token("abc.def.ghi").map_err(|e| e.reason()),
            Err("TOKEN_MALFORMED")
        );
    }

    #[test]
    fn keys_are_checked_when_loaded() {
        assert!(matches!(
            VerificationKey::hs256(b"short", None),
            Err(KeyError::SecretTooShort { len: 5 })
        ));
        assert!(matches!(
            VerificationKey::es256_pem(b"not a pem", None),
            Err(KeyError::InvalidKey { .. })
        ));
        assert!(matches!(
            VerificationKey::es256_pem(test_keys::ED25519_PUBLIC.as_bytes(), None),
            Err(KeyError::InvalidKey { .. })
        ));
        assert!(matches!(
            VerificationKey::eddsa_pem(test_keys::P256_PUBLIC.as_bytes(), None),
            Err(KeyError::InvalidKey { .. })
        ));
        assert!(matches!(
            VerificationKey::rs256_pem(test_keys::P256_PUBLIC.as_bytes(), None),
            Err(KeyError::InvalidKey { .. })
        ));
        assert!(matches!(
            TokenVerifier::new(Vec::new(), settings()),
            Err(KeyError::NoKeys)
        ));
        let key = VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            TokenVerifier::new(vec![key; MAX_KEYS + 1], settings()),
            Err(KeyError::TooManyKeys(65))
        ));
        // Debug output never shows key material.
        let key =
            VerificationKey::hs256(SECRET, Some("k".into())).unwrap_or_else(|e| panic!("{e}"));
        let debug = format!("{key:?}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
    }

    fn public_jwk(key: &DecodingKey, alg: Algorithm, kid: &str) -> Value {
        let jwk = Jwk::from_decoding_key(key, Some(alg)).unwrap_or_else(|e| panic!("{e}"));
        let mut value = serde_json::to_value(jwk).unwrap_or_else(|e| panic!("{e}"));
        value["kid"] = json!(kid);
        value
    }

    #[test]
    fn jwks_keys() {
        let ec = DecodingKey::from_ec_pem(test_keys::P256_PUBLIC.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let ed = DecodingKey::from_ed_pem(test_keys::ED25519_PUBLIC.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let rsa = DecodingKey::from_rsa_pem(test_keys::RSA_PUBLIC.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut ec_no_alg = public_jwk(&ec, Algorithm::ES256, "ec-2");
        if let Some(o) = ec_no_alg.as_object_mut() {
            o.remove("alg");
        }
        let mut enc = public_jwk(&rsa, Algorithm::RS256, "enc");
        enc["use"] = json!("enc");
        let mut wrong_alg = public_jwk(&ec, Algorithm::ES256, "wrong");
        wrong_alg["alg"] = json!("ES384");
        let jwks = json!({"keys": [
            public_jwk(&ec, Algorithm::ES256, "ec-1"),
            ec_no_alg,
            public_jwk(&ed, Algorithm::EdDSA, "ed-1"),
            public_jwk(&rsa, Algorithm::RS256, "rsa-1"),
            enc,
            wrong_alg,
            {"kty": "oct", "k": URL_SAFE_NO_PAD.encode(SECRET), "kid": "oct-no-alg"},
            {"kty": "OKP", "crv": "X25519", "x": URL_SAFE_NO_PAD.encode([7u8; 32]), "kid": "x25519"},
            {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([7u8; 16]), "kid": "short"},
            {"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB", "kid": "rsa-1024"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "p521"},
            {"kty": "weird", "kid": "weird"},
        ]});
        let keys = VerificationKey::from_jwks(jwks.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let described: Vec<(Option<&str>, Algorithm)> =
            keys.iter().map(|k| (k.kid(), k.algorithm())).collect();
        assert_eq!(
            described,
            vec![
                (Some("ec-1"), Algorithm::ES256),
                (Some("ec-2"), Algorithm::ES256),
                (Some("ed-1"), Algorithm::EdDSA),
                (Some("rsa-1"), Algorithm::RS256),
            ]
        );
        let v = TokenVerifier::new(keys, settings()).unwrap_or_else(|e| panic!("{e}"));
        let ed_signing = EncodingKey::from_ed_pem(test_keys::ED25519_PRIVATE.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("ed-1".into());
        ok(v.verify_at(&sign(&header, &claims(), &ed_signing), now()));
        let ec_signing = EncodingKey::from_ec_pem(test_keys::P256_PRIVATE.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("ec-2".into());
        ok(v.verify_at(&sign(&header, &claims(), &ec_signing), now()));
        header.kid = Some("enc".into());
        assert_eq!(
            reason(v.verify_at(&sign(&header, &claims(), &ec_signing), now())),
            "TOKEN_KEY_UNKNOWN"
        );

        assert!(matches!(
            VerificationKey::from_jwks(b"{}"),
            Err(KeyError::InvalidJwks(_))
        ));
        assert!(matches!(
            VerificationKey::from_jwks(b"{\"keys\":[]}"),
            Err(KeyError::NoUsableKeys)
        ));
        let oct =
            json!({"keys": [{"kty": "oct", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(SECRET)}]});
        let keys = VerificationKey::from_jwks(oct.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn key_config_from_toml_and_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap_or_else(|e| panic!("{e}"));
            path
        };
        let secret = write("secret", &format!("{}\n", String::from_utf8_lossy(SECRET)));
        let ed = write("ed.pem", test_keys::ED25519_PUBLIC);
        let ec = write("ec.pem", test_keys::P256_PUBLIC);
        let rsa = write("rsa.pem", test_keys::RSA_PUBLIC);
        let ec_key = DecodingKey::from_ec_pem(test_keys::P256_PUBLIC.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let jwks = write(
            "jwks.json",
            &json!({"keys": [public_jwk(&ec_key, Algorithm::ES256, "j1")]}).to_string(),
        );
        let toml_text = format!(
            r#"
            [[keys]]
            kind = "hs256"
            kid = "h"
            secret_file = {secret:?}
            [[keys]]
            kind = "hs256"
            secret = "an-inline-secret-of-at-least-32-bytes"
            [[keys]]
            kind = "eddsa"
            public_key_file = {ed:?}
            [[keys]]
            kind = "es256"
            kid = "e"
            public_key_file = {ec:?}
            [[keys]]
            kind = "rs256"
            public_key_file = {rsa:?}
            [[keys]]
            kind = "jwks"
            file = {jwks:?}
            "#
        );
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<KeyConfig>,
        }
        let doc: Doc = toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{e}"));
        let keys: Vec<VerificationKey> = doc
            .keys
            .iter()
            .map(KeyConfig::load)
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .flatten()
            .collect();
        let described: Vec<(Option<&str>, Algorithm)> =
            keys.iter().map(|k| (k.kid(), k.algorithm())).collect();
        assert_eq!(
            described,
            vec![
                (Some("h"), Algorithm::HS256),
                (None, Algorithm::HS256),
                (None, Algorithm::EdDSA),
                (Some("e"), Algorithm::ES256),
                (None, Algorithm::RS256),
                (Some("j1"), Algorithm::ES256),
            ]
        );
        // The trimmed file secret verifies tokens signed with the secret.
        let v = TokenVerifier::new(keys, settings()).unwrap_or_else(|e| panic!("{e}"));
        ok(v.verify_at(&hs(&claims()), now()));

        let bad = |text: &str| toml::from_str::<Doc>(text).err().is_some();
        assert!(bad("[[keys]]\nkind = \"hs256\"\nsecrett = \"x\""));
        assert!(bad("[[keys]]\nkind = \"ps256\"\nfile = \"x\""));
        assert!(bad("[[keys]]\nkind = \"rs256\""));
        let both = KeyConfig::Hs256 {
            kid: None,
            secret: Some("x".repeat(40)),
            secret_file: Some(secret.clone()),
        };
        assert!(matches!(both.load(), Err(KeyError::SecretSource)));
        let missing = KeyConfig::EdDsa {
            kid: None,
            public_key_file: dir.path().join("absent.pem"),
        };
        let e = missing
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("absent.pem"), "{e}");
        let inline = KeyConfig::Hs256 {
            kid: None,
            secret: Some("do-not-print-me".into()),
            secret_file: None,
        };
        assert!(!format!("{inline:?}").contains("do-not-print-me"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever arrives as a token, verification answers with an error and never panics.
        #[test]
        fn arbitrary_input_is_refused_without_panicking(input in ".{0,200}") {
            let v = hs_verifier();
            proptest::prop_assert!(v.verify_at(&input, now()).is_err());
        }

        /// Three base64url parts of arbitrary bytes, or of arbitrary JSON-ish text with a real
        /// algorithm, are refused too.
        #[test]
        fn arbitrary_parts_are_refused_without_panicking(
            header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            alg in proptest::sample::select(vec!["HS256", "ES256", "EdDSA", "RS256", "none"]),
            claims_text in "[{}\\[\\]\",:a-z0-9 .-]{0,80}",
        ) {
            let keys = vec![
                VerificationKey::hs256(SECRET, None).unwrap_or_else(|e| panic!("{e}")),
                VerificationKey::es256_pem(test_keys::P256_PUBLIC.as_bytes(), None)
                    .unwrap_or_else(|e| panic!("{e}")),
                VerificationKey::eddsa_pem(test_keys::ED25519_PUBLIC.as_bytes(), None)
                    .unwrap_or_else(|e| panic!("{e}")),
                VerificationKey::rs256_pem(test_keys::RSA_PUBLIC.as_bytes(), None)
                    .unwrap_or_else(|e| panic!("{e}")),
            ];
            let v = TokenVerifier::new(keys, settings()).unwrap_or_else(|e| panic!("{e}"));
            let raw = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(&header),
                URL_SAFE_NO_PAD.encode(&body),
                URL_SAFE_NO_PAD.encode(&signature)
            );
            proptest::prop_assert!(v.verify_at(&raw, now()).is_err());
            let shaped = format!(
                "{}.{}.{}",
                b64(&json!({"alg": alg})),
                URL_SAFE_NO_PAD.encode(claims_text),
                URL_SAFE_NO_PAD.encode(&signature)
            );
            proptest::prop_assert!(v.verify_at(&shaped, now()).is_err());
        }

        /// A validly signed token with arbitrary claim values is judged without panicking.
        #[test]
        fn arbitrary_signed_claims_never_panic(
            exp in proptest::prelude::any::<u64>(),
            nbf in proptest::prelude::any::<f64>(),
            sub in ".{0,20}",
            publish in proptest::collection::vec("[a-z*>$.]{0,8}", 0..3),
        ) {
            let claims = json!({"sub": sub, "exp": exp, "nbf": nbf, "iss": "https://idp.example.com",
                                "aud": "switchboard", "sb": {"publish": publish}});
            let _ = hs_verifier().verify_at(&hs(&claims), now());
        }
    }

    #[test]
    fn a_date_beyond_the_clock_is_refused_not_a_panic() {
        let v = hs_verifier();
        for exp in [
            json!(1u64 << 63),
            json!(u64::MAX),
            json!(1e300),
            json!(253_402_300_800u64),
        ] {
            let claims = json!({"sub": "alice", "exp": exp, "iss": "https://idp.example.com",
                                "aud": "switchboard"});
            match v.verify_at(&hs(&claims), now()) {
                Err(TokenError::ClaimsInvalid(why)) => assert!(why.contains("9999"), "{why}"),
                other => panic!("exp {exp}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_reason_is_distinct() {
        let all = [
            TokenError::Missing,
            TokenError::Malformed(String::new()),
            TokenError::AlgorithmUnsupported(String::new()),
            TokenError::KeyUnknown(String::new()),
            TokenError::Invalid,
            TokenError::Expired { exp: 0 },
            TokenError::NotYetValid { nbf: 0 },
            TokenError::IssuerMismatch(String::new()),
            TokenError::AudienceMismatch(String::new()),
            TokenError::ClaimsInvalid(String::new()),
        ];
        let reasons: HashSet<&str> = all.iter().map(TokenError::reason).collect();
        assert_eq!(reasons.len(), all.len());
    }
}
