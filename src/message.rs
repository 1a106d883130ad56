//! What the session hands on: the envelope of a message and its queue id; the header
//! rewrites of SPEC §4a ([`rewrite`]).

pub mod address;
pub mod address_headers;
pub mod recipients;
pub mod rewrite;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The SMTP envelope of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `MAIL FROM` address without brackets; empty for the null sender `<>`. A quoted
    /// local part stays quoted (canonical form, see [`address`]).
    pub sender: String,
    /// `RCPT TO` addresses without brackets, in order, as the client gave them (a
    /// quoted local part in its canonical form, see [`address`]).
    pub recipients: Vec<String>,
    /// The client asked for SMTPUTF8.
    pub smtputf8: bool,
    /// The client declared `BODY=8BITMIME`.
    pub eightbit: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);
/// The process id, asked for once: `getpid` was a syscall per message.
static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// A new message id: unique within this host (time, process id, counter), safe as a file name.
pub fn new_id() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}{:05x}-{:x}-{:x}",
        now.as_secs(),
        now.subsec_micros(),
        PID.get_or_init(std::process::id),
        n
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_file_safe() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = super::new_id();
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            assert!(seen.insert(id));
        }
    }
}
