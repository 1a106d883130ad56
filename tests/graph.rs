//! The Microsoft Graph channel end to end, in process: the real delivery layer (relay and
//! queue modes, spool on disk, channel workers, token cache) against a local Graph
//! stand-in and a local OAuth token endpoint (`mailgate::testkit`), both real HTTP servers
//! on 127.0.0.1 port 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailgate::config::{Channel, ChannelKind, Config, DeliveryMode, Limits, StateBackend};
use mailgate::delivery::Delivery;
use mailgate::message::Envelope;
use mailgate::reply::Reply;
use mailgate::testkit::config::{graph_channel, server};
use mailgate::testkit::graph_api::{GraphApi, Scripted};
use mailgate::testkit::token_endpoint::TokenEndpoint;
use tokio_util::sync::CancellationToken;

const MAILBOX: &str = "dave@example.com";

struct Setup {
    tokens: Arc<TokenEndpoint>,
    graph: GraphApi,
    _dir: tempfile::TempDir,
    config: Arc<Config>,
    delivery: Arc<Delivery>,
    shutdown: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn setup(mode: DeliveryMode, extra: Vec<Channel>) -> Setup {
    setup_with(mode, extra, &[]).await
}

/// `fallbacks`: (channel, its fallback) wired after the channels are sorted.
async fn setup_with(mode: DeliveryMode, extra: Vec<Channel>, fallbacks: &[(&str, &str)]) -> Setup {
    setup_state(mode, extra, fallbacks, StateBackend::Local).await
}

/// As [`setup_with`], one host of a fleet sharing `state`.
async fn setup_state(
    mode: DeliveryMode,
    extra: Vec<Channel>,
    fallbacks: &[(&str, &str)],
    state: StateBackend,
) -> Setup {
    setup_full(mode, extra, fallbacks, state, |_, _| {}).await
}

/// As [`setup_state`], the graph channel changed by `tweak` (given the token endpoint).
async fn setup_full(
    mode: DeliveryMode,
    extra: Vec<Channel>,
    fallbacks: &[(&str, &str)],
    state: StateBackend,
    tweak: impl FnOnce(&mut Channel, &TokenEndpoint),
) -> Setup {
    mailgate::tls::install_crypto_provider();
    let tokens = Arc::new(TokenEndpoint::start().await);
    let graph = GraphApi::start(tokens.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut dave = graph_channel("dave", MAILBOX, &graph.url(), &tokens.token_url());
    tweak(&mut dave, &tokens);
    let mut channels = vec![dave];
    channels.extend(extra);
    channels.sort_by(|a, b| a.name.cmp(&b.name));
    for (from, to) in fallbacks {
        let to = channels.iter().position(|c| c.name == *to).unwrap();
        let from = channels.iter().position(|c| c.name == *from).unwrap();
        channels[from].fallback = Some(to);
    }
    let config = Arc::new(Config {
        server: mailgate::config::Server {
            delivery: mode,
            spool_dir: dir.path().join("spool"),
            retry_first: Duration::from_millis(300),
            retry_max: Duration::from_secs(2),
            ..server()
        },
        state,
        ..mailgate::testkit::config::config(channels)
    });
    let delivery = Arc::new(Delivery::new(config.clone()).unwrap());
    let shutdown = CancellationToken::new();
    {
        let (d, s) = (delivery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run_queue(s).await });
    }
    Setup {
        tokens,
        graph,
        _dir: dir,
        config,
        delivery,
        shutdown,
    }
}

impl Setup {
    fn id(&self, name: &str) -> usize {
        self.config.channel_id(name).unwrap()
    }

    async fn submit_to(&self, channel: &str, sender: &str, rcpts: &[&str], body: &[u8]) -> Reply {
        let mut draft = self.delivery.begin().await.unwrap();
        for piece in body.chunks(1000) {
            draft.write(piece).await.unwrap();
        }
        let envelope = Envelope {
            sender: sender.into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        self.delivery
            .finish(draft, self.id(channel), &envelope)
            .await
    }

    async fn submit(&self, rcpts: &[&str], body: &[u8]) -> Reply {
        self.submit_to("dave", MAILBOX, rcpts, body).await
    }

    fn spool_files(&self, folder: &str) -> Vec<String> {
        let dir = self.config.server.spool_dir.join(folder);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|x| x == "json") {
                out.push(std::fs::read_to_string(entry.path()).unwrap());
            }
        }
        out
    }
}

use mailgate::testkit::wait_for;

fn message(to: &str) -> Vec<u8> {
    // A leading dot, 8-bit text, a long line: all must arrive byte for byte.
    let mut m = format!(
        "From: Dave <{MAILBOX}>\r\nTo: {to}\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\n.leading dot\r\n"
    )
    .into_bytes();
    m.extend_from_slice("größe ünd 8 bit\r\n".as_bytes());
    m.extend_from_slice(&[b'x'; 3000]);
    m.extend_from_slice(b"\r\nend\r\n");
    m
}

#[tokio::test]
async fn relay_mode_delivers_the_exact_bytes() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    let body = message("bob@example.org");
    let reply = s.submit(&["bob@example.org"], &body).await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (250, Some((2, 0, 0))),
        "{reply}"
    );
    assert!(
        reply.text.contains("accepted by Microsoft Graph (202"),
        "{reply}"
    );
    let sent = s.graph.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].mailbox, MAILBOX);
    assert_eq!(sent[0].mime, body, "byte for byte");
    assert_eq!(s.tokens.requests("client_credentials"), 1);
}

#[tokio::test]
async fn queue_mode_delivers_the_exact_bytes_and_adds_only_the_bcc() {
    let s = setup(DeliveryMode::Queue, vec![]).await;
    let body = message("bob@example.org");
    let reply = s
        .submit(&["bob@example.org", "carol@example.org"], &body)
        .await;
    assert!(reply.text.starts_with("queued as "), "{reply}");
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    let mut want = b"Bcc: carol@example.org\r\n".to_vec();
    want.extend_from_slice(&body);
    assert_eq!(s.graph.sent()[0].mime, want, "only the Bcc: line differs");
    assert!(wait_for(Duration::from_secs(5), || s.spool_files("queue").is_empty()).await);
}

#[tokio::test]
async fn a_header_recipient_outside_the_envelope_is_never_sent_to() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    let reply = s
        .submit(
            &["bob@example.org"],
            &message("bob@example.org, eve@example.org"),
        )
        .await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (550, Some((5, 7, 1))),
        "{reply}"
    );
    assert!(reply.text.contains("<eve@example.org>"), "{reply}");
    assert_eq!(s.graph.requests(), 0);
}

#[tokio::test]
async fn no_byte_of_the_message_can_add_a_recipient_to_the_added_bcc() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    // A folded line at the very top would continue the Bcc: line put before it.
    let mut folded = b" , eve@example.org\r\n".to_vec();
    folded.extend_from_slice(&message("bob@example.org"));
    let reply = s
        .submit(&["bob@example.org", "carol@example.org"], &folded)
        .await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (550, Some((5, 7, 1))),
        "{reply}"
    );
    assert!(reply.text.contains("<eve@example.org>"), "{reply}");
    // An envelope address that reads as two in a header (it came quoted in RCPT TO).
    let reply = s
        .submit(
            &["bob@example.org", "eve@example.org,carol@example.org"],
            &message("bob@example.org"),
        )
        .await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (550, Some((5, 7, 1))),
        "{reply}"
    );
    // A display name alone that looks like an address.
    let reply = s
        .submit(
            &["bob@example.org"],
            &message("bob@example.org, \"eve@example.org\""),
        )
        .await;
    assert_eq!(reply.code, 550, "{reply}");
    assert_eq!(s.graph.requests(), 0, "nothing reached Graph");
}

#[tokio::test]
async fn throttled_429_waits_for_retry_after_then_delivers() {
    let s = setup(DeliveryMode::Queue, vec![]).await;
    s.graph.script([Scripted::throttled("1")]);
    let started = Instant::now();
    s.submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    // Retry-After: 1 beats retry_first (300 ms).
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s.graph.requests(), 2);

    // Relay mode: the client hears the throttling as a temporary reply.
    let r = setup(DeliveryMode::Relay, vec![]).await;
    r.graph.script([Scripted::throttled("7")]);
    let reply = r
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (451, Some((4, 7, 0))),
        "{reply}"
    );
    assert!(
        reply.text.contains("TooManyRequests") && reply.text.contains("retry after 7s"),
        "{reply}"
    );
}

#[tokio::test]
async fn service_unavailable_defers() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    s.graph
        .script([Scripted::status(503, "ServiceNotAvailable")]);
    let reply = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(reply.code, 451, "{reply}");
    let reply = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
}

#[tokio::test]
async fn a_401_forces_exactly_one_refresh_and_one_retry() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    let first = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(first.code, 250);
    assert_eq!(s.tokens.requests("client_credentials"), 1);
    s.graph
        .script([Scripted::status(401, "InvalidAuthenticationToken")]);
    let reply = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(s.tokens.requests("client_credentials"), 2, "one refresh");
    let tokens = s.graph.tokens();
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[0], tokens[1], "the cached token first");
    assert_ne!(tokens[1], tokens[2], "then the refreshed one");

    // Refused twice: one refresh, then the channel's login is refused (454, temporary).
    s.graph.script([
        Scripted::status(401, "InvalidAuthenticationToken"),
        Scripted::status(401, "InvalidAuthenticationToken"),
    ]);
    let reply = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (454, Some((4, 7, 0))),
        "{reply}"
    );
    assert_eq!(s.tokens.requests("client_credentials"), 3, "never a loop");
}

#[tokio::test]
async fn a_403_breaks_the_channel_and_keeps_the_mail() {
    let s = setup(DeliveryMode::Queue, vec![]).await;
    s.graph.script([Scripted::status(403, "ErrorAccessDenied")]);
    s.submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert!(wait_for(Duration::from_secs(5), || s.graph.requests() >= 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Mail that arrives while the channel is broken waits too.
    s.submit(&["carol@example.org"], &message("carol@example.org"))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.graph.requests(), 1, "a broken channel stops trying");
    assert!(s.graph.sent().is_empty());
    assert_eq!(s.spool_files("queue").len(), 2, "its mail stays queued");
    let health = std::fs::read_to_string(
        s.config
            .server
            .spool_dir
            .join("state")
            .join("dave.health.json"),
    )
    .unwrap_or_default();
    assert!(health.contains("ErrorAccessDenied"), "{health}");
    // `queue retry --all` (what a reload does too) resumes it.
    s.delivery.resume_queue();
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 2).await);
}

#[tokio::test]
async fn a_403_send_as_denied_fails_that_message_only() {
    // Graph answers 403 ErrorSendAsDenied when the MIME From:/Sender: is not the mailbox
    // (possible with check_header_from = false): one message, not the channel's rights.
    let s = setup(DeliveryMode::Queue, vec![]).await;
    s.graph.script([Scripted::status(403, "ErrorSendAsDenied")]);
    s.submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert!(
        wait_for(Duration::from_secs(10), || s.spool_files("failed").len()
            == 1)
        .await,
        "the message fails"
    );
    assert!(s.spool_files("failed")[0].contains("ErrorSendAsDenied"));
    // The channel is not broken: the next message goes out.
    s.submit(&["carol@example.org"], &message("carol@example.org"))
        .await;
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    // No DSN went through the channel that refused the sender.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.graph.sent().len(), 1);
    // Relay mode: the client hears a permanent refusal of this message.
    let r = setup(DeliveryMode::Relay, vec![]).await;
    r.graph.script([Scripted::status(403, "ErrorSendAsDenied")]);
    let reply = r
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(reply.code, 554, "{reply}");
    assert!(reply.text.contains("ErrorSendAsDenied"), "{reply}");
}

#[tokio::test]
async fn invalid_recipient_and_too_large_fail_with_a_dsn() {
    for (status, code) in [
        (400, "ErrorInvalidRecipients"),
        (413, "ErrorMessageSizeExceeded"),
    ] {
        let s = setup(DeliveryMode::Queue, vec![]).await;
        s.graph.script([Scripted::status(status, code)]);
        // The null sender would get no DSN; the mailbox itself gets one.
        s.submit(&["bob@example.org"], &message("bob@example.org"))
            .await;
        assert!(
            wait_for(Duration::from_secs(10), || s.spool_files("failed").len()
                == 1)
            .await,
            "{status}"
        );
        let failed = &s.spool_files("failed")[0];
        assert!(
            failed.contains(code),
            "the Graph code is in the failure reason: {failed}"
        );
        // The DSN goes back to the sender through the channel, and Graph takes it.
        assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
        let dsn = String::from_utf8_lossy(&s.graph.sent()[0].mime).to_string();
        assert!(dsn.contains("multipart/report"), "{dsn}");
        assert!(dsn.contains(code), "{dsn}");
    }
    // Relay mode: the client hears the permanent reply.
    let s = setup(DeliveryMode::Relay, vec![]).await;
    s.graph
        .script([Scripted::status(413, "ErrorMessageSizeExceeded")]);
    let reply = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (552, Some((5, 3, 4))),
        "{reply}"
    );
}

#[tokio::test]
async fn connections_are_kept_alive_and_capped() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    s.graph.set_delay(Duration::from_millis(200));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (delivery, id) = (s.delivery.clone(), s.id("dave"));
        tasks.push(tokio::spawn(async move {
            let mut draft = delivery.begin().await.unwrap();
            draft.write(&message("bob@example.org")).await.unwrap();
            let envelope = Envelope {
                sender: MAILBOX.into(),
                recipients: vec!["bob@example.org".into()],
                ..Default::default()
            };
            (i, delivery.finish(draft, id, &envelope).await)
        }));
    }
    for task in tasks {
        let (i, reply) = task.await.unwrap();
        assert_eq!(reply.code, 250, "{i}: {reply}");
    }
    assert_eq!(s.graph.sent().len(), 10);
    assert!(
        s.graph.most_in_flight() <= 4,
        "at most `connections` at once"
    );
    assert!(
        s.graph.connections() <= 4,
        "kept alive: {} connections",
        s.graph.connections()
    );
}

#[tokio::test]
async fn test_channel_checks_the_mailbox_and_sends_nothing() {
    let s = setup(DeliveryMode::Relay, vec![]).await;
    let upstreams = mailgate::upstream::Upstreams::new(&s.config).unwrap();
    let mut steps = Vec::new();
    let mut step = |line: &str| steps.push(line.to_string());
    upstreams.test(s.id("dave"), &mut step).await.unwrap();
    assert!(
        steps
            .iter()
            .any(|l| l.contains("mailbox dave@example.com found")),
        "{steps:#?}"
    );
    s.graph.set_get_status(403);
    let mut steps = Vec::new();
    let mut step = |line: &str| steps.push(line.to_string());
    upstreams.test(s.id("dave"), &mut step).await.unwrap();
    assert!(
        steps.iter().any(|l| l.contains("could not be checked")),
        "{steps:#?}"
    );
    assert_eq!(s.graph.requests(), 0, "nothing was sent");
    for secret in s.tokens.secrets() {
        assert!(
            !steps.iter().any(|l| l.contains(&secret)),
            "a secret in the output"
        );
    }
}

/// What Microsoft 365 answers once SMTP AUTH is switched off for the tenant.
const AUTH_DISABLED: &str =
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant";

/// A plain SMTP channel to a local fake, scoped to `MAILBOX` like the graph channel.
fn smtp_channel(name: &str, port: u16) -> Channel {
    let mut c = mailgate::testkit::config::channel(
        name,
        ChannelKind::Smtp(mailgate::testkit::config::smtp_target(
            port,
            mailgate::config::TlsMode::None,
        )),
        2,
    );
    c.scope = vec![mailgate::config::SenderPattern::Exact(MAILBOX.into())];
    c
}

/// SPEC §7 "Fallback": an SMTP channel whose upstream starts answering `535 5.7.139`
/// (SMTP AUTH disabled for the tenant) hands its queued and new mail to a graph channel.
#[tokio::test]
async fn an_smtp_channel_refused_535_5_7_139_hands_its_mail_to_the_graph_fallback() {
    use mailgate::testkit::fake_smtp;
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_script: vec![AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    })
    .await;
    let smtp = smtp_channel("alice", port);
    let s = setup_with(DeliveryMode::Queue, vec![smtp], &[("alice", "dave")]).await;
    let submit = |to: &'static str| {
        let s = &s;
        async move { s.submit_to("alice", MAILBOX, &[to], &message(to)).await }
    };
    let first = submit("bob@example.org").await;
    assert!(first.text.starts_with("queued as"), "{first}");
    // The SMTP upstream refuses at the end of data; the message moves to Graph.
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    assert_eq!(upstream.txns().len(), 0, "nothing accepted over SMTP");
    // New mail goes straight over the fallback.
    let second = submit("carol@example.org").await;
    assert!(second.text.starts_with("queued as"), "{second}");
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 2).await);
    let health = std::fs::read_to_string(
        s.config
            .server
            .spool_dir
            .join("state")
            .join("alice.health.json"),
    )
    .unwrap_or_default();
    assert!(health.contains("fallback dave"), "{health}");
    assert!(wait_for(Duration::from_secs(5), || s.spool_files("queue").is_empty()).await);
    // The tenant allows SMTP AUTH again (the fake's script is spent): after `queue retry
    // --all` (or a reload, or a restart) mail returns to the first channel.
    s.delivery.resume_queue();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = submit("erin@example.org").await;
    assert!(third.text.starts_with("queued as"), "{third}");
    assert!(wait_for(Duration::from_secs(10), || upstream.txns().len() == 1).await);
    assert_eq!(s.graph.sent().len(), 2);
}

#[tokio::test]
async fn relay_mode_hands_over_to_the_fallback_at_once() {
    use mailgate::testkit::fake_smtp;
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_script: vec!["550 5.7.30 Basic authentication is not supported for Client Submission"],
        ..fake_smtp::plain_fake()
    })
    .await;
    let smtp = smtp_channel("alice", port);
    let s = setup_with(DeliveryMode::Relay, vec![smtp], &[("alice", "dave")]).await;
    let body = message("bob@example.org");
    let reply = s
        .submit_to("alice", MAILBOX, &["bob@example.org"], &body)
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(reply.text.contains("Microsoft Graph"), "{reply}");
    assert_eq!(s.graph.sent()[0].mime, body);
    // The next message does not knock on the refusing door again.
    let reply = s
        .submit_to("alice", MAILBOX, &["bob@example.org"], &body)
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(s.graph.sent().len(), 2);
    assert_eq!(upstream.txns().len(), 0);
    assert_eq!(
        upstream
            .commands()
            .iter()
            .filter(|c| c.starts_with("MAIL"))
            .count(),
        1
    );
}

/// Issue 16 item 5: with Redis, "auth method refused" is shared health, so the host that
/// did not see the refusal hands its queued mail to its own fallback too.
#[tokio::test]
async fn with_redis_every_host_hands_its_queued_mail_to_the_fallback() {
    use mailgate::testkit::fake_smtp;
    let redis = mailgate::testkit::redis_server::RedisServer::start();
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_reply: Some(AUTH_DISABLED),
        ..fake_smtp::plain_fake()
    })
    .await;
    let host = || {
        setup_state(
            DeliveryMode::Queue,
            vec![smtp_channel("alice", port)],
            &[("alice", "dave")],
            StateBackend::Redis(redis.settings("fleet5:")),
        )
    };
    let (a, b) = (host().await, host().await);
    let first = a
        .submit_to(
            "alice",
            MAILBOX,
            &["bob@example.org"],
            &message("bob@example.org"),
        )
        .await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(10), || a.graph.sent().len() == 1).await);
    // Host B has seen the shared health by now (it polls every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = b
        .submit_to(
            "alice",
            MAILBOX,
            &["carol@example.org"],
            &message("carol@example.org"),
        )
        .await;
    assert!(second.text.starts_with("queued as"), "{second}");
    assert!(
        wait_for(Duration::from_secs(10), || b.graph.sent().len() == 1).await,
        "host B's mail stays queued on a channel broken elsewhere"
    );
    assert!(wait_for(Duration::from_secs(5), || b.spool_files("queue").is_empty()).await);
    assert_eq!(upstream.ended.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Issue 16 item 5, relay mode: host B goes straight to the fallback once host A found
/// the channel's auth method refused, without knocking on the refusing door itself.
#[tokio::test]
async fn with_redis_every_relay_host_goes_over_the_fallback() {
    use mailgate::testkit::fake_smtp;
    let redis = mailgate::testkit::redis_server::RedisServer::start();
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_reply: Some(AUTH_DISABLED),
        ..fake_smtp::plain_fake()
    })
    .await;
    let host = || {
        setup_state(
            DeliveryMode::Relay,
            vec![smtp_channel("alice", port)],
            &[("alice", "dave")],
            StateBackend::Redis(redis.settings("fleet5r:")),
        )
    };
    let (a, b) = (host().await, host().await);
    let body = message("bob@example.org");
    let reply = a
        .submit_to("alice", MAILBOX, &["bob@example.org"], &body)
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(a.graph.sent().len(), 1);
    let reply = b
        .submit_to("alice", MAILBOX, &["bob@example.org"], &body)
        .await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(b.graph.sent().len(), 1);
    let mails = upstream
        .commands()
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .count();
    assert_eq!(mails, 1, "host B tried the refusing channel again");
}

#[tokio::test]
async fn a_partly_delivered_message_is_not_resent_to_its_done_recipients_over_graph() {
    use mailgate::testkit::fake_smtp;
    // bob takes the message over SMTP, carol's server says "later"; then the tenant
    // switches SMTP AUTH off and the channel hands its mail to the graph fallback.
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        replies: vec![("RCPT TO:<carol@", "451 4.2.0 try again later")],
        data_script: vec!["250 2.0.0 Ok", AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    })
    .await;
    let smtp = smtp_channel("alice", port);
    let s = setup_with(DeliveryMode::Queue, vec![smtp], &[("alice", "dave")]).await;
    let both = message("bob@example.org, carol@example.org");
    let first = s
        .submit_to(
            "alice",
            MAILBOX,
            &["bob@example.org", "carol@example.org"],
            &both,
        )
        .await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(10), || upstream.txns().len() == 1).await);
    let second = s
        .submit_to(
            "alice",
            MAILBOX,
            &["erin@example.org"],
            &message("erin@example.org"),
        )
        .await;
    assert!(second.text.starts_with("queued as"), "{second}");
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Graph would send to every header recipient, bob included: the message waits for
    // its own channel instead of failing carol or mailing bob twice.
    assert_eq!(
        s.graph.sent().len(),
        1,
        "only the untouched message went over Graph"
    );
    assert!(
        s.spool_files("failed").is_empty(),
        "{:?}",
        s.spool_files("failed")
    );
    assert_eq!(s.spool_files("queue").len(), 1, "carol's copy stays queued");
}

/// Issue 16 item 6: with Redis, `oauth authorize` on a channel with a
/// `refresh_token_file` stores the new refresh token where every host reads it first and
/// forgets the access token cached for them, so `queue retry --all` recovers the channel.
#[tokio::test]
async fn with_redis_oauth_authorize_recovers_a_broken_channel() {
    use mailgate::config::Secret;
    use mailgate::config::oauth::{Grant, TokenSource, defaults};
    use mailgate::state::shared::RedisState;
    let redis = mailgate::testkit::redis_server::RedisServer::start();
    let settings = redis.settings("auth6:");
    let fleet = RedisState::new(&settings).unwrap();
    // A refresh token the provider revoked, in Redis where every host looks first, and
    // an access token another host cached from that grant.
    fleet
        .set_refresh_token("dave", &Secret::new("rt-revoked"))
        .await
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("dave.token");
    std::fs::write(&token_file, "rt-also-revoked\n").unwrap();
    let file = token_file.clone();
    let s = setup_full(
        DeliveryMode::Queue,
        vec![],
        &[],
        StateBackend::Redis(settings),
        move |dave, tokens| {
            let ChannelKind::Graph(target) = &mut dave.kind else {
                unreachable!()
            };
            target.oauth.grant = Grant::RefreshToken;
            target.oauth.scope = defaults::GRAPH_DELEGATED_SCOPE.into();
            target.oauth.refresh_token_source = TokenSource::File(file);
            target.oauth.device_url = tokens.device_url();
            tokens.set_device(0, 0);
        },
    )
    .await;
    let reply = s
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert!(reply.text.starts_with("queued as"), "{reply}");
    let broken = || async {
        matches!(
            fleet.health("dave").await.unwrap().0,
            mailgate::state::Health::Broken { .. }
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broken().await {
        assert!(Instant::now() < deadline, "the channel never broke");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet
        .set_access_token("dave", &Secret::new("at-stale"), 3_600_000)
        .await
        .unwrap();

    let ChannelKind::Graph(target) = &s.config.channels[s.id("dave")].kind else {
        unreachable!()
    };
    let store = mailgate::state::Backend::of(&s.config)
        .unwrap()
        .token_store();
    let http = mailgate::oauth::Http::new(None).unwrap();
    let mut output = Vec::new();
    let done = mailgate::oauth::authorize(
        "dave",
        &target.oauth,
        &http,
        &*store,
        tokio::io::empty(),
        &mut output,
    )
    .await;
    let output = String::from_utf8_lossy(&output).into_owned();
    assert!(done.is_ok(), "{done:?}\n{output}");
    s.delivery.resume_queue();
    assert!(
        wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await,
        "still broken after authorize and retry"
    );
    assert!(!broken().await);
    assert!(output.contains("Redis"), "{output}");
    let shared = fleet.access_token("dave").await.unwrap();
    assert!(
        shared.is_none_or(|(t, _)| t.expose() != "at-stale"),
        "the access token of the old grant is still shared"
    );
    let stored = fleet.refresh_token("dave").await.unwrap().unwrap();
    assert!(s.tokens.refresh_token_is_valid(stored.expose()));
    // The file is a copy, for a move back to the local backend.
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap().trim(),
        stored.expose()
    );
}

/// Issue 16 item 11: a partly delivered message lent to a graph fallback is not tried
/// there at every backoff step, spends none of the fallback's quota, and goes back to its
/// own channel with `queue retry --all`.
#[tokio::test]
async fn a_partly_delivered_message_lent_to_graph_waits_without_spending_its_quota() {
    use mailgate::testkit::fake_smtp;
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        replies: vec![("RCPT TO:<carol@", "451 4.2.0 try again later")],
        data_script: vec!["250 2.0.0 Ok", AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    })
    .await;
    let day = Limits {
        recipients_per_day: Some(100),
        ..Limits::default()
    };
    let s = setup_full(
        DeliveryMode::Queue,
        vec![smtp_channel("alice", port)],
        &[("alice", "dave")],
        StateBackend::Local,
        |dave, _| dave.limits.recipients_per_day = day.recipients_per_day,
    )
    .await;
    let both = message("bob@example.org, carol@example.org");
    let rcpts = ["bob@example.org", "carol@example.org"];
    let first = s.submit_to("alice", MAILBOX, &rcpts, &both).await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(10), || upstream.txns().len() == 1).await);
    let erin = message("erin@example.org");
    let second = s
        .submit_to("alice", MAILBOX, &["erin@example.org"], &erin)
        .await;
    assert!(second.text.starts_with("queued as"), "{second}");
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    let attempts = || {
        let files = s.spool_files("queue");
        assert_eq!(files.len(), 1, "carol's copy stays queued");
        let state: serde_json::Value = serde_json::from_str(&files[0]).unwrap();
        state["attempts"].as_u64().unwrap()
    };
    let before = attempts();
    // Several backoff steps (300 ms doubling to 2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let backend = mailgate::state::Backend::Local(mailgate::state::LocalState::new(
        &s.config.server.spool_dir,
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let counted: u64 = backend
        .events("dave", &day, now + 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.1)
        .sum();
    assert_eq!(
        counted, 1,
        "only erin, sent over Graph, counts against its quota"
    );
    assert_eq!(
        attempts(),
        before,
        "tried again over Graph at every backoff step"
    );
    assert_eq!(s.graph.sent().len(), 1);
    // `queue retry --all`: back to its own channel, which asks for carol again.
    let asked = || {
        upstream
            .commands()
            .iter()
            .filter(|c| c.starts_with("RCPT TO:<carol@"))
            .count()
    };
    let asked_before = asked();
    s.delivery.resume_queue();
    assert!(wait_for(Duration::from_secs(10), || asked() > asked_before).await);
}

#[tokio::test]
async fn mail_handed_along_a_fallback_chain_reaches_its_end() {
    use mailgate::testkit::fake_smtp;
    let refusing = || fake_smtp::Fake {
        data_script: vec![AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    };
    let (port_a, up_a) = fake_smtp::start(refusing()).await;
    let (port_b, up_b) = fake_smtp::start(refusing()).await;
    // alice -> bravo -> dave (graph); bravo's provider refuses it first.
    let s = setup_with(
        DeliveryMode::Queue,
        vec![smtp_channel("alice", port_a), smtp_channel("bravo", port_b)],
        &[("alice", "bravo"), ("bravo", "dave")],
    )
    .await;
    let first = s
        .submit_to(
            "bravo",
            MAILBOX,
            &["bob@example.org"],
            &message("bob@example.org"),
        )
        .await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    // Now alice is refused too: its mail goes to bravo, which hands it on to dave.
    let second = s
        .submit_to(
            "alice",
            MAILBOX,
            &["carol@example.org"],
            &message("carol@example.org"),
        )
        .await;
    assert!(second.text.starts_with("queued as"), "{second}");
    assert!(
        wait_for(Duration::from_secs(10), || s.graph.sent().len() == 2).await,
        "alice's mail stuck at broken bravo"
    );
    assert_eq!((up_a.txns().len(), up_b.txns().len()), (0, 0));
}

/// A reload ends a hand-over (SPEC §8 "a broken channel is retried"): the same file again,
/// every channel unchanged, and the first channel's mail goes over SMTP again.
#[tokio::test]
async fn a_reload_ends_the_hand_over_to_the_fallback() {
    use mailgate::testkit::fake_smtp;
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_script: vec![AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    })
    .await;
    let smtp = smtp_channel("alice", port);
    let s = setup_with(DeliveryMode::Queue, vec![smtp], &[("alice", "dave")]).await;
    let alice = s.id("alice");
    let submit = |delivery: Arc<Delivery>, to: &'static str| async move {
        let mut draft = delivery.begin().await.unwrap();
        draft.write(&message(to)).await.unwrap();
        let envelope = Envelope {
            sender: MAILBOX.into(),
            recipients: vec![to.into()],
            ..Default::default()
        };
        delivery.finish(draft, alice, &envelope).await
    };
    let first = submit(s.delivery.clone(), "bob@example.org").await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);

    let changes = mailgate::reload::diff_channels(&s.config, &s.config);
    assert_eq!(changes.unchanged.len(), 2);
    let next = Arc::new(s.delivery.reload(s.config.clone(), &changes).unwrap());
    s.delivery.apply(&next, &changes).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = submit(next.clone(), "carol@example.org").await;
    assert!(second.text.starts_with("queued as"), "{second}");
    assert!(wait_for(Duration::from_secs(10), || upstream.txns().len() == 1).await);
    assert_eq!(s.graph.sent().len(), 1, "nothing more over the fallback");
}

#[tokio::test]
async fn an_unquoted_display_name_is_sent_quoted_and_nothing_else_changes() {
    // SPEC §4a, last paragraph: Exchange refuses `From: dave@example.com <dave@…>` as
    // send-as; the same name and address, quoted, go through.
    let s = setup(DeliveryMode::Relay, vec![]).await;
    let tail =
        "To: bob@example.org\r\nSubject: scan\r\n\tfolded\r\n\r\nFrom: J. Smith <j@x.com>\r\n";
    let body = format!("From: {MAILBOX} <{MAILBOX}>\r\n{tail}");
    let reply = s.submit(&["bob@example.org"], body.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    let want = format!("From: \"{MAILBOX}\" <{MAILBOX}>\r\n{tail}");
    assert_eq!(
        String::from_utf8(s.graph.sent()[0].mime.clone()).unwrap(),
        want
    );
    // A dot in the name, on a folded line: quoted, unfolded, the rest as it was.
    let body = format!("To: bob@example.org\r\nFROM: D. Ave\r\n <{MAILBOX}>\r\n\r\nx\r\n");
    let reply = s.submit(&["bob@example.org"], body.as_bytes()).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(
        String::from_utf8(s.graph.sent()[1].mime.clone()).unwrap(),
        format!("To: bob@example.org\r\nFROM: \"D. Ave\" <{MAILBOX}>\r\n\r\nx\r\n")
    );
}

#[tokio::test]
async fn an_oversized_graph_answer_is_a_temporary_error_whatever_its_status() {
    // 9 MiB of error document on a 400 (a permanent status, were the answer read).
    let oversized = Scripted::Oversized {
        status: 400,
        size: 9 << 20,
    };
    let r = setup(DeliveryMode::Relay, vec![]).await;
    r.graph.script([oversized.clone()]);
    let reply = r
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert!(reply.code / 100 == 4, "{reply}");
    // Just under the limit, the answer is read and its status counts.
    r.graph.script([Scripted::Oversized {
        status: 400,
        size: (8 << 20) - 1024,
    }]);
    let reply = r
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(reply.code, 550, "{reply}");

    let s = setup(DeliveryMode::Queue, vec![]).await;
    s.graph.script([oversized]);
    s.submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    assert_eq!(s.graph.requests(), 2, "deferred once, then sent");
    assert!(s.spool_files("failed").is_empty());
}

#[tokio::test]
async fn a_token_answer_with_a_huge_expires_in_neither_panics_nor_wedges_the_channel() {
    // The reported trigger: `expires_in: 18446744073709551615` overflowed the expiry.
    let s = setup(DeliveryMode::Queue, vec![]).await;
    s.tokens.set_expires_in(Some(u64::MAX));
    for _ in 0..2 {
        let reply = s
            .submit(&["bob@example.org"], &message("bob@example.org"))
            .await;
        assert_eq!(reply.code, 250, "{reply}");
    }
    assert!(
        wait_for(Duration::from_secs(10), || s.graph.sent().len() == 2).await,
        "both delivered, {} sent",
        s.graph.sent().len()
    );
    let r = setup(DeliveryMode::Relay, vec![]).await;
    r.tokens.set_expires_in(Some(u64::MAX));
    let reply = r
        .submit(&["bob@example.org"], &message("bob@example.org"))
        .await;
    assert_eq!(reply.code, 250, "{reply}");
}
