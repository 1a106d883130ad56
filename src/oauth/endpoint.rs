//! The requests to a provider's token and device endpoints, and how their answers are
//! classified: transient (retry later) or an OAuth error code (the caller decides).

use std::time::Duration;

use serde_json::{Map, Value};

use super::{AccessToken, Error, Http};
use crate::config::Secret;
use crate::config::oauth::{Grant, OAuth, Provider};
use crate::http::{MAX_TOKEN_ANSWER, ReadError, clamp_secs, read_limited};

/// A token endpoint's successful answer.
#[derive(Debug)]
pub(crate) struct Issued {
    pub access_token: AccessToken,
    pub expires_in: Duration,
    /// Present when the provider rotated (or, for the first grant, issued) the refresh token.
    pub refresh_token: Option<Secret>,
}

/// A failed request, before it is turned into an [`Error`] for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Unreachable, timeout, 5xx, 429, 408, or an unreadable success.
    Transient(String),
    /// An OAuth error answer (or another 4xx): `code` is its `error`, or `http_<status>`.
    OAuth { code: String, description: String },
}

/// Without `expires_in` (RFC 6749 only recommends it), assume the common hour.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// An access token is taken to live at most a day, whatever `expires_in` says (SPEC §7):
/// a huge value would overflow the expiry instant, and a token refused early is
/// refreshed anyway (SMTP 535, Graph 401).
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// …and at least a second. Not more: a token is used until it expires, and a short-lived
/// one is refreshed once per message (within the refresh margin), never in a loop.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// A device code is waited for at least a minute and at most an hour (real ones: 15 min).
pub(crate) const DEVICE_MIN_WAIT: Duration = Duration::from_secs(60);
/// See [`DEVICE_MIN_WAIT`].
pub(crate) const DEVICE_MAX_WAIT: Duration = Duration::from_secs(3600);
/// Device-flow polling waits at least a second (`interval: 0` must not spin)…
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// …and at most a minute between polls, `slow_down` included.
pub(crate) const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Refresh-token grant (Microsoft delegated, Google).
pub(crate) async fn refresh_grant(
    http: &Http,
    settings: &OAuth,
    refresh_token: &Secret,
) -> Result<Issued, Failure> {
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.expose()),
        ("client_id", settings.client_id.as_str()),
    ];
    // Microsoft wants the scope again; Google's refresh request has none.
    if settings.provider == Provider::Microsoft {
        form.push(("scope", settings.scope.as_str()));
    }
    if let Some(secret) = &settings.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    issued(post_form(http, &settings.token_url, &form).await?)
}

/// Microsoft client-credentials grant (app-only).
pub(crate) async fn client_credentials_grant(
    http: &Http,
    settings: &OAuth,
) -> Result<Issued, Failure> {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", settings.client_id.as_str()),
        ("scope", settings.scope.as_str()),
    ];
    if let Some(secret) = &settings.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    issued(post_form(http, &settings.token_url, &form).await?)
}

/// Authorization-code grant with PKCE (the Google loopback flow).
pub(crate) async fn code_grant(
    http: &Http,
    settings: &OAuth,
    code: &str,
    redirect_uri: &str,
    code_verifier: &Secret,
) -> Result<Issued, Failure> {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("client_id", settings.client_id.as_str()),
        ("code_verifier", code_verifier.expose()),
    ];
    if let Some(secret) = &settings.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    issued(post_form(http, &settings.token_url, &form).await?)
}

/// What the device endpoint hands out (RFC 8628 §3.2).
#[derive(Debug)]
pub(crate) struct DeviceStart {
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// RFC 8628 §3.1: asks the device endpoint for a user code.
pub(crate) async fn device_start(http: &Http, settings: &OAuth) -> Result<DeviceStart, Failure> {
    let form = [
        ("client_id", settings.client_id.as_str()),
        ("scope", settings.scope.as_str()),
    ];
    let body = post_form(http, &settings.device_url, &form).await?;
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_string);
    let unreadable =
        |what: &str| Failure::Transient(format!("the device endpoint's answer has no {what}"));
    Ok(DeviceStart {
        device_code: Secret::new(text("device_code").ok_or_else(|| unreadable("device_code"))?),
        user_code: text("user_code").ok_or_else(|| unreadable("user_code"))?,
        // Google spells it verification_url.
        verification_uri: text("verification_uri")
            .or_else(|| text("verification_url"))
            .ok_or_else(|| unreadable("verification_uri"))?,
        expires_in: clamp_secs(
            seconds(body.get("expires_in")),
            DEVICE_MIN_WAIT,
            DEVICE_MAX_WAIT,
        )
        .unwrap_or(Duration::from_secs(900)),
        interval: clamp_secs(seconds(body.get("interval")), MIN_INTERVAL, MAX_INTERVAL)
            .unwrap_or(Duration::from_secs(5)),
    })
}

/// RFC 8628 §3.4: one poll of the token endpoint for a device code.
pub(crate) async fn device_poll(
    http: &Http,
    settings: &OAuth,
    device_code: &Secret,
) -> Result<Issued, Failure> {
    let mut form = vec![
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", device_code.expose()),
        ("client_id", settings.client_id.as_str()),
    ];
    if let Some(secret) = &settings.client_secret {
        form.push(("client_secret", secret.expose()));
    }
    issued(post_form(http, &settings.token_url, &form).await?)
}

/// Token endpoints must be HTTPS; plain HTTP only to this machine (tests, local proxies).
fn check_url(url: &str) -> Result<(), Failure> {
    let refused = |why: &str| Failure::OAuth {
        code: "bad_endpoint_url".to_string(),
        description: format!("{url}: {why}"),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| refused(&e.to_string()))?;
    let host = parsed.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(refused(
            "not https (plain http is allowed to loopback only)",
        )),
    }
}

/// POSTs a form and returns the JSON object of a 2xx answer.
async fn post_form(
    http: &Http,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Map<String, Value>, Failure> {
    check_url(url)?;
    let request = http
        .client
        .post(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(form);
    let response = http.client.send(request).await.map_err(|e| match e {
        crate::http::SendError::Proxy(why) => Failure::Transient(why),
        crate::http::SendError::Http(e) => Failure::Transient(request_error(&e)),
    })?;
    let status = response.status();
    let bytes = read_limited(response, MAX_TOKEN_ANSWER)
        .await
        .map_err(|e| match e {
            ReadError::TooLarge { max } => Failure::Transient(format!(
                "{url} answered HTTP {} with more than {} KiB",
                status.as_u16(),
                max / 1024
            )),
            ReadError::Body(e) => Failure::Transient(request_error(&e)),
        })?;
    let json = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| match v {
            Value::Object(map) => Some(map),
            _ => None,
        });
    let error_code = json
        .as_ref()
        .and_then(|m| m.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let description = json
        .as_ref()
        .and_then(|m| m.get("error_description"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let code = status.as_u16();
    if status.is_success() {
        return json.ok_or_else(|| {
            Failure::Transient(format!("{url} answered {code} without a JSON object"))
        });
    }
    // 407 is the outbound proxy's answer, not the provider's: the grant is not in doubt.
    if code == 407 {
        return Err(Failure::Transient(format!(
            "the outbound proxy refused the request to {url} (HTTP 407: check the user and password of https_proxy)"
        )));
    }
    if status.is_server_error() || matches!(code, 408 | 425 | 429) {
        let what = error_code.map(|c| format!(" ({c})")).unwrap_or_default();
        return Err(Failure::Transient(format!(
            "{url} answered HTTP {code}{what}"
        )));
    }
    Err(Failure::OAuth {
        code: error_code.unwrap_or_else(|| format!("http_{code}")),
        description,
    })
}

/// A reqwest error in words, without its source chain's noise.
fn request_error(e: &reqwest::Error) -> String {
    let refusal = crate::http::proxy_refusal(e);
    let kind = if let Some(refusal) = &refusal {
        refusal
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    match e.url() {
        Some(url) => format!("{kind}: {url}"),
        None => kind.to_string(),
    }
}

fn issued(body: Map<String, Value>) -> Result<Issued, Failure> {
    let access_token = body
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Failure::Transient("the token endpoint's answer has no access_token".into())
        })?;
    let refresh_token = body
        .get("refresh_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    Ok(Issued {
        access_token: AccessToken::new(access_token),
        expires_in: clamp_secs(seconds(body.get("expires_in")), MIN_LIFETIME, MAX_LIFETIME)
            .unwrap_or(DEFAULT_LIFETIME),
        refresh_token,
    })
}

/// `expires_in` / `interval`: a number, or (some providers) a numeric string; callers
/// clamp it. A number past `u64` counts as the largest.
fn seconds(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Failure {
    /// The channel-level error, with the operator's hint; `secrets` are scrubbed from the
    /// provider's text (an endpoint could echo what it was sent).
    pub(crate) fn into_error(self, channel: &str, settings: &OAuth, secrets: &[&str]) -> Error {
        match self {
            Failure::Transient(reason) => Error::Transient {
                channel: channel.to_string(),
                reason: scrub(&reason, secrets),
            },
            Failure::OAuth { code, description } => Error::Broken {
                channel: channel.to_string(),
                hint: hint(channel, settings, &code),
                description: scrub(description.lines().next().unwrap_or(""), secrets),
                code: scrub(&code, secrets),
            },
        }
    }
}

/// What the operator should do about a refused grant.
pub(crate) fn hint(channel: &str, settings: &OAuth, code: &str) -> String {
    let rerun = format!("re-run `mailgate oauth authorize {channel}`");
    match (settings.provider, settings.grant, code) {
        (Provider::Google, _, "invalid_grant") => format!(
            "Google refresh tokens of an OAuth app left in \"Testing\" publishing status die after \
             7 days (also: revoked, password changed): set the app \"In production\" in the Google \
             Cloud console and {rerun}"
        ),
        (_, Grant::ClientCredentials, _) => format!(
            "check the app's client_id, client_secret, scope and permissions, then {rerun} to test them"
        ),
        (_, _, "no_refresh_token") => format!("the channel has no refresh token yet: {rerun}"),
        _ => format!("the refresh token or the app registration was refused: {rerun}"),
    }
}

/// Cuts a provider text to a sane length and removes any of `secrets` from it.
fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut text: String = text.chars().take(300).collect();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        text = text.replace(secret, "***");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_must_be_https_except_to_loopback() {
        assert!(check_url("https://login.example/token").is_ok());
        assert!(check_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_url("http://[::1]:8080/token").is_ok());
        assert!(check_url("http://localhost/token").is_ok());
        assert!(check_url("http://login.example/token").is_err());
        assert!(check_url("ftp://127.0.0.1/token").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn expires_in_may_be_a_number_or_a_string() {
        let v = serde_json::json!({"a": 3599, "b": "120", "c": true, "e": 1e300, "f": -5});
        assert_eq!(seconds(v.get("a")), Some(3599));
        assert_eq!(seconds(v.get("b")), Some(120));
        assert_eq!(seconds(v.get("c")), None);
        assert_eq!(seconds(v.get("d")), None);
        assert_eq!(seconds(v.get("e")), Some(u64::MAX));
        assert_eq!(seconds(v.get("f")), None);
    }

    #[test]
    fn token_lifetimes_are_clamped_to_a_second_and_a_day() {
        let lifetime = |v: serde_json::Value| {
            let body = serde_json::json!({"access_token": "t", "expires_in": v});
            match body {
                Value::Object(map) => issued(map).map(|i| i.expires_in),
                _ => unreachable!(),
            }
        };
        let huge = serde_json::json!(18_446_744_073_709_551_615_u64);
        assert_eq!(lifetime(huge), Ok(MAX_LIFETIME));
        assert_eq!(lifetime(serde_json::json!("99999999999")), Ok(MAX_LIFETIME));
        assert_eq!(lifetime(serde_json::json!(0)), Ok(MIN_LIFETIME));
        assert_eq!(
            lifetime(serde_json::json!(3599)),
            Ok(Duration::from_secs(3599))
        );
        assert_eq!(lifetime(serde_json::json!(null)), Ok(DEFAULT_LIFETIME));
    }

    #[test]
    fn scrub_removes_secrets_and_cuts_long_texts() {
        assert_eq!(
            scrub("bad token tok-123 here", &["tok-123"]),
            "bad token *** here"
        );
        assert_eq!(scrub(&"x".repeat(1000), &[]).len(), 300);
    }
}
