//! Channel transports: pooled upstream SMTP connections (lettre) and the `file` drop.
//!
//! One [`Upstreams`] per running proxy; each SMTP channel has a pool of idle
//! connections and a semaphore so that no more than `connections` are open at once.
//!
//! We drive lettre's [`AsyncSmtpConnection`] command by command rather than using its
//! transport, because we need per-recipient outcomes, our own connection cap, and TLS
//! errors told apart from connection errors. Two details matter for correctness:
//!
//! - lettre dot-stuffs the body and always appends `CRLF . CRLF`, so the message's own
//!   final CRLF is dropped before sending (otherwise the upstream gets one extra line);
//! - every stream we hand to lettre is a [`GuardedStream`] with a kill switch: if the
//!   spool file cannot be read in the middle of DATA, all further writes fail, so the
//!   final dot never goes out and the upstream never accepts a truncated message;
//! - to an upstream that offers PIPELINING (RFC 2920), MAIL, RCPT… and DATA go out
//!   together and their replies are read in order afterwards. In all-or-nothing mode a
//!   refused recipient may then meet an accepted DATA (`354`): the connection is closed
//!   without an end of data, so the upstream discards the transaction.

use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::Address;
use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::config::{ChannelId, ChannelKind, Config, SmtpTarget, TlsMode};
use crate::message::Envelope;
use crate::reply::{Reply, split_enhanced};

/// The message bytes to send: as received (after dot-unstuffing and bare-LF
/// normalization), normally ending in CRLF.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// In a file (the spool), streamed in chunks.
    File(&'a Path),
}

/// Why a transaction did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// TCP connect failed or the connection dropped.
    Connect(String),
    /// TLS handshake or certificate verification failed, or STARTTLS not offered.
    Tls(String),
    /// The upstream refused our credentials (its reply).
    Auth(Reply),
    /// No answer in time.
    Timeout,
    /// The upstream refused MAIL, a recipient (all-or-nothing mode) or the DATA (its reply).
    Refused(Reply),
    /// Local I/O (file channel, reading the spool).
    Local(String),
}

impl UpstreamError {
    /// The reply a relay-mode client gets (SPEC §5), naming the channel.
    pub fn client_reply(&self, channel: &str) -> Reply {
        match self {
            UpstreamError::Connect(_) => Reply::upstream_unreachable(channel),
            UpstreamError::Tls(_) => Reply::upstream_tls_failed(channel),
            UpstreamError::Auth(_) => Reply::upstream_auth_failed(channel),
            UpstreamError::Timeout => Reply::upstream_timeout(channel),
            UpstreamError::Refused(r) => r.clone(),
            UpstreamError::Local(_) => Reply::local_error(),
        }
    }
}

/// For logs and `test-channel` output; never holds a secret.
impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(d) => write!(f, "connection failed: {d}"),
            UpstreamError::Tls(d) => write!(f, "TLS failed: {d}"),
            UpstreamError::Auth(r) => write!(f, "AUTH refused: {r}"),
            UpstreamError::Timeout => write!(f, "upstream timed out"),
            UpstreamError::Refused(r) => write!(f, "refused: {r}"),
            UpstreamError::Local(d) => write!(f, "local error: {d}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// The result of one upstream transaction.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Recipients the upstream refused at RCPT, with its reply (only when not all-or-nothing).
    pub refused: Vec<(String, Reply)>,
    /// The upstream's final reply to the message (already naming the channel), or why it failed.
    pub result: Result<Reply, UpstreamError>,
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

/// Size of the pieces a message is written in.
const CHUNK: usize = 64 * 1024;

/// Most bytes of commands sent in one pipelined group before their replies are read
/// (RFC 2920 §3.1: a group must fit the TCP window, or client and server could both
/// block writing). Equal to [`HOLD`], so a group goes out as one send.
const PIPELINE_GROUP: usize = HOLD;

/// Slowest upstream we wait for while writing DATA: the DATA timeout is
/// [`COMMAND_TIMEOUT`] plus one second per this many bytes.
const MIN_DATA_RATE: u64 = 32 * 1024;

/// AUTH mechanisms we use with passwords, in order of preference.
const MECHANISMS: [Mechanism; 2] = [Mechanism::Plain, Mechanism::Login];

/// Every channel's transport.
pub struct Upstreams {
    channels: Vec<Transport>,
    timeout: Duration,
    idle_timeout: Duration,
    trusted_idle: Duration,
}

enum Transport {
    Smtp(Box<SmtpChannel>),
    File { name: String, dir: PathBuf },
}

impl Transport {
    fn name(&self) -> &str {
        match self {
            Transport::Smtp(ch) => &ch.name,
            Transport::File { name, .. } => name,
        }
    }
}

/// One SMTP channel: where to connect, how to secure and log in, and its pool.
struct SmtpChannel {
    name: String,
    host: String,
    port: u16,
    tls: TlsMode,
    hello: ClientId,
    /// For STARTTLS (lettre upgrades its own stream).
    starttls: Option<TlsParameters>,
    /// For implicit TLS (we do the handshake, so a TLS failure is told apart from a
    /// refused TCP connection and the negotiated version can be reported).
    implicit: Option<TlsConnector>,
    auth: Option<(String, Credentials)>,
    /// One permit per open connection, idle or busy.
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Conn>>,
    /// Signalled when a connection goes back to `idle`, for tasks waiting for a slot.
    returned: Notify,
}

/// An open, logged-in upstream connection.
struct Conn {
    smtp: AsyncSmtpConnection,
    /// Kill switch of the underlying [`GuardedStream`].
    poison: Arc<AtomicBool>,
    /// When it went idle (or was opened).
    since: Instant,
    /// Taken from the pool without a NOOP check (see [`TRUSTED_IDLE`]).
    unchecked: bool,
    /// Unchecked, and found closed at MAIL: nothing reached the upstream.
    stale: bool,
    /// The upstream offers PIPELINING (in its EHLO reply after TLS).
    pipelining: bool,
    /// Held for the life of the connection: frees the slot when dropped.
    _permit: OwnedSemaphorePermit,
}

impl Upstreams {
    /// Builds the transports (reads `ca_file`s); connects lazily.
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut channels = Vec::with_capacity(config.channels.len());
        for channel in &config.channels {
            let transport = match &channel.kind {
                ChannelKind::File { dir } => Transport::File {
                    name: channel.name.clone(),
                    dir: dir.clone(),
                },
                ChannelKind::Smtp(target) => Transport::Smtp(Box::new(
                    SmtpChannel::new(
                        &channel.name,
                        target,
                        &config.server.hostname,
                        channel.limits.connections,
                    )
                    .map_err(|e| format!("channel {}: {e}", channel.name))?,
                )),
            };
            channels.push(transport);
        }
        Ok(Upstreams {
            channels,
            timeout: COMMAND_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            trusted_idle: TRUSTED_IDLE,
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
        let started = Instant::now();
        let Some(transport) = self.channels.get(channel) else {
            return Outcome {
                refused: Vec::new(),
                result: Err(UpstreamError::Local(format!("no channel #{channel}"))),
            };
        };
        let outcome = match transport {
            Transport::Smtp(ch) => {
                let mut refused = Vec::new();
                let result = self
                    .relay(ch, envelope, body, all_or_nothing, &mut refused)
                    .await;
                Outcome { refused, result }
            }
            Transport::File { name, dir } => {
                let id = id.map_or_else(crate::message::new_id, str::to_string);
                Outcome {
                    refused: Vec::new(),
                    result: store_in_dir(name, dir, &id, envelope, body).await,
                }
            }
        };
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
    ) -> Result<(), UpstreamError> {
        let Some(transport) = self.channels.get(channel) else {
            return Err(UpstreamError::Local(format!("no channel #{channel}")));
        };
        match transport {
            Transport::File { dir, .. } => {
                let dir = dir.clone();
                let shown = dir.display().to_string();
                blocking(move || probe_dir(&dir))
                    .await
                    .map_err(|e| UpstreamError::Local(format!("{shown}: {e}")))?;
                step(&format!("directory {shown} is writable"));
                Ok(())
            }
            Transport::Smtp(ch) => {
                step(&format!(
                    "connecting to {}:{} (tls = {})",
                    ch.host,
                    ch.port,
                    tls_name(ch.tls)
                ));
                // A fresh connection is the point; idle ones would also hold every slot.
                ch.close_idle();
                let permit = tokio::time::timeout(self.timeout, ch.slots.clone().acquire_owned())
                    .await
                    .map_err(|_| UpstreamError::Timeout)?
                    .map_err(|_| UpstreamError::Local("connection pool closed".into()))?;
                let mut conn = self.connect(ch, permit, step).await?;
                if ch.auth.is_none() {
                    step("no AUTH configured");
                }
                match tokio::time::timeout(self.timeout, conn.smtp.command(Quit)).await {
                    Ok(Ok(_)) => step("QUIT ok; no mail was sent"),
                    _ => step("QUIT not answered; no mail was sent"),
                }
                Ok(())
            }
        }
    }

    /// Says QUIT on every idle pooled connection and closes it (graceful shutdown).
    pub async fn close_idle(&self) {
        for transport in &self.channels {
            if let Transport::Smtp(ch) = transport {
                let idle = std::mem::take(&mut *ch.idle.lock().unwrap_or_else(|e| e.into_inner()));
                for mut conn in idle {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), conn.smtp.command(Quit)).await;
                }
            }
        }
    }

    /// One SMTP transaction over a pooled connection.
    async fn relay(
        &self,
        ch: &SmtpChannel,
        envelope: &Envelope,
        body: Body<'_>,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<Reply, UpstreamError> {
        let prepared = PreparedBody::new(body).await?;
        let envelope = PreparedEnvelope::new(envelope, prepared.eightbit, all_or_nothing, refused)?;
        let mut conn = self.checkout(ch, true).await?;
        let (mut result, mut reusable) = self
            .transaction(ch, &mut conn, &envelope, prepared, all_or_nothing, refused)
            .await;
        if conn.stale {
            tracing::debug!(channel = %ch.name, "pooled connection was closed; sending on another");
            drop(conn);
            conn = self.checkout(ch, false).await?;
            let prepared = PreparedBody::new(body).await?;
            (result, reusable) = self
                .transaction(ch, &mut conn, &envelope, prepared, all_or_nothing, refused)
                .await;
        }
        if reusable {
            ch.checkin(conn);
        }
        result
    }

    /// MAIL, RCPT…, DATA on `conn`. Also says whether the connection is fit for reuse.
    async fn transaction(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        envelope: &PreparedEnvelope,
        body: PreparedBody<'_>,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> (Result<Reply, UpstreamError>, bool) {
        let info = conn.smtp.server_info();
        let has_utf8 = info.supports_feature(Extension::SmtpUtfEight);
        if envelope.needs_smtputf8 && !has_utf8 {
            return (
                Err(UpstreamError::Refused(Reply::upstream_no_smtputf8(
                    &ch.name,
                ))),
                true,
            );
        }
        let mut parameters = Vec::new();
        if envelope.smtputf8 && has_utf8 {
            parameters.push(MailParameter::SmtpUtfEight);
        }
        // Without 8BITMIME upstream the 8-bit message still goes out as it is, as Postfix
        // does by default: refusing it would bounce mail most servers take anyway.
        if envelope.eightbit && info.supports_feature(Extension::EightBitMime) {
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        let mail = Mail::new(envelope.sender.clone(), parameters);
        let opened = if conn.pipelining {
            self.open_pipelined(ch, conn, mail, envelope, all_or_nothing, refused)
                .await
        } else {
            self.open_one_by_one(ch, conn, mail, envelope, all_or_nothing, refused)
                .await
        };
        if let Err(ended) = opened {
            return ended;
        }

        let data_timeout = self.timeout + Duration::from_secs(body.len / MIN_DATA_RATE);
        let sent = match body.source {
            _ if body.empty => {
                self.call(ch, data_timeout, conn.smtp.command(EmptyMessageEnd))
                    .await
            }
            Source::Bytes(bytes) => {
                self.call(
                    ch,
                    data_timeout,
                    conn.smtp.message_iter(bytes.chunks(CHUNK)),
                )
                .await
            }
            Source::File(file) => {
                // Blocking reads of 64 KiB inside lettre's synchronous iterator: short, and
                // the spool is local disk, so not worth a thread hop per chunk.
                let chunks = FileChunks {
                    file,
                    remaining: body.len,
                    poison: conn.poison.clone(),
                };
                self.call(ch, data_timeout, conn.smtp.message_iter(chunks))
                    .await
            }
        };
        match sent {
            Ok(response) => (Ok(upstream_response(&response, &ch.name)), true),
            Err(Fail::Reply(reply)) => {
                // The transaction is over either way; 421 means the server is closing.
                let reusable = reply.code != 421;
                (Err(UpstreamError::Refused(reply)), reusable)
            }
            Err(_) if conn.poison.load(Ordering::SeqCst) => (
                Err(UpstreamError::Local(
                    "reading the message failed; DATA aborted".into(),
                )),
                false,
            ),
            Err(fail) => (Err(fail.into()), false),
        }
    }

    /// MAIL, RCPT…, DATA one command at a time, stopping at the first failure. `Ok`
    /// once the upstream waits for the message (`354`).
    async fn open_one_by_one(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        mail: Mail,
        envelope: &PreparedEnvelope,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<(), Ended> {
        if let Err(fail) = self.call(ch, self.timeout, conn.smtp.command(mail)).await {
            if conn.unchecked && closes(&fail) {
                conn.stale = true;
                return Err((Err(fail.into()), false));
            }
            return Err(self.abort(ch, conn, fail).await);
        }
        let mut accepted = 0;
        let mut last_refusal = None;
        for (raw, address) in &envelope.recipients {
            match self
                .call(
                    ch,
                    self.timeout,
                    conn.smtp.command(Rcpt::new(address.clone(), Vec::new())),
                )
                .await
            {
                Ok(_) => accepted += 1,
                Err(Fail::Reply(reply)) if !all_or_nothing && reply.code != 421 => {
                    refused.push((raw.clone(), reply.clone()));
                    last_refusal = Some(reply);
                }
                Err(fail) => return Err(self.abort(ch, conn, fail).await),
            }
        }
        if accepted == 0 {
            let reply = last_refusal.unwrap_or_else(Reply::no_valid_recipients);
            return Err(self.abort(ch, conn, Fail::Reply(reply)).await);
        }
        if let Err(fail) = self.call(ch, self.timeout, conn.smtp.command(Data)).await {
            return Err(self.abort(ch, conn, fail).await);
        }
        Ok(())
    }

    /// MAIL, RCPT… and DATA sent together (RFC 2920), then every reply read in order,
    /// negative ones too. `Ok` once the upstream waits for the message (`354`) and the
    /// transaction may go ahead.
    async fn open_pipelined(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        mail: Mail,
        envelope: &PreparedEnvelope,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<(), Ended> {
        let mut commands = Vec::with_capacity(envelope.recipients.len() + 2);
        commands.push(mail.to_string());
        for (_, address) in &envelope.recipients {
            commands.push(Rcpt::new(address.clone(), Vec::new()).to_string());
        }
        commands.push(Data.to_string());
        let (replies, broken) = self.pipeline(ch, conn, &commands).await;
        if let Some(fail) = broken {
            // Stopped before DATA's reply: no message went out. A connection reused on
            // trust and closed at MAIL is replaced and the message sent again.
            if replies.is_empty() && conn.unchecked && closes(&fail) {
                conn.stale = true;
            }
            return Err((Err(fail.into()), false));
        }
        // Without `broken`, there is one reply per command.
        let [mail_reply, rcpt_replies @ .., data_reply] = &replies[..] else {
            return Err((Err(UpstreamError::Connect("replies missing".into())), false));
        };
        let mut accepted = 0;
        let (mut first_refusal, mut last_refusal) = (None, None);
        if mail_reply.is_ok() {
            for ((raw, _), reply) in envelope.recipients.iter().zip(rcpt_replies) {
                match reply {
                    Ok(()) => accepted += 1,
                    Err(reply) => {
                        if !all_or_nothing {
                            refused.push((raw.clone(), reply.clone()));
                        }
                        first_refusal.get_or_insert(reply);
                        last_refusal = Some(reply);
                    }
                }
            }
        }
        // Why the transaction must not go ahead, if it must not.
        let stop = match mail_reply {
            Err(reply) => Some(reply),
            Ok(()) if all_or_nothing => first_refusal,
            Ok(()) if accepted == 0 => last_refusal,
            Ok(()) => None,
        };
        match (stop, data_reply) {
            (None, Ok(())) => Ok(()),
            (None, Err(reply)) | (Some(reply), Err(_)) => {
                Err(self.abort(ch, conn, Fail::Reply(reply.clone())).await)
            }
            // The upstream waits for a message it must not get: closing the connection
            // without the end of data makes it discard the transaction (RFC 5321 §3.3).
            (Some(reply), Ok(())) => {
                tracing::debug!(
                    channel = %ch.name,
                    "transaction refused after DATA was accepted; closing the connection"
                );
                Err((Err(UpstreamError::Refused(reply.clone())), false))
            }
        }
    }

    /// Sends `commands` in groups of at most [`PIPELINE_GROUP`] bytes and reads each
    /// one's reply in order: `Ok` for a positive one, the reply for a negative one.
    /// Stops at a timeout, a network error or a `421` (the upstream is closing), which
    /// comes back as the second value.
    async fn pipeline(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        commands: &[String],
    ) -> (Vec<Result<(), Reply>>, Option<Fail>) {
        let mut replies = Vec::with_capacity(commands.len());
        let mut start = 0;
        while start < commands.len() {
            let mut end = start + 1;
            let mut size = commands[start].len();
            while end < commands.len() && size + commands[end].len() <= PIPELINE_GROUP {
                size += commands[end].len();
                end += 1;
            }
            let group = commands[start..end].concat();
            for i in start..end {
                // The group is written with the first read; the others only read.
                let reply = if i == start {
                    self.call(ch, self.timeout, conn.smtp.command(&group)).await
                } else {
                    self.call(ch, self.timeout, conn.smtp.read_response()).await
                };
                match reply {
                    Ok(_) => replies.push(Ok(())),
                    Err(Fail::Reply(reply)) if reply.code != 421 => replies.push(Err(reply)),
                    Err(fail) => return (replies, Some(fail)),
                }
            }
            start = end;
        }
        (replies, None)
    }

    /// Ends a transaction that failed before the message went out.
    async fn abort(&self, ch: &SmtpChannel, conn: &mut Conn, fail: Fail) -> Ended {
        match fail {
            Fail::Reply(reply) if reply.code != 421 => {
                let reset = self
                    .call(ch, self.timeout, conn.smtp.command(Rset))
                    .await
                    .is_ok();
                (Err(UpstreamError::Refused(reply)), reset)
            }
            fail => (Err(fail.into()), false),
        }
    }

    /// A healthy idle connection, or a new one once a slot is free. With `trust`, one
    /// idle for less than `trusted_idle` is taken without a NOOP check.
    async fn checkout(&self, ch: &SmtpChannel, trust: bool) -> Result<Conn, UpstreamError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Bounded by the deadline: each turn either returns or waits for a slot or a
        // returned connection.
        loop {
            while let Some(mut conn) = ch.pop_idle(self.idle_timeout) {
                if trust && conn.since.elapsed() < self.trusted_idle {
                    conn.unchecked = true;
                    return Ok(conn);
                }
                let probe = self.timeout.min(Duration::from_secs(10));
                if let Ok(true) = tokio::time::timeout(probe, conn.smtp.test_connected()).await {
                    return Ok(conn);
                }
                tracing::debug!(channel = %ch.name, "dropping a broken pooled connection");
            }
            tokio::select! {
                permit = ch.slots.clone().acquire_owned() => {
                    let permit = permit.map_err(|_| UpstreamError::Local("connection pool closed".into()))?;
                    return self.connect(ch, permit, &mut |s| tracing::debug!(channel = %ch.name, "{s}")).await;
                }
                _ = ch.returned.notified() => continue,
                _ = tokio::time::sleep_until(deadline) => return Err(UpstreamError::Timeout),
            }
        }
    }

    /// Opens a connection in `permit`'s slot: TCP, TLS, EHLO, AUTH.
    async fn connect(
        &self,
        ch: &SmtpChannel,
        permit: OwnedSemaphorePermit,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Conn, UpstreamError> {
        let target = format!("{}:{}", ch.host, ch.port);
        let tcp = match tokio::time::timeout(self.timeout, open_tcp(&ch.host, ch.port)).await {
            // No answer to the connect is an unreachable host (4.4.1), not a slow one.
            Err(_) => {
                return Err(UpstreamError::Connect(format!(
                    "{target}: connect timed out"
                )));
            }
            Ok(Err(e)) => return Err(UpstreamError::Connect(format!("{target}: {e}"))),
            Ok(Ok(tcp)) => tcp,
        };
        let peer = tcp
            .peer_addr()
            .map_err(|e| UpstreamError::Connect(format!("{target}: {e}")))?;
        step(&format!("connected to {target} ({peer})"));
        let poison = Arc::new(AtomicBool::new(false));
        let inner = match (&ch.implicit, ch.tls) {
            (Some(connector), TlsMode::Implicit) => {
                let name = rustls::pki_types::ServerName::try_from(ch.host.clone())
                    .map_err(|e| UpstreamError::Tls(format!("{}: {e}", ch.host)))?;
                let tls =
                    match tokio::time::timeout(self.timeout, connector.connect(name, tcp)).await {
                        Err(_) => {
                            return Err(UpstreamError::Tls(format!(
                                "{target}: TLS handshake timed out"
                            )));
                        }
                        Ok(Err(e)) => return Err(UpstreamError::Tls(format!("{target}: {e}"))),
                        Ok(Ok(tls)) => tls,
                    };
                let version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
                step(&format!(
                    "TLS established (implicit TLS, {})",
                    version.as_deref().unwrap_or("?")
                ));
                Inner::Tls(Box::new(tls))
            }
            _ => Inner::Plain(tcp),
        };
        let stream = GuardedStream {
            inner,
            peer,
            poison: poison.clone(),
            held: Vec::new(),
        };
        let connecting = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &ch.hello);
        // A negative greeting or EHLO reply (`554`, `421` busy) is the upstream refusing us.
        let mut smtp = self
            .call(ch, self.timeout, connecting)
            .await
            .map_err(UpstreamError::from)?;
        step(&format!("EHLO ok: {}", features(&smtp)));

        if ch.tls == TlsMode::Starttls {
            if !smtp.server_info().supports_feature(Extension::StartTls) {
                return Err(UpstreamError::Tls(format!(
                    "{target} does not offer STARTTLS; not continuing in plaintext"
                )));
            }
            let params = ch
                .starttls
                .clone()
                .ok_or_else(|| UpstreamError::Tls("no TLS parameters".into()))?;
            match tokio::time::timeout(self.timeout, smtp.starttls(params, &ch.hello)).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Err(e)) => {
                    return Err(UpstreamError::Tls(format!(
                        "STARTTLS with {target}: {}",
                        describe(&e)
                    )));
                }
                Ok(Ok(())) => step(&format!(
                    "TLS established (STARTTLS); EHLO again: {}",
                    features(&smtp)
                )),
            }
        }

        // lettre keeps no trace of PIPELINING, so ask once more, after TLS (what the
        // server said before STARTTLS no longer counts) and before AUTH: one round
        // trip per connection, which the pool amortizes.
        let ehlo = self
            .call(ch, self.timeout, smtp.command(Ehlo::new(ch.hello.clone())))
            .await
            .map_err(UpstreamError::from)?;
        let pipelining = offers_pipelining(&ehlo);
        step(if pipelining {
            "PIPELINING offered: commands of a transaction go out together"
        } else {
            "no PIPELINING: one command at a time"
        });

        if let Some((username, credentials)) = &ch.auth {
            let Some(mechanism) = smtp.server_info().get_auth_mechanism(&MECHANISMS) else {
                return Err(UpstreamError::Auth(Reply::upstream_no_auth_mechanism(
                    &ch.name,
                )));
            };
            match self
                .call(ch, self.timeout, smtp.auth(&[mechanism], credentials))
                .await
            {
                Ok(_) => step(&format!("AUTH {mechanism} ok as {username}")),
                Err(Fail::Reply(reply)) => return Err(UpstreamError::Auth(reply)),
                Err(fail) => return Err(fail.into()),
            }
        }
        Ok(Conn {
            smtp,
            poison,
            since: Instant::now(),
            unchecked: false,
            stale: false,
            pipelining,
            _permit: permit,
        })
    }

    /// Runs one lettre call with a timeout and sorts its failure.
    async fn call<T>(
        &self,
        ch: &SmtpChannel,
        limit: Duration,
        call: impl Future<Output = Result<T, SmtpError>>,
    ) -> Result<T, Fail> {
        match tokio::time::timeout(limit, call).await {
            Err(_) => Err(Fail::Timeout),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(match e.status() {
                Some(code) => {
                    let text = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    let (enhanced, text) = split_enhanced(&text);
                    Fail::Reply(Reply::from_upstream(
                        u16::from(code),
                        enhanced,
                        text,
                        &ch.name,
                    ))
                }
                None => Fail::Net(describe(&e)),
            }),
        }
    }
}

/// How a transaction ended: its result, and whether the connection may be reused.
type Ended = (Result<Reply, UpstreamError>, bool);

/// The failure means the upstream closed (or is closing) the connection.
fn closes(fail: &Fail) -> bool {
    matches!(fail, Fail::Net(_)) || matches!(fail, Fail::Reply(reply) if reply.code == 421)
}

/// A failed lettre call.
enum Fail {
    /// The upstream answered with a negative reply (already naming the channel).
    Reply(Reply),
    /// Network, TLS or protocol trouble.
    Net(String),
    Timeout,
}

impl From<Fail> for UpstreamError {
    fn from(fail: Fail) -> Self {
        match fail {
            Fail::Reply(reply) => UpstreamError::Refused(reply),
            Fail::Net(detail) => UpstreamError::Connect(detail),
            Fail::Timeout => UpstreamError::Timeout,
        }
    }
}

/// lettre's error text (it includes the cause and the server's text; never a credential).
fn describe(e: &SmtpError) -> String {
    e.to_string()
}

/// A positive reply from lettre as our [`Reply`], every line kept, a repeated
/// enhanced code said once.
fn upstream_response(response: &Response, channel: &str) -> Reply {
    let mut enhanced = None;
    let mut text = String::new();
    for (i, line) in response.message().enumerate() {
        let (code, rest) = split_enhanced(line);
        let line = if i == 0 {
            enhanced = code;
            rest
        } else if code.is_some() && code == enhanced {
            rest
        } else {
            line
        };
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(line);
    }
    Reply::from_upstream(u16::from(response.code()), enhanced, &text, channel)
}

/// The EHLO reply has a `PIPELINING` line (RFC 2920).
fn offers_pipelining(ehlo: &Response) -> bool {
    // The first line is the server's name.
    ehlo.message().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// The extensions we care about, for `test-channel` and debug logs.
fn features(smtp: &AsyncSmtpConnection) -> String {
    let info = smtp.server_info();
    let mut list: Vec<String> = [
        Extension::StartTls,
        Extension::EightBitMime,
        Extension::SmtpUtfEight,
    ]
    .into_iter()
    .filter(|e| info.supports_feature(*e))
    .map(|e| e.to_string())
    .collect();
    let mechanisms: Vec<String> = [Mechanism::Plain, Mechanism::Login, Mechanism::Xoauth2]
        .into_iter()
        .filter(|m| info.supports_auth_mechanism(*m))
        .map(|m| m.to_string())
        .collect();
    if !mechanisms.is_empty() {
        list.push(format!("AUTH {}", mechanisms.join(" ")));
    }
    format!(
        "{} offers {}",
        info.name(),
        if list.is_empty() {
            "no extensions we use".into()
        } else {
            list.join(", ")
        }
    )
}

fn tls_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
        TlsMode::None => "none",
    }
}

impl SmtpChannel {
    fn new(
        name: &str,
        target: &SmtpTarget,
        hostname: &str,
        connections: usize,
    ) -> Result<Self, String> {
        let extra_roots = match &target.ca_file {
            Some(path) => {
                let pem = fs::read(path)
                    .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("ca_file {} holds no certificate", path.display()));
                }
                certs
            }
            None => Vec::new(),
        };
        let (starttls, implicit) = match target.tls {
            TlsMode::None => (None, None),
            TlsMode::Starttls => (Some(lettre_tls(&target.host, &extra_roots)?), None),
            TlsMode::Implicit => (None, Some(rustls_tls(&extra_roots)?)),
        };
        let auth = target.username.as_ref().map(|user| {
            let password = target
                .password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            (user.clone(), Credentials::new(user.clone(), password))
        });
        Ok(SmtpChannel {
            name: name.to_string(),
            host: target.host.clone(),
            port: target.port,
            tls: target.tls,
            hello: ClientId::Domain(hostname.to_string()),
            starttls,
            implicit,
            auth,
            slots: Arc::new(Semaphore::new(connections.max(1))),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
        })
    }

    /// The most recently used idle connection, after closing those idle too long.
    fn pop_idle(&self, max_idle: Duration) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|conn| conn.since.elapsed() < max_idle);
        idle.pop()
    }

    /// Closes every idle connection, freeing their slots.
    fn close_idle(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn checkin(&self, mut conn: Conn) {
        conn.since = Instant::now();
        conn.unchecked = false;
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        self.returned.notify_one();
    }
}

/// TLS parameters for lettre's STARTTLS: webpki roots plus `ca_file`.
fn lettre_tls(
    host: &str,
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<TlsParameters, String> {
    let mut builder =
        TlsParameters::builder(host.to_string()).certificate_store(CertificateStore::WebpkiRoots);
    for cert in extra_roots {
        builder = builder
            .add_root_certificate(Certificate::from_der(cert.to_vec()).map_err(|e| e.to_string())?);
    }
    builder.build().map_err(|e| e.to_string())
}

/// Our own rustls client for implicit TLS: webpki roots plus `ca_file`, ring provider.
fn rustls_tls(
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<TlsConnector, String> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("ca_file: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The addresses as lettre needs them, checked before any connection is used.
struct PreparedEnvelope {
    sender: Option<Address>,
    /// As the client gave them, and parsed.
    recipients: Vec<(String, Address)>,
    /// Non-ASCII addresses, or a client-declared SMTPUTF8 message that has 8-bit content:
    /// it cannot go to an upstream without SMTPUTF8.
    needs_smtputf8: bool,
    /// Pass `SMTPUTF8` on (when the upstream has it).
    smtputf8: bool,
    /// Pass `BODY=8BITMIME` on (when the upstream has it).
    eightbit: bool,
}

impl PreparedEnvelope {
    fn new(
        envelope: &Envelope,
        body_eightbit: bool,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<Self, UpstreamError> {
        let sender = if envelope.sender.is_empty() {
            None
        } else {
            let parsed = Address::from_str(&envelope.sender)
                .map_err(|_| UpstreamError::Refused(Reply::bad_sender_syntax(&envelope.sender)))?;
            Some(parsed)
        };
        let mut recipients = Vec::with_capacity(envelope.recipients.len());
        let mut last_refusal = None;
        for raw in &envelope.recipients {
            match Address::from_str(raw) {
                Ok(address) => recipients.push((raw.clone(), address)),
                Err(_) => {
                    let reply = Reply::bad_recipient_syntax(raw);
                    if all_or_nothing {
                        return Err(UpstreamError::Refused(reply));
                    }
                    refused.push((raw.clone(), reply.clone()));
                    last_refusal = Some(reply);
                }
            }
        }
        if recipients.is_empty() {
            let reply = last_refusal.unwrap_or_else(Reply::no_valid_recipients);
            return Err(UpstreamError::Refused(reply));
        }
        let non_ascii =
            !envelope.sender.is_ascii() || envelope.recipients.iter().any(|r| !r.is_ascii());
        Ok(PreparedEnvelope {
            sender,
            recipients,
            needs_smtputf8: non_ascii || (envelope.smtputf8 && body_eightbit),
            smtputf8: non_ascii || envelope.smtputf8,
            eightbit: envelope.eightbit || body_eightbit,
        })
    }
}

/// The body, checked, with its final CRLF dropped (lettre adds `CRLF . CRLF`).
struct PreparedBody<'a> {
    source: Source<'a>,
    /// Bytes to send.
    len: u64,
    /// Has bytes above 127.
    eightbit: bool,
    /// The message is empty: nothing at all before the terminating dot.
    empty: bool,
}

/// The end of an empty message: lettre's `message_iter` always writes `CRLF . CRLF`,
/// which would add an empty line, so an empty body goes out as the bare dot line.
struct EmptyMessageEnd;

impl std::fmt::Display for EmptyMessageEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(".\r\n")
    }
}

enum Source<'a> {
    Bytes(&'a [u8]),
    /// Positioned at the start.
    File(fs::File),
}

impl<'a> PreparedBody<'a> {
    async fn new(body: Body<'a>) -> Result<Self, UpstreamError> {
        match body {
            Body::Bytes(bytes) => {
                let mut scan = Scan::default();
                scan.feed(bytes);
                scan.check()?;
                let empty = bytes.is_empty();
                let bytes = bytes.strip_suffix(b"\r\n").unwrap_or(bytes);
                Ok(PreparedBody {
                    source: Source::Bytes(bytes),
                    len: bytes.len() as u64,
                    eightbit: scan.eightbit,
                    empty,
                })
            }
            Body::File(path) => {
                let path = path.to_path_buf();
                let shown = path.display().to_string();
                let (file, scan, len) = blocking(move || scan_file(&path))
                    .await
                    .map_err(|e| UpstreamError::Local(format!("{shown}: {e}")))?;
                scan.check()?;
                let empty = len == 0;
                let len = if scan.ends_with_crlf { len - 2 } else { len };
                Ok(PreparedBody {
                    source: Source::File(file),
                    len,
                    eightbit: scan.eightbit,
                    empty,
                })
            }
        }
    }
}

/// What one pass over the body finds.
#[derive(Debug, Default)]
struct Scan {
    eightbit: bool,
    /// A CR not followed by LF, or an LF not preceded by CR.
    bare: bool,
    prev_cr: bool,
    /// The last two bytes seen are CRLF.
    ends_with_crlf: bool,
}

impl Scan {
    /// Vectorized (`is_ascii`, `memchr`): a byte-by-byte loop here cost as much CPU as
    /// receiving the message.
    fn feed(&mut self, chunk: &[u8]) {
        let Some(&last) = chunk.last() else {
            return;
        };
        self.eightbit |= !chunk.is_ascii();
        // Byte `i - 1`, where it may sit at the end of the previous chunk.
        let cr_before = |i: usize| match i {
            0 => self.prev_cr,
            _ => chunk[i - 1] == b'\r',
        };
        for i in memchr::memchr2_iter(b'\r', b'\n', chunk) {
            if chunk[i] == b'\n' {
                // An LF without a CR before it.
                self.bare |= !cr_before(i);
            } else if chunk.get(i + 1).is_some_and(|&next| next != b'\n') {
                // A CR followed by something else (one at the end is judged by the
                // next chunk, or by `check`).
                self.bare = true;
            }
        }
        if self.prev_cr && chunk[0] != b'\n' {
            self.bare = true;
        }
        self.ends_with_crlf = last == b'\n' && cr_before(chunk.len() - 1);
        self.prev_cr = last == b'\r';
    }

    /// The session hands us normalized data; a bare CR or LF here means a bug upstream
    /// of us, and passing it on could let an upstream see a second message (smuggling).
    fn check(&self) -> Result<(), UpstreamError> {
        if self.bare || self.prev_cr {
            return Err(UpstreamError::Local(
                "message has a bare CR or LF; not sent upstream".into(),
            ));
        }
        Ok(())
    }
}

fn scan_file(path: &Path) -> io::Result<(fs::File, Scan, u64)> {
    let mut file = fs::File::open(path)?;
    let mut scan = Scan::default();
    let mut len = 0u64;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        scan.feed(&buf[..n]);
        len += n as u64;
    }
    file.seek(SeekFrom::Start(0))?;
    Ok((file, scan, len))
}

/// The spool file in pieces; on a read error or a short file it trips the stream's
/// kill switch, so lettre's final dot never reaches the upstream.
struct FileChunks {
    file: fs::File,
    remaining: u64,
    poison: Arc<AtomicBool>,
}

impl Iterator for FileChunks {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        let mut buf = vec![0; (self.remaining as usize).min(CHUNK)];
        match self.file.read_exact(&mut buf) {
            Ok(()) => {
                self.remaining -= buf.len() as u64;
                Some(buf)
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the spooled message failed; aborting DATA");
                self.poison.store(true, Ordering::SeqCst);
                self.remaining = 0;
                None
            }
        }
    }
}

/// The connection lettre talks over: plain or implicit TLS, with a kill switch that
/// makes every later write fail.
///
/// Writes are held back until the next read (or until [`HOLD`] bytes wait): an SMTP
/// client always reads a reply after writing, so nothing waits longer than before,
/// but lettre's write-and-flush per piece (the body, then the final `.CRLF`, each a
/// packet of its own) becomes one send.
#[derive(Debug)]
struct GuardedStream {
    inner: Inner,
    peer: SocketAddr,
    poison: Arc<AtomicBool>,
    /// Written, not yet sent.
    held: Vec<u8>,
}

/// Most bytes [`GuardedStream`] holds back; larger writes go straight out.
const HOLD: usize = 16 * 1024;

#[derive(Debug)]
enum Inner {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl GuardedStream {
    fn poisoned(&self) -> Option<io::Error> {
        self.poison.load(Ordering::SeqCst).then(|| {
            io::Error::other("message source failed; connection aborted before end of data")
        })
    }

    /// Sends the held bytes and flushes the stream under them; a poisoned stream sends
    /// nothing more.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.poisoned() {
            self.held.clear();
            return Poll::Ready(Err(e));
        }
        while !self.held.is_empty() {
            let sent = match &mut self.inner {
                Inner::Plain(s) => Pin::new(s).poll_write(cx, &self.held),
                Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, &self.held),
            };
            match sent {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => drop(self.held.drain(..n)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.held.capacity() > 2 * HOLD {
            self.held = Vec::new();
        }
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
            return Poll::Ready(Err(e));
        }
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poisoned() {
            return Poll::Ready(Err(e));
        }
        if this.held.len() + buf.len() > HOLD {
            if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
                return Poll::Ready(Err(e));
            }
            if buf.len() > HOLD {
                return match &mut this.inner {
                    Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                };
            }
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    /// Leaves held bytes for the next read (see [`GuardedStream`]).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poisoned() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
            return Poll::Ready(Err(e));
        }
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncTokioStream for GuardedStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

/// A TCP connection to the upstream, with Nagle's algorithm off: lettre writes the
/// final `.CRLF` of DATA (and each command) as its own small segment, which Nagle
/// would hold back until the upstream's delayed ACK (~40 ms a message on Linux).
async fn open_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// The `file` channel: `dir/<id>.eml` (the message as received) and `dir/<id>.envelope`.
///
/// The envelope file is plain text, one item per line: `sender <addr>` (`sender <>` for
/// the null sender), then `recipient <addr>` for each recipient in order. Both files are
/// written under a temporary name, fsync'd, renamed, then the directory is fsync'd;
/// the envelope goes first, so whoever sees `<id>.eml` finds its envelope too.
async fn store_in_dir(
    channel: &str,
    dir: &Path,
    id: &str,
    envelope: &Envelope,
    body: Body<'_>,
) -> Result<Reply, UpstreamError> {
    if id.is_empty()
        || id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(UpstreamError::Local(format!(
            "message id {id:?} is not a safe file name"
        )));
    }
    let mut text = format!("sender <{}>\n", envelope.sender);
    for recipient in &envelope.recipients {
        text.push_str(&format!("recipient <{recipient}>\n"));
    }
    let content = match body {
        Body::Bytes(bytes) => Content::Bytes(bytes.to_vec()),
        Body::File(path) => Content::File(path.to_path_buf()),
    };
    let (dir, id_owned) = (dir.to_path_buf(), id.to_string());
    let shown = dir.display().to_string();
    let file = blocking(move || write_message(&dir, &id_owned, text.as_bytes(), content))
        .await
        .map_err(|e| UpstreamError::Local(format!("{shown}: {e}")))?;
    Ok(Reply::stored_in_file(channel, &file))
}

enum Content {
    Bytes(Vec<u8>),
    File(PathBuf),
}

fn write_message(dir: &Path, id: &str, envelope: &[u8], content: Content) -> io::Result<String> {
    fs::create_dir_all(dir)?;
    write_atomically(dir, &format!("{id}.envelope"), |f| f.write_all(envelope))?;
    let eml = format!("{id}.eml");
    write_atomically(dir, &eml, |f| match &content {
        Content::Bytes(bytes) => f.write_all(bytes),
        Content::File(path) => io::copy(&mut fs::File::open(path)?, f).map(|_| ()),
    })?;
    fs::File::open(dir)?.sync_all()?;
    Ok(eml)
}

/// Writes `dir/.name.tmp`, fsyncs it and renames it to `dir/name`.
fn write_atomically(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        fill(&mut file)?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `test-channel` for a `file` channel: the directory exists (or is made) and takes a file.
fn probe_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}.tmp", crate::message::new_id()));
    let written = fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe").and_then(|()| f.sync_all()));
    let _ = fs::remove_file(&probe);
    written
}

#[cfg(test)]
pub(crate) mod tests;
