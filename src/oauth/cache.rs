//! The access-token cache: one per OAuth channel, shared by all its connections and both
//! delivery modes. Refreshes happen one at a time per channel (single flight).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::endpoint::{self, Failure};
use super::store;
use super::{AccessToken, Error, Http};
use crate::config::oauth::{Grant, OAuth, TokenSource};
use crate::config::{ChannelId, Config, Secret};
use crate::metrics::{self, Refresh};
use crate::state::Backend;
use crate::state::shared::RedisState;
use crate::state::tokens::TokenStore;

/// A cached token is refreshed when it expires within this margin (SPEC §7).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// When a refresh fails transiently, a cached token with at least this much life left is
/// still handed out (the refresh was early, the token still works).
const STILL_USABLE: Duration = Duration::from_secs(60);

/// Shared backend: how long the refresh lock lives if its host dies holding it.
const LOCK_HOLD: Duration = Duration::from_secs(60);
// The lock must outlive the longest refresh made under it — the refresh token read from
// Redis, the token request, the rotated token stored back — or a second host would take
// it and spend the refresh token the first one is about to replace. A Redis call takes
// at most three `CALL_TIMEOUT`s (connecting, then the call).
const _: () = assert!(
    LOCK_HOLD.as_secs()
        > Http::TIMEOUT.as_secs() + 3 * 3 * crate::state::shared::CALL_TIMEOUT.as_secs()
);
/// Shared backend: how long a host waits for another one's refresh before giving up
/// (transient: the message is deferred); longer than the lock, so that a host that died
/// holding it is taken over.
const LOCK_WAIT: Duration = Duration::from_secs(65);
const _: () = assert!(LOCK_WAIT.as_secs() > LOCK_HOLD.as_secs());
/// Shared backend: how often a waiting host looks for the new token.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// The token caches of every OAuth channel of a config. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_channel: Arc<Vec<Option<ChannelToken>>>,
}

impl Tokens {
    /// A cache for each channel with `oauth` settings, one HTTP client for all, and the
    /// local token store in `<spool_dir>/state`.
    /// A config without OAuth channels gets an empty set, and no HTTP client is built
    /// (start-up and every `Upstreams` stay as cheap as before OAuth).
    pub fn new(config: &Config) -> Result<Tokens, String> {
        let uses_oauth = config.channels.iter().any(|c| c.kind.oauth().is_some());
        if !uses_oauth {
            return Ok(Tokens::default());
        }
        let backend = Backend::of(config)?;
        let mut tokens = Tokens::with_store(
            config,
            Http::new(config.server.https_proxy.as_ref())?,
            backend.token_store(),
        );
        if let Backend::Redis(redis) = backend {
            tokens = tokens.shared(&redis);
        }
        Ok(tokens)
    }

    /// Every channel shares its access token with the other hosts through `redis`, and
    /// one host at a time refreshes it.
    pub fn shared(self, redis: &RedisState) -> Tokens {
        let by_channel = self
            .by_channel
            .iter()
            .map(|t| {
                t.as_ref().map(|t| ChannelToken {
                    inner: Arc::new(Inner {
                        channel: t.inner.channel.clone(),
                        settings: t.inner.settings.clone(),
                        http: t.inner.http.clone(),
                        store: t.inner.store.clone(),
                        margin: t.inner.margin,
                        state: tokio::sync::Mutex::new(State::default()),
                        refreshed: AtomicU64::new(0),
                        failed: AtomicU64::new(0),
                        shared: Some(redis.clone()),
                    }),
                })
            })
            .collect();
        Tokens {
            by_channel: Arc::new(by_channel),
        }
    }

    /// As [`Tokens::new`], with this client and store.
    pub fn with_store(config: &Config, http: Http, store: Arc<dyn TokenStore>) -> Tokens {
        let by_channel = config
            .channels
            .iter()
            .map(|channel| {
                channel.kind.oauth().map(|settings| {
                    ChannelToken::new(&channel.name, settings.clone(), http.clone(), store.clone())
                })
            })
            .collect();
        Tokens {
            by_channel: Arc::new(by_channel),
        }
    }

    /// The cache of channel `id`; `None` when it does not use OAuth.
    pub fn get(&self, id: ChannelId) -> Option<&ChannelToken> {
        self.by_channel.get(id).and_then(Option::as_ref)
    }
}

/// One channel's access token, shared by all its connections. Cheap to clone.
#[derive(Clone)]
pub struct ChannelToken {
    inner: Arc<Inner>,
}

struct Inner {
    channel: String,
    settings: OAuth,
    http: Http,
    store: Arc<dyn TokenStore>,
    margin: Duration,
    /// Held across a refresh: concurrent callers wait for it, then find the new token.
    state: tokio::sync::Mutex<State>,
    refreshed: AtomicU64,
    failed: AtomicU64,
    /// `[state] backend = "redis"`: the access token and its refresh are shared.
    shared: Option<RedisState>,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    /// The last refresh's failure and when it ended: callers that were already waiting
    /// for that refresh get its answer instead of asking the endpoint again.
    last_failure: Option<(Instant, Error)>,
    /// A rotated refresh token that could not be stored: used until a later store works.
    unsaved_refresh_token: Option<Secret>,
}

struct Cached {
    token: AccessToken,
    expires_at: Instant,
}

impl Cached {
    fn lasts(&self, at_least: Duration) -> bool {
        self.expires_at.saturating_duration_since(Instant::now()) > at_least
    }
}

/// When a token issued at `started` for `lasts` expires: never past a day, and without
/// overflow whatever `lasts` is (an endpoint's `expires_in` is clamped already; this is
/// the last guard).
fn expiry(started: Instant, lasts: Duration) -> Instant {
    let lasts = lasts.min(endpoint::MAX_LIFETIME);
    started.checked_add(lasts).unwrap_or(started)
}

impl fmt::Debug for ChannelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelToken")
            .field("channel", &self.inner.channel)
            .field("provider", &self.inner.settings.provider)
            .field("grant", &self.inner.settings.grant)
            .finish_non_exhaustive()
    }
}

impl ChannelToken {
    /// The cache of channel `channel` with these settings.
    pub fn new(channel: &str, settings: OAuth, http: Http, store: Arc<dyn TokenStore>) -> Self {
        ChannelToken::with_margin(channel, settings, http, store, REFRESH_MARGIN)
    }

    /// As [`ChannelToken::new`] with another refresh margin (tests).
    pub(crate) fn with_margin(
        channel: &str,
        settings: OAuth,
        http: Http,
        store: Arc<dyn TokenStore>,
        margin: Duration,
    ) -> Self {
        ChannelToken {
            inner: Arc::new(Inner {
                channel: channel.to_string(),
                settings,
                http,
                store,
                margin,
                state: tokio::sync::Mutex::new(State::default()),
                refreshed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                shared: None,
            }),
        }
    }

    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The channel's OAuth settings.
    pub fn settings(&self) -> &OAuth {
        &self.inner.settings
    }

    /// Token-endpoint requests so far: (succeeded, failed), for
    /// `mailgate_oauth_token_refreshes_total{channel,result}`.
    pub fn refresh_counts(&self) -> (u64, u64) {
        (
            self.inner.refreshed.load(Ordering::Relaxed),
            self.inner.failed.load(Ordering::Relaxed),
        )
    }

    /// How long the cached token still lasts (`test-channel` reports it); `None` when
    /// there is none.
    pub async fn expires_in(&self) -> Option<Duration> {
        let state = self.inner.state.lock().await;
        state
            .current
            .as_ref()
            .map(|c| c.expires_at.saturating_duration_since(Instant::now()))
    }

    /// The cached access token, or a new one when it expires within 10 minutes.
    /// Concurrent callers share one refresh.
    pub async fn access_token(&self) -> Result<AccessToken, Error> {
        let asked = Instant::now();
        let mut state = self.inner.state.lock().await;
        if let Some(cached) = &state.current
            && cached.lasts(self.inner.margin)
        {
            return Ok(cached.token.clone());
        }
        if let Some(answer) = Self::answered_meanwhile(&state, asked) {
            return answer;
        }
        self.refresh(&mut state, None).await
    }

    /// The upstream refused `stale` (SMTP 535, Graph 401): a new token, unless another
    /// caller already replaced `stale`, then that one. Call it once per refusal and retry
    /// AUTH once with its answer; never loop.
    pub async fn force_refresh(&self, stale: &AccessToken) -> Result<AccessToken, Error> {
        let asked = Instant::now();
        let mut state = self.inner.state.lock().await;
        if let Some(cached) = &state.current {
            if cached.token != *stale && cached.lasts(Duration::ZERO) {
                return Ok(cached.token.clone());
            }
            if cached.token == *stale {
                // Refused upstream: useless even as a fall-back.
                state.current = None;
            }
        }
        if let Some(answer) = Self::answered_meanwhile(&state, asked) {
            return answer;
        }
        self.refresh(&mut state, Some(stale)).await
    }

    /// A refresh that failed after `asked` answers this caller too.
    fn answered_meanwhile(state: &State, asked: Instant) -> Option<Result<AccessToken, Error>> {
        let (at, error) = state.last_failure.as_ref()?;
        if *at < asked {
            return None;
        }
        match &state.current {
            Some(cached) if error.is_transient() && cached.lasts(STILL_USABLE) => {
                Some(Ok(cached.token.clone()))
            }
            _ => Some(Err(error.clone())),
        }
    }

    /// Asks the endpoint (the caller holds the state lock).
    async fn refresh(
        &self,
        state: &mut State,
        stale: Option<&AccessToken>,
    ) -> Result<AccessToken, Error> {
        let inner = &*self.inner;
        let started = Instant::now();
        let fetched = match &inner.shared {
            Some(redis) => self.fetch_shared(state, redis, stale).await,
            None => self.fetch(state).await.map(|issued| (issued, true)),
        };
        match fetched {
            Ok((issued, asked_endpoint)) => {
                if asked_endpoint {
                    inner.refreshed.fetch_add(1, Ordering::Relaxed);
                    metrics::token_refresh(&inner.channel, Refresh::Ok);
                    tracing::info!(
                        channel = %inner.channel,
                        expires_in_s = issued.expires_in.as_secs(),
                        "OAuth access token refreshed"
                    );
                }
                state.last_failure = None;
                state.current = Some(Cached {
                    token: issued.access_token.clone(),
                    expires_at: expiry(started, issued.expires_in),
                });
                // The status page shows when it expires, never the token.
                metrics::status::token_expires_in(&inner.channel, issued.expires_in);
                Ok(issued.access_token)
            }
            Err(error) => {
                inner.failed.fetch_add(1, Ordering::Relaxed);
                let result = if error.is_transient() {
                    Refresh::Error
                } else {
                    Refresh::Rejected
                };
                metrics::token_refresh(&inner.channel, result);
                state.last_failure = Some((Instant::now(), error.clone()));
                match &state.current {
                    Some(cached) if error.is_transient() && cached.lasts(STILL_USABLE) => {
                        tracing::warn!("{error}; the cached token is still valid and stays in use");
                        Ok(cached.token.clone())
                    }
                    _ => {
                        if error.is_transient() {
                            tracing::warn!("{error}");
                        } else {
                            tracing::error!("{error}");
                        }
                        Err(error)
                    }
                }
            }
        }
    }

    /// The refresh token to use. Shared: one another host rotated (in Redis) wins over
    /// this host's file, which that rotation spent.
    async fn stored_refresh_token(&self) -> Result<Secret, Error> {
        let inner = &*self.inner;
        let (channel, settings) = (inner.channel.as_str(), &inner.settings);
        if inner.shared.is_some() {
            let rotated = inner
                .store
                .load(channel)
                .await
                .map_err(|reason| Error::Transient {
                    channel: channel.to_string(),
                    reason,
                })?;
            if let Some(token) = rotated {
                return Ok(token);
            }
        }
        let broken = |code: &str, description: String| Error::Broken {
            channel: channel.to_string(),
            code: code.to_string(),
            description,
            hint: endpoint::hint(channel, settings, code),
        };
        store::load_refresh_token(channel, settings, &*inner.store)
            .await
            .map_err(|e| broken("token_unreadable", e))?
            .ok_or_else(|| broken("no_refresh_token", String::new()))
    }

    /// Shared backend: the token another host put in Redis, or one from the endpoint
    /// asked by this host under the refresh lock (then shared). `true` when this host
    /// asked the endpoint. Redis unreachable: this host refreshes on its own.
    async fn fetch_shared(
        &self,
        state: &mut State,
        redis: &RedisState,
        stale: Option<&AccessToken>,
    ) -> Result<(endpoint::Issued, bool), Error> {
        let channel = self.inner.channel.as_str();
        if let Some(stale) = stale {
            let _ = redis
                .drop_access_token(channel, &Secret::new(stale.expose()))
                .await;
        }
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            if let Some(issued) = self.shared_token(redis, stale).await {
                return Ok((issued, false));
            }
            let taken = match redis.lock_refresh(channel, LOCK_HOLD).await {
                Ok(taken) => taken,
                Err(_) => return self.fetch(state).await.map(|issued| (issued, true)),
            };
            if let Some(value) = taken {
                // Another host may have shared a token between the look and the lock.
                if let Some(issued) = self.shared_token(redis, stale).await {
                    let _ = redis.unlock_refresh(channel, &value).await;
                    return Ok((issued, false));
                }
                let result = self.fetch(state).await;
                if let Ok(issued) = &result {
                    let lasts = u64::try_from(issued.expires_in.as_millis()).unwrap_or(u64::MAX);
                    let token = Secret::new(issued.access_token.expose());
                    if let Err(e) = redis.set_access_token(channel, &token, lasts).await {
                        tracing::warn!(channel, error = %e, "cannot share the new OAuth access token");
                    }
                }
                let _ = redis.unlock_refresh(channel, &value).await;
                return result.map(|issued| (issued, true));
            }
            if Instant::now() >= deadline {
                return Err(Error::Transient {
                    channel: channel.to_string(),
                    reason: "another host's token refresh did not finish in time".into(),
                });
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    /// The shared token, if it lasts beyond the margin and is not `stale`.
    async fn shared_token(
        &self,
        redis: &RedisState,
        stale: Option<&AccessToken>,
    ) -> Option<endpoint::Issued> {
        let (token, lasts_ms) = redis.access_token(&self.inner.channel).await.ok()??;
        // Another host's (or anyone's) value in Redis: clamped like an endpoint's.
        let lasts = Duration::from_millis(lasts_ms).min(endpoint::MAX_LIFETIME);
        if lasts <= self.inner.margin || stale.is_some_and(|s| s.expose() == token.expose()) {
            return None;
        }
        Some(endpoint::Issued {
            access_token: AccessToken::new(token.expose()),
            expires_in: lasts,
            refresh_token: None,
        })
    }

    /// One grant request, and the rotated refresh token stored back.
    async fn fetch(&self, state: &mut State) -> Result<endpoint::Issued, Error> {
        let inner = &*self.inner;
        let (channel, settings) = (inner.channel.as_str(), &inner.settings);
        let client_secret = settings.client_secret.as_ref().map(Secret::expose);
        let refresh_token = match settings.grant {
            Grant::ClientCredentials => {
                return endpoint::client_credentials_grant(&inner.http, settings)
                    .await
                    .map_err(|f| f.into_error(channel, settings, &[client_secret.unwrap_or("")]));
            }
            Grant::RefreshToken => match state.unsaved_refresh_token.clone() {
                Some(token) => token,
                None => self.stored_refresh_token().await?,
            },
        };
        let secrets = [client_secret.unwrap_or(""), refresh_token.expose()];
        let issued = endpoint::refresh_grant(&inner.http, settings, &refresh_token)
            .await
            .map_err(|f: Failure| f.into_error(channel, settings, &secrets))?;
        if let Some(rotated) = &issued.refresh_token
            && *rotated != refresh_token
        {
            let saved = match &inner.shared {
                // Shared: in Redis, where every host looks first; this host's file (if
                // any) is kept current too, for a move back to the local backend.
                Some(_) => {
                    let saved = inner
                        .store
                        .save(channel, rotated)
                        .await
                        .map(|()| inner.store.location(channel));
                    if saved.is_ok()
                        && let TokenSource::File(path) = &settings.refresh_token_source
                        && let Err(e) = store::write_token_file(path, rotated)
                    {
                        tracing::warn!(
                            channel,
                            "rotated OAuth refresh token not copied to the token file: {e}"
                        );
                    }
                    saved
                }
                None => store::save_refresh_token(channel, settings, &*inner.store, rotated).await,
            };
            match saved {
                Ok(location) => {
                    state.unsaved_refresh_token = None;
                    tracing::info!(channel, "rotated OAuth refresh token stored in {location}");
                }
                Err(e) => {
                    state.unsaved_refresh_token = Some(rotated.clone());
                    tracing::error!(
                        channel,
                        "cannot store the rotated OAuth refresh token ({e}); it is kept in \
                         memory only: fix this before mailgate restarts or re-run \
                         `mailgate oauth authorize {channel}` then"
                    );
                }
            }
        }
        Ok(issued)
    }
}
