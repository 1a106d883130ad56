//! `[server]`: listeners, TLS files, limits, delivery mode and the open-relay guard.

use std::net::SocketAddr;

use serde_spanned::Spanned;

use super::reader::{Expect, Keys, RawSize, Reader, Section, Strings};
use super::values::{parse_duration, parse_listen, parse_network};
use super::{BareLf, DeliveryMode, Server, TlsFiles};

/// SPEC §9: most client connections at once.
const MAX_CONNECTIONS: u64 = 1_000_000;
/// SPEC §9: most recipients per message.
pub(super) const MAX_RECIPIENTS: u64 = 100_000;
/// SPEC §9: most connections from one client address.
const MAX_CONNECTIONS_PER_CLIENT: u64 = 100_000;

/// `[server]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Strings>,
    tls_listen: Option<Strings>,
    hostname: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    max_message_size: Option<Spanned<RawSize>>,
    max_recipients: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    delivery: Option<Spanned<String>>,
    spool_dir: Option<Spanned<String>>,
    retry_first: Option<Spanned<String>>,
    retry_max: Option<Spanned<String>>,
    give_up_after: Option<Spanned<String>>,
    require_auth: Option<Spanned<bool>>,
    allow_networks: Option<Strings>,
    check_header_from: Option<Spanned<bool>>,
    bare_lf: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_header_size: Option<Spanned<RawSize>>,
    max_connections_per_client: Option<Spanned<i64>>,
    shutdown_grace: Option<Spanned<String>>,
    https_proxy: Option<Spanned<String>>,
}

pub(super) const SERVER_KEYS: Keys = &[
    ("listen", Expect::Strings),
    ("tls_listen", Expect::Strings),
    ("hostname", Expect::Str),
    ("tls_cert", Expect::Str),
    ("tls_key", Expect::Str),
    ("max_message_size", Expect::Size),
    ("max_recipients", Expect::Count),
    ("max_connections", Expect::Count),
    ("delivery", Expect::Str),
    ("spool_dir", Expect::Str),
    ("retry_first", Expect::Duration),
    ("retry_max", Expect::Duration),
    ("give_up_after", Expect::Duration),
    ("require_auth", Expect::Bool),
    ("allow_networks", Expect::Strings),
    ("check_header_from", Expect::Bool),
    ("bare_lf", Expect::Str),
    ("idle_timeout", Expect::Duration),
    ("max_header_size", Expect::Size),
    ("max_connections_per_client", Expect::Count),
    ("shutdown_grace", Expect::Duration),
    ("https_proxy", Expect::Str),
];

/// Reads and validates `[server]`; absent keys take [`Server::default`].
pub(super) fn read(r: &mut Reader, s: &Section) -> Server {
    let raw: RawServer = r.read(s, SERVER_KEYS);
    let defaults = Server::default();

    let listeners = |r: &mut Reader, key: &str, raw: &Option<Strings>| {
        r.list_of(s, key, raw, parse_listen)
            .into_iter()
            .flat_map(|(addrs, line)| addrs.into_iter().map(move |a| (a, line)))
            .collect::<Vec<(SocketAddr, Option<usize>)>>()
    };
    let listen = match &raw.listen {
        Some(_) => listeners(r, "listen", &raw.listen),
        None => defaults.listen.iter().map(|a| (*a, None)).collect(),
    };
    let tls_listen = listeners(r, "tls_listen", &raw.tls_listen);
    if listen.is_empty() && tls_listen.is_empty() {
        let line = r.key_line(s, "listen").or(s.line);
        r.problem(line, "[server] has no listener: set listen or tls_listen");
    }
    let mut seen: Vec<SocketAddr> = Vec::new();
    for (addr, line) in listen.iter().chain(&tls_listen) {
        // Port 0 picks a fresh port each time, so repeating it is no clash.
        if addr.port() != 0 && seen.contains(addr) {
            r.problem(*line, format!("listener {addr} appears twice {}", s.place));
        }
        seen.push(*addr);
    }

    let hostname = r
        .word(s, "hostname", &raw.hostname)
        .unwrap_or(defaults.hostname);

    let cert = r.existing_file(s, "tls_cert", &raw.tls_cert);
    let key = r.existing_file(s, "tls_key", &raw.tls_key);
    let (has_cert, has_key) = (s.has("tls_cert"), s.has("tls_key"));
    if has_cert != has_key {
        let (given, missing) = if has_cert {
            ("tls_cert", "tls_key")
        } else {
            ("tls_key", "tls_cert")
        };
        let line = r.key_line(s, given);
        r.problem(line, format!("{given:?} {} needs {missing:?} too", s.place));
    }
    let tls_configured = has_cert && has_key;
    if !tls_listen.is_empty() && !tls_configured {
        let line = r.key_line(s, "tls_listen");
        r.problem(
            line,
            format!("\"tls_listen\" {} needs tls_cert and tls_key", s.place),
        );
    }
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };

    let max_message_size = r
        .size(s, "max_message_size", &raw.max_message_size)
        .unwrap_or(defaults.max_message_size);
    let max_recipients = r
        .count_usize(s, "max_recipients", &raw.max_recipients, MAX_RECIPIENTS)
        .unwrap_or(defaults.max_recipients);
    let max_connections = r
        .count_usize(s, "max_connections", &raw.max_connections, MAX_CONNECTIONS)
        .unwrap_or(defaults.max_connections);
    let delivery = r
        .choice(
            s,
            "delivery",
            &raw.delivery,
            &[
                ("queue", DeliveryMode::Queue),
                ("relay", DeliveryMode::Relay),
            ],
        )
        .unwrap_or(defaults.delivery);
    let spool_dir = match &raw.spool_dir {
        Some(dir) => r.resolve(dir.get_ref()),
        None => r.resolve(&defaults.spool_dir.to_string_lossy()),
    };

    let retry_first = r.parsed(s, "retry_first", &raw.retry_first, parse_duration);
    let retry_max = r.parsed(s, "retry_max", &raw.retry_max, parse_duration);
    if let (Some(first), Some(max)) = (retry_first, retry_max)
        && first > max
    {
        let line = raw.retry_first.as_ref().and_then(|at| r.at(at));
        r.problem(
            line,
            format!("\"retry_first\" {} is longer than retry_max", s.place),
        );
    }
    let give_up_after = r.parsed(s, "give_up_after", &raw.give_up_after, parse_duration);

    let require_auth = raw
        .require_auth
        .map_or(defaults.require_auth, Spanned::into_inner);
    let allow_networks: Vec<ipnet::IpNet> = r
        .list_of(s, "allow_networks", &raw.allow_networks, parse_network)
        .into_iter()
        .map(|(net, _)| net)
        .collect();
    // An explicit but empty list still means "any network": only entries restrict.
    // (A list whose entries are all malformed is reported on its own.)
    if !require_auth && !s.has_nonempty_list("allow_networks") {
        for (addr, line) in listen.iter().chain(&tls_listen) {
            if !addr.ip().is_loopback() {
                let message = format!(
                    "listener {addr} is not on loopback and anyone could relay through it: set require_auth = true or allow_networks = [...] in [server]"
                );
                r.problem(*line, message);
            }
        }
    }
    let check_header_from = raw
        .check_header_from
        .map_or(defaults.check_header_from, Spanned::into_inner);
    let bare_lf = r
        .choice(
            s,
            "bare_lf",
            &raw.bare_lf,
            &[("normalize", BareLf::Normalize), ("reject", BareLf::Reject)],
        )
        .unwrap_or(defaults.bare_lf);
    let idle_timeout = r
        .parsed(s, "idle_timeout", &raw.idle_timeout, parse_duration)
        .unwrap_or(defaults.idle_timeout);
    let max_header_size = r
        .size(s, "max_header_size", &raw.max_header_size)
        .unwrap_or(defaults.max_header_size);
    let max_connections_per_client = r
        .count_usize(
            s,
            "max_connections_per_client",
            &raw.max_connections_per_client,
            MAX_CONNECTIONS_PER_CLIENT,
        )
        .unwrap_or(defaults.max_connections_per_client);
    let shutdown_grace = r
        .parsed(s, "shutdown_grace", &raw.shutdown_grace, parse_duration)
        .unwrap_or(defaults.shutdown_grace);
    // Empty (the shipped default) leaves the choice to the environment.
    let https_proxy = r.parsed(s, "https_proxy", &raw.https_proxy, |text| {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            crate::http::ProxyUrl::parse(text).map(Some)
        }
    });

    Server {
        listen: listen.into_iter().map(|(a, _)| a).collect(),
        tls_listen: tls_listen.into_iter().map(|(a, _)| a).collect(),
        hostname,
        tls,
        max_message_size,
        max_recipients,
        max_connections,
        delivery,
        spool_dir,
        retry_first: retry_first.unwrap_or(defaults.retry_first),
        retry_max: retry_max.unwrap_or(defaults.retry_max),
        give_up_after: give_up_after.unwrap_or(defaults.give_up_after),
        require_auth,
        allow_networks,
        check_header_from,
        bare_lf,
        idle_timeout,
        max_header_size,
        max_connections_per_client,
        shutdown_grace,
        https_proxy: https_proxy.flatten(),
    }
}
