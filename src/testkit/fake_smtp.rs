//! A fake SMTP upstream on 127.0.0.1:0 that records what it is sent, scriptable per
//! command (replies, delays, STARTTLS, implicit TLS, AUTH, PIPELINING look-ahead).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rustls::ServerConfig;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How the fake upstream behaves.
#[derive(Clone, Default)]
pub struct Fake {
    /// EHLO keywords (STARTTLS is added when `starttls` is set).
    pub extensions: Vec<&'static str>,
    /// More EHLO keywords, offered only before STARTTLS.
    pub before_tls: Vec<&'static str>,
    /// Offer STARTTLS with this server config.
    pub starttls: Option<Arc<ServerConfig>>,
    /// Lines sent in plaintext right behind the `220` to STARTTLS, in the same write
    /// (or, with `inject_apart`, in a write of their own a moment later), as a
    /// server or an attacker on the path would inject them.
    pub inject_after_starttls: Vec<&'static str>,
    /// Send `inject_after_starttls` 20 ms after the `220`, not with it.
    pub inject_apart: bool,
    /// TLS from the first byte with this server config.
    pub implicit: Option<Arc<ServerConfig>>,
    /// Accepted AUTH user and password.
    pub credentials: Option<(&'static str, &'static str)>,
    /// `(prefix, reply)`: a command line starting with `prefix` gets `reply` (and
    /// changes no state: a refused RCPT is not a recipient).
    pub replies: Vec<(&'static str, &'static str)>,
    /// Reply to the end of data (default `250 2.0.0 Ok: queued as FAKE1`).
    pub data_reply: Option<&'static str>,
    /// Wait this long before answering the end of data.
    pub delay: Duration,
    /// Close the connection after each message.
    pub close_after_data: bool,
    /// Never send the greeting.
    pub silent: bool,
    /// Before answering MAIL, wait this long for more command lines (up to a DATA
    /// line) and record those that came in [`Record::ahead`]: a client that pipelines
    /// has sent them already, one that does not cannot have.
    pub lookahead: Option<Duration>,
    /// Replies to the end of data of successive transactions, across sessions; once
    /// used up, `data_reply` (or `250`) answers.
    pub data_script: Vec<&'static str>,
    /// Waits before the `354` of successive transactions, across sessions (a slow
    /// server, or a new connection's first message); once used up, none.
    pub go_ahead_delays: Vec<Duration>,
}

/// One completed message as the fake saw it.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    /// The MAIL command line.
    pub mail: String,
    /// The accepted recipients (addresses without brackets).
    pub rcpts: Vec<String>,
    /// Exactly the bytes between `354` and the final `.CRLF` (still dot-stuffed).
    pub wire: Vec<u8>,
    /// It came over TLS.
    pub tls: bool,
    /// `MECHANISM:user` when the session had logged in.
    pub user: Option<String>,
}

impl Txn {
    /// The message as sent, dot-stuffing undone.
    pub fn unstuffed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire.len());
        for line in self.wire.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }
}

/// What the fake upstream saw.
#[derive(Default)]
pub struct Record {
    /// Accepted messages.
    pub txns: Mutex<Vec<Txn>>,
    /// Every command line, in order, across sessions.
    pub commands: Mutex<Vec<String>>,
    /// Connections accepted.
    pub sessions: AtomicUsize,
    /// Connections open now.
    pub live: AtomicUsize,
    /// Most connections open at once.
    pub max_live: AtomicUsize,
    /// Per MAIL (with [`Fake::lookahead`]): the command lines that had arrived before
    /// it was answered.
    pub ahead: Mutex<Vec<Vec<String>>>,
    /// Per DATA cut off by the end of the connection: the bytes after `354`.
    pub unfinished: Mutex<Vec<Vec<u8>>>,
    /// Messages that reached their end of data, accepted or not.
    pub ended: AtomicUsize,
    /// When each message's end of data arrived, accepted or not: what a provider
    /// counting arrivals against a rate sees.
    pub arrivals: Mutex<Vec<std::time::Instant>>,
    script: Mutex<VecDeque<&'static str>>,
    go_ahead_delays: Mutex<VecDeque<Duration>>,
}

impl Record {
    /// Accepted messages.
    pub fn txns(&self) -> Vec<Txn> {
        self.txns.lock().unwrap().clone()
    }
    /// Every command line so far.
    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
    /// See [`Record::ahead`].
    pub fn ahead(&self) -> Vec<Vec<String>> {
        self.ahead.lock().unwrap().clone()
    }
    /// See [`Record::unfinished`].
    pub fn unfinished(&self) -> Vec<Vec<u8>> {
        self.unfinished.lock().unwrap().clone()
    }
}

/// Starts the fake upstream; returns its port and what it records.
pub async fn start(fake: Fake) -> (u16, Arc<Record>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let record = Arc::new(Record {
        script: Mutex::new(fake.data_script.iter().copied().collect()),
        go_ahead_delays: Mutex::new(fake.go_ahead_delays.iter().copied().collect()),
        ..Record::default()
    });
    let (fake, rec) = (Arc::new(fake), record.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (fake, rec) = (fake.clone(), rec.clone());
            tokio::spawn(async move {
                rec.sessions.fetch_add(1, Ordering::SeqCst);
                let live = rec.live.fetch_add(1, Ordering::SeqCst) + 1;
                rec.max_live.fetch_max(live, Ordering::SeqCst);
                let _ = serve(&fake, &rec, tcp).await;
                rec.live.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, record)
}

enum Next {
    Done,
    StartTls,
}

async fn serve(fake: &Fake, rec: &Record, tcp: TcpStream) -> io::Result<()> {
    if fake.silent {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return Ok(());
    }
    if let Some(config) = &fake.implicit {
        let tls = TlsAcceptor::from(config.clone()).accept(tcp).await?;
        session(fake, rec, &mut BufStream::new(tls), true, true).await?;
        return Ok(());
    }
    let mut plain = BufStream::new(tcp);
    if let Next::StartTls = session(fake, rec, &mut plain, false, true).await? {
        let config = fake.starttls.clone().unwrap();
        let tls = TlsAcceptor::from(config).accept(plain.into_inner()).await?;
        session(fake, rec, &mut BufStream::new(tls), true, false).await?;
    }
    Ok(())
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    fake: &Fake,
    rec: &Record,
    io: &mut BufStream<S>,
    tls: bool,
    greet: bool,
) -> io::Result<Next> {
    async fn send<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut BufStream<S>,
        text: &str,
    ) -> io::Result<()> {
        io.write_all(text.as_bytes()).await?;
        io.write_all(b"\r\n").await?;
        io.flush().await
    }
    async fn line<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut BufStream<S>,
    ) -> io::Result<Option<String>> {
        let mut buf = Vec::new();
        if io.read_until(b'\n', &mut buf).await? == 0 {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(&buf)
                .trim_end_matches("\r\n")
                .to_string(),
        ))
    }
    if greet {
        send(io, "220 fake.test ESMTP").await?;
    }
    let mut txn = Txn {
        tls,
        ..Txn::default()
    };
    let mut user = None;
    // Like Postfix: RCPT needs a MAIL, DATA an accepted RCPT, so pipelined commands
    // after a refusal get the answers a real server gives.
    let (mut have_mail, mut accepted) = (false, 0);
    // Lines read ahead (see `Fake::lookahead`), answered before reading more.
    let mut pending = VecDeque::new();
    loop {
        let cmd = match pending.pop_front() {
            Some(cmd) => cmd,
            None => match line(io).await? {
                Some(cmd) => cmd,
                None => break,
            },
        };
        rec.commands.lock().unwrap().push(cmd.clone());
        let verb = cmd.split(' ').next().unwrap_or("").to_ascii_uppercase();
        if let (Some(wait), "MAIL") = (fake.lookahead, verb.as_str()) {
            // Dropping a half-read line at the deadline is fine here: a client that
            // does not pipeline sends nothing before the answer.
            let deadline = tokio::time::Instant::now() + wait;
            while !pending
                .back()
                .is_some_and(|l: &String| l.eq_ignore_ascii_case("DATA"))
            {
                match tokio::time::timeout_at(deadline, line(io)).await {
                    Ok(Ok(Some(next))) => pending.push_back(next),
                    _ => break,
                }
            }
            rec.ahead
                .lock()
                .unwrap()
                .push(pending.iter().cloned().collect());
        }
        if let Some((_, reply)) = fake
            .replies
            .iter()
            .find(|(prefix, _)| cmd.starts_with(prefix))
        {
            send(io, reply).await?;
            if reply.starts_with("421") {
                return Ok(Next::Done);
            }
            continue;
        }
        match verb.as_str() {
            "EHLO" => {
                (have_mail, accepted) = (false, 0);
                let mut lines = vec![format!("fake.test greets {}", &cmd[5..])];
                lines.extend(fake.extensions.iter().map(|e| e.to_string()));
                if fake.starttls.is_some() && !tls {
                    lines.extend(fake.before_tls.iter().map(|e| e.to_string()));
                    lines.push("STARTTLS".into());
                }
                let last = lines.len() - 1;
                let text: Vec<String> = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                    .collect();
                send(io, &text.join("\r\n")).await?;
            }
            "STARTTLS" if fake.starttls.is_some() && !tls => {
                let ready = "220 2.0.0 Ready to start TLS";
                let inject = fake.inject_after_starttls.join("\r\n");
                if inject.is_empty() {
                    send(io, ready).await?;
                } else if fake.inject_apart {
                    send(io, ready).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    send(io, &inject).await?;
                } else {
                    send(io, &format!("{ready}\r\n{inject}")).await?;
                }
                return Ok(Next::StartTls);
            }
            "AUTH" => {
                let mut words = cmd.split(' ').skip(1);
                let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
                let b64 = base64::engine::general_purpose::STANDARD;
                let decode = |s: &str| {
                    String::from_utf8(b64.decode(s.trim()).unwrap_or_default()).unwrap_or_default()
                };
                let (u, p) = match mechanism.as_str() {
                    "PLAIN" => {
                        let initial = match words.next() {
                            Some(i) => i.to_string(),
                            None => {
                                send(io, "334 ").await?;
                                line(io).await?.unwrap_or_default()
                            }
                        };
                        let plain = decode(&initial);
                        let mut parts = plain.split('\0').skip(1);
                        (
                            parts.next().unwrap_or("").to_string(),
                            parts.next().unwrap_or("").to_string(),
                        )
                    }
                    "LOGIN" => {
                        send(io, "334 VXNlcm5hbWU6").await?;
                        let u = decode(&line(io).await?.unwrap_or_default());
                        send(io, "334 UGFzc3dvcmQ6").await?;
                        let p = decode(&line(io).await?.unwrap_or_default());
                        (u, p)
                    }
                    _ => {
                        send(io, "504 5.5.4 unknown mechanism").await?;
                        continue;
                    }
                };
                if fake.credentials.is_some_and(|(eu, ep)| eu == u && ep == p) {
                    user = Some(format!("{mechanism}:{u}"));
                    send(io, "235 2.7.0 Authentication successful").await?;
                } else {
                    send(io, "535 5.7.8 Error: authentication failed").await?;
                }
            }
            "MAIL" => {
                txn = Txn {
                    mail: cmd.clone(),
                    tls,
                    user: user.clone(),
                    ..Txn::default()
                };
                (have_mail, accepted) = (true, 0);
                send(io, "250 2.1.0 Ok").await?;
            }
            "RCPT" if !have_mail => send(io, "503 5.5.1 Error: need MAIL command").await?,
            "RCPT" => {
                txn.rcpts
                    .push(cmd[8..].trim_matches(|c| c == '<' || c == '>').to_string());
                accepted += 1;
                send(io, "250 2.1.5 Ok").await?;
            }
            "DATA" if accepted == 0 => {
                let reply = if have_mail {
                    "554 5.5.1 Error: no valid recipients"
                } else {
                    "503 5.5.1 Error: need RCPT command"
                };
                send(io, reply).await?;
            }
            "DATA" => {
                let wait = rec.go_ahead_delays.lock().unwrap().pop_front();
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
                send(io, "354 End data with <CR><LF>.<CR><LF>").await?;
                (have_mail, accepted) = (false, 0);
                let mut wire = Vec::new();
                loop {
                    let mut buf = Vec::new();
                    if io.read_until(b'\n', &mut buf).await? == 0 {
                        rec.unfinished.lock().unwrap().push(wire);
                        return Ok(Next::Done);
                    }
                    if buf == b".\r\n" {
                        rec.arrivals.lock().unwrap().push(std::time::Instant::now());
                        break;
                    }
                    wire.extend_from_slice(&buf);
                }
                tokio::time::sleep(fake.delay).await;
                rec.ended.fetch_add(1, Ordering::SeqCst);
                let scripted = rec.script.lock().unwrap().pop_front();
                let reply = scripted
                    .or(fake.data_reply)
                    .unwrap_or("250 2.0.0 Ok: queued as FAKE1");
                if reply.starts_with('2') {
                    rec.txns.lock().unwrap().push(Txn {
                        wire,
                        ..std::mem::take(&mut txn)
                    });
                }
                send(io, reply).await?;
                if fake.close_after_data {
                    return Ok(Next::Done);
                }
            }
            "RSET" => {
                txn = Txn::default();
                (have_mail, accepted) = (false, 0);
                send(io, "250 2.0.0 Ok").await?;
            }
            "NOOP" => send(io, "250 2.0.0 Ok").await?,
            "QUIT" => {
                send(io, "221 2.0.0 Bye").await?;
                return Ok(Next::Done);
            }
            _ => send(io, "502 5.5.2 Error: command not recognized").await?,
        }
    }
    Ok(Next::Done)
}

/// A fake with PIPELINING, 8BITMIME and ENHANCEDSTATUSCODES.
pub fn plain_fake() -> Fake {
    Fake {
        extensions: vec!["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"],
        ..Fake::default()
    }
}

/// [`plain_fake`] without PIPELINING: mailgate sends one command at a time.
pub fn one_by_one_fake() -> Fake {
    Fake {
        extensions: vec!["8BITMIME", "ENHANCEDSTATUSCODES"],
        ..Fake::default()
    }
}
