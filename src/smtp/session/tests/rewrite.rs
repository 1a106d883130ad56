//! `[[rewrite]]` (SPEC §4a): the envelope sender replaced at MAIL FROM, the `From:`
//! replaced in the copy stored, every other byte as the client sent it.

use super::*;
use crate::config::{HeaderFrom, RewriteRule};

fn printer_rule(header_from: HeaderFrom, networks: &[&str]) -> RewriteRule {
    RewriteRule {
        pattern: SenderPattern::AnyAtDomain("printer.local".into()),
        sender: "scans@example.com".into(),
        header_from,
        networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
        user: None,
        line: Some(1),
    }
}

fn harness(rules: Vec<RewriteRule>) -> Harness {
    Harness::with("", move |mut config| {
        config.rewrites = rules;
        config.server.max_message_size = 400_000;
        config
    })
}

/// The `.envelope` files the file channel wrote.
fn envelopes(h: &Harness) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(h.outbox())
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "envelope"))
                .map(|p| std::fs::read_to_string(p).unwrap())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

const DEVICE: &str = "Subject: Scan 0042\r\nTo: bob@example.org\r\nX-Folded: a\r\n\tb\r\nMIME-Version: 1.0\r\n\r\n..stuffed line\r\nbody é \t\r\nFrom: in the body\r\n";

#[tokio::test]
async fn a_device_without_from_reaches_the_channel_as_the_mailbox() {
    let h = harness(vec![printer_rule(HeaderFrom::Replace, &[])]);
    let mut c = h.connect().await;
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    c.send(&format!("{DEVICE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    let want = DEVICE
        .replace(
            "MIME-Version: 1.0\r\n\r\n",
            "MIME-Version: 1.0\r\nFrom: scanner <scans@example.com>\r\n\r\n",
        )
        .replace("..stuffed", ".stuffed");
    assert_eq!(h.delivered(), [want.into_bytes()]);
    assert_eq!(
        envelopes(&h),
        ["sender <scans@example.com>\nrecipient <bob@example.org>\n"]
    );
}

#[tokio::test]
async fn replace_drops_every_sender_and_the_header_check_reads_the_rewritten_copy() {
    let h = harness(vec![printer_rule(HeaderFrom::Replace, &[])]);
    let mut c = h.connect().await;
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    c.send("From: scan@x.com <scan@x.com>\r\nSender: scanner@printer.local\r\nSubject: s\r\nSENDER: other@printer.local\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: scan <scans@example.com>\r\nSubject: s\r\n\r\nbody\r\n".to_vec()]
    );
}

#[tokio::test]
async fn replace_makes_an_ambiguous_device_from_unambiguous_but_not_an_ambiguous_to() {
    // The ambiguity check (SPEC §4) reads the copy that is sent: the device's From, whose
    // display name holds another address, is gone from it; a To that readers disagree on
    // is still there, and refused.
    let h = harness(vec![printer_rule(HeaderFrom::Replace, &[])]);
    let mut c = h.connect().await;
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    c.send("From: ceo@other.com <scanner@printer.local>\r\nTo: bob@example.org\r\n\r\nx\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: scanner <scans@example.com>\r\nTo: bob@example.org\r\n\r\nx\r\n".to_vec()]
    );
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    c.send("To: eve@evil.org <bob@example.org>\r\n\r\nx\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "550 5.7.1");
    assert_eq!(h.delivered().len(), 1, "nothing more delivered");
}

#[tokio::test]
async fn keep_leaves_the_headers_and_the_header_check_refuses_them() {
    let h = harness(vec![printer_rule(HeaderFrom::Keep, &[])]);
    let mut c = h.connect().await;
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    c.send("From: scanner@printer.local\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "550 5.7.1");
    assert!(h.delivered().is_empty());
    // A From the channel may use goes through untouched.
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "250 2.1.0",
    );
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send("From: Scans <scans@example.com>\r\nSender: scanner@printer.local\r\n\r\nbody\r\n.\r\n")
        .await;
    // Sender: stays, and the header check refuses its address too.
    assert_code(&c.reply().await, "550 5.7.1");
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "250 2.1.0",
    );
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send("From: Scans <scans@example.com>\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"From: Scans <scans@example.com>\r\n\r\nbody\r\n".to_vec()]
    );
}

#[tokio::test]
async fn a_client_outside_the_entrys_networks_is_not_rewritten() {
    let h = harness(vec![printer_rule(HeaderFrom::Replace, &["127.0.0.1/32"])]);
    let mut c = h.connect_from("127.0.0.2:40000", false).await;
    c.cmd("EHLO a").await;
    // Not rewritten: no channel takes printer.local.
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "550 5.7.1",
    );
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "250 2.1.0",
    );
}

#[tokio::test]
async fn the_null_sender_is_not_rewritten() {
    let mut rule = printer_rule(HeaderFrom::Replace, &[]);
    rule.pattern = SenderPattern::Any;
    let h = harness(vec![rule]);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    // `<>` routes only to a catch-all, which this config lacks.
    assert_code(&c.cmd("MAIL FROM:<>").await, "550 5.7.1");
    assert_code(&c.cmd("MAIL FROM:<x@anything.test>").await, "250 2.1.0");
}

#[tokio::test]
async fn the_users_check_sees_the_new_sender() {
    let mut rule = printer_rule(HeaderFrom::Replace, &[]);
    rule.sender = "app@example.com".into();
    rule.user = Some("app".into());
    let h = Harness::with("", |config| {
        let mut config = with_user(config);
        config.rewrites = vec![rule];
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    // Not authenticated: the entry does not apply, and nothing takes printer.local.
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "550 5.7.1",
    );
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235 2.7.0",
    );
    // app may not use scanner@printer.local, but may use what it becomes.
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "250 2.1.0",
    );
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send("Subject: s\r\n\r\nbody\r\n.\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"Subject: s\r\nFrom: scanner <app@example.com>\r\n\r\nbody\r\n".to_vec()]
    );
}

#[tokio::test]
async fn bdat_chunks_splitting_the_header_section_and_a_large_body() {
    let h = harness(vec![printer_rule(HeaderFrom::Replace, &[])]);
    let mut c = h.connect().await;
    assert_code(&c.cmd("EHLO a").await, "250");
    assert_code(
        &c.cmd("MAIL FROM:<scanner@printer.local>").await,
        "250 2.1.0",
    );
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    // Headers cut mid-line and mid-CRLF CRLF; a body past the in-memory draft size.
    let body = "0123456789abcdef\r\n".repeat(6000);
    let message = format!("From: Copier\r\n <copier@printer.local>\r\nSubject: big\r\n\r\n{body}");
    let parts = [
        &message[..9],
        &message[9..50],
        &message[50..51],
        &message[51..],
    ];
    for (i, part) in parts.iter().enumerate() {
        let last = if i == parts.len() - 1 { " LAST" } else { "" };
        c.send(&format!("BDAT {}{last}\r\n{part}", part.len()))
            .await;
        assert_code(&c.reply().await, "250");
    }
    let want = format!("From: Copier <scans@example.com>\r\nSubject: big\r\n\r\n{body}");
    assert_eq!(h.delivered(), [want.into_bytes()]);
}

#[tokio::test]
async fn a_message_that_is_all_header_gets_its_from_too() {
    let h = harness(vec![printer_rule(HeaderFrom::Replace, &[])]);
    let mut c = h.connect().await;
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    c.send("Subject: no body\r\n.\r\n").await;
    assert_code(&c.reply().await, "250");
    assert_eq!(
        h.delivered(),
        [b"Subject: no body\r\nFrom: scanner <scans@example.com>\r\n".to_vec()]
    );
}

#[tokio::test]
async fn a_header_section_over_the_limit_is_refused_and_nothing_stored() {
    let h = Harness::with("", |mut config| {
        config.rewrites = vec![printer_rule(HeaderFrom::Replace, &[])];
        config.server.max_message_size = 400_000;
        config.server.max_header_size = 1000;
        config
    });
    let mut c = h.connect().await;
    open_data(&mut c, "scanner@printer.local", "bob@example.org").await;
    let long = format!("X-Long: {}\r\n", "y".repeat(2000));
    c.send(&format!("{long}\r\nbody\r\n.\r\n")).await;
    assert_code(&c.reply().await, "552 5.3.4");
    assert!(h.delivered().is_empty());
}
