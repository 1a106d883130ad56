//! Greeting, EHLO, HELO and the one-line commands.

use super::*;

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
