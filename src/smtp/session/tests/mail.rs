//! MAIL and RCPT: the envelope, its checks and refusals (SPEC §5 table).

use super::*;

/// A graph channel sending as partner's mailbox; its token is never fetched here.
pub(super) fn partner_graph() -> crate::config::ChannelKind {
    crate::config::ChannelKind::Graph(crate::config::GraphTarget {
        mailbox: "x@partner.test".into(),
        oauth: crate::config::oauth::placeholder_for_tests(),
    })
}

#[tokio::test]
async fn legacy_syntax_is_accepted() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("ehlo client.test").await, "250");
    assert_code(&c.cmd("mail from: <alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("rcpt to:bob@example.org").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO: carol@example.org  ").await, "250 2.1.5");
    assert_code(&c.cmd("rset").await, "250");
    assert_code(
        &c.cmd("MAIL FROM:alice@example.com SIZE=100").await,
        "250 2.1.0",
    );
    assert_code(&c.cmd("Rcpt To: <bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("data").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn sender_without_channel_is_refused() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("MAIL FROM:<x@elsewhere.test>").await, "550 5.7.1");
    assert_code(&c.cmd("MAIL FROM:<x@partner.test>").await, "250 2.1.0");
}

#[tokio::test]
async fn require_auth_refuses_mail_until_authenticated() {
    let h = Harness::with("", |config| {
        let mut config = with_user(config);
        config.server.require_auth = true;
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("MAIL FROM:<app@example.com>").await, "530 5.7.0");
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235 2.7.0",
    );
    assert_code(&c.cmd("MAIL FROM:<app@example.com>").await, "250 2.1.0");
}

#[tokio::test]
async fn authenticated_user_may_only_use_own_senders() {
    let h = Harness::with("", with_user);
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(&format!("AUTH PLAIN {}", STANDARD.encode("\0app\0pw")))
            .await,
        "235 2.7.0",
    );
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "550 5.7.1");
    assert_code(&c.cmd("MAIL FROM:<app@example.com>").await, "250 2.1.0");
}

#[tokio::test]
async fn size_parameter_over_the_limit() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> SIZE=2001").await,
        "552 5.3.4",
    );
    // Too long for 64 bits: smtp-proto alone would read this as a small size.
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> SIZE=99999999999999999999999")
            .await,
        "552 5.3.4",
    );
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> SIZE=2000").await,
        "250 2.1.0",
    );
}

#[tokio::test]
async fn too_many_recipients() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    for n in 0..3 {
        assert_code(
            &c.cmd(&format!("RCPT TO:<r{n}@example.org>")).await,
            "250 2.1.5",
        );
    }
    // Not counted against the error budget: a client may send the rest later.
    for n in 3..20 {
        assert_code(
            &c.cmd(&format!("RCPT TO:<r{n}@example.org>")).await,
            "452 4.5.3",
        );
    }
    assert_code(&c.cmd("DATA").await, "354");
}

#[tokio::test]
async fn relay_channel_recipient_limit_applies() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<x@partner.test>").await;
    assert_code(&c.cmd("RCPT TO:<a@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<b@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<c@example.org>").await, "452 4.5.3");
}

#[tokio::test]
async fn queue_mode_takes_no_more_recipients_than_one_graph_request() {
    // Graph never splits a message: in queue mode too, the recipient beyond the graph
    // channel's limit is refused at RCPT, where a client sends it in another transaction,
    // not with a 452 after DATA that it would retry unchanged forever.
    let h = Harness::with("", |mut config| {
        config.server.delivery = crate::config::DeliveryMode::Queue;
        config.server.max_recipients = 10;
        let partner = config.channel_id("partner").unwrap();
        config.channels[partner].kind = partner_graph();
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<x@partner.test>").await;
    assert_code(&c.cmd("RCPT TO:<a@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<b@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<c@example.org>").await, "452 4.5.3");
    // Other channels keep the server's limit in queue mode.
    c.cmd("RSET").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    for n in 0..5 {
        assert_code(
            &c.cmd(&format!("RCPT TO:<r{n}@example.org>")).await,
            "250 2.1.5",
        );
    }
}

#[tokio::test]
async fn relay_mode_takes_no_more_recipients_than_a_graph_fallback_can() {
    // partner's own limit is lifted; its fallback, a graph channel, takes 2 per request.
    let h = Harness::with("", |mut config| {
        config.server.max_recipients = 10;
        let partner = config.channel_id("partner").unwrap();
        let mut graph = config.channels[partner].clone();
        graph.name = "partner-graph".into();
        graph.kind = partner_graph();
        config.channels[partner].limits.max_recipients = None;
        config.channels.push(graph);
        config.channels[partner].fallback = Some(config.channels.len() - 1);
        config.channels_changed();
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<x@partner.test>").await;
    assert_code(&c.cmd("RCPT TO:<a@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<b@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<c@example.org>").await, "452 4.5.3");
}

/// Issue 16 item 7: a graph channel sends the whole envelope at once and never splits
/// it, so a message with more recipients than its `recipients_per_day` could never go:
/// the recipient beyond is refused at RCPT (SPEC §7 "Large messages over Graph").
#[tokio::test]
async fn rcpt_beyond_a_graph_channels_recipients_per_day_is_452() {
    for mode in [
        crate::config::DeliveryMode::Queue,
        crate::config::DeliveryMode::Relay,
    ] {
        let h = Harness::with("", |mut config| {
            config.server.delivery = mode;
            config.server.max_recipients = 10;
            let partner = config.channel_id("partner").unwrap();
            config.channels[partner].kind = partner_graph();
            config.channels[partner].limits.max_recipients = None;
            config.channels[partner].limits.recipients_per_day = Some(3);
            config
        });
        let mut c = h.connect().await;
        c.cmd("EHLO a").await;
        c.cmd("MAIL FROM:<x@partner.test>").await;
        for n in 0..3 {
            assert_code(
                &c.cmd(&format!("RCPT TO:<r{n}@example.org>")).await,
                "250 2.1.5",
            );
        }
        let refused = c.cmd("RCPT TO:<r3@example.org>").await;
        assert_code(&refused, "452 4.5.3");
        assert!(refused.contains("at most 3"), "{mode:?}: {refused}");
    }
}

/// The same through a graph fallback: mail of an SMTP channel may go over it whole.
#[tokio::test]
async fn rcpt_beyond_a_graph_fallbacks_recipients_per_day_is_452() {
    for mode in [
        crate::config::DeliveryMode::Queue,
        crate::config::DeliveryMode::Relay,
    ] {
        let h = Harness::with("", |mut config| {
            config.server.delivery = mode;
            config.server.max_recipients = 10;
            let partner = config.channel_id("partner").unwrap();
            let mut graph = config.channels[partner].clone();
            graph.name = "partner-graph".into();
            graph.kind = partner_graph();
            graph.limits.max_recipients = None;
            graph.limits.recipients_per_day = Some(1);
            config.channels[partner].limits.max_recipients = None;
            config.channels.push(graph);
            config.channels[partner].fallback = Some(config.channels.len() - 1);
            config
        });
        let mut c = h.connect().await;
        c.cmd("EHLO a").await;
        c.cmd("MAIL FROM:<x@partner.test>").await;
        assert_code(&c.cmd("RCPT TO:<a@example.org>").await, "250 2.1.5");
        assert_code(&c.cmd("RCPT TO:<b@example.org>").await, "452 4.5.3");
    }
}

/// Relay mode never splits a message on any channel: beyond a day's quota it could never
/// go, and a 451 after DATA would have the client retry it for ever.
#[tokio::test]
async fn relay_mode_rcpt_beyond_the_channels_recipients_per_day_is_452() {
    let h = Harness::with("", |mut config| {
        config.server.max_recipients = 10;
        let partner = config.channel_id("partner").unwrap();
        config.channels[partner].limits.max_recipients = None;
        config.channels[partner].limits.recipients_per_day = Some(2);
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<x@partner.test>").await;
    assert_code(&c.cmd("RCPT TO:<a@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<b@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<c@example.org>").await, "452 4.5.3");
}

#[tokio::test]
async fn unknown_bad_parameters_and_bad_order() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    assert_code(&c.cmd("FROBNICATE").await, "500 5.5.2");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "503 5.5.1");
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<not an address>").await, "501 5.5.4");
    assert_code(
        &c.cmd("MAIL FROM:<alice@example.com> FROB=1").await,
        "501 5.5.4",
    );
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "503 5.5.1");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("RCPT TO:<>").await, "501 5.5.4");
}

#[tokio::test]
async fn tenth_error_closes_the_session() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    for _ in 0..9 {
        assert_code(&c.cmd("BOGUS").await, "500 5.5.2");
    }
    assert_code(&c.cmd("NOOP").await, "250");
    c.send("BOGUS\r\n").await;
    assert_code(&c.reply().await, "500 5.5.2");
    assert_code(&c.reply().await, "421 4.7.0");
    c.assert_closed().await;
}

#[tokio::test]
async fn postmaster_without_domain_is_a_recipient() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<alice@example.com>").await;
    assert_code(&c.cmd("RCPT TO:<Postmaster>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<postMASTER>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<webmaster>").await, "501 5.5.4");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn quoted_local_parts_reach_the_upstream_as_the_client_wrote_them() {
    // smtp-proto reads `"john doe"@…` as `john doe@…`, another (invalid) mailbox, and
    // `"eve@x.org,bob"@…` as a list: the path is read again and sent quoted.
    let (port, record) =
        crate::testkit::fake_smtp::start(crate::testkit::fake_smtp::plain_fake()).await;
    let h = Harness::with("", |mut config| {
        let partner = config.channel_id("partner").unwrap();
        let crate::config::ChannelKind::Smtp(target) = &mut config.channels[partner].kind else {
            panic!("partner is an SMTP channel");
        };
        target.port = port;
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(r#"MAIL FROM:<"x y"@partner.test>"#).await,
        "250 2.1.0",
    );
    for rcpt in [
        r#"RCPT TO:<"john doe"@example.org>"#,
        r#"RCPT TO:<"eve@x.org,bob"@example.org>"#,
    ] {
        assert_code(&c.cmd(rcpt).await, "250 2.1.5");
    }
    assert_code(&c.cmd("DATA").await, "354");
    c.send("From: z@partner.test\r\nSubject: q\r\n\r\nhi\r\n.\r\n")
        .await;
    assert_code(&c.reply().await, "250");
    let txns = record.txns();
    assert_eq!(txns.len(), 1);
    assert!(
        txns[0]
            .mail
            .starts_with(r#"MAIL FROM:<"x y"@partner.test>"#),
        "{}",
        txns[0].mail
    );
    assert_eq!(
        txns[0].rcpts,
        [
            r#""john doe"@example.org"#,
            r#""eve@x.org,bob"@example.org"#
        ]
    );
}

#[tokio::test]
async fn a_needlessly_quoted_sender_is_the_same_mailbox_for_routing() {
    // `"alice"@example.com` is alice@example.com (RFC 5321 §4.1.2): routed by the
    // `*@example.com` scope, and written unquoted.
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(r#"MAIL FROM:<"alice"@example.com>"#).await,
        "250 2.1.0",
    );
    // The domain is the one after the last `@`: a quoted `@` names no other domain.
    c.cmd("RSET").await;
    assert_code(
        &c.cmd(r#"MAIL FROM:<"alice@example.com"@evil.test>"#).await,
        "550 5.7.1",
    );
}

#[tokio::test]
async fn a_quoted_local_part_cannot_smuggle_brackets_or_line_breaks() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(
        &c.cmd(r#"MAIL FROM:<"a>b"@example.com>"#).await,
        "553 5.1.7",
    );
    c.cmd("MAIL FROM:<alice@example.com>").await;
    assert_code(
        &c.cmd(r#"RCPT TO:<"bob@x.org> NOTIFY=NEVER"@example.org>"#)
            .await,
        "553 5.1.3",
    );
    assert_code(&c.cmd("RCPT TO:<\"a\tb\"@example.org>").await, "501 5.5.4");
    assert_code(&c.cmd(r#"RCPT TO:<"a"b"@example.org>"#).await, "501 5.5.4");
    assert_code(
        &c.cmd(r#"RCPT TO:<a"b c"d@example.org>"#).await,
        "501 5.5.4",
    );
    assert_code(&c.cmd("DATA").await, "503");
}

#[tokio::test]
async fn a_quoted_recipient_is_refused_at_rcpt_when_graph_may_carry_the_message() {
    let h = Harness::with("", |mut config| {
        let partner = config.channel_id("partner").unwrap();
        config.channels[partner].kind = partner_graph();
        config
    });
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    c.cmd("MAIL FROM:<x@partner.test>").await;
    let reply = c.cmd(r#"RCPT TO:<"eve@evil.org,bob"@example.org>"#).await;
    assert_code(&reply, "553 5.1.3");
    assert!(reply.contains("partner"), "{reply}");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
}
