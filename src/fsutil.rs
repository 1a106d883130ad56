//! Durable file writes, shared by the spool, the channel state files and the `file`
//! channel: a reader sees the old file or the new one, never a half-written one, and
//! the new one survives a crash once the call returns.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Files we write may hold mail or channel state: readable by mailgate's user only.
pub const FILE_MODE: u32 = 0o600;
/// Folders holding such files: mailgate's user only, whatever the umask.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents) with mode 0700, and sets 0700 on `dir` itself if
/// it already existed with a wider mode (created by an older version or another umask).
/// Parents that already exist are left alone: they may be shared (`/var/spool`).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Opens `path` for appending, creating it with mode 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Opens (creating, mode 0600) the spool's lock file `path`, untruncated, for `try_lock`:
/// the proxy, `queue` and `state import` must all lock the same file the same way.
pub fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Writes `target` atomically through the temporary file `tmp` (same filesystem):
/// `fill` writes it (mode 0600), it is fsync'd and renamed to `target`, then
/// `target`'s directory is fsync'd. On failure `tmp` is removed and `target` is as before.
pub fn write_atomic_with(
    target: &Path,
    tmp: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(tmp)?;
        fill(&mut file)?;
        file.sync_all()?;
        fs::rename(tmp, target)?;
        sync_dir(dir_of(target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// [`write_atomic_with`] for bytes in memory.
pub fn write_atomic(target: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(target, tmp, |f| f.write_all(bytes))
}

/// [`write_atomic`] to a file that may sit in a folder of its own (a user's token file):
/// creates the folder (mode 0700) if needed and picks a unique temporary name beside
/// the target, so concurrent writers never share one.
pub fn write_private(target: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dir_of(target);
    // Created private, but an existing folder is not narrowed: a token file the user
    // placed may sit in a folder that is theirs to set (their home).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.{:x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    write_atomic(target, &tmp, bytes)
}

/// The folder holding `path`: `.` for a bare name, whose `parent()` is `Some("")`, a
/// path no call can open (`state export st.json` wrote the file, then failed to sync it).
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ if path.has_root() => Path::new("/"),
        _ => Path::new("."),
    }
}

/// fsyncs a directory so that the renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_creates_0700_and_narrows_an_existing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        private_dir(&fresh).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        let old = dir.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
        let log = old.join("log");
        open_append(&log).unwrap();
        assert_eq!(mode(&log), 0o600);
    }

    #[test]
    fn the_folder_of_a_bare_name_is_the_current_one() {
        for (path, dir) in [
            ("st.json", "."),
            ("./st.json", "."),
            ("sub/st.json", "sub"),
            ("../st.json", ".."),
            ("/st.json", "/"),
            ("/var/lib/x/st.json", "/var/lib/x"),
            ("/", "/"),
            ("", "."),
        ] {
            assert_eq!(dir_of(Path::new(path)), Path::new(dir), "{path}");
        }
        // what the old code synced for a bare name: nothing that can be opened
        assert_eq!(Path::new("st.json").parent(), Some(Path::new("")));
        assert!(sync_dir(Path::new("")).is_err());
        assert!(sync_dir(dir_of(Path::new("st.json"))).is_ok());
    }

    #[test]
    fn replaces_the_file_with_mode_0600_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (target, tmp) = (dir.path().join("f"), dir.path().join(".f.tmp"));
        fs::write(&target, b"old").unwrap();
        write_atomic(&target, &tmp, b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let mode = fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (target, tmp) = (dir.path().join("f"), dir.path().join(".f.tmp"));
        fs::write(&target, b"old").unwrap();
        let result = write_atomic_with(&target, &tmp, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(result.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert!(!tmp.exists());
    }
}
