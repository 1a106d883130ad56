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

/// Sends one byte every `every` until the server stops taking them or `limit` passes;
/// returns how long the server kept taking them.
async fn dribble(c: &mut Client, every: Duration, limit: Duration) -> Duration {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if c.write.write_all(b"x").await.is_err() || c.write.flush().await.is_err() {
            break;
        }
        tokio::time::sleep(every).await;
        // The server has answered (and closed): stop.
        if !c.read.buffer().is_empty()
            || tokio::time::timeout(Duration::from_millis(1), c.read.fill_buf())
                .await
                .is_ok()
        {
            break;
        }
    }
    start.elapsed()
}

fn with_idle(idle: Duration, server_extra: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), server_extra);
    config.server.idle_timeout = idle;
    Harness::from_config(dir, config, None)
}

#[tokio::test]
async fn a_message_dribbled_in_is_cut_off_at_the_minimum_rate() {
    // Before: every byte restarted the idle timer, so this session never ended.
    let h = with_idle(Duration::from_secs(2), "");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    let took = dribble(&mut c, Duration::from_millis(400), Duration::from_secs(8)).await;
    assert!(
        took < Duration::from_secs(5),
        "still reading after {took:?}"
    );
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Message data too slow, closing connection"
    );
    c.assert_closed().await;
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn a_command_line_dribbled_in_gets_no_more_than_idle_timeout() {
    let h = with_idle(Duration::from_secs(1), "");
    let mut c = h.connect().await;
    c.send("NOOP ").await;
    let took = dribble(&mut c, Duration::from_millis(200), Duration::from_secs(6)).await;
    assert!(
        took < Duration::from_secs(3),
        "still reading after {took:?}"
    );
    assert_code(&c.reply().await, "421 4.4.2");
    c.assert_closed().await;
}

#[tokio::test]
async fn a_fast_enough_message_may_take_longer_than_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), "");
    config.server.idle_timeout = Duration::from_millis(600);
    config.server.max_message_size = 100_000;
    let h = Harness::from_config(dir, config, None);
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\n").await;
    // 1,000 bytes each 0.3 s: over MIN_DATA_RATE, for longer than idle_timeout.
    for _ in 0..5 {
        c.send(&format!("{}\r\n", "y".repeat(998))).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.send(".\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn shutdown_lets_an_open_transaction_finish_then_says_421() {
    // Before: MAIL and RCPT given, the shutdown answered the next command with 421.
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("EHLO a").await, "250");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    h.ctx.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_code(&c.cmd("DATA").await, "354");
    c.send(MESSAGE).await;
    assert_code(&c.cmd(".").await, "250");
    assert_code(&c.reply().await, "421 4.3.0");
    c.assert_closed().await;
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn shutdown_grace_ends_an_open_transaction() {
    let h = Harness::new("shutdown_grace = \"1s\"");
    let mut c = h.connect().await;
    assert_code(&c.cmd("EHLO a").await, "250");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    h.ctx.shutdown.cancel();
    let start = std::time::Instant::now();
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send("From: alice@example.com\r\n\r\nand then nothing")
        .await;
    assert_code(&c.reply().await, "421 4.3.0");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    c.assert_closed().await;
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn shutdown_does_not_run_commands_pipelined_after_the_transaction() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("EHLO a").await, "250");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    h.ctx.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send("RSET\r\nMAIL FROM:<alice@example.com>\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.reply().await, "421 4.3.0");
    c.assert_closed().await;
}
