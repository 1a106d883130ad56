//! The read/write loop: long lines, pipelining, timeouts and shutdown.

use super::*;

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
