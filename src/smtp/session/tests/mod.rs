//! Session tests: a client over an in-memory stream, a `file` channel as the upstream.
//! This file is the harness; the tests sit by verb group beside it.

mod auth;
mod data;
mod ehlo;
mod io;
mod mail;
mod rewrite;
mod starttls;

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
        password_hash: Secret::new(crate::smtp::auth::cheap_hash("pw")),
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
            failed_logins: Default::default(),
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
