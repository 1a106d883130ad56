//! Channel transports: pooled upstream SMTP connections (lettre), Microsoft Graph
//! `sendMail` (HTTPS) and the `file` drop.
//!
//! One [`Upstreams`] per running proxy; each SMTP channel has a pool of idle
//! connections and a semaphore so that no more than `connections` are open at once.
//! Laid out like lettre's `transport/smtp`, one file per concern:
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Upstreams`], the transport of each channel, dispatch and the attempt log |
//! | [`error`] | [`Error`], the [`Step`] a reply came at, its [`Class`] (SPEC §7) |
//! | `transaction.rs` | MAIL, RCPT…, DATA: one by one, or pipelined (RFC 2920) |
//! | `connect.rs` | TCP, STARTTLS or implicit TLS, EHLO, AUTH (one function) |
//! | `starttls.rs` | the plaintext greeting, EHLO and STARTTLS, with no byte read ahead |
//! | `pool.rs` | idle connections and the per-channel connection cap |
//! | `stream.rs` | the stream lettre talks over (kill switch, write batching) |
//! | `body.rs` | the body scan (8-bit, bare CR/LF) and the spool file in chunks |
//! | `file.rs` | the `file` channel |
//! | `graph/` | the `graph` channel: Microsoft Graph `sendMail` over HTTPS, and the upload way (draft, upload sessions, send) for large messages |
//!
//! A new transport is one more [`Transport`] variant and file; an OAuth-authenticated
//! SMTP login is one more case of the AUTH step.
//!
//! We drive lettre's `AsyncSmtpConnection` command by command rather than using its
//! transport, because we need per-recipient outcomes, our own connection cap, and TLS
//! errors told apart from connection errors. Details that matter for correctness:
//!
//! - the plaintext part of STARTTLS is ours (`starttls.rs`), not lettre's: lettre would
//!   keep bytes sent after the `220` and read them as replies that came over TLS;
//!
//! - lettre dot-stuffs the body and always appends `CRLF . CRLF`, so the message's own
//!   final CRLF is dropped before sending (otherwise the upstream gets one extra line);
//! - every stream we hand to lettre has a kill switch: if the spool file cannot be read
//!   in the middle of DATA, all further writes fail, so the final dot never goes out
//!   and the upstream never accepts a truncated message;
//! - to an upstream that offers PIPELINING (RFC 2920), MAIL, RCPT… and DATA go out
//!   together and their replies are read in order afterwards. In all-or-nothing mode a
//!   refused recipient may then meet an accepted DATA (`354`): the connection is closed
//!   without an end of data, so the upstream discards the transaction.

mod body;
mod connect;
pub mod error;
mod file;
mod graph;
mod pool;
mod starttls;
mod stream;
mod transaction;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{ChannelId, ChannelKind, Config};
use crate::message::Envelope;
use crate::reply::Reply;

pub use error::{Class, Error, Step, classify};
pub use graph::DraftLedger;
use graph::GraphChannel;
use pool::SmtpChannel;

/// The message bytes to send: as received (after dot-unstuffing and bare-LF
/// normalization), normally ending in CRLF.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// In a file (the spool), streamed in chunks.
    File(&'a Path),
}

/// The result of one upstream transaction.
#[derive(Debug)]
pub struct Outcome {
    /// Recipients the upstream refused at RCPT, with its reply (only when not all-or-nothing).
    pub refused: Vec<(String, Reply)>,
    /// The upstream's final reply to the message (already naming the channel), or why it failed.
    pub result: Result<Reply, Error>,
}

/// Timeout for connecting and for each upstream command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// An idle pooled connection older than this is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A pooled connection idle for less than this is reused without a NOOP check: the
/// check costs a round trip per message, and an upstream rarely drops a connection it
/// served a moment ago. If it did, MAIL fails before the upstream has taken anything
/// and the message is sent once more on a checked or new connection.
pub const TRUSTED_IDLE: Duration = Duration::from_secs(2);

/// Every channel's transport. A transport is shared with the next generation of a reload
/// when its channel is unchanged, so its pool (and token cache) carries on.
pub struct Upstreams {
    channels: Vec<Arc<Transport>>,
    timeout: Duration,
    idle_timeout: Duration,
    trusted_idle: Duration,
    /// Tests: this many SMTP transactions panic once they hold a connection slot.
    #[cfg(test)]
    pub(crate) panics: std::sync::atomic::AtomicUsize,
}

/// How one channel sends. A new kind of channel (`graph`) is a new variant here.
enum Transport {
    Smtp(Box<SmtpChannel>),
    Graph(Box<GraphChannel>),
    File { name: String, dir: PathBuf },
}

impl Transport {
    fn name(&self) -> &str {
        match self {
            Transport::Smtp(ch) => &ch.name,
            Transport::Graph(ch) => &ch.name,
            Transport::File { name, .. } => name,
        }
    }
}

impl Upstreams {
    /// Builds the transports (reads `ca_file`s); connects lazily.
    pub fn new(config: &Config) -> Result<Self, String> {
        Self::build(config, None, &[])
    }

    /// The transports for `config` after a reload: those of the channels named in `keep`
    /// are taken over from `self` (pool, idle connections, token cache and all), the
    /// others are built new. Timeouts carry over.
    pub fn rebuild(&self, config: &Config, keep: &[String]) -> Result<Self, String> {
        let mut next = Self::build(config, Some(self), keep)?;
        next.timeout = self.timeout;
        next.idle_timeout = self.idle_timeout;
        next.trusted_idle = self.trusted_idle;
        Ok(next)
    }

    fn build(
        config: &Config,
        previous: Option<&Upstreams>,
        keep: &[String],
    ) -> Result<Self, String> {
        let tokens = crate::oauth::Tokens::new(config)?;
        let mut channels = Vec::with_capacity(config.channels.len());
        // By name, so that a reload of 10,000 channels is not 10,000 × 10,000 comparisons.
        let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
        let previous: HashMap<&str, &Arc<Transport>> = previous
            .map(|p| p.channels.iter().map(|t| (t.name(), t)).collect())
            .unwrap_or_default();
        for (id, channel) in config.channels.iter().enumerate() {
            let before = previous.get(channel.name.as_str()).copied();
            if let Some(kept) = before.filter(|_| keep.contains(channel.name.as_str())) {
                channels.push(kept.clone());
                continue;
            }
            let connections = channel.limits.connections;
            let transport = match &channel.kind {
                ChannelKind::File { dir } => Transport::File {
                    name: channel.name.clone(),
                    dir: dir.clone(),
                },
                ChannelKind::Smtp(target) => {
                    let mut smtp = SmtpChannel::new(
                        &channel.name,
                        target,
                        &config.server.hostname,
                        channel.limits.connections,
                    )
                    .map_err(|e| format!("channel {}: {e}", channel.name))?;
                    smtp.token = tokens.get(id).cloned();
                    Transport::Smtp(Box::new(smtp))
                }
                ChannelKind::Graph(target) => {
                    let mut graph = GraphChannel::new(
                        &channel.name,
                        target,
                        channel.limits.connections,
                        channel.limits.max_message_size,
                        config.server.https_proxy.as_ref(),
                    )
                    .map_err(|e| format!("channel {}: {e}", channel.name))?;
                    graph.token = tokens.get(id).cloned();
                    Transport::Graph(Box::new(graph))
                }
            };
            let mut transport = transport;
            // A changed channel: the old transport's connections in flight (the worker a
            // reload replaced, sessions begun before it) count against the same limit.
            match (&mut transport, before.map(|b| &**b)) {
                (Transport::Smtp(new), Some(Transport::Smtp(old)))
                    if old.connections == connections =>
                {
                    new.slots = old.slots.clone();
                }
                (Transport::Graph(new), Some(Transport::Graph(old)))
                    if old.connections == connections =>
                {
                    new.permits = old.permits.clone();
                }
                _ => {}
            }
            channels.push(Arc::new(transport));
        }
        Ok(Upstreams {
            channels,
            timeout: COMMAND_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            trusted_idle: TRUSTED_IDLE,
            #[cfg(test)]
            panics: Default::default(),
        })
    }

    /// Replaces [`COMMAND_TIMEOUT`] and [`IDLE_TIMEOUT`] (tests).
    pub fn with_timeouts(mut self, command: Duration, idle: Duration) -> Self {
        self.timeout = command;
        self.idle_timeout = idle;
        self
    }

    /// Replaces [`TRUSTED_IDLE`] (tests).
    pub fn with_trusted_idle(mut self, trusted: Duration) -> Self {
        self.trusted_idle = trusted;
        self
    }

    /// Sends one message over `channel` in one transaction. With `all_or_nothing`, a
    /// refused recipient aborts the transaction (RSET) and is the result; otherwise the
    /// message goes to the accepted recipients and the refused ones are listed.
    pub async fn send(
        &self,
        channel: ChannelId,
        envelope: &Envelope,
        body: Body<'_>,
        all_or_nothing: bool,
    ) -> Outcome {
        self.send_with_id(channel, None, envelope, body, all_or_nothing)
            .await
    }

    /// [`Upstreams::send`] for a message with a known id (logs, and the file name on a
    /// `file` channel; a new id is made when `None`).
    pub async fn send_with_id(
        &self,
        channel: ChannelId,
        id: Option<&str>,
        envelope: &Envelope,
        body: Body<'_>,
        all_or_nothing: bool,
    ) -> Outcome {
        self.send_recorded(channel, id, envelope, body, all_or_nothing, None)
            .await
    }

    /// [`Upstreams::send_with_id`] with a place to record a Graph draft (the spool entry
    /// in queue mode), so that an attempt after a crash deletes what this one left.
    pub async fn send_recorded(
        &self,
        channel: ChannelId,
        id: Option<&str>,
        envelope: &Envelope,
        body: Body<'_>,
        all_or_nothing: bool,
        ledger: Option<&dyn DraftLedger>,
    ) -> Outcome {
        let started = Instant::now();
        let Some(transport) = self.channels.get(channel) else {
            return Outcome {
                refused: Vec::new(),
                result: Err(Error::local(format!("no channel #{channel}"))),
            };
        };
        let sent = crate::unwind::catch_unwind(async {
            match &**transport {
                Transport::Smtp(ch) => {
                    let mut refused = Vec::new();
                    let result = self
                        .relay(ch, envelope, body, all_or_nothing, &mut refused)
                        .await;
                    Outcome { refused, result }
                }
                Transport::Graph(ch) => Outcome {
                    refused: Vec::new(),
                    result: ch.send(envelope, body, ledger, self.timeout).await,
                },
                Transport::File { name, dir } => {
                    let id = id.map_or_else(crate::message::new_id, str::to_string);
                    Outcome {
                        refused: Vec::new(),
                        result: file::store_in_dir(name, dir, &id, envelope, body).await,
                    }
                }
            }
        })
        .await;
        // A bug (or an answer nothing guarded against) panicked mid-delivery: the
        // delivery fails like a temporary one and everything it held was given back.
        let outcome = sent.unwrap_or_else(|panic| {
            tracing::error!(
                id = id.unwrap_or("-"),
                channel = transport.name(),
                panic = %crate::text::escape_controls(&panic),
                "internal error during a delivery attempt; the message is retried like after a 4xx"
            );
            Outcome {
                refused: Vec::new(),
                result: Err(Error::local("internal error (a panic; see the log)")),
            }
        });
        let duration_ms = started.elapsed().as_millis() as u64;
        let (id, channel, rcpts) = (
            id.unwrap_or("-"),
            transport.name(),
            envelope.recipients.len(),
        );
        match &outcome.result {
            Ok(reply) => tracing::info!(
                id,
                sender = %envelope.sender,
                rcpts,
                refused = outcome.refused.len(),
                channel,
                reply = %reply,
                duration_ms,
                "delivery attempt: accepted"
            ),
            Err(error) => tracing::warn!(
                id,
                sender = %envelope.sender,
                rcpts,
                channel,
                error = %error,
                duration_ms,
                "delivery attempt: failed"
            ),
        }
        outcome
    }

    /// `mailgate test-channel`: connect, TLS, AUTH, report each step through `step`, send nothing.
    pub async fn test(
        &self,
        channel: ChannelId,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), Error> {
        let Some(transport) = self.channels.get(channel) else {
            return Err(Error::local(format!("no channel #{channel}")));
        };
        match &**transport {
            Transport::File { dir, .. } => file::test(dir, step).await,
            Transport::Smtp(ch) => self.test_smtp(ch, step).await,
            Transport::Graph(ch) => {
                ch.test(step, self.timeout).await?;
                ch.test_upload(step, self.timeout).await
            }
        }
    }

    /// Says QUIT on every idle pooled connection and closes it (graceful shutdown).
    pub async fn close_idle(&self) {
        self.close_idle_except(&[]).await;
    }

    /// [`Upstreams::close_idle`] but for the channels named in `keep` (a reload: the
    /// transports the next generation did not take over, which from now on close the
    /// connections that come back rather than pool them).
    pub async fn close_idle_except(&self, keep: &[String]) {
        let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
        for transport in &self.channels {
            if let Transport::Smtp(ch) = &**transport
                && !keep.contains(ch.name.as_str())
            {
                ch.retire();
                ch.quit_idle().await;
            }
        }
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests;
