//! `[channels.NAME]`: scope, kind, preset, limits, the upstream server and its login,
//! and the checks across channels (two channels claiming the same senders).

use std::collections::BTreeMap;

use serde_spanned::Spanned;

use super::reader::{Expect, Keys, RawSize, Reader, Section, Strings};
use super::secrets::{self, RawSecret, Resolved};
use super::server::MAX_RECIPIENTS;
use super::values::{
    default_port, is_loopback_host, parse_domain, parse_rate, parse_sender_pattern,
};
use super::{
    Channel, ChannelKind, GraphTarget, Limits, SenderPattern, SmtpTarget, TlsMode, oauth, presets,
};

/// SPEC §9: most upstream connections of one channel.
const MAX_CHANNEL_CONNECTIONS: u64 = 1_000;

/// A channel as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChannel {
    kind: Option<Spanned<String>>,
    preset: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    tls: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    auth: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    senders: Option<Strings>,
    domains: Option<Strings>,
    scope: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    recipients_per_day: Option<Spanned<i64>>,
    max_recipients: Option<Spanned<i64>>,
    connections: Option<Spanned<i64>>,
    max_message_size: Option<Spanned<RawSize>>,
    dir: Option<Spanned<String>>,
    mailbox: Option<Spanned<String>>,
    fallback: Option<Spanned<String>>,
}

pub(super) const CHANNEL_KEYS: Keys = &[
    ("kind", Expect::Str),
    ("preset", Expect::Str),
    ("region", Expect::Str),
    ("host", Expect::Str),
    ("port", Expect::Count),
    ("tls", Expect::Str),
    ("ca_file", Expect::Str),
    ("username", Expect::Str),
    ("auth", Expect::Str),
    ("oauth", Expect::Table),
    ("password", Expect::Str),
    ("password_env", Expect::Str),
    ("password_file", Expect::Str),
    ("senders", Expect::Strings),
    ("domains", Expect::Strings),
    ("scope", Expect::Str),
    ("rate", Expect::Str),
    ("recipients_per_day", Expect::Count),
    ("max_recipients", Expect::Count),
    ("connections", Expect::Count),
    ("max_message_size", Expect::Size),
    ("dir", Expect::Str),
    ("mailbox", Expect::Str),
    ("fallback", Expect::Str),
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
/// Keys a graph channel has no use for besides the SMTP-only ones (it keeps `oauth`).
const NOT_FOR_GRAPH: &[&str] = &["dir", "scope"];
/// The password keys, in order of preference.
const PASSWORD_KEYS: [&str; 3] = ["password_env", "password_file", "password"];

/// A channel as read, with what the checks across channels need.
struct Draft {
    channel: Channel,
    scope: Vec<(SenderPattern, Option<usize>)>,
    /// `fallback = "NAME"` and its line.
    fallback: Option<(String, Option<usize>)>,
}

/// `kind` of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Smtp,
    Graph,
    File,
}

/// Reads and validates every channel; the result is sorted by name.
pub(super) fn read(r: &mut Reader, root: &Section) -> Vec<Channel> {
    let Some(section) = r.section(root, "channels", "[channels]") else {
        if !root.has("channels") {
            r.problem(None, "no channel is defined: every sender would be refused");
        }
        return Vec::new();
    };
    let mut drafts = Vec::new();
    for (name, _) in section.table.iter() {
        let label = format!("[channels.{name}]");
        if let Some(s) = r.section(&section, name, &label) {
            drafts.push(channel(r, name, &s));
        }
    }
    if section.table.is_empty() {
        r.problem(
            section.line,
            "no channel is defined: every sender would be refused",
        );
    }
    check_overlaps(r, &drafts);
    drafts.sort_by(|a, b| a.channel.name.cmp(&b.channel.name));
    resolve_fallbacks(r, &mut drafts);
    drafts.into_iter().map(|d| d.channel).collect()
}

fn channel(r: &mut Reader, name: &str, s: &Section) -> Draft {
    let raw: RawChannel = r.read(s, CHANNEL_KEYS);
    let label = format!("[channels.{name}]");
    let kinds = [
        ("smtp", Kind::Smtp),
        ("graph", Kind::Graph),
        ("file", Kind::File),
    ];
    let kind = r.choice(s, "kind", &raw.kind, &kinds).unwrap_or(Kind::Smtp);
    let is_file = kind == Kind::File;
    if kind == Kind::Graph {
        return graph_channel(r, name, s, raw);
    }
    if s.has("mailbox") {
        let line = r.key_line(s, "mailbox");
        r.bad(s, "mailbox", line, "only for kind = \"graph\"");
    }

    let preset = raw.preset.as_ref().and_then(|at| {
        let found = presets::find(at.get_ref());
        if found.is_none() && !is_file {
            let why = format!(
                "unknown preset {:?}; known presets: {}",
                at.get_ref(),
                presets::NAMES.join(", ")
            );
            let line = r.at(at);
            r.bad(s, "preset", line, why);
        }
        found
    });

    // Scope.
    let mut scope = r.list_of(s, "senders", &raw.senders, parse_sender_pattern);
    let domains = r.list_of(s, "domains", &raw.domains, parse_domain);
    scope.extend(
        domains
            .into_iter()
            .map(|(d, line)| (SenderPattern::Domain(d), line)),
    );
    if !s.has_nonempty_list("senders") && !s.has_nonempty_list("domains") {
        r.problem(
            s.line,
            format!("{label} has an empty scope: list who may use it in senders = [...] or domains = [...]"),
        );
    }
    let scope_key = r.choice(
        s,
        "scope",
        &raw.scope,
        &[("address", true), ("domain", false)],
    );
    // SPEC §4: a mailbox preset's credentials belong to one mailbox whatever
    // `scope` says, so either the preset or `scope = "address"` makes it address-only.
    let preset_address = preset.as_ref().is_some_and(|p| p.address_scoped);
    let address_scoped = preset_address || scope_key == Some(true);
    if address_scoped {
        let why = match &preset {
            Some(p) if preset_address => format!("preset {:?}", p.name),
            _ => "scope = \"address\"".to_owned(),
        };
        for (pattern, line) in &scope {
            if !matches!(pattern, SenderPattern::Exact(_)) {
                let message = format!(
                    "{label} is address-scoped ({why}): its credentials belong to one mailbox, so it may list exact addresses only, not {}",
                    pattern.phrase()
                );
                r.problem(*line, message);
            }
        }
    }

    let limits = limits(r, s, &raw, preset.as_ref());

    let kind = if is_file {
        for key in SMTP_ONLY_KEYS {
            if s.has(key) {
                let line = r.key_line(s, key);
                r.bad(s, key, line, "not allowed for kind = \"file\"");
            }
        }
        let dir = raw.dir.as_ref().map(|at| r.resolve(at.get_ref()));
        if !s.has("dir") {
            r.problem(s.line, format!("{label} has kind = \"file\" but no dir"));
        }
        ChannelKind::File {
            dir: dir.unwrap_or_default(),
        }
    } else {
        if s.has("dir") {
            let line = r.key_line(s, "dir");
            r.bad(s, "dir", line, "only for kind = \"file\"");
        }
        ChannelKind::Smtp(smtp_target(r, &label, s, &raw, preset.as_ref()))
    };

    let fallback = fallback_key(r, &raw);
    Draft {
        channel: Channel {
            name: name.to_owned(),
            scope: scope.iter().map(|(p, _)| p.clone()).collect(),
            address_scoped,
            preset: raw.preset.map(Spanned::into_inner),
            kind,
            limits,
            fallback: None,
        },
        scope,
        fallback,
    }
}

fn fallback_key(r: &Reader, raw: &RawChannel) -> Option<(String, Option<usize>)> {
    raw.fallback
        .as_ref()
        .map(|at| (at.get_ref().clone(), r.at(at)))
}

/// A `kind = "graph"` channel (SPEC §3, §7): one mailbox, its OAuth settings, the Graph
/// preset's limits; `senders` defaults to the mailbox and may list nothing else, since
/// `sendMail` sends as that mailbox.
fn graph_channel(r: &mut Reader, name: &str, s: &Section, raw: RawChannel) -> Draft {
    let label = format!("[channels.{name}]");
    let smtp_keys = SMTP_ONLY_KEYS.iter().filter(|&&key| key != "oauth");
    for key in smtp_keys.chain(NOT_FOR_GRAPH) {
        if s.has(key) {
            let line = r.key_line(s, key);
            r.bad(s, key, line, "not used by kind = \"graph\"");
        }
    }
    let mailbox = r.parsed(s, "mailbox", &raw.mailbox, |text| {
        // It goes into the request path: an address, and nothing a URL would read as structure.
        let url_safe = !text.contains(['/', '?', '#', '%', '\\']);
        match parse_sender_pattern(text) {
            Ok(SenderPattern::Exact(address)) if url_safe => Ok(address),
            _ => Err(format!(
                "{text:?} is not a mailbox address like \"alice@example.com\""
            )),
        }
    });
    if !s.has("mailbox") {
        r.problem(
            s.line,
            format!(
                "{label} has kind = \"graph\" but no mailbox = \"...\", the mailbox that sends"
            ),
        );
    }
    let oauth_label = format!("{label} oauth");
    let oauth = r
        .section(s, "oauth", &oauth_label)
        .and_then(|o| oauth::read(r, &o, &oauth_label, true, None));
    if !s.has("oauth") {
        r.problem(
            s.line,
            format!(
                "{label} has kind = \"graph\" but no oauth = {{ provider = \"microsoft\", client_id = \"...\", ... }}"
            ),
        );
    }

    let mut scope = r.list_of(s, "senders", &raw.senders, parse_sender_pattern);
    let domains = r.list_of(s, "domains", &raw.domains, parse_domain);
    scope.extend(
        domains
            .into_iter()
            .map(|(d, line)| (SenderPattern::Domain(d), line)),
    );
    if let Some(mailbox) = &mailbox {
        let mine = SenderPattern::Exact(mailbox.clone());
        for (pattern, line) in &scope {
            if pattern.key() != mine.key() {
                let message = format!(
                    "{label} is a graph channel: it sends as mailbox {mailbox:?} only, so senders may list that address alone, not {}",
                    pattern.phrase()
                );
                r.problem(*line, message);
            }
        }
        if scope.is_empty() {
            scope.push((mine, r.key_line(s, "mailbox")));
        }
    }

    let limits = limits(r, s, &raw, Some(&presets::graph()));
    let fallback = fallback_key(r, &raw);
    let kind = ChannelKind::Graph(GraphTarget {
        mailbox: mailbox.unwrap_or_default(),
        oauth: oauth.unwrap_or_else(oauth::placeholder),
    });
    Draft {
        channel: Channel {
            name: name.to_owned(),
            scope: scope.iter().map(|(p, _)| p.clone()).collect(),
            address_scoped: true,
            preset: None,
            kind,
            limits,
            fallback: None,
        },
        scope,
        fallback,
    }
}

/// Resolves every `fallback = "NAME"` (the drafts are sorted by name): the channel
/// exists and is another one, the chain never loops, and the fallback's scope covers
/// every sender of the channels that fall back to it.
fn resolve_fallbacks(r: &mut Reader, drafts: &mut [Draft]) {
    let names: Vec<String> = drafts.iter().map(|d| d.channel.name.clone()).collect();
    for i in 0..drafts.len() {
        let Some((target, line)) = drafts[i].fallback.clone() else {
            continue;
        };
        let name = &names[i];
        match names.iter().position(|n| *n == target) {
            None => r.problem(
                line,
                format!("[channels.{name}] has fallback = {target:?}, but there is no channel {target:?}"),
            ),
            Some(j) if j == i => r.problem(
                line,
                format!("[channels.{name}] names itself as its fallback"),
            ),
            Some(j) => drafts[i].channel.fallback = Some(j),
        }
    }
    // Loops: follow each chain at most once around the channels.
    for start in 0..drafts.len() {
        let mut at = start;
        for _ in 0..drafts.len() {
            match drafts[at].channel.fallback {
                Some(next) if next == start => {
                    let line = drafts[start].fallback.as_ref().and_then(|(_, l)| *l);
                    r.problem(
                        line,
                        format!(
                            "the fallback chain of channel {:?} loops back to it: a fallback must end at a channel without one",
                            names[start]
                        ),
                    );
                    break;
                }
                Some(next) => at = next,
                None => break,
            }
        }
    }
    for draft in drafts.iter() {
        let Some(j) = draft.channel.fallback else {
            continue;
        };
        let target = &drafts[j].channel;
        let line = draft.fallback.as_ref().and_then(|(_, l)| *l);
        for (pattern, _) in &draft.scope {
            if !covers(&target.scope, pattern) {
                let message = format!(
                    "channel {:?} falls back to {:?}, whose scope does not cover sender {} of {:?}",
                    draft.channel.name,
                    target.name,
                    pattern.phrase(),
                    draft.channel.name
                );
                r.problem(line, message);
            }
        }
    }
}

/// Whether `scope` takes every sender that `pattern` takes.
fn covers(scope: &[SenderPattern], pattern: &SenderPattern) -> bool {
    scope.iter().any(|p| match (p, pattern) {
        (SenderPattern::Any, _) => true,
        (_, SenderPattern::Any) => false,
        (SenderPattern::Domain(d) | SenderPattern::AnyAtDomain(d), other) => {
            let domain = match other {
                SenderPattern::Exact(a) => a.rsplit_once('@').map_or("", |(_, d)| d),
                SenderPattern::Domain(d) | SenderPattern::AnyAtDomain(d) => d,
                SenderPattern::Any => "",
            };
            domain.eq_ignore_ascii_case(d.trim_start_matches("*@"))
        }
        (SenderPattern::Exact(_), SenderPattern::Exact(_)) => p.key() == pattern.key(),
        (SenderPattern::Exact(_), _) => false,
    })
}

/// The preset's limits, then the explicit keys.
fn limits(
    r: &mut Reader,
    s: &Section,
    raw: &RawChannel,
    preset: Option<&presets::Preset>,
) -> Limits {
    let mut limits = preset.map_or_else(
        || Limits {
            connections: presets::DEFAULT_CONNECTIONS,
            ..Limits::default()
        },
        |p| p.limits.clone(),
    );
    if let Some(rate) = r.parsed(s, "rate", &raw.rate, parse_rate) {
        limits.rate = Some(rate);
    }
    let per_day = &raw.recipients_per_day;
    if let Some(n) = r.count(s, "recipients_per_day", per_day, i64::MAX.unsigned_abs()) {
        limits.recipients_per_day = Some(n);
    }
    if let Some(n) = r.count_usize(s, "max_recipients", &raw.max_recipients, MAX_RECIPIENTS) {
        limits.max_recipients = Some(n);
    }
    let connections = &raw.connections;
    if let Some(n) = r.count_usize(s, "connections", connections, MAX_CHANNEL_CONNECTIONS) {
        limits.connections = n;
    }
    if let Some(n) = r.size(s, "max_message_size", &raw.max_message_size) {
        limits.max_message_size = Some(n);
    }
    limits
}

/// `auth` of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    Password,
    XOAuth2,
}

fn smtp_target(
    r: &mut Reader,
    label: &str,
    s: &Section,
    raw: &RawChannel,
    preset: Option<&presets::Preset>,
) -> SmtpTarget {
    let region = r.word(s, "region", &raw.region);
    let needs_region = preset.is_some_and(|p| p.needs_region());
    if let Some(region) = &region {
        let line = raw.region.as_ref().and_then(|at| r.at(at));
        if !needs_region {
            r.bad(s, "region", line, "only used with preset = \"ses\"");
        } else if !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            let why = format!("{region:?} is not a region name like \"eu-west-1\"");
            r.bad(s, "region", line, why);
        }
    }

    let host = match (r.word(s, "host", &raw.host), preset) {
        (Some(host), _) => Some(host),
        (None, Some(p)) if p.needs_region() => match &region {
            Some(region) => Some(p.host_for(region)),
            None => {
                let message = format!(
                    "{label} uses preset = {:?}, which needs region = \"...\" (e.g. \"eu-west-1\")",
                    p.name
                );
                r.problem(s.line, message);
                None
            }
        },
        (None, Some(p)) => Some(p.host.to_owned()),
        (None, None) => {
            // An unknown preset is reported already; a missing host would only repeat it.
            if !s.has("preset") && !s.has("host") {
                r.problem(s.line, format!("{label} needs host = \"...\" or a preset"));
            }
            None
        }
    };

    let tls_options = [
        ("starttls", TlsMode::Starttls),
        ("implicit", TlsMode::Implicit),
        ("none", TlsMode::None),
    ];
    let tls_key = r.choice(s, "tls", &raw.tls, &tls_options);
    let tls = tls_key
        .or(preset.map(|p| p.tls))
        .unwrap_or(TlsMode::Starttls);
    let tls_line = raw.tls.as_ref().and_then(|at| r.at(at)).or(s.line);
    if let (TlsMode::None, Some(host)) = (tls, &host)
        && !is_loopback_host(host)
    {
        let message = format!(
            "{label} has tls = \"none\" to {host:?}: plaintext is allowed only to loopback hosts (127.0.0.1, ::1, localhost)"
        );
        r.problem(tls_line, message);
    }
    // A preset's port goes with its TLS mode; choosing another mode picks that mode's port.
    let port = r
        .count(s, "port", &raw.port, u64::MAX)
        .and_then(|n| match u16::try_from(n) {
            Ok(port) => Some(port),
            Err(_) => {
                let line = r.key_line(s, "port");
                r.bad(
                    s,
                    "port",
                    line,
                    format!("{n} is not a TCP port (1 to 65535)"),
                );
                None
            }
        })
        .unwrap_or(match preset {
            Some(p) if p.tls == tls => p.port,
            _ => default_port(tls),
        });
    let ca_file = r.existing_file(s, "ca_file", &raw.ca_file);

    let auth_options = [("password", Auth::Password), ("xoauth2", Auth::XOAuth2)];
    let auth_key = r.choice(s, "auth", &raw.auth, &auth_options);
    // `auth` defaults to XOAUTH2 when the channel has OAuth settings (SPEC §3).
    let auth = auth_key.unwrap_or(if s.has("oauth") {
        Auth::XOAuth2
    } else {
        Auth::Password
    });
    let oauth_label = format!("{label} oauth");
    let oauth_section = r.section(s, "oauth", &oauth_label);
    let oauth = oauth_section.as_ref().and_then(|o| {
        oauth::read(
            r,
            o,
            &oauth_label,
            false,
            preset.and_then(|p| p.oauth_app_scope),
        )
    });
    if let (Some(p), Some(o)) = (preset, &oauth)
        && !p.oauth_delegated
        && o.grant == oauth::Grant::RefreshToken
    {
        r.problem(
            oauth_section.as_ref().and_then(|o| o.line),
            format!(
                "{label}: preset {:?} takes an app's own token only: set grant = \"client_credentials\" with client_secret_env, client_secret_file or client_secret",
                p.name
            ),
        );
    }
    if preset.is_some_and(|p| p.name == "acs")
        && let Some(at) = &raw.username
        && !acs_username_ok(at.get_ref())
    {
        let line = r.at(at);
        r.bad(
            s,
            "username",
            line,
            "an ACS username with \"|\" is \"<resource>|<app id>|<tenant id>\", three parts none empty (or use the name of an SMTP Username resource, without \"|\")",
        );
    }
    let username = raw.username.as_ref().map(|at| at.get_ref().clone());
    let password_given = PASSWORD_KEYS.iter().any(|k| s.has(k));
    let auth_line = raw.auth.as_ref().and_then(|at| r.at(at));

    let password = match auth {
        Auth::XOAuth2 => {
            if !s.has("oauth") {
                r.problem(
                    auth_line,
                    format!(
                        "{label} has auth = \"xoauth2\" but no oauth = {{ provider = \"...\", client_id = \"...\", ... }}"
                    ),
                );
            }
            if let Some(key) = PASSWORD_KEYS.iter().find(|k| s.has(k)) {
                let line = r.key_line(s, key);
                r.bad(
                    s,
                    key,
                    line,
                    "not used with auth = \"xoauth2\": the OAuth token replaces the password",
                );
            }
            if !s.has("username") {
                r.problem(
                    s.line,
                    format!(
                        "{label} uses XOAUTH2 and needs username = \"...\", the mailbox that sends"
                    ),
                );
            }
            if tls == TlsMode::None {
                r.problem(
                    tls_line,
                    format!("{label} has tls = \"none\" with auth = \"xoauth2\": tokens never travel in plaintext"),
                );
            }
            None
        }
        Auth::Password => {
            if s.has("oauth") && auth_key == Some(Auth::Password) {
                let line = r.key_line(s, "oauth");
                r.problem(
                    line,
                    format!(
                        "{label} has oauth = {{ ... }} but auth = \"password\": remove one of them"
                    ),
                );
            }
            let secret = RawSecret {
                env: &raw.password_env,
                file: &raw.password_file,
                literal: &raw.password,
            };
            let password = match secrets::read(r, s, "password", secret, false) {
                Some((_, Resolved::Value(secret))) => Some(secret),
                _ => None,
            };
            if password_given && !s.has("username") {
                r.problem(s.line, format!("{label} has a password but no username"));
            }
            if !password_given && s.has("username") {
                let line = r.key_line(s, "username");
                r.problem(
                    line,
                    format!("{label} has a username but no password (password_env, password_file or password)"),
                );
            }
            password
        }
    };

    SmtpTarget {
        host: host.unwrap_or_default(),
        port,
        tls,
        ca_file,
        username,
        password,
        oauth: oauth.filter(|_| auth == Auth::XOAuth2),
    }
}

/// Azure Communication Services takes `<resource>|<app id>|<tenant id>` or the name of
/// an SMTP Username resource (free form or an address, without `|`).
fn acs_username_ok(username: &str) -> bool {
    !username.contains('|') || {
        let parts: Vec<&str> = username.split('|').collect();
        parts.len() == 3 && parts.iter().all(|p| !p.trim().is_empty())
    }
}

/// Two channels listing the same pattern at the same specificity make routing ambiguous.
fn check_overlaps(r: &mut Reader, drafts: &[Draft]) {
    let mut owners: BTreeMap<(u8, String), &str> = BTreeMap::new();
    // A fallback is no routing candidate of its own (SPEC §7): its scope clashes with nothing.
    let fallbacks: std::collections::HashSet<&str> = drafts
        .iter()
        .filter_map(|d| {
            let (f, _) = d.fallback.as_ref()?;
            (*f != d.channel.name).then_some(f.as_str())
        })
        .collect();
    for draft in drafts
        .iter()
        .filter(|d| !fallbacks.contains(d.channel.name.as_str()))
    {
        let name = draft.channel.name.as_str();
        for (pattern, line) in &draft.scope {
            let key = pattern.key();
            match owners.get(&key) {
                // A channel repeating its own pattern is harmless.
                Some(owner) if *owner == name => {}
                Some(owner) => {
                    let message = format!(
                        "channels {owner:?} and {name:?} both list {} ({}): a sender it matches could go either way",
                        pattern.phrase(),
                        pattern.specificity_name()
                    );
                    r.problem(*line, message);
                }
                None => {
                    owners.insert(key, name);
                }
            }
        }
    }
}
