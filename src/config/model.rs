//! The configuration's types: what every other module takes as given.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::Secret;
use super::index::ChannelIndex;
use super::oauth;
use super::values::MB;

/// Index of a channel in [`Config::channels`].
pub type ChannelId = usize;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Path the configuration was read from (relative paths inside it are already resolved).
    pub path: PathBuf,
    /// `[server]`.
    pub server: Server,
    /// `[[users]]`: accounts for clients that AUTH to mailgate.
    pub users: Vec<User>,
    /// `[channels.NAME]`, sorted by name; [`ChannelId`] indexes this.
    pub channels: Vec<Channel>,
    /// `[routing]`.
    pub routing: Routing,
    /// `[metrics]`: absent = no metrics/health HTTP listener.
    pub metrics: Option<Metrics>,
    /// True when the file holds a literal secret (password or token) rather than `*_env`/`*_file`.
    pub has_literal_secrets: bool,
    /// `[state]`: where counters, channel health and tokens are kept.
    pub state: StateBackend,
    /// The channels by name and scope, built at first use (see [`Config::index`]);
    /// `Default::default()` when assembling a `Config` by hand.
    pub index: OnceLock<ChannelIndex>,
    /// `[[rewrite]]` entries in file order (SPEC §4a): the first that matches applies.
    pub rewrites: Vec<RewriteRule>,
    /// What `check` warns about without refusing the file (e.g. a `[[rewrite]]` entry an
    /// earlier one always takes first), in file order.
    pub warnings: Vec<super::Problem>,
}

/// One `[[rewrite]]` entry (SPEC §4a): legacy senders given a real one at intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteRule {
    /// `match`: the envelope senders it takes (exact address, `*@domain` or `*`).
    pub pattern: SenderPattern,
    /// The envelope sender from here on: one exact address some channel takes.
    pub sender: String,
    /// What happens to the `From:`/`Sender:` headers.
    pub header_from: HeaderFrom,
    /// Only clients from these networks; empty = any client.
    pub networks: Vec<ipnet::IpNet>,
    /// Only this authenticated `[[users]]` name; `None` = any client.
    pub user: Option<String>,
    /// The entry's line in the file (for `route` and the log).
    pub line: Option<usize>,
}

/// `header_from` of a `[[rewrite]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderFrom {
    /// `From:` becomes the entry's sender, `Sender:` goes.
    #[default]
    Replace,
    /// The headers stay as the client wrote them (and the header check applies to them).
    Keep,
}

impl HeaderFrom {
    /// The name used in `proxy.toml`.
    pub fn name(self) -> &'static str {
        match self {
            HeaderFrom::Replace => "replace",
            HeaderFrom::Keep => "keep",
        }
    }
}

/// `[state] backend`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateBackend {
    /// Files beside the spool, this host only.
    #[default]
    Local,
    /// One Redis shared by every host that sends over the same channels.
    Redis(RedisSettings),
}

/// `[state] backend = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` url; may hold a password, so it is a secret.
    pub url: Secret,
    /// The url without user or password, for messages.
    pub display: String,
    /// Put before every key (several fleets may share one Redis).
    pub key_prefix: String,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Plain listeners (STARTTLS offered when `tls` is set).
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners.
    pub tls_listen: Vec<SocketAddr>,
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// Certificate and key for STARTTLS / implicit TLS.
    pub tls: Option<TlsFiles>,
    /// Largest message accepted, in bytes.
    pub max_message_size: u64,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Store-and-forward or synchronous forwarding.
    pub delivery: DeliveryMode,
    /// Spool directory (queue mode).
    pub spool_dir: PathBuf,
    /// Queue mode: first retry delay.
    pub retry_first: Duration,
    /// Queue mode: longest retry delay.
    pub retry_max: Duration,
    /// Queue mode: a message fails after this long.
    pub give_up_after: Duration,
    /// Clients must AUTH before MAIL.
    pub require_auth: bool,
    /// Client networks allowed to connect; empty = any.
    pub allow_networks: Vec<ipnet::IpNet>,
    /// `From:`/`Sender:` must be allowed on the chosen channel.
    pub check_header_from: bool,
    /// What to do with a bare CR or LF in message data.
    pub bare_lf: BareLf,
    /// Session idle timeout (SPEC: 5 minutes; `idle_timeout` overrides it).
    pub idle_timeout: Duration,
    /// Largest header section accepted, in bytes (a larger one is refused, never cut).
    pub max_header_size: u64,
    /// Most connections at once from one non-loopback client address.
    pub max_connections_per_client: usize,
    /// On SIGTERM/SIGINT, how long an open transaction may take to finish.
    pub shutdown_grace: Duration,
    /// Token requests and Graph through this proxy; `None`: the environment's (SPEC §7).
    /// Prints without its user part (it may hold a password).
    pub https_proxy: Option<crate::http::ProxyUrl>,
}

/// Certificate and key files (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// `server.delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Store-and-forward through the spool.
    Queue,
    /// Forward during the client's session.
    Relay,
}

/// `server.bare_lf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLf {
    /// Turn a bare CR or LF into CRLF.
    Normalize,
    /// Refuse the message with 550 5.6.11.
    Reject,
}

/// `[[users]]`.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// argon2 PHC string.
    pub password_hash: Secret,
    /// Envelope senders this user may use.
    pub senders: Vec<SenderPattern>,
}

/// One entry of a scope list, already parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    /// `alice@example.com` (stored lower-cased in the domain part; local part as written).
    Exact(String),
    /// `example.com` from `domains = [...]`: every sender of that domain.
    Domain(String),
    /// `*@example.com`.
    AnyAtDomain(String),
    /// `*`.
    Any,
}

/// `[channels.NAME]`.
#[derive(Debug, Clone)]
pub struct Channel {
    /// The NAME in `[channels.NAME]`.
    pub name: String,
    /// Who may send over it (`senders` and `domains` together).
    pub scope: Vec<SenderPattern>,
    /// Credentials belong to mailboxes: exact addresses only (office365, gmail, `scope = "address"`).
    pub address_scoped: bool,
    /// Preset the channel was built from, if any (for display).
    pub preset: Option<String>,
    /// Where the messages go.
    pub kind: ChannelKind,
    /// Provider limits.
    pub limits: Limits,
    /// `fallback = "OTHER"`: the channel that takes this one's mail while the provider
    /// refuses the way this one authenticates (SPEC §7).
    pub fallback: Option<ChannelId>,
}

/// What a channel is.
// A handful of channels, built once at load: their size does not matter.
#[allow(clippy::large_enum_variant)]
// PartialEq: a reload restarts a channel whose transport differs in any way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    /// An upstream SMTP server.
    Smtp(SmtpTarget),
    /// Microsoft Graph `sendMail` over HTTPS.
    Graph(GraphTarget),
    /// A local folder: one file per message.
    File {
        /// Target folder.
        dir: PathBuf,
    },
}

impl ChannelKind {
    /// The channel's OAuth settings, when it uses OAuth (XOAUTH2 or Graph).
    pub fn oauth(&self) -> Option<&oauth::OAuth> {
        match self {
            ChannelKind::Smtp(t) => t.oauth.as_ref(),
            ChannelKind::Graph(g) => Some(&g.oauth),
            ChannelKind::File { .. } => None,
        }
    }
}

/// An upstream SMTP server and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpTarget {
    /// Host name (also the TLS server name).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Transport security.
    pub tls: TlsMode,
    /// Extra trust root (PEM) besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// AUTH user name; `None` = no AUTH.
    pub username: Option<String>,
    /// AUTH password.
    pub password: Option<Secret>,
    /// `auth = "xoauth2"`: AUTH XOAUTH2 with a token from these settings (and `username`
    /// as the XOAUTH2 user) instead of a password.
    pub oauth: Option<oauth::OAuth>,
}

/// A mailbox reached through Microsoft Graph (`kind = "graph"`, SPEC §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphTarget {
    /// The mailbox that sends (`POST {graph_url}/v1.0/users/{mailbox}/sendMail`).
    pub mailbox: String,
    /// Where the bearer tokens come from (provider microsoft; `oauth.graph_url` is the API root).
    pub oauth: oauth::OAuth,
}

impl GraphTarget {
    /// The API root, e.g. `https://graph.microsoft.com` (no trailing slash).
    pub fn graph_url(&self) -> &str {
        self.oauth.graph_url.trim_end_matches('/')
    }
}

/// `tls` of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS, required (never falls back to plaintext).
    Starttls,
    /// TLS from the first byte.
    Implicit,
    /// Plaintext; loopback hosts only.
    None,
}

/// Limits of a channel; `None` = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Messages per time window.
    pub rate: Option<Rate>,
    /// Recipients per rolling 24 hours.
    pub recipients_per_day: Option<u64>,
    /// Recipients per upstream transaction.
    pub max_recipients: Option<usize>,
    /// Most upstream connections at once (default 4).
    pub connections: usize,
    /// Largest message the provider takes.
    pub max_message_size: Option<u64>,
}

impl Limits {
    /// Most recipients one message can ever have when it goes out whole, in one
    /// transaction that is never split (a graph channel; any channel in relay mode): its
    /// `max_recipients`, and no more than its `recipients_per_day` (a message over a day's
    /// quota would wait for ever). `None`: unlimited.
    pub fn whole_message_recipients(&self) -> Option<usize> {
        let per_day = self
            .recipients_per_day
            .map(|d| usize::try_from(d).unwrap_or(usize::MAX));
        match (self.max_recipients, per_day) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `"30/min"`: `count` messages per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Messages allowed in one window.
    pub count: u64,
    /// Window length.
    pub per: Duration,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// Where `/metrics` and `/healthz` are served (`"localhost:PORT"` is both loopbacks).
    pub listen: Vec<SocketAddr>,
    /// Clients answered besides loopback ones (SPEC §9); everyone else gets `403`.
    pub allow_networks: Vec<ipnet::IpNet>,
    /// `status_page = true` (the default): `/` and `/status.json` are served too.
    pub status_page: bool,
}

impl Metrics {
    /// `listen` with the defaults of the other keys (loopback clients only, status page on).
    pub fn on(listen: Vec<SocketAddr>) -> Self {
        Metrics {
            listen,
            allow_networks: Vec::new(),
            status_page: true,
        }
    }
}

/// `[routing]`.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Where bulk mail goes instead of a mailbox channel.
    pub bulk_channel: Option<ChannelId>,
    /// More recipients than this = bulk.
    pub bulk_recipients: Option<usize>,
}

impl Default for Server {
    /// The documented defaults (SPEC §3): loopback on 2525, queue mode, 35MB, 500
    /// recipients, 1000 connections, 1MB of headers, retries from 1m doubling to 1h, giving up after 5d.
    fn default() -> Self {
        Server {
            listen: vec![
                SocketAddr::from((Ipv4Addr::LOCALHOST, 2525)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 2525)),
            ],
            tls_listen: Vec::new(),
            hostname: "localhost".to_owned(),
            tls: None,
            max_message_size: 35 * MB,
            max_recipients: 500,
            max_connections: 1000,
            delivery: DeliveryMode::Queue,
            spool_dir: PathBuf::from("spool"),
            retry_first: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(5 * 86_400),
            require_auth: false,
            allow_networks: Vec::new(),
            check_header_from: true,
            bare_lf: BareLf::Normalize,
            idle_timeout: Duration::from_secs(300),
            max_header_size: MB,
            max_connections_per_client: 50,
            shutdown_grace: Duration::from_secs(30),
            https_proxy: None,
        }
    }
}

impl Config {
    /// The channels by name and scope. Built once, at first use: a `Config` is not changed
    /// after it is built (tests that assemble one by hand finish it before using it).
    pub fn index(&self) -> &ChannelIndex {
        self.index
            .get_or_init(|| ChannelIndex::build(&self.channels))
    }

    /// Forgets the index, for code that edits `channels` by hand after using the config.
    pub fn channels_changed(&mut self) {
        self.index = OnceLock::new();
    }

    /// The channel with this name.
    pub fn channel_id(&self, name: &str) -> Option<ChannelId> {
        self.index().channel_id(name)
    }

    /// The graph channel a message routed to `channel` may go out through: the channel
    /// itself, or one on its fallback chain (loop-free after validation; bounded anyway).
    pub fn graph_on_path(&self, channel: ChannelId) -> Option<ChannelId> {
        let mut at = Some(channel);
        for _ in 0..=self.channels.len() {
            let id = at?;
            let ch = self.channels.get(id)?;
            if matches!(ch.kind, ChannelKind::Graph(_)) {
                return Some(id);
            }
            at = ch.fallback;
        }
        None
    }

    /// The most recipients a message routed to `channel` may have because it may go out
    /// over a graph channel (the channel itself, or one on its fallback chain), which sends
    /// the whole envelope at once (SPEC §7 "Large messages over Graph"); with that channel.
    pub fn graph_recipient_cap(&self, channel: ChannelId) -> Option<(usize, ChannelId)> {
        let graph = self.graph_on_path(channel)?;
        let cap = self.channels[graph].limits.whole_message_recipients()?;
        Some((cap, graph))
    }

    /// Some channel names `id` as its `fallback`: it is no routing candidate of its own.
    pub fn is_fallback(&self, id: ChannelId) -> bool {
        self.index().is_fallback(id)
    }
}

impl SenderPattern {
    /// How the pattern is written in the file (`domains` entries as the bare domain).
    pub fn text(&self) -> String {
        match self {
            SenderPattern::Exact(a) => a.clone(),
            SenderPattern::Domain(d) => d.clone(),
            SenderPattern::AnyAtDomain(d) => format!("*@{d}"),
            SenderPattern::Any => "*".to_owned(),
        }
    }

    /// The pattern named in a sentence: domains are marked as such.
    pub fn phrase(&self) -> String {
        match self {
            SenderPattern::Domain(d) => format!("domain {d:?}"),
            other => format!("{:?}", other.text()),
        }
    }

    /// What kind of pattern it is, from most to least specific.
    pub fn specificity_name(&self) -> &'static str {
        match self {
            SenderPattern::Exact(_) => "exact address",
            SenderPattern::Domain(_) => "domain",
            SenderPattern::AnyAtDomain(_) => "*@domain",
            SenderPattern::Any => "catch-all",
        }
    }

    /// Sort key and identity: specificity rank (most specific first), then the text.
    /// Letter case is ignored throughout, local part included, as routing matches that way.
    pub fn key(&self) -> (u8, String) {
        let rank = match self {
            SenderPattern::Exact(_) => 0,
            SenderPattern::Domain(_) => 1,
            SenderPattern::AnyAtDomain(_) => 2,
            SenderPattern::Any => 3,
        };
        (rank, self.text().to_lowercase())
    }
}

impl TlsMode {
    /// The name used in `proxy.toml`.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
            TlsMode::None => "none",
        }
    }
}
