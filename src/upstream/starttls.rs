//! The plaintext part of a STARTTLS connection (greeting, EHLO, STARTTLS), spoken here
//! rather than by lettre.
//!
//! lettre 0.11 upgrades its buffered stream without looking at what the buffer still
//! holds: bytes sent after the `220` to STARTTLS, by the upstream or by anyone on the
//! path, would be read as replies that came over TLS, and such a reply could accept a
//! message the upstream refused (SPEC §7). Here every reply is cut from our own buffer;
//! a byte left in it after the `220` drops the connection. A byte that arrives later
//! goes into the TLS handshake, which fails on it.

use std::io;
use std::time::Duration;

use lettre::transport::smtp::commands::Ehlo;
use lettre::transport::smtp::extension::ClientId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Error, Step};
use crate::reply::{Reply, split_enhanced};

/// Most bytes of one reply, as lettre allows.
const MAX_REPLY: usize = 100_000;
/// Most bytes of one reply line, as lettre allows.
const MAX_LINE: usize = 1000;

/// One complete reply, every line's text without its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlainReply {
    pub(super) code: u16,
    pub(super) lines: Vec<String>,
}

impl PlainReply {
    fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The reply as ours, naming the channel: the first line's enhanced code, the
    /// lines joined.
    fn to_reply(&self, channel: &str) -> Reply {
        let first = self.lines.first().map(String::as_str).unwrap_or("");
        let (enhanced, _) = split_enhanced(first);
        let text: Vec<&str> = self
            .lines
            .iter()
            .map(|line| match split_enhanced(line) {
                (Some(code), rest) if Some(code) == enhanced => rest,
                _ => line.as_str(),
            })
            .collect();
        Reply::from_upstream(self.code, enhanced, &text.join(" "), channel)
    }

    /// The EHLO reply lists `keyword` (the first line is the server's name).
    pub(super) fn offers(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }
}

/// Cuts complete replies off the front of `buf`, leaving whatever follows them.
#[derive(Debug, Default)]
pub(super) struct Replies {
    buf: Vec<u8>,
    /// Lines of the reply being read.
    lines: Vec<String>,
    code: Option<u16>,
    /// Bytes of the reply being read, for [`MAX_REPLY`].
    size: usize,
}

impl Replies {
    /// Bytes received and not yet part of a reply.
    pub(super) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Adds received bytes.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete reply, `None` until its last line is in, or what is wrong.
    pub(super) fn next(&mut self) -> io::Result<Option<PlainReply>> {
        loop {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > MAX_LINE {
                    return Err(garbage("reply line too long"));
                }
                return Ok(None);
            };
            if end + 1 > MAX_LINE {
                return Err(garbage("reply line too long"));
            }
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            self.size += raw.len();
            if self.size > MAX_REPLY {
                return Err(garbage("reply too large"));
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            let (code, last, text) = parse_line(line)?;
            if self.code.is_some_and(|c| c != code) {
                return Err(garbage("reply lines with different codes"));
            }
            self.code = Some(code);
            self.lines.push(text.to_string());
            if last {
                self.size = 0;
                self.code = None;
                return Ok(Some(PlainReply {
                    code,
                    lines: std::mem::take(&mut self.lines),
                }));
            }
        }
    }
}

/// `250-text` / `250 text` / `250`: the code, whether it is the last line, the text.
fn parse_line(line: &str) -> io::Result<(u16, bool, &str)> {
    let bytes = line.as_bytes();
    let digits = bytes
        .get(..3)
        .filter(|d| (b'2'..=b'5').contains(&d[0]) && d[1..].iter().all(u8::is_ascii_digit));
    let Some(digits) = digits else {
        return Err(garbage("not an SMTP reply"));
    };
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match bytes.get(3) {
        None => Ok((code, true, "")),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(garbage("not an SMTP reply")),
    }
}

fn garbage(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A plain TCP connection before its TLS handshake.
struct Plain {
    tcp: TcpStream,
    replies: Replies,
}

impl Plain {
    async fn read_reply(&mut self) -> io::Result<PlainReply> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(reply) = self.replies.next()? {
                return Ok(reply);
            }
            let n = self.tcp.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection",
                ));
            }
            self.replies.push(&chunk[..n]);
        }
    }

    async fn command(&mut self, line: &str) -> io::Result<PlainReply> {
        self.tcp.write_all(line.as_bytes()).await?;
        self.read_reply().await
    }
}

/// Greeting, EHLO and STARTTLS on `tcp`, each under `limit`; returns the connection
/// ready for the TLS handshake with nothing received and unread, and the EHLO reply.
pub(super) async fn negotiate(
    tcp: TcpStream,
    hello: &ClientId,
    limit: Duration,
    channel: &str,
    target: &str,
) -> Result<(TcpStream, PlainReply), Error> {
    let mut plain = Plain {
        tcp,
        replies: Replies::default(),
    };
    let broken = |source: io::Error| Error::Connect {
        target: target.to_string(),
        source,
    };
    // A negative greeting or EHLO reply (`554`, `421` busy) is the upstream refusing us.
    let refused = |reply: &PlainReply| Error::Rejected {
        step: Step::Connect,
        reply: reply.to_reply(channel),
    };
    let timeout = |step| move |_| Error::Timeout { step };

    let greeting = tokio::time::timeout(limit, plain.read_reply())
        .await
        .map_err(timeout(Step::Connect))?
        .map_err(broken)?;
    if !greeting.is_positive() {
        return Err(refused(&greeting));
    }
    let ehlo = tokio::time::timeout(limit, plain.command(&Ehlo::new(hello.clone()).to_string()))
        .await
        .map_err(timeout(Step::Connect))?
        .map_err(broken)?;
    if !ehlo.is_positive() {
        return Err(refused(&ehlo));
    }
    if !ehlo.offers("STARTTLS") {
        return Err(Error::NoStartTls {
            target: target.to_string(),
        });
    }
    let tls_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Tls {
        target: target.to_string(),
        source,
    };
    let ready = tokio::time::timeout(limit, plain.command("STARTTLS\r\n"))
        .await
        .map_err(timeout(Step::Tls))?
        .map_err(|e| tls_error(e.into()))?;
    if ready.code != 220 {
        return Err(tls_error(
            format!("STARTTLS refused: {}", ready.to_reply(channel)).into(),
        ));
    }
    let unread = plain.replies.pending();
    if unread > 0 {
        return Err(tls_error(
            format!(
                "{unread} bytes came in plaintext after the 220 to STARTTLS; \
                 they would have been read as replies sent over TLS"
            )
            .into(),
        ));
    }
    Ok((plain.tcp, ehlo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> (Vec<PlainReply>, Replies) {
        let mut replies = Replies::default();
        replies.push(bytes);
        let mut out = Vec::new();
        while let Some(reply) = replies.next().unwrap() {
            out.push(reply);
        }
        (out, replies)
    }

    #[test]
    fn replies_are_cut_one_by_one_and_what_follows_stays() {
        let (replies, rest) =
            all(b"250-fake.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n220 go\r\n250 2.0");
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].code, 250);
        assert_eq!(replies[0].lines, ["fake.test", "STARTTLS", "8BITMIME"]);
        assert!(replies[0].offers("starttls") && !replies[0].offers("fake.test"));
        assert_eq!(replies[1].code, 220);
        assert_eq!(rest.pending(), b"250 2.0".len());
    }

    #[test]
    fn a_reply_fed_byte_by_byte_waits_for_its_last_line() {
        let text = b"220-hello\n220 there\r\n";
        let mut replies = Replies::default();
        for (i, byte) in text.iter().enumerate() {
            replies.push(&[*byte]);
            let got = replies.next().unwrap();
            assert_eq!(got.is_some(), i == text.len() - 1, "at byte {i}");
        }
        assert_eq!(replies.pending(), 0);
    }

    #[test]
    fn garbage_and_oversized_replies_are_errors() {
        for bad in [
            &b"hello\r\n"[..],
            b"25\r\n",
            b"250x\r\n",
            b"650 no\r\n",
            b"250-a\r\n251 b\r\n",
        ] {
            let mut replies = Replies::default();
            replies.push(bad);
            let result = (|| {
                while replies.next()?.is_some() {}
                Ok::<_, io::Error>(())
            })();
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut replies = Replies::default();
        replies.push(&[b'2'; MAX_LINE + 1]);
        assert!(replies.next().is_err());
        let mut replies = Replies::default();
        for _ in 0..MAX_REPLY / 10 + 1 {
            replies.push(b"250-abcde\r\n");
        }
        assert!(replies.next().is_err());
    }

    #[test]
    fn a_reply_becomes_ours_with_its_enhanced_code_once() {
        let (replies, _) = all(b"554-5.7.1 no\r\n554 5.7.1 go away\r\n");
        let reply = replies[0].to_reply("c");
        assert_eq!((reply.code, reply.enhanced), (554, Some((5, 7, 1))));
        assert_eq!(reply.text, "Channel c: upstream said: no go away");
        let (replies, _) = all(b"421\r\n");
        assert_eq!(replies[0].to_reply("c").enhanced, Some((4, 0, 0)));
    }
}
