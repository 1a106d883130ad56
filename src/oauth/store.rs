//! Where refresh tokens are kept: a channel's `refresh_token_file`, or else the token
//! store (locally `<spool_dir>/state/<name>.oauth.json`), written atomically with mode 0600.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::config::Secret;
use crate::config::oauth::{OAuth, TokenSource};

/// The future a [`TokenStore`] method returns (boxed, so the trait stays object-safe for a
/// later networked backend).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Keeps the refresh tokens mailgate itself obtained (rotation, `oauth authorize`) for the
/// channels that have no `refresh_token_file`. A stored token takes precedence over the
/// configured `refresh_token_env` / literal value.
pub trait TokenStore: Send + Sync + fmt::Debug {
    /// The stored refresh token of `channel`, if any.
    fn load<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Option<Secret>>;
    /// Stores (replaces) the refresh token of `channel`.
    fn save<'a>(&'a self, channel: &'a str, refresh_token: &'a Secret) -> StoreFuture<'a, ()>;
    /// Where `channel`'s token is kept, for messages (never the token).
    fn location(&self, channel: &str) -> String;
}

/// The local backend: `<dir>/<name>.oauth.json` (`{"refresh_token": "…"}`), mode 0600.
#[derive(Debug, Clone)]
pub struct LocalTokenStore {
    dir: PathBuf,
}

impl LocalTokenStore {
    /// A store in `dir` (the channel state dir, `<spool_dir>/state`); created on first save.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalTokenStore { dir: dir.into() }
    }

    /// The file holding `channel`'s token.
    pub fn path(&self, channel: &str) -> PathBuf {
        self.dir
            .join(format!("{}.oauth.json", crate::state::file_stem(channel)))
    }
}

impl TokenStore for LocalTokenStore {
    fn load<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Option<Secret>> {
        Box::pin(async move {
            let path = self.path(channel);
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            };
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|_| format!("{} is not a token file (JSON)", path.display()))?;
            Ok(value
                .get("refresh_token")
                .and_then(serde_json::Value::as_str)
                .filter(|t| !t.is_empty())
                .map(Secret::new))
        })
    }

    fn save<'a>(&'a self, channel: &'a str, refresh_token: &'a Secret) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let body = serde_json::json!({ "refresh_token": refresh_token.expose() });
            let path = self.path(channel);
            crate::fsutil::write_private(&path, format!("{body}\n").as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        })
    }

    fn location(&self, channel: &str) -> String {
        self.path(channel).display().to_string()
    }
}

/// Reads a `refresh_token_file`: the token is its content, surrounding whitespace trimmed;
/// `None` when the file does not exist or is empty (not authorized yet).
pub(crate) fn read_token_file(path: &Path) -> Result<Option<Secret>, String> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim()).filter(|t| !t.is_empty()).map(Secret::new)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes a `refresh_token_file`: the token and a newline.
pub(crate) fn write_token_file(path: &Path, token: &Secret) -> Result<(), String> {
    crate::fsutil::write_private(path, format!("{}\n", token.expose()).as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The refresh token a refresh-token grant uses now: a `refresh_token_file` is read afresh
/// (`authorize` and rotation rewrite it); otherwise a stored token wins over the configured
/// env/literal value. `Ok(None)`: not authorized yet.
pub(crate) async fn load_refresh_token(
    channel: &str,
    settings: &OAuth,
    store: &dyn TokenStore,
) -> Result<Option<Secret>, String> {
    match &settings.refresh_token_source {
        TokenSource::File(path) => read_token_file(path),
        _ => Ok(store
            .load(channel)
            .await?
            .or_else(|| settings.refresh_token.clone())),
    }
}

/// Stores a new refresh token where [`load_refresh_token`] finds it; returns that place.
pub(crate) async fn save_refresh_token(
    channel: &str,
    settings: &OAuth,
    store: &dyn TokenStore,
    token: &Secret,
) -> Result<String, String> {
    match &settings.refresh_token_source {
        TokenSource::File(path) => {
            write_token_file(path, token)?;
            Ok(path.display().to_string())
        }
        _ => {
            store.save(channel, token).await?;
            Ok(store.location(channel))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_with_mode_0600_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/alice.token");
        crate::fsutil::write_private(&path, b"one\n").unwrap();
        // An existing file with loose permissions is replaced by a private one.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        crate::fsutil::write_private(&path, b"two\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("alice.token")]);
    }

    #[tokio::test]
    async fn local_store_round_trips_and_escapes_channel_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalTokenStore::new(dir.path().join("state"));
        assert_eq!(store.load("a/b").await.unwrap(), None);
        store.save("a/b", &Secret::new("rt-1")).await.unwrap();
        assert_eq!(store.load("a/b").await.unwrap(), Some(Secret::new("rt-1")));
        let path = store.path("a/b");
        assert_eq!(path.file_name().unwrap(), "a%2Fb.oauth.json");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn token_file_is_trimmed_and_empty_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        assert_eq!(read_token_file(&path).unwrap(), None);
        fs::write(&path, "\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), None);
        write_token_file(&path, &Secret::new("rt-x")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "rt-x\n");
        assert_eq!(read_token_file(&path).unwrap(), Some(Secret::new("rt-x")));
    }
}
