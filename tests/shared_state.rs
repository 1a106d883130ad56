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
