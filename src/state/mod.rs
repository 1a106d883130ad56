//! Per-channel state shared by every part of the flow: health (ok / held / broken) and
//! the send events that feed the rate and quota windows, so both survive a restart.
//! [`Backend`] is the seam: [`LocalState`], files in `spool_dir/state/` (the default), or
//! [`shared::RedisState`], one Redis for a fleet of hosts (`[state] backend = "redis"`);
//! their OAuth side is [`tokens`]; [`transfer`] moves everything between them.
//!
//! `<name>.health.json` is rewritten atomically. `<name>.events` is an append-only log
//! of `"<unix-ms> <recipients>\n"` lines, one per upstream transaction started; at load
//! it is pruned to the last 24 hours (or the rate window, if longer) and replayed into a
//! fresh [`ChannelLimiter`]. A torn last line (crash mid-append) is ignored.

pub mod shared;
pub mod tokens;
pub mod transfer;

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Limits, StateBackend};
use crate::fsutil;
use crate::ratelimit::ChannelLimiter;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
const HOUR_MS: u64 = 60 * 60 * 1000;
/// Events kept in memory at most (only reached by very busy channels; the limiter windows
/// of every preset need far fewer).
const MAX_EVENTS: usize = 200_000;

/// The health of a channel, as `queue list` and `check` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Health {
    /// Delivering.
    #[default]
    Ok,
    /// The provider's quota was reached: nothing is sent before `until_ms`.
    Held {
        /// Unix ms at which the channel resumes.
        until_ms: u64,
        /// The upstream reply that caused it.
        reason: String,
    },
    /// The credentials were refused: nothing is sent until `queue retry` or a restart.
    Broken {
        /// Unix ms when it broke.
        since_ms: u64,
        /// The upstream reply or error that caused it.
        reason: String,
        /// The provider refuses how the channel authenticates (SPEC §7 "Fallback"): every
        /// host hands the channel's mail to its fallback, not only the one that saw it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        auth_method_refused: bool,
    },
}

impl Health {
    /// One line for `queue list` / `check`.
    pub fn describe(&self, now_ms: u64) -> String {
        match self {
            Health::Ok => "ok".to_string(),
            Health::Held { until_ms, reason } if *until_ms > now_ms => {
                format!(
                    "limited until {} (provider quota: {reason})",
                    format_time(*until_ms)
                )
            }
            Health::Held { .. } => "ok".to_string(),
            Health::Broken {
                since_ms, reason, ..
            } => {
                format!("broken since {}: {reason}", format_time(*since_ms))
            }
        }
    }
}

/// Where this installation keeps its state (`[state]`).
#[derive(Debug, Clone)]
pub enum Backend {
    /// Files beside the spool.
    Local(LocalState),
    /// One Redis shared by several hosts.
    Redis(shared::RedisState),
}

impl Backend {
    /// The configured backend (nothing is touched or connected yet).
    pub fn of(config: &Config) -> Result<Backend, String> {
        Ok(match &config.state {
            StateBackend::Local => Backend::Local(LocalState::new(&config.server.spool_dir)),
            StateBackend::Redis(settings) => Backend::Redis(shared::RedisState::shared(settings)?),
        })
    }

    /// Where refresh tokens are kept.
    pub fn token_store(&self) -> std::sync::Arc<dyn tokens::TokenStore> {
        match self {
            Backend::Local(local) => {
                std::sync::Arc::new(tokens::LocalTokenStore::new(local.dir.clone()))
            }
            Backend::Redis(redis) => std::sync::Arc::new(shared::RedisTokenStore(redis.clone())),
        }
    }

    /// A channel's health.
    pub async fn read_health(&self, channel: &str) -> Result<Health, String> {
        match self {
            Backend::Local(local) => Ok(local.read_health(channel)),
            Backend::Redis(redis) => redis
                .health(channel)
                .await
                .map(|(h, _)| h)
                .map_err(|e| e.to_string()),
        }
    }

    /// A channel's counted sends still in a window, oldest first.
    pub async fn events(
        &self,
        channel: &str,
        limits: &Limits,
        now_ms: u64,
    ) -> Result<Vec<(u64, u64)>, String> {
        match self {
            Backend::Local(local) => {
                let text = match fs::read_to_string(local.events_path(channel)) {
                    Ok(text) => text,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(e.to_string()),
                };
                Ok(parse_events(&text, limits, now_ms))
            }
            Backend::Redis(redis) => redis.events(channel).await.map_err(|e| e.to_string()),
        }
    }
}

/// Runs `f` on a small runtime of its own (the command-line tools, which have none).
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    Ok(runtime.block_on(f))
}

/// When a channel held for quota may try again: when the oldest send of the rolling
/// day leaves the window, but at most one hour from now (one message then probes) and
/// at least one minute.
pub fn hold_until(events: &[(u64, u64)], now_ms: u64) -> u64 {
    let oldest = events
        .iter()
        .find(|(t, _)| t.saturating_add(DAY_MS) > now_ms)
        .map(|(t, _)| t.saturating_add(DAY_MS));
    // Event times come from a file or Redis: saturating, whatever they hold.
    oldest
        .unwrap_or(u64::MAX)
        .min(now_ms.saturating_add(HOUR_MS))
        .max(now_ms.saturating_add(60_000))
}

/// A channel name as a file name: anything but `[A-Za-z0-9._-]` becomes `%XX`.
pub fn file_stem(channel: &str) -> String {
    let mut out = String::new();
    for b in channel.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The local backend: files in `spool_dir/state/`, written atomically through
/// `spool_dir/tmp/`.
#[derive(Debug, Clone)]
pub struct LocalState {
    dir: PathBuf,
    tmp: PathBuf,
    /// Per events file: serializes appends with the end of a compaction.
    logs: Arc<Mutex<HashMap<PathBuf, Arc<Mutex<EventLog>>>>>,
}

/// What a process knows about one events file.
#[derive(Debug, Default)]
struct EventLog {
    /// Lines in the file.
    lines: usize,
    /// Lines the last load or compaction left.
    kept: usize,
    /// A compaction is running: the lines appended since it began, for its new file.
    carried: Option<Vec<u8>>,
    /// The file, open for appending, and its length: opening and measuring it for every
    /// event cost three system calls per message. Dropped when a compaction replaces
    /// the file.
    file: Option<(File, u64)>,
}

impl LocalState {
    /// The state kept beside the spool at `spool_dir` (nothing is touched on disk).
    pub fn new(spool_dir: &Path) -> Self {
        LocalState {
            dir: spool_dir.join("state"),
            tmp: spool_dir.join("tmp"),
            logs: Arc::default(),
        }
    }

    /// [`LocalState::new`], creating its folders when missing (mode 0700).
    pub fn open(spool_dir: &Path) -> io::Result<Self> {
        let state = LocalState::new(spool_dir);
        fsutil::private_dir(&state.dir)?;
        fsutil::private_dir(&state.tmp)?;
        Ok(state)
    }

    /// `state/<name>.health.json`.
    pub fn health_path(&self, channel: &str) -> PathBuf {
        self.dir.join(format!("{}.health.json", file_stem(channel)))
    }

    /// `state/<name>.events`.
    pub fn events_path(&self, channel: &str) -> PathBuf {
        self.dir.join(format!("{}.events", file_stem(channel)))
    }

    /// The persisted health of a channel (`Ok` when there is none or it is unreadable).
    pub fn read_health(&self, channel: &str) -> Health {
        fs::read(self.health_path(channel))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Persists the health of a channel atomically.
    pub fn write_health(&self, channel: &str, health: &Health) -> io::Result<()> {
        let mut json = serde_json::to_vec_pretty(health).map_err(io::Error::other)?;
        json.push(b'\n');
        self.write_atomic(&self.health_path(channel), &json)
    }

    /// Appends one event to a channel's log: a transaction counted at `at_ms`, or with
    /// `taken_back` its cancellation (relay mode). `Ok(true)`: the log has grown enough
    /// to be worth [`LocalState::compact_in_background`]. On an error (a full disk) the
    /// file is as before: a torn line would merge with the next one.
    pub fn append_event(
        &self,
        channel: &str,
        at_ms: u64,
        recipients: u64,
        taken_back: bool,
    ) -> io::Result<bool> {
        let line = if taken_back {
            format!("{at_ms} {recipients} -\n")
        } else {
            format!("{at_ms} {recipients}\n")
        };
        let path = self.events_path(channel);
        let log = self.log(&path);
        let mut log = lock(&log);
        let (mut file, before) = match log.file.take() {
            Some(open) => open,
            None => {
                let file = fsutil::open_append(&path)?;
                let len = file.metadata()?.len();
                (file, len)
            }
        };
        if let Err(e) = file.write_all(line.as_bytes()) {
            let _ = file.set_len(before);
            return Err(e);
        }
        log.file = Some((file, before + line.len() as u64));
        if let Some(carried) = &mut log.carried {
            carried.extend_from_slice(line.as_bytes());
        }
        log.lines += 1;
        Ok(log.carried.is_none() && log.lines > 2 * log.kept + 1024)
    }

    /// Rewrites a channel's log with only the events still inside the windows, on the
    /// blocking pool when called from the runtime (it fsyncs), else right here.
    /// `now_ms` is the clock of the events (they are kept if inside the windows then).
    pub fn compact_in_background(&self, channel: &str, limits: &Limits, now_ms: u64) {
        let (state, channel, limits) = (self.clone(), channel.to_string(), limits.clone());
        let run = move || {
            if let Err(e) = state.compact_events(&channel, &limits, now_ms) {
                tracing::warn!(channel, error = %e, "cannot compact the rate counters' log");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Blocking: [`LocalState::compact_in_background`]'s work. Appends made meanwhile
    /// are carried into the new file, so none is lost.
    pub fn compact_events(&self, channel: &str, limits: &Limits, now_ms: u64) -> io::Result<()> {
        let path = self.events_path(channel);
        let log = self.log(&path);
        let snapshot_len = {
            let mut log = lock(&log);
            if log.carried.is_some() {
                return Ok(());
            }
            log.carried = Some(Vec::new());
            match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => {
                    log.carried = None;
                    return Err(e);
                }
            }
        };
        let tmp = self.tmp_path(&path);
        let result = (|| {
            let mut text = Vec::new();
            if snapshot_len > 0 {
                fs::File::open(&path)?
                    .take(snapshot_len)
                    .read_to_end(&mut text)?;
            }
            let events = parse_events(&String::from_utf8_lossy(&text), limits, now_ms);
            let body = events_text(&events);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(fsutil::FILE_MODE)
                .open(&tmp)?;
            file.write_all(body.as_bytes())?;
            file.sync_all()?;
            let mut log = lock(&log);
            let carried = log.carried.take().unwrap_or_default();
            file.write_all(&carried)?;
            fs::rename(&tmp, &path)?;
            log.file = None;
            log.kept = events.len();
            log.lines = events.len() + carried.iter().filter(|&&b| b == b'\n').count();
            drop(log);
            fsutil::sync_dir(&self.dir)
        })();
        if result.is_err() {
            lock(&log).carried = None;
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Notes what a load found in a log (lines in it, events kept).
    fn loaded(&self, channel: &str, lines: usize, kept: usize) {
        let log = self.log(&self.events_path(channel));
        let mut log = lock(&log);
        if log.carried.is_none() {
            (log.lines, log.kept) = (lines, kept);
        }
    }

    fn log(&self, path: &Path) -> Arc<Mutex<EventLog>> {
        lock(&self.logs)
            .entry(path.to_path_buf())
            .or_default()
            .clone()
    }

    /// The windows of a channel from its log, without touching the file (`queue list`).
    pub fn peek_counters(
        &self,
        channel: &str,
        limits: &Limits,
        now_ms: u64,
    ) -> Option<ChannelLimiter> {
        if !has_windows(limits) {
            return None;
        }
        let text = fs::read_to_string(self.events_path(channel)).unwrap_or_default();
        let events = parse_events(&text, limits, now_ms);
        let mut limiter = ChannelLimiter::new(limits);
        for (t, n) in events {
            limiter.record(t, n);
        }
        Some(limiter)
    }

    fn write_atomic(&self, target: &Path, bytes: &[u8]) -> io::Result<()> {
        fsutil::write_atomic(target, &self.tmp_path(target), bytes)
    }

    fn tmp_path(&self, target: &Path) -> PathBuf {
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file");
        self.tmp
            .join(format!("{name}.{:016x}.part", rand::random::<u64>()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rate and quota windows of one channel, backed by its events log.
pub struct Counters {
    channel: String,
    limits: Limits,
    limiter: Option<ChannelLimiter>,
    events: VecDeque<(u64, u64)>,
}

impl Counters {
    /// Loads the events log of `channel`, drops what is older than the windows, and
    /// rebuilds the limiter from the rest (the file is compacted in the background).
    pub fn load(
        state: &LocalState,
        channel: &str,
        limits: &Limits,
        now_ms: u64,
    ) -> io::Result<Self> {
        let text = match fs::read_to_string(state.events_path(channel)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let events = parse_events(&text, limits, now_ms);
        let mut counters = Counters {
            channel: channel.to_string(),
            limits: limits.clone(),
            limiter: has_windows(limits).then(|| ChannelLimiter::new(limits)),
            events: VecDeque::new(),
        };
        for (t, n) in events {
            counters.remember(t, n);
        }
        let lines = text.lines().count();
        state.loaded(channel, lines, counters.events.len());
        if lines != counters.events.len() {
            state.compact_in_background(channel, limits, now_ms);
        }
        Ok(counters)
    }

    /// `Ok` if a transaction with `recipients` recipients may start now, else the unix ms
    /// at which it may (`u64::MAX`: never).
    pub fn check(&self, now_ms: u64, recipients: u64) -> Result<(), u64> {
        match &self.limiter {
            Some(limiter) => limiter.check(now_ms, recipients),
            None => Ok(()),
        }
    }

    /// Counts a transaction started now, in the log and then in memory. On an error (a
    /// full disk) nothing is counted: the caller must not start the transaction.
    pub fn record(&mut self, state: &LocalState, now_ms: u64, recipients: u64) -> io::Result<()> {
        // O_APPEND of one short line: other lines are never torn; the page cache keeps it
        // across a kill -9 (only a power loss can lose the last few events).
        let compact = state.append_event(&self.channel, now_ms, recipients, false)?;
        self.remember(now_ms, recipients);
        if compact {
            state.compact_in_background(&self.channel, &self.limits, now_ms);
        }
        Ok(())
    }

    /// Takes back a transaction counted by [`Counters::record`] at `at_ms` that never
    /// started (its message was locked or gone): in the log, then in memory.
    pub fn unrecord(&mut self, state: &LocalState, at_ms: u64, recipients: u64) -> io::Result<()> {
        state.append_event(&self.channel, at_ms, recipients, true)?;
        if let Some(limiter) = &mut self.limiter {
            limiter.unrecord(at_ms, recipients);
        }
        if let Some(i) = self.events.iter().rposition(|&e| e == (at_ms, recipients)) {
            self.events.remove(i);
        }
        Ok(())
    }

    /// Moves a transaction counted at `at_ms` to `end_ms`, when it ended (see
    /// [`ChannelLimiter::settle`]): logged as counted then, before the first count is
    /// taken back, so a crash in between counts it twice rather than never.
    pub fn settle(
        &mut self,
        state: &LocalState,
        at_ms: u64,
        recipients: u64,
        end_ms: u64,
    ) -> io::Result<()> {
        let Some(i) = self.events.iter().rposition(|&e| e == (at_ms, recipients)) else {
            return Ok(());
        };
        if end_ms <= at_ms {
            return Ok(());
        }
        let compact = state.append_event(&self.channel, end_ms, recipients, false)?;
        state.append_event(&self.channel, at_ms, recipients, true)?;
        // In memory in one step: recording first would let the limiter drop another
        // count to stay within its rate's size.
        if let Some(limiter) = &mut self.limiter {
            limiter.settle(at_ms, recipients, end_ms);
        }
        self.events.remove(i);
        let at = self.events.partition_point(|e| e.0 <= end_ms);
        self.events.insert(at, (end_ms, recipients));
        if compact {
            state.compact_in_background(&self.channel, &self.limits, end_ms);
        }
        Ok(())
    }

    /// The counted transactions still inside the windows, oldest first, as (unix ms, recipients).
    pub fn events(&self) -> Vec<(u64, u64)> {
        self.events.iter().copied().collect()
    }

    /// When a channel held for quota may try again: when the oldest send of the rolling
    /// day leaves the window, but at most one hour from now (one message then probes) and
    /// at least one minute.
    pub fn hold_until(&self, now_ms: u64) -> u64 {
        let events: Vec<(u64, u64)> = self.events.iter().copied().collect();
        hold_until(&events, now_ms)
    }

    fn remember(&mut self, t: u64, n: u64) {
        if let Some(limiter) = &mut self.limiter {
            limiter.record(t, n);
        }
        self.events.push_back((t, n));
        let horizon = horizon_ms(&self.limits);
        while self
            .events
            .front()
            .is_some_and(|(old, _)| old.saturating_add(horizon) <= t)
            || self.events.len() > MAX_EVENTS
        {
            self.events.pop_front();
        }
    }
}

/// Whether the channel has a rate or a daily quota at all.
pub fn has_windows(limits: &Limits) -> bool {
    limits.rate.is_some() || limits.recipients_per_day.is_some()
}

fn horizon_ms(limits: &Limits) -> u64 {
    let rate = limits
        .rate
        .map(|r| u64::try_from(r.per.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    rate.max(DAY_MS)
}

/// `events` as the lines of an events log, the form [`parse_events`] reads.
fn events_text(events: &[(u64, u64)]) -> String {
    events.iter().map(|(t, n)| format!("{t} {n}\n")).collect()
}

/// The events of a log still inside the windows, oldest first. A line `"<ms> <n> -"`
/// takes back an earlier `"<ms> <n>"` (relay mode: a reservation the upstream refused).
fn parse_events(text: &str, limits: &Limits, now_ms: u64) -> Vec<(u64, u64)> {
    let horizon = horizon_ms(limits);
    let mut events: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split(' ');
        let (Some(Ok(t)), Some(Ok(n))) =
            (fields.next().map(str::parse), fields.next().map(str::parse))
        else {
            continue; // a torn line
        };
        match fields.next() {
            None => events.push((t, n)),
            Some("-") => {
                if let Some(i) = events.iter().rposition(|e| *e == (t, n)) {
                    events.remove(i);
                }
            }
            Some(_) => {}
        }
    }
    events.retain(|(t, _)| t.saturating_add(horizon) > now_ms && *t <= now_ms);
    events.sort_unstable();
    events
}

/// `"2026-11-03 14:05:09Z"` for a unix-ms time (UTC).
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month and day of a count of days since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_readable() {
        assert_eq!(format_time(1_709_210_096_789), "2024-02-29 12:34:56Z");
    }

    #[test]
    fn event_times_from_a_file_or_redis_cannot_overflow() {
        let now = 1_709_210_096_789;
        // A torn or hostile events log: a time at the end of u64.
        let held = hold_until(&[(u64::MAX, 3)], now);
        assert!((now + 60_000..=now + HOUR_MS).contains(&held), "{held}");
        let limits = Limits {
            recipients_per_day: Some(10),
            ..Default::default()
        };
        let text = format!("{} 3\n{} 2\n", u64::MAX, now - 1000);
        assert_eq!(parse_events(&text, &limits, now), vec![(now - 1000, 2)]);
        assert!(format_time(u64::MAX).len() > 10);
    }

    #[test]
    fn channel_names_become_safe_file_names() {
        assert_eq!(file_stem("alice"), "alice");
        assert_eq!(file_stem("a.b-c_d"), "a.b-c_d");
        assert_eq!(file_stem("../x"), "%2E.%2Fx");
        assert_eq!(file_stem("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn health_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        assert_eq!(state.read_health("c"), Health::Ok);
        let broken = Health::Broken {
            since_ms: 5,
            reason: "535 5.7.3 Authentication unsuccessful".into(),
            auth_method_refused: false,
        };
        state.write_health("c", &broken).unwrap();
        assert_eq!(state.read_health("c"), broken);
        assert!(broken.describe(10).starts_with("broken since"));
        let held = Health::Held {
            until_ms: 100,
            reason: "quota".into(),
        };
        assert!(held.describe(50).starts_with("limited until"));
        assert_eq!(held.describe(150), "ok");
    }

    #[test]
    fn settling_moves_one_count_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let limits = Limits {
            rate: Some(crate::config::Rate {
                count: 3,
                per: std::time::Duration::from_secs(1),
            }),
            ..Limits::default()
        };
        let t0 = 10 * DAY_MS;
        let mut counters = Counters::load(&state, "c", &limits, t0).unwrap();
        for i in 0..3 {
            counters.record(&state, t0 + i, 1).unwrap();
        }
        // Settled while the window is full: no other count may be dropped to make room.
        counters.settle(&state, t0 + 1, 1, t0 + 400).unwrap();
        assert_eq!(counters.check(t0 + 500, 1), Err(t0 + 1000));
        assert_eq!(counters.check(t0 + 999, 1), Err(t0 + 1000));
        assert_eq!(counters.check(t0 + 1000, 1), Ok(()));
        assert_eq!(counters.events(), vec![(t0, 1), (t0 + 2, 1), (t0 + 400, 1)]);
        // The log says the same after a restart.
        let back = Counters::load(&state, "c", &limits, t0 + 500).unwrap();
        assert_eq!(back.events(), counters.events());
    }

    #[test]
    fn events_are_pruned_and_torn_lines_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let now = 10 * DAY_MS;
        let path = state.events_path("c");
        fs::write(
            &path,
            format!(
                "{} 3\n{} 2\n{} 1\n123",
                now - 2 * DAY_MS,
                now - HOUR_MS,
                now - 1000
            ),
        )
        .unwrap();
        let counters = Counters::load(&state, "c", &Limits::default(), now).unwrap();
        assert_eq!(
            counters.events,
            VecDeque::from(vec![(now - HOUR_MS, 2), (now - 1000, 1)])
        );
        // The file was compacted to what is still in the window.
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 2);
        // Held until the oldest send of the day leaves the window, capped at an hour.
        assert_eq!(counters.hold_until(now), now + HOUR_MS);
        let fresh = Counters::load(&state, "empty", &Limits::default(), now).unwrap();
        assert_eq!(fresh.hold_until(now), now + HOUR_MS);
    }

    #[test]
    fn taken_back_events_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let now = 10 * DAY_MS;
        state.append_event("c", now - 3000, 1, false).unwrap();
        state.append_event("c", now - 2000, 2, false).unwrap();
        state.append_event("c", now - 2000, 2, true).unwrap();
        let counters = Counters::load(&state, "c", &Limits::default(), now).unwrap();
        assert_eq!(counters.events(), vec![(now - 3000, 1)]);
    }

    #[test]
    fn hold_ends_when_the_oldest_send_leaves_the_day() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let now = 10 * DAY_MS;
        fs::write(
            state.events_path("c"),
            format!("{} 1\n", now - DAY_MS + 10 * 60_000),
        )
        .unwrap();
        let counters = Counters::load(&state, "c", &Limits::default(), now).unwrap();
        assert_eq!(counters.hold_until(now), now + 10 * 60_000);
    }
}
