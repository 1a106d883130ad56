//! Queue mode: store-and-forward delivery (SPEC §6, §7).
//!
//! A message is received in memory, or beyond 64 KiB into `spool_dir/tmp/<id>`
//! ([`spool::SpoolDraft`]), made durable and committed into `spool_dir/queue/`
//! ([`Queue::finish`]; a small message through the shared commit log, [`journal`])
//! before the client hears `250 2.0.0 queued as <id>`. One task per channel
//! ([`worker`]) then delivers the channel's messages at the pace its limits allow,
//! retries temporary failures with backoff, holds the channel on a provider quota reply,
//! stops it when its credentials are refused, and moves permanent failures to `failed/`
//! with a DSN ([`dsn`]) to the sender. [`admin`] has the `mailgate queue` commands, safe
//! while the proxy runs. Workers are kept by channel name: a reload
//! ([`Queue::reconfigure`]) starts, stops or restarts them; a message whose channel is not
//! configured waits in the spool untouched.
//!
//! Guarantees: an acknowledged message is on disk (file and directory fsync'd); a crash
//! at any moment loses none; a message is delivered twice only if the process dies
//! between the upstream's 250 and the spool update that records it (at-least-once).

pub mod admin;
mod attempt;
pub mod classify;
pub mod draft;
pub mod dsn;
pub mod journal;
pub mod ledger;
pub mod spool;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ChannelId, Config};
use crate::message::Envelope;
use crate::reply::Reply;
use crate::state::Backend;
use crate::upstream::{Body, Outcome, Upstreams};

pub use crate::state::format_time;
pub use draft::SpoolDraft;
pub use spool::{MessageState, Spool};
use worker::Event;

/// Sends one upstream transaction; [`Upstreams`] in the proxy, a fake in tests.
pub trait Transport: Send + Sync + 'static {
    /// Sends message `id` (`body`) to `envelope.recipients` over `channel`; refused
    /// recipients are listed in the outcome (never all-or-nothing).
    fn send<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

    /// [`Transport::send`] with the spool entry to record a Graph draft in.
    fn send_recorded<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
        _ledger: &'a ledger::SpoolLedger,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        self.send(channel, id, envelope, body)
    }
}

impl Transport for Upstreams {
    fn send<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(Upstreams::send_with_id(
            self,
            channel,
            Some(id),
            envelope,
            body,
            false,
        ))
    }

    fn send_recorded<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
        ledger: &'a ledger::SpoolLedger,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(Upstreams::send_recorded(
            self,
            channel,
            Some(id),
            envelope,
            body,
            false,
            Some(ledger),
        ))
    }
}

/// How often the running proxy looks for `mailgate queue retry` requests.
pub const CONTROL_POLL: Duration = Duration::from_millis(500);

/// A config and the transports built for it: what a channel's worker delivers with. A
/// reload hands the workers of unchanged channels the new generation (their channel's
/// [`ChannelId`] may differ in it; their pools are shared).
#[derive(Clone)]
pub struct Generation {
    /// The config.
    pub config: Arc<Config>,
    /// Its transports, indexed by the config's [`ChannelId`]s.
    pub transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({})", self.config.path.display())
    }
}

/// The durable queue of a running proxy.
pub struct Queue {
    spool: Spool,
    /// Channel health and rate counters, beside the spool.
    state: Backend,
    workers: Mutex<Workers>,
    /// Held for the life of the queue: one proxy per spool.
    _lock: File,
}

/// The channel workers, by channel name.
struct Workers {
    /// The config the queue was opened with, until [`Queue::run`] starts the workers.
    initial: Option<Arc<Config>>,
    /// A reload that came before [`Queue::run`]: the workers start with it.
    reloaded: Option<Generation>,
    running: HashMap<String, WorkerHandle>,
    /// Where workers are spawned (set by [`Queue::run`]).
    tracker: Option<TaskTracker>,
    shutdown: CancellationToken,
}

struct WorkerHandle {
    sender: mpsc::UnboundedSender<Event>,
    /// Stops this worker alone (a child of the proxy's shutdown).
    stop: CancellationToken,
}

/// How a reload changes the channels: [`crate::reload::diff_channels`] makes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelChanges {
    /// New names: a worker starts.
    pub added: Vec<String>,
    /// Gone: the worker stops; the channel's mail stays in the spool.
    pub removed: Vec<String>,
    /// Transport or limits differ: the worker is restarted, its pool rebuilt.
    pub changed: Vec<String>,
    /// The same: the worker keeps running (counters, health, pool), with the new config.
    pub unchanged: Vec<String>,
}

impl Queue {
    /// Opens the spool: creates its folders, takes its lock (one proxy per spool), removes
    /// what was never acknowledged and finishes half-done moves.
    pub fn open(config: Arc<Config>) -> Result<Arc<Queue>, String> {
        let spool = Spool::new(&config.server.spool_dir);
        let root = spool.root.display().to_string();
        spool
            .create_dirs()
            .map_err(|e| format!("spool {root}: {e}"))?;
        let lock = crate::fsutil::open_lock(&spool.root.join("lock"))
            .map_err(|e| format!("spool {root}: {e}"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "spool {root} is in use by another mailgate process"
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(format!("spool {root}: lock: {e}")),
        }
        let removed = spool
            .recover()
            .map_err(|e| format!("spool {root}: recovery: {e}"))?;
        if removed > 0 {
            tracing::info!(removed, spool = %root, "spool: removed files of messages never acknowledged");
        }
        let state = Backend::of(&config)?;
        Ok(Arc::new(Queue {
            spool,
            state,
            workers: Mutex::new(Workers {
                initial: Some(config),
                reloaded: None,
                running: HashMap::new(),
                tracker: None,
                shutdown: CancellationToken::new(),
            }),
            _lock: lock,
        }))
    }

    fn workers(&self) -> MutexGuard<'_, Workers> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Starts a message: creates its file in `tmp/`.
    pub async fn begin(&self) -> Result<SpoolDraft, Reply> {
        let id = crate::message::new_id();
        SpoolDraft::create(&self.spool, id.clone())
            .await
            .map_err(|e| {
                tracing::error!(id, error = %e, "spool: cannot create message file");
                Reply::local_error()
            })
    }

    /// Makes a received message durable and queues it for channel `channel` of `config`
    /// (the session's config: a reload may have changed the queue's since); the reply for
    /// the client is `250 2.0.0 queued as <id>` only once message and envelope are
    /// fsync'd, file and directory: in the commit log, or in their own files.
    pub async fn finish(
        &self,
        mut draft: SpoolDraft,
        config: &Config,
        channel: ChannelId,
        envelope: &Envelope,
    ) -> Reply {
        let id = draft.id().to_string();
        let Some(ch) = config.channels.get(channel) else {
            tracing::error!(id, channel, "queue: no such channel");
            return Reply::local_error();
        };
        let name = ch.name.clone();
        // The provider would refuse it anyway: tell the client now rather than bounce later.
        if let Some(max) = ch.limits.max_message_size
            && draft.len() > max
        {
            tracing::info!(id, channel = %name, size = draft.len(), max, "refused: over the channel's size limit");
            return Reply::too_big(max);
        }
        // Graph sends to every header recipient in one request: such a message is never
        // split across transactions, so it must fit in one and in a day's quota.
        if let Some((max, _)) = config.graph_recipient_cap(channel)
            && envelope.recipients.len() > max
        {
            tracing::info!(id, channel = %name, rcpts = envelope.recipients.len(), max, "refused: more recipients than Graph can ever send at once on this channel");
            return Reply::too_many_recipients(max);
        }
        let state = MessageState::new(&id, &name, envelope, draft.len(), spool::now_ms());
        let committed = async {
            let closed = draft.close().await?;
            let spool = self.spool.clone();
            let state = state.clone();
            tokio::task::spawn_blocking(move || match &closed.inline {
                Some(bytes) => spool.commit_small(bytes, &state),
                None => spool.commit(&closed.path, &state),
            })
            .await
            .map_err(io::Error::other)?
        }
        .await;
        drop(draft);
        if let Err(e) = committed {
            tracing::error!(id, channel = %name, error = %e, "spool: cannot store message");
            return Reply::local_error();
        }
        let event = Event::Queued {
            id: id.clone(),
            due_ms: state.next_attempt_ms,
            pending: state.pending(),
        };
        if !self.notify(&name, event) && self.workers().tracker.is_some() {
            // Routed before a reload removed its channel: it waits for the channel's return.
            tracing::warn!(id, channel = %name, "queue: the message's channel was removed by a reload; it stays in the spool until the channel is configured again");
        }
        Reply::queued(&id)
    }

    /// Resumes every channel (clears broken and held states) and makes every message due
    /// now: what `queue retry --all` and a reload do.
    pub fn resume_all(&self) {
        for worker in self.workers().running.values() {
            let _ = worker.sender.send(Event::Retry(None));
        }
    }

    /// Whether the proxy is stopping (not merely one worker, as a reload does).
    fn shutting_down(&self) -> bool {
        self.workers().shutdown.is_cancelled()
    }

    /// Cancelled when the proxy stops.
    fn shutdown_token(&self) -> CancellationToken {
        self.workers().shutdown.clone()
    }

    /// Whether channel `name` has a worker now.
    fn has_worker(&self, name: &str) -> bool {
        self.workers().running.contains_key(name)
    }

    /// Tells channel `channel`'s worker; false when it has none.
    fn notify(&self, channel: &str, event: Event) -> bool {
        match self.workers().running.get(channel) {
            Some(worker) => {
                // The receiver is gone only while stopping: the message is on disk anyway.
                let _ = worker.sender.send(event);
                true
            }
            None => false,
        }
    }

    /// Starts the worker of channel `channel` of `generation` (under the workers' lock).
    fn start_worker(
        self: &Arc<Self>,
        workers: &mut Workers,
        generation: &Generation,
        channel: ChannelId,
    ) {
        let Some(tracker) = workers.tracker.clone() else {
            return;
        };
        let (sender, rx) = mpsc::unbounded_channel();
        let stop = workers.shutdown.child_token();
        let task = worker::ChannelTask::new(self.clone(), generation.clone(), channel, rx);
        tracker.spawn(task.run(stop.clone()));
        let name = generation.config.channels[channel].name.clone();
        workers.running.insert(name, WorkerHandle { sender, stop });
    }

    /// A reload: stops the workers of removed and changed channels (their transactions in
    /// flight finish, bounded), starts those of added and changed ones and hands them their
    /// messages from the spool, and gives the workers of unchanged channels the new
    /// generation (a broken one resumes). Before [`Queue::run`], the workers will start
    /// with `generation` instead of the first one.
    pub async fn reconfigure(self: &Arc<Self>, generation: Generation, changes: &ChannelChanges) {
        let started: HashSet<String> = {
            let mut workers = self.workers();
            if workers.tracker.is_none() {
                workers.reloaded = Some(generation);
                return;
            }
            if workers.shutdown.is_cancelled() {
                return;
            }
            for name in changes.removed.iter().chain(&changes.changed) {
                if let Some(worker) = workers.running.remove(name) {
                    worker.stop.cancel();
                }
            }
            for name in &changes.unchanged {
                let (Some(worker), Some(channel)) = (
                    workers.running.get(name),
                    generation.config.channel_id(name),
                ) else {
                    continue;
                };
                let _ = worker
                    .sender
                    .send(Event::Reload(generation.clone(), channel));
            }
            let mut started = HashSet::new();
            for name in changes.added.iter().chain(&changes.changed) {
                if let Some(channel) = generation.config.channel_id(name) {
                    self.start_worker(&mut workers, &generation, channel);
                    started.insert(name.clone());
                }
            }
            started
        };
        // Every message, not only the started channels': one lent to a fallback whose
        // worker was just stopped goes back to its own channel this way (a duplicate
        // notice is ignored).
        self.rescan(&started, false).await;
    }

    /// Runs the channel workers until `shutdown`; then lets transactions in flight finish
    /// (bounded) and returns. Call once.
    pub async fn run(self: Arc<Self>, transport: Arc<dyn Transport>, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        {
            let mut workers = self.workers();
            let Some(config) = workers.initial.take() else {
                tracing::error!("queue: run called twice");
                return;
            };
            workers.tracker = Some(tracker.clone());
            workers.shutdown = shutdown.clone();
            let generation = workers
                .reloaded
                .take()
                .unwrap_or(Generation { config, transport });
            for channel in 0..generation.config.channels.len() {
                self.start_worker(&mut workers, &generation, channel);
            }
        }
        // After the workers are in place: a message committed before this scan is found
        // by it, one committed after it reaches its worker directly.
        self.rescan(&HashSet::new(), true).await;
        tracker.close();
        let control = self.clone();
        let poll = shutdown.clone();
        tracker.spawn(async move {
            while !poll.is_cancelled() {
                control.poll_control().await;
                control.retire_journal(false).await;
                tokio::select! {
                    _ = poll.cancelled() => {}
                    _ = tokio::time::sleep(CONTROL_POLL) => {}
                }
            }
        });
        tracker.wait().await;
        // A clean stop leaves no journal to replay after a reboot.
        self.retire_journal(true).await;
    }

    /// Retires the journal segments that are due (all of them with `all`): see
    /// [`journal::Journal::retire_due`].
    async fn retire_journal(&self, all: bool) {
        let spool = self.spool.clone();
        let done = tokio::task::spawn_blocking(move || spool.journal().retire_due(all)).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spool: cannot retire a journal segment; tried again later")
            }
            Err(e) => tracing::error!(error = %e, "spool: journal retiring failed"),
        }
    }

    /// Hands every queued message to its channel's worker, due at its next attempt or,
    /// for the channels in `due_now` (added or changed by a reload: the change may be the
    /// fix their mail waited for), now. A message whose channel has no worker stays
    /// queued, untouched (logged one by one `at_start`; a reload logs a count).
    async fn rescan(&self, due_now: &HashSet<String>, at_start: bool) {
        let spool = self.spool.clone();
        let found = tokio::task::spawn_blocking(move || -> io::Result<Vec<MessageState>> {
            let mut states = Vec::new();
            for id in spool.queued_ids()? {
                match spool.read_state(&id) {
                    Ok(Some(state)) => states.push(state),
                    Ok(None) => {}
                    Err(e) => tracing::error!(id, error = %e, "spool: unreadable state file, message left as is"),
                }
            }
            Ok(states)
        })
        .await;
        let states = match found {
            Ok(Ok(states)) => states,
            Ok(Err(e)) => return tracing::error!(error = %e, "spool: cannot scan queue"),
            Err(e) => return tracing::error!(error = %e, "spool: scan failed"),
        };
        let count = states.len();
        for state in states {
            if self.has_worker(&state.channel) {
                self.notify(
                    &state.channel,
                    Event::Queued {
                        id: state.id.clone(),
                        due_ms: if due_now.contains(&state.channel) {
                            state.next_attempt_ms.min(spool::now_ms())
                        } else {
                            state.next_attempt_ms
                        },
                        pending: state.pending(),
                    },
                );
            } else if at_start {
                tracing::error!(
                    id = state.id,
                    channel = state.channel,
                    "queue: message for a channel that is not configured stays queued"
                );
            }
        }
        if count > 0 && at_start {
            tracing::info!(messages = count, "queue: resumed messages from the spool");
        }
    }

    /// Acts on the request files `mailgate queue retry` leaves in `control/`.
    async fn poll_control(&self) {
        let spool = self.spool.clone();
        let requests =
            tokio::task::spawn_blocking(move || admin::take_control_requests(&spool)).await;
        for request in requests.unwrap_or_default() {
            match request {
                None => {
                    tracing::info!("queue: retry of every message requested");
                    self.resume_all();
                }
                Some(id) => {
                    let channel = self
                        .spool
                        .read_state(&id)
                        .ok()
                        .flatten()
                        .map(|state| state.channel)
                        .filter(|channel| self.has_worker(channel));
                    match channel {
                        Some(channel) => {
                            tracing::info!(id, "queue: retry requested");
                            self.notify(&channel, Event::Retry(Some(id)));
                        }
                        None => tracing::warn!(
                            id,
                            "queue: retry requested for a message not in the queue or for a channel that is not configured"
                        ),
                    }
                }
            }
        }
    }
}
