//! A channel task's health and the shared state: loading them when the task starts,
//! persisting health (local files on the blocking pool, or Redis), and taking what other
//! hosts did to the channel.

use std::sync::{Mutex, MutexGuard};

use super::ChannelTask;
use crate::queue::spool::now_ms;
use crate::state::shared::RedisState;
use crate::state::{Backend, Counters, Health, format_time};

/// What a channel knows of the shared state.
pub(super) struct SharedView {
    pub(super) redis: RedisState,
    /// The `queue retry` generation last seen (`None`: not read yet).
    pub(super) retry_seen: Option<u64>,
    /// A health set here that Redis has not taken yet (it was down): written before
    /// anything is read back, so a stale remote value never undoes it.
    pub(super) unsaved: Option<Health>,
}

/// The channel's health on its way to disk.
#[derive(Default)]
pub(super) struct HealthWriter {
    /// Set, not yet written.
    pub(super) latest: Mutex<Option<Health>>,
    /// Held while writing.
    pub(super) writing: Mutex<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChannelTask {
    pub(super) async fn load_state(&mut self) {
        let queue = self.queue.clone();
        let now = now_ms();
        let health = match &queue.state {
            Backend::Local(local) => local.read_health(&self.name),
            Backend::Redis(redis) => match redis.health(&self.name).await {
                Ok((health, retry)) => {
                    if let Some(view) = &mut self.shared {
                        view.retry_seen = Some(retry);
                    }
                    health
                }
                // Redis is down: every reservation waits for it anyway.
                Err(_) => Health::Ok,
            },
        };
        match health {
            Health::Broken { reason, .. } => {
                // A restart is one of the ways to resume a broken channel.
                tracing::warn!(channel = %self.name, reason, "queue: channel was broken; trying it again");
                self.set_health(Health::Ok).await;
            }
            Health::Held { until_ms, reason } if until_ms > now => {
                tracing::warn!(channel = %self.name, until = %format_time(until_ms), reason, "queue: channel held for provider quota");
                self.health = Health::Held { until_ms, reason };
            }
            _ => {}
        }
        let limits = &self.generation.config.channels[self.channel].limits;
        let Backend::Local(local) = &queue.state else {
            return; // the shared counters are asked at each reservation
        };
        match Counters::load(local, &self.name, limits, now) {
            Ok(counters) => self.counters = Some(counters),
            Err(e) => {
                // Without its counters the channel could overrun the provider's limits: stop it.
                tracing::error!(channel = %self.name, error = %e, "queue: cannot read rate counters; channel stopped");
                self.health = Health::Broken {
                    since_ms: now,
                    reason: format!("cannot read rate counters: {e}"),
                    auth_method_refused: false,
                };
            }
        }
    }

    /// Persists on the blocking pool (it fsyncs). Each write takes the latest health, under
    /// a lock held only by writers, so the file always ends with the last one set.
    pub(super) async fn set_health(&mut self, health: Health) {
        self.health = health.clone();
        if let Some(view) = &mut self.shared {
            // Awaited: the next poll must read this back, not what was there before.
            if view.redis.set_health(&self.name, &health).await.is_err() {
                view.unsaved = Some(health);
            } else {
                view.unsaved = None;
            }
            return;
        }
        let Backend::Local(local) = &self.queue.state else {
            return;
        };
        *lock(&self.health_writer.latest) = Some(health);
        let (writer, state, name) = (self.health_writer.clone(), local.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || {
            let _writing = lock(&writer.writing);
            let Some(health) = lock(&writer.latest).take() else {
                return;
            };
            if let Err(e) = state.write_health(&name, &health) {
                tracing::error!(channel = %name, error = %e, "queue: cannot persist channel state");
            }
        });
    }

    /// Shared backend: takes what other hosts did to this channel (broken, held,
    /// resumed, `queue retry`). Runs every [`SHARED_POLL`].
    pub(super) async fn sync_shared(&mut self) {
        let Some(view) = &mut self.shared else { return };
        if let Some(health) = view.unsaved.clone() {
            if view.redis.set_health(&self.name, &health).await.is_err() {
                return;
            }
            view.unsaved = None;
        }
        let Ok((remote, retry)) = view.redis.health(&self.name).await else {
            return;
        };
        let retried = view.retry_seen.is_some_and(|seen| seen != retry);
        view.retry_seen = Some(retry);
        if retried {
            // As `queue retry --all` here: resumed (Redis says so already), mail lent to
            // this channel goes back, every message is due now.
            tracing::info!(channel = %self.name, "queue: retry requested on another host");
            self.health = remote;
            self.handing_over = false;
            self.return_lent();
            self.make_due(None);
            return;
        }
        if remote != self.health {
            match &remote {
                Health::Broken {
                    reason,
                    auth_method_refused: true,
                    ..
                } if self.fallback.is_some() => {
                    tracing::error!(channel = %self.name, fallback = self.fallback.as_deref().unwrap_or(""), reason, "CHANNEL BROKEN (seen on another host): the provider refuses how this channel authenticates; its queued and new mail goes over its fallback until `mailgate queue retry --all`");
                }
                Health::Broken { reason, .. } => {
                    tracing::error!(channel = %self.name, reason, "CHANNEL BROKEN (seen on another host): its mail stays queued until `mailgate queue retry --all`");
                }
                Health::Held { until_ms, reason } => {
                    tracing::warn!(channel = %self.name, until = %format_time(*until_ms), reason, "queue: channel held for provider quota (seen on another host)");
                }
                Health::Ok => {
                    tracing::info!(channel = %self.name, "queue: channel resumed on another host");
                    self.handing_over = false;
                }
            }
            self.health = remote;
        }
        // The host that saw the refusal hands its mail over; every other host does too.
        if matches!(
            self.health,
            Health::Broken {
                auth_method_refused: true,
                ..
            }
        ) && self.fallback.is_some()
            && !self.handing_over
        {
            self.handing_over = true;
            self.hand_over_all();
        }
    }

    /// Credentials refused on a channel without a fallback to hand its mail to.
    pub(super) async fn mark_broken(&mut self, reason: String, auth_method_refused: bool) {
        if matches!(self.health, Health::Broken { .. }) {
            return;
        }
        tracing::error!(
            channel = %self.name,
            reason,
            "CHANNEL BROKEN: upstream refused the credentials; its mail stays queued until `mailgate queue retry --all`, a reload or a restart"
        );
        self.set_health(Health::Broken {
            since_ms: now_ms(),
            reason,
            auth_method_refused,
        })
        .await;
    }
}
