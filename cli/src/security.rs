//! `sb`'s TLS and token options (global to every subcommand), how they become the client's
//! `ConnectOptions`, `sb token`, and the hints printed under an authentication or permission
//! error.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use switchboard_client::proto::{IssueTokenRequest, IssueTokenResponse};
use switchboard_client::{Client, ConnectOptions, Error, Reason};

use crate::output::format_timestamp;

/// TLS and authentication, for a broker that has them on.
#[derive(Debug, Args)]
#[command(next_help_heading = "TLS and authentication")]
pub struct SecurityArgs {
    /// The CA certificate (PEM) that signed the broker's certificate. Turns TLS on: a --server
    /// without a scheme becomes https://. sb trusts no system CAs, so an https:// server needs it.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_CA",
        hide_env_values = true,
        value_name = "FILE"
    )]
    ca: Option<PathBuf>,

    /// This client's certificate chain (PEM), for a broker that asks for mutual TLS; with --key.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_CERT",
        hide_env_values = true,
        value_name = "FILE",
        requires = "key"
    )]
    cert: Option<PathBuf>,

    /// The private key (PEM) of --cert.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_KEY",
        hide_env_values = true,
        value_name = "FILE",
        requires = "cert"
    )]
    key: Option<PathBuf>,

    /// The name to expect in the broker's certificate when it is not the --server host (for
    /// example --server 10.0.0.5:7400 with a certificate for broker.internal).
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,

    /// A bearer token (a JWT) sent with every call as `authorization: Bearer TOKEN`, for example
    /// from your identity provider or `sb token`. Not refreshed: once it expires, calls fail with
    /// UNAUTHENTICATED TOKEN_EXPIRED. Prefer the environment variable or --token-file: command
    /// lines are visible to other users of the machine.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,

    /// Read the bearer token from FILE (surrounding whitespace is ignored).
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_TOKEN_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    token_file: Option<PathBuf>,

    /// A client id configured on the broker: sb exchanges it and --client-secret at the broker's
    /// token endpoint for a short-lived token, and fetches a new one before it expires.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_CLIENT_ID",
        hide_env_values = true,
        value_name = "ID",
        requires = "client_secret"
    )]
    client_id: Option<String>,

    /// The secret of --client-id. Prefer the environment variable: command lines are visible to
    /// other users of the machine.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_CLIENT_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        requires = "client_id"
    )]
    client_secret: Option<String>,
}

/// `sb token`'s options.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Mint the token for this subject (an agent the client acts for); the broker must allow
    /// the client to act on behalf of others.
    #[arg(long, value_name = "SUBJECT")]
    subject: Option<String>,

    /// A lifetime shorter than the client's configured one, for example 5m.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<std::time::Duration>,

    /// Print only the token, for `--token "$(sb token --raw)"` or a --token-file.
    #[arg(long)]
    raw: bool,
}

impl SecurityArgs {
    /// The client options these flags ask for.
    pub fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::default();
        if let Some(ca) = &self.ca {
            options = options.ca_certificate(read(ca, "--ca")?);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            options = options.client_identity(read(cert, "--cert")?, read(key, "--key")?);
        }
        if let Some(name) = &self.tls_server_name {
            options = options.tls_server_name(name);
        }
        let given: Vec<&str> = [
            ("--token", self.token.is_some()),
            ("--token-file", self.token_file.is_some()),
            ("--client-id", self.client_id.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if given.len() > 1 {
            bail!(
                "{} were all given (as flags or SWITCHBOARD_* environment variables): \
                 choose one way to authenticate",
                given.join(" and ")
            );
        }
        if let Some(token) = &self.token {
            options = options.bearer_token(checked_token(token, "--token")?);
        } else if let Some(path) = &self.token_file {
            let text = String::from_utf8(read(path, "--token-file")?)
                .with_context(|| format!("--token-file {} is not UTF-8", path.display()))?;
            options = options.bearer_token(checked_token(&text, "--token-file")?);
        } else if let (Some(id), Some(secret)) = (&self.client_id, &self.client_secret) {
            options = options.client_credentials(id, secret);
        }
        Ok(options)
    }

    /// The token request of `sb token`.
    fn token_request(&self, args: &TokenArgs) -> anyhow::Result<IssueTokenRequest> {
        let (Some(client_id), Some(client_secret)) = (&self.client_id, &self.client_secret) else {
            bail!(
                "sb token needs --client-id and --client-secret (or SWITCHBOARD_CLIENT_ID and \
                 SWITCHBOARD_CLIENT_SECRET)"
            );
        };
        Ok(IssueTokenRequest {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            subject: args.subject.clone().unwrap_or_default(),
            scope: None,
            ttl_seconds: args
                .ttl
                .map(|ttl| u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX))
                .unwrap_or(0),
        })
    }
}

/// `sb token`: one exchange at the token endpoint, printed as a JSON line (or just the token).
pub async fn token(
    client: &Client,
    security: &SecurityArgs,
    args: TokenArgs,
) -> anyhow::Result<()> {
    let issued = client.issue_token(security.token_request(&args)?).await?;
    if args.raw {
        crate::emit(&issued.access_token)
    } else {
        crate::emit(&token_line(&issued)?)
    }
}

/// `{"access_token":..,"token_type":"Bearer","expires_at":..,"expires_in_seconds":N,"scope":{..}}`.
fn token_line(issued: &IssueTokenResponse) -> serde_json::Result<String> {
    let scope = issued.scope.clone().unwrap_or_default();
    serde_json::to_string(&serde_json::json!({
        "access_token": issued.access_token,
        "token_type": issued.token_type,
        "expires_at": issued.expires_at.as_ref().and_then(format_timestamp),
        "expires_in_seconds": issued.expires_in_seconds,
        "scope": {
            "publish": scope.publish,
            "subscribe": scope.subscribe,
            "entity_read": scope.entity_read,
            "entity_update": scope.entity_update,
        },
    }))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

/// The token without surrounding whitespace; refused when empty or with a space or control
/// character inside (it would not be one token in a header).
fn checked_token(text: &str, flag: &str) -> anyhow::Result<String> {
    let token = text.trim();
    if token.is_empty() {
        bail!("{flag} is empty");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{flag} has whitespace or control characters inside: it is not one token");
    }
    Ok(token.to_owned())
}

/// What to do about an authentication or permission refusal, or a broker certificate that was
/// not accepted, printed under the error.
pub fn hint(error: &anyhow::Error) -> Option<&'static str> {
    let error = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Error>())?;
    if let Error::Connect { message, .. } = error {
        return message.contains("invalid peer certificate").then_some(
            "the broker's certificate was not accepted: --ca must be the CA that signed it, and \
             --tls-server-name a name it carries when the --server host is not one",
        );
    }
    Some(match error.reason()? {
        Reason::TokenMissing => {
            "the broker wants a bearer token: pass --token, --token-file, or --client-id and \
             --client-secret"
        }
        Reason::TokenExpired => {
            "the token has expired: get a new one (sb token), or use --client-id and \
             --client-secret so that sb fetches fresh tokens itself"
        }
        Reason::TokenMalformed
        | Reason::TokenInvalid
        | Reason::TokenKeyUnknown
        | Reason::TokenAlgorithmUnsupported => {
            "the broker does not accept this token: check that it is the whole token, issued for \
             this broker"
        }
        Reason::TokenNotYetValid => "the token is not valid yet: check this machine's clock",
        Reason::IssuerMismatch | Reason::AudienceMismatch => {
            "the token was issued by or for someone else than this broker expects"
        }
        Reason::InvalidClient => "check --client-id and --client-secret",
        Reason::TokenEndpointOff => {
            "this broker has no clients configured for its token endpoint: use a token from your \
             identity provider (--token or --token-file)"
        }
        Reason::PublishDenied
        | Reason::SubscribeDenied
        | Reason::EntityReadDenied
        | Reason::EntityUpdateDenied => {
            "the token's scope does not allow this; `sb token` shows what a client's token grants"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_must_be_one_word() {
        assert_eq!(
            checked_token("  abc.def.ghi\n", "--token").unwrap(),
            "abc.def.ghi"
        );
        assert!(checked_token(" \n", "--token").is_err());
        assert!(checked_token("abc def", "--token").is_err());
        assert!(checked_token("abc\u{7}def", "--token").is_err());
    }
}
