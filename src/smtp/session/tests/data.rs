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
