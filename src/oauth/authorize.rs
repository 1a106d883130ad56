//! `mailgate oauth authorize NAME` on a headless machine: Microsoft's device-code flow
//! (RFC 8628), Google's loopback redirect with PKCE (RFC 7636, RFC 8252). The flows talk
//! to an injected reader (the user's input) and writer (what the user reads).

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::Http;
use super::endpoint::{self, Failure};
use super::store;
use crate::config::Secret;
use crate::config::oauth::{Grant, OAuth, Provider};
use crate::state::tokens::TokenStore;

/// How long the user has to finish signing in on the Google flow.
const USER_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long one connection to the loopback listener may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// RFC 8628 §3.5: `slow_down` adds 5 seconds to the polling interval.
const SLOW_DOWN: Duration = Duration::from_secs(5);

/// What [`authorize`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorized {
    /// A refresh token was obtained and stored there (a path or the store's location).
    Stored {
        /// Where the refresh token now is.
        location: String,
    },
    /// A client-credentials channel has nothing to authorize: one token was fetched to
    /// prove the credentials work.
    CredentialsWork {
        /// The fetched token's lifetime.
        expires_in: Duration,
    },
}

/// Runs the flow for channel `channel` and stores the refresh token (its
/// `refresh_token_file`, else `store`). Instructions go to `output`; `input` is where the
/// user may paste the final redirect URL (Google). Errors are one line, without secrets.
pub async fn authorize<R, W>(
    channel: &str,
    settings: &OAuth,
    http: &Http,
    store: &dyn TokenStore,
    input: R,
    output: &mut W,
) -> Result<Authorized, String>
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    let secret = settings.client_secret.as_ref().map_or("", Secret::expose);
    let failed = |f: Failure| f.into_error(channel, settings, &[secret]).to_string();
    match (settings.grant, settings.provider) {
        (Grant::ClientCredentials, _) => {
            let issued = endpoint::client_credentials_grant(http, settings)
                .await
                .map_err(failed)?;
            say(
                output,
                format_args!(
                    "channel {channel} uses the client-credentials grant: there is nothing to \
                     authorize. Fetched an access token (valid {} s): the credentials work.",
                    issued.expires_in.as_secs()
                ),
            )?;
            Ok(Authorized::CredentialsWork {
                expires_in: issued.expires_in,
            })
        }
        (Grant::RefreshToken, provider) => {
            let flow = match provider {
                Provider::Microsoft => device_flow(http, settings, output).await,
                Provider::Google => loopback_flow(http, settings, input, output).await,
            };
            let token = flow.map_err(|e| match e {
                FlowError::Endpoint(f) => failed(f),
                FlowError::Other(text) => format!("channel {channel}: {text}"),
            })?;
            stored(channel, settings, store, &token, output).await
        }
    }
}

enum FlowError {
    Endpoint(Failure),
    Other(String),
}

impl From<Failure> for FlowError {
    fn from(f: Failure) -> Self {
        FlowError::Endpoint(f)
    }
}

impl From<String> for FlowError {
    fn from(text: String) -> Self {
        FlowError::Other(text)
    }
}

fn say(output: &mut impl Write, line: std::fmt::Arguments<'_>) -> Result<(), String> {
    writeln!(output, "{line}")
        .and_then(|()| output.flush())
        .map_err(|e| format!("cannot write to the terminal: {e}"))
}

async fn stored(
    channel: &str,
    settings: &OAuth,
    store: &dyn TokenStore,
    token: &Secret,
    output: &mut impl Write,
) -> Result<Authorized, String> {
    let location = store::save_refresh_token(channel, settings, store, token).await?;
    say(
        output,
        format_args!("channel {channel}: refresh token stored in {location}"),
    )?;
    Ok(Authorized::Stored { location })
}

/// RFC 8628: show the code, poll until the user has signed in.
async fn device_flow(
    http: &Http,
    settings: &OAuth,
    output: &mut impl Write,
) -> Result<Secret, FlowError> {
    let start = endpoint::device_start(http, settings).await?;
    say(
        output,
        format_args!(
            "To sign in, open {} in a browser (on any device) and enter the code {}\n\
             Waiting for the sign-in (the code is valid for {} minutes)…",
            start.verification_uri,
            start.user_code,
            start.expires_in.as_secs().div_ceil(60)
        ),
    )?;
    // Both clamped by `device_start`; the checked sum is for the type's sake.
    let deadline = Instant::now()
        .checked_add(start.expires_in)
        .ok_or_else(|| "the device code's lifetime is out of range".to_string())?;
    let mut interval = start.interval.max(endpoint::MIN_INTERVAL);
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Err(
                "the code expired before the sign-in finished; run the command again"
                    .to_string()
                    .into(),
            );
        }
        match endpoint::device_poll(http, settings, &start.device_code).await {
            Ok(issued) => {
                return issued.refresh_token.ok_or_else(|| {
                    "the sign-in worked but no refresh token was issued: the scope must include offline_access"
                        .to_string()
                        .into()
                });
            }
            Err(Failure::OAuth { code, .. }) if code == "authorization_pending" => {}
            Err(Failure::OAuth { code, .. }) if code == "slow_down" => {
                interval = interval
                    .saturating_add(SLOW_DOWN)
                    .min(endpoint::MAX_INTERVAL);
            }
            Err(Failure::OAuth { code, .. }) if code == "expired_token" => {
                return Err(
                    "the code expired before the sign-in finished; run the command again"
                        .to_string()
                        .into(),
                );
            }
            Err(Failure::OAuth { code, .. }) if code == "access_denied" => {
                return Err("the sign-in was declined (access_denied)"
                    .to_string()
                    .into());
            }
            Err(Failure::Transient(reason)) => {
                say(
                    output,
                    format_args!("token endpoint: {reason}; still waiting"),
                )?;
            }
            Err(other) => return Err(other.into()),
        }
    }
}

/// A random URL-safe string of `bytes` random bytes.
fn random_urlsafe(bytes: usize) -> String {
    let random: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
}

/// RFC 7636 S256: BASE64URL(SHA256(verifier)).
pub(crate) fn pkce_challenge(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Google: authorization URL printed, redirect caught on 127.0.0.1 or pasted, code exchanged.
async fn loopback_flow<R: AsyncBufRead + Unpin>(
    http: &Http,
    settings: &OAuth,
    input: R,
    output: &mut impl Write,
) -> Result<Secret, FlowError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1 for the redirect: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on 127.0.0.1 for the redirect: {e}"))?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/");
    let verifier = Secret::new(random_urlsafe(48));
    let state = random_urlsafe(24);
    let mut url = reqwest::Url::parse(&settings.auth_url)
        .map_err(|e| format!("auth_url {:?}: {e}", settings.auth_url))?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &settings.client_id)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", &settings.scope)
        .append_pair("state", &state)
        .append_pair("code_challenge", &pkce_challenge(verifier.expose()))
        .append_pair("code_challenge_method", "S256")
        .append_pair("access_type", "offline")
        .append_pair("prompt", "consent");
    say(
        output,
        format_args!(
            "Open this URL in a browser and sign in as the channel's mailbox:\n\n  {url}\n\n\
             The browser is then sent to {redirect_uri}. If that browser runs on another machine \
             (this one is headless, or you are on SSH), the page will not load: copy the whole \
             address from its address bar and paste it here, then press Enter.\n\
             Waiting for the redirect…"
        ),
    )?;
    let code = wait_for_code(listener, input, &state, output).await?;
    let issued = endpoint::code_grant(http, settings, &code, &redirect_uri, &verifier).await?;
    issued.refresh_token.ok_or_else(|| {
        "Google issued no refresh token: remove mailgate's access at \
         https://myaccount.google.com/permissions and run the command again"
            .to_string()
            .into()
    })
}

/// Waits for the redirect: the browser reaching the listener, or the user pasting its URL.
/// A request to the listener without our `state` is answered 400 and ignored; the first
/// with it decides. A pasted URL with a wrong `state` is refused (the user sees why).
async fn wait_for_code<R: AsyncBufRead + Unpin>(
    listener: TcpListener,
    input: R,
    state: &str,
    output: &mut impl Write,
) -> Result<String, String> {
    let (requests, mut received) = mpsc::channel::<(String, TcpStream)>(4);
    let mut lines = input.lines();
    let mut input_open = true;
    let mut ignored_one = false;
    let deadline = tokio::time::sleep(USER_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    // A browser may open connections it never uses: read each on its own.
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        if let Ok(Some((target, stream))) =
                            tokio::time::timeout(REQUEST_TIMEOUT, read_request(stream)).await
                        {
                            let _ = requests.send((target, stream)).await;
                        }
                    });
                }
            }
            Some((target, mut stream)) = received.recv() => {
                let Some(query) = query_of(&format!("http://127.0.0.1{target}")) else {
                    respond(&mut stream, "404 Not Found", "Not found.").await;
                    continue;
                };
                if !query.iter().any(|(k, _)| k == "state" || k == "code" || k == "error") {
                    respond(&mut stream, "404 Not Found", "Not found.").await;
                    continue;
                }
                // Anything on this machine can reach the listener: a request without our
                // state is not the redirect, and must not end the wait (a local denial of
                // service). The user's own paste is judged as it is, below.
                let ours = query.iter().any(|(k, v)| k == "state" && v == state);
                if !ours {
                    respond(&mut stream, "400 Bad Request", "mailgate: not the redirect of this sign-in; ignored.").await;
                    // Said once: a flood of such requests must not flood the terminal.
                    if !ignored_one {
                        ignored_one = true;
                        say(output, format_args!(
                            "ignored a request to the redirect listener with a wrong or missing state; still waiting"
                        ))?;
                    }
                    continue;
                }
                let verdict = judge(&query, state);
                let page = match &verdict {
                    Ok(_) => ("200 OK", "mailgate: authorization received. You may close this page."),
                    Err(_) => ("400 Bad Request", "mailgate: authorization refused; see the terminal."),
                };
                respond(&mut stream, page.0, page.1).await;
                return verdict;
            }
            line = lines.next_line(), if input_open => match line {
                Ok(Some(line)) => {
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    match query_of(line) {
                        Some(query) if query.iter().any(|(k, _)| k == "state" || k == "code" || k == "error") => {
                            return judge(&query, state);
                        }
                        _ => say(output, format_args!(
                            "that is not the redirect address (it starts with http://127.0.0.1: and has code= and state=); paste the whole address"
                        ))?,
                    }
                }
                // No terminal (or it closed): the browser's redirect can still come.
                Ok(None) | Err(_) => input_open = false,
            },
            () = &mut deadline => {
                return Err(format!(
                    "no redirect within {} minutes; run the command again",
                    USER_TIMEOUT.as_secs() / 60
                ));
            }
        }
    }
}

/// The query pairs of a URL, if it is one.
fn query_of(url: &str) -> Option<Vec<(String, String)>> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(
        url.query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

/// The authorization code of a redirect whose `state` is ours.
fn judge(query: &[(String, String)], state: &str) -> Result<String, String> {
    let get = |key: &str| {
        query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if get("state") != Some(state) {
        return Err(
            "refused: the redirect's state does not match this authorization request (a stale \
             or forged redirect); run the command again"
                .to_string(),
        );
    }
    if let Some(error) = get("error") {
        let description = get("error_description").unwrap_or("");
        return Err(
            format!("the provider refused the authorization: {error} {description}")
                .trim_end()
                .to_string(),
        );
    }
    match get("code") {
        Some(code) if !code.is_empty() => Ok(code.to_string()),
        _ => Err("the redirect carries no authorization code".to_string()),
    }
}

/// Reads one HTTP request head; returns its target (`/?code=…`).
async fn read_request(mut stream: TcpStream) -> Option<(String, TcpStream)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    (method == "GET" && target.starts_with('/')).then(|| (target.to_string(), stream))
}

async fn respond(stream: &mut TcpStream, status: &str, text: &str) {
    let body = format!("<!doctype html><title>mailgate</title><p>{text}</p>\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn judge_checks_state_first_then_error_then_code() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            judge(&q(&[("state", "s"), ("code", "c")]), "s"),
            Ok("c".to_string())
        );
        assert!(
            judge(&q(&[("state", "x"), ("code", "c")]), "s")
                .unwrap_err()
                .contains("state")
        );
        assert!(
            judge(&q(&[("code", "c")]), "s")
                .unwrap_err()
                .contains("state")
        );
        assert!(
            judge(&q(&[("state", "s"), ("error", "access_denied")]), "s")
                .unwrap_err()
                .contains("access_denied")
        );
        assert!(judge(&q(&[("state", "s")]), "s").is_err());
    }
}
