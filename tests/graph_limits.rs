//! A graph channel never splits a message (SPEC §7 "Large messages over Graph", issue 16
//! item 7): in process, the real delivery layer and queue workers against the local Graph
//! stand-in and token endpoint. Graph sends to every recipient the headers name, so a
//! part of the envelope would be refused ("not a recipient") or reach the others too.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailgate::config::{Channel, ChannelKind, Config, DeliveryMode, TlsMode};
use mailgate::delivery::Delivery;
use mailgate::message::Envelope;
use mailgate::ratelimit::DAY_MS;
use mailgate::reply::Reply;
use mailgate::testkit::config::{graph_channel, server};
use mailgate::testkit::fake_smtp;
use mailgate::testkit::graph_api::{GraphApi, Scripted};
use mailgate::testkit::token_endpoint::TokenEndpoint;
use tokio_util::sync::CancellationToken;

const MAILBOX: &str = "dave@example.com";
const AUTH_DISABLED: &str =
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant";

struct Setup {
    graph: GraphApi,
    _tokens: Arc<TokenEndpoint>,
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

/// Channel `dave` (graph, with `tune`d limits) and `extra`; `before` sees the config and
/// its spool folder before anything starts (to leave counters there).
async fn setup(
    mode: DeliveryMode,
    extra: Vec<Channel>,
    tune: impl FnOnce(&mut Config),
    before: impl FnOnce(&Path),
) -> Setup {
    mailgate::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let tokens = Arc::new(TokenEndpoint::start().await);
    let graph = GraphApi::start(tokens.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut channels = vec![graph_channel(
        "dave",
        MAILBOX,
        &graph.url(),
        &tokens.token_url(),
    )];
    channels.extend(extra);
    channels.sort_by(|a, b| a.name.cmp(&b.name));
    let mut config = Config {
        server: mailgate::config::Server {
            delivery: mode,
            spool_dir: dir.path().join("spool"),
            retry_first: Duration::from_millis(300),
            retry_max: Duration::from_secs(2),
            ..server()
        },
        ..mailgate::testkit::config::config(channels)
    };
    tune(&mut config);
    before(&config.server.spool_dir);
    let config = Arc::new(config);
    let delivery = Arc::new(Delivery::new(config.clone()).unwrap());
    let shutdown = CancellationToken::new();
    {
        let (d, s) = (delivery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run_queue(s).await });
    }
    Setup {
        graph,
        _tokens: tokens,
        _dir: dir,
        config,
        delivery,
        shutdown,
    }
}

fn dave(config: &mut Config) -> &mut Channel {
    let id = config.channel_id("dave").unwrap();
    &mut config.channels[id]
}

async fn submit(delivery: &Delivery, config: &Config, channel: &str, rcpts: &[&str]) -> Reply {
    let mut draft = delivery.begin().await.unwrap();
    draft.write(&message(rcpts)).await.unwrap();
    let envelope = Envelope {
        sender: MAILBOX.into(),
        recipients: rcpts.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    };
    delivery
        .finish(draft, config.channel_id(channel).unwrap(), &envelope)
        .await
}

/// Every recipient in `To:`, as a mail program writes it.
fn message(rcpts: &[&str]) -> Vec<u8> {
    format!(
        "From: Dave <{MAILBOX}>\r\nTo: {}\r\nSubject: team\r\n\r\nhello\r\n",
        rcpts.join(", ")
    )
    .into_bytes()
}

impl Setup {
    fn files(&self, folder: &str) -> Vec<String> {
        let dir = self.config.server.spool_dir.join(folder);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|x| x == "json") {
                out.push(std::fs::read_to_string(entry.path()).unwrap());
            }
        }
        out
    }

    /// A reload to `next` (as SIGHUP does); returns the new generation.
    async fn reload(&self, next: Config) -> Arc<Delivery> {
        let next = Arc::new(next);
        let changes = mailgate::reload::diff_channels(&self.config, &next);
        let delivery = Arc::new(self.delivery.reload(next, &changes).unwrap());
        self.delivery.apply(&delivery, &changes).await;
        delivery
    }
}

use mailgate::testkit::wait_for;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const BOB: &str = "bob@example.org";
const CAROL: &str = "carol@example.org";
const ERIN: &str = "erin@example.org";

/// `recipients_per_day = 3`, 2 of them used by a message sent a day ago less 4 s: a
/// message of 1 goes; the next of 2 waits whole (never 1 now and 1 later) until that old
/// one leaves the window, then goes in one request to both.
#[tokio::test]
async fn a_graph_message_waits_whole_for_room_in_the_day_window() {
    let rolls_at = now_ms() - DAY_MS + 4000;
    let s = setup(
        DeliveryMode::Queue,
        vec![],
        |c| dave(c).limits.recipients_per_day = Some(3),
        |spool| {
            let state = mailgate::state::LocalState::new(spool);
            std::fs::create_dir_all(state.events_path("dave").parent().unwrap()).unwrap();
            std::fs::write(state.events_path("dave"), format!("{rolls_at} 2\n")).unwrap();
        },
    )
    .await;
    let first = submit(&s.delivery, &s.config, "dave", &[BOB]).await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(5), || s.graph.sent().len() == 1).await);
    let second = submit(&s.delivery, &s.config, "dave", &[CAROL, ERIN]).await;
    assert!(second.text.starts_with("queued as"), "{second}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        now_ms() < rolls_at + DAY_MS,
        "the test machine was too slow"
    );
    assert_eq!(
        s.graph.requests(),
        1,
        "held whole: no recipient of it sent yet"
    );
    assert_eq!(s.files("queue").len(), 1);
    assert!(
        wait_for(Duration::from_secs(15), || s.graph.sent().len() == 2).await,
        "goes once the window rolls"
    );
    assert!(now_ms() >= rolls_at + DAY_MS);
    let mime = String::from_utf8_lossy(&s.graph.sent()[1].mime).to_string();
    assert!(mime.contains(CAROL) && mime.contains(ERIN), "{mime}");
    assert_eq!(s.graph.requests(), 2, "one request for the whole envelope");
    assert!(s.files("failed").is_empty());
}

/// A message queued within the limits; a reload sets `recipients_per_day` below its
/// recipients: it can never go whole, so it fails at once with a DSN saying why, and no
/// part of it is sent (the old code sent two of three, which Graph refused).
#[tokio::test]
async fn a_reload_setting_a_day_quota_fails_a_message_that_can_never_fit_with_a_dsn() {
    let s = setup(
        DeliveryMode::Queue,
        vec![],
        // No windows yet: the throttled try below counts against none.
        |c| {
            dave(c).limits.recipients_per_day = None;
            dave(c).limits.rate = None;
        },
        |_| {},
    )
    .await;
    // Throttled on its first try: it stays queued for a while.
    s.graph.script([Scripted::throttled("60")]);
    let reply = submit(&s.delivery, &s.config, "dave", &[BOB, CAROL, ERIN]).await;
    assert!(reply.text.starts_with("queued as"), "{reply}");
    assert!(wait_for(Duration::from_secs(5), || s.graph.requests() == 1).await);
    let mut lowered = (*s.config).clone();
    dave(&mut lowered).limits.recipients_per_day = Some(2);
    let next = s.reload(lowered.clone()).await;
    assert!(
        wait_for(Duration::from_secs(10), || s.files("failed").len() == 1).await,
        "failed, not left waiting for ever"
    );
    let failed = &s.files("failed")[0];
    assert!(failed.contains("5.5.3"), "{failed}");
    assert!(failed.contains("at most 2"), "{failed}");
    // Nothing of the message went (only the throttled try reached Graph); the DSN to the
    // sender is queued on the channel, saying why. (It waits for the day window: the
    // throttled try counted its 3 recipients, more than the new quota of 2.)
    assert_eq!(s.graph.requests(), 1);
    let dsn_path = std::fs::read_dir(s.config.server.spool_dir.join("queue"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "eml"))
        .expect("a DSN is queued");
    let dsn = std::fs::read_to_string(dsn_path).unwrap();
    assert!(dsn.contains("multipart/report"), "{dsn}");
    assert!(dsn.contains("5.5.3"), "{dsn}");
    assert!(dsn.contains("never split"), "{dsn}");
    // New mail of that size is refused at once.
    let reply = submit(&next, &lowered, "dave", &[BOB, CAROL, ERIN]).await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (452, Some((4, 5, 3))),
        "{reply}"
    );
}

/// A plain SMTP channel scoped to `MAILBOX`, to a local fake.
fn smtp_channel(name: &str, port: u16) -> Channel {
    let mut c = mailgate::testkit::config::channel(
        name,
        ChannelKind::Smtp(mailgate::testkit::config::smtp_target(port, TlsMode::None)),
        2,
    );
    c.scope = vec![mailgate::config::SenderPattern::Exact(MAILBOX.into())];
    c
}

/// A reload gives an SMTP channel a graph fallback that takes fewer recipients than a
/// message queued on it; then the SMTP provider refuses its auth method. The fallback's
/// limits apply there: it cannot take the message whole, so the message waits for its own
/// channel (which may split it), untouched, rather than being split over Graph or failed.
#[tokio::test]
async fn mail_lent_to_a_graph_fallback_too_small_for_it_waits_for_its_own_channel() {
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_script: vec!["451 4.3.0 try again", AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    })
    .await;
    let s = setup(
        DeliveryMode::Queue,
        vec![smtp_channel("alice", port)],
        |c| {
            dave(c).limits.recipients_per_day = Some(2);
            // Time for the reload between the deferral and the retry.
            c.server.retry_first = Duration::from_secs(4);
            c.server.retry_max = Duration::from_secs(8);
        },
        |_| {},
    )
    .await;
    let reply = submit(&s.delivery, &s.config, "alice", &[BOB, CAROL, ERIN]).await;
    assert!(reply.text.starts_with("queued as"), "{reply}");
    assert!(
        wait_for(Duration::from_secs(5), || upstream
            .commands()
            .iter()
            .any(|c| c.starts_with("DATA")))
        .await
    );
    let mut with_fallback = (*s.config).clone();
    let (alice, graph) = (
        with_fallback.channel_id("alice").unwrap(),
        with_fallback.channel_id("dave").unwrap(),
    );
    with_fallback.channels[alice].fallback = Some(graph);
    s.reload(with_fallback).await;
    // The retry meets the refusal and hands the message to dave.
    assert!(
        wait_for(Duration::from_secs(10), || upstream
            .commands()
            .iter()
            .filter(|c| c.starts_with("DATA"))
            .count()
            >= 2)
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.graph.requests(), 0, "no part of it went over Graph");
    assert!(s.files("failed").is_empty(), "{:?}", s.files("failed"));
    let queued = s.files("queue");
    assert_eq!(queued.len(), 1);
    assert!(
        !queued[0].contains("\"failed\""),
        "no recipient failed: {}",
        queued[0]
    );
    assert_eq!(upstream.txns().len(), 0);
}

/// Relay mode: a message over a graph channel's day quota could never go; the client
/// hears `452 4.5.3` (not a `451` it would retry for ever), and nothing is sent. The same
/// for a graph fallback the message is handed to.
#[tokio::test]
async fn relay_mode_refuses_a_message_over_a_graph_day_quota_with_452() {
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        data_script: vec![AUTH_DISABLED],
        ..fake_smtp::plain_fake()
    })
    .await;
    let s = setup(
        DeliveryMode::Relay,
        vec![smtp_channel("alice", port)],
        |c| {
            dave(c).limits.recipients_per_day = Some(2);
            let (alice, graph) = (
                c.channel_id("alice").unwrap(),
                c.channel_id("dave").unwrap(),
            );
            c.channels[alice].fallback = Some(graph);
        },
        |_| {},
    )
    .await;
    let reply = submit(&s.delivery, &s.config, "dave", &[BOB, CAROL, ERIN]).await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (452, Some((4, 5, 3))),
        "{reply}"
    );
    // alice's provider refuses its auth method: handed to dave, which cannot take it.
    let reply = submit(&s.delivery, &s.config, "alice", &[BOB, CAROL, ERIN]).await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (452, Some((4, 5, 3))),
        "{reply}"
    );
    assert_eq!(s.graph.requests(), 0);
    assert_eq!(upstream.txns().len(), 0);
    // Within the quota it goes, whole.
    let reply = submit(&s.delivery, &s.config, "dave", &[BOB, CAROL]).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(s.graph.sent().len(), 1);
}

/// The same with `[state] backend = "redis"`, where the windows are reserved in batches:
/// the second message of 2 waits whole behind a day quota of 3 (no reservation of a
/// part), and after a reload lowers the quota to 1 it fails with a DSN, nothing sent.
#[tokio::test]
async fn with_redis_a_graph_message_waits_whole_and_fails_once_it_can_never_fit() {
    use mailgate::testkit::redis_server::RedisServer;
    let redis = RedisServer::start();
    let s = setup(
        DeliveryMode::Queue,
        vec![],
        |c| {
            dave(c).limits.recipients_per_day = Some(3);
            c.state = mailgate::config::StateBackend::Redis(redis.settings("gl:"));
        },
        |_| {},
    )
    .await;
    let first = submit(&s.delivery, &s.config, "dave", &[BOB, CAROL]).await;
    assert!(first.text.starts_with("queued as"), "{first}");
    assert!(wait_for(Duration::from_secs(5), || s.graph.sent().len() == 1).await);
    let second = submit(&s.delivery, &s.config, "dave", &[CAROL, ERIN]).await;
    assert!(second.text.starts_with("queued as"), "{second}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.graph.requests(), 1, "held whole: no recipient of it sent");
    let shared = mailgate::state::shared::RedisState::new(&redis.settings("gl:")).unwrap();
    let counted: Vec<u64> = shared
        .events("dave")
        .await
        .unwrap()
        .iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(counted, vec![2], "only the first message is counted");

    let mut lowered = (*s.config).clone();
    dave(&mut lowered).limits.recipients_per_day = Some(1);
    s.reload(lowered).await;
    assert!(
        wait_for(Duration::from_secs(10), || s.files("failed").len() == 1).await,
        "failed, not left waiting for ever"
    );
    let failed = &s.files("failed")[0];
    assert!(
        failed.contains("5.5.3") && failed.contains("at most 1"),
        "{failed}"
    );
    assert_eq!(s.graph.requests(), 1);
}
