//! One client session: the SMTP state machine (SPEC §5). This file is the read/write
//! loop and the command dispatch; each verb group has its own file beside it.
//!
//! The session reads into a buffer, answers every complete command in it, and writes
//! the replies in one batch when the buffer is drained (so pipelining clients are
//! fast). DATA and BDAT stream through [`crate::smtp::data::Decoder`] into a delivery
//! [`crate::delivery::Draft`];
//! the session itself keeps only the header section (for routing).
//!
//! Deadlines, so that a slow client cannot hold a slot for ever: a command line must be
//! complete within `idle_timeout` of when the session started waiting for it (bytes
//! dribbled in do not extend it); a message (each DATA, or BDAT chunks in a row) must
//! arrive within `idle_timeout` plus one second per [`MIN_DATA_RATE`] bytes received.
//! On shutdown a session without a transaction ends at once (`421 4.3.0`); one with a
//! transaction may finish it within `shutdown_grace`, and ends when it is over.

mod auth;
mod command;
mod data;
mod ehlo;
mod mail;
mod starttls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tracing::debug;

pub use self::command::parse_command;
use self::data::Body;
use crate::config::{ChannelId, Config};
use crate::delivery::Delivery;
use crate::message::Envelope;
use crate::smtp::reply::Reply;

/// A client connection: plain TCP, TLS, or an in-memory stream in tests.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + ?Sized> AsyncStream for T {}

/// A boxed client connection (so STARTTLS can replace it with its TLS wrapper).
pub type BoxStream = Box<dyn AsyncStream>;

/// What every session of a running proxy shares.
pub struct SessionCtx {
    /// The configuration.
    pub config: Arc<Config>,
    /// Where accepted messages go.
    pub delivery: Arc<Delivery>,
    /// Offers STARTTLS on plain connections when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Cancelled when the proxy shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Failed AUTH per client address, shared by all sessions.
    pub failed_logins: Arc<crate::smtp::auth::FailedLogins>,
}

/// Longest command line, CRLF included (SPEC §5).
pub const MAX_LINE: usize = 1000;
/// Negative replies after which the session is closed with `421 4.7.0`.
pub const MAX_ERRORS: u32 = 10;
/// Read size while waiting for commands: small, so idle sessions stay cheap.
const COMMAND_READ: usize = 4 * 1024;
/// Read size while a message streams in.
const DATA_READ: usize = 64 * 1024;
/// Slowest a message may arrive once `idle_timeout` has passed, in bytes per second
/// (Postfix's `smtpd_min_data_rate` default).
pub const MIN_DATA_RATE: u64 = 500;

/// Serves one client connection until it ends. `is_tls`: the stream is already TLS
/// (implicit-TLS listener). The listener has already checked `allow_networks` and
/// the connection limit.
pub async fn run(stream: BoxStream, peer: SocketAddr, is_tls: bool, ctx: Arc<SessionCtx>) {
    debug!(%peer, is_tls, "client connected");
    let mut session = Session::new(stream, peer, is_tls, ctx);
    let stop = match session.serve().await {
        Err(stop) => stop,
        Ok(never) => match never {},
    };
    session.close(&stop).await;
    debug!(%peer, reason = stop.name(), "client disconnected");
}

/// Why a session ends.
#[derive(Debug)]
enum Stop {
    /// The client said QUIT.
    Quit,
    /// The client closed the connection.
    Eof,
    /// No complete command within `idle_timeout`.
    Idle,
    /// A message arrives slower than [`MIN_DATA_RATE`].
    TooSlow,
    /// The proxy is shutting down.
    Shutdown,
    /// The error budget is spent.
    TooManyErrors,
    /// The TLS handshake failed.
    Tls(io::Error),
    /// Reading or writing failed.
    Io(io::Error),
}

impl Stop {
    /// A short name for the log.
    fn name(&self) -> &'static str {
        match self {
            Stop::Quit => "quit",
            Stop::Eof => "client closed",
            Stop::Idle => "idle timeout",
            Stop::TooSlow => "message data too slow",
            Stop::Shutdown => "shutdown",
            Stop::TooManyErrors => "too many errors",
            Stop::Tls(_) => "TLS failed",
            Stop::Io(_) => "I/O error",
        }
    }
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

/// Uninhabited: `serve` only ever returns through `Err(Stop)`.
enum Never {}

/// One line of input, or the news that a line was too long.
enum Input {
    Line(Vec<u8>),
    TooLong,
}

/// A mail transaction: from MAIL to the end of the message.
struct Transaction {
    envelope: Envelope,
    channel: ChannelId,
    /// The message so far, once BDAT has started.
    bdat: Option<Body>,
    /// The `[[rewrite]]` entry that gave the envelope its sender (SPEC §4a).
    rewrite: Option<crate::rewrite::Rewrite>,
}

struct Session {
    ctx: Arc<SessionCtx>,
    config: Arc<Config>,
    peer: SocketAddr,
    io: BoxStream,
    is_tls: bool,
    /// Unprocessed input is `rbuf[rpos..]`.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Replies not yet written.
    wbuf: Vec<u8>,
    /// Discarding the rest of an over-long line.
    skipping: bool,
    /// The name from HELO/EHLO.
    helo: Option<String>,
    /// The authenticated user.
    user: Option<String>,
    /// An AUTH exchange waiting for the client's next line.
    auth: Option<crate::smtp::auth::Exchange>,
    tx: Option<Transaction>,
    errors: u32,
    /// Failed AUTH in this session (each answer is delayed more).
    auth_failures: u32,
    /// When the command line being read must be complete.
    line_deadline: Option<Instant>,
    /// The message streaming in: when it started and how many bytes have come.
    data_clock: Option<(Instant, u64)>,
    /// Noticed a shutdown: when an open transaction must be over.
    grace_until: Option<Instant>,
}

/// Which deadline a read runs into.
#[derive(Clone, Copy)]
enum Deadline {
    Idle,
    Slow,
    Grace,
}

impl Session {
    fn new(io: BoxStream, peer: SocketAddr, is_tls: bool, ctx: Arc<SessionCtx>) -> Self {
        Session {
            config: ctx.config.clone(),
            ctx,
            peer,
            io,
            is_tls,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
            skipping: false,
            helo: None,
            user: None,
            auth: None,
            tx: None,
            errors: 0,
            auth_failures: 0,
            line_deadline: None,
            data_clock: None,
            grace_until: None,
        }
    }

    async fn serve(&mut self) -> Result<Never, Stop> {
        self.reply(&Reply::greeting(&self.config.server.hostname))?;
        loop {
            while let Some(input) = self.next_line() {
                if self.tx.is_none() && self.ctx.shutdown.is_cancelled() {
                    // Pipelined commands behind the end of the last transaction are not run.
                    return Err(Stop::Shutdown);
                }
                match input {
                    Input::Line(line) => self.line(&line).await?,
                    Input::TooLong => {
                        // Refusing the line ends an AUTH exchange waiting for it, as any
                        // refused AUTH step does (RFC 4954).
                        self.auth = None;
                        self.reply(&Reply::line_too_long())?
                    }
                }
            }
            self.fill(true).await?;
        }
    }

    /// Says goodbye as the reason requires, best effort.
    async fn close(&mut self, stop: &Stop) {
        let last = match stop {
            Stop::Idle => Some(Reply::idle_timeout()),
            Stop::TooSlow => Some(Reply::too_slow()),
            Stop::Shutdown => Some(Reply::shutting_down()),
            Stop::TooManyErrors => Some(Reply::too_many_errors()),
            Stop::Tls(e) => {
                debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                None
            }
            Stop::Io(e) => {
                debug!(peer = %self.peer, error = %e, "connection error");
                None
            }
            Stop::Quit | Stop::Eof => None,
        };
        if let Some(reply) = last {
            reply.write_wire(&mut self.wbuf);
        }
        if !matches!(stop, Stop::Eof | Stop::Io(_)) {
            let _ = self.flush().await;
            let _ = timeout(self.config.server.idle_timeout, self.io.shutdown()).await;
        }
    }

    // ---- input and output ------------------------------------------------

    /// The next complete line in the buffer, if any.
    fn next_line(&mut self) -> Option<Input> {
        loop {
            let available = &self.rbuf[self.rpos..];
            match available.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let line = &available[..=i];
                    self.rpos += i + 1;
                    self.line_deadline = None;
                    if self.skipping {
                        self.skipping = false;
                        continue;
                    }
                    if line.len() > MAX_LINE {
                        return Some(Input::TooLong);
                    }
                    return Some(Input::Line(line.to_vec()));
                }
                None if available.len() > MAX_LINE => {
                    self.rpos = self.rbuf.len();
                    if !self.skipping {
                        self.skipping = true;
                        return Some(Input::TooLong);
                    }
                    return None;
                }
                None => return None,
            }
        }
    }

    /// Writes pending replies, then reads more input, within the deadlines of the module
    /// doc. `command`: waiting for a command (else a message streams in).
    async fn fill(&mut self, command: bool) -> Result<(), Stop> {
        if command && self.tx.is_none() && self.ctx.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        self.flush().await?;
        if self.rpos == self.rbuf.len() {
            self.rpos = 0;
            self.rbuf.clear();
            if command && self.rbuf.capacity() > 2 * COMMAND_READ {
                // Idle sessions must not keep a message-sized buffer.
                self.rbuf = Vec::new();
            }
        } else if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        // A message reads in large pieces only once it has proved large: a 64 KiB buffer
        // for a 1 KB message cost a large allocation and its release per message.
        let streaming = !command
            && self
                .data_clock
                .is_some_and(|(_, bytes)| bytes >= COMMAND_READ as u64);
        self.rbuf
            .reserve(if streaming { DATA_READ } else { COMMAND_READ });
        let now = Instant::now();
        let idle = self.config.server.idle_timeout;
        let (limit, kind) = if command {
            self.data_clock = None;
            (
                *self.line_deadline.get_or_insert(now + idle),
                Deadline::Idle,
            )
        } else {
            let (start, bytes) = *self.data_clock.get_or_insert((now, 0));
            let earned = Duration::from_millis(bytes.saturating_mul(1000) / MIN_DATA_RATE);
            let slow = start + idle + earned;
            if slow < now + idle {
                (slow, Deadline::Slow)
            } else {
                (now + idle, Deadline::Idle)
            }
        };
        let grace = self.config.server.shutdown_grace;
        let read = self.io.read_buf(&mut self.rbuf);
        tokio::pin!(read);
        let result = loop {
            let (until, kind) = match self.grace_until {
                Some(end) if end < limit => (end, Deadline::Grace),
                _ => (limit, kind),
            };
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled(), if self.grace_until.is_none() => {
                    if command && self.tx.is_none() {
                        return Err(Stop::Shutdown);
                    }
                    self.grace_until = Some(Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(until.into()) => {
                    return Err(match kind {
                        Deadline::Idle => Stop::Idle,
                        Deadline::Slow => Stop::TooSlow,
                        Deadline::Grace => Stop::Shutdown,
                    });
                }
                r = &mut read => break r,
            }
        };
        match result {
            Err(e) => Err(Stop::Io(e)),
            Ok(0) => Err(Stop::Eof),
            Ok(n) => {
                if let Some((_, bytes)) = self.data_clock.as_mut() {
                    *bytes = bytes.saturating_add(n as u64);
                }
                Ok(())
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        match timeout(self.config.server.idle_timeout, write).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Stop::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client does not read",
                )));
            }
        }
        self.wbuf.clear();
        if self.wbuf.capacity() > 2 * COMMAND_READ {
            self.wbuf = Vec::new();
        }
        Ok(())
    }

    /// Queues a reply; a negative one spends the error budget.
    fn reply(&mut self, reply: &Reply) -> Result<(), Stop> {
        reply.write_wire(&mut self.wbuf);
        self.count(reply)
    }

    fn count(&mut self, reply: &Reply) -> Result<(), Stop> {
        // Too many recipients is not the client's error: RFC 5321 §4.5.3.1.10 expects it
        // to send the rest in another transaction, so it must not cost the session.
        let exempt = reply.code == 452 && reply.enhanced == Some((4, 5, 3));
        if reply.code >= 400 && !exempt {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                return Err(Stop::TooManyErrors);
            }
        }
        Ok(())
    }

    // ---- commands --------------------------------------------------------

    async fn line(&mut self, line: &[u8]) -> Result<(), Stop> {
        if let Some(exchange) = self.auth.take() {
            let answer = std::str::from_utf8(line).unwrap_or("\u{0}");
            let progress = exchange.respond(answer.trim_end_matches(['\r', '\n']));
            return self.auth_progress(progress).await;
        }
        match parse_command(line) {
            Ok(request) => self.command(request).await,
            Err(refusal) => self.reply(&refusal),
        }
    }

    async fn command(&mut self, request: Request<String>) -> Result<(), Stop> {
        match request {
            Request::Ehlo { host } => self.hello(&host, true),
            Request::Helo { host } => self.hello(&host, false),
            Request::Mail { from } => {
                let reply = self.mail(from);
                self.reply(&reply)
            }
            Request::Rcpt { to } => {
                let reply = self.rcpt(to);
                self.reply(&reply)
            }
            Request::Data => self.data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last).await,
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response).await,
            Request::StartTls => self.starttls().await,
            Request::Noop { .. } => self.reply(&Reply::ok()),
            Request::Vrfy { .. } => self.reply(&Reply::cannot_vrfy()),
            Request::Help { .. } => self.reply(&Reply::help()),
            Request::Rset => {
                self.tx = None;
                self.reply(&Reply::ok())
            }
            Request::Quit => {
                self.reply(&Reply::bye())?;
                Err(Stop::Quit)
            }
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(&Reply::not_implemented()),
        }
    }
}

#[cfg(test)]
mod tests;
