//! A small blocking SMTP client for one submission to mailgate's own listener:
//! EHLO, MAIL, RCPT…, DATA, QUIT, with a timeout on every read and write.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, Failure};

/// How long to wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Each command reply (RFC 5321 §4.5.3.2 suggests 5 minutes).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The reply to the end of the data: in relay mode the upstream is reached meanwhile
/// (RFC 5321 §4.5.3.2: 10 minutes).
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest reply accepted; a peer sending more is not an SMTP server.
const MAX_REPLY: usize = 64 * 1024;

/// One message to submit.
#[derive(Debug)]
pub struct Submission<'a> {
    /// Envelope sender; empty for `<>`.
    pub sender: &'a str,
    /// Envelope recipients.
    pub recipients: &'a [String],
    /// The message, CRLF line ends, not yet dot-stuffed.
    pub data: &'a [u8],
    /// Declare `BODY=8BITMIME` (when the server offers it).
    pub eightbit: bool,
}

/// A server reply: code and text lines.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    peer: SocketAddr,
}

/// Connects to the first of `addrs` that answers.
fn connect(addrs: &[SocketAddr]) -> Result<Conn, Failure> {
    let mut errors = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let io = |e: std::io::Error| Failure::new(EX_TEMPFAIL, format!("{addr}: {e}"));
                stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
                stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
                let reader = BufReader::new(stream.try_clone().map_err(io)?);
                return Ok(Conn {
                    reader,
                    writer: BufWriter::new(stream),
                    peer: *addr,
                });
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(Failure::new(
        EX_TEMPFAIL,
        format!(
            "cannot connect to mailgate ({}); is it running?",
            errors.join(", ")
        ),
    ))
}

impl Conn {
    fn lost(&self, during: &str, e: std::io::Error) -> Failure {
        Failure::new(
            EX_TEMPFAIL,
            format!("connection to {} lost during {during}: {e}", self.peer),
        )
    }

    fn reply(&mut self, during: &str) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        let mut total = 0;
        loop {
            let mut line = Vec::new();
            let n = Read::by_ref(&mut self.reader)
                .take((MAX_REPLY - total + 1) as u64)
                .read_until(b'\n', &mut line)
                .map_err(|e| self.lost(during, e))?;
            if n == 0 {
                let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed");
                return Err(self.lost(during, eof));
            }
            total += n;
            if total > MAX_REPLY {
                return Err(self.garbled(during, "a reply longer than 64 KB"));
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let code = text.get(..3).and_then(|c| c.parse::<u16>().ok());
            let sep = text.as_bytes().get(3).copied();
            let Some(code) = code.filter(|c| (200..600).contains(c)) else {
                return Err(self.garbled(during, &format!("{text:?}")));
            };
            lines.push(text.get(4..).unwrap_or("").to_string());
            match sep {
                None | Some(b' ') => return Ok(Reply { code, lines }),
                Some(b'-') => {}
                Some(_) => return Err(self.garbled(during, &format!("{text:?}"))),
            }
        }
    }

    fn garbled(&self, during: &str, what: &str) -> Failure {
        Failure::new(
            EX_SOFTWARE,
            format!("{} sent {what} during {during}", self.peer),
        )
    }

    fn send(&mut self, bytes: &[u8], during: &str) -> Result<(), Failure> {
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(|e| self.lost(during, e))
    }

    /// Sends `command`, reads the reply, fails unless its code is `want`. A command
    /// holding a CR, an LF or a NUL is never written: it would end this command and
    /// start another (SMTP command injection), whatever let it through.
    fn command(&mut self, command: &str, want: u16) -> Result<Reply, Failure> {
        if let Some(bad) = unsafe_in_command(command) {
            return Err(Failure::new(
                EX_SOFTWARE,
                format!("refusing to send a command holding {bad}"),
            ));
        }
        self.send(format!("{command}\r\n").as_bytes(), command)?;
        let reply = self.reply(command)?;
        expect(&reply, want, command)?;
        Ok(reply)
    }

    /// Best effort: the outcome is already decided.
    fn quit(&mut self) {
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)));
        if self.send(b"QUIT\r\n", "QUIT").is_ok() {
            let _ = self.reply("QUIT");
        }
    }
}

/// A reply other than `want` (same first digit): 4xx is temporary, 5xx a refusal.
fn expect(reply: &Reply, want: u16, during: &str) -> Result<(), Failure> {
    if reply.code / 100 == want / 100 {
        return Ok(());
    }
    let code = match reply.code / 100 {
        4 => EX_TEMPFAIL,
        5 => EX_UNAVAILABLE,
        _ => EX_SOFTWARE,
    };
    Err(Failure::new(
        code,
        format!("{during}: mailgate replied {}", reply.text()),
    ))
}

/// What in a command line would make the server read more than one command.
fn unsafe_in_command(command: &str) -> Option<&'static str> {
    command.chars().find_map(|c| match c {
        '\r' => Some("a CR"),
        '\n' => Some("an LF"),
        '\0' => Some("a NUL"),
        _ => None,
    })
}

/// Every value that goes into a command, checked before connecting: an address with a
/// control character would send a partial transaction before the writer refuses it.
fn check_envelope(helo: &str, msg: &Submission) -> Result<(), Failure> {
    let values = std::iter::once(helo)
        .chain(std::iter::once(msg.sender))
        .chain(msg.recipients.iter().map(String::as_str));
    for value in values {
        if value.chars().any(char::is_control) {
            return Err(Failure::new(
                EX_USAGE,
                format!(
                    "{} holds a control character: nothing was sent",
                    crate::text::escape_controls(value)
                ),
            ));
        }
    }
    Ok(())
}

/// Submits one message to the first of `addrs` that answers. Every recipient must be
/// accepted; if one is refused, nothing is sent (the caller learns it from the exit code).
pub fn submit(addrs: &[SocketAddr], helo: &str, msg: &Submission) -> Result<(), Failure> {
    check_envelope(helo, msg)?;
    let mut conn = connect(addrs)?;
    let result = transaction(&mut conn, helo, msg);
    conn.quit();
    result
}

fn transaction(conn: &mut Conn, helo: &str, msg: &Submission) -> Result<(), Failure> {
    let greeting = conn.reply("the greeting")?;
    expect(&greeting, 220, "the greeting")?;
    let ehlo = conn.command(&format!("EHLO {helo}"), 250)?;
    let offers = |ext: &str| {
        ehlo.lines.iter().skip(1).any(|l| {
            l.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(ext))
        })
    };
    let mut mail = format!("MAIL FROM:<{}>", msg.sender);
    if offers("8BITMIME") && (msg.eightbit || !msg.data.is_ascii()) {
        mail.push_str(" BODY=8BITMIME");
    }
    let utf8 = !msg.sender.is_ascii() || msg.recipients.iter().any(|r| !r.is_ascii());
    if utf8 && offers("SMTPUTF8") {
        mail.push_str(" SMTPUTF8");
    }
    conn.command(&mail, 250)?;
    for rcpt in msg.recipients {
        conn.command(&format!("RCPT TO:<{rcpt}>"), 250)?;
    }
    conn.command("DATA", 354)?;
    let mut data = super::message::dot_stuff(msg.data);
    data.extend_from_slice(b".\r\n");
    conn.send(&data, "DATA")?;
    let _ = conn
        .reader
        .get_ref()
        .set_read_timeout(Some(DATA_END_TIMEOUT));
    let done = conn.reply("the end of DATA")?;
    expect(&done, 250, "the message")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A scripted server: answers each client line with the next reply; returns what it read.
    fn server(replies: &'static [&'static str]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut seen = String::new();
            let mut replies = replies.iter();
            s.write_all(replies.next().unwrap().as_bytes()).unwrap();
            let mut buf = [0u8; 4096];
            let mut pending = String::new();
            let mut in_data = false;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(end) = pending.find("\r\n") {
                    let line: String = pending.drain(..end + 2).collect();
                    seen.push_str(&line);
                    if in_data && line != ".\r\n" {
                        continue;
                    }
                    let Some(reply) = replies.next() else {
                        return seen;
                    };
                    in_data = reply.starts_with("354");
                    s.write_all(reply.as_bytes()).unwrap();
                }
            }
            seen
        });
        (addr, handle)
    }

    fn msg<'a>(rcpts: &'a [String], data: &'a [u8]) -> Submission<'a> {
        Submission {
            sender: "a@example.com",
            recipients: rcpts,
            data,
            eightbit: false,
        }
    }

    const OK: &[&str] = &[
        "220 hi\r\n",
        "250-hi\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
        "250 ok\r\n",
        "250 ok\r\n",
        "354 go\r\n",
        "250 queued\r\n",
        "221 bye\r\n",
    ];

    #[test]
    fn a_whole_transaction_dot_stuffed() {
        let (addr, seen) = server(OK);
        let rcpts = vec!["b@example.org".to_string()];
        submit(
            &[addr],
            "me.test",
            &msg(&rcpts, "Subject: é\r\n\r\n.hidden\r\n".as_bytes()),
        )
        .unwrap();
        assert_eq!(
            seen.join().unwrap(),
            "EHLO me.test\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\
             Subject: é\r\n\r\n..hidden\r\n.\r\nQUIT\r\n"
        );
    }

    #[test]
    fn replies_map_to_sysexits() {
        let rcpts = vec!["b@example.org".to_string()];
        let cases: [(&'static [&'static str], u8, &str); 4] = [
            (
                &[
                    "220 hi\r\n",
                    "250 hi\r\n",
                    "550 5.7.1 no channel\r\n",
                    "221 bye\r\n",
                ],
                EX_UNAVAILABLE,
                "MAIL FROM:<a@example.com>: mailgate replied 550 5.7.1 no channel",
            ),
            (
                &[
                    "220 hi\r\n",
                    "250 hi\r\n",
                    "250 ok\r\n",
                    "250 ok\r\n",
                    "354 go\r\n",
                    "451 4.4.1 upstream down\r\n",
                    "221 bye\r\n",
                ],
                EX_TEMPFAIL,
                "the message: mailgate replied 451 4.4.1 upstream down",
            ),
            (
                &["421-busy\r\n421 try later\r\n"],
                EX_TEMPFAIL,
                "the greeting: mailgate replied 421 busy / try later",
            ),
            (
                &[
                    "220 hi\r\n",
                    "250 hi\r\n",
                    "250 ok\r\n",
                    "250 ok\r\n",
                    "250 what\r\n",
                    "221 bye\r\n",
                ],
                EX_SOFTWARE,
                "DATA: mailgate replied 250 what",
            ),
        ];
        for (script, code, reason) in cases {
            let (addr, _seen) = server(script);
            let err = submit(&[addr], "me", &msg(&rcpts, b"x\r\n")).unwrap_err();
            assert_eq!((err.code, err.reason.as_str()), (code, reason));
        }
    }

    #[test]
    fn nothing_listening_is_a_temporary_failure() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = submit(&[addr], "me", &msg(&[], b"")).unwrap_err();
        assert_eq!(err.code, EX_TEMPFAIL);
        assert!(err.reason.contains("cannot connect"), "{}", err.reason);
    }

    #[test]
    fn an_envelope_with_a_control_character_is_refused_before_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let injected = "b@example.org>\r\nDATA\r\nforged\r\n.\r\nMAIL FROM:<x@y".to_string();
        let cases: [(&str, Vec<String>, &str); 3] = [
            (
                "a@example.com",
                vec!["ok@example.org".into(), injected],
                "me",
            ),
            (
                "a@example.com>\r\nRSET",
                vec!["ok@example.org".into()],
                "me",
            ),
            ("a@example.com", vec!["ok@example.org".into()], "me\nRSET"),
        ];
        for (sender, rcpts, helo) in &cases {
            let mut m = msg(rcpts, b"x\r\n");
            m.sender = sender;
            let err = submit(&[addr], helo, &m).unwrap_err();
            assert_eq!(err.code, EX_USAGE, "{}", err.reason);
            assert!(err.reason.contains("\\x0"), "{}", err.reason);
        }
        // not even a connection
        let refused = listener.accept().unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn the_writer_never_sends_a_command_holding_cr_or_lf() {
        let (addr, seen) = server(OK);
        let mut conn = connect(&[addr]).unwrap();
        conn.reply("the greeting").unwrap();
        for command in [
            "RCPT TO:<a@b>\r\nDATA",
            "RCPT TO:<a@b>\nDATA",
            "RCPT TO:<a@b>\rDATA",
            "RCPT TO:<a@b\0>",
        ] {
            let err = conn.command(command, 250).unwrap_err();
            assert_eq!(err.code, EX_SOFTWARE);
            assert!(err.reason.starts_with("refusing"), "{}", err.reason);
        }
        conn.command("EHLO fine", 250).unwrap();
        conn.quit();
        assert_eq!(seen.join().unwrap(), "EHLO fine\r\nQUIT\r\n");
    }

    #[test]
    fn garbage_is_a_software_error() {
        let (addr, _seen) = server(&["HTTP/1.1 400 Bad\r\n"]);
        let err = submit(&[addr], "me", &msg(&[], b"")).unwrap_err();
        assert_eq!(err.code, EX_SOFTWARE);
    }
}
