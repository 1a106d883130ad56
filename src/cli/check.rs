//! The summary `mailgate check` prints: channels, the routing table (most specific first),
//! listeners and delivery mode. Never shows a secret.

use std::fmt::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::oauth::{Grant, OAuth, TokenSource};
use crate::config::{ChannelKind, Config, DeliveryMode, Limits, Rate, SenderPattern, SmtpTarget};

/// One kilobyte, megabyte, gigabyte: sizes print in the binary units the file uses.
const KB: u64 = 1024;
const MB: u64 = 1024 * KB;
const GB: u64 = 1024 * MB;

/// A human-readable account of `config` for `mailgate check`.
pub fn summary(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_summary(&mut out, config);
    out
}

/// One line per channel whose requests would go through an environment proxy mailgate
/// cannot use: those requests fail (the mail waits) until the environment is fixed.
pub fn proxy_warnings(config: &Config, proxies: &crate::http::Proxies) -> Vec<String> {
    let mut warnings = Vec::new();
    for channel in &config.channels {
        let Some(oauth) = channel.kind.oauth() else {
            continue;
        };
        let mut urls = vec![oauth.token_url.as_str()];
        if let ChannelKind::Graph(g) = &channel.kind {
            urls.push(g.graph_url());
        }
        let mut seen = Vec::new();
        for url in urls {
            let Ok(parsed) = reqwest::Url::parse(url) else {
                continue;
            };
            if let crate::http::Route::Unusable(unusable) = proxies.route(&parsed) {
                let line = format!(
                    "channel {}: its requests to {} will fail until this is fixed: {unusable}",
                    channel.name,
                    parsed.host_str().unwrap_or_default()
                );
                if !seen.contains(&line) {
                    seen.push(line);
                }
            }
        }
        warnings.extend(seen);
    }
    warnings
}

fn write_summary(out: &mut String, config: &Config) -> fmt::Result {
    let shared = matches!(config.state, crate::config::StateBackend::Redis(_));
    writeln!(out, "channels:")?;
    // Who falls back to whom, gathered once (a config may hold 10,000 channels).
    let mut fallback_for: Vec<Vec<&str>> = vec![Vec::new(); config.channels.len()];
    for c in &config.channels {
        if let Some(slot) = c.fallback.and_then(|f| fallback_for.get_mut(f)) {
            slot.push(c.name.as_str());
        }
    }
    for (id, c) in config.channels.iter().enumerate() {
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
                    t.tls.name()
                )?;
                if let Some(ca) = &t.ca_file {
                    writeln!(out, "    extra trust root: {}", ca.display())?;
                }
                write_auth(out, &c.name, t, shared)?;
            }
            ChannelKind::Graph(g) => {
                writeln!(
                    out,
                    "  {}: graph {}/v1.0/users/{}/sendMail",
                    c.name,
                    g.graph_url(),
                    g.mailbox
                )?;
                write_oauth(out, &c.name, &g.oauth, shared)?;
            }
            ChannelKind::File { dir } => writeln!(out, "  {}: file {}", c.name, dir.display())?,
        }
        if let Some(f) = c.fallback {
            writeln!(
                out,
                "    fallback: {} (takes this channel's queued and new mail while the provider refuses how it authenticates: 535 5.7.139, 550 5.7.30, an OAuth grant refused)",
                config.channels[f].name
            )?;
        }
        let fallback_for = &fallback_for[id];
        if !fallback_for.is_empty() {
            writeln!(
                out,
                "    fallback for: {} (not a routing candidate of its own)",
                fallback_for.join(", ")
            )?;
        }
        if let Some(preset) = &c.preset {
            writeln!(out, "    preset: {preset}")?;
        }
        let patterns: Vec<String> = c
            .scope
            .iter()
            .map(|p| match p {
                SenderPattern::Domain(d) => format!("domain {d}"),
                other => other.text(),
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
        .enumerate()
        .filter(|(id, _)| !config.is_fallback(*id))
        .map(|(_, c)| c)
        .flat_map(|c| c.scope.iter().map(move |p| (p, c.name.as_str())))
        .collect();
    table.sort_by(|a, b| a.0.key().cmp(&b.0.key()).then(a.1.cmp(b.1)));
    table.dedup();
    let width = table.iter().map(|(p, _)| p.text().len()).max().unwrap_or(0);
    for (pattern, channel) in &table {
        let text = pattern.text();
        let kind = pattern.specificity_name();
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

    if !config.rewrites.is_empty() {
        writeln!(out, "rewrites (first match applies, before routing):")?;
    }
    for r in &config.rewrites {
        let mut when = Vec::new();
        if !r.networks.is_empty() {
            let nets: Vec<String> = r.networks.iter().map(|n| n.to_string()).collect();
            when.push(format!("client in {}", nets.join(", ")));
        }
        if let Some(user) = &r.user {
            when.push(format!("user {user}"));
        }
        let when = if when.is_empty() {
            String::new()
        } else {
            format!(" ({})", when.join(", "))
        };
        writeln!(
            out,
            "  {}{when} -> {} (header_from {})",
            r.pattern.text(),
            r.sender,
            r.header_from.name()
        )?;
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
    match &config.metrics {
        Some(m) => {
            let open = m.listen.iter().any(|a| !a.ip().is_loopback());
            let note = if open && m.allow_networks.is_empty() {
                " (not loopback, yet only loopback clients are answered: add your Prometheus to allow_networks)"
            } else {
                ""
            };
            let paths = if m.status_page {
                "/metrics, /healthz, status page / and /status.json"
            } else {
                "/metrics, /healthz"
            };
            writeln!(out, "metrics: {} ({paths}){note}", addrs(&m.listen))?;
            if !m.allow_networks.is_empty() {
                let nets: Vec<String> = m.allow_networks.iter().map(|n| n.to_string()).collect();
                writeln!(
                    out,
                    "  answers loopback clients and {}; 403 to others",
                    nets.join(", ")
                )?;
            }
        }
        None => writeln!(out, "metrics: off")?,
    }
    Ok(())
}

/// How the channel logs in: the user, and for OAuth where its token comes from.
fn write_auth(out: &mut String, channel: &str, t: &SmtpTarget, shared: bool) -> fmt::Result {
    match (&t.username, &t.password, &t.oauth) {
        (Some(user), _, Some(oauth)) => {
            writeln!(out, "    auth xoauth2: {user}")?;
            write_oauth(out, channel, oauth, shared)
        }
        (Some(user), Some(_), None) => writeln!(out, "    auth: {user} (password set)"),
        _ => writeln!(out, "    auth: none"),
    }
}

/// Where the channel's OAuth tokens come from (never a secret). `shared`: `[state]
/// backend = "redis"`, where `oauth authorize` and token rotation write Redis first and
/// the file only gets a copy.
fn write_oauth(out: &mut String, channel: &str, oauth: &OAuth, shared: bool) -> fmt::Result {
    writeln!(
        out,
        "    oauth: provider {}, grant {}, client_id {}",
        oauth.provider.name(),
        oauth.grant.name(),
        oauth.client_id
    )?;
    let source = match &oauth.refresh_token_source {
        TokenSource::File(path) if shared => format!(
            "Redis when it holds one (shared by every host), else refresh_token_file {} \
             (new tokens are copied into it)",
            path.display()
        ),
        TokenSource::Env(name) if shared => {
            format!("Redis when it holds one (shared by every host), else refresh_token_env {name}")
        }
        TokenSource::File(path) if oauth.refresh_token.is_some() => {
            format!("refresh_token_file {}", path.display())
        }
        TokenSource::File(path) => format!(
            "refresh_token_file {} (not there yet: run mailgate oauth authorize {channel})",
            path.display()
        ),
        TokenSource::Env(name) => format!("refresh_token_env {name}"),
        TokenSource::Literal => "literal".to_owned(),
        TokenSource::None if oauth.grant == Grant::ClientCredentials => {
            "none (client credentials)".to_owned()
        }
        TokenSource::None => format!("none (run: mailgate oauth authorize {channel})"),
    };
    writeln!(out, "    token: {source}")
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    const OUTBOX: &str = "[channels.outbox]\nkind = \"file\"\ndir = \"out\"\nsenders = [\"*\"]\n";

    fn ok(text: &str) -> Config {
        match config::parse(text, Path::new("conf/proxy.toml")) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
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
    fn summary_shows_how_each_oauth_channel_gets_its_token_but_never_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alice.token"), "rt-from-the-file\n").unwrap();
        let channel = |name: &str, oauth: &str| {
            format!(
                "[channels.{name}]\npreset = \"office365\"\nusername = \"{name}@example.com\"\n\
                 oauth = {{ provider = \"microsoft\", client_id = \"id-{name}\", {oauth} }}\n\
                 senders = [\"{name}@example.com\"]\n"
            )
        };
        let text = [
            channel("alice", "refresh_token_file = \"alice.token\""),
            channel("bob", "refresh_token_env = \"PATH\""),
            channel("carol", "refresh_token = \"rt-literal-carol\""),
            channel("dave", "client_secret = \"cs-literal-dave\""),
            channel(
                "erin",
                "grant = \"client_credentials\", client_secret = \"cs-literal-erin\"",
            ),
            "[channels.relay]\nhost = \"h.example\"\nusername = \"u\"\npassword = \"hunter2\"\ndomains = [\"example.org\"]\n"
                .to_owned(),
        ]
        .concat();
        let config = config::parse(&text, &dir.path().join("proxy.toml")).unwrap();
        let shown = summary(&config);
        for secret in [
            "rt-from-the-file",
            "rt-literal-carol",
            "cs-literal-dave",
            "cs-literal-erin",
            "hunter2",
            std::env::var("PATH").unwrap().as_str(),
        ] {
            assert!(!shown.contains(secret), "{secret:?} shown in:\n{shown}");
        }
        let token = dir.path().join("alice.token");
        for expected in [
            "    auth xoauth2: alice@example.com".to_owned(),
            "    oauth: provider microsoft, grant refresh_token, client_id id-alice".to_owned(),
            format!("    token: refresh_token_file {}", token.display()),
            "    token: refresh_token_env PATH".to_owned(),
            "    token: literal".to_owned(),
            "    token: none (run: mailgate oauth authorize dave)".to_owned(),
            "    oauth: provider microsoft, grant client_credentials, client_id id-erin".to_owned(),
            "    token: none (client credentials)".to_owned(),
            "    auth: u (password set)".to_owned(),
        ] {
            assert!(shown.contains(&expected), "{expected:?} not in:\n{shown}");
        }

        // A token file that `oauth authorize` has not written yet.
        std::fs::remove_file(&token).unwrap();
        let config = config::parse(&text, &dir.path().join("proxy.toml")).unwrap();
        let shown = summary(&config);
        assert!(
            shown.contains("(not there yet: run mailgate oauth authorize alice)"),
            "{shown}"
        );

        // With Redis, a token there wins over the file and the environment.
        let shared =
            format!("[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n{text}");
        let config = config::parse(&shared, &dir.path().join("proxy.toml")).unwrap();
        let shown = summary(&config);
        for expected in [
            format!(
                "    token: Redis when it holds one (shared by every host), else refresh_token_file {} (new tokens are copied into it)",
                token.display()
            ),
            "    token: Redis when it holds one (shared by every host), else refresh_token_env PATH".to_owned(),
        ] {
            assert!(shown.contains(&expected), "{expected:?} not in:\n{shown}");
        }
    }

    #[test]
    fn proxy_warnings_name_the_channels_an_unusable_environment_proxy_would_fail() {
        let config = ok(&format!(
            "{OUTBOX}[channels.dave]\nkind = \"graph\"\nmailbox = \"dave@example.com\"\n\
             oauth = {{ provider = \"microsoft\", grant = \"client_credentials\", tenant = \"example.com\", client_id = \"app-id\", client_secret = \"s3cret\" }}\n"
        ));
        let env = |vars: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let proxies = |vars: &[(&str, &str)]| crate::http::Proxies::new(None, &env(vars));
        let warnings = proxy_warnings(&config, &proxies(&[("ALL_PROXY", "socks9://u:pw@s:1080")]));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("channel dave: its requests to login.microsoftonline.com will fail until this is fixed: the environment's ALL_PROXY=socks9://***@s:1080"), "{warnings:?}");
        assert!(warnings[1].contains("graph.microsoft.com"), "{warnings:?}");
        assert!(!warnings.concat().contains("pw@"));
        // Usable, shadowed, or bypassed: nothing to say.
        for vars in [
            &[("ALL_PROXY", "socks5h://s:1080")][..],
            &[
                ("ALL_PROXY", "garbage://"),
                ("https_proxy", "http://p:3128"),
            ],
            &[
                ("ALL_PROXY", "garbage://"),
                ("no_proxy", "microsoft.com,microsoftonline.com"),
            ],
        ] {
            assert_eq!(
                proxy_warnings(&config, &proxies(vars)),
                Vec::<String>::new(),
                "{vars:?}"
            );
        }
    }
}
