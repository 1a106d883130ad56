//! One SMTP transaction on a pooled connection: MAIL, RCPT…, DATA, either one
//! command at a time or pipelined (RFC 2920), then the message.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lettre::Address;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;

use super::body::{EmptyMessageEnd, FileChunks, PreparedBody, Source, stuff};
use super::error::Fail;
use super::pool::{Conn, SmtpChannel};
use super::stream::HOLD;
use super::{Body, Error, Step, Upstreams};
use crate::message::Envelope;
use crate::reply::{Reply, split_enhanced};

/// Most bytes of commands sent in one pipelined group before their replies are read
/// (RFC 2920 §3.1: a group must fit the TCP window, or client and server could both
/// block writing). Equal to [`HOLD`], so a group goes out as one send.
pub(super) const PIPELINE_GROUP: usize = HOLD;

/// Slowest upstream we wait for while writing DATA: the DATA timeout is
/// [`super::COMMAND_TIMEOUT`] plus one second per this many bytes.
const MIN_DATA_RATE: u64 = 32 * 1024;

/// How a transaction ended: its result, and whether the connection may be reused.
type Ended = (Result<Reply, Error>, bool);

impl Upstreams {
    /// One SMTP transaction over a pooled connection.
    pub(super) async fn relay(
        &self,
        ch: &SmtpChannel,
        envelope: &Envelope,
        body: Body<'_>,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<Reply, Error> {
        let prepared = PreparedBody::new(body).await?;
        let envelope = PreparedEnvelope::new(envelope, prepared.eightbit, all_or_nothing, refused)?;
        let mut conn = self.checkout(ch, true).await?;
        #[cfg(test)]
        if self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("a panic injected by a test, holding a connection slot");
        }
        let (mut result, mut reusable) = self
            .transaction(ch, &mut conn, &envelope, prepared, all_or_nothing, refused)
            .await;
        if conn.stale {
            tracing::debug!(channel = %ch.name, "pooled connection was closed; sending on another");
            drop(conn);
            conn = self.checkout(ch, false).await?;
            let prepared = PreparedBody::new(body).await?;
            (result, reusable) = self
                .transaction(ch, &mut conn, &envelope, prepared, all_or_nothing, refused)
                .await;
        }
        if reusable {
            ch.checkin(conn);
        }
        result
    }

    /// MAIL, RCPT…, DATA on `conn`. Also says whether the connection is fit for reuse.
    pub(super) async fn transaction(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        envelope: &PreparedEnvelope,
        body: PreparedBody<'_>,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> (Result<Reply, Error>, bool) {
        let info = conn.smtp.server_info();
        let has_utf8 = info.supports_feature(Extension::SmtpUtfEight);
        if envelope.needs_smtputf8 && !has_utf8 {
            let channel = ch.name.clone();
            return (Err(Error::NoSmtpUtf8 { channel }), true);
        }
        let mut parameters = Vec::new();
        if envelope.smtputf8 && has_utf8 {
            parameters.push(MailParameter::SmtpUtfEight);
        }
        // Without 8BITMIME upstream the 8-bit message still goes out as it is, as Postfix
        // does by default: refusing it would bounce mail most servers take anyway.
        if envelope.eightbit && info.supports_feature(Extension::EightBitMime) {
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        let mail = Mail::new(envelope.sender.clone(), parameters);
        let opened = if conn.pipelining {
            self.open_pipelined(ch, conn, mail, envelope, all_or_nothing, refused)
                .await
        } else {
            self.open_one_by_one(ch, conn, mail, envelope, all_or_nothing, refused)
                .await
        };
        if let Err(ended) = opened {
            return ended;
        }

        let data_timeout = self
            .timeout
            .saturating_add(Duration::from_secs(body.len / MIN_DATA_RATE));
        let sent = match body.source {
            _ if body.empty => {
                self.call(ch, data_timeout, conn.smtp.command(EmptyMessageEnd))
                    .await
            }
            Source::Bytes(bytes) => {
                // Past lettre's encoder (see `stream::Outbox`): reading the reply sends it.
                {
                    let mut outbox = conn.outbox.lock().unwrap_or_else(|e| e.into_inner());
                    stuff(bytes, &mut outbox);
                }
                self.call(ch, data_timeout, conn.smtp.read_response()).await
            }
            Source::File(file) => {
                // Blocking reads of 64 KiB inside lettre's synchronous iterator: short, and
                // the spool is local disk, so not worth a thread hop per chunk.
                let chunks = FileChunks {
                    file,
                    remaining: body.len,
                    poison: conn.poison.clone(),
                };
                self.call(ch, data_timeout, conn.smtp.message_iter(chunks))
                    .await
            }
        };
        match sent {
            Ok(response) => (Ok(upstream_response(&response, &ch.name)), true),
            Err(Fail::Reply(reply)) => {
                // The transaction is over either way; 421 means the server is closing.
                let reusable = reply.code != 421;
                let step = Step::EndOfData;
                (Err(Error::Rejected { step, reply }), reusable)
            }
            Err(_) if conn.poison.load(Ordering::SeqCst) => (
                Err(Error::local("reading the message failed; DATA aborted")),
                false,
            ),
            Err(fail) => (Err(fail.at(Step::EndOfData)), false),
        }
    }

    /// MAIL, RCPT…, DATA one command at a time, stopping at the first failure. `Ok`
    /// once the upstream waits for the message (`354`).
    async fn open_one_by_one(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        mail: Mail,
        envelope: &PreparedEnvelope,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<(), Ended> {
        if let Err(fail) = self.call(ch, self.timeout, conn.smtp.command(mail)).await {
            if conn.unchecked && fail.closes() {
                conn.stale = true;
                return Err((Err(fail.at(Step::Mail)), false));
            }
            return Err(self.abort(ch, conn, fail, Step::Mail).await);
        }
        let mut accepted = 0;
        let mut last_refusal = None;
        for (raw, address) in &envelope.recipients {
            match self
                .call(
                    ch,
                    self.timeout,
                    conn.smtp.command(Rcpt::new(address.clone(), Vec::new())),
                )
                .await
            {
                Ok(_) => accepted += 1,
                Err(Fail::Reply(reply)) if !all_or_nothing && reply.code != 421 => {
                    refused.push((raw.clone(), reply.clone()));
                    last_refusal = Some(reply);
                }
                Err(fail) => return Err(self.abort(ch, conn, fail, Step::Rcpt).await),
            }
        }
        if accepted == 0 {
            // Every recipient was refused (each refusal is in `refused`).
            let Some(reply) = last_refusal else {
                return Err((Err(Error::local("no recipient to send to")), true));
            };
            return Err(self.abort(ch, conn, Fail::Reply(reply), Step::Rcpt).await);
        }
        if let Err(fail) = self.call(ch, self.timeout, conn.smtp.command(Data)).await {
            return Err(self.abort(ch, conn, fail, Step::Data).await);
        }
        Ok(())
    }

    /// MAIL, RCPT… and DATA sent together (RFC 2920), then every reply read in order,
    /// negative ones too. `Ok` once the upstream waits for the message (`354`) and the
    /// transaction may go ahead.
    async fn open_pipelined(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        mail: Mail,
        envelope: &PreparedEnvelope,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<(), Ended> {
        let mut commands = Vec::with_capacity(envelope.recipients.len() + 2);
        commands.push(mail.to_string());
        for (_, address) in &envelope.recipients {
            commands.push(Rcpt::new(address.clone(), Vec::new()).to_string());
        }
        commands.push(Data.to_string());
        let (replies, broken) = self.pipeline(ch, conn, &commands).await;
        if let Some(fail) = broken {
            // Stopped before DATA's reply: no message went out. A connection reused on
            // trust and closed at MAIL is replaced and the message sent again.
            if replies.is_empty() && conn.unchecked && fail.closes() {
                conn.stale = true;
            }
            let step = match replies.len() {
                0 => Step::Mail,
                n if n == commands.len() - 1 => Step::Data,
                _ => Step::Rcpt,
            };
            return Err((Err(fail.at(step)), false));
        }
        // Without `broken`, there is one reply per command.
        let [mail_reply, rcpt_replies @ .., data_reply] = &replies[..] else {
            return Err((Err(Error::local("pipelined replies missing")), false));
        };
        let mut accepted = 0;
        let (mut first_refusal, mut last_refusal) = (None, None);
        if mail_reply.is_ok() {
            for ((raw, _), reply) in envelope.recipients.iter().zip(rcpt_replies) {
                match reply {
                    Ok(()) => accepted += 1,
                    Err(reply) => {
                        if !all_or_nothing {
                            refused.push((raw.clone(), reply.clone()));
                        }
                        first_refusal.get_or_insert(reply);
                        last_refusal = Some(reply);
                    }
                }
            }
        }
        // Why the transaction must not go ahead, if it must not.
        let stop = match mail_reply {
            Err(reply) => Some((reply, Step::Mail)),
            Ok(()) if all_or_nothing => first_refusal.map(|r| (r, Step::Rcpt)),
            Ok(()) if accepted == 0 => last_refusal.map(|r| (r, Step::Rcpt)),
            Ok(()) => None,
        };
        match (stop, data_reply) {
            (None, Ok(())) => Ok(()),
            (None, Err(reply)) => Err(self
                .abort(ch, conn, Fail::Reply(reply.clone()), Step::Data)
                .await),
            (Some((reply, step)), Err(_)) => {
                Err(self.abort(ch, conn, Fail::Reply(reply.clone()), step).await)
            }
            // The upstream waits for a message it must not get: closing the connection
            // without the end of data makes it discard the transaction (RFC 5321 §3.3).
            (Some((reply, step)), Ok(())) => {
                tracing::debug!(
                    channel = %ch.name,
                    "transaction refused after DATA was accepted; closing the connection"
                );
                let reply = reply.clone();
                Err((Err(Error::Rejected { step, reply }), false))
            }
        }
    }

    /// Sends `commands` in groups of at most [`PIPELINE_GROUP`] bytes and reads each
    /// one's reply in order: `Ok` for a positive one, the reply for a negative one.
    /// Stops at a timeout, a network error or a `421` (the upstream is closing), which
    /// comes back as the second value.
    async fn pipeline(
        &self,
        ch: &SmtpChannel,
        conn: &mut Conn,
        commands: &[String],
    ) -> (Vec<Result<(), Reply>>, Option<Fail>) {
        let mut replies = Vec::with_capacity(commands.len());
        let mut start = 0;
        while start < commands.len() {
            let mut end = start + 1;
            let mut size = commands[start].len();
            while end < commands.len() && size + commands[end].len() <= PIPELINE_GROUP {
                size += commands[end].len();
                end += 1;
            }
            let group = commands[start..end].concat();
            for i in start..end {
                // The group is written with the first read; the others only read.
                let reply = if i == start {
                    self.call(ch, self.timeout, conn.smtp.command(&group)).await
                } else {
                    self.call(ch, self.timeout, conn.smtp.read_response()).await
                };
                match reply {
                    Ok(_) => replies.push(Ok(())),
                    Err(Fail::Reply(reply)) if reply.code != 421 => replies.push(Err(reply)),
                    Err(fail) => return (replies, Some(fail)),
                }
            }
            start = end;
        }
        (replies, None)
    }

    /// Ends a transaction that failed before the message went out.
    async fn abort(&self, ch: &SmtpChannel, conn: &mut Conn, fail: Fail, step: Step) -> Ended {
        match fail {
            Fail::Reply(reply) if reply.code != 421 => {
                let reset = self
                    .call(ch, self.timeout, conn.smtp.command(Rset))
                    .await
                    .is_ok();
                (Err(Error::Rejected { step, reply }), reset)
            }
            fail => (Err(fail.at(step)), false),
        }
    }
}

/// A positive reply from lettre as our [`Reply`], every line kept, a repeated
/// enhanced code said once.
pub(super) fn upstream_response(response: &Response, channel: &str) -> Reply {
    let mut enhanced = None;
    let mut text = String::new();
    for (i, line) in response.message().enumerate() {
        let (code, rest) = split_enhanced(line);
        let line = if i == 0 {
            enhanced = code;
            rest
        } else if code.is_some() && code == enhanced {
            rest
        } else {
            line
        };
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(line);
    }
    Reply::from_upstream(u16::from(response.code()), enhanced, &text, channel)
}

/// The addresses as lettre needs them, checked before any connection is used.
pub(super) struct PreparedEnvelope {
    sender: Option<Address>,
    /// As the client gave them, and parsed.
    recipients: Vec<(String, Address)>,
    /// Non-ASCII addresses, or a client-declared SMTPUTF8 message that has 8-bit content:
    /// it cannot go to an upstream without SMTPUTF8.
    needs_smtputf8: bool,
    /// Pass `SMTPUTF8` on (when the upstream has it).
    smtputf8: bool,
    /// Pass `BODY=8BITMIME` on (when the upstream has it).
    eightbit: bool,
}

impl PreparedEnvelope {
    pub(super) fn new(
        envelope: &Envelope,
        body_eightbit: bool,
        all_or_nothing: bool,
        refused: &mut Vec<(String, Reply)>,
    ) -> Result<Self, Error> {
        let sender = if envelope.sender.is_empty() {
            None
        } else {
            let parsed = Address::from_str(&envelope.sender).map_err(|_| Error::BadAddress {
                address: envelope.sender.clone(),
                sender: true,
            })?;
            Some(parsed)
        };
        let mut recipients = Vec::with_capacity(envelope.recipients.len());
        let mut last_refusal = None;
        for raw in &envelope.recipients {
            match Address::from_str(raw) {
                Ok(address) => recipients.push((raw.clone(), address)),
                Err(_) => {
                    if all_or_nothing {
                        return Err(Error::BadAddress {
                            address: raw.clone(),
                            sender: false,
                        });
                    }
                    refused.push((raw.clone(), Reply::bad_recipient_syntax(raw)));
                    last_refusal = Some(raw);
                }
            }
        }
        if recipients.is_empty() {
            // Each refusal is in `refused`; the last one stands for the message.
            return Err(match last_refusal {
                Some(raw) => Error::BadAddress {
                    address: raw.clone(),
                    sender: false,
                },
                None => Error::local("no recipient to send to"),
            });
        }
        let non_ascii =
            !envelope.sender.is_ascii() || envelope.recipients.iter().any(|r| !r.is_ascii());
        Ok(PreparedEnvelope {
            sender,
            recipients,
            needs_smtputf8: non_ascii || (envelope.smtputf8 && body_eightbit),
            smtputf8: non_ascii || envelope.smtputf8,
            eightbit: envelope.eightbit || body_eightbit,
        })
    }
}
