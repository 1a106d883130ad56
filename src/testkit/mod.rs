//! Test fixtures shared by unit tests and `tests/*.rs` (feature `testkit`): a fake SMTP
//! upstream, a local OAuth token endpoint, a Microsoft Graph stand-in, a test PKI, configuration builders.

pub mod config;
pub mod fake_smtp;
pub mod graph_api;
pub mod pki;
pub mod redis_server;
pub mod token_endpoint;

use std::time::{Duration, Instant};

/// Polls `cond` every 20 ms until it holds or `limit` passes; the last answer of `cond`.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
