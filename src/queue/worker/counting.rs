//! What a channel task counted against its windows for a transaction, adjusted once the
//! transaction is over: taken back when nothing was sent, else counted from its end.

use super::{ChannelTask, Counted, Report};
use crate::queue::spool::now_ms;
use crate::state::Backend;

impl ChannelTask {
    /// Takes back what `report` sent nothing for, and counts what it sent from now, when
    /// its transaction ended (providers count arrivals; see
    /// [`crate::ratelimit::ChannelLimiter::settle`]).
    pub(super) async fn recount(&mut self, report: &Report) {
        let taken_back = match (&report.uncount, &self.queue.state, &self.shared) {
            (Some(Counted::Local(at_ms, rcpts)), Backend::Local(local), _) => {
                match &mut self.counters {
                    Some(counters) => counters
                        .unrecord(local, *at_ms, *rcpts)
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            }
            (Some(Counted::Shared(token)), _, Some(view)) => {
                view.redis.release(&self.name, token).await.map_err(|e| e.0)
            }
            _ => Ok(()),
        };
        if let Err(e) = taken_back {
            tracing::warn!(id = report.id, channel = %self.name, error = %e, "queue: cannot take back a count of the rate counters");
        }
        let settled = match (&report.settle, &self.queue.state, &self.shared) {
            (Some(Counted::Local(at_ms, rcpts)), Backend::Local(local), _) => {
                match &mut self.counters {
                    Some(counters) => counters
                        .settle(local, *at_ms, *rcpts, now_ms())
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            }
            (Some(Counted::Shared(token)), _, Some(view)) => {
                // Off the channel's loop: awaited here, one Redis round trip per delivered
                // message held the whole channel (2,700 msg/s where the local state does
                // 5,000). Settling later only moves the count later: never more sends.
                let (redis, name, token) = (view.redis.clone(), self.name.clone(), token.clone());
                let limits = self.generation.config.channels[self.channel].limits.clone();
                let id = report.id.clone();
                tokio::spawn(async move {
                    if let Err(e) = redis.settle(&name, &limits, &token).await {
                        tracing::warn!(id, channel = %name, error = %e.0, "queue: cannot count a transaction from its end in the rate counters");
                    }
                });
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = settled {
            // Counted from its start: the window may end up to a delivery time early.
            tracing::warn!(id = report.id, channel = %self.name, error = %e, "queue: cannot count a transaction from its end in the rate counters");
        }
    }
}
