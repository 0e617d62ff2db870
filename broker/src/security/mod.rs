//! Security building blocks: who may connect, what they may do, and how fast.
//!
//! Why a module of its own: each piece here is a pure, self-contained decision (does this origin
//! header belong to the allow-list, is this token genuine and what does it grant, may this
//! principal subscribe to that pattern, has this key spent its budget) that can be tested
//! exhaustively without a server. The gRPC edge wires them in; nothing in this module knows about
//! tonic or request framing.
//!
//! # Layout
//! - [`caller`]: who made a call (principal, peer, stream deadline) and the one path every grant
//!   check takes, counting and auditing each refusal.
//! - [`origin`]: the allow-list of browser origins (exact and `https://*.example.com`), matched on
//!   parsed scheme, host and port — never on substrings.
//! - [`ratelimit`]: token buckets keyed by principal or connection, with a bounded number of keys
//!   and a caller-supplied clock.
//! - [`permissions`]: what a principal may publish, subscribe to and read or update, including the
//!   pattern-coverage check (`crm.*.updated` is within `crm.>`) and the reserved `$` channels.
//! - [`token`]: JWT verification against configured keys (HS256 secrets, RS256/ES256/EdDSA public
//!   keys, JWKS) into a [`token::Principal`], with one stable reason per refusal.
//! - [`credentials`]: client-credentials for a token endpoint — argon2id-hashed client secrets and
//!   minting of short-lived, scoped tokens.
//!
//! The edge's gate (`edge::auth`) applies them to every call; `docs/SECURITY.md` describes the
//! whole.

pub(crate) mod caller;
pub(crate) mod credentials;
pub(crate) mod origin;
pub(crate) mod permissions;
pub(crate) mod ratelimit;
pub(crate) mod token;

#[cfg(test)]
mod test_keys;
