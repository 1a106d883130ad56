//! A local Microsoft Graph stand-in for tests: a real HTTP/1.1 server on 127.0.0.1
//! (port 0) that serves `POST /v1.0/users/{mailbox}/sendMail` and `GET
//! /v1.0/users/{mailbox}` the way Graph does for a MIME message: it checks the bearer
//! token against the local [`TokenEndpoint`], wants `Content-Type: text/plain`, decodes
//! the base64 body, records the mailbox and the MIME, and answers `202`. Tests script
//! failures (429 with `Retry-After`, 401, 403, 400, 413, 503) for the next requests.

use std::collections::VecDeque;
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

#[derive(Default)]
struct State {
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
        let state = Arc::new(Mutex::new(State::default()));
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
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(400, "BadRequest", None),
    };
    let rest = path.strip_prefix("/v1.0/users/").unwrap_or("");
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
