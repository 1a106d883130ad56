//! The upload way of a graph channel (SPEC §7 "Large messages over Graph"), for a
//! message over `sendMail`'s 3,000,000 bytes: a draft (`POST …/messages`), its other
//! attachments (`POST …/attachments`, or an upload session and chunked `PUT`s to the
//! pre-authorized `uploadUrl`, never with the bearer token), then `POST …/send`.
//!
//! Memory: the message is never read whole. Its structure is scanned line by line
//! ([`super::mime`]); an attachment from 3,000,000 bytes on is decoded from the file one
//! chunk ([`draft::CHUNK`], 1.25 MiB) at a time; what is held at once is one draft request
//! (under 4,000,000 bytes) or one chunk, per request slot of the channel.
//!
//! Drafts: the draft's id is recorded ([`DraftLedger`], the spool entry's state in queue
//! mode) before the first attachment goes up; any failure deletes the draft, and the
//! next attempt first deletes the draft an earlier one left (a crash), so retries send
//! once and leave no drafts behind.

use std::future::Future;
use std::io::{self, BufReader, Read, Seek};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::draft::{self, Attachment, CHUNK, MAX_REQUEST, Plan, Refusal, SMALL_ATTACHMENT};
use super::mime::{self, Decoder, Leaf, Structure};
use super::{Answer, GraphChannel, answer_headers, graph_error, network_error};
use crate::message::Envelope;
use crate::message::recipients::Unfit;
use crate::oauth::AccessToken;
use crate::reply::Reply;
use crate::upstream::{Body, Error, Step};

/// Messages over this many bytes go the upload way.
pub const SENDMAIL_MAX: u64 = 3_000_000;
/// Decoded bytes held at once while an attachment's size is counted.
const COUNT_CHUNK: usize = 256 * 1024;

/// Where the draft of a message's attempt is recorded, so that it outlives a crash.
pub trait DraftLedger: Send + Sync {
    /// The draft an earlier attempt left behind, if any.
    fn left(&self) -> Option<String>;
    /// Records this attempt's draft (`Some`) or that there is none (`None`), durably.
    fn record<'a>(
        &'a self,
        draft: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;
}

trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// The message to read: the spool (or relay temp) file, or bytes in memory.
#[derive(Clone)]
enum Source {
    File(PathBuf),
    Bytes(Arc<Vec<u8>>),
}

impl Source {
    fn of(body: Body<'_>) -> Self {
        match body {
            Body::File(path) => Source::File(path.to_path_buf()),
            Body::Bytes(bytes) => Source::Bytes(Arc::new(bytes.to_vec())),
        }
    }

    fn open(&self) -> io::Result<Box<dyn ReadSeek>> {
        Ok(match self {
            Source::File(path) => Box::new(std::fs::File::open(path)?),
            Source::Bytes(bytes) => Box::new(io::Cursor::new(SharedBytes(bytes.clone()))),
        })
    }

    /// The decoded body of `leaf`, at most `max` bytes (`None` if it is longer).
    fn decode_all(
        &self,
        leaf: &Leaf,
        encoding: mime::Encoding,
        max: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut decoder = Decoder::new(self.open()?, leaf, encoding)?;
        let bytes = decoder.chunk(max.saturating_add(1))?;
        Ok((bytes.len() <= max).then_some(bytes))
    }

    /// The decoded size of `leaf`, read through once.
    fn decoded_len(&self, leaf: &Leaf, encoding: mime::Encoding) -> io::Result<u64> {
        let mut decoder = Decoder::new(self.open()?, leaf, encoding)?;
        let mut total = 0u64;
        // Bounded: each round consumes input, and the input is finite.
        loop {
            let n = decoder.chunk(COUNT_CHUNK)?.len();
            if n == 0 {
                return Ok(total);
            }
            total = total.saturating_add(n as u64);
        }
    }
}

struct SharedBytes(Arc<Vec<u8>>);
impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, Error> {
    crate::upstream::blocking(work)
        .await
        .map_err(|e| Error::io("reading the message for Microsoft Graph", e))
}

/// A Graph answer with its body (bounded).
struct Got {
    status: u16,
    retry_after: Option<Duration>,
    request_id: Option<String>,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The requests of one attempt: one token, refreshed once on a `401`.
struct Calls<'c> {
    ch: &'c GraphChannel,
    token: AccessToken,
    refreshed: bool,
    timeout: Duration,
}

impl<'c> Calls<'c> {
    async fn read(&self, request: reqwest::RequestBuilder) -> Result<Got, Error> {
        let target = self.ch.target.graph_url().to_string();
        let net = |e| network_error(&target, e);
        let response = self.ch.client.send(request).await.map_err(net)?;
        let status = response.status().as_u16();
        let (retry_after, request_id) = answer_headers(&response);
        let read = tokio::time::timeout(
            self.timeout,
            crate::http::read_limited(response, crate::http::MAX_GRAPH_ANSWER),
        )
        .await;
        let body = match read {
            Ok(Ok(body)) => body.to_vec(),
            Ok(Err(crate::http::ReadError::TooLarge { max })) => {
                return Err(Error::local(format!(
                    "Microsoft Graph answered with more than {max} bytes"
                )));
            }
            Ok(Err(crate::http::ReadError::Body(e))) => {
                return Err(net(crate::http::SendError::Http(e)));
            }
            Err(_) => {
                return Err(Error::Timeout {
                    step: Step::EndOfData,
                });
            }
        };
        Ok(Got {
            status,
            retry_after,
            request_id,
            body,
        })
    }

    /// An authorized request with a JSON body (or none); a `401` refreshes the token once.
    async fn call(
        &mut self,
        method: reqwest::Method,
        url: &str,
        body: Option<&[u8]>,
    ) -> Result<Got, Error> {
        // Two rounds at most: the second only after the one refresh.
        for _ in 0..2 {
            let mut request = self
                .ch
                .client
                .request(method.clone(), url)
                .bearer_auth(self.token.expose())
                .timeout(self.timeout);
            request = match body {
                Some(b) => request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.to_vec()),
                None => request.header(reqwest::header::CONTENT_LENGTH, "0"),
            };
            let got = self.read(request).await?;
            if got.status == 401 && !self.refreshed {
                tracing::info!(channel = %self.ch.name, "Microsoft Graph refused the cached access token (401); refreshing it once");
                self.refreshed = true;
                self.token = self.ch.cache()?.force_refresh(&self.token).await?;
                continue;
            }
            return Ok(got);
        }
        Err(Error::local(
            "Microsoft Graph request repeated after a refresh",
        ))
    }

    /// `got` if its status is one of `ok`, else its error classified as for sendMail.
    fn expect(&self, got: Got, ok: &[u16]) -> Result<Got, Error> {
        if ok.contains(&got.status) {
            return Ok(got);
        }
        let (code, message) = graph_error(&got.body);
        Err(self.ch.error(Answer {
            status: got.status,
            retry_after: got.retry_after,
            code,
            message,
            request_id: got.request_id,
        }))
    }

    /// Deletes a draft; `Ok` also when Graph no longer has it.
    async fn delete(&mut self, messages: &str, id: &str) -> Result<(), Error> {
        let url = format!("{messages}/{}", path_segment(id));
        let got = self.call(reqwest::Method::DELETE, &url, None).await?;
        self.expect(got, &[200, 202, 204, 404]).map(|_| ())
    }
}

/// A Graph id as one path segment: ids are base64url-ish, but whatever Graph sends is
/// percent-encoded so that it cannot add path structure.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'=') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How each attachment goes up.
enum Way {
    InDraft,
    Post,
    Session(u64),
}

impl GraphChannel {
    fn refusal(&self, refusal: Refusal) -> Error {
        let reply = match refusal {
            Refusal::Signed(ct) => Reply::signed_too_large_for_graph(&self.name, &ct, SENDMAIL_MAX),
            Refusal::Recipients(Unfit::Stranger { field, address }) => {
                Reply::header_recipient_not_in_envelope(field, &address, &self.name)
            }
            Refusal::Recipients(Unfit::Unwritable { address }) => {
                Reply::header_recipient_unwritable(&address, &self.name)
            }
            Refusal::Recipients(Unfit::Quoted { address }) => {
                Reply::quoted_recipient_for_graph(&address, &self.name)
            }
        };
        Error::Rejected {
            step: Step::EndOfData,
            reply,
        }
    }

    /// Sends a message over `sendMail`'s size the upload way (the caller holds a permit).
    pub(super) async fn send_large(
        &self,
        envelope: &Envelope,
        body: Body<'_>,
        ledger: Option<&dyn DraftLedger>,
        timeout: Duration,
    ) -> Result<Reply, Error> {
        let source = Source::of(body);
        let scanned = source.clone();
        let structure: Structure =
            blocking(move || mime::scan(BufReader::new(scanned.open()?))).await?;
        let plan = draft::plan(&structure, &envelope.recipients).map_err(|r| self.refusal(r))?;
        let Plan {
            draft: mut json,
            body: text,
            attachments,
        } = plan;
        if let Some((i, html)) = text {
            let leaf = structure
                .leaves
                .get(i)
                .cloned()
                .ok_or_else(|| Error::local("no body part"))?;
            let src = source.clone();
            let raw = blocking(move || {
                src.decode_all(&leaf, mime::Encoding::Identity, MAX_REQUEST)
                    .map(|raw| raw.map(|raw| (leaf, raw)))
            })
            .await?;
            let Some((leaf, raw)) = raw else {
                return Err(Error::Rejected {
                    step: Step::EndOfData,
                    reply: Reply::graph_body_too_large(&self.name, MAX_REQUEST),
                });
            };
            let content = draft::body_text(&leaf, &raw, html);
            json["body"] =
                json!({ "contentType": if html { "HTML" } else { "Text" }, "content": content });
        }
        // Which attachment goes which way: in the draft while it stays under 4,000,000
        // bytes (base64 is 4/3 of the bytes), small others by POST, large by session.
        let mut ways = Vec::with_capacity(attachments.len());
        let mut room =
            MAX_REQUEST.saturating_sub(serde_json::to_vec(&json).map_or(MAX_REQUEST, |v| v.len()));
        for a in &attachments {
            let leaf = structure
                .leaves
                .get(a.leaf)
                .cloned()
                .ok_or_else(|| Error::local("no attachment part"))?;
            let (src, encoding) = (source.clone(), a.encoding);
            let size = blocking(move || src.decoded_len(&leaf, encoding)).await?;
            let cost = usize::try_from(size.div_ceil(3).saturating_mul(4))
                .unwrap_or(usize::MAX)
                .saturating_add(a.name.len() + a.content_type.len() + 512);
            ways.push(if size >= SMALL_ATTACHMENT {
                Way::Session(size)
            } else if cost < room {
                room -= cost;
                Way::InDraft
            } else {
                Way::Post
            });
        }
        let mut inline = Vec::new();
        for (a, way) in attachments.iter().zip(&ways) {
            if matches!(way, Way::InDraft) {
                inline.push(self.attachment_json(&source, &structure, a).await?);
            }
        }
        if !inline.is_empty() {
            json["attachments"] = Value::Array(inline);
        }
        let draft_bytes = serde_json::to_vec(&json).map_err(|e| Error::local(e.to_string()))?;
        drop(json);

        let cache = self.cache()?;
        let mut calls = Calls {
            ch: self,
            token: cache.access_token().await?,
            refreshed: false,
            timeout,
        };
        let messages = format!("{}/messages", self.user_url());
        if let Some(left) = ledger.and_then(|l| l.left()) {
            tracing::info!(channel = %self.name, draft = %left, "Microsoft Graph: deleting the draft an earlier attempt left");
            calls.delete(&messages, &left).await?;
            if let Some(l) = ledger {
                l.record(None)
                    .await
                    .map_err(|e| Error::io("recording the Graph draft", e))?;
            }
        }
        let got = calls
            .call(reqwest::Method::POST, &messages, Some(&draft_bytes))
            .await?;
        drop(draft_bytes);
        let got = calls.expect(got, &[200, 201])?;
        let id = got
            .json()
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Error::local("Microsoft Graph created a draft without an id"))?;
        drop(got);
        let rest = async {
            if let Some(l) = ledger {
                l.record(Some(&id))
                    .await
                    .map_err(|e| Error::io("recording the Graph draft", e))?;
            }
            let message = format!("{messages}/{}", path_segment(&id));
            let mut uploaded = 0usize;
            for (a, way) in attachments.iter().zip(&ways) {
                match way {
                    Way::InDraft => {}
                    Way::Post => {
                        let body = serde_json::to_vec(
                            &self.attachment_json(&source, &structure, a).await?,
                        )
                        .map_err(|e| Error::local(e.to_string()))?;
                        let got = calls
                            .call(
                                reqwest::Method::POST,
                                &format!("{message}/attachments"),
                                Some(&body),
                            )
                            .await?;
                        calls.expect(got, &[200, 201])?;
                    }
                    Way::Session(size) => {
                        self.upload(&mut calls, &message, &source, &structure, a, *size)
                            .await?;
                        uploaded += 1;
                    }
                }
            }
            let got = calls
                .call(reqwest::Method::POST, &format!("{message}/send"), None)
                .await?;
            let got = calls.expect(got, &[202])?;
            Ok::<_, Error>((uploaded, got.request_id))
        }
        .await;
        match rest {
            Ok((uploaded, request_id)) => {
                if let Some(l) = ledger
                    && let Err(e) = l.record(None).await
                {
                    // Sent: the next attempt (if any) finds the draft gone and sends again,
                    // which is why this is only logged.
                    tracing::error!(channel = %self.name, error = %e, "cannot clear the recorded Graph draft");
                }
                let id = request_id
                    .map(|id| format!(", request-id {id}"))
                    .unwrap_or_default();
                Ok(Reply::new(
                    250,
                    (2, 0, 0),
                    format!(
                        "Channel {}: accepted by Microsoft Graph by draft and upload ({uploaded} attachment(s) by upload session; 202{id})",
                        self.name
                    ),
                ))
            }
            Err(error) => {
                match calls.delete(&messages, &id).await {
                    Ok(()) => {
                        if let Some(l) = ledger
                            && let Err(e) = l.record(None).await
                        {
                            tracing::warn!(channel = %self.name, error = %e, "cannot clear the recorded Graph draft (deleted already)");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(channel = %self.name, draft = %id, error = %e, "cannot delete the Graph draft; the next attempt deletes it")
                    }
                }
                Err(error)
            }
        }
    }

    /// The `fileAttachment` JSON of an attachment under 3,000,000 bytes.
    async fn attachment_json(
        &self,
        source: &Source,
        structure: &Structure,
        a: &Attachment,
    ) -> Result<Value, Error> {
        let leaf = structure
            .leaves
            .get(a.leaf)
            .cloned()
            .ok_or_else(|| Error::local("no attachment part"))?;
        let (src, encoding) = (source.clone(), a.encoding);
        let max = usize::try_from(SMALL_ATTACHMENT).unwrap_or(usize::MAX);
        let bytes = blocking(move || src.decode_all(&leaf, encoding, max))
            .await?
            .ok_or_else(|| Error::local("attachment grew between two reads"))?;
        Ok(draft::file_attachment(a, &bytes))
    }

    /// One attachment by upload session: chunks read from the message as they go up.
    async fn upload(
        &self,
        calls: &mut Calls<'_>,
        message: &str,
        source: &Source,
        structure: &Structure,
        a: &Attachment,
        size: u64,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(&draft::upload_session(a, size))
            .map_err(|e| Error::local(e.to_string()))?;
        let got = calls
            .call(
                reqwest::Method::POST,
                &format!("{message}/attachments/createUploadSession"),
                Some(&body),
            )
            .await?;
        let got = calls.expect(got, &[200, 201])?;
        let url = got
            .json()
            .get("uploadUrl")
            .and_then(Value::as_str)
            .map(str::to_string)
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .ok_or_else(|| {
                Error::local("Microsoft Graph created an upload session without an uploadUrl")
            })?;
        let leaf = structure
            .leaves
            .get(a.leaf)
            .cloned()
            .ok_or_else(|| Error::local("no attachment part"))?;
        let (src, encoding) = (source.clone(), a.encoding);
        let mut decoder = Some(blocking(move || Decoder::new(src.open()?, &leaf, encoding)).await?);
        let mut offset = 0u64;
        // Bounded by the size: each round sends at least one byte or stops.
        while offset < size {
            let mut d = decoder.take().ok_or_else(|| Error::local("decoder lost"))?;
            let (d, chunk) = blocking(move || {
                let chunk = d.chunk(CHUNK)?;
                Ok((d, chunk))
            })
            .await?;
            decoder = Some(d);
            if chunk.is_empty() || offset.saturating_add(chunk.len() as u64) > size {
                return Err(Error::local("attachment changed size while uploading"));
            }
            let range = draft::content_range(offset, chunk.len(), size);
            offset += chunk.len() as u64;
            // The uploadUrl is pre-authorized: no bearer token goes to it.
            let request = self
                .client
                .put(&url)
                .header(reqwest::header::CONTENT_RANGE, range)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .timeout(calls.timeout)
                .body(chunk);
            let got = calls.read(request).await?;
            let done = offset == size;
            calls.expect(got, if done { &[200, 201] } else { &[200, 202] })?;
        }
        Ok(())
    }

    /// `test-channel`: whether the upload way is authorized (`Mail.ReadWrite`): a draft
    /// is created and deleted again; nothing is sent.
    pub(crate) async fn test_upload(
        &self,
        step: &mut (dyn FnMut(&str) + Send),
        timeout: Duration,
    ) -> Result<(), Error> {
        let cache = self.cache()?;
        let mut calls = Calls {
            ch: self,
            token: cache.access_token().await?,
            refreshed: false,
            timeout,
        };
        let messages = format!("{}/messages", self.user_url());
        step(&format!(
            "POST {messages} (an empty draft, deleted at once: messages over {SENDMAIL_MAX} bytes go the upload way)"
        ));
        let draft = json!({ "subject": "mailgate test-channel (deleted at once)" });
        let body = serde_json::to_vec(&draft).map_err(|e| Error::local(e.to_string()))?;
        let got = calls
            .call(reqwest::Method::POST, &messages, Some(&body))
            .await?;
        match got.status {
            200 | 201 => {
                let id = got
                    .json()
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                if let Some(id) = id {
                    calls.delete(&messages, &id).await?;
                }
                step(
                    "upload way authorized (Mail.ReadWrite): large messages can go by draft and upload session",
                );
                Ok(())
            }
            401 | 403 => {
                let (code, _) = graph_error(&got.body);
                step(&format!(
                    "upload way NOT authorized ({} {code}): grant the app Mail.ReadWrite, or messages over {SENDMAIL_MAX} bytes fail",
                    got.status
                ));
                Ok(())
            }
            _ => Err(calls
                .expect(got, &[])
                .err()
                .unwrap_or_else(|| Error::local("unexpected answer"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(path_segment("AAMk-AD_x="), "AAMk-AD_x=");
        assert_eq!(path_segment("a/../b?c"), "a%2F..%2Fb%3Fc");
    }
}
