//! Pure per-channel limits (no I/O, no clock): message rate and recipients per rolling day.
//!
//! Time is passed in as unix milliseconds so the windows can be persisted and tested.

use crate::config::Limits;

/// The sliding windows of one channel.
#[derive(Debug, Clone, Default)]
pub struct ChannelLimiter {}

impl ChannelLimiter {
    /// A limiter for these limits, with empty windows.
    pub fn new(limits: &Limits) -> Self {
        todo!()
    }

    /// `Ok` if a message with `recipients` recipients may go now; else the earliest
    /// unix-ms time at which it may (`u64::MAX` if it never can, e.g. more recipients than a day allows).
    pub fn check(&self, now_ms: u64, recipients: u64) -> Result<(), u64> {
        todo!()
    }

    /// Counts a message sent at `now_ms`.
    pub fn record(&mut self, now_ms: u64, recipients: u64) {
        todo!()
    }
}
