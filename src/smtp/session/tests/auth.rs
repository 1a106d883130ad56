//! AUTH: the exchanges and their refusals.

use super::*;

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

/// A wrong password for `app` with AUTH PLAIN.
fn wrong() -> String {
    format!("AUTH PLAIN {}", STANDARD.encode("\0app\0wrong"))
}

#[tokio::test]
async fn each_failure_delays_its_answer_more() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    let start = std::time::Instant::now();
    assert_code(&c.cmd(&wrong()).await, "535 5.7.8");
    let first = start.elapsed();
    assert_code(&c.cmd(&wrong()).await, "535 5.7.8");
    let second = start.elapsed() - first;
    assert!(
        first >= Duration::from_millis(950),
        "first answer after {first:?}"
    );
    assert!(
        second >= Duration::from_millis(1950),
        "second answer after {second:?}"
    );
    // A success is not delayed.
    let start = std::time::Instant::now();
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235",
    );
    assert!(start.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn ten_failures_lock_the_address_out_of_auth_only() {
    let h = Harness::with("", with_user);
    let remote = "192.0.2.7:40001";
    let other = "192.0.2.8:40001";
    let mut clients = Vec::new();
    for _ in 0..MAX_FAILURES_FOR_TEST {
        let mut c = h.connect_from(remote, true).await;
        c.cmd("EHLO a").await;
        c.send(&format!("{}\r\n", wrong())).await;
        clients.push(c);
    }
    for c in &mut clients {
        assert_code(&c.reply().await, "535 5.7.8");
    }
    let mut c = h.connect_from(remote, true).await;
    c.cmd("EHLO a").await;
    let start = std::time::Instant::now();
    assert_code(&c.cmd(&wrong()).await, "454 4.7.0");
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "454 4.7.0",
    );
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "not delayed, not verified"
    );
    // The rest of the session works.
    assert_code(&c.cmd("NOOP").await, "250");
    let mut o = h.connect_from(other, true).await;
    o.cmd("EHLO a").await;
    assert_code(&o.cmd(&wrong()).await, "535 5.7.8");
    assert_code(
        &o.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235",
    );
}

const MAX_FAILURES_FOR_TEST: u32 = crate::smtp::auth::MAX_FAILURES;
