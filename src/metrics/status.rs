//! The facts of the status page (SPEC §8): what the page ([`super::page`]) and
//! `/status.json` show, gathered without slowing delivery.
//!
//! Where each fact comes from, and what it costs:
//!
//! - the channels' configuration: the config in force, handed over at start and at each
//!   reload ([`configure`]);
//! - health (ok / held for a quota / broken, with the reason) and the rate and
//!   recipients/day windows: the state backend, read as `check` and `queue list` read it
//!   (so the three agree), at most once per [`BACKEND_TTL`] whoever asks (one file pair
//!   per channel with the local backend, two Redis reads per channel with Redis);
//! - what only the running process knows: each channel's queue (messages, next attempt,
//!   oldest message), pushed by its worker as it schedules ([`publish_queue`], counts it
//!   already keeps, so a spool of 100,000 messages is never scanned for the page), whether
//!   mail goes over the fallback, the state relay mode saw last, the OAuth token's expiry
//!   (never the token), and the last [`RING`] delivery outcomes ([`record`]);
//! - the `failed/` count: one directory listing (names only), at most once per
//!   [`FAILED_TTL`].
//!
//! Everything here is plain data for the page; escaping is the page's (maud's) job.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ChannelState;
use crate::config::oauth::Grant;
use crate::config::{Channel, ChannelKind, Config, DeliveryMode, Limits, StateBackend};
use crate::ratelimit::DAY_MS;
use crate::state::{Backend, Health, format_time};
use crate::text::escape_controls;

/// Delivery outcomes kept in memory, newest first.
pub const RING: usize = 100;
/// How long the state backend's answer serves the page (several viewers, each page
/// refreshing every 10 s, cost one read of the backend).
pub const BACKEND_TTL: Duration = Duration::from_secs(3);
/// How long a count of `failed/` serves.
pub const FAILED_TTL: Duration = Duration::from_secs(5);
/// Longest the backend may take to answer for every channel (a hung disk or an
/// unreachable Redis shows as such rather than hanging the page).
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(3);
/// A worker's oldest message is looked for at most this often (it walks the channel's
/// queue in memory).
pub const OLDEST_EVERY: Duration = Duration::from_secs(2);
/// Longest reply or reason kept, in characters (an upstream may say a lot).
const MAX_TEXT: usize = 500;

/// What one delivery came to (one upstream transaction, queue or relay mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// When it ended (unix ms).
    pub at_ms: u64,
    /// Queue id (relay mode: the message id of the session).
    pub id: String,
    /// Envelope sender as the client gave it.
    pub sender: String,
    /// Recipients in the transaction.
    pub recipients: usize,
    /// The channel that answered.
    pub channel: String,
    /// `delivered`, `deferred` or `failed`.
    pub outcome: &'static str,
    /// The upstream's reply, or the error as a reply.
    pub reply: String,
}

/// What a channel's worker knows of its queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueFacts {
    /// Messages queued for the channel, attempts in flight included.
    pub messages: usize,
    /// The earliest due attempt (unix ms).
    pub next_attempt_ms: Option<u64>,
    /// When the oldest of them was accepted (unix ms).
    pub oldest_ms: Option<u64>,
}

/// What the running process knows of a channel beyond the backend.
#[derive(Debug, Clone, Default)]
struct Live {
    /// The state last reported to the metrics (`mailgate_channel_state`).
    state: Option<ChannelState>,
    /// Why relay mode saw it broken or held (the upstream's answer).
    reason: Option<String>,
    /// Its mail goes over its fallback now.
    fallback_in_use: bool,
    /// Queue mode: the worker's view.
    queue: Option<QueueFacts>,
    /// Queue mode: the health the worker goes by (fresher than the backend's cached
    /// answer, and the same value: the worker writes it there).
    health: Option<Health>,
    /// When `queue.oldest_ms` was last looked for.
    oldest_looked: Option<Instant>,
    /// The cached OAuth access token's expiry (unix ms).
    token_expires_ms: Option<u64>,
}

/// What the backend says of one channel.
#[derive(Debug, Clone, Default)]
struct Stored {
    health: Option<Health>,
    /// Counted sends still in a window, oldest first.
    events: Vec<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct BackendView {
    taken: Instant,
    /// `Err`: the backend did not answer (why).
    channels: Result<HashMap<String, Stored>, String>,
}

/// The process's status board.
pub struct Board {
    started: Instant,
    started_ms: u64,
    config: Mutex<Option<Arc<Config>>>,
    live: Mutex<HashMap<String, Live>>,
    ring: Mutex<VecDeque<Delivery>>,
    backend: tokio::sync::Mutex<Option<BackendView>>,
    failed: tokio::sync::Mutex<Option<(Instant, Result<usize, String>)>>,
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Board {
    /// An empty board, started now.
    pub fn new() -> Self {
        Board {
            started: Instant::now(),
            started_ms: now_ms(),
            config: Mutex::new(None),
            live: Mutex::default(),
            ring: Mutex::new(VecDeque::with_capacity(RING)),
            backend: tokio::sync::Mutex::new(None),
            failed: tokio::sync::Mutex::new(None),
        }
    }

    /// The config in force (at start and after each reload). What relay mode knew of
    /// the channels ends with it, as relay's hand-overs to fallbacks do.
    pub fn configure(&self, config: Arc<Config>) {
        let names: Vec<&str> = config.channels.iter().map(|c| c.name.as_str()).collect();
        {
            let mut live = lock(&self.live);
            live.retain(|name, _| names.contains(&name.as_str()));
            if config.server.delivery == DeliveryMode::Relay {
                for l in live.values_mut() {
                    l.fallback_in_use = false;
                    l.reason = None;
                    l.state = None;
                }
            }
        }
        *lock(&self.config) = Some(config);
    }

    /// Records one delivery outcome; the oldest beyond [`RING`] goes.
    pub fn record(&self, mut delivery: Delivery) {
        delivery.reply = clip(&escape_controls(&delivery.reply));
        delivery.sender = clip(&escape_controls(&delivery.sender));
        let mut ring = lock(&self.ring);
        if ring.len() >= RING {
            ring.pop_back();
        }
        ring.push_front(delivery);
    }

    /// The state a channel was reported in (both modes, as for the metrics).
    pub fn note_state(&self, channel: &str, state: ChannelState) {
        let mut live = lock(&self.live);
        let l = live.entry(channel.to_string()).or_default();
        // A reason belongs to the state it was given with.
        if l.state != Some(state) {
            l.reason = None;
        }
        l.state = Some(state);
    }

    /// Relay mode: why the channel answered as broken or held.
    pub fn note_reason(&self, channel: &str, reason: &str) {
        lock(&self.live)
            .entry(channel.to_string())
            .or_default()
            .reason = Some(clip(reason));
    }

    /// Whether the channel's mail goes over its fallback now.
    pub fn note_fallback(&self, channel: &str, in_use: bool) {
        lock(&self.live)
            .entry(channel.to_string())
            .or_default()
            .fallback_in_use = in_use;
    }

    /// The OAuth access token of `channel` now expires at `expires_ms`.
    pub fn note_token(&self, channel: &str, expires_ms: u64) {
        lock(&self.live)
            .entry(channel.to_string())
            .or_default()
            .token_expires_ms = Some(expires_ms);
    }

    /// Queue mode: a worker's view of its channel. `oldest` walks the worker's queue: it
    /// is called at most every [`OLDEST_EVERY`], or when the queue was empty before.
    pub fn publish_queue(
        &self,
        channel: &str,
        health: &Health,
        messages: usize,
        next_attempt_ms: Option<u64>,
        fallback_in_use: bool,
        oldest: impl FnOnce() -> Option<u64>,
    ) {
        let mut live = lock(&self.live);
        let l = live.entry(channel.to_string()).or_default();
        l.fallback_in_use = fallback_in_use;
        if l.health.as_ref() != Some(health) {
            l.health = Some(health.clone());
        }
        let before = l.queue.unwrap_or_default();
        let stale = l.oldest_looked.is_none_or(|t| t.elapsed() >= OLDEST_EVERY);
        let oldest_ms = if messages == 0 {
            None
        } else if stale || before.messages == 0 {
            l.oldest_looked = Some(Instant::now());
            oldest()
        } else {
            before.oldest_ms
        };
        l.queue = Some(QueueFacts {
            messages,
            next_attempt_ms,
            oldest_ms,
        });
    }

    /// Every fact of the page, gathered now (the backend's and `failed/`'s answers may
    /// be a few seconds old: [`BACKEND_TTL`], [`FAILED_TTL`]).
    pub async fn status(&self) -> Status {
        let config = lock(&self.config).clone();
        let now = now_ms();
        let Some(config) = config else {
            return Status::empty(self.started_ms, now);
        };
        let backend = self.backend_view(&config).await;
        let failed = match config.server.delivery {
            DeliveryMode::Queue => Some(self.failed_count(&config.server.spool_dir).await),
            DeliveryMode::Relay => None,
        };
        let live = lock(&self.live).clone();
        let ring: Vec<Delivery> = lock(&self.ring).iter().cloned().collect();
        let uptime = self.started.elapsed().as_secs();
        assemble(
            &config,
            &backend,
            failed,
            &live,
            ring,
            self.started_ms,
            uptime,
            now,
        )
    }

    async fn backend_view(&self, config: &Arc<Config>) -> BackendView {
        let mut cached = self.backend.lock().await;
        if let Some(view) = cached.as_ref()
            && view.taken.elapsed() < BACKEND_TTL
        {
            return view.clone();
        }
        let channels = match tokio::time::timeout(BACKEND_TIMEOUT, read_backend(config)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {}s", BACKEND_TIMEOUT.as_secs())),
        };
        let view = BackendView {
            taken: Instant::now(),
            channels,
        };
        *cached = Some(view.clone());
        view
    }

    async fn failed_count(&self, spool_dir: &Path) -> Result<usize, String> {
        let mut cached = self.failed.lock().await;
        if let Some((taken, count)) = cached.as_ref()
            && taken.elapsed() < FAILED_TTL
        {
            return count.clone();
        }
        let dir = spool_dir.join("failed");
        let count = tokio::task::spawn_blocking(move || count_failed(&dir));
        let count = match tokio::time::timeout(BACKEND_TIMEOUT, count).await {
            Ok(Ok(count)) => count,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the spool did not answer in time".to_string()),
        };
        *cached = Some((Instant::now(), count.clone()));
        count
    }
}

/// Messages in `failed/`: one state file each (names only are listed).
fn count_failed(dir: &Path) -> Result<usize, String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Health and windows of every channel, from the configured backend.
async fn read_backend(config: &Arc<Config>) -> Result<HashMap<String, Stored>, String> {
    let now = now_ms();
    match Backend::of(config)? {
        Backend::Local(local) => {
            let config = config.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut out = HashMap::new();
                for ch in &config.channels {
                    let events = if crate::state::has_windows(&ch.limits) {
                        local
                            .peek_counters(&ch.name, &ch.limits, now)
                            .map(|l| l.snapshot())
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let health = Some(local.read_health(&ch.name));
                    out.insert(ch.name.clone(), Stored { health, events });
                }
                out
            });
            read.await.map_err(|e| e.to_string())
        }
        redis @ Backend::Redis(_) => {
            let mut out = HashMap::new();
            for ch in &config.channels {
                // One refusal says the backend is away: the others would wait as long.
                let health = redis.read_health(&ch.name).await?;
                let events = if crate::state::has_windows(&ch.limits) {
                    redis.events(&ch.name, &ch.limits, now).await?
                } else {
                    Vec::new()
                };
                out.insert(
                    ch.name.clone(),
                    Stored {
                        health: Some(health),
                        events,
                    },
                );
            }
            Ok(out)
        }
    }
}

/// Everything the page shows; `/status.json` is this, serialized.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// mailgate's version.
    pub version: &'static str,
    /// When the process started (`2026-11-03 14:05:09Z`).
    pub started: String,
    /// Seconds since then.
    pub uptime_seconds: u64,
    /// When these facts were gathered.
    pub now: String,
    /// `queue` or `relay`.
    pub delivery: &'static str,
    /// The state backend.
    pub state_backend: BackendStatus,
    /// Every configured channel, by name.
    pub channels: Vec<ChannelStatus>,
    /// Queue mode: the spool; relay mode: `None`.
    pub queue: Option<QueueStatus>,
    /// The last [`RING`] delivery outcomes, newest first.
    pub recent: Vec<RecentDelivery>,
}

/// `[state]` and whether it answers.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// `local` or `redis`.
    pub kind: &'static str,
    /// Where: the state folder, or the Redis URL without its password.
    pub location: String,
    /// It answered the last read.
    pub reachable: bool,
    /// Why not.
    pub error: Option<String>,
}

/// One channel.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelStatus {
    /// `[channels.NAME]`.
    pub name: String,
    /// `smtp`, `graph` or `file`.
    pub kind: &'static str,
    /// The preset it was built from.
    pub preset: Option<String>,
    /// Where it sends: `host:port`, the Graph mailbox, or the folder.
    pub target: String,
    /// Who may send over it (`senders` and `domains`).
    pub scope: Vec<String>,
    /// `ok`, `limited`, `broken`, or `unknown` (the backend did not answer).
    pub state: &'static str,
    /// Limited: until when (unix ms), when known.
    pub until_ms: Option<u64>,
    /// Limited: until when, as a time.
    pub until: Option<String>,
    /// Broken: since when.
    pub since: Option<String>,
    /// Why it is not ok.
    pub reason: Option<String>,
    /// What the operator can do about it.
    pub action: Option<String>,
    /// `fallback = "…"`.
    pub fallback: Option<String>,
    /// Its mail goes over that fallback now.
    pub fallback_in_use: bool,
    /// Messages counted in the rate window, against the limit.
    pub rate: Option<Usage>,
    /// Recipients counted in the rolling 24 hours, against `recipients_per_day`.
    pub recipients_per_day: Option<Usage>,
    /// OAuth channels: the cached access token's expiry (`None`: no token fetched yet).
    pub oauth: Option<TokenStatus>,
    /// Queue mode: its queue.
    pub queue: Option<ChannelQueue>,
}

/// A window's use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Counted in the window now.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// The window's length in seconds.
    pub window_seconds: u64,
}

/// An OAuth channel's token, never the token itself.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStatus {
    /// `refresh_token` or `client_credentials`.
    pub grant: &'static str,
    /// When the cached access token expires, if one was fetched.
    pub expires: Option<String>,
    /// Seconds from now (0 once expired).
    pub expires_in_seconds: Option<u64>,
}

/// One channel's queue.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelQueue {
    /// Messages queued, attempts in flight included.
    pub messages: usize,
    /// Age of the oldest, in seconds.
    pub oldest_age_seconds: Option<u64>,
    /// The next attempt.
    pub next_attempt: Option<String>,
}

/// The spool as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    /// Messages queued for every configured channel.
    pub messages: usize,
    /// Age of the oldest, in seconds.
    pub oldest_age_seconds: Option<u64>,
    /// Messages in `failed/` (`None`: it could not be read).
    pub failed: Option<usize>,
    /// Why `failed/` could not be read.
    pub failed_error: Option<String>,
}

/// One row of the last outcomes.
#[derive(Debug, Clone, Serialize)]
pub struct RecentDelivery {
    /// When (`2026-11-03 14:05:09Z`).
    pub time: String,
    /// Queue id.
    pub id: String,
    /// Envelope sender.
    pub sender: String,
    /// Recipient count.
    pub recipients: usize,
    /// Channel.
    pub channel: String,
    /// `delivered`, `deferred` or `failed`.
    pub outcome: &'static str,
    /// The upstream's reply.
    pub reply: String,
}

impl Status {
    fn empty(started_ms: u64, now: u64) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION"),
            started: format_time(started_ms),
            uptime_seconds: now.saturating_sub(started_ms) / 1000,
            now: format_time(now),
            delivery: "queue",
            state_backend: BackendStatus {
                kind: "local",
                location: String::new(),
                reachable: false,
                error: Some("not running yet".to_string()),
            },
            channels: Vec::new(),
            queue: None,
            recent: Vec::new(),
        }
    }

    /// The JSON of `/status.json`.
    pub fn to_json(&self) -> String {
        // Plain data: serializing cannot fail; an empty object says so if it ever did.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Pure: the page's facts from what each source said.
#[allow(clippy::too_many_arguments)]
fn assemble(
    config: &Config,
    backend: &BackendView,
    failed: Option<Result<usize, String>>,
    live: &HashMap<String, Live>,
    ring: Vec<Delivery>,
    started_ms: u64,
    uptime_seconds: u64,
    now: u64,
) -> Status {
    let queue_mode = config.server.delivery == DeliveryMode::Queue;
    let (stored, backend_error) = match &backend.channels {
        Ok(map) => (Some(map), None),
        Err(e) => (None, Some(e.clone())),
    };
    let channels: Vec<ChannelStatus> = config
        .channels
        .iter()
        .map(|ch| {
            let none = Live::default();
            let l = live.get(&ch.name).unwrap_or(&none);
            let stored = stored.map(|m| m.get(&ch.name).cloned().unwrap_or_default());
            channel_status(config, ch, stored.as_ref(), l, queue_mode, now)
        })
        .collect();
    let queue = queue_mode.then(|| {
        let messages = channels
            .iter()
            .filter_map(|c| c.queue.as_ref())
            .map(|q| q.messages)
            .sum();
        let oldest_age_seconds = channels
            .iter()
            .filter_map(|c| c.queue.as_ref()?.oldest_age_seconds)
            .max();
        let (failed, failed_error) = match failed {
            Some(Ok(n)) => (Some(n), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        QueueStatus {
            messages,
            oldest_age_seconds,
            failed,
            failed_error,
        }
    });
    let (kind, location) = match &config.state {
        StateBackend::Local => (
            "local",
            config.server.spool_dir.join("state").display().to_string(),
        ),
        StateBackend::Redis(settings) => ("redis", settings.display.clone()),
    };
    Status {
        version: env!("CARGO_PKG_VERSION"),
        started: format_time(started_ms),
        uptime_seconds,
        now: format_time(now),
        delivery: if queue_mode { "queue" } else { "relay" },
        state_backend: BackendStatus {
            kind,
            location,
            reachable: backend_error.is_none(),
            error: backend_error,
        },
        channels,
        queue,
        recent: ring
            .into_iter()
            .map(|d| RecentDelivery {
                time: format_time(d.at_ms),
                id: d.id,
                sender: d.sender,
                recipients: d.recipients,
                channel: d.channel,
                outcome: d.outcome,
                reply: d.reply,
            })
            .collect(),
    }
}

/// What the page says of one channel. `stored`: `None` when the backend did not answer.
fn channel_status(
    config: &Config,
    ch: &Channel,
    stored: Option<&Stored>,
    live: &Live,
    queue_mode: bool,
    now: u64,
) -> ChannelStatus {
    let events = stored.map(|s| s.events.as_slice()).unwrap_or_default();
    let (rate, recipients_per_day) = usage(&ch.limits, events, now);
    let verdict = state_of(ch, stored, live, rate, recipients_per_day, now);
    let action = what_to_do(ch, &verdict, queue_mode);
    let (kind, target) = match &ch.kind {
        ChannelKind::Smtp(t) => ("smtp", format!("{}:{}", t.host, t.port)),
        ChannelKind::Graph(g) => ("graph", g.mailbox.clone()),
        ChannelKind::File { dir } => ("file", dir.display().to_string()),
    };
    let oauth = ch.kind.oauth().map(|o| TokenStatus {
        grant: match o.grant {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        },
        expires: live.token_expires_ms.map(format_time),
        expires_in_seconds: live
            .token_expires_ms
            .map(|at| at.saturating_sub(now) / 1000),
    });
    let queue = queue_mode.then(|| {
        let q = live.queue.unwrap_or_default();
        ChannelQueue {
            messages: q.messages,
            oldest_age_seconds: q.oldest_ms.map(|at| now.saturating_sub(at) / 1000),
            next_attempt: q.next_attempt_ms.map(format_time),
        }
    });
    ChannelStatus {
        name: ch.name.clone(),
        kind,
        preset: ch.preset.clone(),
        target,
        scope: ch.scope.iter().map(|p| p.text()).collect(),
        state: verdict.state,
        until_ms: verdict.until_ms,
        until: verdict.until_ms.map(format_time),
        since: verdict.since_ms.map(format_time),
        reason: verdict.reason.map(|r| clip(&r)),
        action,
        fallback: ch.fallback.map(|f| config.channels[f].name.clone()),
        fallback_in_use: live.fallback_in_use,
        rate,
        recipients_per_day,
        oauth,
        queue,
    }
}

/// A channel's state as the page says it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    state: &'static str,
    until_ms: Option<u64>,
    since_ms: Option<u64>,
    reason: Option<String>,
    /// Held by the provider (a quota reply) rather than by its own limits.
    provider: bool,
}

impl Verdict {
    fn ok() -> Self {
        Verdict {
            state: "ok",
            until_ms: None,
            since_ms: None,
            reason: None,
            provider: false,
        }
    }
}

/// Pure: the state, from the backend's health (as `check` reads it), the windows, and
/// what relay mode saw last.
fn state_of(
    ch: &Channel,
    stored: Option<&Stored>,
    live: &Live,
    rate: Option<Usage>,
    day: Option<Usage>,
    now: u64,
) -> Verdict {
    let Some(stored) = stored else {
        return Verdict {
            state: "unknown",
            reason: Some("the state backend did not answer".to_string()),
            ..Verdict::ok()
        };
    };
    match live.health.as_ref().or(stored.health.as_ref()) {
        Some(Health::Broken {
            since_ms, reason, ..
        }) => {
            return Verdict {
                state: "broken",
                since_ms: Some(*since_ms),
                reason: Some(reason.clone()),
                ..Verdict::ok()
            };
        }
        Some(Health::Held { until_ms, reason }) if *until_ms > now => {
            return Verdict {
                state: "limited",
                until_ms: Some(*until_ms),
                reason: Some(format!("provider quota: {reason}")),
                provider: true,
                ..Verdict::ok()
            };
        }
        _ => {}
    }
    // Relay mode keeps no health: the last answer says it.
    match (live.state, &live.reason) {
        (Some(ChannelState::Broken), reason) => {
            return Verdict {
                state: "broken",
                reason: Some(
                    reason
                        .clone()
                        .unwrap_or_else(|| "the upstream refused the credentials".into()),
                ),
                ..Verdict::ok()
            };
        }
        (Some(ChannelState::Limited), Some(reason)) => {
            return Verdict {
                state: "limited",
                reason: Some(format!("provider quota: {reason}")),
                provider: true,
                ..Verdict::ok()
            };
        }
        _ => {}
    }
    if let Some(limiter) = crate::state::has_windows(&ch.limits).then(|| {
        crate::ratelimit::ChannelLimiter::restore(&ch.limits, stored.events.iter().copied(), now)
    }) && let Err(at) = limiter.check(now, 1)
    {
        let full = [("rate", rate), ("recipients/day", day)]
            .into_iter()
            .filter_map(|(what, u)| u.filter(|u| u.used >= u.limit).map(|u| (what, u)))
            .map(|(what, u)| format!("{what} {} of {} used", u.used, u.limit))
            .collect::<Vec<_>>();
        let reason = if full.is_empty() {
            "its rate or recipients/day window is full".to_string()
        } else {
            format!("its own limits: {}", full.join(", "))
        };
        return Verdict {
            state: "limited",
            until_ms: (at != u64::MAX).then_some(at),
            reason: Some(reason),
            ..Verdict::ok()
        };
    }
    Verdict::ok()
}

/// Pure: the rate window's and the rolling day's use (events: (unix ms, recipients)).
fn usage(limits: &Limits, events: &[(u64, u64)], now: u64) -> (Option<Usage>, Option<Usage>) {
    let rate = limits.rate.map(|r| {
        let per = u64::try_from(r.per.as_millis()).unwrap_or(u64::MAX);
        let used = events
            .iter()
            .filter(|(t, _)| *t <= now && t.saturating_add(per) > now)
            .count() as u64;
        Usage {
            used,
            limit: r.count,
            window_seconds: per / 1000,
        }
    });
    let day = limits.recipients_per_day.map(|limit| Usage {
        used: events
            .iter()
            .filter(|(t, _)| *t <= now && t.saturating_add(DAY_MS) > now)
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n)),
        limit,
        window_seconds: DAY_MS / 1000,
    });
    (rate, day)
}

/// Pure: what the operator can do about a channel that is not ok.
fn what_to_do(ch: &Channel, verdict: &Verdict, queue_mode: bool) -> Option<String> {
    let resume = if queue_mode {
        "then run `mailgate queue retry --all` (or reload with SIGHUP)"
    } else {
        "the next message tries again"
    };
    match verdict.state {
        "broken" => {
            let reason = verdict.reason.as_deref().unwrap_or("");
            let method_refused = ["5.7.139", "5.7.30"].iter().any(|c| reason.contains(c));
            let oauth = ch.kind.oauth();
            Some(if method_refused && oauth.is_none() && ch.fallback.is_some() {
                format!(
                    "its mail goes over its fallback meanwhile; to send over {} again, turn SMTP AUTH back on for the mailbox or switch the channel to OAuth (auth = \"xoauth2\"), {resume}",
                    ch.name
                )
            } else if method_refused && oauth.is_none() {
                format!(
                    "the provider no longer accepts a password here: switch channel {} to OAuth (auth = \"xoauth2\") or give it a graph channel as fallback, then reload (SIGHUP)",
                    ch.name
                )
            } else {
                match oauth.map(|o| o.grant) {
                    Some(Grant::RefreshToken) => format!(
                        "run `mailgate oauth authorize {}`, {resume}",
                        ch.name
                    ),
                    Some(Grant::ClientCredentials) => format!(
                        "check the app's client secret and its permission for this mailbox in the tenant, {resume}"
                    ),
                    None => format!(
                        "fix the channel's password (password_env / password_file) and reload (SIGHUP); if it was right, {resume}"
                    ),
                }
            })
        }
        "limited" if verdict.provider => Some(match verdict.until_ms {
            Some(at) => format!(
                "nothing: its mail waits and goes out from {} on",
                format_time(at)
            ),
            None => "nothing: the next message tries again".to_string(),
        }),
        "limited" => Some(
            "nothing: its mail waits for its own limits (raise `rate` or `recipients_per_day` only if the provider allows more)"
                .to_string(),
        ),
        "unknown" => Some(
            "check that the state backend answers (Redis running, the network, its password); limited channels wait meanwhile"
                .to_string(),
        ),
        _ => None,
    }
}

/// When a queue id was made: ids start with the hex unix seconds and five hex digits
/// of microseconds ([`crate::message::new_id`]).
pub fn id_time_ms(id: &str) -> Option<u64> {
    let stamp = id.split('-').next()?;
    if stamp.len() <= 5 || !stamp.is_ascii() {
        return None;
    }
    let (secs, micros) = stamp.split_at(stamp.len() - 5);
    let secs = u64::from_str_radix(secs, 16).ok()?;
    let micros = u64::from_str_radix(micros, 16).ok()?;
    secs.checked_mul(1000)?.checked_add(micros / 1000)
}

/// Whether `peer` may use the metrics listener (SPEC §9): loopback always, else only
/// from `allow_networks`.
pub fn allowed(peer: IpAddr, allow_networks: &[ipnet::IpNet]) -> bool {
    // An IPv4 client of a dual-stack socket arrives as ::ffff:a.b.c.d.
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    peer.is_loopback() || allow_networks.iter().any(|net| net.contains(&peer))
}

fn clip(text: &str) -> String {
    if text.chars().count() <= MAX_TEXT {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(MAX_TEXT - 1).collect();
        out.push('…');
        out
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

static BOARD: LazyLock<Board> = LazyLock::new(Board::new);

/// The process's board.
pub fn board() -> &'static Board {
    &BOARD
}

/// [`Board::configure`] on the process's board.
pub fn configure(config: &Arc<Config>) {
    board().configure(config.clone());
}

/// [`Board::record`] on the process's board: one delivery outcome.
pub fn record(
    id: &str,
    sender: &str,
    recipients: usize,
    channel: &str,
    outcome: super::Outcome,
    reply: &str,
) {
    board().record(Delivery {
        at_ms: now_ms(),
        id: id.to_string(),
        sender: sender.to_string(),
        recipients,
        channel: channel.to_string(),
        outcome: outcome.label(),
        reply: reply.to_string(),
    });
}

/// [`Board::publish_queue`] on the process's board.
pub fn publish_queue(
    channel: &str,
    health: &Health,
    messages: usize,
    next_attempt_ms: Option<u64>,
    fallback_in_use: bool,
    oldest: impl FnOnce() -> Option<u64>,
) {
    board().publish_queue(
        channel,
        health,
        messages,
        next_attempt_ms,
        fallback_in_use,
        oldest,
    );
}

/// [`Board::note_token`] on the process's board: the token just fetched lasts `lasts`.
pub fn token_expires_in(channel: &str, lasts: Duration) {
    let lasts = u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX);
    board().note_token(channel, now_ms().saturating_add(lasts));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An office365 channel on OAuth with a graph fallback, an SMTP relay on a password,
    /// and a file channel at 2/min and 100 recipients/day; queue mode.
    pub(crate) const CONFIG: &str = r#"
[server]
spool_dir = "spool"
[channels.alice]
preset = "office365"
username = "alice@example.com"
auth = "xoauth2"
oauth = { provider = "microsoft", tenant = "example.com", client_id = "cid", refresh_token = "SECRET-REFRESH-TOKEN" }
senders = ["alice@example.com"]
fallback = "alice-graph"
[channels.alice-graph]
kind = "graph"
mailbox = "alice@example.com"
oauth = { provider = "microsoft", grant = "client_credentials", tenant = "example.com", client_id = "cid", client_secret = "SECRET-APP" }
[channels.relay]
host = "smtp.example.net"
username = "u"
password = "SECRET-PASSWORD"
domains = ["example.org"]
[channels.outbox]
kind = "file"
dir = "out"
senders = ["*"]
rate = "2/min"
recipients_per_day = 100
"#;

    pub(crate) fn config() -> Config {
        crate::config::parse(CONFIG, Path::new("/etc/mailgate/proxy.toml")).unwrap()
    }

    const NOW: u64 = 1_800_000_000_000;

    fn view(stored: Vec<(&str, Stored)>) -> BackendView {
        let mut all: HashMap<String, Stored> = config()
            .channels
            .iter()
            .map(|c| (c.name.clone(), Stored::default()))
            .collect();
        for (name, s) in stored {
            all.insert(name.to_string(), s);
        }
        BackendView {
            taken: Instant::now(),
            channels: Ok(all),
        }
    }

    fn status(backend: &BackendView, live: &HashMap<String, Live>) -> Status {
        assemble(
            &config(),
            backend,
            Some(Ok(3)),
            live,
            Vec::new(),
            NOW - 5000,
            5,
            NOW,
        )
    }

    fn channel<'s>(status: &'s Status, name: &str) -> &'s ChannelStatus {
        status.channels.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_broken_oauth_channel_says_why_and_to_authorize_it_again() {
        let broken = Stored {
            health: Some(Health::Broken {
                since_ms: NOW - 60_000,
                reason: "535 5.7.8 Authentication unsuccessful".into(),
                auth_method_refused: false,
            }),
            events: Vec::new(),
        };
        let s = status(&view(vec![("alice", broken)]), &HashMap::new());
        let alice = channel(&s, "alice");
        assert_eq!(alice.state, "broken");
        assert_eq!(
            alice.reason.as_deref(),
            Some("535 5.7.8 Authentication unsuccessful")
        );
        assert!(alice.since.is_some());
        let action = alice.action.as_deref().unwrap();
        assert!(
            action.contains("run `mailgate oauth authorize alice`"),
            "{action}"
        );
        assert!(action.contains("mailgate queue retry --all"), "{action}");
        assert_eq!(channel(&s, "relay").state, "ok");
        assert_eq!(channel(&s, "relay").action, None);
    }

    #[test]
    fn broken_password_and_app_channels_get_their_own_advice() {
        let broken = |reason: &str| Stored {
            health: Some(Health::Broken {
                since_ms: NOW,
                reason: reason.into(),
                auth_method_refused: false,
            }),
            events: Vec::new(),
        };
        let s = status(
            &view(vec![
                ("relay", broken("535 5.7.8 bad password")),
                ("alice-graph", broken("403 Forbidden")),
                ("alice", broken("535 5.7.139 SMTP AUTH disabled")),
            ]),
            &HashMap::new(),
        );
        let action = |n| channel(&s, n).action.clone().unwrap();
        assert!(
            action("relay").contains("password_env"),
            "{}",
            action("relay")
        );
        assert!(action("alice-graph").contains("client secret"));
        // alice is on OAuth: a refused auth method there still means authorizing again.
        assert!(action("alice").contains("oauth authorize alice"));
        let mut relay = config();
        relay.server.delivery = DeliveryMode::Relay;
        let ch = &relay.channels[relay.channel_id("relay").unwrap()];
        let verdict = Verdict {
            state: "broken",
            reason: Some("535 5.7.139".into()),
            ..Verdict::ok()
        };
        let advice = what_to_do(ch, &verdict, false).unwrap();
        assert!(advice.contains("xoauth2"), "{advice}");
        assert!(advice.contains("as fallback"), "{advice}");
        let mut with_fallback = ch.clone();
        with_fallback.fallback = Some(0);
        let advice = what_to_do(&with_fallback, &verdict, true).unwrap();
        assert!(
            advice.starts_with("its mail goes over its fallback meanwhile"),
            "{advice}"
        );
        assert!(advice.contains("mailgate queue retry --all"), "{advice}");
    }

    #[test]
    fn a_channel_held_for_a_provider_quota_is_limited_until_then() {
        let held = Stored {
            health: Some(Health::Held {
                until_ms: NOW + 3_600_000,
                reason: "554 5.2.0 SubmissionQuotaExceeded".into(),
            }),
            events: Vec::new(),
        };
        let s = status(&view(vec![("alice", held)]), &HashMap::new());
        let alice = channel(&s, "alice");
        assert_eq!(alice.state, "limited");
        assert_eq!(alice.until_ms, Some(NOW + 3_600_000));
        assert_eq!(
            alice.until.as_deref(),
            Some(format_time(NOW + 3_600_000).as_str())
        );
        assert!(
            alice
                .reason
                .as_deref()
                .unwrap()
                .contains("SubmissionQuotaExceeded")
        );
        assert!(alice.action.as_deref().unwrap().starts_with("nothing"));
        // A hold that has passed is ok again.
        let passed = Stored {
            health: Some(Health::Held {
                until_ms: NOW - 1,
                reason: "x".into(),
            }),
            events: Vec::new(),
        };
        let s = status(&view(vec![("alice", passed)]), &HashMap::new());
        assert_eq!(channel(&s, "alice").state, "ok");
    }

    #[test]
    fn a_full_rate_window_is_limited_until_the_oldest_send_leaves_it() {
        let full = Stored {
            health: Some(Health::Ok),
            events: vec![(NOW - 50_000, 3), (NOW - 10_000, 4), (NOW - 90_000_000, 50)],
        };
        let s = status(&view(vec![("outbox", full)]), &HashMap::new());
        let outbox = channel(&s, "outbox");
        assert_eq!(outbox.state, "limited");
        assert_eq!(outbox.until_ms, Some(NOW - 50_000 + 60_000));
        let rate = outbox.rate.unwrap();
        assert_eq!((rate.used, rate.limit, rate.window_seconds), (2, 2, 60));
        // The send older than a day no longer counts.
        let day = outbox.recipients_per_day.unwrap();
        assert_eq!((day.used, day.limit, day.window_seconds), (7, 100, 86_400));
        assert!(
            outbox
                .reason
                .as_deref()
                .unwrap()
                .contains("rate 2 of 2 used")
        );
        // One send in the window: ok, and the use is shown.
        let one = Stored {
            health: Some(Health::Ok),
            events: vec![(NOW - 10_000, 1)],
        };
        let s = status(&view(vec![("outbox", one)]), &HashMap::new());
        assert_eq!(channel(&s, "outbox").state, "ok");
        assert_eq!(channel(&s, "outbox").rate.unwrap().used, 1);
        assert_eq!(channel(&s, "relay").rate, None);
    }

    #[test]
    fn an_unreachable_backend_makes_every_state_unknown_and_says_so() {
        let away = BackendView {
            taken: Instant::now(),
            channels: Err("Connection refused (os error 111)".into()),
        };
        let s = status(&away, &HashMap::new());
        assert!(!s.state_backend.reachable);
        assert_eq!(
            s.state_backend.error.as_deref(),
            Some("Connection refused (os error 111)")
        );
        assert!(s.channels.iter().all(|c| c.state == "unknown"), "{s:?}");
        assert!(
            channel(&s, "alice")
                .action
                .as_deref()
                .unwrap()
                .contains("state backend")
        );
    }

    #[test]
    fn relay_mode_shows_what_the_last_answer_said_and_the_fallback_in_use() {
        let board = Board::new();
        let mut cfg = config();
        cfg.server.delivery = DeliveryMode::Relay;
        board.configure(Arc::new(cfg.clone()));
        board.note_state("relay", ChannelState::Broken);
        board.note_reason("relay", "535 5.7.8 Error: authentication failed");
        board.note_state("alice", ChannelState::Broken);
        board.note_reason(
            "alice",
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
        );
        board.note_fallback("alice", true);
        let live = lock(&board.live).clone();
        let s = assemble(&cfg, &view(vec![]), None, &live, Vec::new(), NOW, 0, NOW);
        assert_eq!(s.delivery, "relay");
        assert!(s.queue.is_none());
        let relay = channel(&s, "relay");
        assert_eq!(relay.state, "broken");
        assert!(
            relay
                .reason
                .as_deref()
                .unwrap()
                .contains("authentication failed")
        );
        assert!(
            relay
                .action
                .as_deref()
                .unwrap()
                .contains("next message tries again")
        );
        let alice = channel(&s, "alice");
        assert_eq!(alice.fallback.as_deref(), Some("alice-graph"));
        assert!(alice.fallback_in_use);
        assert!(!channel(&s, "alice-graph").fallback_in_use);
        // A delivery clears it; a new state drops the old reason.
        board.note_state("relay", ChannelState::Ok);
        board.note_state("relay", ChannelState::Limited);
        let live = lock(&board.live).clone();
        let s = assemble(&cfg, &view(vec![]), None, &live, Vec::new(), NOW, 0, NOW);
        assert_eq!(channel(&s, "relay").state, "ok");
        // A reload ends relay mode's hand-overs.
        board.configure(Arc::new(cfg));
        assert!(!lock(&board.live).values().any(|l| l.fallback_in_use));
    }

    #[test]
    fn the_ring_keeps_the_last_hundred_newest_first() {
        let board = Board::new();
        for n in 0..150u64 {
            board.record(Delivery {
                at_ms: NOW + n,
                id: format!("id{n}"),
                sender: "a\u{1b}[31m@example.com".into(),
                recipients: 1,
                channel: "outbox".into(),
                outcome: "delivered",
                reply: "x".repeat(2000),
            });
        }
        let ring = lock(&board.ring).clone();
        assert_eq!(ring.len(), RING);
        assert_eq!(ring[0].id, "id149");
        assert_eq!(ring[RING - 1].id, "id50");
        // Control characters are shown escaped; a long reply is cut.
        assert!(!ring[0].sender.contains('\u{1b}'), "{}", ring[0].sender);
        assert_eq!(ring[0].reply.chars().count(), MAX_TEXT);
    }

    #[test]
    fn the_queue_view_counts_per_channel_and_looks_for_the_oldest_sparingly() {
        let board = Board::new();
        let mut looked = 0;
        for _ in 0..5 {
            board.publish_queue("outbox", &Health::Ok, 3, Some(NOW + 60_000), false, || {
                looked += 1;
                Some(NOW - 120_000)
            });
        }
        assert_eq!(
            looked, 1,
            "the worker's queue is walked once per {OLDEST_EVERY:?}"
        );
        board.publish_queue("outbox", &Health::Ok, 0, None, false, || unreachable!());
        assert_eq!(lock(&board.live)["outbox"].queue.unwrap().oldest_ms, None);
        // Mail again after an empty queue: looked for at once.
        board.publish_queue("outbox", &Health::Ok, 1, Some(NOW), false, || {
            Some(NOW - 1000)
        });
        board.publish_queue("alice", &Health::Ok, 2, Some(NOW + 1000), true, || {
            Some(NOW - 7000)
        });
        let live = lock(&board.live).clone();
        let s = status(&view(vec![]), &live);
        let q = channel(&s, "outbox").queue.clone().unwrap();
        assert_eq!((q.messages, q.oldest_age_seconds), (1, Some(1)));
        assert_eq!(q.next_attempt, Some(format_time(NOW)));
        let total = s.queue.clone().unwrap();
        assert_eq!(
            (total.messages, total.oldest_age_seconds, total.failed),
            (3, Some(7), Some(3))
        );
        assert!(channel(&s, "alice").fallback_in_use);
    }

    /// The backend's answer is cached a few seconds; the worker's health is the same
    /// value, fresher.
    #[test]
    fn the_workers_health_wins_over_a_stale_backend_answer() {
        let board = Board::new();
        let broken = Health::Broken {
            since_ms: NOW - 1000,
            reason: "535 5.7.8 Authentication credentials invalid".into(),
            auth_method_refused: false,
        };
        board.publish_queue("relay", &broken, 1, None, false, || None);
        let live = lock(&board.live).clone();
        let stale = Stored {
            health: Some(Health::Ok),
            events: Vec::new(),
        };
        let s = status(&view(vec![("relay", stale)]), &live);
        let relay = channel(&s, "relay");
        assert_eq!(relay.state, "broken");
        assert_eq!(
            relay.reason.as_deref(),
            Some("535 5.7.8 Authentication credentials invalid")
        );
        // Resumed (queue retry): ok at once, whatever the backend said a moment ago.
        board.publish_queue("relay", &Health::Ok, 1, None, false, || None);
        let live = lock(&board.live).clone();
        let stale = Stored {
            health: Some(broken),
            events: Vec::new(),
        };
        let s = status(&view(vec![("relay", stale)]), &live);
        assert_eq!(channel(&s, "relay").state, "ok");
    }

    #[test]
    fn a_queue_id_tells_when_it_was_made() {
        let before = now_ms();
        let id = crate::message::new_id();
        let at = id_time_ms(&id).unwrap();
        assert!(
            at >= before.saturating_sub(1) && at <= now_ms(),
            "{id} {at} {before}"
        );
        assert_eq!(
            id_time_ms("6b174e3f47e35-1acd-1"),
            Some(0x6b174e3f * 1000 + 0x47e35 / 1000)
        );
        for bad in ["", "-", "abc-1", "zzzzzzzzzzzz-1", "é€€€€€€€-1"] {
            assert_eq!(id_time_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn loopback_is_always_allowed_and_others_only_from_allow_networks() {
        let nets: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for yes in [
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "::ffff:10.9.9.9",
            "fd12::1",
        ] {
            assert!(allowed(ip(yes), &nets), "{yes}");
        }
        for loopback in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(allowed(ip(loopback), &[]), "{loopback}");
        }
        assert!(!allowed(ip("10.1.2.3"), &[]));
        for no in [
            "192.168.1.5",
            "11.0.0.1",
            "::ffff:192.168.1.5",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            assert!(!allowed(ip(no), &nets), "{no}");
            assert!(!allowed(ip(no), &[]), "{no}");
        }
    }

    #[test]
    fn the_json_has_every_fact_and_no_secret() {
        let board = Board::new();
        board.note_token("alice", NOW + 3_000_000);
        let live = lock(&board.live).clone();
        let s = status(&view(vec![]), &live);
        let json: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(json["delivery"], "queue");
        assert_eq!(json["uptime_seconds"], 5);
        assert_eq!(json["state_backend"]["kind"], "local");
        assert_eq!(json["state_backend"]["reachable"], true);
        assert_eq!(json["queue"]["failed"], 3);
        let names: Vec<&str> = json["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["alice", "alice-graph", "outbox", "relay"]);
        let alice = &json["channels"][0];
        assert_eq!(alice["kind"], "smtp");
        assert_eq!(alice["preset"], "office365");
        assert_eq!(alice["target"], "smtp.office365.com:587");
        assert_eq!(alice["scope"][0], "alice@example.com");
        assert_eq!(alice["oauth"]["grant"], "refresh_token");
        assert_eq!(alice["oauth"]["expires_in_seconds"], 3000);
        assert_eq!(
            json["channels"][1]["oauth"]["expires"],
            serde_json::Value::Null
        );
        assert_eq!(json["channels"][3]["scope"][0], "example.org");
        let text = s.to_json();
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!super::super::page::render(&s).contains("SECRET"));
    }
}
