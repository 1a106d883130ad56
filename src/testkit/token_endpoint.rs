//! A local OAuth 2.0 provider for tests: a real HTTP server on 127.0.0.1 (port 0) with a
//! token endpoint (refresh-token, client-credentials, authorization-code + PKCE and
//! device-code grants), a device-authorization endpoint and an authorization endpoint
//! that redirects like a browser sign-in would. Nothing contacts a real provider.
//!
//! Tests steer it (token lifetime, rotation, failures, going down) and ask it questions
//! (requests per grant, "is this access token valid and unexpired").

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The client id the endpoint accepts.
pub const CLIENT_ID: &str = "test-client-id";
/// The client secret the endpoint accepts.
pub const CLIENT_SECRET: &str = "test-client-secret-s3cr3t";
/// A refresh token that is valid from the start.
pub const INITIAL_REFRESH_TOKEN: &str = "rt-initial-0f1e2d3c";

/// What the token endpoint does instead of issuing tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answer this HTTP status (e.g. 503, 429) with an empty JSON object.
    Status(u16),
    /// Answer `400 {"error": "invalid_grant"}` to every grant.
    InvalidGrant,
    /// Accept the request and never answer (client timeouts).
    Hang,
    /// Answer this HTTP status after this long (callers that arrive meanwhile wait).
    SlowStatus(u16, Duration),
    /// Answer `200` with a valid token document padded to this many bytes, sent chunked
    /// (no `Content-Length`) in 64 KiB pieces: a client must stop reading at its limit.
    Oversized(usize),
}

/// The local provider. Dropping it stops the server.
pub struct TokenEndpoint {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: Mutex<Option<JoinHandle<()>>>,
}

struct State {
    lifetime: Duration,
    /// `expires_in` put in token answers instead of the lifetime (hostile values).
    expires_in: Option<u64>,
    rotate: bool,
    failure: Option<Failure>,
    refresh_tokens: HashSet<String>,
    access_tokens: HashMap<String, Instant>,
    requests: HashMap<String, usize>,
    serial: u64,
    /// Everything secret the endpoint handed out or knows, for leak checks.
    secrets: Vec<String>,
    device: Device,
    codes: HashMap<String, PendingCode>,
}

struct Device {
    interval: u64,
    expires_in: u64,
    pending: usize,
    slow_down_sent: bool,
    polls: Vec<Instant>,
    device_code: Option<String>,
}

struct PendingCode {
    challenge: String,
    redirect_uri: String,
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.down();
    }
}

type Body = http_body_util::Either<Full<Bytes>, Padded>;
type Reply = Response<Body>;

/// A JSON document streamed in 64 KiB chunks, of unknown length (chunked): `head`, then
/// spaces inside a string, then `"}`, `size` bytes in all.
pub struct Padded {
    head: Option<Bytes>,
    left: usize,
}

impl Padded {
    fn new(head: String, size: usize) -> Self {
        let left = size.saturating_sub(head.len());
        Padded {
            head: Some(Bytes::from(head)),
            left,
        }
    }
}

impl hyper::body::Body for Padded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        const PIECE: usize = 64 * 1024;
        if let Some(head) = self.head.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(head))));
        }
        let chunk = match self.left {
            0 => return std::task::Poll::Ready(None),
            n if n <= 2 => Bytes::from_static(b"\"}"),
            n => Bytes::from(vec![b' '; (n - 2).min(PIECE)]),
        };
        self.left = self.left.saturating_sub(chunk.len());
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }
}

impl TokenEndpoint {
    /// Starts the server: tokens live an hour, refresh tokens do not rotate, the device
    /// flow answers `authorization_pending` twice, then `slow_down` once, then succeeds.
    pub async fn start() -> TokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State {
            lifetime: Duration::from_secs(3600),
            expires_in: None,
            rotate: false,
            failure: None,
            refresh_tokens: HashSet::from([INITIAL_REFRESH_TOKEN.to_string()]),
            access_tokens: HashMap::new(),
            requests: HashMap::new(),
            serial: 0,
            secrets: vec![CLIENT_SECRET.to_string(), INITIAL_REFRESH_TOKEN.to_string()],
            device: Device {
                interval: 0,
                expires_in: 900,
                pending: 2,
                slow_down_sent: false,
                polls: Vec::new(),
                device_code: None,
            },
            codes: HashMap::new(),
        }));
        let server = tokio::spawn(serve(listener, state.clone()));
        TokenEndpoint {
            addr,
            state,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }
    /// `http://127.0.0.1:PORT/device`.
    pub fn device_url(&self) -> String {
        format!("http://{}/device", self.addr)
    }
    /// `http://127.0.0.1:PORT/authorize`.
    pub fn auth_url(&self) -> String {
        format!("http://{}/authorize", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Lifetime (`expires_in`) of the access tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.with(|s| s.lifetime = lifetime);
    }
    /// The `expires_in` written in token answers from now on, whatever the tokens' real
    /// lifetime (`None`: the lifetime), e.g. `u64::MAX`.
    pub fn set_expires_in(&self, expires_in: Option<u64>) {
        self.with(|s| s.expires_in = expires_in);
    }
    /// The `expires_in` of the device endpoint's answers (900 unless set).
    pub fn set_device_expires_in(&self, expires_in: u64) {
        self.with(|s| s.device.expires_in = expires_in);
    }
    /// Rotate: every refresh issues a new refresh token and revokes the one used.
    pub fn set_rotate(&self, rotate: bool) {
        self.with(|s| s.rotate = rotate);
    }
    /// Makes the token endpoint fail (or, with `None`, work again).
    pub fn set_failure(&self, failure: Option<Failure>) {
        self.with(|s| s.failure = failure);
    }
    /// Device flow: the polling interval it asks for, and how many `authorization_pending`
    /// answers come before the one `slow_down`.
    pub fn set_device(&self, interval_secs: u64, pending: usize) {
        self.with(|s| {
            s.device.interval = interval_secs;
            s.device.pending = pending;
        });
    }
    /// Makes a refresh token valid.
    pub fn add_refresh_token(&self, token: &str) {
        self.with(|s| {
            s.refresh_tokens.insert(token.to_string());
            s.secrets.push(token.to_string());
        });
    }
    /// Stops the server: connections in progress are cut, new ones are refused.
    pub fn down(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }

    /// Token-endpoint requests so far with this `grant_type` (`refresh_token`,
    /// `client_credentials`, `authorization_code`, `device_code` for the RFC 8628 URN).
    pub fn requests(&self, grant: &str) -> usize {
        self.with(|s| s.requests.get(grant).copied().unwrap_or(0))
    }
    /// Whether `token` was issued here and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        self.with(|s| {
            s.access_tokens
                .get(token)
                .is_some_and(|&at| at > Instant::now())
        })
    }
    /// Whether `token` is a refresh token the endpoint currently accepts.
    pub fn refresh_token_is_valid(&self, token: &str) -> bool {
        self.with(|s| s.refresh_tokens.contains(token))
    }
    /// When each device-code poll arrived.
    pub fn device_polls(&self) -> Vec<Instant> {
        self.with(|s| s.device.polls.clone())
    }
    /// Every secret the endpoint knows or issued (client secret, refresh and access tokens,
    /// device and authorization codes): none may appear in logs or output.
    pub fn secrets(&self) -> Vec<String> {
        self.with(|s| s.secrets.clone())
    }

    /// What a browser sign-in does with an authorization URL: checks it and returns the
    /// redirect URL (`redirect_uri?code=…&state=…`), or an error text.
    pub fn sign_in(&self, authorization_url: &str) -> Result<String, String> {
        let url = reqwest::Url::parse(authorization_url).map_err(|e| e.to_string())?;
        let query: HashMap<String, String> = url.query_pairs().into_owned().collect();
        self.with(|s| authorize(s, &query))
    }
}

/// Accepts connections until aborted; aborting drops the JoinSet, cutting every connection.
async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, request).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::Left(Full::new(Bytes::from(body.to_string()))))
        .expect("response")
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Reply {
    json(
        status,
        serde_json::json!({ "error": code, "error_description": description }),
    )
}

async fn handle(state: Arc<Mutex<State>>, request: Request<Incoming>) -> Reply {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            );
        }
    };
    let form = |text: &str| -> HashMap<String, String> {
        reqwest::Url::parse(&format!("http://x/?{text}"))
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default()
    };
    match (method.as_str(), path.as_str()) {
        ("POST", "/token") => {
            let params = form(&String::from_utf8_lossy(&body));
            let failure = {
                let mut s = state.lock().unwrap();
                let grant = params.get("grant_type").cloned().unwrap_or_default();
                let grant = grant.rsplit(':').next().unwrap_or("").to_string();
                *s.requests.entry(grant).or_default() += 1;
                s.failure
            };
            match failure {
                Some(Failure::Hang) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({}))
                }
                Some(Failure::SlowStatus(code, delay)) => {
                    tokio::time::sleep(delay).await;
                    json(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        serde_json::json!({}),
                    )
                }
                Some(Failure::Oversized(size)) => {
                    let head =
                        serde_json::json!({"access_token": "at-oversized", "expires_in": 3600})
                            .to_string();
                    let head = head.trim_end_matches('}').to_string() + ",\"padding\":\"";
                    Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .body(Body::Right(Padded::new(head, size)))
                        .expect("response")
                }
                Some(Failure::Status(code)) => json(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    serde_json::json!({}),
                ),
                Some(Failure::InvalidGrant) => {
                    // Echoes what it was sent, as a careless provider might: callers must scrub.
                    let sent = params.get("refresh_token").cloned().unwrap_or_default();
                    oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        &format!(
                            "AADSTS70000: the refresh token {sent} was revoked.\nTrace ID: 1234"
                        ),
                    )
                }
                None => token(&mut state.lock().unwrap(), &params),
            }
        }
        ("POST", "/device") => {
            let params = form(&String::from_utf8_lossy(&body));
            let mut s = state.lock().unwrap();
            if params.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", "unknown client");
            }
            let device_code = format!("dc-{}", random_hex());
            s.secrets.push(device_code.clone());
            s.device.device_code = Some(device_code.clone());
            s.device.slow_down_sent = false;
            json(
                StatusCode::OK,
                serde_json::json!({
                    "device_code": device_code,
                    "user_code": "WDJB-MJHT",
                    "verification_uri": "https://microsoft.example/devicelogin",
                    "expires_in": s.device.expires_in,
                    "interval": s.device.interval,
                }),
            )
        }
        ("GET", "/authorize") => {
            let params = form(&query);
            match authorize(&mut state.lock().unwrap(), &params) {
                Ok(location) => Response::builder()
                    .status(StatusCode::FOUND)
                    .header("location", location)
                    .body(Body::Left(Full::new(Bytes::new())))
                    .expect("response"),
                Err(text) => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &text),
            }
        }
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({})),
    }
}

fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn issue(s: &mut State, with_refresh_token: bool) -> Reply {
    s.serial += 1;
    let access = format!("at-{}-{}", s.serial, random_hex());
    s.access_tokens
        .insert(access.clone(), Instant::now() + s.lifetime);
    s.secrets.push(access.clone());
    let mut body = serde_json::json!({
        "token_type": "Bearer",
        "access_token": access,
        "expires_in": s.expires_in.unwrap_or(s.lifetime.as_secs()),
    });
    if with_refresh_token {
        let refresh = format!("rt-{}-{}", s.serial, random_hex());
        s.refresh_tokens.insert(refresh.clone());
        s.secrets.push(refresh.clone());
        body["refresh_token"] = refresh.into();
    }
    json(StatusCode::OK, body)
}

fn token(s: &mut State, params: &HashMap<String, String>) -> Reply {
    let get = |key: &str| params.get(key).map(String::as_str);
    if get("client_id") != Some(CLIENT_ID) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "unknown client_id",
        );
    }
    if get("client_secret").is_some_and(|secret| secret != CLIENT_SECRET) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "wrong client_secret",
        );
    }
    match get("grant_type").unwrap_or("") {
        "refresh_token" => {
            let used = get("refresh_token").unwrap_or("");
            if !s.refresh_tokens.contains(used) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown or revoked refresh token",
                );
            }
            if s.rotate {
                s.refresh_tokens.remove(used);
            }
            let rotate = s.rotate;
            issue(s, rotate)
        }
        "client_credentials" => {
            if get("client_secret").is_none() {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client_secret required",
                );
            }
            if get("scope").is_none_or(str::is_empty) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", "scope required");
            }
            issue(s, false)
        }
        "authorization_code" => {
            let Some(pending) = get("code").and_then(|code| s.codes.remove(code)) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown or used code",
                );
            };
            if get("client_secret").is_none() {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client_secret required",
                );
            }
            if get("redirect_uri") != Some(pending.redirect_uri.as_str()) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "redirect_uri mismatch",
                );
            }
            let verifier = get("code_verifier").unwrap_or("");
            let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
            let challenge =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
            if verifier.len() < 43 || challenge != pending.challenge {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "PKCE verification failed",
                );
            }
            issue(s, true)
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            s.device.polls.push(Instant::now());
            if get("device_code").is_none() || get("device_code") != s.device.device_code.as_deref()
            {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "expired_token",
                    "unknown device code",
                );
            }
            if s.device.pending > 0 {
                s.device.pending -= 1;
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "authorization_pending",
                    "waiting for the user",
                );
            }
            if !s.device.slow_down_sent {
                s.device.slow_down_sent = true;
                return oauth_error(StatusCode::BAD_REQUEST, "slow_down", "polling too fast");
            }
            s.device.device_code = None;
            issue(s, true)
        }
        other => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("grant_type {other:?}"),
        ),
    }
}

/// The sign-in: validates the authorization request, hands out a code bound to its PKCE
/// challenge and redirect URI, and returns the redirect URL.
fn authorize(s: &mut State, query: &HashMap<String, String>) -> Result<String, String> {
    let get = |key: &str| query.get(key).map(String::as_str);
    if get("client_id") != Some(CLIENT_ID) {
        return Err("unknown client_id".into());
    }
    if get("response_type") != Some("code") {
        return Err("response_type must be code".into());
    }
    if get("code_challenge_method") != Some("S256") {
        return Err("code_challenge_method must be S256".into());
    }
    let challenge = get("code_challenge").ok_or("no code_challenge")?;
    let redirect_uri = get("redirect_uri").ok_or("no redirect_uri")?;
    let state = get("state").ok_or("no state")?;
    let code = format!("code-{}", random_hex());
    s.secrets.push(code.clone());
    s.codes.insert(
        code.clone(),
        PendingCode {
            challenge: challenge.to_string(),
            redirect_uri: redirect_uri.to_string(),
        },
    );
    let mut location = reqwest::Url::parse(redirect_uri).map_err(|e| e.to_string())?;
    location
        .query_pairs_mut()
        .append_pair("state", state)
        .append_pair("code", &code)
        .append_pair("scope", get("scope").unwrap_or(""));
    Ok(location.to_string())
}
