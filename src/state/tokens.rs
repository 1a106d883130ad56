//! The OAuth token side of the state seam: refresh tokens mailgate obtained itself
//! (rotation, `oauth authorize`) for channels without a `refresh_token_file`. Locally
//! `<spool_dir>/state/<name>.oauth.json`, written atomically with mode 0600; a shared
//! backend implements the same trait.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use crate::config::Secret;

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
    /// Every host reads this store first, even for a channel with a `refresh_token_file`
    /// (Redis), so `oauth authorize` must store there.
    fn shared(&self) -> bool {
        false
    }
    /// Forgets `channel`'s access token cached for every host: after `oauth authorize`
    /// it belongs to the grant being replaced.
    fn forget_access_token<'a>(&'a self, _channel: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
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
            .join(format!("{}.oauth.json", super::file_stem(channel)))
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
}
