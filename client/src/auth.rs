//! Bearer tokens: the [`Token`] a call carries, the [`TokenProvider`]s that supply one
//! ([`StaticToken`], [`ClientCredentials`] against the broker's `Auth/IssueToken`), and the
//! [`TokenCache`] every authenticated [`Client`](crate::Client) puts in front of its provider.
//!
//! The cache hands out its token until shortly before it expires, then fetches a new one. However
//! many calls ask while a fetch is under way, there is only one fetch: they all wait on the same
//! shared future and all get its token, or all get its error (and the next call tries again).
//! Fetching ahead of expiry matters because a stream opened with a token is ended by the broker
//! (`UNAUTHENTICATED TOKEN_EXPIRED`) when it expires, and a call that starts with an almost
//! expired token may be refused on a broker whose clock runs a little ahead.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt, Shared};
use switchboard_proto::v1::auth_client::AuthClient;
use switchboard_proto::v1::{IssueTokenRequest, IssueTokenResponse, Scope};
use tonic::transport::Channel;

use crate::error::Error;

/// A bearer token and when it stops being accepted.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The token itself (a JWT), sent as `authorization: Bearer <value>`.
    pub value: String,
    /// When the broker stops accepting it; `None` when unknown (the token is then used until the
    /// broker refuses it).
    pub expires_at: Option<SystemTime>,
}

impl Token {
    /// A token with a known expiry.
    pub fn new(value: impl Into<String>, expires_at: Option<SystemTime>) -> Token {
        Token {
            value: value.into(),
            expires_at,
        }
    }
}

/// The value is a credential: it stays out of logs and panic messages.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The future a [`TokenProvider`] returns.
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, Error>> + Send + 'a>>;

/// Where a [`Client`](crate::Client) gets the bearer token its calls carry.
///
/// The client puts a [`TokenCache`] in front of the provider, so `token` is called only when
/// there is no token yet, when the last one is about to expire, or when the broker refused it
/// (then `force_refresh` is `true`: a provider with a cache of its own must not answer from it),
/// and never twice at the same time.
///
/// # Example
/// A provider that reads a token file that another process keeps fresh:
/// ```
/// use switchboard_client::{Error, Token, TokenFuture, TokenProvider};
///
/// struct TokenFile(std::path::PathBuf);
///
/// impl TokenProvider for TokenFile {
///     fn token(&self, _force_refresh: bool) -> TokenFuture<'_> {
///         Box::pin(async move {
///             let value = tokio::fs::read_to_string(&self.0)
///                 .await
///                 .map_err(|error| Error::InvalidArgument(format!("{}: {error}", self.0.display())))?;
///             Ok(Token::new(value.trim(), None))
///         })
///     }
/// }
/// ```
pub trait TokenProvider: Send + Sync + 'static {
    /// A token to send; `force_refresh` when the last one was refused.
    ///
    /// # Errors
    /// Whatever kept the provider from getting a token; the call that needed it fails with this
    /// error (a transient one, such as `UNAVAILABLE`, lets a subscription retry).
    fn token(&self, force_refresh: bool) -> TokenFuture<'_>;
}

/// A fixed token, for example one issued by an external identity provider and passed on the
/// command line. It is sent until the broker refuses it; nothing can refresh it.
#[derive(Clone)]
pub struct StaticToken(Token);

impl StaticToken {
    /// A token whose expiry the client does not know.
    pub fn new(value: impl Into<String>) -> StaticToken {
        StaticToken(Token::new(value, None))
    }
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StaticToken").field(&self.0).finish()
    }
}

impl TokenProvider for StaticToken {
    fn token(&self, _force_refresh: bool) -> TokenFuture<'_> {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }
}

/// Tokens from the broker's token endpoint (`switchboard.v1.Auth/IssueToken`), in exchange for a
/// client id and secret configured on the broker (OAuth 2.0 client-credentials style).
///
/// The exchange needs no token itself, so it runs on the plain channel (the same connection as
/// the client's other calls, when built through
/// [`ConnectOptions::client_credentials`](crate::ConnectOptions::client_credentials)).
#[derive(Clone)]
pub struct ClientCredentials {
    grpc: AuthClient<Channel>,
    request: IssueTokenRequest,
}

impl ClientCredentials {
    /// Exchanges `client_id` and `client_secret` on `channel` for tokens with the client's whole
    /// configured scope and lifetime, naming the client itself as subject.
    pub fn new(
        channel: Channel,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> ClientCredentials {
        ClientCredentials::from_request(
            channel,
            IssueTokenRequest {
                client_id: client_id.into(),
                client_secret: client_secret.into(),
                ..IssueTokenRequest::default()
            },
        )
    }

    /// Exchanges the credentials of `request`, with its subject, scope and lifetime, on `channel`.
    pub fn from_request(channel: Channel, request: IssueTokenRequest) -> ClientCredentials {
        ClientCredentials {
            grpc: AuthClient::new(channel),
            request,
        }
    }

    /// Asks for tokens on behalf of `subject` (an agent the client acts for; the broker's client
    /// configuration must allow it).
    pub fn subject(mut self, subject: impl Into<String>) -> ClientCredentials {
        self.request.subject = subject.into();
        self
    }

    /// Asks for tokens narrower than the client's configured scope.
    pub fn scope(mut self, scope: Scope) -> ClientCredentials {
        self.request.scope = Some(scope);
        self
    }

    /// Asks for tokens that live shorter than the client's configured lifetime (whole seconds,
    /// at least one).
    pub fn ttl(mut self, ttl: Duration) -> ClientCredentials {
        self.request.ttl_seconds = u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX);
        self
    }

    /// One exchange, with the broker's whole answer (token, expiry and granted scope).
    ///
    /// # Errors
    /// The broker's refusal, for example `UNAUTHENTICATED INVALID_CLIENT` (unknown id or wrong
    /// secret), `PERMISSION_DENIED SCOPE_NOT_ALLOWED`, `RESOURCE_EXHAUSTED RATE_LIMITED` or
    /// `UNIMPLEMENTED TOKEN_ENDPOINT_OFF`; `INTERNAL` for an answer without a token.
    pub async fn issue(&self) -> Result<IssueTokenResponse, Error> {
        let response = self
            .grpc
            .clone()
            .issue_token(self.request.clone())
            .await?
            .into_inner();
        if response.access_token.is_empty() {
            return Err(Error::Status {
                code: tonic::Code::Internal,
                reason: None,
                message: "the token endpoint answered without a token".to_owned(),
                metadata: Default::default(),
            });
        }
        Ok(response)
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.request.client_id)
            .field("subject", &self.request.subject)
            .finish_non_exhaustive()
    }
}

impl TokenProvider for ClientCredentials {
    fn token(&self, _force_refresh: bool) -> TokenFuture<'_> {
        Box::pin(async move {
            let issued = self.issue().await?;
            let expires_at = expiry_of(&issued);
            Ok(Token::new(issued.access_token, expires_at))
        })
    }
}

/// When an issued token expires: its `expires_at`, else `expires_in_seconds` from now, else
/// unknown.
pub(crate) fn expiry_of(issued: &IssueTokenResponse) -> Option<SystemTime> {
    if let Some(at) = issued.expires_at {
        if let Ok(at) = SystemTime::try_from(at) {
            return Some(at);
        }
    }
    (issued.expires_in_seconds > 0)
        .then(|| SystemTime::now() + Duration::from_secs(u64::from(issued.expires_in_seconds)))
}

/// The longest a token is renewed ahead of its expiry.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// One fetch from the provider, shared by every call that waits on it.
type SharedFetch = Shared<BoxFuture<'static, Result<Token, Error>>>;

/// A [`TokenProvider`] in front of another that keeps the last token and fetches a new one ahead
/// of expiry, one fetch at a time however many calls wait.
///
/// A token is renewed when less than a tenth of its lifetime (as seen from when it arrived), or
/// less than 30 s, is left, whichever margin is smaller; a token without a known expiry is kept
/// until [`TokenCache::refused`] drops it.
pub struct TokenCache {
    provider: Arc<dyn TokenProvider>,
    state: Mutex<CacheState>,
    next_fetch_id: AtomicU64,
}

#[derive(Default)]
struct CacheState {
    current: Option<Cached>,
    fetch: Option<(u64, SharedFetch)>,
}

struct Cached {
    token: Token,
    /// From when on a new one is fetched.
    renew_at: Option<SystemTime>,
}

impl TokenCache {
    /// A cache in front of `provider`, empty until the first call.
    pub fn new(provider: impl TokenProvider) -> TokenCache {
        TokenCache::from_arc(Arc::new(provider))
    }

    /// As [`TokenCache::new`], for a provider that is shared already.
    pub fn from_arc(provider: Arc<dyn TokenProvider>) -> TokenCache {
        TokenCache {
            provider,
            state: Mutex::default(),
            next_fetch_id: AtomicU64::new(0),
        }
    }

    /// The cached token while it is fresh, else the result of one fetch from the provider
    /// (joined when one is under way). `force_refresh` skips the cached token, not a fetch under
    /// way: that one started after the caller's token was handed out, so its result is newer.
    ///
    /// # Errors
    /// The provider's error, which every caller waiting on the same fetch gets; the next call
    /// fetches again.
    pub async fn get(&self, force_refresh: bool) -> Result<Token, Error> {
        let (id, fetch) = {
            let mut state = self.lock();
            if !force_refresh {
                if let Some(cached) = &state.current {
                    if cached.renew_at.is_none_or(|at| SystemTime::now() < at) {
                        return Ok(cached.token.clone());
                    }
                }
            }
            match &state.fetch {
                Some((id, fetch)) => (*id, fetch.clone()),
                None => {
                    let id = self.next_fetch_id.fetch_add(1, Ordering::Relaxed);
                    let provider = Arc::clone(&self.provider);
                    let fetch = async move { provider.token(force_refresh).await }
                        .boxed()
                        .shared();
                    state.fetch = Some((id, fetch.clone()));
                    (id, fetch)
                }
            }
        };
        let result = fetch.await;
        let mut state = self.lock();
        // The first waiter to see the result files it; the others find the fetch gone.
        if state
            .fetch
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
        {
            state.fetch = None;
            if let Ok(token) = &result {
                state.current = Some(Cached {
                    token: token.clone(),
                    renew_at: renew_at(SystemTime::now(), token.expires_at),
                });
            }
        }
        result
    }

    /// The broker refused `value` (for example `UNAUTHENTICATED TOKEN_EXPIRED`): drop it, so the
    /// next call fetches anew. A token that is no longer the cached one (another refusal already
    /// led to a new one) is left alone, so many refusals of one token cause one fetch.
    pub fn refused(&self, value: &str) {
        let mut state = self.lock();
        if state
            .current
            .as_ref()
            .is_some_and(|cached| cached.token.value == value)
        {
            state.current = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("TokenCache")
            .field("token", &state.current.as_ref().map(|cached| &cached.token))
            .field("fetching", &state.fetch.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenProvider for TokenCache {
    fn token(&self, force_refresh: bool) -> TokenFuture<'_> {
        Box::pin(self.get(force_refresh))
    }
}

/// When a token that arrived at `now` and expires at `expires_at` is renewed: a tenth of its
/// remaining lifetime, at most [`MAX_REFRESH_MARGIN`], before expiry. An already expired token is
/// renewed at once (the next call fetches again), an unknown expiry never.
fn renew_at(now: SystemTime, expires_at: Option<SystemTime>) -> Option<SystemTime> {
    let expires_at = expires_at?;
    let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    let margin = (lifetime / 10).min(MAX_REFRESH_MARGIN);
    Some(expires_at - margin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    /// Counts its fetches, answers `token-N` (expiring after `lifetime`), and holds each answer
    /// until released when `gate` is set; fails while `fail` is set.
    #[derive(Default)]
    struct Counting {
        fetches: AtomicUsize,
        forced: AtomicUsize,
        lifetime: Option<Duration>,
        gate: Option<Arc<Notify>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl TokenProvider for Counting {
        fn token(&self, force_refresh: bool) -> TokenFuture<'_> {
            Box::pin(async move {
                let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
                if force_refresh {
                    self.forced.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(gate) = &self.gate {
                    gate.notified().await;
                }
                if self.fail.load(Ordering::SeqCst) {
                    return Err(Error::Status {
                        code: tonic::Code::Unauthenticated,
                        reason: Some("INVALID_CLIENT".to_owned()),
                        message: format!("fetch {n} refused"),
                        metadata: Default::default(),
                    });
                }
                let expires_at = match self.lifetime {
                    Some(lifetime) => SystemTime::now().checked_add(lifetime),
                    // Expired a minute ago.
                    None => SystemTime::now().checked_sub(Duration::from_secs(60)),
                };
                Ok(Token::new(format!("token-{n}"), expires_at))
            })
        }
    }

    fn counting(lifetime: Option<Duration>, gated: bool) -> (Arc<Counting>, Arc<TokenCache>) {
        let provider = Arc::new(Counting {
            lifetime,
            gate: gated.then(|| Arc::new(Notify::new())),
            ..Counting::default()
        });
        let cache = Arc::new(TokenCache::from_arc(provider.clone()));
        (provider, cache)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Waits until `provider` has been asked `n` times (the fetch is under way, held by its gate).
    async fn fetches_reach(provider: &Counting, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while provider.fetches.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the fetch started");
    }

    /// Waits until `n` callers wait on the fetch under way (besides the cache's own handle), so
    /// that releasing it answers them all at once and none comes late.
    async fn waiters_reach(cache: &TokenCache, n: usize) {
        let waiting = || {
            let state = cache.lock();
            let handles = state
                .fetch
                .as_ref()
                .and_then(|(_, fetch)| fetch.strong_count());
            handles.unwrap_or(0).saturating_sub(1)
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while waiting() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every caller waits on the fetch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_concurrent_callers_cause_one_fetch() {
        let (provider, cache) = counting(Some(HOUR), true);
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get(false).await })
            })
            .collect();
        waiters_reach(&cache, 100).await;
        // Every caller is waiting on the one fetch; release it.
        provider.gate.as_ref().unwrap().notify_one();
        for caller in callers {
            let token = caller.await.unwrap().unwrap();
            assert_eq!(token.value, "token-1");
        }
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 1);
        // And the token is cached afterwards.
        assert_eq!(cache.get(false).await.unwrap().value, "token-1");
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_fresh_token_is_reused_and_an_expired_one_is_fetched_again() {
        let (fresh, cache) = counting(Some(HOUR), false);
        assert_eq!(cache.get(false).await.unwrap().value, "token-1");
        assert_eq!(cache.get(false).await.unwrap().value, "token-1");
        assert_eq!(fresh.fetches.load(Ordering::SeqCst), 1);

        let (expired, cache) = counting(None, false);
        assert_eq!(cache.get(false).await.unwrap().value, "token-1");
        assert_eq!(cache.get(false).await.unwrap().value, "token-2");
        assert_eq!(expired.fetches.load(Ordering::SeqCst), 2);
        assert_eq!(expired.forced.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_forced_refresh_or_a_refusal_fetches_again_once() {
        let (provider, cache) = counting(Some(HOUR), false);
        assert_eq!(cache.get(false).await.unwrap().value, "token-1");
        assert_eq!(cache.get(true).await.unwrap().value, "token-2");
        assert_eq!(provider.forced.load(Ordering::SeqCst), 1);

        // Two refusals of the same token: one new fetch; a refusal of an older token: none.
        cache.refused("token-2");
        cache.refused("token-2");
        assert_eq!(cache.get(false).await.unwrap().value, "token-3");
        cache.refused("token-2");
        assert_eq!(cache.get(false).await.unwrap().value, "token-3");
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_reaches_every_waiter_and_the_next_call_tries_again() {
        let (provider, cache) = counting(Some(HOUR), true);
        provider.fail.store(true, Ordering::SeqCst);
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get(false).await })
            })
            .collect();
        waiters_reach(&cache, 20).await;
        provider.gate.as_ref().unwrap().notify_one();
        for caller in callers {
            let error = caller.await.unwrap().unwrap_err();
            assert_eq!(
                error.reason(),
                Some(switchboard_proto::Reason::InvalidClient)
            );
            assert!(error.to_string().ends_with("fetch 1 refused"), "{error}");
        }
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 1);

        provider.fail.store(false, Ordering::SeqCst);
        let next = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(false).await })
        };
        fetches_reach(&provider, 2).await;
        provider.gate.as_ref().unwrap().notify_one();
        assert_eq!(next.await.unwrap().unwrap().value, "token-2");
    }

    #[tokio::test]
    async fn a_fetch_whose_waiter_went_away_is_finished_by_the_next_caller() {
        let (provider, cache) = counting(Some(HOUR), true);
        // The first caller gives up while the fetch is held.
        let abandoned = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(false).await })
        };
        fetches_reach(&provider, 1).await;
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        provider.gate.as_ref().unwrap().notify_one();
        assert_eq!(cache.get(false).await.unwrap().value, "token-1");
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn renewal_margin_is_a_tenth_of_the_lifetime_at_most_thirty_seconds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |secs: u64| now + Duration::from_secs(secs);
        assert_eq!(renew_at(now, Some(at(100))), Some(at(90)));
        assert_eq!(renew_at(now, Some(at(900))), Some(at(870)));
        assert_eq!(renew_at(now, Some(now)), Some(now));
        let past = now - Duration::from_secs(5);
        assert_eq!(renew_at(now, Some(past)), Some(past));
        assert_eq!(renew_at(now, None), None);
    }

    #[test]
    fn debug_output_leaves_the_token_out() {
        let token = Token::new("secret-jwt", None);
        assert!(!format!("{token:?}").contains("secret-jwt"));
        assert!(!format!("{:?}", StaticToken::new("secret-jwt")).contains("secret-jwt"));
    }
}
