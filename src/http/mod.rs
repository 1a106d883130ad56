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
//! without a port uses curl's defaults (1080 for http and socks, 443 for https). The
//! environment may also name a SOCKS proxy as curl allows (`socks5h://` resolves names at
//! the proxy, `socks5://` here; `socks4`/`socks4a` too); `[server] https_proxy` is an HTTP
//! proxy (SPEC §3). An environment proxy mailgate cannot use never stops start-up (the
//! variable may be meant for other programs, or never be consulted): only a request that
//! would go through it fails, temporarily, naming the variable ([`Route::Unusable`]).
//! SMTP channels never use a proxy.

mod limits;

pub use limits::*;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use reqwest::Url;

/// The schemes `[server] https_proxy` takes: an HTTP proxy (SPEC §3).
const CONFIG_SCHEMES: &[&str] = &["http", "https"];
/// The schemes an environment variable takes, as curl reads them (reqwest's `socks`).
const ENV_SCHEMES: &[&str] = &["http", "https", "socks5h", "socks5", "socks4a", "socks4"];

/// A proxy URL: a scheme, a host, an optional port and `user:password@`. It may hold a
/// password, so it prints as its scheme and host only, the user part as `***`.
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
        ProxyUrl::parse_as(text, CONFIG_SCHEMES)
    }

    /// Parses a proxy URL as curl reads one from the environment: no scheme means
    /// `http://`.
    fn parse_env(text: &str) -> Result<ProxyUrl, String> {
        ProxyUrl::parse_as(text, ENV_SCHEMES)
    }

    fn parse_as(text: &str, schemes: &[&str]) -> Result<ProxyUrl, String> {
        let text = text.trim();
        let full = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let mut url = Url::parse(&full).map_err(|e| format!("not a URL ({e})"))?;
        if !schemes.contains(&url.scheme()) {
            return Err(format!(
                "scheme {:?} is not supported ({})",
                crate::text::escape_controls(url.scheme()),
                schemes
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".to_string());
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("must be scheme://[user:password@]host[:port] and nothing after".into());
        }
        // SOCKS4 has a user id but no password: a password would be quietly dropped.
        if url.scheme().starts_with("socks4") && url.password().is_some() {
            return Err("socks4 cannot carry a password (socks5:// can)".to_string());
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

/// An environment variable naming a proxy mailgate cannot use: the variable, its value
/// with any `user:password@` masked, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    variable: &'static str,
    shown: String,
    why: String,
}

impl Unusable {
    fn new(variable: &'static str, value: &str, why: String) -> Unusable {
        Unusable {
            variable,
            shown: mask_userinfo(value),
            why,
        }
    }
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the environment's {}={} is not a proxy mailgate can use: {}",
            self.variable, self.shown, self.why
        )
    }
}

/// A proxy value for showing: everything before the last `@` of its authority is `***`,
/// control characters escaped, cut at 200 characters. For values that may not parse.
fn mask_userinfo(value: &str) -> String {
    let value = value.trim();
    let (scheme, rest) = match value.find("://") {
        Some(i) => value.split_at(i + 3),
        None => ("", value),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let shown = match authority.rfind('@') {
        Some(at) => format!("{scheme}***{}{tail}", &authority[at..]),
        None => value.to_string(),
    };
    let shown = crate::text::escape_controls(&shown).to_string();
    match shown.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &shown[..cut]),
        None => shown,
    }
}

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Direct,
    Through(&'a ProxyUrl),
    /// The variable that applies names no proxy mailgate can use: the request fails
    /// (temporarily) rather than going direct on a network that may allow only the proxy.
    Unusable(&'a Unusable),
}

/// One proxy variable of the environment, when set.
type EnvProxy = Option<Result<ProxyUrl, Unusable>>;

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
    https: EnvProxy,
    http: EnvProxy,
    all: EnvProxy,
    bypass: Vec<Bypass>,
}

impl Proxies {
    /// The routes for `[server] https_proxy` (`configured`) and the environment `env`.
    /// Never fails: a variable naming a proxy mailgate cannot use is kept as
    /// [`Route::Unusable`] for the requests it would carry.
    pub fn new(configured: Option<&ProxyUrl>, env: &HashMap<String, String>) -> Proxies {
        if let Some(proxy) = configured {
            return Proxies {
                configured: Some(proxy.clone()),
                ..Proxies::default()
            };
        }
        let var = |names: &[&'static str]| {
            names.iter().find_map(|name| {
                env.get(*name)
                    .map(|v| v.trim())
                    .filter(|v| !v.is_empty())
                    .map(|v| (*name, v))
            })
        };
        let proxy = |names: &[&'static str]| -> EnvProxy {
            let (name, value) = var(names)?;
            Some(ProxyUrl::parse_env(value).map_err(|why| Unusable::new(name, value, why)))
        };
        Proxies {
            configured: None,
            https: proxy(&["https_proxy", "HTTPS_PROXY"]),
            http: proxy(&["http_proxy", "HTTP_PROXY"]),
            all: proxy(&["all_proxy", "ALL_PROXY"]),
            bypass: var(&["no_proxy", "NO_PROXY"])
                .map(|(_, list)| parse_bypass(list))
                .unwrap_or_default(),
        }
    }

    /// The routes for `configured` and this process's environment.
    pub fn from_process(configured: Option<&ProxyUrl>) -> Proxies {
        // Non-UTF-8 variables cannot name a usable proxy; they are skipped.
        let env: HashMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Proxies::new(configured, &env)
    }

    /// Where a request to `url` goes.
    pub fn route(&self, url: &Url) -> Route<'_> {
        if let Some(proxy) = &self.configured {
            return Route::Through(proxy);
        }
        let proxy = match url.scheme() {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }
        .or(self.all.as_ref());
        match proxy {
            None => Route::Direct,
            Some(_) if self.bypassed(url) => Route::Direct,
            Some(Ok(proxy)) => Route::Through(proxy),
            Some(Err(unusable)) => Route::Unusable(unusable),
        }
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
        let show = |p: Option<&Result<ProxyUrl, Unusable>>| match p {
            None => "direct".to_string(),
            Some(Ok(p)) => format!("through {p}"),
            Some(Err(u)) => format!("FAILING (unusable {})", u.variable),
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

/// The one outbound HTTP client (token endpoints, Microsoft Graph): reqwest's, and the
/// routes it was built with, so that [`Client::send`] can refuse a request whose proxy
/// is unusable instead of letting reqwest send it direct. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    inner: reqwest::Client,
    proxies: Arc<Proxies>,
}

/// Why [`Client::send`] got no answer.
#[derive(Debug)]
pub enum SendError {
    /// The proxy this request must go through is unusable: a temporary failure, fixed in
    /// the environment (the text names the variable, its password masked).
    Proxy(String),
    /// reqwest's error (connect, timeout, TLS, a refused tunnel…).
    Http(reqwest::Error),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Proxy(text) => f.write_str(text),
            SendError::Http(e) => e.fmt(f),
        }
    }
}

impl Client {
    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.inner.get(url)
    }

    pub fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.inner.post(url)
    }

    pub fn put(&self, url: &str) -> reqwest::RequestBuilder {
        self.inner.put(url)
    }

    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.inner.request(method, url)
    }

    /// Sends `request` (built from this client) unless its proxy is unusable.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SendError> {
        let request = request.build().map_err(SendError::Http)?;
        if let Route::Unusable(unusable) = self.proxies.route(request.url()) {
            return Err(SendError::Proxy(unusable.to_string()));
        }
        self.inner.execute(request).await.map_err(SendError::Http)
    }
}

/// The start of every outbound HTTP client: the process-default rustls provider, no
/// redirects (neither a secret form nor a bearer token is ever re-sent elsewhere),
/// mailgate's user agent, and the proxy SPEC §7 says, resolved per request. `finish`
/// adds the caller's timeouts and pool settings. Only reqwest's own build can fail; an
/// unusable environment proxy fails the requests it would carry, not this.
pub fn client(
    https_proxy: Option<&ProxyUrl>,
    finish: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<Client, String> {
    client_with(Proxies::from_process(https_proxy), finish)
}

fn client_with(
    proxies: Proxies,
    finish: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<Client, String> {
    crate::tls::install_crypto_provider();
    let proxies = Arc::new(proxies);
    // reqwest's own reading of the environment is off: it exempts loopback, and SPEC §7
    // proxies loopback unless NO_PROXY lists it.
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("mailgate/", env!("CARGO_PKG_VERSION")));
    if !proxies.is_direct() {
        let routes = Arc::clone(&proxies);
        builder = builder.proxy(reqwest::Proxy::custom(move |url| {
            // Unusable never gets here: `Client::send` refused it.
            match routes.route(url) {
                Route::Through(p) => Some(p.expose().clone()),
                Route::Direct | Route::Unusable(_) => None,
            }
        }));
    }
    let inner = finish(builder).build().map_err(|e| e.to_string())?;
    Ok(Client { inner, proxies })
}

/// When a request failed at the proxy (an HTTP proxy's `CONNECT` answered with 407 or
/// another non-2xx; a SOCKS proxy unreachable or refusing), says so in words; the proxy's
/// URL is never part of them.
pub fn proxy_refusal(e: &reqwest::Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        // hyper-util's tunnel and SOCKS errors, by their text (the types are not exported).
        if let Some(words) = refusal_words(&err.to_string()) {
            return Some(words);
        }
        source = err.source();
    }
    None
}

/// [`proxy_refusal`] for one error's text.
fn refusal_words(text: &str) -> Option<String> {
    match text.strip_prefix("tunnel error: ") {
        Some("proxy authorization required") => {
            return Some(
                "the outbound proxy wants credentials or refused them (HTTP 407: check the user and password of https_proxy)".into(),
            );
        }
        // Some proxies (tinyproxy) refuse wrong credentials with 401 instead.
        Some("unsuccessful") => {
            return Some(
                "the outbound proxy refused the tunnel (check https_proxy, its user and password, and that it allows CONNECT to port 443)".into(),
            );
        }
        _ => {}
    }
    // Fixed texts (hyper-util's SOCKS errors): no host, user or password in them.
    let socks = text.strip_prefix("SOCKS error: ")?;
    Some(match socks {
        "failed to create underlying connection" => {
            "cannot connect to the SOCKS proxy (check the environment's proxy variable)".into()
        }
        "credentials not accepted" => {
            "the SOCKS proxy did not accept the credentials (check the user and password in the environment's proxy variable)".into()
        }
        "server does not support user/pass authentication" => {
            "the SOCKS proxy does not take a user and password (remove them from the environment's proxy variable)".into()
        }
        other => format!("the SOCKS proxy failed: {other}"),
    })
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
        match proxies.route(&Url::parse(url).unwrap()) {
            Route::Direct => None,
            Route::Through(p) => Some(p.expose().to_string()),
            Route::Unusable(u) => panic!("{url}: {u}"),
        }
    }

    #[test]
    fn the_configured_proxy_takes_every_request_and_ignores_the_environment() {
        let configured = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        let p = Proxies::new(
            Some(&configured),
            &env(&[("https_proxy", "http://other:1"), ("no_proxy", "*")]),
        );
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
        );
        assert_eq!(via(&p, https).as_deref(), Some("http://lower:1/"));
        assert_eq!(via(&p, http).as_deref(), Some("http://httpoxy:3/"));
        let p = Proxies::new(
            None,
            &env(&[
                ("http_proxy", "http://lower:4"),
                ("HTTP_PROXY", "http://upper:5"),
            ]),
        );
        assert_eq!(via(&p, http).as_deref(), Some("http://lower:4/"));
        let p = Proxies::new(None, &env(&[("HTTPS_PROXY", "http://upper:2")]));
        assert_eq!(via(&p, https).as_deref(), Some("http://upper:2/"));
        let p = Proxies::new(None, &env(&[("http_proxy", "http://h:4")]));
        assert_eq!(via(&p, http).as_deref(), Some("http://h:4/"));
        assert_eq!(via(&p, https), None, "http_proxy is for http URLs only");
        // ALL_PROXY when the scheme's own is unset or empty.
        let p = Proxies::new(
            None,
            &env(&[("https_proxy", ""), ("ALL_PROXY", "http://all:5")]),
        );
        assert_eq!(via(&p, https).as_deref(), Some("http://all:5/"));
        assert_eq!(via(&p, http).as_deref(), Some("http://all:5/"));
        let p = Proxies::new(
            None,
            &env(&[("all_proxy", "http://a:6"), ("ALL_PROXY", "http://b:7")]),
        );
        assert_eq!(via(&p, https).as_deref(), Some("http://a:6/"));
        // Nothing set: direct.
        let p = Proxies::new(None, &env(&[("PATH", "/bin")]));
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
            );
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
        );
        assert_eq!(
            via(&p, "https://b.example/").as_deref(),
            Some("http://p:1/")
        );
        assert_eq!(via(&p, "https://a.example/"), None);
    }

    #[test]
    fn proxy_urls_follow_curl_defaults_and_refuse_what_cannot_work() {
        let p = Proxies::new(None, &env(&[("https_proxy", "proxy.corp:3128")]));
        assert_eq!(
            via(&p, "https://x/").as_deref(),
            Some("http://proxy.corp:3128/"),
            "no scheme: http"
        );
        let p = Proxies::new(None, &env(&[("https_proxy", "http://proxy.corp")]));
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
        let proxies = Proxies::new(Some(&p), &HashMap::new());
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
        );
        assert_eq!(
            from_env.describe(),
            "from the environment: https through http://***@p:8080, http direct; 2 no_proxy entries go direct"
        );
    }

    fn unusable(proxies: &Proxies, url: &str) -> String {
        match proxies.route(&Url::parse(url).unwrap()) {
            Route::Unusable(u) => u.to_string(),
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn socks_proxies_in_the_environment_are_used_as_curl_uses_them() {
        for (value, expected) in [
            ("socks5://s:1081", "socks5://s:1081"),
            ("socks5h://u:pw@s", "socks5h://u:pw@s:1080"),
            ("socks4://s:1082", "socks4://s:1082"),
            ("socks4a://s", "socks4a://s:1080"),
        ] {
            let p = Proxies::new(None, &env(&[("ALL_PROXY", value)]));
            for url in [
                "https://graph.microsoft.com/v1.0",
                "http://127.0.0.1:8080/t",
            ] {
                assert_eq!(via(&p, url).as_deref(), Some(expected), "{value} {url}");
            }
        }
        let p = Proxies::new(None, &env(&[("all_proxy", "socks5h://u:s3cr3t@s:1080")]));
        assert_eq!(
            p.describe(),
            "from the environment: https through socks5h://***@s:1080, http through socks5h://***@s:1080"
        );
        // A configured proxy is an HTTP proxy (SPEC §3): socks there is a config error.
        assert!(ProxyUrl::parse("socks5://s:1080").is_err());
    }

    #[test]
    fn an_unusable_environment_proxy_fails_only_the_requests_it_would_carry() {
        let garbage = "ftp://user:s3cr3t-pw@p:21";
        // https_proxy takes https URLs; ALL_PROXY would carry only http ones.
        let p = Proxies::new(
            None,
            &env(&[("https_proxy", "http://p:3128"), ("ALL_PROXY", garbage)]),
        );
        assert_eq!(
            via(&p, "https://login.microsoftonline.com/t").as_deref(),
            Some("http://p:3128/")
        );
        let why = unusable(&p, "http://127.0.0.1:8080/token");
        assert!(why.contains("ALL_PROXY=ftp://***@p:21"), "{why}");
        assert!(why.contains("\"ftp\" is not supported"), "{why}");
        assert!(!why.contains("s3cr3t") && !why.contains("user"), "{why}");
        assert!(!format!("{p:?}").contains("s3cr3t"));
        assert!(p.describe().contains("http FAILING (unusable ALL_PROXY)"));
        // A host NO_PROXY lists never consults it.
        let p = Proxies::new(
            None,
            &env(&[("ALL_PROXY", garbage), ("NO_PROXY", "127.0.0.1")]),
        );
        assert_eq!(via(&p, "http://127.0.0.1:8080/token"), None);
        assert!(unusable(&p, "https://graph.microsoft.com/").contains("ALL_PROXY"));
        // The scheme's own variable shadows ALL_PROXY, unusable or not (as in curl):
        // a request never falls back to another proxy, nor to going direct.
        let p = Proxies::new(
            None,
            &env(&[("https_proxy", "http://[::1"), ("ALL_PROXY", "http://a:1")]),
        );
        let why = unusable(&p, "https://graph.microsoft.com/");
        assert!(
            why.contains("https_proxy=http://[::1") && why.contains("not a URL"),
            "{why}"
        );
        assert_eq!(via(&p, "http://x/").as_deref(), Some("http://a:1/"));
        let p = Proxies::new(None, &env(&[("HTTP_PROXY", "socks4://u:pw@s:1080")]));
        assert!(unusable(&p, "http://x/").contains("socks4 cannot carry a password"));
        // `[server] https_proxy` makes the environment irrelevant.
        let configured = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        let p = Proxies::new(Some(&configured), &env(&[("ALL_PROXY", garbage)]));
        assert_eq!(
            via(&p, "http://x/").as_deref(),
            Some("http://proxy.corp:3128/")
        );
    }

    #[test]
    fn an_unusable_value_is_shown_without_its_user_part() {
        assert_eq!(mask_userinfo("socks9://u:pw@h:1"), "socks9://***@h:1");
        assert_eq!(mask_userinfo("u:p@w@h:1/x@y"), "***@h:1/x@y");
        assert_eq!(mask_userinfo("  http://h:1 "), "http://h:1");
        assert_eq!(mask_userinfo("a\nb"), "a\\x0ab");
        assert_eq!(mask_userinfo(&"x".repeat(300)).chars().count(), 201);
    }

    #[tokio::test]
    async fn a_request_through_an_unusable_proxy_fails_before_any_connection() {
        let proxies = Proxies::new(
            None,
            &env(&[("ALL_PROXY", "socks9://user:s3cr3t@127.0.0.1:9")]),
        );
        let client = client_with(proxies, |b| b).unwrap();
        let request = client.post("http://127.0.0.1:9/token");
        match client.send(request).await {
            Err(SendError::Proxy(why)) => {
                assert!(why.contains("ALL_PROXY=socks9://***@127.0.0.1:9"), "{why}");
                assert!(!why.contains("s3cr3t"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_at_the_proxy_are_said_in_words() {
        assert!(
            refusal_words("tunnel error: proxy authorization required")
                .unwrap()
                .contains("HTTP 407")
        );
        assert!(
            refusal_words("SOCKS error: credentials not accepted")
                .unwrap()
                .contains("did not accept the credentials")
        );
        assert_eq!(
            refusal_words("SOCKS error: connection refused").as_deref(),
            Some("the SOCKS proxy failed: connection refused")
        );
        assert_eq!(refusal_words("error trying to connect: refused"), None);
    }
}
