//! Below the flow: what every HTTPS answer mailgate reads (token and device endpoints,
//! Microsoft Graph) goes through, so that no answer can exhaust memory or stretch a wait
//! without bound (SPEC §7 "Every answer … is bounded").
//!
//! - [`read_limited`] reads a response body incrementally and stops at a limit, whatever
//!   `Content-Length` claims and for chunked bodies too: an answer over the limit is an
//!   error of that endpoint ([`ReadError::TooLarge`]), never a truncated document;
//! - [`clamp_secs`] turns a number of seconds an endpoint sent into a [`Duration`] inside
//!   a sane range, so that later `Instant + Duration` arithmetic cannot overflow.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

/// Most of a token or device-authorization answer read (real ones are a few KiB).
pub const MAX_TOKEN_ANSWER: usize = 64 * 1024;
/// Most of a Microsoft Graph answer read (Graph echoes a draft, its body included).
pub const MAX_GRAPH_ANSWER: usize = 8 * 1024 * 1024;

/// Why a body could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The body is longer than the limit (said by `Content-Length`, or found reading).
    #[error("answer larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The body could not be read (the connection broke, the request timed out).
    #[error("reading the answer failed: {0}")]
    Body(#[source] reqwest::Error),
}

/// The whole body of `response`, at most `max` bytes: a body announced or found longer
/// is [`ReadError::TooLarge`] as soon as that is known (reading stops there, so at most
/// `max` plus one chunk is ever held). The request's own timeout bounds the time.
pub async fn read_limited(mut response: reqwest::Response, max: usize) -> Result<Bytes, ReadError> {
    // Trusted only to refuse early: a small or missing length proves nothing.
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(ReadError::TooLarge { max });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Body)? {
        if chunk.len() > max.saturating_sub(body.len()) {
            return Err(ReadError::TooLarge { max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// `seconds` from an endpoint as a duration in `min..=max` (`None` stays `None`): the
/// one way such a number becomes a `Duration` that is later added to an `Instant`.
pub fn clamp_secs(seconds: Option<u64>, min: Duration, max: Duration) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(s).clamp(min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_secs_keeps_values_in_range() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(clamp_secs(None, min, max), None);
        assert_eq!(clamp_secs(Some(0), min, max), Some(min));
        assert_eq!(clamp_secs(Some(5), min, max), Some(Duration::from_secs(5)));
        assert_eq!(clamp_secs(Some(u64::MAX), min, max), Some(max));
    }
}
