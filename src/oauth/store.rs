//! Where a channel's refresh token is read from and written to: its `refresh_token_file`,
//! or else the state seam's token store ([`crate::state::tokens`]).

use std::fs;
use std::io;
use std::path::Path;

use crate::config::Secret;
use crate::config::oauth::{OAuth, TokenSource};
use crate::state::tokens::TokenStore;

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
