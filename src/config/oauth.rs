//! The `oauth = { … }` settings of a channel (SPEC §3, §7), validated and with every
//! default filled in: nothing downstream computes an endpoint or a scope.

use std::path::PathBuf;

use serde_spanned::Spanned;

use super::Secret;
use super::reader::{Expect, Keys, Reader, Section};
use super::secrets::{self, Form, RawSecret, Resolved};
use super::values::parse_endpoint;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// `graph_url`, or `https://graph.microsoft.com` (graph channels only).
    pub graph_url: String,
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
    /// Microsoft Graph, delegated (`Mail.Send`).
    pub const GRAPH_DELEGATED_SCOPE: &str = "https://graph.microsoft.com/Mail.Send offline_access";
    /// Microsoft Graph, app-only (the `Mail.Send` application permission).
    pub const GRAPH_APP_SCOPE: &str = "https://graph.microsoft.com/.default";
    /// Microsoft Graph's API root.
    pub const GRAPH_URL: &str = "https://graph.microsoft.com";

    /// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}`.
    pub fn microsoft_url(tenant: &str, endpoint: &str) -> String {
        format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}")
    }
}

/// `oauth = { … }` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    provider: Option<Spanned<String>>,
    grant: Option<Spanned<String>>,
    tenant: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    client_secret: Option<Spanned<String>>,
    client_secret_env: Option<Spanned<String>>,
    client_secret_file: Option<Spanned<String>>,
    refresh_token: Option<Spanned<String>>,
    refresh_token_env: Option<Spanned<String>>,
    refresh_token_file: Option<Spanned<String>>,
    scope: Option<Spanned<String>>,
    token_url: Option<Spanned<String>>,
    auth_url: Option<Spanned<String>>,
    device_url: Option<Spanned<String>>,
    graph_url: Option<Spanned<String>>,
}

pub(super) const OAUTH_KEYS: Keys = &[
    ("provider", Expect::Str),
    ("grant", Expect::Str),
    ("tenant", Expect::Str),
    ("client_id", Expect::Str),
    ("client_secret", Expect::Str),
    ("client_secret_env", Expect::Str),
    ("client_secret_file", Expect::Str),
    ("refresh_token", Expect::Str),
    ("refresh_token_env", Expect::Str),
    ("refresh_token_file", Expect::Str),
    ("scope", Expect::Str),
    ("token_url", Expect::Str),
    ("auth_url", Expect::Str),
    ("device_url", Expect::Str),
    ("graph_url", Expect::Str),
];

/// Reads and validates a channel's `oauth` table `s` (`label` names it in problems),
/// filling in every default; `graph`: the table of a `kind = "graph"` channel (provider
/// microsoft only, Graph scopes, `graph_url` allowed). `None` when it is too broken to
/// use (the problems say why).
/// `app_scope`: the preset's default scope for client-credentials tokens, if it has one.
pub(super) fn read(
    r: &mut Reader,
    s: &Section,
    label: &str,
    graph: bool,
    app_scope: Option<&'static str>,
) -> Option<OAuth> {
    let raw: RawOAuth = r.read(s, OAUTH_KEYS);
    let line_of = |r: &Reader, raw: &Option<Spanned<String>>| raw.as_ref().and_then(|at| r.at(at));

    if let Some(at) = &raw.graph_url
        && !graph
    {
        let line = r.at(at);
        r.bad(
            s,
            "graph_url",
            line,
            "only for kind = \"graph\" channels (Microsoft Graph)",
        );
    }

    let providers = [
        ("microsoft", Provider::Microsoft),
        ("google", Provider::Google),
    ];
    let provider = r.choice(s, "provider", &raw.provider, &providers);
    if graph && provider == Some(Provider::Google) {
        let line = line_of(r, &raw.provider);
        r.bad(
            s,
            "provider",
            line,
            "a graph channel takes its tokens from provider = \"microsoft\" only",
        );
    }
    if !s.has("provider") {
        r.problem(
            s.line,
            format!("{label} needs provider = \"microsoft\" or \"google\""),
        );
    }
    let grants = [
        ("refresh_token", Grant::RefreshToken),
        ("client_credentials", Grant::ClientCredentials),
    ];
    let grant = r
        .choice(s, "grant", &raw.grant, &grants)
        .unwrap_or(Grant::RefreshToken);
    let client_id = r.word(s, "client_id", &raw.client_id);
    if !s.has("client_id") {
        r.problem(
            s.line,
            format!("{label} needs client_id = \"...\", the app's id at the provider"),
        );
    }

    // The tenant goes into the endpoint URLs: a name or a GUID, nothing else.
    let tenant = r.parsed(s, "tenant", &raw.tenant, |text| {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if text.is_empty() || text.chars().all(ok) {
            Ok(text.to_owned())
        } else {
            Err(format!(
                "{text:?} is not a tenant (a domain like \"example.com\", a tenant id, or \"common\")"
            ))
        }
    });
    let tenant = match (provider, tenant) {
        (Some(Provider::Google), Some(tenant)) if !tenant.is_empty() => {
            let line = line_of(r, &raw.tenant);
            r.bad(s, "tenant", line, "only for provider = \"microsoft\"");
            String::new()
        }
        (Some(Provider::Google), _) => String::new(),
        (_, Some(tenant)) if !tenant.is_empty() => tenant,
        _ => "common".to_owned(),
    };

    let client_secret_raw = RawSecret {
        env: &raw.client_secret_env,
        file: &raw.client_secret_file,
        literal: &raw.client_secret,
    };
    let client_secret_given = Form::ALL.iter().any(|f| s.has(&f.key("client_secret")));
    let client_secret = match secrets::read(r, s, "client_secret", client_secret_raw, false) {
        Some((_, Resolved::Value(secret))) => Some(secret),
        _ => None,
    };
    let need_secret = "client_secret_env, client_secret_file or client_secret";
    if grant == Grant::ClientCredentials {
        let line = line_of(r, &raw.grant);
        if provider == Some(Provider::Google) {
            r.bad(
                s,
                "grant",
                line,
                "\"client_credentials\" is for provider = \"microsoft\" only",
            );
        }
        if !client_secret_given {
            r.problem(
                line,
                format!("{label} has grant = \"client_credentials\", which needs {need_secret}"),
            );
        }
    } else if provider == Some(Provider::Google) && !client_secret_given {
        r.problem(
            line_of(r, &raw.provider),
            format!("{label}: provider = \"google\" needs {need_secret}"),
        );
    }

    let (refresh_token, refresh_token_source) = refresh_token(r, s, &raw, grant);

    let scope = r
        .parsed(s, "scope", &raw.scope, |text| {
            if text.trim().is_empty() {
                Err("must not be empty".to_owned())
            } else {
                Ok(text.to_owned())
            }
        })
        .unwrap_or_else(|| {
            match (provider, grant) {
                (_, Grant::ClientCredentials) if graph => defaults::GRAPH_APP_SCOPE,
                (Some(Provider::Microsoft), Grant::ClientCredentials) if app_scope.is_some() => {
                    app_scope.unwrap_or(defaults::MICROSOFT_SMTP_APP_SCOPE)
                }
                (_, Grant::RefreshToken) if graph => defaults::GRAPH_DELEGATED_SCOPE,
                (Some(Provider::Google), _) => defaults::GOOGLE_SCOPE,
                (_, Grant::ClientCredentials) => defaults::MICROSOFT_SMTP_APP_SCOPE,
                (_, Grant::RefreshToken) => defaults::MICROSOFT_SMTP_DELEGATED_SCOPE,
            }
            .to_owned()
        });
    let mut endpoint = |key: &str, raw: &Option<Spanned<String>>, google: &str, microsoft: &str| {
        r.parsed(s, key, raw, parse_endpoint)
            .unwrap_or_else(|| match provider {
                Some(Provider::Google) => google.to_owned(),
                _ => defaults::microsoft_url(&tenant, microsoft),
            })
    };
    let token_url = endpoint(
        "token_url",
        &raw.token_url,
        defaults::GOOGLE_TOKEN_URL,
        "token",
    );
    let auth_url = endpoint(
        "auth_url",
        &raw.auth_url,
        defaults::GOOGLE_AUTH_URL,
        "authorize",
    );
    let device_url = endpoint(
        "device_url",
        &raw.device_url,
        defaults::GOOGLE_DEVICE_URL,
        "devicecode",
    );

    let graph_url = r
        .parsed(s, "graph_url", &raw.graph_url, parse_endpoint)
        .filter(|_| graph)
        .unwrap_or_else(|| defaults::GRAPH_URL.to_owned());

    Some(OAuth {
        provider: provider?,
        grant,
        tenant,
        client_id: client_id?,
        client_secret,
        refresh_token,
        refresh_token_source,
        scope,
        token_url,
        auth_url,
        device_url,
        graph_url,
    })
}

/// Settings that stand in where the `oauth` table was too broken to read: the config
/// has problems then and is never used.
pub(super) fn placeholder() -> OAuth {
    OAuth {
        provider: Provider::Microsoft,
        grant: Grant::ClientCredentials,
        tenant: "common".to_owned(),
        client_id: String::new(),
        client_secret: None,
        refresh_token: None,
        refresh_token_source: TokenSource::None,
        scope: defaults::GRAPH_APP_SCOPE.to_owned(),
        token_url: String::new(),
        auth_url: String::new(),
        device_url: String::new(),
        graph_url: defaults::GRAPH_URL.to_owned(),
    }
}

/// [`placeholder`] for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn placeholder_for_tests() -> OAuth {
    placeholder()
}

/// The refresh token and where it comes from. None yet is fine (not authorized yet), and
/// so is a `refresh_token_file` that does not exist yet: `oauth authorize` writes it.
fn refresh_token(
    r: &mut Reader,
    s: &Section,
    raw: &RawOAuth,
    grant: Grant,
) -> (Option<Secret>, TokenSource) {
    if grant == Grant::ClientCredentials {
        for form in Form::ALL {
            let key = form.key("refresh_token");
            if s.has(&key) {
                let line = r.key_line(s, &key);
                r.bad(
                    s,
                    &key,
                    line,
                    "not used with grant = \"client_credentials\" (the app's own credentials get the token)",
                );
            }
        }
        return (None, TokenSource::None);
    }
    let written = RawSecret {
        env: &raw.refresh_token_env,
        file: &raw.refresh_token_file,
        literal: &raw.refresh_token,
    };
    match secrets::read(r, s, "refresh_token", written, true) {
        None => (None, TokenSource::None),
        Some((form, resolved)) => {
            let name = |raw: &Option<Spanned<String>>| {
                raw.as_ref()
                    .map(|at| at.get_ref().clone())
                    .unwrap_or_default()
            };
            let (value, path) = match resolved {
                Resolved::Value(secret) => (Some(secret), None),
                Resolved::Missing(path) => (None, Some(path)),
            };
            let source = match form {
                Form::Env => TokenSource::Env(name(&raw.refresh_token_env)),
                Form::File => TokenSource::File(
                    path.unwrap_or_else(|| r.resolve(&name(&raw.refresh_token_file))),
                ),
                Form::Literal => TokenSource::Literal,
            };
            (value, source)
        }
    }
}
