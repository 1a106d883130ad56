//! How a channel takes a message's recipients: in parts (`max_recipients`, and never more
//! than `recipients_per_day`), or whole for Microsoft Graph, which sends to every header
//! recipient, so a part would be refused ("not a recipient") or reach the others too
//! (SPEC §7 "Large messages over Graph"); and what becomes of a message a graph channel
//! can never take whole.

use tokio::task::JoinSet;

use super::{Attempt, ChannelTask, Report};
use crate::config::{Channel, ChannelKind};
use crate::queue::spool::now_ms;

/// How a channel's transactions take a message's pending recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Up to this many per transaction (`max_recipients`, and never more than a day's
    /// quota), the rest in later transactions.
    Split(usize),
    /// All at once, never split: Microsoft Graph sends to every header recipient, so a
    /// part would be refused or reach the others too (SPEC §7). At most this many ever.
    Whole(Option<usize>),
}

impl Take {
    /// How `channel` takes them.
    pub fn of(channel: &Channel) -> Self {
        if matches!(channel.kind, ChannelKind::Graph(_)) {
            return Take::Whole(channel.limits.whole_message_recipients());
        }
        let per_message = channel.limits.max_recipients.unwrap_or(usize::MAX);
        let per_day = channel
            .limits
            .recipients_per_day
            .map(|d| usize::try_from(d).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX);
        Take::Split(per_message.min(per_day).max(1))
    }

    /// The recipients of the next transaction of a message with `pending` ones; `Err` with
    /// the most the channel takes when the message can never go whole.
    pub fn size(self, pending: usize) -> Result<usize, usize> {
        match self {
            Take::Split(chunk) => Ok(pending.min(chunk)),
            Take::Whole(Some(max)) if pending > max => Err(max),
            Take::Whole(_) => Ok(pending),
        }
    }
}

impl ChannelTask {
    /// A message this channel can never send whole (more pending recipients than `max`).
    /// Lent by a broken channel, it waits for that channel (which may split it) rather
    /// than fail; the channel's own fails with a DSN saying why, counting nothing.
    pub(super) fn never_fits(
        &mut self,
        deliveries: &mut JoinSet<Report>,
        id: String,
        due: u64,
        pending: usize,
        max: usize,
    ) {
        if let Some(owner) = self.borrowed.get(&id) {
            tracing::warn!(id, channel = %self.name, owner = %owner, pending, max, "queue: more recipients than this channel ever sends at once (never split); the message waits for its own channel");
            self.schedule(id, now_ms().saturating_add(3_600_000), pending);
            return;
        }
        self.due.remove(&(due, id.clone()));
        self.entries.remove(&id);
        self.in_flight.insert(id.clone());
        let attempt = Attempt {
            queue: self.queue.clone(),
            generation: self.generation.clone(),
            channel: self.channel,
            rcpts: pending,
            counted: None,
            never_fits: Some(max),
        };
        deliveries.spawn(attempt.run(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn channel() -> Channel {
        crate::testkit::config::channel("c", ChannelKind::File { dir: "out".into() }, 2)
    }

    #[test]
    fn chunk_respects_max_recipients_and_daily_quota() {
        let mut ch = channel();
        ch.limits.max_recipients = Some(500);
        assert_eq!(Take::of(&ch), Take::Split(500));
        ch.limits.recipients_per_day = Some(3);
        assert_eq!(Take::of(&ch), Take::Split(3));
        assert_eq!(Take::of(&ch).size(7), Ok(3));
        assert_eq!(Take::of(&ch).size(2), Ok(2));
        ch.limits = Limits::default();
        assert_eq!(Take::of(&ch), Take::Split(usize::MAX));
    }

    fn graph(max_recipients: Option<usize>, per_day: Option<u64>) -> Channel {
        let mut ch = crate::testkit::config::graph_channel(
            "dave",
            "dave@example.com",
            "http://127.0.0.1:1",
            "http://127.0.0.1:1/token",
        );
        ch.limits.max_recipients = max_recipients;
        ch.limits.recipients_per_day = per_day;
        ch
    }

    #[test]
    fn a_graph_transaction_takes_the_whole_envelope_or_nothing() {
        // Issue 16 item 7: three recipients with `recipients_per_day = 2` went out as a
        // transaction of two, which Graph refused for the third in `To:`.
        let ch = graph(None, Some(2));
        assert_eq!(Take::of(&ch), Take::Whole(Some(2)));
        assert_eq!(Take::of(&ch).size(3), Err(2));
        assert_eq!(Take::of(&ch).size(2), Ok(2));
        assert_eq!(Take::of(&ch).size(1), Ok(1));
        // max_recipients the same way, the smaller of the two bounding it.
        assert_eq!(Take::of(&graph(Some(4), Some(10))).size(5), Err(4));
        assert_eq!(Take::of(&graph(Some(40), Some(10))).size(11), Err(10));
        assert_eq!(Take::of(&graph(Some(40), Some(10))).size(10), Ok(10));
        // No limit: any envelope, whole.
        assert_eq!(Take::of(&graph(None, None)).size(5000), Ok(5000));
    }

    #[test]
    fn a_whole_envelope_waits_for_room_for_all_of_it() {
        // recipients_per_day = 3: a message of 2 went; the next of 2 waits for the
        // window (never 1 now and 1 later), then goes whole.
        use crate::ratelimit::{ChannelLimiter, DAY_MS};
        let ch = graph(None, Some(3));
        let mut window = ChannelLimiter::new(&ch.limits);
        let t0 = 1_700_000_000_000;
        let first = Take::of(&ch).size(2).unwrap();
        window.record(t0, first as u64);
        let second = Take::of(&ch).size(2).unwrap();
        assert_eq!(second, 2);
        assert_eq!(window.check(t0 + 1000, second as u64), Err(t0 + DAY_MS));
        assert_eq!(window.check(t0 + DAY_MS, second as u64), Ok(()));
    }
}
