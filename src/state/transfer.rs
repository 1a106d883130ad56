//! `mailgate state export` / `state import`: the configured backend's counters, channel
//! health and stored refresh tokens as one JSON document, so an installation moves from
//! `local` to `redis` (and back) without resetting its daily quotas.
//!
//! Import into the local backend replaces, per channel in the document, what it held; it
//! is written only while no mailgate runs on the spool (the running one would overwrite
//! it from memory). Import into Redis adds the document's sends to what is there, since
//! other hosts may be sending meanwhile: a send already counted is not counted again,
//! so importing twice counts nothing twice either way; a refresh token already in Redis
//! is kept (the other hosts may have rotated the document's since).

use std::collections::BTreeMap;
use std::fs::File;

use serde::{Deserialize, Serialize};

use super::{Backend, Health, events_text, parse_events};
use crate::config::{Config, Secret};

/// The document's `format`.
pub const FORMAT: &str = "mailgate-state/1";

/// What `state export` writes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Document {
    /// [`FORMAT`].
    pub format: String,
    /// `local` or `redis`: where it came from (informative).
    pub backend: String,
    /// When (unix ms).
    pub exported_at_ms: u64,
    /// Per channel name.
    pub channels: BTreeMap<String, ChannelState>,
}

/// One channel's state.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelState {
    /// Its health.
    pub health: Health,
    /// Counted sends still in a window: (unix ms, recipients), oldest first.
    pub events: Vec<(u64, u64)>,
    /// A refresh token mailgate obtained (rotation, `oauth authorize`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// Reads every configured channel's state from the configured backend.
pub async fn export(config: &Config, now_ms: u64) -> Result<Document, String> {
    let backend = Backend::of(config)?;
    let store = backend.token_store();
    let mut channels = BTreeMap::new();
    for channel in &config.channels {
        let health = backend.read_health(&channel.name).await?;
        let events = backend
            .events(&channel.name, &channel.limits, now_ms)
            .await?;
        let refresh_token = store
            .load(&channel.name)
            .await?
            .map(|t| t.expose().to_owned());
        channels.insert(
            channel.name.clone(),
            ChannelState {
                health,
                events,
                refresh_token,
            },
        );
    }
    Ok(Document {
        format: FORMAT.into(),
        backend: match backend {
            Backend::Local(_) => "local".into(),
            Backend::Redis(_) => "redis".into(),
        },
        exported_at_ms: now_ms,
        channels,
    })
}

/// Loads `doc` into the configured backend; returns a summary line.
pub async fn import(config: &Config, doc: &Document, now_ms: u64) -> Result<String, String> {
    if doc.format != FORMAT {
        return Err(format!(
            "not a mailgate state document (format {:?}, expected {FORMAT:?})",
            doc.format
        ));
    }
    let backend = Backend::of(config)?;
    // Held for the whole import: no proxy may start on this spool meanwhile.
    let _lock = match &backend {
        Backend::Local(_) => Some(lock_spool(config)?),
        Backend::Redis(_) => None,
    };
    let store = backend.token_store();
    let (mut done, mut skipped, mut kept) = (0, Vec::new(), Vec::new());
    for (name, state) in &doc.channels {
        let Some(id) = config.channel_id(name) else {
            skipped.push(name.clone());
            continue;
        };
        let limits = &config.channels[id].limits;
        match &backend {
            Backend::Local(local) => {
                crate::fsutil::private_dir(&local.dir).map_err(|e| e.to_string())?;
                crate::fsutil::private_dir(&local.tmp).map_err(|e| e.to_string())?;
                local
                    .write_health(name, &state.health)
                    .map_err(|e| format!("{name}: {e}"))?;
                // Through the same pruning as a load: nothing outside the windows.
                let kept = parse_events(&events_text(&state.events), limits, now_ms);
                let body = events_text(&kept);
                local
                    .write_atomic(&local.events_path(name), body.as_bytes())
                    .map_err(|e| format!("{name}: {e}"))?;
            }
            Backend::Redis(redis) => {
                redis
                    .set_health(name, &state.health)
                    .await
                    .map_err(|e| e.to_string())?;
                redis
                    .add_events(name, limits, &state.events)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        if let Some(token) = &state.refresh_token {
            // Into Redis, a token already there wins: the hosts using it may have rotated
            // the file's since, and a rotation spends the token it replaces.
            if matches!(backend, Backend::Redis(_)) && store.load(name).await?.is_some() {
                kept.push(name.clone());
            } else {
                store.save(name, &Secret::new(token.clone())).await?;
            }
        }
        done += 1;
    }
    let mut summary = format!("imported the state of {done} channel(s)");
    if !skipped.is_empty() {
        summary.push_str(&format!(
            "; skipped {} (not in this config)",
            skipped.join(", ")
        ));
    }
    if !kept.is_empty() {
        summary.push_str(&format!(
            "; kept the refresh token already in Redis for {}",
            kept.join(", ")
        ));
    }
    Ok(summary)
}

/// The spool's lock, as a running proxy holds it; refused while one runs.
fn lock_spool(config: &Config) -> Result<File, String> {
    let root = &config.server.spool_dir;
    crate::fsutil::private_dir(root).map_err(|e| format!("spool {}: {e}", root.display()))?;
    let lock = crate::fsutil::open_lock(&root.join("lock"))
        .map_err(|e| format!("spool {}: {e}", root.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "mailgate is running on spool {}: stop it before importing into the local backend",
            root.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("spool {}: {e}", root.display())),
    }
}
