//! The spool on disk: message files, their state files, and the atomic moves between folders.
//!
//! ```text
//! spool_dir/
//!   tmp/        messages being received and temp files of atomic writes (emptied at start-up)
//!   queue/      <id>.eml (message bytes, never rewritten) + <id>.json (envelope and state)
//!   failed/     the same pair for messages that failed, with the reason in the JSON
//!   state/      per channel: <name>.health.json (ok / held / broken), <name>.events (sends)
//!   control/    requests from `mailgate queue retry` to the running proxy
//!   journal/    the commit log that makes small messages durable ([`super::journal`])
//!   lock        held (flock) by the running proxy, so that two cannot share a spool
//! ```
//!
//! `queue/<id>.json` is the commit marker: a message exists once its JSON is in `queue/`.
//! Writes go to `tmp/`, are fsync'd, renamed into place, and the directory is fsync'd;
//! a small message's own files are written without fsync, its record in the journal is
//! what is fsync'd before `250` ([`Spool::commit_small`]).
//! Receiving a message into `tmp/` is [`super::draft`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::journal::Journal;

/// Current spool state-file format version.
pub const FORMAT_VERSION: u32 = 1;

/// Now, in unix milliseconds (the unit of every time stored in the spool).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where one recipient of a queued message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Still to be delivered.
    Pending,
    /// The upstream accepted it.
    Delivered,
    /// Failed for good (it gets a DSN).
    Failed,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address, as the client gave it.
    pub addr: String,
    /// Pending, delivered or failed.
    pub status: RcptStatus,
    /// The last upstream reply about this recipient, as `"550 5.1.1 text"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// The envelope and delivery state of one spooled message (`<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Queue id (also the file names).
    pub id: String,
    /// Channel name (`[channels.NAME]`).
    pub channel: String,
    /// Envelope sender; empty for the null sender `<>`.
    pub sender: String,
    /// The client asked for SMTPUTF8.
    #[serde(default)]
    pub smtputf8: bool,
    /// The client declared 8BITMIME.
    #[serde(default)]
    pub eightbit: bool,
    /// Message size in bytes.
    pub size: u64,
    /// When the message was accepted (unix ms).
    pub created_ms: u64,
    /// Upstream transactions tried so far.
    pub attempts: u32,
    /// Temporary failures so far (drives the backoff).
    pub deferrals: u32,
    /// Earliest time of the next attempt (unix ms).
    pub next_attempt_ms: u64,
    /// The last upstream reply or error, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// Every recipient, in the client's order, each with its status.
    pub recipients: Vec<Recipient>,
    /// Id of the DSN queued for this message's failed recipients, once it is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn: Option<String>,
    /// Why the message failed (set when it moves to `failed/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The channel refused the sender itself (SendAsDenied): no DSN through it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sender_denied: bool,
    /// The Microsoft Graph draft an attempt created and has not deleted or sent yet (the
    /// upload way, SPEC §7): the next attempt deletes it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_draft: Option<String>,
}

impl MessageState {
    /// A fresh state for a message just accepted.
    pub fn new(
        id: &str,
        channel: &str,
        envelope: &crate::message::Envelope,
        size: u64,
        now: u64,
    ) -> Self {
        MessageState {
            version: FORMAT_VERSION,
            id: id.to_string(),
            channel: channel.to_string(),
            sender: envelope.sender.clone(),
            smtputf8: envelope.smtputf8,
            eightbit: envelope.eightbit,
            size,
            created_ms: now,
            attempts: 0,
            deferrals: 0,
            next_attempt_ms: now,
            last_reply: None,
            recipients: envelope
                .recipients
                .iter()
                .map(|r| Recipient {
                    addr: r.clone(),
                    status: RcptStatus::Pending,
                    reply: None,
                })
                .collect(),
            dsn: None,
            failure: None,
            sender_denied: false,
            graph_draft: None,
        }
    }

    /// Recipients still to deliver.
    pub fn pending(&self) -> usize {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Pending)
            .count()
    }

    /// Recipients that failed for good.
    pub fn failed(&self) -> usize {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Failed)
            .count()
    }
}

/// How many emptied files of delivered messages a spool keeps for reuse.
pub const SPARES_MAX: usize = 256;

/// Paths of a spool directory, and the spare files its clones share.
#[derive(Debug, Clone)]
pub struct Spool {
    /// `spool_dir`.
    pub root: PathBuf,
    /// Emptied files in `tmp/` that new messages reuse (see [`Spool::remove_delivered`]).
    spares: Arc<Mutex<Vec<PathBuf>>>,
    /// Concurrent commits share their fsyncs of `queue/`.
    queue_sync: Arc<GroupSync>,
    /// The commit log of small messages (opened on first use).
    journal: Arc<Journal>,
}

impl Spool {
    /// The spool rooted at `root` (nothing is touched on disk).
    pub fn new(root: &Path) -> Self {
        Spool {
            root: root.to_path_buf(),
            spares: Arc::default(),
            queue_sync: Arc::default(),
            journal: Arc::new(Journal::new(root)),
        }
    }

    /// The commit log of small messages.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Creates `path` (a new name in `tmp/`) for writing, mode 0600. A spare file is
    /// renamed there when there is one: reusing an inode is much cheaper than allocating
    /// one on a filesystem that has just freed many (ext4 scans past recently freed
    /// inodes). A spare keeps the mode it was created with, which may be wider (a file
    /// an older version created under umask 022), so it is set again on reuse.
    pub fn create_file(&self, path: &Path) -> io::Result<File> {
        if let Some((file, spare)) = self.take_spare() {
            if fs::rename(&spare, path).is_ok() {
                return Ok(file);
            }
            let _ = fs::remove_file(&spare);
        }
        create_new(path)
    }

    /// A spare file, open for writing where it lies in `tmp/` (see [`Spool::create_file`]).
    fn take_spare(&self) -> Option<(File, PathBuf)> {
        let spare = self.spares_lock().pop()?;
        // Not opened with O_TRUNC: the spare was emptied when it was retired (or removed
        // if it could not be), and on ext4 a truncate marks a file for a forced write-out
        // at close (the auto_da_alloc heuristic for programs that replace a file's
        // contents), which cost one I/O per message file.
        let opened = OpenOptions::new()
            .write(true)
            .open(&spare)
            .and_then(|file| {
                file.set_permissions(fs::Permissions::from_mode(crate::fsutil::FILE_MODE))?;
                Ok(file)
            });
        match opened {
            Ok(file) => Some((file, spare)),
            Err(_) => {
                let _ = fs::remove_file(&spare);
                None
            }
        }
    }

    /// Removes a delivered message like [`Spool::remove`], but keeps its files, renamed to
    /// `tmp/` and emptied, as spares for [`Spool::create_file`] (at most [`SPARES_MAX`]).
    /// `lock` is the message's delivery lock: released once the state file (the commit
    /// marker) is gone, before the data file, locked through it, can be reused.
    pub fn remove_delivered(&self, id: &str, lock: File) -> io::Result<()> {
        self.retire(&self.state_path(id))?;
        drop(lock);
        self.retire(&self.data_path(id))?;
        self.journal.forget(id);
        Ok(())
    }

    fn spares_lock(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retire(&self, path: &Path) -> io::Result<()> {
        if self.spares_lock().len() >= SPARES_MAX {
            return remove_if_exists(path);
        }
        let spare = self
            .tmp_dir()
            .join(format!("spare.{:016x}", rand::random::<u64>()));
        match fs::rename(path, &spare) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        // Emptied at once: a delivered message's bytes do not linger in the spool.
        match OpenOptions::new().write(true).truncate(true).open(&spare) {
            Ok(_) => self.spares_lock().push(spare),
            Err(_) => remove_if_exists(&spare)?,
        }
        Ok(())
    }

    /// `tmp/`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// `queue/`.
    pub fn queue_dir(&self) -> PathBuf {
        self.root.join("queue")
    }
    /// `failed/`.
    pub fn failed_dir(&self) -> PathBuf {
        self.root.join("failed")
    }
    /// `state/`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    /// `control/`.
    pub fn control_dir(&self) -> PathBuf {
        self.root.join("control")
    }
    /// `queue/<id>.eml`: the message bytes.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.queue_dir().join(format!("{id}.eml"))
    }
    /// `queue/<id>.json`: the envelope and state.
    pub fn state_path(&self, id: &str) -> PathBuf {
        self.queue_dir().join(format!("{id}.json"))
    }

    /// Creates the folders that are missing, mode 0700, and narrows existing ones to 0700.
    pub fn create_dirs(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.tmp_dir(),
            self.queue_dir(),
            self.failed_dir(),
            self.state_dir(),
            self.control_dir(),
            self.root.join("journal"),
        ] {
            crate::fsutil::private_dir(&dir)?;
        }
        // The folders' own entries: an acknowledged message's journal record is only as
        // durable as `journal/` itself.
        sync_dir(&self.root)
    }

    /// Writes `bytes` to `target` atomically: temp file in `tmp/`, fsync, rename, fsync the folder.
    pub fn write_atomic(&self, target: &Path, bytes: &[u8]) -> io::Result<()> {
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file");
        let tmp = self
            .tmp_dir()
            .join(format!("{name}.{:016x}.part", rand::random::<u64>()));
        crate::fsutil::write_atomic(target, &tmp, bytes)
    }

    /// Reads a state file; `None` if it does not exist.
    pub fn read_state_file(path: &Path) -> io::Result<Option<MessageState>> {
        let text = match read_current(path, u64::MAX) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        parse_state(path, &text).map(Some)
    }

    /// The state of queued message `id`; `None` if it is not (or no longer) queued.
    pub fn read_state(&self, id: &str) -> io::Result<Option<MessageState>> {
        Self::read_state_file(&self.state_path(id))
    }

    /// [`Spool::read_state`] for the holder of the message's delivery lock: no one
    /// replaces or retires its files meanwhile, so the read needs no check that the path
    /// still names the file read (two system calls fewer per delivery).
    pub fn read_state_locked(&self, id: &str) -> io::Result<Option<MessageState>> {
        let path = self.state_path(id);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        parse_state(&path, &text).map(Some)
    }

    /// Replaces the state of a queued message atomically.
    pub fn write_state(&self, state: &MessageState) -> io::Result<()> {
        self.write_atomic(&self.state_path(&state.id), &to_json(state))
    }

    /// Moves a received message from `tmp/<id>` into the queue and returns once it is
    /// durable: the data and a new state file are fsync'd in `tmp/`, renamed into `queue/`
    /// (data first: a reader never sees a state file without its data), and `queue/` is
    /// fsync'd once for both renames, a sync shared with concurrent commits ([`GroupSync`]).
    /// A crash before the directory fsync (never acknowledged) may leave the state file in
    /// `queue/` with the data still in `tmp/`: [`Spool::recover`] discards that message.
    pub fn commit(&self, tmp_data: &Path, state: &MessageState) -> io::Result<()> {
        let tmp_state = self.tmp_dir().join(format!("{}.json", state.id));
        let data = self.data_path(&state.id);
        let mut data_moved = false;
        let result = (|| {
            let mut file = self.create_file(&tmp_state)?;
            file.write_all(&to_json(state))?;
            File::open(tmp_data)?.sync_all()?;
            file.sync_all()?;
            fs::rename(tmp_data, &data)?;
            data_moved = true;
            fs::rename(&tmp_state, self.state_path(&state.id))?;
            let queue = self.queue_dir();
            self.queue_sync.sync(|| sync_dir(&queue))
        })();
        if result.is_err() {
            // Not acknowledged: leave nothing behind that could be delivered later.
            let _ = fs::remove_file(&tmp_state);
            if data_moved {
                let _ = remove_if_exists(&self.state_path(&state.id));
                let _ = fs::remove_file(&data);
            }
        }
        result
    }

    /// Queues a message received in memory (`data`, at most [`super::draft::INLINE_MAX`])
    /// and returns once it is durable: its two files are written into `queue/` (data
    /// straight there, the state through `tmp/` so a reader never sees half of it) without
    /// fsync, then its record in the journal is fsync'd, a sync shared with concurrent
    /// commits ([`Journal::commit`]). The journal holds it until its files are durable on
    /// their own. On failure nothing is left in `queue/`.
    pub fn commit_small(&self, data: &[u8], state: &MessageState) -> io::Result<()> {
        let mut tmp_state = self.tmp_dir().join(format!("{}.json", state.id));
        let data_path = self.data_path(&state.id);
        let json = to_json(state);
        let mut state_moved = false;
        let ticket = self.journal.begin();
        let result = (|| {
            self.create_file(&data_path)?.write_all(data)?;
            // Written where the spare lies and renamed into `queue/` from there: one
            // rename, where `create_file` would take two.
            let mut file = match self.take_spare() {
                Some((file, spare)) => {
                    tmp_state = spare;
                    file
                }
                None => create_new(&tmp_state)?,
            };
            file.write_all(&json)?;
            drop(file);
            fs::rename(&tmp_state, self.state_path(&state.id))?;
            state_moved = true;
            self.journal.commit(&json, data, &state.id, Some(ticket))
        })();
        if result.is_err() {
            // Not acknowledged: leave nothing behind that could be delivered later.
            let _ = remove_if_exists(&tmp_state);
            if state_moved {
                let _ = remove_if_exists(&self.state_path(&state.id));
            }
            let _ = remove_if_exists(&data_path);
        }
        result
    }

    /// Removes a delivered message: the state file (the commit marker) first, then the data.
    /// Not fsync'd: a removal lost to a power cut only means one more delivery
    /// (at-least-once), and a process crash cannot lose it.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        remove_if_exists(&self.state_path(id))?;
        remove_if_exists(&self.data_path(id))
    }

    /// Moves a message to `failed/` with its final state (which carries the reason).
    pub fn move_to_failed(&self, state: &MessageState) -> io::Result<()> {
        self.write_state(state)?;
        // A small message's data was made durable by the journal only, which retires
        // its segment without looking in `failed/`.
        File::open(self.data_path(&state.id))?.sync_all()?;
        let failed = self.failed_dir();
        fs::rename(
            self.data_path(&state.id),
            failed.join(format!("{}.eml", state.id)),
        )?;
        fs::rename(
            self.state_path(&state.id),
            failed.join(format!("{}.json", state.id)),
        )?;
        sync_dir(&failed)?;
        sync_dir(&self.queue_dir())
    }

    /// Ids of the messages in `queue/` (those with a state file), oldest id first.
    pub fn queued_ids(&self) -> io::Result<Vec<String>> {
        ids_in(&self.queue_dir())
    }

    /// Ids of the messages in `failed/`.
    pub fn failed_ids(&self) -> io::Result<Vec<String>> {
        ids_in(&self.failed_dir())
    }

    /// Start-up recovery: discards what was never acknowledged (a state file whose data is
    /// still in `tmp/`, data without a state file, everything in `tmp/`), finishes a
    /// half-done move to `failed/`. Returns how many files were removed.
    pub fn recover(&self) -> io::Result<usize> {
        self.create_dirs()?;
        // First: the journal may write back messages a power cut lost from `queue/`.
        self.journal.recover()?;
        let mut removed = 0;
        let queue = self.queue_dir();
        for entry in fs::read_dir(&queue)? {
            let path = entry?.path();
            let (Some(stem), Some(ext)) =
                (path.file_stem().and_then(|s| s.to_str()), path.extension())
            else {
                continue;
            };
            if ext == "restore" {
                // A write-back from the journal cut short: done again from the journal.
                fs::remove_file(&path)?;
                continue;
            }
            if ext == "json" && !self.data_path(stem).exists() {
                let failed_data = self.failed_dir().join(format!("{stem}.eml"));
                if failed_data.exists() {
                    fs::rename(&path, self.failed_dir().join(format!("{stem}.json")))?;
                } else if self.tmp_dir().join(stem).exists() {
                    // A commit cut short before its directory fsync: never acknowledged.
                    fs::remove_file(&path)?;
                    removed += 1;
                } else {
                    // Data gone without its marker: cannot be delivered; keep the state for the operator.
                    tracing::error!(
                        id = stem,
                        "spool: state file without message data, moving to failed/"
                    );
                    fs::rename(&path, self.failed_dir().join(format!("{stem}.json")))?;
                }
            } else if ext == "eml" && !self.state_path(stem).exists() {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        for entry in fs::read_dir(self.tmp_dir())? {
            let path = entry?.path();
            if path.is_file() {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        let narrowed = narrow_files(&queue)? + narrow_files(&self.failed_dir())?;
        if narrowed > 0 {
            tracing::warn!(
                files = narrowed,
                "spool: files readable by others (written by an older version) set to mode 0600"
            );
        }
        sync_dir(&queue)?;
        sync_dir(&self.failed_dir())?;
        Ok(removed)
    }
}

/// A new file at `path`, mode 0600.
fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::fsutil::FILE_MODE)
        .open(path)
}

fn parse_state(path: &Path, text: &[u8]) -> io::Result<MessageState> {
    serde_json::from_slice(text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Sets mode 0600 on the files in `dir` that others may read: older versions wrote DSNs
/// 0644 under umask 022, and client messages reused their files (issue 16). Returns how
/// many were changed.
fn narrow_files(dir: &Path) -> io::Result<usize> {
    let mut narrowed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let private = fs::Permissions::from_mode(crate::fsutil::FILE_MODE);
        // `queue delete` may remove a file meanwhile: gone is as good as private.
        let result = entry.metadata().and_then(|meta| {
            if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(entry.path(), private).map(|()| 1)
            } else {
                Ok(0)
            }
        });
        match result {
            Ok(n) => narrowed += n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(narrowed)
}

/// Longest a commit waits for directory fsyncs run by other commits.
const GROUP_SYNC_WAIT: Duration = Duration::from_secs(60);

/// Group commit of one directory's fsync: a caller that arrives while a sync runs waits
/// for the next one, which covers every caller waiting by then, so N concurrent commits
/// cost about two directory fsyncs instead of N.
#[derive(Debug, Default)]
pub struct GroupSync {
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Tickets handed out, one per call, in order.
    issued: u64,
    /// Every ticket up to this one is covered by a successful sync.
    synced: u64,
    /// A sync is running.
    running: bool,
}

impl GroupSync {
    /// Returns once a successful `sync`, started after this call began, has finished:
    /// the caller's earlier changes are then durable. A failed sync is reported to the
    /// caller that ran it; the others try again themselves.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let deadline = Instant::now() + GROUP_SYNC_WAIT;
        let mut state = self.lock();
        state.issued += 1;
        let ticket = state.issued;
        loop {
            if state.synced >= ticket {
                return Ok(());
            }
            if !state.running {
                state.running = true;
                let covers = state.issued;
                drop(state);
                let result = sync();
                let mut state = self.lock();
                state.running = false;
                if result.is_ok() {
                    state.synced = state.synced.max(covers);
                }
                drop(state);
                self.changed.notify_all();
                return result;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "waited too long for a directory fsync",
                ));
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The JSON text of a state file (pretty, so an operator can read it).
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    bytes.push(b'\n');
    bytes
}

pub use crate::fsutil::sync_dir;

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn ids_in(dir: &Path) -> io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            ids.push(stem.to_string());
        }
    }
    ids.sort();
    Ok(ids)
}

/// Opens a message's data file and takes the exclusive delivery lock on it without waiting.
/// `Ok(None)`: someone else holds it. `Err(NotFound)`: the message is gone.
pub fn try_lock_data(path: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new().read(true).open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The header section of a message file (up to the empty line; at most `max` bytes, cut
/// after the last whole line: a cut between CR and LF would leave a bare CR, which no
/// upstream is sent).
pub fn read_headers(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = read_current(path, max as u64)?;
    if let Some(end) = find(&buf, b"\r\n\r\n") {
        buf.truncate(end + 2);
    } else if let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
        buf.truncate(end + 1);
    } else {
        buf.clear();
    }
    Ok(buf)
}

/// Reads up to `max` bytes of the file at `path`, making sure it is still the file at
/// `path` when the read is done. A reader without the delivery lock (`mailgate queue
/// list`/`show`) may open a file just as it is replaced (a state rewrite: read the new
/// one) or retired and reused for another message ([`Spool::remove_delivered`]: the
/// message is gone, and the bytes read belong to another one).
fn read_current(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    for _ in 0..3 {
        let mut file = File::open(path)?;
        let open = file.metadata()?;
        // Sized up front: `take` hides the file's length from `read_to_end`, which then
        // reads in growing steps (7 reads a state file; `queue list` of 100,000 queued
        // messages made 690,000 of them).
        let expected = open.len().min(max).saturating_add(1);
        let mut buf = Vec::with_capacity(usize::try_from(expected).unwrap_or(0).min(1 << 20));
        (&mut file).take(max).read_to_end(&mut buf)?;
        if names(path, &open)? {
            return Ok(buf);
        }
    }
    Err(io::Error::other(format!(
        "{}: changed while being read",
        path.display()
    )))
}

/// Whether `path` still names the file `file` is open on.
#[cfg(test)]
fn still_at(file: &File, path: &Path) -> io::Result<bool> {
    names(path, &file.metadata()?)
}

/// Whether `path` names the file whose metadata is `open`.
fn names(path: &Path, open: &fs::Metadata) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(now) => Ok(now.dev() == open.dev() && now.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Envelope;
    use crate::queue::SpoolDraft;
    use crate::queue::draft::INLINE_MAX;

    /// Puts an in-memory message in its temp file, as a large one is, to test
    /// [`Spool::commit`] (the proxy commits those with [`Spool::commit_small`]).
    fn write_out(closed: &super::super::draft::ClosedDraft, spool: &Spool) -> io::Result<()> {
        match &closed.inline {
            Some(bytes) => spool.create_file(&closed.path)?.write_all(bytes),
            None => Ok(()),
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            sender: "a@example.com".into(),
            recipients: vec!["b@example.org".into(), "c@example.org".into()],
            ..Default::default()
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut st = MessageState::new("id1", "relay", &envelope(), 42, 1000);
        st.recipients[1].status = RcptStatus::Failed;
        st.recipients[1].reply = Some("550 5.1.1 no such user".into());
        let back: MessageState = serde_json::from_slice(&to_json(&st)).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.pending(), 1);
        assert_eq!(back.failed(), 1);
    }

    /// A message that stayed in memory leaves `tmp/` alone: dropping its draft removes
    /// nothing (no `unlink` per message), while a large one's draft removes its file.
    #[tokio::test]
    async fn a_draft_removes_only_what_it_may_have_written() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let path = spool.tmp_dir().join("m1");

        let mut sent = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        sent.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        let closed = sent.close().await.unwrap();
        assert!(closed.inline.is_some());
        // Stands for anything at that path the draft did not make.
        fs::write(&path, b"not the draft's").unwrap();
        drop(sent);
        assert!(path.exists(), "an in-memory relayed draft must not unlink");
        fs::remove_file(&path).unwrap();

        let mut large = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        large.write(&vec![b'a'; INLINE_MAX + 1]).await.unwrap();
        let closed = large.close().await.unwrap();
        assert!(closed.inline.is_none() && path.exists());
        drop(large);
        assert!(!path.exists(), "a large relayed draft's file goes with it");
    }

    #[tokio::test]
    async fn draft_commit_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();

        // A committed message survives recovery.
        let mut draft = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        draft.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        let closed = draft.close().await.unwrap();
        write_out(&closed, &spool).unwrap();
        let st = MessageState::new("m1", "relay", &envelope(), draft.len(), now_ms());
        spool.commit(&closed.path, &st).unwrap();
        drop(draft);

        // A draft never committed, and data whose marker never got written, are removed.
        let mut orphan = SpoolDraft::create(&spool, "m2".into()).await.unwrap();
        orphan.write(b"x").await.unwrap();
        write_out(&orphan.close().await.unwrap(), &spool).unwrap();
        std::mem::forget(orphan); // as if the process died here
        fs::write(spool.data_path("m3"), b"half committed").unwrap();

        assert_eq!(spool.recover().unwrap(), 2);
        assert_eq!(spool.queued_ids().unwrap(), vec!["m1".to_string()]);
        assert_eq!(spool.read_state("m1").unwrap().unwrap(), st);
        assert_eq!(
            fs::read(spool.data_path("m1")).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        assert_eq!(
            read_headers(&spool.data_path("m1"), 1000).unwrap(),
            b"Subject: x\r\n"
        );
    }

    #[test]
    fn headers_cut_at_the_limit_end_on_a_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        fs::write(
            &path,
            b"Subject: x\r\nX-Long: abcdef\r\nX-More: y\r\n\r\nbody\r\n",
        )
        .unwrap();
        // 27 bytes end between the CR and the LF of the second line.
        assert_eq!(read_headers(&path, 27).unwrap(), b"Subject: x\r\n");
        assert_eq!(read_headers(&path, 5).unwrap(), b"");
    }

    #[tokio::test]
    async fn commit_cut_short_before_the_directory_fsync_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        // The state file's rename reached the disk, the data's did not: never acknowledged.
        let mut draft = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        draft.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        write_out(&draft.close().await.unwrap(), &spool).unwrap();
        std::mem::forget(draft);
        let st = MessageState::new("m1", "relay", &envelope(), 20, now_ms());
        fs::write(spool.state_path("m1"), to_json(&st)).unwrap();

        assert_eq!(spool.recover().unwrap(), 2);
        assert!(spool.queued_ids().unwrap().is_empty());
        assert!(spool.failed_ids().unwrap().is_empty());
        assert_eq!(fs::read_dir(spool.tmp_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn commit_leaves_nothing_in_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let mut draft = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        draft.write(b"x").await.unwrap();
        let closed = draft.close().await.unwrap();
        write_out(&closed, &spool).unwrap();
        let tmp = closed.path;
        let st = MessageState::new("m1", "relay", &envelope(), 1, now_ms());
        spool.commit(&tmp, &st).unwrap();
        drop(draft);
        assert_eq!(fs::read_dir(spool.tmp_dir()).unwrap().count(), 0);
        assert_eq!(spool.read_state("m1").unwrap().unwrap(), st);
        assert_eq!(fs::read(spool.data_path("m1")).unwrap(), b"x");
        // A second commit of the same id fails (its data is gone) and changes nothing.
        assert!(spool.commit(&tmp, &st).is_err());
        assert_eq!(spool.read_state("m1").unwrap().unwrap(), st);
        assert_eq!(fs::read_dir(spool.tmp_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn small_messages_stay_in_memory_and_commit_through_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let mut draft = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        draft.write(b"Subject: x\r\n").await.unwrap();
        draft.write(b"\r\nbody\r\n").await.unwrap();
        assert_eq!(fs::read_dir(spool.tmp_dir()).unwrap().count(), 0);
        let closed = draft.close().await.unwrap();
        assert!(draft.write(b"more").await.is_err());
        assert_eq!(
            closed.inline.as_deref(),
            Some(&b"Subject: x\r\n\r\nbody\r\n"[..])
        );
        // Committed straight into `queue/`, durable through the journal.
        let st = MessageState::new("m1", "relay", &envelope(), draft.len(), now_ms());
        spool
            .commit_small(closed.inline.as_deref().unwrap(), &st)
            .unwrap();
        drop(draft);
        assert_eq!(fs::read_dir(spool.tmp_dir()).unwrap().count(), 0);
        assert_eq!(
            fs::read(spool.data_path("m1")).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        assert_eq!(spool.read_state("m1").unwrap().unwrap(), st);
        assert_eq!(fs::read_dir(dir.path().join("journal")).unwrap().count(), 1);

        // An empty message still gets its (empty) file.
        let mut empty = SpoolDraft::create(&spool, "m2".into()).await.unwrap();
        let closed = empty.close().await.unwrap();
        let st = MessageState::new("m2", "relay", &envelope(), 0, now_ms());
        spool
            .commit_small(closed.inline.as_deref().unwrap(), &st)
            .unwrap();
        assert_eq!(fs::read(spool.data_path("m2")).unwrap(), b"");

        // Retired: the journal is gone, the files are what is left.
        spool.journal().retire_due(true).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("journal")).unwrap().count(), 0);
        assert_eq!(spool.queued_ids().unwrap(), vec!["m1", "m2"]);
    }

    #[tokio::test]
    async fn large_messages_stream_to_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let half = vec![b'x'; INLINE_MAX / 2 + 1];
        let mut draft = SpoolDraft::create(&spool, "m1".into()).await.unwrap();
        draft.write(&half).await.unwrap();
        let path = spool.tmp_dir().join("m1");
        assert!(!path.exists());
        draft.write(&half).await.unwrap();
        assert!(path.exists());
        draft.write(b"end").await.unwrap();
        assert_eq!(draft.len(), 2 * half.len() as u64 + 3);
        let closed = draft.close().await.unwrap();
        assert!(closed.inline.is_none());
        write_out(&closed, &spool).unwrap();
        let mut want = [half.as_slice(), half.as_slice()].concat();
        want.extend_from_slice(b"end");
        assert_eq!(fs::read(&path).unwrap(), want);
        drop(draft);
        assert!(!path.exists());
    }

    #[test]
    fn delivered_files_are_emptied_and_reused() {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        fs::write(spool.data_path("m1"), b"Subject: secret\r\n\r\n").unwrap();
        // As an older version's DSN was: a spare keeps it, a file made from one must not.
        fs::set_permissions(spool.data_path("m1"), fs::Permissions::from_mode(0o644)).unwrap();
        spool
            .write_state(&MessageState::new("m1", "relay", &envelope(), 21, 1))
            .unwrap();
        let mut before = vec![ino(&spool.data_path("m1")), ino(&spool.state_path("m1"))];
        let lock = try_lock_data(&spool.data_path("m1")).unwrap().unwrap();

        spool.remove_delivered("m1", lock).unwrap();
        assert!(spool.queued_ids().unwrap().is_empty());
        assert!(!spool.data_path("m1").exists());
        let spares: Vec<PathBuf> = fs::read_dir(spool.tmp_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(spares.len(), 2);
        assert!(spares.iter().all(|p| fs::metadata(p).unwrap().len() == 0));

        // The next two files are those two; the data file is no longer locked.
        let mut reused = Vec::new();
        for name in ["a", "b"] {
            let path = spool.tmp_dir().join(name);
            spool.create_file(&path).unwrap().write_all(b"new").unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"new");
            assert!(try_lock_data(&path).unwrap().is_some());
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
            reused.push(ino(&path));
        }
        before.sort();
        reused.sort();
        assert_eq!(reused, before);
        let fresh = spool.tmp_dir().join("c");
        spool.create_file(&fresh).unwrap();
        assert!(!before.contains(&ino(&fresh)));

        // A message already gone is no error.
        spool
            .remove_delivered("gone", File::open(&fresh).unwrap())
            .unwrap();
        // Spares removed behind the spool's back (recovery empties tmp/) are skipped.
        fs::write(spool.data_path("m2"), b"x").unwrap();
        let lock = try_lock_data(&spool.data_path("m2")).unwrap().unwrap();
        spool.remove_delivered("m2", lock).unwrap();
        spool.recover().unwrap();
        let path = spool.tmp_dir().join("d");
        spool.create_file(&path).unwrap().write_all(b"ok").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"ok");
    }

    #[test]
    fn recovery_makes_files_an_older_version_left_readable_private() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        spool
            .write_state(&MessageState::new("m1", "relay", &envelope(), 1, 1))
            .unwrap();
        let files = [
            spool.data_path("m1"),
            spool.failed_dir().join("m2.eml"),
            spool.failed_dir().join("m2.json"),
        ];
        for path in &files {
            fs::write(path, b"x").unwrap();
            fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
        }
        assert_eq!(spool.recover().unwrap(), 0);
        for path in files.iter().chain([&spool.state_path("m1")]) {
            let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }

    #[test]
    fn a_file_replaced_while_read_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        fs::write(&path, b"one").unwrap();
        let file = File::open(&path).unwrap();
        assert!(still_at(&file, &path).unwrap());
        fs::write(dir.path().join("other"), b"two").unwrap();
        fs::rename(dir.path().join("other"), &path).unwrap();
        assert!(!still_at(&file, &path).unwrap());
        assert_eq!(read_current(&path, 100).unwrap(), b"two");
        fs::remove_file(&path).unwrap();
        assert!(!still_at(&file, &path).unwrap());
        assert_eq!(Spool::read_state_file(&path).unwrap(), None);
    }

    #[test]
    fn group_sync_runs_for_a_lone_caller_and_reports_failures() {
        let group = GroupSync::default();
        let mut runs = 0;
        for _ in 0..3 {
            group
                .sync(|| {
                    runs += 1;
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(runs, 3);
        let err = group
            .sync(|| Err(io::Error::other("disk on fire")))
            .unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
        group
            .sync(|| {
                runs += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(runs, 4);
    }

    #[test]
    fn concurrent_callers_share_a_sync() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const CALLERS: u64 = 8;
        let group = GroupSync::default();
        let runs = AtomicUsize::new(0);
        // Bounded wait for a condition another thread makes true.
        let wait_for = |what: &dyn Fn(&GroupState) -> bool| {
            for _ in 0..10_000 {
                if what(&group.lock()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("group sync never got there");
        };
        std::thread::scope(|s| {
            // The first caller's sync lasts until every other caller is waiting: it
            // covers only itself, and the next sync covers all the others.
            let first = s.spawn(|| {
                group.sync(|| {
                    wait_for(&|st| st.issued == CALLERS);
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            });
            wait_for(&|st| st.running);
            let others: Vec<_> = (1..CALLERS)
                .map(|_| {
                    s.spawn(|| {
                        group.sync(|| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        })
                    })
                })
                .collect();
            first.join().unwrap().unwrap();
            for other in others {
                other.join().unwrap().unwrap();
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(group.lock().synced, CALLERS);
    }

    #[test]
    fn half_done_failed_move_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let st = MessageState::new("m1", "relay", &envelope(), 1, 1);
        fs::write(spool.failed_dir().join("m1.eml"), b"x").unwrap();
        spool.write_state(&st).unwrap();
        spool.recover().unwrap();
        assert!(spool.queued_ids().unwrap().is_empty());
        assert_eq!(spool.failed_ids().unwrap(), vec!["m1".to_string()]);
    }

    #[test]
    fn delivery_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.eml");
        fs::write(&path, b"x").unwrap();
        let held = try_lock_data(&path).unwrap();
        assert!(held.is_some());
        assert!(try_lock_data(&path).unwrap().is_none());
        drop(held);
        assert!(try_lock_data(&path).unwrap().is_some());
        assert_eq!(
            try_lock_data(&dir.path().join("gone.eml"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
