//! The `oauth = { … }` settings of a channel (SPEC §3, §7), validated and with every
//! default filled in: nothing downstream computes an endpoint or a scope.

use std::path::PathBuf;

use super::Secret;

/// Who issues the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Microsoft identity platform (Exchange Online, Graph).
    Microsoft,
    /// Google (Gmail, Workspace).
    Google,
}

impl Provider {
    /// The name used in `proxy.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Microsoft => "microsoft",
            Provider::Google => "google",
        }
    }
}

/// How an access token is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A user's refresh token (delegated; from `mailgate oauth authorize`).
    RefreshToken,
    /// The app's own credentials (Microsoft app-only; no user token).
    ClientCredentials,
}

impl Grant {
    /// The name used in `proxy.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// Where the refresh token comes from, for display in `check` (never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `refresh_token_env = "NAME"`.
    Env(String),
    /// `refresh_token_file = "PATH"`: also where `oauth authorize` and rotation write.
    File(PathBuf),
    /// `refresh_token = "…"` in the file itself.
    Literal,
    /// None given (client-credentials grant, or not authorized yet).
    None,
}

/// A channel's validated OAuth settings.
#[derive(Debug, Clone)]
pub struct OAuth {
    /// `provider`.
    pub provider: Provider,
    /// `grant` (default `refresh_token`; `client_credentials` is Microsoft only).
    pub grant: Grant,
    /// `tenant` (Microsoft; default `common`). Empty for Google.
    pub tenant: String,
    /// `client_id`.
    pub client_id: String,
    /// `client_secret` (from `_env`, `_file` or literal): Google, confidential Microsoft apps
    /// and every client-credentials grant.
    pub client_secret: Option<Secret>,
    /// The refresh token as read at load time (env, literal, or the file if it existed).
    /// With a `refresh_token_file`, the file is read again at each refresh, because
    /// `oauth authorize` and rotation rewrite it.
    pub refresh_token: Option<Secret>,
    /// Where the refresh token came from (for `check`; the file is also where it is stored).
    pub refresh_token_source: TokenSource,
    /// `scope`, or the default of the provider and grant (SPEC §7).
    pub scope: String,
    /// `token_url`, or the provider's token endpoint for this tenant.
    pub token_url: String,
    /// `auth_url`, or the provider's authorization endpoint (Google loopback flow).
    pub auth_url: String,
    /// `device_url`, or the provider's device-authorization endpoint (Microsoft).
    pub device_url: String,
}

/// Default endpoints and scopes (SPEC §7).
pub mod defaults {
    /// Google's token endpoint.
    pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
    /// Google's authorization endpoint.
    pub const GOOGLE_AUTH_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
    /// Google's device endpoint (Gmail's scope is not allowed on it; kept for completeness).
    pub const GOOGLE_DEVICE_URL: &str = "https://oauth2.googleapis.com/device/code";
    /// Gmail over SMTP.
    pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";
    /// Exchange Online SMTP, delegated.
    pub const MICROSOFT_SMTP_DELEGATED_SCOPE: &str =
        "https://outlook.office.com/SMTP.Send offline_access";
    /// Exchange Online SMTP, app-only (SMTP.SendAsApp).
    pub const MICROSOFT_SMTP_APP_SCOPE: &str = "https://outlook.office365.com/.default";

    /// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}`.
    pub fn microsoft_url(tenant: &str, endpoint: &str) -> String {
        format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}")
    }
}
