//! One task per channel: schedules the channel's messages, honours its limits, runs up
//! to `connections` upstream transactions at once, and applies each outcome to the
//! message's state file.
//!
//! A message with more pending recipients than the channel takes per transaction
//! (`max_recipients`, and never more than `recipients_per_day`) goes out in several
//! transactions; after each, the state file records which recipients are done, so a
//! crash never resends those. A graph channel is the exception: Graph sends to every
//! recipient the headers name, so its transaction carries the whole envelope and waits
//! until the day window has room for all of it; a message it could never take (after a
//! reload lowered its limits) fails with a DSN saying why, or, lent by a broken channel,
//! waits for that channel. Each transaction counts as one message against `rate` and
//! its recipients against `recipients_per_day` when it starts (conservative: a failed
//! attempt counts too), and once it ends, from its end: providers count arrivals, and a
//! window counted from the start lets a quick burst arrive sooner than a window after a
//! slow one. An attempt that sends nothing (the message was locked or gone, or Graph
//! cannot take it) counts nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::attempt::Attempt;
use super::spool::now_ms;
use super::{Generation, Queue};
use crate::config::ChannelId;
use crate::metrics::{self, ChannelState};
use crate::state::shared::Reserved;
use crate::state::{Backend, Counters, Health, format_time};

mod counting;
mod ended;
mod health;
mod take;
use health::{HealthWriter, SharedView};
use take::Take;

/// Longest a single upstream transaction may take, on top of the upstream's own
/// per-command timeouts (a large message on a slow link).
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long shutdown waits for transactions in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// A message someone else holds the lock on (the CLI, briefly) is tried again after this.
pub(super) const BUSY_RETRY_MS: u64 = 1000;

/// After a failed write of the rate counters (a full disk), the channel tries again this
/// much later.
pub(super) const STATE_RETRY_MS: u64 = 2000;

/// With the shared backend, how often a channel looks at the health and `queue retry`
/// requests other hosts left in Redis.
pub const SHARED_POLL: Duration = Duration::from_secs(1);

/// What a channel task hears.
#[derive(Debug)]
pub enum Event {
    /// A message is queued (new, or found at start-up).
    Queued {
        /// Queue id.
        id: String,
        /// Earliest attempt (unix ms).
        due_ms: u64,
        /// Recipients still pending.
        pending: usize,
    },
    /// `queue retry`: this message (or every one, `None`) is due now; the channel resumes.
    Retry(Option<String>),
    /// A reload left the channel unchanged: deliver with the new generation, where the
    /// channel has this id. A broken channel is tried again; mail lent to this channel
    /// goes back to its own (a reload ends every hand-over to a fallback).
    Reload(Generation, ChannelId),
    /// A message of channel `owner` handed over while `owner` is broken because its
    /// provider refuses how it authenticates (SPEC §7 "Fallback"): deliver it here.
    Lent {
        /// Queue id.
        id: String,
        /// Earliest attempt (unix ms).
        due_ms: u64,
        /// Recipients still pending.
        pending: usize,
        /// The name of the channel it belongs to (and goes back to once that one resumes).
        owner: String,
    },
}

/// What a channel needs to do after a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEffect {
    /// Nothing.
    None,
    /// Provider quota reached (the reply).
    Hold(String),
    /// Credentials refused (the reply or error).
    Broken(String),
    /// The provider refuses the way the channel authenticates (`535 5.7.139`, `550
    /// 5.7.30`, an OAuth grant refused): broken, and its mail may go over its fallback.
    AuthMethodRefused(String),
}

/// The result of one delivery step, back to the channel task.
#[derive(Debug)]
pub(super) struct Report {
    /// The message.
    pub(super) id: String,
    /// The message stays queued: due time and pending recipients.
    pub(super) next: Option<(u64, usize)>,
    /// What the channel must do.
    pub(super) effect: ChannelEffect,
    /// A DSN was queued on this channel: its id and recipient count.
    pub(super) dsn: Option<(String, usize)>,
    /// No transaction started (the message was locked or gone): what the worker counted
    /// against the channel's windows for it, to take back.
    pub(super) uncount: Option<Counted>,
    /// A transaction ran: what it was counted as, to count from its end instead
    /// ([`crate::ratelimit::ChannelLimiter::settle`]).
    pub(super) settle: Option<Counted>,
    /// A message lent to this channel that it cannot send (Graph, and some recipients are
    /// done already): it waits, unscheduled, until it goes back to its own channel.
    pub(super) parked: bool,
}

/// What a transaction was counted as against its channel's windows when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Counted {
    /// In the local counters: (unix ms, recipients).
    Local(u64, u64),
    /// In the shared backend: the reservation's token.
    Shared(String),
}

/// The scheduler of one channel.
pub struct ChannelTask {
    queue: Arc<Queue>,
    generation: Generation,
    /// The channel's id in `generation.config`.
    channel: ChannelId,
    name: String,
    connections: usize,
    take: Take,
    due: BTreeSet<(u64, String)>,
    entries: HashMap<String, (u64, usize)>,
    in_flight: HashSet<String>,
    /// Each delivery task's message: (id, pending, recipients of the attempt). A task
    /// that ends without a report (a panic, a cancellation) still frees its message.
    tasks: HashMap<tokio::task::Id, (String, usize, usize)>,
    health: Health,
    counters: Option<Counters>,
    health_writer: Arc<HealthWriter>,
    /// Mail is due but the channel's own rate or quota window makes it wait.
    waiting_on_limits: bool,
    rx: mpsc::UnboundedReceiver<Event>,
    /// `fallback = "…"` of this channel (its name: ids differ between generations).
    fallback: Option<String>,
    /// Broken because the provider refuses the auth method, with a fallback: queued and
    /// new mail goes there.
    handing_over: bool,
    /// Messages other channels lent to this one, with their owner's name.
    borrowed: HashMap<String, String>,
    /// Borrowed messages this channel cannot send ([`Report::parked`]), with their
    /// pending recipients: they go back with the rest of `borrowed`.
    parked: HashMap<String, usize>,
    /// The shared backend, when `[state] backend = "redis"`.
    shared: Option<SharedView>,
}

impl ChannelTask {
    /// A task for `channel`; its health and counters are loaded when it runs.
    pub fn new(
        queue: Arc<Queue>,
        generation: Generation,
        channel: ChannelId,
        rx: mpsc::UnboundedReceiver<Event>,
    ) -> Self {
        let ch = &generation.config.channels[channel];
        let name = ch.name.clone();
        let connections = ch.limits.connections.max(1);
        let take = Take::of(ch);
        let fallback = ch
            .fallback
            .map(|f| generation.config.channels[f].name.clone());
        let shared = match &queue.state {
            Backend::Redis(redis) => Some(SharedView {
                redis: redis.clone(),
                retry_seen: None,
                unsaved: None,
            }),
            Backend::Local(_) => None,
        };
        ChannelTask {
            queue,
            generation,
            channel,
            name,
            connections,
            take,
            due: BTreeSet::new(),
            entries: HashMap::new(),
            in_flight: HashSet::new(),
            tasks: HashMap::new(),
            health: Health::Ok,
            counters: None,
            health_writer: Arc::default(),
            waiting_on_limits: false,
            rx,
            fallback,
            handing_over: false,
            borrowed: HashMap::new(),
            parked: HashMap::new(),
            shared,
        }
    }

    /// Hands every message scheduled here to the fallback (their state files keep this
    /// channel's name, so a restart brings them back).
    fn hand_over_all(&mut self) {
        let Some(fallback) = self.fallback.clone() else {
            return;
        };
        let entries: Vec<(String, (u64, usize))> = self.entries.drain().collect();
        self.due.clear();
        let count = entries.len();
        for (id, (due_ms, pending)) in entries {
            // Mail lent to this channel keeps its own owner, where it goes back.
            let owner = self
                .borrowed
                .remove(&id)
                .unwrap_or_else(|| self.name.clone());
            self.queue.notify(
                &fallback,
                Event::Lent {
                    id,
                    due_ms,
                    pending,
                    owner,
                },
            );
        }
        if count > 0 {
            tracing::warn!(channel = %self.name, fallback = %fallback, messages = count, "queue: queued mail handed to the fallback channel");
        }
    }

    /// Schedules and delivers until `shutdown`, then waits (bounded) for transactions in flight.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.load_state().await;
        let mut deliveries: JoinSet<Report> = JoinSet::new();
        let mut poll = tokio::time::interval(SHARED_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.dispatch(&mut deliveries).await;
            self.publish();
            // A due time read from a state file or Redis may be anything: the wait is at
            // most an hour (then the schedule is looked at again), so no instant overflows.
            let wait_ms = wake.map_or(3_600_000, |at| at.saturating_sub(now_ms()).min(3_600_000));
            let sleep = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = self.rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
                Some(done) = deliveries.join_next_with_id(), if !deliveries.is_empty() => {
                    self.finished(done).await;
                }
                _ = tokio::time::sleep_until(sleep) => {}
                _ = poll.tick(), if self.shared.is_some() => self.sync_shared().await,
            }
            // Everything already there before dispatching again: the shared backend then
            // reserves for all the connections freed meanwhile in one round trip.
            while let Some(done) = deliveries.try_join_next_with_id() {
                self.finished(done).await;
            }
            while let Ok(event) = self.rx.try_recv() {
                self.handle(event).await;
            }
        }
        // Stopped by a reload rather than the proxy's shutdown: the channel's health is
        // its successor's now (or the channel is gone), so the last reports do not set it.
        let superseded = !self.queue.shutting_down();
        // A transaction cut short may have been taken by the upstream already and would be
        // sent again: a reload lets it finish (each is bounded by TRANSACTION_TIMEOUT);
        // only the proxy's shutdown cuts it, after SHUTDOWN_GRACE.
        let stopping = self.queue.shutdown_token();
        let limit = async move {
            if superseded {
                tokio::select! {
                    _ = tokio::time::sleep(TRANSACTION_TIMEOUT) => {}
                    _ = async {
                        stopping.cancelled().await;
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                    } => {}
                }
            } else {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            }
        };
        let drain = async {
            while let Some(done) = deliveries.join_next_with_id().await {
                if let Some(mut report) = self.report_of(done).await {
                    self.tell_successor(&report);
                    if superseded {
                        report.effect = ChannelEffect::None;
                    }
                    self.apply(report).await;
                }
            }
        };
        let drained = tokio::select! {
            _ = drain => true,
            _ = limit => false,
        };
        if !drained {
            tracing::warn!(channel = %self.name, "queue: shutdown interrupted transactions in flight; they will be retried");
            deliveries.abort_all();
        }
        // A successor (or, for a removed channel, nobody) owns the channel's gauges now:
        // this worker's last view would overwrite them or bring a removed channel back.
        if !superseded {
            self.publish();
        }
    }

    /// The channel's queue depth and state, for the metrics.
    fn publish(&self) {
        metrics::queued(
            &self.name,
            self.entries.len() + self.in_flight.len() + self.parked.len(),
        );
        let state = match &self.health {
            Health::Broken { .. } => ChannelState::Broken,
            Health::Held { until_ms, .. } if *until_ms > now_ms() => ChannelState::Limited,
            _ if self.waiting_on_limits => ChannelState::Limited,
            _ => ChannelState::Ok,
        };
        metrics::channel_state(&self.name, state);
        metrics::status::publish_queue(
            &self.name,
            &self.health,
            self.entries.len() + self.in_flight.len(),
            self.due.first().map(|(due, _)| *due),
            self.handing_over,
            || {
                let ids = self.entries.keys().chain(self.in_flight.iter());
                ids.filter_map(|id| metrics::status::id_time_ms(id)).min()
            },
        );
    }

    /// While stopping: a reload may have started this channel's next worker already, and
    /// it has to hear of a message still pending or a DSN this transaction queued (a
    /// duplicate notice is ignored; without a worker the message waits in the spool).
    fn tell_successor(&self, report: &Report) {
        let next = report
            .next
            .map(|(due_ms, pending)| (report.id.clone(), due_ms, pending));
        let dsn = report
            .dsn
            .clone()
            .map(|(id, pending)| (id, now_ms(), pending));
        for (id, due_ms, pending) in next.into_iter().chain(dsn) {
            self.queue.notify(
                &self.name,
                Event::Queued {
                    id,
                    due_ms,
                    pending,
                },
            );
        }
    }

    fn schedule(&mut self, id: String, due: u64, pending: usize) {
        if let Some((old, _)) = self.entries.insert(id.clone(), (due, pending)) {
            self.due.remove(&(old, id.clone()));
        }
        self.due.insert((due, id));
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Queued {
                id,
                due_ms,
                pending,
            } => {
                if self.handing_over
                    && let Some(fallback) = &self.fallback
                {
                    tracing::info!(id, channel = %self.name, "queue: channel broken (auth method refused); new message goes over its fallback");
                    self.queue.notify(
                        fallback,
                        Event::Lent {
                            id,
                            due_ms,
                            pending,
                            owner: self.name.clone(),
                        },
                    );
                } else if !self.in_flight.contains(&id)
                    && !self.entries.contains_key(&id)
                    && !self.parked.contains_key(&id)
                {
                    self.schedule(id, due_ms, pending);
                }
            }
            Event::Lent {
                id,
                due_ms,
                pending,
                owner,
            } => {
                if self.handing_over
                    && let Some(fallback) = &self.fallback
                {
                    // Broken itself: on along the chain (a broken channel would sit on it).
                    self.queue.notify(
                        fallback,
                        Event::Lent {
                            id,
                            due_ms,
                            pending,
                            owner,
                        },
                    );
                } else if !self.in_flight.contains(&id)
                    && !self.entries.contains_key(&id)
                    && !self.parked.contains_key(&id)
                {
                    self.borrowed.insert(id.clone(), owner);
                    self.schedule(id, due_ms, pending);
                }
            }
            Event::Reload(generation, channel) => {
                // Same name, transport and limits: counters, health and schedule go on.
                self.fallback = generation.config.channels[channel]
                    .fallback
                    .map(|f| generation.config.channels[f].name.clone());
                self.generation = generation;
                self.channel = channel;
                if matches!(self.health, Health::Broken { .. }) {
                    tracing::info!(channel = %self.name, "queue: broken channel tried again after reload");
                    self.resume().await;
                    self.make_due(None);
                }
                self.return_lent();
            }
            Event::Retry(which) => {
                if self.health != Health::Ok {
                    tracing::info!(channel = %self.name, "queue: channel resumed by retry");
                    self.resume().await;
                }
                self.handing_over = false;
                if which.is_none() {
                    self.return_lent();
                }
                self.make_due(which);
            }
        }
    }

    /// Clears a broken or held state (and reads the counters if they were unreadable);
    /// the channel's own mail stays here again.
    async fn resume(&mut self) {
        self.set_health(Health::Ok).await;
        self.handing_over = false;
        if self.counters.is_none() && self.shared.is_none() {
            self.load_state().await;
        }
    }

    /// Every channel resumes: mail lent to this one goes back to its own channel.
    fn return_lent(&mut self) {
        for (id, pending) in std::mem::take(&mut self.parked) {
            if let Some(owner) = self.borrowed.remove(&id) {
                self.queue.notify(
                    &owner,
                    Event::Queued {
                        id,
                        due_ms: now_ms(),
                        pending,
                    },
                );
            }
        }
        let lent: Vec<(String, String)> = self
            .borrowed
            .iter()
            .filter(|(id, _)| !self.in_flight.contains(*id))
            .map(|(id, owner)| (id.clone(), owner.clone()))
            .collect();
        for (id, owner) in lent {
            self.borrowed.remove(&id);
            if let Some((due, pending)) = self.entries.remove(&id) {
                self.due.remove(&(due, id.clone()));
                self.queue.notify(
                    &owner,
                    Event::Queued {
                        id,
                        due_ms: now_ms(),
                        pending,
                    },
                );
            }
        }
    }

    /// Makes this message (or every one, `None`) due now.
    fn make_due(&mut self, which: Option<String>) {
        let now = now_ms();
        let ids: Vec<String> = match which {
            Some(id) => self
                .entries
                .contains_key(&id)
                .then_some(id)
                .into_iter()
                .collect(),
            None => self.entries.keys().cloned().collect(),
        };
        for id in ids {
            let pending = self.entries[&id].1;
            self.schedule(id, now, pending);
        }
    }

    /// Starts every transaction that may start now; returns when to look again.
    async fn dispatch(&mut self, deliveries: &mut JoinSet<Report>) -> Option<u64> {
        let mut now = now_ms();
        self.waiting_on_limits = false;
        match &self.health {
            Health::Broken { .. } => return None,
            Health::Held { until_ms, .. } if *until_ms > now => return Some(*until_ms),
            Health::Held { .. } => {
                tracing::info!(channel = %self.name, "queue: quota window rolled over; channel resumes");
                self.set_health(Health::Ok).await;
            }
            Health::Ok => {}
        }
        // Shared backend: reserved in batches ahead of the loop that starts them.
        // Message id → its reservation's token.
        let mut reserved: HashMap<String, String> = HashMap::new();
        let mut refused: Option<(String, Reserved)> = None;
        while self.in_flight.len() < self.connections {
            let (due, id) = self.due.first().cloned()?;
            if due > now {
                return Some(due);
            }
            let pending = self.entries[&id].1;
            let rcpts = match self.take.size(pending) {
                Ok(rcpts) => rcpts,
                Err(max) => {
                    self.never_fits(deliveries, id, due, pending, max);
                    continue;
                }
            };
            let mut counted = None;
            let limits = &self.generation.config.channels[self.channel].limits;
            if rcpts > 0
                && let Some(view) = &self.shared
                && crate::state::has_windows(limits)
            {
                if reserved.is_empty() && refused.is_none() {
                    // One round trip for this one and the next due ones, as many as
                    // connections are free.
                    let free = self.connections - self.in_flight.len();
                    let batch: Vec<(String, u64)> = self
                        .due
                        .iter()
                        .take_while(|(d, _)| *d <= now)
                        .take(free)
                        .filter_map(|(_, id)| {
                            let n = self.take.size(self.entries[id].1).ok()? as u64;
                            (n > 0).then(|| (id.clone(), n))
                        })
                        .collect();
                    let counts: Vec<u64> = batch.iter().map(|b| b.1).collect();
                    match view.redis.reserve_many(&self.name, limits, &counts).await {
                        Ok((granted, refusal)) => {
                            reserved.extend(
                                batch
                                    .iter()
                                    .map(|b| b.0.clone())
                                    .zip(granted.iter().cloned()),
                            );
                            refused = refusal
                                .and_then(|r| Some((batch.get(granted.len())?.0.clone(), r)));
                        }
                        // Never sent past a limit nobody can count: the mail waits.
                        Err(_) => return Some(now_ms() + STATE_RETRY_MS),
                    }
                    now = now_ms();
                }
                if let Some(token) = reserved.remove(&id) {
                    counted = Some(Counted::Shared(token));
                } else {
                    match refused.take() {
                        Some((refused_id, Reserved::Never)) if refused_id == id => {
                            tracing::error!(id, channel = %self.name, rcpts, "queue: the channel's limits can never take this transaction; holding it an hour");
                            self.schedule(id, now + 3_600_000, pending);
                            continue;
                        }
                        Some((_, Reserved::Wait(ms))) => {
                            self.waiting_on_limits = true;
                            return Some(now_ms().saturating_add(ms));
                        }
                        // Not in the batch (cannot happen: the batch is the front of
                        // `due`, taken in order); reserve afresh rather than loop.
                        _ => {
                            reserved.clear();
                            continue;
                        }
                    }
                }
            } else if rcpts > 0 && self.shared.is_none() {
                let Backend::Local(local) = &self.queue.state else {
                    return None;
                };
                let counters = self.counters.as_mut()?;
                match counters.check(now, rcpts as u64) {
                    Ok(()) => {}
                    Err(u64::MAX) => {
                        tracing::error!(id, channel = %self.name, rcpts, "queue: the channel's limits can never take this transaction; holding it an hour");
                        self.schedule(id, now + 3_600_000, pending);
                        continue;
                    }
                    Err(at) => {
                        self.waiting_on_limits = true;
                        return Some(at.max(now.saturating_add(1)));
                    }
                }
                if let Err(e) = counters.record(local, now, rcpts as u64) {
                    // Temporary (a full disk): the message stays due and is tried again.
                    tracing::warn!(id, channel = %self.name, error = %e, retry_ms = STATE_RETRY_MS, "queue: cannot persist rate counters; deferring");
                    return Some(now + STATE_RETRY_MS);
                }
                counted = Some(Counted::Local(now, rcpts as u64));
            }
            self.due.remove(&(due, id.clone()));
            self.entries.remove(&id);
            self.in_flight.insert(id.clone());
            let attempt = Attempt {
                queue: self.queue.clone(),
                generation: self.generation.clone(),
                channel: self.channel,
                rcpts,
                counted,
                never_fits: None,
                lent: self.borrowed.contains_key(&id),
            };
            let task = deliveries.spawn(attempt.run(id.clone()));
            self.tasks.insert(task.id(), (id, pending, rcpts));
        }
        None
    }

    async fn apply(&mut self, report: Report) {
        self.in_flight.remove(&report.id);
        self.recount(&report).await;
        if report.parked && self.borrowed.contains_key(&report.id) {
            let pending = report.next.map_or(0, |(_, pending)| pending);
            self.parked.insert(report.id.clone(), pending);
        } else if let Some((due, pending)) = report.next {
            self.schedule(report.id.clone(), due, pending);
        } else {
            self.borrowed.remove(&report.id);
        }
        if let Some((dsn, pending)) = report.dsn {
            self.schedule(dsn, now_ms(), pending);
        }
        match report.effect {
            ChannelEffect::None => {}
            ChannelEffect::Hold(reason) => {
                let now = now_ms();
                let until_ms = match (&self.shared, &self.counters) {
                    (Some(view), _) => match view.redis.events(&self.name).await {
                        Ok(events) => crate::state::hold_until(&events, now),
                        Err(_) => now + 3_600_000,
                    },
                    (None, Some(counters)) => counters.hold_until(now),
                    (None, None) => now + 3_600_000,
                };
                tracing::warn!(
                    channel = %self.name,
                    until = %format_time(until_ms),
                    reason,
                    "queue: provider quota reached; channel held"
                );
                self.set_health(Health::Held { until_ms, reason }).await;
            }
            ChannelEffect::AuthMethodRefused(reason) if self.fallback.is_some() => {
                let fallback = self.fallback.clone();
                if !self.handing_over {
                    tracing::error!(
                        channel = %self.name,
                        fallback = fallback.as_deref().unwrap_or(""),
                        reason,
                        "CHANNEL BROKEN: the provider refuses how this channel authenticates; its queued and new mail goes over its fallback until `mailgate queue retry --all`, a reload or a restart"
                    );
                    self.set_health(Health::Broken {
                        since_ms: now_ms(),
                        reason: format!(
                            "{reason} (mail goes over fallback {})",
                            fallback.as_deref().unwrap_or("")
                        ),
                        auth_method_refused: true,
                    })
                    .await;
                    self.handing_over = true;
                }
                self.hand_over_all();
            }
            ChannelEffect::Broken(reason) => self.mark_broken(reason, false).await,
            ChannelEffect::AuthMethodRefused(reason) => self.mark_broken(reason, true).await,
        }
        if self.handing_over {
            self.hand_over_all();
        }
    }
}
