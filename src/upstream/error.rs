//! Why an upstream transaction did not complete, at which step, and what that means
//! (SPEC §7's table), typed so that callers match on it instead of on reply text.

use std::fmt;
use std::io;

use lettre::transport::smtp::Error as SmtpError;

use crate::reply::{Reply, split_enhanced};

/// An enhanced status code (RFC 3463): class, subject, detail.
pub type Enhanced = (u8, u16, u16);

/// The step of the SMTP conversation an upstream reply or failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// TCP connect, the greeting, EHLO.
    Connect,
    /// STARTTLS or the implicit TLS handshake.
    Tls,
    /// AUTH.
    Auth,
    /// `MAIL FROM`.
    Mail,
    /// `RCPT TO`: its reply concerns that recipient alone.
    Rcpt,
    /// The `DATA` command (before the message).
    Data,
    /// The end of data: the upstream's verdict on the message.
    EndOfData,
    /// The whole transaction (a caller's overall deadline).
    Transaction,
}

impl Step {
    /// Whether a reply at this step speaks for the whole channel (SPEC §7: only AUTH,
    /// MAIL and the end of DATA may hold or break a channel).
    pub fn may_affect_channel(self) -> bool {
        matches!(self, Step::Auth | Step::Mail | Step::EndOfData)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Tls => "TLS",
            Step::Auth => "AUTH",
            Step::Mail => "MAIL",
            Step::Rcpt => "RCPT",
            Step::Data => "DATA",
            Step::EndOfData => "end of data",
            Step::Transaction => "transaction",
        })
    }
}

/// What an upstream outcome means for the message and its channel (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Busy, throttled, unreachable, timed out, local trouble: try again later.
    Transient,
    /// The provider's sending quota is reached: hold the channel's queue.
    Quota,
    /// The credentials are refused: the channel is broken until resumed.
    CredentialsBroken,
    /// This sender may not use this mailbox: the message fails, and no DSN goes
    /// through the channel that refused the sender.
    SenderDenied,
    /// The message (or recipient) is refused for good.
    Permanent,
}

/// Classifies a negative upstream reply given at `step`: enhanced codes plus the
/// provider's documented text, never text alone. A reply to RCPT is about that
/// recipient only, whatever it says.
pub fn classify(step: Step, reply: &Reply) -> Class {
    let by_code = if reply.is_permanent() {
        Class::Permanent
    } else {
        // 4xx, or 1xx/3xx where a final answer was due (a protocol hiccup).
        Class::Transient
    };
    // A RCPT refusal may echo the recipient's address (`SubmissionQuotaExceeded@…`):
    // only replies about the session or the message itself speak for the channel.
    if !step.may_affect_channel() {
        return by_code;
    }
    let text = reply.text.to_ascii_lowercase();
    let enhanced =
        |s: u16, d: u16| matches!(reply.enhanced, Some((5, es, ed)) if es == s && ed == d);
    if (enhanced(2, 0) && text.contains("submissionquotaexceeded"))
        || (reply.code == 550 && enhanced(4, 5))
    {
        Class::Quota
    } else if (enhanced(2, 0) && text.contains("sendasdenied")) || enhanced(7, 60) {
        Class::SenderDenied
    } else if reply.code == 535
        || enhanced(7, 3)
        || enhanced(7, 8)
        || enhanced(7, 139)
        || enhanced(7, 30)
        || enhanced(7, 57)
    {
        Class::CredentialsBroken
    } else {
        by_code
    }
}

/// Why a transaction did not complete. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TCP connection could not be opened (refused, unreachable, no answer).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// `host:port`.
        target: String,
        /// The socket error (`TimedOut` when the connect got no answer).
        #[source]
        source: io::Error,
    },
    /// The connection broke (or the upstream spoke garbage) at `step`.
    #[error("connection lost at {step}: {source}")]
    Dropped {
        /// Where it broke.
        step: Step,
        /// lettre's error, with its cause.
        #[source]
        source: SmtpError,
    },
    /// The TLS handshake or certificate verification failed.
    #[error("TLS with {target} failed: {source}")]
    Tls {
        /// `host:port`.
        target: String,
        /// The rustls (or lettre) error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The upstream does not offer STARTTLS on a channel that requires it.
    #[error("{target} does not offer STARTTLS; not continuing in plaintext")]
    NoStartTls {
        /// `host:port`.
        target: String,
    },
    /// The upstream offers none of the AUTH mechanisms we can use.
    #[error("AUTH refused: {}", Reply::upstream_no_auth_mechanism(channel))]
    NoAuthMechanism {
        /// The channel's name.
        channel: String,
    },
    /// No answer in time at `step`.
    #[error("upstream timed out at {step}")]
    Timeout {
        /// Where it stopped answering.
        step: Step,
    },
    /// The upstream answered `step` with a negative reply (its reply, naming the channel).
    #[error("{step} refused: {reply}")]
    Rejected {
        /// The command it answered.
        step: Step,
        /// Its reply.
        reply: Reply,
    },
    /// The message needs SMTPUTF8 and the upstream lacks it.
    #[error("refused: {}", Reply::upstream_no_smtputf8(channel))]
    NoSmtpUtf8 {
        /// The channel's name.
        channel: String,
    },
    /// An address cannot be put in `MAIL FROM` (`sender`) or `RCPT TO`.
    #[error("refused: {}", address_reply(address, *sender))]
    BadAddress {
        /// The address as the client gave it.
        address: String,
        /// It is the envelope sender.
        sender: bool,
    },
    /// No OAuth access token for the XOAUTH2 login: the token endpoint is unavailable
    /// (temporary) or refused the grant (the channel's credentials are broken).
    #[error(transparent)]
    OAuth(#[from] crate::oauth::Error),
    /// Microsoft Graph answered with an HTTP error. `reply` is the SMTP reply that
    /// stands for it (naming the channel, the status and Graph's error code); the class
    /// follows the status (SPEC §7), not the reply.
    #[error("Microsoft Graph answered HTTP {status}{}: {reply}", code_suffix(code))]
    Graph {
        /// The HTTP status.
        status: u16,
        /// The `error.code` of Graph's JSON answer (empty when there was none).
        code: String,
        /// `Retry-After`, when the answer had one.
        retry_after: Option<std::time::Duration>,
        /// The reply for the queue's records, DSNs and relay-mode clients.
        reply: Reply,
    },
    /// Local trouble: the file channel, reading the spool, a bad message, the pool.
    #[error("local error: {what}")]
    Local {
        /// What failed.
        what: String,
        /// The I/O error, when there was one.
        #[source]
        source: Option<io::Error>,
    },
}

fn code_suffix(code: &str) -> String {
    if code.is_empty() {
        String::new()
    } else {
        format!(" ({code})")
    }
}

/// What an HTTP status from Graph means (SPEC §7): 429 and 5xx are temporary; 401 (after
/// the one refresh), 403 (no permission on the mailbox) and 404 (no such mailbox) stop
/// the channel; every other 4xx (400 invalid recipient, 413 too large) fails the message.
/// `403 ErrorSendAsDenied` (the message's `From:`/`Sender:` is not the mailbox) is about
/// that message, like SMTP's `554 5.2.0 SendAsDenied`: it fails alone.
pub fn classify_http(status: u16, code: &str) -> Class {
    match status {
        403 if code.eq_ignore_ascii_case("ErrorSendAsDenied") => Class::SenderDenied,
        // 407: the outbound proxy refused its credentials; Graph never saw the request.
        407 | 429 | 500..=599 => Class::Transient,
        401 | 403 | 404 => Class::CredentialsBroken,
        400..=499 => Class::Permanent,
        _ => Class::Transient,
    }
}

fn address_reply(address: &str, sender: bool) -> Reply {
    if sender {
        Reply::bad_sender_syntax(address)
    } else {
        Reply::bad_recipient_syntax(address)
    }
}

impl Error {
    /// A local failure without an I/O cause.
    pub fn local(what: impl Into<String>) -> Self {
        Error::Local {
            what: what.into(),
            source: None,
        }
    }

    /// A local I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Local {
            what: what.into(),
            source: Some(source),
        }
    }

    /// What the failure means (SPEC §7).
    pub fn class(&self) -> Class {
        match self {
            Error::Rejected { step, reply } => classify(*step, reply),
            Error::NoSmtpUtf8 { .. } | Error::BadAddress { .. } => Class::Permanent,
            Error::Graph { status, code, .. } => classify_http(*status, code),
            Error::OAuth(e) if e.is_transient() => Class::Transient,
            Error::OAuth(_) => Class::CredentialsBroken,
            Error::Connect { .. }
            | Error::Dropped { .. }
            | Error::Tls { .. }
            | Error::NoStartTls { .. }
            | Error::NoAuthMechanism { .. }
            | Error::Timeout { .. }
            | Error::Local { .. } => Class::Transient,
        }
    }

    /// The upstream may have taken the message although the transaction failed: the
    /// connection broke or stopped answering once the message was on its way, so its
    /// verdict was lost. Such a send still counts against the channel's limits.
    pub fn may_have_delivered(&self) -> bool {
        matches!(
            self,
            Error::Dropped {
                step: Step::EndOfData | Step::Transaction,
                ..
            } | Error::Timeout {
                step: Step::EndOfData | Step::Transaction,
            }
        )
    }

    /// Worth trying again later (includes a held channel's quota reply).
    pub fn is_transient(&self) -> bool {
        !self.is_permanent()
    }

    /// The message (or the channel's credentials) is refused for good.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Rejected { reply, .. } | Error::Graph { reply, .. } => reply.is_permanent(),
            Error::NoSmtpUtf8 { .. } | Error::BadAddress { .. } => true,
            _ => false,
        }
    }

    /// How long the upstream asked us to wait before trying again (Graph's `Retry-After`).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Graph { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The provider refuses the way the channel authenticates, not just these
    /// credentials (SPEC §7 "Fallback": `535 5.7.139` SMTP AUTH disabled, `550 5.7.30`
    /// basic auth off, an OAuth grant refused): mail may go over the channel's fallback.
    pub fn refuses_auth_method(&self) -> bool {
        match self {
            Error::Rejected { step, reply } if step.may_affect_channel() => matches!(
                (reply.code, reply.enhanced),
                (535, Some((5, 7, 139))) | (550, Some((5, 7, 30)))
            ),
            // The provider refused the grant; not a token that was never stored or read.
            Error::OAuth(e) => e
                .code()
                .is_some_and(|c| !matches!(c, "no_refresh_token" | "token_unreadable")),
            _ => false,
        }
    }

    /// The upstream's code and enhanced code, when it answered with a reply.
    pub fn status(&self) -> Option<(u16, Option<Enhanced>)> {
        match self {
            Error::Rejected { reply, .. } | Error::Graph { reply, .. } => {
                Some((reply.code, reply.enhanced))
            }
            _ => None,
        }
    }

    /// The step at which the upstream answered or failed, when known.
    pub fn step(&self) -> Option<Step> {
        match self {
            Error::Connect { .. } => Some(Step::Connect),
            Error::Tls { .. } | Error::NoStartTls { .. } => Some(Step::Tls),
            Error::NoAuthMechanism { .. } | Error::OAuth(_) => Some(Step::Auth),
            Error::Graph { status, code, .. }
                if classify_http(*status, code) == Class::CredentialsBroken =>
            {
                Some(Step::Auth)
            }
            Error::Graph { .. } => Some(Step::EndOfData),
            Error::Dropped { step, .. }
            | Error::Timeout { step }
            | Error::Rejected { step, .. } => Some(*step),
            Error::NoSmtpUtf8 { .. } | Error::BadAddress { .. } | Error::Local { .. } => None,
        }
    }

    /// The reply a relay-mode client gets (SPEC §5), naming the channel.
    pub fn client_reply(&self, channel: &str) -> Reply {
        match self {
            Error::Connect { .. } | Error::Dropped { .. } => Reply::upstream_unreachable(channel),
            Error::Tls { .. } | Error::NoStartTls { .. } => Reply::upstream_tls_failed(channel),
            Error::NoAuthMechanism { .. }
            | Error::OAuth(_)
            | Error::Rejected {
                step: Step::Auth, ..
            } => Reply::upstream_auth_failed(channel),
            Error::Timeout { .. } => Reply::upstream_timeout(channel),
            Error::Graph { status, code, .. }
                if classify_http(*status, code) == Class::CredentialsBroken =>
            {
                Reply::upstream_auth_failed(channel)
            }
            Error::Rejected { reply, .. } | Error::Graph { reply, .. } => reply.clone(),
            Error::NoSmtpUtf8 { .. } => Reply::upstream_no_smtputf8(channel),
            Error::BadAddress { address, sender } => address_reply(address, *sender),
            Error::Local { .. } => Reply::local_error(),
        }
    }

    /// The failure as a reply for the queue's records and DSNs: the upstream's own
    /// reply when there was one, else the client reply with the detail appended.
    pub fn record_reply(&self, channel: &str) -> Reply {
        match self {
            Error::Rejected { reply, .. } | Error::Graph { reply, .. } => reply.clone(),
            Error::NoAuthMechanism { .. } => Reply::upstream_no_auth_mechanism(channel),
            Error::NoSmtpUtf8 { .. } | Error::BadAddress { .. } | Error::Timeout { .. } => {
                self.client_reply(channel)
            }
            other => {
                let mut reply = other.client_reply(channel);
                reply.text = format!("{} ({other})", reply.text);
                reply
            }
        }
    }
}

/// A failed lettre call, before we know which step it belongs to.
pub(super) enum Fail {
    /// The upstream answered with a negative reply (already naming the channel).
    Reply(Reply),
    /// Network, TLS or protocol trouble.
    Net(SmtpError),
    /// No answer in time.
    Timeout,
}

impl Fail {
    /// Sorts a lettre error: a reply with a code, or trouble on the connection.
    pub(super) fn from_lettre(e: SmtpError, channel: &str) -> Self {
        match e.status() {
            Some(code) => {
                // lettre keeps the enhanced code in the text of its source.
                let text = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let (enhanced, text) = split_enhanced(&text);
                Fail::Reply(Reply::from_upstream(
                    u16::from(code),
                    enhanced,
                    text,
                    channel,
                ))
            }
            None => Fail::Net(e),
        }
    }

    /// The failure as the error of `step`.
    pub(super) fn at(self, step: Step) -> Error {
        match self {
            Fail::Reply(reply) => Error::Rejected { step, reply },
            Fail::Net(source) => Error::Dropped { step, source },
            Fail::Timeout => Error::Timeout { step },
        }
    }

    /// The upstream closed (or is closing) the connection.
    pub(super) fn closes(&self) -> bool {
        match self {
            Fail::Net(_) => true,
            Fail::Reply(reply) => reply.code == 421,
            Fail::Timeout => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.to_string(),
        }
    }

    #[test]
    fn spec_table() {
        use Class::*;
        let table = [
            (r(421, Some((4, 3, 2)), "Service not available"), Transient),
            (
                r(
                    432,
                    Some((4, 3, 2)),
                    "STOREDRV.ClientSubmit; sender thread limit exceeded",
                ),
                Transient,
            ),
            (r(451, Some((4, 7, 0)), "Temporary server error"), Transient),
            (r(452, Some((4, 5, 3)), "Too many recipients"), Transient),
            (r(421, None, "too many connections"), Transient),
            (
                r(
                    554,
                    Some((5, 2, 0)),
                    "STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed",
                ),
                Quota,
            ),
            (
                r(550, Some((5, 4, 5)), "Daily user sending limit exceeded"),
                Quota,
            ),
            (
                r(535, Some((5, 7, 3)), "Authentication unsuccessful"),
                CredentialsBroken,
            ),
            (
                r(535, Some((5, 7, 8)), "Username and Password not accepted"),
                CredentialsBroken,
            ),
            (
                r(
                    535,
                    Some((5, 7, 139)),
                    "Authentication unsuccessful, SmtpClientAuthentication is disabled",
                ),
                CredentialsBroken,
            ),
            (r(535, None, "auth failed"), CredentialsBroken),
            (
                r(
                    550,
                    Some((5, 7, 30)),
                    "Basic authentication is not supported",
                ),
                CredentialsBroken,
            ),
            (
                r(
                    530,
                    Some((5, 7, 57)),
                    "Client not authenticated to send mail",
                ),
                CredentialsBroken,
            ),
            (
                r(
                    554,
                    Some((5, 2, 0)),
                    "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
                ),
                SenderDenied,
            ),
            (
                r(
                    550,
                    Some((5, 7, 60)),
                    "Client does not have permissions to send as this sender",
                ),
                SenderDenied,
            ),
            (r(550, Some((5, 1, 1)), "User unknown"), Permanent),
            (r(552, Some((5, 3, 4)), "Message too big"), Permanent),
            (r(554, None, "Transaction failed"), Permanent),
            (r(354, None, "go ahead"), Transient),
        ];
        for step in [Step::Auth, Step::Mail, Step::EndOfData] {
            for (reply, want) in &table {
                assert_eq!(classify(step, reply), *want, "{step}: {reply}");
            }
        }
    }

    #[test]
    fn only_auth_mail_and_end_of_data_replies_speak_for_the_channel() {
        let quota = r(
            554,
            Some((5, 2, 0)),
            "<SubmissionQuotaExceeded@example.org>: Recipient address rejected",
        );
        let auth = r(535, Some((5, 7, 3)), "Authentication unsuccessful");
        for step in [Step::Connect, Step::Tls, Step::Rcpt, Step::Data] {
            assert_eq!(classify(step, &quota), Class::Permanent, "{step}");
            assert_eq!(classify(step, &auth), Class::Permanent, "{step}");
        }
        let busy = r(451, Some((4, 3, 0)), "SubmissionQuotaExceeded");
        assert_eq!(classify(Step::Rcpt, &busy), Class::Transient);
        assert_eq!(classify(Step::Mail, &quota), Class::Quota);
    }

    #[test]
    fn errors_are_sorted_by_kind_and_step() {
        let rejected = |step, reply| Error::Rejected { step, reply };
        let tls = Error::Tls {
            target: "h:465".into(),
            source: "bad cert".into(),
        };
        assert_eq!(tls.class(), Class::Transient);
        assert!(tls.is_transient() && tls.status().is_none());
        assert!(
            std::error::Error::source(&tls).is_some(),
            "the cause is kept"
        );
        let timeout = Error::Timeout { step: Step::Mail };
        assert_eq!(timeout.class(), Class::Transient);
        assert_eq!(Error::local("disk full").class(), Class::Transient);
        let auth = rejected(Step::Auth, r(535, Some((5, 7, 3)), "no"));
        assert_eq!(auth.class(), Class::CredentialsBroken);
        assert_eq!(auth.status(), Some((535, Some((5, 7, 3)))));
        assert!(auth.is_permanent());
        assert_eq!(
            rejected(Step::Auth, r(454, Some((4, 7, 0)), "temporary")).class(),
            Class::Transient
        );
        assert_eq!(
            rejected(Step::EndOfData, r(550, Some((5, 4, 5)), "quota")).class(),
            Class::Quota
        );
        assert_eq!(
            Error::BadAddress {
                address: "x".into(),
                sender: false
            }
            .class(),
            Class::Permanent
        );
    }

    #[test]
    fn only_a_refused_auth_method_lets_mail_go_over_a_fallback() {
        let rejected = |step, reply| Error::Rejected { step, reply };
        let yes = [
            rejected(
                Step::Auth,
                r(
                    535,
                    Some((5, 7, 139)),
                    "SmtpClientAuthentication is disabled",
                ),
            ),
            rejected(Step::EndOfData, r(535, Some((5, 7, 139)), "disabled")),
            rejected(
                Step::Auth,
                r(
                    550,
                    Some((5, 7, 30)),
                    "Basic authentication is not supported",
                ),
            ),
        ];
        for e in &yes {
            assert!(e.refuses_auth_method(), "{e}");
        }
        let broken = |code: &str| {
            Error::OAuth(crate::oauth::Error::Broken {
                channel: "c".into(),
                code: code.into(),
                description: String::new(),
                hint: String::new(),
            })
        };
        assert!(broken("invalid_grant").refuses_auth_method());
        assert!(broken("unauthorized_client").refuses_auth_method());
        let no = [
            rejected(Step::Auth, r(535, Some((5, 7, 8)), "bad password")),
            rejected(Step::Rcpt, r(535, Some((5, 7, 139)), "about a recipient")),
            broken("no_refresh_token"),
            Error::Timeout { step: Step::Auth },
        ];
        for e in &no {
            assert!(!e.refuses_auth_method(), "{e}");
        }
    }

    #[test]
    fn relay_clients_hear_the_delivery_replies() {
        let io = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let connect = Error::Connect {
            target: "h:25".into(),
            source: io(),
        };
        assert_eq!(connect.client_reply("c"), Reply::upstream_unreachable("c"));
        let auth = Error::Rejected {
            step: Step::Auth,
            reply: r(535, Some((5, 7, 8)), "no"),
        };
        assert_eq!(auth.client_reply("c"), Reply::upstream_auth_failed("c"));
        let timeout = Error::Timeout { step: Step::Data };
        assert_eq!(timeout.client_reply("c"), Reply::upstream_timeout("c"));
        assert_eq!(
            Error::io("spool", io()).client_reply("c"),
            Reply::local_error()
        );
        // The queue's record keeps the detail.
        assert!(
            connect
                .record_reply("c")
                .text
                .ends_with("(cannot connect to h:25: connection refused)"),
            "{}",
            connect.record_reply("c")
        );
    }
}
