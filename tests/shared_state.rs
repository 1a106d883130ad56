//! The shared backend against a real `redis-server`: the reservation script keeps the
//! same rolling windows as the pure `ratelimit::ChannelLimiter`, gives reservations back,
//! lets its keys expire, and refuses (never allows) while Redis is down.

use std::time::Duration;

use mailgate::config::{Limits, Rate, Secret};
use mailgate::state::Health;
use mailgate::state::shared::{RedisState, Reserved};
use mailgate::testkit::redis_server::RedisServer;

fn limits(rate: Option<(u64, u64)>, per_day: Option<u64>) -> Limits {
    Limits {
        rate: rate.map(|(count, ms)| Rate {
            count,
            per: Duration::from_millis(ms),
        }),
        recipients_per_day: per_day,
        ..Limits::default()
    }
}

#[tokio::test]
async fn the_rate_window_refuses_the_sixth_until_the_first_ages_out() {
    let server = RedisServer::start();
    let a = RedisState::new(&server.settings("t1:")).unwrap();
    let b = RedisState::new(&server.settings("t1:")).unwrap();
    let l = limits(Some((5, 1500)), None);
    for i in 0..5 {
        let host = if i % 2 == 0 { &a } else { &b };
        assert!(
            matches!(host.reserve("c", &l, 1).await, Ok(Reserved::Yes(_))),
            "send {i}"
        );
    }
    let Ok(Reserved::Wait(ms)) = b.reserve("c", &l, 1).await else {
        panic!("the sixth must wait");
    };
    assert!(ms > 0 && ms <= 1500, "{ms}");
    tokio::time::sleep(Duration::from_millis(ms + 20)).await;
    assert!(matches!(a.reserve("c", &l, 1).await, Ok(Reserved::Yes(_))));
    // The window's key expires by itself.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(a.events("c").await.unwrap(), vec![]);
}

/// Issue 16 item 10: a settled reservation counts from when its transaction ended.
#[tokio::test]
async fn a_settled_reservation_counts_from_the_end_of_its_transaction() {
    let server = RedisServer::start();
    let a = RedisState::new(&server.settings("t10:")).unwrap();
    let l = limits(Some((1, 1000)), Some(10));
    let Ok(Reserved::Yes(token)) = a.reserve("c", &l, 2).await else {
        panic!("the first fits");
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.settle("c", &l, &token).await.unwrap();
    // Counted from now, not from 600 ms ago: the next waits about a whole window.
    let Ok(Reserved::Wait(ms)) = a.reserve("c", &l, 1).await else {
        panic!("the second must wait");
    };
    assert!(ms > 900, "{ms}");
    // Still one send of two recipients in the day, and still given back by its token.
    assert_eq!(a.events("c").await.unwrap().len(), 1);
    a.release("c", &token).await.unwrap();
    assert!(matches!(a.reserve("c", &l, 10).await, Ok(Reserved::Yes(_))));
    // A transaction longer than the window: its reservation aged out while it ran, and
    // it counts again from its end.
    let short = limits(Some((1, 300)), None);
    let Ok(Reserved::Yes(slow)) = a.reserve("d", &short, 1).await else {
        panic!("the first fits");
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.settle("d", &short, &slow).await.unwrap();
    assert!(matches!(
        a.reserve("d", &short, 1).await,
        Ok(Reserved::Wait(_))
    ));
}

#[tokio::test]
async fn recipients_per_day_counts_recipients_and_a_release_gives_them_back() {
    let server = RedisServer::start();
    let redis = RedisState::new(&server.settings("t2:")).unwrap();
    let l = limits(None, Some(10));
    let Ok(Reserved::Yes(first)) = redis.reserve("c", &l, 6).await else {
        panic!("6 of 10 fit");
    };
    let Ok(Reserved::Wait(ms)) = redis.reserve("c", &l, 5).await else {
        panic!("11 of 10 do not fit");
    };
    // Until the 6 leave the rolling day.
    assert!(ms > 86_000_000 && ms <= 86_400_000, "{ms}");
    assert_eq!(redis.reserve("c", &l, 11).await, Ok(Reserved::Never));
    assert!(matches!(
        redis.reserve("c", &l, 4).await,
        Ok(Reserved::Yes(_))
    ));
    redis.release("c", &first).await.unwrap();
    redis.release("c", &first).await.unwrap(); // twice is once
    assert!(matches!(
        redis.reserve("c", &l, 6).await,
        Ok(Reserved::Yes(_))
    ));
    assert!(matches!(
        redis.reserve("c", &l, 1).await,
        Ok(Reserved::Wait(_))
    ));
    let events = redis.events("c").await.unwrap();
    assert_eq!(events.iter().map(|e| e.1).collect::<Vec<_>>(), vec![4, 6]);
}

#[tokio::test]
async fn health_retry_and_tokens_are_shared() {
    let server = RedisServer::start();
    let a = RedisState::new(&server.settings("t3:")).unwrap();
    let b = RedisState::new(&server.settings("t3:")).unwrap();
    let broken = Health::Broken {
        since_ms: 1,
        reason: "535 5.7.3".into(),
        auth_method_refused: false,
    };
    a.set_health("c", &broken).await.unwrap();
    assert_eq!(b.health("c").await.unwrap(), (broken, 0));
    b.retry("c").await.unwrap();
    assert_eq!(a.health("c").await.unwrap(), (Health::Ok, 1));
    // One host at a time holds the refresh lock; it expires by itself.
    let held = a
        .lock_refresh("c", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(held.is_some());
    assert_eq!(
        b.lock_refresh("c", Duration::from_secs(5)).await.unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let taken = b
        .lock_refresh("c", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    // A's late unlock does not free B's lock.
    a.unlock_refresh("c", &held.unwrap()).await.unwrap();
    assert_eq!(
        a.lock_refresh("c", Duration::from_secs(5)).await.unwrap(),
        None
    );
    b.unlock_refresh("c", &taken).await.unwrap();
    b.set_access_token("c", &Secret::new("at-1"), 60_000)
        .await
        .unwrap();
    let (token, lasts) = a.access_token("c").await.unwrap().unwrap();
    assert_eq!(token.expose(), "at-1");
    assert!(lasts > 59_000);
    a.drop_access_token("c", &Secret::new("other"))
        .await
        .unwrap();
    assert!(b.access_token("c").await.unwrap().is_some());
    a.drop_access_token("c", &Secret::new("at-1"))
        .await
        .unwrap();
    assert!(b.access_token("c").await.unwrap().is_none());
}

#[tokio::test]
async fn redis_down_refuses_and_it_recovers_by_itself() {
    let mut server = RedisServer::start();
    let redis = RedisState::new(&server.settings("t4:")).unwrap();
    let l = limits(Some((5, 60_000)), None);
    assert!(matches!(
        redis.reserve("c", &l, 1).await,
        Ok(Reserved::Yes(_))
    ));
    assert_eq!(redis.reachable(), Some(true));
    server.stop();
    let started = std::time::Instant::now();
    assert!(redis.reserve("c", &l, 1).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the call timeout"
    );
    assert_eq!(redis.reachable(), Some(false));
    server.restart();
    let mut back = false;
    for _ in 0..50 {
        if matches!(redis.reserve("c", &l, 1).await, Ok(Reserved::Yes(_))) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "reservations work again once Redis is back");
    assert_eq!(redis.reachable(), Some(true));
}

#[tokio::test]
async fn a_batch_reserves_in_order_until_one_does_not_fit() {
    let server = RedisServer::start();
    let redis = RedisState::new(&server.settings("t5:")).unwrap();
    let l = limits(Some((5, 60_000)), Some(8));
    let (granted, refused) = redis.reserve_many("c", &l, &[2, 2, 2, 3, 1]).await.unwrap();
    // 2 + 2 + 2 fit in 8 recipients a day; 3 more would not (the 1 after it is not tried).
    assert_eq!(granted.len(), 3);
    assert!(
        matches!(refused, Some(Reserved::Wait(ms)) if ms > 86_000_000),
        "{refused:?}"
    );
    let (granted, refused) = redis.reserve_many("c", &l, &[1, 1, 1]).await.unwrap();
    // 2 more fit (5 per minute, 8 recipients a day); the third waits for both windows,
    // so for the later one, the day's.
    assert_eq!(granted.len(), 2);
    assert!(
        matches!(refused, Some(Reserved::Wait(ms)) if ms > 86_000_000),
        "{refused:?}"
    );
    let rate_only = limits(Some((5, 60_000)), None);
    let (granted, refused) = redis.reserve_many("c", &rate_only, &[1]).await.unwrap();
    assert!(granted.is_empty());
    assert!(
        matches!(refused, Some(Reserved::Wait(ms)) if ms <= 60_000),
        "{refused:?}"
    );
    let (granted, refused) = redis.reserve_many("c", &l, &[9]).await.unwrap();
    assert_eq!((granted.len(), refused), (0, Some(Reserved::Never)));
    assert_eq!(redis.events("c").await.unwrap().len(), 5);
}

#[tokio::test]
async fn rediss_verifies_the_server_certificate() {
    use mailgate::config::RedisSettings;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let server = RedisServer::start_tls(cert_file.to_str().unwrap(), key_file.to_str().unwrap());
    let settings = |url: String| RedisSettings {
        display: url.clone(),
        url: Secret::new(url),
        key_prefix: "tls:".into(),
    };
    // A self-signed certificate is no trusted one: nothing is sent over that connection.
    let verified =
        RedisState::new(&settings(format!("rediss://localhost:{}/0", server.port))).unwrap();
    let started = std::time::Instant::now();
    let err = verified.ping().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(verified.reachable(), Some(false));
}

/// A raw connection, to look at (or age) the keys as a day passing would.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{}/0", server.port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn redis_now_ms(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(c).await.unwrap();
    s * 1000 + us / 1000
}

#[tokio::test]
async fn a_day_counter_that_outlives_its_window_never_lets_sends_through() {
    const DAY: u64 = 86_400_000;
    let server = RedisServer::start();
    let redis = RedisState::new(&server.settings("t6:")).unwrap();
    let mut c = raw(&server).await;
    let l = limits(None, Some(10));
    let Ok(Reserved::Yes(first)) = redis.reserve("c", &l, 1).await else {
        panic!("1 of 10 fits");
    };
    let Ok(Reserved::Yes(second)) = redis.reserve("c", &l, 9).await else {
        panic!("9 more fit");
    };
    // Nearly a day passes (Redis's clock cannot be moved: the sends are moved back
    // instead, and the keys' expiry with them, as the script set it at those sends).
    let now = redis_now_ms(&mut c).await;
    let _: () = redis::pipe()
        .zadd("t6:day:c", &first, now - DAY + 300)
        .zadd("t6:day:c", &second, now - DAY + 600)
        .pexpire("t6:day:c", 600)
        .pexpire("t6:daysum:c", 600)
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The first send leaves the day; 9 + 5 still do not fit.
    assert!(matches!(
        redis.reserve("c", &l, 5).await,
        Ok(Reserved::Wait(_))
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Both sends have left the day: a whole day's quota, and not one recipient more.
    assert!(matches!(
        redis.reserve("c", &l, 10).await,
        Ok(Reserved::Yes(_))
    ));
    for n in [10, 5, 1] {
        assert!(
            matches!(redis.reserve("c", &l, n).await, Ok(Reserved::Wait(_))),
            "{n} more recipients on a day that has had its 10"
        );
    }
    let counted: u64 = redis.events("c").await.unwrap().iter().map(|e| e.1).sum();
    assert_eq!(counted, 10);
}

#[tokio::test]
async fn an_import_while_hosts_send_never_forgets_their_sends() {
    let server = RedisServer::start();
    let redis = RedisState::new(&server.settings("t7:")).unwrap();
    let l = limits(Some((3, 60_000)), Some(100));
    for _ in 0..2 {
        assert!(matches!(
            redis.reserve("c", &l, 1).await,
            Ok(Reserved::Yes(_))
        ));
    }
    let now = mailgate::queue::spool::now_ms();
    // Another host's file, with one send of its own.
    let imported = [(now - 1000, 2)];
    redis.add_events("c", &l, &imported).await.unwrap();
    assert_eq!(redis.events("c").await.unwrap().len(), 3);
    assert!(
        matches!(redis.reserve("c", &l, 1).await, Ok(Reserved::Wait(_))),
        "3 sends in the minute already"
    );
    // The same file again counts nothing twice, nor does Redis's own export.
    redis.add_events("c", &l, &imported).await.unwrap();
    let exported = redis.events("c").await.unwrap();
    redis.add_events("c", &l, &exported).await.unwrap();
    assert_eq!(redis.events("c").await.unwrap(), exported);
    assert_eq!(exported.iter().map(|e| e.1).sum::<u64>(), 4);
    // The day's counter agrees: 96 more recipients fit, 97 do not.
    let day_only = limits(None, Some(100));
    assert!(matches!(
        redis.reserve("c", &day_only, 97).await,
        Ok(Reserved::Wait(_))
    ));
    assert!(matches!(
        redis.reserve("c", &day_only, 96).await,
        Ok(Reserved::Yes(_))
    ));
}

#[tokio::test]
async fn an_import_never_replaces_a_refresh_token_the_fleet_rotated_since() {
    use mailgate::config::{ChannelKind, StateBackend};
    use mailgate::state::transfer::{self, ChannelState, Document};
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = mailgate::testkit::config::config(vec![mailgate::testkit::config::channel(
        "c",
        ChannelKind::File {
            dir: dir.path().join("out"),
        },
        1,
    )]);
    config.server.spool_dir = dir.path().join("spool");
    config.state = StateBackend::Redis(server.settings("t8:"));
    let fleet = RedisState::new(&server.settings("t8:")).unwrap();
    // The hosts already on Redis rotated the channel's refresh token…
    fleet
        .set_refresh_token("c", &Secret::new("rt-rotated-by-the-fleet"))
        .await
        .unwrap();
    // …and a host joining them imports the copy its own spool kept from before.
    let doc = Document {
        format: transfer::FORMAT.into(),
        backend: "local".into(),
        exported_at_ms: 0,
        channels: [(
            "c".to_string(),
            ChannelState {
                refresh_token: Some("rt-spent-long-ago".into()),
                ..ChannelState::default()
            },
        )]
        .into(),
    };
    transfer::import(&config, &doc, 0).await.unwrap();
    let kept = fleet.refresh_token("c").await.unwrap().unwrap();
    assert_eq!(kept.expose(), "rt-rotated-by-the-fleet");
    // Into a Redis that has none, the file's token goes (the first host to move).
    let mut fresh = config.clone();
    fresh.state = StateBackend::Redis(server.settings("t9:"));
    transfer::import(&fresh, &doc, 0).await.unwrap();
    let first = RedisState::new(&server.settings("t9:")).unwrap();
    let moved = first.refresh_token("c").await.unwrap().unwrap();
    assert_eq!(moved.expose(), "rt-spent-long-ago");
}

#[tokio::test]
async fn a_redis_that_accepts_but_never_answers_is_unavailable_in_bounded_time() {
    // The kernel completes the TCP handshake for a listener nobody reads from.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let redis = RedisState::new(&mailgate::config::RedisSettings {
        url: Secret::new(url.clone()),
        display: url,
        key_prefix: "t10:".into(),
    })
    .unwrap();
    let l = limits(Some((5, 60_000)), Some(10));
    for _ in 0..2 {
        let started = std::time::Instant::now();
        assert!(redis.reserve("c", &l, 1).await.is_err());
        assert!(redis.health("c").await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(13),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(redis.reachable(), Some(false));
    drop(silent);
}

#[tokio::test]
async fn an_import_from_a_host_whose_clock_runs_ahead_still_counts_its_sends() {
    let server = RedisServer::start();
    let redis = RedisState::new(&server.settings("t11:")).unwrap();
    let l = limits(Some((2, 60_000)), Some(100));
    let ahead = mailgate::queue::spool::now_ms() + 5_000;
    redis
        .add_events("c", &l, &[(ahead - 1000, 1), (ahead, 1)])
        .await
        .unwrap();
    assert_eq!(redis.events("c").await.unwrap().len(), 2);
    assert!(
        matches!(redis.reserve("c", &l, 1).await, Ok(Reserved::Wait(_))),
        "2 sends in the minute already"
    );
}

/// Queue mode at 5 per second, five connections, an upstream that is slow to take the
/// first burst (400 ms before its `354`) and quick afterwards: `state` is the backend.
/// The largest number of message arrivals the upstream saw within any one second.
async fn busiest_second_at_the_upstream(
    state: mailgate::config::StateBackend,
    delivery_mode: mailgate::config::DeliveryMode,
) -> usize {
    use mailgate::config::{ChannelKind, Config, DeliveryMode, TlsMode};
    use mailgate::delivery::Delivery;
    use mailgate::testkit::{config as tk, fake_smtp};
    use std::sync::Arc;
    let (port, upstream) = fake_smtp::start(fake_smtp::Fake {
        go_ahead_delays: vec![Duration::from_millis(400); 5],
        ..fake_smtp::plain_fake()
    })
    .await;
    let mut channel = tk::channel(
        "up",
        ChannelKind::Smtp(tk::smtp_target(port, TlsMode::None)),
        5,
    );
    channel.limits.rate = Some(Rate {
        count: 5,
        per: Duration::from_secs(1),
    });
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(Config {
        server: mailgate::config::Server {
            delivery: delivery_mode,
            spool_dir: dir.path().join("spool"),
            ..tk::server()
        },
        state,
        ..tk::config(vec![channel])
    });
    let delivery = Arc::new(Delivery::new(config).unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    {
        let (d, s) = (delivery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run_queue(s).await });
    }
    let total = 15;
    let submit = |i: usize| {
        let delivery = delivery.clone();
        async move {
            // A relay-mode client whose message meets the rate tries again shortly.
            for _ in 0..100 {
                let mut draft = delivery.begin().await.unwrap();
                draft
                    .write(format!("Subject: {i}\r\n\r\nhello\r\n").as_bytes())
                    .await
                    .unwrap();
                let envelope = tk::envelope("a@example.com", &["b@example.org"]);
                let reply = delivery.finish(draft, 0, &envelope).await;
                if reply.code == 250 {
                    return;
                }
                assert_eq!(reply.code / 100, 4, "{reply}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("message {i} never went");
        }
    };
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..total {
        clients.spawn(submit(i));
        if delivery_mode == DeliveryMode::Queue {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while upstream.arrivals.lock().unwrap().len() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "not all delivered in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let mut arrivals = upstream.arrivals.lock().unwrap().clone();
    arrivals.sort_unstable();
    eprintln!(
        "{delivery_mode:?} arrivals (ms): {:?}",
        arrivals
            .iter()
            .map(|t| t.duration_since(arrivals[0]).as_millis())
            .collect::<Vec<_>>()
    );
    arrivals
        .iter()
        .map(|&t| {
            arrivals
                .iter()
                .filter(|&&u| u >= t && u < t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Issue 16 item 10: providers count arrivals, so no window at the upstream may hold more
/// than the rate, whatever the delivery time; a send counts from when its transaction
/// ended. The local backend, then Redis, in queue and relay mode.
#[tokio::test]
async fn no_second_at_the_upstream_holds_more_than_the_rate_local_backend() {
    use mailgate::config::{DeliveryMode, StateBackend};
    for mode in [DeliveryMode::Queue, DeliveryMode::Relay] {
        let busiest = busiest_second_at_the_upstream(StateBackend::Local, mode).await;
        assert!(
            busiest <= 5,
            "{mode:?}: {busiest} arrivals within one second"
        );
    }
}

#[tokio::test]
async fn no_second_at_the_upstream_holds_more_than_the_rate_redis_backend() {
    use mailgate::config::{DeliveryMode, StateBackend};
    let server = RedisServer::start();
    for (mode, prefix) in [
        (DeliveryMode::Queue, "r10q:"),
        (DeliveryMode::Relay, "r10r:"),
    ] {
        let state = StateBackend::Redis(server.settings(prefix));
        let busiest = busiest_second_at_the_upstream(state, mode).await;
        assert!(
            busiest <= 5,
            "{mode:?}: {busiest} arrivals within one second"
        );
    }
}
