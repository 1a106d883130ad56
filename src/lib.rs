//! mailgate: a local SMTP submission proxy.
//!
//! Clients (mail programs, scripts, printers) submit to `localhost:2525`; mailgate
//! reads each message's envelope sender and forwards the message over the one
//! upstream *channel* that sender is authorized for. See `README.md` and `docs/` for operation
//! and `../shared/SPEC.md` for the contract.
//!
//! # Layout
//!
//! Data flows one way, top to bottom:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | command line (clap), subcommand dispatch |
//! | [`config`] | `proxy.toml` → validated [`config::Config`]; [`config::Secret`]; presets; the channel index routing looks senders up in ([`config::index`]) |
//! | [`listener`] | accept loop, connection limit, allow-list, TLS acceptors, graceful shutdown |
//! | [`tls`] | rustls server config, `cert generate` |
//! | [`smtp`] | the SMTP server: [`smtp::session`] state machine (read/write loop, one file per verb group), [`smtp::data`] DATA/BDAT decoder, [`smtp::reply`] catalogue, [`smtp::auth`] client AUTH |
//! | [`message`] | the envelope of a message, message ids, the recipient headers and the Graph `Bcc:` completion, the `From:` rewrite and the Graph From repair |
//! | [`rewrite`] | pure: the `[[rewrite]]` entry that gives a legacy envelope sender a real one at MAIL FROM, before routing (the header side is [`message::rewrite`]) |
//! | [`routing`] | pure: envelope + headers → channel or a [`routing::Refusal`] (the session words it from the catalogue) |
//! | [`scope`] | pure: sender-scope patterns: does one take an address, how specific is it (routing and the queue) |
//! | [`ratelimit`] | pure: per-channel message rate and recipients/day windows |
//! | [`delivery`] | takes a message from the session: relay mode forwards it now, queue mode spools it; the client's reply |
//! | [`upstream`] | channel transports: pooled SMTP (lettre), Microsoft Graph (`sendMail`, or draft + upload session for messages over 3,000,000 bytes) and the `file` drop; [`upstream::Error`] and its SPEC §7 class |
//! | [`reload`] | SIGHUP: re-reads the config, swaps it in for new sessions, starts/stops/restarts channel workers |
//! | [`sendmail`] | `mailgate sendmail`: the `/usr/sbin/sendmail` interface, an SMTP client of the running proxy |
//! | [`oauth`] | OAuth 2.0 access tokens per channel (cache, refresh, rotation), XOAUTH2, `oauth authorize` |
//! | [`queue`] | queue mode: the spool on disk and its commit log (group commit of small messages), per-channel workers (limits, retries, credential health), DSNs, `mailgate queue` |
//! | [`metrics`] | below the flow: the Prometheus registry every stage counts into; its HTTP server (`/metrics`, `/healthz`, the status page `/` and `/status.json`); the status board (channel facts, queue counts, the last 100 outcomes) and its maud view |
//! | [`state`] | below the flow: channel health, rate/quota counters and stored tokens: files beside the spool, or one Redis shared by several hosts (`[state]`); `state export`/`import` |
//! | [`http`] | below the flow: the one builder of outbound HTTP clients (token endpoints, Graph) and its proxy choice (`[server] https_proxy`, else the environment as curl reads it); every answer read with a size limit, endpoint durations clamped |
//! | [`fsutil`] | below the flow: atomic file writes (tmp, fsync, rename, fsync dir; mode 0600) |
//! | [`unwind`] | below the flow: a panic in one delivery contained to an error of that delivery |
//! | [`text`] | below the flow: outside text made safe to print (control characters escaped) |
//! | `testkit` | test fixtures (feature `testkit`): fake SMTP upstream, local OAuth token endpoint, Microsoft Graph stand-in, test PKI, a real `redis-server` on a free port, config builders |
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod delivery;
pub mod fsutil;
pub mod http;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod oauth;
pub mod queue;
pub mod ratelimit;
pub mod reload;
pub mod reply;
pub mod rewrite;
pub mod routing;
pub mod scope;
pub mod sendmail;
pub mod smtp;
pub mod state;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod text;
pub mod tls;
pub mod unwind;
pub mod upstream;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Runs the proxy on `config` until `shutdown` is cancelled: binds the listeners,
/// serves sessions, reloads the config file on SIGHUP, and on shutdown lets the
/// sessions in flight finish.
pub async fn run(config: Arc<config::Config>, shutdown: CancellationToken) -> Result<(), String> {
    tls::install_crypto_provider();
    metrics::global().declare_channels(&config);
    metrics::status::configure(&config);
    let delivery = Arc::new(delivery::Delivery::new(config.clone())?);
    let live = Arc::new(listener::Live::new(
        config.clone(),
        delivery.clone(),
        shutdown.clone(),
    )?);
    let reloads = tokio::spawn(reload::on_sighup(live.clone(), shutdown.clone())?);
    let listeners = listener::bind(&config).await?;
    // Served until the very end, so that /healthz says 503 while sessions drain.
    let mut health = metrics::server::Health::new(&config.server.spool_dir);
    if let state::Backend::Redis(redis) = state::Backend::of(&config)? {
        health = health.with_shared_state(redis);
    }
    let health = Arc::new(health);
    let monitor = match &config.metrics {
        Some(m) => Some(metrics::server::MetricsServer::start(m, health.clone()).await?),
        None => None,
    };
    health.set_listening(true);
    health.stop_with(shutdown.clone());
    // Queue mode: the workers deliver from the spool while the listeners accept.
    let workers = {
        let (delivery, shutdown) = (delivery.clone(), shutdown.clone());
        tokio::spawn(async move { delivery.run_queue(shutdown).await })
    };
    let served = listener::serve_live(live.clone(), listeners, shutdown.clone()).await;
    shutdown.cancel();
    let _ = reloads.await;
    let _ = workers.await;
    live.current().delivery.upstreams().close_idle().await;
    if let Some(monitor) = monitor {
        monitor.stop().await;
    }
    served
}
