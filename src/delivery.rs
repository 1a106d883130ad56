//! Hands an accepted message to its channel and turns the outcome into the client's reply.
//!
//! The session streams a message into a [`Draft`] as it arrives, then calls
//! [`Delivery::finish`] with the routed channel and envelope.
//! Relay mode: the message goes upstream during the client's session and the client
//! gets the upstream's answer (SPEC §5, §6). Queue mode: the draft is a spool file and
//! [`crate::queue`] stores the message and delivers it later.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{Channel, ChannelId, Config, DeliveryMode};
use crate::message::Envelope;
use crate::metrics::{self, ChannelState, Outcome};
use crate::queue::{ChannelChanges, Generation};
use crate::queue::{Queue, Spool, SpoolDraft};
use crate::ratelimit::ChannelLimiter;
use crate::reply::Reply;
use crate::state::shared::{RedisState, Reserved};
use crate::state::{self, Backend, Counters, Health, LocalState};
use crate::upstream::{Body, Class, Upstreams};

/// The delivery side of a running proxy, for one config: a reload makes the next one
/// ([`Delivery::reload`]), sharing the queue and the unchanged channels' parts, while the
/// sessions begun before it finish with this one.
pub struct Delivery {
    config: Arc<Config>,
    upstreams: Arc<Upstreams>,
    /// One per channel, indexed by [`ChannelId`]; shared with the next generation when
    /// it still has the channel (changed or not), so old and new sessions share a window.
    limiters: Vec<Arc<Mutex<ChannelLimiter>>>,
    /// Queue mode: the spool and its workers.
    queue: Option<Arc<Queue>>,
    /// Relay mode: where the limiters' counts are kept across restarts.
    counters: Option<LocalState>,
    /// Relay mode: `spool_dir/tmp/`, where a large message waits for its upstream.
    relay_tmp: Spool,
    /// Relay-mode counters are kept on disk (not in tests built on [`Delivery::with_upstreams`]).
    persist: bool,
    /// Relay mode, per channel: the provider refuses how it authenticates, so its mail
    /// goes over its fallback (cleared by a reload: each generation starts with none).
    handing_over: Vec<AtomicBool>,
    /// Relay mode with `[state] backend = "redis"`: the shared windows, instead of `limiters`.
    shared: Option<RedisState>,
    /// When this generation started (unix ms): a hand-over another host recorded in Redis
    /// before it is not followed, as a reload or a restart ends this host's own.
    started_ms: u64,
}

/// A relay-mode message counted against its channel's windows.
enum Reservation {
    /// In this process's limiter, at this unix ms.
    Local(u64),
    /// In Redis, with the token that gives it back (`None`: the channel has no windows).
    Shared(Option<String>),
}

/// A message being received: written to as the data streams in.
/// Dropping a draft without [`Delivery::finish`] discards it.
///
/// Both modes keep the first 64 KiB in memory and stream the rest to a private file in
/// `spool_dir/tmp/` ([`SpoolDraft`]), so memory does not grow with the message. Relay
/// mode's file is removed once the upstream has answered (or the draft is dropped).
pub struct Draft {
    id: String,
    body: SpoolDraft,
    /// The envelope sender the client gave, when a `[[rewrite]]` entry replaced it.
    rewritten_from: Option<String>,
}

impl Draft {
    /// The message id, for every log line about this message.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends decoded message bytes.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.body.write(data).await
    }

    /// Notes the envelope sender the client gave before a `[[rewrite]]` entry replaced
    /// it, for the accepted-message log line (SPEC §4a `rewritten_from`).
    pub fn set_rewritten_from(&mut self, original: &str) {
        self.rewritten_from = Some(crate::text::escape_controls(original).into_owned());
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.body.len()
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Delivery {
    /// Sets up the channels' transports and limiters; in queue mode, opens the spool
    /// (removing what was never acknowledged). The queue's workers start with [`Delivery::run_queue`].
    /// Relay mode keeps its rate and quota counters in `spool_dir/state/` across restarts.
    pub fn new(config: Arc<Config>) -> Result<Self, String> {
        let upstreams = Upstreams::new(&config)?;
        Self::build(config, upstreams, true)
    }

    /// Builds on transports made elsewhere (tests: shorter timeouts; relay-mode counters
    /// are not persisted). Panics if a queue-mode spool cannot be opened.
    pub fn with_upstreams(config: Arc<Config>, upstreams: Upstreams) -> Self {
        Self::build(config, upstreams, false).unwrap_or_else(|e| panic!("{e}"))
    }

    fn build(config: Arc<Config>, upstreams: Upstreams, persist: bool) -> Result<Self, String> {
        let queue = match config.server.delivery {
            DeliveryMode::Queue => Some(Queue::open(config.clone())?),
            DeliveryMode::Relay => None,
        };
        // Queue mode counts in its workers; relay mode here, persisted when asked to.
        let counters = (persist && queue.is_none())
            .then(|| relay_counters(&config))
            .flatten();
        let shared = match (&queue, Backend::of(&config)?) {
            (None, Backend::Redis(redis)) => Some(redis),
            _ => None,
        };
        let counters = counters.filter(|_| shared.is_none());
        let relay_tmp = Spool::new(&config.server.spool_dir);
        if persist && queue.is_none() {
            clean_relay_tmp(&relay_tmp)
                .map_err(|e| format!("spool {}: {e}", config.server.spool_dir.display()))?;
        }
        let limiters = limiters(&config, counters.as_ref(), None);
        let handing_over = handing_over(&config);
        Ok(Delivery {
            config,
            upstreams: Arc::new(upstreams),
            limiters,
            queue,
            counters,
            relay_tmp,
            persist,
            handing_over,
            shared,
            started_ms: now_ms(),
        })
    }

    /// The next generation for a reloaded `config` (whose restart-only settings, the
    /// delivery mode and the spool among them, are this one's): unchanged channels keep
    /// their transports; added and changed ones get new ones. Every channel still
    /// configured keeps its limiter (an added one's windows are read back from the spool's
    /// state, as at start-up). Nothing runs differently until [`Delivery::apply`].
    pub fn reload(&self, config: Arc<Config>, changes: &ChannelChanges) -> Result<Self, String> {
        let upstreams = self.upstreams.rebuild(&config, &changes.unchanged)?;
        let counters = match &self.counters {
            Some(store) => Some(store.clone()),
            None if self.persist && self.queue.is_none() && self.shared.is_none() => {
                relay_counters(&config)
            }
            None => None,
        };
        let limiters = limiters(&config, counters.as_ref(), Some(self));
        let handing_over = handing_over(&config);
        Ok(Delivery {
            config,
            upstreams: Arc::new(upstreams),
            limiters,
            queue: self.queue.clone(),
            counters,
            relay_tmp: self.relay_tmp.clone(),
            persist: self.persist,
            handing_over,
            shared: self.shared.clone(),
            started_ms: now_ms(),
        })
    }

    /// Puts the next generation (from [`Delivery::reload`] on `self`) to work: the queue's
    /// workers follow `changes`, and this generation's idle upstream connections of
    /// channels not taken over are closed.
    pub async fn apply(&self, next: &Delivery, changes: &ChannelChanges) {
        self.retune_limiters(next);
        if let Some(queue) = &next.queue {
            let generation = Generation {
                config: next.config.clone(),
                transport: next.upstreams.clone(),
            };
            queue.reconfigure(generation, changes).await;
        }
        self.upstreams.close_idle_except(&changes.unchanged).await;
    }

    /// The limiters `next` shares with this generation whose channel's limits changed take
    /// the new limits, keeping what was counted (from the log too, which may hold more
    /// than a window of the old limits kept): sessions of both generations then wait on
    /// one window with the new limits.
    fn retune_limiters(&self, next: &Delivery) {
        let now = now_ms();
        for (id, channel) in next.config.channels.iter().enumerate() {
            let Some(before) = self.config.channel_id(&channel.name) else {
                continue;
            };
            if self.config.channels[before].limits == channel.limits
                || !Arc::ptr_eq(&self.limiters[before], &next.limiters[id])
            {
                continue;
            }
            let logged = next
                .counters
                .as_ref()
                .filter(|_| state::has_windows(&channel.limits))
                .and_then(|st| Counters::load(st, &channel.name, &channel.limits, now).ok())
                .map(|counters| counters.events())
                .unwrap_or_default();
            let mut limiter = lock(&next.limiters[id]);
            let events = merge_events(logged, limiter.snapshot());
            *limiter = ChannelLimiter::restore(&channel.limits, events, now);
        }
    }

    /// The config of this generation.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Queue mode: runs the queue's workers until `shutdown`, then lets transactions in
    /// flight finish (bounded). Relay mode: returns at once.
    pub async fn run_queue(&self, shutdown: CancellationToken) {
        if let Some(queue) = &self.queue {
            queue.clone().run(self.upstreams.clone(), shutdown).await;
        }
    }

    /// The channels' transports (`test-channel`).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Queue mode: resumes broken or held channels and makes every queued message due
    /// now (what a config reload should do; `queue retry --all` does the same).
    pub fn resume_queue(&self) {
        for flag in &self.handing_over {
            flag.store(false, Ordering::Relaxed);
        }
        if let Some(queue) = &self.queue {
            queue.resume_all();
        }
    }

    /// Starts a new message (assigns its id).
    pub async fn begin(&self) -> Result<Draft, Reply> {
        match &self.queue {
            Some(queue) => {
                let spool = queue.begin().await?;
                Ok(Draft {
                    id: spool.id().to_string(),
                    body: spool,
                    rewritten_from: None,
                })
            }
            None => {
                let id = crate::message::new_id();
                let body = SpoolDraft::create(&self.relay_tmp, id.clone())
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "cannot start a message");
                        Reply::local_error()
                    })?;
                Ok(Draft {
                    id,
                    body,
                    rewritten_from: None,
                })
            }
        }
    }

    /// Delivers (relay) or stores (queue) a complete message; returns what the client should hear.
    pub async fn finish(&self, draft: Draft, channel: ChannelId, envelope: &Envelope) -> Reply {
        let started = Instant::now();
        let (id, size) = (draft.id().to_string(), draft.len());
        let rewritten_from = draft.rewritten_from.clone();
        let handled = crate::unwind::catch_unwind(async {
            match &self.queue {
                Some(queue) => {
                    queue
                        .finish(draft.body, &self.config, channel, envelope)
                        .await
                }
                // The draft (and its file) goes once the upstream has answered.
                None => self.relay(&id, draft.body, channel, envelope).await,
            }
        })
        .await;
        // A panic (a bug) costs this message a temporary refusal, never the session or
        // what the delivery held: the client tries again.
        let reply = handled.unwrap_or_else(|panic| {
            tracing::error!(
                id,
                panic = %crate::text::escape_controls(&panic),
                "internal error while delivering a message; the client is told to try again"
            );
            Reply::local_error()
        });
        let name = self
            .config
            .channels
            .get(channel)
            .map_or("?", |c| c.name.as_str());
        let duration_ms = started.elapsed().as_millis() as u64;
        let (id, rcpts) = (id.as_str(), envelope.recipients.len());
        let sender = crate::text::escape_controls(&envelope.sender);
        if reply.is_positive() {
            metrics::message(name, Outcome::Accepted);
            tracing::info!(id, %sender, rewritten_from, rcpts, size, channel = name, %reply, duration_ms, "message accepted");
        } else {
            metrics::message(name, Outcome::Refused);
            tracing::info!(id, %sender, rcpts, size, channel = name, %reply, duration_ms, "message refused");
        }
        reply
    }

    /// Relay mode: limits, then the upstream's answer. A channel whose provider refuses
    /// how it authenticates hands the message to its fallback (SPEC §7), at once and for
    /// the messages after it, until a reload or a restart.
    async fn relay(
        &self,
        id: &str,
        mut draft: SpoolDraft,
        channel: ChannelId,
        envelope: &Envelope,
    ) -> Reply {
        let mut channel = self.fallback_for(channel).await;
        let closed = match draft.close_to_send().await {
            Ok(closed) => closed,
            Err(e) => {
                tracing::error!(id, error = %e, "cannot write the message's temporary file");
                return Reply::local_error();
            }
        };
        let body = match &closed.inline {
            Some(bytes) => Body::Bytes(bytes),
            None => Body::File(&closed.path),
        };
        // At most the channel and its fallback chain (loop-free after validation).
        for _ in 0..=self.config.channels.len() {
            let (Some(ch), Some(limiter)) = (
                self.config.channels.get(channel),
                self.limiters.get(channel),
            ) else {
                tracing::error!(id, channel, "no such channel");
                return Reply::local_error();
            };
            if let Some(max) = ch.limits.max_message_size
                && draft.len() > max
            {
                return Reply::too_big(max);
            }
            // Relay mode never splits a message: more recipients than one transaction or a
            // day's quota takes could never go (a 451 would have the client retry for ever).
            if let Some(max) = ch.limits.whole_message_recipients()
                && envelope.recipients.len() > max
            {
                return Reply::too_many_recipients(max);
            }
            let rcpts = envelope.recipients.len() as u64;
            let reservation = match self.reserve(id, ch, limiter, rcpts).await {
                Ok(reservation) => reservation,
                Err(reply) => return reply,
            };
            let started = Instant::now();
            let outcome = self
                .upstreams
                .send_with_id(channel, Some(id), envelope, body, true)
                .await;
            metrics::delivery_time(&ch.name, started.elapsed());
            let error = match outcome.result {
                Ok(reply) => {
                    self.settle(id, ch, limiter, reservation, rcpts).await;
                    metrics::message(&ch.name, Outcome::Delivered);
                    metrics::channel_state(&ch.name, ChannelState::Ok);
                    let shown = reply.to_string();
                    status_record(id, envelope, &ch.name, Outcome::Delivered, &shown);
                    return reply;
                }
                Err(error) => error,
            };
            if error.may_have_delivered() {
                // Given back, it would let one more through than the provider allows.
                tracing::warn!(id, channel = %ch.name, error = %error, "the upstream may have taken the message: it stays counted against the channel's limits");
                self.settle(id, ch, limiter, reservation, rcpts).await;
            } else {
                self.give_back(id, ch, limiter, reservation, rcpts).await;
            }
            // Relay mode holds no channel: the state shows what the last answer said.
            let state = match error.class() {
                Class::CredentialsBroken => ChannelState::Broken,
                Class::Quota => ChannelState::Limited,
                _ => ChannelState::Ok,
            };
            metrics::channel_state(&ch.name, state);
            if state != ChannelState::Ok {
                metrics::status::board().note_reason(&ch.name, &error.to_string());
            }
            match ch.fallback {
                // The message's fate is counted on the channel that answers last.
                Some(fallback) if error.refuses_auth_method() => {
                    let to = &self.config.channels[fallback].name;
                    if !self.handing_over[channel].swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            channel = %ch.name,
                            fallback = %to,
                            error = %error,
                            "CHANNEL BROKEN: the provider refuses how this channel authenticates; its mail goes over its fallback until a reload or a restart"
                        );
                        self.share_hand_over(id, &ch.name, to, &error.to_string())
                            .await;
                    }
                    tracing::info!(id, channel = %ch.name, fallback = %to, "message handed to the fallback channel");
                    metrics::status::board().note_fallback(&ch.name, true);
                    let shown = format!("{error} (handed to fallback {to})");
                    status_record(id, envelope, &ch.name, Outcome::Deferred, &shown);
                    channel = fallback;
                }
                _ => {
                    let reply = error.client_reply(&ch.name);
                    // The client's reply is the message's fate here: it retries after a 4xx.
                    let fate = if reply.is_permanent() {
                        Outcome::Failed
                    } else {
                        Outcome::Deferred
                    };
                    metrics::message(&ch.name, fate);
                    status_record(id, envelope, &ch.name, fate, &error.to_string());
                    return reply;
                }
            }
        }
        Reply::local_error()
    }

    /// Relay mode: the channel a message for `channel` goes over now: its fallback (and
    /// that one's) while the provider refuses how it authenticates.
    /// With Redis, another host's hand-over since this generation started counts too.
    async fn fallback_for(&self, mut channel: ChannelId) -> ChannelId {
        for _ in 0..self.config.channels.len() {
            let Some(ch) = self.config.channels.get(channel) else {
                break;
            };
            let Some(fallback) = ch.fallback else { break };
            let handing_over = self
                .handing_over
                .get(channel)
                .is_some_and(|h| h.load(Ordering::Relaxed))
                || self.handed_over_elsewhere(&ch.name).await;
            if !handing_over {
                break;
            }
            channel = fallback;
        }
        channel
    }

    /// Shared backend: another host found that `channel`'s provider refuses how it
    /// authenticates, since this generation started. Redis down: no (the reservation
    /// then answers `451` anyway).
    async fn handed_over_elsewhere(&self, channel: &str) -> bool {
        let Some(redis) = &self.shared else {
            return false;
        };
        matches!(
            redis.health(channel).await,
            Ok((Health::Broken {
                since_ms,
                auth_method_refused: true,
                ..
            }, _)) if since_ms >= self.started_ms
        )
    }

    /// Shared backend: tells every host that `channel`'s mail goes over its fallback.
    async fn share_hand_over(&self, id: &str, channel: &str, fallback: &str, error: &str) {
        let Some(redis) = &self.shared else { return };
        let health = Health::Broken {
            since_ms: now_ms(),
            reason: format!("{error} (mail goes over fallback {fallback})"),
            auth_method_refused: true,
        };
        if let Err(e) = redis.set_health(channel, &health).await {
            tracing::warn!(id, channel, error = %e, "cannot tell the other hosts that the channel's mail goes over its fallback");
        }
    }
}

impl Delivery {
    /// Relay mode: checks and counts a message in one step (in this process, or in Redis
    /// for every host), so concurrent sessions never overshoot a limit; or the reply.
    async fn reserve(
        &self,
        id: &str,
        ch: &Channel,
        limiter: &Mutex<ChannelLimiter>,
        rcpts: u64,
    ) -> Result<Reservation, Reply> {
        if let Some(redis) = &self.shared {
            if !state::has_windows(&ch.limits) {
                return Ok(Reservation::Shared(None));
            }
            return match redis.reserve(&ch.name, &ch.limits, rcpts).await {
                Ok(Reserved::Yes(token)) => Ok(Reservation::Shared(Some(token))),
                Ok(Reserved::Wait(ms)) => {
                    tracing::info!(id, channel = %ch.name, wait_ms = ms, "channel limit reached");
                    metrics::channel_state(&ch.name, ChannelState::Limited);
                    Err(Reply::channel_limited(&ch.name))
                }
                // A rate is at least 1: only a day's quota can never take a message.
                Ok(Reserved::Never) => {
                    tracing::info!(id, channel = %ch.name, "channel limit can never take this message");
                    let max = ch.limits.recipients_per_day.unwrap_or(0);
                    Err(Reply::too_many_recipients(
                        usize::try_from(max).unwrap_or(usize::MAX),
                    ))
                }
                // Logged once per outage by the connection; never sent uncounted.
                Err(_) => Err(Reply::limits_unavailable(&ch.name)),
            };
        }
        let reserved_at = {
            let mut limiter = lock(limiter);
            let now = now_ms();
            if let Err(until) = limiter.check(now, rcpts) {
                // More recipients than a day's quota (which a reload may have lowered
                // since this session checked them at RCPT): a 451 would be retried for
                // ever. (A rate is at least 1, so only the quota says never.)
                if until == u64::MAX {
                    tracing::info!(id, channel = %ch.name, rcpts, "channel limit can never take this message");
                    let max = limiter.recipients_per_day().unwrap_or(0);
                    return Err(Reply::too_many_recipients(
                        usize::try_from(max).unwrap_or(usize::MAX),
                    ));
                }
                tracing::info!(id, channel = %ch.name, until_ms = until, "channel limit reached");
                metrics::channel_state(&ch.name, ChannelState::Limited);
                return Err(Reply::channel_limited(&ch.name));
            }
            limiter.record(now, rcpts);
            now
        };
        self.persist(&ch.name, reserved_at, rcpts, false);
        Ok(Reservation::Local(reserved_at))
    }

    /// Takes back a reservation the upstream certainly did not use.
    async fn give_back(
        &self,
        id: &str,
        ch: &Channel,
        limiter: &Mutex<ChannelLimiter>,
        reservation: Reservation,
        rcpts: u64,
    ) {
        match reservation {
            Reservation::Local(at) => {
                lock(limiter).unrecord(at, rcpts);
                self.persist(&ch.name, at, rcpts, true);
            }
            Reservation::Shared(Some(token)) => {
                if let Some(redis) = &self.shared
                    && let Err(e) = redis.release(&ch.name, &token).await
                {
                    tracing::warn!(id, channel = %ch.name, error = %e, "cannot give back a reservation: it counts until its window passes");
                }
            }
            Reservation::Shared(None) => {}
        }
    }

    /// Counts a message the upstream took (or may have taken) from now, when its
    /// transaction ended, rather than from when it was reserved (see
    /// [`ChannelLimiter::settle`]).
    async fn settle(
        &self,
        id: &str,
        ch: &Channel,
        limiter: &Mutex<ChannelLimiter>,
        reservation: Reservation,
        rcpts: u64,
    ) {
        match reservation {
            Reservation::Local(at) => {
                let end = now_ms();
                if end <= at {
                    return;
                }
                lock(limiter).settle(at, rcpts, end);
                // Counted at its end before the first count is taken back.
                self.persist(&ch.name, end, rcpts, false);
                self.persist(&ch.name, at, rcpts, true);
            }
            Reservation::Shared(Some(token)) => {
                if let Some(redis) = &self.shared
                    && let Err(e) = redis.settle(&ch.name, &ch.limits, &token).await
                {
                    tracing::warn!(id, channel = %ch.name, error = %e, "cannot count the message from the end of its transaction: its window may end up to a delivery time early");
                }
            }
            Reservation::Shared(None) => {}
        }
    }

    /// Relay mode: logs a counted (or taken back) message so the windows survive a restart,
    /// and compacts the log once it has grown (as queue mode's workers do).
    fn persist(&self, channel: &str, at_ms: u64, rcpts: u64, taken_back: bool) {
        let Some(store) = &self.counters else { return };
        let Some(limits) = self
            .config
            .channel_id(channel)
            .map(|id| &self.config.channels[id].limits)
            .filter(|limits| state::has_windows(limits))
        else {
            return;
        };
        match store.append_event(channel, at_ms, rcpts, taken_back) {
            Ok(true) => store.compact_in_background(channel, limits, now_ms()),
            Ok(false) => {}
            Err(e) => tracing::warn!(channel, error = %e, "cannot persist rate counters"),
        }
    }
}

/// One limiter per channel of `config`: shared with `previous` for every channel it has,
/// changed or not (sessions begun before a reload keep sending over it: one window for
/// both, or each generation would let the whole limit through; a change of the limits
/// themselves is put in force by [`Delivery::apply`]), else restored from the saved
/// counters (relay mode) or empty.
fn limiters(
    config: &Config,
    counters: Option<&LocalState>,
    previous: Option<&Delivery>,
) -> Vec<Arc<Mutex<ChannelLimiter>>> {
    let now = now_ms();
    config
        .channels
        .iter()
        .map(|c| {
            let kept = previous.and_then(|p| {
                let id = p.config.channel_id(&c.name)?;
                p.limiters.get(id).cloned()
            });
            kept.unwrap_or_else(|| {
                let saved = counters
                    .filter(|_| state::has_windows(&c.limits))
                    .and_then(|st| Counters::load(st, &c.name, &c.limits, now).ok())
                    .map(|counters| counters.events())
                    .unwrap_or_default();
                Arc::new(Mutex::new(ChannelLimiter::restore(&c.limits, saved, now)))
            })
        })
        .collect()
}

/// The events of the log and those of a limiter in memory, each once (the log holds a
/// limiter's events unless its last append is still on its way or failed).
fn merge_events(logged: Vec<(u64, u64)>, in_memory: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut unmatched: std::collections::HashMap<(u64, u64), usize> =
        std::collections::HashMap::new();
    for event in &logged {
        *unmatched.entry(*event).or_default() += 1;
    }
    let mut events = logged;
    for event in in_memory {
        match unmatched.get_mut(&event) {
            Some(n) if *n > 0 => *n -= 1,
            _ => events.push(event),
        }
    }
    events
}

/// One flag per channel, all clear.
fn handing_over(config: &Config) -> Vec<AtomicBool> {
    config
        .channels
        .iter()
        .map(|_| AtomicBool::new(false))
        .collect()
}

/// Relay mode: the spool's `state/` for rate counters, when some channel has limits.
fn relay_counters(config: &Config) -> Option<LocalState> {
    if !config
        .channels
        .iter()
        .any(|c| state::has_windows(&c.limits))
    {
        return None;
    }
    let spool_dir = &config.server.spool_dir;
    match LocalState::open(spool_dir) {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!(spool = %spool_dir.display(), error = %e, "rate counters will not survive a restart");
            None
        }
    }
}

/// Relay mode, at start: `spool_dir/tmp/` exists, is private, and holds no message left
/// over from a previous run (never acknowledged: the client got no final reply).
fn clean_relay_tmp(spool: &Spool) -> io::Result<()> {
    crate::fsutil::private_dir(&spool.root)?;
    let tmp = spool.tmp_dir();
    crate::fsutil::private_dir(&tmp)?;
    for entry in std::fs::read_dir(&tmp)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn lock(limiter: &Mutex<ChannelLimiter>) -> std::sync::MutexGuard<'_, ChannelLimiter> {
    limiter.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Relay mode: one upstream answer, for the status page's last outcomes.
fn status_record(id: &str, envelope: &Envelope, channel: &str, outcome: Outcome, reply: &str) {
    let rcpts = envelope.recipients.len();
    metrics::status::record(id, &envelope.sender, rcpts, channel, outcome, reply);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{ChannelKind, Rate, TlsMode};
    use crate::testkit::config::{channel, config, envelope, smtp_target as smtp_channel};
    use crate::testkit::fake_smtp::{Fake, Record, plain_fake, start};
    use crate::testkit::pki::provider;

    /// A relay-mode delivery with one SMTP channel "relay" (id 0) at a fake upstream.
    async fn delivery(
        fake: Fake,
        limits: impl FnOnce(&mut crate::config::Limits),
    ) -> (Delivery, Arc<Record>) {
        provider();
        let (port, record) = start(fake).await;
        let mut relay = channel(
            "relay",
            ChannelKind::Smtp(smtp_channel(port, TlsMode::None)),
            2,
        );
        limits(&mut relay.limits);
        let config = Arc::new(config(vec![relay]));
        let upstreams = Upstreams::new(&config)
            .unwrap()
            .with_timeouts(Duration::from_secs(5), Duration::from_secs(60));
        (Delivery::with_upstreams(config, upstreams), record)
    }

    async fn draft(delivery: &Delivery, bytes: &[u8]) -> Draft {
        let mut draft = delivery.begin().await.unwrap();
        draft.write(bytes).await.unwrap();
        draft
    }

    #[tokio::test]
    async fn the_client_hears_the_upstreams_reply() {
        let (delivery, record) = delivery(plain_fake(), |_| {}).await;
        let message = b"Subject: hi\r\n\r\n.hello\r\n";
        let draft = draft(&delivery, message).await;
        let reply = delivery
            .finish(draft, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert_eq!(
            reply.to_wire(),
            "250 2.0.0 Channel relay: upstream said: Ok: queued as FAKE1\r\n"
        );
        assert_eq!(record.txns()[0].wire, b"Subject: hi\r\n\r\n..hello\r\n");
    }

    #[tokio::test]
    async fn a_panic_in_a_relay_delivery_is_451_4_3_0_and_frees_the_connection_slot() {
        // One connection: were the slot kept, the next message would wait for it in vain.
        let (delivery, record) = delivery(plain_fake(), |l| l.connections = 1).await;
        delivery.upstreams.panics.store(1, Ordering::SeqCst);
        let envelope = envelope("a@example.com", &["b@example.org"]);
        let first = draft(&delivery, b"Subject: one\r\n\r\nhi\r\n").await;
        let reply = delivery.finish(first, 0, &envelope).await;
        assert_eq!(
            (reply.code, reply.enhanced),
            (451, Some((4, 3, 0))),
            "{reply}"
        );
        let second = draft(&delivery, b"Subject: two\r\n\r\nhi\r\n").await;
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            delivery.finish(second, 0, &envelope),
        )
        .await
        .expect("the slot was given back");
        assert_eq!(reply.code, 250, "{reply}");
        assert_eq!(record.txns().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_recipient_refuses_the_message() {
        let fake = Fake {
            replies: vec![("RCPT TO:<bad@", "550 5.1.1 no such user")],
            ..plain_fake()
        };
        let (delivery, record) = delivery(fake, |_| {}).await;
        let draft = draft(&delivery, b"x\r\n").await;
        let reply = delivery
            .finish(
                draft,
                0,
                &envelope("a@example.com", &["ok@example.org", "bad@example.org"]),
            )
            .await;
        assert_eq!((reply.code, reply.enhanced), (550, Some((5, 1, 1))));
        assert!(record.txns().is_empty(), "nobody got it");
    }

    #[tokio::test]
    async fn over_the_channels_size_limit_is_552() {
        let (delivery, record) = delivery(plain_fake(), |l| l.max_message_size = Some(10)).await;
        let draft = draft(&delivery, b"Subject: too long\r\n\r\n").await;
        let reply = delivery
            .finish(draft, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert_eq!(reply, Reply::too_big(10));
        assert_eq!(record.sessions.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn over_the_channels_recipient_limit_is_452() {
        let (delivery, record) = delivery(plain_fake(), |l| l.max_recipients = Some(1)).await;
        let draft = draft(&delivery, b"x\r\n").await;
        let reply = delivery
            .finish(
                draft,
                0,
                &envelope("a@example.com", &["b@example.org", "c@example.org"]),
            )
            .await;
        assert_eq!(reply, Reply::too_many_recipients(1));
        assert_eq!(record.sessions.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_channel_rate_gives_451_and_only_delivered_messages_count() {
        let fake = Fake {
            replies: vec![("MAIL FROM:<refused@", "550 5.7.1 not you")],
            ..plain_fake()
        };
        let rate = Rate {
            count: 1,
            per: Duration::from_secs(60),
        };
        let (delivery, record) = delivery(fake, |l| l.rate = Some(rate)).await;
        let refused = draft(&delivery, b"x\r\n").await;
        let reply = delivery
            .finish(
                refused,
                0,
                &envelope("refused@example.com", &["b@example.org"]),
            )
            .await;
        assert_eq!(reply.code, 550);
        let first = draft(&delivery, b"x\r\n").await;
        assert!(
            delivery
                .finish(first, 0, &envelope("a@example.com", &["b@example.org"]))
                .await
                .is_positive()
        );
        let second = draft(&delivery, b"x\r\n").await;
        let reply = delivery
            .finish(second, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert_eq!(reply, Reply::channel_limited("relay"));
        assert_eq!(record.txns().len(), 1);
    }

    /// Sessions begun before a reload finish with the old generation: a channel the reload
    /// changed (here its password) must still draw from one rate window with the new
    /// sessions, or both generations would each let the full rate through.
    #[tokio::test]
    async fn a_reload_that_changes_a_channel_keeps_one_rate_window_for_old_and_new_sessions() {
        let rate = Rate {
            count: 2,
            per: Duration::from_secs(60),
        };
        let (old, record) = delivery(plain_fake(), |l| l.rate = Some(rate)).await;
        let first = draft(&old, b"x\r\n").await;
        let sent = old
            .finish(first, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert!(sent.is_positive(), "{sent}");
        let mut changed = (**old.config()).clone();
        if let ChannelKind::Smtp(t) = &mut changed.channels[0].kind {
            t.password = Some(crate::config::Secret::new("rotated"));
        }
        let changes = ChannelChanges {
            changed: vec!["relay".into()],
            ..Default::default()
        };
        let new = old.reload(Arc::new(changed), &changes).unwrap();
        old.apply(&new, &changes).await;
        // A session still on the old generation sends the second message of the window…
        let second = draft(&old, b"x\r\n").await;
        let sent = old
            .finish(second, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert!(sent.is_positive(), "{sent}");
        // …so a new session finds the window full.
        let third = draft(&new, b"x\r\n").await;
        let reply = new
            .finish(third, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert_eq!(reply, Reply::channel_limited("relay"));
        assert_eq!(record.txns().len(), 2);
    }

    /// Relay mode never splits a message: one with more recipients than the channel's
    /// day quota could never go, so the client hears `452 4.5.3`, not a `451` it would
    /// retry for ever; also in a session begun before a reload lowered the quota (the
    /// old generation's limiter takes the new limits).
    #[tokio::test]
    async fn more_recipients_than_a_days_quota_is_452_also_after_a_reload_lowers_it() {
        let (old, record) = delivery(plain_fake(), |l| l.recipients_per_day = Some(3)).await;
        let three = envelope("a@example.com", &["b@x.org", "c@x.org", "d@x.org"]);
        let mut lowered = (**old.config()).clone();
        lowered.channels[0].limits.recipients_per_day = Some(2);
        let changes = ChannelChanges {
            changed: vec!["relay".into()],
            ..Default::default()
        };
        let new = old.reload(Arc::new(lowered), &changes).unwrap();
        old.apply(&new, &changes).await;
        for generation in [&old, &new] {
            let d = draft(generation, b"x\r\n").await;
            let reply = generation.finish(d, 0, &three).await;
            assert_eq!(reply, Reply::too_many_recipients(2));
        }
        assert_eq!(record.txns().len(), 0);
    }

    /// A reload that lowers a channel's rate applies it to the messages already counted,
    /// for old and new sessions alike.
    #[tokio::test]
    async fn a_reload_that_lowers_a_rate_counts_what_was_sent_before_it() {
        let rate = |count| Rate {
            count,
            per: Duration::from_secs(60),
        };
        let (old, record) = delivery(plain_fake(), |l| l.rate = Some(rate(5))).await;
        for _ in 0..2 {
            let d = draft(&old, b"x\r\n").await;
            let sent = old
                .finish(d, 0, &envelope("a@example.com", &["b@example.org"]))
                .await;
            assert!(sent.is_positive(), "{sent}");
        }
        let mut lowered = (**old.config()).clone();
        lowered.channels[0].limits.rate = Some(rate(2));
        let changes = ChannelChanges {
            changed: vec!["relay".into()],
            ..Default::default()
        };
        let new = old.reload(Arc::new(lowered), &changes).unwrap();
        old.apply(&new, &changes).await;
        for generation in [&old, &new] {
            let d = draft(generation, b"x\r\n").await;
            let reply = generation
                .finish(d, 0, &envelope("a@example.com", &["b@example.org"]))
                .await;
            assert_eq!(reply, Reply::channel_limited("relay"));
        }
        assert_eq!(record.txns().len(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_temporary() {
        provider();
        let port = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = channel(
            "relay",
            ChannelKind::Smtp(smtp_channel(port, TlsMode::None)),
            1,
        );
        let delivery = Delivery::new(Arc::new(config(vec![relay]))).unwrap();
        let draft = draft(&delivery, b"x\r\n").await;
        let reply = delivery
            .finish(draft, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert_eq!(reply, Reply::upstream_unreachable("relay"));
    }

    #[tokio::test]
    async fn relay_mode_streams_a_large_message_to_a_private_temp_file_removed_after() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox");
        let mut config = config(vec![channel(
            "outbox",
            ChannelKind::File {
                dir: outbox.clone(),
            },
            1,
        )]);
        config.server.spool_dir = dir.path().join("spool");
        let tmp = config.server.spool_dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("leftover"), b"from a crash").unwrap();
        let delivery = Delivery::new(Arc::new(config)).unwrap();
        let files = || std::fs::read_dir(&tmp).unwrap().count();
        assert_eq!(files(), 0, "leftovers are removed at start");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp), 0o700);
        let message: Vec<u8> = b"Subject: big\r\n\r\n"
            .iter()
            .copied()
            .chain(
                std::iter::repeat_n(b"0123456789abcdef0123456789abcdef\r\n", 8192)
                    .flatten()
                    .copied(),
            )
            .collect();
        let mut draft = delivery.begin().await.unwrap();
        for piece in message.chunks(4096) {
            draft.write(piece).await.unwrap();
        }
        let id = draft.id().to_string();
        let file = tmp.join(&id);
        assert!(file.exists(), "beyond 64 KiB the message is on disk");
        assert_eq!(mode(&file), 0o600);
        let reply = delivery
            .finish(draft, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert!(reply.is_positive(), "{reply}");
        assert_eq!(
            std::fs::read(outbox.join(format!("{id}.eml"))).unwrap(),
            message
        );
        assert_eq!(files(), 0, "the temp file goes after the delivery");
        // A refused message (too many recipients) leaves nothing behind either.
        let mut draft = delivery.begin().await.unwrap();
        draft.write(&message).await.unwrap();
        drop(draft);
        assert_eq!(files(), 0);
    }

    #[tokio::test]
    async fn relay_mode_compacts_its_events_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = channel(
            "outbox",
            ChannelKind::File {
                dir: dir.path().join("outbox"),
            },
            1,
        );
        outbox.limits.rate = Some(Rate {
            count: 1_000_000,
            per: Duration::from_secs(60),
        });
        let mut config = config(vec![outbox]);
        config.server.spool_dir = dir.path().join("spool");
        let delivery = Delivery::new(Arc::new(config)).unwrap();
        let now = now_ms();
        for i in 0..1500 {
            // Reserved, then taken back (as when the upstream refuses).
            delivery.persist("outbox", now - i, 1, false);
            delivery.persist("outbox", now - i, 1, true);
        }
        let log = delivery.counters.as_ref().unwrap().events_path("outbox");
        let lines = || std::fs::read_to_string(&log).unwrap().lines().count();
        let deadline = Instant::now() + Duration::from_secs(10);
        // A compaction carries the lines appended while it ran; the next append after it
        // starts another one if those are still many.
        while lines() > 1100 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            delivery.persist("outbox", now, 1, false);
            delivery.persist("outbox", now, 1, true);
        }
        assert!(lines() <= 1100, "log not compacted: {} lines", lines());
    }

    #[tokio::test]
    async fn a_file_channel_stores_under_the_drafts_id() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox");
        let mut config = config(vec![channel(
            "outbox",
            ChannelKind::File {
                dir: outbox.clone(),
            },
            1,
        )]);
        config.server.spool_dir = dir.path().join("spool");
        let config = Arc::new(config);
        let delivery = Delivery::new(config).unwrap();
        let draft = draft(&delivery, b"Subject: x\r\n\r\nbody\r\n").await;
        let id = draft.id().to_string();
        let reply = delivery
            .finish(draft, 0, &envelope("a@example.com", &["b@example.org"]))
            .await;
        assert_eq!(reply, Reply::stored_in_file("outbox", &format!("{id}.eml")));
        assert_eq!(
            std::fs::read(outbox.join(format!("{id}.eml"))).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
    }
}
