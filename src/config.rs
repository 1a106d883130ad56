//! `proxy.toml` → one validated, compiled [`Config`].
//!
//! Nothing downstream re-validates or re-parses configuration: every other module
//! takes the types defined here as given.

pub mod presets;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// True when the file holds a literal secret (password or token) rather than `*_env`/`*_file`.
    pub has_literal_secrets: bool,
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
}

/// What a channel is.
#[derive(Debug, Clone)]
pub enum ChannelKind {
    /// An upstream SMTP server.
    Smtp(SmtpTarget),
    /// A local folder: one file per message.
    File {
        /// Target folder.
        dir: PathBuf,
    },
}

/// An upstream SMTP server and how to log in to it.
#[derive(Debug, Clone)]
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

/// `"30/min"`: `count` messages per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Messages allowed in one window.
    pub count: u64,
    /// Window length.
    pub per: Duration,
}

/// `[routing]`.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Where bulk mail goes instead of a mailbox channel.
    pub bulk_channel: Option<ChannelId>,
    /// More recipients than this = bulk.
    pub bulk_recipients: Option<usize>,
}

/// A secret value (password, token, hash). Prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: only for the place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file, when the problem has a place.
    pub line: Option<usize>,
    /// What is wrong, naming the key or channel.
    pub message: String,
}

/// Every problem found in a configuration (never empty).
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, p.message)?,
                None => write!(f, "{}: {}", self.path.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    todo!("config helper: read file, then parse()")
}

/// Validates configuration text; `path` names the file in problems and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    todo!("config helper")
}

impl Config {
    /// The channel with this name.
    pub fn channel_id(&self, name: &str) -> Option<ChannelId> {
        self.channels.iter().position(|c| c.name == name)
    }
}
