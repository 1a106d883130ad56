//! The commit log: how a small message becomes durable with a share of one fsync.
//!
//! Before `250`, a message and its envelope must be on disk (SPEC §6). Syncing each
//! message's two files costs two device flushes per message (three I/Os each on an ext4
//! without a journal), and on this kind of machine that, not mailgate's code, was most of
//! the time a message took. Instead, a commit appends the message and its envelope as one
//! record to the current segment `journal/<boot id>.<n>.log`, and one `fdatasync` covers
//! every record appended before it started: the commits waiting meanwhile share it (group
//! commit across sessions). The message's own files in `queue/` are still written, into
//! the page cache: the rest of the spool reads only them, and the log is read only at
//! start-up.
//!
//! A segment is needed until the files of its messages are durable on their own. It is
//! retired when it is full or a few seconds old: the files of its messages still queued
//! are fsync'd (a delivered message has no files left, so in the usual case there is
//! nothing to sync), then the segment is deleted.
//!
//! At start-up a segment left over from this boot (the boot id in its name matches) is
//! only retired, once the proxy runs: the process died but the kernel kept every file it
//! had written. A segment from an earlier boot means the machine went down (or rebooted
//! without a clean stop) with the files possibly unwritten: each record whose message is
//! neither in `failed/` (nor half moved there) nor intact in `queue/` is written back
//! from the record. A message delivered, deleted, or refused its `250` by a failed sync
//! in the last seconds before that can so be delivered again (at-least-once, as before:
//! removals were never fsync'd either).
//!
//! Only the waiter leading a group ever syncs a segment, and a failed sync (or write)
//! fails every record not yet synced and ends the segment: after a failed fsync a second
//! one may report success for data the kernel dropped.
//!
//! Record: `MGJ1`, state length (u32 LE), data length (u32 LE), the first 16 bytes of
//! SHA-256 over state and data, the state JSON, the data. A record cut short or damaged
//! (the tail of a segment after a power cut) was never acknowledged, and ends the replay
//! of its segment.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::spool::{MessageState, sync_dir};

const MAGIC: &[u8; 4] = b"MGJ1";
const HEADER_LEN: usize = 4 + 4 + 4 + 16;
/// A segment this large is retired and a new one started.
pub const SEGMENT_MAX: u64 = 8 << 20;
/// A segment this old is retired (on the next append or by [`Journal::retire_due`]):
/// after a power cut only this much recent history is replayed.
pub const SEGMENT_AGE: Duration = Duration::from_secs(2);
/// Longest a commit waits for syncs run by other commits.
const SYNC_WAIT: Duration = Duration::from_secs(60);
/// Longest a group's sync waits for commits already writing their files to append
/// their records too: one sync then covers them. A lone commit never waits.
const GATHER_WAIT: Duration = Duration::from_micros(300);

/// Syncs a segment's records to disk ([`File::sync_data`]; tests inject failures).
type SyncFn = fn(&File) -> io::Result<()>;

/// The commit log of one spool (see the module documentation).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    queue_dir: PathBuf,
    failed_dir: PathBuf,
    boot: String,
    sync: SyncFn,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Wakes a leader gathering its group when a record is appended.
    appended: Condvar,
}

#[derive(Debug, Default)]
struct Inner {
    /// The segment new records go to; opened on the first append.
    current: Option<Segment>,
    /// Segments taken out of use, to be retired by [`Journal::retire_due`].
    retiring: Vec<Retiring>,
    /// Records appended so far, numbered from 1.
    appended: u64,
    /// Every record up to this one is durable, unless listed in `lost`.
    synced: u64,
    /// A sync of the current segment is running.
    syncing: bool,
    /// Records whose sync failed: never acknowledged (fsync after a failed fsync proves
    /// nothing, so a failure ends its segment and these fail for good).
    lost: Vec<(u64, u64)>,
    /// Segments taken out of use with records not yet synced, and the last record in
    /// each: the next sync covers them before the current segment.
    unsynced: Vec<(Arc<File>, u64)>,
    /// Syncs run (tests check that commits share them).
    syncs: u64,
    /// Commits between [`Journal::begin`] and their append.
    writing: usize,
    /// A leader waits for those before it syncs.
    gathering: bool,
}

/// A commit on its way to the journal ([`Journal::begin`]): a group's sync waits briefly
/// for it. Dropped without [`Journal::commit`], it stops being waited for.
#[derive(Debug)]
pub struct Ticket<'a> {
    journal: &'a Journal,
    live: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.live {
            let mut inner = self.journal.lock();
            inner.writing = inner.writing.saturating_sub(1);
            if inner.gathering {
                self.journal.appended.notify_one();
            }
        }
    }
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Where the next record goes.
    len: u64,
    /// Bytes written as zeros ahead of the records: a sync of records written over them
    /// writes only data, where one that extends the file also writes its inode.
    allocated: u64,
    opened: Instant,
    /// The messages recorded in it and not delivered since, for retiring.
    ids: HashSet<String>,
}

/// A segment out of use, waiting to be retired.
#[derive(Debug)]
struct Retiring {
    path: PathBuf,
    /// Its last record: it is retired once every record up to this one is synced or
    /// lost (0 for a segment a process that died left).
    last_seq: u64,
    /// Its messages not delivered since; `None` for a segment a process that died left:
    /// unknown without reading it, so retiring it syncs the whole filesystem.
    ids: Option<HashSet<String>>,
}

/// Retiring more messages than this syncs the spool's filesystem once (`syncfs`) rather
/// than two files each: a backlog on a broken channel would otherwise cost its retiring
/// two fsyncs per message, more than the intake (and a restart after 100,000 such
/// messages spent 27 s on it).
const SYNC_FS_OVER: usize = 64;

/// The first stretch of zeros a segment gets; each further one doubles, up to
/// [`ZEROS_MAX`].
const ZEROS_MIN: u64 = 64 << 10;
const ZEROS_MAX: u64 = 1 << 20;

impl Segment {
    /// Taken out of use, its last record being `last_seq`.
    fn out_of_use(self, last_seq: u64) -> Retiring {
        Retiring {
            path: self.path,
            last_seq,
            ids: Some(self.ids),
        }
    }

    /// Writes `record` at the end of the records, first adding zeros past the end when
    /// it does not fit (replay stops at the first zero, which is no record).
    fn write(&mut self, record: &[u8], sync: SyncFn) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.len + record.len() as u64;
        if end > self.allocated {
            let step = self.allocated.clamp(ZEROS_MIN, ZEROS_MAX);
            let grown = end.max(self.allocated + step);
            let zeros = vec![0; usize::try_from(grown - self.allocated).map_err(io::Error::other)?];
            self.file.write_all_at(&zeros, self.allocated)?;
            // Synced now, so that the blocks are allocated: a later sync of records
            // written over them then has no metadata to write.
            sync(&self.file)?;
            self.allocated = grown;
        }
        self.file.write_all_at(record, self.len)?;
        self.len = end;
        Ok(())
    }
}

impl Journal {
    /// The log of the spool at `root` (nothing is touched on disk until the first append
    /// or [`Journal::recover`]).
    pub fn new(root: &Path) -> Self {
        Journal::with_boot(root, &boot_id())
    }

    fn with_boot(root: &Path, boot: &str) -> Self {
        Journal {
            dir: root.join("journal"),
            queue_dir: root.join("queue"),
            failed_dir: root.join("failed"),
            boot: boot.to_string(),
            sync: File::sync_data,
            inner: Mutex::default(),
            changed: Condvar::new(),
            appended: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces a commit that is writing its files: a sync about to start waits a
    /// little for its record ([`GATHER_WAIT`]).
    pub fn begin(&self) -> Ticket<'_> {
        self.lock().writing += 1;
        Ticket {
            journal: self,
            live: true,
        }
    }

    /// Records message `state.id` (its envelope and `data`) and returns once the record
    /// is durable: fsync'd together with the records of the commits that wait meanwhile.
    pub fn commit(
        &self,
        state_json: &[u8],
        data: &[u8],
        id: &str,
        ticket: Option<Ticket<'_>>,
    ) -> io::Result<()> {
        let record = encode(state_json, data)?;
        let seq = self.append(&record, id, ticket)?;
        self.wait_durable(seq)
    }

    fn append(&self, record: &[u8], id: &str, ticket: Option<Ticket<'_>>) -> io::Result<u64> {
        let mut inner = self.lock();
        if let Some(mut ticket) = ticket {
            ticket.live = false;
            inner.writing = inner.writing.saturating_sub(1);
        }
        if inner.gathering {
            // Appended or not, this commit no longer keeps the leader waiting.
            self.appended.notify_one();
        }
        let due = inner
            .current
            .as_ref()
            .is_none_or(|s| s.len >= SEGMENT_MAX || s.opened.elapsed() >= SEGMENT_AGE);
        if due {
            self.take_current(&mut inner);
            inner.current = Some(self.open_segment()?);
        }
        let seq = inner.appended + 1;
        let sync = self.sync;
        let Some(segment) = inner.current.as_mut() else {
            return Err(io::Error::other("journal: no segment"));
        };
        if let Err(e) = segment.write(record, sync) {
            // A short write leaves a damaged tail, and a failed sync of the zeros may
            // have dropped the segment's unsynced records: they all fail, and the
            // segment ends so no later record follows them.
            tracing::error!(error = %e, "spool: journal write failed");
            self.fail_unsynced(&mut inner);
            return Err(e);
        }
        segment.ids.insert(id.to_string());
        inner.appended = seq;
        Ok(seq)
    }

    /// Takes the current segment out of use; it waits to be retired. Its records not yet
    /// synced are left to the next sync, which covers them first ([`Inner::unsynced`]):
    /// only the waiter that leads a group ever syncs, so no two syncs of one file race
    /// (after a failed fsync, a second one may report success for lost data).
    fn take_current(&self, inner: &mut Inner) {
        let Some(old) = inner.current.take() else {
            return;
        };
        if inner.appended > inner.synced {
            let last = inner.appended;
            inner.unsynced.push((old.file.clone(), last));
        }
        let last = inner.appended;
        inner.retiring.push(old.out_of_use(last));
    }

    /// A sync or write failed: every record not yet synced fails for good, and the
    /// current segment ends without another sync.
    fn fail_unsynced(&self, inner: &mut Inner) {
        let (from, to) = (inner.synced + 1, inner.appended);
        if from <= to {
            inner.lost.push((from, to));
        }
        inner.unsynced.clear();
        if let Some(old) = inner.current.take() {
            inner.retiring.push(old.out_of_use(to));
        }
        self.changed.notify_all();
    }

    /// Every record up to this one is synced or lost.
    fn resolved(inner: &Inner) -> u64 {
        // Lost ranges start right after what was synced when they were recorded, and
        // `synced` only grows: none leaves a gap below its end.
        inner
            .lost
            .iter()
            .map(|&(_, b)| b)
            .fold(inner.synced, u64::max)
    }

    fn open_segment(&self) -> io::Result<Segment> {
        crate::fsutil::private_dir(&self.dir)?;
        let path = self
            .dir
            .join(format!("{}.{}.log", self.boot, crate::message::new_id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::fsutil::FILE_MODE)
            .open(&path)?;
        // The segment's own name must survive before any record in it is acknowledged.
        sync_dir(&self.dir)?;
        Ok(Segment {
            file: Arc::new(file),
            path,
            len: 0,
            allocated: 0,
            opened: Instant::now(),
            ids: HashSet::new(),
        })
    }

    /// Returns once record `seq` is durable: a sync that started after it was appended
    /// has succeeded. The first waiter runs the sync; the others wait for it, then the
    /// next one runs another for all who came meanwhile.
    fn wait_durable(&self, seq: u64) -> io::Result<()> {
        let deadline = Instant::now() + SYNC_WAIT;
        let mut inner = self.lock();
        loop {
            if inner.lost.iter().any(|&(a, b)| a <= seq && seq <= b) {
                return Err(io::Error::other("journal: the sync of this message failed"));
            }
            if inner.synced >= seq {
                return Ok(());
            }
            if !inner.syncing {
                if inner.unsynced.is_empty() && inner.current.is_none() {
                    return Err(io::Error::other("journal: record in no segment"));
                }
                inner.syncing = true;
                inner.syncs += 1;
                // Commits already writing their files join this sync rather than wait
                // for the next one (bounded; a lone commit does not wait at all).
                let gather = Instant::now() + GATHER_WAIT;
                inner.gathering = true;
                while inner.writing > 0 {
                    let left = gather.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    inner = self
                        .appended
                        .wait_timeout(inner, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                inner.gathering = false;
                // Segments taken out of use first, then the current one.
                let mut files: Vec<Arc<File>> =
                    inner.unsynced.iter().map(|(f, _)| f.clone()).collect();
                files.extend(inner.current.as_ref().map(|s| s.file.clone()));
                let covers = inner.appended;
                drop(inner);
                let result = files.iter().try_for_each(|f| (self.sync)(f));
                inner = self.lock();
                inner.syncing = false;
                match result {
                    Ok(()) => {
                        inner.synced = inner.synced.max(covers);
                        let synced = inner.synced;
                        inner.unsynced.retain(|&(_, last)| last > synced);
                        self.changed.notify_all();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "spool: journal sync failed");
                        self.fail_unsynced(&mut inner);
                    }
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Counted as lost, so that its segment can still be retired.
                inner.lost.push((seq, seq));
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "waited too long for the journal's fsync",
                ));
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Message `id` left `queue/` (delivered): its segment has nothing to sync for it.
    /// Only saves work; a message not forgotten is looked for when its segment retires.
    pub fn forget(&self, id: &str) {
        let mut inner = self.lock();
        if let Some(segment) = inner.current.as_mut()
            && segment.ids.remove(id)
        {
            return;
        }
        for segment in inner.retiring.iter_mut() {
            if segment.ids.as_mut().is_some_and(|ids| ids.remove(id)) {
                return;
            }
        }
    }

    /// Retires the segments taken out of use, and the current one once it is
    /// [`SEGMENT_AGE`] old (or at once with `all`, at shutdown): the files of their
    /// messages still in `queue/` are fsync'd, then the segments are deleted. Blocking;
    /// the running proxy calls it every [`super::CONTROL_POLL`].
    pub fn retire_due(&self, all: bool) -> io::Result<()> {
        let segments = {
            let mut inner = self.lock();
            if inner
                .current
                .as_ref()
                .is_some_and(|s| all || s.opened.elapsed() >= SEGMENT_AGE)
            {
                self.take_current(&mut inner);
            }
            // A segment whose records still wait for their sync stays for next time.
            let resolved = Self::resolved(&inner);
            let (ready, waiting) = std::mem::take(&mut inner.retiring)
                .into_iter()
                .partition(|s| s.last_seq <= resolved);
            inner.retiring = waiting;
            ready
        };
        if segments.is_empty() {
            return Ok(());
        }
        let result = {
            // `None`: sync the whole filesystem (too many messages, or unknown ones).
            let ids: Option<Vec<&String>> = segments
                .iter()
                .try_fold(Vec::new(), |mut all, s| {
                    all.extend(s.ids.as_ref()?);
                    Some(all)
                })
                .filter(|all| all.len() <= SYNC_FS_OVER);
            let paths: Vec<&Path> = segments.iter().map(|s| s.path.as_path()).collect();
            self.settle(ids.as_deref(), &paths)
        };
        if result.is_err() {
            // Kept: tried again next time (and start-up handles what is left).
            self.lock().retiring.extend(segments);
        }
        result
    }

    /// Makes the files of `ids` still in `queue/` durable on their own (with `None`, by
    /// syncing the spool's filesystem), then deletes the segments at `paths`.
    fn settle(&self, ids: Option<&[&String]>, paths: &[&Path]) -> io::Result<()> {
        let mut synced = false;
        match ids {
            Some(ids) => {
                let each = ids.iter().try_for_each(|id| {
                    ["eml", "json"].iter().try_for_each(|ext| {
                        match File::open(self.queue_dir.join(format!("{id}.{ext}"))) {
                            Ok(file) => {
                                synced = true;
                                file.sync_all()
                            }
                            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                            Err(e) => Err(e),
                        }
                    })
                });
                if let Err(e) = each {
                    // One file that cannot be opened (or synced) must not keep every
                    // segment from retiring: the filesystem sync covers it.
                    tracing::warn!(error = %e, "spool: retiring a journal segment: syncing the filesystem instead");
                    rustix::fs::syncfs(File::open(&self.queue_dir)?)?;
                    synced = true;
                }
            }
            None => {
                rustix::fs::syncfs(File::open(&self.queue_dir)?)?;
                synced = true;
            }
        }
        // After a syncfs too: its last metadata writes may follow its device flush, and
        // a directory fsync ends with one.
        if synced {
            sync_dir(&self.queue_dir)?;
        }
        for path in paths {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        sync_dir(&self.dir)
    }

    /// Start-up, before the spool's own recovery: replays the segments of an earlier boot
    /// (the machine went down), and hands those this boot left (the process died, its
    /// files are in the page cache) to [`Journal::retire_due`]. Returns how many messages
    /// were written back.
    pub fn recover(&self) -> io::Result<usize> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut restored = 0;
        let mut segments: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                segments.push(path);
            }
        }
        segments.sort();
        for path in segments {
            let this_boot = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.split('.').next() == Some(self.boot.as_str()));
            if this_boot {
                // Retired once the proxy runs, not before it listens: the files are in
                // the page cache, and until then the segment stays as their record.
                self.lock().retiring.push(Retiring {
                    path,
                    last_seq: 0,
                    ids: None,
                });
                continue;
            }
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let records = decode_all(&bytes);
            for record in &records {
                if self.restore(record)? {
                    restored += 1;
                }
            }
            sync_dir(&self.queue_dir)?;
            fs::remove_file(&path)?;
            sync_dir(&self.dir)?;
        }
        if restored > 0 {
            tracing::warn!(
                restored,
                "spool: the machine went down since these messages were accepted; written back from the journal (a message delivered just before may be delivered again)"
            );
        }
        Ok(restored)
    }

    /// Writes one record's message back into `queue/` where the power cut lost it.
    /// Returns whether anything was written.
    fn restore(&self, record: &Record) -> io::Result<bool> {
        let id = &record.state.id;
        // In `failed/`, or half moved there (recovery finishes the move).
        if ["json", "eml"]
            .iter()
            .any(|ext| self.failed_dir.join(format!("{id}.{ext}")).exists())
        {
            return Ok(false);
        }
        let mut wrote = false;
        let data_path = self.queue_dir.join(format!("{id}.eml"));
        if fs::read(&data_path).ok().as_deref() != Some(record.data.as_slice()) {
            write_synced(&data_path, &record.data)?;
            wrote = true;
        }
        // A state file that reads is kept: it may record attempts made since.
        let state_path = self.queue_dir.join(format!("{id}.json"));
        let readable = fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<MessageState>(&b).ok())
            .is_some_and(|s| &s.id == id);
        if !readable {
            write_synced(&state_path, &record.state_json)?;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Syncs run so far.
    #[cfg(test)]
    fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

/// Writes `path` through `<path>.restore` (fsync'd, renamed; the caller syncs the folder).
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".restore");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::fsutil::FILE_MODE)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); where there is none, every
/// leftover segment is replayed, as after a power cut.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| {
            s.trim()
                .chars()
                .filter(|c| c.is_ascii_hexdigit() || *c == '-')
                .collect::<String>()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("noboot{:016x}", rand::random::<u64>()))
}

fn checksum(state: &[u8], data: &[u8]) -> [u8; 16] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(state);
    ctx.update(data);
    let mut sum = [0; 16];
    sum.copy_from_slice(&ctx.finish().as_ref()[..16]);
    sum
}

fn encode(state: &[u8], data: &[u8]) -> io::Result<Vec<u8>> {
    let too_big = || io::Error::other("journal: record too large");
    let state_len = u32::try_from(state.len()).map_err(|_| too_big())?;
    let data_len = u32::try_from(data.len()).map_err(|_| too_big())?;
    let mut record = Vec::with_capacity(HEADER_LEN + state.len() + data.len());
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(&state_len.to_le_bytes());
    record.extend_from_slice(&data_len.to_le_bytes());
    record.extend_from_slice(&checksum(state, data));
    record.extend_from_slice(state);
    record.extend_from_slice(data);
    Ok(record)
}

#[derive(Debug)]
struct Record {
    state: MessageState,
    state_json: Vec<u8>,
    data: Vec<u8>,
}

/// The whole records at the start of a segment, up to the first damaged one.
fn decode_all(mut bytes: &[u8]) -> Vec<Record> {
    let mut records = Vec::new();
    while let Some((record, rest)) = decode(bytes) {
        records.push(record);
        bytes = rest;
    }
    records
}

fn decode(bytes: &[u8]) -> Option<(Record, &[u8])> {
    let header = bytes.get(..HEADER_LEN)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let state_len = usize::try_from(u32::from_le_bytes(header[4..8].try_into().ok()?)).ok()?;
    let data_len = usize::try_from(u32::from_le_bytes(header[8..12].try_into().ok()?)).ok()?;
    let end = HEADER_LEN.checked_add(state_len)?.checked_add(data_len)?;
    let body = bytes.get(HEADER_LEN..end)?;
    let (state_json, data) = body.split_at(state_len);
    if checksum(state_json, data) != header[12..28] {
        return None;
    }
    let state: MessageState = serde_json::from_slice(state_json).ok()?;
    // The id names files: only what `message::new_id` makes.
    if state.id.is_empty()
        || !state
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return None;
    }
    let record = Record {
        state,
        state_json: state_json.to_vec(),
        data: data.to_vec(),
    };
    Some((record, &bytes[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Envelope;

    fn state(id: &str) -> (MessageState, Vec<u8>) {
        let envelope = Envelope {
            sender: "a@example.com".into(),
            recipients: vec!["b@example.com".into()],
            smtputf8: false,
            eightbit: false,
        };
        let st = MessageState::new(id, "c", &envelope, 5, 1);
        let json = super::super::spool::to_json(&st);
        (st, json)
    }

    fn spool_dirs(root: &Path) {
        for d in ["queue", "failed"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    /// Commits like the spool does: the files (page cache only), then the record.
    fn commit(journal: &Journal, root: &Path, id: &str, data: &[u8]) {
        let (_, json) = state(id);
        fs::write(root.join(format!("queue/{id}.eml")), data).unwrap();
        fs::write(root.join(format!("queue/{id}.json")), &json).unwrap();
        journal.commit(&json, data, id, None).unwrap();
    }

    fn segments(root: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(root.join("journal"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn records_round_trip_and_a_damaged_tail_ends_the_segment() {
        let (_, a) = state("m1");
        let (_, b) = state("m2");
        let mut bytes = encode(&a, b"one\r\n").unwrap();
        bytes.extend(encode(&b, b"two\r\n").unwrap());
        let whole = decode_all(&bytes);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[1].state.id, "m2");
        assert_eq!(whole[1].data, b"two\r\n");
        // Cut anywhere inside the second record: only the first survives.
        for cut in [
            bytes.len() - 1,
            bytes.len() - 6,
            whole.len() + HEADER_LEN + a.len() + 8,
        ] {
            assert_eq!(decode_all(&bytes[..cut]).len(), 1, "cut at {cut}");
        }
        // A flipped byte in the second record's data.
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert_eq!(decode_all(&bad).len(), 1);
        // Garbage, or an id that is not a file name, is no record.
        assert!(decode_all(b"MGJ1\xff\xff\xff\xff").is_empty());
        let (_, evil) = state("../x");
        assert!(decode_all(&encode(&evil, b"x").unwrap()).is_empty());
    }

    #[test]
    fn concurrent_commits_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        let journal = Arc::new(Journal::with_boot(dir.path(), "boot-a"));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (journal, root) = (journal.clone(), dir.path().to_path_buf());
                std::thread::spawn(move || {
                    for j in 0..20 {
                        commit(&journal, &root, &format!("m{i}x{j}"), b"body\r\n");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let syncs = journal.syncs();
        assert!(syncs >= 1);
        // 320 commits from 16 threads: a sync per commit would mean no sharing. Loose
        // bound: scheduling decides how many wait together.
        assert!(syncs < 320, "{syncs} syncs for 320 commits");
        let records: usize = segments(dir.path())
            .iter()
            .map(|p| decode_all(&fs::read(p).unwrap()).len())
            .sum();
        assert_eq!(records, 320);
    }

    #[test]
    fn a_failed_sync_fails_its_commits_and_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        // Call 0 syncs the first segment's zeros; call 1, m1's sync, fails.
        fn second_fails(file: &File) -> io::Result<()> {
            match CALLS.fetch_add(1, Ordering::SeqCst) {
                1 => Err(io::Error::other("EIO")),
                _ => file.sync_data(),
            }
        }
        let mut journal = Journal::with_boot(dir.path(), "boot-a");
        journal.sync = second_fails;
        let (_, json) = state("m1");
        assert!(journal.commit(&json, b"x", "m1", None).is_err());
        // The next commit goes to a new segment and succeeds; the failed record stays
        // failed.
        let (_, json2) = state("m2");
        journal.commit(&json2, b"y", "m2", None).unwrap();
        assert!(journal.wait_durable(1).is_err());
        assert_eq!(segments(dir.path()).len(), 2);
        // A failed write of a segment's zeros fails the commit too.
        journal.sync = |_| Err(io::Error::other("EIO"));
        journal.retire_due(true).unwrap();
        let (_, json3) = state("m3");
        assert!(journal.commit(&json3, b"z", "m3", None).is_err());
    }

    /// A record appended while a failing sync runs is lost with it, even once a sync of
    /// the next segment has succeeded (it was acknowledged: found in review).
    #[test]
    fn a_record_appended_during_a_failed_sync_is_never_acknowledged() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        // Call 0 syncs the first segment's zeros; call 1, the leader's, is slow and fails.
        fn slow_then_failing(file: &File) -> io::Result<()> {
            match CALLS.fetch_add(1, Ordering::SeqCst) {
                1 => {
                    std::thread::sleep(Duration::from_millis(300));
                    Err(io::Error::other("EIO"))
                }
                _ => file.sync_data(),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        let mut journal = Journal::with_boot(dir.path(), "boot-a");
        journal.sync = slow_then_failing;
        let journal = Arc::new(journal);
        let record = |id: &str| encode(&state(id).1, id.as_bytes()).unwrap();
        let a = journal.append(&record("a"), "a", None).unwrap();
        let leader = {
            let journal = journal.clone();
            std::thread::spawn(move || journal.wait_durable(a))
        };
        std::thread::sleep(Duration::from_millis(100));
        let b = journal.append(&record("b"), "b", None).unwrap();
        assert!(leader.join().unwrap().is_err());
        let d = journal.append(&record("d"), "d", None).unwrap();
        journal.wait_durable(d).unwrap();
        assert!(
            journal.wait_durable(b).is_err(),
            "b was in the failed segment"
        );
        // Both segments retire: every record in them is synced or lost.
        journal.retire_due(true).unwrap();
        assert!(segments(dir.path()).is_empty());
    }

    #[test]
    fn retiring_syncs_what_is_still_queued_and_deletes_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        let journal = Journal::with_boot(dir.path(), "boot-a");
        commit(&journal, dir.path(), "m1", b"one\r\n");
        commit(&journal, dir.path(), "m2", b"two\r\n");
        // m1 delivered meanwhile: its files are gone, nothing to sync for it.
        fs::remove_file(dir.path().join("queue/m1.eml")).unwrap();
        fs::remove_file(dir.path().join("queue/m1.json")).unwrap();
        journal.forget("m1");
        let left = |j: &Journal| j.lock().current.as_ref().map(|s| s.ids.clone());
        assert_eq!(left(&journal), Some(HashSet::from(["m2".to_string()])));
        journal.retire_due(false).unwrap();
        assert_eq!(segments(dir.path()).len(), 1, "young segment kept");
        journal.retire_due(true).unwrap();
        assert!(segments(dir.path()).is_empty());
        // The next commit opens a new segment.
        commit(&journal, dir.path(), "m3", b"three\r\n");
        assert_eq!(segments(dir.path()).len(), 1);
    }

    #[test]
    fn a_segment_of_this_boot_is_retired_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        let journal = Journal::with_boot(dir.path(), "boot-a");
        commit(&journal, dir.path(), "m1", b"one\r\n");
        commit(&journal, dir.path(), "m2", b"two\r\n");
        drop(journal); // kill -9: the segment stays
        // m1 was delivered before the crash.
        fs::remove_file(dir.path().join("queue/m1.eml")).unwrap();
        fs::remove_file(dir.path().join("queue/m1.json")).unwrap();
        let after = Journal::with_boot(dir.path(), "boot-a");
        assert_eq!(after.recover().unwrap(), 0);
        assert!(
            !dir.path().join("queue/m1.json").exists(),
            "not delivered twice"
        );
        assert!(dir.path().join("queue/m2.json").exists());
        // Kept until the running proxy retires it (by syncing the filesystem: which of
        // its messages are still queued is not read).
        assert_eq!(segments(dir.path()).len(), 1);
        after.retire_due(false).unwrap();
        assert!(segments(dir.path()).is_empty());
        assert!(dir.path().join("queue/m2.json").exists());
    }

    #[test]
    fn a_large_retirement_syncs_the_filesystem_once() {
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        let journal = Journal::with_boot(dir.path(), "boot-a");
        for i in 0..=SYNC_FS_OVER {
            commit(&journal, dir.path(), &format!("m{i}"), b"x\r\n");
        }
        journal.forget("m0");
        journal.retire_due(true).unwrap();
        assert!(segments(dir.path()).is_empty());
        assert_eq!(
            fs::read_dir(dir.path().join("queue")).unwrap().count(),
            2 * (SYNC_FS_OVER + 1)
        );
    }

    #[test]
    fn a_segment_of_an_earlier_boot_writes_back_what_the_power_cut_lost() {
        let dir = tempfile::tempdir().unwrap();
        spool_dirs(dir.path());
        let root = dir.path();
        let journal = Journal::with_boot(root, "boot-a");
        for id in [
            "lost",
            "empty",
            "nostate",
            "attempted",
            "failed",
            "halfmoved",
            "intact",
        ] {
            commit(&journal, root, id, format!("{id}\r\n").as_bytes());
        }
        drop(journal);
        // What a power cut can leave of files that were never fsync'd:
        fs::remove_file(root.join("queue/lost.eml")).unwrap();
        fs::remove_file(root.join("queue/lost.json")).unwrap();
        fs::write(root.join("queue/empty.eml"), b"").unwrap();
        fs::write(root.join("queue/empty.json"), b"").unwrap();
        fs::remove_file(root.join("queue/nostate.json")).unwrap();
        // A state rewritten since (fsync'd) is kept as it is.
        let (mut attempted, _) = state("attempted");
        attempted.attempts = 3;
        fs::write(
            root.join("queue/attempted.json"),
            super::super::spool::to_json(&attempted),
        )
        .unwrap();
        // Moved to failed/ (fsync'd): stays there.
        for ext in ["eml", "json"] {
            fs::rename(
                root.join(format!("queue/failed.{ext}")),
                root.join(format!("failed/failed.{ext}")),
            )
            .unwrap();
        }
        // Cut halfway through its move to failed/: recovery finishes the move.
        fs::rename(
            root.join("queue/halfmoved.eml"),
            root.join("failed/halfmoved.eml"),
        )
        .unwrap();
        let after = Journal::with_boot(root, "boot-b");
        assert_eq!(after.recover().unwrap(), 3);
        assert!(!root.join("queue/halfmoved.eml").exists());
        for id in ["lost", "empty", "nostate", "attempted", "intact"] {
            assert_eq!(
                fs::read(root.join(format!("queue/{id}.eml"))).unwrap(),
                format!("{id}\r\n").as_bytes(),
                "{id}"
            );
            let st: MessageState =
                serde_json::from_slice(&fs::read(root.join(format!("queue/{id}.json"))).unwrap())
                    .unwrap();
            assert_eq!(st.id, id);
        }
        let st: MessageState =
            serde_json::from_slice(&fs::read(root.join("queue/attempted.json")).unwrap()).unwrap();
        assert_eq!(st.attempts, 3);
        assert!(!root.join("queue/failed.json").exists());
        assert!(segments(root).is_empty());
    }
}
