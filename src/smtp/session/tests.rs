//! Session tests: a client over an in-memory stream, a `file` channel as the upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;

use super::*;
use crate::config::{self, Secret, SenderPattern, User};

const LOOPBACK: &str = "127.0.0.1:40000";
const REMOTE: &str = "192.0.2.7:40000";

/// A config with a catch-all-for-example.com `file` channel and a relay channel for
/// partner.test whose own per-message recipient limit is 2.
fn test_config(dir: &Path, server_extra: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:2525"]
hostname = "mx.test"
max_message_size = 2000
max_recipients = 3
delivery = "relay"
spool_dir = '{spool}'
{server_extra}

[channels.outbox]
kind = "file"
dir = '{outbox}'
senders = ["*@example.com"]

[channels.partner]
host = "127.0.0.1"
port = 9
tls = "none"
domains = ["partner.test"]
max_recipients = 2
"#,
        spool = dir.join("spool").display(),
        outbox = dir.join("outbox").display(),
    );
    config::parse(&text, &dir.join("proxy.toml")).unwrap_or_else(|e| panic!("test config: {e}"))
}

/// A user `app` (password `pw`) who may send as app@example.com only.
fn with_user(mut config: Config) -> Config {
    config.users.push(User {
        name: "app".into(),
        password_hash: Secret::new(auth::cheap_hash("pw")),
        senders: vec![SenderPattern::Exact("app@example.com".into())],
    });
    config
}

struct Harness {
    dir: tempfile::TempDir,
    ctx: Arc<SessionCtx>,
}

impl Harness {
    fn new(server_extra: &str) -> Self {
        Self::with(server_extra, |c| c)
    }

    fn with(server_extra: &str, adjust: impl FnOnce(Config) -> Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = adjust(test_config(dir.path(), server_extra));
        config.server.idle_timeout = Duration::from_secs(20);
        Self::from_config(dir, config, None)
    }

    fn from_config(
        dir: tempfile::TempDir,
        config: Config,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let config = Arc::new(config);
        let delivery = Arc::new(Delivery::new(config.clone()).expect("delivery"));
        let ctx = SessionCtx {
            config,
            delivery,
            tls,
            shutdown: tokio_util::sync::CancellationToken::new(),
        };
        Harness {
            dir,
            ctx: Arc::new(ctx),
        }
    }

    async fn connect(&self) -> Client {
        self.connect_from(LOOPBACK, false).await
    }

    /// A client at `peer`; reads and checks the greeting.
    async fn connect_from(&self, peer: &str, is_tls: bool) -> Client {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let peer: SocketAddr = peer.parse().unwrap();
        let task = tokio::spawn(run(Box::new(server), peer, is_tls, self.ctx.clone()));
        let (read, write) = tokio::io::split(Box::new(client) as BoxStream);
        let mut client = Client {
            read: BufReader::new(read),
            write,
            task,
        };
        assert_eq!(client.reply().await, "220 mx.test ESMTP mailgate");
        client
    }

    fn outbox(&self) -> PathBuf {
        self.dir.path().join("outbox")
    }

    /// The messages the file channel wrote, sorted.
    fn delivered(&self) -> Vec<Vec<u8>> {
        let Ok(entries) = std::fs::read_dir(self.outbox()) else {
            return Vec::new();
        };
        let mut found: Vec<Vec<u8>> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        found.sort();
        found
    }
}

struct Client {
    read: BufReader<ReadHalf<BoxStream>>,
    write: WriteHalf<BoxStream>,
    task: JoinHandle<()>,
}

impl Client {
    async fn send(&mut self, text: &str) {
        self.send_bytes(text.as_bytes()).await;
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
        self.write.flush().await.unwrap();
    }

    /// One whole reply (all lines of a multi-line one, joined by `\n`, without CRLF).
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.read.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(
                n > 0,
                "connection closed while waiting for a reply; got so far: {lines:?}"
            );
            assert!(
                line.ends_with("\r\n"),
                "reply line ends with CRLF: {line:?}"
            );
            let line = line.trim_end_matches("\r\n").to_string();
            let last = line.len() == 3 || line.as_bytes().get(3) == Some(&b' ');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    /// Sends a command and returns its reply.
    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }

    /// The server has closed the connection (nothing more to read).
    async fn assert_closed(mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), self.read.read_to_end(&mut rest))
            .await
            .expect("server closes")
            .unwrap();
        assert!(
            rest.is_empty(),
            "unexpected bytes before close: {:?}",
            String::from_utf8_lossy(&rest)
        );
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("session ends")
            .unwrap();
    }
}

/// The reply's last line starts with `code` (e.g. `"503 5.5.1"`).
#[track_caller]
fn assert_code(reply: &str, code: &str) {
    let last = reply.lines().last().unwrap_or("");
    assert!(last.starts_with(code), "expected {code}, got {reply:?}");
}

/// EHLO, MAIL, RCPT and DATA up to the 354.
async fn open_data(c: &mut Client, sender: &str, rcpt: &str) {
    assert_code(&c.cmd("EHLO client.test").await, "250");
    assert_code(&c.cmd(&format!("MAIL FROM:<{sender}>")).await, "250 2.1.0");
    assert_code(&c.cmd(&format!("RCPT TO:<{rcpt}>")).await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
}

const MESSAGE: &str =
    "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n";

// ---- greeting, EHLO, HELO ----------------------------------------------------

#[tokio::test]
async fn ehlo_lists_the_extensions() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    let ehlo = c.cmd("EHLO client.test").await;
    let lines: Vec<&str> = ehlo.lines().collect();
    assert_eq!(
        lines,
        [
            "250-mx.test",
            "250-PIPELINING",
            "250-SIZE 2000",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-ENHANCEDSTATUSCODES",
            "250 CHUNKING"
        ]
    );
    assert_code(&c.cmd("QUIT").await, "221 2.0.0");
    c.assert_closed().await;
}

#[tokio::test]
async fn auth_is_offered_with_users_over_loopback_or_tls_only() {
    let h = Harness::with("", with_user);
    let mut local = h.connect().await;
    assert!(local.cmd("EHLO a").await.ends_with("250 AUTH PLAIN LOGIN"));
    let mut remote = h.connect_from(REMOTE, false).await;
    let ehlo = remote.cmd("EHLO a").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_code(&remote.cmd("AUTH PLAIN AGFwcABwdw==").await, "538 5.7.11");
    let mut remote_tls = h.connect_from(REMOTE, true).await;
    assert!(
        remote_tls
            .cmd("EHLO a")
            .await
            .ends_with("250 AUTH PLAIN LOGIN")
    );
}

#[tokio::test]
async fn helo_only_client_can_send() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_eq!(c.cmd("HELO legacy.test").await, "250 mx.test");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered(), [MESSAGE.as_bytes()]);
}

#[tokio::test]
async fn exact_bytes_arrive_unstuffed() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\n..leading dot\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: alice@example.com\r\n\r\n.leading dot\r\n".to_vec()]
    );
}

#[tokio::test]
async fn legacy_syntax_is_accepted() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("ehlo client.test").await, "250");
    assert_code(&c.cmd("mail from: <alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("rcpt to:bob@example.org").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO: carol@example.org  ").await, "250 2.1.5");
    assert_code(&c.cmd("rset").await, "250");
    assert_code(
        &c.cmd("MAIL FROM:alice@example.com SIZE=100").await,
        "250 2.1.0",
    );
    assert_code(&c.cmd("Rcpt To: <bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("data").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn simple_commands() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
    assert_code(&c.cmd("VRFY bob@example.org").await, "252 2.5.0");
    assert_code(&c.cmd("HELP").await, "214 2.0.0");
    assert_code(&c.cmd("EXPN staff").await, "502 5.5.1");
    assert_code(&c.cmd("ETRN example.org").await, "502 5.5.1");
    assert_code(&c.cmd("RSET").await, "250 2.0.0");
    assert_code(&c.cmd("QUIT").await, "221 2.0.0");
    c.assert_closed().await;
}

// ---- SPEC §5 table -------------------------------------------------------------

#[tokio::test]
async fn sender_without_channel_is_refused() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("MAIL FROM:<x@elsewhere.test>").await, "550 5.7.1");
    assert_code(&c.cmd("MAIL FROM:<x@partner.test>").await, "250 2.1.0");
}

#[tokio::test]
async fn require_auth_refuses_mail_until_authenticated() {
    let h = Harness::with("", |config| {
        let mut config = with_user(config);
        config.server.require_auth = true;
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("MAIL FROM:<app@example.com>").await, "530 5.7.0");
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235 2.7.0",
    );
    assert_code(&c.cmd("MAIL FROM:<app@example.com>").await, "250 2.1.0");
}

#[tokio::test]
async fn authenticated_user_may_only_use_own_senders() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235 2.7.0",
    );
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "550 5.7.1");
    assert_code(&c.cmd("MAIL FROM:<app@example.com>").await, "250 2.1.0");
}

#[tokio::test]
async fn auth_failures_and_cancel() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    assert_code(&c.cmd("AUTH PLAIN").await, "503 5.5.1");
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0wrong")))
            .await,
        "535 5.7.8",
    );
    assert_code(&c.cmd("AUTH CRAM-MD5").await, "504 5.5.4");
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_code(&c.cmd("*").await, "501 5.7.0");
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 ");
    assert_code(&c.cmd(&STANDARD.encode("\0app\0pw")).await, "235 2.7.0");
    assert_code(&c.cmd("AUTH PLAIN").await, "503 5.5.1");
}

#[tokio::test]
async fn auth_login_exchange() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd(&STANDARD.encode("app")).await, "334 UGFzc3dvcmQ6");
    assert_code(&c.cmd(&STANDARD.encode("pw")).await, "235 2.7.0");
}

#[tokio::test]
async fn an_over_long_auth_answer_ends_the_exchange() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_code(&c.cmd(&"QUFB".repeat(300)).await, "500 5.5.2");
    // The next line is a command again, not the user name.
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
}

#[tokio::test]
async fn auth_without_users_is_not_enabled() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("AUTH PLAIN AGFwcABwdw==").await, "503 5.5.1");
}

#[tokio::test]
async fn size_parameter_over_the_limit() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> SIZE=2001").await,
        "552 5.3.4",
    );
    // Too long for 64 bits: smtp-proto alone would read this as a small size.
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> SIZE=99999999999999999999999")
            .await,
        "552 5.3.4",
    );
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> SIZE=2000").await,
        "250 2.1.0",
    );
}

#[tokio::test]
async fn message_over_the_limit_is_refused_after_streaming() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    let big = format!("{MESSAGE}{}\r\n.\r\n", "x".repeat(3000));
    c.send(&big).await;
    assert_code(&c.reply().await, "552 5.3.4");
    assert!(h.delivered().is_empty());
    // The session goes on: the transaction is reset, the next message gets through.
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn too_many_recipients() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    for n in 0..3 {
        assert_code(
            &c.cmd(&format!("RCPT TO:<r{n}@example.org>")).await,
            "250 2.1.5",
        );
    }
    // Not counted against the error budget: a client may send the rest later.
    for n in 3..20 {
        assert_code(
            &c.cmd(&format!("RCPT TO:<r{n}@example.org>")).await,
            "452 4.5.3",
        );
    }
    assert_code(&c.cmd("DATA").await, "354");
}

#[tokio::test]
async fn relay_channel_recipient_limit_applies() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<x@partner.test>").await;
    assert_code(&c.cmd("RCPT TO:<a@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<b@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<c@example.org>").await, "452 4.5.3");
}

#[tokio::test]
async fn unknown_bad_parameters_and_bad_order() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("FROBNICATE").await, "500 5.5.2");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "503 5.5.1");
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<not an address>").await, "501 5.5.4");
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> FROB=1").await,
        "501 5.5.4",
    );
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "503 5.5.1");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("RCPT TO:<>").await, "501 5.5.4");
}

#[tokio::test]
async fn tenth_error_closes_the_session() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    for _ in 0..9 {
        assert_code(&c.cmd("BOGUS").await, "500 5.5.2");
    }
    assert_code(&c.cmd("NOOP").await, "250");
    c.send("BOGUS\r\n").await;
    assert_code(&c.reply().await, "500 5.5.2");
    assert_code(&c.reply().await, "421 4.7.0");
    c.assert_closed().await;
}

#[tokio::test]
async fn header_from_not_allowed_is_refused_after_data() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: ceo@elsewhere.test\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "550 5.7.1");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn bare_lf_rejected_when_configured() {
    let h = Harness::new(r#"bare_lf = "reject""#);
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\nline\nother\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "550 5.6.11");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn bare_lf_normalized_by_default() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\nline\nother\rend\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: alice@example.com\r\n\r\nline\r\nother\r\nend\r\n".to_vec()]
    );
}

/// SEC Consult's SMTP smuggling: a fake end of data with a second message behind it.
#[tokio::test]
async fn smuggled_message_stays_inside_the_first() {
    let payloads: &[&str] = &[
        "\n.\n",
        "\n.\r\n",
        "\r.\r",
        "\r\n.\n",
        "\r\n.\r",
        "\r.\r\n",
        "\r\n.\r\r\n",
    ];
    for reject in [false, true] {
        for payload in payloads {
            let h = Harness::new(if reject { r#"bare_lf = "reject""# } else { "" });
            let mut c = h.connect().await;
            open_data(&mut c, "alice@example.com", "bob@example.org").await;
            let hidden = "MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\
                From: ceo@example.com\r\n\r\nsmuggled\r\n";
            c.send(&format!(
                "From: alice@example.com\r\n\r\nfirst{payload}{hidden}.\r\nNOOP\r\n"
            ))
            .await;
            let reply = c.reply().await;
            // Exactly one message, then the NOOP: the hidden commands were never run.
            assert_code(&c.reply().await, "250 2.0.0 OK");
            let delivered = h.delivered();
            if reject {
                assert_code(&reply, "550 5.6.11");
                assert!(delivered.is_empty());
            } else {
                assert_code(&reply, "250");
                assert_eq!(delivered.len(), 1, "payload {payload:?}");
                let body = String::from_utf8(delivered[0].clone()).unwrap();
                assert!(
                    body.contains("\r\nMAIL FROM:<ceo@example.com>\r\n"),
                    "{body:?}"
                );
                assert!(
                    !body.replace("\r\n", "").contains(['\r', '\n']),
                    "normalized: {body:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn line_too_long_is_refused_and_skipped() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.send(&format!("NOOP {}\r\n", "x".repeat(2000))).await;
    assert_code(&c.reply().await, "500 5.5.2");
    assert_code(&c.cmd("NOOP").await, "250");
    // Longer than any buffer read at once: refused once, then skipped to its end.
    c.send(&format!("NOOP {}", "y".repeat(20_000))).await;
    assert_code(&c.reply().await, "500 5.5.2");
    c.send("tail of the long line\r\n").await;
    assert_code(&c.cmd("NOOP").await, "250");
    let exactly = format!("NOOP {}", "z".repeat(MAX_LINE - 7));
    assert_eq!(exactly.len() + 2, MAX_LINE);
    assert_code(&c.cmd(&exactly).await, "250");
}

// ---- timeouts and shutdown -------------------------------------------------------

#[tokio::test]
async fn idle_client_gets_421_4_4_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), "");
    config.server.idle_timeout = Duration::from_millis(200);
    let h = Harness::from_config(dir, config, None);
    let mut c = h.connect().await;
    assert_code(&c.reply().await, "421 4.4.2");
    c.assert_closed().await;
}

#[tokio::test]
async fn shutdown_while_waiting_for_a_command() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    h.ctx.shutdown.cancel();
    assert_code(&c.reply().await, "421 4.3.0");
    c.assert_closed().await;
}

#[tokio::test]
async fn shutdown_lets_a_message_in_flight_finish() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\nfirst half\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.ctx.shutdown.cancel();
    c.send("second half\r\n.\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.reply().await, "421 4.3.0");
    c.assert_closed().await;
    assert_eq!(h.delivered().len(), 1);
}

// ---- pipelining, BDAT ------------------------------------------------------------

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.send(&format!(
        "EHLO a\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<x>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n{MESSAGE}.\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n{MESSAGE}.\r\nQUIT\r\n"
    ))
    .await;
    let expected = [
        "250",
        "250 2.1.0",
        "250 2.1.5",
        "501 5.5.4",
        "250 2.1.5",
        "354",
        "250",
        "250 2.1.0",
        "250 2.1.5",
        "354",
        "250",
        "221",
    ];
    for code in expected {
        assert_code(&c.reply().await, code);
    }
    c.assert_closed().await;
    assert_eq!(h.delivered().len(), 2);
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    let (a, b) = MESSAGE.split_at(30);
    c.send(&format!("BDAT {}\r\n{a}", a.len())).await;
    assert_code(&c.reply().await, "250 2.0.0");
    // A CRLF split across chunks, a dot line kept as it is, a bare LF normalized.
    c.send(&format!("BDAT {}\r\n{b}.\r", b.len() + 2)).await;
    assert_code(&c.reply().await, "250 2.0.0");
    c.send("BDAT 6 LAST\r\n\nx\ny\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [format!("{MESSAGE}.\r\nx\r\ny\r\n").into_bytes()]
    );
    // The transaction is over.
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
}

#[tokio::test]
async fn bdat_out_of_order_skips_its_chunk() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.send("BDAT 12\r\nQUIT\r\nQUIT\r\n").await;
    assert_code(&c.reply().await, "503 5.5.1");
    assert_code(&c.cmd("NOOP").await, "250");
}

#[tokio::test]
async fn bdat_and_data_do_not_mix() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    c.send("BDAT 4\r\nab\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
}

#[tokio::test]
async fn bdat_over_the_limit() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    let chunk = "y".repeat(1500);
    c.send(&format!("BDAT 1500\r\n{chunk}BDAT 1500 LAST\r\n{chunk}"))
        .await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.reply().await, "552 5.3.4");
    assert!(h.delivered().is_empty());
    assert_code(&c.cmd("NOOP").await, "250");
}

// ---- STARTTLS ----------------------------------------------------------------------

fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

#[tokio::test]
async fn starttls_discards_pipelined_commands_and_resets_state() {
    let (acceptor, connector) = tls_pair();
    let dir = tempfile::tempdir().unwrap();
    let config = with_user(test_config(dir.path(), ""));
    let h = Harness::from_config(dir, config, Some(acceptor));
    let mut c = h.connect_from(REMOTE, false).await;
    let ehlo = c.cmd("EHLO a").await;
    assert!(
        ehlo.contains("250-STARTTLS") || ehlo.ends_with("250 STARTTLS"),
        "{ehlo}"
    );
    assert!(
        !ehlo.contains("AUTH"),
        "no AUTH in plaintext off loopback: {ehlo}"
    );
    // An injected command rides behind STARTTLS: it must never run.
    c.send("STARTTLS\r\nMAIL FROM:<alice@example.com>\r\n")
        .await;
    assert_code(&c.reply().await, "220 2.0.0");
    let Client { read, write, task } = c;
    let plain = read.into_inner().unsplit(write);
    let name = rustls::pki_types::ServerName::try_from("mx.test").unwrap();
    let tls = connector.connect(name, plain).await.expect("TLS handshake");
    let (read, write) = tokio::io::split(Box::new(tls) as BoxStream);
    let mut c = Client {
        read: BufReader::new(read),
        write,
        task,
    };
    // State was reset: no transaction, no EHLO.
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "503 5.5.1");
    let ehlo = c.cmd("EHLO a").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN"), "{ehlo}");
    assert_code(&c.cmd("STARTTLS").await, "454 4.7.0");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.cmd("QUIT").await, "221");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn starttls_without_certificate_is_unavailable() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("STARTTLS").await, "454 4.7.0");
}
