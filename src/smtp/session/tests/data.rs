//! DATA and BDAT: what arrives, and what is refused at the end of a message.

use super::*;

#[tokio::test]
async fn exact_bytes_arrive_unstuffed() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\n..leading dot\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: alice@example.com\r\n\r\n.leading dot\r\n".to_vec()]
    );
}

#[tokio::test]
async fn message_over_the_limit_is_refused_after_streaming() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    let big = format!("{MESSAGE}{}\r\n.\r\n", "x".repeat(3000));
    c.send(&big).await;
    assert_code(&c.reply().await, "552 5.3.4");
    assert!(h.delivered().is_empty());
    // The session goes on: the transaction is reset, the next message gets through.
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn header_from_not_allowed_is_refused_after_data() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: ceo@elsewhere.test\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "550 5.7.1");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn bare_lf_rejected_when_configured() {
    let h = Harness::new(r#"bare_lf = "reject""#);
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\nline\nother\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "550 5.6.11");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn bare_lf_normalized_by_default() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    c.send("From: alice@example.com\r\n\r\nline\nother\rend\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: alice@example.com\r\n\r\nline\r\nother\r\nend\r\n".to_vec()]
    );
}

/// SEC Consult's SMTP smuggling: a fake end of data with a second message behind it.
#[tokio::test]
async fn smuggled_message_stays_inside_the_first() {
    let payloads: &[&str] = &[
        "\n.\n",
        "\n.\r\n",
        "\r.\r",
        "\r\n.\n",
        "\r\n.\r",
        "\r.\r\n",
        "\r\n.\r\r\n",
    ];
    for reject in [false, true] {
        for payload in payloads {
            let h = Harness::new(if reject { r#"bare_lf = "reject""# } else { "" });
            let mut c = h.connect().await;
            open_data(&mut c, "alice@example.com", "bob@example.org").await;
            let hidden = "MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\
                From: ceo@example.com\r\n\r\nsmuggled\r\n";
            c.send(&format!(
                "From: alice@example.com\r\n\r\nfirst{payload}{hidden}.\r\nNOOP\r\n"
            ))
            .await;
            let reply = c.reply().await;
            // Exactly one message, then the NOOP: the hidden commands were never run.
            assert_code(&c.reply().await, "250 2.0.0 OK");
            let delivered = h.delivered();
            if reject {
                assert_code(&reply, "550 5.6.11");
                assert!(delivered.is_empty());
            } else {
                assert_code(&reply, "250");
                assert_eq!(delivered.len(), 1, "payload {payload:?}");
                let body = String::from_utf8(delivered[0].clone()).unwrap();
                assert!(
                    body.contains("\r\nMAIL FROM:<ceo@example.com>\r\n"),
                    "{body:?}"
                );
                assert!(
                    !body.replace("\r\n", "").contains(['\r', '\n']),
                    "normalized: {body:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    let (a, b) = MESSAGE.split_at(30);
    c.send(&format!("BDAT {}\r\n{a}", a.len())).await;
    assert_code(&c.reply().await, "250 2.0.0");
    // A CRLF split across chunks, a dot line kept as it is, a bare LF normalized.
    c.send(&format!("BDAT {}\r\n{b}.\r", b.len() + 2)).await;
    assert_code(&c.reply().await, "250 2.0.0");
    c.send("BDAT 6 LAST\r\n\nx\ny\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [format!("{MESSAGE}.\r\nx\r\ny\r\n").into_bytes()]
    );
    // The transaction is over.
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
}

#[tokio::test]
async fn bdat_out_of_order_skips_its_chunk() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.send("BDAT 12\r\nQUIT\r\nQUIT\r\n").await;
    assert_code(&c.reply().await, "503 5.5.1");
    assert_code(&c.cmd("NOOP").await, "250");
}

#[tokio::test]
async fn bdat_and_data_do_not_mix() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    c.send("BDAT 4\r\nab\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
}

#[tokio::test]
async fn bdat_over_the_limit() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    let chunk = "y".repeat(1500);
    c.send(&format!("BDAT 1500\r\n{chunk}BDAT 1500 LAST\r\n{chunk}"))
        .await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.reply().await, "552 5.3.4");
    assert!(h.delivered().is_empty());
    assert_code(&c.cmd("NOOP").await, "250");
}

/// A harness whose messages may be large (the default test limit is 2000 bytes).
fn roomy(server_extra: &str) -> Harness {
    Harness::with(server_extra, |mut config| {
        config.server.max_message_size = 4_000_000;
        config
    })
}

/// `lines` filler header lines of about 80 bytes each.
fn filler(lines: usize) -> String {
    (0..lines)
        .map(|i| format!("X-Filler-{i:05}: {}\r\n", "f".repeat(60)))
        .collect()
}

#[tokio::test]
async fn from_after_64_kib_of_headers_is_still_checked() {
    let h = roomy("");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    let headers = format!(
        "From: alice@example.com\r\n{}From: ceo@elsewhere.test\r\n",
        filler(1000)
    );
    assert!(headers.len() > 70 * 1024);
    c.send(&format!("{headers}\r\nbody\r\n.\r\n")).await;
    assert_code(&c.reply().await, "550 5.7.1");
    // A Sender: there is checked the same way.
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    assert_code(&c.cmd("DATA").await, "354");
    let headers = format!(
        "From: alice@example.com\r\n{}Sender: ceo@elsewhere.test\r\n",
        filler(1000)
    );
    c.send(&format!("{headers}\r\nbody\r\n.\r\n")).await;
    assert_code(&c.reply().await, "550 5.7.1");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn precedence_bulk_after_64_kib_of_headers_counts() {
    let h = Harness::with("", |mut config| {
        config.server.max_message_size = 4_000_000;
        // A mailbox channel with no bulk channel: bulk mail is refused.
        let id = config.channel_id("outbox").unwrap();
        config.channels[id].address_scoped = true;
        config
    });
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    let headers = format!(
        "From: alice@example.com\r\n{}Precedence: bulk\r\n",
        filler(1000)
    );
    c.send(&format!("{headers}\r\nbody\r\n.\r\n")).await;
    assert_code(&c.reply().await, "550 5.7.1");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn header_section_over_max_header_size_is_refused() {
    let h = roomy("max_header_size = 4096");
    let mut c = h.connect().await;
    open_data(&mut c, "alice@example.com", "bob@example.org").await;
    // 60 filler lines: about 4.8 KB of headers, with a small body.
    c.send(&format!(
        "From: alice@example.com\r\n{}\r\nbody\r\n.\r\n",
        filler(60)
    ))
    .await;
    let reply = c.reply().await;
    assert_code(&reply, "552 5.3.4");
    assert!(
        reply.contains("header section exceeds 4096 bytes"),
        "{reply}"
    );
    // Without an empty line the whole message is the header section.
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("From: alice@example.com\r\n{}.\r\n", filler(60)))
        .await;
    assert_code(&c.reply().await, "552 5.3.4");
    // Just under the limit, with a body larger than it, goes through.
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    assert_code(&c.cmd("DATA").await, "354");
    let headers = format!("From: alice@example.com\r\n{}", filler(40));
    assert!(headers.len() < 4096);
    c.send(&format!("{headers}\r\n{}\r\n.\r\n", "b".repeat(10_000)))
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn bdat_header_section_over_max_header_size_is_refused() {
    let h = roomy("max_header_size = 4096");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    c.cmd("RCPT TO:<bob@example.org>").await;
    let message = format!("From: alice@example.com\r\n{}\r\nbody\r\n", filler(60));
    let (a, b) = message.split_at(3000);
    c.send(&format!("BDAT {}\r\n{a}", a.len())).await;
    assert_code(&c.reply().await, "250 2.0.0");
    c.send(&format!("BDAT {} LAST\r\n{b}", b.len())).await;
    assert_code(&c.reply().await, "552 5.3.4");
    assert!(h.delivered().is_empty());
}

#[tokio::test]
async fn authenticated_user_header_from_must_be_one_of_its_senders() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235 2.7.0",
    );
    // The channel takes *@example.com, but the user only app@example.com.
    for (headers, code) in [
        ("From: ceo@example.com\r\n", "550 5.7.1"),
        (
            "From: app@example.com\r\nSender: ceo@example.com\r\n",
            "550 5.7.1",
        ),
        ("From: App <APP@example.com>\r\n", "250"),
    ] {
        c.cmd("MAIL FROM:<app@example.com>").await;
        c.cmd("RCPT TO:<bob@example.org>").await;
        assert_code(&c.cmd("DATA").await, "354");
        c.send(&format!("{headers}Subject: x\r\n\r\nbody\r\n.\r\n"))
            .await;
        assert_code(&c.reply().await, code);
    }
    assert_eq!(h.delivered().len(), 1);
}

/// Files under the spool's `queue/` folder (what queue mode would send later).
fn queued(h: &Harness) -> usize {
    std::fs::read_dir(h.dir.path().join("spool").join("queue"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn header_sections_readers_disagree_on_are_refused_on_every_channel() {
    // SPEC §4 last paragraph: whatever check_header_from says, in relay and queue mode,
    // on a file channel and a graph one, before anything is written or sent.
    let cases = [
        (
            "To: eve@evil.org:;\r\n",
            "To: group name holds an address (eve@evil.org)",
        ),
        (
            "To: eve@evil.org <bob@example.org>\r\n",
            "To: display name holds another address (eve@evil.org)",
        ),
        (
            "To: eve@evil.org: bob@example.org;\r\n",
            "To: group name holds an address (eve@evil.org)",
        ),
        (
            "To: bob@example.org\r\nX-Broken\r\n \r\nCc: eve@evil.org\r\n",
            "header line 3 is neither a header field nor a continuation line",
        ),
        (
            "To: bob@example.org\r\nCc: =?utf-8?q?eve=40evil.org?= <bob@example.org>\r\n",
            "Cc: display name holds another address (eve@evil.org)",
        ),
    ];
    for (mode, graph) in [
        (crate::config::DeliveryMode::Relay, false),
        (crate::config::DeliveryMode::Queue, false),
        (crate::config::DeliveryMode::Queue, true),
    ] {
        let h = Harness::with("check_header_from = false", |mut config| {
            config.server.delivery = mode;
            if graph {
                let partner = config.channel_id("partner").unwrap();
                config.channels[partner].kind = super::mail::partner_graph();
            }
            config
        });
        let sender = if graph {
            "x@partner.test"
        } else {
            "alice@example.com"
        };
        let mut c = h.connect().await;
        for (headers, why) in cases {
            open_data(&mut c, sender, "bob@example.org").await;
            c.send(&format!(
                "From: {sender}\r\n{headers}Subject: x\r\n\r\nbody\r\n.\r\n"
            ))
            .await;
            let reply = c.reply().await;
            assert_code(&reply, "550 5.7.1");
            assert!(reply.contains(why), "{mode:?} {headers:?}: {reply}");
        }
        // The From: a mail program shows is not the address the channel allows.
        open_data(&mut c, sender, "bob@example.org").await;
        c.send(&format!(
            "From: ceo@othercorp.com <{sender}>\r\nTo: bob@example.org\r\n\r\nbody\r\n.\r\n"
        ))
        .await;
        let reply = c.reply().await;
        assert_code(&reply, "550 5.7.1");
        assert!(reply.contains("From: display name holds another address (ceo@othercorp.com)"));
        assert!(h.delivered().is_empty());
        assert_eq!(queued(&h), 0, "{mode:?}");
        // The entry's own address in its display name is unambiguous.
        open_data(&mut c, sender, "bob@example.org").await;
        c.send(&format!(
            "From: {sender} <{sender}>\r\nTo: bob@example.org\r\n\r\nbody\r\n.\r\n"
        ))
        .await;
        assert_code(&c.reply().await, "250");
    }
}
