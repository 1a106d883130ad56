//! The `graph` channel (SPEC §7): `POST {graph_url}/v1.0/users/{mailbox}/sendMail` with
//! the base64 of the exact message as a `text/plain` body and the channel's OAuth bearer
//! token; `202` means accepted.
//!
//! Graph takes the recipients from the message's headers, so the copy sent carries the
//! envelope recipients that no `To:`/`Cc:`/`Bcc:` names in an added `Bcc:` (Exchange
//! removes it), and a header address that is no envelope recipient fails the message
//! (the session refuses such a message after DATA already; this is the last guard).
//!
//! Memory: the message (at most the channel's `max_message_size`, 3,000,000 bytes by
//! default) is read whole, and its base64 (4/3 of that) is held for the request; with at
//! most `connections` requests at once per channel that is bounded (4 × ~7 MB by
//! default). Graph itself refuses a request over 4 MB, so streaming would buy nothing.
//!
//! Connections: one reqwest client per channel, HTTP/1.1 with keep-alive (its pool keeps
//! up to `connections` idle ones), and a semaphore so that at most `connections`
//! requests run at once. Every request has a timeout.

mod draft;
mod mime;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Semaphore;

use super::{Body, Error, Step};
use crate::config::GraphTarget;
use crate::http::{MAX_GRAPH_ANSWER, ReadError, read_limited};
use crate::message::Envelope;
use crate::message::recipients::{self, Unfit};
use crate::oauth::{AccessToken, ChannelToken};
use crate::reply::Reply;
pub use upload::DraftLedger;

/// Connect timeout of a Graph request (the whole request has the channel's timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A `Retry-After` longer than this is taken as this (a day): the queue's own give-up
/// time still applies.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// One graph channel: its endpoint, client, request cap and token cache.
pub(super) struct GraphChannel {
    pub(super) name: String,
    target: GraphTarget,
    client: crate::http::Client,
    /// One per request in flight; shared like an SMTP channel's slots (see `pool.rs`).
    pub(super) permits: Arc<Semaphore>,
    /// The channel's `connections`: the size of `permits`.
    pub(super) connections: usize,
    max_message_size: Option<u64>,
    pub(super) token: Option<ChannelToken>,
}

/// An HTTP answer: status, `Retry-After`, Graph's error code and message, `request-id`.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    code: String,
    message: String,
    request_id: Option<String>,
}

impl GraphChannel {
    /// The channel's client (through `https_proxy` or the environment's proxy, SPEC §7;
    /// no redirects: a bearer token is never re-sent elsewhere); connects lazily.
    pub(super) fn new(
        name: &str,
        target: &GraphTarget,
        connections: usize,
        max_message_size: Option<u64>,
        https_proxy: Option<&crate::http::ProxyUrl>,
    ) -> Result<Self, String> {
        let setup = |e| format!("cannot set up the HTTPS client for Microsoft Graph: {e}");
        let client = crate::http::client(https_proxy, |builder| {
            builder
                .http1_only()
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_max_idle_per_host(connections.max(1))
                .pool_idle_timeout(super::IDLE_TIMEOUT)
        })
        .map_err(setup)?;
        Ok(GraphChannel {
            name: name.to_string(),
            target: target.clone(),
            client,
            permits: Arc::new(Semaphore::new(connections.max(1))),
            connections,
            max_message_size,
            token: None,
        })
    }

    /// The mailbox's path: `{graph_url}/v1.0/users/{mailbox}` (the mailbox is checked at
    /// load to hold nothing a URL reads as structure; `@` is left as Graph documents it).
    fn user_url(&self) -> String {
        format!(
            "{}/v1.0/users/{}",
            self.target.graph_url(),
            self.target.mailbox
        )
    }

    /// Sends one message; `timeout` bounds every request.
    pub(super) async fn send(
        &self,
        envelope: &Envelope,
        body: Body<'_>,
        ledger: Option<&dyn DraftLedger>,
        timeout: Duration,
    ) -> Result<Reply, Error> {
        // The permit comes before the message is read: what a send holds in memory (the
        // message and its base64) is then bounded by `connections`, however many relay
        // sessions wait for a turn.
        let _permit = tokio::time::timeout(timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| Error::Timeout {
                step: Step::Connect,
            })?
            .map_err(|_| Error::local("Graph request permits closed"))?;
        let len = match body {
            Body::Bytes(bytes) => bytes.len() as u64,
            Body::File(path) => tokio::fs::metadata(path)
                .await
                .map_err(|e| Error::io("reading the message", e))?
                .len(),
        };
        if len > upload::SENDMAIL_MAX {
            if let Some(max) = self.max_message_size.filter(|max| len > *max) {
                return Err(self.too_big(max));
            }
            return self.send_large(envelope, body, ledger, timeout).await;
        }
        let message = self.read(body).await?;
        let (copy, added) =
            recipients::graph_copy(&envelope.recipients, &message).map_err(|unfit| {
                let reply = match unfit {
                    Unfit::Stranger { field, address } => {
                        Reply::header_recipient_not_in_envelope(field, &address, &self.name)
                    }
                    Unfit::Unwritable { address } => {
                        Reply::header_recipient_unwritable(&address, &self.name)
                    }
                    Unfit::Quoted { address } => {
                        Reply::quoted_recipient_for_graph(&address, &self.name)
                    }
                };
                Error::Rejected {
                    step: Step::EndOfData,
                    reply,
                }
            })?;
        // SPEC §4a: Exchange refuses `From: scan@x.com <scan@x.com>` as send-as; quoted, the
        // same name and address go through.
        let repaired = crate::message::rewrite::repair_from(&copy);
        let encoded =
            bytes::Bytes::from(base64::engine::general_purpose::STANDARD.encode(&*repaired));
        drop(repaired);
        drop(copy);
        drop(message);

        let cache = self.cache()?;
        let url = format!("{}/sendMail", self.user_url());
        let token = cache.access_token().await?;
        let mut answer = self.post(&url, &token, encoded.clone(), timeout).await?;
        if answer.status == 401 {
            tracing::info!(
                channel = %self.name,
                code = %answer.code,
                "Microsoft Graph refused the cached access token (401); refreshing it once"
            );
            let fresh = cache.force_refresh(&token).await?;
            answer = self.post(&url, &fresh, encoded, timeout).await?;
        }
        if answer.status == 202 {
            let id = answer
                .request_id
                .map(|id| format!(", request-id {id}"))
                .unwrap_or_default();
            let bcc = if added == 0 {
                String::new()
            } else {
                format!(", {added} recipient(s) added in Bcc:")
            };
            return Ok(Reply::new(
                250,
                (2, 0, 0),
                format!(
                    "Channel {}: accepted by Microsoft Graph (202{id}){bcc}",
                    self.name
                ),
            ));
        }
        Err(self.error(answer))
    }

    /// `mailgate test-channel`: a token, then `GET` on the mailbox's user; sends nothing.
    pub(super) async fn test(
        &self,
        step: &mut (dyn FnMut(&str) + Send),
        timeout: Duration,
    ) -> Result<(), Error> {
        let cache = self.cache()?;
        let grant = cache.settings().grant.name();
        step(&format!(
            "asking {} for an access token ({grant} grant, scope {})",
            cache.settings().token_url,
            cache.settings().scope
        ));
        let token = cache.access_token().await?;
        if let Some(left) = cache.expires_in().await {
            step(&format!(
                "OAuth access token obtained (expires in {} min)",
                left.as_secs() / 60
            ));
        }
        let url = self.user_url();
        step(&format!("GET {url}"));
        let mut answer = self.get(&url, &token, timeout).await?;
        if answer.status == 401 {
            step("Microsoft Graph refused the token (401): refreshing it and trying once more");
            let fresh = cache.force_refresh(&token).await?;
            answer = self.get(&url, &fresh, timeout).await?;
        }
        match answer.status {
            200 => {
                step(&format!(
                    "mailbox {} found; sendMail will post to {url}/sendMail",
                    self.target.mailbox
                ));
                Ok(())
            }
            403 => {
                step(&format!(
                    "GET on the user was refused (403 {}): an app with Mail.Send only may not read users, so the token works but the mailbox could not be checked without sending",
                    answer.code
                ));
                Ok(())
            }
            _ => Err(self.error(answer)),
        }
    }

    fn cache(&self) -> Result<&ChannelToken, Error> {
        self.token
            .as_ref()
            .ok_or_else(|| Error::local("graph channel without a token cache"))
    }

    /// The message bytes: at most the channel's `max_message_size`.
    async fn read(&self, body: Body<'_>) -> Result<Vec<u8>, Error> {
        let too_big = |len: u64| self.max_message_size.filter(|max| len > *max);
        match body {
            Body::Bytes(bytes) => {
                if let Some(max) = too_big(bytes.len() as u64) {
                    return Err(self.too_big(max));
                }
                Ok(bytes.to_vec())
            }
            Body::File(path) => {
                let len = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| Error::io("reading the message", e))?
                    .len();
                if let Some(max) = too_big(len) {
                    return Err(self.too_big(max));
                }
                tokio::fs::read(path)
                    .await
                    .map_err(|e| Error::io("reading the message", e))
            }
        }
    }

    fn too_big(&self, max: u64) -> Error {
        Error::Rejected {
            step: Step::EndOfData,
            reply: Reply::too_big(max),
        }
    }

    async fn post(
        &self,
        url: &str,
        token: &AccessToken,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let request = self
            .client
            .post(url)
            .bearer_auth(token.expose())
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .timeout(timeout)
            .body(body);
        self.answer(request, timeout).await
    }

    async fn get(
        &self,
        url: &str,
        token: &AccessToken,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let request = self
            .client
            .get(url)
            .bearer_auth(token.expose())
            .timeout(timeout);
        self.answer(request, timeout).await
    }

    /// Sends `request`; reads the status, `Retry-After`, `request-id` and the error's JSON.
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let target = self.target.graph_url().to_string();
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| network_error(&target, e))?;
        let status = response.status().as_u16();
        let (retry_after, request_id) = answer_headers(&response);
        let mut body = bytes::Bytes::new();
        if status != 202 {
            // Bounded (SPEC §7): an answer over the limit is a temporary error of Graph,
            // whatever its status says; a body that breaks off leaves the status to speak.
            match tokio::time::timeout(timeout, read_limited(response, MAX_GRAPH_ANSWER)).await {
                Ok(Ok(read)) => body = read,
                Ok(Err(ReadError::TooLarge { max })) => {
                    tracing::warn!(channel = %self.name, status, max, "Microsoft Graph's answer is over the limit; treated as a temporary error");
                    return Err(Error::Connect {
                        target,
                        source: std::io::Error::other(format!(
                            "Microsoft Graph answered HTTP {status} with more than {} MiB",
                            max / (1024 * 1024)
                        )),
                    });
                }
                Ok(Err(ReadError::Body(e))) => {
                    tracing::debug!(channel = %self.name, error = %e.without_url(), "reading Graph's error answer failed");
                }
                Err(_) => {
                    tracing::debug!(channel = %self.name, "reading Graph's error answer timed out");
                }
            }
        }
        let (code, message) = graph_error(&body);
        Ok(Answer {
            status,
            retry_after,
            code,
            message,
            request_id,
        })
    }

    /// The error for a non-202 answer: its class follows the status (SPEC §7).
    fn error(&self, answer: Answer) -> Error {
        let Answer {
            status,
            retry_after,
            code,
            message,
            ..
        } = answer;
        let reply = http_reply(&self.name, status, &code, &message, retry_after);
        Error::Graph {
            status,
            code,
            retry_after,
            reply,
        }
    }
}

/// The SMTP reply that stands for a Graph answer (for records, DSNs and relay clients).
pub(crate) fn http_reply(
    channel: &str,
    status: u16,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
) -> Reply {
    let what = match (code.is_empty(), message.is_empty()) {
        (true, true) => format!("HTTP {status}"),
        (false, true) => format!("HTTP {status} {code}"),
        (true, false) => format!("HTTP {status}: {message}"),
        (false, false) => format!("HTTP {status} {code}: {message}"),
    };
    let wait = retry_after
        .map(|d| format!("; retry after {}s", d.as_secs()))
        .unwrap_or_default();
    let text = |about: &str| format!("Channel {channel}: Microsoft Graph {about} ({what}){wait}");
    let recipient = code.to_ascii_lowercase().contains("recipient");
    match status {
        403 if code.eq_ignore_ascii_case("ErrorSendAsDenied") => Reply::new(
            554,
            (5, 2, 0),
            text("refused to send as the message's From:/Sender: (SendAsDenied)"),
        ),
        429 => Reply::new(451, (4, 7, 0), text("throttled the request")),
        407 => Reply::new(
            451,
            (4, 4, 0),
            format!(
                "Channel {channel}: the outbound proxy refused the request to Microsoft Graph (HTTP 407: check the user and password of https_proxy)"
            ),
        ),
        500..=599 => Reply::new(451, (4, 3, 0), text("is unavailable")),
        401 => Reply::new(535, (5, 7, 8), text("refused the access token")),
        403 => Reply::new(550, (5, 7, 1), text("denied access to the mailbox")),
        404 => Reply::new(550, (5, 1, 0), text("does not know the mailbox")),
        413 => Reply::new(552, (5, 3, 4), text("refused the message as too large")),
        400 if recipient => Reply::new(550, (5, 1, 1), text("refused a recipient")),
        400..=499 => Reply::new(554, (5, 6, 0), text("refused the message")),
        _ => Reply::new(451, (4, 3, 0), text("gave an unexpected answer")),
    }
}

/// A Graph request that got no answer: a timeout, or a connection (or proxy) failure
/// with `target` named. reqwest's text names the URL (the mailbox), never the token.
pub(super) fn network_error(target: &str, e: crate::http::SendError) -> Error {
    let what = match e {
        crate::http::SendError::Proxy(why) => why,
        crate::http::SendError::Http(e) if e.is_timeout() => {
            return Error::Timeout {
                step: Step::EndOfData,
            };
        }
        crate::http::SendError::Http(e) => match crate::http::proxy_refusal(&e) {
            Some(refusal) => refusal,
            None => e.without_url().to_string(),
        },
    };
    Error::Connect {
        target: target.to_string(),
        source: std::io::Error::other(what),
    }
}

/// An answer's `Retry-After` (SPEC §7) and `request-id` (control characters escaped).
pub(super) fn answer_headers(response: &reqwest::Response) -> (Option<Duration>, Option<String>) {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after").and_then(|v| parse_retry_after(&v));
    let request_id = header("request-id").map(|v| crate::text::escape_controls(&v).to_string());
    (retry_after, request_id)
}

/// Graph's error document, `{"error": {"code": "…", "message": "…"}}`: its code and the
/// first line of its message, shortened and with control characters escaped.
fn graph_error(body: &[u8]) -> (String, String) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (String::new(), String::new());
    };
    let field = |name: &str| {
        let text = json
            .pointer(&format!("/error/{name}"))
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let line: String = text
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        crate::text::escape_controls(&line).to_string()
    };
    (field("code"), field("message"))
}

/// `Retry-After`: seconds, or an HTTP date (RFC 9110 §10.2.3); at most a day.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        // Delta-seconds past u64: "a very long time", like any other over a day.
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => MAX_RETRY_AFTER,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Class;
    use crate::upstream::error::classify_http;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        let soon = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(&httpdate::fmt_http_date(soon)).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("184467440737095516150000"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-5"), None);
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn statuses_map_like_smtp_replies() {
        let table = [
            (429, Class::Transient, 451),
            (407, Class::Transient, 451),
            (503, Class::Transient, 451),
            (504, Class::Transient, 451),
            (401, Class::CredentialsBroken, 535),
            (403, Class::CredentialsBroken, 550),
            (404, Class::CredentialsBroken, 550),
            (400, Class::Permanent, 554),
            (413, Class::Permanent, 552),
        ];
        for (status, class, code) in table {
            assert_eq!(classify_http(status, ""), class, "{status}");
            assert_eq!(http_reply("g", status, "", "", None).code, code, "{status}");
        }
        assert_eq!(classify_http(403, "ErrorSendAsDenied"), Class::SenderDenied);
        let denied = http_reply("g", 403, "ErrorSendAsDenied", "", None);
        assert_eq!((denied.code, denied.enhanced), (554, Some((5, 2, 0))));
        let r = http_reply("g", 400, "ErrorInvalidRecipients", "bad\u{1b}[31m", None);
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some((5, 1, 1)));
        assert!(r.text.contains("ErrorInvalidRecipients"), "{r}");
        let throttled = http_reply(
            "g",
            429,
            "TooManyRequests",
            "",
            Some(Duration::from_secs(3)),
        );
        assert!(throttled.text.ends_with("retry after 3s"), "{throttled}");
    }

    #[tokio::test]
    async fn a_send_waiting_for_its_turn_holds_no_message_in_memory() {
        let target = GraphTarget {
            mailbox: "dave@example.com".into(),
            oauth: crate::config::oauth::placeholder_for_tests(),
        };
        let channel = GraphChannel::new("dave", &target, 1, Some(3_000_000), None).unwrap();
        let _busy = channel.permits.clone().acquire_owned().await.unwrap();
        // The message is not read while every request slot is taken: a missing file is
        // not even noticed before the wait for a slot times out.
        let envelope = Envelope {
            sender: "dave@example.com".into(),
            recipients: vec!["bob@example.org".into()],
            ..Default::default()
        };
        let missing = std::path::Path::new("/nonexistent/mailgate/graph-test.eml");
        let got = channel
            .send(
                &envelope,
                Body::File(missing),
                None,
                Duration::from_millis(50),
            )
            .await;
        assert!(
            matches!(
                got,
                Err(Error::Timeout {
                    step: Step::Connect
                })
            ),
            "{got:?}"
        );
    }

    #[test]
    fn graph_error_documents_are_read_and_cleaned() {
        let (code, message) = graph_error(
            br#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied.\nMore"}}"#,
        );
        assert_eq!(code, "ErrorAccessDenied");
        assert_eq!(message, "Access is denied.");
        assert_eq!(graph_error(b"<html>"), (String::new(), String::new()));
        let (_, m) = graph_error(br#"{"error":{"code":"X","message":"a\u001bb"}}"#);
        assert!(!m.contains('\u{1b}'), "{m:?}");
    }
}
