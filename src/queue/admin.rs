//! `mailgate queue list | show ID | retry ID|--all | delete ID`, and the channel health
//! that `check` shows. Safe while the proxy runs: state files are only ever replaced by
//! atomic renames (no torn reads), a message being delivered is locked (delete waits
//! for it or refuses), and retries reach the running proxy through `spool_dir/control/`.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;

use super::format_time;
use super::spool::{self, MessageState, RcptStatus, Spool, now_ms};
use crate::state::{Backend, Health, LocalState};
use crate::text::escape_controls as esc;

/// How long `delete` and `retry ID` wait for a message in flight.
const LOCK_WAIT: Duration = Duration::from_secs(5);
const LOCK_POLL: Duration = Duration::from_millis(100);
/// Control file asking the proxy to retry everything.
const RETRY_ALL: &str = "retry-all";
/// Prefix of a control file asking the proxy to retry one message.
const RETRY_ONE: &str = "retry.";

/// The spool. It may not exist yet (nothing was ever queued): that is an empty queue,
/// not an error, so every command reads a missing folder as an empty one.
fn spool_of(config: &Config) -> Spool {
    Spool::new(&config.server.spool_dir)
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("{id:?} is not a queue id"));
    }
    Ok(())
}

fn io_err(what: &str, e: io::Error) -> String {
    format!("{what}: {e}")
}

/// Each channel's state line: `ok`, `limited until …`, `broken since …: reason`
/// (for `queue list` and `check`).
pub fn channel_health(config: &Config) -> Vec<(String, String)> {
    if let Ok(Backend::Redis(redis)) = Backend::of(config) {
        return crate::state::block_on(shared_health(config, &redis))
            .unwrap_or_else(|e| vec![("(all)".into(), e)]);
    }
    let state = LocalState::new(&config.server.spool_dir);
    let now = now_ms();
    config
        .channels
        .iter()
        .map(|channel| {
            let health = state.read_health(&channel.name);
            let line = match &health {
                Health::Broken { .. } => health.describe(now),
                Health::Held { until_ms, .. } if *until_ms > now => health.describe(now),
                _ => {
                    match state
                        .peek_counters(&channel.name, &channel.limits, now)
                        .map(|l| l.check(now, 1))
                    {
                        Some(Err(at)) if at != u64::MAX => {
                            format!("limited until {} (rate or daily quota)", format_time(at))
                        }
                        _ => "ok".to_string(),
                    }
                }
            };
            (channel.name.clone(), line)
        })
        .collect()
}

/// Queued messages for channels `config` does not have (removed from the file): each such
/// channel with its count, by name. They stay in the spool, untouched, and go out once
/// the channel is configured again (a reload or a restart).
pub fn unconfigured(config: &Config) -> Vec<(String, usize)> {
    let spool = Spool::new(&config.server.spool_dir);
    unconfigured_of(config, &read_all(&spool, false))
}

/// [`unconfigured`] among `states` (`queue list` reads the spool once for both).
fn unconfigured_of(config: &Config, states: &[MessageState]) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for state in states {
        if config.channel_id(&state.channel).is_none() {
            *counts.entry(&state.channel).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(name, n)| (name.to_string(), n))
        .collect()
}

/// The line `check` and `queue list` give a channel that is not configured but has mail.
pub fn unconfigured_line(count: usize) -> String {
    format!(
        "not configured: {count} queued message(s) wait in the spool until it is configured again"
    )
}

/// Whether a proxy holds the spool right now.
fn proxy_running(spool: &Spool) -> bool {
    let Ok(file) = crate::fsutil::open_lock(&spool.root.join("lock")) else {
        return false;
    };
    matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock))
}

fn read_all(spool: &Spool, failed: bool) -> Vec<MessageState> {
    let (ids, dir) = if failed {
        (spool.failed_ids().unwrap_or_default(), spool.failed_dir())
    } else {
        (spool.queued_ids().unwrap_or_default(), spool.queue_dir())
    };
    ids.iter()
        .filter_map(|id| {
            Spool::read_state_file(&dir.join(format!("{id}.json")))
                .ok()
                .flatten()
        })
        .collect()
}

fn recipients_summary(state: &MessageState) -> String {
    let pending: Vec<&str> = state
        .recipients
        .iter()
        .filter(|r| r.status == RcptStatus::Pending)
        .map(|r| r.addr.as_str())
        .collect();
    let shown: Vec<_> = pending.iter().take(2).map(|a| esc(a)).collect();
    let mut text = shown.join(",");
    if pending.len() > shown.len() {
        text.push_str(&format!(" +{}", pending.len() - shown.len()));
    }
    if pending.len() != state.recipients.len() {
        text.push_str(&format!(
            " ({} of {} pending)",
            pending.len(),
            state.recipients.len()
        ));
    }
    text
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `mailgate queue list`: the channels' states, the queued messages, the failed ones.
pub fn list(config: &Config) -> Result<String, String> {
    let spool = spool_of(config);
    let queued = read_all(&spool, false);
    let mut out = String::new();
    let mut rows = vec![vec!["CHANNEL".to_string(), "STATE".to_string()]];
    rows.extend(
        channel_health(config)
            .into_iter()
            .map(|(name, state)| vec![name, state]),
    );
    rows.extend(
        unconfigured_of(config, &queued)
            .into_iter()
            .map(|(name, count)| vec![name, unconfigured_line(count)]),
    );
    out.push_str(&table(&rows));

    out.push_str(&format!("\n{} message(s) queued\n", queued.len()));
    if !queued.is_empty() {
        let mut rows = vec![
            [
                "ID",
                "SENDER",
                "RECIPIENTS",
                "CHANNEL",
                "ATTEMPTS",
                "NEXT ATTEMPT",
                "LAST REPLY",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        ];
        for st in &queued {
            let channel = if config.channel_id(&st.channel).is_some() {
                st.channel.clone()
            } else {
                format!("{} (not configured)", st.channel)
            };
            rows.push(vec![
                st.id.clone(),
                format!("<{}>", esc(&st.sender)),
                recipients_summary(st),
                channel,
                st.attempts.to_string(),
                format_time(st.next_attempt_ms),
                truncate(&esc(st.last_reply.as_deref().unwrap_or("-")), 100),
            ]);
        }
        out.push_str(&table(&rows));
    }

    let failed = read_all(&spool, true);
    if !failed.is_empty() {
        out.push_str(&format!("\n{} message(s) in failed/\n", failed.len()));
        let mut rows = vec![
            ["ID", "SENDER", "CHANNEL", "DSN", "REASON"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        ];
        for st in &failed {
            rows.push(vec![
                st.id.clone(),
                format!("<{}>", esc(&st.sender)),
                st.channel.clone(),
                st.dsn.clone().unwrap_or_else(|| "-".into()),
                truncate(&esc(st.failure.as_deref().unwrap_or("-")), 100),
            ]);
        }
        out.push_str(&table(&rows));
    }
    Ok(out)
}

/// `mailgate queue show ID`: everything about one message (queued or failed) and its headers.
pub fn show(config: &Config, id: &str) -> Result<String, String> {
    check_id(id)?;
    let spool = spool_of(config);
    let (state, data, place) = match spool.read_state(id).map_err(|e| io_err(id, e))? {
        Some(state) => (state, spool.data_path(id), "queued"),
        None => {
            let path = spool.failed_dir().join(format!("{id}.json"));
            match Spool::read_state_file(&path).map_err(|e| io_err(id, e))? {
                Some(state) => (
                    state,
                    spool.failed_dir().join(format!("{id}.eml")),
                    "failed",
                ),
                None => return Err(format!("no message {id} in the queue or in failed/")),
            }
        }
    };
    let mut out = String::new();
    let mut field = |k: &str, v: &str| out.push_str(&format!("{k:<13} {v}\n"));
    field("id:", &state.id);
    field("status:", place);
    field("channel:", &state.channel);
    field("sender:", &format!("<{}>", esc(&state.sender)));
    field("size:", &format!("{} bytes", state.size));
    field("accepted:", &format_time(state.created_ms));
    field("attempts:", &state.attempts.to_string());
    if place == "queued" {
        field("next attempt:", &format_time(state.next_attempt_ms));
    }
    field(
        "last reply:",
        &esc(state.last_reply.as_deref().unwrap_or("-")),
    );
    if let Some(failure) = &state.failure {
        field("failure:", &esc(failure));
    }
    if let Some(dsn) = &state.dsn {
        field("dsn:", dsn);
    }
    out.push_str("recipients:\n");
    for r in &state.recipients {
        let status = match r.status {
            RcptStatus::Pending => "pending",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Failed => "failed",
        };
        out.push_str(&format!(
            "  {status:<9} <{}>  {}\n",
            esc(&r.addr),
            esc(r.reply.as_deref().unwrap_or(""))
        ));
    }
    if let Ok(headers) = spool::read_headers(&data, 16 * 1024) {
        out.push_str("headers:\n");
        // Split on CRLF only: a CR or LF alone inside a line is shown escaped.
        let headers = String::from_utf8_lossy(&headers);
        let lines = headers.strip_suffix("\r\n").unwrap_or(&headers);
        for line in lines.split("\r\n").filter(|_| !lines.is_empty()) {
            out.push_str(&format!("  {}\n", esc(line)));
        }
    }
    Ok(out)
}

/// Waits (bounded) for the delivery lock of a queued message. `Ok(None)`: the message is gone.
fn lock_queued(spool: &Spool, id: &str) -> Result<Option<fs::File>, String> {
    let path = spool.data_path(id);
    let tries = (LOCK_WAIT.as_millis() / LOCK_POLL.as_millis()).max(1);
    for _ in 0..tries {
        match spool::try_lock_data(&path) {
            Ok(Some(lock)) => return Ok(Some(lock)),
            Ok(None) => std::thread::sleep(LOCK_POLL),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(id, e)),
        }
    }
    Err(format!(
        "message {id} is being delivered right now; try again in a moment"
    ))
}

/// Makes a locked message due now (in its state file). One already due is left as it
/// is: rewriting its state file costs two fsyncs, which made `queue retry --all` of a
/// day's backlog behind a broken channel (all of it due) take minutes.
fn make_due(spool: &Spool, id: &str) -> Result<bool, String> {
    match spool.read_state(id).map_err(|e| io_err(id, e))? {
        Some(mut state) => {
            let now = now_ms();
            if state.next_attempt_ms > now {
                state.next_attempt_ms = now;
                spool.write_state(&state).map_err(|e| io_err(id, e))?;
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

fn request(spool: &Spool, name: &str) -> Result<(), String> {
    spool
        .write_atomic(&spool.control_dir().join(name), b"")
        .map_err(|e| io_err("control request", e))
}

/// `mailgate queue retry ID` (`Some`) or `--all` (`None`): the message(s) become due now
/// and their channels resume (broken or held). A running proxy notices within a second.
pub fn retry(config: &Config, id: Option<&str>) -> Result<String, String> {
    let spool = spool_of(config);
    let running = proxy_running(&spool);
    let summary = match id {
        Some(id) => {
            check_id(id)?;
            if spool.read_state(id).map_err(|e| io_err(id, e))?.is_none() {
                return Err(format!("no message {id} in the queue"));
            }
            let lock = lock_queued(&spool, id)?;
            if lock.is_some() {
                make_due(&spool, id)?;
            }
            request(&spool, &format!("{RETRY_ONE}{id}"))?;
            format!("message {id} will be retried now")
        }
        None => {
            let mut count = 0;
            let ids = match spool.queued_ids() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                ids => ids.map_err(|e| io_err("queue", e))?,
            };
            for id in ids {
                // A message in flight is being tried right now anyway.
                if let Ok(Some(_lock)) = spool::try_lock_data(&spool.data_path(&id))
                    && make_due(&spool, &id)?
                {
                    count += 1;
                }
            }
            if spool.control_dir().is_dir() {
                request(&spool, RETRY_ALL)?;
            }
            if let Ok(Backend::Redis(redis)) = Backend::of(config) {
                // Every host polls this: the channels resume on all of them.
                crate::state::block_on(async {
                    for channel in &config.channels {
                        redis.retry(&channel.name).await?;
                    }
                    Ok::<(), crate::state::shared::Unavailable>(())
                })
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot resume the channels on the other hosts: {e}"))?;
            }
            format!("{count} message(s) will be retried now; every channel resumes")
        }
    };
    if !running {
        // Nobody to read the control files: resume the channels here; a restart also would.
        let state = LocalState::new(&spool.root);
        for channel in &config.channels {
            if state.read_health(&channel.name) != Health::Ok {
                state
                    .write_health(&channel.name, &Health::Ok)
                    .map_err(|e| io_err(&channel.name, e))?;
            }
        }
        let _ = take_control_requests(&spool);
        return Ok(format!(
            "{summary} (the proxy is not running: they go when it starts)"
        ));
    }
    Ok(summary)
}

/// [`channel_health`] from the shared backend.
async fn shared_health(
    config: &Config,
    redis: &crate::state::shared::RedisState,
) -> Vec<(String, String)> {
    let now = now_ms();
    let mut lines = Vec::new();
    for channel in &config.channels {
        let line = match redis.health(&channel.name).await {
            Err(e) => format!("unknown ({e})"),
            Ok((health @ (Health::Broken { .. } | Health::Held { .. }), _))
                if health.describe(now) != "ok" =>
            {
                health.describe(now)
            }
            Ok(_) if crate::state::has_windows(&channel.limits) => {
                match redis.events(&channel.name).await {
                    Ok(events) => {
                        let limiter =
                            crate::ratelimit::ChannelLimiter::restore(&channel.limits, events, now);
                        match limiter.check(now, 1) {
                            Err(at) if at != u64::MAX => format!(
                                "limited until {} (rate or daily quota, shared)",
                                format_time(at)
                            ),
                            _ => "ok".to_string(),
                        }
                    }
                    Err(e) => format!("unknown ({e})"),
                }
            }
            Ok(_) => "ok".to_string(),
        };
        lines.push((channel.name.clone(), line));
    }
    lines
}

/// `mailgate queue delete ID`: removes a queued message (waiting for a delivery in
/// flight, or refusing after a few seconds), or a message in `failed/`.
pub fn delete(config: &Config, id: &str) -> Result<String, String> {
    check_id(id)?;
    let spool = spool_of(config);
    if spool.state_path(id).exists() {
        let lock = lock_queued(&spool, id)?;
        if lock.is_some() && spool.state_path(id).exists() {
            spool.remove(id).map_err(|e| io_err(id, e))?;
            return Ok(format!("message {id} deleted from the queue"));
        }
    }
    let failed: Vec<PathBuf> = ["json", "eml"]
        .iter()
        .map(|ext| spool.failed_dir().join(format!("{id}.{ext}")))
        .collect();
    if failed[0].exists() {
        for path in &failed {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(id, e)),
                _ => {}
            }
        }
        return Ok(format!("message {id} deleted from failed/"));
    }
    Err(format!("no message {id} in the queue or in failed/"))
}

/// Takes the retry requests left in `control/`: `None` = every message, `Some(id)` = one.
pub fn take_control_requests(spool: &Spool) -> Vec<Option<String>> {
    let Ok(entries) = fs::read_dir(spool.control_dir()) else {
        return Vec::new();
    };
    let mut requests = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == RETRY_ALL {
            requests.push(None);
        } else if let Some(id) = name.strip_prefix(RETRY_ONE) {
            requests.push(Some(id.to_string()));
        }
        let _ = fs::remove_file(entry.path());
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("19a2b3c4d5e6f-1a2b-0").is_ok());
        assert!(check_id("../etc/passwd").is_err());
        assert!(check_id("").is_err());
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string()],
            vec!["ccc".to_string(), "d".to_string()],
        ];
        assert_eq!(table(&rows), "A    BB\nccc  d\n");
    }

    #[test]
    fn queue_show_and_list_escape_control_characters() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::testkit::config::config(vec![]);
        config.server.spool_dir = dir.path().to_path_buf();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let id = "19a2b3c4d5e6f-1a2b-0";
        let envelope = crate::testkit::config::envelope(
            "ev\u{1b}[2Jil\r@example.com",
            &["b\u{1b}@example.org"],
        );
        let state = MessageState::new(id, "c", &envelope, 10, now_ms());
        fs::write(
            spool.data_path(id),
            b"Subject: \x1b]0;pwned\x07hi\rthere\r\nFrom: a@example.com\r\n\r\nbody\r\n",
        )
        .unwrap();
        spool.write_state(&state).unwrap();
        let shown = show(&config, id).unwrap();
        assert!(
            shown.contains("sender:       <ev\\x1b[2Jil\\x0d@example.com>\n"),
            "{shown}"
        );
        assert!(shown.contains("<b\\x1b@example.org>"), "{shown}");
        assert!(
            shown.contains("  Subject: \\x1b]0;pwned\\x07hi\\x0dthere\n  From: a@example.com\n"),
            "{shown}"
        );
        let listed = list(&config).unwrap();
        assert!(
            listed.contains("<ev\\x1b[2Jil\\x0d@example.com>"),
            "{listed}"
        );
        for out in [&shown, &listed] {
            assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out}");
        }
    }

    #[test]
    fn retry_rewrites_only_the_state_files_of_messages_not_yet_due() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let envelope = crate::testkit::config::envelope("a@example.com", &["b@example.org"]);
        let (due, later) = ("19a2b3c4d5e6f-1a2b-0", "19a2b3c4d5e6f-1a2b-1");
        let now = now_ms();
        for (id, next) in [(due, now - 60_000), (later, now + 3_600_000)] {
            let mut state = MessageState::new(id, "c", &envelope, 10, now - 120_000);
            state.next_attempt_ms = next;
            spool.write_state(&state).unwrap();
        }
        let inode = |id| fs::metadata(spool.state_path(id)).unwrap().ino();
        let before = (inode(due), inode(later));
        assert!(make_due(&spool, due).unwrap());
        assert!(make_due(&spool, later).unwrap());
        assert_eq!(
            inode(due),
            before.0,
            "a due message's state file was rewritten"
        );
        assert_ne!(inode(later), before.1);
        let next = |id| spool.read_state(id).unwrap().unwrap().next_attempt_ms;
        assert_eq!(next(due), now - 60_000);
        assert!(next(later) <= now_ms());
    }

    #[test]
    fn control_requests_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        request(&spool, RETRY_ALL).unwrap();
        request(&spool, "retry.abc").unwrap();
        let mut got = take_control_requests(&spool);
        got.sort();
        assert_eq!(got, vec![None, Some("abc".to_string())]);
        assert!(take_control_requests(&spool).is_empty());
    }
}
