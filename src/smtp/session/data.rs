//! DATA and BDAT: a message streams through the decoder into a delivery draft; at its
//! end it is checked, routed and handed to delivery. The session keeps only the header
//! section (for routing).

use tracing::{debug, info, warn};

use super::{Session, Stop};
use crate::config::BareLf;
use crate::delivery::Draft;
use crate::metrics::{self, Outcome};
use crate::routing;
use crate::smtp::data::{Decoder, HeaderCapture};
use crate::smtp::reply::{Reply, Sequence, Verb};

/// A message streaming in.
pub(super) struct Body {
    draft: Draft,
    decoder: Decoder,
    headers: HeaderCapture,
    /// Writing the draft failed: the reply to give at the end.
    failed: Option<Reply>,
    /// `header_from = "replace"` of a `[[rewrite]]` entry (SPEC §4a).
    replace: Option<Replace>,
}

/// The header section of a message whose `From:` is replaced: held back until it is
/// complete, written rewritten, then the rest streams as usual. Once, before the message
/// reaches the spool or the upstream, so a retry or a restart sends the same bytes.
struct Replace {
    /// The entry's sender.
    sender: String,
    /// The envelope sender the client gave.
    original: String,
    stage: Stage,
}

enum Stage {
    /// Everything received so far (bounded: the header capture closes at its limit).
    Holding(Vec<u8>),
    /// The rewritten header section, as written to the draft.
    Written(Vec<u8>),
    /// The header section is too big: the message is refused, nothing more is written.
    Dropped,
}

impl Body {
    /// `header_limit`: the most header bytes kept (see [`header_limit`]).
    /// `rewrite`: the transaction's `[[rewrite]]`, whose `header_from = "replace"` holds
    /// the header section back.
    fn new(
        draft: Draft,
        decoder: Decoder,
        header_limit: usize,
        rewrite: Option<&crate::rewrite::Rewrite>,
    ) -> Self {
        let replace = rewrite
            .filter(|r| r.header_from == crate::config::HeaderFrom::Replace)
            .map(|r| Replace {
                sender: r.sender.clone(),
                original: r.original.clone(),
                stage: Stage::Holding(Vec::new()),
            });
        Body {
            draft,
            decoder,
            headers: HeaderCapture::new(header_limit),
            failed: None,
            replace,
        }
    }

    /// Takes decoded bytes: keeps the headers, writes to the draft unless the message is
    /// already over `max` (then it is only counted) or a write failed.
    async fn take(&mut self, out: &[u8], max: u64) {
        self.headers.push(out);
        if let Some(replace) = &mut self.replace {
            match &mut replace.stage {
                Stage::Holding(held) => {
                    held.extend_from_slice(out);
                    return self.release(max).await;
                }
                Stage::Dropped => return,
                Stage::Written(_) => {}
            }
        }
        self.write(out, max).await;
    }

    /// Writes the held header section, rewritten, once it is complete (and what came
    /// after it); drops it once it is too big.
    async fn release(&mut self, max: u64) {
        let Some(replace) = &mut self.replace else {
            return;
        };
        if !matches!(replace.stage, Stage::Holding(_)) {
            return;
        }
        if self.headers.too_big() {
            replace.stage = Stage::Dropped;
            return;
        }
        let Some(section) = self.headers.section() else {
            return;
        };
        let Stage::Holding(held) = std::mem::replace(&mut replace.stage, Stage::Dropped) else {
            return;
        };
        let rewritten =
            crate::message::rewrite::replace_from(section, &replace.sender, &replace.original);
        let rest = held.get(section.len()..).unwrap_or_default();
        let mut bytes = Vec::with_capacity(rewritten.len() + rest.len());
        bytes.extend_from_slice(&rewritten);
        bytes.extend_from_slice(rest);
        replace.stage = Stage::Written(rewritten);
        self.write(&bytes, max).await;
    }

    /// The header section the checks read: the rewritten one when `From:` is replaced.
    fn checked_section(&self) -> Option<&[u8]> {
        match &self.replace {
            Some(Replace {
                stage: Stage::Written(section),
                ..
            }) => Some(section),
            Some(_) => None,
            None => self.headers.section(),
        }
    }

    async fn write(&mut self, out: &[u8], max: u64) {
        if self.decoder.size() > max || self.failed.is_some() || out.is_empty() {
            return;
        }
        if let Err(e) = self.draft.write(out).await {
            warn!(id = self.draft.id(), error = %e, "writing message failed");
            self.failed = Some(Reply::local_error());
        }
    }
}

/// The most header bytes a session keeps: `max_header_size`, but never more than
/// `max_message_size` (a header section that large makes the message too big anyway, and
/// is refused as such), so a generous header setting cannot cost more memory than that.
fn header_limit(server: &crate::config::Server) -> usize {
    let limit = server.max_header_size.min(server.max_message_size);
    usize::try_from(limit).unwrap_or(usize::MAX)
}

impl Session {
    /// Why this transaction may not take a message yet, if it may not.
    fn body_refusal(&self, verb: Verb) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::bad_sequence(Sequence::NeedMail(verb))),
            Some(tx) if tx.envelope.recipients.is_empty() => {
                Some(Reply::bad_sequence(Sequence::NeedRcpt(verb)))
            }
            _ => None,
        }
    }

    /// DATA: `354`, then the dot-terminated message.
    pub(super) async fn data(&mut self) -> Result<(), Stop> {
        if let Some(refusal) = self.body_refusal(Verb::Data) {
            return self.reply(&refusal);
        }
        if self.tx.as_ref().is_some_and(|tx| tx.bdat.is_some()) {
            return self.reply(&Reply::bad_sequence(Sequence::DataAfterBdat));
        }
        let draft = match self.ctx.delivery.begin().await {
            Ok(draft) => draft,
            Err(refusal) => {
                self.count_refusal();
                return self.reply(&refusal);
            }
        };
        self.reply(&Reply::start_data())?;
        let max = self.config.server.max_message_size;
        let rewrite = self.tx.as_ref().and_then(|tx| tx.rewrite.as_ref());
        let limit = header_limit(&self.config.server);
        let mut body = Body::new(draft, Decoder::data(), limit, rewrite);
        // Sized to what a read decodes to (never more than the read), not 64 KiB up front.
        let mut out = Vec::new();
        loop {
            let input = &self.rbuf[self.rpos..];
            out.reserve(input.len());
            let end = body.decoder.feed(input, &mut out);
            self.rpos += end.unwrap_or(input.len());
            body.take(&out, max).await;
            out.clear();
            if end.is_some() {
                break;
            }
            self.fill(false).await?;
        }
        let reply = self.complete(body).await;
        self.reply(&reply)
    }

    /// BDAT: one chunk of `size` octets; the `last` one ends the message.
    pub(super) async fn bdat(&mut self, size: usize, last: bool) -> Result<(), Stop> {
        let refusal = self.body_refusal(Verb::Bdat);
        if let Some(refusal) = refusal {
            // The chunk follows the command whatever the answer: it must not be read as commands.
            self.skip(size).await?;
            return self.reply(&refusal);
        }
        let pending = self.tx.as_mut().and_then(|tx| tx.bdat.take());
        let mut body = match pending {
            Some(body) => body,
            None => match self.ctx.delivery.begin().await {
                Ok(draft) => {
                    let rewrite = self.tx.as_ref().and_then(|tx| tx.rewrite.as_ref());
                    let limit = header_limit(&self.config.server);
                    Body::new(draft, Decoder::bdat(), limit, rewrite)
                }
                Err(refusal) => {
                    self.count_refusal();
                    self.skip(size).await?;
                    self.tx = None;
                    return self.reply(&refusal);
                }
            },
        };
        let max = self.config.server.max_message_size;
        let mut out = Vec::new();
        let mut left = size;
        loop {
            let available = &self.rbuf[self.rpos..];
            let n = available.len().min(left);
            body.decoder.feed(&available[..n], &mut out);
            self.rpos += n;
            left -= n;
            if left == 0 && last {
                body.decoder.finish(&mut out);
            }
            body.take(&out, max).await;
            out.clear();
            if left == 0 {
                break;
            }
            self.fill(false).await?;
        }
        if last {
            let reply = self.complete(body).await;
            return self.reply(&reply);
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.bdat = Some(body);
        }
        self.reply(&Reply::chunk_ok(size))
    }

    /// A message of the open transaction refused before delivery saw it: counted on the
    /// channel its sender was routed to. (Delivery counts the messages it answers for.)
    fn count_refusal(&self) {
        if let Some(tx) = &self.tx {
            metrics::message(&self.config.channels[tx.channel].name, Outcome::Refused);
        }
    }

    /// Reads and drops `size` bytes of a refused BDAT chunk.
    async fn skip(&mut self, mut size: usize) -> Result<(), Stop> {
        loop {
            let n = (self.rbuf.len() - self.rpos).min(size);
            self.rpos += n;
            size -= n;
            if size == 0 {
                return Ok(());
            }
            self.fill(false).await?;
        }
    }

    /// The end of a message: checks it, routes it, hands it to delivery; ends the transaction.
    async fn complete(&mut self, mut body: Body) -> Reply {
        let Some(tx) = self.tx.take() else {
            return Reply::local_error();
        };
        let envelope = tx.envelope;
        let id = body.draft.id().to_string();
        let server = &self.config.server;
        body.headers.finish();
        // A message that ended inside its header section: the section is complete now.
        body.release(server.max_message_size).await;
        let refusal = if body.decoder.size() > server.max_message_size {
            Some(Reply::too_big(server.max_message_size))
        } else if body.headers.too_big() {
            Some(Reply::header_too_big(server.max_header_size))
        } else if let Some(failed) = body.failed.take() {
            Some(failed)
        } else if body.decoder.saw_bare() && server.bare_lf == BareLf::Reject {
            Some(Reply::bare_lf())
        } else {
            None
        };
        let decision = match (refusal, body.checked_section()) {
            (Some(r), _) => Err(r),
            (None, Some(section)) => {
                let headers = routing::parse_headers(section);
                routing::check_unambiguous(section, &headers)
                    .and_then(|()| {
                        routing::route_message(
                            &self.config,
                            &envelope.sender,
                            self.user.as_deref(),
                            envelope.recipients.len(),
                            &headers,
                        )
                    })
                    .and_then(|decision| {
                        routing::check_header_recipients(
                            &self.config,
                            decision.channel,
                            &envelope.recipients,
                            section,
                        )
                        .map(|()| decision)
                    })
                    .map_err(Reply::from)
            }
            // finish() above leaves the capture either complete or too big.
            (None, None) => Err(Reply::local_error()),
        };
        let decision = match decision {
            Ok(decision) => decision,
            Err(refusal) => {
                let channel = &self.config.channels[tx.channel].name;
                metrics::message(channel, Outcome::Refused);
                info!(
                    id,
                    peer = %self.peer,
                    sender = %envelope.sender,
                    rcpts = envelope.recipients.len(),
                    size = body.decoder.size(),
                    reply = %refusal,
                    "message refused"
                );
                return refusal;
            }
        };
        let size = body.decoder.size();
        let channel = self.config.channels[decision.channel].name.clone();
        // Boxed: the delivery future is large and would otherwise be part of every
        // session's future, idle or not. Delivery logs the message line itself.
        let mut draft = body.draft;
        if let Some(r) = &tx.rewrite {
            draft.set_rewritten_from(&r.original);
        }
        let finish = self.ctx.delivery.finish(draft, decision.channel, &envelope);
        let reply = Box::pin(finish).await;
        debug!(
            id,
            peer = %self.peer,
            sender = %envelope.sender,
            rcpts = envelope.recipients.len(),
            size,
            channel,
            reason = %decision.reason,
            reply = %reply,
            "message handed to delivery"
        );
        reply
    }
}
