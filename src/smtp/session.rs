//! One client session: the SMTP state machine (SPEC §5).
//!
//! The session reads into a buffer, answers every complete command in it, and writes
//! the replies in one batch when the buffer is drained (so pipelining clients are
//! fast). DATA and BDAT stream through [`Decoder`] into a delivery [`Draft`];
//! the session itself keeps only the header section (for routing).
//! Every read waits at most `idle_timeout`; a shutdown is noticed while waiting for
//! a command (a message being received is finished first).

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use smtp_proto::{Error as ParseError, MailFrom, RcptTo, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::config::{BareLf, ChannelId, Config, DeliveryMode};
use crate::delivery::{Delivery, Draft};
use crate::message::Envelope;
use crate::routing;
use crate::smtp::auth::{self, Mechanism, Progress};
use crate::smtp::data::Decoder;
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
}

/// Longest command line, CRLF included (SPEC §5).
pub const MAX_LINE: usize = 1000;
/// Negative replies after which the session is closed with `421 4.7.0`.
pub const MAX_ERRORS: u32 = 10;
/// Most header bytes kept for routing.
const HEADER_CAP: usize = 64 * 1024;
/// Read size while waiting for commands: small, so idle sessions stay cheap.
const COMMAND_READ: usize = 4 * 1024;
/// Read size while a message streams in.
const DATA_READ: usize = 64 * 1024;

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
    /// No data within `idle_timeout`.
    Idle,
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
}

/// A message streaming in.
struct Body {
    draft: Draft,
    decoder: Decoder,
    headers: HeaderCapture,
    /// Writing the draft failed: the reply to give at the end.
    failed: Option<Reply>,
}

impl Body {
    fn new(draft: Draft, decoder: Decoder) -> Self {
        Body {
            draft,
            decoder,
            headers: HeaderCapture::default(),
            failed: None,
        }
    }

    /// Takes decoded bytes: keeps the headers, writes to the draft unless the message is
    /// already over `max` (then it is only counted) or a write failed.
    async fn take(&mut self, out: &[u8], max: u64) {
        self.headers.push(out);
        if self.decoder.size() > max || self.failed.is_some() || out.is_empty() {
            return;
        }
        if let Err(e) = self.draft.write(out).await {
            warn!(id = self.draft.id(), error = %e, "writing message failed");
            self.failed = Some(Reply::local_error());
        }
    }
}

/// Keeps a message's header section (up to the first empty line, at most
/// [`HEADER_CAP`] bytes) as the decoded bytes go by.
#[derive(Default)]
struct HeaderCapture {
    bytes: Vec<u8>,
    done: bool,
}

impl HeaderCapture {
    fn push(&mut self, out: &[u8]) {
        if self.done {
            return;
        }
        // The empty line may straddle two pushes.
        let search_from = self.bytes.len().saturating_sub(3);
        let room = HEADER_CAP - self.bytes.len();
        self.bytes.extend_from_slice(&out[..out.len().min(room)]);
        if self.bytes.starts_with(b"\r\n") {
            self.bytes.clear();
            self.done = true;
        } else if let Some(p) = self.bytes[search_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            self.bytes.truncate(search_from + p + 2);
            self.done = true;
        } else if self.bytes.len() >= HEADER_CAP {
            self.done = true;
        }
    }
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
    auth: Option<auth::Exchange>,
    tx: Option<Transaction>,
    errors: u32,
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
        }
    }

    async fn serve(&mut self) -> Result<Never, Stop> {
        self.reply(&Reply::greeting(&self.config.server.hostname))?;
        loop {
            while let Some(input) = self.next_line() {
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
            self.wbuf.extend_from_slice(reply.to_wire().as_bytes());
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

    /// Writes pending replies, then reads more input. While waiting for a command
    /// (`command`), a shutdown ends the session; while a message streams in, it does not.
    async fn fill(&mut self, command: bool) -> Result<(), Stop> {
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
        self.rbuf
            .reserve(if command { COMMAND_READ } else { DATA_READ });
        let idle = self.config.server.idle_timeout;
        let read = timeout(idle, self.io.read_buf(&mut self.rbuf));
        let result = if command {
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Err(Stop::Shutdown),
                r = read => r,
            }
        } else {
            read.await
        };
        match result {
            Err(_) => Err(Stop::Idle),
            Ok(Err(e)) => Err(Stop::Io(e)),
            Ok(Ok(0)) => Err(Stop::Eof),
            Ok(Ok(_)) => Ok(()),
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
        self.wbuf.extend_from_slice(reply.to_wire().as_bytes());
        self.count(reply)
    }

    /// Queues a multi-line reply (`250-a`, `250-b`, `250 c`).
    fn reply_lines(&mut self, code: u16, lines: &[String]) {
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.wbuf
                .extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
        }
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

    fn hello(&mut self, host: &str, extended: bool) -> Result<(), Stop> {
        // RFC 5321 §4.1.4: EHLO/HELO also resets the transaction.
        self.tx = None;
        self.helo = Some(host.to_string());
        let hostname = self.config.server.hostname.clone();
        if !extended {
            return self.reply(&Reply::plain(250, hostname));
        }
        let mut lines = vec![
            hostname,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.server.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.ctx.tls.is_some() && !self.is_tls {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        self.reply_lines(250, &lines);
        Ok(())
    }

    /// AUTH is offered when there are users, and only over TLS or loopback (SPEC §9).
    fn auth_offered(&self) -> bool {
        !self.config.users.is_empty() && (self.is_tls || is_loopback(self.peer.ip()))
    }

    fn mail(&mut self, from: MailFrom<String>) -> Reply {
        if self.helo.is_none() {
            return Reply::bad_sequence("send HELO or EHLO first");
        }
        if self.tx.is_some() {
            return Reply::bad_sequence("nested MAIL command");
        }
        let server = &self.config.server;
        if server.require_auth && self.user.is_none() {
            return Reply::auth_required();
        }
        let sender = from.address.as_str();
        if !sender.is_empty() && !valid_address(sender) {
            return Reply::bad_parameters("invalid sender address");
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return Reply::bad_parameters("BODY=BINARYMIME is not supported");
        }
        if let Some(name) = &self.user {
            let owned = self
                .config
                .users
                .iter()
                .any(|u| &u.name == name && routing::user_allows(u, sender));
            if !owned {
                return Reply::sender_not_owned(name, sender);
            }
        }
        if from.size as u64 > server.max_message_size {
            return Reply::too_big(server.max_message_size);
        }
        match routing::route_sender(&self.config, sender) {
            Err(refusal) => {
                info!(peer = %self.peer, sender, reply = %refusal, "sender refused");
                refusal
            }
            Ok(decision) => {
                debug!(sender, channel = %self.config.channels[decision.channel].name, reason = %decision.reason, "sender routed");
                self.tx = Some(Transaction {
                    envelope: Envelope {
                        sender: sender.to_string(),
                        recipients: Vec::new(),
                        smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                        eightbit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                    },
                    channel: decision.channel,
                    bdat: None,
                });
                Reply::sender_ok()
            }
        }
    }

    fn rcpt(&mut self, to: RcptTo<String>) -> Reply {
        let limit = self.recipient_limit();
        let Some(tx) = self.tx.as_mut() else {
            return Reply::bad_sequence("need MAIL before RCPT");
        };
        if tx.bdat.is_some() {
            return Reply::bad_sequence("RCPT after BDAT");
        }
        if !valid_address(&to.address) {
            return Reply::bad_parameters("invalid recipient address");
        }
        if tx.envelope.recipients.len() >= limit {
            return Reply::too_many_recipients(limit);
        }
        tx.envelope.recipients.push(to.address);
        Reply::recipient_ok()
    }

    /// `max_recipients`, and in relay mode also the channel's own per-message limit.
    fn recipient_limit(&self) -> usize {
        let server = self.config.server.max_recipients;
        match (&self.tx, self.config.server.delivery) {
            (Some(tx), DeliveryMode::Relay) => {
                let channel = self.config.channels[tx.channel].limits.max_recipients;
                channel.map_or(server, |c| c.min(server))
            }
            _ => server,
        }
    }

    /// Why this transaction may not take a message yet, if it may not.
    fn body_refusal(&self, verb: &str) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::bad_sequence(&format!("need MAIL before {verb}"))),
            Some(tx) if tx.envelope.recipients.is_empty() => {
                Some(Reply::bad_sequence(&format!("need RCPT before {verb}")))
            }
            _ => None,
        }
    }

    async fn data(&mut self) -> Result<(), Stop> {
        if let Some(refusal) = self.body_refusal("DATA") {
            return self.reply(&refusal);
        }
        if self.tx.as_ref().is_some_and(|tx| tx.bdat.is_some()) {
            return self.reply(&Reply::bad_sequence("DATA may not follow BDAT"));
        }
        let draft = match self.ctx.delivery.begin().await {
            Ok(draft) => draft,
            Err(refusal) => return self.reply(&refusal),
        };
        self.reply(&Reply::start_data())?;
        let max = self.config.server.max_message_size;
        let mut body = Body::new(draft, Decoder::data());
        let mut out = Vec::with_capacity(DATA_READ);
        loop {
            let input = &self.rbuf[self.rpos..];
            let end = body.decoder.feed(input, &mut out);
            self.rpos += end.unwrap_or(input.len());
            body.take(&out, max).await;
            out.clear();
            if end.is_some() {
                break;
            }
            self.fill(false).await?;
        }
        let reply = self.complete(body).await;
        self.reply(&reply)
    }

    async fn bdat(&mut self, size: usize, last: bool) -> Result<(), Stop> {
        let refusal = self.body_refusal("BDAT");
        if let Some(refusal) = refusal {
            // The chunk follows the command whatever the answer: it must not be read as commands.
            self.skip(size).await?;
            return self.reply(&refusal);
        }
        let pending = self.tx.as_mut().and_then(|tx| tx.bdat.take());
        let mut body = match pending {
            Some(body) => body,
            None => match self.ctx.delivery.begin().await {
                Ok(draft) => Body::new(draft, Decoder::bdat()),
                Err(refusal) => {
                    self.skip(size).await?;
                    self.tx = None;
                    return self.reply(&refusal);
                }
            },
        };
        let max = self.config.server.max_message_size;
        let mut out = Vec::new();
        let mut left = size;
        loop {
            let available = &self.rbuf[self.rpos..];
            let n = available.len().min(left);
            body.decoder.feed(&available[..n], &mut out);
            self.rpos += n;
            left -= n;
            if left == 0 && last {
                body.decoder.finish(&mut out);
            }
            body.take(&out, max).await;
            out.clear();
            if left == 0 {
                break;
            }
            self.fill(false).await?;
        }
        if last {
            let reply = self.complete(body).await;
            return self.reply(&reply);
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.bdat = Some(body);
        }
        self.reply(&Reply::chunk_ok(size))
    }

    /// Reads and drops `size` bytes of a refused BDAT chunk.
    async fn skip(&mut self, mut size: usize) -> Result<(), Stop> {
        loop {
            let n = (self.rbuf.len() - self.rpos).min(size);
            self.rpos += n;
            size -= n;
            if size == 0 {
                return Ok(());
            }
            self.fill(false).await?;
        }
    }

    /// The end of a message: checks it, routes it, hands it to delivery; ends the transaction.
    async fn complete(&mut self, body: Body) -> Reply {
        let Some(tx) = self.tx.take() else {
            return Reply::local_error();
        };
        let envelope = tx.envelope;
        let id = body.draft.id().to_string();
        let server = &self.config.server;
        let refusal = if body.decoder.size() > server.max_message_size {
            Some(Reply::too_big(server.max_message_size))
        } else if let Some(failed) = body.failed {
            Some(failed)
        } else if body.decoder.saw_bare() && server.bare_lf == BareLf::Reject {
            Some(Reply::bare_lf())
        } else {
            None
        };
        let decision = match refusal {
            Some(r) => Err(r),
            None => {
                let headers = routing::parse_headers(&body.headers.bytes);
                routing::route_message(
                    &self.config,
                    &envelope.sender,
                    envelope.recipients.len(),
                    &headers,
                )
            }
        };
        let decision = match decision {
            Ok(decision) => decision,
            Err(refusal) => {
                info!(
                    id,
                    peer = %self.peer,
                    sender = %envelope.sender,
                    rcpts = envelope.recipients.len(),
                    size = body.decoder.size(),
                    reply = %refusal,
                    "message refused"
                );
                return refusal;
            }
        };
        let size = body.decoder.size();
        let channel = self.config.channels[decision.channel].name.clone();
        // Boxed: the delivery future is large and would otherwise be part of every
        // session's future, idle or not. Delivery logs the message line itself.
        let finish = self
            .ctx
            .delivery
            .finish(body.draft, decision.channel, &envelope);
        let reply = Box::pin(finish).await;
        debug!(
            id,
            peer = %self.peer,
            sender = %envelope.sender,
            rcpts = envelope.recipients.len(),
            size,
            channel,
            reason = %decision.reason,
            reply = %reply,
            "message handed to delivery"
        );
        reply
    }

    async fn auth(&mut self, mechanism: u64, initial_response: &str) -> Result<(), Stop> {
        let refusal = if self.config.users.is_empty() {
            Some(Reply::bad_sequence("authentication not enabled"))
        } else if !self.auth_offered() {
            Some(Reply::encryption_required())
        } else if self.helo.is_none() {
            Some(Reply::bad_sequence("send EHLO first"))
        } else if self.user.is_some() {
            Some(Reply::bad_sequence("already authenticated"))
        } else if self.tx.is_some() {
            Some(Reply::bad_sequence(
                "AUTH not allowed during a mail transaction",
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return self.reply(&refusal);
        }
        match Mechanism::from_flag(mechanism) {
            Some(mechanism) => {
                self.auth_progress(auth::start(mechanism, initial_response))
                    .await
            }
            None => self.reply(&Reply::auth_mechanism_unsupported()),
        }
    }

    async fn auth_progress(&mut self, progress: Result<Progress, Reply>) -> Result<(), Stop> {
        match progress {
            Err(refusal) => self.reply(&refusal),
            Ok(Progress::Challenge(exchange, challenge)) => {
                self.auth = Some(exchange);
                self.reply(&challenge)
            }
            Ok(Progress::Done(credentials)) => {
                let username = credentials.username.clone();
                match auth::verify(&self.config.users, credentials).await {
                    Some(user) => {
                        info!(peer = %self.peer, user, "client authenticated");
                        self.user = Some(user);
                        self.reply(&Reply::auth_ok())
                    }
                    None => {
                        warn!(peer = %self.peer, user = username, "client authentication failed");
                        self.reply(&Reply::auth_failed())
                    }
                }
            }
        }
    }

    async fn starttls(&mut self) -> Result<(), Stop> {
        let acceptor = match &self.ctx.tls {
            Some(acceptor) if !self.is_tls => acceptor.clone(),
            _ => return self.reply(&Reply::tls_unavailable()),
        };
        if self.tx.is_some() {
            return self.reply(&Reply::bad_sequence(
                "STARTTLS not allowed during a mail transaction",
            ));
        }
        self.reply(&Reply::ready_for_tls())?;
        self.flush().await?;
        // RFC 3207 / SPEC §5: whatever the client pipelined after STARTTLS is dropped,
        // never executed after the handshake.
        self.rbuf = Vec::new();
        self.rpos = 0;
        self.skipping = false;
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        match timeout(self.config.server.idle_timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => self.io = Box::new(tls),
            Ok(Err(e)) => return Err(Stop::Tls(e)),
            Err(_) => {
                return Err(Stop::Tls(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )));
            }
        }
        // RFC 3207 §4.2: forget everything learnt before the handshake.
        self.is_tls = true;
        self.helo = None;
        self.user = None;
        self.auth = None;
        self.tx = None;
        Ok(())
    }
}

/// Parses one command line (CRLF or LF included) the liberal way (see [`liberal`]);
/// a line that is not a valid command yields the reply the client gets. Public so a
/// fuzz target can drive it.
pub fn parse_command(line: &[u8]) -> Result<Request<String>, Reply> {
    let line = liberal(line);
    Request::parse(&mut line.iter())
        .map(Request::into_owned)
        .map_err(parse_error_reply)
}

/// The reply to a command line smtp-proto could not parse.
fn parse_error_reply(error: ParseError) -> Reply {
    match error {
        ParseError::UnknownCommand => Reply::unknown_command(),
        ParseError::InvalidSenderAddress => Reply::bad_parameters("invalid sender address"),
        ParseError::InvalidRecipientAddress => Reply::bad_parameters("invalid recipient address"),
        ParseError::SyntaxError { syntax } => Reply::bad_parameters(&format!("use {syntax}")),
        ParseError::InvalidParameter { param } => {
            Reply::bad_parameters(&format!("invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::bad_parameters(&format!("unsupported parameter {}", printable(&param)))
        }
        ParseError::NeedsMoreData { .. }
        | ParseError::ResponseTooLong
        | ParseError::InvalidResponse { .. } => Reply::bad_parameters("incomplete command"),
    }
}

/// Text from the client, safe to echo in a reply (one line, printable ASCII, short).
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// Rewrites a command line the way Postfix would accept it: trailing blanks dropped,
/// and a bare address after `MAIL FROM:` / `RCPT TO:` wrapped in angle brackets.
fn liberal(line: &[u8]) -> Cow<'_, [u8]> {
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    let trimmed = content.trim_ascii_end();
    let wrapped = wrap_bare_address(trimmed);
    let clamped = clamp_size(wrapped.as_deref().unwrap_or(trimmed));
    let wrapped = clamped.or(wrapped);
    if wrapped.is_none() && trimmed.len() == content.len() && line.ends_with(b"\r\n") {
        return Cow::Borrowed(line);
    }
    let mut fixed = wrapped.unwrap_or_else(|| trimmed.to_vec());
    fixed.extend_from_slice(b"\r\n");
    Cow::Owned(fixed)
}

/// `MAIL FROM:a@b [params]` → `MAIL FROM:<a@b> [params]` (also RCPT TO); `None` when
/// the line is not such a command or already has brackets.
fn wrap_bare_address(line: &[u8]) -> Option<Vec<u8>> {
    let verb = line.get(..4)?;
    let keyword: &[u8] = if verb.eq_ignore_ascii_case(b"MAIL") {
        b"FROM"
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        b"TO"
    } else {
        return None;
    };
    let rest = &line[4..];
    let after_space = rest.trim_ascii_start();
    if after_space.len() == rest.len() {
        return None;
    }
    let after_keyword = after_space.get(keyword.len()..)?;
    if !after_space[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let after_colon = after_keyword.trim_ascii_start().strip_prefix(b":")?;
    let address_start = after_colon.trim_ascii_start();
    if address_start.is_empty() || address_start[0] == b'<' {
        return None;
    }
    let address_len = address_start
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(address_start.len());
    let prefix_len = line.len() - address_start.len();
    let mut fixed = Vec::with_capacity(line.len() + 2);
    fixed.extend_from_slice(&line[..prefix_len]);
    fixed.push(b'<');
    fixed.extend_from_slice(&address_start[..address_len]);
    fixed.push(b'>');
    fixed.extend_from_slice(&address_start[address_len..]);
    Some(fixed)
}

/// The largest `SIZE=` value passed on to smtp-proto: over any `max_message_size`, and
/// still parsed exactly (it fits in 64 bits and is not smtp-proto's "invalid" `usize::MAX`).
const SIZE_CLAMP: &[u8] = b"18446744073709551614";

/// `MAIL FROM:<a@b> SIZE=<more than 64 bits of digits>` → `SIZE=18446744073709551614`.
/// smtp-proto saturates an over-long SIZE and then starts again from the next digit, so
/// `SIZE=10^22` would read as a tiny size and pass; clamped, it is refused as too big.
fn clamp_size(line: &[u8]) -> Option<Vec<u8>> {
    if !line.get(..4)?.eq_ignore_ascii_case(b"MAIL") {
        return None;
    }
    let start = line
        .windows(6)
        .position(|w| w.eq_ignore_ascii_case(b" SIZE="))?
        + 6;
    let digits = line[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let value = &line[start..start + digits];
    let fits = std::str::from_utf8(value).is_ok_and(|v| v.parse::<u64>().is_ok());
    if digits == 0 || fits {
        return None;
    }
    let mut fixed = line[..start].to_vec();
    fixed.extend_from_slice(SIZE_CLAMP);
    fixed.extend_from_slice(&line[start + digits..]);
    Some(fixed)
}

/// A mailbox `local@domain` with both parts present and no blanks or control characters.
fn valid_address(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !address.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests;
