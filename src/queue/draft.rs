//! A queue-mode message being received: bounded memory, then a file in `tmp/`.

use std::fs;
use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncWriteExt, BufWriter};

use super::spool::Spool;

/// Messages up to this size stay in memory until they are committed, so that writing one
/// costs a single thread hop; larger ones stream to `tmp/<id>` as they arrive.
pub const INLINE_MAX: usize = 64 * 1024;

/// A queue-mode message being received: its first [`INLINE_MAX`] bytes are kept in
/// memory, beyond that everything goes to `tmp/<id>` (memory stays bounded). Dropped
/// without commit, the file is removed.
pub struct SpoolDraft {
    id: String,
    path: PathBuf,
    spool: Spool,
    /// The message, while it is small and has no file yet.
    inline: Vec<u8>,
    /// Boxed: only large messages have one.
    file: Option<Box<BufWriter<tokio::fs::File>>>,
    closed: bool,
    len: u64,
    /// `tmp/<id>` exists: the message outgrew memory. Otherwise dropping the draft has
    /// nothing to remove, and skips the `unlink` (a relayed message's only syscall on the
    /// spool).
    may_exist: bool,
}

/// A draft that has been written completely ([`SpoolDraft::close`]).
#[derive(Debug)]
pub struct ClosedDraft {
    /// The temp file the message is (or is to be) in.
    pub path: PathBuf,
    /// The message itself when it never left memory.
    pub inline: Option<Vec<u8>>,
}

impl SpoolDraft {
    /// Starts a new message; its file `tmp/<id>` is created only if it outgrows memory.
    pub async fn create(spool: &Spool, id: String) -> io::Result<Self> {
        Ok(SpoolDraft {
            path: spool.tmp_dir().join(&id),
            id,
            spool: spool.clone(),
            inline: Vec::new(),
            file: None,
            closed: false,
            len: 0,
            may_exist: false,
        })
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends message bytes.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.closed {
            return Err(io::Error::other("draft already closed"));
        }
        if self.file.is_none() {
            if self.inline.len() + data.len() <= INLINE_MAX {
                self.inline.extend_from_slice(data);
                self.len += data.len() as u64;
                return Ok(());
            }
            let (spool, path) = (self.spool.clone(), self.path.clone());
            let file = tokio::task::spawn_blocking(move || spool.create_file(&path))
                .await
                .map_err(io::Error::other)??;
            self.may_exist = true;
            let mut file = Box::new(BufWriter::with_capacity(
                INLINE_MAX,
                tokio::fs::File::from_std(file),
            ));
            file.write_all(&std::mem::take(&mut self.inline)).await?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("draft file");
        file.write_all(data).await?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the writing: flushes the file, or hands over the in-memory message (which
    /// then has no file: the queue commits it from memory, relay sends it from memory).
    /// A temp file stays owned by the draft (removed when it is dropped) until committed.
    pub async fn close(&mut self) -> io::Result<ClosedDraft> {
        if self.closed {
            return Err(io::Error::other("draft already closed"));
        }
        self.closed = true;
        let inline = match self.file.take() {
            Some(mut file) => {
                file.flush().await?;
                None
            }
            None => Some(std::mem::take(&mut self.inline)),
        };
        Ok(ClosedDraft {
            path: self.path.clone(),
            inline,
        })
    }
}

impl Drop for SpoolDraft {
    fn drop(&mut self) {
        // After a commit the temp path no longer exists; otherwise this discards the draft.
        if self.may_exist {
            let _ = fs::remove_file(&self.path);
        }
    }
}
