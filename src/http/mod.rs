//! Below the flow: the one way to build an outbound HTTP client (token endpoints, Microsoft
//! Graph), and which proxy a request goes through (SPEC §7 "Outbound proxy"); how much of
//! an answer is read and how long a wait it may ask for is [`limits`]'s (re-exported here).
//!
//! `[server] https_proxy`, when set, carries every request whatever its scheme. Otherwise
//! the environment is read as curl reads it:
//! - `https://` URLs: `https_proxy`, else `HTTPS_PROXY`;
//! - `http://` URLs: `http_proxy`, else `HTTP_PROXY`. curl reads only the lowercase one
//!   (a CGI program gets a client's `Proxy:` header as `HTTP_PROXY`, "httpoxy"); mailgate
//!   is no CGI program, and SPEC §7 names `HTTP_PROXY`, so it reads both, lowercase first;
//! - then `all_proxy`, else `ALL_PROXY`;
//! - a host that `no_proxy` (else `NO_PROXY`) lists goes direct: `*` for all, a name for
//!   itself and its subdomains (a leading `.` is ignored), an IP address or CIDR block.
//!   Loopback is not exempt unless listed.
//!
//! An empty variable counts as unset. A proxy without a scheme is `http://`, and one
//! without a port uses curl's defaults (1080 for http, 443 for https). SMTP channels never
//! use a proxy.

mod limits;

pub use limits::*;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use reqwest::Url;

/// A proxy URL: `http://` or `https://`, a host, an optional port and `user:password@`.
/// It may hold a password, so it prints as its scheme and host only, the user part as
/// `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl(Url);

impl ProxyUrl {
    /// Parses a proxy URL as `[server] https_proxy` is written: the scheme is required.
    /// The error never repeats the value (it may hold a password).
    pub fn parse(text: &str) -> Result<ProxyUrl, String> {
        let text = text.trim();
        if !text.contains("://") {
            return Err("needs a scheme: http://host:port (or https://)".to_string());
        }
        ProxyUrl::parse_lenient(text)
    }

    /// Parses a proxy URL as curl reads one from the environment: no scheme means
    /// `http://`.
    fn parse_lenient(text: &str) -> Result<ProxyUrl, String> {
        let text = text.trim();
        let full = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let mut url = Url::parse(&full).map_err(|e| format!("not a URL ({e})"))?;
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(format!(
                    "scheme {:?} is not supported (http:// or https://)",
                    crate::text::escape_controls(other)
                ));
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".to_string());
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("must be scheme://[user:password@]host[:port] and nothing after".into());
        }
        if url.port().is_none() {
            let port = if url.scheme() == "https" { 443 } else { 1080 };
            url.set_port(Some(port))
                .map_err(|()| "cannot take a port".to_string())?;
        }
        Ok(ProxyUrl(url))
    }

    /// The URL itself, password included: only for the client that must send it.
    fn expose(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = &self.0;
        let user = if url.username().is_empty() && url.password().is_none() {
            ""
        } else {
            "***@"
        };
        let host = url.host_str().unwrap_or_default();
        match url.port_or_known_default() {
            Some(port) => write!(f, "{}://{user}{host}:{port}", url.scheme()),
            None => write!(f, "{}://{user}{host}", url.scheme()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// One `no_proxy` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    /// `*`: every host.
    All,
    /// A name: itself and its subdomains (lowercase, no leading or trailing dot).
    Domain(String),
    /// An address or a CIDR block.
    Network(ipnet::IpNet),
}

/// Which proxy each request takes: pure, built from the config value and a snapshot of
/// the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxies {
    configured: Option<ProxyUrl>,
    https: Option<ProxyUrl>,
    http: Option<ProxyUrl>,
    all: Option<ProxyUrl>,
    bypass: Vec<Bypass>,
}

impl Proxies {
    /// The routes for `[server] https_proxy` (`configured`) and the environment `env`.
    /// An environment proxy mailgate cannot use is an error naming its variable (a request
    /// must not quietly go direct on a network that allows only the proxy).
    pub fn new(
        configured: Option<&ProxyUrl>,
        env: &HashMap<String, String>,
    ) -> Result<Proxies, String> {
        if let Some(proxy) = configured {
            return Ok(Proxies {
                configured: Some(proxy.clone()),
                ..Proxies::default()
            });
        }
        let var = |names: &[&'static str]| {
            names.iter().find_map(|name| {
                env.get(*name)
                    .map(|v| v.trim())
                    .filter(|v| !v.is_empty())
                    .map(|v| (*name, v))
            })
        };
        let proxy = |names: &[&'static str]| -> Result<Option<ProxyUrl>, String> {
            match var(names) {
                None => Ok(None),
                Some((name, value)) => ProxyUrl::parse_lenient(value).map(Some).map_err(|e| {
                    format!("the environment's {name} is not a proxy mailgate can use: {e}")
                }),
            }
        };
        Ok(Proxies {
            configured: None,
            https: proxy(&["https_proxy", "HTTPS_PROXY"])?,
            http: proxy(&["http_proxy", "HTTP_PROXY"])?,
            all: proxy(&["all_proxy", "ALL_PROXY"])?,
            bypass: var(&["no_proxy", "NO_PROXY"])
                .map(|(_, list)| parse_bypass(list))
                .unwrap_or_default(),
        })
    }

    /// The routes for `configured` and this process's environment.
    pub fn from_process(configured: Option<&ProxyUrl>) -> Result<Proxies, String> {
        // Non-UTF-8 variables cannot name a usable proxy; they are skipped.
        let env: HashMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Proxies::new(configured, &env)
    }

    /// The proxy a request to `url` goes through; `None`: direct.
    pub fn for_url(&self, url: &Url) -> Option<&ProxyUrl> {
        if let Some(proxy) = &self.configured {
            return Some(proxy);
        }
        let proxy = match url.scheme() {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }
        .or(self.all.as_ref())?;
        if self.bypassed(url) {
            return None;
        }
        Some(proxy)
    }

    /// No request goes through a proxy.
    pub fn is_direct(&self) -> bool {
        self.configured.is_none()
            && self.https.is_none()
            && self.http.is_none()
            && self.all.is_none()
    }

    /// For `check`: where requests go, proxies shown without their user part.
    pub fn describe(&self) -> String {
        if let Some(proxy) = &self.configured {
            return format!("through {proxy} ([server] https_proxy)");
        }
        if self.is_direct() {
            return "direct (no https_proxy, no proxy in the environment)".to_string();
        }
        let show = |p: Option<&ProxyUrl>| {
            p.map_or_else(|| "direct".to_string(), |p| format!("through {p}"))
        };
        let mut text = format!(
            "from the environment: https {}, http {}",
            show(self.https.as_ref().or(self.all.as_ref())),
            show(self.http.as_ref().or(self.all.as_ref()))
        );
        if !self.bypass.is_empty() {
            text.push_str(&format!(
                "; {} no_proxy entries go direct",
                self.bypass.len()
            ));
        }
        text
    }

    fn bypassed(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let host = match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.trim_end_matches('.').to_ascii_lowercase()),
        };
        self.bypass.iter().any(|entry| match (entry, &host) {
            (Bypass::All, _) => true,
            (Bypass::Domain(domain), Host::Name(name)) => {
                name == domain
                    || name
                        .strip_suffix(domain.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
            (Bypass::Network(net), Host::Ip(ip)) => net.contains(ip),
            _ => false,
        })
    }
}

enum Host {
    Name(String),
    Ip(IpAddr),
}

/// `no_proxy`: entries separated by commas (or white space); unreadable entries skipped.
fn parse_bypass(list: &str) -> Vec<Bypass> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .filter_map(|entry| {
            if entry == "*" {
                return Some(Bypass::All);
            }
            let bare = entry.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                return Some(Bypass::Network(ipnet::IpNet::from(ip)));
            }
            if let Ok(net) = bare.parse::<ipnet::IpNet>() {
                return Some(Bypass::Network(net));
            }
            let name = entry.trim_start_matches('.').trim_end_matches('.');
            (!name.is_empty()).then(|| Bypass::Domain(name.to_ascii_lowercase()))
        })
        .collect()
}

/// The start of every outbound HTTP client: the process-default rustls provider, no
/// redirects (neither a secret form nor a bearer token is ever re-sent elsewhere),
/// mailgate's user agent, and the proxy SPEC §7 says, resolved per request. Callers add
/// their timeouts and pool settings.
pub fn client_builder(https_proxy: Option<&ProxyUrl>) -> Result<reqwest::ClientBuilder, String> {
    crate::tls::install_crypto_provider();
    let proxies = Proxies::from_process(https_proxy)?;
    // reqwest's own reading of the environment is off: it exempts loopback, and SPEC §7
    // proxies loopback unless NO_PROXY lists it.
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("mailgate/", env!("CARGO_PKG_VERSION")));
    if !proxies.is_direct() {
        let proxies = Arc::new(proxies);
        builder = builder.proxy(reqwest::Proxy::custom(move |url| {
            proxies.for_url(url).map(|p| p.expose().clone())
        }));
    }
    Ok(builder)
}

/// When a request failed because the proxy refused the tunnel (`CONNECT` answered with
/// 407 or another non-2xx), says so in words; the proxy's URL is never part of them.
pub fn proxy_refusal(e: &reqwest::Error) -> Option<&'static str> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        // hyper-util's tunnel errors, by their text (the type is not exported).
        let text = err.to_string();
        match text.strip_prefix("tunnel error: ") {
            Some("proxy authorization required") => {
                return Some(
                    "the outbound proxy wants credentials or refused them (HTTP 407: check the user and password of https_proxy)",
                );
            }
            // Some proxies (tinyproxy) refuse wrong credentials with 401 instead.
            Some("unsuccessful") => {
                return Some(
                    "the outbound proxy refused the tunnel (check https_proxy, its user and password, and that it allows CONNECT to port 443)",
                );
            }
            _ => {}
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn via(proxies: &Proxies, url: &str) -> Option<String> {
        proxies
            .for_url(&Url::parse(url).unwrap())
            .map(|p| p.expose().to_string())
    }

    #[test]
    fn the_configured_proxy_takes_every_request_and_ignores_the_environment() {
        let configured = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        let p = Proxies::new(
            Some(&configured),
            &env(&[("https_proxy", "http://other:1"), ("no_proxy", "*")]),
        )
        .unwrap();
        for url in [
            "https://login.microsoftonline.com/x",
            "http://127.0.0.1:8080/token",
        ] {
            assert_eq!(
                via(&p, url).as_deref(),
                Some("http://proxy.corp:3128/"),
                "{url}"
            );
        }
    }

    #[test]
    fn the_environment_is_read_as_curl_reads_it() {
        let https = "https://graph.microsoft.com/v1.0";
        let http = "http://token.example/t";
        // Lowercase first, then uppercase, for every scheme.
        let p = Proxies::new(
            None,
            &env(&[
                ("https_proxy", "http://lower:1"),
                ("HTTPS_PROXY", "http://upper:2"),
                ("HTTP_PROXY", "http://httpoxy:3"),
            ]),
        )
        .unwrap();
        assert_eq!(via(&p, https).as_deref(), Some("http://lower:1/"));
        assert_eq!(via(&p, http).as_deref(), Some("http://httpoxy:3/"));
        let p = Proxies::new(
            None,
            &env(&[
                ("http_proxy", "http://lower:4"),
                ("HTTP_PROXY", "http://upper:5"),
            ]),
        )
        .unwrap();
        assert_eq!(via(&p, http).as_deref(), Some("http://lower:4/"));
        let p = Proxies::new(None, &env(&[("HTTPS_PROXY", "http://upper:2")])).unwrap();
        assert_eq!(via(&p, https).as_deref(), Some("http://upper:2/"));
        let p = Proxies::new(None, &env(&[("http_proxy", "http://h:4")])).unwrap();
        assert_eq!(via(&p, http).as_deref(), Some("http://h:4/"));
        assert_eq!(via(&p, https), None, "http_proxy is for http URLs only");
        // ALL_PROXY when the scheme's own is unset or empty.
        let p = Proxies::new(
            None,
            &env(&[("https_proxy", ""), ("ALL_PROXY", "http://all:5")]),
        )
        .unwrap();
        assert_eq!(via(&p, https).as_deref(), Some("http://all:5/"));
        assert_eq!(via(&p, http).as_deref(), Some("http://all:5/"));
        let p = Proxies::new(
            None,
            &env(&[("all_proxy", "http://a:6"), ("ALL_PROXY", "http://b:7")]),
        )
        .unwrap();
        assert_eq!(via(&p, https).as_deref(), Some("http://a:6/"));
        // Nothing set: direct.
        let p = Proxies::new(None, &env(&[("PATH", "/bin")])).unwrap();
        assert!(p.is_direct());
        assert_eq!(via(&p, https), None);
    }

    #[test]
    fn no_proxy_names_hosts_domains_and_networks_and_loopback_only_if_listed() {
        let proxied = |no_proxy: &str, url: &str| {
            let p = Proxies::new(
                None,
                &env(&[
                    ("https_proxy", "http://p:1"),
                    ("http_proxy", "http://p:1"),
                    ("NO_PROXY", no_proxy),
                ]),
            )
            .unwrap();
            via(&p, url).is_some()
        };
        assert!(
            proxied("", "http://127.0.0.1:8080/token"),
            "loopback is not exempt"
        );
        assert!(proxied("example.com", "http://localhost/"));
        assert!(!proxied("localhost,127.0.0.1", "http://127.0.0.1:8080/"));
        assert!(!proxied("localhost,127.0.0.1", "http://LOCALHOST:8080/"));
        assert!(!proxied("*", "https://graph.microsoft.com/"));
        assert!(!proxied("microsoft.com", "https://graph.microsoft.com/"));
        assert!(!proxied(".microsoft.com", "https://graph.microsoft.com/"));
        assert!(!proxied("microsoft.com", "https://microsoft.com/"));
        assert!(proxied("microsoft.com", "https://notmicrosoft.com/"));
        assert!(proxied("graph.microsoft.com", "https://microsoft.com/"));
        assert!(!proxied("10.0.0.0/8, ::1", "http://10.1.2.3/"));
        assert!(!proxied("10.0.0.0/8 ::1", "http://[::1]:80/"));
        assert!(!proxied("[::1]", "http://[::1]:80/"));
        assert!(proxied("10.0.0.0/8", "http://11.1.2.3/"));
        assert!(proxied("10.0.0.0/8", "http://ten.example/"));
        // no_proxy (lowercase) wins over NO_PROXY.
        let p = Proxies::new(
            None,
            &env(&[
                ("https_proxy", "http://p:1"),
                ("no_proxy", "a.example"),
                ("NO_PROXY", "*"),
            ]),
        )
        .unwrap();
        assert_eq!(
            via(&p, "https://b.example/").as_deref(),
            Some("http://p:1/")
        );
        assert_eq!(via(&p, "https://a.example/"), None);
    }

    #[test]
    fn proxy_urls_follow_curl_defaults_and_refuse_what_cannot_work() {
        let p = Proxies::new(None, &env(&[("https_proxy", "proxy.corp:3128")])).unwrap();
        assert_eq!(
            via(&p, "https://x/").as_deref(),
            Some("http://proxy.corp:3128/"),
            "no scheme: http"
        );
        let p = Proxies::new(None, &env(&[("https_proxy", "http://proxy.corp")])).unwrap();
        assert_eq!(
            via(&p, "https://x/").as_deref(),
            Some("http://proxy.corp:1080/")
        );
        assert_eq!(
            ProxyUrl::parse("https://proxy.corp")
                .unwrap()
                .expose()
                .port_or_known_default(),
            Some(443)
        );
        let e = Proxies::new(None, &env(&[("ALL_PROXY", "socks5://s:1080")])).unwrap_err();
        assert!(e.contains("ALL_PROXY") && e.contains("socks5"), "{e}");
        assert!(
            ProxyUrl::parse("proxy.corp:3128").is_err(),
            "the config needs a scheme"
        );
        for bad in [
            "ftp://p:1",
            "http://",
            "http://p:1/path",
            "http://p:1/?q",
            "http://p:99999",
        ] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_proxy_password_never_prints() {
        let p = ProxyUrl::parse("http://user:s3cr3t-pw@proxy.corp:3128").unwrap();
        assert_eq!(p.to_string(), "http://***@proxy.corp:3128");
        assert!(!format!("{p:?}").contains("s3cr3t"));
        assert!(!format!("{p:?}").contains("user"));
        assert_eq!(p.expose().password(), Some("s3cr3t-pw"));
        let e = ProxyUrl::parse("http://user:s3cr3t-pw@proxy.corp:3128/x").unwrap_err();
        assert!(!e.contains("s3cr3t"), "{e}");
        let proxies = Proxies::new(Some(&p), &HashMap::new()).unwrap();
        assert!(!format!("{proxies:?}").contains("s3cr3t"));
        assert_eq!(
            proxies.describe(),
            "through http://***@proxy.corp:3128 ([server] https_proxy)"
        );
        let from_env = Proxies::new(
            None,
            &env(&[
                ("HTTPS_PROXY", "http://u:s3cr3t@p:8080"),
                ("no_proxy", "a,b"),
            ]),
        )
        .unwrap();
        assert_eq!(
            from_env.describe(),
            "from the environment: https through http://***@p:8080, http direct; 2 no_proxy entries go direct"
        );
    }
}
