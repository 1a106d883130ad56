//! Channel transports: pooled upstream SMTP connections (lettre) and the `file` drop.
//!
//! One [`Upstreams`] per running proxy; each SMTP channel has a pool of idle
//! connections and a semaphore so that no more than `connections` are open at once.

use std::path::Path;
use std::time::Duration;

use crate::config::{ChannelId, Config};
use crate::message::Envelope;
use crate::smtp::reply::Reply;

/// The message bytes to send: as received (after dot-unstuffing and bare-LF
/// normalization), normally ending in CRLF.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// In a file (the spool), streamed in chunks.
    File(&'a Path),
}

/// Why a transaction did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// TCP connect failed or the connection dropped.
    Connect(String),
    /// TLS handshake or certificate verification failed, or STARTTLS not offered.
    Tls(String),
    /// The upstream refused our credentials (its reply).
    Auth(Reply),
    /// No answer in time.
    Timeout,
    /// The upstream refused MAIL, a recipient (all-or-nothing mode) or the DATA (its reply).
    Refused(Reply),
    /// Local I/O (file channel, reading the spool).
    Local(String),
}

impl UpstreamError {
    /// The reply a relay-mode client gets (SPEC §5), naming the channel.
    pub fn client_reply(&self, channel: &str) -> Reply {
        match self {
            UpstreamError::Connect(_) => Reply::upstream_unreachable(channel),
            UpstreamError::Tls(_) => Reply::upstream_tls_failed(channel),
            UpstreamError::Auth(_) => Reply::upstream_auth_failed(channel),
            UpstreamError::Timeout => Reply::upstream_timeout(channel),
            UpstreamError::Refused(r) => r.clone(),
            UpstreamError::Local(_) => Reply::local_error(),
        }
    }
}

/// The result of one upstream transaction.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Recipients the upstream refused at RCPT, with its reply (only when not all-or-nothing).
    pub refused: Vec<(String, Reply)>,
    /// The upstream's final reply to the message (already naming the channel), or why it failed.
    pub result: Result<Reply, UpstreamError>,
}

/// Every channel's transport.
pub struct Upstreams {}

impl Upstreams {
    /// Builds the transports (reads `ca_file`s); connects lazily.
    pub fn new(config: &Config) -> Result<Self, String> {
        todo!()
    }

    /// Sends one message over `channel` in one transaction. With `all_or_nothing`, a
    /// refused recipient aborts the transaction (RSET) and is the result; otherwise the
    /// message goes to the accepted recipients and the refused ones are listed.
    pub async fn send(&self, channel: ChannelId, envelope: &Envelope, body: Body<'_>, all_or_nothing: bool) -> Outcome {
        todo!()
    }

    /// `mailgate test-channel`: connect, TLS, AUTH, report each step through `step`, send nothing.
    pub async fn test(&self, channel: ChannelId, step: &mut (dyn FnMut(&str) + Send)) -> Result<(), UpstreamError> {
        todo!()
    }
}

/// Timeout for connecting and for each upstream command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
