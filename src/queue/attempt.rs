//! One delivery attempt of a queued message: one upstream transaction for some of its
//! pending recipients, the outcome applied to its state file, and when nothing is
//! pending any more, removal or `failed/` with a DSN.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Channel, ChannelId, ChannelKind, Config};
use crate::message::Envelope;
use crate::metrics;
use crate::reply::Reply;
use crate::state::format_time;
use crate::upstream::{self, Body, Error, Outcome};

use super::classify::{Verdict, backoff, classify_error, classify_refusal};
use super::ledger::SpoolLedger;
use super::spool::{self, MessageState, RcptStatus, Spool, now_ms};
use super::worker::{BUSY_RETRY_MS, ChannelEffect, Counted, Report, TRANSACTION_TIMEOUT};
use super::{Generation, Queue, dsn};

/// One delivery step: one upstream transaction for up to `rcpts` pending recipients of
/// one message, under the message's lock.
pub(super) struct Attempt {
    pub(super) queue: Arc<Queue>,
    /// The config and transports of the channel's worker; `channel` is its id there.
    pub(super) generation: Generation,
    pub(super) channel: ChannelId,
    pub(super) rcpts: usize,
    /// What the worker counted against the channel's windows for this attempt: taken
    /// back when no transaction starts.
    pub(super) counted: Option<Counted>,
    /// The channel sends a message whole and takes at most this many recipients, fewer
    /// than the message's pending ones: fail them with a DSN, sending nothing.
    pub(super) never_fits: Option<usize>,
    /// The message belongs to another channel, which handed it to this one.
    pub(super) lent: bool,
}

enum Prepared {
    /// The delivery lock, the state, and the message itself when it is small.
    Ready(File, Box<MessageState>, Option<Vec<u8>>),
    Busy,
    Gone,
}

impl Attempt {
    /// Runs the attempt on message `id`; what it did goes back to the channel task.
    pub(super) async fn run(self, id: String) -> Report {
        let spool = self.queue.spool.clone();
        let lock_id = id.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare(&spool, &lock_id, true)).await;
        let (lock, mut state, small) = match prepared {
            Ok(Ok(Prepared::Ready(lock, state, small))) => (lock, *state, small),
            Ok(Ok(Prepared::Gone)) => {
                return Report {
                    id,
                    next: None,
                    effect: ChannelEffect::None,
                    dsn: None,
                    uncount: self.counted.clone(),
                    settle: None,
                    parked: false,
                };
            }
            // Someone else holds the message (the CLI, or the worker a reload replaced,
            // still sending it): nothing was sent, so nothing counts.
            Ok(Ok(Prepared::Busy)) => {
                return Report {
                    id,
                    next: Some((now_ms() + BUSY_RETRY_MS, self.rcpts)),
                    effect: ChannelEffect::None,
                    dsn: None,
                    uncount: self.counted.clone(),
                    settle: None,
                    parked: false,
                };
            }
            Ok(Err(e)) => {
                tracing::error!(id, error = %e, "queue: cannot read message state; retrying in a minute");
                return Report {
                    id,
                    next: Some((now_ms() + 60_000, self.rcpts)),
                    effect: ChannelEffect::None,
                    dsn: None,
                    uncount: self.counted.clone(),
                    settle: None,
                    parked: false,
                };
            }
            Err(e) => {
                tracing::error!(id, error = %e, "queue: preparing delivery failed");
                return Report {
                    id,
                    next: Some((now_ms() + 60_000, self.rcpts)),
                    effect: ChannelEffect::None,
                    dsn: None,
                    uncount: self.counted.clone(),
                    settle: None,
                    parked: false,
                };
            }
        };
        let config = self.generation.config.clone();
        let channel_name = config.channels[self.channel].name.clone();

        let mut effect = ChannelEffect::None;
        if let Some(max) = self.never_fits {
            if state.pending() <= max {
                // Changed since it was scheduled (`queue delete`, a crash's recovery):
                // the worker counts it against the windows before it goes.
                drop(lock);
                return Report {
                    id,
                    next: Some((now_ms(), state.pending())),
                    effect,
                    dsn: None,
                    uncount: None,
                    settle: None,
                    parked: false,
                };
            }
            let reason = fail_never_fitting(&mut state, max, &channel_name);
            tracing::warn!(id, channel = %channel_name, reason = %reason, "queue: the message can never go over this channel; failing it");
        }
        // No transaction: what was counted for it is taken back.
        let mut sent_nothing = true;
        let chunk: Vec<usize> = state
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Pending)
            .map(|(i, _)| i)
            .take(self.rcpts)
            .collect();
        if !chunk.is_empty() {
            let envelope = Envelope {
                sender: state.sender.clone(),
                recipients: chunk
                    .iter()
                    .map(|&i| state.recipients[i].addr.clone())
                    .collect(),
                smtputf8: state.smtputf8,
                eightbit: state.eightbit,
            };
            let data = self.queue.spool.data_path(&id);
            let started = Instant::now();
            // Graph sends to every recipient the headers name, done or not: a message
            // that its own (SMTP) channel delivered in part before handing it over would
            // reach those recipients again, or be refused for naming them. It waits for
            // its own channel instead (`queue retry --all` or a reload gives it back).
            let done_before = matches!(config.channels[self.channel].kind, ChannelKind::Graph(_))
                && state
                    .recipients
                    .iter()
                    .any(|r| r.status != RcptStatus::Pending);
            if done_before && self.lent {
                // Nothing is sent, so nothing counts, and no retry can change it: it waits
                // for its own channel instead of being tried again at every backoff step.
                tracing::warn!(
                    id,
                    channel = %channel_name,
                    "queue: some recipients of this message are done already; Microsoft Graph would send to them again, so it waits for its own channel (`mailgate queue retry --all`, a reload or a restart)"
                );
                return Report {
                    id,
                    next: Some((now_ms(), state.pending())),
                    effect: ChannelEffect::None,
                    dsn: None,
                    uncount: self.counted.clone(),
                    settle: None,
                    parked: true,
                };
            }
            sent_nothing = done_before;
            let outcome = if done_before {
                tracing::warn!(
                    id,
                    channel = %channel_name,
                    "queue: some recipients of this message are done already; Microsoft Graph would send to them again, so it waits for its own channel"
                );
                Outcome {
                    refused: Vec::new(),
                    result: Err(Error::local(
                        "partly delivered before: Microsoft Graph would send to every header recipient again",
                    )),
                }
            } else {
                let ledger = SpoolLedger::new(&self.queue.spool, &id, state.graph_draft.clone());
                let outcome = match tokio::time::timeout(
                    TRANSACTION_TIMEOUT,
                    self.generation.transport.send_recorded(
                        self.channel,
                        &id,
                        &envelope,
                        match &small {
                            Some(bytes) => Body::Bytes(bytes),
                            None => Body::File(&data),
                        },
                        &ledger,
                    ),
                )
                .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome {
                        refused: Vec::new(),
                        result: Err(Error::Timeout {
                            step: upstream::Step::Transaction,
                        }),
                    },
                };
                // The attempt may have recorded or cleared a Graph draft in the state file.
                state.graph_draft = ledger.current();
                outcome
            };
            metrics::delivery_time(&channel_name, started.elapsed());
            let now = now_ms();
            let applied = apply_outcome(&mut state, &chunk, &outcome, &channel_name, now, &config);
            let pending = state.pending();
            // The status page's last outcomes: this transaction's.
            let status_of = |st| chunk.iter().any(|&i| state.recipients[i].status == st);
            let fate = if status_of(RcptStatus::Pending) {
                metrics::Outcome::Deferred
            } else if status_of(RcptStatus::Failed) {
                metrics::Outcome::Failed
            } else {
                metrics::Outcome::Delivered
            };
            metrics::status::record(
                &id,
                &state.sender,
                chunk.len(),
                &channel_name,
                fate,
                &applied.reply,
            );
            if pending > 0 {
                // The upstream logged the attempt itself; this is what the queue makes of it.
                tracing::info!(
                    id,
                    channel = %channel_name,
                    attempt = state.attempts,
                    pending,
                    reply = %applied.reply,
                    duration_ms = started.elapsed().as_millis() as u64,
                    next_attempt = %format_time(state.next_attempt_ms),
                    "queue: recipients still pending"
                );
            }
            effect = applied.effect;
        }

        // What the message's state says now, counted once it is saved: a message left
        // queued after a transaction was deferred when some recipient of that transaction
        // still waits (a message sent in parts, every one taken, is no deferral); one with
        // nothing pending is done.
        let fate = if state.pending() > 0 {
            chunk
                .iter()
                .any(|&i| state.recipients[i].status == RcptStatus::Pending)
                .then_some(metrics::Outcome::Deferred)
        } else if state.failed() == 0 {
            Some(metrics::Outcome::Delivered)
        } else {
            Some(metrics::Outcome::Failed)
        };
        let queue = self.queue.clone();
        let channel = self.channel;
        let finished = tokio::task::spawn_blocking(move || {
            let ch = &config.channels[channel];
            // settle releases the message's delivery lock when it is done with the message.
            settle(&queue, ch, &config.server.hostname, state, lock)
        })
        .await;
        match finished {
            Ok(Ok((next, dsn))) => {
                if let Some(fate) = fate {
                    metrics::message(&channel_name, fate);
                }
                Report {
                    id,
                    next,
                    effect,
                    dsn,
                    uncount: sent_nothing.then(|| self.counted.clone()).flatten(),
                    settle: (!sent_nothing).then(|| self.counted.clone()).flatten(),
                    parked: false,
                }
            }
            Ok(Err(e)) => {
                tracing::error!(id, error = %e, "queue: cannot update message state; it will be tried again");
                Report {
                    id,
                    next: Some((now_ms() + 60_000, self.rcpts)),
                    effect,
                    dsn: None,
                    uncount: sent_nothing.then(|| self.counted.clone()).flatten(),
                    settle: (!sent_nothing).then(|| self.counted.clone()).flatten(),
                    parked: false,
                }
            }
            Err(e) => {
                tracing::error!(id, error = %e, "queue: updating message state failed");
                Report {
                    id,
                    next: Some((now_ms() + 60_000, self.rcpts)),
                    effect,
                    dsn: None,
                    uncount: sent_nothing.then(|| self.counted.clone()).flatten(),
                    settle: (!sent_nothing).then(|| self.counted.clone()).flatten(),
                    parked: false,
                }
            }
        }
    }
}

/// The attempt on message `id` ended without a report (its task panicked or was
/// cancelled): recorded like a temporary failure of the `rcpts` recipients it was for
/// (attempt counted, backoff, give-up after `give_up_after`), under the message's lock
/// as any attempt. When even that fails, the message is simply due again in a minute.
pub(super) async fn internal_failure(
    queue: Arc<Queue>,
    generation: Generation,
    channel: ChannelId,
    id: String,
    pending: usize,
    rcpts: usize,
) -> Report {
    let config = generation.config.clone();
    let lock_id = id.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        let ch = &config.channels[channel];
        let (lock, mut state) = match prepare(&queue.spool, &lock_id, false)? {
            Prepared::Ready(lock, state, _) => (lock, *state),
            Prepared::Gone => return Ok((None, None)),
            Prepared::Busy => return Ok((Some((now_ms() + BUSY_RETRY_MS, pending)), None)),
        };
        let chunk: Vec<usize> = state
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Pending)
            .map(|(i, _)| i)
            .take(rcpts.max(1))
            .collect();
        let outcome = Outcome {
            refused: Vec::new(),
            result: Err(Error::local("internal error (see the log)")),
        };
        apply_outcome(&mut state, &chunk, &outcome, &ch.name, now_ms(), &config);
        settle(&queue, ch, &config.server.hostname, state, lock)
    })
    .await;
    let (next, dsn) = match recorded {
        Ok(Ok(recorded)) => recorded,
        Ok(Err(e)) => {
            tracing::error!(id, error = %e, "queue: cannot record the failed attempt; retrying in a minute");
            (Some((now_ms() + 60_000, pending)), None)
        }
        Err(e) => {
            tracing::error!(id, error = %e, "queue: recording the failed attempt failed; retrying in a minute");
            (Some((now_ms() + 60_000, pending)), None)
        }
    };
    Report {
        id,
        next,
        effect: ChannelEffect::None,
        dsn,
        uncount: None,
        settle: None,
        parked: false,
    }
}

/// Locks message `id` and reads its state; with `body`, a small message's bytes too.
fn prepare(spool: &Spool, id: &str, body: bool) -> std::io::Result<Prepared> {
    let lock = match spool::try_lock_data(&spool.data_path(id)) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Ok(Prepared::Busy),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Prepared::Gone),
        Err(e) => return Err(e),
    };
    // Read under the lock: `queue retry` and `queue delete` change the file only while holding it.
    let Some(state) = spool.read_state_locked(id)? else {
        return Ok(Prepared::Gone);
    };
    // A small message is read here, through the lock's own descriptor, and sent from
    // memory: one open and one hop to a blocking thread fewer than streaming the file.
    let small = if body && state.size <= super::draft::INLINE_MAX as u64 {
        read_small(&lock)?
    } else {
        None
    };
    Ok(Prepared::Ready(lock, Box::new(state), small))
}

/// The whole of `file` if it holds at most [`super::draft::INLINE_MAX`] bytes.
fn read_small(file: &File) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let max = super::draft::INLINE_MAX as u64;
    let mut bytes = Vec::with_capacity(4096);
    file.take(max + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

/// Pure: fails every pending recipient of a message with more of them than its graph
/// channel `channel` ever sends at once (`max`): Graph never splits a message, so it
/// would wait for ever. Returns the reply given to each, which the DSN states.
pub fn fail_never_fitting(state: &mut MessageState, max: usize, channel: &str) -> Reply {
    let reply = Reply::never_fits_graph(state.pending(), max, channel);
    for rcpt in state
        .recipients
        .iter_mut()
        .filter(|r| r.status == RcptStatus::Pending)
    {
        rcpt.status = RcptStatus::Failed;
        rcpt.reply = Some(reply.to_string());
    }
    state.last_reply = Some(reply.to_string());
    state.failure = Some(reply.to_string());
    reply
}

/// What one transaction did to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The reply to log (the upstream's, or the error as a reply).
    pub reply: String,
    /// What the channel must do.
    pub effect: ChannelEffect,
}

/// Pure: applies the outcome of one transaction (to the recipients at `chunk`) to the
/// message's state: recipient statuses, attempts, backoff, giving up.
pub fn apply_outcome(
    state: &mut MessageState,
    chunk: &[usize],
    outcome: &Outcome,
    channel: &str,
    now: u64,
    config: &Config,
) -> Applied {
    let (overall, reply) = match &outcome.result {
        Ok(reply) => (Verdict::Delivered, reply.clone()),
        Err(error) => (classify_error(error), error.record_reply(channel)),
    };
    // The upstream said when to come back (Graph's Retry-After): that, not our backoff.
    // `Retry-After: 0` or a date in the past says nothing: the backoff then, or a server
    // that keeps answering so would get a retry loop without a pause.
    let retry_after = outcome.result.as_ref().err().and_then(Error::retry_after);
    let method_refused = outcome
        .result
        .as_ref()
        .err()
        .is_some_and(Error::refuses_auth_method);
    let mut effect = ChannelEffect::None;
    let mut deferred = false;
    let mut note = |verdict: Verdict, reply: &Reply, effect: &mut ChannelEffect| match verdict {
        Verdict::Hold if *effect == ChannelEffect::None => {
            *effect = ChannelEffect::Hold(reply.to_string())
        }
        Verdict::Broken if method_refused => {
            *effect = ChannelEffect::AuthMethodRefused(reply.to_string())
        }
        Verdict::Broken => *effect = ChannelEffect::Broken(reply.to_string()),
        Verdict::Defer => deferred = true,
        _ => {}
    };
    for &i in chunk {
        let rcpt = &mut state.recipients[i];
        let refused = outcome
            .refused
            .iter()
            .find(|(addr, _)| *addr == rcpt.addr)
            .map(|(_, r)| r);
        let (verdict, why) = match refused {
            Some(r) => (classify_refusal(r), r),
            None => (overall, &reply),
        };
        match verdict {
            Verdict::Delivered => rcpt.status = RcptStatus::Delivered,
            Verdict::Fail => rcpt.status = RcptStatus::Failed,
            Verdict::SenderDenied => {
                rcpt.status = RcptStatus::Failed;
                state.sender_denied = true;
            }
            Verdict::Defer | Verdict::Hold | Verdict::Broken => {}
        }
        rcpt.reply = Some(why.to_string());
        note(verdict, why, &mut effect);
    }
    state.attempts = state.attempts.saturating_add(1);
    state.last_reply = Some(reply.to_string());
    state.next_attempt_ms = now;
    if deferred {
        state.deferrals = state.deferrals.saturating_add(1);
        let server = &config.server;
        let wait = retry_after
            .filter(|asked| !asked.is_zero())
            .unwrap_or_else(|| backoff(server.retry_first, server.retry_max, state.deferrals));
        state.next_attempt_ms =
            now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        let age = Duration::from_millis(now.saturating_sub(state.created_ms));
        if age >= server.give_up_after {
            for rcpt in state
                .recipients
                .iter_mut()
                .filter(|r| r.status == RcptStatus::Pending)
            {
                rcpt.status = RcptStatus::Failed;
                let last = rcpt.reply.clone().unwrap_or_else(|| reply.to_string());
                rcpt.reply = Some(last);
            }
            state.failure = Some(format!(
                "gave up after {}s in the queue; last reply: {reply}",
                server.give_up_after.as_secs()
            ));
        }
    }
    Applied {
        reply: reply.to_string(),
        effect,
    }
}

/// After a transaction: saves the state, and when no recipient is pending any more,
/// removes the message (all delivered) or queues a DSN and moves it to `failed/`.
/// Returns the next schedule of the message and the DSN queued, if any.
#[allow(clippy::type_complexity)]
fn settle(
    queue: &Queue,
    channel: &Channel,
    hostname: &str,
    mut state: MessageState,
    lock: File,
) -> std::io::Result<(Option<(u64, usize)>, Option<(String, usize)>)> {
    let spool = &queue.spool;
    let pending = state.pending();
    if pending > 0 {
        spool.write_state(&state)?;
        return Ok((Some((state.next_attempt_ms, pending)), None));
    }
    if state.failed() == 0 {
        spool.remove_delivered(&state.id, lock)?;
        tracing::info!(
            id = state.id,
            channel = state.channel,
            "delivered; removed from the spool"
        );
        return Ok((None, None));
    }
    let mut dsn = None;
    if state.dsn.is_none() {
        // Record the outcome before queuing the DSN, so that a crash cannot lose it.
        spool.write_state(&state)?;
        if let Some(queued) = queue_dsn(queue, channel, hostname, &state)? {
            state.dsn = Some(queued.0.clone());
            dsn = Some(queued);
        }
    }
    if state.failure.is_none() {
        let first = state
            .recipients
            .iter()
            .find(|r| r.status == RcptStatus::Failed);
        let reason = first.and_then(|r| r.reply.clone()).unwrap_or_default();
        state.failure = Some(format!(
            "{} of {} recipients failed: {reason}",
            state.failed(),
            state.recipients.len()
        ));
    }
    spool.move_to_failed(&state)?;
    tracing::warn!(
        id = state.id,
        channel = state.channel,
        failed = state.failed(),
        dsn = state.dsn.as_deref().unwrap_or("none"),
        reason = state.failure.as_deref().unwrap_or(""),
        "message failed; moved to failed/"
    );
    Ok((None, dsn))
}

/// Queues a DSN for the failed recipients of `state`, through the same channel, when
/// that is allowed: never for a null sender, never when the channel refused the sender
/// itself (SendAsDenied), and only with a `From:` the channel may use.
fn queue_dsn(
    queue: &Queue,
    ch: &Channel,
    hostname: &str,
    state: &MessageState,
) -> std::io::Result<Option<(String, usize)>> {
    if state.sender.is_empty() {
        return Ok(None);
    }
    let failed: Vec<(String, String)> = state
        .recipients
        .iter()
        .filter(|r| r.status == RcptStatus::Failed)
        .map(|r| {
            (
                r.addr.clone(),
                r.reply
                    .clone()
                    .unwrap_or_else(|| "554 5.0.0 failed".to_string()),
            )
        })
        .collect();
    let domain = state.sender.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    let daemon = format!("MAILER-DAEMON@{domain}");
    let from = if state.sender_denied {
        None
    } else if !domain.is_empty() && crate::scope::channel_allows(ch, &daemon) {
        Some(daemon)
    } else if crate::scope::channel_allows(ch, &state.sender) {
        Some(state.sender.clone())
    } else {
        None
    };
    let Some(from) = from else {
        tracing::warn!(
            id = state.id,
            channel = ch.name,
            "no DSN: the channel may not carry one for this sender"
        );
        return Ok(None);
    };
    let headers = spool::read_headers(&queue.spool.data_path(&state.id), 64 * 1024)?;
    let now = now_ms();
    let boundary = format!("{:016x}", rand::random::<u64>());
    let bytes = dsn::build(&dsn::DsnInput {
        hostname,
        original_id: &state.id,
        to: &state.sender,
        from: &from,
        arrival_ms: state.created_ms,
        now_ms: now,
        failed: &failed,
        headers: &headers,
        boundary: &boundary,
    });
    let id = crate::message::new_id();
    let envelope = Envelope {
        sender: String::new(),
        recipients: vec![state.sender.clone()],
        smtputf8: !state.sender.is_ascii(),
        eightbit: !bytes.is_ascii(),
    };
    let tmp = queue.spool.tmp_dir().join(&id);
    let write = || -> std::io::Result<()> {
        // Mode 0600 like every spool file (a spare is reused when there is one).
        let mut file = queue.spool.create_file(&tmp)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        drop(file);
        // commit fsyncs the data.
        queue.spool.commit(
            &tmp,
            &MessageState::new(&id, &ch.name, &envelope, bytes.len() as u64, now),
        )
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    tracing::info!(id, original = state.id, to = %crate::text::escape_controls(&state.sender), channel = ch.name, "DSN queued");
    Ok(Some((id, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ChannelKind, DeliveryMode, Limits, Server};
    use crate::testkit::config::{channel, server};

    fn config(retry_first: u64, retry_max: u64, give_up: u64) -> Config {
        let mut c = channel("c", ChannelKind::File { dir: "out".into() }, 2);
        c.limits = Limits {
            max_recipients: Some(2),
            ..c.limits
        };
        let mut config = crate::testkit::config::config(vec![c]);
        config.server = Server {
            delivery: DeliveryMode::Queue,
            retry_first: Duration::from_secs(retry_first),
            retry_max: Duration::from_secs(retry_max),
            give_up_after: Duration::from_secs(give_up),
            ..server()
        };
        config
    }

    fn state(rcpts: &[&str]) -> MessageState {
        let envelope = Envelope {
            sender: "a@example.com".into(),
            recipients: rcpts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        MessageState::new("m", "c", &envelope, 10, 1_000_000)
    }

    fn reply(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
        Reply::new(code, e, text)
    }

    fn statuses(st: &MessageState) -> Vec<RcptStatus> {
        st.recipients.iter().map(|r| r.status).collect()
    }

    #[test]
    fn partial_success_fails_only_refused_recipients() {
        use RcptStatus::*;
        let config = config(60, 3600, 86400);
        let mut st = state(&["b@x", "c@x", "d@x", "e@x"]);
        let outcome = Outcome {
            refused: vec![
                ("c@x".into(), reply(550, (5, 1, 1), "no such user")),
                ("d@x".into(), reply(450, (4, 2, 1), "mailbox busy")),
            ],
            result: Ok(reply(250, (2, 0, 0), "OK")),
        };
        let applied = apply_outcome(&mut st, &[0, 1, 2], &outcome, "c", 2_000_000, &config);
        assert_eq!(applied.effect, ChannelEffect::None);
        assert_eq!(statuses(&st), vec![Delivered, Failed, Pending, Pending]);
        assert_eq!(
            st.recipients[1].reply.as_deref(),
            Some("550 5.1.1 no such user")
        );
        // d@x was deferred: the message backs off.
        assert_eq!(st.deferrals, 1);
        assert_eq!(st.next_attempt_ms, 2_000_000 + 60_000);
        assert_eq!(st.attempts, 1);
    }

    #[test]
    fn success_of_a_chunk_leaves_the_rest_due_now() {
        use RcptStatus::*;
        let config = config(60, 3600, 86400);
        let mut st = state(&["b@x", "c@x", "d@x"]);
        let outcome = Outcome {
            refused: vec![],
            result: Ok(reply(250, (2, 0, 0), "OK")),
        };
        apply_outcome(&mut st, &[0, 1], &outcome, "c", 2_000_000, &config);
        assert_eq!(statuses(&st), vec![Delivered, Delivered, Pending]);
        assert_eq!((st.deferrals, st.next_attempt_ms), (0, 2_000_000));
    }

    #[test]
    fn temporary_failures_back_off_then_give_up() {
        use RcptStatus::*;
        let config = config(60, 3600, 3600);
        let mut st = state(&["b@x"]);
        let outcome = Outcome {
            refused: vec![],
            result: Err(Error::Connect {
                target: "h:25".into(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            }),
        };
        apply_outcome(&mut st, &[0], &outcome, "c", 1_000_000 + 1000, &config);
        assert_eq!(statuses(&st), vec![Pending]);
        assert_eq!(st.next_attempt_ms, 1_001_000 + 60_000);
        apply_outcome(&mut st, &[0], &outcome, "c", 1_100_000, &config);
        assert_eq!(st.next_attempt_ms, 1_100_000 + 120_000);
        assert_eq!(
            st.last_reply.as_deref().map(|r| r.starts_with("451 4.4.1")),
            Some(true)
        );
        // An hour after acceptance the message gives up.
        apply_outcome(&mut st, &[0], &outcome, "c", 1_000_000 + 3_600_000, &config);
        assert_eq!(statuses(&st), vec![Failed]);
        assert!(
            st.failure
                .as_deref()
                .unwrap()
                .starts_with("gave up after 3600s")
        );
        assert_eq!(
            dsn::status_of(st.recipients[0].reply.as_deref().unwrap()),
            "5.4.7"
        );
    }

    #[test]
    fn a_zero_or_past_retry_after_never_makes_a_tight_retry_loop() {
        let config = config(60, 3600, 86400);
        let throttled = |retry_after: Option<Duration>| Outcome {
            refused: vec![],
            result: Err(Error::Graph {
                status: 429,
                code: "TooManyRequests".into(),
                retry_after,
                reply: reply(451, (4, 7, 0), "throttled"),
            }),
        };
        let mut st = state(&["b@x"]);
        // `Retry-After: 0`, or an HTTP date in the past (parsed as zero): not "now", the
        // backoff.
        for wait in [60_000, 120_000, 240_000] {
            apply_outcome(
                &mut st,
                &[0],
                &throttled(Some(Duration::ZERO)),
                "c",
                2_000_000,
                &config,
            );
            assert_eq!(st.next_attempt_ms, 2_000_000 + wait);
        }
        // A Retry-After, shorter or longer than the backoff, is honoured as it is.
        apply_outcome(
            &mut st,
            &[0],
            &throttled(Some(Duration::from_secs(1))),
            "c",
            2_000_000,
            &config,
        );
        assert_eq!(st.next_attempt_ms, 2_000_000 + 1_000);
        apply_outcome(
            &mut st,
            &[0],
            &throttled(Some(Duration::from_secs(600))),
            "c",
            2_000_000,
            &config,
        );
        assert_eq!(st.next_attempt_ms, 2_000_000 + 600_000);
    }

    #[test]
    fn permanent_failure_fails_the_transaction_recipients() {
        use RcptStatus::*;
        let config = config(60, 3600, 86400);
        let mut st = state(&["b@x", "c@x", "d@x"]);
        let outcome = Outcome {
            refused: vec![],
            result: Err(Error::Rejected {
                step: upstream::Step::EndOfData,
                reply: reply(554, (5, 6, 0), "content rejected"),
            }),
        };
        apply_outcome(&mut st, &[0, 1], &outcome, "c", 2_000_000, &config);
        assert_eq!(statuses(&st), vec![Failed, Failed, Pending]);
        assert_eq!(st.deferrals, 0);
    }

    #[test]
    fn a_rcpt_refusal_never_holds_or_breaks_the_channel_whatever_its_text() {
        use RcptStatus::*;
        let config = config(60, 3600, 86400);
        // The upstream echoes the recipient address in its RCPT refusal.
        let quota = "SubmissionQuotaExceeded@x";
        let denied = "SendAsDenied@x";
        let mut st = state(&[quota, denied, "ok@x"]);
        let echo = |addr: &str, code, e| reply(code, e, &format!("<{addr}>: rejected"));
        let outcome = Outcome {
            refused: vec![
                (quota.into(), echo(quota, 554, (5, 2, 0))),
                (denied.into(), echo(denied, 554, (5, 2, 0))),
            ],
            result: Ok(reply(250, (2, 0, 0), "OK")),
        };
        let applied = apply_outcome(&mut st, &[0, 1, 2], &outcome, "c", 2_000_000, &config);
        assert_eq!(applied.effect, ChannelEffect::None);
        assert_eq!(statuses(&st), vec![Failed, Failed, Delivered]);
        assert!(!st.sender_denied, "a DSN may still go out");
        // Every recipient refused: the last refusal stands for the transaction.
        let mut st = state(&[quota]);
        let outcome = Outcome {
            refused: vec![(quota.into(), echo(quota, 535, (5, 7, 3)))],
            result: Err(Error::Rejected {
                step: upstream::Step::Rcpt,
                reply: echo(quota, 535, (5, 7, 3)),
            }),
        };
        let applied = apply_outcome(&mut st, &[0], &outcome, "c", 2_000_000, &config);
        assert_eq!(applied.effect, ChannelEffect::None);
        assert_eq!(statuses(&st), vec![Failed]);
    }

    #[test]
    fn a_message_graph_can_never_send_whole_fails_every_pending_recipient_saying_why() {
        use RcptStatus::*;
        let mut st = state(&["b@x", "c@x", "d@x"]);
        let reply = fail_never_fitting(&mut st, 2, "dave");
        assert_eq!(statuses(&st), vec![Failed, Failed, Failed]);
        assert_eq!(reply.enhanced_text().as_deref(), Some("5.5.3"));
        assert!(reply.is_permanent());
        let text = st.recipients[2].reply.clone().unwrap();
        assert!(text.contains("channel dave"), "{text}");
        assert!(text.contains("at most 2"), "{text}");
        assert!(text.contains("has 3"), "{text}");
        assert_eq!(dsn::status_of(&text), "5.5.3");
        assert_eq!(st.failure.as_deref(), Some(text.as_str()));
        assert_eq!(st.attempts, 0, "nothing was sent");
    }

    #[test]
    fn broken_and_held_channels_keep_the_message_pending() {
        use RcptStatus::*;
        let config = config(60, 3600, 86400);
        let mut st = state(&["b@x"]);
        let broken = Outcome {
            refused: vec![],
            result: Err(Error::Rejected {
                step: upstream::Step::Auth,
                reply: reply(535, (5, 7, 3), "Authentication unsuccessful"),
            }),
        };
        let applied = apply_outcome(&mut st, &[0], &broken, "c", 2_000_000, &config);
        assert_eq!(
            applied.effect,
            ChannelEffect::Broken("535 5.7.3 Authentication unsuccessful".into())
        );
        assert_eq!(statuses(&st), vec![Pending]);
        assert_eq!((st.deferrals, st.next_attempt_ms), (0, 2_000_000));
        let quota = Outcome {
            refused: vec![],
            result: Err(Error::Rejected {
                step: upstream::Step::EndOfData,
                reply: reply(554, (5, 2, 0), "SubmissionQuotaExceededException"),
            }),
        };
        let applied = apply_outcome(&mut st, &[0], &quota, "c", 2_000_000, &config);
        assert!(matches!(applied.effect, ChannelEffect::Hold(_)));
        assert_eq!(statuses(&st), vec![Pending]);
    }
}
