//! `proxy.toml` → one validated, compiled [`Config`].
//!
//! Nothing downstream re-validates or re-parses configuration: every other module
//! takes the types defined here as given.
//!
//! [`parse`] walks the `toml_edit` document against the allowed keys itself (rather than
//! serde) so that it can report every problem at once, each with its line.
//!
//! Value forms: durations `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"5d"`; sizes in bytes
//! (integer) or `"10KB"`, `"35MB"`, `"1GB"` with **binary** units (1MB = 1024 × 1024
//! bytes); rates `"5/s"`, `"30/min"`, `"100/h"`, `"2000/day"`. Relative paths resolve
//! against the configuration file's folder.

pub mod oauth;
pub mod presets;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, Table, TableLike};

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
    /// `auth = "xoauth2"`: AUTH XOAUTH2 with a token from these settings (and `username`
    /// as the XOAUTH2 user) instead of a password.
    pub oauth: Option<oauth::OAuth>,
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
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) => Err(ConfigErrors {
            path: path.to_path_buf(),
            problems: vec![Problem {
                line: None,
                message: format!("cannot read the configuration file: {e}"),
            }],
        }),
    }
}

/// Validates configuration text; `path` names the file in problems and anchors relative paths.
///
/// Every problem is collected (not only the first) and returned in file order.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut ctx = Ctx::new(text, path);
    let config = match ImDocument::parse(text) {
        Ok(doc) => Some(ctx.config(doc.as_table(), path)),
        Err(e) => {
            let line = ctx.line(e.span());
            // toml_edit puts "expected ..." on a second line; a problem is one line.
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            ctx.problem(line, format!("TOML syntax error: {}", message.join("; ")));
            None
        }
    };
    match config {
        Some(config) if ctx.problems.is_empty() => Ok(config),
        _ => {
            let mut problems = ctx.problems;
            // Stable: problems on one line keep the order they were found in.
            problems.sort_by_key(|p| (p.line.is_none(), p.line));
            Err(ConfigErrors {
                path: path.to_path_buf(),
                problems,
            })
        }
    }
}

/// A human-readable account of `config` for `mailgate check`: channels, the routing
/// table (most specific first), listeners and delivery mode. Never shows a secret.
pub fn summary(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_summary(&mut out, config);
    out
}

fn write_summary(out: &mut String, config: &Config) -> fmt::Result {
    use fmt::Write;
    writeln!(out, "channels:")?;
    for c in &config.channels {
        match &c.kind {
            ChannelKind::Smtp(t) => {
                let host = if t.host.contains(':') {
                    format!("[{}]", t.host)
                } else {
                    t.host.clone()
                };
                writeln!(
                    out,
                    "  {}: smtp {host}:{} tls {}",
                    c.name,
                    t.port,
                    tls_name(t.tls)
                )?;
                if let Some(ca) = &t.ca_file {
                    writeln!(out, "    extra trust root: {}", ca.display())?;
                }
                match (&t.username, &t.password) {
                    (Some(user), Some(_)) => writeln!(out, "    auth: {user} (password set)")?,
                    _ => writeln!(out, "    auth: none")?,
                }
            }
            ChannelKind::File { dir } => writeln!(out, "  {}: file {}", c.name, dir.display())?,
        }
        if let Some(preset) = &c.preset {
            writeln!(out, "    preset: {preset}")?;
        }
        let patterns: Vec<String> = c
            .scope
            .iter()
            .map(|p| match p {
                SenderPattern::Domain(d) => format!("domain {d}"),
                other => pattern_text(other),
            })
            .collect();
        let scoping = if c.address_scoped {
            "address-scoped"
        } else {
            "shared"
        };
        writeln!(out, "    scope ({scoping}): {}", patterns.join(", "))?;
        writeln!(out, "    limits: {}", limits_text(&c.limits))?;
    }

    writeln!(out, "routing (most specific first):")?;
    let mut table: Vec<(&SenderPattern, &str)> = config
        .channels
        .iter()
        .flat_map(|c| c.scope.iter().map(move |p| (p, c.name.as_str())))
        .collect();
    table.sort_by(|a, b| pattern_key(a.0).cmp(&pattern_key(b.0)).then(a.1.cmp(b.1)));
    table.dedup();
    let width = table
        .iter()
        .map(|(p, _)| pattern_text(p).len())
        .max()
        .unwrap_or(0);
    for (pattern, channel) in &table {
        let text = pattern_text(pattern);
        let kind = specificity_name(pattern);
        writeln!(out, "  {text:<width$}  {kind:<13}  -> {channel}")?;
    }
    if let Some(id) = config.routing.bulk_channel {
        let name = &config.channels[id].name;
        match config.routing.bulk_recipients {
            Some(n) => writeln!(
                out,
                "  bulk (more than {n} recipients, or Precedence: bulk/list/junk) -> {name}"
            )?,
            None => writeln!(out, "  bulk (Precedence: bulk/list/junk) -> {name}")?,
        }
    }

    let s = &config.server;
    let addrs = |list: &[SocketAddr]| -> String {
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    writeln!(out, "server:")?;
    writeln!(out, "  listen: {}", addrs(&s.listen))?;
    writeln!(out, "  tls_listen: {}", addrs(&s.tls_listen))?;
    writeln!(out, "  hostname: {}", s.hostname)?;
    match &s.tls {
        Some(tls) => writeln!(out, "  tls: {} / {}", tls.cert.display(), tls.key.display())?,
        None => writeln!(out, "  tls: off")?,
    }
    let delivery = match s.delivery {
        DeliveryMode::Queue => format!("queue (spool {})", s.spool_dir.display()),
        DeliveryMode::Relay => "relay".to_owned(),
    };
    writeln!(out, "  delivery: {delivery}")?;
    writeln!(out, "  require_auth: {}", s.require_auth)?;
    let networks: Vec<String> = s.allow_networks.iter().map(|n| n.to_string()).collect();
    if networks.is_empty() {
        writeln!(out, "  allow_networks: any")?;
    } else {
        writeln!(out, "  allow_networks: {}", networks.join(", "))?;
    }
    let users: Vec<&str> = config.users.iter().map(|u| u.name.as_str()).collect();
    if !users.is_empty() {
        writeln!(out, "  users: {}", users.join(", "))?;
    }
    Ok(())
}

fn tls_name(tls: TlsMode) -> &'static str {
    match tls {
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
        TlsMode::None => "none",
    }
}

/// How a pattern is written in the file (`domains` entries as the bare domain).
fn pattern_text(p: &SenderPattern) -> String {
    match p {
        SenderPattern::Exact(a) => a.clone(),
        SenderPattern::Domain(d) => d.clone(),
        SenderPattern::AnyAtDomain(d) => format!("*@{d}"),
        SenderPattern::Any => "*".to_owned(),
    }
}

/// The pattern named in a sentence: domains are marked as such.
fn pattern_phrase(p: &SenderPattern) -> String {
    match p {
        SenderPattern::Domain(d) => format!("domain {d:?}"),
        other => format!("{:?}", pattern_text(other)),
    }
}

fn specificity_name(p: &SenderPattern) -> &'static str {
    match p {
        SenderPattern::Exact(_) => "exact address",
        SenderPattern::Domain(_) => "domain",
        SenderPattern::AnyAtDomain(_) => "*@domain",
        SenderPattern::Any => "catch-all",
    }
}

/// Sort key and identity of a pattern: specificity rank (most specific first), then text.
/// Letter case is ignored throughout, local part included, as routing matches that way.
fn pattern_key(p: &SenderPattern) -> (u8, String) {
    let rank = match p {
        SenderPattern::Exact(_) => 0,
        SenderPattern::Domain(_) => 1,
        SenderPattern::AnyAtDomain(_) => 2,
        SenderPattern::Any => 3,
    };
    (rank, pattern_text(p).to_lowercase())
}

fn limits_text(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = l.rate {
        parts.push(format!("{} messages", rate_text(rate)));
    }
    if let Some(n) = l.recipients_per_day {
        parts.push(format!("{n} recipients/day"));
    }
    if let Some(n) = l.max_recipients {
        parts.push(format!("{n} recipients/message"));
    }
    parts.push(format!("{} connections", l.connections));
    if let Some(size) = l.max_message_size {
        parts.push(format!("messages up to {}", size_text(size)));
    }
    parts.join(", ")
}

fn rate_text(rate: Rate) -> String {
    let per = match rate.per.as_millis() {
        1_000 => "s".to_owned(),
        60_000 => "min".to_owned(),
        3_600_000 => "h".to_owned(),
        86_400_000 => "day".to_owned(),
        _ => duration_text(rate.per),
    };
    format!("{}/{per}", rate.count)
}

fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, len) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(len) && ms > 0 {
            return format!("{}{unit}", ms / len);
        }
    }
    format!("{ms}ms")
}

fn size_text(bytes: u64) -> String {
    for (unit, len) in [("GB", GB), ("MB", MB), ("KB", KB)] {
        if bytes.is_multiple_of(len) && bytes > 0 {
            return format!("{}{unit}", bytes / len);
        }
    }
    format!("{bytes} bytes")
}

// ---------------------------------------------------------------------------
// Value forms

/// One kilobyte. Sizes use binary units: 1KB = 1024 bytes, 1MB = 1024 KB, 1GB = 1024 MB
/// (providers quote limits like "35MB" loosely; the binary reading is the generous one).
const KB: u64 = 1024;
/// One megabyte (1024 × 1024 bytes), see [`KB`].
const MB: u64 = 1024 * KB;
/// One gigabyte (1024³ bytes), see [`KB`].
const GB: u64 = 1024 * MB;

const DURATION_FORMS: &str =
    r#"expected a whole number and a unit: "500ms", "30s", "5m", "1h" or "5d""#;

/// `"500ms"`, `"30s"`, `"5m"` (or `"5min"`), `"1h"`, `"5d"`; more than zero.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: {DURATION_FORMS}");
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let millis_per_unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if number == 0 {
        return Err(format!("invalid duration {text:?}: must be more than zero"));
    }
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// Integer bytes as a string (`"1000"`), or a number with KB, MB or GB (binary, see [`KB`]).
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            r#"invalid size {text:?}: expected bytes, or a whole number with KB, MB or GB, e.g. "35MB""#
        )
    };
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit_len = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KB,
        "M" | "MB" | "MIB" => MB,
        "G" | "GB" | "GIB" => GB,
        _ => return Err(bad()),
    };
    if number == 0 {
        return Err(format!("invalid size {text:?}: must be more than zero"));
    }
    number.checked_mul(unit_len).ok_or_else(bad)
}

/// `"30/min"`, `"5/s"`, `"100/h"`, `"2000/day"`; the window may also be a duration (`"10/5m"`).
fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!(
            r#"invalid rate {text:?}: expected a count per unit, e.g. "30/min", "5/s", "100/h" or "2000/day""#
        )
    };
    let (count, unit) = text.split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "invalid rate {text:?}: the count must be more than zero"
        ));
    }
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other).map_err(|_| bad())?,
    };
    Ok(Rate { count, per })
}

/// `"127.0.0.1:2525"`, `"[::1]:2525"`; `"localhost:PORT"` means both loopback addresses.
fn parse_listen(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if let Some(port) = text.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]);
    }
    Err(format!(
        r#"invalid listener {text:?}: expected an IP address and port, e.g. "127.0.0.1:2525" or "[::1]:2525""#
    ))
}

/// A network in CIDR form, or a single address.
fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!(r#"invalid network {text:?}: expected e.g. "10.0.0.0/8" or "192.168.1.7""#)
        })
}

/// A domain name, lower-cased.
fn parse_domain(text: &str) -> Result<String, String> {
    let well_formed = !text.is_empty()
        && !text.starts_with(['.', '-'])
        && !text.ends_with('.')
        && !text.contains("..")
        && text
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.');
    if well_formed {
        Ok(text.to_lowercase())
    } else {
        Err(format!("{text:?} is not a domain name"))
    }
}

/// A `senders` entry: `*`, `*@domain` or `local@domain` (domain lower-cased).
fn parse_sender_pattern(text: &str) -> Result<SenderPattern, String> {
    if text == "*" {
        return Ok(SenderPattern::Any);
    }
    let Some((local, domain)) = text.rsplit_once('@') else {
        return Err(format!(
            r#"invalid sender {text:?}: expected an address ("alice@example.com"), "*@example.com" or "*"; a whole domain goes in domains = [...]"#
        ));
    };
    let domain = parse_domain(domain).map_err(|why| format!("invalid sender {text:?}: {why}"))?;
    if local == "*" {
        return Ok(SenderPattern::AnyAtDomain(domain));
    }
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '*' | '<' | '>');
    if local.is_empty() || local.chars().any(bad_char) {
        return Err(format!(
            r#"invalid sender {text:?}: the part before @ must be a mailbox name or "*" alone"#
        ));
    }
    Ok(SenderPattern::Exact(format!("{local}@{domain}")))
}

/// A `[[users]]` password hash: an argon2 PHC string. The value is never echoed.
fn parse_password_hash(text: &str) -> Result<Secret, String> {
    match argon2::PasswordHash::new(text) {
        Ok(hash) if hash.algorithm.as_str().starts_with("argon2") && hash.hash.is_some() => {
            Ok(Secret::new(text))
        }
        _ => Err(
            "not an argon2 hash (a PHC string starting with $argon2id$); make one with `mailgate hash-password`"
                .to_owned(),
        ),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The port a channel uses when neither it nor its preset names one.
fn default_port(tls: TlsMode) -> u16 {
    match tls {
        TlsMode::Starttls => 587,
        TlsMode::Implicit => 465,
        TlsMode::None => 25,
    }
}

/// The allowed key nearest to a misspelt one, if it is close enough to be a typo.
fn nearest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = (diagonal + usize::from(ca != *cb))
                    .min(row[j] + 1)
                    .min(above + 1);
                diagonal = above;
            }
        }
        row[b.len()]
    }
    allowed
        .iter()
        .map(|k| (distance(key, k), *k))
        .filter(|(d, _)| *d <= 2 && *d < key.chars().count())
        .min()
        .map(|(_, k)| k)
}

// ---------------------------------------------------------------------------
// The walk over the document

const TOP_KEYS: &[&str] = &["server", "users", "channels", "routing", "metrics"];
const SERVER_KEYS: &[&str] = &[
    "listen",
    "tls_listen",
    "hostname",
    "tls_cert",
    "tls_key",
    "max_message_size",
    "max_recipients",
    "max_connections",
    "delivery",
    "spool_dir",
    "retry_first",
    "retry_max",
    "give_up_after",
    "require_auth",
    "allow_networks",
    "check_header_from",
    "bare_lf",
    "idle_timeout",
];
const USER_KEYS: &[&str] = &["name", "password_hash", "senders"];
const CHANNEL_KEYS: &[&str] = &[
    "kind",
    "preset",
    "region",
    "host",
    "port",
    "tls",
    "ca_file",
    "username",
    "auth",
    "oauth",
    "password",
    "password_env",
    "password_file",
    "senders",
    "domains",
    "scope",
    "rate",
    "recipients_per_day",
    "max_recipients",
    "connections",
    "max_message_size",
    "dir",
];
/// Keys that only mean something for an upstream SMTP server.
const SMTP_ONLY_KEYS: &[&str] = &[
    "preset",
    "region",
    "host",
    "port",
    "tls",
    "ca_file",
    "username",
    "auth",
    "oauth",
    "password",
    "password_env",
    "password_file",
];
const ROUTING_KEYS: &[&str] = &["bulk_channel", "bulk_recipients"];
/// The secret forms, in order of preference.
const PASSWORD_KEYS: [&str; 3] = ["password_env", "password_file", "password"];

const OAUTH_NOT_IMPLEMENTED: &str = r#"OAuth 2.0 (XOAUTH2) is not implemented yet in this version: use auth = "password" with password_env or password_file"#;

/// A value together with the line it was written on.
#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    line: Option<usize>,
}

/// One table of the document, with the phrase problems use to place it.
struct Section<'t> {
    table: &'t dyn TableLike,
    /// "in [server]", "in [channels.alice]", "at the top level".
    place: String,
    /// Line of the table's header, if it has one.
    line: Option<usize>,
}

/// A channel as read, with what the checks across channels need.
struct Draft {
    channel: Channel,
    scope: Vec<At<SenderPattern>>,
}

/// One validation: where lines start, where relative paths point, what is wrong so far.
struct Ctx {
    line_starts: Vec<usize>,
    base: PathBuf,
    problems: Vec<Problem>,
    literal_secrets: bool,
}

impl Ctx {
    fn new(text: &str, path: &Path) -> Ctx {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Ctx {
            line_starts,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            problems: Vec::new(),
            literal_secrets: false,
        }
    }

    /// 1-based line of a byte span.
    fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        let start = span?.start;
        Some(self.line_starts.partition_point(|&s| s <= start))
    }

    fn problem(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.problems.push(Problem {
            line,
            message: message.into(),
        });
    }

    /// A problem with the value of `key`.
    fn bad(&mut self, s: &Section, key: &str, line: Option<usize>, why: impl fmt::Display) {
        self.problem(line, format!("{key:?} {}: {why}", s.place));
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    fn check_keys(&mut self, s: &Section, allowed: &[&str]) {
        for (key, _) in s.table.iter() {
            if !allowed.contains(&key) {
                let line = self.key_line(s, key);
                let hint = nearest(key, allowed)
                    .map(|k| format!(" (did you mean {k:?}?)"))
                    .unwrap_or_default();
                self.problem(line, format!("unknown key {key:?} {}{hint}", s.place));
            }
        }
    }

    fn key_line(&self, s: &Section, key: &str) -> Option<usize> {
        self.get(s, key).and_then(|(_, line)| line)
    }

    /// The item under `key` and the line of the key.
    fn get<'t>(&self, s: &Section<'t>, key: &str) -> Option<(&'t Item, Option<usize>)> {
        let (k, item) = s.table.get_key_value(key)?;
        Some((item, self.line(k.span()).or_else(|| self.line(item.span()))))
    }

    fn wrong_type(
        &mut self,
        s: &Section,
        key: &str,
        line: Option<usize>,
        expected: &str,
        item: &Item,
    ) {
        let found = match item {
            Item::Value(v) => v.type_name(),
            other => other.type_name(),
        };
        self.bad(s, key, line, format!("expected {expected}, found {found}"));
    }

    /// The table under `key`, called `label` in problems.
    fn section<'t>(&mut self, parent: &Section<'t>, key: &str, label: &str) -> Option<Section<'t>> {
        let (item, line) = self.get(parent, key)?;
        match item.as_table_like() {
            Some(table) => Some(Section {
                table,
                place: format!("in {label}"),
                line: self.line(item.span()).or(line),
            }),
            None => {
                self.wrong_type(parent, key, line, "a table", item);
                None
            }
        }
    }

    fn string(&mut self, s: &Section, key: &str) -> Option<At<String>> {
        let (item, line) = self.get(s, key)?;
        match item.as_str() {
            Some(value) => Some(At {
                value: value.to_owned(),
                line,
            }),
            None => {
                self.wrong_type(s, key, line, "a string", item);
                None
            }
        }
    }

    /// A string that must not be empty or hold white space (names, hosts).
    fn word(&mut self, s: &Section, key: &str) -> Option<At<String>> {
        let at = self.string(s, key)?;
        if at.value.is_empty()
            || at
                .value
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            self.bad(
                s,
                key,
                at.line,
                format!("{:?} must be one word, not empty", at.value),
            );
            return None;
        }
        Some(at)
    }

    fn boolean(&mut self, s: &Section, key: &str) -> Option<bool> {
        let (item, line) = self.get(s, key)?;
        let value = item.as_bool();
        if value.is_none() {
            self.wrong_type(s, key, line, "true or false", item);
        }
        value
    }

    /// A whole number above zero.
    fn count(&mut self, s: &Section, key: &str) -> Option<u64> {
        let (item, line) = self.get(s, key)?;
        match item.as_integer() {
            Some(n) if n > 0 => Some(n.unsigned_abs()),
            Some(n) => {
                self.bad(s, key, line, format!("must be more than zero, not {n}"));
                None
            }
            None => {
                self.wrong_type(s, key, line, "a whole number", item);
                None
            }
        }
    }

    fn count_usize(&mut self, s: &Section, key: &str) -> Option<usize> {
        self.count(s, key)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn port(&mut self, s: &Section, key: &str) -> Option<u16> {
        let n = self.count(s, key)?;
        match u16::try_from(n) {
            Ok(port) => Some(port),
            Err(_) => {
                let line = self.key_line(s, key);
                self.bad(s, key, line, format!("{n} is not a TCP port (1 to 65535)"));
                None
            }
        }
    }

    /// A string turned into `T` by `convert`, whose error explains the expected form.
    fn parsed<T>(
        &mut self,
        s: &Section,
        key: &str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<At<T>> {
        let at = self.string(s, key)?;
        match convert(&at.value) {
            Ok(value) => Some(At {
                value,
                line: at.line,
            }),
            Err(why) => {
                self.bad(s, key, at.line, why);
                None
            }
        }
    }

    fn choice<T: Copy>(&mut self, s: &Section, key: &str, options: &[(&str, T)]) -> Option<At<T>> {
        self.parsed(s, key, |text| {
            options
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        options.iter().map(|(n, _)| format!("{n:?}")).collect();
                    format!("{text:?} is not one of {}", names.join(", "))
                })
        })
    }

    fn duration(&mut self, s: &Section, key: &str) -> Option<At<Duration>> {
        let (item, line) = self.get(s, key)?;
        if item.is_integer() {
            let why = format!("{DURATION_FORMS}; a bare number has no unit");
            self.bad(s, key, line, why);
            return None;
        }
        self.parsed(s, key, parse_duration)
    }

    /// Bytes as an integer, or a string like `"35MB"`.
    fn size(&mut self, s: &Section, key: &str) -> Option<u64> {
        let (item, line) = self.get(s, key)?;
        if item.is_integer() {
            return self.count(s, key);
        }
        if !item.is_str() {
            self.wrong_type(s, key, line, r#"bytes or a size like "35MB""#, item);
            return None;
        }
        self.parsed(s, key, parse_size).map(|at| at.value)
    }

    /// A file path (resolved) that must name an existing file.
    fn existing_file(&mut self, s: &Section, key: &str) -> Option<PathBuf> {
        let at = self.string(s, key)?;
        let path = self.resolve(&at.value);
        if path.is_file() {
            Some(path)
        } else {
            self.bad(
                s,
                key,
                at.line,
                format!("{} does not exist or is not a file", path.display()),
            );
            None
        }
    }

    fn string_list(&mut self, s: &Section, key: &str) -> Option<Vec<At<String>>> {
        let (item, line) = self.get(s, key)?;
        let Some(array) = item.as_array() else {
            self.wrong_type(s, key, line, "an array of strings", item);
            return None;
        };
        let mut out = Vec::with_capacity(array.len());
        for value in array.iter() {
            let line = self.line(value.span()).or(line);
            match value.as_str() {
                Some(text) => out.push(At {
                    value: text.to_owned(),
                    line,
                }),
                None => {
                    let why = format!("expected strings in the array, found {}", value.type_name());
                    self.bad(s, key, line, why);
                }
            }
        }
        Some(out)
    }

    /// Each entry of the string array under `key`, converted; bad entries become problems.
    fn list_of<T>(
        &mut self,
        s: &Section,
        key: &str,
        convert: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<At<T>>> {
        let entries = self.string_list(s, key)?;
        let mut out = Vec::with_capacity(entries.len());
        for at in entries {
            match convert(&at.value) {
                Ok(value) => out.push(At {
                    value,
                    line: at.line,
                }),
                Err(why) => self.bad(s, key, at.line, why),
            }
        }
        Some(out)
    }

    fn listeners(&mut self, s: &Section, key: &str) -> Option<Vec<At<SocketAddr>>> {
        let entries = self.list_of(s, key, parse_listen)?;
        Some(
            entries
                .into_iter()
                .flat_map(|at| {
                    at.value.into_iter().map(move |value| At {
                        value,
                        line: at.line,
                    })
                })
                .collect(),
        )
    }

    // -- sections -----------------------------------------------------------

    fn config(&mut self, root: &Table, path: &Path) -> Config {
        let root = Section {
            table: root,
            place: "at the top level".to_owned(),
            line: None,
        };
        self.check_keys(&root, TOP_KEYS);
        if let Some((_, line)) = self.get(&root, "metrics") {
            self.problem(
                line,
                "[metrics] is not implemented yet in this version: remove it",
            );
        }

        let empty = Table::new();
        let blank = |label: &str| Section {
            table: &empty,
            place: format!("in {label}"),
            line: None,
        };
        let server_section = self
            .section(&root, "server", "[server]")
            .unwrap_or_else(|| blank("[server]"));
        let server = self.server(&server_section);
        let users = self.users(&root);
        if server.require_auth && users.is_empty() {
            let line = self.key_line(&server_section, "require_auth");
            self.problem(
                line,
                "require_auth = true in [server] but there is no [[users]] entry: no client could send",
            );
        }

        let mut drafts = self.channels(&root);
        self.check_overlaps(&drafts);
        drafts.sort_by(|a, b| a.channel.name.cmp(&b.channel.name));
        let channels: Vec<Channel> = drafts.into_iter().map(|d| d.channel).collect();

        let routing_section = self
            .section(&root, "routing", "[routing]")
            .unwrap_or_else(|| blank("[routing]"));
        let routing = self.routing(&routing_section, &channels);

        Config {
            path: path.to_path_buf(),
            server,
            users,
            channels,
            routing,
            has_literal_secrets: self.literal_secrets,
        }
    }

    fn server(&mut self, s: &Section) -> Server {
        self.check_keys(s, SERVER_KEYS);
        let listen = self.listeners(s, "listen").unwrap_or_else(|| {
            [
                SocketAddr::from((Ipv4Addr::LOCALHOST, 2525)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 2525)),
            ]
            .into_iter()
            .map(|value| At { value, line: None })
            .collect()
        });
        let tls_listen = self.listeners(s, "tls_listen").unwrap_or_default();
        if listen.is_empty() && tls_listen.is_empty() {
            let line = self.key_line(s, "listen").or(s.line);
            self.problem(line, "[server] has no listener: set listen or tls_listen");
        }
        let mut seen: Vec<SocketAddr> = Vec::new();
        for at in listen.iter().chain(&tls_listen) {
            // Port 0 picks a fresh port each time, so repeating it is no clash.
            if at.value.port() != 0 && seen.contains(&at.value) {
                let message = format!("listener {} appears twice {}", at.value, s.place);
                self.problem(at.line, message);
            }
            seen.push(at.value);
        }

        let hostname = self
            .word(s, "hostname")
            .map_or_else(|| "localhost".to_owned(), |at| at.value);

        let cert = self.existing_file(s, "tls_cert");
        let key = self.existing_file(s, "tls_key");
        let has_cert = s.table.contains_key("tls_cert");
        let has_key = s.table.contains_key("tls_key");
        if has_cert != has_key {
            let (given, missing) = if has_cert {
                ("tls_cert", "tls_key")
            } else {
                ("tls_key", "tls_cert")
            };
            let line = self.key_line(s, given);
            self.problem(line, format!("{given:?} {} needs {missing:?} too", s.place));
        }
        let tls_configured = has_cert && has_key;
        if !tls_listen.is_empty() && !tls_configured {
            let line = self.key_line(s, "tls_listen");
            self.problem(
                line,
                format!("\"tls_listen\" {} needs tls_cert and tls_key", s.place),
            );
        }
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };

        let max_message_size = self.size(s, "max_message_size").unwrap_or(35 * MB);
        let max_recipients = self.count_usize(s, "max_recipients").unwrap_or(500);
        let max_connections = self.count_usize(s, "max_connections").unwrap_or(1000);
        let delivery = self
            .choice(
                s,
                "delivery",
                &[
                    ("queue", DeliveryMode::Queue),
                    ("relay", DeliveryMode::Relay),
                ],
            )
            .map_or(DeliveryMode::Queue, |at| at.value);
        let spool_dir = self
            .string(s, "spool_dir")
            .map_or_else(|| "spool".to_owned(), |at| at.value);
        let spool_dir = self.resolve(&spool_dir);

        let retry_first = self.duration(s, "retry_first");
        let retry_max = self.duration(s, "retry_max");
        if let (Some(first), Some(max)) = (&retry_first, &retry_max)
            && first.value > max.value
        {
            self.problem(
                first.line,
                format!("\"retry_first\" {} is longer than retry_max", s.place),
            );
        }
        let retry_first = retry_first.map_or(Duration::from_secs(60), |at| at.value);
        let retry_max = retry_max.map_or(Duration::from_secs(3600), |at| at.value);
        let give_up_after = self
            .duration(s, "give_up_after")
            .map_or(Duration::from_secs(5 * 86_400), |at| at.value);

        let require_auth = self.boolean(s, "require_auth").unwrap_or(false);
        let allow_networks: Vec<ipnet::IpNet> = self
            .list_of(s, "allow_networks", parse_network)
            .unwrap_or_default()
            .into_iter()
            .map(|at| at.value)
            .collect();
        // An explicit but empty list still means "any network": only entries restrict.
        // (A list whose entries are all malformed is reported on its own.)
        let networks_given = self.has_nonempty_list(s, "allow_networks");
        if !require_auth && !networks_given {
            for at in listen.iter().chain(&tls_listen) {
                if !at.value.ip().is_loopback() {
                    let message = format!(
                        "listener {} is not on loopback and anyone could relay through it: set require_auth = true or allow_networks = [...] in [server]",
                        at.value
                    );
                    self.problem(at.line, message);
                }
            }
        }
        let check_header_from = self.boolean(s, "check_header_from").unwrap_or(true);
        let bare_lf = self
            .choice(
                s,
                "bare_lf",
                &[("normalize", BareLf::Normalize), ("reject", BareLf::Reject)],
            )
            .map_or(BareLf::Normalize, |at| at.value);
        let idle_timeout = self
            .duration(s, "idle_timeout")
            .map_or(Duration::from_secs(300), |at| at.value);

        Server {
            listen: listen.into_iter().map(|at| at.value).collect(),
            tls_listen: tls_listen.into_iter().map(|at| at.value).collect(),
            hostname,
            tls,
            max_message_size,
            max_recipients,
            max_connections,
            delivery,
            spool_dir,
            retry_first,
            retry_max,
            give_up_after,
            require_auth,
            allow_networks,
            check_header_from,
            bare_lf,
            idle_timeout,
        }
    }

    fn users(&mut self, root: &Section) -> Vec<User> {
        let Some((item, line)) = self.get(root, "users") else {
            return Vec::new();
        };
        let Some(entries) = item.as_array_of_tables() else {
            self.problem(line, "users must be written as [[users]] tables");
            return Vec::new();
        };
        let mut users: Vec<User> = Vec::new();
        for table in entries.iter() {
            let label = match table.get("name").and_then(Item::as_str) {
                Some(name) => format!("[[users]] {name:?}"),
                None => "[[users]]".to_owned(),
            };
            let s = Section {
                table,
                place: format!("in {label}"),
                line: self.line(table.span()),
            };
            self.check_keys(&s, USER_KEYS);
            let name = self.word(&s, "name");
            if !table.contains_key("name") {
                self.problem(s.line, "[[users]] entry needs a name");
            }
            if let Some(at) = &name
                && users.iter().any(|u| u.name == at.value)
            {
                self.problem(at.line, format!("user {:?} is defined twice", at.value));
            }
            let password_hash = self.parsed(&s, "password_hash", parse_password_hash);
            if !table.contains_key("password_hash") {
                self.problem(
                    s.line,
                    format!("{label} needs password_hash (from `mailgate hash-password`)"),
                );
            }
            let senders = self.list_of(&s, "senders", parse_sender_pattern);
            if senders.as_ref().is_none_or(Vec::is_empty) && !self.has_nonempty_list(&s, "senders")
            {
                self.problem(
                    s.line,
                    format!("{label} needs senders = [...], the envelope senders it may use"),
                );
            }
            users.push(User {
                name: name.map(|at| at.value).unwrap_or_default(),
                password_hash: password_hash.map_or_else(|| Secret::new(""), |at| at.value),
                senders: senders
                    .unwrap_or_default()
                    .into_iter()
                    .map(|at| at.value)
                    .collect(),
            });
        }
        users
    }

    /// The key holds an array with at least one entry (valid or not).
    fn has_nonempty_list(&self, s: &Section, key: &str) -> bool {
        s.table
            .get(key)
            .and_then(Item::as_array)
            .is_some_and(|a| !a.is_empty())
    }

    fn channels(&mut self, root: &Section) -> Vec<Draft> {
        let Some(section) = self.section(root, "channels", "[channels]") else {
            if !root.table.contains_key("channels") {
                self.problem(None, "no channel is defined: every sender would be refused");
            }
            return Vec::new();
        };
        let mut drafts = Vec::new();
        for (name, _) in section.table.iter() {
            let label = format!("[channels.{name}]");
            if let Some(s) = self.section(&section, name, &label) {
                drafts.push(self.channel(name, &s));
            }
        }
        if section.table.is_empty() {
            self.problem(
                section.line,
                "no channel is defined: every sender would be refused",
            );
        }
        drafts
    }

    fn channel(&mut self, name: &str, s: &Section) -> Draft {
        self.check_keys(s, CHANNEL_KEYS);
        let label = format!("[channels.{name}]");
        let is_file = self
            .choice(s, "kind", &[("smtp", false), ("file", true)])
            .is_some_and(|at| at.value);

        let preset_name = self.string(s, "preset");
        let preset = preset_name.as_ref().and_then(|at| {
            let found = presets::find(&at.value);
            if found.is_none() && !is_file {
                let why = format!(
                    "unknown preset {:?}; known presets: {}",
                    at.value,
                    presets::NAMES.join(", ")
                );
                self.bad(s, "preset", at.line, why);
            }
            found
        });

        // Scope.
        let mut scope = self
            .list_of(s, "senders", parse_sender_pattern)
            .unwrap_or_default();
        let domains = self.list_of(s, "domains", parse_domain).unwrap_or_default();
        scope.extend(domains.into_iter().map(|at| At {
            value: SenderPattern::Domain(at.value),
            line: at.line,
        }));
        if !self.has_nonempty_list(s, "senders") && !self.has_nonempty_list(s, "domains") {
            self.problem(
                s.line,
                format!("{label} has an empty scope: list who may use it in senders = [...] or domains = [...]"),
            );
        }
        let scope_key = self.choice(s, "scope", &[("address", true), ("domain", false)]);
        // SPEC §4: a mailbox preset's credentials belong to one mailbox whatever
        // `scope` says, so either the preset or `scope = "address"` makes it address-only.
        let preset_address = preset.as_ref().is_some_and(|p| p.address_scoped);
        let address_scoped = preset_address || scope_key.as_ref().is_some_and(|at| at.value);
        if address_scoped {
            let why = match &preset {
                Some(p) if preset_address => format!("preset {:?}", p.name),
                _ => "scope = \"address\"".to_owned(),
            };
            for at in &scope {
                if !matches!(at.value, SenderPattern::Exact(_)) {
                    let message = format!(
                        "{label} is address-scoped ({why}): its credentials belong to one mailbox, so it may list exact addresses only, not {}",
                        pattern_phrase(&at.value)
                    );
                    self.problem(at.line, message);
                }
            }
        }

        // Limits: the preset's, then the explicit keys.
        let mut limits = preset.as_ref().map_or_else(
            || Limits {
                connections: presets::DEFAULT_CONNECTIONS,
                ..Limits::default()
            },
            |p| p.limits.clone(),
        );
        if let Some(at) = self.parsed(s, "rate", parse_rate) {
            limits.rate = Some(at.value);
        }
        if let Some(n) = self.count(s, "recipients_per_day") {
            limits.recipients_per_day = Some(n);
        }
        if let Some(n) = self.count_usize(s, "max_recipients") {
            limits.max_recipients = Some(n);
        }
        if let Some(n) = self.count_usize(s, "connections") {
            limits.connections = n;
        }
        if let Some(n) = self.size(s, "max_message_size") {
            limits.max_message_size = Some(n);
        }

        let kind = if is_file {
            for key in SMTP_ONLY_KEYS {
                if let Some((_, line)) = self.get(s, key) {
                    self.bad(s, key, line, "not allowed for kind = \"file\"");
                }
            }
            let dir = self.string(s, "dir").map(|at| self.resolve(&at.value));
            if !s.table.contains_key("dir") {
                self.problem(s.line, format!("{label} has kind = \"file\" but no dir"));
            }
            ChannelKind::File {
                dir: dir.unwrap_or_default(),
            }
        } else {
            if let Some((_, line)) = self.get(s, "dir") {
                self.bad(s, "dir", line, "only for kind = \"file\"");
            }
            ChannelKind::Smtp(self.smtp_target(&label, s, preset.as_ref(), preset_name.is_some()))
        };

        Draft {
            channel: Channel {
                name: name.to_owned(),
                scope: scope.iter().map(|at| at.value.clone()).collect(),
                address_scoped,
                preset: preset_name.map(|at| at.value),
                kind,
                limits,
            },
            scope,
        }
    }

    fn smtp_target(
        &mut self,
        label: &str,
        s: &Section,
        preset: Option<&presets::Preset>,
        preset_given: bool,
    ) -> SmtpTarget {
        let region = self.word(s, "region");
        let needs_region = preset.is_some_and(|p| p.needs_region());
        if let Some(at) = &region {
            if !needs_region {
                self.bad(s, "region", at.line, "only used with preset = \"ses\"");
            } else if !at
                .value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                self.bad(
                    s,
                    "region",
                    at.line,
                    format!("{:?} is not a region name like \"eu-west-1\"", at.value),
                );
            }
        }

        let explicit_host = self.word(s, "host");
        let host = match (explicit_host, preset) {
            (Some(at), _) => Some(at.value),
            (None, Some(p)) if p.needs_region() => match &region {
                Some(at) => Some(p.host_for(&at.value)),
                None => {
                    let message = format!(
                        "{label} uses preset = {:?}, which needs region = \"...\" (e.g. \"eu-west-1\")",
                        p.name
                    );
                    self.problem(s.line, message);
                    None
                }
            },
            (None, Some(p)) => Some(p.host.to_owned()),
            (None, None) => {
                // An unknown preset is reported already; a missing host would only repeat it.
                if !preset_given && !s.table.contains_key("host") {
                    self.problem(s.line, format!("{label} needs host = \"...\" or a preset"));
                }
                None
            }
        };

        let tls_key = self.choice(
            s,
            "tls",
            &[
                ("starttls", TlsMode::Starttls),
                ("implicit", TlsMode::Implicit),
                ("none", TlsMode::None),
            ],
        );
        let tls = tls_key
            .as_ref()
            .map(|at| at.value)
            .or(preset.map(|p| p.tls))
            .unwrap_or(TlsMode::Starttls);
        if let (TlsMode::None, Some(host)) = (tls, &host)
            && !is_loopback_host(host)
        {
            let line = tls_key.as_ref().and_then(|at| at.line).or(s.line);
            let message = format!(
                "{label} has tls = \"none\" to {host:?}: plaintext is allowed only to loopback hosts (127.0.0.1, ::1, localhost)"
            );
            self.problem(line, message);
        }
        // A preset's port goes with its TLS mode; choosing another mode picks that mode's port.
        let port = self.port(s, "port").unwrap_or(match preset {
            Some(p) if p.tls == tls => p.port,
            _ => default_port(tls),
        });
        let ca_file = self.existing_file(s, "ca_file");

        if let Some((_, line)) = self.get(s, "oauth") {
            self.bad(s, "oauth", line, OAUTH_NOT_IMPLEMENTED);
        }
        if let Some(at) = self.string(s, "auth") {
            match at.value.as_str() {
                "password" => {}
                "xoauth2" => self.bad(s, "auth", at.line, OAUTH_NOT_IMPLEMENTED),
                other => self.bad(
                    s,
                    "auth",
                    at.line,
                    format!("{other:?} is not one of \"password\", \"xoauth2\""),
                ),
            }
        }

        let username = self.string(s, "username").map(|at| at.value);
        let password_given = PASSWORD_KEYS.iter().any(|k| s.table.contains_key(k));
        let password = self.password(s);
        if password_given && !s.table.contains_key("username") {
            self.problem(s.line, format!("{label} has a password but no username"));
        }
        if !password_given && s.table.contains_key("username") {
            let line = self.key_line(s, "username");
            self.problem(
                line,
                format!("{label} has a username but no password (password_env, password_file or password)"),
            );
        }

        SmtpTarget {
            host: host.unwrap_or_default(),
            port,
            tls,
            ca_file,
            username,
            password,
            oauth: None,
        }
    }

    /// The channel's password from `password_env`, `password_file` or a literal `password`.
    fn password(&mut self, s: &Section) -> Option<Secret> {
        let given: Vec<&str> = PASSWORD_KEYS
            .into_iter()
            .filter(|k| s.table.contains_key(k))
            .collect();
        if given.len() > 1 {
            let line = self.key_line(s, given[1]);
            let message = format!(
                "{} {}: give only one of password_env, password_file or password",
                given.join(" and "),
                s.place
            );
            self.problem(line, message);
        }
        let key = *given.first()?;
        let at = self.string(s, key)?;
        let value = match key {
            "password_env" => match std::env::var(&at.value) {
                Ok(value) => value,
                Err(std::env::VarError::NotPresent) => {
                    self.bad(
                        s,
                        key,
                        at.line,
                        format!("environment variable {:?} is not set", at.value),
                    );
                    return None;
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    self.bad(
                        s,
                        key,
                        at.line,
                        format!("environment variable {:?} is not UTF-8", at.value),
                    );
                    return None;
                }
            },
            "password_file" => {
                let path = self.resolve(&at.value);
                match std::fs::read_to_string(&path) {
                    // The file is written by an editor or `echo`: its final newline is not the secret.
                    Ok(text) => text.trim_end_matches(['\r', '\n']).to_owned(),
                    Err(e) => {
                        self.bad(
                            s,
                            key,
                            at.line,
                            format!("cannot read {}: {e}", path.display()),
                        );
                        return None;
                    }
                }
            }
            _ => {
                self.literal_secrets = true;
                at.value.clone()
            }
        };
        if value.is_empty() {
            let what = match key {
                "password_env" => format!("environment variable {:?}", at.value),
                "password_file" => format!("file {}", self.resolve(&at.value).display()),
                _ => "the password".to_owned(),
            };
            self.bad(s, key, at.line, format!("{what} is empty"));
            return None;
        }
        Some(Secret::new(value))
    }

    /// Two channels listing the same pattern at the same specificity make routing ambiguous.
    fn check_overlaps(&mut self, drafts: &[Draft]) {
        let mut owners: BTreeMap<(u8, String), &str> = BTreeMap::new();
        for draft in drafts {
            let name = draft.channel.name.as_str();
            for at in &draft.scope {
                let key = pattern_key(&at.value);
                match owners.get(&key) {
                    // A channel repeating its own pattern is harmless.
                    Some(owner) if *owner == name => {}
                    Some(owner) => {
                        let message = format!(
                            "channels {owner:?} and {name:?} both list {} ({}): a sender it matches could go either way",
                            pattern_phrase(&at.value),
                            specificity_name(&at.value)
                        );
                        self.problem(at.line, message);
                    }
                    None => {
                        owners.insert(key, name);
                    }
                }
            }
        }
    }

    fn routing(&mut self, s: &Section, channels: &[Channel]) -> Routing {
        self.check_keys(s, ROUTING_KEYS);
        let bulk_channel = self.string(s, "bulk_channel").and_then(|at| {
            let id = channels.iter().position(|c| c.name == at.value);
            match id {
                None => self.bad(
                    s,
                    "bulk_channel",
                    at.line,
                    format!("there is no channel {:?}", at.value),
                ),
                Some(i) if channels[i].address_scoped => {
                    let why = format!(
                        "channel {:?} is address-scoped; bulk mail needs a shared channel",
                        at.value
                    );
                    self.bad(s, "bulk_channel", at.line, why);
                }
                Some(_) => {}
            }
            id
        });
        let bulk_recipients = self.count_usize(s, "bulk_recipients");
        if bulk_recipients.is_some() && !s.table.contains_key("bulk_channel") {
            let line = self.key_line(s, "bulk_recipients");
            self.problem(line, "\"bulk_recipients\" in [routing] needs bulk_channel");
        }
        Routing {
            bulk_channel,
            bulk_recipients,
        }
    }
}

impl Config {
    /// The channel with this name.
    pub fn channel_id(&self, name: &str) -> Option<ChannelId> {
        self.channels.iter().position(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTBOX: &str = "[channels.outbox]\nkind = \"file\"\ndir = \"out\"\nsenders = [\"*\"]\n";
    /// A well-formed argon2 PHC string (the reference implementation's example).
    const HASH: &str = "$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

    fn ok(text: &str) -> Config {
        match parse(text, Path::new("conf/proxy.toml")) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, Path::new("conf/proxy.toml")) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(e) => {
                assert!(!e.problems.is_empty());
                e.problems
            }
        }
    }

    /// The single problem of `text`.
    fn problem(text: &str) -> Problem {
        let mut all = problems(text);
        assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
        all.remove(0)
    }

    fn smtp(config: &Config, name: &str) -> SmtpTarget {
        let id = config.channel_id(name).expect("channel exists");
        match &config.channels[id].kind {
            ChannelKind::Smtp(t) => t.clone(),
            ChannelKind::File { .. } => panic!("{name} is a file channel"),
        }
    }

    #[test]
    fn durations_take_the_spec_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86_400)));
        for bad in [
            "",
            "30",
            "s",
            "5x",
            "-5m",
            "1.5h",
            "0s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_are_bytes_or_binary_units() {
        assert_eq!(parse_size("35MB"), Ok(35 * 1024 * 1024));
        assert_eq!(parse_size("10KB"), Ok(10 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1024 * 1024 * 1024));
        assert_eq!(parse_size("10kb"), Ok(10 * 1024));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in ["", "MB", "35XB", "0MB", "3.5MB", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates_are_a_count_per_window() {
        let rate = |count, secs| {
            Ok(Rate {
                count,
                per: Duration::from_secs(secs),
            })
        };
        assert_eq!(parse_rate("30/min"), rate(30, 60));
        assert_eq!(parse_rate("5/s"), rate(5, 1));
        assert_eq!(parse_rate("100/h"), rate(100, 3600));
        assert_eq!(parse_rate("2000/day"), rate(2000, 86_400));
        assert_eq!(parse_rate("10/5m"), rate(10, 300));
        for bad in ["30", "/min", "0/min", "30/fortnight", "x/min", "30/"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sender_patterns_are_parsed_and_malformed_ones_refused() {
        use SenderPattern::*;
        assert_eq!(parse_sender_pattern("*"), Ok(Any));
        assert_eq!(
            parse_sender_pattern("*@Example.COM"),
            Ok(AnyAtDomain("example.com".into()))
        );
        assert_eq!(
            parse_sender_pattern("Alice@Example.COM"),
            Ok(Exact("Alice@example.com".into()))
        );
        for bad in [
            "",
            "alice",
            "example.com",
            "@example.com",
            "alice@",
            "a*@example.com",
            "a b@x.org",
            "a@x..org",
            "**",
        ] {
            assert!(parse_sender_pattern(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_domain("Example.COM"), Ok("example.com".into()));
        assert!(parse_domain("*.example.com").is_err());
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = ok(OUTBOX);
        let s = &config.server;
        assert_eq!(
            s.listen,
            vec![
                "127.0.0.1:2525".parse::<SocketAddr>().unwrap(),
                "[::1]:2525".parse().unwrap()
            ]
        );
        assert!(s.tls_listen.is_empty());
        assert_eq!(s.hostname, "localhost");
        assert!(s.tls.is_none());
        assert_eq!(s.max_message_size, 35 * 1024 * 1024);
        assert_eq!(s.max_recipients, 500);
        assert_eq!(s.max_connections, 1000);
        assert_eq!(s.delivery, DeliveryMode::Queue);
        assert_eq!(s.spool_dir, Path::new("conf/spool"));
        assert_eq!(s.retry_first, Duration::from_secs(60));
        assert_eq!(s.retry_max, Duration::from_secs(3600));
        assert_eq!(s.give_up_after, Duration::from_secs(5 * 86_400));
        assert!(!s.require_auth);
        assert!(s.allow_networks.is_empty());
        assert!(s.check_header_from);
        assert_eq!(s.bare_lf, BareLf::Normalize);
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert!(!config.has_literal_secrets);
        let outbox = &config.channels[0];
        assert_eq!(outbox.scope, vec![SenderPattern::Any]);
        assert!(matches!(&outbox.kind, ChannelKind::File { dir } if dir == Path::new("conf/out")));
        assert_eq!(outbox.limits.connections, 4);
    }

    #[test]
    fn server_keys_are_read() {
        let config = ok(&format!(
            "[server]\nlisten = [\"localhost:0\"]\nhostname = \"mx.example.com\"\nmax_message_size = 1000\n\
             max_recipients = 7\ndelivery = \"relay\"\nspool_dir = \"/var/spool/mg\"\nretry_first = \"30s\"\n\
             idle_timeout = \"500ms\"\nbare_lf = \"reject\"\ncheck_header_from = false\n\
             allow_networks = [\"10.0.0.0/8\", \"192.168.1.7\"]\n{OUTBOX}"
        ));
        let s = &config.server;
        assert_eq!(
            s.listen,
            vec![
                "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
                "[::1]:0".parse().unwrap()
            ]
        );
        assert_eq!(s.hostname, "mx.example.com");
        assert_eq!(s.max_message_size, 1000);
        assert_eq!(s.max_recipients, 7);
        assert_eq!(s.delivery, DeliveryMode::Relay);
        assert_eq!(s.spool_dir, Path::new("/var/spool/mg"));
        assert_eq!(s.retry_first, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, Duration::from_millis(500));
        assert_eq!(s.bare_lf, BareLf::Reject);
        assert!(!s.check_header_from);
        let networks: Vec<String> = s.allow_networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(networks, ["10.0.0.0/8", "192.168.1.7/32"]);
    }

    #[test]
    fn unknown_keys_are_named_with_their_table_and_line() {
        let p = problem(&format!(
            "[server]\nhostname = \"mx\"\nlisen = [\"127.0.0.1:25\"]\n{OUTBOX}"
        ));
        assert_eq!(p.line, Some(3));
        assert_eq!(
            p.message,
            r#"unknown key "lisen" in [server] (did you mean "listen"?)"#
        );

        let p = problem(&format!("{OUTBOX}colour = \"blue\"\n"));
        assert_eq!(p.line, Some(5));
        assert_eq!(p.message, r#"unknown key "colour" in [channels.outbox]"#);

        let p = problem(&format!("{OUTBOX}[metrix]\nlisten = 1\n"));
        assert_eq!(p.line, Some(5));
        assert!(
            p.message
                .starts_with(r#"unknown key "metrix" at the top level"#),
            "{}",
            p.message
        );
    }

    #[test]
    fn a_bad_duration_names_key_and_line() {
        let p = problem(&format!("[server]\n\nretry_first = \"5x\"\n{OUTBOX}"));
        assert_eq!(p.line, Some(3));
        assert!(
            p.message
                .starts_with(r#""retry_first" in [server]: invalid duration "5x""#),
            "{}",
            p.message
        );

        let p = problem(&format!("[server]\nidle_timeout = 30\n{OUTBOX}"));
        assert_eq!(p.line, Some(2));
        assert!(
            p.message.contains("idle_timeout") && p.message.contains("no unit"),
            "{}",
            p.message
        );
    }

    #[test]
    fn a_bad_size_names_key_and_line() {
        let p = problem(&format!("[server]\nmax_message_size = \"35XB\"\n{OUTBOX}"));
        assert_eq!(p.line, Some(2));
        assert!(
            p.message
                .starts_with(r#""max_message_size" in [server]: invalid size "35XB""#),
            "{}",
            p.message
        );

        let p = problem(&format!("{OUTBOX}max_message_size = -1\n"));
        assert_eq!(p.line, Some(5));
        assert!(
            p.message.contains("[channels.outbox]") && p.message.contains("more than zero"),
            "{}",
            p.message
        );

        let p = problem(&format!("[server]\nmax_message_size = true\n{OUTBOX}"));
        assert!(p.message.contains("found boolean"), "{}", p.message);
    }

    #[test]
    fn a_bad_rate_names_key_and_line() {
        let p = problem(&format!("{OUTBOX}rate = \"30/fortnight\"\n"));
        assert_eq!(p.line, Some(5));
        assert!(
            p.message
                .starts_with(r#""rate" in [channels.outbox]: invalid rate "30/fortnight""#),
            "{}",
            p.message
        );
    }

    #[test]
    fn a_wrong_type_names_key_and_line() {
        let p = problem(&format!("[server]\nrequire_auth = \"yes\"\n{OUTBOX}"));
        assert_eq!(p.line, Some(2));
        assert_eq!(
            p.message,
            r#""require_auth" in [server]: expected true or false, found string"#
        );

        let p = problem(
            "[channels.outbox]\nkind = \"file\"\ndir = \"out\"\nsenders = [\"*\",\n  42]\n",
        );
        assert_eq!(p.line, Some(5));
        assert!(
            p.message
                .contains("expected strings in the array, found integer"),
            "{}",
            p.message
        );
    }

    #[test]
    fn an_address_scoped_channel_lists_exact_addresses_only() {
        let text = "[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\npassword = \"pw\"\n\
                    senders = [\"alice@example.com\", \"*\", \"*@example.com\"]\ndomains = [\"example.com\"]\n";
        let all = problems(text);
        assert_eq!(all.len(), 3, "{all:#?}");
        for p in &all {
            assert!(
                p.message
                    .starts_with("[channels.alice] is address-scoped (preset \"office365\")"),
                "{}",
                p.message
            );
        }
        assert!(all[0].message.ends_with("not \"*\""));
        assert!(all[1].message.ends_with("not \"*@example.com\""));
        assert!(all[2].message.ends_with("not domain \"example.com\""));
        assert_eq!(
            all.iter().map(|p| p.line).collect::<Vec<_>>(),
            [Some(5), Some(5), Some(6)]
        );

        let p = problem(&format!("{OUTBOX}scope = \"address\"\n"));
        assert!(
            p.message.contains("(scope = \"address\")") && p.message.ends_with("not \"*\""),
            "{}",
            p.message
        );

        // A mailbox preset stays address-only even when `scope` says otherwise.
        let p = problem(
            "[channels.app]\npreset = \"office365\"\nscope = \"domain\"\nusername = \"app@example.com\"\n\
                         password = \"pw\"\ndomains = [\"example.com\"]\n",
        );
        assert!(
            p.message.contains("[channels.app]") && p.message.contains("office365"),
            "{}",
            p.message
        );
    }

    #[test]
    fn the_same_pattern_at_the_same_specificity_names_both_channels() {
        let p = problem(&format!(
            "{OUTBOX}[channels.other]\nkind = \"file\"\ndir = \"o\"\nsenders = [\"*\"]\n"
        ));
        assert_eq!(p.line, Some(8));
        assert!(
            p.message.contains("\"outbox\"") && p.message.contains("\"other\""),
            "{}",
            p.message
        );

        let mailbox = |name: &str, sender: &str| {
            format!(
                "[channels.{name}]\nkind = \"file\"\ndir = \"{name}\"\nsenders = [\"{sender}\"]\n"
            )
        };
        let p = problem(&format!(
            "{}{}",
            mailbox("a", "Alice@Example.COM"),
            mailbox("b", "Alice@example.com")
        ));
        assert!(p.message.contains("exact address"), "{}", p.message);
        // Routing ignores case in the local part too, so these would be ambiguous.
        problem(&format!(
            "{}{}",
            mailbox("a", "Alice@example.com"),
            mailbox("b", "alice@example.com")
        ));
        ok(&format!(
            "{}{}",
            mailbox("a", "alice@example.com"),
            mailbox("b", "alice@example.org")
        ));
        let p = problem(&format!(
            "{}{}",
            mailbox("a", "*@example.com"),
            mailbox("b", "*@EXAMPLE.com")
        ));
        assert!(
            p.message.contains("\"a\"") && p.message.contains("\"b\""),
            "{}",
            p.message
        );
        let domain = "[channels.d]\nkind = \"file\"\ndir = \"d\"\ndomains = [\"example.com\"]\n";
        let p = problem(&format!(
            "{domain}{}",
            domain.replace("channels.d", "channels.e")
        ));
        assert!(
            p.message.contains("domain \"example.com\""),
            "{}",
            p.message
        );
        // Different specificities for the same domain are fine: the more specific wins.
        ok(&format!(
            "{domain}{}{}",
            mailbox("a", "*@example.com"),
            mailbox("b", "x@example.com")
        ));
    }

    #[test]
    fn plaintext_goes_to_loopback_hosts_only() {
        let relay = |host: &str| {
            format!("[channels.relay]\nhost = \"{host}\"\ntls = \"none\"\nsenders = [\"*\"]\n")
        };
        let p = problem(&relay("smtp.example.net"));
        assert_eq!(p.line, Some(3));
        assert!(
            p.message
                .starts_with("[channels.relay] has tls = \"none\" to \"smtp.example.net\""),
            "{}",
            p.message
        );
        for host in ["127.0.0.1", "127.8.9.10", "::1", "localhost"] {
            let config = ok(&relay(host));
            let target = smtp(&config, "relay");
            assert_eq!((target.tls, target.port), (TlsMode::None, 25));
        }
    }

    #[test]
    fn a_non_loopback_listener_needs_auth_or_an_allow_list() {
        let p = problem(&format!(
            "[server]\nlisten = [\"127.0.0.1:2525\", \"0.0.0.0:2525\"]\n{OUTBOX}"
        ));
        assert_eq!(p.line, Some(2));
        assert!(
            p.message
                .starts_with("listener 0.0.0.0:2525 is not on loopback"),
            "{}",
            p.message
        );
        let all = problems(&format!("[server]\ntls_listen = [\"[::]:4650\"]\n{OUTBOX}"));
        assert!(
            all.iter()
                .any(|p| p.message.contains("[::]:4650 is not on loopback")),
            "{all:?}"
        );

        // `allow_networks = []` (the shipped default) restricts nothing.
        let p = problem(&format!(
            "[server]\nlisten = [\"0.0.0.0:2525\"]\nallow_networks = []\n{OUTBOX}"
        ));
        assert!(p.message.contains("is not on loopback"), "{}", p.message);

        ok(&format!(
            "[server]\nlisten = [\"0.0.0.0:2525\"]\nallow_networks = [\"10.0.0.0/8\"]\n{OUTBOX}"
        ));
        ok(&format!(
            "[server]\nlisten = [\"0.0.0.0:2525\"]\nrequire_auth = true\n\
             [[users]]\nname = \"app\"\npassword_hash = \"{HASH}\"\nsenders = [\"*\"]\n{OUTBOX}"
        ));
    }

    #[test]
    fn require_auth_needs_users_and_users_need_argon2_hashes() {
        let p = problem(&format!("[server]\nrequire_auth = true\n{OUTBOX}"));
        assert_eq!(p.line, Some(2));
        assert!(p.message.contains("no [[users]]"), "{}", p.message);

        let config = ok(&format!(
            "[[users]]\nname = \"app\"\npassword_hash = \"{HASH}\"\nsenders = [\"billing@Example.com\", \"*@example.org\"]\n{OUTBOX}"
        ));
        let user = &config.users[0];
        assert_eq!(user.name, "app");
        assert_eq!(user.password_hash.expose(), HASH);
        assert_eq!(
            user.senders,
            [
                SenderPattern::Exact("billing@example.com".into()),
                SenderPattern::AnyAtDomain("example.org".into())
            ]
        );

        let p = problem(&format!(
            "[[users]]\nname = \"app\"\npassword_hash = \"plaintext-oops\"\nsenders = [\"*\"]\n{OUTBOX}"
        ));
        assert_eq!(p.line, Some(3));
        assert!(p.message.contains("not an argon2 hash"), "{}", p.message);
        assert!(
            !p.message.contains("plaintext-oops"),
            "the value is echoed: {}",
            p.message
        );
    }

    #[test]
    fn a_missing_environment_variable_names_channel_and_key() {
        let text = "[channels.relay]\nhost = \"smtp.example.net\"\nusername = \"u\"\n\
                    password_env = \"MAILGATE_TEST_SURELY_UNSET_8F3A\"\nsenders = [\"*\"]\n";
        let p = problem(text);
        assert_eq!(p.line, Some(4));
        assert_eq!(
            p.message,
            r#""password_env" in [channels.relay]: environment variable "MAILGATE_TEST_SURELY_UNSET_8F3A" is not set"#
        );

        // PATH is set wherever tests run (and tests may not set variables: no unsafe code).
        let path = std::env::var("PATH").expect("PATH is set");
        let config = ok(&text.replace("MAILGATE_TEST_SURELY_UNSET_8F3A", "PATH"));
        let target = smtp(&config, "relay");
        assert_eq!(
            target.password.as_ref().map(Secret::expose),
            Some(path.as_str())
        );
        assert_eq!(target.username.as_deref(), Some("u"));
        assert!(!config.has_literal_secrets);
    }

    #[test]
    fn a_password_file_is_read_relative_to_the_config_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("relay.pw"), "s3cret\n").unwrap();
        let text = "[channels.relay]\nhost = \"smtp.example.net\"\nusername = \"u\"\n\
                    password_file = \"relay.pw\"\nsenders = [\"*\"]\n";
        let config = parse(text, &dir.path().join("proxy.toml")).unwrap();
        assert_eq!(smtp(&config, "relay").password.unwrap().expose(), "s3cret");

        let errors = parse(text, &dir.path().join("elsewhere/proxy.toml")).unwrap_err();
        let p = &errors.problems[0];
        assert_eq!(p.line, Some(4));
        assert!(
            p.message
                .starts_with(r#""password_file" in [channels.relay]: cannot read "#),
            "{}",
            p.message
        );
    }

    #[test]
    fn only_one_password_form_and_username_goes_with_password() {
        let p = problem(
            "[channels.r]\nhost = \"h.example\"\nusername = \"u\"\npassword = \"a\"\npassword_env = \"PATH\"\nsenders = [\"*\"]\n",
        );
        assert_eq!(p.line, Some(4));
        assert!(p.message.contains("give only one of"), "{}", p.message);
        let p =
            problem("[channels.r]\nhost = \"h.example\"\nusername = \"u\"\nsenders = [\"*\"]\n");
        assert!(
            p.message.contains("username but no password"),
            "{}",
            p.message
        );
        let p =
            problem("[channels.r]\nhost = \"h.example\"\npassword = \"a\"\nsenders = [\"*\"]\n");
        assert!(
            p.message.contains("password but no username"),
            "{}",
            p.message
        );
    }

    #[test]
    fn several_problems_are_reported_together_in_file_order() {
        let text = "\
[channels.relay]
host = \"smtp.example.net\"
tls = \"none\"
senders = [\"*\"]
rate = \"fast\"

[channels.outbox]
kind = \"file\"
dir = \"out\"
senders = [\"*\"]

[server]
lisen = []
max_recipients = 0
";
        let all = problems(text);
        let lines: Vec<Option<usize>> = all.iter().map(|p| p.line).collect();
        assert_eq!(
            lines,
            [Some(3), Some(5), Some(10), Some(13), Some(14)],
            "{all:#?}"
        );
        assert!(all[0].message.contains("tls = \"none\""));
        assert!(all[1].message.contains("invalid rate"));
        assert!(all[2].message.contains("both list \"*\""));
        assert!(all[3].message.contains("unknown key \"lisen\""));
        assert!(all[4].message.contains("max_recipients"));

        let shown = parse(text, Path::new("proxy.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(shown.lines().count(), 5);
        assert!(shown.starts_with("proxy.toml:3: "), "{shown}");
    }

    #[test]
    fn a_syntax_error_has_a_line() {
        let p = problem("[server]\nhostname = \n");
        assert_eq!(p.line, Some(2));
        assert!(p.message.starts_with("TOML syntax error"), "{}", p.message);
        // toml_edit's "expected ..." hint stays on the problem's one line.
        let p = problem("[server\n");
        assert_eq!(p.line, Some(1));
        assert!(!p.message.contains('\n'), "{:?}", p.message);
        assert!(p.message.contains("expected"), "{:?}", p.message);
    }

    #[test]
    fn presets_fill_defaults_and_explicit_keys_override_them() {
        let text = "[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\npassword_env = \"PATH\"\n\
                    senders = [\"alice@example.com\"]\n\
                    [channels.bob]\npreset = \"gmail\"\nusername = \"bob@example.org\"\npassword_env = \"PATH\"\n\
                    senders = [\"bob@example.org\"]\nconnections = 2\nrate = \"10/min\"\nmax_recipients = 50\n\
                    [channels.sp]\npreset = \"sparkpost\"\nusername = \"SMTP_Injection\"\npassword_env = \"PATH\"\n\
                    domains = [\"example.com\"]\nhost = \"smtp.eu.sparkpostmail.com\"\nport = 2525\n";
        let config = ok(text);
        let names: Vec<&str> = config.channels.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob", "sp"]);

        let alice = &config.channels[0];
        assert!(alice.address_scoped);
        assert_eq!(alice.preset.as_deref(), Some("office365"));
        let t = smtp(&config, "alice");
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("smtp.office365.com", 587, TlsMode::Starttls)
        );
        assert_eq!(
            alice.limits,
            Limits {
                rate: Some(Rate {
                    count: 30,
                    per: Duration::from_secs(60)
                }),
                recipients_per_day: Some(10_000),
                max_recipients: Some(500),
                connections: 3,
                max_message_size: Some(35 * 1024 * 1024),
            }
        );

        let bob = &config.channels[1];
        assert!(bob.address_scoped);
        let t = smtp(&config, "bob");
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("smtp.gmail.com", 465, TlsMode::Implicit)
        );
        assert_eq!(
            bob.limits,
            Limits {
                rate: Some(Rate {
                    count: 10,
                    per: Duration::from_secs(60)
                }),
                recipients_per_day: Some(10_000),
                max_recipients: Some(50),
                connections: 2,
                max_message_size: None,
            }
        );

        let sp = &config.channels[2];
        assert!(!sp.address_scoped);
        assert_eq!(sp.scope, [SenderPattern::Domain("example.com".into())]);
        let t = smtp(&config, "sp");
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("smtp.eu.sparkpostmail.com", 2525, TlsMode::Starttls)
        );
        assert_eq!(
            sp.limits,
            Limits {
                connections: 4,
                ..Limits::default()
            }
        );

        // Choosing the other TLS mode of a preset picks that mode's port.
        let config = ok(&text.replace(
            "preset = \"gmail\"",
            "preset = \"gmail\"\ntls = \"starttls\"",
        ));
        assert_eq!(smtp(&config, "bob").port, 587);

        let p = problem("[channels.x]\npreset = \"hotmail\"\nsenders = [\"*\"]\n");
        assert_eq!(p.line, Some(2));
        assert!(
            p.message.contains("unknown preset \"hotmail\"") && p.message.contains("office365"),
            "{}",
            p.message
        );
    }

    #[test]
    fn ses_needs_a_region() {
        let text = "[channels.ses]\npreset = \"ses\"\nusername = \"AKIA\"\npassword_env = \"PATH\"\ndomains = [\"example.com\"]\n";
        let p = problem(text);
        assert_eq!(p.line, Some(1));
        assert!(p.message.contains("needs region"), "{}", p.message);

        let config = ok(&text.replace(
            "preset = \"ses\"",
            "preset = \"ses\"\nregion = \"eu-west-1\"",
        ));
        let t = smtp(&config, "ses");
        assert_eq!(
            (t.host.as_str(), t.port),
            ("email-smtp.eu-west-1.amazonaws.com", 587)
        );

        let p = problem(&text.replace(
            "preset = \"ses\"",
            "preset = \"mailgun\"\nregion = \"eu-west-1\"",
        ));
        assert!(
            p.message
                .starts_with("\"region\" in [channels.ses]: only used with preset = \"ses\""),
            "{}",
            p.message
        );
    }

    #[test]
    fn oauth_is_not_implemented_yet() {
        let text = "[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\nauth = \"xoauth2\"\n\
                    oauth = { provider = \"microsoft\" }\npassword_env = \"PATH\"\nsenders = [\"alice@example.com\"]\n";
        let all = problems(text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert_eq!((all[0].line, all[1].line), (Some(4), Some(5)));
        for p in &all {
            assert!(
                p.message.contains("XOAUTH2) is not implemented yet")
                    && p.message.contains("auth = \"password\"")
            );
        }
    }

    #[test]
    fn channel_kinds_need_their_own_keys() {
        let p = problem("[channels.r]\nsenders = [\"*\"]\n");
        assert!(p.message.contains("needs host"), "{}", p.message);
        let p = problem("[channels.f]\nkind = \"file\"\nsenders = [\"*\"]\n");
        assert!(p.message.contains("no dir"), "{}", p.message);
        let p = problem(&format!("{OUTBOX}host = \"smtp.example.net\"\n"));
        assert_eq!(
            p.message,
            r#""host" in [channels.outbox]: not allowed for kind = "file""#
        );
        let p = problem("[channels.r]\nhost = \"h.example\"\ndir = \"out\"\nsenders = [\"*\"]\n");
        assert!(
            p.message.contains("only for kind = \"file\""),
            "{}",
            p.message
        );
        let p =
            problem("[channels.r]\nkind = \"pigeon\"\nhost = \"h.example\"\nsenders = [\"*\"]\n");
        assert!(
            p.message
                .contains("\"pigeon\" is not one of \"smtp\", \"file\""),
            "{}",
            p.message
        );
        let p = problem("[channels.r]\nhost = \"h.example\"\nport = 70000\nsenders = [\"*\"]\n");
        assert!(p.message.contains("not a TCP port"), "{}", p.message);
    }

    #[test]
    fn a_channel_with_an_empty_scope_and_a_config_without_channels_are_errors() {
        let p = problem("[channels.r]\nhost = \"h.example\"\nsenders = []\n");
        assert_eq!(p.line, Some(1));
        assert!(
            p.message.contains("[channels.r] has an empty scope"),
            "{}",
            p.message
        );
        let p = problem("[server]\nhostname = \"mx\"\n");
        assert!(p.message.contains("no channel is defined"), "{}", p.message);
    }

    #[test]
    fn tls_files_go_together_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
        std::fs::write(dir.path().join("key.pem"), "x").unwrap();
        let path = dir.path().join("proxy.toml");
        let text = format!(
            "[server]\ntls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n{OUTBOX}"
        );
        let config = parse(&text, &path).unwrap();
        let tls = config.server.tls.unwrap();
        assert_eq!(
            (tls.cert, tls.key),
            (dir.path().join("cert.pem"), dir.path().join("key.pem"))
        );

        let errors = parse(&text.replace("tls_key = \"key.pem\"\n", ""), &path).unwrap_err();
        let messages: Vec<&str> = errors.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                r#""tls_listen" in [server] needs tls_cert and tls_key"#,
                r#""tls_cert" in [server] needs "tls_key" too"#
            ]
        );

        let errors = parse(&text.replace("key.pem", "nokey.pem"), &path).unwrap_err();
        assert_eq!(errors.problems.len(), 1);
        assert!(errors.problems[0].message.contains("does not exist"));
    }

    #[test]
    fn channels_are_sorted_and_bulk_channel_is_checked() {
        let text = "[channels.zeta]\nhost = \"h.example\"\ndomains = [\"example.com\"]\n\
                    [channels.alpha]\npreset = \"office365\"\nusername = \"a@example.com\"\npassword_env = \"PATH\"\n\
                    senders = [\"a@example.com\"]\n[routing]\nbulk_channel = \"zeta\"\nbulk_recipients = 50\n";
        let config = ok(text);
        assert_eq!(config.channel_id("alpha"), Some(0));
        assert_eq!(config.channel_id("zeta"), Some(1));
        assert_eq!(config.routing.bulk_channel, Some(1));
        assert_eq!(config.routing.bulk_recipients, Some(50));

        let p = problem(&text.replace("bulk_channel = \"zeta\"", "bulk_channel = \"alpha\""));
        assert!(
            p.message.contains("\"alpha\" is address-scoped"),
            "{}",
            p.message
        );
        let p = problem(&text.replace("bulk_channel = \"zeta\"", "bulk_channel = \"omega\""));
        assert!(
            p.message.contains("there is no channel \"omega\""),
            "{}",
            p.message
        );
    }

    #[test]
    fn secrets_print_as_stars() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{secret}"), "***");
        let config = ok(
            "[channels.r]\nhost = \"h.example\"\nusername = \"u\"\npassword = \"hunter2\"\nsenders = [\"*\"]\n",
        );
        assert!(config.has_literal_secrets);
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!summary(&config).contains("hunter2"));
    }

    #[test]
    fn summary_lists_channels_and_the_routing_table_most_specific_first() {
        let config = ok(&format!(
            "{OUTBOX}[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\npassword = \"pw\"\n\
             senders = [\"alice@example.com\"]\n[channels.team]\nhost = \"relay.example\"\nport = 25\n\
             senders = [\"*@example.com\"]\ndomains = [\"example.org\"]\nrate = \"100/h\"\n[routing]\nbulk_channel = \"team\"\n"
        ));
        let text = summary(&config);
        assert!(
            text.contains("  alice: smtp smtp.office365.com:587 tls starttls"),
            "{text}"
        );
        assert!(
            text.contains("scope (address-scoped): alice@example.com"),
            "{text}"
        );
        assert!(text.contains("30/min messages, 10000 recipients/day, 500 recipients/message, 3 connections, messages up to 35MB"), "{text}");
        assert!(
            text.contains("  team: smtp relay.example:25 tls starttls"),
            "{text}"
        );
        assert!(text.contains("100/h messages"), "{text}");
        assert!(text.contains("  outbox: file conf/out"), "{text}");
        let routes: Vec<&str> = text.lines().filter(|l| l.contains(" -> ")).collect();
        assert_eq!(routes.len(), 5, "{text}");
        assert!(routes[0].contains("alice@example.com") && routes[0].ends_with("-> alice"));
        assert!(
            routes[1].contains("example.org")
                && routes[1].contains("domain")
                && routes[1].ends_with("-> team")
        );
        assert!(routes[2].contains("*@example.com") && routes[2].ends_with("-> team"));
        assert!(routes[3].trim_start().starts_with('*') && routes[3].ends_with("-> outbox"));
        assert!(routes[4].starts_with("  bulk") && routes[4].ends_with("-> team"));
        assert!(
            text.contains("listen: 127.0.0.1:2525, [::1]:2525"),
            "{text}"
        );
        assert!(
            text.contains("delivery: queue (spool conf/spool)"),
            "{text}"
        );
    }

    #[test]
    fn the_shipped_proxy_toml_is_valid() {
        let config = parse(include_str!("../proxy.toml"), Path::new("proxy.toml")).unwrap();
        assert_eq!(
            config.server.listen,
            vec![
                "127.0.0.1:2525".parse::<SocketAddr>().unwrap(),
                "[::1]:2525".parse().unwrap()
            ]
        );
        assert_eq!(config.server.delivery, DeliveryMode::Queue);
        assert_eq!(config.channels.len(), 1);
        let outbox = &config.channels[0];
        assert_eq!(outbox.name, "outbox");
        assert_eq!(outbox.scope, [SenderPattern::Any]);
        assert!(matches!(&outbox.kind, ChannelKind::File { dir } if dir == Path::new("outbox")));
        assert!(!config.has_literal_secrets);
    }

    #[test]
    fn the_shipped_examples_are_valid_once_uncommented() {
        // Uncomment every commented table header and `key = value` line.
        let text: String = include_str!("../proxy.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(key, _)| {
                            key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let errors = parse(&text, Path::new("proxy.toml")).unwrap_err();
        // What is left is only what a fresh machine lacks: secrets, certificates, a real hash.
        for p in &errors.problems {
            let expected = [
                "is not set",
                "cannot read",
                "does not exist",
                "not an argon2 hash",
            ];
            assert!(
                expected.iter().any(|e| p.message.contains(e)),
                "unexpected: {p:?}"
            );
        }
        assert!(
            errors
                .problems
                .iter()
                .any(|p| p.message.contains("[channels.ses]"))
        );
    }
}
