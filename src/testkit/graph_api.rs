//! A local Microsoft Graph stand-in for tests: a real HTTP/1.1 server on 127.0.0.1
//! (port 0) that serves `POST /v1.0/users/{mailbox}/sendMail` and `GET
//! /v1.0/users/{mailbox}` the way Graph does for a MIME message: it checks the bearer
//! token against the local [`TokenEndpoint`], wants `Content-Type: text/plain`, decodes
//! the base64 body, records the mailbox and the MIME, and answers `202`. Tests script
//! failures (429 with `Retry-After`, 401, 403, 400, 413, 503) for the next requests.
//!
//! The upload way (SPEC §7) as Graph serves it: drafts (`POST …/messages`, refused at
//! 4,000,000 bytes), attachments (`POST …/messages/{id}/attachments`), upload sessions
//! (`POST …/attachments/createUploadSession`, then `PUT`s to the returned `uploadUrl` that
//! enforce Graph's chunk rules and refuse any `Authorization` header), `POST
//! …/messages/{id}/send` and `DELETE …/messages/{id}`. [`GraphApi::fail`] scripts an
//! answer for the next request of one [`DraftStep`].

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::token_endpoint::TokenEndpoint;

/// One message Graph accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The `{mailbox}` of the request path.
    pub mailbox: String,
    /// The MIME message, base64-decoded.
    pub mime: Vec<u8>,
}

/// An answer the stand-in gives instead of accepting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// This status with a Graph error document carrying `code`, and `Retry-After` if given.
    Status {
        /// HTTP status.
        status: u16,
        /// `error.code`.
        code: String,
        /// `Retry-After` value, verbatim.
        retry_after: Option<String>,
    },
    /// This status with a valid Graph error document padded to `size` bytes.
    Oversized {
        /// HTTP status.
        status: u16,
        /// Length of the whole answer body.
        size: usize,
    },
}

impl Scripted {
    /// `status` with Graph's error `code`.
    pub fn status(status: u16, code: &str) -> Self {
        Scripted::Status {
            status,
            code: code.to_string(),
            retry_after: None,
        }
    }
    /// `429 TooManyRequests` with `Retry-After: retry_after`.
    pub fn throttled(retry_after: &str) -> Self {
        Scripted::Status {
            status: 429,
            code: "TooManyRequests".to_string(),
            retry_after: Some(retry_after.to_string()),
        }
    }
}

/// One request of the upload way, to script a failure for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DraftStep {
    /// `POST …/messages`.
    Create,
    /// `POST …/messages/{id}/attachments`.
    Attach,
    /// `POST …/attachments/createUploadSession`.
    Session,
    /// `PUT` to an `uploadUrl`.
    Put,
    /// `POST …/messages/{id}/send`.
    Send,
    /// `DELETE …/messages/{id}`.
    Delete,
}

/// An attachment of a draft, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// `name`.
    pub name: String,
    /// `contentType`.
    pub content_type: String,
    /// `isInline`.
    pub is_inline: bool,
    /// `contentId`.
    pub content_id: Option<String>,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// How it came: `"draft"`, `"post"` or `"upload"`.
    pub way: &'static str,
}

/// A draft message (open, or sent).
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// Its id.
    pub id: String,
    /// The `{mailbox}` of the request path.
    pub mailbox: String,
    /// The JSON it was created with (`attachments` removed: they are in `attached`).
    pub json: serde_json::Value,
    /// Its attachments, in order.
    pub attached: Vec<Attached>,
}

struct Upload {
    draft: String,
    item: Attached,
    size: u64,
}

#[derive(Default)]
struct State {
    base: String,
    drafts: HashMap<String, Draft>,
    sent_drafts: Vec<Draft>,
    deleted: Vec<String>,
    uploads: HashMap<String, Upload>,
    next_id: u64,
    fails: Vec<(DraftStep, Scripted)>,
    /// Sizes of the accepted `PUT` chunks.
    chunks: Vec<usize>,
    /// `PUT`s to an uploadUrl that carried an `Authorization` header.
    upload_auth: usize,
    /// Requests of the upload way, in order, as `"METHOD step"`.
    log: Vec<String>,
    script: VecDeque<Scripted>,
    sent: Vec<Sent>,
    /// sendMail requests, answered or not.
    requests: usize,
    /// Every bearer token presented.
    tokens: Vec<String>,
    /// Status of `GET /v1.0/users/{mailbox}` (200 unless set).
    get_status: Option<u16>,
    connections: usize,
    in_flight: usize,
    most_in_flight: usize,
    delay: Duration,
}

/// The stand-in. Dropping it stops the server.
pub struct GraphApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for GraphApi {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }
}

impl GraphApi {
    /// Starts the server; tokens are checked against `tokens`.
    pub async fn start(tokens: Arc<TokenEndpoint>) -> GraphApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State {
            base: format!("http://{addr}"),
            ..State::default()
        }));
        let server = tokio::spawn(serve(listener, state.clone(), tokens));
        GraphApi {
            addr,
            state,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:PORT`, the `graph_url` to configure.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Answers the next sendMail requests (in order) like this instead of accepting.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.with(|s| s.script.extend(answers));
    }
    /// The status of `GET` on a user (200, or e.g. 403 for an app with Mail.Send only).
    pub fn set_get_status(&self, status: u16) {
        self.with(|s| s.get_status = Some(status));
    }
    /// Holds each sendMail request this long before answering (concurrency tests).
    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.delay = delay);
    }
    /// Messages accepted so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.with(|s| s.sent.clone())
    }
    /// sendMail requests so far (accepted or not).
    pub fn requests(&self) -> usize {
        self.with(|s| s.requests)
    }
    /// Every bearer token presented so far.
    pub fn tokens(&self) -> Vec<String> {
        self.with(|s| s.tokens.clone())
    }
    /// TCP connections accepted so far (keep-alive reuses them).
    pub fn connections(&self) -> usize {
        self.with(|s| s.connections)
    }
    /// Answers the next request of `step` like this instead of serving it.
    pub fn fail(&self, step: DraftStep, answer: Scripted) {
        self.with(|s| s.fails.push((step, answer)));
    }
    /// Drafts created and neither sent nor deleted.
    pub fn open_drafts(&self) -> Vec<Draft> {
        self.with(|s| s.drafts.values().cloned().collect())
    }
    /// Drafts sent (`POST …/send` answered 202), in order.
    pub fn sent_drafts(&self) -> Vec<Draft> {
        self.with(|s| s.sent_drafts.clone())
    }
    /// Ids of the drafts deleted.
    pub fn deleted(&self) -> Vec<String> {
        self.with(|s| s.deleted.clone())
    }
    /// Sizes of the `PUT` chunks accepted.
    pub fn chunks(&self) -> Vec<usize> {
        self.with(|s| s.chunks.clone())
    }
    /// `PUT`s to an uploadUrl that carried an `Authorization` header (refused).
    pub fn upload_auth(&self) -> usize {
        self.with(|s| s.upload_auth)
    }
    /// The upload way's requests so far, e.g. `["create", "session", "put", "send"]`.
    pub fn draft_log(&self) -> Vec<String> {
        self.with(|s| s.log.clone())
    }
    /// Most sendMail requests in progress at once.
    pub fn most_in_flight(&self) -> usize {
        self.with(|s| s.most_in_flight)
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, tokens: Arc<TokenEndpoint>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.lock().unwrap().connections += 1;
        let (state, tokens) = (state.clone(), tokens.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (state, tokens) = (state.clone(), tokens.clone());
                async move { Ok::<_, Infallible>(handle(state, tokens, request).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

type Reply = Response<Full<Bytes>>;

fn error(status: u16, code: &str, retry_after: Option<&str>) -> Reply {
    let body = serde_json::json!({"error": {"code": code, "message": format!("stand-in answer {status}")}});
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("request-id", "standin-0001");
    if let Some(wait) = retry_after {
        builder = builder.header("retry-after", wait);
    }
    builder
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

async fn handle(
    state: Arc<Mutex<State>>,
    tokens: Arc<TokenEndpoint>,
    request: Request<Incoming>,
) -> Reply {
    let (method, path) = (
        request.method().as_str().to_string(),
        request.uri().path().to_string(),
    );
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let bearer = header("authorization")
        .strip_prefix("Bearer ")
        .unwrap_or("")
        .to_string();
    let content_type = header("content-type");
    let (authorization, content_range) = (header("authorization"), header("content-range"));
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(400, "BadRequest", None),
    };
    if let Some(token) = path.strip_prefix("/upload/") {
        let auth = !authorization.is_empty();
        return put_chunk(&state, token, &method, auth, &content_range, &body);
    }
    let rest = path.strip_prefix("/v1.0/users/").unwrap_or("");
    if let Some((mailbox, tail)) = rest.split_once('/')
        && tail != "sendMail"
    {
        let mailbox = mailbox.to_string();
        state.lock().unwrap().tokens.push(bearer.clone());
        if !tokens.is_valid(&bearer) {
            return error(401, "InvalidAuthenticationToken", None);
        }
        return draft_request(&state, &mailbox, &method, tail, &body);
    }
    let (mailbox, send) = match rest.strip_suffix("/sendMail") {
        Some(mailbox) => (mailbox.to_string(), true),
        None => (rest.to_string(), false),
    };
    if mailbox.is_empty() || mailbox.contains('/') {
        return error(404, "ResourceNotFound", None);
    }
    state.lock().unwrap().tokens.push(bearer.clone());
    if !tokens.is_valid(&bearer) {
        if send {
            state.lock().unwrap().requests += 1;
        }
        return error(401, "InvalidAuthenticationToken", None);
    }
    match (method.as_str(), send) {
        ("GET", false) => {
            let status = state.lock().unwrap().get_status.unwrap_or(200);
            if status == 200 {
                let user = serde_json::json!({"mail": mailbox, "userPrincipalName": mailbox});
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(user.to_string())))
                    .expect("response")
            } else {
                error(status, "ErrorAccessDenied", None)
            }
        }
        ("POST", true) => {
            let (scripted, delay) = {
                let mut s = state.lock().unwrap();
                s.requests += 1;
                s.in_flight += 1;
                s.most_in_flight = s.most_in_flight.max(s.in_flight);
                (s.script.pop_front(), s.delay)
            };
            tokio::time::sleep(delay).await;
            let answer = if let Some(Scripted::Status {
                status,
                code,
                retry_after,
            }) = scripted
            {
                error(status, &code, retry_after.as_deref())
            } else if let Some(Scripted::Oversized { status, size }) = scripted {
                let head =
                    r#"{"error":{"code":"ErrorInvalidRecipients","message":"x"},"padding":""#;
                let mut body = head.as_bytes().to_vec();
                body.resize(size.saturating_sub(2).max(body.len()), b' ');
                body.extend_from_slice(b"\"}");
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("response")
            } else if !content_type.starts_with("text/plain") {
                error(400, "ErrorMimeContentInvalid", None)
            } else {
                match base64::engine::general_purpose::STANDARD.decode(&body) {
                    Ok(mime) => {
                        state.lock().unwrap().sent.push(Sent { mailbox, mime });
                        Response::builder()
                            .status(202)
                            .header("request-id", "standin-0002")
                            .body(Full::new(Bytes::new()))
                            .expect("response")
                    }
                    Err(_) => error(400, "ErrorMimeContentInvalidBase64String", None),
                }
            };
            state.lock().unwrap().in_flight -= 1;
            answer
        }
        _ => error(405, "MethodNotAllowed", None),
    }
}

fn json_answer(status: u16, body: serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("request-id", "standin-0003")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn empty(status: u16) -> Reply {
    Response::builder()
        .status(status)
        .header("request-id", "standin-0004")
        .body(Full::new(Bytes::new()))
        .expect("response")
}

/// The scripted failure for `step`, if any (the first one queued for it).
fn scripted(state: &Mutex<State>, step: DraftStep) -> Option<Reply> {
    let mut s = state.lock().unwrap();
    s.log.push(format!("{step:?}").to_lowercase());
    let at = s.fails.iter().position(|(f, _)| *f == step)?;
    Some(match s.fails.remove(at).1 {
        Scripted::Status {
            status,
            code,
            retry_after,
        } => error(status, &code, retry_after.as_deref()),
        Scripted::Oversized { status, size } => {
            let mut body = br#"{"error":{"code":"X","message":"x"},"padding":""#.to_vec();
            body.resize(size.saturating_sub(2).max(body.len()), b' ');
            body.extend_from_slice(b"\"}");
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("response")
        }
    })
}

fn attached(v: &serde_json::Value, way: &'static str) -> Option<Attached> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.get("contentBytes")?.as_str()?)
        .ok()?;
    Some(Attached {
        name: v.get("name")?.as_str()?.to_string(),
        content_type: v.get("contentType")?.as_str()?.to_string(),
        is_inline: v.get("isInline").and_then(|b| b.as_bool()).unwrap_or(false),
        content_id: v
            .get("contentId")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        bytes,
        way,
    })
}

/// Graph's limit on one request (about 4 MB).
const MAX_REQUEST: usize = 4_000_000;

fn draft_request(
    state: &Mutex<State>,
    mailbox: &str,
    method: &str,
    tail: &str,
    body: &[u8],
) -> Reply {
    let parts: Vec<&str> = tail.split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", ["messages"]) => {
            if let Some(answer) = scripted(state, DraftStep::Create) {
                return answer;
            }
            if body.len() >= MAX_REQUEST {
                return error(413, "RequestEntityTooLarge", None);
            }
            let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(body) else {
                return error(400, "RequestBodyRead", None);
            };
            let mut list = Vec::new();
            if let Some(items) = json.get("attachments").and_then(|a| a.as_array()) {
                for item in items {
                    match attached(item, "draft") {
                        Some(a) => list.push(a),
                        None => return error(400, "ErrorInvalidAttachment", None),
                    }
                }
            }
            if let Some(obj) = json.as_object_mut() {
                obj.remove("attachments");
            }
            let mut s = state.lock().unwrap();
            s.next_id += 1;
            let id = format!("AAMkDraft{}=", s.next_id);
            s.drafts.insert(
                id.clone(),
                Draft {
                    id: id.clone(),
                    mailbox: mailbox.to_string(),
                    json: json.clone(),
                    attached: list,
                },
            );
            json["id"] = serde_json::json!(id);
            json["isDraft"] = serde_json::json!(true);
            json_answer(201, json)
        }
        ("POST", ["messages", id, "attachments"]) => {
            if let Some(answer) = scripted(state, DraftStep::Attach) {
                return answer;
            }
            if body.len() >= MAX_REQUEST {
                return error(413, "RequestEntityTooLarge", None);
            }
            let item = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| attached(&v, "post"));
            let mut s = state.lock().unwrap();
            match (item, s.drafts.get_mut(*id)) {
                (Some(item), Some(draft)) => {
                    draft.attached.push(item);
                    json_answer(201, serde_json::json!({"id": "att"}))
                }
                (None, _) => error(400, "ErrorInvalidAttachment", None),
                (_, None) => error(404, "ErrorItemNotFound", None),
            }
        }
        ("POST", ["messages", id, "attachments", "createUploadSession"]) => {
            if let Some(answer) = scripted(state, DraftStep::Session) {
                return answer;
            }
            let Some(item) = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("AttachmentItem").cloned())
            else {
                return error(400, "RequestBodyRead", None);
            };
            let size = item.get("size").and_then(|v| v.as_u64()).unwrap_or(0);
            let mut s = state.lock().unwrap();
            if !s.drafts.contains_key(*id) {
                return error(404, "ErrorItemNotFound", None);
            }
            if size < 3_000_000
                || item.get("attachmentType").and_then(|v| v.as_str()) != Some("file")
            {
                return error(400, "ErrorInvalidAttachment", None);
            }
            s.next_id += 1;
            let token = format!("session{}", s.next_id);
            let upload = Upload {
                draft: id.to_string(),
                size,
                item: Attached {
                    name: item["name"].as_str().unwrap_or("").to_string(),
                    content_type: item["contentType"].as_str().unwrap_or("").to_string(),
                    is_inline: item["isInline"].as_bool().unwrap_or(false),
                    content_id: item
                        .get("contentId")
                        .and_then(|c| c.as_str())
                        .map(str::to_string),
                    bytes: Vec::new(),
                    way: "upload",
                },
            };
            s.uploads.insert(token.clone(), upload);
            let url = format!("{}/upload/{token}", s.base);
            json_answer(
                201,
                serde_json::json!({"uploadUrl": url, "nextExpectedRanges": ["0-"]}),
            )
        }
        ("POST", ["messages", id, "send"]) => {
            if let Some(answer) = scripted(state, DraftStep::Send) {
                return answer;
            }
            let mut s = state.lock().unwrap();
            if s.uploads.values().any(|u| u.draft == *id) {
                return error(400, "ErrorAttachmentUploadIncomplete", None);
            }
            match s.drafts.remove(*id) {
                Some(draft) => {
                    s.sent_drafts.push(draft);
                    empty(202)
                }
                None => error(404, "ErrorItemNotFound", None),
            }
        }
        ("DELETE", ["messages", id]) => {
            if let Some(answer) = scripted(state, DraftStep::Delete) {
                return answer;
            }
            let mut s = state.lock().unwrap();
            s.uploads.retain(|_, u| u.draft != *id);
            match s.drafts.remove(*id) {
                Some(_) => {
                    s.deleted.push(id.to_string());
                    empty(204)
                }
                None => error(404, "ErrorItemNotFound", None),
            }
        }
        _ => error(405, "MethodNotAllowed", None),
    }
}

/// A `PUT` to an uploadUrl: Graph's chunk rules (at most 4 MiB, a multiple of 320 KiB
/// but the last, `Content-Range` in order), and no `Authorization` header.
fn put_chunk(
    state: &Mutex<State>,
    token: &str,
    method: &str,
    auth: bool,
    range: &str,
    body: &[u8],
) -> Reply {
    if method != "PUT" {
        return error(405, "MethodNotAllowed", None);
    }
    if let Some(answer) = scripted(state, DraftStep::Put) {
        return answer;
    }
    let mut s = state.lock().unwrap();
    if auth {
        s.upload_auth += 1;
        return error(401, "InvalidAuthenticationToken", None);
    }
    let parsed = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(span, total)| {
            let (a, b) = span.split_once('-')?;
            Some((
                a.parse::<u64>().ok()?,
                b.parse::<u64>().ok()?,
                total.parse::<u64>().ok()?,
            ))
        });
    let Some(upload) = s.uploads.get_mut(token) else {
        return error(404, "ItemNotFound", None);
    };
    let Some((first, last, total)) = parsed else {
        return error(400, "InvalidContentRange", None);
    };
    let len = body.len() as u64;
    let is_last = last.saturating_add(1) == total;
    let ok = total == upload.size
        && first == upload.item.bytes.len() as u64
        && last >= first
        && last - first + 1 == len
        && body.len() <= 4 * 1024 * 1024
        && (is_last || len.is_multiple_of(327_680));
    if !ok {
        return error(416, "InvalidRange", None);
    }
    upload.item.bytes.extend_from_slice(body);
    s.chunks.push(body.len());
    if !is_last {
        let next = last + 1;
        return json_answer(
            200,
            serde_json::json!({"nextExpectedRanges": [format!("{next}-")]}),
        );
    }
    let Some(upload) = s.uploads.remove(token) else {
        return error(404, "ItemNotFound", None);
    };
    match s.drafts.get_mut(&upload.draft) {
        Some(draft) => {
            draft.attached.push(upload.item);
            empty(201)
        }
        None => error(404, "ErrorItemNotFound", None),
    }
}
