//! Upstream transport tests against the in-process fake SMTP server of
//! [`crate::testkit::fake_smtp`] on 127.0.0.1:0.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::sync::atomic::AtomicBool;

use lettre::transport::smtp::response::Response;
use std::io::Write;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::body::{CHUNK, PreparedBody, Scan, Source};
use super::connect::{offers_pipelining, open_tcp};
use super::file::write_atomically;
use super::stream::{GuardedStream, HOLD, Inner};
use super::transaction::{PIPELINE_GROUP, PreparedEnvelope, upstream_response};
use super::*;
use crate::config::{ChannelKind, Secret, SmtpTarget, TlsMode};
use crate::testkit::config::{channel, config, envelope, smtp_target as smtp_channel};
use crate::testkit::fake_smtp::{Fake, Record, one_by_one_fake, plain_fake, start};
use crate::testkit::pki::{make_pki, provider};

fn upstreams(target: SmtpTarget, connections: usize) -> Upstreams {
    provider();
    let config = config(vec![channel(
        "relay",
        ChannelKind::Smtp(target),
        connections,
    )]);
    Upstreams::new(&config)
        .unwrap()
        .with_timeouts(Duration::from_secs(5), IDLE_TIMEOUT)
}

/// Writes `pem` to a file in `dir` and returns its path.
fn ca_file(dir: &tempfile::TempDir, pem: &str) -> PathBuf {
    let path = dir.path().join("ca.pem");
    fs::write(&path, pem).unwrap();
    path
}
/// What the wire carries for `message`: dot-stuffed, one CRLF at the end.
fn stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

// ---- tests ------------------------------------------------------------------

#[tokio::test]
async fn exact_bytes_arrive_dot_stuffed_once() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let message =
        b".starts with a dot\r\nSubject: dots\r\n\r\n.\r\n..\r\nmiddle . line\r\n.\r\nend\r\n";
    let out = up
        .send(
            0,
            &envelope("alice@example.com", &["bob@example.org"]),
            Body::Bytes(message),
            true,
        )
        .await;
    let reply = out.result.unwrap();
    assert_eq!((reply.code, reply.enhanced), (250, Some((2, 0, 0))));
    assert_eq!(
        reply.text,
        "Channel relay: upstream said: Ok: queued as FAKE1"
    );
    let txns = rec.txns();
    assert_eq!(txns.len(), 1);
    assert_eq!(txns[0].mail, "MAIL FROM:<alice@example.com>");
    assert_eq!(txns[0].rcpts, ["bob@example.org"]);
    assert_eq!(txns[0].wire, stuffed(message));
    assert_eq!(
        txns[0].wire,
        b"..starts with a dot\r\nSubject: dots\r\n\r\n..\r\n...\r\nmiddle . line\r\n..\r\nend\r\n"
            .to_vec()
    );
    assert!(rec.commands().contains(&"EHLO mailgate.test".to_string()));
}

#[tokio::test]
async fn body_without_final_crlf_gets_one() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let message = b"Subject: x\r\n\r\nno newline at the end";
    up.send(
        0,
        &envelope("a@example.com", &["b@example.org"]),
        Body::Bytes(message),
        true,
    )
    .await
    .result
    .unwrap();
    assert_eq!(
        rec.txns()[0].wire,
        b"Subject: x\r\n\r\nno newline at the end\r\n".to_vec()
    );
}

#[tokio::test]
async fn empty_and_one_empty_line_messages_arrive_unchanged() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    for message in [&b""[..], b"\r\n"] {
        up.send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(message),
            true,
        )
        .await
        .result
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.eml");
    std::fs::write(&path, b"").unwrap();
    up.send(
        0,
        &envelope("a@example.com", &["b@example.org"]),
        Body::File(&path),
        true,
    )
    .await
    .result
    .unwrap();
    let txns = rec.txns();
    assert_eq!(txns[0].wire, b"".to_vec());
    assert_eq!(txns[1].wire, b"\r\n".to_vec());
    assert_eq!(txns[2].wire, b"".to_vec());
}

#[tokio::test]
async fn bare_line_feed_is_never_sent() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    for body in [
        &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
        b"a\r\n.\r.\r\n",
        b"end with CR\r",
    ] {
        let out = up
            .send(
                0,
                &envelope("a@example.com", &["b@example.org"]),
                Body::Bytes(body),
                true,
            )
            .await;
        assert!(
            matches!(out.result, Err(Error::Local { .. })),
            "{body:?}: {:?}",
            out.result
        );
    }
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn hundred_recipients_arrive() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let rcpts: Vec<String> = (0..100).map(|i| format!("user{i}@example.org")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let out = up
        .send(
            0,
            &envelope("a@example.com", &refs),
            Body::Bytes(b"Subject: many\r\n\r\nhi\r\n"),
            true,
        )
        .await;
    assert!(out.result.unwrap().is_positive());
    assert_eq!(rec.txns()[0].rcpts, rcpts);
}

#[tokio::test]
async fn all_or_nothing_refusal_resets_and_reuses_the_connection() {
    // One command at a time (see the pipelined_* tests for the other way).
    let fake = Fake {
        replies: vec![("RCPT TO:<bad@", "550 5.1.1 <bad@example.org>: no such user")],
        ..one_by_one_fake()
    };
    let (port, rec) = start(fake).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let env = envelope(
        "a@example.com",
        &["good@example.org", "bad@example.org", "other@example.org"],
    );
    let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
    let Err(Error::Rejected { reply, .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert_eq!((reply.code, reply.enhanced), (550, Some((5, 1, 1))));
    assert_eq!(
        reply.text,
        "Channel relay: upstream said: <bad@example.org>: no such user"
    );
    assert!(out.refused.is_empty());
    let commands = rec.commands();
    assert!(
        !commands.iter().any(|c| c.starts_with("RCPT TO:<other@")),
        "stopped at the first refusal"
    );
    assert!(!commands.contains(&"DATA".to_string()));
    assert!(commands.contains(&"RSET".to_string()));
    assert!(rec.txns().is_empty());

    // The next message reuses the same connection (used a moment ago: no NOOP check).
    let ok = up
        .send(
            0,
            &envelope("a@example.com", &["good@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    assert!(ok.result.unwrap().is_positive());
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
    assert!(!rec.commands().contains(&"NOOP".to_string()));
}

/// Sends `n` one-recipient messages in turn; each must be accepted.
async fn send_n(up: &Upstreams, n: usize) {
    for i in 0..n {
        let env = envelope("a@example.com", &[&format!("r{i}@example.org")]);
        let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
        assert!(out.result.unwrap().is_positive());
    }
}

#[tokio::test]
async fn a_connection_used_a_moment_ago_is_reused_without_a_noop() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    send_n(&up, 3).await;
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
    assert_eq!(rec.txns().len(), 3);
    assert!(!rec.commands().contains(&"NOOP".to_string()));
}

#[tokio::test]
async fn a_connection_idle_past_the_trusted_time_is_checked_with_noop() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1).with_trusted_idle(Duration::ZERO);
    send_n(&up, 3).await;
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
    let noops = rec.commands().iter().filter(|c| *c == "NOOP").count();
    assert_eq!(noops, 2, "one check before each reuse");
}

#[tokio::test]
async fn a_reused_connection_found_closed_at_mail_is_replaced_and_the_message_sent_once() {
    // The fake closes after every message; the pooled connection is reused on trust,
    // MAIL finds it closed, and the message goes out once on a new connection.
    for fake in [plain_fake(), one_by_one_fake()] {
        let (port, rec) = start(Fake {
            close_after_data: true,
            ..fake
        })
        .await;
        let up = upstreams(smtp_channel(port, TlsMode::None), 1);
        send_n(&up, 3).await;
        assert_eq!(rec.sessions.load(Ordering::SeqCst), 3);
        let rcpts: Vec<Vec<String>> = rec.txns().into_iter().map(|t| t.rcpts).collect();
        assert_eq!(
            rcpts,
            [["r0@example.org"], ["r1@example.org"], ["r2@example.org"]]
        );
        assert!(!rec.commands().contains(&"NOOP".to_string()));
    }
}

#[tokio::test]
async fn a_reused_connection_answering_421_at_mail_is_replaced() {
    // A server that says 421 at MAIL (it is closing the connection): the message is
    // sent on a new connection, which gets the same answer; the client hears it, once.
    for fake in [plain_fake(), one_by_one_fake()] {
        let (port, rec) = start(Fake {
            replies: vec![("MAIL FROM:<late@", "421 4.4.2 timeout, closing")],
            ..fake
        })
        .await;
        let up = upstreams(smtp_channel(port, TlsMode::None), 1);
        send_n(&up, 1).await;
        let env = envelope("late@example.com", &["b@example.org"]);
        let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
        let Err(Error::Rejected { reply, .. }) = out.result else {
            panic!("{:?}", out.result)
        };
        assert_eq!(reply.code, 421);
        // The first connection (reused on trust) and one new one: no more.
        assert_eq!(rec.sessions.load(Ordering::SeqCst), 2);
        let mails = rec
            .commands()
            .iter()
            .filter(|c| c.starts_with("MAIL FROM:<late@"))
            .count();
        assert_eq!(mails, 2);
    }
}

#[tokio::test]
async fn partial_refusal_delivers_to_the_others() {
    let fake = Fake {
        replies: vec![("RCPT TO:<bad@", "550 5.1.1 no such user")],
        ..plain_fake()
    };
    let (port, rec) = start(fake).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let env = envelope(
        "a@example.com",
        &["one@example.org", "bad@example.org", "two@example.org"],
    );
    let out = up.send(0, &env, Body::Bytes(b"x\r\n"), false).await;
    assert!(out.result.unwrap().is_positive());
    assert_eq!(out.refused.len(), 1);
    assert_eq!(out.refused[0].0, "bad@example.org");
    assert_eq!(out.refused[0].1.code, 550);
    assert_eq!(rec.txns()[0].rcpts, ["one@example.org", "two@example.org"]);
}

#[tokio::test]
async fn partial_mode_with_every_recipient_refused_fails_with_the_last_reply() {
    // One command at a time (see the pipelined_* tests for the other way).
    let fake = Fake {
        replies: vec![
            ("RCPT TO:<bad1@", "550 5.1.1 first"),
            ("RCPT TO:<bad2@", "452 4.2.2 mailbox full"),
        ],
        ..one_by_one_fake()
    };
    let (port, rec) = start(fake).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["bad1@example.org", "bad2@example.org"]),
            Body::Bytes(b"x\r\n"),
            false,
        )
        .await;
    let Err(Error::Rejected { reply, .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert_eq!((reply.code, reply.enhanced), (452, Some((4, 2, 2))));
    assert_eq!(out.refused.len(), 2);
    assert!(!rec.commands().contains(&"DATA".to_string()));
    assert!(rec.commands().contains(&"RSET".to_string()));
}

// ---- pipelining (RFC 2920) ----------------------------------------------------

/// [`plain_fake`] that records which commands arrived before it answered MAIL.
fn watching_fake(replies: Vec<(&'static str, &'static str)>) -> Fake {
    Fake {
        replies,
        lookahead: Some(Duration::from_secs(5)),
        ..plain_fake()
    }
}

/// Waits (bounded) until the fake has seen `n` DATA commands cut off by a closed connection.
async fn unfinished_data(rec: &Record, n: usize) -> Vec<Vec<u8>> {
    for _ in 0..100 {
        if rec.unfinished().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rec.unfinished()
}

#[test]
fn pipelining_is_read_from_the_ehlo_keywords() {
    let offers = |text: &str| offers_pipelining(&text.parse::<Response>().unwrap());
    assert!(offers(
        "250-fake.test\r\n250-SIZE 1000\r\n250 PIPELINING\r\n"
    ));
    assert!(offers(
        "250-fake.test\r\n250-pipelining\r\n250 8BITMIME\r\n"
    ));
    assert!(!offers(
        "250-fake.test\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"
    ));
    assert!(!offers("250-fake.test\r\n250 PIPELININGX\r\n"));
    // The first line is the server's name, not a keyword.
    assert!(!offers("250-PIPELINING\r\n250 8BITMIME\r\n"));
    assert!(!offers("250 fake.test\r\n"));
}

#[tokio::test]
async fn pipelined_mail_rcpt_and_data_are_sent_before_any_reply_is_read() {
    let (port, rec) = start(watching_fake(Vec::new())).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    for sender in ["a@example.com", "b@example.com"] {
        let env = envelope(sender, &["one@example.org", "two@example.org"]);
        let out = up
            .send(0, &env, Body::Bytes(b"Subject: p\r\n\r\nhi\r\n"), true)
            .await;
        assert!(out.result.unwrap().is_positive());
    }
    let batch = [
        "RCPT TO:<one@example.org>",
        "RCPT TO:<two@example.org>",
        "DATA",
    ];
    assert_eq!(rec.ahead(), [batch, batch]);
    let txns = rec.txns();
    assert_eq!(txns.len(), 2);
    assert_eq!(txns[1].mail, "MAIL FROM:<b@example.com>");
    assert_eq!(txns[1].rcpts, ["one@example.org", "two@example.org"]);
    assert_eq!(txns[1].wire, b"Subject: p\r\n\r\nhi\r\n");
    // One connection, opened with one more EHLO (the one that tells PIPELINING).
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
    let ehlos = rec
        .commands()
        .iter()
        .filter(|c| c.starts_with("EHLO"))
        .count();
    assert_eq!(ehlos, 2);
}

#[tokio::test]
async fn without_pipelining_each_command_waits_for_its_reply() {
    let (port, rec) = start(Fake {
        lookahead: Some(Duration::from_millis(300)),
        ..one_by_one_fake()
    })
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let env = envelope("a@example.com", &["one@example.org", "two@example.org"]);
    let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
    assert!(out.result.unwrap().is_positive());
    assert_eq!(rec.ahead(), [Vec::<String>::new()]);
    assert_eq!(rec.txns()[0].rcpts, ["one@example.org", "two@example.org"]);
}

#[tokio::test]
async fn pipelining_offered_only_before_starttls_is_not_used() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    for (offered, pipelined) in [(vec![], false), (vec!["PIPELINING"], true)] {
        let (port, rec) = start(Fake {
            extensions: offered,
            before_tls: vec!["PIPELINING"],
            starttls: Some(pki.server.clone()),
            lookahead: Some(Duration::from_millis(300)),
            ..Fake::default()
        })
        .await;
        let mut target = smtp_channel(port, TlsMode::Starttls);
        target.ca_file = Some(ca_file(&dir, &pki.ca_pem));
        let up = upstreams(target, 1);
        let env = envelope("a@example.com", &["b@example.org"]);
        let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
        assert!(out.result.unwrap().is_positive());
        let txn = &rec.txns()[0];
        assert!(txn.tls);
        assert_eq!(txn.wire, b"x\r\n");
        let expected: Vec<String> = if pipelined {
            vec!["RCPT TO:<b@example.org>".into(), "DATA".into()]
        } else {
            Vec::new()
        };
        assert_eq!(rec.ahead(), [expected], "PIPELINING after TLS: {pipelined}");
    }
}

#[tokio::test]
async fn pipelined_all_or_nothing_refusal_sends_no_body_and_drops_the_connection() {
    // DATA is accepted (354) because one recipient was; the refused one must stop the
    // message: no byte after DATA, no end of data, the connection closed.
    let (port, rec) = start(watching_fake(vec![
        ("RCPT TO:<bad@", "550 5.1.1 <bad@example.org>: no such user"),
        ("RCPT TO:<full@", "452 4.2.2 mailbox full"),
    ]))
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let env = envelope(
        "a@example.com",
        &["good@example.org", "bad@example.org", "full@example.org"],
    );
    let out = up
        .send(0, &env, Body::Bytes(b"secret body\r\n"), true)
        .await;
    let Err(Error::Rejected { reply, .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert_eq!((reply.code, reply.enhanced), (550, Some((5, 1, 1))));
    assert_eq!(
        reply.text,
        "Channel relay: upstream said: <bad@example.org>: no such user"
    );
    assert!(out.refused.is_empty());
    assert_eq!(unfinished_data(&rec, 1).await, [Vec::<u8>::new()]);
    assert!(rec.txns().is_empty());
    assert!(!rec.commands().iter().any(|c| c == "RSET" || c == "QUIT"));

    // The next message goes out on a new connection (the only slot was freed).
    let ok = up
        .send(
            0,
            &envelope("a@example.com", &["good@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    assert!(ok.result.unwrap().is_positive());
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 2);
    assert_eq!(rec.txns().len(), 1);
}

#[tokio::test]
async fn pipelined_refusal_of_every_recipient_resets_and_reuses_the_connection() {
    // No recipient accepted: the upstream refuses DATA, so RSET and the connection
    // serves the next message. All-or-nothing reports the first refusal, partial
    // mode the last one and every refused recipient.
    for all_or_nothing in [true, false] {
        let (port, rec) = start(watching_fake(vec![
            ("RCPT TO:<bad1@", "550 5.1.1 first"),
            ("RCPT TO:<bad2@", "452 4.2.2 mailbox full"),
        ]))
        .await;
        let up = upstreams(smtp_channel(port, TlsMode::None), 1);
        let env = envelope("a@example.com", &["bad1@example.org", "bad2@example.org"]);
        let out = up
            .send(0, &env, Body::Bytes(b"x\r\n"), all_or_nothing)
            .await;
        let Err(Error::Rejected { reply, .. }) = out.result else {
            panic!("{:?}", out.result)
        };
        if all_or_nothing {
            assert_eq!((reply.code, reply.enhanced), (550, Some((5, 1, 1))));
            assert!(out.refused.is_empty());
        } else {
            assert_eq!((reply.code, reply.enhanced), (452, Some((4, 2, 2))));
            let refused: Vec<(&str, u16)> = out
                .refused
                .iter()
                .map(|(r, reply)| (r.as_str(), reply.code))
                .collect();
            assert_eq!(
                refused,
                [("bad1@example.org", 550), ("bad2@example.org", 452)]
            );
        }
        let commands = rec.commands();
        let data = commands.iter().position(|c| c == "DATA").unwrap();
        assert_eq!(commands[data + 1], "RSET");
        send_n(&up, 1).await;
        assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
        assert!(rec.unfinished().is_empty());
    }
}

#[tokio::test]
async fn pipelined_mail_refusal_reads_every_reply_then_resets() {
    let (port, rec) = start(watching_fake(vec![(
        "MAIL FROM:<refused@",
        "550 5.7.1 Sender rejected",
    )]))
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    for all_or_nothing in [true, false] {
        let env = envelope("refused@example.com", &["b@example.org", "c@example.org"]);
        let out = up
            .send(0, &env, Body::Bytes(b"x\r\n"), all_or_nothing)
            .await;
        let Err(Error::Rejected { reply, .. }) = out.result else {
            panic!("{:?}", out.result)
        };
        assert_eq!((reply.code, reply.enhanced), (550, Some((5, 7, 1))));
        // The RCPTs' 503s are about the missing MAIL, not about the recipients.
        assert!(out.refused.is_empty());
    }
    // The fake answered RCPT and DATA with 503 (no MAIL); each reply was read, so the
    // RSET's answer is the RSET's and the connection carries the next message.
    send_n(&up, 1).await;
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
    assert_eq!(rec.txns()[0].mail, "MAIL FROM:<a@example.com>");
    let tail: Vec<String> = rec.commands()[2..7].to_vec();
    assert_eq!(
        tail,
        [
            "MAIL FROM:<refused@example.com>",
            "RCPT TO:<b@example.org>",
            "RCPT TO:<c@example.org>",
            "DATA",
            "RSET"
        ]
    );
}

#[tokio::test]
async fn pipelined_partial_refusal_delivers_to_the_others() {
    let (port, rec) = start(watching_fake(vec![(
        "RCPT TO:<bad@",
        "550 5.1.1 no such user",
    )]))
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let env = envelope(
        "a@example.com",
        &["one@example.org", "bad@example.org", "two@example.org"],
    );
    let out = up.send(0, &env, Body::Bytes(b"x\r\n"), false).await;
    assert!(out.result.unwrap().is_positive());
    assert_eq!(out.refused.len(), 1);
    assert_eq!(out.refused[0].0, "bad@example.org");
    assert_eq!(out.refused[0].1.code, 550);
    assert_eq!(
        rec.ahead()[0].len(),
        4,
        "three RCPTs and DATA came together"
    );
    assert_eq!(rec.txns()[0].rcpts, ["one@example.org", "two@example.org"]);
    assert_eq!(rec.txns()[0].wire, b"x\r\n");
    send_n(&up, 1).await;
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn pipelined_data_refusal_resets_and_reuses_the_connection() {
    let (port, rec) = start(watching_fake(vec![("DATA", "451 4.3.0 try again later")])).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let env = envelope("a@example.com", &["b@example.org"]);
    let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
    let Err(Error::Rejected { reply, .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert_eq!((reply.code, reply.enhanced), (451, Some((4, 3, 0))));
    assert!(rec.commands().contains(&"RSET".to_string()));
    assert!(rec.txns().is_empty());
    assert!(rec.unfinished().is_empty());
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn pipelined_421_ends_the_transaction_and_the_connection() {
    let (port, rec) = start(watching_fake(vec![(
        "RCPT TO:<b@",
        "421 4.3.2 shutting down",
    )]))
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let env = envelope("a@example.com", &["b@example.org"]);
    let out = up.send(0, &env, Body::Bytes(b"x\r\n"), false).await;
    let Err(Error::Rejected { reply, .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert_eq!(reply.code, 421);
    assert!(
        out.refused.is_empty(),
        "421 is about the connection, not the recipient"
    );
    send_n(&up, 1).await;
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn thousands_of_recipients_go_out_in_several_pipelined_groups() {
    // ~60 KiB of RCPT lines: more than one group of PIPELINE_GROUP bytes.
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let rcpts: Vec<String> = (0..2000)
        .map(|i| format!("recipient-number-{i:05}@example.org"))
        .collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let bytes: usize = rcpts.iter().map(|r| r.len() + 12).sum();
    assert!(bytes > 3 * PIPELINE_GROUP);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &refs),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    assert!(out.result.unwrap().is_positive());
    assert_eq!(rec.txns()[0].rcpts, rcpts);
}

#[tokio::test]
async fn upstream_codes_pass_through_with_enhanced_codes() {
    let cases: [(Fake, u16, (u8, u16, u16)); 3] = [
        (
            Fake {
                replies: vec![(
                    "MAIL FROM",
                    "451 4.3.2 System not accepting network messages",
                )],
                ..plain_fake()
            },
            451,
            (4, 3, 2),
        ),
        (
            Fake {
                replies: vec![("MAIL FROM", "550 5.7.1 Sender rejected")],
                ..plain_fake()
            },
            550,
            (5, 7, 1),
        ),
        (
            Fake {
                data_reply: Some("554 5.6.0 Message content rejected"),
                ..plain_fake()
            },
            554,
            (5, 6, 0),
        ),
    ];
    for (fake, code, enhanced) in cases {
        let (port, _rec) = start(fake).await;
        let up = upstreams(smtp_channel(port, TlsMode::None), 2);
        let out = up
            .send(
                0,
                &envelope("a@example.com", &["b@example.org"]),
                Body::Bytes(b"x\r\n"),
                true,
            )
            .await;
        let Err(error) = out.result else {
            panic!("accepted")
        };
        let client = error.client_reply("relay");
        assert_eq!(
            (client.code, client.enhanced),
            (code, Some(enhanced)),
            "{error}"
        );
        assert!(
            client.text.starts_with("Channel relay: upstream said: "),
            "{client}"
        );
        assert_eq!(client.is_transient(), code < 500);
    }
}

#[tokio::test]
async fn unreachable_upstream_is_a_connect_error() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let up = upstreams(smtp_channel(port, TlsMode::None), 2);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    let Err(error @ Error::Connect { .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert_eq!(error.client_reply("relay").to_wire()[..9], *"451 4.4.1");
}

#[tokio::test]
async fn silent_upstream_times_out() {
    let (port, _rec) = start(Fake {
        silent: true,
        ..plain_fake()
    })
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 2)
        .with_timeouts(Duration::from_millis(300), IDLE_TIMEOUT);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    assert!(
        matches!(out.result, Err(Error::Timeout { .. })),
        "{:?}",
        out.result
    );
}

#[tokio::test]
async fn starttls_not_offered_is_a_tls_error_and_nothing_goes_in_plaintext() {
    let (port, rec) = start(Fake {
        extensions: vec!["AUTH PLAIN LOGIN"],
        ..plain_fake()
    })
    .await;
    let mut target = smtp_channel(port, TlsMode::Starttls);
    target.username = Some("user".into());
    target.password = Some(Secret::new("hunter2"));
    let up = upstreams(target, 2);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    let Err(error @ Error::NoStartTls { .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    assert!(error.to_string().contains("STARTTLS"), "{error}");
    let commands = rec.commands();
    assert!(
        commands
            .iter()
            .all(|c| c.starts_with("EHLO") || c == "QUIT"),
        "{commands:?}"
    );
}

#[tokio::test]
async fn starttls_with_ca_file_and_auth_login() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    // The ca_file may hold several certificates: an unrelated CA first, then ours.
    let other = make_pki();
    let path = ca_file(&dir, &format!("{}{}", other.ca_pem, pki.ca_pem));
    let fake = Fake {
        extensions: vec!["8BITMIME", "AUTH LOGIN"],
        starttls: Some(pki.server.clone()),
        credentials: Some(("relay-user", "s3cret")),
        ..Fake::default()
    };
    let (port, rec) = start(fake).await;
    let mut target = smtp_channel(port, TlsMode::Starttls);
    target.ca_file = Some(path);
    target.username = Some("relay-user".into());
    target.password = Some(Secret::new("s3cret"));
    let up = upstreams(target, 2);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(b"Subject: tls\r\n\r\nhi\r\n"),
            true,
        )
        .await;
    assert!(out.result.unwrap().is_positive());
    let txn = &rec.txns()[0];
    assert!(txn.tls);
    assert_eq!(txn.user.as_deref(), Some("LOGIN:relay-user"));
    assert_eq!(txn.wire, b"Subject: tls\r\n\r\nhi\r\n");
    // EHLO again after the handshake, and AUTH only after it.
    let commands = rec.commands();
    let starttls = commands.iter().position(|c| c == "STARTTLS").unwrap();
    assert_eq!(commands[starttls + 1], "EHLO mailgate.test");
    assert!(commands.iter().position(|c| c.starts_with("AUTH")).unwrap() > starttls);
}

/// SPEC §7: replies injected in plaintext behind the `220` to STARTTLS are never read
/// as replies that came over TLS. Each would answer one command of the transaction,
/// the last one the end of data that the upstream in fact refuses: a lost message.
#[tokio::test]
async fn plaintext_injected_after_the_starttls_220_drops_the_connection() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let injected = vec!["250 2.0.0 fake"; 10];
    for apart in [false, true] {
        let (port, rec) = start(Fake {
            extensions: vec!["8BITMIME", "ENHANCEDSTATUSCODES"],
            starttls: Some(pki.server.clone()),
            inject_after_starttls: injected.clone(),
            inject_apart: apart,
            data_reply: Some("554 5.7.1 refused"),
            ..Fake::default()
        })
        .await;
        let mut target = smtp_channel(port, TlsMode::Starttls);
        target.ca_file = Some(ca_file(&dir, &pki.ca_pem));
        let up = upstreams(target, 1);
        let out = up
            .send(
                0,
                &envelope("a@example.com", &["b@example.org"]),
                Body::Bytes(b"Subject: x\r\n\r\nx\r\n"),
                true,
            )
            .await;
        let Err(error @ Error::Tls { .. }) = &out.result else {
            panic!("apart {apart}: {:?}", out.result)
        };
        assert!(error.is_transient(), "{error}");
        assert_eq!(
            error.client_reply("relay"),
            Reply::upstream_tls_failed("relay")
        );
        if !apart {
            assert!(
                error.to_string().contains("after the 220 to STARTTLS"),
                "{error}"
            );
        }
        assert_eq!(
            rec.commands(),
            ["EHLO mailgate.test", "STARTTLS"],
            "apart {apart}"
        );
        assert_eq!(rec.ended.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn implicit_tls_and_auth_plain() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake {
        extensions: vec!["AUTH PLAIN LOGIN"],
        implicit: Some(pki.server.clone()),
        credentials: Some(("u@example.com", "pw")),
        ..Fake::default()
    };
    let (port, rec) = start(fake).await;
    let mut target = smtp_channel(port, TlsMode::Implicit);
    target.ca_file = Some(ca_file(&dir, &pki.ca_pem));
    target.username = Some("u@example.com".into());
    target.password = Some(Secret::new("pw"));
    let up = upstreams(target, 2);
    let out = up
        .send(
            0,
            &envelope("u@example.com", &["b@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    assert!(out.result.unwrap().is_positive());
    let txn = &rec.txns()[0];
    assert!(txn.tls);
    assert_eq!(txn.user.as_deref(), Some("PLAIN:u@example.com"));
}

#[tokio::test]
async fn certificate_from_an_unknown_ca_is_a_tls_error() {
    let server = make_pki();
    let trusted = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let path = ca_file(&dir, &trusted.ca_pem);
    for mode in [TlsMode::Starttls, TlsMode::Implicit] {
        let fake = Fake {
            starttls: (mode == TlsMode::Starttls).then(|| server.server.clone()),
            implicit: (mode == TlsMode::Implicit).then(|| server.server.clone()),
            ..plain_fake()
        };
        let (port, rec) = start(fake).await;
        let mut target = smtp_channel(port, mode);
        target.ca_file = Some(path.clone());
        let up = upstreams(target, 2);
        let out = up
            .send(
                0,
                &envelope("a@example.com", &["b@example.org"]),
                Body::Bytes(b"x\r\n"),
                true,
            )
            .await;
        let Err(error @ Error::Tls { .. }) = out.result else {
            panic!("{mode:?}: {:?}", out.result)
        };
        assert_eq!(error.client_reply("relay").to_wire()[..9], *"454 4.7.0");
        assert!(!rec.commands().iter().any(|c| c.starts_with("MAIL")));
    }
}

#[tokio::test]
async fn refused_credentials_are_an_auth_error() {
    let fake = Fake {
        extensions: vec!["AUTH PLAIN LOGIN"],
        credentials: Some(("user", "right")),
        ..plain_fake()
    };
    let (port, rec) = start(fake).await;
    let mut target = smtp_channel(port, TlsMode::None);
    target.username = Some("user".into());
    target.password = Some(Secret::new("wrong-password"));
    let up = upstreams(target, 2);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    let Err(
        error @ Error::Rejected {
            step: Step::Auth,
            reply,
        },
    ) = &out.result
    else {
        panic!("{:?}", out.result)
    };
    assert_eq!((reply.code, reply.enhanced), (535, Some((5, 7, 8))));
    assert_eq!(error.client_reply("relay").to_wire()[..9], *"454 4.7.0");
    assert!(!error.to_string().contains("wrong-password"));
    assert!(!rec.commands().iter().any(|c| c.starts_with("MAIL")));
}

#[tokio::test]
async fn no_usable_auth_mechanism_is_an_auth_error() {
    let (port, _rec) = start(Fake {
        extensions: vec!["AUTH CRAM-MD5"],
        ..plain_fake()
    })
    .await;
    let mut target = smtp_channel(port, TlsMode::None);
    target.username = Some("user".into());
    target.password = Some(Secret::new("pw"));
    let up = upstreams(target, 2);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    assert!(
        matches!(out.result, Err(Error::NoAuthMechanism { .. })),
        "{:?}",
        out.result
    );
}

#[tokio::test]
async fn connection_limit_is_never_exceeded() {
    let fake = Fake {
        delay: Duration::from_millis(100),
        ..plain_fake()
    };
    let (port, rec) = start(fake).await;
    let up = Arc::new(upstreams(smtp_channel(port, TlsMode::None), 2));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let up = up.clone();
        tasks.push(tokio::spawn(async move {
            let env = envelope("a@example.com", &[&format!("r{i}@example.org")]);
            up.send(0, &env, Body::Bytes(b"x\r\n"), true).await.result
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().unwrap().is_positive());
    }
    assert_eq!(rec.txns().len(), 10);
    let max = rec.max_live.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max), "max concurrent sessions {max}");
    assert!(
        rec.sessions.load(Ordering::SeqCst) <= 2,
        "connections are reused"
    );
}

#[tokio::test]
async fn stale_or_closed_idle_connections_are_replaced() {
    // Closed by the server after each message: the NOOP check fails, a new one is opened.
    let (port, rec) = start(Fake {
        close_after_data: true,
        ..plain_fake()
    })
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1).with_trusted_idle(Duration::ZERO);
    for _ in 0..3 {
        let out = up
            .send(
                0,
                &envelope("a@example.com", &["b@example.org"]),
                Body::Bytes(b"x\r\n"),
                true,
            )
            .await;
        assert!(out.result.unwrap().is_positive());
    }
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 3);

    // Idle longer than the idle timeout: closed, not reused.
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1)
        .with_timeouts(Duration::from_secs(5), Duration::ZERO);
    for _ in 0..2 {
        let out = up
            .send(
                0,
                &envelope("a@example.com", &["b@example.org"]),
                Body::Bytes(b"x\r\n"),
                true,
            )
            .await;
        assert!(out.result.unwrap().is_positive());
    }
    assert_eq!(rec.sessions.load(Ordering::SeqCst), 2);
    assert!(!rec.commands().contains(&"NOOP".to_string()));
}

#[tokio::test]
async fn null_sender_and_eightbit_and_smtputf8_parameters() {
    let (port, rec) = start(Fake {
        extensions: vec!["8BITMIME", "SMTPUTF8"],
        ..plain_fake()
    })
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let body = "Subject: caf\u{e9}\r\n\r\n\u{e9}t\u{e9}\r\n".as_bytes();
    up.send(
        0,
        &envelope("", &["b@example.org"]),
        Body::Bytes(body),
        true,
    )
    .await
    .result
    .unwrap();
    up.send(
        0,
        &envelope("j\u{f6}rg@example.com", &["b@example.org"]),
        Body::Bytes(b"x\r\n"),
        true,
    )
    .await
    .result
    .unwrap();
    let txns = rec.txns();
    assert_eq!(txns[0].mail, "MAIL FROM:<> BODY=8BITMIME");
    assert_eq!(txns[0].wire, body);
    assert_eq!(txns[1].mail, "MAIL FROM:<j\u{f6}rg@example.com> SMTPUTF8");
}

#[tokio::test]
async fn smtputf8_message_to_an_upstream_without_it_is_refused() {
    let (port, rec) = start(Fake {
        extensions: vec!["8BITMIME"],
        ..plain_fake()
    })
    .await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["\u{fc}ser@example.org"]),
            Body::Bytes(b"x\r\n"),
            true,
        )
        .await;
    let Err(error @ Error::NoSmtpUtf8 { .. }) = out.result else {
        panic!("{:?}", out.result)
    };
    let reply = error.client_reply("relay");
    assert_eq!(
        reply.to_wire(),
        "553 5.6.7 Channel relay: upstream does not support SMTPUTF8\r\n"
    );
    assert!(!rec.commands().iter().any(|c| c.starts_with("MAIL")));

    // A client that declared SMTPUTF8 but sent plain ASCII still gets through.
    let mut env = envelope("a@example.com", &["b@example.org"]);
    env.smtputf8 = true;
    assert!(
        up.send(0, &env, Body::Bytes(b"x\r\n"), true)
            .await
            .result
            .unwrap()
            .is_positive()
    );
    assert_eq!(rec.txns()[0].mail, "MAIL FROM:<a@example.com>");
}

#[tokio::test]
async fn spooled_file_streams_in_chunks() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    // Lines of varied length so that dots land on chunk boundaries.
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while message.len() < 3 * CHUNK + 100 {
        message.extend_from_slice(format!(".line {i} {}\r\n", "x".repeat(i % 97)).as_bytes());
        i += 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msg.eml");
    fs::write(&path, &message).unwrap();
    let out = up
        .send(
            0,
            &envelope("a@example.com", &["b@example.org"]),
            Body::File(&path),
            true,
        )
        .await;
    assert!(out.result.unwrap().is_positive());
    assert_eq!(rec.txns()[0].wire, stuffed(&message));
}

#[tokio::test]
async fn a_short_spool_file_aborts_data_without_the_final_dot() {
    let (port, rec) = start(plain_fake()).await;
    let up = upstreams(smtp_channel(port, TlsMode::None), 1);
    let Transport::Smtp(ch) = &*up.channels[0] else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msg.eml");
    fs::write(&path, vec![b'x'; CHUNK + 10]).unwrap();
    // The file is shorter than announced, as if it were truncated under us.
    let body = PreparedBody {
        source: Source::File(fs::File::open(&path).unwrap()),
        len: 2 * CHUNK as u64,
        eightbit: false,
        empty: false,
    };
    let env = envelope("a@example.com", &["b@example.org"]);
    let prepared = PreparedEnvelope::new(&env, false, true, &mut Vec::new()).unwrap();
    let mut conn = up.checkout(ch, true).await.unwrap();
    let (result, reusable) = up
        .transaction(ch, &mut conn, &prepared, body, true, &mut Vec::new())
        .await;
    assert!(matches!(result, Err(Error::Local { .. })), "{result:?}");
    assert!(!reusable);
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        rec.txns().is_empty(),
        "the upstream never saw the end of data"
    );
    assert!(rec.commands().contains(&"DATA".to_string()));
}

#[tokio::test]
async fn test_channel_reports_each_step_and_sends_nothing() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake {
        extensions: vec!["AUTH PLAIN LOGIN"],
        starttls: Some(pki.server.clone()),
        credentials: Some(("user", "pw")),
        ..Fake::default()
    };
    let (port, rec) = start(fake).await;
    let mut target = smtp_channel(port, TlsMode::Starttls);
    target.ca_file = Some(ca_file(&dir, &pki.ca_pem));
    target.username = Some("user".into());
    target.password = Some(Secret::new("pw"));
    let up = upstreams(target, 1);
    let mut steps = Vec::new();
    up.test(0, &mut |s| steps.push(s.to_string()))
        .await
        .unwrap();
    let all = steps.join("\n");
    assert!(
        all.contains(&format!("connected to localhost:{port}")),
        "{all}"
    );
    assert!(all.contains("EHLO ok: fake.test offers STARTTLS"), "{all}");
    assert!(all.contains("TLS established (STARTTLS, TLSv1_3)"), "{all}");
    assert!(all.contains("EHLO over TLS ok: fake.test offers"), "{all}");
    assert!(all.contains("AUTH PLAIN ok as user"), "{all}");
    assert!(!all.contains("pw\n") && !all.contains("cHc"), "{all}");
    assert!(rec.commands().contains(&"QUIT".to_string()));
    assert!(!rec.commands().iter().any(|c| c.starts_with("MAIL")));

    // Implicit TLS names the protocol version.
    let (port, _rec) = start(Fake {
        implicit: Some(pki.server.clone()),
        ..Fake::default()
    })
    .await;
    let mut target = smtp_channel(port, TlsMode::Implicit);
    target.ca_file = Some(ca_file(&dir, &pki.ca_pem));
    let up = upstreams(target, 1);
    let mut steps = Vec::new();
    up.test(0, &mut |s| steps.push(s.to_string()))
        .await
        .unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("TLS established (implicit TLS, TLSv1_3)")),
        "{steps:?}"
    );
    assert!(steps.iter().any(|s| s == "no AUTH configured"), "{steps:?}");

    // A failure is returned, after the steps that worked.
    let mut target = smtp_channel(port, TlsMode::Starttls);
    target.ca_file = Some(ca_file(&dir, &pki.ca_pem));
    let up = upstreams(target, 1).with_timeouts(Duration::from_millis(500), IDLE_TIMEOUT);
    let mut steps = Vec::new();
    let error = up
        .test(0, &mut |s| steps.push(s.to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Tls { .. } | Error::Timeout { .. } | Error::Connect { .. }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn file_channel_writes_message_and_envelope_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let config = config(vec![channel(
        "outbox",
        ChannelKind::File {
            dir: outbox.clone(),
        },
        1,
    )]);
    let up = Upstreams::new(&config).unwrap();
    let message = b"Subject: hi\r\n\r\n.dot\r\nbody\r\n";
    let env = envelope("a@example.com", &["b@example.org", "c@example.net"]);
    let out = up
        .send_with_id(0, Some("msg-1"), &env, Body::Bytes(message), true)
        .await;
    assert_eq!(
        out.result.unwrap().to_wire(),
        "250 2.0.0 Channel outbox: stored as msg-1.eml\r\n"
    );
    assert_eq!(fs::read(outbox.join("msg-1.eml")).unwrap(), message);
    assert_eq!(
        fs::read_to_string(outbox.join("msg-1.envelope")).unwrap(),
        "sender <a@example.com>\nrecipient <b@example.org>\nrecipient <c@example.net>\n"
    );
    // Without an id a new one is made; the null sender is written as <>; nothing temporary is left.
    let spooled = dir.path().join("spooled");
    fs::write(&spooled, message).unwrap();
    let out = up
        .send(
            0,
            &envelope("", &["b@example.org"]),
            Body::File(&spooled),
            true,
        )
        .await;
    assert!(out.result.unwrap().is_positive());
    let mut names: Vec<String> = fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    let other = names
        .iter()
        .find(|n| n.ends_with(".envelope") && !n.starts_with("msg-1"))
        .unwrap();
    assert_eq!(
        fs::read_to_string(outbox.join(other)).unwrap(),
        "sender <>\nrecipient <b@example.org>\n"
    );
    assert_eq!(
        fs::read(outbox.join(other.replace(".envelope", ".eml"))).unwrap(),
        message
    );

    // An id that is not a plain file name is refused.
    let out = up
        .send_with_id(0, Some("../escape"), &env, Body::Bytes(message), true)
        .await;
    assert!(matches!(out.result, Err(Error::Local { .. })));

    let mut steps = Vec::new();
    up.test(0, &mut |s| steps.push(s.to_string()))
        .await
        .unwrap();
    assert!(steps[0].ends_with("is writable"), "{steps:?}");
}

#[test]
fn write_atomically_leaves_no_partial_file_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let result = write_atomically(dir.path(), "m.eml", |f| {
        f.write_all(b"half")?;
        Err(io::Error::other("disk full"))
    });
    assert!(result.is_err());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn scan_finds_eight_bit_bare_line_ends_and_the_final_crlf() {
    let scan = |parts: &[&[u8]]| {
        let mut s = Scan::default();
        for p in parts {
            s.feed(p);
        }
        s
    };
    let s = scan(&[b"a\r", b"\nb\r\n"]);
    assert!(s.check().is_ok() && s.ends_with_crlf && !s.eightbit);
    assert!(!scan(&[b"a\r\nb"]).ends_with_crlf);
    assert!(scan(&["\u{e9}\r\n".as_bytes()]).eightbit);
    assert!(scan(&[b"a\nb\r\n"]).check().is_err());
    assert!(scan(&[b"a\r", b"b\r\n"]).check().is_err());
    assert!(scan(&[b"a\r\n\r"]).check().is_err());
    assert!(scan(&[b""]).check().is_ok());
}

#[test]
fn scan_matches_a_byte_by_byte_model_whatever_the_chunks() {
    use rand::{Rng, SeedableRng};
    // (eightbit, has a bare CR or LF, ends with CRLF), straight from the definitions.
    fn model(all: &[u8]) -> (bool, bool, bool) {
        let bare = all.iter().enumerate().any(|(i, &b)| match b {
            b'\n' => i == 0 || all[i - 1] != b'\r',
            b'\r' => all.get(i + 1) != Some(&b'\n'),
            _ => false,
        });
        (all.iter().any(|&b| b >= 0x80), bare, all.ends_with(b"\r\n"))
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let alphabet = [b'a', b'.', b'\r', b'\n', 0xc3];
    for _ in 0..5000 {
        let len = rng.gen_range(0..12);
        let all: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
            .collect();
        let mut scan = Scan::default();
        let mut rest = &all[..];
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rng.gen_range(0..=rest.len()));
            scan.feed(chunk);
            rest = tail;
        }
        let (eightbit, bare, crlf) = model(&all);
        assert_eq!(
            (scan.eightbit, scan.check().is_err(), scan.ends_with_crlf),
            (eightbit, bare, crlf),
            "{all:?}"
        );
    }
}

#[test]
fn positive_multiline_reply_keeps_every_line_and_one_enhanced_code() {
    let response: Response = "250-2.0.0 first\r\n250 2.0.0 queued as X\r\n"
        .parse()
        .unwrap();
    let reply = upstream_response(&response, "relay");
    assert_eq!(
        reply.to_wire(),
        "250 2.0.0 Channel relay: upstream said: first queued as X\r\n"
    );
}

#[test]
fn send_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let up = upstreams(smtp_channel(1, TlsMode::None), 1);
    let env = Envelope::default();
    is_send(&up.send(0, &env, Body::Bytes(b""), true));
    is_send(&up.test(0, &mut |_| {}));
}

#[test]
fn bad_ca_file_is_a_setup_error() {
    provider();
    let dir = tempfile::tempdir().unwrap();
    let mut target = smtp_channel(25, TlsMode::Starttls);
    target.ca_file = Some(ca_file(&dir, "not a certificate\n"));
    let config = config(vec![channel("relay", ChannelKind::Smtp(target.clone()), 1)]);
    let error = Upstreams::new(&config).err().unwrap();
    assert!(
        error.contains("relay") && error.contains("no certificate"),
        "{error}"
    );
    target.ca_file = Some(dir.path().join("missing.pem"));
    let config = config_with(target);
    assert!(
        Upstreams::new(&config)
            .err()
            .unwrap()
            .contains("cannot read ca_file")
    );
}

fn config_with(target: SmtpTarget) -> Config {
    config(vec![channel("relay", ChannelKind::Smtp(target), 1)])
}

#[tokio::test]
async fn upstream_sockets_have_nagle_off() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tcp = open_tcp("127.0.0.1", port).await.unwrap();
    assert!(tcp.nodelay().unwrap());
}

/// A [`GuardedStream`] over a loopback connection, and the server's end of it.
async fn guarded_pair() -> (GuardedStream, TcpStream, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = open_tcp("127.0.0.1", addr.port()).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let poison = Arc::new(AtomicBool::new(false));
    let stream = GuardedStream::new(Inner::Plain(tcp), addr, poison.clone());
    (stream, server, poison)
}

#[tokio::test]
async fn guarded_stream_sends_held_writes_together_before_reading() {
    use tokio::io::AsyncReadExt;
    let (mut stream, mut server, _) = guarded_pair().await;
    stream.write_all(b"body\r\n").await.unwrap();
    stream.flush().await.unwrap();
    stream.write_all(b".\r\n").await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await;
    assert!(early.is_err(), "nothing is sent before the next read");

    server.write_all(b"250 ok\r\n").await.unwrap();
    let mut reply = [0u8; 8];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"250 ok\r\n");
    let mut got = vec![0u8; 9];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b"body\r\n.\r\n");
}

#[tokio::test]
async fn guarded_stream_passes_large_writes_in_order() {
    use tokio::io::AsyncReadExt;
    let (mut stream, mut server, _) = guarded_pair().await;
    let big: Vec<u8> = (0..3 * HOLD).map(|i| (i % 251) as u8).collect();
    stream.write_all(b"MAIL\r\n").await.unwrap();
    stream.write_all(&big).await.unwrap();
    stream.write_all(b"end").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, [b"MAIL\r\n".as_slice(), &big, b"end"].concat());
}

#[tokio::test]
async fn poisoned_guarded_stream_never_sends_what_it_holds() {
    use tokio::io::AsyncReadExt;
    let (mut stream, mut server, poison) = guarded_pair().await;
    stream.write_all(b"partial body").await.unwrap();
    poison.store(true, Ordering::SeqCst);
    assert!(stream.write_all(b"\r\n.\r\n").await.is_err());
    let mut buf = [0u8; 8];
    assert!(stream.read(&mut buf).await.is_err());
    drop(stream);
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "{got:?}");
}

#[tokio::test]
async fn quoted_local_parts_go_out_quoted_pipelined_or_not() {
    // The envelope holds the canonical form the session keeps; lettre writes it as it is.
    let rcpts = [
        r#""john doe"@example.org"#,
        r#""eve@example.net,bob"@example.org"#,
        r#""a\"b"@example.org"#,
    ];
    for fake in [plain_fake(), one_by_one_fake()] {
        let (port, rec) = start(fake).await;
        let up = upstreams(smtp_channel(port, TlsMode::None), 1);
        let env = envelope(r#""x y"@example.com"#, &rcpts);
        let out = up.send(0, &env, Body::Bytes(b"x\r\n"), true).await;
        assert!(out.result.unwrap().is_positive());
        let txn = &rec.txns()[0];
        assert_eq!(txn.mail, r#"MAIL FROM:<"x y"@example.com>"#);
        assert_eq!(txn.rcpts, rcpts);
    }
}
