//! Pure per-channel limits (no I/O, no clock): message rate and recipients per rolling day.
//!
//! Time is passed in as unix milliseconds so the windows can be persisted and tested.
//! The whole state is one time-ordered list of `(sent at ms, recipients)` per message:
//! [`ChannelLimiter::snapshot`] hands it out for the queue to persist, and
//! [`ChannelLimiter::restore`] rebuilds a limiter from it after a restart.

use std::collections::VecDeque;

use crate::config::Limits;

/// Length of the rolling window of `recipients_per_day`, in milliseconds.
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The sliding windows of one channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelLimiter {
    /// At most `.0` messages in any window of `.1` ms.
    rate: Option<(u64, u64)>,
    /// At most this many recipients in any rolling 24 hours.
    recipients_per_day: Option<u64>,
    /// Messages counted, oldest first: (unix ms, recipients). Only what a window still needs.
    sent: VecDeque<(u64, u64)>,
}

impl ChannelLimiter {
    /// A limiter for these limits, with empty windows.
    pub fn new(limits: &Limits) -> Self {
        let rate = limits.rate.map(|r| {
            (
                r.count,
                u64::try_from(r.per.as_millis()).unwrap_or(u64::MAX),
            )
        });
        ChannelLimiter {
            rate,
            recipients_per_day: limits.recipients_per_day,
            sent: VecDeque::new(),
        }
    }

    /// A limiter for these limits (which may have changed since) holding persisted `entries`
    /// from [`snapshot`](Self::snapshot), pruned as of `now_ms`.
    pub fn restore(
        limits: &Limits,
        entries: impl IntoIterator<Item = (u64, u64)>,
        now_ms: u64,
    ) -> Self {
        let mut limiter = Self::new(limits);
        let mut entries: Vec<(u64, u64)> = entries.into_iter().collect();
        entries.sort_unstable();
        limiter.sent = entries.into();
        limiter.prune(now_ms);
        limiter
    }

    /// The most recipients in any rolling day, as this limiter counts them.
    pub fn recipients_per_day(&self) -> Option<u64> {
        self.recipients_per_day
    }

    /// The counted messages, oldest first, as (unix ms, recipients): what to persist.
    pub fn snapshot(&self) -> Vec<(u64, u64)> {
        self.sent.iter().copied().collect()
    }

    /// `Ok` if a message with `recipients` recipients may go now; else the earliest
    /// unix-ms time at which it may (`u64::MAX` if it never can, e.g. more recipients than a day allows).
    pub fn check(&self, now_ms: u64, recipients: u64) -> Result<(), u64> {
        let mut earliest = now_ms;
        if let Some((count, per)) = self.rate {
            if count == 0 {
                return Err(u64::MAX);
            }
            let start = self.window_start(now_ms, per);
            let in_window = (self.sent.len() - start) as u64;
            if in_window >= count {
                // Enough of the oldest must leave the window that `count - 1` remain.
                let leaving = start + (in_window - count) as usize;
                earliest = earliest.max(self.sent[leaving].0.saturating_add(per));
            }
        }
        if let Some(limit) = self.recipients_per_day {
            if recipients > limit {
                return Err(u64::MAX);
            }
            let in_window = self.sent.range(self.window_start(now_ms, DAY_MS)..);
            let mut used = in_window
                .clone()
                .fold(0u64, |sum, e| sum.saturating_add(e.1));
            if used.saturating_add(recipients) > limit {
                // Wait for the oldest messages to age out until the new one fits.
                for &(ms, n) in in_window {
                    used = used.saturating_sub(n);
                    if used.saturating_add(recipients) <= limit {
                        earliest = earliest.max(ms.saturating_add(DAY_MS));
                        break;
                    }
                }
            }
        }
        if earliest > now_ms {
            Err(earliest)
        } else {
            Ok(())
        }
    }

    /// Counts a message sent at `now_ms`.
    pub fn record(&mut self, now_ms: u64, recipients: u64) {
        if self.rate.is_none() && (self.recipients_per_day.is_none() || recipients == 0) {
            return; // nothing would ever look at it
        }
        // A clock stepped back must not break the time order the windows rely on.
        let at = self.sent.partition_point(|e| e.0 <= now_ms);
        self.sent.insert(at, (now_ms, recipients));
        self.prune(now_ms);
    }

    /// Takes back a message counted at `at_ms` that the upstream never took
    /// (a reservation made by `record` before sending).
    pub fn unrecord(&mut self, at_ms: u64, recipients: u64) {
        if let Some(i) = self.sent.iter().rposition(|&e| e == (at_ms, recipients)) {
            self.sent.remove(i);
        }
    }

    /// Forgets messages no window needs any more (also done by `record`).
    pub fn prune(&mut self, now_ms: u64) {
        while let Some(&(ms, n)) = self.sent.front() {
            let for_rate = self.rate.is_some_and(|(count, per)| {
                self.sent.len() as u64 <= count && ms.saturating_add(per) > now_ms
            });
            let for_day =
                self.recipients_per_day.is_some() && n > 0 && ms.saturating_add(DAY_MS) > now_ms;
            if for_rate || for_day {
                break;
            }
            self.sent.pop_front();
        }
    }

    /// Index of the first counted message still inside a window of `len` ms ending at `now_ms`.
    fn window_start(&self, now_ms: u64, len: u64) -> usize {
        self.sent
            .partition_point(|e| e.0.saturating_add(len) <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000_000;

    fn limits(rate: Option<(u64, u64)>, per_day: Option<u64>) -> Limits {
        Limits {
            rate: rate.map(|(count, per_ms)| Rate {
                count,
                per: Duration::from_millis(per_ms),
            }),
            recipients_per_day: per_day,
            ..Limits::default()
        }
    }

    /// Sends `n` single-recipient messages as early as the limiter allows, from `start`.
    fn send_greedily(limiter: &mut ChannelLimiter, start: u64, n: usize) -> Vec<u64> {
        let mut now = start;
        let mut times = Vec::new();
        for _ in 0..n {
            if let Err(at) = limiter.check(now, 1) {
                assert!(at > now && at != u64::MAX);
                now = at;
                assert_eq!(limiter.check(now, 1), Ok(()));
            }
            limiter.record(now, 1);
            times.push(now);
        }
        times
    }

    #[test]
    fn thirty_per_minute_refuses_the_31st_until_the_first_ages_out() {
        let mut l = ChannelLimiter::new(&limits(Some((30, 60_000)), None));
        for i in 0..30 {
            assert_eq!(l.check(T0 + i * 1000, 1), Ok(()), "message {i}");
            l.record(T0 + i * 1000, 1);
        }
        assert_eq!(l.check(T0 + 30_000, 1), Err(T0 + 60_000));
        assert_eq!(l.check(T0 + 59_999, 1), Err(T0 + 60_000));
        assert_eq!(l.check(T0 + 60_000, 1), Ok(()));
        l.record(T0 + 60_000, 1);
        // Now the second message (sent at T0 + 1 s) is the one to age out.
        assert_eq!(l.check(T0 + 60_000, 1), Err(T0 + 61_000));
        assert_eq!(l.snapshot().len(), 30);
    }

    #[test]
    fn five_per_second_spreads_a_burst() {
        let mut l = ChannelLimiter::new(&limits(Some((5, 1000)), None));
        let times = send_greedily(&mut l, T0, 20);
        let want: Vec<u64> = (0..20).map(|i| T0 + (i / 5) * 1000).collect();
        assert_eq!(times, want);
        // Steady sender every 100 ms: the 6th waits for the first to leave the window.
        let mut l = ChannelLimiter::new(&limits(Some((5, 1000)), None));
        for i in 0..5 {
            l.record(T0 + i * 100, 1);
        }
        assert_eq!(l.check(T0 + 500, 1), Err(T0 + 1000));
        l.record(T0 + 1000, 1);
        assert_eq!(l.check(T0 + 1000, 1), Err(T0 + 1100));
        assert_eq!(l.check(T0 + 1100, 1), Ok(()));
    }

    #[test]
    fn no_window_ever_holds_more_than_the_rate() {
        let mut l = ChannelLimiter::new(&limits(Some((7, 3000)), None));
        let times = send_greedily(&mut l, T0, 200);
        for (i, &t) in times.iter().enumerate() {
            let in_window = times[i..].iter().filter(|&&u| u < t + 3000).count();
            assert!(in_window <= 7, "{in_window} messages within 3 s of {t}");
        }
        assert!(l.snapshot().len() <= 7);
    }

    #[test]
    fn recipients_per_day_holds_the_fourth_message() {
        let mut l = ChannelLimiter::new(&limits(None, Some(3)));
        for h in 0..3 {
            assert_eq!(l.check(T0 + h * 3_600_000, 1), Ok(()));
            l.record(T0 + h * 3_600_000, 1);
        }
        assert_eq!(l.check(T0 + 3 * 3_600_000, 1), Err(T0 + DAY_MS));
        assert_eq!(l.check(T0 + DAY_MS - 1, 1), Err(T0 + DAY_MS));
        assert_eq!(l.check(T0 + DAY_MS, 1), Ok(()));
        // Two recipients need the first two messages gone.
        assert_eq!(l.check(T0 + DAY_MS, 2), Err(T0 + 3_600_000 + DAY_MS));
    }

    #[test]
    fn recipients_per_day_window_rolls() {
        let mut l = ChannelLimiter::new(&limits(None, Some(10)));
        l.record(T0, 4);
        l.record(T0 + 12 * 3_600_000, 4);
        let at_20h = T0 + 20 * 3_600_000;
        assert_eq!(l.check(at_20h, 2), Ok(()));
        assert_eq!(l.check(at_20h, 3), Err(T0 + DAY_MS));
        assert_eq!(l.check(T0 + DAY_MS, 6), Ok(()));
        assert_eq!(l.check(T0 + DAY_MS, 7), Err(T0 + 12 * 3_600_000 + DAY_MS));
        // Recording later drops the message that left the window.
        l.record(T0 + DAY_MS, 6);
        assert_eq!(
            l.snapshot(),
            vec![(T0 + 12 * 3_600_000, 4), (T0 + DAY_MS, 6)]
        );
    }

    #[test]
    fn too_many_recipients_for_a_day_never_fits() {
        let l = ChannelLimiter::new(&limits(None, Some(100)));
        assert_eq!(l.check(T0, 101), Err(u64::MAX));
        assert_eq!(l.check(T0, 100), Ok(()));
        let zero = ChannelLimiter::new(&limits(Some((0, 60_000)), None));
        assert_eq!(zero.check(T0, 1), Err(u64::MAX));
    }

    #[test]
    fn both_limits_wait_for_the_later() {
        let mut l = ChannelLimiter::new(&limits(Some((2, 60_000)), Some(5)));
        l.record(T0, 3);
        l.record(T0 + 1000, 1);
        // Rate frees up at T0 + 60 s, but 2 more recipients only fit after a day.
        assert_eq!(l.check(T0 + 2000, 1), Err(T0 + 60_000));
        assert_eq!(l.check(T0 + 2000, 2), Err(T0 + DAY_MS));
        assert_eq!(l.check(T0 + 60_000, 1), Ok(()));
    }

    #[test]
    fn unlimited_never_refuses_and_keeps_nothing() {
        let mut l = ChannelLimiter::new(&Limits::default());
        for i in 0..10_000 {
            assert_eq!(l.check(T0 + i, 1000), Ok(()));
            l.record(T0 + i, 1000);
        }
        assert!(l.snapshot().is_empty());
        assert_eq!(ChannelLimiter::default().check(0, u64::MAX), Ok(()));
    }

    #[test]
    fn memory_stays_bounded_by_the_windows() {
        let mut l = ChannelLimiter::new(&limits(None, Some(1_000_000)));
        for i in 0..(3 * 24) {
            l.record(T0 + i * 3_600_000, 1); // one message an hour for three days
        }
        assert_eq!(l.snapshot().len(), 24);
    }

    #[test]
    fn unrecord_frees_the_reservation() {
        let mut l = ChannelLimiter::new(&limits(Some((1, 60_000)), None));
        l.record(1_000, 1);
        assert!(l.check(2_000, 1).is_err());
        l.unrecord(1_000, 1);
        assert_eq!(l.check(2_000, 1), Ok(()));
    }

    #[test]
    fn restore_round_trip() {
        let lim = limits(Some((30, 60_000)), Some(50));
        let mut l = ChannelLimiter::new(&lim);
        for i in 0..40 {
            l.record(T0 + i * 500, 1 + i % 3);
        }
        let saved = l.snapshot();
        let mut shuffled = saved.clone();
        shuffled.reverse();
        let back = ChannelLimiter::restore(&lim, shuffled, T0 + 20_000);
        assert_eq!(back, l);
        for (now, rcpts) in [
            (T0 + 20_000, 1),
            (T0 + 70_000, 1),
            (T0 + 70_000, 5),
            (T0 + DAY_MS, 50),
        ] {
            assert_eq!(
                back.check(now, rcpts),
                l.check(now, rcpts),
                "at {now} with {rcpts}"
            );
        }
        // Restored a day later, everything has aged out.
        assert!(
            ChannelLimiter::restore(&lim, saved, T0 + 2 * DAY_MS)
                .snapshot()
                .is_empty()
        );
    }

    #[test]
    fn clock_stepping_back_keeps_order() {
        let mut l = ChannelLimiter::new(&limits(Some((3, 10_000)), None));
        l.record(T0 + 5000, 1);
        l.record(T0, 1);
        l.record(T0 + 2000, 1);
        assert_eq!(l.snapshot(), vec![(T0, 1), (T0 + 2000, 1), (T0 + 5000, 1)]);
        assert_eq!(l.check(T0 + 6000, 1), Err(T0 + 10_000));
    }
}
