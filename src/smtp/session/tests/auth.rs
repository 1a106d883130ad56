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
