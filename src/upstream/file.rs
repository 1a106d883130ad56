//! The `file` channel: each message is dropped into a directory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{Body, Error, blocking};
use crate::fsutil;
use crate::message::Envelope;
use crate::reply::Reply;

/// Stores the message as `dir/<id>.eml` (as received) and `dir/<id>.envelope`.
///
/// The envelope file is plain text, one item per line: `sender <addr>` (`sender <>` for
/// the null sender), then `recipient <addr>` for each recipient in order. Both files are
/// written atomically (see [`fsutil::write_atomic_with`]); the envelope goes first, so
/// whoever sees `<id>.eml` finds its envelope too.
pub(super) async fn store_in_dir(
    channel: &str,
    dir: &Path,
    id: &str,
    envelope: &Envelope,
    body: Body<'_>,
) -> Result<Reply, Error> {
    if id.is_empty()
        || id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::local(format!(
            "message id {id:?} is not a safe file name"
        )));
    }
    let mut text = format!("sender <{}>\n", envelope.sender);
    for recipient in &envelope.recipients {
        text.push_str(&format!("recipient <{recipient}>\n"));
    }
    let content = match body {
        Body::Bytes(bytes) => Content::Bytes(bytes.to_vec()),
        Body::File(path) => Content::File(path.to_path_buf()),
    };
    let (dir, id_owned) = (dir.to_path_buf(), id.to_string());
    let shown = dir.display().to_string();
    let file = blocking(move || write_message(&dir, &id_owned, text.as_bytes(), content))
        .await
        .map_err(|e| Error::io(shown, e))?;
    Ok(Reply::stored_in_file(channel, &file))
}

/// `test-channel` for a `file` channel: the directory exists (or is made) and takes a file.
pub(super) async fn test(dir: &Path, step: &mut (dyn FnMut(&str) + Send)) -> Result<(), Error> {
    let dir = dir.to_path_buf();
    let shown = dir.display().to_string();
    blocking(move || probe_dir(&dir))
        .await
        .map_err(|e| Error::io(shown.clone(), e))?;
    step(&format!("directory {shown} is writable"));
    Ok(())
}

enum Content {
    Bytes(Vec<u8>),
    File(PathBuf),
}

fn write_message(dir: &Path, id: &str, envelope: &[u8], content: Content) -> io::Result<String> {
    fsutil::private_dir(dir)?;
    write_atomically(dir, &format!("{id}.envelope"), |f| f.write_all(envelope))?;
    let eml = format!("{id}.eml");
    write_atomically(dir, &eml, |f| match &content {
        Content::Bytes(bytes) => f.write_all(bytes),
        Content::File(path) => io::copy(&mut fs::File::open(path)?, f).map(|_| ()),
    })?;
    Ok(eml)
}

/// Writes `dir/name` through `dir/.name.tmp` (a dot file: not taken for a message).
pub(super) fn write_atomically(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fsutil::write_atomic_with(&dir.join(name), &tmp, fill)
}

fn probe_dir(dir: &Path) -> io::Result<()> {
    fsutil::private_dir(dir)?;
    let probe = dir.join(format!(".probe-{}.tmp", crate::message::new_id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(fsutil::FILE_MODE)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"probe").and_then(|()| f.sync_all()));
    let _ = fs::remove_file(&probe);
    written
}
