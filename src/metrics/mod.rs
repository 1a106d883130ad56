//! Below the flow: the process's Prometheus metrics (SPEC §8) and, in [`server`], the
//! HTTP listener that serves them with `/healthz` and the status page ([`status`]: its
//! facts, [`page`]: its HTML).
//!
//! One registry per process ([`global`]): the places where things happen (the session,
//! relay delivery, the queue's workers and attempts, the OAuth token cache) count into
//! it through the free functions here, as they log, without a handle threaded through
//! every constructor. Counting is a few atomic operations; with no `[metrics]` section
//! nothing is served, and the counts cost next to nothing.
//!
//! What each series means (the README's Metrics section says the same for operators):
//!
//! - `mailgate_messages_total{channel,outcome}`: `accepted` and `refused` are the final
//!   replies clients got for a message (250 vs. a refusal at MAIL FROM or after DATA;
//!   refusals at MAIL FROM, before any channel is chosen, carry `channel=""`);
//!   `delivered`, `deferred` and `failed` are upstream outcomes: in queue mode one per
//!   message that left the spool delivered, one per attempt that left a message queued,
//!   one per message moved to `failed/`; in relay mode one per upstream answer (250,
//!   temporary, permanent). DSNs mailgate sends count as messages of their channel.
//! - `mailgate_queue_messages{channel}`: messages queued for the channel (queue mode),
//!   DSNs included, attempts in flight included.
//! - `mailgate_channel_state{channel,state}`: 1 for the current one of `ok`, `limited`
//!   (held for a provider quota, or waiting for its own rate/quota window), `broken`.
//! - `mailgate_delivery_seconds{channel}`: how long each upstream transaction took,
//!   whatever its outcome.
//! - `mailgate_oauth_token_refreshes_total{channel,result}`: token-endpoint requests;
//!   `ok`, `error` (temporary: unreachable, 5xx) or `rejected` (the grant was refused:
//!   the channel is broken).
//! - `mailgate_rewrites_total{sender}`: transactions whose envelope sender a `[[rewrite]]`
//!   entry replaced (SPEC §4a), by the entry's `sender`.

pub mod page;
pub mod server;
pub mod status;

use std::collections::BTreeSet;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::{Config, DeliveryMode};

/// Every metric name served, for the dashboard test and the README.
pub const NAMES: &[&str] = &[
    "mailgate_messages_total",
    "mailgate_queue_messages",
    "mailgate_channel_state",
    "mailgate_delivery_seconds",
    "mailgate_oauth_token_refreshes_total",
    "mailgate_rewrites_total",
];

/// Upper bounds of the delivery-time buckets, in seconds: from a loopback relay (ms) to
/// a large message over a slow link (minutes).
const DELIVERY_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The `outcome` of `mailgate_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client heard 250 for the message.
    Accepted,
    /// The client heard a refusal at MAIL FROM or after DATA.
    Refused,
    /// The upstream took it.
    Delivered,
    /// Temporarily not delivered: it stays queued (queue mode) or the client retries (relay).
    Deferred,
    /// Permanently not delivered (queue mode: moved to `failed/`).
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Accepted,
        Outcome::Refused,
        Outcome::Delivered,
        Outcome::Deferred,
        Outcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Failed => "failed",
        }
    }
}

/// The `state` of `mailgate_channel_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Delivering.
    Ok,
    /// Held for a provider quota, or waiting for its own limits.
    Limited,
    /// Credentials refused.
    Broken,
}

impl ChannelState {
    const ALL: [ChannelState; 3] = [
        ChannelState::Ok,
        ChannelState::Limited,
        ChannelState::Broken,
    ];

    fn label(self) -> &'static str {
        match self {
            ChannelState::Ok => "ok",
            ChannelState::Limited => "limited",
            ChannelState::Broken => "broken",
        }
    }
}

/// The `result` of `mailgate_oauth_token_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// A token was issued.
    Ok,
    /// Temporary: the endpoint was unreachable or answered 5xx.
    Error,
    /// The grant was refused (`invalid_grant`, …): the channel is broken.
    Rejected,
}

impl Refresh {
    fn label(self) -> &'static str {
        match self {
            Refresh::Ok => "ok",
            Refresh::Error => "error",
            Refresh::Rejected => "rejected",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    channel: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    channel: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SenderLabel {
    sender: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    channel: String,
    result: &'static str,
}

type HistogramFamily = Family<ChannelLabel, Histogram, fn() -> Histogram>;

/// One registry and its metric families.
pub struct Metrics {
    registry: Registry,
    messages: Family<OutcomeLabels, Counter>,
    queued: Family<ChannelLabel, Gauge>,
    state: Family<StateLabels, Gauge>,
    delivery: HistogramFamily,
    refreshes: Family<RefreshLabels, Counter>,
    rewrites: Family<SenderLabel, Counter>,
    /// Channels that have gauge series (the families do not list their label sets).
    gauge_channels: Mutex<BTreeSet<String>>,
    /// Channels a reload removed: their gauges stay gone, whatever a session begun before
    /// the reload or a stopping worker still reports for them.
    removed: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let messages = Family::<OutcomeLabels, Counter>::default();
        // prometheus-client adds `_total` to counters.
        registry.register(
            "mailgate_messages",
            "Messages by channel and outcome (accepted/refused: the client's reply; delivered/deferred/failed: the upstream's)",
            messages.clone(),
        );
        let queued = Family::<ChannelLabel, Gauge>::default();
        registry.register(
            "mailgate_queue_messages",
            "Messages queued per channel (queue mode)",
            queued.clone(),
        );
        let state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "mailgate_channel_state",
            "1 for the channel's current state (ok, limited, broken), 0 for the others",
            state.clone(),
        );
        let delivery: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS));
        registry.register(
            "mailgate_delivery_seconds",
            "Duration of each upstream transaction, whatever its outcome",
            delivery.clone(),
        );
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "mailgate_oauth_token_refreshes",
            "OAuth token-endpoint requests by channel and result (ok, error, rejected)",
            refreshes.clone(),
        );
        let rewrites = Family::<SenderLabel, Counter>::default();
        registry.register(
            "mailgate_rewrites",
            "Envelope senders replaced by a [[rewrite]] entry, by the entry's sender",
            rewrites.clone(),
        );
        Metrics {
            registry,
            rewrites,
            messages,
            queued,
            state,
            delivery,
            refreshes,
            gauge_channels: Mutex::default(),
            removed: Mutex::default(),
        }
    }

    /// Creates the series of every configured channel (at zero, state `ok`) so that a
    /// dashboard shows zeros rather than gaps, and drops the gauges of channels no longer
    /// configured (counters stay: they are totals since the start).
    pub fn declare_channels(&self, config: &Config) {
        // A set: a config may hold 10,000 channels, and each gauge is looked up here.
        let names: std::collections::HashSet<&str> =
            config.channels.iter().map(|c| c.name.as_str()).collect();
        // Gauges of channels that are gone would keep showing their last value.
        let gone: Vec<String> = lock(&self.gauge_channels)
            .extract_if(.., |n| !names.contains(&n.as_str()))
            .collect();
        {
            let mut removed = lock(&self.removed);
            removed.retain(|n| !names.contains(&n.as_str()));
            removed.extend(gone.iter().cloned());
        }
        for channel in gone {
            self.queued.remove(&ChannelLabel {
                channel: channel.clone(),
            });
            for state in ChannelState::ALL {
                self.state.remove(&StateLabels {
                    channel: channel.clone(),
                    state: state.label(),
                });
            }
        }
        for channel in &config.channels {
            // A reload keeps the state a channel is in.
            if !lock(&self.gauge_channels).contains(&channel.name) {
                self.channel_state(&channel.name, ChannelState::Ok);
            }
            for outcome in Outcome::ALL {
                drop(self.messages.get_or_create(&OutcomeLabels {
                    channel: channel.name.clone(),
                    outcome: outcome.label(),
                }));
            }
            if config.server.delivery == DeliveryMode::Queue {
                let _ = self.note_gauge(&channel.name);
                drop(self.queued.get_or_create(&ChannelLabel {
                    channel: channel.name.clone(),
                }));
            }
            drop(self.delivery.get_or_create(&ChannelLabel {
                channel: channel.name.clone(),
            }));
        }
    }

    /// Notes that `channel` has gauges; false for a channel a reload removed (its gauges
    /// are not set again).
    fn note_gauge(&self, channel: &str) -> bool {
        if lock(&self.removed).contains(channel) {
            return false;
        }
        let mut known = lock(&self.gauge_channels);
        if !known.contains(channel) {
            known.insert(channel.to_string());
        }
        true
    }

    /// Counts one message outcome on `channel` (`""`: no channel was chosen).
    pub fn message(&self, channel: &str, outcome: Outcome) {
        self.messages
            .get_or_create(&OutcomeLabels {
                channel: channel.to_string(),
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Counts one envelope sender replaced by a `[[rewrite]]` entry whose sender is `sender`.
    pub fn rewrite(&self, sender: &str) {
        self.rewrites
            .get_or_create(&SenderLabel {
                sender: sender.to_string(),
            })
            .inc();
    }

    /// Sets the number of messages queued for `channel`.
    pub fn queued(&self, channel: &str, messages: usize) {
        if !self.note_gauge(channel) {
            return;
        }
        self.queued
            .get_or_create(&ChannelLabel {
                channel: channel.to_string(),
            })
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
    }

    /// Sets the current state of `channel`: 1 for it, 0 for the others.
    pub fn channel_state(&self, channel: &str, current: ChannelState) {
        if !self.note_gauge(channel) {
            return;
        }
        for state in ChannelState::ALL {
            self.state
                .get_or_create(&StateLabels {
                    channel: channel.to_string(),
                    state: state.label(),
                })
                .set(i64::from(state == current));
        }
    }

    /// Records how long one upstream transaction over `channel` took.
    pub fn delivery_time(&self, channel: &str, took: Duration) {
        self.delivery
            .get_or_create(&ChannelLabel {
                channel: channel.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts one token-endpoint request for `channel`.
    pub fn token_refresh(&self, channel: &str, result: Refresh) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                channel: channel.to_string(),
                result: result.label(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers that do not ask for
    /// OpenMetrics.
    pub fn prometheus_text(&self) -> String {
        to_prometheus_text(&self.openmetrics())
    }
}

/// OpenMetrics → Prometheus text 0.0.4. The two differ, for what this registry holds, in
/// two things: a counter's family is named with its `_total` suffix in `# HELP`/`# TYPE`
/// (OpenMetrics names it without, its samples with), and there is no `# EOF` line.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's registry.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// [`Metrics::message`] on the process's registry.
pub fn message(channel: &str, outcome: Outcome) {
    global().message(channel, outcome);
}

/// [`Metrics::rewrite`] on the process's registry.
pub fn rewrite(sender: &str) {
    global().rewrite(sender);
}

/// [`Metrics::queued`] on the process's registry.
pub fn queued(channel: &str, messages: usize) {
    global().queued(channel, messages);
}

/// [`Metrics::channel_state`] on the process's registry.
pub fn channel_state(channel: &str, state: ChannelState) {
    global().channel_state(channel, state);
    status::board().note_state(channel, state);
}

/// [`Metrics::delivery_time`] on the process's registry.
pub fn delivery_time(channel: &str, took: Duration) {
    global().delivery_time(channel, took);
}

/// [`Metrics::token_refresh`] on the process's registry.
pub fn token_refresh(channel: &str, result: Refresh) {
    global().token_refresh(channel, result);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChannelKind;
    use crate::testkit::config::{channel, config};

    fn sample<'t>(text: &'t str, series: &str) -> Option<&'t str> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn counters_are_typed_under_their_total_name_in_prometheus_text() {
        let m = Metrics::new();
        m.message("out", Outcome::Accepted);
        m.message("out", Outcome::Accepted);
        m.message("", Outcome::Refused);
        m.token_refresh("ms", Refresh::Rejected);
        m.delivery_time("out", Duration::from_millis(5));
        let text = m.prometheus_text();
        assert!(
            text.contains("# TYPE mailgate_messages_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP mailgate_messages_total "), "{text}");
        assert!(text.contains("# TYPE mailgate_oauth_token_refreshes_total counter\n"));
        assert!(
            text.contains("# TYPE mailgate_delivery_seconds histogram\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert_eq!(
            sample(
                &text,
                r#"mailgate_messages_total{channel="out",outcome="accepted"}"#
            ),
            Some("2")
        );
        assert_eq!(
            sample(
                &text,
                r#"mailgate_messages_total{channel="",outcome="refused"}"#
            ),
            Some("1")
        );
        let om = m.openmetrics();
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE mailgate_messages counter\n"));
    }

    #[test]
    fn the_exposition_holds_exactly_the_spec_names() {
        let m = Metrics::new();
        m.message("a", Outcome::Delivered);
        m.queued("a", 1);
        m.channel_state("a", ChannelState::Ok);
        m.delivery_time("a", Duration::from_millis(1));
        m.token_refresh("a", Refresh::Ok);
        m.rewrite("scans@example.com");
        let text = m.prometheus_text();
        assert!(text.contains("mailgate_rewrites_total{sender=\"scans@example.com\"} 1"));
        let mut served: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(|name| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| base.ends_with("_seconds"))
                    .unwrap_or(name)
            })
            .collect();
        served.sort_unstable();
        served.dedup();
        let mut names = NAMES.to_vec();
        names.sort_unstable();
        assert_eq!(served, names);
    }

    #[test]
    fn channel_state_has_exactly_one_current_state() {
        let m = Metrics::new();
        m.channel_state("a", ChannelState::Broken);
        m.channel_state("a", ChannelState::Limited);
        let text = m.prometheus_text();
        let state = |s: &str| {
            sample(
                &text,
                &format!(r#"mailgate_channel_state{{channel="a",state="{s}"}}"#),
            )
        };
        assert_eq!(
            (state("ok"), state("limited"), state("broken")),
            (Some("0"), Some("1"), Some("0"))
        );
    }

    #[test]
    fn declared_channels_start_at_zero_and_removed_ones_lose_their_gauges() {
        let m = Metrics::new();
        let out = |name: &str| channel(name, ChannelKind::File { dir: "x".into() }, 1);
        let mut cfg = config(vec![out("a"), out("b\"q")]);
        cfg.server.delivery = DeliveryMode::Queue;
        m.declare_channels(&cfg);
        m.queued("a", 3);
        m.channel_state("a", ChannelState::Broken);
        let text = m.prometheus_text();
        assert_eq!(
            sample(
                &text,
                r#"mailgate_messages_total{channel="a",outcome="failed"}"#
            ),
            Some("0")
        );
        assert_eq!(
            sample(&text, r#"mailgate_queue_messages{channel="b\"q"}"#),
            Some("0")
        );
        assert_eq!(
            sample(&text, r#"mailgate_delivery_seconds_count{channel="a"}"#),
            Some("0")
        );
        // Declaring again (a reload) keeps the current state.
        m.declare_channels(&cfg);
        let text = m.prometheus_text();
        assert_eq!(
            sample(
                &text,
                r#"mailgate_channel_state{channel="a",state="broken"}"#
            ),
            Some("1")
        );
        let cfg = {
            let mut c = config(vec![out("a")]);
            c.server.delivery = DeliveryMode::Queue;
            c
        };
        m.declare_channels(&cfg);
        let text = m.prometheus_text();
        assert!(
            !text.contains(r#"mailgate_queue_messages{channel="b\"q"}"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"mailgate_channel_state{channel="b\"q""#),
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"mailgate_queue_messages{channel="a"}"#),
            Some("3")
        );
    }

    /// Relay mode: a session begun before the reload that removed its channel still
    /// reports the channel's state; the removed channel's gauges stay gone, and come back
    /// with the channel.
    #[test]
    fn a_removed_channel_gets_no_gauges_from_sessions_begun_before_the_reload() {
        let m = Metrics::new();
        let out = |name: &str| channel(name, ChannelKind::File { dir: "x".into() }, 1);
        m.declare_channels(&config(vec![out("a"), out("b")]));
        m.declare_channels(&config(vec![out("a")]));
        m.channel_state("b", ChannelState::Broken);
        m.queued("b", 2);
        let text = m.prometheus_text();
        assert!(!text.contains(r#"channel="b",state"#), "{text}");
        assert!(
            !text.contains(r#"mailgate_queue_messages{channel="b"}"#),
            "{text}"
        );
        m.declare_channels(&config(vec![out("a"), out("b")]));
        m.channel_state("b", ChannelState::Limited);
        let text = m.prometheus_text();
        assert_eq!(
            sample(
                &text,
                r#"mailgate_channel_state{channel="b",state="limited"}"#
            ),
            Some("1")
        );
    }

    #[test]
    fn delivery_times_fall_in_their_buckets() {
        let m = Metrics::new();
        m.delivery_time("a", Duration::from_millis(30));
        m.delivery_time("a", Duration::from_secs(400));
        let text = m.prometheus_text();
        let bucket = |le: &str| {
            sample(
                &text,
                &format!(r#"mailgate_delivery_seconds_bucket{{le="{le}",channel="a"}}"#),
            )
        };
        assert_eq!(bucket("0.025"), Some("0"), "{text}");
        assert_eq!(bucket("0.05"), Some("1"));
        assert_eq!(bucket("300.0"), Some("1"));
        assert_eq!(bucket("+Inf"), Some("2"));
        assert_eq!(
            sample(&text, r#"mailgate_delivery_seconds_count{channel="a"}"#),
            Some("2")
        );
    }
}
