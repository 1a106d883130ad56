//! The shared backend: one Redis for every host that sends over the same channels
//! (SPEC §6). Counters, channel health, the cached access token and stored refresh
//! tokens live under `key_prefix`:
//!
//! | key | what |
//! |---|---|
//! | `rate:<ch>` | sorted set of the rate window's sends (score: unix ms) |
//! | `day:<ch>`, `daysum:<ch>` | the rolling day's sends and their recipient total |
//! | `health:<ch>` | the channel's [`Health`] as JSON |
//! | `retry:<ch>` | bumped by `queue retry`: every host makes the channel's mail due |
//! | `token:<ch>`, `token-lock:<ch>` | the shared access token; who refreshes it |
//! | `refresh:<ch>` | a refresh token mailgate obtained (rotation, `oauth authorize`) |
//!
//! A reservation is one Lua script on Redis's clock (hosts' clocks may differ): it checks
//! both windows and records both, or refuses with the time to wait. Every key expires by
//! itself once its window has passed. Every call has a timeout; a failed call is
//! [`Unavailable`], which the callers turn into "wait" (never "send anyway").

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::Health;
use crate::config::{Limits, RedisSettings, Secret};

/// Longest any one Redis call may take (on top of the client's own timeouts).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Redis could not be asked (down, unreachable, too slow, or refused the call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redis unavailable: {}", self.0)
    }
}

/// What a reservation got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Counted in both windows; the token gives it back ([`RedisState::release`]).
    Yes(String),
    /// Not now: try again after this many ms.
    Wait(u64),
    /// Never (more recipients than a day allows, or a rate of 0).
    Never,
}

/// KEYS: rate, day, daysum. ARGV: rate count (-1: none), rate window ms, recipients per
/// day (-1: none), a unique tag, then the recipients of each transaction to reserve, in
/// order. Reserves them one by one until one does not fit. Returns
/// `{0, "", member…}` when all fit, else `{1, wait_ms, member…}` or `{2, "", member…}`
/// (never fits) for the first that did not, with the members of those reserved before it.
const RESERVE: &str = include_str!("lua/reserve.lua");

const RELEASE: &str = include_str!("lua/release.lua");

/// `state import`. KEYS: rate, day, daysum. ARGV: rate window ms (-1: none), 1 if the
/// channel counts recipients per day, then (unix ms, recipients) pairs. Adds each send
/// still inside a window (on Redis's clock) unless the window already holds it, so the
/// sends other hosts made meanwhile stay counted and importing twice counts nothing
/// twice; each key then expires when its last send leaves its window.
const IMPORT: &str = include_str!("lua/import.lua");

/// Deletes the lock only if it is still ours (it may have expired and been taken).
const UNLOCK: &str = include_str!("lua/unlock.lua");

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;
/// Answers, but refuses writes.
const REFUSED: u8 = 3;

/// A connection to the shared Redis. Cheap to clone; one per process and settings.
#[derive(Clone)]
pub struct RedisState {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    display: String,
    prefix: String,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// Last known reachability, so an outage is logged once per change, not per call.
    status: AtomicU8,
    reserve: Script,
    release: Script,
    unlock: Script,
    import: Script,
}

impl fmt::Debug for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisState")
            .field("url", &self.inner.display)
            .field("key_prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisState {
    /// The process's connection for these settings (made once; nothing is connected
    /// until the first call, so a Redis that is down at start-up is no start-up error).
    pub fn shared(settings: &RedisSettings) -> Result<RedisState, String> {
        static ALL: OnceLock<Mutex<HashMap<(String, String), RedisState>>> = OnceLock::new();
        let key = (
            settings.url.expose().to_owned(),
            settings.key_prefix.clone(),
        );
        let mut all = ALL
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(state) = all.get(&key) {
            return Ok(state.clone());
        }
        let state = RedisState::new(settings)?;
        all.insert(key, state.clone());
        Ok(state)
    }

    /// A new connection (tests: one per simulated host).
    pub fn new(settings: &RedisSettings) -> Result<RedisState, String> {
        // rediss:// builds its rustls config on the process's provider (ring, as elsewhere).
        crate::tls::install_crypto_provider();
        let client = redis::Client::open(settings.url.expose())
            .map_err(|e| format!("Redis {}: {}", settings.display, e.category()))?;
        Ok(RedisState {
            inner: Arc::new(Inner {
                client,
                display: settings.display.clone(),
                prefix: settings.key_prefix.clone(),
                conn: tokio::sync::OnceCell::new(),
                status: AtomicU8::new(UNKNOWN),
                reserve: Script::new(RESERVE),
                release: Script::new(RELEASE),
                unlock: Script::new(UNLOCK),
                import: Script::new(IMPORT),
            }),
        })
    }

    /// The url without its password.
    pub fn display(&self) -> &str {
        &self.inner.display
    }

    /// `<prefix><kind>:<channel>`.
    pub fn key(&self, kind: &str, channel: &str) -> String {
        format!("{}{kind}:{channel}", self.inner.prefix)
    }

    async fn conn(&self) -> Result<ConnectionManager, Unavailable> {
        let inner = &*self.inner;
        let connect = inner.conn.get_or_try_init(|| async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            inner
                .client
                .get_connection_manager_with_config(config)
                .await
        });
        match tokio::time::timeout(CALL_TIMEOUT * 2, connect).await {
            Ok(Ok(conn)) => Ok(conn.clone()),
            Ok(Err(e)) => Err(Unavailable(e.to_string())),
            Err(_) => Err(Unavailable("connection timed out".into())),
        }
    }

    /// Runs one call that writes with the timeout, and notes (logging a change) whether
    /// Redis answered and took it.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_as(true, f).await
    }

    /// [`RedisState::call`] for a call that only reads.
    async fn read<T, F, Fut>(&self, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_as(false, f).await
    }

    async fn call_as<T, F, Fut>(&self, writes: bool, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (result, refused) = match self.conn().await {
            Ok(conn) => match tokio::time::timeout(CALL_TIMEOUT, f(conn)).await {
                Ok(Ok(value)) => (Ok(value), false),
                // Redis answered with an error (a read-only replica after a failover, out
                // of memory): reachable, but it does not count.
                Ok(Err(e)) => (
                    Err(Unavailable(e.to_string())),
                    matches!(
                        e.kind(),
                        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                    ),
                ),
                Err(_) => (Err(Unavailable("no answer in time".into())), false),
            },
            Err(e) => (Err(e), false),
        };
        self.note(&result, writes, refused);
        result
    }

    /// Logs each change between answering, unreachable and refusing writes once. Reads
    /// that work while writes are refused change nothing: else every poll would log
    /// "back" and the next reservation "gone" again.
    fn note<T>(&self, result: &Result<T, Unavailable>, writes: bool, refused: bool) {
        let status = &self.inner.status;
        let (before, now) = match result {
            Ok(_) => {
                let update = status.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    (writes || s != REFUSED).then_some(UP)
                });
                match update {
                    Ok(before) => (before, UP),
                    Err(_) => return,
                }
            }
            Err(_) => {
                let now = if refused { REFUSED } else { DOWN };
                (status.swap(now, Ordering::Relaxed), now)
            }
        };
        if before == now {
            return;
        }
        match (result, now) {
            (Err(e), DOWN) => tracing::error!(
                redis = %self.inner.display,
                error = %e.0,
                "shared state: Redis is unreachable; limited channels wait (queue: deferred, relay: 451) until it is back"
            ),
            (Err(e), _) => tracing::error!(
                redis = %self.inner.display,
                error = %e.0,
                "shared state: Redis refuses to count (writes refused); limited channels wait (queue: deferred, relay: 451) until it takes them again"
            ),
            (Ok(_), _) if before != UNKNOWN => {
                tracing::info!(redis = %self.inner.display, "shared state: Redis is reachable again")
            }
            _ => {}
        }
    }

    /// Whether the last call reached Redis and, if it wrote, was taken (`None`: no call yet).
    pub fn reachable(&self) -> Option<bool> {
        match self.inner.status.load(Ordering::Relaxed) {
            UP => Some(true),
            DOWN | REFUSED => Some(false),
            _ => None,
        }
    }

    /// `PING` (`check`, `/healthz`).
    pub async fn ping(&self) -> Result<(), Unavailable> {
        self.read(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await?;
        if self.inner.status.load(Ordering::Relaxed) == REFUSED {
            return Err(Unavailable("it answers but refuses writes".into()));
        }
        Ok(())
    }

    /// Checks both windows of `channel` for a transaction of `rcpts` recipients and
    /// records it in both, or says how long to wait.
    pub async fn reserve(
        &self,
        channel: &str,
        limits: &Limits,
        rcpts: u64,
    ) -> Result<Reserved, Unavailable> {
        let (mut granted, refused) = self.reserve_many(channel, limits, &[rcpts]).await?;
        Ok(match (granted.pop(), refused) {
            (Some(token), _) => Reserved::Yes(token),
            (None, Some(refused)) => refused,
            (None, None) => Reserved::Never,
        })
    }

    /// [`RedisState::reserve`] for several transactions in one round trip, in order,
    /// until one does not fit: the tokens of those reserved, and what refused the next
    /// ([`Reserved::Wait`] or [`Reserved::Never`]), if any.
    pub async fn reserve_many(
        &self,
        channel: &str,
        limits: &Limits,
        rcpts: &[u64],
    ) -> Result<(Vec<String>, Option<Reserved>), Unavailable> {
        let (count, per) = match limits.rate {
            Some(rate) => (to_i64(rate.count), to_i64(rate.per.as_millis())),
            None => (-1, 0),
        };
        let per_day = limits.recipients_per_day.map_or(-1, to_i64);
        let uniq = format!("{:016x}-", rand::random::<u64>());
        let keys = [
            self.key("rate", channel),
            self.key("day", channel),
            self.key("daysum", channel),
        ];
        let script = &self.inner.reserve;
        let answer: Vec<String> = self
            .call(|mut c| async move {
                let mut invocation = script.key(&keys[0]);
                invocation
                    .key(&keys[1])
                    .key(&keys[2])
                    .arg(count)
                    .arg(per)
                    .arg(per_day)
                    .arg(uniq);
                for n in rcpts {
                    invocation.arg(*n);
                }
                invocation.invoke_async(&mut c).await
            })
            .await?;
        let (status, wait) = (
            answer.first().map(String::as_str),
            answer.get(1).map(String::as_str),
        );
        let granted = answer.iter().skip(2).cloned().collect();
        let refused = match status {
            Some("0") => None,
            // Redis's answer: a wait is at least a ms and at most a day.
            Some("1") => Some(Reserved::Wait(
                wait.and_then(|w| w.parse().ok())
                    .unwrap_or(1000)
                    .clamp(1, 86_400_000),
            )),
            _ => Some(Reserved::Never),
        };
        Ok((granted, refused))
    }

    /// Gives back a reservation the upstream never took (relay mode).
    pub async fn release(&self, channel: &str, token: &str) -> Result<(), Unavailable> {
        let keys = [
            self.key("rate", channel),
            self.key("day", channel),
            self.key("daysum", channel),
        ];
        let script = &self.inner.release;
        self.call(|mut c| async move {
            script
                .key(&keys[0])
                .key(&keys[1])
                .key(&keys[2])
                .arg(token)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// The counted sends of `channel` still in a window, oldest first (unix ms, recipients).
    pub async fn events(&self, channel: &str) -> Result<Vec<(u64, u64)>, Unavailable> {
        let keys = [self.key("rate", channel), self.key("day", channel)];
        let (rate, day): (Vec<String>, Vec<String>) = self
            .read(|mut c| async move {
                redis::pipe()
                    .zrange(&keys[0], 0, -1)
                    .zrange(&keys[1], 0, -1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut members: Vec<String> = rate.into_iter().chain(day).collect();
        members.sort_unstable();
        members.dedup();
        let mut events: Vec<(u64, u64)> = members.iter().filter_map(|m| parse_member(m)).collect();
        events.sort_unstable();
        Ok(events)
    }

    /// Adds `events` (unix ms, recipients) to `channel`'s windows (`state import`):
    /// those still inside a window on Redis's clock and not already counted there. Never
    /// removes a send, so an import while other hosts send cannot give them a second quota.
    pub async fn add_events(
        &self,
        channel: &str,
        limits: &Limits,
        events: &[(u64, u64)],
    ) -> Result<(), Unavailable> {
        let keys = [
            self.key("rate", channel),
            self.key("day", channel),
            self.key("daysum", channel),
        ];
        let per = limits.rate.map_or(-1, |r| to_i64(r.per.as_millis()));
        let per_day = i64::from(limits.recipients_per_day.is_some());
        let script = &self.inner.import;
        self.call(|mut c| async move {
            let mut invocation = script.key(&keys[0]);
            invocation.key(&keys[1]).key(&keys[2]).arg(per).arg(per_day);
            for (at, n) in events {
                invocation.arg(*at).arg(*n);
            }
            invocation.invoke_async::<i64>(&mut c).await
        })
        .await
        .map(drop)
    }

    /// The shared health of `channel` and its retry generation.
    pub async fn health(&self, channel: &str) -> Result<(Health, u64), Unavailable> {
        let keys = [self.key("health", channel), self.key("retry", channel)];
        let (health, retry): (Option<String>, Option<u64>) = self
            .read(|mut c| async move { c.mget(&keys[..]).await })
            .await?;
        let health = health
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or_default();
        Ok((health, retry.unwrap_or(0)))
    }

    /// Sets the shared health of `channel`.
    pub async fn set_health(&self, channel: &str, health: &Health) -> Result<(), Unavailable> {
        let key = self.key("health", channel);
        let json = serde_json::to_string(health).unwrap_or_default();
        self.call(|mut c| async move { c.set::<_, _, ()>(&key, json).await })
            .await
    }

    /// `queue retry`: the channel is ok again and every host makes its mail due now.
    pub async fn retry(&self, channel: &str) -> Result<(), Unavailable> {
        let keys = [self.key("health", channel), self.key("retry", channel)];
        let ok = serde_json::to_string(&Health::Ok).unwrap_or_default();
        self.call(|mut c| async move {
            redis::pipe()
                .atomic()
                .set(&keys[0], ok)
                .ignore()
                .incr(&keys[1], 1)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The shared access token of `channel` and how many ms it still lasts.
    pub async fn access_token(&self, channel: &str) -> Result<Option<(Secret, u64)>, Unavailable> {
        let key = self.key("token", channel);
        let (token, ttl): (Option<String>, i64) = self
            .read(
                |mut c| async move { redis::pipe().get(&key).pttl(&key).query_async(&mut c).await },
            )
            .await?;
        Ok(token
            .filter(|_| ttl > 0)
            .map(|t| (Secret::new(t), ttl as u64)))
    }

    /// Shares a new access token of `channel` for `lasts_ms`.
    pub async fn set_access_token(
        &self,
        channel: &str,
        token: &Secret,
        lasts_ms: u64,
    ) -> Result<(), Unavailable> {
        let key = self.key("token", channel);
        let value = token.expose().to_owned();
        self.call(|mut c| async move { c.pset_ex::<_, _, ()>(&key, value, lasts_ms.max(1)).await })
            .await
    }

    /// Forgets the shared access token if it is still `stale` (the upstream refused it).
    pub async fn drop_access_token(
        &self,
        channel: &str,
        stale: &Secret,
    ) -> Result<(), Unavailable> {
        let key = self.key("token", channel);
        let script = &self.inner.unlock;
        let stale = stale.expose().to_owned();
        self.call(|mut c| async move {
            script
                .key(&key)
                .arg(stale)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// Takes the refresh lock of `channel` for `hold` (`SET NX PX`); the value to give
    /// it back with, or `None` when another host holds it.
    pub async fn lock_refresh(
        &self,
        channel: &str,
        hold: Duration,
    ) -> Result<Option<String>, Unavailable> {
        let key = self.key("token-lock", channel);
        let value = format!("{:016x}", rand::random::<u64>());
        let set = value.clone();
        let taken: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(set)
                    .arg("NX")
                    .arg("PX")
                    .arg(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(taken.map(|_| value))
    }

    /// Gives back the refresh lock taken with `value`.
    pub async fn unlock_refresh(&self, channel: &str, value: &str) -> Result<(), Unavailable> {
        let key = self.key("token-lock", channel);
        let script = &self.inner.unlock;
        self.call(|mut c| async move {
            script
                .key(&key)
                .arg(value)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// A stored refresh token.
    pub async fn refresh_token(&self, channel: &str) -> Result<Option<Secret>, Unavailable> {
        let key = self.key("refresh", channel);
        let token: Option<String> = self.read(|mut c| async move { c.get(&key).await }).await?;
        Ok(token.filter(|t| !t.is_empty()).map(Secret::new))
    }

    /// Stores a refresh token (no expiry: it is the channel's credential).
    pub async fn set_refresh_token(
        &self,
        channel: &str,
        token: &Secret,
    ) -> Result<(), Unavailable> {
        let key = self.key("refresh", channel);
        let value = token.expose().to_owned();
        self.call(|mut c| async move { c.set::<_, _, ()>(&key, value).await })
            .await
    }
}

/// `"<ms>:<n>:<uniq>"` → (ms, n).
fn parse_member(member: &str) -> Option<(u64, u64)> {
    let mut parts = member.splitn(3, ':');
    let at = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    Some((at, n))
}

/// The refresh tokens of the shared backend.
#[derive(Debug, Clone)]
pub struct RedisTokenStore(pub RedisState);

impl super::tokens::TokenStore for RedisTokenStore {
    fn load<'a>(&'a self, channel: &'a str) -> super::tokens::StoreFuture<'a, Option<Secret>> {
        Box::pin(async move {
            self.0
                .refresh_token(channel)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn save<'a>(
        &'a self,
        channel: &'a str,
        refresh_token: &'a Secret,
    ) -> super::tokens::StoreFuture<'a, ()> {
        Box::pin(async move {
            self.0
                .set_refresh_token(channel, refresh_token)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn location(&self, channel: &str) -> String {
        format!(
            "Redis {} key {}",
            self.0.display(),
            self.0.key("refresh", channel)
        )
    }
}

/// A count or a length in ms from the config, for a Lua script: a value past `i64`
/// (the config allows it) is the largest, never a negative one (which means "none").
fn to_i64(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}
