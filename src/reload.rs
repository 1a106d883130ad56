//! SIGHUP: the config file is read again and, when valid, put in force (SPEC §8).
//!
//! - A config with problems is refused: every problem is logged (the lines `check`
//!   prints) and the running config stays.
//! - Sessions in flight keep the config they began with (they hold its
//!   [`SessionCtx`](crate::smtp::session::SessionCtx)); new sessions get the new one.
//! - Channels: an added one gets a worker, a removed one's worker stops (its queued mail
//!   stays in the spool, untouched), a changed one (transport or limits) is restarted with
//!   a new connection pool; an unchanged one keeps running, counters and pool included.
//!   A broken channel is tried again.
//! - The listeners' certificate and key are read again (a renewed certificate is served to
//!   new connections). What is bound at start-up (listen addresses, the spool, the
//!   delivery mode, the connection limits, the metrics listener) needs a restart: a
//!   change is logged and the running value kept.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ChannelKind, Config};
use crate::listener::Live;
use crate::queue::ChannelChanges;

/// What a reload put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// How the channels changed.
    pub changes: ChannelChanges,
    /// Settings that changed in the file but need a restart (their running values stay).
    pub need_restart: Vec<&'static str>,
}

/// Pure: which channels of `new` are added, removed, changed or unchanged from `old`. A
/// channel is changed when its transport or limits differ (its scope only routes: that
/// takes effect for new sessions without touching the worker), for an SMTP channel when
/// the `hostname` it says EHLO with does, and for one that makes HTTP requests (graph, or
/// OAuth tokens) when `https_proxy` does: its new client takes the new proxy.
pub fn diff_channels(old: &Config, new: &Config) -> ChannelChanges {
    let mut changes = ChannelChanges::default();
    let hostname_changed = old.server.hostname != new.server.hostname;
    let proxy_changed = old.server.https_proxy != new.server.https_proxy;
    for channel in &new.channels {
        match old.channel_id(&channel.name).map(|id| &old.channels[id]) {
            None => changes.added.push(channel.name.clone()),
            Some(before) => {
                let smtp = matches!(channel.kind, ChannelKind::Smtp(_));
                let http =
                    matches!(channel.kind, ChannelKind::Graph(_)) || channel.kind.oauth().is_some();
                if before.kind != channel.kind
                    || before.limits != channel.limits
                    || (smtp && hostname_changed)
                    || (http && proxy_changed)
                {
                    changes.changed.push(channel.name.clone());
                } else {
                    changes.unchanged.push(channel.name.clone());
                }
            }
        }
    }
    changes.removed = old
        .channels
        .iter()
        .filter(|c| new.channel_id(&c.name).is_none())
        .map(|c| c.name.clone())
        .collect();
    changes
}

/// Pure: the settings fixed at start-up that differ in `new` are set back to the running
/// ones in `new`; returns their names (for the log).
pub fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let (old, server) = (&running.server, &mut new.server);
    let restored = [
        ("listen", restore(&old.listen, &mut server.listen)),
        (
            "tls_listen",
            restore(&old.tls_listen, &mut server.tls_listen),
        ),
        ("delivery", restore(&old.delivery, &mut server.delivery)),
        ("spool_dir", restore(&old.spool_dir, &mut server.spool_dir)),
        (
            "max_connections",
            restore(&old.max_connections, &mut server.max_connections),
        ),
        (
            "max_connections_per_client",
            restore(
                &old.max_connections_per_client,
                &mut server.max_connections_per_client,
            ),
        ),
        // The metrics server holds its address, allow_networks and status_page.
        ("[metrics]", restore(&running.metrics, &mut new.metrics)),
        // The queue and the relay limits hold their backend (and its connection) for the
        // life of the process.
        ("[state]", restore(&running.state, &mut new.state)),
    ];
    restored
        .into_iter()
        .filter_map(|(name, differed)| differed.then_some(name))
        .collect()
}

/// Sets `new` back to `running` when they differ; says whether they did.
fn restore<T: PartialEq + Clone>(running: &T, new: &mut T) -> bool {
    let differs = running != new;
    if differs {
        new.clone_from(running);
    }
    differs
}

/// Reads the config file the running one came from and puts it in force. `Err` holds
/// every problem, one line each (`path:line: message`, as `check` prints them); then
/// nothing changed.
pub async fn reload(live: &Live, shutdown: &CancellationToken) -> Result<Reloaded, Vec<String>> {
    let running = live.current();
    let path = running.config.path.clone();
    let mut config = crate::config::load(&path).map_err(|errors| {
        errors
            .to_string()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    })?;
    let need_restart = keep_restart_only(&running.config, &mut config);
    let changes = diff_channels(&running.config, &config);
    let config = Arc::new(config);
    let at = |e: String| vec![format!("{}: {e}", path.display())];
    // Everything that can fail is built before anything changes.
    let next = running
        .delivery
        .reload(config.clone(), &changes)
        .map_err(at)?;
    let ctx = crate::listener::session_ctx(
        config,
        Arc::new(next),
        shutdown.clone(),
        running.failed_logins.clone(),
    )
    .map_err(at)?;
    let next = ctx.delivery.clone();
    let config = ctx.config.clone();
    live.replace(ctx);
    running.delivery.apply(&next, &changes).await;
    crate::metrics::global().declare_channels(&config);
    crate::metrics::status::configure(&config);
    Ok(Reloaded {
        changes,
        need_restart,
    })
}

/// Installs the SIGHUP handler now (before the listeners are bound, so a SIGHUP is never
/// the default "terminate"); the returned future reloads on each SIGHUP until `shutdown`.
pub fn on_sighup(
    live: Arc<Live>,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + Send + 'static, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = hup.recv() => if received.is_none() { return },
            }
            let path = live.current().config.path.clone();
            tracing::info!("SIGHUP: reloading {}", path.display());
            let outcome = reload(&live, &shutdown).await;
            log_outcome(&path, &live, outcome).await;
        }
    })
}

async fn log_outcome(path: &Path, live: &Live, outcome: Result<Reloaded, Vec<String>>) {
    let file = path.display();
    let reloaded = match outcome {
        Ok(reloaded) => reloaded,
        Err(problems) => {
            for problem in &problems {
                tracing::error!("{problem}");
            }
            let n = problems.len();
            let s = if n == 1 { "" } else { "s" };
            tracing::error!("reload refused: {n} problem{s} in {file}; the running config stays");
            return;
        }
    };
    for warning in &live.current().config.warnings {
        tracing::warn!(line = warning.line, "{file}: {}", warning.message);
    }
    for setting in &reloaded.need_restart {
        tracing::warn!(
            "reload: {setting} changed in {file}; it takes effect after a restart (the running value stays)"
        );
    }
    let ChannelChanges {
        added,
        removed,
        changed,
        unchanged,
    } = &reloaded.changes;
    tracing::info!(
        added = ?added,
        removed = ?removed,
        changed = ?changed,
        unchanged = unchanged.len(),
        "config reloaded from {file}"
    );
    if removed.is_empty() {
        return;
    }
    let config = live.current().config.clone();
    let waiting = tokio::task::spawn_blocking(move || crate::queue::admin::unconfigured(&config))
        .await
        .unwrap_or_default();
    for (channel, messages) in waiting {
        tracing::warn!(
            channel,
            messages,
            "reload: channel removed while mail for it is queued; it stays in the spool until the channel is configured again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeliveryMode, Rate, TlsMode};
    use crate::testkit::config::{channel, config, smtp_target};

    fn smtp(name: &str, port: u16) -> crate::config::Channel {
        channel(name, ChannelKind::Smtp(smtp_target(port, TlsMode::None)), 2)
    }

    fn file(name: &str) -> crate::config::Channel {
        channel(
            name,
            ChannelKind::File {
                dir: format!("out-{name}").into(),
            },
            1,
        )
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_diff_sorts_channels_into_added_removed_changed_unchanged() {
        let old = config(vec![smtp("a", 1), smtp("b", 2), file("c"), file("d")]);
        let mut limited = file("d");
        limited.limits.rate = Some(Rate {
            count: 5,
            per: std::time::Duration::from_secs(60),
        });
        let mut rescoped = smtp("a", 1);
        rescoped.scope = vec![crate::config::SenderPattern::Any];
        let new = config(vec![rescoped, smtp("b", 3), limited, file("e")]);
        let changes = diff_channels(&old, &new);
        assert_eq!(changes.added, names(&["e"]));
        assert_eq!(changes.removed, names(&["c"]));
        assert_eq!(changes.changed, names(&["b", "d"]), "port, limits");
        assert_eq!(changes.unchanged, names(&["a"]), "a scope only routes");
        assert_eq!(
            diff_channels(&old, &old).unchanged,
            names(&["a", "b", "c", "d"])
        );
    }

    #[test]
    fn a_new_password_or_hostname_restarts_smtp_channels_only() {
        let old = config(vec![smtp("a", 1), file("f")]);
        let mut new = old.clone();
        if let ChannelKind::Smtp(t) = &mut new.channels[0].kind {
            t.password = Some(crate::config::Secret::new("changed"));
        }
        assert_eq!(diff_channels(&old, &new).changed, names(&["a"]));
        let mut renamed = old.clone();
        renamed.server.hostname = "mx.example.net".into();
        let changes = diff_channels(&old, &renamed);
        assert_eq!(changes.changed, names(&["a"]));
        assert_eq!(changes.unchanged, names(&["f"]));
    }

    #[test]
    fn a_new_https_proxy_restarts_the_channels_that_make_http_requests() {
        let graph = crate::testkit::config::graph_channel(
            "g",
            "dave@example.com",
            "http://127.0.0.1:1",
            "http://127.0.0.1:2/token",
        );
        let old = config(vec![smtp("a", 1), graph, file("f")]);
        let mut new = old.clone();
        new.server.https_proxy = Some(crate::http::ProxyUrl::parse("http://proxy:3128").unwrap());
        let changes = diff_channels(&old, &new);
        assert_eq!(changes.changed, names(&["g"]));
        assert_eq!(changes.unchanged, names(&["a", "f"]));
        assert!(
            keep_restart_only(&old, &mut new.clone()).is_empty(),
            "applied live"
        );
    }

    #[test]
    fn settings_bound_at_start_keep_their_running_values() {
        let running = config(vec![]);
        let mut new = running.clone();
        new.server.listen = vec!["127.0.0.1:2600".parse().unwrap()];
        new.server.delivery = match running.server.delivery {
            DeliveryMode::Queue => DeliveryMode::Relay,
            DeliveryMode::Relay => DeliveryMode::Queue,
        };
        new.server.max_connections += 1;
        new.server.max_message_size += 1;
        new.metrics = Some(crate::config::Metrics::on(vec![
            "127.0.0.1:9325".parse().unwrap(),
        ]));
        let kept = keep_restart_only(&running, &mut new);
        assert_eq!(
            kept,
            vec!["listen", "delivery", "max_connections", "[metrics]"]
        );
        assert_eq!(new.metrics, running.metrics);
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(new.server.delivery, running.server.delivery);
        assert_eq!(new.server.max_connections, running.server.max_connections);
        assert_eq!(
            new.server.max_message_size,
            running.server.max_message_size + 1,
            "applied live"
        );
        assert!(keep_restart_only(&running, &mut running.clone()).is_empty());
    }
}
