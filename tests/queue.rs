//! Queue mode end to end, in process: a real spool on disk, the real channel workers,
//! and a scripted fake transport standing in for the upstream servers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailgate::config::{
    Channel, ChannelId, ChannelKind, Config, DeliveryMode, Limits, Rate, SenderPattern, Server,
};
use mailgate::message::Envelope;
use mailgate::queue::{Queue, Transport, admin};
use mailgate::smtp::reply::Reply;
use mailgate::testkit::fake_smtp;
use mailgate::upstream::{Body, Error, Outcome, Step};
use tokio_util::sync::CancellationToken;

/// One transaction the fake upstream saw.
#[derive(Debug, Clone)]
struct Sent {
    at: Instant,
    id: String,
    channel: ChannelId,
    envelope: Envelope,
    body: Vec<u8>,
}

type Script = dyn Fn(ChannelId, &Envelope, usize) -> Outcome + Send + Sync;

/// A fake upstream: answers by a script (channel, envelope, how many transactions this
/// channel saw before) and records every transaction.
struct Fake {
    script: Box<Script>,
    sent: Mutex<Vec<Sent>>,
    delay: Duration,
}

impl Fake {
    fn new(
        script: impl Fn(ChannelId, &Envelope, usize) -> Outcome + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Fake {
            script: Box::new(script),
            sent: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
        })
    }
    fn slow(
        delay: Duration,
        script: impl Fn(ChannelId, &Envelope, usize) -> Outcome + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Fake {
            script: Box::new(script),
            sent: Mutex::new(Vec::new()),
            delay,
        })
    }
    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }
    fn accepted_on(&self, channel: ChannelId) -> Vec<Sent> {
        self.sent()
            .into_iter()
            .filter(|s| s.channel == channel)
            .collect()
    }
}

impl Transport for Fake {
    fn send<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            let bytes = match body {
                Body::Bytes(b) => b.to_vec(),
                Body::File(p) => std::fs::read(p).expect("spooled file readable during delivery"),
            };
            tokio::time::sleep(self.delay).await;
            let before = self
                .sent
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.channel == channel)
                .count();
            let outcome = (self.script)(channel, envelope, before);
            self.sent.lock().unwrap().push(Sent {
                at: Instant::now(),
                id: id.to_string(),
                channel,
                envelope: envelope.clone(),
                body: bytes,
            });
            outcome
        })
    }
}

fn ok() -> Outcome {
    Outcome {
        refused: vec![],
        result: Ok(Reply::new(250, (2, 0, 0), "OK")),
    }
}

fn refused(code: u16, enhanced: (u8, u16, u16), text: &str) -> Outcome {
    Outcome {
        refused: vec![],
        result: Err(Error::Rejected {
            step: Step::EndOfData,
            reply: Reply::new(code, enhanced, text),
        }),
    }
}

fn channel(name: &str, limits: Limits) -> Channel {
    Channel {
        name: name.into(),
        scope: vec![SenderPattern::Any],
        address_scoped: false,
        fallback: None,
        preset: None,
        kind: ChannelKind::File {
            dir: "unused".into(),
        },
        limits,
    }
}

fn limits() -> Limits {
    Limits {
        connections: 4,
        ..Default::default()
    }
}

fn config(spool: &std::path::Path, channels: Vec<Channel>) -> Config {
    Config {
        path: "proxy.toml".into(),
        server: Server {
            hostname: "mx.test".into(),
            max_message_size: 1 << 20,
            max_connections: 10,
            delivery: DeliveryMode::Queue,
            spool_dir: spool.to_path_buf(),
            retry_first: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            give_up_after: Duration::from_secs(86400),
            ..mailgate::testkit::config::server()
        },
        users: vec![],
        channels,
        routing: Default::default(),
        metrics: None,
        has_literal_secrets: false,
        state: Default::default(),
        index: Default::default(),
        rewrites: Vec::new(),
        warnings: Vec::new(),
    }
}

/// A running queue: its handle, the worker task and the shutdown switch.
struct Running {
    queue: Arc<Queue>,
    config: Config,
    task: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
}

impl Running {
    fn start(config: &Config, transport: Arc<dyn Transport>) -> Running {
        let queue = Queue::open(Arc::new(config.clone())).expect("spool opens");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(queue.clone().run(transport, shutdown.clone()));
        Running {
            queue,
            config: config.clone(),
            task,
            shutdown,
        }
    }

    async fn submit(
        &self,
        channel: ChannelId,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> Reply {
        let mut draft = self.queue.begin().await.expect("draft");
        // In pieces, as the session streams it.
        for piece in body.chunks(7) {
            draft.write(piece).await.unwrap();
        }
        let envelope = Envelope {
            sender: sender.into(),
            recipients: rcpts.to_vec(),
            ..Default::default()
        };
        self.queue
            .finish(draft, &self.config, channel, &envelope)
            .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("queue stops")
            .unwrap();
        assert_eq!(
            Arc::strong_count(&self.queue),
            1,
            "no task keeps the queue alive"
        );
    }
}

fn rcpts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("r{i}@example.org")).collect()
}

const MESSAGE: &[u8] =
    b"From: a@example.com\r\nTo: r0@example.org\r\nSubject: test\r\n\r\nHello\r\n";

use mailgate::testkit::wait_for;

fn queued(config: &Config) -> usize {
    std::fs::read_dir(config.server.spool_dir.join("queue"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn deferred_twice_then_delivered_on_the_third_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), vec![channel("c", limits())]);
    let fake = Fake::new(|_, _, before| {
        if before < 2 {
            refused(451, (4, 7, 0), "try again later")
        } else {
            ok()
        }
    });
    let q = Running::start(&config, fake.clone());
    let reply = q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    assert_eq!(reply.code, 250);
    assert!(reply.text.starts_with("queued as "), "{reply}");
    assert!(
        wait_for(Duration::from_secs(30), || fake.sent().len() == 3
            && queued(&config) == 0)
        .await
    );
    let sent = fake.sent();
    assert_eq!(sent[2].body, MESSAGE, "exact bytes");
    assert_eq!(
        format!("queued as {}", sent[2].id),
        reply.text,
        "the upstream is told the queue id"
    );
    // retry_first = 1s, doubling: 1 s then 2 s.
    let first = sent[1].at - sent[0].at;
    let second = sent[2].at - sent[1].at;
    assert!(
        first >= Duration::from_millis(950) && first < Duration::from_millis(1900),
        "{first:?}"
    );
    assert!(
        second >= Duration::from_millis(1900) && second < Duration::from_millis(3500),
        "{second:?}"
    );
    q.stop().await;
}

#[tokio::test]
async fn permanent_failure_goes_to_failed_with_a_dsn() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), vec![channel("c", limits())]);
    let fake = Fake::new(|_, env, _| {
        if env.sender.is_empty() {
            ok()
        } else {
            refused(550, (5, 1, 1), "no such user here")
        }
    });
    let q = Running::start(&config, fake.clone());
    let reply = q.submit(0, "a@example.com", &rcpts(2), MESSAGE).await;
    let id = reply.text.trim_start_matches("queued as ").to_string();
    assert!(
        wait_for(Duration::from_secs(30), || fake.sent().len() == 2
            && queued(&config) == 0)
        .await
    );
    let failed =
        std::fs::read_to_string(dir.path().join("failed").join(format!("{id}.json"))).unwrap();
    assert!(failed.contains("550 5.1.1 no such user here"), "{failed}");
    assert!(dir.path().join("failed").join(format!("{id}.eml")).exists());
    let dsn = &fake.sent()[1];
    assert_eq!(dsn.envelope.sender, "", "null sender on the DSN");
    assert_eq!(dsn.envelope.recipients, vec!["a@example.com".to_string()]);
    let text = String::from_utf8(dsn.body.clone()).unwrap();
    let parsed = mail_parser::MessageParser::default()
        .parse(text.as_bytes())
        .unwrap();
    let ct = mail_parser::MimeHeaders::content_type(&parsed).unwrap();
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    assert!(
        text.contains("Final-Recipient: rfc822; r0@example.org\r\nAction: failed\r\nStatus: 5.1.1")
    );
    assert!(text.contains("Final-Recipient: rfc822; r1@example.org"));
    assert!(text.contains("Subject: test"), "original headers attached");
    let shown = admin::show(&config, &id).unwrap();
    assert!(shown.contains("status:       failed"), "{shown}");
    q.stop().await;
}

#[tokio::test]
async fn no_dsn_for_a_null_sender() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), vec![channel("c", limits())]);
    let fake = Fake::new(|_, _, _| refused(554, (5, 0, 0), "rejected"));
    let q = Running::start(&config, fake.clone());
    q.submit(0, "", &rcpts(1), MESSAGE).await;
    assert!(wait_for(Duration::from_secs(30), || queued(&config) == 0).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.sent().len(), 1, "the bounce of a bounce is never sent");
    q.stop().await;
}

#[tokio::test]
async fn partial_success_fails_only_the_refused_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), vec![channel("c", limits())]);
    let fake = Fake::new(|_, env, _| {
        if env.sender.is_empty() {
            return ok();
        }
        Outcome {
            refused: vec![(
                "r1@example.org".into(),
                Reply::new(550, (5, 1, 1), "unknown"),
            )],
            result: Ok(Reply::new(250, (2, 0, 0), "OK")),
        }
    });
    let q = Running::start(&config, fake.clone());
    q.submit(0, "a@example.com", &rcpts(3), MESSAGE).await;
    assert!(
        wait_for(Duration::from_secs(30), || fake.sent().len() == 2
            && queued(&config) == 0)
        .await
    );
    let sent = fake.sent();
    assert_eq!(
        sent[0].envelope.recipients.len(),
        3,
        "one transaction, every recipient"
    );
    let dsn = String::from_utf8(sent[1].body.clone()).unwrap();
    assert!(dsn.contains("Final-Recipient: rfc822; r1@example.org"));
    assert!(!dsn.contains("Final-Recipient: rfc822; r0@example.org"));
    assert!(!dsn.contains("Final-Recipient: rfc822; r2@example.org"));
    q.stop().await;
}

#[tokio::test]
async fn rate_spreads_messages() {
    let dir = tempfile::tempdir().unwrap();
    let rate = Limits {
        rate: Some(Rate {
            count: 5,
            per: Duration::from_secs(1),
        }),
        ..limits()
    };
    let config = config(dir.path(), vec![channel("c", rate)]);
    let fake = Fake::new(|_, _, _| ok());
    let q = Running::start(&config, fake.clone());
    for _ in 0..20 {
        assert_eq!(
            q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await.code,
            250
        );
    }
    assert!(wait_for(Duration::from_secs(30), || fake.sent().len() == 20).await);
    let sent = fake.sent();
    let span = sent[19].at - sent[0].at;
    // The limiter spaces the *starts* of transactions; the fake sees their arrival,
    // which a loaded machine delays unevenly (seen: ~100 ms). Allow 250 ms of jitter:
    // without a limit all 20 arrive within a few milliseconds.
    assert!(
        span >= Duration::from_millis(2750),
        "20 messages at 5/s took only {span:?}"
    );
    // No window of a second (less the jitter) ever held more than five.
    for (i, s) in sent.iter().enumerate() {
        let in_window = sent[i..]
            .iter()
            .filter(|t| t.at - s.at < Duration::from_millis(750))
            .count();
        assert!(in_window <= 5, "{in_window} sends within a second");
    }
    q.stop().await;
}

#[tokio::test]
async fn daily_recipient_quota_holds_the_fourth_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let quota = Limits {
        recipients_per_day: Some(3),
        ..limits()
    };
    let config = config(dir.path(), vec![channel("c", quota)]);
    let fake = Fake::new(|_, _, _| ok());
    let q = Running::start(&config, fake.clone());
    for _ in 0..4 {
        q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    }
    assert!(wait_for(Duration::from_secs(30), || fake.sent().len() == 3).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.sent().len(),
        3,
        "the 4th recipient waits for the window"
    );
    assert_eq!(queued(&config), 1, "held, not dropped");
    let listing = admin::list(&config).unwrap();
    assert!(listing.contains("limited until"), "{listing}");
    q.stop().await;

    // The counters come back after a restart: still held.
    let fake2 = Fake::new(|_, _, _| ok());
    let q = Running::start(&config, fake2.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        fake2.sent().is_empty(),
        "a restart does not reset the daily quota"
    );
    assert_eq!(queued(&config), 1);
    q.stop().await;
}

#[tokio::test]
async fn broken_channel_keeps_mail_while_another_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        vec![channel("broken", limits()), channel("fine", limits())],
    );
    let fixed = Arc::new(Mutex::new(false));
    let fixed2 = fixed.clone();
    let fake = Fake::new(move |ch, _, _| {
        if ch == 0 && !*fixed2.lock().unwrap() {
            Outcome {
                refused: vec![],
                result: Err(Error::Rejected {
                    step: Step::Auth,
                    reply: Reply::new(535, (5, 7, 3), "Authentication unsuccessful"),
                }),
            }
        } else {
            ok()
        }
    });
    let q = Running::start(&config, fake.clone());
    for _ in 0..3 {
        q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    }
    assert!(wait_for(Duration::from_secs(30), || !fake.accepted_on(0).is_empty()).await);
    for _ in 0..3 {
        q.submit(1, "b@example.com", &rcpts(1), MESSAGE).await;
    }
    assert!(wait_for(Duration::from_secs(30), || fake.accepted_on(1).len() == 3).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fake.accepted_on(0).len() <= 3,
        "a broken channel stops trying"
    );
    assert_eq!(queued(&config), 3, "its mail stays queued");
    let listing = admin::list(&config).unwrap();
    assert!(listing.contains("broken since"), "{listing}");
    assert!(listing.contains("535 5.7.3"), "{listing}");
    let health = admin::channel_health(&config);
    assert!(health[0].1.starts_with("broken"), "{health:?}");
    assert_eq!(health[1].1, "ok");

    // The operator fixes the credentials and runs `queue retry --all`.
    *fixed.lock().unwrap() = true;
    let before = fake.accepted_on(0).len();
    admin::retry(&config, None).unwrap();
    assert!(wait_for(Duration::from_secs(30), || queued(&config) == 0).await);
    assert_eq!(fake.accepted_on(0).len(), before + 3);
    assert_eq!(admin::channel_health(&config)[0].1, "ok");
    q.stop().await;
}

#[tokio::test]
async fn quota_reply_holds_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), vec![channel("c", limits())]);
    let fake = Fake::new(|_, _, _| {
        refused(
            554,
            (5, 2, 0),
            "STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        )
    });
    let q = Running::start(&config, fake.clone());
    for _ in 0..3 {
        q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    }
    assert!(wait_for(Duration::from_secs(30), || !fake.sent().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fake.sent().len() <= 3);
    assert_eq!(queued(&config), 3, "held, nothing fails");
    let health = admin::channel_health(&config);
    assert!(health[0].1.starts_with("limited until"), "{health:?}");
    q.stop().await;
}

#[tokio::test]
async fn six_hundred_recipients_go_as_500_plus_100() {
    let dir = tempfile::tempdir().unwrap();
    // The office365 preset's limits.
    let o365 = Limits {
        rate: Some(Rate {
            count: 30,
            per: Duration::from_secs(60),
        }),
        recipients_per_day: Some(10_000),
        max_recipients: Some(500),
        connections: 3,
        max_message_size: Some(35_000_000),
    };
    let config = config(dir.path(), vec![channel("o365", o365)]);
    let fake = Fake::new(|_, _, _| ok());
    let q = Running::start(&config, fake.clone());
    let all = rcpts(600);
    q.submit(0, "alice@example.com", &all, MESSAGE).await;
    assert!(wait_for(Duration::from_secs(30), || queued(&config) == 0).await);
    let sent = fake.sent();
    let sizes: Vec<usize> = sent.iter().map(|s| s.envelope.recipients.len()).collect();
    assert_eq!(sizes, vec![500, 100]);
    let mut seen: Vec<String> = sent
        .iter()
        .flat_map(|s| s.envelope.recipients.clone())
        .collect();
    seen.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(seen, want, "each recipient exactly once");
    q.stop().await;
}

#[tokio::test]
async fn a_restart_between_transactions_does_not_resend_done_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let small = Limits {
        max_recipients: Some(2),
        connections: 1,
        ..Default::default()
    };
    let config = config(dir.path(), vec![channel("c", small)]);
    // The first transaction succeeds, the next ones are deferred; then the proxy stops.
    let fake = Fake::new(|_, _, before| {
        if before == 0 {
            ok()
        } else {
            refused(451, (4, 3, 0), "later")
        }
    });
    let q = Running::start(&config, fake.clone());
    q.submit(0, "a@example.com", &rcpts(5), MESSAGE).await;
    assert!(wait_for(Duration::from_secs(30), || fake.sent().len() >= 2).await);
    q.stop().await;

    let fake2 = Fake::new(|_, _, _| ok());
    let q = Running::start(&config, fake2.clone());
    assert!(wait_for(Duration::from_secs(30), || queued(&config) == 0).await);
    let mut again: Vec<String> = fake2
        .sent()
        .iter()
        .flat_map(|s| s.envelope.recipients.clone())
        .collect();
    again.sort();
    assert_eq!(
        again,
        vec!["r2@example.org", "r3@example.org", "r4@example.org"]
    );
    q.stop().await;
}

#[tokio::test]
async fn connections_cap_concurrent_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let two = Limits {
        connections: 2,
        ..Default::default()
    };
    let config = config(dir.path(), vec![channel("c", two)]);
    let live = Arc::new(Mutex::new((0usize, 0usize)));
    let fake = Arc::new(Counting {
        live: live.clone(),
        inner: Fake::slow(Duration::from_millis(200), |_, _, _| ok()),
    });
    let q = Running::start(&config, fake.clone());
    for _ in 0..8 {
        q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    }
    assert!(wait_for(Duration::from_secs(30), || queued(&config) == 0).await);
    assert_eq!(
        live.lock().unwrap().1,
        2,
        "at most two at once, and two were used"
    );
    q.stop().await;
}

/// Counts transactions in flight (current, highest).
struct Counting {
    live: Arc<Mutex<(usize, usize)>>,
    inner: Arc<Fake>,
}

impl Transport for Counting {
    fn send<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            {
                let mut live = self.live.lock().unwrap();
                live.0 += 1;
                live.1 = live.1.max(live.0);
            }
            let outcome = self.inner.send(channel, id, envelope, body).await;
            self.live.lock().unwrap().0 -= 1;
            outcome
        })
    }
}

#[tokio::test]
async fn delete_and_retry_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), vec![channel("c", limits())]);
    config.server.retry_first = Duration::from_secs(3600);
    config.server.retry_max = Duration::from_secs(3600);
    let fake = Fake::new(|_, _, _| refused(451, (4, 3, 0), "later"));
    let q = Running::start(&config, fake.clone());
    let a = q
        .submit(0, "a@example.com", &rcpts(1), MESSAGE)
        .await
        .text
        .trim_start_matches("queued as ")
        .to_string();
    let b = q
        .submit(0, "b@example.com", &rcpts(1), MESSAGE)
        .await
        .text
        .trim_start_matches("queued as ")
        .to_string();
    assert!(wait_for(Duration::from_secs(30), || fake.sent().len() == 2).await);
    let listing = admin::list(&config).unwrap();
    assert!(
        listing.contains(&a) && listing.contains(&b) && listing.contains("451 4.3.0"),
        "{listing}"
    );
    assert!(
        admin::show(&config, &a)
            .unwrap()
            .contains("attempts:     1")
    );

    // Retry one: it goes again within about a second, the other does not.
    admin::retry(&config, Some(&a)).unwrap();
    assert!(wait_for(Duration::from_secs(30), || fake.sent().len() == 3).await);
    assert_eq!(fake.sent()[2].envelope.sender, "a@example.com");

    admin::delete(&config, &b).unwrap();
    assert_eq!(queued(&config), 1);
    assert!(admin::show(&config, &b).is_err());
    assert!(admin::delete(&config, "../x").is_err());
    q.stop().await;
}

// ---------------------------------------------------------------------------
// Through the real upstream client: queue-mode `Delivery` and an in-process SMTP server.
// ---------------------------------------------------------------------------

fn smtp_channel(name: &str, port: u16, limits: Limits) -> Channel {
    Channel {
        kind: ChannelKind::Smtp(mailgate::config::SmtpTarget {
            host: "127.0.0.1".into(),
            port,
            tls: mailgate::config::TlsMode::None,
            ca_file: None,
            username: None,
            password: None,
            oauth: None,
        }),
        ..channel(name, limits)
    }
}

async fn submit_via(
    delivery: &mailgate::delivery::Delivery,
    sender: &str,
    rcpts: &[String],
    body: &[u8],
) -> Reply {
    let mut draft = delivery.begin().await.unwrap();
    draft.write(body).await.unwrap();
    let envelope = Envelope {
        sender: sender.into(),
        recipients: rcpts.to_vec(),
        ..Default::default()
    };
    delivery.finish(draft, 0, &envelope).await
}

#[tokio::test]
async fn queue_mode_delivery_through_a_real_smtp_upstream() {
    mailgate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let (port, fake) = fake_smtp::start(fake_smtp::Fake {
        data_script: vec!["451 4.7.0 busy", "451 4.7.0 busy"],
        ..fake_smtp::plain_fake()
    })
    .await;
    let config = Arc::new(config(dir.path(), vec![smtp_channel("up", port, limits())]));
    let delivery = Arc::new(mailgate::delivery::Delivery::new(config.clone()).unwrap());
    let shutdown = CancellationToken::new();
    let workers = {
        let (d, s) = (delivery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run_queue(s).await })
    };
    // A body with a leading dot and no final CRLF trouble: exact bytes must arrive.
    let body = b"From: a@example.com\r\nSubject: x\r\n\r\n.leading dot\r\nline\r\n";
    let reply = submit_via(&delivery, "a@example.com", &rcpts(1), body).await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (250, Some((2, 0, 0))),
        "{reply}"
    );
    assert!(reply.text.starts_with("queued as "));
    assert!(
        wait_for(Duration::from_secs(30), || fake.txns().len() == 1
            && queued(&config) == 0)
        .await
    );
    assert_eq!(
        fake.ended.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "451, 451, then 250"
    );
    let got = &fake.txns()[0];
    assert_eq!(got.unstuffed(), body);
    assert_eq!(got.mail, "MAIL FROM:<a@example.com>");

    // 600 recipients on a channel taking 500 per transaction.
    let config600 = Arc::new(self::config(
        &dir.path().join("spool600"),
        vec![smtp_channel(
            "o365",
            port,
            Limits {
                max_recipients: Some(500),
                connections: 3,
                ..Default::default()
            },
        )],
    ));
    let delivery600 = Arc::new(mailgate::delivery::Delivery::new(config600.clone()).unwrap());
    let workers600 = {
        let (d, s) = (delivery600.clone(), shutdown.clone());
        tokio::spawn(async move { d.run_queue(s).await })
    };
    let all = rcpts(600);
    assert_eq!(
        submit_via(&delivery600, "alice@example.com", &all, body)
            .await
            .code,
        250
    );
    assert!(
        wait_for(Duration::from_secs(30), || fake.txns().len() == 3
            && queued(&config600) == 0)
        .await
    );
    let sizes: Vec<usize> = fake.txns()[1..].iter().map(|t| t.rcpts.len()).collect();
    assert_eq!(sizes, vec![500, 100]);

    shutdown.cancel();
    workers.await.unwrap();
    workers600.await.unwrap();
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallDisk(at.to_path_buf()))
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a failed test may still hold files open in it.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// SPEC §6, §9: a full disk is temporary. Clients hear 4xx while it lasts; a message
/// accepted before it filled stays queued (the channel is deferred, never broken) and
/// is delivered by itself once space returns.
#[tokio::test]
async fn a_full_disk_defers_and_delivery_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let disk = match SmallDisk::mount(&spool, "512k") {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs for the full-disk test: {e}");
            return;
        }
    };
    // One transaction per 4 s: the second message is accepted, then waits for the rate
    // while the disk fills.
    let mut limits = limits();
    limits.rate = Some(Rate {
        count: 1,
        per: Duration::from_secs(4),
    });
    let config = config(&spool, vec![channel("c", limits)]);
    // The events log ends exactly on a page once the first send is counted (when it
    // starts, then moved to when it ended: three lines), so the next append needs a new
    // page: on a full disk it fails (older events, still in the day; "00" only pads).
    std::fs::create_dir_all(spool.join("state")).unwrap();
    let now = mailgate::queue::spool::now_ms();
    let old: String = (0..252)
        .map(|i| {
            let zero = if i < 14 { "00" } else { "0" };
            format!("{} {zero}\n", now - 60_000 - i)
        })
        .collect();
    let first = format!("{now} 1\n{now} 1\n{now} 1 -\n");
    assert_eq!(old.len() + first.len(), 4096);
    std::fs::write(spool.join("state/c.events"), old).unwrap();
    // Slow enough that the transaction ends a few ms after it starts.
    let fake = Fake::slow(Duration::from_millis(20), |_, _, _| ok());
    let running = Running::start(&config, fake.clone());
    let reply = running.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    assert!(
        wait_for(Duration::from_secs(30), || fake.sent().len() == 1
            && queued(&config) == 0)
        .await
    );

    let reply = running.submit(0, "b@example.com", &rcpts(1), MESSAGE).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    // The journal segment that made it durable is retired within seconds, and deleting
    // it frees space: the disk is filled once it is gone.
    let journal = spool.join("journal");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_dir(&journal)
            .map(|d| d.count() == 0)
            .unwrap_or(true))
        .await
    );
    disk.fill();
    // A large message while the disk is full: 4xx, nothing acknowledged.
    let big: Vec<u8> = MESSAGE
        .iter()
        .chain(
            std::iter::repeat_n(b"x".repeat(78).as_slice(), 4000)
                .flat_map(|l| l.iter().chain(b"\r\n")),
        )
        .copied()
        .collect();
    for body in [MESSAGE, big.as_slice()] {
        // As the session does: a failed write of the draft is a 451.
        let mut draft = running.queue.begin().await.expect("draft");
        let mut written = Ok(());
        for piece in body.chunks(4096) {
            written = written.and(draft.write(piece).await);
        }
        let refused = match written {
            Ok(()) => {
                let envelope = Envelope {
                    sender: "c@example.com".into(),
                    recipients: rcpts(1),
                    ..Default::default()
                };
                running
                    .queue
                    .finish(draft, &running.config, 0, &envelope)
                    .await
            }
            Err(_) => Reply::new(451, (4, 3, 0), "write failed"),
        };
        assert!((400..500).contains(&refused.code), "{refused:?}");
    }
    // Past the rate window: the second message's turn came while the disk was full.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.sent().len(), 1, "not sent without its count on disk");
    disk.free();
    let reply = running.submit(0, "d@example.com", &rcpts(1), MESSAGE).await;
    assert_eq!(reply.code, 250, "{reply:?}");
    assert!(
        wait_for(Duration::from_secs(30), || queued(&config) == 0).await,
        "the queue empties by itself once space returns"
    );
    let senders: std::collections::HashSet<String> = fake
        .sent()
        .iter()
        .map(|s| s.envelope.sender.clone())
        .collect();
    for sender in ["a@example.com", "b@example.com", "d@example.com"] {
        assert!(senders.contains(sender), "{sender} arrived: {senders:?}");
    }
    assert!(!senders.contains("c@example.com"));
    let health = std::fs::read_to_string(spool.join("state/c.health.json")).unwrap_or_default();
    assert!(!health.contains("broken"), "{health}");
    running.stop().await;
    drop(disk);
}

/// A reload in process: a removed channel's worker stops and its mail stays queued,
/// untouched; an unchanged channel's worker carries on with the new generation (its
/// channel id differs there); the channel's return sends the waiting mail at once.
#[tokio::test]
async fn reconfigure_keeps_a_removed_channels_mail_until_it_returns() {
    use mailgate::queue::{ChannelChanges, Generation};
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let dir = tempfile::tempdir().unwrap();
    let both = config(
        dir.path(),
        vec![channel("a", limits()), channel("b", limits())],
    );
    // Channel "a" (id 0) is down; "b" takes everything.
    let first = Fake::new(|channel, _, _| {
        if channel == 0 {
            refused(451, (4, 4, 1), "upstream down")
        } else {
            ok()
        }
    });
    let q = Running::start(&both, first.clone());
    assert_eq!(
        q.submit(0, "s@example.com", &rcpts(1), MESSAGE).await.code,
        250
    );
    assert!(wait_for(Duration::from_secs(30), || first.accepted_on(0).len() == 1).await);

    let only_b = Arc::new(config(dir.path(), vec![channel("b", limits())]));
    let second = Fake::new(|_, _, _| ok());
    let removed = ChannelChanges {
        removed: names(&["a"]),
        unchanged: names(&["b"]),
        ..Default::default()
    };
    let generation = Generation {
        config: only_b.clone(),
        transport: second.clone(),
    };
    q.queue.reconfigure(generation, &removed).await;
    // "b" goes on, now as channel 0 of the new generation, over its transport.
    assert_eq!(
        q.submit(1, "s@example.com", &rcpts(1), MESSAGE).await.code,
        250
    );
    assert!(wait_for(Duration::from_secs(30), || second.accepted_on(0).len() == 1).await);
    // Longer than retry_first: "a"'s message is not tried again, not failed, still queued.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        first.accepted_on(0).len(),
        1,
        "a removed channel is not tried"
    );
    assert!(
        second
            .sent()
            .iter()
            .all(|s| s.envelope.recipients == rcpts(1))
    );
    assert_eq!(second.sent().len(), 1);
    assert_eq!(queued(&both), 1);
    assert_eq!(
        std::fs::read_dir(dir.path().join("failed"))
            .unwrap()
            .count(),
        0,
        "nothing failed, no DSN"
    );

    // "a" comes back: its waiting message goes (over the new generation's transport).
    let third = Fake::new(|_, _, _| ok());
    let back = ChannelChanges {
        added: names(&["a"]),
        unchanged: names(&["b"]),
        ..Default::default()
    };
    let generation = Generation {
        config: Arc::new(both.clone()),
        transport: third.clone(),
    };
    q.queue.reconfigure(generation, &back).await;
    assert!(wait_for(Duration::from_secs(30), || third.accepted_on(0).len() == 1).await);
    assert!(wait_for(Duration::from_secs(30), || queued(&both) == 0).await);
    q.stop().await;
}

/// A reload that lands before the workers start (SIGHUP right after start-up): they start
/// with the reloaded generation, not the transports of the first config.
#[tokio::test]
async fn a_reload_before_the_workers_start_is_the_one_they_run_with() {
    use mailgate::queue::{ChannelChanges, Generation};
    let dir = tempfile::tempdir().unwrap();
    let first = config(dir.path(), vec![channel("a", limits())]);
    let second = config(
        dir.path(),
        vec![channel("a", limits()), channel("b", limits())],
    );
    let queue = Queue::open(Arc::new(first.clone())).expect("spool opens");
    let old = Fake::new(|_, _, _| ok());
    let new = Fake::new(|_, _, _| ok());
    let changes = ChannelChanges {
        added: vec!["b".into()],
        unchanged: vec!["a".into()],
        ..Default::default()
    };
    let generation = Generation {
        config: Arc::new(second.clone()),
        transport: new.clone(),
    };
    queue.reconfigure(generation, &changes).await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(queue.clone().run(old.clone(), shutdown.clone()));
    let running = Running {
        queue,
        config: second.clone(),
        task,
        shutdown,
    };
    assert_eq!(
        running
            .submit(1, "s@example.com", &rcpts(1), MESSAGE)
            .await
            .code,
        250
    );
    assert!(wait_for(Duration::from_secs(30), || new.accepted_on(1).len() == 1).await);
    assert!(old.sent().is_empty());
    running.stop().await;
}

/// Counts the transactions started (before any answer) and answers 250 after `delay`.
struct Starts {
    started: Mutex<Vec<String>>,
    delay: Duration,
}

impl Starts {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Starts {
            started: Mutex::new(Vec::new()),
            delay,
        })
    }
    fn count(&self) -> usize {
        self.started.lock().unwrap().len()
    }
}

impl Transport for Starts {
    fn send<'a>(
        &'a self,
        _channel: ChannelId,
        id: &'a str,
        _envelope: &'a Envelope,
        _body: Body<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            self.started.lock().unwrap().push(id.to_string());
            tokio::time::sleep(self.delay).await;
            ok()
        })
    }
}

fn changed(name: &str) -> mailgate::queue::ChannelChanges {
    mailgate::queue::ChannelChanges {
        changed: vec![name.to_string()],
        ..Default::default()
    }
}

/// A reload that changes a channel while its old worker still delivers a message: the new
/// worker finds the message locked and tries again every second until the old one is
/// done. Those tries send nothing, so they must not use up the channel's rate window.
#[tokio::test]
async fn a_message_locked_by_the_old_worker_does_not_use_up_the_new_workers_rate() {
    locked_message_keeps_the_rate(None).await;
}

/// The same with the rate window kept in a shared Redis: the reservation is given back.
#[tokio::test]
async fn a_message_locked_by_the_old_worker_gives_back_its_shared_reservation() {
    let server = mailgate::testkit::redis_server::RedisServer::start();
    locked_message_keeps_the_rate(Some(server.settings("locked:"))).await;
}

async fn locked_message_keeps_the_rate(shared: Option<mailgate::config::RedisSettings>) {
    use mailgate::queue::Generation;
    let dir = tempfile::tempdir().unwrap();
    let limited = Limits {
        rate: Some(Rate {
            count: 3,
            per: Duration::from_secs(60),
        }),
        ..limits()
    };
    let mut config = config(dir.path(), vec![channel("a", limited)]);
    let redis = shared.map(|settings| {
        config.state = mailgate::config::StateBackend::Redis(settings.clone());
        mailgate::state::shared::RedisState::new(&settings).unwrap()
    });
    let slow = Starts::new(Duration::from_millis(3500));
    let q = Running::start(&config, slow.clone());
    assert_eq!(
        q.submit(0, "s@example.com", &rcpts(1), MESSAGE).await.code,
        250
    );
    assert!(wait_for(Duration::from_secs(5), || slow.count() == 1).await);
    let fast = Starts::new(Duration::ZERO);
    let generation = Generation {
        config: Arc::new(config.clone()),
        transport: fast.clone(),
    };
    q.queue.reconfigure(generation, &changed("a")).await;
    // The old worker finishes its transaction; the message is gone from the spool.
    assert!(wait_for(Duration::from_secs(8), || queued(&config) == 0).await);
    assert_eq!(slow.count() + fast.count(), 1, "sent once");
    // One message of the three the window allows was sent: two more go at once.
    for _ in 0..2 {
        assert_eq!(
            q.submit(0, "s@example.com", &rcpts(1), MESSAGE).await.code,
            250
        );
    }
    assert!(
        wait_for(Duration::from_secs(3), || fast.count() == 2).await,
        "the second and third message of the window wait: {} sent",
        fast.count()
    );
    if let Some(redis) = redis {
        let counted = redis.events("a").await.unwrap();
        assert_eq!(counted.len(), 3, "three messages sent: {counted:?}");
    }
    q.stop().await;
}

/// A reload that changes a channel while a transaction of its old worker takes longer
/// than the shutdown grace: that transaction is not cut (the upstream may have taken the
/// message already; cutting it would send it again), it finishes and counts.
#[tokio::test]
async fn a_reload_never_cuts_a_slow_transaction_so_the_message_is_sent_once() {
    use mailgate::queue::Generation;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), vec![channel("a", limits())]);
    let slow = Starts::new(mailgate::queue::worker::SHUTDOWN_GRACE + Duration::from_secs(3));
    let q = Running::start(&config, slow.clone());
    assert_eq!(
        q.submit(0, "s@example.com", &rcpts(1), MESSAGE).await.code,
        250
    );
    assert!(wait_for(Duration::from_secs(5), || slow.count() == 1).await);
    let fresh = Starts::new(Duration::ZERO);
    let generation = Generation {
        config: Arc::new(config.clone()),
        transport: fresh.clone(),
    };
    q.queue.reconfigure(generation, &changed("a")).await;
    let grace = mailgate::queue::worker::SHUTDOWN_GRACE + Duration::from_secs(8);
    assert!(wait_for(grace, || queued(&config) == 0).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (slow.count(), fresh.count()),
        (1, 0),
        "the message went once, over the old worker's transaction"
    );
    q.stop().await;
}

/// A removed channel's worker finishing its last transaction after the reload must not
/// bring back the gauges the reload dropped.
#[tokio::test]
async fn a_removed_channels_last_transaction_does_not_bring_its_gauges_back() {
    use mailgate::queue::{ChannelChanges, Generation};
    let dir = tempfile::tempdir().unwrap();
    let both = config(
        dir.path(),
        vec![
            channel("gauge-gone", limits()),
            channel("gauge-kept", limits()),
        ],
    );
    let slow = Starts::new(Duration::from_millis(1500));
    let q = Running::start(&both, slow.clone());
    assert_eq!(
        q.submit(0, "s@example.com", &rcpts(1), MESSAGE).await.code,
        250
    );
    assert!(wait_for(Duration::from_secs(5), || slow.count() == 1).await);
    let kept = Arc::new(config(dir.path(), vec![channel("gauge-kept", limits())]));
    let removed = ChannelChanges {
        removed: vec!["gauge-gone".into()],
        unchanged: vec!["gauge-kept".into()],
        ..Default::default()
    };
    let generation = Generation {
        config: kept.clone(),
        transport: slow.clone(),
    };
    q.queue.reconfigure(generation, &removed).await;
    mailgate::metrics::global().declare_channels(&kept);
    assert!(wait_for(Duration::from_secs(5), || queued(&both) == 0).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = mailgate::metrics::global().prometheus_text();
    let gauge_of_gone = text.lines().any(|l| {
        (l.starts_with("mailgate_queue_messages") || l.starts_with("mailgate_channel_state"))
            && l.contains(r#"channel="gauge-gone""#)
    });
    assert!(!gauge_of_gone, "{text}");
    assert!(text.contains(r#"mailgate_queue_messages{channel="gauge-kept"}"#));
    q.stop().await;
}

/// A message with more recipients than one transaction takes goes out in parts; a part
/// that went through is no deferral in the metrics.
#[tokio::test]
async fn a_message_sent_in_parts_counts_delivered_once_and_never_deferred() {
    let dir = tempfile::tempdir().unwrap();
    let two = Limits {
        max_recipients: Some(2),
        ..limits()
    };
    let config = config(dir.path(), vec![channel("parts-count", two)]);
    let fake = Fake::new(|_, _, _| ok());
    let q = Running::start(&config, fake.clone());
    assert_eq!(
        q.submit(0, "s@example.com", &rcpts(5), MESSAGE).await.code,
        250
    );
    let count = |outcome: &str| {
        let series =
            format!(r#"mailgate_messages_total{{channel="parts-count",outcome="{outcome}"}} "#);
        mailgate::metrics::global()
            .prometheus_text()
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()).map(str::to_string))
    };
    // Counted once the spool is updated: after the message has left it.
    assert!(
        wait_for(Duration::from_secs(5), || count("delivered").is_some()).await,
        "delivered counted"
    );
    assert_eq!(fake.sent().len(), 3, "2 + 2 + 1 recipients");
    assert_eq!(count("delivered").as_deref(), Some("1"));
    assert_eq!(count("deferred"), None, "parts that went through");
    q.stop().await;
}

/// Panics on its first `panics` transactions (a bug deep in a transport), then delivers.
struct Panicking {
    panics: usize,
    calls: std::sync::atomic::AtomicUsize,
    inner: Arc<Fake>,
}

impl Transport for Panicking {
    fn send<'a>(
        &'a self,
        channel: ChannelId,
        id: &'a str,
        envelope: &'a Envelope,
        body: Body<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::task::yield_now().await;
            if call < self.panics {
                let expires_in: u64 = u64::MAX - call as u64;
                let _ = Instant::now() + Duration::from_secs(expires_in);
            }
            self.inner.send(channel, id, envelope, body).await
        })
    }
}

#[tokio::test]
async fn a_panic_in_a_delivery_frees_its_slot_and_the_message_is_retried_like_a_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let one = Limits {
        connections: 1,
        ..Default::default()
    };
    let config = config(dir.path(), vec![channel("c", one)]);
    let fake = Arc::new(Panicking {
        panics: 1,
        calls: Default::default(),
        inner: Fake::new(|_, _, _| ok()),
    });
    let q = Running::start(&config, fake.clone());
    let reply = q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    assert_eq!(reply.code, 250, "{reply}");
    let id = reply.text.trim_start_matches("queued as ").to_string();
    let state_file = dir.path().join("queue").join(format!("{id}.json"));
    // The panicked attempt is recorded like a temporary failure: counted, backed off.
    let recorded = || {
        mailgate::queue::spool::Spool::read_state_file(&state_file)
            .ok()
            .flatten()
            .filter(|st| st.attempts == 1)
    };
    assert!(wait_for(Duration::from_secs(10), || recorded().is_some()).await);
    let st = recorded().unwrap();
    assert_eq!(st.deferrals, 1);
    assert!(
        st.last_reply
            .as_deref()
            .unwrap_or("")
            .contains("internal error"),
        "{:?}",
        st.last_reply
    );
    // …then delivered on the second attempt, over the one connection slot it held.
    assert!(
        wait_for(Duration::from_secs(10), || fake.inner.sent().len() == 1
            && queued(&config) == 0)
        .await,
        "the message was retried and delivered"
    );
    assert_eq!(fake.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    // The slot is free for the next message.
    q.submit(0, "a@example.com", &rcpts(1), MESSAGE).await;
    assert!(
        wait_for(Duration::from_secs(10), || fake.inner.sent().len() == 2
            && queued(&config) == 0)
        .await
    );
    q.stop().await;
}
