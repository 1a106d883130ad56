//! `[state]`: where rate and quota counters, channel health and OAuth tokens are kept
//! (SPEC §3, §6): `local` files beside the spool, or one Redis shared by several hosts.

use serde_spanned::Spanned;

use super::reader::{Expect, Keys, Reader, Section};
use super::secrets::{self, RawSecret, Resolved};
use super::{RedisSettings, StateBackend};

/// `key_prefix` when none is given.
pub const DEFAULT_KEY_PREFIX: &str = "mailgate:";

/// `[state]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    backend: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    url_env: Option<Spanned<String>>,
    url_file: Option<Spanned<String>>,
    key_prefix: Option<Spanned<String>>,
}

pub(super) const STATE_KEYS: Keys = &[
    ("backend", Expect::Str),
    ("url", Expect::Str),
    ("url_env", Expect::Str),
    ("url_file", Expect::Str),
    ("key_prefix", Expect::Str),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    Redis,
}

/// Reads and validates `[state]`; an absent section is the local backend.
pub(super) fn read(r: &mut Reader, s: &Section) -> StateBackend {
    let raw: RawState = r.read(s, STATE_KEYS);
    let kind = r
        .choice(
            s,
            "backend",
            &raw.backend,
            &[("local", Kind::Local), ("redis", Kind::Redis)],
        )
        .unwrap_or(Kind::Local);
    let url_keys = ["url", "url_env", "url_file"];
    if kind == Kind::Local {
        for key in url_keys.iter().copied().chain(["key_prefix"]) {
            if s.has(key) {
                let line = r.key_line(s, key);
                r.problem(
                    line,
                    format!("{key:?} {} is for backend = \"redis\" only", s.place),
                );
            }
        }
        return StateBackend::Local;
    }
    let secret = RawSecret {
        env: &raw.url_env,
        file: &raw.url_file,
        literal: &raw.url,
    };
    let url = match secrets::read(r, s, "url", secret, false) {
        Some((_, Resolved::Value(url))) => Some(url),
        Some((_, Resolved::Missing(_))) => None,
        None => {
            if !url_keys.iter().any(|k| s.has(k)) {
                let line = r.key_line(s, "backend").or(s.line);
                r.problem(
                    line,
                    format!(
                        "backend = \"redis\" {} needs url, url_env or url_file",
                        s.place
                    ),
                );
            }
            None
        }
    };
    let url_line = url_keys.iter().find_map(|k| r.key_line(s, k)).or(s.line);
    let display = url.as_ref().and_then(|url| match redacted(url.expose()) {
        Ok(display) => Some(display),
        Err(why) => {
            // The value is a secret: the problem names the key, never the text.
            r.problem(url_line, format!("the Redis url {}: {why}", s.place));
            None
        }
    });
    let key_prefix = match &raw.key_prefix {
        Some(prefix) => r.word(s, "key_prefix", &Some(prefix.clone())),
        None => Some(DEFAULT_KEY_PREFIX.to_owned()),
    };
    match (url, display, key_prefix) {
        (Some(url), Some(display), Some(key_prefix)) => StateBackend::Redis(RedisSettings {
            url,
            display,
            key_prefix,
        }),
        // A problem was reported: the config is refused anyway.
        _ => StateBackend::Local,
    }
}

/// `redis://host:port/db` without user or password, for messages; or why the url is
/// not one mailgate can use. Pure: nothing is connected.
pub fn redacted(url: &str) -> Result<String, String> {
    let scheme = match url.split_once("://") {
        Some((scheme @ ("redis" | "rediss"), _)) => scheme,
        _ => return Err("must start with redis:// or rediss://".into()),
    };
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| format!("is not a Redis url ({})", e.category()))?;
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        _ => return Err("must name a host (redis:// or rediss://)".into()),
    };
    Ok(format!("{scheme}://{addr}/{}", info.redis_settings().db()))
}
