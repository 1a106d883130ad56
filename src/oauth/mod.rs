//! OAuth 2.0 for upstream channels (SPEC §7): access tokens from the provider's token
//! endpoint, cached per channel, and `mailgate oauth authorize`.
//!
//! | part | owns |
//! |---|---|
//! | [`Http`] | the one HTTP client for token endpoints (reqwest, rustls on ring, timeouts) |
//! | `endpoint` | the grant requests and how their answers are classified into [`Error`] |
//! | [`Tokens`], [`ChannelToken`] | the per-channel token cache: single-flight refresh, `force_refresh` |
//! | [`TokenStore`], [`LocalTokenStore`] | where refresh tokens are kept (rotation, `authorize`) |
//! | [`authorize`] | the device-code (Microsoft) and loopback + PKCE (Google) flows |
//! | [`xoauth2_initial_response`] | the SASL XOAUTH2 string |
//!
//! Nothing here prints a token or a secret: [`AccessToken`] and [`crate::config::Secret`]
//! print as `***`, and provider error texts are scrubbed of the channel's secrets.

mod authorize;
mod cache;
mod endpoint;
mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use base64::Engine as _;

pub use crate::state::tokens::{LocalTokenStore, TokenStore};
pub use authorize::{Authorized, authorize};
pub use cache::{ChannelToken, Tokens};

/// An OAuth access token. Prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    /// Wraps a token value.
    pub fn new(value: impl Into<String>) -> Self {
        AccessToken(value.into())
    }
    /// The token itself: only for the place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why no access token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The token endpoint is unreachable, timed out, answered 5xx or 429, or answered
    /// nonsense: try again later (queue: defer; relay: `454 4.7.0`).
    #[error("channel {channel}: OAuth token endpoint unavailable ({reason}); will retry")]
    Transient {
        /// Channel name.
        channel: String,
        /// What went wrong (no secrets).
        reason: String,
    },
    /// The provider refused the grant or the client (`invalid_grant`, `invalid_client`,
    /// `unauthorized_client`, …), or there is no refresh token yet: the channel is broken
    /// until someone acts; `hint` says what to do.
    #[error("channel {channel}: OAuth token refused: {code}{}; {hint}", description_suffix(.description))]
    Broken {
        /// Channel name.
        channel: String,
        /// The OAuth error code (`invalid_grant`, …; `no_refresh_token` when none is stored).
        code: String,
        /// The provider's `error_description`, first line, scrubbed of secrets.
        description: String,
        /// What the operator should do (always names `mailgate oauth authorize NAME`).
        hint: String,
    },
}

fn description_suffix(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(" ({description})")
    }
}

impl Error {
    /// True for [`Error::Transient`]: defer, the channel stays healthy.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient { .. })
    }
    /// The OAuth error code of a [`Error::Broken`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Broken { code, .. } => Some(code),
            Error::Transient { .. } => None,
        }
    }
}

/// The one HTTP client for token endpoints: [`crate::http::client`] (rustls on the
/// process-default ring provider, no redirects: a secret is never re-posted elsewhere; the
/// outbound proxy of SPEC §7) and a timeout on every request. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Http {
    client: crate::http::Client,
}

impl Http {
    /// Connect timeout; the whole request is bounded by [`Http::TIMEOUT`].
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Bound on one whole token-endpoint request.
    pub const TIMEOUT: Duration = Duration::from_secs(30);

    /// The client with the default timeouts, through `https_proxy` (`[server]`) or the
    /// environment's proxy.
    pub fn new(https_proxy: Option<&crate::http::ProxyUrl>) -> Result<Http, String> {
        Http::with_timeout(https_proxy, Http::TIMEOUT)
    }

    /// The client with another whole-request timeout (tests).
    pub fn with_timeout(
        https_proxy: Option<&crate::http::ProxyUrl>,
        timeout: Duration,
    ) -> Result<Http, String> {
        let client = crate::http::client(https_proxy, |builder| {
            builder
                .timeout(timeout)
                .connect_timeout(Http::CONNECT_TIMEOUT.min(timeout))
        })
        .map_err(|e| format!("cannot set up the HTTPS client for OAuth: {e}"))?;
        Ok(Http { client })
    }
}

/// The SASL XOAUTH2 initial response, `user=<user>^Aauth=Bearer <token>^A^A`, before
/// base64 (lettre's `Mechanism::Xoauth2` with `Credentials::new(user, token)` builds the
/// same string). Holds the token, so it is a [`crate::config::Secret`].
pub fn xoauth2_initial_response(user: &str, token: &AccessToken) -> crate::config::Secret {
    crate::config::Secret::new(format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ))
}

/// The whole SMTP command `AUTH XOAUTH2 <base64 initial response>\r\n`. A server that
/// refuses the token answers `334 <base64 JSON>` and waits for an empty line (`\r\n`)
/// before its final `535`: send that line yourself (lettre's mechanism errors out on the
/// 334 instead, leaving the 535 unread).
pub fn xoauth2_command(user: &str, token: &AccessToken) -> crate::config::Secret {
    let response = xoauth2_initial_response(user, token);
    crate::config::Secret::new(format!(
        "AUTH XOAUTH2 {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(response.expose())
    ))
}
