//! `[metrics]`: where the Prometheus text (`/metrics`) and the health check (`/healthz`)
//! are served. Optional; absent means no HTTP listener at all.

use std::net::SocketAddr;

use serde_spanned::Spanned;

use super::Metrics;
use super::reader::{Expect, Keys, Reader, Section};
use super::values::parse_listen;

/// `[metrics]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

pub(super) const METRICS_KEYS: Keys = &[("listen", Expect::Str)];

/// Reads and validates `[metrics]`. `smtp` are the SMTP listeners already read: the
/// metrics address may not be one of them. A non-loopback address is allowed (a
/// Prometheus on another host must reach it); the README says it has no authentication.
pub(super) fn read(r: &mut Reader, s: &Section, smtp: &[SocketAddr]) -> Option<Metrics> {
    let raw: RawMetrics = r.read(s, METRICS_KEYS);
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
    (!clash).then_some(Metrics { listen })
}
