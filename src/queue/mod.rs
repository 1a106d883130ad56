//! Queue mode: store-and-forward delivery (SPEC §6, §7).
//!
//! A message is received straight into `spool_dir/tmp/<id>` ([`spool::SpoolDraft`]), made
//! durable and committed into `spool_dir/queue/` ([`Queue::finish`]) before the client
//! hears `250 2.0.0 queued as <id>`. One task per channel ([`worker`]) then delivers the
//! channel's messages at the pace its limits allow, retries temporary failures with
//! backoff, holds the channel on a provider quota reply, stops it when its credentials
//! are refused, and moves permanent failures to `failed/` with a DSN ([`dsn`]) to the
//! sender. [`admin`] has the `mailgate queue` commands, safe while the proxy runs.
//!
//! Guarantees: an acknowledged message is on disk (file and directory fsync'd); a crash
//! at any moment loses none; a message is delivered twice only if the process dies
//! between the upstream's 250 and the spool update that records it (at-least-once).

pub mod admin;
mod attempt;
pub mod classify;
pub mod draft;
pub mod dsn;
pub mod spool;
pub mod worker;

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ChannelId, Config};
use crate::message::Envelope;
use crate::reply::Reply;
use crate::state::LocalState;
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
}

/// How often the running proxy looks for `mailgate queue retry` requests.
pub const CONTROL_POLL: Duration = Duration::from_millis(500);

/// The durable queue of a running proxy.
pub struct Queue {
    config: Arc<Config>,
    spool: Spool,
    /// Channel health and rate counters, beside the spool.
    state: LocalState,
    senders: Vec<mpsc::UnboundedSender<Event>>,
    receivers: Mutex<Vec<mpsc::UnboundedReceiver<Event>>>,
    /// Held for the life of the queue: one proxy per spool.
    _lock: File,
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
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::fsutil::FILE_MODE)
            .open(spool.root.join("lock"))
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
        let (senders, receivers) = config
            .channels
            .iter()
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let state = LocalState::new(&spool.root);
        Ok(Arc::new(Queue {
            config,
            spool,
            state,
            senders,
            receivers: Mutex::new(receivers),
            _lock: lock,
        }))
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

    /// Makes a received message durable and queues it; the reply for the client is
    /// `250 2.0.0 queued as <id>` only once file, state and directories are fsync'd.
    pub async fn finish(
        &self,
        mut draft: SpoolDraft,
        channel: ChannelId,
        envelope: &Envelope,
    ) -> Reply {
        let id = draft.id().to_string();
        let Some(ch) = self.config.channels.get(channel) else {
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
        // split across transactions, so it must fit in one.
        if let Some(max) = self
            .config
            .graph_on_path(channel)
            .and_then(|g| self.config.channels[g].limits.max_recipients)
            && envelope.recipients.len() > max
        {
            tracing::info!(id, channel = %name, rcpts = envelope.recipients.len(), max, "refused: more recipients than one Graph request takes");
            return Reply::too_many_recipients(max);
        }
        let state = MessageState::new(&id, &name, envelope, draft.len(), spool::now_ms());
        let committed = async {
            let closed = draft.close().await?;
            let spool = self.spool.clone();
            let state = state.clone();
            tokio::task::spawn_blocking(move || {
                closed.write_out(&spool)?;
                spool.commit(&closed.path, &state)
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
        self.notify(
            channel,
            Event::Queued {
                id: id.clone(),
                due_ms: state.next_attempt_ms,
                pending: state.pending(),
            },
        );
        Reply::queued(&id)
    }

    /// Resumes every channel (clears broken and held states) and makes every message due
    /// now: what `queue retry --all` and a reload do.
    pub fn resume_all(&self) {
        for sender in &self.senders {
            let _ = sender.send(Event::Retry(None));
        }
    }

    fn notify(&self, channel: ChannelId, event: Event) {
        if let Some(sender) = self.senders.get(channel) {
            // The receiver is gone only while shutting down: the message is on disk anyway.
            let _ = sender.send(event);
        }
    }

    /// Runs the channel workers until `shutdown`; then lets transactions in flight finish
    /// (bounded) and returns. Call once.
    pub async fn run(self: Arc<Self>, transport: Arc<dyn Transport>, shutdown: CancellationToken) {
        let receivers = std::mem::take(&mut *self.receivers.lock().expect("queue receivers"));
        if receivers.is_empty() && !self.config.channels.is_empty() {
            tracing::error!("queue: run called twice");
            return;
        }
        let tracker = TaskTracker::new();
        for (channel, rx) in receivers.into_iter().enumerate() {
            let task = worker::ChannelTask::new(self.clone(), transport.clone(), channel, rx);
            tracker.spawn(task.run(shutdown.clone()));
        }
        self.rescan().await;
        tracker.close();
        let control = self.clone();
        let poll = shutdown.clone();
        tracker.spawn(async move {
            while !poll.is_cancelled() {
                control.poll_control().await;
                tokio::select! {
                    _ = poll.cancelled() => {}
                    _ = tokio::time::sleep(CONTROL_POLL) => {}
                }
            }
        });
        tracker.wait().await;
    }

    /// Hands every queued message to its channel's worker.
    async fn rescan(&self) {
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
            match self.config.channel_id(&state.channel) {
                Some(channel) => self.notify(
                    channel,
                    Event::Queued {
                        id: state.id.clone(),
                        due_ms: state.next_attempt_ms,
                        pending: state.pending(),
                    },
                ),
                None => tracing::error!(
                    id = state.id,
                    channel = state.channel,
                    "queue: message for a channel that is no longer configured stays queued"
                ),
            }
        }
        if count > 0 {
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
                        .and_then(|state| self.config.channel_id(&state.channel));
                    match channel {
                        Some(channel) => {
                            tracing::info!(id, "queue: retry requested");
                            self.notify(channel, Event::Retry(Some(id)));
                        }
                        None => tracing::warn!(
                            id,
                            "queue: retry requested for a message not in the queue"
                        ),
                    }
                }
            }
        }
    }
}
