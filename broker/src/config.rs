//! Configuration in layers: the embedded, commented `config.default.toml`, then a TOML file, then
//! `SWITCHBOARD_*` environment variables, then command-line flags — and one [`Config::validate`]
//! that says precisely what is wrong.
//!
//! Every setting has an environment variable derived from its path in the file: `retention.max_age`
//! is `SWITCHBOARD_RETENTION_MAX_AGE`, `listen` is `SWITCHBOARD_LISTEN`. Deriving the names from the
//! default file means a new setting gets its variable for free and the two can never disagree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::security::credentials::ClientConfig;
use crate::security::ratelimit::RateLimit;
use crate::security::token::KeyConfig;

/// The default configuration, with a comment on every setting. `--print-config` shows the result of
/// all layers in the same shape.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.default.toml");

/// Prefix of every environment variable the broker reads.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// Environment variables with the prefix that are not settings (the `sb` client's, and the path of
/// the config file itself), so they are not reported as unknown.
const ENV_NOT_SETTINGS: &[&str] = &[
    "SWITCHBOARD_URL",
    "SWITCHBOARD_CONFIG",
    // Read by the state store's undo log (state/undo.rs), for the power-loss tests.
    "SWITCHBOARD_BOOT_ID_FILE",
];

/// The broker's whole configuration. Field documentation lives in `config.default.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Config {
    pub listen: SocketAddr,
    pub allow_unauthenticated_remote: bool,
    pub admin_listen: AdminListen,
    pub data_dir: PathBuf,
    pub node_id: u64,
    pub cluster: Cluster,
    pub raft: RaftSettings,
    pub durability: Durability,
    pub limits: Limits,
    pub retention: Retention,
    pub store: Store,
    pub proposer: Proposer,
    pub subscriptions: Subscriptions,
    pub history: History,
    pub loops: Loops,
    pub entities: Entities,
    pub schemas: Schemas,
    pub kpis: Kpis,
    pub publish_stream: PublishStream,
    pub gateway: Gateway,
    pub tracing: Tracing,
    pub log: Log,
    pub auth: Auth,
    pub tls: Tls,
    pub origins: Origins,
    pub rate_limits: RateLimits,
}

/// Where the HTTP admin listener (`/metrics`, `/healthz`) binds, or `off`. Written in TOML, the
/// environment and flags as an address (`"127.0.0.1:7401"`, port 0 for any free port) or `"off"`
/// (an empty string means off too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl AdminListen {
    /// The address to bind, or `None` when the admin listener is off.
    pub fn addr(self) -> Option<SocketAddr> {
        self.0
    }
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return Ok(AdminListen(None));
        }
        s.parse().map(|addr| AdminListen(Some(addr))).map_err(|_| {
            format!("admin_listen must be an address like \"127.0.0.1:7401\" or \"off\", got {s:?}")
        })
    }
}

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

impl Serialize for AdminListen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the internal raft listener binds, or `off` (a single node). Written as an address
/// (`"10.0.0.1:7402"`) or `"off"` (an empty string means off too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterListen(pub Option<SocketAddr>);

impl std::str::FromStr for ClusterListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return Ok(ClusterListen(None));
        }
        s.parse()
            .map(|addr| ClusterListen(Some(addr)))
            .map_err(|_| {
                format!(
                    "cluster.listen must be an address like \"0.0.0.0:7402\" or \"off\", got {s:?}"
                )
            })
    }
}

impl std::fmt::Display for ClusterListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

impl Serialize for ClusterListen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClusterListen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Cluster {
    pub listen: ClusterListen,
    pub advertise: String,
    pub public_advertise: String,
    pub members: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub tls_ca_file: PathBuf,
}

impl Cluster {
    /// Whether node-to-node RPC runs over mutual TLS (every node presents a certificate from
    /// `tls_ca_file` and checks its peers' against it).
    pub fn tls_enabled(&self) -> bool {
        !self.tls_ca_file.as_os_str().is_empty()
    }

    /// The static voters: raft id → raft address. Empty when none are configured.
    ///
    /// # Errors
    /// An entry is not `id=host:port`, or an id repeats.
    pub fn voters(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let mut voters = std::collections::BTreeMap::new();
        for entry in &self.members {
            let (id, addr) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not \"id=host:port\""))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| format!("{entry:?}: the id must be a whole number above 0"))?;
            let addr = addr.trim();
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!("{entry:?}: the address must be \"host:port\""));
            }
            if voters.insert(id, addr.to_owned()).is_some() {
                return Err(format!("node id {id} appears twice"));
            }
        }
        Ok(voters)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RaftSettings {
    pub snapshot_every_entries: u64,
    pub snapshot_log_bytes: u64,
}

/// When an acknowledgement may be sent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Acknowledge only after the log entry is fdatasync'ed.
    Always,
    /// Acknowledge once written to the store; sync in the background every `sync_interval`.
    Periodic,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Durability {
    pub fsync: FsyncPolicy,
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_channel_len: usize,
    pub max_channel_depth: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_key_len: usize,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    pub max_metadata_bytes: u32,
    pub max_send_buffer_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub stalled_connection_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Retention {
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Store {
    pub cache_bytes: u64,
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Proposer {
    pub max_batch_messages: usize,
    pub max_batch_bytes: usize,
    pub max_in_flight: usize,
    pub queue: usize,
    pub queue_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Subscriptions {
    pub queue_depth: usize,
    pub queue_bytes: usize,
    pub max_per_connection: usize,
    pub max_per_broker: usize,
    pub catch_up_bytes: usize,
    pub default_max_unacked: u32,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct History {
    pub default_limit: u32,
    pub max_limit: u32,
    pub max_page_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Loops {
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub max_hops: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Entities {
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Schemas {
    pub max_registrations: usize,
    pub max_document_bytes: usize,
    pub compatibility_sample: usize,
    pub drift_events_per_second: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Kpis {
    pub max_views: u32,
    pub backfill_limit: u64,
    #[serde(with = "humantime_serde")]
    pub watch_min_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub http_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub http_stale_while_revalidate: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct PublishStream {
    pub max_unacked: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Gateway {
    pub enabled: bool,
    pub max_batch: usize,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Tracing {
    pub otlp_endpoint: String,
    pub service_name: String,
}

impl Tracing {
    /// Where to export spans: `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_SERVICE_NAME` from `env` when
    /// set, else these settings; `None` when no endpoint is given (export off).
    pub fn otlp(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<crate::observability::trace::OtlpSettings> {
        let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT")
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| self.otlp_endpoint.clone());
        if endpoint.trim().is_empty() {
            return None;
        }
        let service_name = env("OTEL_SERVICE_NAME")
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| self.service_name.clone());
        Some(crate::observability::trace::OtlpSettings {
            endpoint,
            service_name,
        })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

/// Bearer-token authentication (see `docs/SECURITY.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Auth {
    pub hs256_secret_file: PathBuf,
    pub keys: Vec<KeyConfig>,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    pub token_endpoint: TokenEndpoint,
}

impl Auth {
    /// Whether calls must carry a token: some verification key or token-endpoint client is
    /// configured.
    pub fn enabled(&self) -> bool {
        !self.hs256_secret_file.as_os_str().is_empty()
            || !self.keys.is_empty()
            || !self.token_endpoint.clients.is_empty()
    }
}

/// How the token endpoint's tokens are signed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SigningKind {
    /// A shared secret (at least 32 bytes) in `signing_key_file`.
    Hs256,
    /// An Ed25519 private key (PKCS#8 PEM) in `signing_key_file`.
    Eddsa,
}

/// The client-credentials token endpoint (`switchboard.v1.Auth/IssueToken`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TokenEndpoint {
    pub clients: Vec<ClientConfig>,
    pub signing_key: SigningKind,
    pub signing_key_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub max_concurrent_checks: usize,
    pub max_waiting_checks: usize,
    pub failures_per_client_address: RateLimit,
    pub per_connection: RateLimit,
}

/// TLS on the public listener; off while `cert_file` is empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

impl Tls {
    /// Whether the public listener speaks TLS.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// Browser origins allowed to call the broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Origins {
    pub allow: Vec<String>,
}

/// Call budgets at the edge; a `per_second` of 0 turns one off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RateLimits {
    pub per_principal: RateLimit,
    pub per_connection: RateLimit,
    pub max_tracked: usize,
}

/// What went wrong while assembling the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A layer is not valid TOML or does not fit the settings' shape.
    #[error("{layer}: {message}")]
    Parse {
        /// Which layer (the file's path, an environment variable, a flag).
        layer: String,
        /// What the parser said.
        message: String,
    },
    /// The assembled settings contradict each other or are out of range.
    #[error("invalid setting `{setting}`: {message}")]
    Invalid {
        /// The setting's path, for example `retention.max_bytes`.
        setting: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
}

/// Overrides from the command line: `(setting path, value as written)`, applied last.
pub type FlagOverrides = Vec<(&'static str, String)>;

impl Config {
    /// The embedded defaults alone.
    ///
    /// # Errors
    /// Only if the embedded file is broken, which a unit test rules out.
    pub fn defaults() -> Result<Config, ConfigError> {
        Self::from_value(default_value()?, "embedded defaults")
    }

    /// Assembles every layer: defaults, `file`, the environment (`env` yields `(name, value)` pairs,
    /// normally `std::env::vars()`), then `flags`; then validates.
    ///
    /// Returns the configuration and the names of `SWITCHBOARD_*` variables that match no setting
    /// (likely typos), for the caller to warn about.
    ///
    /// # Errors
    /// [`ConfigError`] naming the layer and setting at fault.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &FlagOverrides,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut value = default_value()?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let file_value: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        layer: path.display().to_string(),
                        message: e.to_string(),
                    })?;
            merge(&mut value, file_value);
            // Check the file's shape on its own so an error names the file, not a later layer.
            Self::from_value(value.clone(), &path.display().to_string())?;
        }

        let settings = setting_paths(&value);
        let mut unknown = Vec::new();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (name, raw) in env {
            match settings.iter().find(|path| env_name(path) == name) {
                Some(path) => {
                    set_path(&mut value, path, &raw, &name)?;
                    // Check now, so an error names the variable and the value that caused it.
                    Self::from_value(value.clone(), &format!("{name}={raw:?}"))?;
                }
                None if ENV_NOT_SETTINGS.contains(&name.as_str()) => {}
                None => unknown.push(name),
            }
        }
        for (path, raw) in flags {
            let layer = format!("flag for `{path}` ({raw:?})");
            set_path(&mut value, path, raw, &layer)?;
            Self::from_value(value.clone(), &layer)?;
        }
        let config = Self::from_value(value, "settings")?;
        config.validate()?;
        Ok((config, unknown))
    }

    fn from_value(value: toml::Table, layer: &str) -> Result<Config, ConfigError> {
        toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                layer: layer.to_owned(),
                message: e.to_string(),
            })
    }

    /// The rules apply follows, from these settings.
    pub fn rules(&self) -> crate::message::Rules {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        crate::message::Rules {
            dedup_window_us: us(self.loops.dedup_window),
            loop_window_us: us(self.loops.window),
            max_hops: self.loops.max_hops,
            max_clock_skew_ms: u64::try_from(self.entities.max_clock_skew.as_millis())
                .unwrap_or(u64::MAX),
        }
    }

    /// Checks ranges and relations between settings.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for the first setting found wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(setting: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                setting,
                message: message.into(),
            })
        }
        if !self.listen.ip().is_loopback()
            && !self.auth.enabled()
            && !self.allow_unauthenticated_remote
        {
            return invalid(
                "listen",
                format!(
                    "{} is not a loopback address, and no authentication is configured: anyone \
                     who can reach it could publish and read everything. Listen on 127.0.0.1, \
                     configure authentication ([auth], see docs/SECURITY.md), or set \
                     allow_unauthenticated_remote = true (SWITCHBOARD_ALLOW_UNAUTHENTICATED_REMOTE=true) \
                     on a network you trust",
                    self.listen
                ),
            );
        }
        self.validate_security()?;
        if let Some(raft_listen) = self.cluster.listen.0 {
            if !raft_listen.ip().is_loopback()
                && !self.cluster.tls_enabled()
                && !self.allow_unauthenticated_remote
            {
                return invalid(
                    "cluster.listen",
                    format!(
                        "{raft_listen} is not a loopback address, and raft RPC is not authenticated: \
                         anyone who can reach it could rewrite the log. Listen on 127.0.0.1, turn on \
                         mutual TLS between the nodes (cluster.tls_cert_file, cluster.tls_key_file, \
                         cluster.tls_ca_file), or set allow_unauthenticated_remote = true on a \
                         network you trust"
                    ),
                );
            }
            let named_in_members = self
                .cluster
                .voters()
                .is_ok_and(|v| v.contains_key(&self.node_id));
            if raft_listen.ip().is_unspecified()
                && self.cluster.advertise.trim().is_empty()
                && !named_in_members
            {
                return invalid(
                    "cluster.advertise",
                    format!(
                        "cluster.listen is {raft_listen}, which peers cannot dial: set the address \
                         they reach this node at"
                    ),
                );
            }
        }
        match self.cluster.voters() {
            Err(e) => return invalid("cluster.members", e),
            Ok(voters) if !voters.is_empty() => {
                if self.cluster.listen.0.is_none() {
                    return invalid(
                        "cluster.members",
                        "a cluster needs this node's raft listener: set cluster.listen",
                    );
                }
                if !voters.contains_key(&self.node_id) {
                    return invalid(
                        "cluster.members",
                        format!("must include this node (node_id = {})", self.node_id),
                    );
                }
            }
            Ok(_) => {}
        }
        if self.cluster.forward_timeout < Duration::from_millis(10) {
            return invalid("cluster.forward_timeout", "must be at least 10ms");
        }
        if self.raft.snapshot_every_entries < 10 {
            return invalid("raft.snapshot_every_entries", "must be at least 10");
        }
        if self.raft.snapshot_log_bytes < 1024 * 1024 {
            return invalid(
                "raft.snapshot_log_bytes",
                "must be at least 1048576 (1 MiB)",
            );
        }
        if self.node_id == 0 {
            return invalid(
                "node_id",
                "must be at least 1 (0 means \"no node\" in raft)",
            );
        }
        if let Some(admin) = self.admin_listen.addr() {
            if admin == self.listen && admin.port() != 0 {
                return invalid(
                    "admin_listen",
                    format!(
                        "must differ from listen ({}); use another port or \"off\"",
                        self.listen
                    ),
                );
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        let l = &self.limits;
        if l.max_payload_bytes == 0 || l.max_payload_bytes > 16 * 1024 * 1024 {
            return invalid(
                "limits.max_payload_bytes",
                "must be between 1 and 16777216 (16 MiB)",
            );
        }
        if !(3..=1024).contains(&l.max_channel_len) {
            return invalid("limits.max_channel_len", "must be between 3 and 1024");
        }
        if !(2..=64).contains(&l.max_channel_depth) {
            return invalid("limits.max_channel_depth", "must be between 2 and 64");
        }
        if l.max_header_bytes > 1024 * 1024 {
            return invalid("limits.max_header_bytes", "must be at most 1048576 (1 MiB)");
        }
        if l.max_key_len == 0 || l.max_key_len > 4096 {
            return invalid("limits.max_key_len", "must be between 1 and 4096");
        }
        if l.max_ttl.is_zero() || l.max_ttl > Duration::from_secs(100 * 365 * 24 * 3600) {
            return invalid("limits.max_ttl", "must be between 1ms and 100 years");
        }
        if self.store.min_free_bytes > 0 && self.store.min_free_bytes < 1024 * 1024 {
            return invalid(
                "store.min_free_bytes",
                "must be 0 (no floor) or at least 1048576 (1 MiB)",
            );
        }
        let r = &self.retention;
        if r.max_age.is_zero() || r.max_age > Duration::from_secs(100 * 365 * 24 * 3600) {
            return invalid("retention.max_age", "must be between 1ms and 100 years");
        }
        if r.max_bytes < 1024 * 1024 {
            return invalid("retention.max_bytes", "must be at least 1048576 (1 MiB)");
        }
        if r.sweep_interval < Duration::from_millis(10) {
            return invalid("retention.sweep_interval", "must be at least 10ms");
        }
        if self.durability.fsync == FsyncPolicy::Periodic
            && self.durability.sync_interval < Duration::from_millis(1)
        {
            return invalid("durability.sync_interval", "must be at least 1ms");
        }
        if self.store.cache_bytes < 1024 * 1024 {
            return invalid("store.cache_bytes", "must be at least 1048576 (1 MiB)");
        }
        let p = &self.proposer;
        if p.max_batch_messages == 0 || p.max_batch_messages > 65536 {
            return invalid("proposer.max_batch_messages", "must be between 1 and 65536");
        }
        if p.max_batch_bytes < l.max_payload_bytes + l.max_header_bytes {
            return invalid(
                "proposer.max_batch_bytes",
                "must hold at least one largest message (limits.max_payload_bytes + limits.max_header_bytes)",
            );
        }
        if p.max_in_flight == 0 || p.max_in_flight > 1024 {
            return invalid("proposer.max_in_flight", "must be between 1 and 1024");
        }
        if p.queue == 0 || p.queue > 1_000_000 {
            return invalid("proposer.queue", "must be between 1 and 1000000");
        }
        if p.queue_bytes < p.max_batch_bytes.max(1024) {
            return invalid(
                "proposer.queue_bytes",
                "must be at least proposer.max_batch_bytes",
            );
        }
        let sub = &self.subscriptions;
        if sub.queue_depth == 0 || sub.queue_depth > 1_000_000 {
            return invalid("subscriptions.queue_depth", "must be between 1 and 1000000");
        }
        if sub.queue_bytes < l.max_payload_bytes + l.max_header_bytes {
            return invalid(
                "subscriptions.queue_bytes",
                "must hold at least one largest message (limits.max_payload_bytes + limits.max_header_bytes)",
            );
        }
        if sub.catch_up_bytes < 1024 * 1024 {
            return invalid(
                "subscriptions.catch_up_bytes",
                "must be at least 1 MiB (1048576)",
            );
        }
        if sub.max_per_connection == 0 || sub.max_per_broker < sub.max_per_connection {
            return invalid(
                "subscriptions.max_per_connection",
                "must be at least 1 and at most subscriptions.max_per_broker",
            );
        }
        if sub.default_max_unacked == 0 {
            return invalid("subscriptions.default_max_unacked", "must be at least 1");
        }
        if sub.ack_timeout < Duration::from_millis(10) {
            return invalid("subscriptions.ack_timeout", "must be at least 10ms");
        }
        let h = &self.history;
        if h.max_limit == 0 || h.max_limit > 100_000 {
            return invalid("history.max_limit", "must be between 1 and 100000");
        }
        if h.default_limit == 0 || h.default_limit > h.max_limit {
            return invalid(
                "history.default_limit",
                "must be between 1 and history.max_limit",
            );
        }
        if h.max_page_bytes < 1024 {
            return invalid("history.max_page_bytes", "must be at least 1024");
        }
        if self.loops.max_hops == 0 || self.loops.max_hops > 1000 {
            return invalid("loops.max_hops", "must be between 1 and 1000");
        }
        if self.loops.dedup_window > Duration::from_secs(7 * 24 * 3600) {
            return invalid("loops.dedup_window", "must be at most 7 days");
        }
        if self.loops.window > Duration::from_secs(7 * 24 * 3600) {
            return invalid("loops.window", "must be at most 7 days");
        }
        if self.entities.max_clock_skew > Duration::from_secs(24 * 3600) {
            return invalid("entities.max_clock_skew", "must be at most 24 hours");
        }
        if self.schemas.max_registrations == 0 || self.schemas.max_registrations > 65536 {
            return invalid("schemas.max_registrations", "must be between 1 and 65536");
        }
        if !(1024..=16 << 20).contains(&self.schemas.max_document_bytes) {
            return invalid(
                "schemas.max_document_bytes",
                "must be between 1024 and 16777216",
            );
        }
        if self.schemas.compatibility_sample > 100_000 {
            return invalid("schemas.compatibility_sample", "must be at most 100000");
        }
        if self.kpis.max_views == 0 || self.kpis.max_views > 1024 {
            return invalid("kpis.max_views", "must be between 1 and 1024");
        }
        if self.kpis.backfill_limit > 10_000_000 {
            return invalid("kpis.backfill_limit", "must be at most 10000000");
        }
        if self.kpis.watch_min_interval < Duration::from_millis(100) {
            return invalid("kpis.watch_min_interval", "must be at least 100ms");
        }
        // Cache-Control counts whole seconds; a day is longer than any KPI answer stays useful.
        for (key, value) in [
            ("kpis.http_max_age", self.kpis.http_max_age),
            (
                "kpis.http_stale_while_revalidate",
                self.kpis.http_stale_while_revalidate,
            ),
        ] {
            if value.subsec_nanos() != 0 || value > Duration::from_secs(86_400) {
                return invalid(key, "must be whole seconds, at most 1d");
            }
        }
        if self.publish_stream.max_unacked == 0 || self.publish_stream.max_unacked > 65536 {
            return invalid("publish_stream.max_unacked", "must be between 1 and 65536");
        }
        if self.gateway.max_batch == 0 || self.gateway.max_batch > 10_000 {
            return invalid("gateway.max_batch", "must be between 1 and 10000");
        }
        if self.gateway.heartbeat < Duration::from_secs(1) {
            return invalid("gateway.heartbeat", "must be at least 1s");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid("log.level", format!("not a valid filter: {e}"));
        }
        Ok(())
    }

    /// Checks the security settings' shapes; key files are read (and checked) at start.
    fn validate_security(&self) -> Result<(), ConfigError> {
        fn invalid(setting: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                setting,
                message: message.into(),
            })
        }
        let tls = &self.tls;
        let empty = |p: &PathBuf| p.as_os_str().is_empty();
        if empty(&tls.cert_file) != empty(&tls.key_file) {
            return invalid(
                "tls.cert_file",
                "tls.cert_file and tls.key_file are set together (or both left empty for no TLS)",
            );
        }
        if !empty(&tls.client_ca_file) && !tls.enabled() {
            return invalid(
                "tls.client_ca_file",
                "mutual TLS needs the listener's own certificate: set tls.cert_file and tls.key_file",
            );
        }
        let cluster = &self.cluster;
        let set = [
            &cluster.tls_cert_file,
            &cluster.tls_key_file,
            &cluster.tls_ca_file,
        ]
        .map(|p| !empty(p));
        if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
            return invalid(
                "cluster.tls_cert_file",
                "mutual TLS between nodes needs all three: cluster.tls_cert_file, \
                 cluster.tls_key_file and cluster.tls_ca_file (or none of them)",
            );
        }
        let auth = &self.auth;
        if auth.leeway > Duration::from_secs(600) {
            return invalid("auth.leeway", "must be at most 10 minutes");
        }
        let endpoint = &auth.token_endpoint;
        if !endpoint.clients.is_empty() {
            if empty(&endpoint.signing_key_file) {
                return invalid(
                    "auth.token_endpoint.signing_key_file",
                    "the token endpoint has clients but no key to sign their tokens with",
                );
            }
            if endpoint.issuer.trim().is_empty() || endpoint.audience.trim().is_empty() {
                return invalid(
                    "auth.token_endpoint.issuer",
                    "the issuer and audience of minted tokens must not be empty",
                );
            }
        }
        if endpoint.max_concurrent_checks == 0 || endpoint.max_concurrent_checks > 64 {
            return invalid(
                "auth.token_endpoint.max_concurrent_checks",
                "must be between 1 and 64 (each check costs an argon2 hash)",
            );
        }
        if endpoint.max_waiting_checks > 100_000 {
            return invalid(
                "auth.token_endpoint.max_waiting_checks",
                "must be at most 100000",
            );
        }
        let rates = [
            (
                "auth.token_endpoint.failures_per_client_address",
                &endpoint.failures_per_client_address,
            ),
            (
                "auth.token_endpoint.per_connection",
                &endpoint.per_connection,
            ),
            ("rate_limits.per_principal", &self.rate_limits.per_principal),
            (
                "rate_limits.per_connection",
                &self.rate_limits.per_connection,
            ),
        ];
        for (setting, rate) in rates {
            if !(rate.per_second >= 0.0 && rate.per_second.is_finite()) || rate.burst == 0 {
                return invalid(
                    setting,
                    "per_second must be 0 (off) or a positive number, and burst at least 1",
                );
            }
        }
        if self.rate_limits.max_tracked == 0 || self.rate_limits.max_tracked > 10_000_000 {
            return invalid("rate_limits.max_tracked", "must be between 1 and 10000000");
        }
        if self.limits.max_send_buffer_bytes < 1024 * 1024 {
            return invalid(
                "limits.max_send_buffer_bytes",
                "must be at least 1 MiB (1048576)",
            );
        }
        if self.limits.stalled_connection_timeout < Duration::from_millis(100) {
            return invalid(
                "limits.stalled_connection_timeout",
                "must be at least 100ms",
            );
        }
        if self.limits.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if self.limits.max_connections_per_address == 0 {
            return invalid(
                "limits.max_connections_per_address",
                "must be at least 1 (set it to limits.max_connections to bound only the total)",
            );
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600))
            .contains(&self.limits.handshake_timeout)
        {
            return invalid("limits.handshake_timeout", "must be between 100ms and 1h");
        }
        if !(1024..=1024 * 1024).contains(&self.limits.max_metadata_bytes) {
            return invalid(
                "limits.max_metadata_bytes",
                "must be between 1024 and 1048576 (1 MiB)",
            );
        }
        Ok(())
    }

    /// The configuration as TOML, for `--print-config`.
    ///
    /// # Errors
    /// Only if serialization fails, which a unit test rules out.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

fn default_value() -> Result<toml::Table, ConfigError> {
    DEFAULT_CONFIG_TOML
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            layer: "embedded defaults".into(),
            message: e.to_string(),
        })
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Every leaf setting's dotted path, for example `retention.max_age`.
fn setting_paths(table: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => out.extend(
                setting_paths(inner)
                    .into_iter()
                    .map(|p| format!("{key}.{p}")),
            ),
            _ => out.push(key.clone()),
        }
    }
    out
}

/// `retention.max_age` → `SWITCHBOARD_RETENTION_MAX_AGE`.
pub fn env_name(path: &str) -> String {
    format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase())
}

/// Sets the leaf at `path` from a string, typed like the value already there (every leaf has a
/// default, so there always is one).
fn set_path(root: &mut toml::Table, path: &str, raw: &str, layer: &str) -> Result<(), ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        layer: layer.to_owned(),
        message,
    };
    let mut table = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            let new = match table.get(part) {
                Some(toml::Value::Integer(_)) => raw
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| {
                        parse_error(format!("`{path}` must be a whole number, got {raw:?}"))
                    })?,
                Some(toml::Value::Boolean(_)) => raw
                    .trim()
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|_| {
                        parse_error(format!("`{path}` must be true or false, got {raw:?}"))
                    })?,
                // Lists come comma-separated from the environment and flags:
                // SWITCHBOARD_CLUSTER_MEMBERS="1=sb1:7402,2=sb2:7402".
                Some(toml::Value::Array(_)) => toml::Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|item| !item.is_empty())
                        .map(|item| toml::Value::String(item.to_owned()))
                        .collect(),
                ),
                Some(toml::Value::Float(_)) => raw
                    .trim()
                    .parse::<f64>()
                    .map(toml::Value::Float)
                    .map_err(|_| parse_error(format!("`{path}` must be a number, got {raw:?}")))?,
                _ => toml::Value::String(raw.to_owned()),
            };
            table.insert(part.to_owned(), new);
            return Ok(());
        }
        table = match table.get_mut(part) {
            Some(toml::Value::Table(t)) => t,
            _ => return Err(parse_error(format!("no setting `{path}`"))),
        };
    }
    Err(parse_error(format!("no setting `{path}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kpi_cache_settings_are_whole_seconds_up_to_a_day() {
        let load = |max_age: &str| {
            Config::load(
                None,
                vec![],
                &vec![("kpis.http_max_age", max_age.to_string())],
            )
        };
        let (config, _) = load("0s").unwrap();
        assert_eq!(config.kpis.http_max_age, Duration::ZERO);
        assert_eq!(
            config.kpis.http_stale_while_revalidate,
            Duration::from_secs(30)
        );
        for bad in ["1500ms", "2d"] {
            let err = load(bad).unwrap_err();
            assert!(
                err.to_string().contains("kpis.http_max_age"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn embedded_defaults_parse_validate_and_round_trip() {
        let config = Config::defaults().unwrap();
        config.validate().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7400");
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.durability.fsync, FsyncPolicy::Always);
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:7401");
        let printed = config.to_toml().unwrap();
        let reparsed: Config = toml::from_str(&printed).unwrap();
        assert_eq!(reparsed, config);
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\n[retention]\nmax_age = \"1h\"\nmax_bytes = 2000000\n",
        )
        .unwrap();
        let (config, unknown) = Config::load(
            Some(&file),
            env(&[
                ("SWITCHBOARD_RETENTION_MAX_AGE", "2h"),
                ("SWITCHBOARD_LISTEN", "127.0.0.1:2"),
                ("SWITCHBOARD_URL", "http://x"),
                ("SWITCHBOARD_LISTN", "typo"),
                ("HOME", "/root"),
            ]),
            &vec![("listen", "127.0.0.1:3".to_string())],
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:3");
        assert_eq!(config.retention.max_age, Duration::from_secs(7200));
        assert_eq!(config.retention.max_bytes, 2_000_000);
        assert_eq!(unknown, vec!["SWITCHBOARD_LISTN".to_string()]);
    }

    #[test]
    fn every_setting_has_an_environment_variable() {
        let paths = setting_paths(&default_value().unwrap());
        assert!(paths.contains(&"limits.max_payload_bytes".to_string()));
        assert_eq!(
            env_name("limits.max_payload_bytes"),
            "SWITCHBOARD_LIMITS_MAX_PAYLOAD_BYTES"
        );
        let (config, _) = Config::load(
            None,
            env(&[("SWITCHBOARD_LIMITS_MAX_PAYLOAD_BYTES", "1000")]),
            &vec![],
        )
        .unwrap();
        assert_eq!(config.limits.max_payload_bytes, 1000);
    }

    #[test]
    fn admin_listen_takes_an_address_or_off_from_every_layer() {
        let (config, _) = Config::load(
            None,
            env(&[("SWITCHBOARD_ADMIN_LISTEN", "127.0.0.1:0")]),
            &vec![],
        )
        .unwrap();
        assert_eq!(
            config.admin_listen.addr(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        for off in ["off", "OFF", ""] {
            let (config, _) =
                Config::load(None, vec![], &vec![("admin_listen", off.to_string())]).unwrap();
            assert_eq!(config.admin_listen.addr(), None, "{off:?}");
            let printed = config.to_toml().unwrap();
            assert!(printed.contains("admin_listen = \"off\""), "{printed}");
            let reparsed: Config = toml::from_str(&printed).unwrap();
            assert_eq!(reparsed, config);
        }
        let err = Config::load(
            None,
            env(&[("SWITCHBOARD_ADMIN_LISTEN", "localhost")]),
            &vec![],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("SWITCHBOARD_ADMIN_LISTEN"),
            "{err}"
        );
        assert!(err.to_string().contains("localhost"), "{err}");
        let err = Config::load(
            None,
            vec![],
            &vec![
                ("listen", "127.0.0.1:7500".to_string()),
                ("admin_listen", "127.0.0.1:7500".to_string()),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("admin_listen"), "{err}");
    }

    #[test]
    fn cluster_members_come_comma_separated_from_the_environment() {
        let (config, unknown) = Config::load(
            None,
            env(&[
                ("SWITCHBOARD_NODE_ID", "2"),
                ("SWITCHBOARD_CLUSTER_LISTEN", "127.0.0.1:7402"),
                (
                    "SWITCHBOARD_CLUSTER_MEMBERS",
                    "1=sb1:7402, 2=sb2:7402,3=10.0.0.3:7402,",
                ),
            ]),
            &vec![],
        )
        .unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        let voters = config.cluster.voters().unwrap();
        assert_eq!(voters.len(), 3);
        assert_eq!(voters[&1], "sb1:7402");
        assert_eq!(voters[&2], "sb2:7402");
        assert_eq!(voters[&3], "10.0.0.3:7402");
        let printed = config.to_toml().unwrap();
        let reparsed: Config = toml::from_str(&printed).unwrap();
        assert_eq!(reparsed, config);
    }

    #[test]
    fn cluster_settings_are_checked() {
        let load = |pairs: &[(&str, &str)]| Config::load(None, env(pairs), &vec![]);
        // This node must be among the members, and reachable.
        let err = load(&[
            ("SWITCHBOARD_CLUSTER_LISTEN", "127.0.0.1:7402"),
            ("SWITCHBOARD_CLUSTER_MEMBERS", "2=a:1,3=b:1"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("node_id = 1"), "{err}");
        let err = load(&[("SWITCHBOARD_CLUSTER_MEMBERS", "1=a:1")]).unwrap_err();
        assert!(err.to_string().contains("cluster.listen"), "{err}");
        for bad in ["1=a:1,1=b:2", "x=a:1", "1=nohost", "0=a:1"] {
            let err = load(&[
                ("SWITCHBOARD_CLUSTER_LISTEN", "127.0.0.1:7402"),
                ("SWITCHBOARD_CLUSTER_MEMBERS", bad),
            ])
            .unwrap_err();
            assert!(err.to_string().contains("cluster.members"), "{bad}: {err}");
        }
        // A raft listener beyond loopback is refused without the explicit opt-in, like `listen`.
        let err = load(&[("SWITCHBOARD_CLUSTER_LISTEN", "10.1.2.3:7402")]).unwrap_err();
        assert!(err.to_string().contains("cluster.listen"), "{err}");
        let (config, _) = load(&[
            ("SWITCHBOARD_CLUSTER_LISTEN", "0.0.0.0:7402"),
            ("SWITCHBOARD_CLUSTER_ADVERTISE", "sb1:7402"),
            ("SWITCHBOARD_ALLOW_UNAUTHENTICATED_REMOTE", "true"),
        ])
        .unwrap();
        assert_eq!(
            config.cluster.listen.0,
            Some("0.0.0.0:7402".parse().unwrap())
        );
        let err = load(&[
            ("SWITCHBOARD_CLUSTER_LISTEN", "0.0.0.0:7402"),
            ("SWITCHBOARD_ALLOW_UNAUTHENTICATED_REMOTE", "true"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("cluster.advertise"), "{err}");
        // As in a compose file: the member list already says where peers reach this node.
        let (config, _) = load(&[
            ("SWITCHBOARD_CLUSTER_LISTEN", "0.0.0.0:7402"),
            (
                "SWITCHBOARD_CLUSTER_MEMBERS",
                "1=sb1:7402,2=sb2:7402,3=sb3:7402",
            ),
            ("SWITCHBOARD_ALLOW_UNAUTHENTICATED_REMOTE", "true"),
        ])
        .unwrap();
        assert_eq!(
            crate::raft::own_member(&config, "0.0.0.0:7400".parse().unwrap()).raft_addr,
            "sb1:7402"
        );
        let (config, _) = load(&[]).unwrap();
        assert_eq!(config.cluster.listen.0, None);
        assert!(config.cluster.voters().unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_layer_and_setting() {
        let err = Config::load(None, env(&[("SWITCHBOARD_NODE_ID", "one")]), &vec![]).unwrap_err();
        assert!(err.to_string().contains("SWITCHBOARD_NODE_ID"), "{err}");
        let err = Config::load(None, env(&[("SWITCHBOARD_NODE_ID", "0")]), &vec![]).unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
        let err = Config::load(
            None,
            vec![],
            &vec![("durability.fsync", "sometimes".into())],
        )
        .unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[retention]\nmax_agee = \"1h\"\n").unwrap();
        let err = Config::load(Some(&file), vec![], &vec![]).unwrap_err();
        assert!(err.to_string().contains("max_agee"), "{err}");
        assert!(err.to_string().contains("c.toml"), "{err}");
    }
}
