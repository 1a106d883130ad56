//! How a channel task learns that a delivery task ended: its report, or, for a task that
//! panicked or was cancelled (no report), the attempt recorded as an internal temporary
//! error, so that no message keeps a connection slot for good (SPEC §7).

use tokio::task::JoinError;

use super::{ChannelTask, Report};
use crate::queue::attempt::internal_failure;

impl ChannelTask {
    /// A delivery task ended: its report applied, whatever way it ended.
    pub(super) async fn finished(&mut self, done: Result<(tokio::task::Id, Report), JoinError>) {
        if let Some(report) = self.report_of(done).await {
            self.apply(report).await;
        }
    }

    /// The report of an ended delivery task. A task that panicked or was cancelled has
    /// none: its attempt is recorded as an internal (temporary) error, so the message
    /// leaves `in_flight`, its connection slot is free and it is retried like after a
    /// 4xx. `None` only for a task this worker does not know (cannot happen).
    pub(super) async fn report_of(
        &mut self,
        done: Result<(tokio::task::Id, Report), JoinError>,
    ) -> Option<Report> {
        let error = match done {
            Ok((task, report)) => {
                self.tasks.remove(&task);
                return Some(report);
            }
            Err(error) => error,
        };
        let Some((id, pending, rcpts)) = self.tasks.remove(&error.id()) else {
            tracing::error!(channel = %self.name, error = %error, "queue: internal error: an unknown delivery task failed");
            return None;
        };
        let what = if error.is_panic() {
            let panic = error.into_panic();
            crate::unwind::panic_text(panic.as_ref())
        } else {
            "cancelled".to_string()
        };
        tracing::error!(
            id,
            channel = %self.name,
            error = %crate::text::escape_controls(&what),
            "queue: internal error during a delivery attempt; the message is retried like after a 4xx"
        );
        Some(
            internal_failure(
                self.queue.clone(),
                self.generation.clone(),
                self.channel,
                id,
                pending,
                rcpts,
            )
            .await,
        )
    }
}
