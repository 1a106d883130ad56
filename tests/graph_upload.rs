//! Large messages over Microsoft Graph (SPEC §7 "Large messages over Graph"), in process:
//! the real delivery layer (relay and queue modes, spool on disk) against the local Graph
//! stand-in, which serves drafts, attachments, upload sessions (enforcing Graph's chunk
//! rules and refusing a bearer token on the uploadUrl), send and DELETE.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use mailgate::config::{Config, DeliveryMode};
use mailgate::delivery::Delivery;
use mailgate::message::Envelope;
use mailgate::reply::Reply;
use mailgate::testkit::config::{graph_channel, server};
use mailgate::testkit::graph_api::{DraftStep, GraphApi, Scripted};
use mailgate::testkit::token_endpoint::TokenEndpoint;
use tokio_util::sync::CancellationToken;

const MAILBOX: &str = "dave@example.com";

struct Setup {
    graph: GraphApi,
    tokens: Arc<TokenEndpoint>,
    _dir: tempfile::TempDir,
    config: Arc<Config>,
    delivery: Arc<Delivery>,
    shutdown: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn setup(mode: DeliveryMode, max: Option<u64>) -> Setup {
    mailgate::tls::install_crypto_provider();
    let tokens = Arc::new(TokenEndpoint::start().await);
    let graph = GraphApi::start(tokens.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut channel = graph_channel("dave", MAILBOX, &graph.url(), &tokens.token_url());
    if max.is_some() {
        channel.limits.max_message_size = max;
    }
    let config = Arc::new(Config {
        server: mailgate::config::Server {
            delivery: mode,
            spool_dir: dir.path().join("spool"),
            retry_first: Duration::from_millis(300),
            retry_max: Duration::from_secs(2),
            ..server()
        },
        ..mailgate::testkit::config::config(vec![channel])
    });
    let delivery = Arc::new(Delivery::new(config.clone()).unwrap());
    let shutdown = CancellationToken::new();
    {
        let (d, s) = (delivery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run_queue(s).await });
    }
    Setup {
        graph,
        tokens,
        _dir: dir,
        config,
        delivery,
        shutdown,
    }
}

impl Setup {
    async fn submit(&self, rcpts: &[&str], body: &[u8]) -> Reply {
        let mut draft = self.delivery.begin().await.unwrap();
        for piece in body.chunks(64 * 1024) {
            draft.write(piece).await.unwrap();
        }
        let envelope = Envelope {
            sender: MAILBOX.into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        self.delivery.finish(draft, 0, &envelope).await
    }

    fn spool_files(&self, folder: &str) -> Vec<String> {
        let dir = self.config.server.spool_dir.join(folder);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|x| x == "json") {
                out.push(std::fs::read_to_string(entry.path()).unwrap());
            }
        }
        out
    }
}

use mailgate::testkit::wait_for;

/// Bytes that look like a scanned PDF and compress badly.
fn pdf(len: usize, seed: u32) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
    out.truncate(len);
    out
}

fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(b64.len() * 78 / 76 + 2);
    for line in b64.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A message from a scanner: HTML and text bodies, an inline logo, and `files`
/// (name, bytes) as base64 attachments.
fn scan_message(top_extra: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut m = format!(
        "From: Scanner <{MAILBOX}>\r\nTo: Bob <bob@example.org>\r\nSubject: Scan 42\r\nMessage-ID: <scan42@example.com>\r\nX-Scanner: MFP\r\n{top_extra}MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"mix\"\r\n\r\n--mix\r\nContent-Type: multipart/related; boundary=\"rel\"\r\n\r\n--rel\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour scan.\r\n--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Your scan <img src=\"cid:logo@mfp\"></p>\r\n--alt--\r\n--rel\r\nContent-Type: image/png\r\nContent-ID: <logo@mfp>\r\nContent-Disposition: inline\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes();
    m.extend(base64_lines(b"\x89PNG\r\n\x1a\nlogo"));
    m.extend_from_slice(b"--rel--\r\n");
    for (name, bytes) in files {
        m.extend_from_slice(
            format!("--mix\r\nContent-Type: application/pdf; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n").as_bytes(),
        );
        m.extend(base64_lines(bytes));
    }
    m.extend_from_slice(b"--mix--\r\n");
    m
}

fn assert_chunk_rules(graph: &GraphApi) {
    let chunks = graph.chunks();
    assert!(!chunks.is_empty());
    let (last, rest) = chunks.split_last().unwrap();
    assert!(*last <= 4 * 1024 * 1024);
    for c in rest {
        assert!(*c <= 4 * 1024 * 1024 && c % 327_680 == 0, "{chunks:?}");
    }
    assert_eq!(graph.upload_auth(), 0, "no bearer token to the uploadUrl");
}

#[tokio::test]
async fn a_large_pdf_goes_by_draft_upload_session_and_send_byte_for_byte() {
    for mode in [DeliveryMode::Relay, DeliveryMode::Queue] {
        let s = setup(mode, None).await;
        let scan = pdf(3_500_000, 1);
        let body = scan_message("X-Priority: 1\r\n", &[("scan.pdf", &scan)]);
        assert!(body.len() > 3_000_000);
        let reply = s
            .submit(&["bob@example.org", "hidden@example.net"], &body)
            .await;
        assert_eq!(reply.code, 250, "{reply}");
        assert!(
            wait_for(Duration::from_secs(20), || s.graph.sent_drafts().len() == 1).await,
            "{mode:?}: {:?}",
            s.graph.draft_log()
        );
        let sent = &s.graph.sent_drafts()[0];
        assert_eq!(sent.mailbox, MAILBOX);
        let j = &sent.json;
        assert_eq!(j["subject"], "Scan 42");
        assert_eq!(j["from"]["emailAddress"]["address"], MAILBOX);
        assert_eq!(
            j["toRecipients"][0]["emailAddress"]["address"],
            "bob@example.org"
        );
        assert_eq!(
            j["bccRecipients"][0]["emailAddress"]["address"],
            "hidden@example.net"
        );
        assert_eq!(j["internetMessageId"], "<scan42@example.com>");
        assert_eq!(j["importance"], "high");
        assert_eq!(j["body"]["contentType"], "HTML");
        assert!(
            j["body"]["content"]
                .as_str()
                .unwrap()
                .contains("cid:logo@mfp")
        );
        assert_eq!(
            j["internetMessageHeaders"],
            serde_json::json!([
                {"name": "X-Scanner", "value": "MFP"},
                {"name": "X-Priority", "value": "1"}
            ])
        );
        let ways: Vec<(&str, &str)> = sent
            .attached
            .iter()
            .map(|a| (a.name.as_str(), a.way))
            .collect();
        assert_eq!(ways, [("attachment-1", "draft"), ("scan.pdf", "upload")]);
        let logo = &sent.attached[0];
        assert!(logo.is_inline);
        assert_eq!(logo.content_id.as_deref(), Some("logo@mfp"));
        assert_eq!(logo.bytes, b"\x89PNG\r\n\x1a\nlogo");
        let got = &sent.attached[1];
        assert_eq!(got.content_type, "application/pdf");
        assert!(!got.is_inline);
        assert!(got.bytes == scan, "the stand-in reassembled the exact PDF");
        assert_chunk_rules(&s.graph);
        assert!(s.graph.sent().is_empty(), "no sendMail");
        assert!(s.graph.open_drafts().is_empty(), "no draft left");
        if mode == DeliveryMode::Queue {
            assert!(wait_for(Duration::from_secs(5), || s.spool_files("queue").is_empty()).await);
        }
    }
}

#[tokio::test]
async fn small_attachments_go_in_the_draft_while_it_stays_under_4_mb_then_by_post() {
    let s = setup(DeliveryMode::Relay, None).await;
    let (a, b, c) = (pdf(1_200_000, 2), pdf(1_200_000, 3), pdf(1_200_000, 4));
    let body = scan_message("", &[("a.pdf", &a), ("b.pdf", &b), ("c.pdf", &c)]);
    let reply = s.submit(&["bob@example.org"], &body).await;
    assert_eq!(reply.code, 250, "{reply}");
    let sent = &s.graph.sent_drafts()[0];
    let ways: Vec<(&str, &str)> = sent
        .attached
        .iter()
        .map(|a| (a.name.as_str(), a.way))
        .collect();
    assert_eq!(
        ways,
        [
            ("attachment-1", "draft"),
            ("a.pdf", "draft"),
            ("b.pdf", "draft"),
            ("c.pdf", "post")
        ]
    );
    assert!(sent.attached[3].bytes == c);
    assert!(s.graph.chunks().is_empty(), "no upload session");
}

#[tokio::test]
async fn a_failure_at_any_step_deletes_the_draft_and_is_classified_like_sendmail() {
    let scan = pdf(3_200_000, 5);
    let small = pdf(1_000_000, 6);
    let big = pdf(1_000_000, 7);
    // Two small ones fill the draft; the third goes by POST; the scan by session.
    let body = scan_message(
        "",
        &[
            ("s1.pdf", &small),
            ("s2.pdf", &big),
            ("s3.pdf", &small),
            ("scan.pdf", &scan),
        ],
    );
    for step in [
        DraftStep::Create,
        DraftStep::Attach,
        DraftStep::Session,
        DraftStep::Put,
        DraftStep::Send,
    ] {
        let answers: &[(u16, &str, u16)] = match step {
            DraftStep::Put | DraftStep::Send => &[
                (503, "ServiceUnavailable", 451),
                (429, "TooManyRequests", 451),
                (400, "ErrorInvalidRecipients", 550),
                (413, "ErrorMessageSizeExceeded", 552),
            ],
            _ => &[
                (503, "ServiceUnavailable", 451),
                (400, "ErrorInvalidRecipients", 550),
            ],
        };
        for &(status, code, expect) in answers {
            let s = setup(DeliveryMode::Relay, None).await;
            s.graph.fail(step, Scripted::status(status, code));
            let reply = s.submit(&["bob@example.org"], &body).await;
            assert_eq!(reply.code, expect, "{step:?} {status}: {reply}");
            assert!(s.graph.sent_drafts().is_empty(), "{step:?}");
            assert!(
                s.graph.open_drafts().is_empty(),
                "{step:?} {status}: the draft is deleted: {:?}",
                s.graph.draft_log()
            );
            let created = step != DraftStep::Create;
            assert_eq!(s.graph.deleted().len(), usize::from(created), "{step:?}");
            let log = s.graph.draft_log();
            assert!(log.contains(&format!("{step:?}").to_lowercase()), "{log:?}");
        }
    }
    // A 403 breaks the channel (relay: "try again later", as for sendMail).
    let s = setup(DeliveryMode::Relay, None).await;
    s.graph
        .fail(DraftStep::Send, Scripted::status(403, "ErrorAccessDenied"));
    let reply = s.submit(&["bob@example.org"], &body).await;
    assert_eq!(
        (reply.code, reply.enhanced),
        (454, Some((4, 7, 0))),
        "{reply}"
    );
    assert!(s.graph.open_drafts().is_empty());
    // A 401 refreshes the token once and goes on.
    let s = setup(DeliveryMode::Relay, None).await;
    s.graph.fail(
        DraftStep::Attach,
        Scripted::status(401, "InvalidAuthenticationToken"),
    );
    let reply = s.submit(&["bob@example.org"], &body).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(s.tokens.requests("client_credentials"), 2);
    assert_eq!(s.graph.sent_drafts().len(), 1);
}

#[tokio::test]
async fn queue_mode_retries_after_a_deferral_and_sends_exactly_once() {
    let s = setup(DeliveryMode::Queue, None).await;
    let scan = pdf(3_300_000, 8);
    let body = scan_message("", &[("scan.pdf", &scan)]);
    // The send fails and so does the DELETE after it: the draft stays recorded in the
    // spool entry, and the next attempt deletes it before making its own.
    s.graph.fail(DraftStep::Send, Scripted::throttled("0"));
    s.graph.fail(
        DraftStep::Delete,
        Scripted::status(503, "ServiceUnavailable"),
    );
    let reply = s.submit(&["bob@example.org"], &body).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        wait_for(Duration::from_secs(20), || s.graph.sent_drafts().len() == 1).await,
        "{:?}",
        s.graph.draft_log()
    );
    assert!(wait_for(Duration::from_secs(5), || s.spool_files("queue").is_empty()).await);
    let log = s.graph.draft_log();
    assert_eq!(
        log,
        [
            "create", "session", "put", "put", "put", "send", "delete", // first attempt
            "delete", "create", "session", "put", "put", "put", "send" // second
        ],
        "{log:?}"
    );
    assert_eq!(s.graph.sent_drafts().len(), 1, "sent once");
    assert!(s.graph.open_drafts().is_empty(), "no draft left");
    assert_eq!(s.graph.deleted().len(), 1);
    assert!(s.graph.sent_drafts()[0].attached[1].bytes == scan);
}

#[tokio::test]
async fn a_signed_message_over_the_limit_fails_with_a_dsn_and_is_not_altered() {
    let s = setup(DeliveryMode::Queue, None).await;
    let mut body = format!(
        "From: {MAILBOX}\r\nTo: bob@example.org\r\nSubject: signed\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256; boundary=\"sig\"\r\n\r\n--sig\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes();
    body.extend(base64_lines(&pdf(2_400_000, 9)));
    body.extend_from_slice(
        b"--sig\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--sig--\r\n",
    );
    assert!(body.len() > 3_000_000);
    let reply = s.submit(&["bob@example.org"], &body).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        wait_for(Duration::from_secs(10), || s.spool_files("failed").len()
            == 1)
        .await
    );
    let failed = &s.spool_files("failed")[0];
    assert!(failed.contains("signed or encrypted"), "{failed}");
    assert!(s.graph.draft_log().is_empty(), "no draft was made");
    // The DSN (small) goes back to the sender by sendMail and says why.
    assert!(wait_for(Duration::from_secs(10), || s.graph.sent().len() == 1).await);
    let dsn = String::from_utf8_lossy(&s.graph.sent()[0].mime).to_string();
    assert!(
        dsn.contains("too large for Microsoft Graph's sendMail"),
        "{dsn}"
    );
}

#[tokio::test]
async fn over_the_channels_max_message_size_is_refused_before_graph_sees_it() {
    for mode in [DeliveryMode::Relay, DeliveryMode::Queue] {
        let s = setup(mode, Some(3_500_000)).await;
        let body = scan_message("", &[("scan.pdf", &pdf(2_700_000, 10))]);
        assert!(body.len() > 3_500_000);
        let reply = s.submit(&["bob@example.org"], &body).await;
        assert_eq!(
            (reply.code, reply.enhanced),
            (552, Some((5, 3, 4))),
            "{reply}"
        );
        assert!(s.graph.draft_log().is_empty());
        assert_eq!(s.graph.requests(), 0);
    }
}

#[tokio::test]
async fn test_channel_says_whether_the_upload_way_is_authorized() {
    let s = setup(DeliveryMode::Relay, None).await;
    let upstreams = mailgate::upstream::Upstreams::new(&s.config).unwrap();
    let mut steps = Vec::new();
    let mut step = |line: &str| steps.push(line.to_string());
    upstreams.test(0, &mut step).await.unwrap();
    assert!(
        steps
            .iter()
            .any(|l| l.contains("upload way authorized (Mail.ReadWrite)")),
        "{steps:#?}"
    );
    assert!(
        s.graph.open_drafts().is_empty(),
        "the test draft is deleted"
    );
    assert_eq!(s.graph.deleted().len(), 1);
    s.graph.fail(
        DraftStep::Create,
        Scripted::status(403, "ErrorAccessDenied"),
    );
    let mut steps = Vec::new();
    let mut step = |line: &str| steps.push(line.to_string());
    upstreams.test(0, &mut step).await.unwrap();
    assert!(
        steps
            .iter()
            .any(|l| l.contains("upload way NOT authorized") && l.contains("Mail.ReadWrite")),
        "{steps:#?}"
    );
    assert!(s.graph.sent_drafts().is_empty() && s.graph.sent().is_empty());
}
