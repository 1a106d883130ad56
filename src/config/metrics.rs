//! `[metrics]`: where the Prometheus text (`/metrics`), the health check (`/healthz`) and
//! the status page (`/`, `/status.json`) are served, and who may ask (SPEC §8, §9).
//! Optional; absent means no HTTP listener at all.

use std::net::SocketAddr;

use serde_spanned::Spanned;

use super::Metrics;
use super::reader::{Expect, Keys, Reader, Section, Strings};
use super::values::{parse_listen, parse_network};

/// `[metrics]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
    allow_networks: Option<Strings>,
    status_page: Option<Spanned<bool>>,
}

pub(super) const METRICS_KEYS: Keys = &[
    ("listen", Expect::Str),
    ("allow_networks", Expect::Strings),
    ("status_page", Expect::Bool),
];

/// Reads and validates `[metrics]`. `smtp` are the SMTP listeners already read: the
/// metrics address may not be one of them. A non-loopback address is allowed (a
/// Prometheus on another host must reach it), but only loopback clients and
/// `allow_networks` are answered: the status page shows sender addresses.
pub(super) fn read(r: &mut Reader, s: &Section, smtp: &[SocketAddr]) -> Option<Metrics> {
    let raw: RawMetrics = r.read(s, METRICS_KEYS);
    // Read before `listen` so that every problem of the section is listed.
    let allow_networks: Vec<ipnet::IpNet> = r
        .list_of(s, "allow_networks", &raw.allow_networks, parse_network)
        .into_iter()
        .map(|(net, _)| net)
        .collect();
    let status_page = raw.status_page.is_none_or(Spanned::into_inner);
    let Some(at) = &raw.listen else {
        r.problem(
            s.line,
            r#"[metrics] needs listen, e.g. listen = "127.0.0.1:9325""#,
        );
        return None;
    };
    let line = r.at(at);
    let listen = r.parsed(s, "listen", &raw.listen, parse_listen)?;
    let mut clash = false;
    for addr in &listen {
        if addr.port() != 0 && smtp.contains(addr) {
            r.bad(
                s,
                "listen",
                line,
                format!("{addr} is also an SMTP listener in [server]"),
            );
            clash = true;
        }
    }
    (!clash).then_some(Metrics {
        listen,
        allow_networks,
        status_page,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, Problem, parse};

    const OUTBOX: &str = "[channels.outbox]\nkind = \"file\"\ndir = \"out\"\nsenders = [\"*\"]\n";

    fn read(text: &str) -> Result<Config, Vec<Problem>> {
        parse(text, Path::new("conf/proxy.toml")).map_err(|e| e.problems)
    }

    #[test]
    fn by_default_loopback_clients_only_and_the_status_page_on() {
        let config = read(&format!("{OUTBOX}[metrics]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
        let metrics = config.metrics.unwrap();
        assert!(metrics.allow_networks.is_empty());
        assert!(metrics.status_page);
    }

    #[test]
    fn allow_networks_and_status_page_are_read() {
        let config = read(&format!(
            "{OUTBOX}[metrics]\nlisten = \"0.0.0.0:9325\"\nallow_networks = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::/8\"]\nstatus_page = false\n"
        ))
        .unwrap();
        let metrics = config.metrics.unwrap();
        let nets: Vec<String> = metrics
            .allow_networks
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]);
        assert!(!metrics.status_page);
    }

    /// Every bad entry is listed with its own line, beside the section's other problems.
    #[test]
    fn bad_networks_and_a_bad_status_page_are_listed_with_their_lines() {
        let problems = read(&format!(
            "{OUTBOX}[metrics]\nlisten = \"127.0.0.1:0\"\nallow_networks = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n  \"nowhere\",\n]\nstatus_page = \"yes\"\n"
        ))
        .unwrap_err();
        let mut lines: Vec<(Option<usize>, &str)> = problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        lines.sort();
        assert_eq!(lines.len(), 3, "{problems:#?}");
        assert_eq!(lines[0].0, Some(9));
        assert!(lines[0].1.contains("\"10.0.0.0/33\""), "{lines:?}");
        assert!(lines[0].1.contains("allow_networks"), "{lines:?}");
        assert_eq!(lines[1].0, Some(10));
        assert!(lines[1].1.contains("\"nowhere\""), "{lines:?}");
        assert_eq!(lines[2].0, Some(12));
        assert!(lines[2].1.contains("status_page"), "{lines:?}");
        assert!(lines[2].1.contains("true or false"), "{lines:?}");
    }

    #[test]
    fn allow_networks_must_be_a_list_of_strings() {
        let problems = read(&format!(
            "{OUTBOX}[metrics]\nlisten = \"127.0.0.1:0\"\nallow_networks = \"10.0.0.0/8\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].line, Some(7));
        assert!(problems[0].message.contains("array"), "{problems:#?}");
    }
}
